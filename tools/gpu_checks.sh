#!/usr/bin/env bash
# The GPU checks of docs/benchmarks.md in one go, for a lent machine of the `device` tool (run
# tools/device_prepare.sh here first; carry .whl and .gpu). Writes at most 8 files to $OUT:
#   env.txt          GPU, driver and package versions
#   fsdp.log         trainer=fsdp2 (bf16) and trainer=fsdp (FSDP1) on the tiny model, one GPU
#   fsdp_scalars.json  their logged scalars
#   bench_gpu.json/.log      tools/bench.py --mode gpu: ours and TRL's GRPOTrainer
#   bench_static.json/.log   ours with transformers' static KV cache and compiled decoding
# Each stage has its own time limit so the whole script ends inside one call.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-outputs/gpu_checks}
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

tiny=(model=tiny trainer.max_steps=2 trainer.val_check_interval=2 rollout.prompts_per_step=4
      rollout.max_new_tokens=12 data.num_train=200 data.num_val=8 data.val_batch_size=8
      validate_before_training=false reward.random_reward_probability=0.5 trainer.enable_progress_bar=false)
{
    echo "=== trainer=fsdp2 (FSDP2, bf16 mixed precision), one GPU"
    timeout 75 python3 -m rlvr_lightning.train "${tiny[@]}" trainer=fsdp2 trainer.accelerator=gpu \
        trainer.devices=1 trainer.strategy.mixed_precision=bf16 hydra.run.dir=/tmp/checks/fsdp2
    echo "exit status $?"
    echo "=== trainer=fsdp (FSDP1, Lightning's FSDPStrategy), one GPU"
    timeout 75 python3 -m rlvr_lightning.train "${tiny[@]}" trainer=fsdp trainer.devices=1 hydra.run.dir=/tmp/checks/fsdp
    echo "exit status $?"
} 2>&1 | grep -v -i "warn" | tee "$OUT/fsdp.log"
python3 - "$OUT/fsdp_scalars.json" <<'EOF'
import json, sys
from pathlib import Path
from tests.conftest import read_scalars
runs = {}
for name in ("fsdp2", "fsdp"):
    try:
        runs[name] = read_scalars(Path("/tmp/checks") / name)
    except Exception as error:  # a run that failed has no events
        runs[name] = {"error": repr(error)}
Path(sys.argv[1]).write_text(json.dumps(runs, indent=1))
EOF

bench=(tools/bench.py --mode gpu --model .gpu/smollm2_shape --random-weights --prompts 32
       --completion-tokens 256 --steps 3 --override rollout.max_tokens_per_micro_batch=16384)
timeout "${BENCH_SECONDS:-210}" python3 "${bench[@]}" --out "$OUT/bench_gpu.json" 2>&1 \
    | grep -v -i "warn" | tee "$OUT/bench_gpu.log"
timeout "${STATIC_SECONDS:-120}" python3 "${bench[@]}" --frameworks ours --override rollout.engine=hf \
    --override rollout.hf_cache=static --override rollout.pad_prompts_to_multiple_of=64 \
    --out "$OUT/bench_static.json" 2>&1 | grep -v -i "warn" | tee "$OUT/bench_static.log"
exit 0
