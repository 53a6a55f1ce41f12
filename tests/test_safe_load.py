"""No file from outside runs code: every loader of a `torch.save` file refuses a pickle that names a
function, and the function never runs.

The malicious payload's `__reduce__` makes unpickling call `open(marker, "w")`, which creates the marker
file: if any loader unpickled it, the marker would exist. Checked for `load_torch_file`,
`load_seed_checkpoint`, a trainer resuming from a local checkpoint, the command line, and a resume that
fetches its checkpoint from a backup (a folder, and Google Drive through PyDrive2 against the localhost
stand-in of tests/drive_standin.py, since Google's servers cannot be reached here).
"""
import shutil

import numpy as np
import pytest
import torch

from nsa_lib import NSAConfig, load_seed_checkpoint
from nsa_lib.backup import BackupManager, FolderTarget
from nsa_lib.cli import main
from nsa_lib.data import load_snli_triplets, load_tokenizer
from nsa_lib.safe_load import UnsafeFileError, load_torch_file
from nsa_lib.runfolder import write_manifest
from nsa_lib.trainer import STATE_FILE, Trainer, list_checkpoints

from .drive_standin import DriveStandIn
from .test_backup import drive_target
from .test_seed_checkpoint import assert_matches_literal, original_checkpoint


class CreatesMarker:
    """Unpickling this calls open(marker, "w"): the marker file appears if the pickle is ever run."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def malicious_checkpoint(tmp_path, name="evil.pt"):
    """An original-format checkpoint with the payload hidden among its entries."""
    marker = tmp_path / f"{name}.ran"
    ckpt = original_checkpoint()
    ckpt["lr_sched"] = {"last_epoch": 3, "hook": CreatesMarker(marker)}
    path = tmp_path / name
    torch.save(ckpt, path)
    assert not marker.exists()
    return path, marker


@pytest.fixture(scope="module")
def data():
    return load_tokenizer(source="offline"), load_snli_triplets("train")[:300]


def tiny_config(**overrides):
    return NSAConfig.from_preset("tiny", **{**dict(batch_train=8, grad_accum=1, max_steps=4, save_every=2,
                                                   eval_every=0, max_length=32), **overrides})


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, data):
    tokenizer, triplets = data
    run = tmp_path_factory.mktemp("run")
    Trainer(tiny_config(), output_dir=run, tokenizer=tokenizer, triplets=triplets, show_progress=False).train()
    return run


def poisoned_copy(trained_run, where, step=99):
    """A copy of the run's newest checkpoint as ckpt-<step>, its trainer_state.pt replaced by the payload
    (inside an otherwise ordinary state dict) and its manifest rewritten to match, as an attacker would.
    Returns (checkpoint folder, marker)."""
    ckpt = where / f"ckpt-{step:07d}"
    shutil.copytree(list_checkpoints(trained_run)[-1], ckpt)
    marker = where / "state.ran"
    torch.save({"state": {"step": step}, "rng": CreatesMarker(marker)}, ckpt / STATE_FILE)
    write_manifest(ckpt)
    return ckpt, marker


# the loaders


def test_load_torch_file_refuses_and_names_the_type(tmp_path):
    path, marker = malicious_checkpoint(tmp_path)
    with pytest.raises(UnsafeFileError, match=r"io\.open") as err:
        load_torch_file(path)
    assert "never unpickles a file in full" in str(err.value) and "re-save" in str(err.value)
    assert not marker.exists()


def test_load_seed_checkpoint_refuses(tmp_path):
    path, marker = malicious_checkpoint(tmp_path)
    with pytest.raises(UnsafeFileError, match="never unpickles"):
        load_seed_checkpoint(path)
    assert not marker.exists()


def test_there_is_no_way_to_unpickle_in_full(tmp_path):
    """No option of the loaders unpickles a refused file: not load_torch_file, not load_seed_checkpoint."""
    path, marker = malicious_checkpoint(tmp_path)
    with pytest.raises(TypeError):
        load_torch_file(path, trust_pickle=True)  # no such option
    with pytest.raises(UnsafeFileError):  # here it is only an (unknown) config override: the file is refused first
        load_seed_checkpoint(path, trust_pickle=True)
    assert not marker.exists()


def test_the_originals_numpy_state_loads_without_trust(tmp_path):
    """A real original checkpoint holds numpy's RNG state (an ndarray) and numpy scalars: allowed types."""
    ckpt = original_checkpoint()
    ckpt["best_sts"] = np.float64(0.61)
    ckpt["rng_state"]["numpy_float"] = np.float32(0.5)
    torch.save(ckpt, tmp_path / "c.pt")
    loaded = load_torch_file(tmp_path / "c.pt")
    assert isinstance(loaded["rng_state"]["numpy"][1], np.ndarray) and loaded["best_sts"] == 0.61
    assert_matches_literal(load_seed_checkpoint(tmp_path / "c.pt"), ckpt["model"], ckpt["cfg"])


def test_trainer_state_loads_weights_only_without_any_allowlist(trained_run):
    state = torch.load(list_checkpoints(trained_run)[-1] / STATE_FILE, map_location="cpu", weights_only=True)
    assert set(state["rng"]) >= {"python", "numpy", "torch"} and state["state"]["step"] == 4


def test_resume_from_a_poisoned_checkpoint_refuses(tmp_path, trained_run, data):
    tokenizer, triplets = data
    ckpt, marker = poisoned_copy(trained_run, tmp_path)
    with pytest.raises(UnsafeFileError, match="trainer state"):
        Trainer(tiny_config(), output_dir=tmp_path / "run", resume=str(ckpt), tokenizer=tokenizer,
                triplets=triplets, show_progress=False)
    assert not marker.exists()


def test_cli_resume_auto_refuses(tmp_path, trained_run, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    _, marker = poisoned_copy(trained_run, run / "checkpoints")
    code = main(["train", "--size", "tiny", "--output-dir", str(run), "--resume", "auto", "--max-steps", "6",
                 "--no-final-eval"])
    assert code == 2
    assert "never unpickles" in capsys.readouterr().err
    assert not marker.exists()


@pytest.mark.parametrize("kind", ["folder", "drive"])
def test_resume_from_a_poisoned_backup_refuses(tmp_path, trained_run, data, kind):
    """A fresh runtime resuming from backups (a shared Drive folder) that hold a poisoned checkpoint."""
    tokenizer, triplets = data
    ckpt, marker = poisoned_copy(trained_run, tmp_path)
    with DriveStandIn() as standin:
        target = drive_target(standin) if kind == "drive" else FolderTarget(tmp_path / "backups")
        assert BackupManager(target, backoff=0.0).backup(ckpt).ok
        with pytest.raises(UnsafeFileError):
            Trainer(tiny_config(), output_dir=tmp_path / "fresh", resume="auto", tokenizer=tokenizer,
                    triplets=triplets, show_progress=False, backup=target)
    assert (tmp_path / "fresh" / "checkpoints" / ckpt.name / STATE_FILE).is_file()  # it was fetched, then refused
    assert not marker.exists()


def test_every_torch_load_in_nsa_lib_is_weights_only():
    """Read from the source: each `torch.load(...)` call in nsa_lib passes `weights_only=True`."""
    import ast
    from pathlib import Path

    import nsa_lib

    calls = []
    for path in sorted(Path(nsa_lib.__file__).parent.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load" \
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch":
                flag = {k.arg: k.value for k in node.keywords}.get("weights_only")
                calls.append((path.name, node.lineno, isinstance(flag, ast.Constant) and flag.value is True))
    assert calls and all(ok for _, _, ok in calls), calls
