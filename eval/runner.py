"""The per-image evaluation loop: the image encoder once per image, every prompt of the image
through SAM's prompt encoder and mask decoder together (`SamPredictor.predict_torch`).

Masks are SAM's own: `predict_torch` postprocesses them to the original size and thresholds the
logits at 0; with `multimask_output` the mask of highest predicted IoU is kept. Prompts go
through `predictor.transform` in float64 numpy, as `SamPredictor.predict` does, so a batched
instance gets the prompt a one-at-a-time `predict` call would get. (Batched and one-at-a-time
decoding still differ by float rounding in the decoder's matrix products, about 1e-7.)

Point prompts accumulate clicks (see `eval.prompts.next_click`): click k+1 is placed from the
mask predicted with clicks 1..k, and the mask after k+1 clicks is predicted from all k+1 clicks
alone. The previous low-resolution mask is not fed back as `mask_input`, as in EfficientViT-SAM's
point protocol; SAM's own interactive loop would feed it, which is another protocol.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pycocotools.mask as mask_utils
import torch
from segment_anything import SamPredictor
from tqdm import tqdm

from eval.datasets import EvalDataset, EvalImage
from eval.metrics import encode_masks, mask_iou
from eval.prompts import Click, Protocol, boxes_xyxy, click_arrays, next_click
from students.load import load_sam
from teachers.preprocess import Preprocessed, load_image, preprocess

DEFAULT_PROMPT_CHUNK = 16


@dataclass
class Model:
    """A SAM (student or teacher) ready to predict; `name` labels its rows."""

    name: str
    predictor: SamPredictor

    @property
    def img_size(self) -> int:
        return int(self.predictor.model.image_encoder.img_size)


def load_model(ckpt: str, device: str) -> Model:
    """A `student.pt` or an official SAM checkpoint, through `students.load.load_sam`."""
    return Model(str(ckpt), SamPredictor(load_sam(ckpt, device=device)))


@torch.inference_mode()
def set_image(predictor: SamPredictor, pre: Preprocessed) -> None:
    """Run the image encoder once and leave `predictor` as `SamPredictor.set_image` would.

    `pre` comes from `teachers.preprocess`, which equals set_image's resize, normalisation and
    padding bit for bit; this is `SamPredictor.set_torch_image` after its `model.preprocess`.
    """
    predictor.reset_image()
    predictor.original_size = pre.orig_hw
    predictor.input_size = pre.input_hw
    predictor.features = predictor.model.image_encoder(pre.image[None].to(predictor.device))
    predictor.is_image_set = True


def predict_masks(
    predictor: SamPredictor,
    multimask_output: bool,
    chunk: int = DEFAULT_PROMPT_CHUNK,
    boxes: np.ndarray | None = None,
    coords: np.ndarray | None = None,
    labels: np.ndarray | None = None,
) -> np.ndarray:
    """[N, H, W] bool masks for N prompts on the set image: boxes [N, 4] xyxy, or points
    coords [N, K, 2] (x, y) with labels [N, K], in original-image pixels. Decoded `chunk` prompts
    at a time (postprocessing holds [chunk, 3, img_size, img_size] floats)."""
    num = len(boxes) if boxes is not None else len(coords)
    size, device, out = predictor.original_size, predictor.device, []
    for start in range(0, num, chunk):
        part = slice(start, start + chunk)
        box_t = coords_t = labels_t = None
        if boxes is not None:
            box_t = torch.as_tensor(
                predictor.transform.apply_boxes(boxes[part], size), dtype=torch.float, device=device
            )
        else:
            coords_t = torch.as_tensor(
                predictor.transform.apply_coords(coords[part], size),
                dtype=torch.float,
                device=device,
            )
            labels_t = torch.as_tensor(labels[part], dtype=torch.int, device=device)
        masks, scores, _ = predictor.predict_torch(
            coords_t, labels_t, box_t, multimask_output=multimask_output
        )
        # numpy's argmax, as the reference uses: the first of equal scores, on any device.
        best = torch.as_tensor(scores.float().cpu().numpy().argmax(1), device=masks.device)
        out.append(masks[torch.arange(len(best), device=masks.device), best].cpu().numpy())
    h, w = size
    return np.concatenate(out) if out else np.zeros((0, h, w), bool)


def click_masks(
    predictor: SamPredictor, gt: np.ndarray, num_clicks: int, multimask_output: bool, chunk: int
) -> tuple[list[list[dict]], list[list[Click]]]:
    """Simulated clicking on every GT mask of the image ([N, H, W] bool) at once: per click
    count k = 1..K the RLEs of the N predicted masks, and the N click lists."""
    clicks: list[list[Click]] = [[] for _ in gt]
    pred: Sequence[np.ndarray | None] = [None] * len(gt)
    steps = []
    for _ in range(num_clicks):
        for g, p, cs in zip(gt, pred, clicks, strict=True):
            cs.append(next_click(g, p, cs))
        coords, labels = click_arrays(clicks)
        pred = predict_masks(predictor, multimask_output, chunk, coords=coords, labels=labels)
        steps.append(encode_masks(pred))
    return steps, clicks


@dataclass
class Loaded:
    """An image read and preprocessed for every model's input size, with its GT."""

    item: EvalImage
    image: np.ndarray
    pre: dict[int, Preprocessed]
    gt_rles: list[dict]
    gt_masks: np.ndarray


