"""Check and time ``rollout.engine=static`` on a GPU: CUDA-graph decoding against eager decoding.

    python tools/check_static_engine.py --model .gpu/smollm2_shape --out static_check.json

1. Correctness on the tiny Llama (float32 and under bf16 autocast): greedy completions with
   CUDA graphs equal those without, and sampled ones too (same seed, forced length); the
   engine's logits match transformers' forward (float32).
2. Generation alone on ``--model``'s shape with seeded random weights, under bf16 autocast as
   training runs it: seconds and completion tokens per second for the static engine with and
   without CUDA graphs, the shared-prefix engine and ``model.generate`` with transformers'
   static cache, ``--prompts`` x ``--group-size`` completions of ``--tokens`` forced tokens.

Prints one JSON object and writes it to ``--out``. Needs a CUDA device (``--device cpu``: a dry
run of the script itself, every engine eager).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from rlvr_lightning.models import build_tiny_model  # noqa: E402
from rlvr_lightning.rollout import generate_rollout  # noqa: E402
from rlvr_lightning.static_engine import StaticDecoder, _Decoding, _prefill  # noqa: E402

PROMPTS = ["<|im_start|>user\nWhat is 1 + 2?<|im_end|>\n<|im_start|>assistant\n", "Hi", "a b c"]


def correctness(device: torch.device) -> dict[str, object]:
    model, tokenizer = build_tiny_model(seed=0)
    tokenizer.padding_side = "left"
    model = model.to(device).eval()
    results: dict[str, object] = {}
    for precision in ("float32", "bf16_autocast"):
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision != "float32")
        rollouts = {}
        for graphs in ("auto", "false"):  # auto: CUDA graphs on a CUDA device
            with autocast:
                greedy = generate_rollout(model, tokenizer, PROMPTS, 3, 24, greedy=True, engine="static",
                                          cuda_graphs=graphs)
                torch.manual_seed(0)
                sampled = generate_rollout(model, tokenizer, PROMPTS, 4, 24, engine="static", cuda_graphs=graphs,
                                           ignore_eos=True)
            rollouts[graphs] = (greedy.completions, sampled.completions)
        results[f"{precision}_graphs_equal_eager_greedy"] = rollouts["auto"][0] == rollouts["false"][0]
        results[f"{precision}_graphs_equal_eager_sampled"] = rollouts["auto"][1] == rollouts["false"][1]
    with autocast:
        shared = generate_rollout(model, tokenizer, PROMPTS, 3, 24, greedy=True, engine="shared_prefix")
    results["bf16_greedy_equal_shared_prefix"] = shared.completions == rollouts["auto"][0]
    # Teacher-forced logits in float32 against transformers' forward.
    encoded = tokenizer(PROMPTS, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
    ids, mask = encoded["input_ids"], encoded["attention_mask"]
    forced = torch.randint(3, len(tokenizer), (len(PROMPTS), 6), device=device, generator=None)
    with torch.no_grad():
        decoder = StaticDecoder(model, torch.float32)
        state = _Decoding(decoder, len(PROMPTS), ids.shape[1] + forced.shape[1], device)
        ours = [_prefill(decoder, state, ids, mask, 1)]
        for t in range(forced.shape[1]):
            state.tokens.copy_(forced[:, t])
            ours.append(state.step())
        full_mask = torch.cat([mask, torch.ones_like(forced)], 1)
        reference = model(input_ids=torch.cat([ids, forced], 1), attention_mask=full_mask,
                          position_ids=(full_mask.cumsum(-1) - 1).clamp(min=0)).logits[:, ids.shape[1] - 1:]
    results["float32_max_logit_difference"] = float((torch.stack(ours, 1) - reference).abs().max())
    return results


def timing(folder: str, prompts: int, group_size: int, tokens: int, device: torch.device) -> dict[str, object]:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.padding_side = "left"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(device).eval()
    texts = [
        tokenizer.apply_chat_template([{"role": "user", "content": f"What is {i % 10} + {(3 * i) % 10}?"}],
                                      tokenize=False, add_generation_prompt=True)
        for i in range(prompts)
    ]
    variants = {
        "static_cuda_graphs": dict(engine="static", cuda_graphs="auto"),
        "static_eager": dict(engine="static", cuda_graphs="false"),
        "shared_prefix": dict(engine="shared_prefix"),
    }
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    results: dict[str, object] = {"prompts": prompts, "group_size": group_size, "tokens": tokens}
    for name, options in variants.items():
        seconds = []
        # The first call of the first variant warms the device up; the eager ones take long.
        for _ in range(2 if name == "static_cuda_graphs" else 1):
            synchronize()
            start = time.perf_counter()
            with torch.autocast(device.type, dtype=torch.bfloat16):
                rollout = generate_rollout(model, tokenizer, texts, group_size, tokens, ignore_eos=True, **options)
            synchronize()
            seconds.append(time.perf_counter() - start)
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
