#!/usr/bin/env bash
# One command for the cachefs benchmark: bench/run.sh [--quick] [bench.py options]
# Installs what it needs (s3rver from npm into bench/.node, s3fs and rclone from
# Debian, matplotlib into the venv), then runs bench/bench.py as root.
set -euo pipefail
BENCH="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$BENCH")"

if [ "$(id -u)" -ne 0 ]; then
    echo "bench/run.sh must run as root (drops caches, mounts FUSE, sets read_ahead_kb)" >&2
    exit 1
fi

# Python: the project's venv, set up by scripts/setup.sh on a fresh clone
if [ -z "${VENV:-}" ]; then
    "$ROOT/scripts/setup.sh"
    VENV="$ROOT/.venv"
elif [ ! -x "$VENV/bin/python" ]; then
    echo "no virtualenv at $VENV (VENV=...)" >&2
    exit 1
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
python - <<'PY' 2>/dev/null || pip install -q matplotlib
import matplotlib
PY
python -c 'import boto3, aiobotocore, trio, pyfuse3' 2>/dev/null || pip install -q boto3 'aiobotocore[httpx]' trio pyfuse3
command -v py-spy >/dev/null || pip install -q py-spy  # the tracing scenario's profile

# S3 server: s3rver from npm, kept in bench/.node (gitignored)
if [ ! -f "$BENCH/.node/node_modules/s3rver/bin/s3rver.js" ]; then
    command -v npm >/dev/null || { apt-get install -y nodejs npm >/dev/null; }
    mkdir -p "$BENCH/.node"
    [ -f "$BENCH/.node/package.json" ] || echo '{"name":"cachefs-bench-node","private":true}' > "$BENCH/.node/package.json"
    (cd "$BENCH/.node" && npm install --no-audit --no-fund --loglevel=error s3rver)
fi

# Peers and tools from Debian
need=()
command -v s3fs >/dev/null || need+=(s3fs)
command -v rclone >/dev/null || need+=(rclone)
command -v fusermount3 >/dev/null || need+=(fuse3)
if [ ${#need[@]} -gt 0 ]; then
    echo "installing ${need[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y "${need[@]}" >/dev/null || {
        apt-get update >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y "${need[@]}" >/dev/null; }
fi

# The C passthrough (the FUSE ceiling): libfuse3-dev and gcc come with scripts/setup.sh
if [ ! -x "$BENCH/.build/c-passthrough" ] || [ "$BENCH/c_passthrough.c" -nt "$BENCH/.build/c-passthrough" ]; then
    mkdir -p "$BENCH/.build"
    # shellcheck disable=SC2046
    gcc -O2 -Wall -o "$BENCH/.build/c-passthrough" "$BENCH/c_passthrough.c" $(pkg-config --cflags --libs fuse3) \
        || echo "run.sh: could not build the C passthrough; its rows will say not available" >&2
fi

exec python "$BENCH/bench.py" "$@"
