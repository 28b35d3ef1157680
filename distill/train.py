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
from segment_anything.modeling import Sam

from distill.align import AlignLoss, set_trainable_parts
from distill.config import DistillConfig
from distill.data import DataSpec, StreamLayout, StreamTracker, restore_streams
from distill.engine import Engine, build_engine, prepare_run_dir, start_processes
from distill.logs import RunProgress, plot_run
from distill.losses import TapProjections, gather_tokens, pair_losses, weighted_loss
from distill.schedule import dld_weights, pair_every_from_epochs, step_progress
from students import build_student
from students.export import read_export_meta, save_student
from students.load import load_sam
from students.registry import DEFAULT_STUDENT
from students.taps import student_taps_for
from teachers.build import TEACHER_SIZES, random_vit_tiny, sam_from_state, sam_name_from_state
from teachers.cache_read import CacheInfo, check_manifest, open_cache
from teachers.runtime.files import file_sha256, read_checkpoint
from teachers.runtime.preempt import StopRequest
from teachers.sam_mini import shipped_weights


class DistillModel(torch.nn.Module):
    """The student plus the projections of its tapped blocks (dropped at export); for phase 2
    also SAM's prompt encoder and the student's own mask decoder (`distill.align`)."""

    def __init__(
        self,
        student: torch.nn.Module,
        taps: list[int],
        teacher_width: int,
        heads: Sam | None = None,
    ) -> None:
        super().__init__()
        self.student, self.taps = student, taps
        self.projections = TapProjections(student.embed_dim, teacher_width, len(taps))
        if heads is not None:
            self.prompt_encoder = heads.prompt_encoder
            self.mask_decoder = heads.mask_decoder

    def forward(
        self, image: torch.Tensor, tokens: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """image [B, 3, S, S] -> embedding [B, 256, S/16, S/16], projected taps [B, S/16, S/16, Ct];
        with token positions [B, K] (a token-reduced cache), taps [B, K, Ct]: only the stored
        tokens go through the projections."""
        embed, feats = self.student.forward_features(image, self.taps)
        taps = [feats[t] for t in self.taps]
        if tokens is not None:
            taps = [gather_tokens(t, tokens) for t in taps]
        return embed, self.projections(taps)


def feature_pairs(cache: CacheInfo) -> list[str]:
    """The cache's features in loss order: the tapped blocks, then the final embedding."""
    return cache.features[1:] + cache.features[:1]


class DistillLoss:
    """The engine's loss function: DLD-weighted, padding-masked MSE of every (student, teacher)
    pair, the final embedding last. Returns "loss" and one term per pair, named by the feature."""

    def __init__(self, cfg: DistillConfig, cache: CacheInfo) -> None:
        self.cfg, self.pairs = cfg, feature_pairs(cache)
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
        tokens = (batch["tokens"],) if "tokens" in batch else ()
        embed, taps = engine(batch["image"].to(engine.dtype), *tokens)
        return self.terms(embed, taps, batch, engine.step_index)

    def terms(self, embed, taps, batch: dict, step: int) -> dict[str, torch.Tensor]:
        """The weighted loss and each pair's loss of the student's outputs on `batch`."""
        targets = [batch[name] for name in self.pairs]
        valid, tokens = batch["valid"], batch.get("tokens")
        losses = pair_losses(embed, taps, targets[-1], targets[:-1], valid, tokens)
        weighted = weighted_loss(losses, self.weights(step))
        return {"loss": weighted} | dict(zip(self.pairs, losses, strict=True))


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
        "reduction": cfg.reduction,
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
        reduction=cache.reduction,
    )
    return cache, replace(cfg, **facts), [k for k, v in stated.items() if v is None]


def load_init(cfg: DistillConfig, cache: CacheInfo) -> tuple[DistillConfig, Sam | None]:
    """The config with the student's name settled, and the `--init` student as a `Sam` (None
    without --init). The file must be a student.pt of this cache's teacher and image size."""
    if cfg.init is None:
        return replace(cfg, student=cfg.student or DEFAULT_STUDENT), None
    meta = read_export_meta(cfg.init)
    name = meta["student"]["name"]
    if cfg.student not in (None, name):
        raise ValueError(f"--student {cfg.student} but --init {cfg.init} holds {name}")
    if meta["img_size"] != cache.img_size:
        raise ValueError(
            f"--init {cfg.init} was trained at {meta['img_size']} px, the cache {cache.folder} "
            f"holds {cache.img_size} px features"
        )
    if meta["teacher"]["sha256"] != cache.teacher_sha256:
        raise ValueError(
            f"--init {cfg.init} was distilled from another teacher (sha256 "
            f"{meta['teacher']['sha256'][:12]}) than the cache {cache.folder} holds "
            f"({cache.teacher_sha256[:12]})"
        )
    return replace(cfg, student=name), load_sam(cfg.init)


