"""The distillation loop on DeepSpeed: cached teacher features in, a trained `student.pt` out.

Read top to bottom: set up the process group, check the cache against the run, build the
student with its tap projections, hand them to DeepSpeed, resume if asked, then loop over steps
(DLD weights for the step's progress, micro-batches, a guard against non-finite losses, logs,
checkpoints), and export. Runs the same under `deepspeed` (GPUs with nccl, or CPUs with gloo)
and as a single plain `python` process.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import time
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
from deepspeed.runtime.fp16.loss_scaler import LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils.tensor_fragment import fragment_address
from tqdm import tqdm

from distill.config import DistillConfig, batch_layout, deepspeed_config
from distill.data import DataSpec, StreamLayout, make_loader, resolve_shards
from distill.logs import StepLog, plot_run
from distill.losses import TapProjections, pair_losses, student_taps_for, weighted_loss
from distill.schedule import dld_weights, pair_every_from_epochs
from students import build_student
from students.export import save_student
from teachers.build import (
    DEFAULT_TAPS,
    TEACHER_SIZES,
    file_sha256,
    load_sam_checkpoint,
    random_vit_tiny,
    read_checkpoint,
    sam_name_from_state,
)
from teachers.cache_read import check_manifest, load_manifest
from teachers.runtime import DistEnv, dist_env, local_cuda_device
from teachers.teacher import EMBED, tap_name


class SafeCheckpointEngine(TorchCheckpointEngine):
    """DeepSpeed's torch checkpoint engine, loading with `weights_only=True` like every checkpoint
    in this project (its own loader unpickles arbitrary objects). ZeRO optimizer states hold three
    small DeepSpeed records, allowed by name and nothing else."""

    ALLOWED = (LossScaler, ZeroStageEnum, fragment_address)

    def load(self, path: str, map_location=None):
        with torch.serialization.safe_globals(list(self.ALLOWED)):
            return torch.load(path, map_location=map_location, weights_only=True)


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


def init_process_group(device: str) -> DistEnv:
    """Map SLURM's or a plain process's placement to RANK/WORLD_SIZE and start DeepSpeed's group."""
    env = dist_env()
    os.environ.update(
        RANK=str(env.rank), WORLD_SIZE=str(env.world_size), LOCAL_RANK=str(env.local_rank)
    )
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        if env.world_size > 1:
            raise ValueError(
                "MASTER_PORT is not set: launch several processes with deepspeed, torchrun or srun"
            )
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    if device == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        # Processes sharing a node's cores: oversubscribed threads make every step crawl.
        local = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or 1)
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
    deepspeed.init_distributed(dist_backend="nccl" if device == "cuda" else "gloo", verbose=False)
    return env


def check_cache(cfg: DistillConfig) -> tuple[list[str], dict, str, str | None]:
    """Shards, manifest, teacher name and its checkpoint state source, checked before step one."""
    shards, folder = resolve_shards(cfg.shards)
    manifest = load_manifest(folder)
    teacher = cfg.teacher
    if cfg.teacher_ckpt is not None:
        # Mapped, not read: only the patch embedding's width is looked at (ViT-H is 2.5 GB).
        state = read_checkpoint(cfg.teacher_ckpt, mmap=True)
        found = sam_name_from_state(state, cfg.teacher_ckpt)
        if teacher not in (None, found):
            raise ValueError(
                f"--teacher {teacher} but --teacher-ckpt {cfg.teacher_ckpt} holds {found}"
            )
        teacher = found
        sha = file_sha256(cfg.teacher_ckpt)
        if sha != manifest["teacher_sha256"]:
            raise ValueError(
                f"cache {folder} was made with another teacher checkpoint than {cfg.teacher_ckpt} (sha256 differs)"
            )
    teacher = teacher or "vit_h"
    taps = list(cfg.teacher_taps) if cfg.teacher_taps is not None else list(DEFAULT_TAPS[teacher])
    check_manifest(
        manifest,
        f"cache {folder}",
        teacher=teacher,
        taps=taps,
        img_size=cfg.img_size,
        codec=cfg.codec,
    )
    if not manifest["complete"]:
        raise ValueError(
            f"cache {folder} is incomplete: finish it with launch/cache_teacher.py first"
        )
    return shards, manifest, teacher, cfg.teacher_ckpt


def _heads_source(teacher: str, ckpt: str | None, manifest: dict):
    """The SAM whose prompt encoder and mask decoder go into student.pt."""
    if ckpt is not None:
        return load_sam_checkpoint(teacher, ckpt)
    sha = manifest["teacher_sha256"]
    if teacher == "vit_tiny" and sha.startswith("random-seed-"):
        return random_vit_tiny(int(sha.rsplit("-", 1)[1]))
    raise ValueError(
        "--teacher-ckpt is required to export student.pt (its prompt encoder and mask decoder)"
    )


def _latest(ckpt_dir: Path) -> str | None:
    latest = ckpt_dir / "latest"
    return latest.read_text().strip() if latest.exists() else None


