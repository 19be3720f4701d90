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
_sluice_signoff prep "$_sluice_here" "$@" || _sluice_rc=$?
if [ "$_sluice_sourced" = 1 ]; then
    unset -f _sluice_signoff
    unset _sluice_sourced _sluice_here
    eval "unset _sluice_rc; return $_sluice_rc"
fi
exit "$_sluice_rc"
