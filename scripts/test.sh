#!/usr/bin/env bash
# Fresh machine → the test suite (real FUSE mounts, a real moto S3 server, real etcd).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --test
# two files at a time (a file's tests share its fixtures and run in order): the suite
# mostly waits on daemons, S3 and timeouts, so two workers take about half the time
exec .venv/bin/python -m pytest -q -m "not slow" -n 2 --dist loadfile --durations=15 "$@"
