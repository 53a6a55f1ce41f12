"""The dashboard headless: reading a metrics file while it is written, the figure's data, the widgets,
throttled redraws, overlays, resumed runs, the printed status line, backups in the status, the final static
image, the session's matplotlib backend left alone, and clear errors for runs that cannot be followed.
(Under Colab's ipywidgets 7.7.1: test_dashboard_widgets77.py.)"""
import json

import matplotlib
import pytest

from nsa_lib import NSAConfig
from nsa_lib.dashboard import Dashboard, MetricsError, RunHistory, read_metrics
from nsa_lib.data import load_snli_triplets, load_tokenizer
from nsa_lib.trainer import Trainer


def step(n, loss=None, **extra):
    return {"step": n, "loss": loss if loss is not None else 10.0 / n, "loss_sem": 1.0 / n, "lr": 1e-3,
            "temperature": 0.07, "grad_norm_mean": 1.0, "grad_norm_std": 0.5, "grad_norm_max": 3.0,
            "anomaly_mean": 0.4, "anomaly_std": 0.05, "spectral_entropy": 3.0, "triplets_per_s": 100.0,
            "time": 1000.0 + n, "warnings": [], "skipped_total": 0, **extra}


def test_reads_only_complete_lines_and_continues(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps(step(n)) for n in (1, 2, 3)]
    fourth = json.dumps(step(4))
    path.write_text("\n".join(lines) + "\n" + fourth[:10])  # the 4th line is being written
    records, offset = read_metrics(path)
    assert [r["step"] for r in records] == [1, 2, 3]
    with open(path, "a") as f:
        f.write(fourth[10:] + "\n")
    more, offset2 = read_metrics(path, offset)
    assert [r["step"] for r in more] == [4] and offset2 == path.stat().st_size
    assert read_metrics(path, offset2) == ([], offset2)


def test_a_corrupt_line_is_named(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps(step(1)) + "\n{not json}\n")
    with pytest.raises(MetricsError, match=r"metrics\.jsonl: line 2 .* is not JSON"):
        read_metrics(path)


