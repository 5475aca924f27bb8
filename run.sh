#!/usr/bin/env bash
# One entry point for a fresh machine: sets up a venv (idempotent), then runs a job.
#   bash run.sh demo [--quick] [--out DIR]   the embedded demo (README's main job)
#   bash run.sh test [pytest args]           the test suite (what CI runs); without args, every
#                                            test file, in a few pytest processes (see below)
#   bash run.sh test-lowest [pytest args]    the core test files against the lowest supported
#                                            jax/numpy (constraints-lowest.txt) in .venv-lowest
# Versions: pyproject.toml states ranges; the known-good stack is pinned in constraints.txt and
# installed with `pip install -c constraints.txt`.
set -euo pipefail
cd "$(dirname "$0")"
job="${1:-}"; shift || true
py="${PYTHON:-python3}"

# The core test files: they need only jax, numpy and the test-core extra (pytest, hypothesis).
CORE_TESTS=(tests/test_merging.py tests/test_native.py tests/test_properties.py tests/test_sharding.py
            tests/test_grids.py tests/test_sweeps.py tests/test_install.py tests/test_multiprocess.py
            tests/test_large_counts.py tests/test_ties_threshold_protocol.py tests/test_hparams.py)

# `bash run.sh test` without arguments runs the suite as a few separate pytest processes, so the
# memory one group's models, data and compiled programs hold is returned to the system before the
# next group starts: CI's peak RSS is the largest group's, not the whole session's (one pytest
# process over every file grew to 22 GB). Per-file peak RSS (/usr/bin/time -v, 2-core CPU,
# 2026-11-30): test_demo 4.6 GB (its demo subprocess), test_experiments 4.5 GB, test_notebook
# 4.3 GB (its kernel), test_clip 1.7, test_dinov2 1.5, test_t5_pipeline 1.4, the others < 1.2 GB.
# The last group is every other test file (new files land there).
TEST_GROUPS=("tests/test_demo.py tests/test_notebook.py tests/test_dinov2.py"
             "tests/test_clip.py tests/test_clip_notebook.py"
             "tests/test_t5_model.py tests/test_t5_pipeline.py tests/test_t5_glue.py tests/test_t5_notebook.py")

setup() {  # setup VENV EXTRAS CONSTRAINTS
  local venv="$1" extras="$2" constraints="$3"
  if [ ! -x "$venv/bin/python" ]; then "$py" -m venv "$venv"; fi
  # shellcheck disable=SC1091
  . "$venv/bin/activate"
  local stamp="$venv/.bcjax-installed-$extras"
  if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ "$constraints" -nt "$stamp" ]; then
    python -m pip install -q --upgrade pip
    python -m pip install -q -c "$constraints" -e ".[$extras]"
    touch "$stamp"
  fi
}

fashion_mnist() {
  # Fashion-MNIST for the demo's offline suite ships as a Debian package.
  if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null 2>&1 \
      || echo "note: could not install the Debian package dataset-fashion-mnist; the fashion_mnist task" \
              "then needs tensorflow-datasets and a network (or set BCJAX_FASHION_MNIST_DIR)" >&2
  fi
}

test_in_groups() {
  local ignores=() failed=() g f n=0
  for g in "${TEST_GROUPS[@]}"; do for f in $g; do ignores+=("--ignore=$f"); done; done
  # one cold demo cache shared by the demo and notebook tests across processes (conftest.py)
  BCJAX_TEST_DEMO_CACHE="$(mktemp -d)"
  export BCJAX_TEST_DEMO_CACHE
  trap 'rm -rf "$BCJAX_TEST_DEMO_CACHE"' EXIT
  run_group() {  # run_group LABEL PYTEST_ARGS...
    local label="$1"; shift; n=$((n + 1))
    echo "== test group $n: $label"
    python -m pytest -q "$@" || failed+=("$label")
  }
  for g in "${TEST_GROUPS[@]}"; do
    # shellcheck disable=SC2086
    run_group "$g" $g
  done
  run_group "every other test file" tests "${ignores[@]}"
  if [ ${#failed[@]} -gt 0 ]; then
    echo "FAILED test groups: ${failed[*]}" >&2
    return 1
  fi
  echo "all $n test groups passed"
}

case "$job" in
  demo) setup .venv demo constraints.txt; fashion_mnist; exec bcjax demo "$@" ;;
  test)
    setup .venv test constraints.txt; fashion_mnist
    if [ $# -gt 0 ]; then exec python -m pytest -q "$@"; fi
    test_in_groups ;;
  test-lowest)
    setup .venv-lowest test-core constraints-lowest.txt
    python -c 'import jax, numpy; print(f"lowest supported stack: jax {jax.__version__}, numpy {numpy.__version__}")'
    if [ $# -gt 0 ]; then exec python -m pytest -q "$@"; fi
    exec python -m pytest -q "${CORE_TESTS[@]}" ;;
  *) echo "usage: bash run.sh {demo|test|test-lowest} [args]" >&2; exit 2 ;;
esac