def load_item(
    ds: EvalDataset, item: EvalImage, img_sizes: set[int], det_gt: bool = False
) -> Loaded:
    """Decode (EXIF tag ignored, see eval.datasets), check the size, preprocess, decode the GT:
    the kept annotations, or with detections the image's annotations of area >= 1 when `det_gt`
    (overlays only)."""
    image = load_image(item.path)
    if image.shape[:2] != tuple(item.hw):
        raise ValueError(
            f"{item.path}: decoded size {image.shape[0]}x{image.shape[1]} differs from "
            f"{ds.ann_json}'s {item.hw[0]}x{item.hw[1]} for image {item.image_id}"
        )
    anns = item.anns
    if item.dets:
        anns = tuple(a for a in ds.image_anns(item.image_id) if a["area"] >= 1) if det_gt else ()
    rles, masks = ds.gt_masks(anns) if anns else ([], np.zeros((0, *item.hw), bool))
    pre = {s: preprocess(image, s) for s in img_sizes}
    return Loaded(item, image, pre, rles, masks)


def prefetch(
    ds: EvalDataset,
    images: Sequence[EvalImage],
    img_sizes: set[int],
    det_gt: bool = False,
    ahead: int = 2,
) -> Iterator[Loaded]:
    """`load_item` for each image, in order, decoding up to `ahead` images in a background
    thread while the models run (PIL and pycocotools release the GIL)."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        queue: deque = deque()
        for item in images:
            queue.append(pool.submit(load_item, ds, item, img_sizes, det_gt))
            if len(queue) > ahead:
                yield queue.popleft().result()
        while queue:
            yield queue.popleft().result()


@dataclass(frozen=True)
class Task:
    """What is done on every image."""

    prompt: str = "box"
    """'box' (GT boxes, or the detections' boxes when images carry detections) or 'point'."""
    num_clicks: int = 1
    """Point prompts: clicks per instance; mIoU is recorded after each."""
    protocol: Protocol = Protocol()
    """Crowd, single/multimask and minimum-area switches."""
    prompt_chunk: int = DEFAULT_PROMPT_CHUNK
    """Prompts per decoder call."""
    baseline: str | None = None
    """'box': also score the box-fill baseline (each GT box itself as the mask)."""


def box_fill_ious(
    anns: Sequence[dict], gt_rles: Sequence[dict], hw: tuple[int, int]
) -> list[float]:
    """IoU with its GT mask of each annotation's box filled as a mask: what a predictor that
    knows only the box scores (pycocotools rasterises the box)."""
    h, w = hw
    boxes = np.array([a["bbox"] for a in anns], dtype=np.float64).reshape(-1, 4)
    fills = mask_utils.frPyObjects(boxes, h, w)  # an [N, 4] array is read as boxes
    return [mask_iou(fill, gt) for fill, gt in zip(fills, gt_rles, strict=True)]


def model_steps(model: Model, loaded: Loaded, task: Task) -> tuple[list[list[dict]], object]:
    """One model on one image: per click count (one step for boxes) the N masks' RLEs, and
    the prompts (clicks or [N, 4] boxes) for overlays."""
    item, multimask = loaded.item, task.protocol.multimask_output
    if task.prompt == "point":
        return click_masks(
            model.predictor, loaded.gt_masks, task.num_clicks, multimask, task.prompt_chunk
        )
    bboxes = [d["bbox"] for _, d in item.dets] if item.dets else [a["bbox"] for a in item.anns]
    boxes = boxes_xyxy(bboxes)
    masks = predict_masks(model.predictor, multimask, task.prompt_chunk, boxes=boxes)
    return [encode_masks(masks)], boxes


def _step_ious(steps: list[list[dict]], i: int, ref: list[dict]) -> list[float]:
    """IoU with the GT of instance i after each step."""
    return [mask_iou(step[i], ref[i]) for step in steps]


def _agreement(a: list[list[dict]], b: list[list[dict]], i: int) -> list[float]:
    """IoU between two models' masks of instance i after each step (both empty: 1)."""
    return [mask_iou(sa[i], sb[i], both_empty=1.0) for sa, sb in zip(a, b, strict=True)]


def _rle_json(rle: dict) -> dict:
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def image_records(models: Sequence[Model], loaded: Loaded, task: Task) -> tuple[list[dict], list]:
    """Per-instance records of one image (fields in eval.report), and each model's
    `model_steps` output for overlays. The first model is the one evaluated, the second (if
    any) the comparison."""
    for m in models:
        set_image(m.predictor, loaded.pre[m.img_size])
    outs = [model_steps(m, loaded, task) for m in models]
    steps = [o[0] for o in outs]
    item, records = loaded.item, []
    fills = None
    if task.baseline == "box" and not item.dets:
        hw = loaded.image.shape[:2]  # the GT's size: load_item checks the two agree
        fills = box_fill_ious(item.anns, loaded.gt_rles, hw) if item.anns else []
    for i in range(len(item.dets) if item.dets else len(item.anns)):
        if item.dets:
            index, det = item.dets[i]
            rec = dict(id=index, image_id=item.image_id, category_id=det["category_id"])
            rec.update(score=det["score"], segmentation=_rle_json(steps[0][-1][i]))
            if len(steps) > 1:
                rec["compare_segmentation"] = _rle_json(steps[1][-1][i])
        else:
            ann = item.anns[i]
            rec = dict(id=ann["id"], image_id=item.image_id, area=ann["area"])
            rec.update(iscrowd=ann.get("iscrowd", 0), iou=_step_ious(steps[0], i, loaded.gt_rles))
            if len(steps) > 1:
                rec["compare_iou"] = _step_ious(steps[1], i, loaded.gt_rles)
            if fills is not None:
                rec["baseline_iou"] = [fills[i]] * len(steps[0])
        if len(steps) > 1:
            rec["agreement"] = _agreement(steps[0], steps[1], i)
        records.append(rec)
    return records, outs


def run_images(
    ds: EvalDataset,
    images: Sequence[EvalImage],
    models: Sequence[Model],
    task: Task,
    progress: bool = True,
    on_image: Callable[[Loaded, list, list[dict]], None] | None = None,
) -> Iterator[list[dict]]:
    """Yield each image's records, in order. `on_image(loaded, outs, records)` (overlays) is
    called after each image."""
    sizes = {m.img_size for m in models}
    num, start = 0, time.perf_counter()
    with tqdm(total=len(images), unit="img", disable=not progress, dynamic_ncols=True) as bar:
        for loaded in prefetch(ds, images, sizes, det_gt=on_image is not None):
            records, outs = image_records(models, loaded, task)
            if on_image is not None:
                on_image(loaded, outs, records)
            num += len(records)
            bar.update(1)
            bar.set_postfix_str(f"{num / (time.perf_counter() - start):.1f} inst/s", refresh=False)
            yield records