def test_missing_or_empty_runs_are_clear_errors(tmp_path):
    with pytest.raises(MetricsError, match="no run folder at"):
        Dashboard([tmp_path / "nope"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(MetricsError, match="no metrics yet.*has the run started"):
        Dashboard([tmp_path / "empty"]).refresh()


def test_live_feed_draws_the_fed_values_and_fills_the_widgets():
    dash = Dashboard(min_interval=0.0, max_overhead=0.0, total_steps=10)  # redraw on every record
    for n in range(1, 6):
        dash.update(step(n, warnings=["embedding collapse: 0.95"] if n == 5 else []))
    dash.update({"step": 5, "eval": {"sts": 0.61, "baseline_sts": 0.807, "target_sts": 0.825}, "best_sts": 0.61})
    dash.update({"step": 5, "backup": {"name": "ckpt-0000005", "ok": True, "attempts": 1, "seconds": 0.1,
                                       "error": None}})
    loss_ax = dash.figure.axes[0]
    xs, ys = loss_ax.lines[0].get_data()
    assert list(xs) == [1, 2, 3, 4, 5] and list(ys) == [10.0 / n for n in range(1, 6)]
    sts_ax = dash.figure.axes[4]
    assert [list(l.get_ydata()) for l in sts_ax.lines][0] == [0.61]
    assert {l.get_label() for l in sts_ax.lines} >= {"all-MiniLM-L6-v2", "target"}
    html = dash.widget.children[0].value
    assert "<b>step</b> 5" in html and "embedding collapse" in html and "ckpt-0000005 ok" in html
    assert "5.0 triplets/s" not in html and "100.0 triplets/s" in html
    assert dash.status()["eta_s"] == pytest.approx(5.0)  # 5 steps left at 1 s per step
    assert dash.widget.children[1].value[:8] == b"\x89PNG\r\n\x1a\n"


def test_redraws_are_throttled():
    dash = Dashboard(min_interval=3600.0)
    for n in range(1, 50):
        dash.update(step(n))
    assert dash.draws == 1  # the first record draws, the rest wait for the interval


def test_redraws_are_spaced_to_bound_their_share_of_the_time():
    dash = Dashboard(min_interval=0.0, max_overhead=0.01)
    dash.update(step(1))  # draws, taking some tens of milliseconds
    for n in range(2, 20):
        dash.update(step(n))  # within 100x the draw time: none of these draw
    assert dash.draws == 1


def test_overlaid_runs_and_png(tmp_path):
    for name, scale in (("base", 1.0), ("no-spectral", 2.0)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.jsonl").write_text(
            "".join(json.dumps(step(n, loss=scale / n)) + "\n" for n in range(1, 4)))
    dash = Dashboard([tmp_path / "base", tmp_path / "no-spectral"])
    assert dash.refresh() == 6
    labels = [l.get_label() for l in dash.figure.axes[0].lines]
    assert labels == ["base", "no-spectral"]
    assert list(dash.figure.axes[0].lines[1].get_ydata()) == [2.0, 1.0, 2.0 / 3]
    png = dash.save_png(tmp_path / "report.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_follows_a_real_run_fed_by_the_trainer(tmp_path):
    dash = Dashboard(min_interval=0.0)
    config = NSAConfig.from_preset("tiny", batch_train=8, max_steps=4, eval_every=2, save_every=0, max_length=32)
    Trainer(config, output_dir=tmp_path / "run", tokenizer=load_tokenizer(source="offline"),
            triplets=load_snli_triplets("train")[:400], show_progress=False, callbacks=(dash.update,),
            eval_fn=lambda model, tok: {"sts": 0.5}).train()
    assert [r["step"] for r in dash.histories[0].steps] == [1, 2, 3, 4]
    follower = Dashboard([tmp_path / "run"])
    follower.refresh()
    assert [r["step"] for r in follower.histories[0].steps] == [1, 2, 3, 4] and len(follower.histories[0].evals) == 2


def test_drawing_leaves_the_sessions_matplotlib_backend_alone(tmp_path):
    """`matplotlib.use("Agg")` inside draw() broke `plt.show()` for the rest of a Colab session."""
    import matplotlib.pyplot as plt

    before = matplotlib.get_backend()
    matplotlib.use("svg")  # stands for Colab's inline backend: any backend that is not Agg
    try:
        figures = plt.get_fignums()
        dash = Dashboard(min_interval=0.0)
        for n in range(1, 4):
            dash.update(step(n))
        dash.save_png(tmp_path / "report.png")
        Dashboard([tmp_path]).save_png(tmp_path / "empty.png")  # draws a figure of its own
        assert matplotlib.get_backend() == "svg"
        assert plt.get_fignums() == figures  # nothing added to pyplot's figures either
        assert (tmp_path / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    finally:
        matplotlib.use(before)


def resumed_run() -> list[dict]:
    """Steps 1..10 with evaluations at 5 and 10, interrupted; resumed from the checkpoint of step 6 an hour
    later, then steps 7..12 again (with other losses), one second apart like before."""
    first = [step(n) for n in range(1, 11)]
    first.insert(5, {"step": 5, "eval": {"sts": 0.5}, "best_sts": 0.5, "best_step": 5})
    first.append({"step": 10, "eval": {"sts": 0.6}, "best_sts": 0.6, "best_step": 10})
    resumed = [{"step": 6, "resumed_from": "ckpt-0000006", "time": 1010.0 + 3600}]
    resumed += [step(n, loss=100.0 + n, time=1000.0 + 3600 + n) for n in range(7, 13)]
    return first + resumed


def write_records(path, records, mode="w"):
    with open(path, mode) as f:
        f.write("".join(json.dumps(r) + "\n" for r in records))


@pytest.mark.parametrize("fed", ["file", "live"])
def test_a_resumed_run_drops_the_superseded_records_and_its_downtime(tmp_path, fed):
    records = resumed_run()
    if fed == "file":  # followed while it runs: the interrupted attempt, then the resumed one
        marker = next(i for i, r in enumerate(records) if "resumed_from" in r)
        write_records(tmp_path / "metrics.jsonl", records[:marker])
        dash = Dashboard([tmp_path], total_steps=20)
        dash.refresh()
        write_records(tmp_path / "metrics.jsonl", records[marker:], mode="a")
        dash.refresh()
    else:
        dash = Dashboard(total_steps=20, min_interval=0.0, max_overhead=0.0)
        for r in records:
            dash.update(r)
    h = dash.histories[0]
    xs, ys = h.series("loss")
    assert xs == list(range(1, 13))  # strictly increasing: no zigzag back to 7
    assert ys[6:] == [100.0 + n for n in range(7, 13)]  # 7..10 are the resumed attempt's values
    assert [r["step"] for r in h.evals] == [5]  # the evaluation at 10 was of the superseded attempt
    assert list(dash.figure.axes[0].lines[0].get_xdata()) == xs
    assert h.seconds_per_step() == pytest.approx(1.0)  # 1 s per step in each segment, not the hour between
    s = dash.status()
    assert s["step"] == 12 and s["resumed_from"] == "ckpt-0000006"
    assert s["eta_s"] == pytest.approx(8.0)  # 8 steps left at 1 s each


def test_a_step_that_goes_back_without_a_marker_also_supersedes():
    h = RunHistory("older file")  # a run resumed before the trainer wrote markers: steps 3 and 4 again
    for n in (1, 2, 3, 4):
        h.add(step(n))
    for n in (3, 4, 5):
        h.add(step(n, loss=100.0 + n, time=1000.0 + 3600 + n))
    assert h.series("loss") == ([1, 2, 3, 4, 5], [10.0, 5.0, 103.0, 104.0, 105.0])
    assert h.segments == [0, 2] and h.seconds_per_step() == pytest.approx(1.0)


def backup(n, ok=True, size=None, **extra):
    result = {"name": f"ckpt-{n:07d}", "ok": ok, "attempts": 1 if ok else 3, "seconds": 0.5,
              "error": None if ok else "OSError: [Errno 28] No space left on device", **extra}
    if size is not None:
        result["bytes"] = size
    return {"step": n, "backup": result, "target": "FolderTarget('/content/drive/MyDrive/runs')"}


def test_prints_a_status_line_every_n_steps(capsys):
    dash = Dashboard(total_steps=12, min_interval=3600.0, print_every=5)
    for n in range(1, 13):
        dash.update(step(n, lr=2e-4, skipped_total=1 if n > 3 else 0))
        if n == 5:
            dash.update({"step": 5, "eval": {"sts": 0.61}, "best_sts": 0.61, "best_step": 5})
            dash.update(backup(5, size=84 * 2**20))
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3  # steps 5, 10 and the last one, 12
    assert " step 5/12 | " in lines[0] and "backup none yet" in lines[0]  # the eval and backup of 5 came after
    tenth = lines[1]
    for part in ["step 10/12", "loss 1.0000", "lr 2.00e-04", "STS 0.6100 (step 5)", "skipped 1",
                 "backup ckpt-0000005 ok 84.0 MiB", "100.0 triplets/s, 1.00 s/step", "ETA 2 s"]:
        assert part in tenth, part
    assert "step 12/12" in lines[2] and "ETA 0 s" in lines[2]


def test_prints_nothing_by_default(capsys):
    dash = Dashboard(total_steps=100, min_interval=3600.0)
    for n in range(1, 101):
        dash.update(step(n))
    assert capsys.readouterr().out == ""


def test_backups_show_their_size_failures_and_a_space_warning(capsys):
    warning = "/content/drive/MyDrive/runs has 50 MiB free, the backup ckpt-0000004 needs 84 MiB"
    dash = Dashboard(total_steps=4, min_interval=0.0, max_overhead=0.0, print_every=4)
    for n in range(1, 4):
        dash.update(step(n))
    dash.update(backup(2, size=83 * 2**20))
    dash.update(backup(3, ok=False, size=84 * 2**20))
    dash.update(backup(3, size=2 * 2**20, name="best", space_warning=warning))
    dash.update(step(4))
    s = dash.status()
    assert s["backup_failures"] == 1 and len(s["backups"]) == 3 and s["space_warning"] == warning
    html = dash.widget.children[0].value
    assert "<b>backups</b> 3, 1 failed" in html
    assert "ckpt-0000002 ok 83.0 MiB" in html and "best ok 2.0 MiB" in html
    assert "ckpt-0000003 FAILED (84.0 MiB, 3 attempts): OSError: [Errno 28] No space left on device" in html
    assert f"<b style='color:#c00'>space</b> {warning}" in html
    line = capsys.readouterr().out
    assert "backup best ok 2.0 MiB (1 of 3 failed)" in line and f"SPACE: {warning}" in line
    dash.update(backup(4, size=84 * 2**20))  # a later backup without a warning: there is room again
    assert dash.status()["space_warning"] is None and "space</b>" not in dash.widget.children[0].value


def test_show_final_displays_and_saves_a_static_png(tmp_path, capsys):
    write_records(tmp_path / "metrics.jsonl", [step(n) for n in range(1, 6)] + [backup(5, size=2**20)])
    dash = Dashboard([tmp_path], total_steps=5)
    dash.refresh()
    assert dash.show_final(tmp_path / "final.png") == tmp_path / "final.png"
    assert (tmp_path / "final.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = capsys.readouterr().out  # outside a notebook, display() prints the image's repr
    assert "step 5/5" in out and "backup ckpt-0000005 ok 1.0 MiB" in out and "Image object" in out
    assert dash.show_final() is None
