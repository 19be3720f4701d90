#!/usr/bin/env bash
# Phase-1 sign-off, step 1: TTFT-test pacer settings on the running gateway, live (admin
# messages to the Pacer; no restart needed). Generous RPS/BURST/CONCURRENCY for the account
# under test: argument or SLUICE_SIGNOFF_ACCOUNT, default the gateway's default provider's.
#
#   source prep_ttft_test.sh [URL] [ACCOUNT]     (or run it: ./prep_ttft_test.sh ...)
#
# URL: argument or SLUICE_URL (default http://localhost:8000). Needs SLUICE_ADMIN_TOKEN.
# Sourced, it also exports SLUICE_SIGNOFF_ACCOUNT and <ACCOUNT>_RPS/_BURST/_CONCURRENCY, so
# the later steps use the same account and a restart from this shell keeps the settings.
# Never exits a sourcing shell (bash or zsh): it returns the status instead.

_sluice_step=prep
if [ -n "${ZSH_VERSION:-}" ]; then _sluice_self=$0; else _sluice_self=${BASH_SOURCE[0]}; fi
. "$(cd "$(dirname "$_sluice_self")" && pwd)/scripts/signoff.sh"
