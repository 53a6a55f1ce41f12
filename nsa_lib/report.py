"""Evaluation reports: markdown tables and figures from `nsa_lib.evaluate` results.

    results = {"Spectra-NSA": evaluate(...), "all-MiniLM-L6-v2": evaluate(...)}   # subject -> task -> metrics
    write_report(results, "runs/x/eval")   # results.json, results.md, matryoshka.png, tasks.png, anomaly.png

The table has one row per task and headline metric, one column per subject. Figures are drawn on
matplotlib's Agg canvas (no pyplot state is touched, as in nsa_lib.dashboard), so they render the same in
a notebook, a terminal or CI.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# the metric a task's row shows first in tables and bars
HEADLINE = {"stsb": "spearman", "sick": "spearman", "sts1": "spearman", "retrieval": "ndcg@10",
            "clustering": "v_measure", "anomaly": "auroc", "spectral": "entropy_mean"}
TABLE_METRICS = {"stsb": ("spearman", "pearson"), "sick": ("spearman", "pearson"), "sts1": ("spearman", "pearson"),
                 "retrieval": ("recall@1", "recall@10", "recall@100", "mrr@10", "ndcg@10"),
                 "clustering": ("v_measure", "v_measure_std"),
                 "anomaly": ("auroc", "separation", "separation_sd", "ood_auroc", "ood_in_domain_flagged",
                             "ood_out_of_domain_flagged"), "spectral": ("entropy_mean", "entropy_std")}


def _family(task: str) -> str:
    return next((f for f in TABLE_METRICS if task.startswith(f)), task)


def scalar_rows(results: dict[str, dict[str, dict]]) -> list[tuple[str, str, dict[str, float]]]:
    """(task, metric, {subject: value}) for every scalar metric in the table, in task order."""
    tasks = list(dict.fromkeys(t for per_task in results.values() for t in per_task))
    rows = []
    for task in tasks:
        metrics = TABLE_METRICS.get(_family(task)) or tuple(
            next(r[task] for r in results.values() if task in r))
        for metric in metrics:
            values = {s: r[task][metric] for s, r in results.items()
                      if task in r and isinstance(r[task].get(metric), (int, float))}
            if values:
                rows.append((task, metric, values))
    return rows


def markdown_table(results: dict[str, dict[str, dict]], *, outputs: bool = True) -> str:
    """One row per task and metric, one column per subject ('–' where a subject lacks the task); with
    `outputs`, a second table of every output's score."""
    subjects = list(results)
    lines = ["| task | metric | " + " | ".join(subjects) + " |", "|---|---|" + "---|" * len(subjects)]
    for task, metric, values in scalar_rows(results):
        cells = [f"{values[s]:.4f}" if s in values else "–" for s in subjects]
        lines.append(f"| {task} | {metric} | " + " | ".join(cells) + " |")
    per_output = _outputs_table(results) if outputs else ""
    return "\n".join(lines) + ("\n\n" + per_output if per_output else "") + "\n"


def ablation_table(results: dict[str, dict[str, dict]], reference: str = "full") -> str:
    """One row per variant, one column per task's headline metric, each with its difference to `reference`."""
    columns = [(t, m) for t, m, _ in scalar_rows(results) if m == HEADLINE.get(_family(t))]
    lines = ["| variant | " + " | ".join(f"{t} {m}" for t, m in columns) + " |", "|---|" + "---|" * len(columns)]
    ref = results.get(reference, {})
    for variant, per_task in results.items():
        cells = []
        for t, m in columns:
            if t not in per_task:
                cells.append("–")
                continue
            value = per_task[t][m]
            delta = f" ({value - ref[t][m]:+.4f})" if variant != reference and t in ref else ""
            cells.append(f"{value:.4f}{delta}")
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _outputs_table(results: dict[str, dict[str, dict]]) -> str:
    """Per-output scores (each embedding output and Matryoshka dim) of the tasks that report them."""
    lines = []
    for subject, per_task in results.items():
        for task, metrics in per_task.items():
            if "outputs" not in metrics:
                continue
            metric = HEADLINE.get(_family(task), "spearman")
            if not lines:
                lines = ["| subject | task | metric | output | value |", "|---|---|---|---|---|"]
            for key, scores in metrics["outputs"].items():
                lines.append(f"| {subject} | {task} | {metric} | {key} | {scores[metric]:.4f} |")
    return "\n".join(lines)


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def task_bars(results: dict[str, dict[str, dict]]):
    """Each task's headline metric, one bar per subject (the spectral entropy, in nats, is left out)."""
    tasks = [(t, m) for t, m, _ in scalar_rows(results) if m == HEADLINE.get(_family(t)) and t != "spectral"]
    fig = _figure(max(6.0, 1.1 * len(tasks)), 3.6)
    ax = fig.add_subplot()
    width = 0.8 / max(1, len(results))
    for n, (subject, per_task) in enumerate(results.items()):
        xs = [i + n * width for i, (t, m) in enumerate(tasks) if t in per_task]
        ys = [per_task[t][m] for t, m in tasks if t in per_task]
        bars = ax.bar(xs, ys, width, label=subject)
        ax.bar_label(bars, fmt="%.3f", fontsize=6)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(tasks))],
                  [f"{t}\n{m}" for t, m in tasks], fontsize=7)
    ax.legend(fontsize=8)
    ax.set_title("evaluation: headline metric per task")
    fig.tight_layout()
    return fig


