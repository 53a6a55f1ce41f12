"""Fault injection on the command line: `kill -9` at seeded random moments (mid-checkpoint, mid-backup,
mid-restore, or any time), a second writer, and a backup folder replaced by a fresh runtime's empty disk.

After every fault: every checkpoint and backup folder that exists is whole (a kill leaves only
temporary folders, which are never taken for checkpoints), metrics.jsonl parses, and `--resume auto`
goes on. At the end the run's losses equal an uninterrupted run's, step for step, and its final model
equals the uninterrupted run's bit for bit.
"""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from nsa_lib.runfolder import checkpoint_problem, is_checkpoint_name, verify_folder

ROOT = Path(__file__).resolve().parents[1]
STEPS = 40  # long enough that every seeded fault lands before the run ends
FLAGS = ["--size", "tiny", "--max-train-samples", "400", "--batch-size", "8", "--max-length", "32",
         "--eval-every", "0", "--no-final-eval", "--max-steps", str(STEPS), "--save-every", "2"]
SEED = 20261127


def command(run: Path, *extra) -> list[str]:
    return [sys.executable, "-m", "nsa_lib", "train", "--output-dir", str(run), *FLAGS, *extra]


def env():
    return {**os.environ, "HF_HUB_OFFLINE": "1"}


def step_losses(run: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]  # parses whole
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def assert_whole(*folders: Path) -> None:
    """Every checkpoint-named folder in `folders` verifies against its manifest."""
    for folder in folders:
        if folder.is_dir():
            for ckpt in folder.iterdir():
                if is_checkpoint_name(ckpt.name):
                    assert checkpoint_problem(ckpt) is None, (ckpt, checkpoint_problem(ckpt))


def run_until(cmd, trigger, timeout=60.0) -> tuple[bool, str]:
    """Start `cmd`; kill -9 it as soon as `trigger()` is true. Returns (killed, stderr tail)."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline, killed = time.time() + timeout, False
    try:
        while time.time() < deadline and proc.poll() is None:
            if trigger():
                proc.send_signal(signal.SIGKILL)
                killed = True
                break
            time.sleep(0.0005)
    finally:
        if proc.poll() is None and not killed:
            proc.kill()
        _, err = proc.communicate()
    return killed, err[-2000:]


def writing(folder: Path, suffix: str):
    """A trigger: a temporary folder with `suffix` is being written in `folder` (the n-th time seen)."""
    def seen() -> bool:
        return folder.is_dir() and any(p.name.endswith(suffix) or p.name.startswith(suffix) for p in folder.iterdir())
    return seen


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run = tmp_path_factory.mktemp("uninterrupted") / "run"
    done = subprocess.run(command(run), cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return run


@pytest.mark.slow
def test_kill_9_anywhere_then_resume_auto_reproduces_the_run(tmp_path, uninterrupted):
    rng = random.Random(SEED)
    run, drive = tmp_path / "run", tmp_path / "drive"
    backup = ["--backup-every", "4", "--backup-dir", str(drive)]
    faults = ["checkpoint", "backup", "any", "checkpoint", "backup", "any"]
    rng.shuffle(faults)
    faults.insert(rng.randint(2, len(faults)), "restore")  # after a backup exists to restore from
    log = []
    for fault in faults:
        if fault == "restore":  # a fresh runtime: the local disk is empty, the backups remain
            def backed_up() -> bool:
                return drive.is_dir() and any(is_checkpoint_name(p.name) for p in drive.iterdir())
            if not backed_up():  # no whole backup yet (the earlier kills were too early): kill right after one
                killed, err = run_until(command(run, "--resume", "auto", *backup), backed_up)
                log.append(("after a backup", killed))
                assert killed and "Traceback" not in err, (log, err)
            run.rename(run.with_name(f"{run.name}-lost-{len(log)}"))  # kept, not deleted: nothing is lost
            trigger = writing(run / "checkpoints", ".restore-")
        elif fault == "checkpoint":
            trigger = writing(run / "checkpoints", ".tmp")
        elif fault == "backup":
            trigger = writing(drive, ".tmp")
        else:
            delay, start = rng.uniform(2.0, 6.0), time.time()
            trigger = lambda: time.time() - start > delay  # noqa: E731
        killed, err = run_until(command(run, "--resume", "auto", *backup), trigger)
        log.append((fault, killed))
        print(fault, "landed" if killed else "missed")
        assert "Traceback" not in err, err
        assert_whole(run / "checkpoints", drive)  # nothing complete was damaged by the kill
        if (run / "metrics.jsonl").is_file():
            step_losses(run)  # parses
    assert sum(k for _, k in log) >= 6 and ("restore", True) in log, log  # (a run may finish before a trigger)
    done = subprocess.run(command(run, "--resume", "auto", *backup), cwd=ROOT, env=env(), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    expected, got = step_losses(uninterrupted), step_losses(run)
    assert max(got) == STEPS and all(got[s] == expected[s] for s in got), log
    assert verify_folder(run / "final") is None
    ours, theirs = load_file(str(run / "final" / "model.safetensors")), load_file(str(uninterrupted / "final" / "model.safetensors"))
    assert all((ours[k] == theirs[k]).all() for k in theirs)


@pytest.mark.slow
def test_a_second_writer_is_refused_while_the_first_lives_and_takes_over_after_kill_9(tmp_path):
    run = tmp_path / "run"
    long_run = ["--max-steps", "100000"]  # still training when the second writer starts
    first = subprocess.Popen(command(run, *long_run), cwd=ROOT, env=env(), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while time.time() < deadline and not (run / "checkpoints").is_dir():
            time.sleep(0.01)
        second = subprocess.run(command(run, "--resume", "auto", *long_run), cwd=ROOT, env=env(),
                                capture_output=True, text=True, timeout=120)
        first_alive = first.poll() is None
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert first_alive
    assert second.returncode == 2 and f"being written by process {first.pid}" in second.stderr
    assert "Traceback" not in second.stderr
    before = step_losses(run)  # one writer: every line parses, no interleaving
    assert_whole(run / "checkpoints")
    newest = max(int(p.name[5:]) for p in (run / "checkpoints").iterdir() if is_checkpoint_name(p.name))
    done = subprocess.run(command(run, "--resume", "auto", "--max-steps", str(newest + 2)), cwd=ROOT, env=env(),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "taking over the lock left by" in done.stderr
    after = step_losses(run)
    assert max(after) == newest + 2 and all(after[s] == before[s] for s in before if s <= newest)
