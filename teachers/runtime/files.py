"""Files: `torch.load` with `weights_only=True` and errors that name the file, sha256, and atomic
writes.

Every checkpoint of the project is read with `weights_only=True`: files through `safe_load`,
DeepSpeed's training checkpoints through `safe_deepspeed_checkpoint_engine`. Every
file a reader may meet half-written (manifests, evaluation results, `student.pt`, `adapted.pt`,
training checkpoints) is written through `atomic_write`: a temporary file beside the target, its
name unique across processes and nodes (`.NAME.HOST.PID.RANDOM.tmp`), synced, then renamed onto
the target, so a crash leaves the previous file or none, never half of one.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import re
import secrets
import socket
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch


def file_sha256(path: str | Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def temporary_path(path: Path) -> Path:
    """A fresh name beside `path`, unique across nodes (host, pid, random)."""
    host = socket.gethostname()
    return path.with_name(f".{path.name}.{host}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def _synced_temporary(path: Path, write: Callable[[IO[Any]], object], binary: bool) -> Path:
    tmp = temporary_path(path)
    try:
        with open(tmp, "xb" if binary else "x") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def atomic_write(
    path: str | Path, write: Callable[[IO[Any]], object], binary: bool = False
) -> Path:
    """Write `path` whole or not at all: `write(f)` into a temporary file beside it, synced, then
    renamed onto `path`. The temporary file is removed if `write` fails."""
    path = Path(path)
    tmp = _synced_temporary(path, write, binary)
    try:
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def create_once(path: str | Path, write: Callable[[IO[Any]], object], binary: bool = False) -> bool:
    """`atomic_write`, unless `path` exists: the finished temporary file is linked to the name,
    which either creates it or fails because it exists (`os.link` is atomic on NFS and Lustre,
    where file locks may not be shared). True when this call created `path`."""
    path = Path(path)
    tmp = _synced_temporary(path, write, binary)
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda f: f.write(text))


def save_atomic(obj: object, path: str | Path) -> Path:
    """`torch.save(obj, path)`, atomically."""
    return atomic_write(path, lambda f: torch.save(obj, f), binary=True)


def _last_line(err: BaseException) -> str:
    lines = [
        line.strip()
        for line in str(err).splitlines()
        if line.strip() and "documentation" not in line
    ]
    return lines[-1] if lines else type(err).__name__


def safe_load(path: str | Path, mmap: bool = False) -> object:
    """`torch.load(path, weights_only=True)` on the CPU, with errors that name the file.

    mmap: map the tensors instead of reading them (for a look at a few keys of a large file).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except RuntimeError:
            if not mmap:
                raise
            # Only zip-format files can be mapped; older ones are read whole.
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        if found is None:
            raise ValueError(
                f"{path}: not a readable torch checkpoint ({_last_line(err)})"
            ) from err
        raise ValueError(
            f"{path}: refusing to load: the file holds a pickled object ({found.group(1)}) besides "
            "tensors. Re-save it as a plain state dict: torch.save(model.state_dict(), path)."
        ) from err
    except (RuntimeError, EOFError) as err:
        raise ValueError(f"{path}: not a readable torch checkpoint ({_last_line(err)})") from err


def read_checkpoint(path: str | Path, mmap: bool = False) -> dict[str, torch.Tensor]:
    """Load a flat state dict with `weights_only=True`; refuse anything else with a clear error."""
    return check_flat(safe_load(path, mmap), path)


def check_flat(state: object, path: str | Path) -> dict[str, torch.Tensor]:
    """`state` if it is a flat dict of tensors, else a ValueError naming `path`."""
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict, found {type(state).__name__}")
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(
            f"{path}: expected a flat state dict of tensors; non-tensor entries: {bad[:5]}"
            + (" (a training checkpoint? export its model state dict)" if "model" in bad else "")
        )
    return state


def safe_deepspeed_checkpoint_engine(config: object) -> object:
    """DeepSpeed's torch checkpoint engine, loading with `weights_only=True` like every
    checkpoint in this project (its own loader unpickles arbitrary objects). ZeRO optimizer
    states hold three small DeepSpeed records, allowed by name and nothing else."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    class SafeCheckpointEngine(TorchCheckpointEngine):
        ALLOWED = (LossScaler, ZeroStageEnum, fragment_address)

        def load(self, path: str, map_location=None):
            with torch.serialization.safe_globals(list(self.ALLOWED)):
                return torch.load(path, map_location=map_location, weights_only=True)

    return SafeCheckpointEngine(config)
