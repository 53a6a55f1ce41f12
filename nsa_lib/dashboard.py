"""Live training dashboards: matplotlib figures inside ipywidgets, fed by a run's `metrics.jsonl`.

    dash = Dashboard(["runs/m456"])           # follow one run (or several, overlaid) from their files
    dash.refresh(); display(dash.widget)       # in a notebook; `dash.save_png("report.png")` for reports
    dash = Dashboard(total_steps=..., print_every=50)
    Trainer(..., callbacks=(dash.update,))     # or fed live by the trainer, one record at a time
    dash.show_final("runs/m456/dashboard.png") # at the end: a static PNG that stays in the saved notebook

Panels: total loss and every loss term, learning rate and temperature, the gradient-norm band
(mean ± std, max), quick STS against the baseline and the preset's target, anomaly-score spread and
spectral entropy; beside them the current health warnings, the backups (size, failures, a low-space
warning) and throughput with an ETA. When fed live, redraws happen at most every `min_interval` seconds
and take at most `max_overhead` (2%) of the wall time, so feeding it every step costs little
(bench/dashboard_overhead.py).

What a notebook keeps: widget state is lost when the browser reconnects to Colab and is not saved with
the notebook, printed text is. So `print_every=N` prints one plain status line every N steps, and
`show_final` displays the last figure as an image rather than a widget.

Resumed runs: a resumed trainer appends `{"step": N, "resumed_from": "ckpt-...", "time": ...}` and logs
steps N+1, N+2, ... again. `RunHistory` drops the records of steps after N that the interrupted attempt
had logged (a step record that does not go beyond the last one is treated the same way, for files
written before the marker existed), so every series is strictly increasing; the speed and the ETA are
measured within the stretches of uninterrupted training, never across the downtime before a resume.

Drawing uses matplotlib's Agg canvas directly (`Figure` + `FigureCanvasAgg`): pyplot and the session's
backend are never touched, so `plt.show()` in other cells keeps working. The widgets (`VBox`, `HTML`,
`Image`) and their arguments exist in ipywidgets 7.7.1, the version Colab's frontend runs, and in 8.

`read_metrics` reads a metrics file that is still being written: only complete lines are taken, and the
next call continues where the last one stopped.

Not handled: `update()` feeds the first run only (several runs are followed through their files), and a
live-fed dashboard knows only what it was fed (after a resume, the steps since the resume; `refresh()`
of the run folder shows the whole history).
"""
from __future__ import annotations

import bisect
import html
import io
import itertools
import json
import time
from dataclasses import dataclass, field
from pathlib import Path


class MetricsError(ValueError):
    """A run folder or metrics file that cannot be followed (the message says why)."""


# helpers

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


def record_kind(record: dict) -> str:
    """'resume', 'eval', 'backup', 'step' (an optimizer step's record) or 'other'."""
    for key, kind in (("resumed_from", "resume"), ("eval", "eval"), ("backup", "backup"), ("loss", "step")):
        if key in record:
            return kind
    return "other"


def mib(n_bytes: float) -> str:
    return f"{n_bytes / 2**20:.1f} MiB"


def duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def describe_backup(backup: dict) -> str:
    """'ckpt-0000100 ok 84.2 MiB' or 'ckpt-0000100 FAILED (84.2 MiB, 3 attempts): OSError: ...'."""
    size = mib(backup["bytes"]) if backup.get("bytes") else None
    if backup["ok"]:
        return f"{backup['name']} ok" + (f" {size}" if size else "")
    detail = ", ".join(x for x in (size, f"{backup.get('attempts')} attempts") if x)
    return f"{backup['name']} FAILED ({detail}): {backup.get('error')}"


def space_warning(backups: list[dict]) -> str | None:
    """The low-space warning(s) carried by the backup records of the latest backup step (the checkpoint's
    and best/'s), or None: a later backup without one means there is room again."""
    if not backups:
        return None
    latest = [r for r in backups if r.get("step") == backups[-1].get("step")]
    found = dict.fromkeys(w for r in latest for w in (r["backup"].get("space_warning"), r.get("space_warning")) if w)
    return "; ".join(found) or None


# classes