def _prune(ckpt_dir: Path, keep: int) -> None:
    tags = sorted(p for p in ckpt_dir.iterdir() if p.is_dir() and p.name.startswith("step"))
    for old in tags[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def _all_reduce(values: list[float], op=dist.ReduceOp.SUM) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, op=op)
    return t.tolist()


def build_model(cfg: DistillConfig, teacher: str, teacher_taps: list[int]) -> DistillModel:
    """The seeded student, its taps paired with the teacher's, and their projections."""
    torch.manual_seed(cfg.seed)
    student = build_student(cfg.student, img_size=cfg.img_size)
    width, depth = TEACHER_SIZES[teacher]
    taps = (
        list(cfg.student_taps)
        if cfg.student_taps
        else student_taps_for(teacher_taps, depth, len(student.blocks))
    )
    if len(taps) != len(teacher_taps):
        raise ValueError(
            f"--student-taps {taps} must pair one-to-one with teacher taps {teacher_taps}"
        )
    return DistillModel(student, taps, width)


def restore_streams(spec: DataSpec, state: dict, layout: StreamLayout, rank: int) -> None:
    """Put the data streams where the checkpoint left them (or reseed if the layout changed)."""
    if not state:
        return
    if state["layout"] == [layout.world_size, layout.accum, layout.subs]:
        spec.positions = {int(k): tuple(v) for k, v in state["positions"][rank].items()}
        spec.first_micro_batch = state["micro_batches"]
        return
    print(
        "WARNING: processes, accumulation or loader workers changed since the checkpoint: "
        "the data streams restart with a new seed instead of at their saved position",
        file=sys.stderr,
    )
    spec.seed += state["step"]


class Progress:
    """Rank 0's view of the run: CSV/TensorBoard rows, the progress bar and console lines."""

    def __init__(
        self, cfg: DistillConfig, out: Path, pairs: list[str], start: int, rank: int
    ) -> None:
        self.cfg, self.pairs, self.rank = cfg, pairs, rank
        columns = ["loss_total"] + [f"loss_{p}" for p in pairs] + [f"weight_{p}" for p in pairs]
        columns += ["lr", "images_per_s", "num_corrupt", "num_nonfinite"]
        self.log = StepLog(out, columns, start) if rank == 0 else None
        self.bar = tqdm(
            total=cfg.steps, initial=start, unit="step", disable=rank != 0 or not cfg.progress
        )

    def step(
        self,
        step: int,
        means: list[float],
        weights: list[float],
        lr: float,
        seconds: float,
        corrupt: int,
        nonfinite: int,
    ) -> None:
        self.bar.update(1)
        if self.log is None:
            return
        total = sum(w * m for w, m in zip(weights, means, strict=True))
        values = {"loss_total": total} | {
            f"loss_{p}": m for p, m in zip(self.pairs, means, strict=True)
        }
        values |= {f"weight_{p}": w for p, w in zip(self.pairs, weights, strict=True)}
        rate = self.cfg.batch_size / seconds
        values |= {
            "lr": lr,
            "images_per_s": rate,
            "num_corrupt": corrupt,
            "num_nonfinite": nonfinite,
        }
        self.log.write(step, values)
        self.bar.set_postfix(loss=f"{total:.4g}", embed=f"{means[-1]:.4g}", img_s=f"{rate:.1f}")
        if step % self.cfg.log_every == 0 or step == self.cfg.steps:
            self.bar.write(
                f"step {step}/{self.cfg.steps} loss {total:.5g} final-embedding {means[-1]:.5g} "
                f"lr {lr:.3g} {rate:.1f} img/s corrupt {corrupt} non-finite {nonfinite}"
            )

    def close(self) -> None:
        self.bar.close()
        if self.log is not None:
            self.log.close()


def save_checkpoint(engine, ckpt_dir: Path, client: dict, positions: dict, keep: int) -> None:
    """A DeepSpeed checkpoint on every rank, with every rank's data positions in rank 0's state."""
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, positions)
    tag = f"step{client['step']:08d}"
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client | {"positions": gathered})
    if dist.get_rank() == 0:
        _prune(ckpt_dir, keep)


def export(
    cfg: DistillConfig,
    model: DistillModel,
    manifest: dict,
    teacher: str,
    teacher_ckpt: str | None,
    pairs: list[str],
) -> Path:
    """Rank 0 at the end: the training plot and student.pt."""
    out = Path(cfg.out)
    plot_run(out, pairs)
    heads = _heads_source(teacher, teacher_ckpt, manifest)
    path = save_student(
        out / "student.pt",
        model.student,
        heads,
        teacher=teacher,
        teacher_sha256=manifest["teacher_sha256"],
        step=cfg.steps,
    )
    print(
        f"exported {path} (student {cfg.student}, step {cfg.steps}); "
        f"log {out / 'log.csv'}, plot {out / 'training.png'}"
    )
    return path


