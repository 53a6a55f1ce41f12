"""Forward+backward time of one Spectral-Entropy Attention block against a plain SDPA block of the same
shape and against the literal O(S³) formula of SPEC 3, at S = 64 ... 1024, all in this one process.

    python bench/attention.py                # the issue's shape: fp32, batch 8, hidden 256, 4 heads, ds 64
    python bench/attention.py --seq 128 512 --repeats 5

Each sequence in the batch has a random length in [S/2, S] (padding as in training). The three blocks
are timed in turns, `--repeats` rounds after warm-up; times are medians, ratios are against the plain block.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from nsa_lib import NSAConfig, SpectralEntropyAttention  # noqa: E402
from tests.reference import literal_attention  # noqa: E402


STATS = {"median": statistics.median, "min": min}


def fwd_bwd(fn, x) -> float:
    x.grad = None
    t0 = time.perf_counter()
    fn(x).sum().backward()
    return time.perf_counter() - t0


def interleaved_times(fns: dict, x, repeats: int) -> dict:
    """Forward+backward seconds of each function, `repeats` of each, timed in turns so that drift and
    noisy neighbours hit all alike."""
    for fn in fns.values():
        for _ in range(2):
            fwd_bwd(fn, x)
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(fwd_bwd(fn, x))
    return times


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq", type=int, nargs="+", default=[64, 128, 256, 512, 1024])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--spectral-dim", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--stat", choices=sorted(STATS), default="median",
                    help="how the repeats are summarised (min is the least noisy on a shared machine)")
    ap.add_argument("--no-literal", action="store_true", help="skip the O(S³) reference (slow at long S)")
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    common = dict(hidden_size=args.hidden, num_heads=args.heads, spectral_dim=args.spectral_dim, dropout=0.0,
                  max_positions=max(args.seq), max_length=max(args.seq))
    ours = SpectralEntropyAttention(NSAConfig.from_preset("tiny", **common))
    plain = SpectralEntropyAttention(NSAConfig.from_preset("tiny", use_spectral=False, **common))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, batch {args.batch}, "
          f"hidden {args.hidden}, {args.heads} heads, spectral_dim {args.spectral_dim}; forward+backward, "
          f"{args.stat} of {args.repeats}")
    print(f"{'S':>5} {'plain ms':>9} {'ours ms':>9} {'literal ms':>11} {'ours/plain':>11} {'literal/plain':>14}"
          f" {'literal/ours':>13}")
    for S in args.seq:
        x = torch.randn(args.batch, S, args.hidden, requires_grad=True)
        lengths = torch.randint(S // 2, S + 1, (args.batch,))
        lengths[0] = S
        mask = (torch.arange(S)[None, :] < lengths[:, None]).long()
        fns = {"plain": lambda t: plain(t, mask), "ours": lambda t: ours(t, mask)}
        if not args.no_literal:
            fns["literal"] = lambda t: literal_attention(ours, t, mask)
        times = interleaved_times(fns, x, args.repeats)
        stat = {name: STATS[args.stat](t) for name, t in times.items()}
        t_plain, t_ours, t_lit = stat["plain"], stat["ours"], stat.get("literal", float("nan"))
        print(f"{S:>5} {1e3 * t_plain:>9.2f} {1e3 * t_ours:>9.2f} {1e3 * t_lit:>11.2f} {t_ours / t_plain:>11.2f}"
              f" {t_lit / t_plain:>14.2f} {t_lit / t_ours:>13.2f}", flush=True)


if __name__ == "__main__":
    main()
