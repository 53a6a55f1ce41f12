"""The run folder: its layout, checkpoints that prove they are whole, and one writer at a time.

    <output_dir>/
        .nsa-lock           held by the process that writes this run (see RunLock)
        config.json         the run's NSAConfig
        metrics.jsonl       one line per optimizer step, evaluation and backup
        checkpoints/ckpt-0000500/   config.json, model.safetensors, trainer_state.pt, manifest.json
        best/               the model of the best quick STS so far (config.json, model.safetensors, manifest.json)
        final/              the model at the end of training

Every checkpoint (and best/, final/) ends with `manifest.json`, the size and sha256 of each of its files,
written last: `verify_folder` says whether a folder is whole (a truncated or missing file, e.g. from a
full disk or a partial copy, fails it) and why not. Folders are written under a temporary name and
renamed, so a folder without the temporary suffix was complete when it was written.

`RunLock` is an exclusive `flock` on `.nsa-lock`: the kernel drops it when its process dies, even under
`kill -9`, so a lock left by a dead process is simply taken over; a live holder is named in the error.

Not handled here: locking across machines (two Colab runtimes writing one Drive folder at once); `flock`
is local to a machine, and where a filesystem refuses it the lock falls back to the recorded pid, which
can only be checked on the same machine (a holder on another machine is taken over, with a warning, so
that a reconnected runtime is never locked out of its own run).
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import socket
import time
from pathlib import Path

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "ckpt-"
STATE_FILE = "trainer_state.pt"
MANIFEST_FILE = "manifest.json"
LOCK_FILE = ".nsa-lock"
RUN_ENTRIES = ("config.json", "metrics.jsonl", "checkpoints", "best", "final")  # what a run writes


class RunFolderBusy(RuntimeError):
    """Another live process holds the run folder's lock."""


class RunFolderExists(RuntimeError):
    """The output folder already holds a run and neither resume nor overwrite was asked for."""


# checkpoint names


def checkpoint_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step:07d}"


def checkpoint_step(name: str) -> int:
    """The optimizer step of a checkpoint folder name, ckpt-0000500 -> 500."""
    return int(name[len(CHECKPOINT_PREFIX):])


def is_checkpoint_name(name: str) -> bool:
    """ckpt-<digits> exactly: not a temporary, restored or user folder."""
    digits = name[len(CHECKPOINT_PREFIX):]
    return name.startswith(CHECKPOINT_PREFIX) and digits.isdigit()


# manifests


def file_digest(path: Path, algorithm: str = "sha256") -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(folder: Path) -> None:
    """Record the size and sha256 of every file of `folder` in its manifest.json (written last, atomically)."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name not in (MANIFEST_FILE, MANIFEST_FILE + ".tmp"))
    manifest = {"files": {p.name: {"size": p.stat().st_size, "sha256": file_digest(p)} for p in files}}
    tmp = folder / (MANIFEST_FILE + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(tmp, folder / MANIFEST_FILE)


def verify_folder(folder: Path, *, hashes: bool = True) -> str | None:
    """None if `folder` matches its manifest, else the reason it does not (missing manifest, a missing,
    truncated or altered file). `hashes=False` checks sizes only (cheap)."""
    path = folder / MANIFEST_FILE
    if not path.is_file():
        return f"it has no {MANIFEST_FILE} (an incomplete copy, or written before manifests existed)"
    try:
        files = json.loads(path.read_text())["files"]
    except (ValueError, KeyError, TypeError) as e:
        return f"its {MANIFEST_FILE} is unreadable ({type(e).__name__})"
    for name, expected in files.items():
        f = folder / name
        if not f.is_file():
            return f"{name} is missing"
        size = f.stat().st_size
        if size != expected["size"]:
            return f"{name} has {size:,} bytes, its manifest says {expected['size']:,} (truncated or altered)"
        if hashes and file_digest(f) != expected["sha256"]:
            return f"{name} does not match its sha256 in the manifest (altered or corrupt)"
    return None


def list_checkpoints(folder: str | Path) -> list[Path]:
    """Checkpoint folders under `folder` (a run folder or its checkpoints/), oldest first: named
    ckpt-<step>, with a manifest (or, written before manifests, a model and a trainer state). Whether they
    are whole is `checkpoint_problem`'s question."""
    folder = Path(folder)
    if (folder / "checkpoints").is_dir():
        folder = folder / "checkpoints"
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and is_checkpoint_name(p.name) and (
        (p / MANIFEST_FILE).is_file() or ((p / STATE_FILE).is_file() and (p / "model.safetensors").is_file()))]
    return sorted(found, key=lambda p: checkpoint_step(p.name))


