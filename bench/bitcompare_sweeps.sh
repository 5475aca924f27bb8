#!/bin/bash
# Run the quick demo and every DINOv2 sweep config (plus two synthetic sweeps) from one checkout,
# for a bit-for-bit comparison of two commits with bench/compare_runs.py:
#   bash bench/bitcompare_sweeps.sh /path/to/checkout_before /tmp/before
#   bash bench/bitcompare_sweeps.sh /path/to/checkout_after  /tmp/after
#   python bench/compare_runs.py /tmp/before /tmp/after
# Fine-tunes are cached under $BCJAX_CACHE (default /tmp/bcjax-cache-compare); results stores are
# per output folder (the demo's lives in the cache: it is removed first so nothing is reused).
set -u
repo=$1; out=$2
export BCJAX_CACHE=${BCJAX_CACHE:-/tmp/bcjax-cache-compare}
mkdir -p "$out"
cd "$repo"
find "$BCJAX_CACHE/demo" -name results.jsonl -delete 2>/dev/null
python -m bcjax.cli demo --quick --out "$out/demo" --no-progress > "$out/demo.log" 2>&1; echo "demo rc=$?" >> "$out/status"
for c in sweep_subsets sweep_grid cosine validation_free class_split; do
  python -m bcjax.cli sweep --config configs/$c.yaml --out "$out/$c" --no-progress > "$out/$c.log" 2>&1
  echo "$c rc=$?" >> "$out/status"
done
printf 'experiment: grid\nsuite: {name: synthetic, tasks: 3, steps: 20}\nalphas: [0.5, 1.0]\nbetas: [0.0, 0.8]\ngammas: [0.99, 1.0]\n' > "$out/syn_grid.yaml"
printf 'experiment: subsets\nsuite: {name: synthetic, tasks: 3, steps: 20}\nmethods:\n  - {name: task_arithmetic, alpha: 0.4}\n  - {name: breadcrumbs, alpha: 0.4, beta: 0.8, gamma: 0.99}\n  - {name: ties, density: 0.3, alpha: 1.0}\n  - {name: simple_average}\n' > "$out/syn_subsets.yaml"
for c in syn_grid syn_subsets; do
  python -m bcjax.cli sweep --config "$out/$c.yaml" --out "$out/$c" --no-progress > "$out/$c.log" 2>&1
  echo "$c rc=$?" >> "$out/status"
done
