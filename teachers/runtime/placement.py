"""Process placement, read once from the environment (torchrun, DeepSpeed or SLURM).

Part of the ground floor (`teachers.runtime`: standard library only, torch imported lazily): the
cache writer, the training engine and the evaluation runners all place their processes through it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class DistEnv:
    """rank: global process index; world_size: number of processes; local_rank: index on its node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0


def _int(env: dict[str, str], name: str) -> int:
    try:
        return int(env[name])
    except ValueError as err:
        raise ValueError(f"environment variable {name}={env[name]!r} is not an integer") from err


def dist_env(env: dict[str, str] | None = None) -> DistEnv:
    """Rank and world size from `RANK`/`WORLD_SIZE`/`LOCAL_RANK`, else SLURM's `SLURM_PROCID`/
    `SLURM_NTASKS`/`SLURM_LOCALID`, else a single process."""
    env = dict(os.environ) if env is None else env
    for rank, world, local in (
        ("RANK", "WORLD_SIZE", "LOCAL_RANK"),
        ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"),
    ):
        if rank in env and world in env:
            placed = DistEnv(
                _int(env, rank), _int(env, world), _int(env, local) if local in env else 0
            )
            if not 0 <= placed.rank < placed.world_size:
                raise ValueError(
                    f"{rank}={placed.rank} is outside 0..{world}-1={placed.world_size - 1}"
                )
            return placed
    return DistEnv()


def local_cuda_device(env: DistEnv) -> str:
    """This process's GPU: cuda:LOCAL_RANK among the visible ones, wrapped around when SLURM or
    CUDA_VISIBLE_DEVICES shows each process fewer GPUs than processes on the node."""
    import torch

    count = torch.cuda.device_count()
    if count == 0:
        raise ValueError("--device cuda: no CUDA device is visible")
    return f"cuda:{env.local_rank % count}"


def resolve_device(device: str) -> str:
    """`auto` -> cuda when a GPU is visible, else cpu; any other name unchanged."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def cpu_threads_per_process(
    environ: dict[str, str] | None = None, num_cpus: int | None = None
) -> int | None:
    """CPU threads for one of the processes sharing a node: SLURM's `SLURM_CPUS_PER_TASK` when
    it gives one, else the node's cores split evenly between its `LOCAL_WORLD_SIZE` (torchrun;
    `LOCAL_SIZE` for DeepSpeed's launcher) processes. None when `OMP_NUM_THREADS` is set: torch
    already follows it, and a user's setting wins."""
    env = dict(os.environ) if environ is None else environ
    if env.get("OMP_NUM_THREADS"):
        return None
    if env.get("SLURM_CPUS_PER_TASK"):
        return max(1, _int(env, "SLURM_CPUS_PER_TASK"))
    name = next((n for n in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE") if env.get(n)), None)
    local = _int(env, name) if name else 1
    return max(1, (num_cpus or os.cpu_count() or 1) // max(1, local))


def share_cpu_threads(environ: dict[str, str] | None = None) -> int:
    """Give torch `cpu_threads_per_process` intra-op threads (processes that each take every
    core of a shared node make every step crawl); the number torch uses now."""
    import torch

    threads = cpu_threads_per_process(environ)
    if threads is not None:
        torch.set_num_threads(threads)
    return torch.get_num_threads()
