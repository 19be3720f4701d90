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

_sluice_signoff() {
    local step=$1 here=$2; shift 2
    local py=${SLUICE_PYTHON:-} exports rc=0
    if [ -z "$py" ]; then
        if [ -x "$here/.venv/bin/python" ]; then py="$here/.venv/bin/python"; else py=python3; fi
    fi
    exports=$(mktemp "${TMPDIR:-/tmp}/sluice-signoff.XXXXXX") || return 2
    "$py" "$here/scripts/ttft_suite.py" "$step" --exports "$exports" "$@" || rc=$?
    if [ "$rc" -eq 0 ] && [ "$_sluice_sourced" = 1 ]; then
        . "$exports"
    fi
    rm -f "$exports"
    return "$rc"
}

# Sourced or executed? ($0 is this file when zsh sources it, the shell's name in bash)
_sluice_sourced=0
if [ -n "${ZSH_VERSION:-}" ]; then
    case ${ZSH_EVAL_CONTEXT:-} in *:file*) _sluice_sourced=1 ;; esac
    _sluice_here=$(cd "$(dirname "$0")" && pwd)
else
    [ "${BASH_SOURCE[0]}" != "$0" ] && _sluice_sourced=1
    _sluice_here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
fi

_sluice_rc=0
_sluice_signoff run "$_sluice_here" "$@" || _sluice_rc=$?
if [ "$_sluice_sourced" = 1 ]; then
    unset -f _sluice_signoff
    unset _sluice_sourced _sluice_here
    eval "unset _sluice_rc; return $_sluice_rc"
fi
exit "$_sluice_rc"
