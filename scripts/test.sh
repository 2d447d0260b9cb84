#!/usr/bin/env bash
# Fresh machine → the test suite (real FUSE mounts, a real moto S3 server, real etcd).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/python -m pytest -q -m "not slow" --durations=15 "$@"
