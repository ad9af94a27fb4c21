"""Record (or compare) the golden per-step scalars that guard refactors.

Short runs on the tiny model (every objective under the constant schedule, every schedule under
GRPO; 3 rollouts of 4 optimizer updates each, validation at step 3) and two steps of the default
model. Every run trains in float32 whatever CPU records or checks it: ``scalars_of`` adds
``trainer.precision=32-true`` (``tests.conftest.FLOAT32``) after each run's overrides (the CPU
default, ``auto``, is bf16-mixed on a CPU with native bf16). Scalars that measure the machine
(``time/``, ``perf/``) are left out; every other tag is kept at full float32 precision, so
"unchanged" means bit-identical on the same CPU build.

    python tests/golden/record.py              # rewrite tests/golden/scalars.json
    python tests/golden/record.py --only tiny  # the tiny-model runs only

``tests/test_golden.py`` runs the same configurations and compares them with the file.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

GOLDEN = Path(__file__).with_name("scalars.json")
MACHINE_TAGS = ("time/", "perf/")

TINY = [
    "model=tiny",
    "validate_before_training=false",
    "trainer.max_steps=3",
    "trainer.val_check_interval=3",
    "trainer.enable_progress_bar=false",
    "rollout.prompts_per_step=2",
    "rollout.group_size=4",
    "rollout.max_new_tokens=12",
    "rollout.mini_batches=2",
    "rollout.epochs=2",
    "data.num_train=200",
    "data.num_val=8",
    "data.val_batch_size=8",
    "logging.sample_every_n_steps=1",
]
OBJECTIVES = ("ppo", "grpo", "dapo", "dr_grpo", "gppo", "ce_gppo", "cispo", "gspo",
              "clip_cov", "kl_cov", "erc_dapo", "erc_gppo", "sapo", "gmpo", "dppo")
SCHEDULES = {
    "constant": [], "linear": [], "cosine": [], "increase_then_decrease": [],
    "decrease_increase_decrease": [], "oscillatory": ["scheduler.initial_state=boost"],
    "target_entropy": [], "beta_stages": ["objective=ce_gppo"],
    "warmup_clip_higher": ["scheduler.warmup_steps=1"],
    # A target above the tiny model's entropy, so the gate opens and the bonus is trained on.
    "adaptive_entropy": ["scheduler.relative_to_initial=true", "scheduler.target_entropy=2.0"],
}
DEFAULT_MODEL = [
    "trainer.max_steps=2",
    "trainer.val_check_interval=2",
    "trainer.enable_progress_bar=false",
    "validate_before_training=false",
    "rollout.epochs=2",
    "rollout.prompts_per_step=4",
    "rollout.group_size=4",
    "rollout.max_new_tokens=24",
    "data.num_val=8",
    "data.val_batch_size=8",
]


def runs(only: str | None = None) -> dict[str, list[str]]:
    """Run name -> overrides."""
    out: dict[str, list[str]] = {}
    if only in (None, "tiny"):
        out.update({f"tiny/objective={name}": [*TINY, f"objective={name}"] for name in OBJECTIVES})
        # GRPO with the KL term, so the reference pass is guarded too.
        out["tiny/objective=grpo,kl"] = [*TINY, "objective=grpo", "objective.kl_coef=0.04"]
        out.update({f"tiny/scheduler={name}": [*TINY, f"scheduler={name}", *extra]
                    for name, extra in SCHEDULES.items()})
    if only in (None, "default"):
        out["smollm2_135m/grpo"] = list(DEFAULT_MODEL)
    return out


def scalars_of(overrides: list[str]) -> dict[str, list[list[float]]]:
    """The run's scalars (machine timings aside), trained in float32 (``FLOAT32`` comes last, so
    it holds on any CPU)."""
    import torch

    torch.set_num_threads(1)
    from rlvr_lightning.train import run
    from tests.conftest import FLOAT32, compose_config, read_scalars

    with tempfile.TemporaryDirectory() as folder:
        run(compose_config([*overrides, FLOAT32]), run_dir=Path(folder) / "run")
        scalars = read_scalars(Path(folder) / "run")
    return {
        tag: [[step, value] for step, value in points]
        for tag, points in sorted(scalars.items())
        if not tag.startswith(MACHINE_TAGS)
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=("tiny", "default"), default=None)
    args = parser.parse_args()
    golden = json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {}
    for name, overrides in runs(args.only).items():
        print(f"recording {name}", flush=True)
        golden[name] = {"overrides": overrides, "scalars": scalars_of(overrides)}
    GOLDEN.write_text(json.dumps(golden, indent=1, sort_keys=True) + "\n")
    print(f"wrote {GOLDEN}")


if __name__ == "__main__":
    main()
