#!/usr/bin/env bash
# One entry point for a fresh machine: sets up .venv (idempotent), then runs a job.
#   bash run.sh demo [--quick] [--out DIR]   the embedded demo (README's main job)
#   bash run.sh test [pytest args]           the test suite (what CI runs)
set -euo pipefail
cd "$(dirname "$0")"
job="${1:-}"; shift || true
py="${PYTHON:-python3}"

setup() {
  if [ ! -x .venv/bin/python ]; then "$py" -m venv .venv; fi
  # shellcheck disable=SC1091
  . .venv/bin/activate
  local extras="$1" stamp=".venv/.bcjax-installed-$1"
  if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    python -m pip install -q --upgrade pip
    python -m pip install -q -e ".[$extras]"
    touch "$stamp"
  fi
  # Fashion-MNIST for the demo's offline suite ships as a Debian package.
  if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null 2>&1 \
      || echo "note: could not install the Debian package dataset-fashion-mnist; the fashion_mnist task" \
              "then needs tensorflow-datasets and a network (or set BCJAX_FASHION_MNIST_DIR)" >&2
  fi
}

case "$job" in
  demo) setup demo; exec bcjax demo "$@" ;;
  test) setup test; exec python -m pytest -q "$@" ;;
  *) echo "usage: bash run.sh {demo|test} [args]" >&2; exit 2 ;;
esac
