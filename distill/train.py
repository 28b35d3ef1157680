"""Distillation on the training engine: cached teacher features in, a trained `student.pt` out.

Read top to bottom: place the process, open the cache (its manifest supplies the teacher's
facts the run did not state, and refuses the ones that disagree), build the student with its
tap projections, hand it to the engine with the distillation loss, resume if asked, then loop:
one engine step per optimizer step, a log row, a checkpoint when due or when a signal asked the
run to stop, and at the end the export. The engine (`distill/engine.py`) owns the rest.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from distill.config import DistillConfig
from distill.data import DataSpec, StreamLayout, StreamTracker, restore_streams
from distill.engine import Engine, build_engine, prepare_run_dir, start_processes
from distill.logs import RunProgress, plot_run
from distill.losses import TapProjections, pair_losses, student_taps_for, weighted_loss
from distill.preempt import StopRequest
from distill.schedule import dld_weights, pair_every_from_epochs, step_progress
from students import build_student
from students.export import save_student
from teachers.build import (
    TEACHER_SIZES,
    file_sha256,
    load_sam_checkpoint,
    random_vit_tiny,
    read_checkpoint,
    sam_name_from_state,
)
from teachers.cache_read import CacheInfo, check_manifest, open_cache


class DistillModel(torch.nn.Module):
    """The student plus the projections of its tapped blocks (dropped at export)."""

    def __init__(self, student: torch.nn.Module, taps: list[int], teacher_width: int) -> None:
        super().__init__()
        self.student, self.taps = student, taps
        self.projections = TapProjections(student.embed_dim, teacher_width, len(taps))

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """image [B, 3, S, S] -> embedding [B, 256, S/16, S/16], projected taps [B, S/16, S/16, Ct]."""
        embed, feats = self.student.forward_features(image, self.taps)
        return embed, self.projections([feats[t] for t in self.taps])


class DistillLoss:
    """The engine's loss function: DLD-weighted, padding-masked MSE of every (student, teacher)
    pair, the final embedding last. Returns "loss" and one term per pair, named by the feature."""

    def __init__(self, cfg: DistillConfig, cache: CacheInfo) -> None:
        self.cfg, self.pairs = cfg, cache.features[1:] + cache.features[:1]
        self.every = None
        if cfg.dld_every_epochs is not None:
            steps_per_epoch = max(1, cache.num_samples // cfg.batch_size)
            self.every = pair_every_from_epochs(cfg.dld_every_epochs, steps_per_epoch, cfg.steps)

    def weights(self, step: int) -> list[float]:
        """DLD weights of step `step` (0-based)."""
        progress = step_progress(step, self.cfg.steps)
        cfg = self.cfg
        return dld_weights(
            progress, len(self.pairs), cfg.dld, floor=cfg.dld_floor, every=self.every
        )

    def __call__(self, engine: Engine, batch: dict) -> dict[str, torch.Tensor]:
        embed, taps = engine(batch["image"].to(engine.dtype))
        targets = [batch[name] for name in self.pairs]
        losses = pair_losses(embed, taps, targets[-1], targets[:-1], batch["valid"])
        weighted = weighted_loss(losses, self.weights(engine.step_index))
        return {"loss": weighted} | dict(zip(self.pairs, losses, strict=True))

    def columns(self) -> list[str]:
        names = ["loss_total"] + [f"loss_{p}" for p in self.pairs]
        return (
            names
            + [f"weight_{p}" for p in self.pairs]
            + ["lr", "images_per_s", "num_corrupt", "num_nonfinite"]
        )


def open_checked_cache(cfg: DistillConfig) -> tuple[CacheInfo, DistillConfig, list[str]]:
    """The cache, the config with the cache's facts filled in, and the facts that were taken from
    its manifest. A fact the run states (or the teacher checkpoint implies) must agree."""
    cache = open_cache(cfg.shards)
    teacher = cfg.teacher
    if cfg.teacher_ckpt is not None:
        # Mapped, not read: only the patch embedding's width is looked at (ViT-H is 2.5 GB).
        found = sam_name_from_state(read_checkpoint(cfg.teacher_ckpt, mmap=True), cfg.teacher_ckpt)
        if teacher not in (None, found):
            raise ValueError(
                f"--teacher {teacher} but --teacher-ckpt {cfg.teacher_ckpt} holds {found}"
            )
        teacher = found
        if file_sha256(cfg.teacher_ckpt) != cache.teacher_sha256:
            raise ValueError(
                f"cache {cache.folder} was made with another teacher checkpoint than {cfg.teacher_ckpt} (sha256 differs)"
            )
    stated = {
        "teacher": teacher,
        "taps": cfg.teacher_taps,
        "img_size": cfg.img_size,
        "codec": cfg.codec,
    }
    check_manifest(cache.manifest, f"cache {cache.folder}", **stated)
    if not cache.complete:
        raise ValueError(
            f"cache {cache.folder} is incomplete: finish it with launch/cache_teacher.py first"
        )
    facts = dict(
        teacher=cache.teacher,
        teacher_taps=tuple(cache.taps),
        img_size=cache.img_size,
        codec=cache.codec,
    )
    return cache, replace(cfg, **facts), [k for k, v in stated.items() if v is None]


def build_model(cfg: DistillConfig, teacher: str, teacher_taps: list[int]) -> DistillModel:
    """The seeded student, its taps paired with the teacher's, and their projections."""
    torch.manual_seed(cfg.seed)
    student = build_student(cfg.student, img_size=cfg.img_size)
    width, depth = TEACHER_SIZES[teacher]
    taps = list(cfg.student_taps or student_taps_for(teacher_taps, depth, len(student.blocks)))
    if len(taps) != len(teacher_taps):
        raise ValueError(
            f"--student-taps {taps} must pair one-to-one with teacher taps {teacher_taps}"
        )
    return DistillModel(student, taps, width)


