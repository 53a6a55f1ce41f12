"""The dashboard headless: reading a metrics file while it is written, the figure's data, the widgets,
throttled redraws, overlays, and clear errors for runs that cannot be followed."""
import json

import pytest

from nsa_lib import NSAConfig
from nsa_lib.dashboard import Dashboard, MetricsError, read_metrics
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
