"""The entry points end to end on generated data: output JSON and records, overlays, the user
errors, and several processes giving exactly the numbers of one."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from eval.cli import EvalConfig, main
from eval.parts import part_path
from tests.conftest import REPO


def _run(dataset: str, *args: str) -> int:
    return main(dataset, [*map(str, args), "--no-progress"])


def _lvis_inputs(ckpt: Path, coco: Path, lvis: Path) -> list:
    """The flags that name an LVIS evaluation's inputs: the checkpoint, COCO's images (where
    LVIS's live) and LVIS's annotations."""
    return ["--ckpt", ckpt, "--coco-root", coco, "--lvis-root", lvis]


def _instances(out: Path) -> list[dict]:
    lines = Path(f"{out}.instances.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def _ann_count(root: Path, crowd: bool = True) -> int:
    anns = json.loads((root / "annotations" / "instances_val2017.json").read_text())["annotations"]
    return sum(a["area"] >= 1 and (crowd or not a["iscrowd"]) for a in anns)


def test_coco_box_json(eval_coco: Path, tiny_ckpt: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "box.json"
    assert _run("coco", "--ckpt", tiny_ckpt, "--coco-root", eval_coco, "--out", out) == 0
    summary = json.loads(out.read_text())
    records = _instances(out)
    assert summary["num_instances"] == len(records) == _ann_count(eval_coco)
    assert [r["id"] for r in records] == sorted({r["id"] for r in records})
    assert summary["count"]["all"] == len(records) and summary["num_images"] == 8
    mean = 100 * sum(r["iou"][0] for r in records) / len(records)
    assert summary["miou"]["all"] == pytest.approx(mean)
    assert set(summary["miou"]) == {"all", "small", "medium", "large"}
    p = summary["protocol"]
    assert (p["name"], p["prompt"], p["include_crowd"], p["multimask_output"]) == (
        "efficientvit",
        "box",
        True,
        True,
    )
    assert (p["min_area"], p["area_small_max"], p["area_large_min"], p["mask_feedback"]) == (
        1.0,
        1024,
        9216,
        False,
    )
    assert summary["world_size"] == 1 and summary["instances_per_s"] > 0
    printed = capsys.readouterr().out
    assert "protocol efficientvit (crowd included, multimask argmax)" in printed
    assert "instances/s" in printed


def test_points_compare_and_overlays(
    eval_coco: Path, tiny_ckpt: Path, other_ckpt: Path, tmp_path: Path
) -> None:
    out, vis = tmp_path / "pt.json", tmp_path / "vis"
    args = ["--ckpt", tiny_ckpt, "--coco-root", eval_coco, "--prompt", "point", "--num-clicks", "2"]
    args += [
        "--compare-ckpt",
        other_ckpt,
        "--out",
        out,
        "--vis",
        vis,
        "--vis-limit",
        "2",
        "--limit-images",
        "3",
    ]
    assert _run("coco", *args) == 0
    summary = json.loads(out.read_text())
    assert list(summary["miou_per_click"]) == ["1", "2"]
    assert summary["miou"] == summary["miou_per_click"]["2"]
    cmp = summary["compare"]
    assert set(cmp) == {"miou", "miou_per_click", "agreement"} and summary["num_images"] == 3
    assert 0 <= cmp["agreement"]["miou"]["all"] <= 100
    assert all(
        len(r["iou"]) == len(r["compare_iou"]) == len(r["agreement"]) == 2 for r in _instances(out)
    )
    assert len(list(vis.glob("*.png"))) == 2


def test_edgesam_protocol_and_lvis(
    eval_coco: Path, eval_lvis: Path, tiny_ckpt: Path, tmp_path: Path
) -> None:
    out = tmp_path / "edge.json"
    assert (
        _run(
            "coco",
            "--ckpt",
            tiny_ckpt,
            "--coco-root",
            eval_coco,
            "--protocol",
            "edgesam",
            "--out",
            out,
        )
        == 0
    )
    summary = json.loads(out.read_text())
    assert summary["num_instances"] == _ann_count(eval_coco, crowd=False)
    assert not summary["protocol"]["include_crowd"] and not summary["protocol"]["multimask_output"]
    out = tmp_path / "lvis.json"
    assert _run("lvis", *_lvis_inputs(tiny_ckpt, eval_coco, eval_lvis), "--out", out) == 0
    lvis = json.loads((eval_lvis / "lvis_v1_val.json").read_text())
    assert json.loads(out.read_text())["num_instances"] == len(lvis["annotations"])


def test_detections_give_mask_ap(
    eval_coco: Path, eval_lvis: Path, tiny_ckpt: Path, tmp_path: Path
) -> None:
    for name, gt_json, roots in (
        ("coco", eval_coco / "annotations" / "instances_val2017.json", []),
        ("lvis", eval_lvis / "lvis_v1_val.json", ["--lvis-root", eval_lvis]),
    ):
        anns = json.loads(gt_json.read_text())["annotations"]
        dets = [
            dict(image_id=a["image_id"], category_id=a["category_id"], bbox=a["bbox"], score=0.9)
            for a in anns
        ]
        (tmp_path / "dets.json").write_text(json.dumps(dets))
        out = tmp_path / f"{name}_det.json"
        args = [
            "--ckpt",
            tiny_ckpt,
            "--coco-root",
            eval_coco,
            *roots,
            "--det-json",
            tmp_path / "dets.json",
        ]
        assert _run(name, *args, "--out", out) == 0
        summary = json.loads(out.read_text())
        assert (
            summary["num_instances"] == len(dets) and summary["protocol"]["prompt"] == "detections"
        )
        assert 0 <= summary["ap"]["AP"] < 100 and "num_gt_dropped" in summary["ap"]
        assert all("segmentation" in r for r in _instances(out))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--num-clicks", "3"], "--num-clicks needs --prompt point"),
        (["--prompt", "point", "--det-json", "d.json"], "use --prompt box"),
        (["--limit-images", "0"], "--limit-images must be at least 1"),
        (["--merge"], "--merge needs --out"),
    ],
)
def test_config_mistakes(args: list[str], message: str, capsys) -> None:
    assert _run("coco", "--ckpt", "x.pth", "--coco-root", "c", *args) == 2
    assert message in capsys.readouterr().err


def test_config_requires_lvis_annotations() -> None:
    with pytest.raises(ValueError, match="--lvis-root"):
        EvalConfig(dataset="lvis", ckpt="x", coco_root="c")
    assert EvalConfig(dataset="lvis", ckpt="x", coco_root="c", lvis_json="v.json").prompt == "box"


def test_missing_files(eval_coco: Path, tiny_ckpt: Path, tmp_path: Path, capsys) -> None:
    assert _run("coco", "--ckpt", tmp_path / "none.pth", "--coco-root", eval_coco) == 2
    assert "none.pth" in capsys.readouterr().err
    root = tmp_path / "coco"
    shutil.copytree(eval_coco, root)
    gone = root / "val2017" / "000000000002.png"
    gone.unlink()
    assert _run("coco", "--ckpt", tiny_ckpt, "--coco-root", root) == 2
    assert f"image file not found: {gone}" in capsys.readouterr().err
    out = tmp_path / "skip.json"
    assert (
        _run("coco", "--ckpt", tiny_ckpt, "--coco-root", root, "--skip-missing", "--out", out) == 0
    )
    summary = json.loads(out.read_text())
    assert summary["num_images_skipped"] == 1 and summary["missing_images"] == [str(gone)]
    assert summary["num_images"] == 7 and "1 skipped" in capsys.readouterr().out
    # An annotation file with nothing to evaluate.
    path = root / "annotations" / "instances_val2017.json"
    data = json.loads(path.read_text())
    path.write_text(
        json.dumps(dict(data, annotations=[a for a in data["annotations"] if a["area"] < 1]))
    )
    assert _run("coco", "--ckpt", tiny_ckpt, "--coco-root", root) == 2
    assert "nothing to evaluate" in capsys.readouterr().err


def _cli(script: str, *args, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, f"eval/{script}.py", *map(str, args), "--no-progress"],
        cwd=REPO,
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait(proc: subprocess.Popen) -> str:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    return out


@pytest.mark.slow
def test_two_processes_equal_one(
    eval_coco: Path, eval_lvis: Path, tiny_ckpt: Path, tmp_path: Path
) -> None:
    args = _lvis_inputs(tiny_ckpt, eval_coco, eval_lvis)
    args += ["--prompt", "point", "--num-clicks", "2"]
    single = tmp_path / "single.json"
    _wait(_cli("lvis", *args, "--out", single))
    # Two ranks at once, without torch.distributed: whichever finishes last merges.
    out = tmp_path / "two" / "eval.json"
    procs = [
        _cli("lvis", *args, "--out", out, env={"RANK": str(r), "WORLD_SIZE": "2"}) for r in (0, 1)
    ]
    logs = [_wait(p) for p in procs]
    assert all(part_path(out, r, 2).is_file() for r in (0, 1)) and out.is_file()
    assert sum("instances/s over all processes" in log for log in logs) >= 1
    first = out.read_text()
    # The explicit merge gives the same file, also as a 1-task SLURM job (the world size of the
    # parts comes from their names, not from the merge job's SLURM_NTASKS).
    out.unlink()
    _wait(
        _cli("lvis", *args, "--out", out, "--merge", env={"SLURM_PROCID": "0", "SLURM_NTASKS": "1"})
    )
    assert out.read_text() == first
    merged, alone = json.loads(out.read_text()), json.loads(single.read_text())
    assert _instances(out) == _instances(single)
    drop = ("world_size", "seconds", "instances_per_s", "instances_file")
    assert {k: v for k, v in merged.items() if k not in drop} == {
        k: v for k, v in alone.items() if k not in drop
    }
    assert merged["world_size"] == 2 and merged["num_instances"] == alone["num_instances"] > 0
    # Parts of another run (here another checkpoint) are refused.
    other = tmp_path / "other.pth"
    shutil.copy(tiny_ckpt, other)
    proc = _cli("lvis", *[other if a == tiny_ckpt else a for a in args], "--out", out, "--merge")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2 and "comes from another run" in err


def test_box_fill_baseline_is_each_masks_share_of_its_box(
    tmp_path: Path, tiny_ckpt: Path, capsys
) -> None:
    from eval.scenes.photos import make_photo_coco

    root = tmp_path / "held"
    make_photo_coco(root, "held", 3, seed=5, min_side=96, max_side=160)
    out = tmp_path / "baseline.json"
    assert (
        _run("coco", "--ckpt", tiny_ckpt, "--coco-root", root, "--baseline", "box", "--out", out)
        == 0
    )
    anns = {
        a["id"]: a
        for a in json.loads((root / "annotations" / "instances_val2017.json").read_text())[
            "annotations"
        ]
    }
    records = _instances(out)
    # a visible mask lies inside its tight box, so the filled box's IoU is mask area / box area
    for r in records:
        a = anns[r["id"]]
        assert r["baseline_iou"][0] == pytest.approx(
            a["area"] / (a["bbox"][2] * a["bbox"][3]), abs=1e-6
        )
    summary = json.loads(out.read_text())
    mean = 100 * sum(r["baseline_iou"][0] for r in records) / len(records)
    assert summary["baseline_box"]["miou"]["all"] == pytest.approx(mean)
    assert "box-fill baseline" in capsys.readouterr().out
