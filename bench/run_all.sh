#!/usr/bin/env bash
# The whole merge benchmark (issue 7): bcjax vs its peers on ViT-B/32 × 8 and ViT-L/14 × 2,
# the scaling sweeps, then the tables and plot in bench/results/ and BENCHMARKS.md.
# ~20 minutes on an idle 2-core box (mergekit alone is ~1.5 min per merge). Run it on a
# quiet machine: every implementation is timed in its own process, but other load skews it.
#     bash bench/run_all.sh              # everything (makes the peer venv first if missing)
#     SCALE=0.1 bash bench/run_all.sh    # quick check of the pipeline (~3 min; writes to /tmp)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=.venv/bin/python
SCALE="${SCALE:-1}"
[ -x .venv-bench/bin/python ] || bash bench/setup_peers.sh
if [ "$SCALE" = "1" ]; then OUT=bench/results; DOC=BENCHMARKS.md; else OUT="${OUT:-/tmp/bcjax_bench_quick}"; DOC=""; fi
mkdir -p "$OUT"
start=$(date +%s)
$PY bench/merge_speed.py --model vit_b_32 --tasks 8 --scale "$SCALE" --out "$OUT"
$PY bench/merge_speed.py --model vit_l_14 --tasks 2 --scale "$SCALE" --out "$OUT"
$PY bench/scaling.py --scale "$SCALE" --out "$OUT"
if [ "$SCALE" != "1" ]; then  # the report reads the canonical names
  for w in vit_b_32_8 vit_l_14_2; do cp "$OUT/${w%_*}@${SCALE}_${w##*_}.json" "$OUT/$w.json"; done
fi
$PY bench/report.py --results "$OUT" --doc "$DOC"
echo "benchmark suite: $(( $(date +%s) - start )) s; results in $OUT"
