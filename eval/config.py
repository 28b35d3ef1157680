"""The settings of one evaluation run; `eval/cli.py` makes the entry scripts' flags from them."""

from __future__ import annotations

from dataclasses import dataclass, field

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
