"""The command line: `python -m nsa_lib <command> ...`.

    python -m nsa_lib params --size M456             exact parameter count and training-memory estimates
    python -m nsa_lib params --size M1B --verify     ... and check the count against a model built on the
                                                     `meta` device (no memory allocated)
"""
from __future__ import annotations

import argparse
import json
import sys

from .config import PRESETS, PRECISIONS, NSAConfig, estimate_parameters, estimate_training_memory, format_bytes


def _add_size(p: argparse.ArgumentParser) -> None:
    p.add_argument("--size", default="M456", help=f"preset: one of {', '.join(PRESETS)} (default M456)")


def cmd_params(args: argparse.Namespace) -> int:
    overrides = {}
    if args.no_spectral:
        overrides["use_spectral"] = False
    if args.no_anchor64:
        overrides["use_anchor64"] = False
    config = NSAConfig.from_preset(args.size, **overrides)
    parts = estimate_parameters(config, breakdown=True)
    batch = args.batch_size or config.batch_train
    seq = args.seq_len or config.max_length
    rows = [{"precision": precision, "gradient_checkpointing": ckpt,
             **estimate_training_memory(config, batch_size=batch, seq_len=seq, precision=precision,
                                        gradient_checkpointing=ckpt)}
            for precision in PRECISIONS for ckpt in (False, True)]
    built = None
    if args.verify:
        import torch

        from .model import NSAModel

        with torch.device("meta"):
            built = NSAModel(config).num_parameters()
    if args.json:
        print(json.dumps({"size": config.size, "parameters": parts, "built": built, "batch_size": batch,
                          "seq_len": seq, "memory": rows}, indent=2))
        return 0 if built in (None, parts["total"]) else 1

    print(f"Spectra-NSA {config.size}: {parts['total']:,} parameters ({parts['total'] / 1e6:.1f}M)")
    print(f"  hidden {config.hidden_size}, {config.num_layers} layers, {config.num_heads} heads, "
          f"spectral_dim {config.spectral_dim}, anomalous_dim {config.anomalous_dim}")
    for name, n in parts.items():
        if name != "total":
            print(f"  {name:<12} {n:>15,}")
    if built is not None:
        verdict = "matches" if built == parts["total"] else "DOES NOT MATCH"
        print(f"  built on the meta device: {built:,} ({verdict} the estimate)")
    print(f"\nTraining memory per micro-batch of {batch} triplets ({3 * batch} sequences) x {seq} tokens, AdamW:")
    print(f"  {'precision':<9} {'checkpointing':<13} {'weights':>10} {'grads':>10} {'adam':>10} "
          f"{'activations':>12} {'total':>10}")
    for r in rows:
        print(f"  {r['precision']:<9} {'yes' if r['gradient_checkpointing'] else 'no':<13} "
              f"{format_bytes(r['weights']):>10} {format_bytes(r['gradients']):>10} {format_bytes(r['optimizer']):>10} "
              f"{format_bytes(r['activations']):>12} {format_bytes(r['total']):>10}")
    return 0 if built in (None, parts["total"]) else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m nsa_lib", description="Spectra-NSA command line.")
    sub = parser.add_subparsers(dest="command", metavar="command")
    sub.required = True
    p = sub.add_parser("params", help="exact parameter count and training-memory estimate of a preset")
    _add_size(p)
    p.add_argument("--batch-size", type=int, help="triplets per micro-batch (default: the preset's)")
    p.add_argument("--seq-len", type=int, help="tokens per sequence (default: the preset's max_length)")
    p.add_argument("--no-spectral", action="store_true", help="plain attention (the ablation baseline)")
    p.add_argument("--no-anchor64", action="store_true", help="without the anchor64 head")
    p.add_argument("--verify", action="store_true", help="also build the model on the meta device and compare")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_params)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
