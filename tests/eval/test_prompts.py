"""Prompt construction without a model: GT boxes, protocol switches, the click simulator."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from eval.prompts import Click, Protocol, box_xyxy, boxes_xyxy, click_arrays, next_click
from eval.scenes.synthetic import scene


def test_box_xyxy_is_unclipped_and_unrounded() -> None:
    assert box_xyxy([10.5, 20.25, 3.5, 0.0]) == [10.5, 20.25, 14.0, 20.25]
    assert box_xyxy([-5, -2, 700, 600]) == [-5.0, -2.0, 695.0, 598.0]  # outside the image: kept
    boxes = boxes_xyxy([[1, 2, 3, 4], [0, 0, 1, 1]])
    assert boxes.dtype == np.float64 and boxes.tolist() == [[1, 2, 4, 6], [0, 0, 1, 1]]
    assert boxes_xyxy([]).shape == (0, 4)


def test_protocols() -> None:
    evit, edge = Protocol.named("efficientvit"), Protocol.named("edgesam")
    assert (evit.include_crowd, evit.multimask_output, evit.min_area) == (True, True, 1.0)
    assert (edge.include_crowd, edge.multimask_output) == (False, False)
    tiny = Protocol.named("efficientvit", single_mask=True)
    assert tiny.include_crowd and not tiny.multimask_output
    assert not Protocol.named("efficientvit", no_crowd=True).include_crowd
    crowd, empty, thin = {"area": 50, "iscrowd": 1}, {"area": 0.0, "iscrowd": 0}, {"area": 0.5}
    assert evit.keeps(crowd) and not edge.keeps(crowd)
    assert not evit.keeps(empty) and not evit.keeps(thin) and evit.keeps({"area": 1.0})
    with pytest.raises(ValueError, match="--protocol 'sam'"):
        Protocol.named("sam")


def _reference_argmax(region: np.ndarray) -> tuple[int, int]:
    """Distance-transform argmax written out independently: pad, exact L2 transform, first max
    in raster order via np.where."""
    padded = np.zeros((region.shape[0] + 2, region.shape[1] + 2), np.uint8)
    padded[1:-1, 1:-1] = region
    dt = cv2.distanceTransform(padded, cv2.DIST_L2, 0)[1:-1, 1:-1]
    ys, xs = np.where(dt == dt.max())
    return int(xs[0]), int(ys[0])


def test_first_click_is_the_distance_transform_maximum_on_shapes() -> None:
    for index in range(8):
        _, instances = scene(0, index, 48, 160, 3)
        for inst in instances:
            if not inst.visible.any():
                continue
            click = next_click(inst.visible, None)
            assert click.positive and inst.visible[click.y, click.x]
            assert (click.x, click.y) == _reference_argmax(inst.visible)


def test_first_click_known_positions() -> None:
    square = np.zeros((20, 30), bool)
    square[5:10, 11:16] = True  # 5x5: the centre is the unique maximum
    assert next_click(square, None) == Click(13, 7, True)
    # In the top-left corner: with the 1-pixel padding the border counts as background, so the
    # click is in the middle of the square; unpadded, the corner pixel would be farthest.
    corner = np.zeros((20, 40), bool)
    corner[:7, :7] = True
    assert next_click(corner, None) == Click(3, 3, True)
    unpadded = cv2.distanceTransform(corner.astype(np.uint8), cv2.DIST_L2, 0)
    assert np.unravel_index(np.argmax(unpadded), corner.shape) == (0, 0)
    one = np.zeros((4, 4), bool)
    one[3, 0] = True
    assert next_click(one, None) == Click(0, 3, True)


def test_later_click_goes_to_the_larger_error_region() -> None:
    gt = np.zeros((40, 60), bool)
    gt[10:30, 10:30] = True
    # Prediction misses a 20x8 band of the object (false negative, deep 4) and spills into a
    # 3-wide band outside (false positive, deep 2): positive click in the missed band.
    pred = gt.copy()
    pred[10:30, 22:30] = False
    pred[10:30, 40:43] = True
    click = next_click(gt, pred, [Click(19, 19, True)])
    assert click.positive and gt[click.y, click.x] and not pred[click.y, click.x]
    assert (click.x, click.y) == _reference_argmax(gt & ~pred)
    # A thick false-positive blob wins over a thin miss: negative click inside the blob.
    pred = gt.copy()
    pred[10:30, 29] = False
    pred[5:35, 35:55] = True
    click = next_click(gt, pred, [Click(19, 19, True)])
    assert not click.positive and pred[click.y, click.x] and not gt[click.y, click.x]
    assert (click.x, click.y) == _reference_argmax(~gt & pred)


def test_clicked_pixels_ties_and_no_error() -> None:
    gt = np.zeros((9, 9), bool)
    gt[4, 4] = True
    first = next_click(gt, None)
    assert first == Click(4, 4, True)
    # The only error pixel is already clicked: nothing left, like a perfect prediction.
    assert next_click(gt, np.zeros_like(gt), [first]) == Click(0, 0, False)
    assert next_click(gt, gt, [first]) == Click(0, 0, False)
    # Equal depth of the missed and the spilled pixel: the reference's `>` makes it negative.
    pred = np.zeros_like(gt)
    pred[0, 8] = True
    assert next_click(gt, pred) == Click(8, 0, False)


def test_click_arrays() -> None:
    clicks = [[Click(1, 2, True), Click(3, 4, False)], [Click(5, 6, True), Click(7, 8, True)]]
    coords, labels = click_arrays(clicks)
    assert coords.shape == (2, 2, 2) and coords[0].tolist() == [[1, 2], [3, 4]]
    assert labels.tolist() == [[1, 0], [1, 1]]
    with pytest.raises(ValueError, match="equal"):
        next_click(np.zeros((3, 3), bool), np.zeros((3, 4), bool))
