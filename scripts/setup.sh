#!/usr/bin/env bash
# Sets up datago on a bare Debian/Ubuntu machine (as root) or a prepared one:
# system packages (only the missing ones), a virtual environment in .venv, torch
# (the pinned CPU build when torch is absent) and datago itself (editable build).
# Idempotent: a second run only rebuilds the package.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
missing=()
command -v "$PYTHON" >/dev/null 2>&1 || missing+=(python3)
command -v gcc >/dev/null 2>&1 || missing+=(gcc libc6-dev)
command -v pkg-config >/dev/null 2>&1 || missing+=(pkg-config)
if command -v pkg-config >/dev/null 2>&1; then
    pkg-config --exists libturbojpeg || missing+=(libturbojpeg0-dev)
    pkg-config --exists spng || missing+=(libspng-dev)
    pkg-config --exists libdeflate || missing+=(libdeflate-dev)
else
    missing+=(libturbojpeg0-dev libspng-dev libdeflate-dev)
fi
if command -v "$PYTHON" >/dev/null 2>&1; then
    "$PYTHON" -c 'import sysconfig, os, sys; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' \
        || missing+=(python3-dev)
    "$PYTHON" -c 'import ensurepip, venv' >/dev/null 2>&1 || missing+=(python3-venv)
fi
# nginx: the real HTTP server the tests start on loopback (tests/servers.py)
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing+=(nginx)

if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "datago setup: missing system packages: ${missing[*]}" >&2
        echo "run as root, or: sudo apt-get install -y ${missing[*]}" >&2
        exit 1
    fi
    echo "datago setup: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
VPY=.venv/bin/python
"$VPY" -m pip install -q --disable-pip-version-check --upgrade pip
# torch: a range in the package metadata; here the pinned CPU build when absent
# (an unpinned 'torch' would pull a multi-GB CUDA build).
"$VPY" -c 'import torch' >/dev/null 2>&1 || "$VPY" -m pip install -q --disable-pip-version-check torch==2.13.0
"$VPY" -m pip install -q --disable-pip-version-check "setuptools>=77" wheel "cython>=3.0"
"$VPY" -m pip install -q --disable-pip-version-check --no-build-isolation -e ".[test]"
"$VPY" -c 'import datago, datago._core._resample as r; print(f"datago {datago.__version__} ready ({r.simd()} kernels)")'
