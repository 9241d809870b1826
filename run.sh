#!/usr/bin/env bash
# Set up the project's virtual environment and run one of its jobs.
#   bash run.sh demo   render the sample Blender scene with the bundled shapes model
#   bash run.sh test   lint and run the test suite, then the add-on's Blender scenarios again on
#                      the oldest Blender the extension supports (its own venv, .venv-bpy42)
#   bash run.sh test-oldest [pytest args]   only that second run
set -euo pipefail
cd "$(dirname "$0")"

VENV=${VENV:-.venv}
PY="$VENV/bin/python"
# The oldest Blender the manifest claims (blender_version_min): its bpy wheel runs the add-on's
# scenarios in a venv of its own (bpy and torch never share a process; the engine stays in $VENV).
OLDEST_BPY=4.2.0
OLDEST_VENV=${OLDEST_VENV:-.venv-bpy42}
OLDEST_PY="$OLDEST_VENV/bin/python"
# The add-on's tests that drive bpy; the pure core/ and client/ tests need no second run, nor
# does the farm fault test (two batch renderers sharing a folder: claims, not Blender), nor the
# Ray tests (the pool is Blender-free; the Ray batch is the local batch's Blender side).
ADDON_SCENARIOS=(tests/addon/blender tests/addon/render tests/addon/ui
    tests/addon/test_extension_build.py tests/addon/test_registration.py
    --ignore tests/addon/render/test_ray_pool.py --ignore tests/addon/render/test_ray_batch.py
    --deselect "tests/addon/render/test_batch_render.py::test_two_renderers_on_one_folder_one_killed_render_each_frame_once")

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
        "$PY" -m pip install --quiet -e ".[engine,blender,test,cluster]"
        echo "$want" > "$stamp"
    fi
}

setup_oldest() {
    if [ ! -x "$OLDEST_PY" ]; then
        python3 -m venv "$OLDEST_VENV"
    fi
    local stamp="$OLDEST_VENV/.installed" want
    want=$(echo "$OLDEST_BPY" | cat - run.sh | sha256sum | cut -c1-16)
    if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
        # numpy<2 as in Blender 4.2 itself; pytest and pillow for the scenario scripts.
        "$OLDEST_PY" -m pip install --quiet "bpy==$OLDEST_BPY" "numpy<2" "pytest>=8" "pillow>=10"
        echo "$want" > "$stamp"
    fi
}

test_oldest() {
    setup_oldest
    echo "== add-on scenarios on bpy $OLDEST_BPY =="
    LAYOUT_DIFFUSION_BPY_PYTHON="$OLDEST_PY" "$PY" -m pytest -q "$@"
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
        if [ $# -gt 0 ]; then
            exec "$PY" -m pytest -q "$@"
        fi
        "$PY" -m pytest -q
        test_oldest "${ADDON_SCENARIOS[@]}"
        ;;
    test-oldest)
        setup
        if [ $# -eq 0 ]; then
            set -- "${ADDON_SCENARIOS[@]}"
        fi
        test_oldest "$@"
        ;;
    *)
        echo "usage: bash run.sh demo|test|test-oldest [args...]" >&2
        exit 2
        ;;
esac
