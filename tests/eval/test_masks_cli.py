"""eval/masks.py end to end on the synthetic domain: the JSON's figures against pysodmetrics and
numpy run here on the same predictions, the comparison, adapted.pt with --base, overlays, the
user errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import py_sod_metrics as sod
import pytest
import torch
from PIL import Image

from eval.masks import main
from eval.scenes.domain import make_domain
from students import load_sam
from students.adapters.export import adapt_sam, save_adapted
from students.adapters.model import PromptedSam, predict_prob
from teachers.build import random_vit_tiny

NUM_VAL = 4


@pytest.fixture(scope="module")
def domain(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_domain(tmp_path_factory.mktemp("domain"), num_train=2, num_val=NUM_VAL, size=96)


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("base") / "sam_vit_tiny.pth"
    torch.save(random_vit_tiny(0).state_dict(), path)
    return path


def _adapted(base_path: Path, out: Path) -> Path:
    """LoRA on `base_path` with random (seeded) B matrices, so it differs from its base."""
    torch.manual_seed(0)  # lora_A's initialisation
    sam = adapt_sam(load_sam(base_path), "lora", {})
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in sam.named_parameters():
            if "lora_B" in name:
                param.copy_(0.05 * torch.randn(param.shape, generator=gen))
    kwargs = dict(method="lora", adapter_kwargs={}, merged=False, step=0)
    base_state = load_sam(base_path).state_dict()
    return save_adapted(out, sam, base_path=base_path, base_state=base_state, **kwargs)


@pytest.fixture(scope="module")
def adapted(base: Path) -> Path:
    return _adapted(base, base.with_name("adapted.pt"))


def _run(*args: object) -> int:
    return main([*map(str, args), "--device", "cpu", "--no-progress"])


def _eval(tmp_path: Path, *args: object) -> dict:
    out = tmp_path / "results.json"
    assert _run(*args, "--out", out) == 0
    return json.loads(out.read_text())


def _val_set(domain: Path) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(name, image, mask) of the val split, read here with PIL (masks are 0/255 PNGs)."""
    out = []
    for path in sorted((domain / "val" / "images").glob("*.png")):
        image = np.asarray(Image.open(path).convert("RGB"))
        mask = np.asarray(Image.open(domain / "val" / "masks" / path.name)) > 128
        out.append((path.stem, image, mask))
    return out


def _reference(ckpt: Path, domain: Path, prompt: str) -> dict:
    """The figures of `ckpt` computed here: numpy IoU/Dice/MAE/BER at 0.5, and pysodmetrics fed
    8-bit maps and 0/255 masks directly."""
    model = PromptedSam(load_sam(ckpt)).eval()
    sm, wfm, em = sod.Smeasure(), sod.WeightedFmeasure(), sod.Emeasure()
    ious, dices, maes, counts = [], [], [], np.zeros(4)
    for _, image, gt in _val_set(domain):
        ys, xs = np.nonzero(gt)
        h, w = gt.shape
        box = (
            [0, 0, w, h]
            if prompt == "full_box"
            else [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
        )
        # float64 as MaskScores takes it: round(255 * prob) in float32 differs at a few pixels
        prob = predict_prob(model, image, [float(v) for v in box]).astype(np.float64)
        pred = prob > 0.5
        tp, fp, fn = (pred & gt).sum(), (pred & ~gt).sum(), (~pred & gt).sum()
        ious.append(tp / (tp + fp + fn) if tp + fp + fn else 1.0)
        dices.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 1.0)
        maes.append(np.abs(prob - gt).mean())
        counts += [tp, fp, fn, (~pred & ~gt).sum()]
        pred8, gt8 = np.round(prob * 255).astype(np.uint8), gt.astype(np.uint8) * 255
        for metric in (sm, wfm, em):
            metric.step(pred=pred8, gt=gt8)
    tp, fp, fn, tn = counts
    return {
        "num_images": NUM_VAL,
        "iou": np.mean(ious),
        "dice": np.mean(dices),
        "mae": np.mean(maes),
        "ber": 100 * (1 - 0.5 * (tp / (tp + fn) + tn / (tn + fp))),
        "ber_pos": 100 * (1 - tp / (tp + fn)),
        "ber_neg": 100 * (1 - tn / (tn + fp)),
        "s_measure": sm.get_results()["sm"],
        "weighted_f": wfm.get_results()["wfm"],
        "e_measure": np.mean(em.get_results()["em"]["curve"]),
        "iou_per_image": ious,
    }


