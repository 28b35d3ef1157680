"""Our exported pair in the annotation tools' runtime: samexporter's `SegmentAnythingONNX` (what
AnyLabeling and X-AnyLabeling run) on the files `launch/export.py --decoder` writes, against
PyTorch and `SamPredictor`; and the X-AnyLabeling config written beside them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml
from segment_anything import SamPredictor

from launch import export as export_cli
from students import build_student
from students.export import save_student
from students.load import load_sam
from teachers.build import build_vit_tiny

pytestmark = pytest.mark.slow
SIDE = 1024  # samexporter's runtime feeds 1024-px inputs, SAM's size
IMAGE = np.random.default_rng(3).integers(0, 256, (300, 420, 3), dtype=np.uint8)
BOXES = [[20, 30, 200, 250], [150, 10, 410, 290]]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("samexporter")
    heads = build_vit_tiny(SIDE).eval()
    student = build_student("dfa_t", img_size=SIDE).eval()
    ckpt = save_student(
        root / "student.pt", student, heads, teacher="vit_tiny", teacher_sha256="x", step=1
    )
    out = root / "onnx"
    assert export_cli.main(["--ckpt", str(ckpt), "--out", str(out), "--decoder"]) == 0
    return ckpt, out


def test_xanylabeling_config_names_the_exported_pair(pair):
    _, out = pair
    config = yaml.safe_load((out / "xanylabeling.yaml").read_text())
    assert config["type"] == "segment_anything" and config["input_size"] == SIDE
    assert (out / config["encoder_model_path"]).is_file()
    assert (out / config["decoder_model_path"]).is_file()
    assert {"name", "display_name", "max_width", "max_height"} <= set(config)


def test_samexporter_runtime_gives_pytorch_embedding_and_sam_predictor_masks(pair):
    from samexporter.sam_onnx import SegmentAnythingONNX

    ckpt, out = pair
    config = yaml.safe_load((out / "xanylabeling.yaml").read_text())
    model = SegmentAnythingONNX(
        str(out / config["encoder_model_path"]), str(out / config["decoder_model_path"])
    )
    embedding = model.encode(IMAGE[:, :, ::-1].copy())  # the runtime takes OpenCV's BGR
    predictor = SamPredictor(load_sam(ckpt))
    predictor.set_image(IMAGE)
    ours = embedding["image_embedding"]
    want = predictor.get_image_embedding().numpy()
    # measured 1.1e-6 on this embedding (max |x| about 2): fp32 rounding, 100x margin
    assert np.abs(ours - want).max() < 1e-4
    for box in BOXES:
        prompt = [{"type": "rectangle", "data": box}]
        logits = model.predict_masks(embedding, prompt)[0, 0]
        # the runtime sends a box as SAM's two corner points (labels 2, 3) plus a padding point
        # (label -1): SamPredictor gets the same tokens from the box and one padding point (the
        # decoder's outputs do not depend on the order of the prompt tokens)
        masks, _, _ = predictor.predict(
            point_coords=np.zeros((1, 2), dtype=np.float32),
            point_labels=np.array([-1]),
            box=np.array(box),
            multimask_output=False,
            return_logits=True,
        )
        # measured 5.2e-6 (OpenCV's and torch's bilinear resizes agree to fp32 rounding)
        assert np.abs(logits - masks[0]).max() < 5e-5
        sure = np.abs(masks[0]) > 5e-5  # a mask pixel can flip only where its logit is ~0
        assert ((logits > 0) == (masks[0] > 0))[sure].all()
