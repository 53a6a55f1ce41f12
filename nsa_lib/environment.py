"""Where a notebook runs and what it should do there: Colab or not, which GPU, a backup folder on Drive,
the preset that fits, and the run configuration that the notebooks pass to each other.

    env = detect_environment()                  # Colab? GPU name and memory? CI smoke mode?
    backup = mount_drive_folder("nsa/run1")      # /content/drive/MyDrive/nsa/run1, or a local fallback
    preset = choose_preset(env)                  # the largest preset whose training step fits the GPU
    save_run_config({...}); read_run_config()    # 01_setup writes it, 02_train and 03_monitor read it

Nothing here imports Colab at module level: `google.colab` is only touched inside `mount_drive_folder`
when running in Colab.
"""
from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .config import largest_preset_that_fits

logger = logging.getLogger(__name__)

RUN_CONFIG = Path(os.environ.get("NSA_RUN_CONFIG", "runs/run_config.json"))
DRIVE_ROOT = Path("/content/drive")


@dataclass
class Environment:
    in_colab: bool
    smoke: bool  # CI set: tiny preset, a handful of steps, offline data, same code path
    gpu_name: str | None
    gpu_memory_bytes: int | None
    bf16_supported: bool
    cpu_count: int

    def describe(self) -> str:
        gpu = f"{self.gpu_name} ({self.gpu_memory_bytes / 2**30:.1f} GiB)" if self.gpu_name else "no GPU"
        return (f"{'Colab' if self.in_colab else 'local machine'}, {gpu}, {self.cpu_count} CPU cores"
                + (", CI smoke mode" if self.smoke else ""))


def detect_environment() -> Environment:
    gpu = torch.cuda.is_available()
    props = torch.cuda.get_device_properties(0) if gpu else None
    return Environment(in_colab="google.colab" in sys.modules, smoke=bool(os.environ.get("CI")),
                       gpu_name=props.name if props else None, gpu_memory_bytes=props.total_memory if props else None,
                       bf16_supported=bool(gpu and torch.cuda.is_bf16_supported()), cpu_count=os.cpu_count() or 1)


def choose_preset(env: Environment) -> tuple[str, str, bool]:
    """(preset, precision, gradient_checkpointing) for this machine: tiny in smoke mode, mini on a CPU,
    else the largest preset whose training step fits in 85% of the GPU's memory (bf16 where supported)."""
    if env.smoke:
        return "tiny", "no", False
    if env.gpu_memory_bytes is None:
        return "mini", "no", False
    precision = "bf16" if env.bf16_supported else "fp16"
    name, checkpointing = largest_preset_that_fits(env.gpu_memory_bytes, precision=precision,
                                                   candidates=("M1B", "M700", "M600", "M456", "mini"))
    return name, precision, checkpointing


def mount_drive_folder(subfolder: str, *, fallback: str | Path = "runs/backups") -> tuple[Path, str]:
    """A folder for backups: on Drive in Colab (mounting it if needed), else `fallback`. Returns the folder
    and a sentence saying what happened (a failed mount falls back with the reason, it does not raise)."""
    fallback = Path(fallback) / subfolder
    if "google.colab" not in sys.modules:
        fallback.mkdir(parents=True, exist_ok=True)
        return fallback, f"not in Colab: backups go to the local folder {fallback}"
    try:
        if not (DRIVE_ROOT / "MyDrive").is_dir():
            from google.colab import drive

            drive.mount(str(DRIVE_ROOT))
        folder = DRIVE_ROOT / "MyDrive" / subfolder
        folder.mkdir(parents=True, exist_ok=True)
        return folder, f"Google Drive mounted: backups go to {folder}"
    except Exception as e:  # a refused or failed mount: keep working, say where the backups go instead
        fallback.mkdir(parents=True, exist_ok=True)
        return fallback, (f"Google Drive could not be mounted ({type(e).__name__}: {e}); backups go to "
                          f"{fallback} on this runtime's disk, which is lost when it resets")


def save_run_config(settings: dict, path: str | Path | None = None) -> Path:
    path = Path(path or RUN_CONFIG)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(settings, indent=2, default=str) + "\n")
    tmp.replace(path)
    return path


def read_run_config(path: str | Path | None = None) -> dict:
    path = Path(path or RUN_CONFIG)
    if not path.is_file():
        raise FileNotFoundError(f"no run configuration at {path}: run notebooks/01_setup.ipynb first")
    return json.loads(path.read_text())


def environment_dict(env: Environment) -> dict:
    return asdict(env)
