#!/usr/bin/env bash
# Makes the optional peer venv that benchmarks/peer_tf_gloro.py runs TF gloro from:
# Python 3.11 with tensorflow-cpu 2.15 and gloro 1.1.1 (the TF original, from PyPI).
#
#   bash benchmarks/peer_tf_gloro_setup.sh            # -> ~/.cache/torchgloro-peer/venv
#   PEER_VENV=/elsewhere bash benchmarks/peer_tf_gloro_setup.sh
#
# tensorflow-cpu 2.15 installs under Python 3.9-3.11 only. The interpreter is $PYTHON, else
# the first python3.11/3.10/3.9 on PATH; without one, install it first, e.g.
# `apt-get install python3.11 python3.11-venv` (Debian/Ubuntu). gloro goes in with --no-deps:
# its one requirement, `tensorflow`, would pull the CUDA build beside tensorflow-cpu.
# About 1.5 GB on disk, outside the repository. Safe to re-run.
set -euo pipefail
VENV=${PEER_VENV:-$HOME/.cache/torchgloro-peer/venv}
PY=${PYTHON:-}
if [ -z "$PY" ]; then
    for cand in python3.11 python3.10 python3.9; do
        if command -v "$cand" >/dev/null; then PY=$(command -v "$cand"); break; fi
    done
fi
if [ -z "$PY" ]; then
    echo "error: no Python 3.9-3.11 found (tensorflow-cpu 2.15 needs one); install one," >&2
    echo "e.g. 'apt-get install python3.11 python3.11-venv', or name it with PYTHON=..." >&2
    exit 1
fi
"$PY" -c 'import sys; assert (3, 9) <= sys.version_info[:2] <= (3, 11), sys.version' || {
    echo "error: $PY is not Python 3.9-3.11 (tensorflow-cpu 2.15 needs one)" >&2
    exit 1
}
"$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet 'tensorflow-cpu==2.15.*'
"$VENV/bin/python" -m pip install --quiet --no-deps 'gloro==1.1.1'
TF_CPP_MIN_LOG_LEVEL=2 "$VENV/bin/python" -c 'import gloro, tensorflow as tf; print("peer venv ready:", tf.__version__, "gloro", gloro.__version__)'
echo "python: $VENV/bin/python"
