#!/usr/bin/env bash
# The GPU checks of docs/benchmarks.md in one go, for a lent machine of the `device` tool (run
# tools/device_prepare.sh here first; carry .whl and .gpu). CHECKS picks the checks (default:
# all, in this order); each writes its files to $OUT (at most 8 come back) and has its own time
# limit, so the script ends inside one call:
#   env.txt                     GPU, driver and package versions (always)
#   fsdp   -> fsdp.log, fsdp_scalars.json   trainer=fsdp (FSDP2, bf16) on the tiny model, one GPU
#   bench  -> bench_gpu.json/.log      tools/bench.py --mode gpu, ours and TRL's GRPOTrainer
#   static -> bench_static.json/.log   the same with ours on transformers' static KV cache
#   budget -> bench_budget.json/.log   ours alone with the default micro-batch budget (1024 tokens)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-outputs/gpu_checks}
CHECKS=${CHECKS:-fsdp bench static budget}
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

if wanted fsdp; then
    tiny=(model=tiny trainer.max_steps=2 trainer.val_check_interval=2 rollout.prompts_per_step=4
          rollout.max_new_tokens=12 data.num_train=200 data.num_val=8 data.val_batch_size=8
          validate_before_training=false reward.random_reward_probability=0.5 trainer.enable_progress_bar=false)
    {
        echo "=== trainer=fsdp (FSDP2, bf16 mixed precision), one GPU"
        timeout 90 python3 -m rlvr_lightning.train "${tiny[@]}" trainer=fsdp trainer.devices=1 hydra.run.dir=/tmp/checks/fsdp
        echo "exit status $?"
    } 2>&1 | grep -v -i "warn" | tee "$OUT/fsdp.log"
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
if wanted bench; then
    timeout 220 python3 "${bench[@]}" "${gpu_budget[@]}" --out "$OUT/bench_gpu.json" 2>&1 \
        | grep -v -i "warn" | tee "$OUT/bench_gpu.log"
fi
if wanted static; then
    timeout 240 python3 "${bench[@]}" "${gpu_budget[@]}" --override rollout.engine=hf \
        --override rollout.hf_cache=static --override rollout.pad_prompts_to_multiple_of=64 \
        --out "$OUT/bench_static.json" 2>&1 | grep -v -i "warn" | tee "$OUT/bench_static.log"
fi
if wanted budget; then
    timeout 120 python3 "${bench[@]}" --frameworks ours --out "$OUT/bench_budget.json" 2>&1 \
        | grep -v -i "warn" | tee "$OUT/bench_budget.log"
fi
exit 0
