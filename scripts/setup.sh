#!/usr/bin/env bash
# Set up a fresh machine for cachefs: system packages (as root) and a virtualenv in .venv.
#   scripts/setup.sh          what cachefs and its demo need
#   scripts/setup.sh --test   and what the test suite needs (etcd, nftables)
set -euo pipefail
cd "$(dirname "$0")/.."
pkgs=(fuse3 libfuse3-dev pkg-config gcc python3-venv python3-dev)
if [ "${1:-}" = "--test" ]; then pkgs+=(etcd-server nftables); fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

need_pkgs=()
for p in "${pkgs[@]}"; do
    dpkg -s "$p" >/dev/null 2>&1 || need_pkgs+=("$p")
done
if [ ${#need_pkgs[@]} -gt 0 ]; then
    echo "setup: installing ${need_pkgs[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_pkgs[@]}" >/dev/null
fi

PY=${PYTHON:-python3}
if [ -x .venv/bin/python ] && ! .venv/bin/python -m pip --version >/dev/null 2>&1; then
    # a venv made while ensurepip was missing (python3-venv installed since) has no pip
    .venv/bin/python -m ensurepip -q >/dev/null 2>&1 || true
fi
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
# Quiet unless something is wrong: pip's output is kept, and shown whole if it fails.
# setuptools' "Editable installation" notice (a multi-line box on every editable install)
# is silenced by its message; pip's own "WARNING:" lines (e.g. an index location that
# does not exist) are dropped; anything else pip says (an ERROR about conflicting
# dependencies, which does not change its exit status) is shown.
pip_log=$(mktemp)
trap 'rm -f "$pip_log"' EXIT
if ! PYTHONWARNINGS="ignore:Editable installation" \
        .venv/bin/python -m pip install -q -c packaging/constraints.txt -e '.[test]' \
        >"$pip_log" 2>&1; then
    cat "$pip_log" >&2
    echo "setup: pip install -e '.[test]' failed (output above)" >&2
    exit 1
fi
grep -v "^WARNING: " "$pip_log" >&2 || true
.venv/bin/python -c "import pyfuse3, trio, aiobotocore, lmdb, cachefs" \
    || { echo "setup: python dependencies failed to install" >&2; exit 1; }
echo "setup: ready (.venv/bin/cachefs)"
