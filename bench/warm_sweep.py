"""Warm-start variants x seeds: which training settings carry a fine-tune of all-MiniLM-L6-v2 furthest.

    python bench/warm_sweep.py --init-from all-MiniLM-L6-v2 --steps 1250 --seeds 0 1 2 \
        --variants default symmetric --workers 4 --jsonl sweep.jsonl

Every run is one fresh process (its own RNG and device memory) that fine-tunes on the offline SNLI
triplets for `--steps` optimizer steps and scores `embedding_semantic` on the full STS-B dev and test
sets every `--eval-every` steps (768) and at the end (768/512/256). One JSON line per finished run goes
to `--jsonl` as soon as it finishes, so a sweep cut short keeps what it measured. The runs are queued
seed by seed (every variant's seed 0 first), so a deadline (`--deadline-s`) leaves balanced coverage.
Variants are named in VARIANTS: settings of NSAConfig on top of the warm-start defaults, the peer
(`st-mnrl`: sentence-transformers' MNRL on the same triplets, for its spread over seeds), and three
diagnostics that no setting offers (`freeze-sem-head`, `post-dropout`, `moved-dropout`), which patch
this process only. The README's table of warm-start settings was measured with it (on an H100, nine
processes at once, about 230 s per 1,250-step run).
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

VARIANTS = {  # settings on top of encoder_config's warm-start defaults (L_sem in one direction)
    "default": {},
    # the peer: sentence-transformers MNRL as bench/st_mnrl_budget.py trains it, planned for 960 steps and
    # stopped at 911, the steps that 15 minutes on 2 CPU cores held (`--steps` does not apply)
    "st-mnrl": {"_peer": (960, 911)},
    "no-spectral": {"use_spectral": False},
    "backbone-lr-3e-5": {"backbone_lr": 3e-5},
    "lr-1e-4": {"lr": 1e-4},  # the new parts' learning rate (the semantic head's too)
    "lr-5e-5": {"lr": 5e-5},
    "steps-1000": {"max_steps": 1000},
    "symmetric": {"sem_symmetric": True},  # L_sem in both directions, as SPEC's from-scratch model
    "symmetric-no-spectral": {"sem_symmetric": True, "use_spectral": False},
    "symmetric-backbone-lr-3e-5": {"sem_symmetric": True, "backbone_lr": 3e-5},
    "symmetric-no-matryoshka": {"sem_symmetric": True, "use_matryoshka": False},
    "symmetric-sem-768-heavy": {"sem_symmetric": True, "sem_weights": [0.7, 0.2, 0.1]},
    "symmetric-dropout-0": {"sem_symmetric": True, "dropout": 0.0},
    "symmetric-steps-900": {"sem_symmetric": True, "max_steps": 900},
    "symmetric-freeze-sem-head": {"sem_symmetric": True, "_patch": "freeze-sem-head"},
    # BERT's dropout after the attention output, as well as / instead of ours on the attention context
    "symmetric-post-dropout": {"sem_symmetric": True, "_patch": "post-dropout"},
    "symmetric-moved-dropout": {"sem_symmetric": True, "_patch": "moved-dropout"},
}


def patch(name: str, config) -> None:
    """The diagnostics that no NSAConfig setting offers (this process only)."""
    import torch.nn.functional as F

    from nsa_lib import attention
    from nsa_lib.trainer import Trainer

    if name == "freeze-sem-head":
        build = Trainer._build_model_and_optimizer

        def frozen(self):
            build(self)
            for n, p in self.model.named_parameters():
                if n.startswith("sem_head."):
                    p.requires_grad_(False)
        Trainer._build_model_and_optimizer = frozen
    elif name in ("post-dropout", "moved-dropout"):
        output, attend = attention.SpectralEntropyAttention._output, attention.SpectralEntropyAttention._attend

        def dropped_output(self, merged):
            return F.dropout(output(self, merged), config.dropout, self.training)

        def undropped_attend(self, x, key_mask, layout=None):
            p, self.dropout.p = self.dropout.p, 0.0
            try:
                return attend(self, x, key_mask, layout)
            finally:
                self.dropout.p = p
        attention.SpectralEntropyAttention._output = dropped_output
        if name == "moved-dropout":
            attention.SpectralEntropyAttention._attend = undropped_attend
    else:
        raise ValueError(f"unknown patch {name!r}")


def one_run(init_from: str, variant: str, seed: int, steps: int, eval_every: int, out: Path) -> dict:
    import torch

    from nsa_lib.data import load_stsb
    from nsa_lib.evaluate import nsa_encoder, sts_spearman
    from nsa_lib.trainer import Trainer
    from nsa_lib.warmstart import encoder_config

    torch.set_num_threads(2)
    dev, test = load_stsb("dev"), load_stsb("test")
    if "_peer" in VARIANTS[variant]:
        return peer_run(variant, seed, *VARIANTS[variant]["_peer"], eval_every, dev, test)
    overrides = dict(VARIANTS[variant])
    patch_name = overrides.pop("_patch", None)
    overrides = {"max_steps": steps, **overrides}
    config = encoder_config(init_from, seed=seed, eval_every=eval_every, save_every=0, backup_every=0, **overrides)
    if patch_name:
        patch(patch_name, config)
    curve = []
    holder = {}

    def scores(model, tokenizer, dims=(768,)):
        result = {}
        for d in dims:
            enc = nsa_encoder(model, tokenizer, dim=d, batch_size=256)
            result[f"dev@{d}"] = round(sts_spearman(enc, dev), 4)
            result[f"test@{d}"] = round(sts_spearman(enc, test), 4)
        return result

    def eval_fn(model, tokenizer):
        result = scores(model, tokenizer)
        curve.append({"step": holder["trainer"].state.step, **result})
        return {}  # no best/ checkpoint: the curve is the record

    t0 = time.perf_counter()
    trainer = Trainer(config, data="snli", output_dir=out / f"{variant}-s{seed}", init_from=init_from,
                      show_progress=False, eval_fn=eval_fn, overwrite=True)
    holder["trainer"] = trainer
    trainer.train()
    seconds = time.perf_counter() - t0
    model = trainer.accelerator.unwrap_model(trainer.model)
    final = scores(model, trainer.tokenizer, dims=(768, 512, 256))
    best = max(curve, key=lambda r: r["dev@768"]) if curve else None
    return {"variant": variant, "seed": seed, "steps": trainer.state.step, "seconds": round(seconds, 1),
            "final": final, "best_by_dev": best, "curve": curve, "device": str(next(model.parameters()).device)}


def peer_run(variant: str, seed: int, planned: int, stop_at: int, eval_every: int, dev, test) -> dict:
    """The peer's run, scored like ours: its normalised embedding (384 wide, the base model's)."""
    import torch
    from transformers import TrainerCallback

    from nsa_lib.evaluate import st_encoder, sts_spearman
    from st_mnrl_budget import train_peer

    def scores(model):
        enc = st_encoder(model, batch_size=256)
        return {"dev@384": round(sts_spearman(enc, dev), 4), "test@384": round(sts_spearman(enc, test), 4)}

    curve = []

    class Curve(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step % eval_every == 0:
                curve.append({"step": state.global_step, **scores(model)})
                model.train()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, steps, seconds = train_peer(1e9, planned, seed, device=device, stop_at=stop_at, callbacks=[Curve()])
    best = max(curve, key=lambda r: r["dev@384"]) if curve else None
    return {"variant": variant, "seed": seed, "steps": steps, "seconds": round(seconds, 1), "final": scores(model),
            "best_by_dev": best, "curve": curve, "device": device}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--init-from", default="all-MiniLM-L6-v2")
    ap.add_argument("--steps", type=int, default=1250)
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--deadline-s", type=float, default=None, help="start no run after this many seconds")
    ap.add_argument("--jsonl", type=Path, required=True)
    ap.add_argument("--runs-dir", type=Path, default=Path("/tmp/warm_sweep"))
    ap.add_argument("--one", nargs=2, metavar=("VARIANT", "SEED"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        record = one_run(args.init_from, args.one[0], int(args.one[1]), args.steps, args.eval_every, args.runs_dir)
        with open(args.jsonl, "a") as f:
            f.write(json.dumps(record) + "\n")
        return
    queue = [(v, s) for s in args.seeds for v in args.variants]
    start, running = time.perf_counter(), []
    while queue or running:
        running = [(p, job) for p, job in running if p.poll() is None]
        late = args.deadline_s is not None and time.perf_counter() - start > args.deadline_s
        while queue and len(running) < args.workers and not late:
            variant, seed = queue.pop(0)
            cmd = [sys.executable, __file__, "--one", variant, str(seed), "--init-from", args.init_from,
                   "--steps", str(args.steps), "--eval-every", str(args.eval_every), "--jsonl", str(args.jsonl),
                   "--runs-dir", str(args.runs_dir)]
            args.runs_dir.mkdir(parents=True, exist_ok=True)
            log = open(args.runs_dir / f"{variant}-s{seed}.log", "w")
            running.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=os.environ), (variant, seed)))
            print(f"[{time.perf_counter() - start:6.0f}s] started {variant} seed {seed}", flush=True)
        if late:
            queue.clear()
        time.sleep(1)
    summarize(args.jsonl)


def summarize(path: Path) -> None:
    """Mean and spread per variant of the final and best-by-dev STS-B scores."""
    import statistics

    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    by = {}
    for r in rows:
        by.setdefault(r["variant"], []).append(r)
    print(f"{'variant':18} n  final dev/test (768; the peer 384)  best-by-dev test (step)   s/run")
    for v, rs in by.items():
        w = "384" if "dev@384" in rs[0]["final"] else "768"  # the peer's embedding is the base model's
        fd = [r["final"][f"dev@{w}"] for r in rs]
        ft = [r["final"][f"test@{w}"] for r in rs]
        bt = [r["best_by_dev"][f"test@{w}"] for r in rs if r["best_by_dev"]]
        bs = [r["best_by_dev"]["step"] for r in rs if r["best_by_dev"]]
        print(f"{v:18} {len(rs)}  {statistics.mean(fd):.4f} / {statistics.mean(ft):.4f} "
              f"(sd {statistics.stdev(ft) if len(ft) > 1 else 0:.4f}) "
              f"(test {min(ft):.4f}-{max(ft):.4f})   {statistics.mean(bt) if bt else float('nan'):.4f} {bs}   "
              f"{statistics.mean(r['seconds'] for r in rs):.0f}")


if __name__ == "__main__":
    main()