def train(cfg: DistillConfig) -> Path:
    """Run (or resume) a distillation; return the path of the exported student.pt."""
    device = (
        cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    )
    env = init_process_group(device)
    if device == "cuda":
        torch.cuda.set_device(local_cuda_device(env))
    out, ckpt_dir = Path(cfg.out), Path(cfg.out) / "checkpoints"
    shards, manifest, teacher, teacher_ckpt = check_cache(cfg)
    if _latest(ckpt_dir) and cfg.resume != "auto":
        raise ValueError(
            f"{out} already holds checkpoints: pass --resume auto to continue, or choose another --out"
        )
    out.mkdir(parents=True, exist_ok=True)
    micro, accum = batch_layout(cfg, env.world_size)
    teacher_taps = list(manifest["taps"])
    model = build_model(cfg, teacher, teacher_taps)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, config=deepspeed_config(cfg, env.world_size)
    )
    engine.checkpoint_engine = SafeCheckpointEngine(engine._config)
    dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float32

    start, state = 0, {}
    if cfg.resume == "auto" and _latest(ckpt_dir):
        _, state = engine.load_checkpoint(str(ckpt_dir))
        start = state["step"]
        print(
            f"rank {env.rank}: resumed from {ckpt_dir / _latest(ckpt_dir)} at step {start}",
            flush=True,
        )
    layout = StreamLayout.choose(env.rank, env.world_size, accum, cfg.workers)
    spec = DataSpec(
        shards, cfg.img_size, teacher_taps, micro, cfg.seed, cfg.shuffle_buffer, cfg.on_corrupt
    )
    restore_streams(spec, state, layout, env.rank)
    batches = iter(make_loader(spec, layout))

    pairs = [tap_name(t) for t in teacher_taps] + [EMBED]
    every = None
    if cfg.dld_every_epochs is not None:
        steps_per_epoch = max(1, manifest["num_samples"] // cfg.batch_size)
        every = pair_every_from_epochs(cfg.dld_every_epochs, steps_per_epoch, cfg.steps)
    if env.rank == 0:
        (out / "config.json").write_text(json.dumps(cfg.to_json(), indent=1))
    progress = Progress(cfg, out, pairs, start, env.rank)
    positions, consumed = dict(spec.positions), spec.first_micro_batch
    corrupt, nonfinite = state.get("num_corrupt", 0), state.get("num_nonfinite", 0)
    consecutive = 0

    for step in range(start, cfg.steps):
        tic = time.perf_counter()
        weights = dld_weights(
            step / cfg.steps, len(pairs), cfg.dld, floor=cfg.dld_floor, every=every
        )
        sums, done = [0.0] * len(pairs), 0
        while done < accum:
            batch = next(batches)
            consumed += 1
            positions[batch["stream"]] = tuple(batch["position"])
            corrupt += int(batch["num_corrupt"])
            embed, taps = engine(batch["image"].to(engine.device, dtype))
            teacher_feats = [batch[tap_name(t)].to(engine.device) for t in teacher_taps]
            valid = batch["valid"].to(engine.device)
            losses = pair_losses(embed, taps, batch[EMBED].to(engine.device), teacher_feats, valid)
            loss = weighted_loss(losses, weights)
            # Every rank must agree before backward, or the gradient all-reduce would hang.
            if _all_reduce([float(torch.isfinite(loss))], dist.ReduceOp.MIN)[0] < 1.0:
                nonfinite, consecutive = nonfinite + 1, consecutive + 1
                print(
                    f"step {step}: non-finite loss, micro-batch skipped ({consecutive} in a row)",
                    file=sys.stderr,
                    flush=True,
                )
                if consecutive >= cfg.max_nonfinite:
                    raise RuntimeError(
                        f"{consecutive} micro-batches in a row had a non-finite loss: stopping at step {step}. "
                        "Lower --lr, use --precision fp32, or check the cache with --verify."
                    )
                continue
            consecutive = 0
            engine.backward(loss)
            engine.step()
            sums = [s + x.item() for s, x in zip(sums, losses, strict=True)]
            done += 1
        means = [v / (accum * env.world_size) for v in _all_reduce(sums)]
        total_corrupt = int(_all_reduce([float(corrupt)])[0])
        seconds = time.perf_counter() - tic
        progress.step(
            step + 1, means, weights, scheduler.get_last_lr()[0], seconds, total_corrupt, nonfinite
        )
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
            client = {
                "step": step + 1,
                "micro_batches": consumed,
                "num_corrupt": corrupt,
                "num_nonfinite": nonfinite,
                "layout": [env.world_size, accum, layout.subs],
                "config": cfg.to_json(),
            }
            save_checkpoint(engine, ckpt_dir, client, positions, cfg.keep_checkpoints)
    progress.close()

    path = out / "student.pt"
    if env.rank == 0:
        export(cfg, model, manifest, teacher, teacher_ckpt, pairs)
    dist.barrier()
    return path
