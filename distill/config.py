"""Training-run configurations and the DeepSpeed config derived from them.

`TrainConfig` holds what every training job shares (run folder, steps, batch layout, optimizer,
precision, checkpoints, engine); each job's config adds its own fields to it (`DistillConfig`).
The command-line flags are made from these fields, their defaults and their docstrings
(`teachers.runtime.flags`): a default is stated here and nowhere else. Field metadata `choices`
lists the accepted values of a field, which `__post_init__` checks for flags and JSON files alike.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from distill.schedule import DLD_MODES
from teachers.reduction import num_tokens

PRECISIONS = ("fp32", "bf16")
ENGINES = ("deepspeed", "torch")
PHASES = ("encoder", "decoder")


def _check_at_least(cfg: object, name: str, least: float) -> None:
    """A numeric field that must be `least` or more (None: unset)."""
    value = getattr(cfg, name)
    if value is not None and value < least:
        hint = " (0 disables it)" if name == "grad_clip" else ""
        raise ValueError(f"--{name.replace('_', '-')} must be {least} or more{hint}, got {value}")


def _check_choices(cfg: object) -> None:
    for f in fields(cfg):
        choices = f.metadata.get("choices")
        value = getattr(cfg, f.name)
        if choices is not None and value is not None and value not in choices:
            raise ValueError(
                f"--{f.name.replace('_', '-')} {value!r}: choose one of "
                + ", ".join(str(c) for c in choices)
            )


@dataclass
class TrainConfig:
    """What every training job on the engine (`distill.engine`) shares; stored in every
    checkpoint and in OUT/config.json."""

    out: str = ""
    """Run folder: checkpoints, logs, plots and the exported model."""
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
    precision: str = field(default="fp32", metadata={"choices": PRECISIONS})
    """fp32 or bf16 (bf16 activations, fp32 master weights)."""
    zero_stage: int = field(default=0, metadata={"choices": (0, 1, 2)})
    """DeepSpeed ZeRO stage (0, 1 or 2)."""
    engine: str = field(default="deepspeed", metadata={"choices": ENGINES})
    """Training engine: deepspeed (any number of processes, ZeRO) or torch (plain PyTorch, one
    process)."""
    checkpoint_every: int = 500
    """Steps between checkpoints (the last step, and a step where a signal stops the run, always
    checkpoint)."""
    keep_checkpoints: int = 2
    """Checkpoints kept on disk (newest)."""
    resume: str | None = field(default=None, metadata={"choices": ("auto",)})
    """"auto": continue from the newest checkpoint in OUT; unset: OUT must hold none."""
    overwrite: bool = False
    """Allow an OUT that holds another run's exported model but no checkpoints, or a teacher
    cache; without it such an OUT is refused."""
    log_every: int = 10
    """Steps between console log lines (the CSV gets every step)."""
    max_nonfinite: int = 20
    """Consecutive micro-batches with a non-finite loss that stop the run."""
    seed: int = 0
    """Seed for the model's initialisation and the data streams."""
    device: str = field(default="auto", metadata={"choices": ("auto", "cpu", "cuda")})
    """auto, cpu or cuda."""
    progress: bool = True
    """Show a progress bar (rank 0)."""

    def __post_init__(self) -> None:
        if not self.out:
            raise ValueError("--out is required")
        positive = ("steps", "batch_size", "checkpoint_every", "keep_checkpoints", "log_every")
        positive += ("max_nonfinite",)
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(
                    f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}"
                )
        if self.micro_batch_size is not None and self.micro_batch_size < 1:
            raise ValueError(
                f"--micro-batch-size must be at least 1, got {self.micro_batch_size}; leave it "
                "unset for --batch-size / processes"
            )
        if self.lr <= 0:
            raise ValueError(f"--lr must be positive, got {self.lr}")
        at_least_zero = ("weight_decay", "grad_clip", "warmup_steps")
        for name in at_least_zero:
            _check_at_least(self, name, 0)
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(
                f"--min-lr-ratio is a fraction of --lr: give 0 to 1, got {self.min_lr_ratio}"
            )
        if self.engine == "torch" and self.zero_stage:
            raise ValueError("--zero-stage needs --engine deepspeed")
        _check_choices(self)

    @classmethod
    def from_file(cls, path: str | Path, **overrides: object) -> TrainConfig:
        """Fields from a JSON file, then `overrides` (explicit command-line flags) on top."""
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"--config {path}: cannot read it as JSON ({err})") from err
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ValueError(f"--config {path}: unknown keys {unknown}")
        merged = data | overrides
        for key, value in merged.items():
            if isinstance(value, list):
                merged[key] = tuple(value)
        return cls(**merged)

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class DistillConfig(TrainConfig):
    """One distillation run: a student trained on a teacher-feature cache.

    teacher, teacher_taps, img_size, codec and reduction are facts of the cache: left unset they
    are read from its manifest.json; set, they must agree with it.
    """

    shards: str = ""
    """Cache folder (with manifest.json) or a glob of its shards."""
    student: str | None = None
    """Student registry name (see `students.list_students()`); default dfa_s, or the --init
    file's student (a different name with --init is refused)."""
    student_options: str = ""
    """Builder options of --student as key=number pairs, e.g. "embed_dim=64" for a narrower
    dfa_t (see students/encoder.py); recorded in student.pt, which rebuilds from them."""
    init: str | None = None
    """A student.pt to start from (a phase-1 student for --phase decoder, or a pruned student):
    the student's architecture and image-encoder weights come from it, the tap projections
    start fresh."""
    phase: str = field(default="encoder", metadata={"choices": PHASES})
    """encoder: feature distillation (phase 1); decoder: prompt-in-the-loop alignment of the
    masks the decoder draws from the student's embedding with the teacher's (phase 2, needs
    --init and a cache with annotations)."""
    tune: str = field(default="encoder", metadata={"choices": ("encoder", "decoder", "both")})
    """--phase decoder: which parts train: the image encoder, the mask decoder (a copy of the
    teacher's, exported in student.pt), or both. The prompt encoder stays frozen."""
    max_prompts: int = 8
    """--phase decoder: prompts per image, sampled from its annotations."""
    decode_iters: int = 0
    """--phase decoder: refinement clicks per prompt, each sampled where the student's and the
    teacher's masks disagree, every one adding a decoding round to the loss."""
    mask_target: str = field(default="soft", metadata={"choices": ("soft", "hard")})
    """--phase decoder: soft: BCE to the teacher's mask probabilities (least where the student's
    logits equal the teacher's); hard: BCE + Dice to the teacher's masks binarised at 0
    (EdgeSAM's), which asks for confident masks even where the teacher is unsure."""
    feature_weight: float = 0.0
    """--phase decoder: weight of phase 1's feature loss (with its DLD weights) beside the mask
    loss; 0 drops it."""
    dld: str = field(default="progressive", metadata={"choices": DLD_MODES})
    """Dynamic layer-wise weights: progressive, stepwise, final_only or uniform."""
    dld_floor: float = 0.2
    """Least weight of the final embedding (progressive, stepwise)."""
    dld_every_epochs: float | None = None
    """stepwise: epochs per pair; default spreads the pairs evenly over the run."""
    teacher: str | None = None
    """Expected teacher name; default the cache's (checked against --teacher-ckpt when given)."""
    teacher_ckpt: str | None = None
    """Teacher checkpoint: its sha256 must match the cache; its prompt encoder and mask decoder
    go into student.pt. Optional only for a vit_tiny cache made with random weights."""
    teacher_taps: tuple[int, ...] | None = None
    """Expected tapped teacher blocks; default the cache's."""
    student_taps: tuple[int, ...] | None = None
    """Student blocks paired with the teacher taps; default the same relative depths."""
    img_size: int | None = None
    """Expected cache image size (the student's input side); default the cache's."""
    codec: str | None = None
    """Expected cache codec: one for every field (fp16) or per field (embed=fp16,blocks=int8),
    checked field by field; default the cache's."""
    reduction: str | None = None
    """Expected reduction of the cache's block outputs: none, or tokens=K (K token positions per
    sample, the layer losses then run over them); default the cache's."""
    workers: int = 2
    """Data loader workers per process."""
    shuffle_buffer: int = 32
    """Samples shuffled together within a shard."""
    on_corrupt: str = field(default="skip", metadata={"choices": ("skip", "stop")})
    """A corrupt sample is skipped and counted ("skip") or stops the run ("stop")."""

    def __post_init__(self) -> None:
        if not self.shards:
            raise ValueError("--shards is required (a cache folder or a glob of its shards)")
        super().__post_init__()
        if self.reduction is not None:
            num_tokens(self.reduction, "--reduction")
        if self.shuffle_buffer < 1:
            raise ValueError(f"--shuffle-buffer must be at least 1, got {self.shuffle_buffer}")
        _check_at_least(self, "workers", 0)
        if not 0 <= self.dld_floor <= 1:
            raise ValueError(
                f"--dld-floor is the final embedding's least weight: give 0 to 1, got {self.dld_floor}"
            )
        if self.dld_every_epochs is not None and self.dld_every_epochs <= 0:
            raise ValueError(
                f"--dld-every-epochs must be positive, got {self.dld_every_epochs}; leave it unset "
                "to spread the pairs over the run"
            )
        if self.img_size is not None and (self.img_size < 16 or self.img_size % 16):
            raise ValueError(
                f"--img-size must be a positive multiple of 16 (the patch size), got {self.img_size}"
            )
        if self.student_options and self.init is not None:
            raise ValueError(
                "--student-options with --init: the architecture comes from the --init file"
            )
        self.student_kwargs()  # named errors now, not at step 0
        if self.phase == "decoder":
            if self.init is None:
                raise ValueError(
                    "--phase decoder starts from a phase-1 student: give --init STUDENT.pt"
                )
            if self.max_prompts < 1:
                raise ValueError(f"--max-prompts must be at least 1, got {self.max_prompts}")
            _check_at_least(self, "decode_iters", 0)
            _check_at_least(self, "feature_weight", 0)
            if self.tune == "decoder" and self.feature_weight > 0:
                raise ValueError(
                    "--feature-weight trains the encoder: it needs --tune encoder or both"
                )
        elif self.tune != "encoder":
            raise ValueError(f"--tune {self.tune} needs --phase decoder")

    def student_kwargs(self) -> dict[str, int | float]:
        """--student-options parsed."""
        return parse_number_options(self.student_options, "--student-options", "embed_dim=64")


