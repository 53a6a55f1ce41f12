"""Training throughput (triplets per second) of one Spectra-NSA training step against sentence-transformers'
MultipleNegativesRankingLoss training of all-MiniLM-L6-v2, on the same real SNLI batches, in one process.

    python bench/train_throughput.py                     # mini preset, batch 32, max_length 128
    python bench/train_throughput.py --size tiny --steps 10

A step is forward over anchors, positives and negatives, the loss, backward, clipping and an AdamW
update. The two are timed in turns, `--steps` each after `--warmup`; medians. Both use fp32 on the CPU.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from nsa_lib import NSAConfig, NSAModel, NSALoss  # noqa: E402
from nsa_lib.data import (TokenizedTriplets, TripletBatches, load_snli_triplets, load_tokenizer,  # noqa: E402
                          offline_minilm_dir)
from nsa_lib.trainer import split_outputs  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="mini")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    args = ap.parse_args(argv)
    from sentence_transformers import SentenceTransformer, losses

    torch.manual_seed(0)
    tokenizer = load_tokenizer(source="offline")
    triplets = load_snli_triplets("train")[:args.batch * (args.steps + args.warmup) * 4]
    tokenized = TokenizedTriplets.build(triplets, tokenizer, args.max_length)
    batcher = TripletBatches(tokenized, args.batch, seed=0, pad_id=tokenizer.pad_token_id)
    order = batcher.batches(0)[:args.steps + args.warmup]

    config = NSAConfig.from_preset(args.size, max_length=args.max_length, batch_train=args.batch)
    ours = NSAModel(config).train()
    loss_fn = NSALoss(config, gather=False)
    ours_opt = torch.optim.AdamW(ours.parameters(), lr=1e-4, fused=True)  # as the trainer

    def ours_step(indices):
        batch = batcher.collate(indices)
        out = ours(**batch)
        loss = loss_fn(*split_outputs(out, 3), temperature=0.07).total
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ours.parameters(), 1.0)
        ours_opt.step()
        ours_opt.zero_grad(set_to_none=True)

    st = SentenceTransformer(str(offline_minilm_dir()), device="cpu")
    st[0].max_seq_length = args.max_length
    st.train()
    mnrl = losses.MultipleNegativesRankingLoss(st)
    st_opt = torch.optim.AdamW(st.parameters(), lr=1e-4, fused=True)

    def st_step(indices):
        features = [st.tokenize([getattr(triplets_train[i], side) for i in indices])
                    for side in ("anchor", "positive", "negative")]
        loss = mnrl(features, None)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(st.parameters(), 1.0)
        st_opt.step()
        st_opt.zero_grad(set_to_none=True)

    triplets_train = triplets
    times = {"spectra-nsa": [], "sentence-transformers": []}
    for n, indices in enumerate(order):
        for name, step in (("spectra-nsa", ours_step), ("sentence-transformers", st_step)):
            t0 = time.perf_counter()
            step(indices)
            if n >= args.warmup:
                times[name].append(time.perf_counter() - t0)
    rate = {name: args.batch / statistics.median(t) for name, t in times.items()}
    params = {"spectra-nsa": ours.num_parameters(), "sentence-transformers": sum(p.numel() for p in st.parameters())}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, batch {args.batch} triplets, "
          f"max_length {args.max_length}, real SNLI batches, median of {args.steps} steps")
    for name in times:
        print(f"  {name:<22} {params[name] / 1e6:6.1f}M params  {rate[name]:8.1f} triplets/s")
    print(f"  ratio spectra-nsa / sentence-transformers: {rate['spectra-nsa'] / rate['sentence-transformers']:.2f}")


if __name__ == "__main__":
    main()
