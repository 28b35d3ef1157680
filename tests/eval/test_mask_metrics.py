"""Binary-mask metrics (eval.mask_metrics): hand-computed cases and parity with pysodmetrics."""

from __future__ import annotations

import numpy as np
import py_sod_metrics as sod
import pytest

from eval.mask_metrics import (
    MaskScores,
    balanced_error_rate,
    binary_dice,
    binary_iou,
    confusion,
    mean_abs_error,
    to_uint8,
)

GT = np.array([[1, 1, 0, 0], [1, 0, 0, 0]], dtype=bool)
# 0.5 itself is background (strictly above the threshold, like SAM's logits > 0), so the
# prediction is [[1, 0, 1, 0], [1, 0, 0, 0]]: TP (0,0) (1,0); FP (0,2); FN (0,1); TN the other 4.
PROB = np.array([[0.9, 0.4, 0.6, 0.0], [1.0, 0.5, 0.2, 0.1]])


def test_confusion_iou_dice_mae_by_hand() -> None:
    assert confusion(PROB, GT) == (2, 1, 1, 4)
    assert binary_iou(PROB, GT) == 2 / 4
    assert binary_dice(PROB, GT) == 4 / 6
    # |0.9-1| + |0.4-1| + 0.6 + 0 + |1-1| + 0.5 + 0.2 + 0.1 = 2.1 over 8 pixels
    assert mean_abs_error(PROB, GT) == pytest.approx(2.1 / 8, abs=1e-15)


def test_ber_by_hand() -> None:
    # P = 3, N = 5: 100 * (1 - (2/3 + 4/5) / 2) = 100 * 4/15
    out = balanced_error_rate(*confusion(PROB, GT))
    assert out["ber"] == pytest.approx(400 / 15)
    assert out["ber_pos"] == pytest.approx(100 / 3) and out["ber_neg"] == pytest.approx(20.0)
    assert balanced_error_rate(0, 0, 0, 5) == {"ber": None, "ber_pos": None, "ber_neg": 0.0}


def test_empty_cases() -> None:
    empty = np.zeros((3, 3), bool)
    assert binary_iou(np.zeros((3, 3)), empty) == 1.0 == binary_dice(np.zeros((3, 3)), empty)
    assert binary_iou(np.zeros((3, 3)), empty, both_empty=0.0) == 0.0
    assert binary_iou(np.ones((3, 3)), empty) == 0.0


def test_accumulator_by_hand() -> None:
    scores = MaskScores()
    scores.add(PROB, GT)
    scores.add(np.zeros((2, 2)), np.ones((2, 2), bool))  # all missed: TP 0, FN 4
    out = scores.results()
    assert out["num_images"] == 2 == len(scores)
    assert out["iou"] == pytest.approx((0.5 + 0.0) / 2)
    assert out["dice"] == pytest.approx((2 / 3 + 0.0) / 2)
    assert out["mae"] == pytest.approx((2.1 / 8 + 1.0) / 2)
    # BER pools the counts over the set: TP 2, FN 5 (P = 7), TN 4, FP 1 (N = 5).
    assert out["ber"] == pytest.approx(100 * (1 - 0.5 * (2 / 7 + 4 / 5)))
    assert out["ber_pos"] == pytest.approx(100 * 5 / 7)


def _samples(n: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Blob masks and noisy, blurred-edged probability maps of them, some poor."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:40, 0:56]
    out = []
    for i in range(n):
        cx, cy, r = rng.uniform(15, 40), rng.uniform(12, 28), rng.uniform(6, 12)
        dist = np.hypot(xx - cx, yy - cy)
        gt = dist < r
        shift = rng.uniform(-4, 4) * (i % 3)
        prob = 1 / (1 + np.exp((dist - r - shift) / 2)) + rng.normal(0, 0.1, gt.shape)
        out.append((np.clip(prob, 0, 1), gt))
    return out


def test_sod_metrics_equal_pysodmetrics_called_directly() -> None:
    samples = _samples(5)
    scores = MaskScores()
    sm, wfm, em = sod.Smeasure(), sod.WeightedFmeasure(), sod.Emeasure()
    for prob, gt in samples:
        scores.add(prob, gt)
        pred8 = np.round(prob * 255).astype(np.uint8)
        gt8 = np.where(gt, 255, 0).astype(np.uint8)
        for metric in (sm, wfm, em):
            metric.step(pred=pred8, gt=gt8)
    out = scores.results()
    assert out["s_measure"] == pytest.approx(float(sm.get_results()["sm"]), abs=1e-12)
    assert out["weighted_f"] == pytest.approx(float(wfm.get_results()["wfm"]), abs=1e-12)
    assert out["e_measure"] == pytest.approx(
        float(em.get_results()["em"]["curve"].mean()), abs=1e-12
    )
    assert 0.3 < out["s_measure"] < 1 and 0.3 < out["weighted_f"] < 1 and 0.3 < out["e_measure"] < 1


def test_mae_equals_pysodmetrics_on_a_full_range_uint8_map() -> None:
    prob, gt = _samples(1)[0]
    prob = to_uint8(prob) / 255.0
    assert prob.min() == 0.0 and prob.max() == 1.0
    mae = sod.MAE()
    mae.step(pred=to_uint8(prob), gt=gt.astype(np.uint8) * 255)
    assert mean_abs_error(prob, gt) == pytest.approx(float(mae.get_results()["mae"]), abs=1e-12)


def test_perfect_prediction() -> None:
    scores = MaskScores()
    for _, gt in _samples(3):
        scores.add(gt.astype(np.float64), gt)
    out = scores.results()
    assert out["iou"] == 1.0 and out["dice"] == 1.0
    assert out["mae"] == 0.0
    assert out["ber"] == 0.0 and out["ber_pos"] == 0.0 and out["ber_neg"] == 0.0
    assert out["s_measure"] == pytest.approx(1.0) and out["weighted_f"] == pytest.approx(1.0)
    # pysodmetrics' E-measure curve of a 0/255 map is 1 (+ its EPS) at 255 of its 256 thresholds
    # and about 0.25 at the last, so the paper-style mean is just under 1, not 1.
    assert 0.99 < out["e_measure"] < 1.0


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match="equal"):
        binary_iou(np.zeros((2, 3)), np.zeros((3, 2), bool))
    with pytest.raises(ValueError, match="bool"):
        binary_iou(np.zeros((2, 2)), np.zeros((2, 2), np.uint8))
    with pytest.raises(ValueError, match="sigmoid"):
        MaskScores().add(np.full((2, 2), 3.0), np.zeros((2, 2), bool))
    with pytest.raises(ValueError, match="no image"):
        MaskScores().results()
