#!/usr/bin/env bash
# Phase-1 sign-off, step 1: first saves every setting in force (pacers, flags, alert
# thresholds) to data/signoff-saved-<time>.json and prints its path; then TTFT-test pacer
# settings on the running gateway, live (admin messages to the Pacer; do NOT restart after
# it: a restart runs the environment's settings). Generous RPS/BURST/CONCURRENCY for the
# account under test: argument or SLUICE_SIGNOFF_ACCOUNT, default the default provider's.
#
#   source prep_ttft_test.sh [URL] [ACCOUNT]     (or run it: ./prep_ttft_test.sh ...)
#
# URL: argument or SLUICE_URL (default http://localhost:8000). Needs SLUICE_ADMIN_TOKEN.
# Sourced, it exports SLUICE_SIGNOFF_ACCOUNT and SLUICE_SIGNOFF_SAVED (the saved file) only:
# never a test value that a restart from this shell would pick up.
# Never exits a sourcing shell (bash or zsh): it returns the status instead.

_sluice_step=prep
if [ -n "${ZSH_VERSION:-}" ]; then _sluice_self=$0; else _sluice_self=${BASH_SOURCE[0]}; fi
. "$(cd "$(dirname "$_sluice_self")" && pwd)/scripts/signoff.sh"