ADAPT_METHODS = ("conv_lora", "lora", "cad", "sam_adapter", "meta", "decoder")  # students.adapters


@dataclass
class AdaptConfig(TrainConfig):
    """One adaptation run: an adapter (and the mask decoder) trained on a binary-mask folder
    (`distill/adapt.py`), the base encoder frozen."""

    ckpt: str = ""
    """Base model: a student.pt or an official SAM checkpoint (sam_vit_*.pth)."""
    method: str = field(default="conv_lora", metadata={"choices": ADAPT_METHODS})
    """Adapter method: conv_lora, lora, cad, sam_adapter, meta or decoder (mask decoder only)."""
    data: str = ""
    """Dataset folder with train/{images,masks} and val/{images,masks} (COD10K/CAMO layout)."""
    options: str = ""
    """Options of the adapter method as key=value pairs, e.g. "width=64,input_size=256" for cad
    or "r=4,alpha=16" for lora (defaults: the official ones, see students/adapters)."""
    freeze_decoder: bool = False
    """Keep the mask decoder frozen (train the adapter only)."""
    prompt: str = field(default="full_box", metadata={"choices": ("full_box", "gt_box")})
    """Box prompt per image: full_box (the whole image, the prompt-free recipe of CAD) or gt_box
    (the ground-truth mask's box)."""
    loss: str = field(default="structure", metadata={"choices": ("structure", "bce_dice")})
    """Mask loss: structure (weighted BCE + weighted IoU, Conv-LoRA's) or bce_dice."""
    merge: bool = False
    """Fold LoRA into the qkv weights at export (lora only): no inference cost."""
    val_every: int = 50
    """Steps between validations on the val split (and at the last step)."""
    workers: int = 2
    """Data loader workers per process."""
    on_bad: str = field(default="skip", metadata={"choices": ("skip", "stop")})
    """A bad image/mask pair is skipped and counted ("skip") or stops the run ("stop")."""
    lr: float = 2e-4
    """Peak learning rate (AdamW); 2e-4 is CAD's, 1e-4 Conv-LoRA's."""
    weight_decay: float = 1e-4
    """AdamW weight decay (Conv-LoRA's)."""
    batch_size: int = 4
    """Global batch size (all processes, all accumulated micro-batches)."""
    checkpoint_every: int = 100
    """Steps between checkpoints (the last step, and a step where a signal stops the run, always
    checkpoint)."""

    def __post_init__(self) -> None:
        for name in ("ckpt", "data"):
            if not getattr(self, name):
                raise ValueError(f"--{name} is required")
        super().__post_init__()
        if self.val_every < 1:
            raise ValueError(f"--val-every must be at least 1, got {self.val_every}")
        _check_at_least(self, "workers", 0)
        if self.merge and self.method != "lora":
            raise ValueError(
                f"--merge folds LoRA into qkv: it needs --method lora, not {self.method}"
            )
        if self.method == "decoder" and self.freeze_decoder:
            raise ValueError("--method decoder with --freeze-decoder leaves nothing to train")
        self.adapter_kwargs()  # named errors now, not at step 0

    def adapter_kwargs(self) -> dict[str, int | float]:
        """--options parsed: "width=64,scale=0.2" -> {"width": 64, "scale": 0.2}."""
        return parse_number_options(self.options, "--options", "width=64")


