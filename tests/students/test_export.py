import numpy as np
import pytest
import torch
from segment_anything import SamAutomaticMaskGenerator, SamPredictor

from students import build_student
from students.export import assemble_sam, read_export_meta, save_student
from students.load import load_sam
from students.onnx import check_onnx, export_onnx

IMAGE = np.random.default_rng(0).integers(0, 256, (96, 130, 3), dtype=np.uint8)
BOXES = [np.array([5, 8, 70, 60]), np.array([40, 20, 128, 90])]


def _predictions(sam):
    predictor = SamPredictor(sam)
    predictor.set_image(IMAGE)
    return [predictor.predict(box=box, multimask_output=True, return_logits=True) for box in BOXES]


@pytest.fixture(scope="module")
def student():
    torch.manual_seed(0)
    return build_student("dfa_s", img_size=256).eval()


def test_export_then_load_gives_identical_masks(student, tiny_sam, tmp_path):
    path = save_student(
        tmp_path / "student.pt", student, tiny_sam, teacher="vit_tiny", teacher_sha256="abc", step=7
    )
    raw = torch.load(path, weights_only=True)  # plain types and tensors only
    assert raw["format"] == "sam-distill-student" and raw["student"]["name"] == "dfa_s"
    assert read_export_meta(path)["teacher"] == {"name": "vit_tiny", "sha256": "abc"}
    loaded = load_sam(path)
    in_memory = assemble_sam(student, tiny_sam)
    for (m1, s1, l1), (m2, s2, l2) in zip(_predictions(loaded), _predictions(in_memory)):
        assert np.array_equal(m1, m2) and np.array_equal(s1, s2) and np.array_equal(l1, l2)
    # The prompt encoder and mask decoder are the teacher's.
    for key, value in tiny_sam.mask_decoder.state_dict().items():
        assert torch.equal(loaded.mask_decoder.state_dict()[key], value)


def test_loaded_sam_works_in_the_automatic_mask_generator(student, tiny_sam, tmp_path):
    path = save_student(
        tmp_path / "s.pt", student, tiny_sam, teacher="vit_tiny", teacher_sha256="x", step=1
    )
    generator = SamAutomaticMaskGenerator(
        load_sam(path), points_per_side=4, pred_iou_thresh=-10.0, stability_score_thresh=-10.0
    )
    masks = generator.generate(IMAGE)
    assert masks and masks[0]["segmentation"].shape == IMAGE.shape[:2]


def test_load_sam_reads_official_checkpoints(tiny_ckpt, tiny_sam):
    sam = load_sam(tiny_ckpt)
    for key, value in tiny_sam.state_dict().items():
        assert torch.equal(sam.state_dict()[key], value)


def test_corrupted_export_is_refused(student, tiny_sam, tmp_path):
    path = save_student(
        tmp_path / "s.pt", student, tiny_sam, teacher="vit_tiny", teacher_sha256="x", step=1
    )
    raw = torch.load(path, weights_only=True)
    del raw["state_dict"]["image_encoder.neck.0.weight"]
    torch.save(raw, tmp_path / "broken.pt")
    with pytest.raises(
        ValueError,
        match=r"broken.pt does not match student dfa_s: missing keys: image_encoder\.neck\.0\.weight",
    ):
        load_sam(tmp_path / "broken.pt")


@pytest.mark.slow
def test_onnx_matches_pytorch(student, tmp_path):
    path = export_onnx(student, tmp_path / "dfa_s.onnx", batch=2)
    images = torch.randn(2, 3, 256, 256)
    # Same math, different kernels and summation order: float32 rounding only.
    assert check_onnx(student, path, images) < 1e-4
