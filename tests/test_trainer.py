"""The training loop on real SNLI triplets with the tiny preset: exact resume, checkpoints that survive a
kill mid-write, skipped non-finite steps, mixed precision on the CPU, and the metrics stream."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from nsa_lib import NSAConfig, NSAModel
from nsa_lib.data import load_snli_triplets, load_tokenizer
from nsa_lib.trainer import STATE_FILE, Trainer, TrainingStopped, find_resume_checkpoint, list_checkpoints

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(source="offline")


@pytest.fixture(scope="module")
def triplets():
    return load_snli_triplets("train")[:600]


def tiny(**overrides):
    settings = dict(batch_train=8, grad_accum=2, max_steps=6, save_every=2, eval_every=3, eval_pairs=40,
                    max_length=32, dropout=0.1, val_ratio=0.02)
    return NSAConfig.from_preset("tiny", **{**settings, **overrides})


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def step_records(run: Path) -> dict[int, dict]:
    """The last record of each optimizer step (a resumed run logs the replayed steps again)."""
    return {r["step"]: r for r in metrics(run) if "loss" in r}


class StopAt:
    def __init__(self, step):
        self.step = step

    def __call__(self, record):
        if record.get("step") == self.step and "loss" in record:
            raise KeyboardInterrupt(f"stopped at {self.step}")


def test_resumed_run_reproduces_every_step_bit_for_bit(tmp_path, tokenizer, triplets):
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    Trainer(tiny(), output_dir=whole, tokenizer=tokenizer, triplets=triplets, show_progress=False).train()
    with pytest.raises(KeyboardInterrupt):
        Trainer(tiny(), output_dir=broken, tokenizer=tokenizer, triplets=triplets, show_progress=False,
                callbacks=(StopAt(5),)).train()
    # the interrupt saved the last whole step too, not only the save_every ones
    assert [c.name for c in list_checkpoints(broken)] == ["ckpt-0000002", "ckpt-0000004", "ckpt-0000005"]
    resumed = Trainer(tiny(), output_dir=broken, resume="auto", tokenizer=tokenizer, triplets=triplets,
                      show_progress=False)
    assert resumed.state.step == 5
    resumed.train()
    a, b = step_records(whole), step_records(broken)
    assert sorted(a) == sorted(b) == list(range(1, 7))
    for step in a:
        for key in ("loss", "loss_sem", "loss_rank", "loss_spec", "grad_norm", "lr", "temperature"):
            assert a[step][key] == b[step][key], (step, key)  # exact, not approximate
    evals = lambda run: [(r["step"], r["eval"]["sts"]) for r in metrics(run) if "eval" in r]
    assert evals(whole) == sorted(set(evals(broken)))
    final_a = NSAModel.from_pretrained(list_checkpoints(whole)[-1]).state_dict()
    final_b = NSAModel.from_pretrained(list_checkpoints(broken)[-1]).state_dict()
    assert all(torch.equal(final_a[k], final_b[k]) for k in final_a)


def test_metrics_stream_has_every_field(tmp_path, tokenizer, triplets):
    run = tmp_path / "run"
    seen = []
    Trainer(tiny(max_steps=3, eval_every=3), output_dir=run, tokenizer=tokenizer, triplets=triplets,
            show_progress=False, callbacks=(seen.append,)).train()
    records = metrics(run)
    assert records == seen
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    for r in steps:
        assert {"loss", "lr", "temperature", "grad_norm", "skipped", "triplets_per_s"} <= r.keys()
        assert {f"loss_{t}" for t in ("sem", "anchor", "bridge", "fast", "rank", "angular", "spec")} <= r.keys()
    assert [r["step"] for r in records if "eval" in r] == [3]
    assert json.loads((run / "config.json").read_text())["size"] == "tiny"


def test_keeps_the_newest_checkpoints_and_the_best(tmp_path, tokenizer, triplets):
    run = tmp_path / "run"
    trainer = Trainer(tiny(max_steps=8, save_every=1, eval_every=2), output_dir=run, tokenizer=tokenizer,
                      triplets=triplets, show_progress=False, keep_checkpoints=2)
    trainer.train()
    names = [c.name for c in list_checkpoints(run)]
    best = f"ckpt-{trainer.state.best_step:07d}"
    assert names[-2:] == ["ckpt-0000007", "ckpt-0000008"]
    assert set(names) == {"ckpt-0000007", "ckpt-0000008", best}


def test_non_finite_loss_skips_the_step_and_is_counted(tmp_path, tokenizer, triplets):
    trainer = Trainer(tiny(max_steps=4, grad_accum=1, eval_every=0, save_every=0), output_dir=tmp_path / "run",
                      tokenizer=tokenizer, triplets=triplets, show_progress=False)
    model = trainer.accelerator.unwrap_model(trainer.model)
    calls, snapshots = {"n": 0}, {}

    def poison_second_batch(module, inputs, output):  # a real forward hook: the 2nd micro-batch turns NaN
        calls["n"] += 1
        return {**output, "spectral": output["spectral"] * float("nan")} if calls["n"] == 2 else output

    model.rank_head.register_forward_hook(poison_second_batch)
    trainer.callbacks.append(lambda r: snapshots.__setitem__(r["step"], {k: v.clone() for k, v in model.state_dict().items()}))
    trainer.train()
    records = step_records(tmp_path / "run")
    assert [records[s]["skipped"] for s in (1, 2, 3, 4)] == [False, True, False, False]
    assert records[4]["skipped_total"] == 1 and trainer.state.skipped == 1
    assert records[2]["loss_spec"] != records[2]["loss_spec"]  # NaN logged as it was, not patched
    assert all(torch.equal(snapshots[1][k], snapshots[2][k]) for k in snapshots[1])  # no update at step 2
    assert any(not torch.equal(snapshots[2][k], snapshots[3][k]) for k in snapshots[2])


def test_many_non_finite_steps_in_a_row_stop_the_run(tmp_path, tokenizer, triplets):
    trainer = Trainer(tiny(max_steps=10, eval_every=0, save_every=0), output_dir=tmp_path / "run",
                      tokenizer=tokenizer, triplets=triplets, show_progress=False, max_consecutive_skips=3)
    trainer.accelerator.unwrap_model(trainer.model).rank_head.register_forward_hook(
        lambda m, i, o: {**o, "spectral": o["spectral"] * float("inf")})
    with pytest.raises(TrainingStopped, match="3 optimizer steps in a row had a non-finite"):
        trainer.train()


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_mixed_precision_on_cpu_trains_without_skips(tmp_path, tokenizer, triplets, precision):
    trainer = Trainer(tiny(max_steps=12, precision=precision, eval_every=0, save_every=0),
                      output_dir=tmp_path / precision, tokenizer=tokenizer, triplets=triplets, show_progress=False)
    if precision == "fp16":
        assert trainer.scaler.is_enabled()
    state = trainer.train()
    records = step_records(tmp_path / precision)
    assert state.skipped == 0 and not any(r["skipped"] for r in records.values())
    losses = [records[s]["loss"] for s in sorted(records)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-4:]) < sum(losses[:4])  # it learns


KILL_SCRIPT = """
import sys
sys.path.insert(0, {root!r})
from nsa_lib import NSAConfig
from nsa_lib.data import load_snli_triplets, load_tokenizer
from nsa_lib.trainer import Trainer
config = NSAConfig.from_preset("tiny", batch_train=8, grad_accum=1, max_steps=100000, save_every=1, eval_every=0,
                               max_length=32)