def parse_number_options(text: str, flag: str, example: str) -> dict[str, int | float]:
    """Comma-separated key=number pairs: "width=64,scale=0.2" -> {"width": 64, "scale": 0.2}; an
    item that is not one names `flag` and shows `example`."""
    kwargs: dict[str, int | float] = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        key, sep, value = item.partition("=")
        try:
            if not sep or not key.strip():
                raise ValueError
            number = float(value)
            kwargs[key.strip()] = (
                int(number) if number.is_integer() and "." not in value else number
            )
        except ValueError:
            raise ValueError(
                f"{flag} {text!r}: {item!r} is not key=number (e.g. {example})"
            ) from None
    return kwargs


def batch_layout(cfg: TrainConfig, world_size: int) -> tuple[int, int]:
    """(micro-batch per process, accumulation steps) for the global batch over `world_size`."""
    batch, micro = cfg.batch_size, cfg.micro_batch_size
    if batch < world_size or batch % world_size:
        fit = max(world_size, batch // world_size * world_size)
        raise ValueError(
            f"--batch-size {batch} is the global batch, shared by the {world_size} processes: it "
            f"must be at least, and a multiple of, {world_size} (the number of processes); "
            f"e.g. --batch-size {fit}"
        )
    micro = micro or batch // world_size
    if batch % (micro * world_size):
        raise ValueError(
            f"--batch-size {batch} must be a multiple of --micro-batch-size {micro} x "
            f"{world_size} processes = {micro * world_size}: change one of them (or leave "
            "--micro-batch-size unset for no accumulation)"
        )
    return micro, batch // (micro * world_size)


def warmup_steps(cfg: TrainConfig) -> int:
    """Warm-up length: the configured one, or 5% of the run (at least 1), never past the end."""
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else max(1, cfg.steps // 20)
    return min(warmup, cfg.steps)


def deepspeed_config(cfg: TrainConfig, world_size: int) -> dict:
    """The DeepSpeed config for `cfg`: batch sizes stated once, here. The learning rate is set
    by the engine every step from `distill.schedule.lr_at`, so no DeepSpeed scheduler."""
    micro, accum = batch_layout(cfg, world_size)
    return {
        "train_batch_size": cfg.batch_size,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": cfg.grad_clip,
        "bf16": {"enabled": cfg.precision == "bf16"},
        "zero_optimization": {"stage": cfg.zero_stage},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
