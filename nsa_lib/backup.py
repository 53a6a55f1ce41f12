"""Checkpoint backups: every `backup_every` optimizer steps (default 3000, the original's every 6th
checkpoint) the trainer copies its newest checkpoint folder to a target:

    FolderTarget("/content/drive/MyDrive/nsa/run1")   a mounted Google Drive (Colab) or any local folder
    DriveTarget.from_service_account(folder_id, key)   Google Drive through PyDrive2 (no mount needed)

`backup_target("gdrive:<folder-id>")` or `backup_target("<path>")` picks one from a string. Every copy
is written under a temporary name, verified (size and hash: sha256 for folders, Drive's md5 for Drive),
then renamed; failures are retried with exponential back-off; the oldest backups are pruned to `keep`.
`BackupManager.backup` never raises: a failing backup is reported and training goes on.
"""
from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from .config import format_bytes
from .runfolder import (checkpoint_name, checkpoint_step, file_digest, is_checkpoint_name, remove_folder,
                        replace_folder)

logger = logging.getLogger(__name__)

DRIVE_FOLDER_MIME = "application/vnd.google-apps.folder"


class BackupError(RuntimeError):
    """A copy could not be made or did not verify."""


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


class FolderTarget:
    """Backups as sub-folders of a folder (a mounted Drive in Colab, or any local path)."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser()

    def __repr__(self) -> str:
        return f"FolderTarget({str(self.root)!r})"

    def upload(self, source: Path, name: str) -> None:
        """Copy `source` to `<root>/<name>.tmp`, verify it, swap it in as `<root>/<name>`. A failed copy (a
        full disk) is removed, so that it does not keep the disk full for the next backup."""
        tmp, final = self.root / f"{name}.tmp", self.root / name
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            for src in _files(source):
                dst = tmp / src.relative_to(source)
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, dst)
                if dst.stat().st_size != src.stat().st_size or file_digest(dst) != file_digest(src):
                    raise BackupError(f"copy of {src.name} to {dst} does not match the original")
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        replace_folder(tmp, final)

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.endswith((".tmp", ".old")))

    def free_bytes(self) -> int:
        """Free space on the filesystem that holds the folder (its nearest existing parent)."""
        folder = self.root
        while not folder.exists():
            folder = folder.parent
        return shutil.disk_usage(folder).free

    def delete(self, name: str) -> None:
        remove_folder(self.root / name)  # renamed away first: a kill never leaves a half-deleted backup

    def download(self, name: str, dest: Path) -> Path:
        if not (self.root / name).is_dir():
            raise BackupError(f"no backup {name!r} in {self.root}")
        shutil.copytree(self.root / name, dest, dirs_exist_ok=True)
        return dest


class DriveTarget:
    """Backups as sub-folders of a Google Drive folder, through PyDrive2.

    Build it with `from_service_account(folder_id, key_file)` or `from_saved_credentials(folder_id,
    credentials_file)`, or pass an authorised `pydrive2.drive.GoogleDrive`. Each file is uploaded into
    `<name>.tmp`, checked against the md5 and size Drive reports, and the folder renamed to `<name>`.
    """

    def __init__(self, drive, folder_id: str):
        self.drive, self.folder_id = drive, folder_id

    def __repr__(self) -> str:
        return f"DriveTarget(folder {self.folder_id!r})"

    @classmethod
    def from_service_account(cls, folder_id: str, key_file: str | Path, *, api_endpoint: str | None = None):
        from pydrive2.auth import GoogleAuth

        _check_service_account_key(Path(key_file))
        auth = GoogleAuth(settings={"client_config_backend": "service",
                                    "service_config": {"client_json_file_path": str(key_file)}})
        try:
            auth.ServiceAuth()
        except Exception as e:  # e.g. a private key that does not parse: OpenSSL's long traceback otherwise
            raise BackupError(f"the service-account key {key_file} was refused ({type(e).__name__}: "
                              f"{str(e).strip().splitlines()[-1] if str(e).strip() else 'no detail'}); download a "
                              f"new JSON key for the service account and point NSA_GDRIVE_KEY at it") from None
        return cls(_drive(auth, api_endpoint), folder_id)

    @classmethod
    def from_saved_credentials(cls, folder_id: str, credentials_file: str | Path, *, api_endpoint: str | None = None):
        from pydrive2.auth import GoogleAuth

        auth = GoogleAuth()
        auth.LoadCredentialsFile(str(credentials_file))
        if auth.credentials is None:
            raise BackupError(f"no saved Google credentials in {credentials_file}")
        return cls(_drive(auth, api_endpoint), folder_id)

    def _children(self, parent: str, extra: str = "") -> list:
        query = f"'{parent}' in parents and trashed = false" + (f" and {extra}" if extra else "")
        return self.drive.ListFile({"q": query}).GetList()

    def _folder(self, name: str):
        found = self._children(self.folder_id, f"title = '{name}' and mimeType = '{DRIVE_FOLDER_MIME}'")
        return found[0] if found else None

    def upload(self, source: Path, name: str) -> None:
        stale = self._folder(f"{name}.tmp")
        if stale is not None:
            stale.Delete()
        folder = self.drive.CreateFile({"title": f"{name}.tmp", "mimeType": DRIVE_FOLDER_MIME,
                                        "parents": [{"id": self.folder_id}]})
        folder.Upload()
        try:
            for src in _files(source):
                if src.parent != source:
                    raise BackupError(f"{src}: DriveTarget copies flat checkpoint folders only")
                f = self.drive.CreateFile({"title": src.name, "parents": [{"id": folder["id"]}]})
                f.SetContentFile(str(src))
                f.Upload()
                f.FetchMetadata(fields="md5Checksum,fileSize")
                if int(f["fileSize"]) != src.stat().st_size or f["md5Checksum"] != file_digest(src, "md5"):
                    raise BackupError(f"Drive's copy of {src.name} does not match the original")
        except BaseException:
            try:  # a partial copy must not fill the Drive quota for the next backup
                folder.Delete()
            except Exception as e:
                logger.warning("could not remove the partial backup %s.tmp from Drive: %s", name, e)
            raise
        old = self._folder(name)
        if old is not None:
            old.Delete()
        folder["title"] = name
        folder.Upload()  # a metadata-only update: the rename

    def free_bytes(self) -> int | None:
        """What the Drive quota leaves (None for an unlimited quota)."""
        about = self.drive.GetAbout()
        total, used = int(about.get("quotaBytesTotal") or 0), int(about.get("quotaBytesUsed") or 0)
        return total - used if total else None

    def names(self) -> list[str]:
        return sorted(f["title"] for f in self._children(self.folder_id, f"mimeType = '{DRIVE_FOLDER_MIME}'")
                      if not f["title"].endswith(".tmp"))

    def delete(self, name: str) -> None:
        folder = self._folder(name)
        if folder is not None:
            folder.Delete()

    def download(self, name: str, dest: Path) -> Path:
        folder = self._folder(name)
        if folder is None:
            raise BackupError(f"no backup {name!r} in Drive folder {self.folder_id}")
        dest.mkdir(parents=True, exist_ok=True)
        for f in self._children(folder["id"]):
            f.GetContentFile(str(dest / f["title"]))
        return dest


def _check_service_account_key(path: Path) -> None:
    """A readable Google service-account JSON key, or a BackupError saying what is wrong with it."""
    import json

    fix = "download a JSON key for the service account (IAM > Service accounts > Keys) and point NSA_GDRIVE_KEY at it"
    if not path.is_file():
        raise BackupError(f"no service-account key at {path}; {fix}")
    try:
        key = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise BackupError(f"{path} is not a JSON service-account key ({type(e).__name__}); {fix}") from None
    missing = [k for k in ("type", "client_email", "private_key") if not isinstance(key, dict) or k not in key]
    if missing or key.get("type") != "service_account":
        raise BackupError(f"{path} is not a service-account key (missing {missing or ['type: service_account']}); {fix}")
    if "-----BEGIN PRIVATE KEY-----" not in key["private_key"]:
        raise BackupError(f"{path}: its private_key is not a PEM private key; {fix}")


def _drive(auth, api_endpoint: str | None):
    """A GoogleDrive on `auth`; `api_endpoint` points the Drive API elsewhere (a stand-in server in tests)."""
    from pydrive2.drive import GoogleDrive

    if api_endpoint:  # the Drive v2 discovery document that ships with google-api-python-client, re-rooted
        import json

        from googleapiclient.discovery import build_from_document
        from googleapiclient.discovery_cache import get_static_doc

        doc = json.loads(get_static_doc("drive", "v2"))
        root = api_endpoint.rstrip("/") + "/"
        doc.update(rootUrl=root, baseUrl=root + doc["servicePath"], batchPath="batch/drive/v2")
        auth.http = auth.http or auth.credentials.authorize(auth._build_http())
        auth.service = build_from_document(doc, http=auth.http)
    return GoogleDrive(auth)


def backup_target(spec: str):
    """'gdrive:<folder-id>' (PyDrive2, service-account key in $NSA_GDRIVE_KEY or credentials in
    $NSA_GDRIVE_CREDENTIALS) or a folder path."""
    import os

    if spec.startswith("gdrive:"):
        folder_id = spec.split(":", 1)[1]
        if os.environ.get("NSA_GDRIVE_KEY"):
            return DriveTarget.from_service_account(folder_id, os.environ["NSA_GDRIVE_KEY"])
        if os.environ.get("NSA_GDRIVE_CREDENTIALS"):
            return DriveTarget.from_saved_credentials(folder_id, os.environ["NSA_GDRIVE_CREDENTIALS"])
        raise BackupError("a gdrive: backup target needs NSA_GDRIVE_KEY (a service-account key file) or "
                          "NSA_GDRIVE_CREDENTIALS (saved PyDrive2 credentials); in Colab, mount Drive and "
                          "pass a /content/drive/MyDrive/... folder instead")
    return FolderTarget(spec)


@dataclass
class BackupResult:
    name: str
    ok: bool
    attempts: int
    seconds: float
    error: str | None = None
    bytes: int = 0  # the size of what was copied
    space_warning: str | None = None  # set when the target looked too full before the copy


class BackupManager:
    """Copies checkpoint folders to a target with retries and pruning; never raises."""

    def __init__(self, target, *, keep: int = 3, retries: int = 3, backoff: float = 2.0):
        self.target, self.keep, self.retries, self.backoff = target, keep, retries, backoff

    def backup(self, source: Path, *, name: str | None = None, keep_step: int | None = None) -> BackupResult:
        """Copy `source` to the target as `name` (default: its folder name), retrying; then prune the old
        checkpoint backups, keeping the newest `keep` and the one of `keep_step` (the best step)."""
        name = name or source.name
        started, error = time.perf_counter(), None
        size = sum(p.stat().st_size for p in _files(source))
        space_warning = self._space_warning(name, size)
        for attempt in range(1, self.retries + 1):
            try:
                self.target.upload(source, name)
                self._prune(keep_step)
                logger.info("backed up %s (%.1f MiB) to %s", name, size / 2**20, self.target)
                return BackupResult(name, True, attempt, time.perf_counter() - started, None, size, space_warning)
            except Exception as e:  # any failure of the copy: retry, then report
                error = f"{type(e).__name__}: {e}"
                logger.warning("backup of %s to %s failed (attempt %d/%d): %s", name, self.target,
                               attempt, self.retries, error)
                if attempt < self.retries:
                    time.sleep(self.backoff * 2 ** (attempt - 1))
        return BackupResult(name, False, self.retries, time.perf_counter() - started, error, size, space_warning)

    def _space_warning(self, name: str, size: int) -> str | None:
        """A warning when the target has less free space than this copy needs (the copy is tried anyway:
        pruning, or a quota that is not enforced to the byte, may still let it through)."""
        try:
            free = self.target.free_bytes()
        except Exception as e:  # a target that cannot say: no warning, the copy will tell
            logger.debug("free space of %s unknown: %s", self.target, e)
            return None
        if free is None or free >= size:
            return None
        warning = (f"{self.target} has {format_bytes(free)} free, the backup {name} needs {format_bytes(size)}: "
                   f"free some space (older runs' backups, the Drive trash) or the backups will fail; training goes on")
        logger.warning(warning)
        return warning

    def _prune(self, keep_step: int | None = None) -> None:
        """Delete old checkpoint backups: only this manager's own `ckpt-<step>` folders (complete, hence
        verified when they were written), never the newest `keep`, the `keep_step` one, best/, final/ or
        any other folder."""
        steps = sorted(checkpoint_step(n) for n in self.target.names() if is_checkpoint_name(n))
        for step in steps[:max(0, len(steps) - self.keep)]:
            if step != keep_step:
                self.target.delete(checkpoint_name(step))
