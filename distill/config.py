"""The distillation run's configuration, and the DeepSpeed config derived from it."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from distill.schedule import DLD_MODES

PRECISIONS = ("fp32", "bf16")


@dataclass
class DistillConfig:
    """Everything one distillation run needs; stored in every checkpoint and in OUT/config.json."""

    shards: str = ""
    """Cache folder (with manifest.json) or a glob of its shards."""
    student: str = "dfa_s"
    """Student registry name (see `students.list_students()`)."""
    out: str = ""
    """Run folder: checkpoints, logs, plots and the exported student.pt."""
    steps: int = 1000
    """Optimizer steps."""
    batch_size: int = 8
    """Global batch size (all processes, all accumulated micro-batches)."""
    micro_batch_size: int | None = None
    """Samples per process per forward; default batch_size / world size (no accumulation)."""
    lr: float = 1e-3
    """Peak learning rate (AdamW)."""
    weight_decay: float = 0.05
    """AdamW weight decay."""
    warmup_steps: int | None = None
    """Linear warm-up steps; default 5% of steps. Cosine decay to min_lr_ratio * lr after."""
    min_lr_ratio: float = 0.01
    """Final learning rate as a fraction of lr."""
    grad_clip: float = 1.0
    """Gradient norm clipping (0 disables)."""
    dld: str = "progressive"
    """Dynamic layer-wise weights: progressive, stepwise, final_only or uniform."""
    dld_floor: float = 0.2
    """Least weight of the final embedding (progressive, stepwise)."""
    dld_every_epochs: float | None = None
    """stepwise: epochs per pair; default spreads the pairs evenly over the run."""
    teacher: str | None = None
    """Expected teacher name; default read from --teacher-ckpt, else vit_h."""
    teacher_ckpt: str | None = None
    """Teacher checkpoint: its sha256 must match the cache; its prompt encoder and mask decoder
    go into student.pt. Optional only for a vit_tiny cache made with random weights."""
    teacher_taps: tuple[int, ...] | None = None
    """Expected tapped teacher blocks; default the teacher's global-attention blocks."""
    student_taps: tuple[int, ...] | None = None
    """Student blocks paired with the teacher taps; default the same relative depths."""
    img_size: int = 1024
    """Expected cache image size (the student's input side)."""
    codec: str | None = None
    """Expected cache codec; None accepts any."""
    precision: str = "fp32"
    """fp32 or bf16 (DeepSpeed bf16: bf16 weights and activations, fp32 master weights)."""
    zero_stage: int = 0
    """DeepSpeed ZeRO stage (0, 1 or 2)."""
    checkpoint_every: int = 500
    """Steps between checkpoints (the last step always checkpoints)."""
    keep_checkpoints: int = 2
    """Checkpoints kept on disk (newest)."""
    resume: str | None = None
    """"auto": continue from the newest checkpoint in OUT; None: OUT must hold none."""
    log_every: int = 10
    """Steps between console log lines (the CSV gets every step)."""
    workers: int = 2
    """Data loader workers per process."""
    shuffle_buffer: int = 32
    """Samples shuffled together within a shard."""
    on_corrupt: str = "skip"
    """A corrupt sample is skipped and counted ("skip") or stops the run ("stop")."""
    max_nonfinite: int = 20
    """Consecutive micro-batches with a non-finite loss that stop the run."""
    seed: int = 0
    """Seed for the student's initialisation and the data streams."""
    device: str = "auto"
    """auto, cpu or cuda."""
    progress: bool = True
    """Show a progress bar (rank 0)."""

    def __post_init__(self) -> None:
        if not self.shards:
            raise ValueError("--shards is required (a cache folder or a glob of its shards)")
        if not self.out:
            raise ValueError("--out is required")
        positive = (
            "steps",
            "batch_size",
            "checkpoint_every",
            "keep_checkpoints",
            "log_every",
            "shuffle_buffer",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(
                    f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}"
                )
        if self.dld not in DLD_MODES:
            raise ValueError(f"--dld {self.dld!r}: choose one of {', '.join(DLD_MODES)}")
        if self.precision not in PRECISIONS:
            raise ValueError(
                f"--precision {self.precision!r}: choose one of {', '.join(PRECISIONS)}"
            )
        if self.zero_stage not in (0, 1, 2):
            raise ValueError(f"--zero-stage {self.zero_stage}: choose 0, 1 or 2")
        if self.resume not in (None, "auto"):
            raise ValueError(f"--resume {self.resume!r}: only 'auto' is supported")
        if self.on_corrupt not in ("skip", "stop"):
            raise ValueError(f"--on-corrupt {self.on_corrupt!r}: choose skip or stop")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"--device {self.device!r}: choose auto, cpu or cuda")
        if self.lr <= 0:
            raise ValueError(f"--lr must be positive, got {self.lr}")

    @classmethod
    def from_file(cls, path: str | Path, **overrides: object) -> DistillConfig:
        """Fields from a JSON file, then `overrides` (explicit command-line flags) on top."""
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"--config {path}: cannot read it as JSON ({err})") from err
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"--config {path}: unknown keys {unknown}")
        merged = data | overrides
        for key in ("teacher_taps", "student_taps"):
            if merged.get(key) is not None:
                merged[key] = tuple(merged[key])
        return cls(**merged)

    def to_json(self) -> dict:
        return asdict(self)


def batch_layout(cfg: DistillConfig, world_size: int) -> tuple[int, int]:
    """(micro-batch per process, accumulation steps) for the global batch over `world_size`."""
    micro = cfg.micro_batch_size or cfg.batch_size // world_size
    if micro < 1 or cfg.batch_size % (micro * world_size):
        raise ValueError(
            f"--batch-size {cfg.batch_size} is not a multiple of micro-batch {micro} x "
            f"{world_size} processes; adjust --batch-size or --micro-batch-size"
        )
    return micro, cfg.batch_size // (micro * world_size)


def deepspeed_config(cfg: DistillConfig, world_size: int) -> dict:
    """The DeepSpeed config for `cfg`: batch sizes stated once, here."""
    micro, accum = batch_layout(cfg, world_size)
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else max(1, cfg.steps // 20)
    return {
        "train_batch_size": cfg.batch_size,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": cfg.grad_clip,
        "bf16": {"enabled": cfg.precision == "bf16"},
        "zero_optimization": {"stage": cfg.zero_stage},
        "scheduler": {
            "type": "WarmupCosineLR",
            "params": {
                "total_num_steps": cfg.steps,
                "warmup_num_steps": min(warmup, cfg.steps),
                "warmup_type": "linear",
                "warmup_min_ratio": 0.0,
                "cos_min_ratio": cfg.min_lr_ratio,
            },
        },
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
