#!/usr/bin/env bash
# Runs the test suite. Extra arguments go to pytest (e.g. `bash scripts/test.sh tests/diffusion -k posterior`).
VQDIFF_EXTRAS=dev
source "$(dirname "$0")/env.sh"
exec python -m pytest -n "${VQDIFF_TEST_WORKERS:-2}" "$@"
