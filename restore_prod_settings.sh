#!/usr/bin/env bash
# Phase-1 sign-off, step 4: production settings back on the running gateway, live.
#
#   source restore_prod_settings.sh [URL]   (or run it: ./restore_prod_settings.sh)
#
# Applies config/production.json (SLUICE_PRODUCTION_SETTINGS: another file) to the running
# actors: every pacer setting of every account the gateway runs, the coalescer flags, the
# alert thresholds; then reads every value back and fails (status 1) listing each one that
# differs. URL: argument or SLUICE_URL (default http://localhost:8000). Needs
# SLUICE_ADMIN_TOKEN. Sourced, it exports the production file as the environment a restart
# reads (`scripts/ttft_suite.py env`), so "Restart backend" from this shell comes back with
# production, and unsets SLUICE_SIGNOFF_ACCOUNT and SLUICE_SIGNOFF_SAVED.
# Never exits a sourcing shell (bash or zsh): it returns the status instead.

_sluice_step=restore
if [ -n "${ZSH_VERSION:-}" ]; then _sluice_self=$0; else _sluice_self=${BASH_SOURCE[0]}; fi
. "$(cd "$(dirname "$_sluice_self")" && pwd)/scripts/signoff.sh"