Trainer(config, output_dir={run!r}, tokenizer=load_tokenizer(source="offline"),
        triplets=load_snli_triplets("train")[:2000], show_progress=False, keep_checkpoints=1000).train()
"""


@pytest.mark.slow
def test_kill_during_a_checkpoint_write_leaves_the_previous_ones_whole(tmp_path):
    run = tmp_path / "run"
    script = tmp_path / "train.py"
    script.write_text(KILL_SCRIPT.format(root=str(ROOT), run=str(run)))
    killed_mid_write = False
    for attempt in range(5):
        proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.time() + 120
        try:
            while time.time() < deadline and proc.poll() is None:
                ckpts = run / "checkpoints"
                if ckpts.is_dir() and len(list_checkpoints(run)) >= 3 and any(
                        p.name.endswith(".tmp") for p in ckpts.iterdir()):
                    proc.send_signal(signal.SIGKILL)
                    killed_mid_write = True
                    break
                time.sleep(0.0005)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        if killed_mid_write:
            break
    assert killed_mid_write, "never caught the process writing a checkpoint"
    complete = list_checkpoints(run)
    assert len(complete) >= 3
    for ckpt in complete:  # every complete checkpoint loads
        NSAModel.from_pretrained(ckpt)
        torch.load(ckpt / STATE_FILE, map_location="cpu", weights_only=True)  # no allowlist needed
    newest = find_resume_checkpoint("auto", run)
    assert newest == complete[-1]
    config = NSAConfig.from_preset("tiny", batch_train=8, grad_accum=1, max_steps=100000, save_every=1,
                                   eval_every=0, max_length=32)
    resumed = Trainer(config, output_dir=run, resume="auto", tokenizer=load_tokenizer(source="offline"),
                      triplets=load_snli_triplets("train")[:2000], show_progress=False)
    assert resumed.state.step == int(newest.name.split("-")[1])


def test_resume_from_a_path_that_is_no_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a checkpoint folder"):
        find_resume_checkpoint(str(tmp_path))
    assert find_resume_checkpoint("auto", tmp_path) is None


def test_cli_train_then_eval(tmp_path):
    run = tmp_path / "cli"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    train = subprocess.run([sys.executable, "-m", "nsa_lib", "train", "--size", "tiny", "--max-steps", "20",
                            "--eval-every", "10", "--save-every", "10", "--max-train-samples", "2000",
                            "--output-dir", str(run), "--no-angular"],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert train.returncode == 0, train.stderr[-2000:]
    assert "STS-B dev Spearman before training" in train.stdout and "after training" in train.stdout
    assert json.loads((run / "config.json").read_text())["use_angular"] is False
    assert "loss_angular" not in metrics(run)[0]
    ev = subprocess.run([sys.executable, "-m", "nsa_lib", "eval", "--checkpoint", str(run), "--tasks", "stsb,retrieval",
                         "--limit", "200", "--no-progress"], cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=300)
    assert ev.returncode == 0, ev.stderr[-2000:]
    assert "| stsb-dev | spearman |" in ev.stdout and "| retrieval-triplets | recall@10 |" in ev.stdout
    bad = subprocess.run([sys.executable, "-m", "nsa_lib", "train", "--data", str(tmp_path / "missing.jsonl"),
                          "--size", "tiny", "--output-dir", str(tmp_path / "x")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "missing.jsonl: no such file" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.slow
def test_two_processes_under_torchrun(tmp_path):
    """Several processes (here 2 CPU processes over gloo, as `accelerate launch` / torchrun start them):
    each takes every other micro-batch, one metrics stream and one set of checkpoints are written."""
    run = tmp_path / "ddp"
    torchrun = Path(sys.executable).parent / "torchrun"
    done = subprocess.run([str(torchrun), "--nproc_per_node", "2", "-m", "nsa_lib", "train", "--size", "tiny",
                           "--max-steps", "6", "--eval-every", "3", "--save-every", "3", "--no-final-eval",
                           "--max-train-samples", "3000", "--output-dir", str(run)],
                          cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("Spectra-NSA tiny") == 1 and "2 process(es)" in done.stdout
    assert "(91 per epoch" in done.stdout  # 2,940 training triplets / 16 per micro-batch / 2 processes
    steps = [r["step"] for r in metrics(run) if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert [c.name for c in list_checkpoints(run)] == ["ckpt-0000003", "ckpt-0000006"]