def open_streams(cfg: DistillConfig, cache: CacheInfo, engine: Engine, job, mine) -> StreamTracker:
    """This rank's micro-batch streams, continued where the checkpoint (if any) left them."""
    env = engine.env
    layout = StreamLayout.choose(env.rank, env.world_size, engine.accum, cfg.workers)
    spec = DataSpec(
        cache.shards,
        cfg.img_size,
        cache.taps,
        engine.micro_batch,
        cfg.seed,
        cfg.shuffle_buffer,
        cfg.on_corrupt,
    )
    restore_streams(spec, layout, job, mine, engine.step_index)
    return StreamTracker(spec, layout)


def export(cfg: DistillConfig, model: DistillModel, cache: CacheInfo, pairs: list[str]) -> Path:
    """Rank 0 at the end: the training plot and student.pt (prompt encoder and mask decoder from
    the teacher checkpoint, or the seeded random vit_tiny a demo cache was made with)."""
    out, sha = Path(cfg.out), cache.teacher_sha256
    plot_run(out, pairs)
    if cfg.teacher_ckpt is not None:
        heads = load_sam_checkpoint(cfg.teacher, cfg.teacher_ckpt)
    elif cfg.teacher == "vit_tiny" and sha.startswith("random-seed-"):
        heads = random_vit_tiny(int(sha.rsplit("-", 1)[1]))
    else:
        raise ValueError(
            "--teacher-ckpt is required to export student.pt (its prompt encoder and mask decoder)"
        )
    path = save_student(
        out / "student.pt",
        model.student,
        heads,
        teacher=cfg.teacher,
        teacher_sha256=sha,
        step=cfg.steps,
    )
    print(
        f"exported {path} (student {cfg.student}, step {cfg.steps}); log {out / 'log.csv'}, plot {out / 'training.png'}"
    )
    return path


def prepare_run(cfg: DistillConfig, cache: CacheInfo, taken: list[str], rank: int) -> Path:
    """The run folder (`distill.engine.prepare_run_dir`); rank 0 says which cache facts the run
    uses. Returns the checkpoint folder."""
    ckpt_dir = prepare_run_dir(cfg, rank)
    if rank == 0:
        facts = ", ".join(f"{k} {v}" for k, v in cache.facts.items())
        source = f" ({', '.join(taken)} from its manifest)" if taken else ""
        print(f"cache {cache.folder}: {facts}{source}", flush=True)
    return ckpt_dir


def train(cfg: DistillConfig, stop: StopRequest | None = None) -> Path:
    """Run (or resume) a distillation; return the path of the exported student.pt. A stop
    request (SIGUSR1/SIGTERM) saves a checkpoint after the current step and raises Preempted."""
    env = start_processes(cfg)
    cache, cfg, taken = open_checked_cache(cfg)
    ckpt_dir = prepare_run(cfg, cache, taken, env.rank)
    model = build_model(cfg, cfg.teacher, cache.taps)
    loss = DistillLoss(cfg, cache)
    engine = build_engine(cfg, model, model.parameters(), loss, env, stop)
    start, job, mine = engine.resume(ckpt_dir) if cfg.resume == "auto" else (0, None, None)
    streams = open_streams(cfg, cache, engine, job, mine)
    progress = RunProgress(cfg, loss.columns(), start, env.rank)

    def record(step: int, losses: dict, seconds: float) -> None:
        corrupt = int(engine.all_reduce([float(streams.num_corrupt)])[0])
        log_step(progress, step, losses, loss.weights(step), engine, corrupt, seconds)

    engine.run(streams, ckpt_dir, start, record, also_close=(progress,))
    if env.rank == 0:
        export(cfg, model, cache, loss.pairs)
    engine.barrier()  # the others wait for the export
    return Path(cfg.out) / "student.pt"


def log_step(
    progress: RunProgress,
    step: int,
    losses: dict,
    weights: list[float],
    engine: Engine,
    corrupt: int,
    seconds: float,
) -> None:
    """One row of log.csv and the console line for step `step` (0-based)."""
    pairs = [name for name in losses if name != "loss"]
    rate = engine.cfg.batch_size / seconds
    values = {"loss_total": losses["loss"]} | {f"loss_{p}": losses[p] for p in pairs}
    values |= {f"weight_{p}": w for p, w in zip(pairs, weights, strict=True)}
    values |= {
        "lr": engine.lr,
        "images_per_s": rate,
        "num_corrupt": corrupt,
        "num_nonfinite": engine.num_nonfinite,
    }
    line = (
        f"loss {losses['loss']:.5g} final-embedding {losses[pairs[-1]]:.5g} lr {engine.lr:.3g} "
        f"{rate:.1f} img/s corrupt {corrupt} non-finite {engine.num_nonfinite}"
    )
    progress.step(step + 1, values, line, loss=f"{losses['loss']:.4g}", img_s=f"{rate:.1f}")