def replace_folder(staged: Path, final: Path) -> None:
    """Put the complete folder `staged` at `final`, replacing what is there, so that `final` is never a mix
    of old and new files: the old one is moved aside first and removed last."""
    old = final.with_name(final.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(staged, final)
    shutil.rmtree(old, ignore_errors=True)


def write_folder(final: Path, fill) -> Path:
    """Write a folder whole or not at all: `fill(tmp)` writes the files into `<final>.tmp`, the manifest is
    written last, and the folder is swapped in at `final` (`replace_folder`). A failed write (a full disk,
    an interrupt) removes the partial folder and re-raises."""
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        fill(tmp)
        write_manifest(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_folder(tmp, final)
    return final


def remove_folder(folder: Path) -> None:
    """Delete `folder` so that it stops being a checkpoint at once: renamed to `<name>.old` first (one
    atomic step), then deleted. A process killed half-way through a plain rmtree would leave a
    checkpoint-named folder with some files gone."""
    old = folder.with_name(folder.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        os.replace(folder, old)
    shutil.rmtree(old, ignore_errors=True)


# the run folder


def previous_run(output_dir: Path, checkpoint_dir: Path) -> list[str]:
    """What an earlier run left in `output_dir` and its `checkpoint_dir` (empty if nothing)."""
    found = [entry + ("/" if (output_dir / entry).is_dir() else "") for entry in RUN_ENTRIES
             if entry not in ("config.json", "checkpoints") and (output_dir / entry).exists()]
    checkpoints = list_checkpoints(checkpoint_dir)
    if checkpoints:
        found.append(f"{len(checkpoints)} checkpoint(s) in {checkpoint_dir}")
    return found


def clear_run(output_dir: Path, checkpoint_dir: Path) -> None:
    """Remove what a run writes (RUN_ENTRIES, and its checkpoint folder) and nothing else of the folder."""
    for path in [output_dir / entry for entry in RUN_ENTRIES] + [checkpoint_dir]:
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


class RunLock:
    """An exclusive lock on a run folder, held from `acquire()` to `release()` (or the process's end).

    The lock is `flock` on `<folder>/.nsa-lock`, which also records the holder's pid, host and start time
    for the message a second writer gets. A process killed while holding it leaves the file but not the
    lock; the next writer takes it over (and says so).
    """

    def __init__(self, folder: str | Path):
        self.path = Path(folder) / LOCK_FILE
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        if self._fd is not None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        previous = os.read(fd, 4096).decode("utf-8", "replace").strip()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunFolderBusy(self._busy_message(previous)) from None
        except OSError as e:  # a filesystem without flock: decide from the recorded pid
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                os.close(fd)
                raise
            if _holder_alive(previous):
                os.close(fd)
                raise RunFolderBusy(self._busy_message(previous)) from None
        if previous:
            logger.warning("%s: taking over the lock left by %s, which is no longer running", self.path.parent,
                           previous)
        holder = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                             "since": time.strftime("%Y-%m-%d %H:%M:%S")})
        os.ftruncate(fd, 0)
        os.pwrite(fd, holder.encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)  # an empty file: nobody to take over from
        finally:
            os.close(fd)  # closing the descriptor drops the flock

    def _busy_message(self, holder: str) -> str:
        try:
            who = json.loads(holder)
            who = f"process {who['pid']} on {who['host']} (since {who['since']})"
        except (ValueError, KeyError, TypeError):
            who = "another process"
        return (f"{self.path.parent} is being written by {who}: one run folder takes one writer. Wait for "
                f"it to finish or stop it, or train into another --output-dir.")

    def __del__(self):
        self.release()


def _holder_alive(holder: str) -> bool:
    try:
        who = json.loads(holder)
    except ValueError:
        return False
    if not isinstance(who, dict) or not who:
        return False
    if who.get("host") != socket.gethostname():
        # another machine (a Colab runtime before a reconnect, on a Drive folder without flock): its process
        # cannot be checked from here; refusing would leave the run stuck for good, so it is taken over
        logger.warning("the run folder's lock was held by %s on another machine; taking it over", who)
        return False
    try:
        os.kill(int(who["pid"]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# resuming


class CheckpointCorrupt(ValueError):
    """A checkpoint asked for by path does not match its manifest."""


def checkpoint_problem(folder: Path) -> str | None:
    """Why the checkpoint `folder` cannot be resumed from, or None. A checkpoint written before manifests
    existed is taken as it is (its files are there; nothing more can be checked)."""
    for name in (STATE_FILE, "model.safetensors", "config.json"):
        if not (folder / name).is_file():
            return f"{name} is missing"
    if not (folder / MANIFEST_FILE).is_file():
        logger.info("%s has no %s (written before manifests existed): taken unverified", folder, MANIFEST_FILE)
        return None
    return verify_folder(folder)


def restore_backup(target, name: str, checkpoints_dir: Path) -> Path | None:
    """Copy backup `name` from `target` into `checkpoints_dir/name`: downloaded into a temporary folder
    (not a checkpoint name, so a restore killed half-way is never taken for a checkpoint), verified, then
    renamed into place. Returns the restored folder, or None (with a warning) if it fails or does not verify."""
    staged = checkpoints_dir / f".restore-{name}"
    shutil.rmtree(staged, ignore_errors=True)
    checkpoints_dir.mkdir(parents=True, exist_ok=True)
    try:
        target.download(name, staged)
        problem = checkpoint_problem(staged)
    except Exception as e:  # the backup cannot be read: try the next one
        problem = f"it could not be copied ({type(e).__name__}: {e})"
    if problem is not None:
        logger.warning("skipping the backup %s in %s: %s", name, target, problem)
        shutil.rmtree(staged, ignore_errors=True)
        return None
    replace_folder(staged, checkpoints_dir / name)
    logger.info("restored the backup %s from %s", name, target)
    return checkpoints_dir / name


def find_resume_checkpoint(resume: str | None, *folders: str | Path | None, backup_target=None,
                           restore_into: str | Path | None = None) -> Path | None:
    """The checkpoint a run resumes from, verified.

    None or 'none': none. A path: that checkpoint; `CheckpointCorrupt` if it fails its manifest. 'auto':
    the newest checkpoint that verifies, among the local ones under `folders` and the backups in
    `backup_target` (a backup is restored into `restore_into`, default the first folder's checkpoints/,
    before it is used). A
    checkpoint that fails is skipped with a warning saying which and why, and the next older one is tried.
    """
    if resume in (None, "", "none"):
        return None
    if resume != "auto":
        path = Path(resume)
        if not (path / STATE_FILE).is_file():
            raise FileNotFoundError(f"{path} is not a checkpoint folder (no {STATE_FILE})")
        problem = checkpoint_problem(path)
        if problem is not None:
            raise CheckpointCorrupt(f"cannot resume from {path}: {problem}; name another checkpoint, or use "
                                    f"--resume auto to take the newest one that is whole")
        return path
    folders = [Path(f) for f in folders if f]
    local = {c.name: c for f in folders for c in list_checkpoints(f)}
    remote = [n for n in backup_target.names() if is_checkpoint_name(n)] if backup_target is not None else []
    for name in sorted(set(local) | set(remote), key=checkpoint_step, reverse=True):
        if name in local:
            problem = checkpoint_problem(local[name])
            if problem is None:
                return local[name]
            logger.warning("skipping the checkpoint %s: %s", local[name], problem)
        if name in remote and (folders or restore_into):
            restored = restore_backup(backup_target, name, Path(restore_into or folders[0] / "checkpoints"))
            if restored is not None:
                return restored
    return None


# the settings of a resumed run

# Settings a resumed run may change. Steps: the cosine learning-rate and temperature schedules are
# recomputed for the new total and the run continues on the new curves from the step it reached (a longer
# run gets a higher learning rate from there on than it had). Cadences and memory-only settings change
# nothing that was learnt. Every other setting is the run's own; asking for another value is refused.
RESUME_MAY_CHANGE = ("max_steps", "epochs", "save_every", "eval_every", "backup_every", "eval_pairs",
                     "early_stopping_patience", "health_warmup_steps", "gradient_checkpointing",
                     "spectral_chunk_size", "mini_batch_size")


def resumed_config(saved, requested: dict):
    """The config a resumed run trains with: the checkpoint's `saved` NSAConfig, with the `requested`
    settings (field -> value) that RESUME_MAY_CHANGE applied (and logged). A requested setting outside
    that list that differs from the run's raises ValueError naming it, both values and what to do."""
    from .config import NSAConfig

    own = saved.to_dict()
    requested = {k: (list(v) if isinstance(v, tuple) else v) for k, v in requested.items()}
    unknown = sorted(set(requested) - set(own))
    if unknown:
        raise ValueError(f"unknown NSAConfig field(s) {unknown}")
    changed = {k: v for k, v in requested.items() if own[k] != v}
    refused = {k: v for k, v in changed.items() if k not in RESUME_MAY_CHANGE}
    if refused:
        detail = "; ".join(f"{k}: the run has {own[k]!r}, asked for {v!r}" for k, v in sorted(refused.items()))
        raise ValueError(f"the run being resumed was trained with other settings ({detail}). A resumed run keeps "
                         f"them: leave those flags out, or start a new run in another --output-dir. Only "
                         f"{', '.join(RESUME_MAY_CHANGE)} may change on resume.")
    for k, v in changed.items():
        logger.warning("resuming with %s=%r (the run had %r)", k, v, own[k])
    return NSAConfig.from_dict({**own, **changed})
