"""Live training dashboards: matplotlib figures inside ipywidgets, fed by a run's `metrics.jsonl`.

    dash = Dashboard(["runs/m456"])           # follow one run (or several, overlaid) from their files
    dash.refresh(); display(dash.widget)       # in a notebook; `dash.save_png("report.png")` for reports
    Trainer(..., callbacks=(dash.update,))     # or fed live by the trainer, one record at a time

Panels: total loss and every loss term, learning rate and temperature, the gradient-norm band
(mean ± std, max), quick STS against the baseline and the preset's target, anomaly-score spread and
spectral entropy; beside them the current health warnings, the last checkpoint/backup and throughput
with an ETA. When fed live, redraws happen at most every `min_interval` seconds and take at most
`max_overhead` (2%) of the wall time, so feeding it every step costs little (bench/dashboard_overhead.py).

`read_metrics` reads a metrics file that is still being written: only complete lines are taken, and the
next call continues where the last one stopped.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path


class MetricsError(ValueError):
    """A run folder or metrics file that cannot be followed (the message says why)."""


def metrics_path(run: str | Path) -> Path:
    run = Path(run)
    path = run if run.suffix == ".jsonl" else run / "metrics.jsonl"
    if not path.parent.is_dir():
        raise MetricsError(f"no run folder at {path.parent}")
    return path


def read_metrics(path: str | Path, offset: int = 0) -> tuple[list[dict], int]:
    """Records appended to `path` since byte `offset`, and the offset after the last complete line.

    A last line without its newline (being written right now) is left for the next call; a line that is
    not JSON raises `MetricsError` naming the file and line.
    """
    path = Path(path)
    if not path.is_file():
        return [], offset
    with open(path, "rb") as f:
        f.seek(offset)
        chunk = f.read()
    end = chunk.rfind(b"\n") + 1  # complete lines only
    records = []
    for n, line in enumerate(chunk[:end].splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise MetricsError(f"{path}: line {n} after byte {offset} is not JSON ({e.msg})") from None
    return records, offset + end


@dataclass
class RunHistory:
    """The records of one run, split by kind."""

    name: str
    steps: list[dict] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)
    backups: list[dict] = field(default_factory=list)
    offset: int = 0

    def add(self, record: dict) -> None:
        if "eval" in record:
            self.evals.append(record)
        elif "backup" in record:
            self.backups.append(record)
        elif "loss" in record:
            self.steps.append(record)

    def series(self, key: str, source: str = "steps") -> tuple[list, list]:
        """(steps, values) of `key` over the step records (or 'evals', where key is inside 'eval')."""
        rows = self.steps if source == "steps" else self.evals
        xs, ys = [], []
        for r in rows:
            value = r.get(key) if source == "steps" else r["eval"].get(key)
            if value is not None:
                xs.append(r["step"])
                ys.append(value)
        return xs, ys


LOSS_TERMS = ("sem", "anchor", "bridge", "fast", "rank", "angular", "spec")


def draw(histories: list[RunHistory], figure=None):
    """A 2 x 3 matplotlib figure of the runs (overlaid when several); returns the figure."""
    import matplotlib

    if figure is None:
        matplotlib.use("Agg", force=False)
        from matplotlib.figure import Figure

        figure = Figure(figsize=(15, 8), layout="constrained")
    figure.clear()
    axes = figure.subplots(2, 3)
    (loss_ax, terms_ax, sched_ax), (grad_ax, sts_ax, health_ax) = axes
    for h in histories:
        label = h.name if len(histories) > 1 else "total"
        loss_ax.plot(*h.series("loss"), label=label)
        for term in LOSS_TERMS:
            xs, ys = h.series(f"loss_{term}")
            if xs:
                terms_ax.plot(xs, ys, label=term if len(histories) == 1 else f"{h.name}: {term}")
        sched_ax.plot(*h.series("lr"), label=f"{h.name} lr" if len(histories) > 1 else "lr")
        xs, mean = h.series("grad_norm_mean")
        if xs:
            std = h.series("grad_norm_std")[1]
            grad_ax.fill_between(xs, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], alpha=0.3)
            grad_ax.plot(xs, mean, label=f"{h.name} mean" if len(histories) > 1 else "mean")
            grad_ax.plot(*h.series("grad_norm_max"), linestyle=":", label="max")
        xs, sts = h.series("sts", "evals")
        if xs:
            sts_ax.plot(xs, sts, marker="o", label=h.name if len(histories) > 1 else "Spectra-NSA")
        xs, spread = h.series("anomaly_std")
        if xs:
            health_ax.plot(xs, spread, label=f"{h.name} anomaly std" if len(histories) > 1 else "anomaly std")
            health_ax.plot(*h.series("anomaly_mean"), label="anomaly mean")
    temp_ax = sched_ax.twinx()
    temp_ax.set_ylabel("temperature", color="tab:red")
    for h in histories:
        temp_ax.plot(*h.series("temperature"), color="tab:red", alpha=0.6)
    entropy_ax = health_ax.twinx()
    entropy_ax.set_ylabel("spectral entropy (nats)", color="tab:purple")
    for h in histories:
        entropy_ax.plot(*h.series("spectral_entropy"), color="tab:purple", alpha=0.6)
    first = histories[0] if histories else None
    if first is not None and first.evals:
        last = first.evals[-1]["eval"]
        if "baseline_sts" in last:
            sts_ax.axhline(last["baseline_sts"], color="gray", linestyle="--", label="all-MiniLM-L6-v2")
        if "target_sts" in last:
            sts_ax.axhline(last["target_sts"], color="tab:green", linestyle=":", label="target")
    titles = ["loss", "loss terms (unweighted)", "learning rate / temperature", "gradient norm (before clipping)",
              "quick STS-B Spearman", "anomaly score / spectral entropy"]
    for ax, title in zip(axes.flat, titles):
        ax.set_title(title)
        ax.set_xlabel("step")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="best")
    if any(h.series("grad_norm_max")[0] for h in histories):
        grad_ax.set_yscale("log")
    return figure


class Dashboard:
    """ipywidgets dashboard of one or several runs; see the module docstring.

    Args:
        runs: run folders (or metrics.jsonl paths) to follow; may be empty when fed live.
        total_steps: the run's planned optimizer steps, for the ETA (default: from config.json).
        min_interval: seconds between redraws when fed live.
        max_overhead: when fed live, redraws are also spaced so that drawing takes at most this fraction
            of the wall time (a redraw costs ~0.1-0.3 s), whatever the training speed.
    """

    def __init__(self, runs: list[str | Path] | tuple = (), *, total_steps: int | None = None,
                 min_interval: float = 5.0, max_overhead: float = 0.02, name: str = "run"):
        self.paths = [metrics_path(r) for r in runs]
        self.histories = [RunHistory(p.parent.name) for p in self.paths] or [RunHistory(name)]
        self.total_steps = total_steps or self._planned_steps()
        self.min_interval = min_interval
        self.max_overhead = max_overhead
        self.next_draw = 0.0  # time.monotonic() after which a live update may redraw
        self.draws = 0
        self._widget = None
        self.figure = None

    def _planned_steps(self) -> int | None:
        for p in self.paths:
            config = p.parent / "config.json"
            if config.is_file():
                return json.loads(config.read_text()).get("max_steps")
        return None

    # feeding

    def update(self, record: dict) -> None:
        """A trainer callback: add one record; redraw if `min_interval` has passed."""
        self.histories[0].add(record)
        if time.monotonic() >= self.next_draw:
            self.render()

    def refresh(self) -> int:
        """Read what the followed files gained since the last call; redraw. Returns the new record count."""
        added = 0
        for path, history in zip(self.paths, self.histories):
            if not path.is_file() and not history.steps:
                continue
            records, history.offset = read_metrics(path, history.offset)
            for r in records:
                history.add(r)
            added += len(records)
        if self.paths and not any(h.steps or h.evals for h in self.histories):
            raise MetricsError(f"no metrics yet in {', '.join(str(p) for p in self.paths)}: "
                               f"has the run started?")
        self.render()
        return added

    # showing

    def status(self) -> dict:
        """The numbers of the side panel for the first run: step, loss, warnings, checkpoint/backup, speed."""
        h = self.histories[0]
        last = h.steps[-1] if h.steps else {}
        rate = [r["triplets_per_s"] for r in h.steps[-20:] if "triplets_per_s" in r]
        per_step = None
        if len(h.steps) >= 2 and "time" in h.steps[-1]:
            per_step = (h.steps[-1]["time"] - h.steps[0]["time"]) / (len(h.steps) - 1)
        eta = None
        if self.total_steps and per_step:
            eta = max(0.0, (self.total_steps - last.get("step", 0)) * per_step)
        backup = h.backups[-1]["backup"] if h.backups else None
        return {"step": last.get("step"), "loss": last.get("loss"), "warnings": last.get("warnings", []),
                "skipped_total": last.get("skipped_total", 0), "triplets_per_s": sum(rate) / len(rate) if rate else None,
                "eta_s": eta, "best_sts": h.evals[-1].get("best_sts") if h.evals else None,
                "backup": backup}

    def _status_html(self) -> str:
        s = self.status()
        warnings = "".join(f"<li>{w}</li>" for w in s["warnings"]) or "<li>none</li>"
        backup = ("none yet" if s["backup"] is None else
                  f"{s['backup']['name']} {'ok' if s['backup']['ok'] else 'FAILED: ' + str(s['backup']['error'])}")
        speed = "-" if s["triplets_per_s"] is None else f"{s['triplets_per_s']:.1f} triplets/s"
        eta = "-" if s["eta_s"] is None else f"{s['eta_s'] / 60:.1f} min"
        loss = "-" if s["loss"] is None else f"{s['loss']:.4f}"
        best = "-" if s["best_sts"] is None else f"{s['best_sts']:.4f}"
        return (f"<b>step</b> {s['step']} &nbsp; <b>loss</b> {loss} &nbsp; <b>best STS</b> {best} &nbsp; "
                f"<b>skipped</b> {s['skipped_total']} &nbsp; <b>speed</b> {speed} &nbsp; <b>ETA</b> {eta}<br>"
                f"<b>backup</b> {backup}<br><b>health warnings</b><ul>{warnings}</ul>")

    @property
    def widget(self):
        """The ipywidgets VBox (built on first use: the library imports without ipywidgets)."""
        if self._widget is None:
            import ipywidgets as widgets

            self._image = widgets.Image(format="png")
            self._html = widgets.HTML()
            self._widget = widgets.VBox([self._html, self._image])
            self.render()
        return self._widget

    def render(self) -> None:
        started = time.monotonic()
        self.figure = draw(self.histories, self.figure)
        self.draws += 1
        if self._widget is not None:
            import io

            buf = io.BytesIO()
            self.figure.savefig(buf, format="png", dpi=80)
            self._image.value = buf.getvalue()
            self._html.value = self._status_html()
        took = time.monotonic() - started
        self.next_draw = started + max(self.min_interval, took / self.max_overhead if self.max_overhead else 0.0)

    def save_png(self, path: str | Path, dpi: int = 100) -> Path:
        if self.figure is None:
            self.render()
        self.figure.savefig(str(path), dpi=dpi)
        return Path(path)
