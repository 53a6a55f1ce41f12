"""Training throughput (triplets per second) of Spectra-NSA against sentence-transformers'
MultipleNegativesRankingLoss (MNRL) training of all-MiniLM-L6-v2, on the same real SNLI batches, in one process.

    python bench/train_throughput.py --init-from all-MiniLM-L6-v2   # warm start: the same backbone on both sides
    python bench/train_throughput.py                                # from scratch: the mini preset
    python bench/train_throughput.py --size tiny --steps 4          # a quick look

A step is what each trainer does per optimizer step: forward over anchors, positives and negatives, the
loss, backward, clipping and an AdamW update. Ours is the Trainer's own `_optimizer_step` (its seven
losses, health statistics and learning-rate groups included); theirs is MNRL (anchors against positives
and hard negatives, scale 20) on a SentenceTransformer. Both get the same token ids: ours one padded
batch of anchors + positives + negatives, theirs each side padded on its own, as sentence-transformers
collates. Steps are timed in turns after `--warmup`; medians; fp32 on the CPU.

With `--init-from`, the same backbone also runs in two reduced forms of ours, so the printout says where
the difference goes: without the spectral path (`--no-spectral`), and the backbone alone with MNRL on
its mean-pooled output (no heads, no spectral path, no fractal term: the sentence-transformers step done
by our model code).
"""
import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from nsa_lib import NSAConfig, NSAModel  # noqa: E402
from nsa_lib.data import load_tokenizer, offline_minilm_dir  # noqa: E402
from nsa_lib.losses import info_nce  # noqa: E402
from nsa_lib.model import masked_mean  # noqa: E402
from nsa_lib.trainer import Trainer  # noqa: E402
from nsa_lib.warmstart import encoder_config, encoder_folder  # noqa: E402


