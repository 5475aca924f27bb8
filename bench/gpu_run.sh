#!/usr/bin/env bash
# One accelerator session's measurements (issues 14 and 16), run once on a lent GPU machine
# from the repo root. Its python3 has jax (CUDA), flax, optax but transformers 5 (no Flax):
# transformers 4.57.6 and the two packages it checks at import travel as wheels in .whl/
# (see bench/gpu_step.py's docstring). Every script writes its JSON into $OUT.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv | tee "$OUT/gpu.txt"
python3 -c "import jax, flax, optax, transformers; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, 'transformers', transformers.__version__, jax.devices())" | tee -a "$OUT/gpu.txt"
run() { local name=$1; shift; echo "=== $name"; timeout 200 python3 "$@" 2>&1 | tee -a "$OUT/all.log" | tail -40; }
run accel_merge bench/accel_merge.py --out "$OUT/accel_merge.json"
run adamerging_gpu bench/gpu_adamerging.py --out "$OUT/adamerging_gpu.json"
run gpu_step bench/gpu_step.py --out "$OUT/gpu_step.json"
ls -la "$OUT"
