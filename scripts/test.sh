#!/usr/bin/env bash
# The whole test suite: unit, host end-to-end (real BPF, real lab guests) and nested (TCG+SVM).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tests/nested/setup.sh
exec .venv/bin/python -m pytest tests -q -p no:cacheprovider -ra "$@"
