"""What the live dashboard costs a training run: the tiny preset trained for `--steps` optimizer steps
with and without a Dashboard fed every step (its default redraw interval), in turns, in one process.

    python bench/dashboard_overhead.py --steps 300 --rounds 2
"""
import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from nsa_lib import NSAConfig  # noqa: E402
from nsa_lib.dashboard import Dashboard  # noqa: E402
from nsa_lib.data import load_snli_triplets, load_tokenizer  # noqa: E402
from nsa_lib.trainer import Trainer  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--interval", type=float, default=5.0, help="the dashboard's min_interval (seconds)")
    args = ap.parse_args(argv)
    tokenizer, triplets = load_tokenizer(source="offline"), load_snli_triplets("train")[:20000]
    config = NSAConfig.from_preset("tiny", max_steps=args.steps, eval_every=0, save_every=0)
    times = {"without": [], "with": []}
    draws = []
    for _ in range(args.rounds):
        for mode in ("without", "with"):
            with tempfile.TemporaryDirectory() as tmp:
                dash = Dashboard(min_interval=args.interval) if mode == "with" else None
                trainer = Trainer(config, output_dir=tmp, tokenizer=tokenizer, triplets=triplets, show_progress=False,
                                  callbacks=(dash.update,) if dash else ())
                t0 = time.perf_counter()
                trainer.train()
                times[mode].append(time.perf_counter() - t0)
                if dash:
                    draws.append(dash.draws)
    base, fed = statistics.median(times["without"]), statistics.median(times["with"])
    print(f"tiny preset, {args.steps} steps, median of {args.rounds}: without dashboard {base:.2f} s, "
          f"with dashboard {fed:.2f} s ({statistics.median(draws)} redraws at most every {args.interval:g} s)")
    print(f"overhead: {100 * (fed / base - 1):+.1f}%")


if __name__ == "__main__":
    main()