def trimmed(ids: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """One side's rows padded to their own longest, as sentence-transformers collates."""
    length = int(mask.sum(1).max())
    return {"input_ids": ids[:, :length], "attention_mask": mask[:, :length],
            "token_type_ids": torch.zeros_like(ids[:, :length])}


def sides(batch: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    ids, mask = batch["input_ids"], batch["attention_mask"]
    n = ids.shape[0] // 3
    return [trimmed(ids[k * n:(k + 1) * n], mask[k * n:(k + 1) * n]) for k in range(3)]


def make_trainer(config: NSAConfig, init_from: str | None, folder: Path, tokenizer) -> Trainer:
    return Trainer(config, data="snli", output_dir=folder, init_from=init_from, tokenizer=tokenizer,
                   show_progress=False, eval_fn=lambda model, tok: {})


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--init-from", default=None, help="a BERT-family encoder (all-MiniLM-L6-v2 offline); "
                                                      "without it, --size from scratch")
    ap.add_argument("--size", default="mini", help="preset without --init-from (default mini)")
    ap.add_argument("--batch", type=int, default=32, help="triplets per step (default 32)")
    ap.add_argument("--max-length", type=int, default=64, help="tokens per sequence (default 64)")
    ap.add_argument("--steps", type=int, default=10, help="timed steps of each (default 10)")
    ap.add_argument("--warmup", type=int, default=2)
    args = ap.parse_args(argv)
    from sentence_transformers import SentenceTransformer, losses

    torch.manual_seed(0)
    tokenizer = load_tokenizer(source="offline")
    common = dict(max_length=args.max_length, batch_train=args.batch, grad_accum=1,
                  max_steps=args.steps + args.warmup, eval_every=0, save_every=0, backup_every=0,
                  max_train_samples=args.batch * (args.steps + args.warmup) * 2)
    st_folder = encoder_folder(args.init_from) if args.init_from else offline_minilm_dir()
    with tempfile.TemporaryDirectory() as tmp:
        if args.init_from:
            base = encoder_config(args.init_from, **common)
            variants = {"spectra-nsa": (base, args.init_from),
                        "spectra-nsa --no-spectral": (replace(base, use_spectral=False), args.init_from)}
        else:
            variants = {"spectra-nsa": (NSAConfig.from_preset(args.size, **common), None)}
        trainers = {name: make_trainer(c, init, Path(tmp) / str(n), tokenizer)
                    for n, (name, (c, init)) in enumerate(variants.items())}
        first = next(iter(trainers.values()))
        batches = [first.batches.collate(i) for i in first.batches.batches(0)[:args.steps + args.warmup]]

        steps = {}
        for name, trainer in trainers.items():
            trainer.model.train()
            feed = iter(enumerate(batches))
            steps[name] = (lambda t, f: lambda n: t._optimizer_step(f))(trainer, feed)

        if args.init_from:  # our backbone, mean pooling, MNRL: what the extra parts cost, on our code
            backbone_model = NSAModel.from_pretrained_encoder(args.init_from, **common).train()
            backbone_opt = torch.optim.AdamW(backbone_model.backbone.parameters(), lr=2e-5, fused=True)

            def backbone_step(n):
                a, p, neg = (mean_pooled(backbone_model, s) for s in sides(batches[n]))
                info_nce(a, p, 0.05, extra_keys=neg, gather=False).backward()  # MNRL: scale 20 = 1 / 0.05
                torch.nn.utils.clip_grad_norm_(backbone_model.backbone.parameters(), 1.0)
                backbone_opt.step()
                backbone_opt.zero_grad(set_to_none=True)
            steps["our backbone + MNRL"] = backbone_step

        st = SentenceTransformer(str(st_folder), device="cpu")
        st[0].max_seq_length = args.max_length
        st.train()
        loss = losses.MultipleNegativesRankingLoss(st)
        st_opt = torch.optim.AdamW(st.parameters(), lr=2e-5, fused=True)

        def st_step(n):
            loss(sides(batches[n]), None).backward()
            torch.nn.utils.clip_grad_norm_(st.parameters(), 1.0)
            st_opt.step()
            st_opt.zero_grad(set_to_none=True)
        steps["sentence-transformers MNRL"] = st_step

        times = {name: [] for name in steps}
        for n in range(args.steps + args.warmup):
            for name, step in steps.items():
                t0 = time.perf_counter()
                step(n)
                if n >= args.warmup:
                    times[name].append(time.perf_counter() - t0)
        params = {name: t.model.num_parameters() for name, t in trainers.items()}
        params["sentence-transformers MNRL"] = sum(p.numel() for p in st.parameters())
        if args.init_from:
            params["our backbone + MNRL"] = sum(p.numel() for p in backbone_model.backbone.parameters())
        for trainer in trainers.values():
            trainer.close()

    rate = {name: args.batch / statistics.median(t) for name, t in times.items()}
    baseline = rate["sentence-transformers MNRL"]
    padded = statistics.mean(b["attention_mask"].shape[1] for b in batches)
    real = statistics.mean(float(b["attention_mask"].sum(1).float().mean()) for b in batches)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, batch {args.batch} triplets, "
          f"max_length {args.max_length}, real SNLI batches (mean padded length {padded:.1f}, mean real "
          f"{real:.1f} tokens), median of {args.steps} steps after {args.warmup} warm-up, timed in turns")
    print(f"backbone: {args.init_from or args.size + ' (from scratch; MNRL side: all-MiniLM-L6-v2)'}")
    print(f"  {'':<28} {'params':>8} {'triplets/s':>11} {'step s':>8} {'vs MNRL':>8}")
    for name in times:
        print(f"  {name:<28} {params[name] / 1e6:7.1f}M {rate[name]:11.1f} {args.batch / rate[name]:8.3f} "
              f"{rate[name] / baseline:8.2f}")
    print(f"ratio spectra-nsa / sentence-transformers: {rate['spectra-nsa'] / baseline:.2f}")


def mean_pooled(model: NSAModel, features: dict[str, torch.Tensor]) -> torch.Tensor:
    """The backbone's mean-pooled output, L2-normalised (as MNRL's cosines take it)."""
    mask = features["attention_mask"].ne(0)
    return F.normalize(masked_mean(model.backbone(features["input_ids"], mask), mask), dim=-1)


if __name__ == "__main__":
    main()
