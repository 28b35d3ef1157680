"""Metrics of binary segmentation for the adaptation domains, on probability maps in [0, 1].

* IoU and Dice of `prob > THRESHOLD` (0.5), the mean over images. 0.5 on probabilities is SAM's
  `mask_threshold = 0.0` on logits, which is what CAD's evaluation scores (`masks_pred = masks >
  self.mask_threshold`, Kyyle2114/Convolutional-Adapter-for-Segment-Anything,
  `segment_anything_cad/modeling/sam.py`, then per-image `IoU`/`Dice` in `utils/metrics.py`).
  Conv-LoRA's paper (arXiv 2401.17868) does not state the threshold behind its IoU figures.
* MAE: mean over images of mean |prob - gt|, on the map as given.
* BER, the shadow papers' balanced error rate: 100 * (1 - 0.5 * (TP/P + TN/N)) with TP, TN, P, N
  summed over the whole set before the ratio (as the SBU/ISTD evaluation scripts do, e.g.
  `ComputeBERonSet`), plus the positive and negative error rates 100 * (1 - TP/P) and
  100 * (1 - TN/N). Those scripts threshold 8-bit maps at >= 128; we use the one 0.5 threshold.
* S-measure (alpha 0.5), weighted F-measure (beta 1) and the mean E-measure, from `pysodmetrics`
  (`py_sod_metrics`), the implementation the camouflage and polyp papers use. They are fed what
  those papers feed them: the map saved as 8-bit gray (`round(255 * prob)`) and the mask as
  0/255, which `prepare_data` min-max normalises and thresholds at 128. The mean E-measure is
  the mean of the curve over the 256 thresholds. pysodmetrics' own MAE runs on that normalised
  map; ours equals it when the map spans 0..1 on the 1/255 grid.

Nothing here touches a model: a test hands maps in and checks the numbers.
"""

from __future__ import annotations

import numpy as np
import py_sod_metrics as sod

THRESHOLD = 0.5


def _check(prob: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    prob, gt = np.asarray(prob, dtype=np.float64), np.asarray(gt)
    if prob.shape != gt.shape or prob.ndim != 2:
        raise ValueError(f"prob and gt must be equal [H, W] maps, got {prob.shape} and {gt.shape}")
    if gt.dtype != bool:
        raise ValueError(f"gt must be a bool mask, got {gt.dtype}")
    if prob.size and (prob.min() < 0 or prob.max() > 1 or np.isnan(prob).any()):
        raise ValueError("prob must hold probabilities in [0, 1]: apply a sigmoid to logits first")
    return prob, gt


def confusion(prob: np.ndarray, gt: np.ndarray, threshold: float = THRESHOLD) -> tuple[int, ...]:
    """(TP, FP, FN, TN) pixel counts of `prob > threshold` against the [H, W] bool `gt`."""
    prob, gt = _check(prob, gt)
    pred = prob > threshold
    tp, fp = int(np.sum(pred & gt)), int(np.sum(pred & ~gt))
    fn, tn = int(np.sum(~pred & gt)), int(np.sum(~pred & ~gt))
    return tp, fp, fn, tn


def binary_iou(prob: np.ndarray, gt: np.ndarray, both_empty: float = 1.0) -> float:
    """IoU in [0, 1] of `prob > 0.5` and `gt`; `both_empty` when neither has a pixel (an empty
    prediction of an empty mask is right)."""
    tp, fp, fn, _ = confusion(prob, gt)
    union = tp + fp + fn
    return float(both_empty) if union == 0 else tp / union


def binary_dice(prob: np.ndarray, gt: np.ndarray, both_empty: float = 1.0) -> float:
    """Dice (F1) in [0, 1] of `prob > 0.5` and `gt`: 2 TP / (2 TP + FP + FN)."""
    tp, fp, fn, _ = confusion(prob, gt)
    total = 2 * tp + fp + fn
    return float(both_empty) if total == 0 else 2 * tp / total


def iou_dice(prob: np.ndarray, gt: np.ndarray) -> tuple[float, float]:
    """(IoU, Dice) of one image: the adapt job's validation scorer (`launch/adapt.py` hands it
    to `distill.adapt.train`), so training and `eval/masks.py` score alike."""
    return binary_iou(prob, gt), binary_dice(prob, gt)


def mean_abs_error(prob: np.ndarray, gt: np.ndarray) -> float:
    """Mean absolute error in [0, 1] of the probability map against the 0/1 mask."""
    prob, gt = _check(prob, gt)
    return float(np.mean(np.abs(prob - gt)))


def balanced_error_rate(tp: int, fp: int, fn: int, tn: int) -> dict[str, float | None]:
    """Balanced error rate x 100 from pooled counts, with the positive and negative error rates
    (`ber_pos`, `ber_neg`); a rate is None where its class has no pixel, and so is BER."""
    pos, neg = tp + fn, tn + fp
    err_pos = None if pos == 0 else 100.0 * (1 - tp / pos)
    err_neg = None if neg == 0 else 100.0 * (1 - tn / neg)
    both = None if err_pos is None or err_neg is None else 100.0 * (1 - 0.5 * (tp / pos + tn / neg))
    return {"ber": both, "ber_pos": err_pos, "ber_neg": err_neg}


def to_uint8(prob: np.ndarray) -> np.ndarray:
    """[H, W] uint8 0..255 of a probability map: the gray PNG the papers' predictions are saved as."""
    return np.round(np.asarray(prob, dtype=np.float64) * 255).astype(np.uint8)


class MaskScores:
    """Accumulates the metrics above over images: `add(prob, gt)` per image, then `results()`.

    prob: [H, W] float in [0, 1] (a sigmoid of the mask logits at the image's original size);
    gt: [H, W] bool. Results: `num_images`; `iou`, `dice`, `mae` (means over images, in [0, 1]);
    `ber`, `ber_pos`, `ber_neg` (pooled, x 100); `s_measure`, `weighted_f`, `e_measure` (means over
    images from pysodmetrics, in [0, 1]).
    """

    def __init__(self) -> None:
        self.ious: list[float] = []
        self.dices: list[float] = []
        self.maes: list[float] = []
        self.counts = np.zeros(4, dtype=np.int64)  # TP, FP, FN, TN
        self.smeasure = sod.Smeasure()
        self.wfmeasure = sod.WeightedFmeasure()
        self.emeasure = sod.Emeasure()

    def add(self, prob: np.ndarray, gt: np.ndarray) -> None:
        prob, gt = _check(prob, gt)
        self.ious.append(binary_iou(prob, gt))
        self.dices.append(binary_dice(prob, gt))
        self.maes.append(mean_abs_error(prob, gt))
        self.counts += np.array(confusion(prob, gt), dtype=np.int64)
        pred8, gt8 = to_uint8(prob), gt.astype(np.uint8) * 255
        for metric in (self.smeasure, self.wfmeasure, self.emeasure):
            metric.step(pred=pred8, gt=gt8)

    def __len__(self) -> int:
        return len(self.ious)

    def results(self) -> dict[str, float | int | None]:
        if not self.ious:
            raise ValueError("MaskScores.results: no image was added")
        em = self.emeasure.get_results()["em"]["curve"]
        return {
            "num_images": len(self.ious),
            "iou": float(np.mean(self.ious)),
            "dice": float(np.mean(self.dices)),
            "mae": float(np.mean(self.maes)),
            **balanced_error_rate(*(int(c) for c in self.counts)),
            "s_measure": float(self.smeasure.get_results()["sm"]),
            "weighted_f": float(self.wfmeasure.get_results()["wfm"]),
            "e_measure": float(np.mean(em)),
        }