def matryoshka_curve(results: dict[str, dict[str, dict]]):
    """STS-B test Spearman and rank agreement with the largest dim, over the Matryoshka dims."""
    fig = _figure(8.0, 3.4)
    axes = fig.subplots(1, 2)
    for subject, per_task in results.items():
        m = per_task.get("matryoshka")
        if not m:
            continue
        for family, style in (("embedding_semantic", "o-"), ("entity", "s--")):
            keys = [k.split("@", 1)[1] for k in m if k.startswith(f"spearman@{family}@")]
            dims = [int(k.rsplit("@", 1)[1]) for k in keys]
            axes[0].plot(dims, [m[f"spearman@{k}"] for k in keys], style, label=f"{subject} {family}")
            axes[1].plot(dims, [m[f"agreement@{k}"] for k in keys], style, label=f"{subject} {family}")
    for ax, title in zip(axes, ("STS-B test Spearman", "rank agreement with the largest dim")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("dim")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def anomaly_histogram(results: dict[str, dict[str, dict]]):
    """In-domain against out-of-domain scores, one panel per subject and score: `anomaly_score`, and
    `ood_score` where the model has an OOD detector."""
    panels = [(s, "anomaly_score", r["anomaly"]["auroc"], r["anomaly"]["histogram"])
              for s, r in results.items() if "anomaly" in r]
    panels += [(s, "ood_score", r["anomaly"]["ood_auroc"], r["anomaly"]["ood_histogram"])
               for s, r in results.items() if "ood_histogram" in r.get("anomaly", {})]
    fig = _figure(4.5 * max(1, len(panels)), 3.2)
    for n, (subject, score, value, h) in enumerate(panels, 1):
        ax = fig.add_subplot(1, len(panels), n)
        for label, counts in (("in-domain (SNLI test)", h["in_domain"]), ("out-of-domain (WordNet)", h["out_of_domain"])):
            ax.stairs(counts, h["edges"], fill=True, alpha=0.5, label=label)
        ax.set_title(f"{subject}: AUROC {value:.3f}", fontsize=9)
        ax.set_xlabel(score)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def write_report(results: dict[str, dict[str, dict]], folder: str | Path, *, title: str = "Evaluation",
                 ablation: bool = False) -> dict[str, Path]:
    """results.json, results.md and the figures (those with data) in `folder`; returns name -> path.
    `ablation`: results.md starts with `ablation_table` (variants as rows, differences to 'full')."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = {"json": folder / "results.json", "markdown": folder / "results.md"}
    _write_atomic(written["json"], json.dumps(results, indent=1))
    head = ablation_table(results) + "\n" if ablation else ""
    _write_atomic(written["markdown"], f"# {title}\n\n" + head + markdown_table(results))
    figures: dict[str, Any] = {"tasks": task_bars(results)}
    if any("matryoshka" in r for r in results.values()):
        figures["matryoshka"] = matryoshka_curve(results)
    if any("anomaly" in r for r in results.values()):
        figures["anomaly"] = anomaly_histogram(results)
    for name, fig in figures.items():
        written[name] = folder / f"{name}.png"
        fig.savefig(written[name], dpi=110)
    return written


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
