"""The settings of one evaluation run: `EvalConfig` (COCO/LVIS, whose flags `eval/cli.py` makes)
and `MaskEvalConfig` (binary-mask domains, `eval/masks.py`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from eval.prompts import PROTOCOLS, Protocol
from eval.runner import DEFAULT_PROMPT_CHUNK

DATASETS = ("coco", "lvis")
PROMPTS = ("box", "point")


@dataclass
class EvalConfig:
    """Settings of one COCO or LVIS evaluation run (or of its merge)."""

    dataset: str = "coco"
    """'coco' or 'lvis'; set by the entry script."""
    ckpt: str = ""
    """The model: a `student.pt` export or an official SAM checkpoint (vit_h/l/b, vit_tiny)."""
    coco_root: str = ""
    """COCO folder: `annotations/instances_<split>.json` and `<split>/` images for COCO; the
    `train2017/` and `val2017/` image folders for LVIS."""
    split: str = "val2017"
    """COCO split: its annotation file and image folder."""
    coco_json: str | None = None
    """COCO annotation file to use instead of `coco_root/annotations/instances_<split>.json`."""
    lvis_root: str | None = None
    """LVIS folder holding `lvis_v1_val.json`."""
    lvis_json: str | None = None
    """LVIS annotation file to use instead of `lvis_root/lvis_v1_val.json`."""
    prompt: str = field(default="box", metadata={"choices": PROMPTS})
    """'box' (GT boxes) or 'point' (simulated clicks)."""
    num_clicks: int = field(default=1, metadata={"metavar": "K"})
    """Point prompts: clicks per instance, K; mIoU is reported after each of 1..K."""
    protocol: str = field(default="efficientvit", metadata={"choices": PROTOCOLS})
    """'efficientvit' (crowd included, multimask argmax) or 'edgesam' (crowd dropped, single
    mask output)."""
    single_mask: bool = False
    """Use SAM's single-mask output instead of multimask argmax (TinySAM's asterisk)."""
    no_crowd: bool = False
    """Drop `iscrowd=1` annotations."""
    baseline: str | None = field(default=None, metadata={"choices": ("box",)})
    """'box': also report the box-fill baseline (each GT box itself as the mask), what a
    predictor that knows only the prompt scores; box prompts on GT only."""
    det_json: str | None = None
    """Detections (COCO results json, xywh boxes): mask AP of the masks their boxes prompt."""
    ap_keep_empty_gt: bool = False
    """Mask AP: keep GT of area < 1 (unmatchable; by default dropped, as the mIoU protocol does)."""
    limit_images: int | None = None
    """Evaluate only the first N images (in image-id order) that have something to evaluate."""
    skip_missing: bool = False
    """Count and skip images whose file is missing instead of stopping."""
    device: str = field(
        default="cuda" if torch.cuda.is_available() else "cpu",
        metadata={"choices": ("cpu", "cuda")},
    )
    """cpu or cuda; with several processes, cuda means cuda:LOCAL_RANK."""
    prompt_chunk: int = DEFAULT_PROMPT_CHUNK
    """Prompts decoded per call; memory grows as chunk x 3 x img_size^2 floats."""
    out: str | None = None
    """Output JSON (figures); per-instance records go to OUT.instances.jsonl beside it.
    Required with several processes, whose part files live beside it."""
    vis: str | None = field(default=None, metadata={"metavar": "DIR"})
    """Folder for overlay PNGs (image, GT, model, comparison model)."""
    vis_limit: int = 16
    """Overlays for at most this many images per process."""
    compare_ckpt: str | None = None
    """A second model run on the same prompts: its mIoU (or AP) and its agreement with --ckpt."""
    merge: bool = False
    """Only merge the part files of an earlier multi-process run (same flags as the run)."""
    progress: bool = True
    """Show a progress bar."""

    def __post_init__(self) -> None:
        if self.dataset not in DATASETS:
            raise ValueError(f"dataset {self.dataset!r}: choose one of {', '.join(DATASETS)}")
        if not self.ckpt:
            raise ValueError("--ckpt is required (a student.pt or an official SAM checkpoint)")
        if not self.coco_root:
            raise ValueError("--coco-root is required (the folder holding the COCO images)")
        if self.dataset == "lvis" and not (self.lvis_root or self.lvis_json):
            raise ValueError("--lvis-root (holding lvis_v1_val.json) or --lvis-json is required")
        if self.prompt not in PROMPTS:
            raise ValueError(f"--prompt {self.prompt!r}: choose one of {', '.join(PROMPTS)}")
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"--protocol {self.protocol!r}: choose one of {', '.join(PROTOCOLS)}")
        if self.num_clicks < 1:
            raise ValueError(f"--num-clicks must be at least 1, got {self.num_clicks}")
        if self.num_clicks > 1 and self.prompt != "point":
            raise ValueError("--num-clicks needs --prompt point")
        if self.det_json and self.prompt != "box":
            raise ValueError("--det-json prompts with the detections' boxes: use --prompt box")
        for flag, value in (
            ("--limit-images", self.limit_images),
            ("--prompt-chunk", self.prompt_chunk),
        ):
            if value is not None and value < 1:
                raise ValueError(f"{flag} must be at least 1, got {value}")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"--device {self.device!r}: choose cpu or cuda")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda: no CUDA device is visible")
        if self.vis_limit < 0:
            raise ValueError(f"--vis-limit must be at least 0, got {self.vis_limit}")
        if self.merge and not self.out:
            raise ValueError("--merge needs --out (the part files live beside it)")

    @property
    def task_protocol(self) -> Protocol:
        return Protocol.named(self.protocol, self.single_mask, self.no_crowd)


MASK_PROMPTS = ("full_box", "gt_box")  # teachers.mask_folders.prompt_box
DEVICES = ("auto", "cpu", "cuda")
ON_BAD = ("skip", "stop")  # teachers.mask_folders


@dataclass
class MaskEvalConfig:
    """One evaluation of an adapted model (or any SAM) on a binary-mask split (`eval/masks.py`)."""

    ckpt: str = ""
    """The model: an adapted.pt (launch/adapt.py), a student.pt or an official SAM checkpoint."""
    data: str = ""
    """Dataset folder: SPLIT/images and SPLIT/masks (COD10K, CAMO, ISTD, Kvasir-SEG, ISIC after
    renaming) or COCO instances (annotations/instances_SPLIT.json)."""
    split: str = "val"
    """The split folder under --data."""
    prompt: str = field(default="full_box", metadata={"metavar": "full_box|gt_box"})
    """Box prompt per image: full_box (the whole image, prompt-free) or gt_box (the ground-truth
    mask's box); use the one the model was adapted with."""
    compare_ckpt: str | None = None
    """A second model on the same images and prompts, in the same table, and the difference."""
    base: str | None = None
    """Base checkpoint of an adapted.pt whose recorded base path is not there (its sha256 must
    match)."""
    out: str | None = None
    """Output JSON: figures per model, per-image IoU, skips."""
    device: str = field(default="auto", metadata={"metavar": "auto|cpu|cuda"})
    """auto (cuda when visible), cpu or cuda."""
    limit: int | None = field(default=None, metadata={"metavar": "N"})
    """Score only the first N images (by name) that load."""
    on_bad: str = field(default="skip", metadata={"metavar": "skip|stop"})
    """A bad image/mask pair is skipped and counted (skip) or stops the run (stop)."""
    vis: str | None = field(default=None, metadata={"metavar": "DIR"})
    """Folder for overlay PNGs: the image, then each model's mask, the GT contour on all."""
    vis_limit: int = field(default=8, metadata={"metavar": "N"})
    """Overlays for at most this many images."""
    progress: bool = True
    """Show a progress bar."""

    def __post_init__(self) -> None:
        if not self.ckpt:
            raise ValueError("--ckpt is required (an adapted.pt, a student.pt or a SAM checkpoint)")
        if not self.data:
            raise ValueError("--data is required (the folder holding SPLIT/images, SPLIT/masks)")
        if not Path(self.data).is_dir():
            raise ValueError(f"--data {self.data}: no such folder")
        for flag, value, choices in (
            ("--prompt", self.prompt, MASK_PROMPTS),
            ("--device", self.device, DEVICES),
            ("--on-bad", self.on_bad, ON_BAD),
        ):
            if value not in choices:
                raise ValueError(f"{flag} {value!r}: choose one of {', '.join(choices)}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda: no CUDA device is visible")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"--limit must be at least 1, got {self.limit}")
        if self.vis_limit < 0:
            raise ValueError(f"--vis-limit must be at least 0, got {self.vis_limit}")

    @property
    def torch_device(self) -> str:
        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.device
