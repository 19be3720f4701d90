# Shared by prep_ttft_test.sh, run_ttft_suite.sh and restore_prod_settings.sh: each sets
# _sluice_step and _sluice_self (its own path) and sources this file last, so that
# sourced, this returns the step's status to the sourcing shell (never exits it), and
# executed, it exits with it. The work itself is scripts/ttft_suite.py.

_sluice_signoff() {
    local step=$1 here=$2; shift 2
    local py=${SLUICE_PYTHON:-} exports rc=0
    if [ -z "$py" ]; then
        if [ -x "$here/.venv/bin/python" ]; then py="$here/.venv/bin/python"; else py=python3; fi
    fi
    exports=$(mktemp "${TMPDIR:-/tmp}/sluice-signoff.XXXXXX") || return 2
    "$py" "$here/scripts/ttft_suite.py" "$step" --exports "$exports" "$@" || rc=$?
    if [ -s "$exports" ] && [ "$_sluice_sourced" = 1 ]; then
        . "$exports"
    fi
    rm -f "$exports"
    return "$rc"
}

# Was the step script sourced, or executed? (in bash $0 is the shell's name when sourced)
_sluice_sourced=0
if [ -n "${ZSH_VERSION:-}" ]; then
    case ${ZSH_EVAL_CONTEXT:-} in *:file:file*) _sluice_sourced=1 ;; esac
else
    [ "${BASH_SOURCE[1]}" != "$0" ] && _sluice_sourced=1
fi
_sluice_here=$(cd "$(dirname "$_sluice_self")" && pwd)

_sluice_rc=0
_sluice_signoff "$_sluice_step" "$_sluice_here" "$@" || _sluice_rc=$?
if [ "$_sluice_sourced" = 1 ]; then
    unset -f _sluice_signoff
    unset _sluice_sourced _sluice_here _sluice_step _sluice_self
    eval "unset _sluice_rc; return $_sluice_rc"
fi
exit "$_sluice_rc"
