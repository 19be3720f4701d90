#!/bin/sh
# Run bench.cores on a machine without network (Python 3.12, x86-64), from wheels carried there.
#
#   bench/offline.sh download            # here, with network: the wheels of bench/wheels.txt into .whl/
#   bench/offline.sh run [ARGS...]       # there: install .whl/ into /tmp/sluice-site, run python -m bench.cores ARGS
#
# e.g. on a 16-core machine: bench/offline.sh run --device   (= --scaling 1,2,4,8 --levels 100,200 --workers 6)
# (.whl/ is git-ignored; carry it to the machine with the checkout.)
set -eu
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
case "${1:-}" in
download)
    mkdir -p .whl
    grep -v '^#' bench/wheels.txt | grep -v '^thespian' | grep . | while read -r spec; do
        "$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
            -d .whl "$spec"
    done
    # Thespian ships an sdist only; it is pure Python, so a wheel built here installs anywhere.
    "$PY" -m pip wheel --no-deps -w .whl "$(grep '^thespian' bench/wheels.txt)"
    ;;
run)
    shift
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/sluice-site .whl/*.whl
    PYTHONPATH=/tmp/sluice-site:$(pwd) exec "$PY" -m bench.cores "$@"
    ;;
*)
    sed -n '2,8p' "$0"
    exit 2
    ;;
esac
