#!/usr/bin/env bash
# The GPU checks of docs/benchmarks.md in one go, for a lent machine of the `device` tool (run
# tools/device_prepare.sh here first; carry .whl and .gpu). CHECKS picks the checks (default:
# the static engine's: engine ours_static ours_static_gc); each writes its files to $OUT (at most 8 come back) and
# has its own time limit, so the script ends inside one call:
#   env.txt                     GPU, driver and package versions (always)
#   engine  -> engine.json             tools/check_static_engine.py: CUDA graphs = eager, and
#                                      generation alone per engine
#   ours_static -> bench_engine_static.json   tools/bench.py --mode gpu, ours with rollout.engine=static
#                                      against TRL's GRPOTrainer (16384-token micro-batch budget; the
#                                      step compiled if the engine check found that exact and faster)
#   ours_static_gc -> bench_engine_static_gc.json   ours alone, the same with gradient checkpointing (less memory)
#   budgets -> bench_budget_4096.json  ours alone, engine=static, a 4096-token micro-batch budget
#   fsdp    -> fsdp.log, fsdp_scalars.json   trainer=fsdp (FSDP2, bf16) on the tiny model, one GPU
#   bench   -> bench_gpu.json          ours (shared-prefix engine) and TRL
#   static  -> bench_static.json       the same with ours on transformers' static KV cache
#   budget  -> bench_budget.json       ours alone with the default micro-batch budget (1024 tokens)
# Every check's output goes to checks.log too.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-outputs/gpu_checks}
CHECKS=${CHECKS:-engine ours_static ours_static_gc}
mkdir -p "$OUT"
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/site \
            .whl/antlr4-python3-runtime-4.9.3.tar.gz || exit 1
    export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    python3 -c "import sys, torch, transformers, lightning, trl; print(sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__, 'lightning', lightning.__version__, 'trl', trl.__version__)"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

wanted() { [[ " $CHECKS " == *" $1 "* ]]; }
log() { grep -v -i "warn" | tee -a "$OUT/checks.log"; }

if wanted fsdp; then
    tiny=(model=tiny trainer.max_steps=2 trainer.val_check_interval=2 rollout.prompts_per_step=4
          rollout.max_new_tokens=12 data.num_train=200 data.num_val=8 data.val_batch_size=8
          validate_before_training=false reward.random_reward_probability=0.5 trainer.enable_progress_bar=false)
    {
        echo "=== trainer=fsdp (FSDP2, bf16 mixed precision), one GPU"
        timeout 90 python3 -m rlvr_lightning.train "${tiny[@]}" trainer=fsdp trainer.devices=1 hydra.run.dir=/tmp/checks/fsdp
        echo "exit status $?"
    } 2>&1 | log
    python3 -c "
import json, sys
from pathlib import Path
from tests.conftest import read_scalars
Path(sys.argv[1]).write_text(json.dumps(read_scalars(Path('/tmp/checks/fsdp')), indent=1))
" "$OUT/fsdp_scalars.json"
fi

bench=(tools/bench.py --mode gpu --model .gpu/smollm2_shape --random-weights --prompts 32
       --completion-tokens 256 --steps 3)
gpu_budget=(--override rollout.max_tokens_per_micro_batch=16384)
# The static engine's step compiled (torch.compile) where the engine check found it exact
# (float32 logits within 1e-4 of transformers') and faster than the plain step.
compiled=false
if wanted engine; then
    timeout 170 python3 tools/check_static_engine.py --model .gpu/smollm2_shape --out "$OUT/engine.json" 2>&1 | log
    python3 -c "
import json, sys
report = json.load(open(sys.argv[1]))
generation, correctness = report['generation'], report['correctness']
exact = correctness['float32_compiled_max_logit_difference'] < 1e-4
faster = generation['static_compiled_cuda_graphs']['tokens_per_second'] > generation['static_cuda_graphs']['tokens_per_second']
sys.exit(0 if exact and faster else 1)
" "$OUT/engine.json" 2>&1 && compiled=true
fi
echo "static engine: compile_decoding=$compiled" | log
static=(--override rollout.engine=static --override rollout.compile_decoding=$compiled)
if wanted ours_static; then
    timeout 250 python3 "${bench[@]}" "${gpu_budget[@]}" "${static[@]}" \
        --out "$OUT/bench_engine_static.json" 2>&1 | log
fi
if wanted ours_static_gc; then
    # Ours alone: its TRL peer is the ours_static run's, in the same call.
    timeout 150 python3 "${bench[@]}" --frameworks ours "${gpu_budget[@]}" "${static[@]}" \
        --override model.gradient_checkpointing=true --out "$OUT/bench_engine_static_gc.json" 2>&1 | log
fi
if wanted budgets; then
    # Memory without checkpointing: a 4096-token budget.
    timeout 110 python3 "${bench[@]}" --frameworks ours "${static[@]}" \
        --override rollout.max_tokens_per_micro_batch=4096 --out "$OUT/bench_budget_4096.json" 2>&1 | log
fi
if wanted bench; then
    timeout 220 python3 "${bench[@]}" "${gpu_budget[@]}" --out "$OUT/bench_gpu.json" 2>&1 | log
fi
if wanted static; then
    timeout 240 python3 "${bench[@]}" "${gpu_budget[@]}" --override rollout.engine=hf \
        --override rollout.hf_cache=static --override rollout.pad_prompts_to_multiple_of=64 \
        --out "$OUT/bench_static.json" 2>&1 | log
fi
if wanted budget; then
    timeout 120 python3 "${bench[@]}" --frameworks ours --out "$OUT/bench_budget.json" 2>&1 | log
fi
exit 0
