"""A run is never lost and never stuck: each case that once lost data or left a run no command could
resume, reproduced on the command line (in this process, through `nsa_lib.cli.main`) with the tiny preset
on real SNLI triplets. The kill -9 cases are in tests/test_faults.py."""
import json
import shutil
import subprocess
import sys

import pytest
import torch

from nsa_lib import NSAConfig, NSAModel
from nsa_lib.backup import BackupError, BackupManager, FolderTarget, backup_target
from nsa_lib.cli import main
from nsa_lib.data import load_snli_triplets, load_tokenizer
from nsa_lib.runfolder import (MANIFEST_FILE, RunFolderBusy, RunLock, checkpoint_name, list_checkpoints,
                               verify_folder, write_manifest)
from nsa_lib.trainer import Trainer, TrainingStopped

SMALL = ["--size", "tiny", "--max-train-samples", "400", "--batch-size", "8", "--max-length", "32",
         "--eval-every", "0", "--no-final-eval"]


def train_cli(run, *flags, capsys=None):
    code = main(["train", "--output-dir", str(run), *SMALL, *flags])
    out = capsys.readouterr() if capsys is not None else None
    return code, out


def metrics(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def step_losses(run) -> dict[int, float]:
    """The last logged loss of each optimizer step (a resumed run logs the replayed steps again)."""
    return {r["step"]: r["loss"] for r in metrics(run) if "loss" in r}


def snapshot(folder) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
            and p.name != ".nsa-lock"}


@pytest.fixture(scope="module")
def data():
    return load_tokenizer(source="offline"), load_snli_triplets("train")[:400]


