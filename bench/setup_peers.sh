#!/usr/bin/env bash
# Peer implementations for bench/merge_speed.py (mergekit, torch) in their own venv,
# /work/main/.venv-bench, so that bcjax's .venv is untouched. torch is pinned to 2.13.0
# (the CPU wheel available locally; other versions pull GBs of CUDA wheels) and mergekit
# is installed against it: a constraints file keeps pip from ever replacing torch.
#     bash bench/setup_peers.sh          # idempotent; ~2-5 minutes the first time
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${BENCH_VENV:-$ROOT/.venv-bench}"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null || PY=python3
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
CONS="$(mktemp)"; trap 'rm -f "$CONS"' EXIT
echo "torch==2.13.0" > "$CONS"
pip_q() {  # quiet pip, minus the local-index "Location ... is ignored" noise
  "$VENV/bin/python" -m pip install -q "$@" 2> >(grep -v "is ignored: it is neither" >&2)
}
pip_q --upgrade pip
# 1. torch first (CPU wheel), 2. mergekit and its deps, never moving torch.
pip_q "torch==2.13.0" numpy
pip_q -c "$CONS" "mergekit==0.1.5"
"$VENV/bin/python" - <<'PY'
import torch, mergekit.merge_methods as mm
assert torch.__version__.split("+")[0] == "2.13.0", torch.__version__
print("peer venv ok: torch", torch.__version__, "| mergekit methods:", len(mm.registered_methods()))
PY