def build_model(
    cfg: DistillConfig, teacher: str, teacher_taps: list[int], init: Sam | None = None
) -> DistillModel:
    """The seeded student (or the `--init` one), its taps paired with the teacher's, and their
    projections; for phase 2 with the init's prompt encoder and mask decoder."""
    torch.manual_seed(cfg.seed)
    if init is None:
        try:
            student = build_student(cfg.student, img_size=cfg.img_size, **cfg.student_kwargs())
        except (TypeError, ValueError) as e:
            raise ValueError(
                f"--student {cfg.student} --student-options {cfg.student_options!r}: {e}"
            ) from None
    else:
        student = init.image_encoder.train()
    width, depth = TEACHER_SIZES[teacher]
    taps = list(cfg.student_taps or student_taps_for(teacher_taps, depth, len(student.blocks)))
    if len(taps) != len(teacher_taps):
        raise ValueError(
            f"--student-taps {taps} must pair one-to-one with teacher taps {teacher_taps}"
        )
    heads = init if cfg.phase == "decoder" else None
    return DistillModel(student, taps, width, heads)


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
        max_prompts=cfg.max_prompts if cfg.phase == "decoder" else 0,
    )
    restore_streams(spec, layout, job, mine, engine.step_index)
    return StreamTracker(spec, layout)


def teacher_heads(cfg: DistillConfig, cache: CacheInfo) -> Sam:
    """The teacher as a `Sam` for its prompt encoder and mask decoder: from the teacher
    checkpoint, the shipped sam_mini, or the seeded random vit_tiny a cache was made with."""
    sha = cache.teacher_sha256
    if cfg.teacher_ckpt is not None:
        # Mapped: the image encoder's weights (2.5 GB for ViT-H) are never read.
        state = read_checkpoint(cfg.teacher_ckpt, mmap=True)
        return sam_from_state(cfg.teacher, state, cfg.teacher_ckpt)
    if cfg.teacher == "vit_tiny" and sha.startswith("random-seed-"):
        return random_vit_tiny(int(sha.rsplit("-", 1)[1]))
    if cfg.teacher == "sam_mini":
        path = shipped_weights()
        if file_sha256(path) != sha:
            raise ValueError(
                f"the cache was made with other sam_mini weights (sha256 {sha}) than the shipped "
                f"{path}: pass --teacher-ckpt with the file it was made with"
            )
        return sam_from_state("sam_mini", read_checkpoint(path), str(path))
    raise ValueError(
        "--teacher-ckpt is required for the teacher's prompt encoder and mask decoder "
        "(student.pt carries them; --phase decoder decodes with them)"
    )