@dataclass
class RunHistory:
    """The records of one run, split by kind, with the records superseded by a resume dropped.

    `segments` holds the index in `steps` where each stretch of uninterrupted training starts: the speed
    is measured within them, so the downtime before a resume never counts as training time.
    """

    name: str
    steps: list[dict] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)
    backups: list[dict] = field(default_factory=list)
    resumes: list[dict] = field(default_factory=list)
    segments: list[int] = field(default_factory=lambda: [0])
    offset: int = 0

    def add(self, record: dict) -> None:
        kind = record_kind(record)
        if kind == "resume":
            self.resumes.append(record)
            self._resume_after(record["step"])
        elif kind == "eval":
            self.evals.append(record)
        elif kind == "backup":
            self.backups.append(record)
        elif kind == "step":
            if self.steps and record["step"] <= self.steps[-1]["step"]:
                self._resume_after(record["step"] - 1)  # a resume whose marker is missing (older files)
            self.steps.append(record)

    def _resume_after(self, step: int) -> None:
        """Training went on from `step`: drop the step and eval records after it; a new segment starts.
        (Backup records stay: those copies were made.)"""
        del self.steps[bisect.bisect_right([r["step"] for r in self.steps], step):]
        self.evals = [r for r in self.evals if r["step"] <= step]
        self.segments = [s for s in self.segments if s < len(self.steps)] + [len(self.steps)]

    def seconds_per_step(self) -> float | None:
        """Mean wall time of an optimizer step from the step records' "time", summed segment by segment."""
        seconds, steps = 0.0, 0
        bounds = self.segments + [len(self.steps)]
        for start, end in itertools.pairwise(bounds):
            first, last = (self.steps[start], self.steps[end - 1]) if end - start >= 2 else ({}, {})
            if "time" in first and "time" in last:
                seconds += last["time"] - first["time"]
                steps += last["step"] - first["step"]
        return seconds / steps if steps else None

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
    """A 2 x 3 matplotlib figure of the runs (overlaid when several); returns the figure.

    A new figure is a plain `Figure` on an Agg canvas, outside pyplot: no backend switch, no figure left
    in pyplot's list (a global `matplotlib.use("Agg")` would break `plt.show()` for the whole session).
    """
    if figure is None:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        figure = Figure(figsize=(15, 8), layout="constrained")
        FigureCanvasAgg(figure)  # attaches itself to the figure
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
        name: the run's name when fed live.
        print_every: when fed live, `print()` the status line every this many steps (and at the last
            one); 0 = never. Printed lines survive a browser reconnect and are saved with the notebook,
            widget state is not: notebooks pass e.g. 50.
    """

    def __init__(self, runs: list[str | Path] | tuple = (), *, total_steps: int | None = None,
                 min_interval: float = 5.0, max_overhead: float = 0.02, name: str = "run", print_every: int = 0):
        assert print_every >= 0, f"print_every must be >= 0 (0 = no status lines), not {print_every}"
        self.paths = [metrics_path(r) for r in runs]
        self.histories = [RunHistory(p.parent.name) for p in self.paths] or [RunHistory(name)]
        self.total_steps = total_steps or self._planned_steps()
        self.min_interval = min_interval
        self.max_overhead = max_overhead
        self.print_every = print_every
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
        """A trainer callback: add one record; print the status line when due; redraw if `min_interval`
        has passed."""
        self.histories[0].add(record)
        due = record_kind(record) == "step" and self.print_every and (
            record["step"] % self.print_every == 0 or record["step"] == self.total_steps)
        if due:
            print(self.status_line(), flush=True)
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
        """The numbers of the side panel for the first run: step, loss, lr, quick STS, warnings, backups
        (the last one, every one, failures, a low-space warning), the last resume, speed and ETA."""
        h = self.histories[0]
        last = h.steps[-1] if h.steps else {}
        rate = [r["triplets_per_s"] for r in h.steps[-20:] if "triplets_per_s" in r]
        per_step = h.seconds_per_step()
        eta = None
        if self.total_steps and per_step:
            eta = max(0.0, (self.total_steps - last.get("step", 0)) * per_step)
        last_eval = h.evals[-1] if h.evals else {}
        backups = [r["backup"] for r in h.backups]
        return {"step": last.get("step"), "total_steps": self.total_steps, "loss": last.get("loss"),
                "lr": last.get("lr"), "warnings": last.get("warnings", []),
                "skipped_total": last.get("skipped_total", 0),
                "triplets_per_s": sum(rate) / len(rate) if rate else None, "seconds_per_step": per_step,
                "eta_s": eta, "sts": last_eval.get("eval", {}).get("sts"), "sts_step": last_eval.get("step"),
                "best_sts": last_eval.get("best_sts"), "backup": backups[-1] if backups else None,
                "backups": backups, "backup_failures": sum(not b["ok"] for b in backups),
                "space_warning": space_warning(h.backups),
                "resumed_from": h.resumes[-1]["resumed_from"] if h.resumes else None}

    def status_line(self) -> str:
        """The status as one line of plain text (what `print_every` prints), led by the last step's clock time."""
        s = self.status()
        last = self.histories[0].steps[-1] if self.histories[0].steps else {}
        clock = time.strftime("%H:%M:%S ", time.localtime(last["time"])) if "time" in last else ""
        parts = [f"{clock}step {s['step'] if s['step'] is not None else '-'}/{s['total_steps'] or '?'}",
                 "loss " + ("-" if s["loss"] is None else f"{s['loss']:.4f}"),
                 "lr " + ("-" if s["lr"] is None else f"{s['lr']:.2e}")]
        if s["sts"] is not None:
            parts.append(f"STS {s['sts']:.4f} (step {s['sts_step']})")
        parts.append(f"skipped {s['skipped_total']}")
        backup = "none yet" if s["backup"] is None else describe_backup(s["backup"])
        if s["backup_failures"]:
            backup += f" ({s['backup_failures']} of {len(s['backups'])} failed)"
        parts.append(f"backup {backup}")
        if s["space_warning"]:
            parts.append(f"SPACE: {s['space_warning']}")
        speed = [f"{s['triplets_per_s']:.1f} triplets/s"] if s["triplets_per_s"] is not None else []
        speed += [f"{s['seconds_per_step']:.2f} s/step"] if s["seconds_per_step"] is not None else []
        parts.append(", ".join(speed) or "speed -")
        parts.append("ETA " + ("-" if s["eta_s"] is None else duration(s["eta_s"])))
        return " | ".join(parts)

    def _status_html(self) -> str:
        s = self.status()
        warnings = "".join(f"<li>{html.escape(w)}</li>" for w in s["warnings"]) or "<li>none</li>"
        speed = "-" if s["triplets_per_s"] is None else f"{s['triplets_per_s']:.1f} triplets/s"
        if s["seconds_per_step"] is not None:
            speed += f" ({s['seconds_per_step']:.2f} s/step)"
        eta = "-" if s["eta_s"] is None else duration(s["eta_s"])
        loss = "-" if s["loss"] is None else f"{s['loss']:.4f}"
        lr = "-" if s["lr"] is None else f"{s['lr']:.2e}"
        sts = "-" if s["sts"] is None else f"{s['sts']:.4f} (step {s['sts_step']})"
        best = "-" if s["best_sts"] is None else f"{s['best_sts']:.4f}"
        total = f"/{s['total_steps']}" if s["total_steps"] else ""
        if s["backups"]:
            failed = f", {s['backup_failures']} failed" if s["backup_failures"] else ""
            newest = "".join(f"<li>{html.escape(describe_backup(b))}</li>" for b in reversed(s["backups"][-5:]))
            backups = f"<b>backups</b> {len(s['backups'])}{failed}, newest first:<ul>{newest}</ul>"
        else:
            backups = "<b>backup</b> none yet<br>"
        space = (f"<b style='color:#c00'>space</b> {html.escape(s['space_warning'])}<br>"
                 if s["space_warning"] else "")
        resumed = f"<b>resumed from</b> {html.escape(s['resumed_from'])}<br>" if s["resumed_from"] else ""
        return (f"<b>step</b> {s['step']}{total} &nbsp; <b>loss</b> {loss} &nbsp; <b>lr</b> {lr} &nbsp; "
                f"<b>quick STS</b> {sts} &nbsp; <b>best STS</b> {best} &nbsp; <b>skipped</b> {s['skipped_total']} "
                f"&nbsp; <b>speed</b> {speed} &nbsp; <b>ETA</b> {eta}<br>"
                f"{resumed}{backups}{space}<b>health warnings</b><ul>{warnings}</ul>")

    @property
    def widget(self):
        """The ipywidgets VBox (built on first use: the library imports without ipywidgets). Only widgets
        and arguments that ipywidgets 7.7.1 (Colab's frontend) has too."""
        if self._widget is None:
            import ipywidgets as widgets

            self._image = widgets.Image(format="png")
            self._html = widgets.HTML()
            self._widget = widgets.VBox([self._html, self._image])
            self.render()
        return self._widget

    def render(self) -> None:
        """Redraw the figure, and the widget once it has been shown."""
        started = time.monotonic()
        self.figure = draw(self.histories, self.figure)
        self.draws += 1
        if self._widget is not None:
            self._image.value = self._png(dpi=80)
            self._html.value = self._status_html()
        took = time.monotonic() - started
        self.next_draw = started + max(self.min_interval, took / self.max_overhead if self.max_overhead else 0.0)

    def _png(self, dpi: int) -> bytes:
        buf = io.BytesIO()
        self.figure.savefig(buf, format="png", dpi=dpi)
        return buf.getvalue()

    def save_png(self, path: str | Path, dpi: int = 100) -> Path:
        if self.figure is None:
            self.render()
        self.figure.savefig(str(path), dpi=dpi)
        return Path(path)

    def show_final(self, path: str | Path | None = None, dpi: int = 100) -> Path | None:
        """Redraw, print the status line and display the figure as a static PNG image: unlike the widget,
        it stays in the saved notebook. Also saves the PNG to `path` when given (and returns the path).
        Outside a notebook, IPython's `display` prints the image's repr."""
        from IPython.display import Image, display

        self.render()
        png = self._png(dpi=dpi)
        print(self.status_line(), flush=True)
        display(Image(data=png, format="png"))
        if path is None:
            return None
        Path(path).write_bytes(png)
        return Path(path)
