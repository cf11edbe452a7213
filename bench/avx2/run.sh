#!/usr/bin/env bash
# Runs a command as if on an AVX2-only CPU (see sitecustomize.py beside this file for what is and is not
# emulated), e.g. the whole suite:  bash bench/avx2/run.sh make test
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
export PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}" ATEN_CPU_CAPABILITY=avx2
exec "$@"
