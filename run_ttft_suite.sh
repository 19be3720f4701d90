#!/usr/bin/env bash
# Phase-1 sign-off, step 2: the TTFT suite against the running gateway.
#
#   ./run_ttft_suite.sh [URL] [ACCOUNT]          (or: source run_ttft_suite.sh ...)
#
# A streaming TTFT run (SLUICE_SIGNOFF_REQUESTS distinct requests, default 20, at most
# SLUICE_SIGNOFF_PARALLEL at once) and a cancel run (SLUICE_SIGNOFF_CANCELS streams, default
# 5, disconnected after their first delta), each bounded by SLUICE_SIGNOFF_TIMEOUT_S; progress
# on stderr. Prints exactly the three result lines of the sign-off sheet on stdout, appends
# them with the date and settings to PHASE1_GO_NO_GO.md (SLUICE_SIGNOFF_RECORD=none: don't),
# and fails (status 1) on any FAIL; status 2 when the suite cannot run (no gateway, ...).
# URL: argument or SLUICE_URL (default http://localhost:8000). SLUICE_ADMIN_TOKEN, when
# set, is used to find the provider of the account under test and to record its settings.
# Never exits a sourcing shell (bash or zsh): it returns the status instead.

_sluice_step=run
if [ -n "${ZSH_VERSION:-}" ]; then _sluice_self=$0; else _sluice_self=${BASH_SOURCE[0]}; fi
. "$(cd "$(dirname "$_sluice_self")" && pwd)/scripts/signoff.sh"
