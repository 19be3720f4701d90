#!/usr/bin/env bash
# Phase-1 sign-off, step 2: the TTFT suite against the running gateway, measured at the
# client (TTFT: send -> first delta; cancel: client close -> the provider observes the abort;
# queue wait: this run's own meta events).
#
#   ./run_ttft_suite.sh [URL] [ACCOUNT] [--rehearsal] [--gate]   (or: source run_ttft_suite.sh ...)
#
# A streaming TTFT run (SLUICE_SIGNOFF_REQUESTS distinct requests, default 20, at most
# SLUICE_SIGNOFF_PARALLEL at once) and a cancel run (SLUICE_SIGNOFF_CANCELS streams, default
# 5, closed at their first delta); progress and diagnostics on stderr. Prints the sheet's
# three result lines and a "Verdict: GO|NO-GO" line on stdout, appends them with the commit,
# provider, base URL and settings in force to PHASE1_GO_NO_GO.md (SLUICE_SIGNOFF_RECORD=none:
# don't). Status 0 GO, 1 NO-GO, 2 the suite cannot run (no gateway, token, refused upstream).
# A real sign-off refuses a simulated or loopback upstream: --rehearsal to rehearse.
# --gate (simulated provider): CI's regression bounds on the time the gateway adds.
# URL: argument or SLUICE_URL (default http://localhost:8000). Needs SLUICE_ADMIN_TOKEN.
# Never exits a sourcing shell (bash or zsh): it returns the status instead.

_sluice_step=run
if [ -n "${ZSH_VERSION:-}" ]; then _sluice_self=$0; else _sluice_self=${BASH_SOURCE[0]}; fi
. "$(cd "$(dirname "$_sluice_self")" && pwd)/scripts/signoff.sh"
