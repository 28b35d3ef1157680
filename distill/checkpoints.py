"""Checkpoints of the training engine (`distill.engine`): the folder layout and the engine's
save and resume.

Checkpoints: `CKPT/stepNNNNNNNN/` per save; `CKPT/latest` names the newest complete one and is
replaced atomically after every process has written its files, so a crash or a second signal
during a save leaves the previous checkpoint in force. Job state is split into what every
process shares (`job_state`) and what is each process's own (`rank_state`: e.g. its data
streams' positions), gathered into one record.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch.distributed as dist

from teachers.runtime.files import write_text_atomic

LATEST = "latest"


def tag_of(step: int) -> str:
    return f"step{step:08d}"


def latest_tag(ckpt_dir: Path) -> str | None:
    path = Path(ckpt_dir) / LATEST
    return path.read_text().strip() if path.exists() else None


def _write_latest(ckpt_dir: Path, tag: str) -> None:
    write_text_atomic(ckpt_dir / LATEST, tag)


def _tags(ckpt_dir: Path) -> list[str]:
    return sorted(p.name for p in ckpt_dir.iterdir() if p.is_dir() and p.name.startswith("step"))


def _drop_unfinished(ckpt_dir: Path) -> None:
    """Remove checkpoint folders newer than `latest`: saves that a crash cut short."""
    latest = latest_tag(ckpt_dir) or ""
    for tag in _tags(ckpt_dir):
        if tag > latest:
            shutil.rmtree(ckpt_dir / tag, ignore_errors=True)


def _prune(ckpt_dir: Path, keep: int) -> None:
    """Keep the `keep` newest checkpoints (the one `latest` names among them)."""
    for tag in _tags(ckpt_dir)[:-keep]:
        shutil.rmtree(ckpt_dir / tag, ignore_errors=True)


class Checkpointing:
    """The engine's checkpoint half: `save`, `resume` and `frozen_names` over the variant's own
    files (`_save_files`, `_load_files`). The engine it is part of provides `cfg`, `env`,
    `model`, `step_index`, `num_nonfinite`, `distributed` and `barrier`."""

    def save(
        self, ckpt_dir: str | Path, step: int, job_state: dict, rank_state: dict | None = None
    ) -> Path:
        """Checkpoint the model, optimizer, step and job state as `ckpt_dir/stepNNNNNNNN`, then
        point `latest` at it (atomically, after every process wrote its part)."""
        ckpt_dir = Path(ckpt_dir)
        tag = tag_of(step)
        gathered = [rank_state or {}]
        if self.distributed:
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, rank_state or {})
        client = {
            "step": step,
            "num_nonfinite": self.num_nonfinite,
            "config": self.cfg.to_json(),
            "job": job_state,
            "ranks": gathered,
        }
        if self.env.rank == 0:
            ckpt_dir.mkdir(parents=True, exist_ok=True)
            _drop_unfinished(ckpt_dir)
        self.barrier()
        try:
            self._save_files(ckpt_dir, tag, client)
        except BaseException:
            # a save cut short (a full disk) frees its space; `latest` still names the last good one
            shutil.rmtree(ckpt_dir / tag, ignore_errors=True)
            raise
        self.barrier()
        if self.env.rank == 0:
            _write_latest(ckpt_dir, tag)
            _prune(ckpt_dir, self.cfg.keep_checkpoints)
        self.barrier()
        return ckpt_dir / tag

    def resume(self, ckpt_dir: str | Path) -> tuple[int, dict | None, dict | None]:
        """Load the newest checkpoint: (its step, the job state, this process's rank state), or
        (0, None, None) when there is none."""
        ckpt_dir = Path(ckpt_dir)
        tag = latest_tag(ckpt_dir)
        if tag is None:
            return 0, None, None
        client = self._load_files(ckpt_dir, tag)
        if not {"step", "job", "ranks"} <= set(client):
            raise ValueError(
                f"{ckpt_dir / tag} was written by an older trainer (no engine state in it): "
                "resume it with the version that wrote it, or start a new --out"
            )
        self.step_index, self.num_nonfinite = client["step"], client["num_nonfinite"]
        ranks = client["ranks"]
        mine = ranks[self.env.rank] if len(ranks) == self.env.world_size else None
        print(
            f"rank {self.env.rank}: resumed from {ckpt_dir / tag} at step {client['step']}",
            flush=True,
        )
        return client["step"], client["job"], mine

    def frozen_names(self) -> set[str]:
        """Parameters that do not train: left out of checkpoints (they come from the job's
        inputs, e.g. an adapter's frozen base encoder), so a checkpoint holds what trains."""
        return {n for n, p in self.model.named_parameters() if not p.requires_grad}

    # Each variant writes and reads its own files.
    def _save_files(self, ckpt_dir: Path, tag: str, client: dict) -> None:
        raise NotImplementedError

    def _load_files(self, ckpt_dir: Path, tag: str) -> dict:
        raise NotImplementedError
