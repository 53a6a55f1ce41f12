"""How well `plan_run`'s timed step predicts a real training step, in one process on this machine.

    python bench/plan_accuracy.py                          # warm start from all-MiniLM-L6-v2 on SNLI
    python bench/plan_accuracy.py --size mini --steps 40   # a from-scratch preset

Prints three seconds-per-step figures and their ratios to the real one:
- planned: `seconds_per_step(..., data=)`, what `plan_run` now times (batches of the run's own data, as
  its trainer draws them);
- longest: the same step on random tokens at the config's max_length, what the plan timed before;
- real: the Trainer training `--steps` optimizer steps on that data (the quick STS check and
  checkpoints off): the mean interval between its step records after the first `--skip` (a mean, as
  a plan needs: length-grouped batches make a skewed spread of step times).
A ratio of 1 means a plan of `hours` fills them; above 1 the plan stops early, below 1 it runs over
(`PLAN_MARGIN` keeps 15% of the time for evaluations and backups).
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from nsa_lib.environment import seconds_per_step, training_config  # noqa: E402
from nsa_lib.trainer import Trainer  # noqa: E402


def real_seconds_per_step(settings: dict, data: str, steps: int, skip: int) -> float:
    config = training_config(settings, max_steps=steps, eval_every=10 ** 6, save_every=10 ** 6,
                             backup_every=10 ** 6, ood_fit_texts=0)
    stamps = []
    with tempfile.TemporaryDirectory() as folder:
        trainer = Trainer(config, data=data, output_dir=Path(folder) / "run", show_progress=False,
                          init_from=settings.get("base_model"),
                          callbacks=(lambda record: stamps.append(time.perf_counter()) if "loss" in record else None,))
        trainer.train()
    return (stamps[-1] - stamps[skip]) / (len(stamps) - 1 - skip)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--init-from", default="all-MiniLM-L6-v2", help="a warm start's encoder ('' for --size)")
    parser.add_argument("--size", default="mini", help="the preset, when --init-from is ''")
    parser.add_argument("--data", default="snli")
    parser.add_argument("--steps", type=int, default=60, help="real training steps")
    parser.add_argument("--skip", type=int, default=5, help="first step records not counted")
    args = parser.parse_args()
    base = args.init_from or None
    settings = {"base_model": base, "preset": None if base else args.size}
    what = f"warm start from {base}" if base else f"preset {args.size}"
    print(f"{what}, {args.data}, fp32 on the CPU" if not __import__("torch").cuda.is_available() else what)

    planned = seconds_per_step(args.size if not base else None, "no", False, base_model=base, data=args.data)
    longest = seconds_per_step(args.size if not base else None, "no", False, base_model=base, timed=1, warmup=1)
    real = real_seconds_per_step(settings, args.data, args.steps, args.skip)
    print(f"{'':28} {'s/step':>8} {'/ real':>8}")
    for name, value in (("planned (the run's batches)", planned), ("longest (before)", longest), ("real", real)):
        print(f"{name:28} {value:8.3f} {value / real:8.2f}x")
    print(f"one hour plans {int(3600 * 0.85 / planned):,} steps now, {int(3600 * 0.85 / longest):,} before; "
          f"{int(3600 * 0.85 / real):,} fit")


if __name__ == "__main__":
    main()