def tiny(**overrides) -> NSAConfig:
    return NSAConfig.from_preset("tiny", **{**dict(batch_train=8, grad_accum=1, max_steps=8, save_every=2,
                                                   eval_every=0, max_length=32), **overrides})


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 12-step CLI run, saving every 2 steps: the losses every fault must reproduce."""
    run = tmp_path_factory.mktemp("reference") / "run"
    assert train_cli(run, "--max-steps", "12", "--save-every", "2")[0] == 0
    return step_losses(run)


# what loses data


def test_training_into_an_existing_run_is_refused_unless_overwrite(tmp_path, capsys):
    run = tmp_path / "run"
    assert train_cli(run, "--max-steps", "4", capsys=capsys)[0] == 0
    before = snapshot(run)
    code, out = train_cli(run, "--max-steps", "4", capsys=capsys)
    assert code == 2
    assert "already holds a run" in out.err and "--resume auto" in out.err and "--overwrite" in out.err
    assert snapshot(run) == before  # final/, metrics.jsonl and the checkpoints untouched
    code, _ = train_cli(run, "--max-steps", "6", "--overwrite", capsys=capsys)
    assert code == 0
    assert [r["step"] for r in metrics(run) if "loss" in r] == [1, 2, 3, 4, 5, 6]  # one run, not two appended


def test_backup_pruning_keeps_other_folders_the_newest_and_the_best(tmp_path):
    target = FolderTarget(tmp_path / "drive")
    for name in ("final", "my-notes", "zz-user-folder"):
        (tmp_path / "drive" / name).mkdir(parents=True)
        (tmp_path / "drive" / name / "file.txt").write_text(name)
    manager = BackupManager(target, keep=2, backoff=0.0)
    for step in (2, 4, 6, 8, 10):
        source = tmp_path / "local" / checkpoint_name(step)
        source.mkdir(parents=True)
        (source / "weights.bin").write_bytes(bytes([step]) * 100)
        assert manager.backup(source, keep_step=4).ok
    assert target.names() == ["ckpt-0000004", "ckpt-0000008", "ckpt-0000010", "final", "my-notes",
                              "zz-user-folder"]


def test_the_best_model_is_kept_whatever_save_every_is_and_backed_up(tmp_path, data):
    """Quick STS every 2 steps, checkpoints every 3: the best step is not a save step, yet best/ holds it,
    and the next backup copies best/ too."""
    tokenizer, triplets = data
    scores = iter([0.10, 0.50, 0.20, 0.30])  # best at the 2nd evaluation, step 4

    def eval_fn(model, tok):
        return {"sts": next(scores)}

    trainer = Trainer(tiny(eval_every=2, save_every=3, backup_every=6), output_dir=tmp_path / "run", eval_fn=eval_fn,
                      tokenizer=tokenizer, triplets=triplets, show_progress=False, backup=str(tmp_path / "drive"),
                      keep_checkpoints=1)
    snapshots = {}
    trainer.callbacks.append(lambda r: snapshots.__setitem__(r["step"], {
        k: v.clone() for k, v in trainer.accelerator.unwrap_model(trainer.model).state_dict().items()}))
    trainer.train()
    assert trainer.state.best_step == 4 and 4 % 3 != 0
    best = tmp_path / "run" / "best"
    assert verify_folder(best) is None and json.loads((best / "best.json").read_text())["step"] == 4
    saved = NSAModel.from_pretrained(best).state_dict()
    trained = snapshots[4]
    assert set(trained) <= set(saved) and all(torch.equal(saved[k], trained[k]) for k in trained)  # step 4 exactly
    assert {k for k in saved if k not in trained} == {"ood.center", "ood.whiten", "ood.calibration"}  # + its detector
    assert "best" in FolderTarget(tmp_path / "drive").names()
    assert verify_folder(tmp_path / "drive" / "best") is None


def test_second_writer_gets_a_clear_message_and_a_dead_holder_is_taken_over(tmp_path):
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; sys.path.insert(0, '.');"
                               "from nsa_lib.runfolder import RunLock; lock = RunLock(sys.argv[1]); lock.acquire(); "
                               "print('locked', flush=True); time.sleep(60)", str(run)],
                              stdout=subprocess.PIPE, text=True, cwd=str(_root()))
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunFolderBusy, match=f"process {holder.pid} on "):
            RunLock(run).acquire()
    finally:
        holder.kill()
        holder.wait()
    lock = RunLock(run)  # the holder died with the lock: taken over
    lock.acquire()
    assert lock.held and json.loads((run / ".nsa-lock").read_text())["pid"] != holder.pid
    lock.release()


def _root():
    from pathlib import Path

    return Path(__file__).resolve().parents[1]


# what leaves a run stuck


@pytest.mark.parametrize("damage", ["truncate model.safetensors", "truncate trainer_state.pt",
                                    "delete model.safetensors"])
def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, capsys, caplog, reference, damage):
    run = tmp_path / "run"
    assert train_cli(run, "--max-steps", "12", "--save-every", "2", capsys=capsys)[0] == 0
    newest = list_checkpoints(run)[-1]
    assert newest.name == checkpoint_name(12)
    action, name = damage.split()
    if action == "truncate":
        with open(newest / name, "r+b") as f:
            f.truncate((newest / name).stat().st_size // 2)
    else:
        (newest / name).unlink()
    code, out = train_cli(run, "--resume", "auto", "--max-steps", "12", "--save-every", "2", capsys=capsys)
    assert code == 0, out.err
    assert "resuming at step 10" in out.out
    assert f"skipping the checkpoint {newest}: {name}" in caplog.text
    assert step_losses(run) == reference  # exactly the uninterrupted run's losses


def test_restore_killed_half_way_is_not_taken_for_a_checkpoint(tmp_path, capsys, reference):
    """A fresh runtime restores from the backup; what a kill during the copy leaves (a partial temporary
    folder) is ignored, and the next resume restores the backup whole."""
    run, drive = tmp_path / "run", tmp_path / "drive"
    assert train_cli(run, "--max-steps", "12", "--save-every", "2", "--backup-every", "4", "--backup-dir",
                     str(drive), capsys=capsys)[0] == 0
    shutil.rmtree(drive / "ckpt-0000012")  # as if the runtime had died before its last backup
    fresh = tmp_path / "fresh"
    partial = fresh / "checkpoints" / ".restore-ckpt-0000008"
    shutil.copytree(drive / "ckpt-0000008", partial)
    with open(partial / "model.safetensors", "r+b") as f:
        f.truncate(1000)
    (partial / "trainer_state.pt").unlink()
    code, out = train_cli(fresh, "--resume", "auto", "--backup-dir", str(drive), "--max-steps", "12",
                          "--save-every", "2", capsys=capsys)
    assert code == 0, out.err
    assert "resuming at step 8" in out.out
    assert not partial.exists()
    assert all(step_losses(fresh)[s] == reference[s] for s in range(9, 13))


def test_resume_into_an_empty_folder_takes_the_backups_config(tmp_path, capsys):
    """The README's way to continue on a new runtime: no --size. The run is tiny; the default preset
    (M456) must be neither built nor written."""
    run, drive = tmp_path / "run", tmp_path / "drive"
    assert train_cli(run, "--max-steps", "4", "--save-every", "2", "--backup-every", "4", "--backup-dir",
                     str(drive), capsys=capsys)[0] == 0
    fresh = tmp_path / "fresh"
    code = main(["train", "--output-dir", str(fresh), "--backup-dir", str(drive), "--resume", "auto",
                 "--max-steps", "6", "--no-final-eval"])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "Spectra-NSA tiny" in out.out and "resuming at step 4" in out.out
    assert json.loads((fresh / "config.json").read_text())["size"] == "tiny"


def test_flags_that_disagree_with_the_run_are_refused_before_anything_is_written(tmp_path, capsys):
    run = tmp_path / "run"
    assert train_cli(run, "--max-steps", "4", "--save-every", "2", capsys=capsys)[0] == 0
    before = snapshot(run)
    ckpt = list_checkpoints(run)[-1]
    code = main(["train", "--output-dir", str(run), "--resume", str(ckpt), "--size", "mini", "--no-final-eval"])
    err = capsys.readouterr().err
    assert code == 2 and "size: the run has 'tiny', asked for 'mini'" in err
    code = main(["train", "--output-dir", str(run), "--resume", "auto", "--size", "mini", "--max-steps", "12",
                 "--lr", "0.5", "--no-final-eval"])
    err = capsys.readouterr().err
    assert code == 2 and "size: the run has 'tiny'" in err and "lr: the run has 0.001, asked for 0.5" in err
    assert snapshot(run) == before  # config.json (and everything else) unchanged


def test_flags_that_may_change_on_resume_are_applied(tmp_path, capsys, caplog):
    run = tmp_path / "run"
    assert train_cli(run, "--max-steps", "4", "--save-every", "2", capsys=capsys)[0] == 0
    code = main(["train", "--output-dir", str(run), "--resume", "auto", "--max-steps", "9", "--save-every", "3",
                 "--no-final-eval"])
    assert code == 0
    assert "resuming with max_steps=9 (the run had 4)" in caplog.text
    config = json.loads((run / "config.json").read_text())
    assert (config["max_steps"], config["save_every"]) == (9, 3)
    assert [c.name for c in list_checkpoints(run)][-2:] == [checkpoint_name(6), checkpoint_name(9)]
    assert max(step_losses(run)) == 9


# a full backup disk (a real one: a 40 MiB tmpfs, which root can mount; a checkpoint of `tiny` is ~27 MiB)


@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "small-disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=False)


def test_full_backup_disk_leaves_no_partial_copy_and_is_reported(tmp_path, small_disk, capsys):
    filler = small_disk / "other-data.bin"  # the disk is nearly full before the run starts
    filler.write_bytes(b"\0" * (30 << 20))
    run = tmp_path / "run"
    code, out = train_cli(run, "--max-steps", "4", "--save-every", "2", "--backup-every", "2", "--backup-dir",
                          str(small_disk / "backups"), capsys=capsys)
    assert code == 0
    assert "backups: 0 ok, 2 failed" in out.out and "No space left on device" in out.out
    assert not any(p.name.endswith(".tmp") for p in (small_disk / "backups").iterdir())
    filler.unlink()  # space again: the next backup succeeds, nothing of the failed ones in its way
    tiny_folder = tmp_path / checkpoint_name(99)
    tiny_folder.mkdir()
    (tiny_folder / "a.bin").write_bytes(b"x" * 1000)
    assert BackupManager(FolderTarget(small_disk / "backups"), backoff=0.0).backup(tiny_folder).ok
    records = [r for r in metrics(run) if "backup" in r]
    assert [r["backup"]["ok"] for r in records] == [False, False]
    assert "free, the backup ckpt-0000002 needs" in records[0]["backup"]["space_warning"]  # said before trying


# what crashes instead of skipping


def test_huge_learning_rate_stops_with_a_message_after_three_non_finite_losses(tmp_path, capsys):
    run = tmp_path / "run"
    code, out = train_cli(run, "--max-steps", "30", "--lr", "1e6", capsys=capsys)
    assert code == 2
    assert "3 optimizer steps in a row had a non-finite loss" in out.err and "lower --lr" in out.err
    assert "Traceback" not in out.err
    steps = [r for r in metrics(run) if "loss" in r]
    assert [r["skipped"] for r in steps[-3:]] == [True, True, True]
    assert any("non-finite embeddings" in w for r in steps for w in r["warnings"])


def test_trainer_raises_training_stopped(tmp_path, data):
    tokenizer, triplets = data
    trainer = Trainer(tiny(lr=1e6, max_steps=30), output_dir=tmp_path / "run", tokenizer=tokenizer,
                      triplets=triplets, show_progress=False)
    with pytest.raises(TrainingStopped):
        trainer.train()
    assert trainer.state.skipped == 3 and not trainer.lock.held


# what gets a message instead of a traceback


def _one_line_error(capsys, argv) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and err.startswith("error: ") and err.count("\n") == 1, err
    return err


def test_output_dir_that_is_a_file(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    err = _one_line_error(capsys, ["train", "--output-dir", str(tmp_path / "f"), *SMALL])
    assert "is a file" in err and str(tmp_path / "f") in err


def test_data_that_is_a_directory(tmp_path, capsys):
    err = _one_line_error(capsys, ["train", "--output-dir", str(tmp_path / "run"), "--data", str(tmp_path), *SMALL])
    assert "is a directory" in err


@pytest.mark.parametrize("flag, value, field", [("--epochs", "0", "epochs"), ("--save-every", "-1", "save_every"),
                                                ("--max-train-samples", "0", "max_train_samples")])
def test_bad_numbers_are_named(tmp_path, capsys, flag, value, field):
    err = _one_line_error(capsys, ["train", "--output-dir", str(tmp_path / "run"), "--size", "tiny", flag, value])
    assert field in err
    assert not (tmp_path / "run" / "final").exists()


def test_corrupt_parquet_and_long_csv_fields(tmp_path, capsys):
    (tmp_path / "t.parquet").write_bytes(b"PAR1 not really parquet")
    err = _one_line_error(capsys, ["train", "--output-dir", str(tmp_path / "run"), "--data",
                                   str(tmp_path / "t.parquet"), *SMALL])
    assert "t.parquet" in err and "parquet" in err


def test_malformed_service_account_key(tmp_path, monkeypatch):
    key = tmp_path / "key.json"
    key.write_text(json.dumps({"type": "service_account", "client_email": "a@b.iam.gserviceaccount.com",
                               "private_key": "-----BEGIN PRIVATE KEY-----\nnot base64!\n-----END PRIVATE KEY-----\n",
                               "private_key_id": "1", "client_id": "1", "token_uri": "https://oauth2.googleapis.com/token"}))
    monkeypatch.setenv("NSA_GDRIVE_KEY", str(key))
    with pytest.raises(BackupError, match="service-account key .*key.json was refused") as err:
        backup_target("gdrive:folder123")
    assert "\n" not in str(err.value)
    key.write_text("{not json")
    with pytest.raises(BackupError, match="is not a JSON service-account key"):
        backup_target("gdrive:folder123")


def test_manifest_detects_every_kind_of_damage(tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "a.bin").write_bytes(b"a" * 100)
    (folder / "b.bin").write_bytes(b"b" * 50)
    assert "no manifest.json" in verify_folder(folder)
    write_manifest(folder)
    assert verify_folder(folder) is None
    (folder / "a.bin").write_bytes(b"a" * 99)
    assert "a.bin has 99 bytes" in verify_folder(folder)
    (folder / "a.bin").write_bytes(b"A" * 100)
    assert "a.bin does not match its sha256" in verify_folder(folder)
    (folder / "a.bin").unlink()
    assert verify_folder(folder) == "a.bin is missing"
    (folder / MANIFEST_FILE).write_text("{")
    assert "unreadable" in verify_folder(folder)


def test_lock_without_flock_decides_from_the_recorded_holder(tmp_path, monkeypatch, caplog):
    """A filesystem that refuses flock (as a FUSE mount of Drive may; it cannot be reached here, so flock's
    refusal is what is stood in for): a live holder on this machine still blocks, a dead one or one on
    another machine (a Colab runtime before a reconnect) is taken over."""
    import errno
    import fcntl
    import os
    import socket

    def refuse(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", refuse)
    run = tmp_path / "run"
    run.mkdir()
    lock_file = run / ".nsa-lock"
    lock_file.write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname(), "since": "earlier"}))
    with pytest.raises(RunFolderBusy, match=f"process {os.getppid()} on {socket.gethostname()}"):
        RunLock(run).acquire()
    lock_file.write_text(json.dumps({"pid": 1234567, "host": "a-colab-runtime-gone", "since": "earlier"}))
    lock = RunLock(run)
    lock.acquire()
    assert lock.held and "on another machine; taking it over" in caplog.text
    assert json.loads(lock_file.read_text())["pid"] == os.getpid()
    lock.release()


def test_a_rerun_of_the_training_cell_frees_the_previous_trainer(tmp_path, data):
    """02_train's rerun: while a trainer lives, a second one on its folder is refused (one writer, even in
    one process); after `close()` the run folder and the model's memory are released and a new one resumes."""
    tokenizer, triplets = data
    first = Trainer(tiny(max_steps=4), output_dir=tmp_path / "run", tokenizer=tokenizer, triplets=triplets,
                    show_progress=False)
    with pytest.raises(RunFolderBusy):
        Trainer(tiny(max_steps=4), output_dir=tmp_path / "run", resume="auto", tokenizer=tokenizer,
                triplets=triplets, show_progress=False)
    first.close()
    assert not first.lock.held and not hasattr(first, "model") and not hasattr(first, "optimizer")
    second = Trainer(tiny(max_steps=4), output_dir=tmp_path / "run", resume="auto", tokenizer=tokenizer,
                     triplets=triplets, show_progress=False)
    assert second.train().step == 4