def export(
    cfg: DistillConfig, model: DistillModel, cache: CacheInfo, heads: Sam | None = None
) -> Path:
    """Rank 0 at the end: the training plot and student.pt. Its prompt encoder is the teacher's
    (`heads`, loaded here when the run did not need them before); its mask decoder the
    student's own when phase 2 trained it, else the teacher's."""
    out, heads = Path(cfg.out), heads or teacher_heads(cfg, cache)
    plot_run(out, loss_terms(cfg, cache), dld=cfg.phase == "encoder")
    own = cfg.phase == "decoder" and cfg.tune != "encoder"
    path = save_student(
        out / "student.pt",
        model.student,
        heads,
        teacher=cfg.teacher,
        teacher_sha256=cache.teacher_sha256,
        step=cfg.steps,
        mask_decoder=model.mask_decoder if own else None,
    )
    decoder = "its own (phase 2)" if own else "the teacher's"
    print(
        f"exported {path} (student {cfg.student}, step {cfg.steps}, mask decoder {decoder}); "
        f"log {out / 'log.csv'}, plot {out / 'training.png'}"
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


def build_loss(cfg: DistillConfig, cache: CacheInfo, model: DistillModel, heads: Sam | None):
    """Phase 1's `DistillLoss`, or phase 2's `AlignLoss` (with phase 1's as its feature term)
    after freezing what phase 2 does not train."""
    features = DistillLoss(cfg, cache)
    if cfg.phase == "encoder":
        return features
    set_trainable_parts(model, cfg)
    return AlignLoss(cfg, heads, features)


def train(cfg: DistillConfig, stop: StopRequest | None = None) -> Path:
    """Run (or resume) a distillation; return the path of the exported student.pt. A stop
    request (SIGUSR1/SIGTERM) saves a checkpoint after the current step and raises Preempted."""
    env = start_processes(cfg)
    cache, cfg, taken = open_checked_cache(cfg)
    cfg, init = load_init(cfg, cache)
    ckpt_dir = prepare_run(cfg, cache, taken, env.rank)
    heads = teacher_heads(cfg, cache) if cfg.phase == "decoder" else None
    model = build_model(cfg, cfg.teacher, cache.taps, init)
    loss = build_loss(cfg, cache, model, heads)
    engine = build_engine(cfg, model, model.parameters(), loss, env, stop)
    start, job, mine = engine.resume(ckpt_dir) if cfg.resume == "auto" else (0, None, None)
    streams = open_streams(cfg, cache, engine, job, mine)
    progress = RunProgress(cfg, log_columns(cfg, cache), start, env.rank)

    def record(step: int, losses: dict, seconds: float) -> None:
        counts = [float(streams.num_corrupt), float(streams.num_unprompted)]
        corrupt, unprompted = (int(c) for c in engine.all_reduce(counts))
        weights = loss.weights(step) if cfg.phase == "encoder" else []
        row = {"num_corrupt": corrupt}
        if cfg.phase == "decoder":
            row["num_unprompted"] = unprompted
        log_step(progress, step, losses, weights, engine, row, seconds)

    engine.run(streams, ckpt_dir, start, record, also_close=(progress,))
    if env.rank == 0:
        export(cfg, model, cache, heads)
    engine.barrier()  # the others wait for the export
    return Path(cfg.out) / "student.pt"


def loss_terms(cfg: DistillConfig, cache: CacheInfo) -> list[str]:
    """The run's named loss terms: phase 1 one per feature pair, the final embedding last;
    phase 2 mask and, with a weight, feature."""
    if cfg.phase == "encoder":
        return feature_pairs(cache)
    return ["mask"] + (["feature"] if cfg.feature_weight > 0 else [])


def log_columns(cfg: DistillConfig, cache: CacheInfo) -> list[str]:
    """log.csv's columns: every loss term (phase 1 with its DLD weight), the rate, the counts."""
    terms = loss_terms(cfg, cache)
    columns = ["loss_total"] + [f"loss_{t}" for t in terms]
    if cfg.phase == "encoder":
        columns += [f"weight_{t}" for t in terms]
    counts = ["num_corrupt"] + (["num_unprompted"] if cfg.phase == "decoder" else [])
    return [*columns, "lr", "images_per_s", *counts, "num_nonfinite"]


def log_step(
    progress: RunProgress,
    step: int,
    losses: dict,
    weights: list[float],
    engine: Engine,
    counts: dict[str, int],
    seconds: float,
) -> None:
    """One row of log.csv and the console line for step `step` (0-based)."""
    terms = [name for name in losses if name != "loss"]
    rate = engine.cfg.batch_size / seconds
    values = {"loss_total": losses["loss"]} | {f"loss_{t}": losses[t] for t in terms}
    values |= {f"weight_{t}": w for t, w in zip(terms, weights)}
    values |= {"lr": engine.lr, "images_per_s": rate, **counts}
    values["num_nonfinite"] = engine.num_nonfinite
    shown = " ".join(f"{k.removeprefix('num_')} {v}" for k, v in counts.items())
    focus = terms[-1] if weights else terms[0]  # the final embedding's pair, or the mask loss
    line = (
        f"loss {losses['loss']:.5g} {focus} {losses[focus]:.5g} lr {engine.lr:.3g} "
        f"{rate:.1f} img/s {shown} non-finite {engine.num_nonfinite}"
    )
    progress.step(step + 1, values, line, loss=f"{losses['loss']:.4g}", img_s=f"{rate:.1f}")
