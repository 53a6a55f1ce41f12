"""Ablations: the same training budget with the full model and with each component off, evaluated alike.

    results = run_ablation(encoder_config("all-MiniLM-L6-v2", max_steps=300), "runs/ablate",
                           init_from="all-MiniLM-L6-v2")
    # runs/ablate/<variant>/ (a run folder each), runs/ablate/report/ (table and figures of all variants)

Variants (`VARIANTS`): `full`, and one per toggle of the original's command line, each setting one config
field to False: `no-spectral` (plain attention: no spectral path, no fractal term, no L_spec),
`no-anchor64`, `no-bridge`, `no-matry` (L_sem at the largest dim only), `no-angular`.

It resumes: a variant with its evaluation written is read back, one with its final model is only
evaluated, one interrupted mid-training resumes from its newest checkpoint. `ablation.json` records the
settings; running again with different ones into the same folder is refused (pass `overwrite=True` to
start over), so a table never mixes budgets.
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Sequence

from .config import NSAConfig

logger = logging.getLogger(__name__)

ABLATION_TOGGLES = {  # the original's ablation flags -> NSAConfig field set to False
    "no_spectral": "use_spectral", "no_anchor64": "use_anchor64", "no_bridge": "use_bridge",
    "no_matry": "use_matryoshka", "no_angular": "use_angular",
}
VARIANTS: dict[str, dict[str, bool]] = {"full": {}, **{flag.replace("_", "-"): {field: False}
                                                       for flag, field in ABLATION_TOGGLES.items()}}
DEFAULT_TASKS = ("stsb", "retrieval", "clustering", "matryoshka", "anomaly", "spectral")


def parse_variants(spec: str | Sequence[str] | None) -> list[str]:
    """'full,no-spectral' or a list -> variant names, checked; None or 'all' -> every variant."""
    from .evaluate import parse_names

    return parse_names(spec, list(VARIANTS), "ablation variant")


def run_ablation(config: NSAConfig, output_dir: str | Path, *, data: str = "snli", init_from: str | None = None,
                 variants: str | Sequence[str] | None = None, tasks: str | Sequence[str] = DEFAULT_TASKS,
                 limit: int | None = None, tokenizer=None, overwrite: bool = False,
                 show_progress: bool = True) -> dict[str, dict]:
    """Train (or resume, or reuse) each variant of `config` in `output_dir/<variant>`, evaluate it, and write
    the side-by-side report to `output_dir/report`. Returns variant -> task -> metrics."""
    from .evaluate import evaluate, model_subject, parse_tasks
    from .model import NSAModel
    from .report import write_report
    from .trainer import Trainer

    root = Path(output_dir)
    names, task_names = parse_variants(variants), parse_tasks(tasks)
    settings = {"config": config.to_dict(), "data": data, "init_from": init_from, "tasks": task_names, "limit": limit}
    record = root / "ablation.json"
    if record.is_file() and not overwrite:
        before = json.loads(record.read_text())
        changed = sorted(k for k in settings if before.get(k) != json.loads(json.dumps(settings[k])))
        if changed:
            raise ValueError(f"{root} holds an ablation with other settings ({', '.join(changed)} differ); "
                             f"use another output folder, or overwrite to start over")
    if overwrite and root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(settings, indent=1))
    if tokenizer is None:
        from .data import load_tokenizer
        from .warmstart import encoder_tokenizer

        tokenizer = encoder_tokenizer(init_from) if init_from else load_tokenizer()

    results = {}
    for name in names:
        folder = root / name
        done = folder / "eval" / "results.json"
        if done.is_file():
            logger.info("ablation %s: evaluated before, read back", name)
            results[name] = json.loads(done.read_text())[name]
            continue
        if not (folder / "final" / "model.safetensors").is_file():
            variant = NSAConfig.from_dict({**config.to_dict(), **VARIANTS[name]})
            Trainer(variant, data=data, output_dir=folder, resume="auto", tokenizer=tokenizer, init_from=init_from,
                    show_progress=show_progress).train()
        model = NSAModel.from_pretrained(folder / "final")
        results[name] = evaluate(model_subject(model, tokenizer, name=name), task_names, limit=limit,
                                 show_progress=show_progress)
        write_report({name: results[name]}, folder / "eval", title=f"Ablation variant {name}")
    write_report(results, root / "report", title=f"Ablation: {', '.join(names)}", ablation=True)
    return results