@pytest.mark.parametrize("prompt", ["full_box", "gt_box"])
def test_figures_match_pysodmetrics_and_numpy(
    domain: Path, adapted: Path, tmp_path: Path, prompt: str, capsys
) -> None:
    summary = _eval(tmp_path, "--ckpt", adapted, "--data", domain, "--prompt", prompt)
    ref = _reference(adapted, domain, prompt)
    (model,) = summary["models"]
    assert model["ckpt"] == str(adapted) and summary["difference"] is None
    assert model["iou_per_image"] == pytest.approx(ref.pop("iou_per_image"), abs=1e-12)
    assert model["results"] == pytest.approx(ref, abs=1e-9)
    assert 0 < model["results"]["s_measure"] < 1 and model["results"]["mae"] > 0
    assert summary["images"] == [name for name, _, _ in _val_set(domain)]
    assert (summary["prompt"], summary["split"], summary["data"]) == (prompt, "val", str(domain))
    assert summary["skips"] == {
        "summary": "0 skipped",
        "num_skipped": 0,
        "counts": {},
        "entries": [],
    }
    table = capsys.readouterr().out
    assert f"{NUM_VAL} images, prompt {prompt}, 0 skipped" in table
    assert f"{model['results']['iou']:.4f}" in table


def test_compare_puts_both_models_in_the_table(
    domain: Path, base: Path, adapted: Path, tmp_path: Path, capsys
) -> None:
    summary = _eval(tmp_path, "--ckpt", adapted, "--data", domain, "--compare-ckpt", base)
    a, b = summary["models"]
    assert (a["ckpt"], b["ckpt"]) == (str(adapted), str(base))
    ref = _reference(base, domain, "full_box")
    assert b["iou_per_image"] == pytest.approx(ref.pop("iou_per_image"), abs=1e-12)
    assert b["results"] == pytest.approx(ref, abs=1e-9)
    for key, diff in summary["difference"].items():
        assert diff == pytest.approx(a["results"][key] - b["results"][key])
    assert a["results"]["mae"] != b["results"]["mae"]  # the random LoRA changes the masks
    rows = capsys.readouterr().out.splitlines()
    assert [r.split()[0] for r in rows[3:6]] == [str(adapted), str(base), "difference"]
    assert f"{summary['difference']['mae']:+.4f}" in rows[5]


def test_a_model_compared_with_itself_differs_by_zero(
    domain: Path, base: Path, tmp_path: Path
) -> None:
    summary = _eval(tmp_path, "--ckpt", base, "--data", domain, "--compare-ckpt", base)
    assert len(summary["models"]) == 2
    assert set(summary["difference"].values()) == {0.0}


def test_adapted_with_base_moved_limit_and_overlays(
    domain: Path, base: Path, adapted: Path, tmp_path: Path, capsys
) -> None:
    moved = tmp_path / "moved.pth"
    shutil.copy(base, moved)
    other = _adapted(moved, tmp_path / "adapted.pt")
    moved.unlink()
    assert _run("--ckpt", other, "--data", domain) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(moved) in err and "--base" in err
    vis = tmp_path / "vis"
    args = ("--ckpt", other, "--base", base, "--data", domain, "--compare-ckpt", adapted)
    summary = _eval(tmp_path, *args, "--limit", 3, "--vis", vis, "--vis-limit", 2)
    assert summary["num_images"] == 3 and summary["limit"] == 3
    assert set(summary["difference"].values()) == {0.0}  # the same adapter, the same base
    pngs = sorted(vis.glob("*.png"))
    assert [p.name for p in pngs] == [
        f"{i:03d}_{n}.png" for i, n in enumerate(summary["images"][:2])
    ]
    width, height = Image.open(pngs[0]).size
    assert width > 2.5 * height  # image, model, comparison side by side


def test_user_errors_print_one_line_and_exit_2(domain: Path, base: Path, tmp_path: Path, capsys):
    missing = tmp_path / "nowhere"
    assert _run("--ckpt", base, "--data", missing) == 2
    assert capsys.readouterr().err == f"error: --data {missing}: no such folder\n"
    assert _run("--ckpt", base, "--data", domain, "--prompt", "points") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --prompt 'points'") and err.count("\n") == 1
    assert _run("--ckpt", tmp_path / "none.pth", "--data", domain) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    (tmp_path / "empty" / "val" / "images").mkdir(parents=True)
    (tmp_path / "empty" / "val" / "masks").mkdir()
    assert _run("--ckpt", base, "--data", tmp_path / "empty") == 2
    assert "no image of" in capsys.readouterr().err


def test_image_without_mask_is_skipped_or_stops(domain: Path, base: Path, tmp_path: Path, capsys):
    data = tmp_path / "data"
    shutil.copytree(domain, data)
    (data / "val" / "masks" / "val_00001.png").unlink()
    summary = _eval(tmp_path, "--ckpt", base, "--data", data, "--on-bad", "skip")
    assert summary["num_images"] == NUM_VAL - 1 and "val_00001" not in summary["images"]
    skips = summary["skips"]
    assert skips["counts"] == {"no_mask": 1} and skips["summary"] == "1 skipped: 1 no_mask"
    assert skips["entries"][0]["path"] == str(data / "val" / "images" / "val_00001.png")
    assert "1 skipped: 1 no_mask" in capsys.readouterr().out
    assert _run("--ckpt", base, "--data", data, "--on-bad", "stop") == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {data / 'val' / 'images' / 'val_00001.png'}: no mask")
    assert err.count("\n") == 1 and "--on-bad skip" in err
