"""Check and time ``rollout/engine=static`` on a GPU: CUDA-graph decoding against eager decoding.

    python tools/check_static_engine.py --model MODEL_FOLDER --out static_check.json

1. Correctness on the tiny Llama (float32 and under bf16 autocast): greedy completions with
   CUDA graphs (of the step, and of the compiled step) equal eager ones, and sampled ones too
   (same seed, forced length); the
   engine's logits match transformers' forward (float32).
2. Generation alone on ``--model``'s shape with seeded random weights, under bf16 autocast as
   training runs it: seconds and completion tokens per second for the static engine (CUDA
   graphs of the compiled step, CUDA graphs of the plain step) and the shared-prefix engine,
   ``--prompts`` x ``--group-size`` completions of ``--tokens`` forced tokens.

Prints one JSON object and writes it to ``--out``. Needs a CUDA device (``--device cpu``: a dry
run of the script itself, every engine eager).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from rlvr_lightning.models import build_tiny_model  # noqa: E402
from rlvr_lightning.rollout import generate_rollout  # noqa: E402
from rlvr_lightning.rollout.static import forced_logits  # noqa: E402

PROMPTS = ["<|im_start|>user\nWhat is 1 + 2?<|im_end|>\n<|im_start|>assistant\n", "Hi", "a b c"]


def correctness(device: torch.device) -> dict[str, object]:
    model, tokenizer = build_tiny_model(seed=0)
    tokenizer.padding_side = "left"
    model = model.to(device).eval()
    results: dict[str, object] = {}
    for precision in ("float32", "bf16_autocast"):
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision != "float32")
        rollouts = {}
        # auto: CUDA graphs on a CUDA device; then compiled (true) or not (false).
        for graphs, compiled in (("auto", "false"), ("false", "false"), ("auto", "true")):
            options = dict(engine="static", cuda_graphs=graphs, compile_decoding=compiled)
            try:
                with autocast:
                    greedy = generate_rollout(model, tokenizer, PROMPTS, 3, 24, greedy=True, **options)
                    torch.manual_seed(0)
                    sampled = generate_rollout(model, tokenizer, PROMPTS, 4, 24, ignore_eos=True, **options)
            except Exception as error:  # noqa: BLE001 - recorded, and the other variants still run
                results[f"{precision}_graphs_{graphs}_compiled_{compiled}_error"] = repr(error)[-2000:]
                traceback.print_exc()
                continue
            rollouts[graphs, compiled] = (greedy.completions, sampled.completions)
        eager = rollouts.get(("false", "false"))
        for name, key in (("graphs", ("auto", "false")), ("compiled_graphs", ("auto", "true"))):
            if key in rollouts and eager is not None:
                results[f"{precision}_{name}_equal_eager_greedy"] = rollouts[key][0] == eager[0]
                results[f"{precision}_{name}_equal_eager_sampled"] = rollouts[key][1] == eager[1]
    with autocast:
        shared = generate_rollout(model, tokenizer, PROMPTS, 3, 24, greedy=True, engine="shared_prefix")
    results["bf16_greedy_equal_shared_prefix"] = eager is not None and shared.completions == eager[0]
    # Teacher-forced logits in float32 against transformers' forward, eager and compiled.
    encoded = tokenizer(PROMPTS, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
    ids, mask = encoded["input_ids"], encoded["attention_mask"]
    forced = torch.randint(3, len(tokenizer), (len(PROMPTS), 6), device=device)
    full_mask = torch.cat([mask, torch.ones_like(forced)], 1)
    with torch.no_grad():
        reference = model(input_ids=torch.cat([ids, forced], 1), attention_mask=full_mask,
                          position_ids=(full_mask.cumsum(-1) - 1).clamp(min=0)).logits[:, ids.shape[1] - 1:]
        for name, compiled in (("eager", False), ("compiled", True)):
            try:
                ours = forced_logits(model, ids, mask, forced, compiled=compiled)
            except Exception as error:  # noqa: BLE001
                results[f"float32_{name}_error"] = repr(error)[-2000:]
                traceback.print_exc()
                continue
            results[f"float32_{name}_max_logit_difference"] = float((ours - reference).abs().max())
    return results


def random_model_and_prompts(folder: str, prompts: int, device: torch.device) -> tuple[object, object, list[str]]:
    """``folder``'s architecture with seeded random weights on ``device``, its tokenizer (left
    padding) and ``prompts`` prompt strings of the default task (single-digit addition)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from rlvr_lightning.data.arithmetic import make_arithmetic_splits
    from rlvr_lightning.data.prompts import DEFAULT_INSTRUCTION, build_prompt

    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.padding_side = "left"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder)).to(device).eval()
    train, _ = make_arithmetic_splits(200, 0, 0)
    texts = [build_prompt(tokenizer, train[i % len(train)]["question"], DEFAULT_INSTRUCTION, None) for i in range(prompts)]
    return model, tokenizer, texts


def timing(folder: str, prompts: int, group_size: int, tokens: int, device: torch.device) -> dict[str, object]:
    model, tokenizer, texts = random_model_and_prompts(folder, prompts, device)
    variants = {
        "static_compiled_cuda_graphs": dict(engine="static", cuda_graphs="auto", compile_decoding="true"),
        "static_cuda_graphs": dict(engine="static", cuda_graphs="auto", compile_decoding="false"),
        "shared_prefix": dict(engine="shared_prefix"),
    }
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    results: dict[str, object] = {"prompts": prompts, "group_size": group_size, "tokens": tokens}
    for name, options in variants.items():
        seconds = []
        # A first call warms up (and compiles) the graph variants; the eager ones take long.
        try:
            for _ in range(2 if "graphs" in name else 1):
                synchronize()
                start = time.perf_counter()
                with torch.autocast(device.type, dtype=torch.bfloat16):
                    rollout = generate_rollout(model, tokenizer, texts, group_size, tokens, ignore_eos=True, **options)
                synchronize()
                seconds.append(time.perf_counter() - start)
        except Exception as error:  # noqa: BLE001 - recorded, and the other variants still run
            results[name] = {"error": repr(error)[-2000:]}
            traceback.print_exc()
            continue
        completion_tokens = int(rollout.response_lengths.sum())
        results[name] = {"seconds": seconds, "tokens_per_second": completion_tokens / seconds[-1]}
        print(name, results[name], flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="folder with the config and tokenizer to time")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--device", default="cuda", help="cpu: a dry run of this script (no CUDA graphs)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("tools/check_static_engine.py needs a CUDA device (or --device cpu for a dry run)")
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    report: dict[str, object] = {"device": name, "torch": torch.__version__}
    report["correctness"] = correctness(device)
    print(json.dumps(report["correctness"]), flush=True)
    report["generation"] = timing(args.model, args.prompts, args.group_size, args.tokens, device)
    text = json.dumps(report, indent=1)
    print(text)
    if args.out is not None:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
