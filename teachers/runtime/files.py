"""Files: `torch.load` with `weights_only=True` and errors that name the file, sha256, and atomic
writes.

Every checkpoint of the project is read with `weights_only=True`: files through `safe_load`,
DeepSpeed's training checkpoints through `safe_deepspeed_checkpoint_engine`. Every
file a reader may meet half-written (manifests, evaluation results, `student.pt`, `adapted.pt`,
training checkpoints) is written through `atomic_write`: a temporary file beside the target, its
name unique across processes and nodes (`.NAME.HOST.PID.RANDOM.tmp`), synced, then renamed onto
the target, so a crash leaves the previous file or none, never half of one. A write that fails
(a full disk) removes its temporary file and raises the `OSError` naming the target, also where
`torch.save` would report only "unexpected pos".

`check_out_dir` and `check_out_file` try an entry point's `--out` before the work starts.
"""

from __future__ import annotations

import contextlib
import errno
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


class _Recording:
    """A file object that keeps the `OSError` its writes raised: `torch.save` turns one into a
    RuntimeError ("unexpected pos") that no longer says the disk is full."""

    def __init__(self, f: IO[Any]) -> None:
        self.f, self.error = f, None

    def write(self, data: Any) -> int:
        try:
            return self.f.write(data)
        except OSError as err:
            self.error = err
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self.f, name)


def _synced_temporary(path: Path, write: Callable[[IO[Any]], object], binary: bool) -> Path:
    tmp = temporary_path(path)
    f = None
    try:
        with open(tmp, "xb" if binary else "x") as raw:
            f = _Recording(raw)
            write(f)
            raw.flush()
            os.fsync(raw.fileno())
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        cause = err if isinstance(err, OSError) else getattr(f, "error", None)
        if cause is not None and cause.errno is not None:
            raise OSError(cause.errno, os.strerror(cause.errno), str(path)) from err
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


def _try_writing(folder: Path, flag: str, target: Path) -> None:
    """Create and remove a file in `folder`: refuses a read-only or full disk before the work."""
    probe = temporary_path(folder / ".write-test")
    try:
        with open(probe, "xb") as f:
            f.write(b"\0")
            f.flush()
            os.fsync(f.fileno())
    except OSError as err:
        reason = os.strerror(err.errno) if err.errno else str(err)
        raise OSError(
            err.errno or errno.EIO, f"{flag} {target}: cannot write there ({reason})"
        ) from err
    finally:
        with contextlib.suppress(OSError):  # a read-only disk refuses even a missing file's unlink
            probe.unlink()


def _file_above(path: Path) -> Path | None:
    """The first existing non-folder among the parents of `path`, if any."""
    for parent in reversed(path.absolute().parents):
        if parent.exists() and not parent.is_dir():
            return parent
    return None


def _ready_folder(folder: Path, flag: str, given: Path) -> None:
    blocker = folder if folder.exists() and not folder.is_dir() else _file_above(folder)
    if blocker is not None:
        what = "is a file" if blocker == given else f"is under {blocker}, which is a file"
        raise ValueError(f"{flag} {given} {what}: give a folder there")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        reason = os.strerror(err.errno) if err.errno else str(err)
        raise OSError(err.errno, f"{flag} {given}: cannot create {folder} ({reason})") from err
    _try_writing(folder, flag, given)


def check_out_dir(path: str | Path, flag: str = "--out") -> Path:
    """Create the output folder `path` and make sure a file can be written in it; a ValueError
    (a file is in the way) or an OSError (read-only, full, no permission) names `flag` and `path`
    before any work is done."""
    path = Path(path)
    _ready_folder(path, flag, path)
    return path


def check_out_file(path: str | Path, flag: str = "--out") -> Path:
    """`check_out_dir` for a file to be written at `path`: its folder is created and tried, and
    `path` must not be a folder."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(
            f"{flag} {path} is a folder: give a file name, e.g. {path / 'result.json'}"
        )
    _ready_folder(path.absolute().parent, flag, path)
    return path


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
    if path.is_dir():
        found = sorted(p.name for p in path.glob("*.p*t*") if p.suffix in (".pt", ".pth"))
        hint = f" (it holds {', '.join(found[:4])})" if found else ""
        raise ValueError(f"{path} is a folder, not a checkpoint file: give the file{hint}")
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
