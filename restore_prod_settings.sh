#!/usr/bin/env bash
# Phase-1 sign-off, step 4: production pacer settings back on the running gateway, live.
#
#   source restore_prod_settings.sh [URL] [ACCOUNT]   (or run it: ./restore_prod_settings.sh)
#
# pacer:perplexity gets PERPLEXITY_RPS=1 PERPLEXITY_CONCURRENCY=3 PERPLEXITY_BURST=2 (the
# rest as configured). When the gateway has no Perplexity pacer it says so; the account
# under test (argument, SLUICE_SIGNOFF_ACCOUNT, or the default provider's) always gets its
# configured settings back. URL: argument or SLUICE_URL (default http://localhost:8000).
# Needs SLUICE_ADMIN_TOKEN. Sourced, it exports the PERPLEXITY_* production values (and the
# account's configured ones) and unsets SLUICE_SIGNOFF_ACCOUNT.
# Never exits a sourcing shell (bash or zsh): it returns the status instead.

_sluice_step=restore
if [ -n "${ZSH_VERSION:-}" ]; then _sluice_self=$0; else _sluice_self=${BASH_SOURCE[0]}; fi
. "$(cd "$(dirname "$_sluice_self")" && pwd)/scripts/signoff.sh"
