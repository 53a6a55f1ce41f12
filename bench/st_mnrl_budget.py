"""The peer at equal budget: sentence-transformers' MultipleNegativesRankingLoss (MNRL) fine-tune of
all-MiniLM-L6-v2 on the offline SNLI triplets for a wall-clock budget, scored on STS-B dev and test next
to Spectra-NSA runs trained for the same budget.

    python bench/st_mnrl_budget.py --minutes 15 --compare runs/warm15 runs/warm15-nospectral

The peer trains as a sentence-transformers user would: `SentenceTransformerTrainer`, batches of 32
triplets without duplicate texts (`BatchSamplers.NO_DUPLICATES`), max_seq_length 64, AdamW at 2e-5
with 10% linear warm-up then linear decay (sentence-transformers' `fit` defaults), fp32 on the CPU. It
stops at `--max-steps` or when the budget is spent, whichever comes first (the schedule is planned for
`--max-steps`, the steps the budget is expected to hold). Each `--compare` folder is a run folder (its
`final/` is scored) or a model folder, scored at each Matryoshka width of `embedding_semantic`.
"""
import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from nsa_lib import NSAModel  # noqa: E402
from nsa_lib.data import load_snli_triplets, load_stsb, load_tokenizer, offline_minilm_dir  # noqa: E402
from nsa_lib.evaluate import baseline_encoder, nsa_encoder, st_encoder, sts_spearman  # noqa: E402


def train_peer(minutes: float, max_steps: int, seed: int, *, device: str = "cpu", stop_at: int | None = None,
               callbacks=()):
    """The fine-tuned SentenceTransformer, the steps it took and the seconds they took.

    It stops when `minutes` are spent or at step `stop_at` (a budget counted in steps, for a faster
    device), whichever comes first; the schedule is planned for `max_steps`. Each of `callbacks` is a
    `transformers.TrainerCallback` that is called with `model=` the SentenceTransformer."""
    from datasets import Dataset
    from sentence_transformers import (SentenceTransformer, SentenceTransformerTrainer,
                                       SentenceTransformerTrainingArguments, losses)
    from sentence_transformers.training_args import BatchSamplers
    from transformers import TrainerCallback

    triplets = load_snli_triplets("train")
    data = Dataset.from_dict({"anchor": [t.anchor for t in triplets], "positive": [t.positive for t in triplets],
                              "negative": [t.negative for t in triplets]})
    model = SentenceTransformer(str(offline_minilm_dir()), device=device)
    model.max_seq_length = 64
    clock = {}

    class Budget(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            clock["start"] = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if time.perf_counter() - clock["start"] >= minutes * 60 or state.global_step == stop_at:
                control.should_training_stop = True

    with tempfile.TemporaryDirectory() as tmp:
        args = SentenceTransformerTrainingArguments(
            output_dir=tmp, max_steps=max_steps, per_device_train_batch_size=32, learning_rate=2e-5,
            warmup_ratio=0.1, lr_scheduler_type="linear", batch_sampler=BatchSamplers.NO_DUPLICATES,
            save_strategy="no", report_to="none", logging_steps=100, seed=seed, use_cpu=device == "cpu",
            dataloader_drop_last=True)
        trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=data,
                                             loss=losses.MultipleNegativesRankingLoss(model),
                                             callbacks=[Budget(), *callbacks])
        trainer.train()
    return model, trainer.state.global_step, time.perf_counter() - clock["start"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=15.0, help="training budget of the peer (default 15)")
    ap.add_argument("--max-steps", type=int, default=None,
                    help="steps the peer's schedule is planned for (default: 64 per budget minute, the rate "
                         "measured on 2 CPU cores)")
    ap.add_argument("--compare", nargs="*", default=[], help="Spectra-NSA run or model folders to score alongside")
    ap.add_argument("--peer-json", default=None,
                    help="take the peer's row from this earlier --json output instead of training it again")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="also write the table here")
    args = ap.parse_args(argv)
    stsb = {split: load_stsb(split) for split in ("dev", "test")}
    rows = {}

    rows["all-MiniLM-L6-v2, not trained"] = {"steps": 0, **{
        f"{split}@384": round(sts_spearman(baseline_encoder(), pairs), 4) for split, pairs in stsb.items()}}
    if args.peer_json:
        rows["sentence-transformers MNRL"] = json.loads(Path(args.peer_json).read_text())["sentence-transformers MNRL"]
    else:
        model, steps, seconds = train_peer(args.minutes, args.max_steps or round(64 * args.minutes), args.seed)
        rows["sentence-transformers MNRL"] = {"steps": steps, "train_s": round(seconds), **{
            f"{split}@384": round(sts_spearman(st_encoder(model), pairs), 4) for split, pairs in stsb.items()}}
    print(json.dumps({"sentence-transformers MNRL": rows["sentence-transformers MNRL"]}), flush=True)

    tokenizer = load_tokenizer()
    for folder in map(Path, args.compare):
        model_dir = folder / "final" if (folder / "final").is_dir() else folder
        ours = NSAModel.from_pretrained(model_dir)
        row = {}
        metrics = folder / "metrics.jsonl"
        if metrics.is_file():
            records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
            steps = [r for r in records if "loss" in r]
            if steps:
                row.update(steps=steps[-1]["step"], train_s=round(steps[-1]["time"] - steps[0]["time"]))
        for dim in ours.config.sem_dims[:3]:
            for split, pairs in stsb.items():
                row[f"{split}@{dim}"] = round(sts_spearman(nsa_encoder(ours, tokenizer, dim=dim), pairs), 4)
        rows[str(folder)] = row
        print(json.dumps({str(folder): row}), flush=True)

    keys = sorted({k for row in rows.values() for k in row if "@" in k}, key=lambda k: (k.split("@")[0], -int(k.split("@")[1])))
    print(f"\nSTS-B Spearman after {args.minutes:g} minutes of training (2 CPU cores here: torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads)")
    print(f"{'model':<34} {'steps':>6} {'train s':>8} " + " ".join(f"{k:>9}" for k in keys))
    for name, row in rows.items():
        print(f"{name:<34} {row.get('steps', ''):>6} {row.get('train_s', ''):>8} "
              + " ".join(f"{row[k]:9.4f}" if k in row else f"{'':>9}" for k in keys))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
