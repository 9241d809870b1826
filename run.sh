#!/usr/bin/env bash
# Set up the project's virtual environment and run one of its jobs.
#   bash run.sh demo   render the sample Blender scene with the bundled shapes model
#   bash run.sh test   lint and run the test suite
set -euo pipefail
cd "$(dirname "$0")"

VENV=${VENV:-.venv}
PY="$VENV/bin/python"

setup() {
    if [ ! -x "$PY" ]; then
        python3 -m venv "$VENV"
        "$PY" -m pip install --quiet --upgrade pip
    fi
    local stamp="$VENV/.installed" want
    want=$(cat pyproject.toml run.sh | sha256sum | cut -c1-16)
    if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
        # torch first, pinned, so the open requirement below does not pull a multi-GB CUDA build
        # onto CPU-only machines; a torch that is already installed (e.g. a CUDA one) is kept.
        "$PY" -c "import torch" 2>/dev/null || "$PY" -m pip install --quiet "torch==2.13.0"
        "$PY" -m pip install --quiet -e ".[engine,blender,test]"
        echo "$want" > "$stamp"
    fi
}

job=${1:-}
shift || true
case "$job" in
    demo)
        setup
        exec "$PY" -m blender_addon.render samples/demo.blend --frames 1 --out out/demo \
            --engine-python "$PY" "$@"
        ;;
    test)
        setup
        "$PY" -m ruff check .
        "$PY" -m ruff format --check .
        exec "$PY" -m pytest -q "$@"
        ;;
    *)
        echo "usage: bash run.sh demo|test [args...]" >&2
        exit 2
        ;;
esac
