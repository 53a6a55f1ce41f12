"""Checkpoint backups to a folder and to Google Drive through PyDrive2's own code. Google's servers cannot be
reached here, so the Drive tests run against a stand-in for the Drive v2 API on localhost
(tests/drive_standin.py); nothing of ours is mocked."""
import hashlib
import json
import shutil

import pytest
from oauth2client.client import AccessTokenCredentials
from pydrive2.auth import GoogleAuth

from nsa_lib import NSAConfig, NSAModel
from nsa_lib.backup import BackupError, BackupManager, DriveTarget, FolderTarget, _drive, backup_target, file_digest
from nsa_lib.data import load_snli_triplets, load_tokenizer
from nsa_lib.trainer import Trainer, list_checkpoints

from .drive_standin import FOLDER, DriveStandIn


@pytest.fixture(scope="module")
def data():
    return load_tokenizer(source="offline"), load_snli_triplets("train")[:600]


def config(**overrides):
    return NSAConfig.from_preset("tiny", **{**dict(batch_train=8, grad_accum=1, max_steps=12, save_every=2,
                                                   backup_every=4, eval_every=0, max_length=32), **overrides})


def train(tmp_path, data, target, name="run", **kw):
    tokenizer, triplets = data
    trainer = Trainer(config(), output_dir=tmp_path / name, tokenizer=tokenizer, triplets=triplets,
                      show_progress=False, backup=target, **kw)
    trainer.backups.backoff = 0.0
    trainer.train()
    return trainer


def backup_records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"backup"' in line]


def drive_target(standin) -> DriveTarget:
    auth = GoogleAuth()
    auth.credentials = AccessTokenCredentials("stand-in-token", "nsa-tests")  # sent as a Bearer header
    root = standin.new_file({"title": "nsa-backups", "mimeType": FOLDER})
    return DriveTarget(_drive(auth, standin.endpoint), root["id"])


def test_folder_backups_hold_steps_4_8_12_verified(tmp_path, data):
    trainer = train(tmp_path, data, str(tmp_path / "drive"))
    target = FolderTarget(tmp_path / "drive")
    assert target.names() == ["ckpt-0000004", "ckpt-0000008", "ckpt-0000012"]
    assert [r["backup"]["ok"] for r in backup_records(tmp_path / "run")] == [True, True, True]
    local = {c.name: c for c in list_checkpoints(trainer.output_dir)}
    for name in ("ckpt-0000008", "ckpt-0000012"):
        for f in sorted(local[name].iterdir()):
            assert file_digest(tmp_path / "drive" / name / f.name) == file_digest(f)
    NSAModel.from_pretrained(tmp_path / "drive" / "ckpt-0000004")  # the pruned-locally one still loads
    assert not list((tmp_path / "drive").glob("*.tmp"))


def test_drive_backups_through_pydrive2(tmp_path, data):
    with DriveStandIn() as standin:
        target = drive_target(standin)
        trainer = train(tmp_path, data, target)
        assert target.names() == ["ckpt-0000004", "ckpt-0000008", "ckpt-0000012"]
        titles = {r["title"] for r in standin.files.values()}
        assert not any(t.endswith(".tmp") for t in titles)
        newest = list_checkpoints(trainer.output_dir)[-1]
        folder = next(r for r in standin.files.values() if r["title"] == newest.name)
        stored = {r["title"]: standin.content[r["id"]] for r in standin.files.values()
                  if any(p["id"] == folder["id"] for p in r["parents"])}
        assert sorted(stored) == sorted(f.name for f in newest.iterdir())
        for f in newest.iterdir():
            assert hashlib.md5(stored[f.name]).hexdigest() == file_digest(f, "md5")
        assert any(r.startswith("PUT /upload/session/") for r in standin.requests)  # resumable uploads
        assert any(r.startswith("PATCH ") for r in standin.requests)  # the .tmp -> final rename


def small_checkpoint(tmp_path, size: int):
    """A checkpoint-named folder holding one file of `size` bytes."""
    source = tmp_path / "ckpt-0000001"
    source.mkdir()
    (source / "a.bin").write_bytes(b"abc" * (size // 3))
    return source


def test_failed_upload_is_retried(tmp_path):
    source = small_checkpoint(tmp_path, 300)
    with DriveStandIn() as standin:
        target = drive_target(standin)
        standin.fail_uploads = 1
        result = BackupManager(target, backoff=0.0).backup(source)
        assert result.ok and result.attempts == 2
        assert target.names() == ["ckpt-0000001"]


def test_failing_backup_is_reported_and_training_goes_on(tmp_path, data):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the backup folder should be")
    trainer = train(tmp_path, data, str(blocker / "backups"))
    assert trainer.state.step == 12
    records = backup_records(tmp_path / "run")
    assert [r["backup"]["ok"] for r in records] == [False, False, False]
    assert all(r["backup"]["attempts"] == 3 and r["backup"]["error"] for r in records)


def test_pruning_keeps_the_newest(tmp_path, data):
    train(tmp_path, data, str(tmp_path / "drive"), backup_keep=2)
    assert FolderTarget(tmp_path / "drive").names() == ["ckpt-0000008", "ckpt-0000012"]


@pytest.mark.parametrize("kind", ["folder", "drive"])
def test_resume_auto_from_the_backup_on_a_fresh_runtime(tmp_path, data, kind):
    tokenizer, triplets = data
    with DriveStandIn() as standin:
        target = drive_target(standin) if kind == "drive" else FolderTarget(tmp_path / "drive")
        train(tmp_path, data, target)
        shutil.rmtree(tmp_path / "run")  # a new Colab runtime: the local disk is empty
        resumed = Trainer(config(max_steps=14), output_dir=tmp_path / "run", resume="auto", tokenizer=tokenizer,
                          triplets=triplets, show_progress=False, backup=target)
        assert resumed.state.step == 12
        resumed.train()
        assert resumed.state.step == 14


def test_gdrive_target_without_credentials_says_how():
    with pytest.raises(BackupError, match="NSA_GDRIVE_KEY"):
        backup_target("gdrive:abc123")


def test_short_drive_quota_is_warned_before_the_backup_and_the_size_reported(tmp_path):
    source = small_checkpoint(tmp_path, 3000)
    with DriveStandIn() as standin:
        target = drive_target(standin)
        standin.quota_bytes = 10_000  # 3,000 bytes to copy: enough
        first = BackupManager(target, backoff=0.0).backup(source)
        assert first.ok and first.bytes == 3000 and first.space_warning is None
        standin.quota_bytes = 4_000  # 3,000 used, 3,000 more needed: short
        second = BackupManager(target, backoff=0.0).backup(source, name="ckpt-0000002")
    assert "has 1000 B free, the backup ckpt-0000002 needs 2.9 KiB" in second.space_warning
    assert second.ok  # warned, and still tried (the stand-in, like Drive near its quota, does not refuse at once)


def test_folder_target_reports_free_space(tmp_path):
    import shutil as sh

    target = FolderTarget(tmp_path / "not" / "yet" / "there")  # measured on the nearest existing parent
    assert abs(target.free_bytes() - sh.disk_usage(tmp_path).free) < 100 * 2**20
