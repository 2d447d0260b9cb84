#!/usr/bin/env bash
# Fresh machine → a running demo: local S3 server, sample data set, mount, cold/warm/hot reads.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/cachefs demo "$@"
