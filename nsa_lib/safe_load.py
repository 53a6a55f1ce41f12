"""Loading `torch.save` files without letting them run code.

A `.pt` file is a pickle, and unpickling can call any function the file names: a checkpoint downloaded
from somewhere, or restored from a shared Drive folder, could run code on the machine that opens it.
`load_torch_file` therefore always loads with `torch.load(weights_only=True)`, which rebuilds only
tensors and plain containers, plus the few numpy types that the original Spectra-NSA's checkpoints hold
(its `rng_state` had numpy's Mersenne-Twister state, an ndarray, and its scores could be numpy floats).
Both numpy 1 (`numpy.core`) and numpy 2 (`numpy._core`) spell those types, and both are accepted.

A file that names anything else is refused with `UnsafeFileError`, which names what its pickle calls and
how to re-save a file you made yourself without it. There is no opt-in to unpickle it: every `torch.load`
in nsa_lib is weights-only (tests/test_safe_load.py checks the source for any other).

Not handled here: safetensors files (they hold no code and load through `safetensors` directly).
"""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch


class UnsafeFileError(ValueError):
    """A `torch.save` file holds pickled objects that a weights-only load refuses."""


def _numpy_globals() -> list[tuple[Any, str]]:
    """(object, name as a pickle spells it) for the numpy types of an RNG state and of numpy scalars."""
    core = getattr(np, "_core", None) or np.core  # numpy 2 moved numpy.core to numpy._core
    allowed = [(np.ndarray, "numpy.ndarray"), (np.dtype, "numpy.dtype")]
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed += [(core.multiarray._reconstruct, f"{module}._reconstruct"),
                    (core.multiarray.scalar, f"{module}.scalar")]
    dtypes = getattr(np, "dtypes", None)  # numpy >= 1.25 pickles some dtypes by their class
    for name in ("UInt32DType", "Int64DType", "Int32DType", "Float64DType", "Float32DType", "BoolDType"):
        if dtypes is not None and hasattr(dtypes, name):
            allowed.append((getattr(dtypes, name), f"numpy.dtypes.{name}"))
    return allowed


def load_torch_file(path: str | Path, *, what: str = "file") -> Any:
    """`torch.load(path, map_location="cpu", weights_only=True)` that allows the numpy types listed in
    `_numpy_globals` and nothing else; any other pickled object raises `UnsafeFileError` naming it. `what`
    names the file in messages (e.g. "checkpoint")."""
    path = Path(path)
    try:
        with torch.serialization.safe_globals(_numpy_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        try:
            found = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except Exception:  # an unreadable archive: report the original error
            found = []
        allowed = {name for _, name in _numpy_globals()}
        names = [n for n in found if n not in allowed] or [str(error).splitlines()[0]]
        raise UnsafeFileError(
            f"{path}: refused to load this {what}: its pickle calls {', '.join(names)}, which a weights-only "
            f"load does not allow (unpickling it could run code), and nsa_lib never unpickles a file in full. "
            f"If you made this file yourself, re-save its tensors and plain values without those objects "
            f"(e.g. torch.save({{'model': ckpt['model'], 'cfg': dict(ckpt['cfg'])}}, path)) where you made it.") from None
