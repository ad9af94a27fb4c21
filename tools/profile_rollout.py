"""Profile one rollout of an engine with torch.profiler: where a decoding step's time goes.

    python tools/profile_rollout.py --model MODEL_FOLDER --engine static --compile true

Builds the model from ``--model``'s config with seeded random weights, warms the engine up with
one rollout, profiles a second (bf16 autocast on CUDA, as training runs it) and prints the
operators and kernels that took the most device time (CPU time without a GPU).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from rlvr_lightning.rollout import generate_rollout  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--engine", default="static")
    parser.add_argument("--compile", default="auto", help="rollout.engine.compile_decoding (static and hf engines)")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--rows", type=int, default=40, help="table rows to print")
    args = parser.parse_args()
    from check_static_engine import random_model_and_prompts  # tools/, beside this script

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer, texts = random_model_and_prompts(args.model, args.prompts, device)

    def rollout() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            # compile_decoding is an option of the engines that compile (static, hf).
            options = {"compile_decoding": args.compile} if args.engine in ("static", "hf") else {}
            generate_rollout(model, tokenizer, texts, args.group_size, args.tokens, ignore_eos=True,
                             engine=args.engine, **options)

    rollout()
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
        torch.cuda.synchronize()
    with torch.profiler.profile(activities=activities) as profile:
        rollout()
        if device.type == "cuda":
            torch.cuda.synchronize()
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(profile.key_averages().table(sort_by=key, row_limit=args.rows, max_name_column_width=70))


if __name__ == "__main__":
    main()
