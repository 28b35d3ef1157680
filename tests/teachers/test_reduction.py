"""Token-subsampled taps (`--reduction tokens=K`): the positions, the bytes a ViT-H sample takes
(from the shapes, and as the shards hold them), the manifest's record and the refusals that name
the reduction, verify, and resuming the distillation exactly."""

import json

import numpy as np
import pytest
import torch
import webdataset as wds

from eval.scenes.synthetic import make_coco
from launch.distill import main as distill_main
from teachers import DEFAULT_TAPS, codecs, load_teacher, preprocess
from teachers.build import TEACHER_SIZES
from teachers.cache import channel_axis, plan_cache, write_cache
from teachers.cache_cli import main as cache_main
from teachers.cache_read import (
    check_manifest,
    load_manifest,
    open_cache,
    read_cache,
    verify_cache,
)
from teachers.preprocess import decode_image, valid_mask
from teachers.reduction import (
    TOKENS,
    canonical,
    num_tokens,
    sample_nbytes,
    token_positions,
)
from teachers.teacher import feature_names
from tests.conftest import killer_script
from tests.distill.runs import BASE, assert_same_encoder, read_log, run_distill

K = 40  # of vit_tiny's 16 x 16 = 256 tokens at 256 px
MIXED = "embed=fp16,blocks=int8"
SLACK = 1e-5  # teacher rounding differences between batch sizes on the CPU


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco")
    make_coco(root, num_images=8, seed=3)
    return root


@pytest.fixture(scope="module")
def teacher():
    return load_teacher("vit_tiny", taps=(1, 3))


@pytest.fixture(scope="module")
def reduced(teacher, coco_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("reduced")
    plan = plan_cache(str(coco_root), 4)
    write_cache(teacher, plan, out, codec=MIXED, reduce=f"tokens={K}", progress=False)
    return out


def test_specs_and_their_errors_name_the_flag():
    assert num_tokens("none") is None and num_tokens(" tokens=256 ") == 256
    assert canonical("tokens=0064") == "tokens=64" and canonical("none") == "none"
    for bad in ("tokens=0", "tokens=", "pca=64", "256", "tokens=-3"):
        with pytest.raises(ValueError, match=r"--reduction .*give none .* or tokens=K"):
            num_tokens(bad)


def test_positions_are_seeded_by_the_key_and_lie_on_valid_cells():
    hw, img_size = (256, 150), 256  # 16 x 10 = 160 valid cells of 256
    a = token_positions("img_0001", hw, img_size, K)
    assert torch.equal(a, token_positions("img_0001", hw, img_size, K))  # no state: the key
    assert not torch.equal(a, token_positions("img_0002", hw, img_size, K))
    assert a.dtype == torch.int64 and a.shape == (K,)
    assert torch.equal(a, a.sort().values) and len(a.unique()) == K  # distinct when n >= K
    assert valid_mask(hw, img_size).flatten()[a].all()
    # fewer valid cells than K: every valid cell, tiled, each K / n times up to one
    few = token_positions("img_0001", (40, 40), img_size, K)  # 3 x 3 = 9 valid cells
    counts = torch.bincount(few, minlength=256)
    assert set(counts[valid_mask((40, 40), img_size).flatten()].tolist()) == {4, 5}
    assert counts.sum() == K


def test_positions_are_uniform_over_the_valid_cells():
    hw, img_size = (256, 256), 256
    hits = torch.zeros(256)
    num_keys = 2000
    for i in range(num_keys):
        hits += torch.bincount(token_positions(f"k{i}", hw, img_size, K), minlength=256)
    expected = num_keys * K / 256  # 312.5 a cell
    # binomial sd ~ 16.4 per cell; 5 sd over 256 cells
    assert (hits - expected).abs().max() < 5 * (expected * (1 - K / 256)) ** 0.5


def vit_h_bytes(spec: str, reduce: str) -> dict[str, int]:
    width, grid = TEACHER_SIZES["vit_h"][0], 1024 // 16
    fields = feature_names(DEFAULT_TAPS["vit_h"])
    widths = dict.fromkeys(fields[1:], width)
    return sample_nbytes(grid, widths, codecs.parse_codecs(spec, fields), reduce)


def test_the_recipes_vit_h_sample_with_taps_fits_in_2_5_mb():
    # the full-scale recipe: --codec int8 --reduction tokens=256 (README.md, launch/slurm/)
    recipe = vit_h_bytes("int8", "tokens=256")
    assert recipe["embed"] == 256 * 64 * 64 + 64 * 64 * 4 == 1_064_960  # int8, a scale a token
    assert sum(recipe.values()) == 1_064_960 + 1_315_840 == 2_380_800 <= 2_500_000
    # the other setting under 2.5 MB: the fp16 embedding with the taps at 64 tokens
    assert sum(vit_h_bytes(MIXED, "tokens=64").values()) == 2_426_112 <= 2_500_000
    assert sum(vit_h_bytes(MIXED, "tokens=256").values()) == 3_412_992 > 2_500_000


def test_vit_h_taps_at_256_tokens_int8():
    full = vit_h_bytes(MIXED, "none")
    assert sum(full.values()) == 23_134_208  # the mixed codec's whole sample, as before
    reduced = vit_h_bytes(MIXED, "tokens=256")
    assert reduced["embed"] == 2 * 256 * 64 * 64 == 2_097_152  # the final embedding stays whole
    taps = sum(v for f, v in reduced.items() if f != "embed")
    # 4 taps x 256 tokens x (1280 int8 values + a float32 scale), plus 256 int32 positions
    assert taps == 4 * 256 * (1280 + 4) + 256 * 4 == 1_315_840 <= 2_500_000
    assert sum(full.values()) - full["embed"] == 21_037_056
    assert taps / (sum(full.values()) - full["embed"]) == pytest.approx(0.0625, abs=1e-4)
    assert sum(v for f, v in vit_h_bytes("fp16", "tokens=256").items() if f != "embed") == (
        4 * 256 * 1280 * 2 + 1024
    )


def test_the_shards_hold_the_bytes_the_shapes_give(reduced, teacher):
    manifest = load_manifest(reduced)
    assert manifest["reduction"] == f"tokens={K}" and manifest["codec"] == MIXED
    expected = sample_nbytes(16, {"block1": 64, "block3": 64}, manifest["codecs"], f"tokens={K}")
    num = 0
    for raw in wds.WebDataset(str(reduced / "shard-000000.tar"), shardshuffle=False):
        arrays = {
            k.removesuffix(".npy"): codecs.from_npy_bytes(v)
            for k, v in raw.items()
            if k.endswith(".npy")
        }
        assert arrays["block1"].shape == (K, 64) and arrays["embed"].shape == (256, 16, 16)
        held = {
            f: arrays[f].nbytes + (arrays[f"{f}_scale"].nbytes if f"{f}_scale" in arrays else 0)
            for f in ("embed", "block1", "block3")
        }
        held[TOKENS] = arrays[TOKENS].nbytes
        assert held == expected
        assert json.loads(raw["json"])["reduction"] == f"tokens={K}"
        num += 1
    assert num == 4


def test_an_int8_embedding_with_reduced_taps_is_recorded_held_and_read_back(
    teacher, coco_root, tmp_path
):
    """The recipe's cache: every field int8, the taps at K tokens."""
    manifest = write_cache(
        teacher,
        plan_cache(str(coco_root), 4, limit=4),
        tmp_path,
        codec="int8",
        reduce=f"tokens={K}",
        progress=False,
    )
    assert manifest["codec"] == "int8" and manifest["reduction"] == f"tokens={K}"
    assert manifest["codecs"] == dict.fromkeys(("embed", "block1", "block3"), "int8")
    expected = sum(
        sample_nbytes(16, {"block1": 64, "block3": 64}, manifest["codecs"], f"tokens={K}").values()
    )
    for raw in wds.WebDataset(str(tmp_path / "shard-000000.tar"), shardshuffle=False):
        arrays = [codecs.from_npy_bytes(v) for k, v in raw.items() if k.endswith(".npy")]
        assert sum(a.nbytes for a in arrays) == expected
    samples = list(read_cache(tmp_path, codec="int8", reduction=f"tokens={K}"))
    assert len(samples) == 4
    for s in samples:
        pre = preprocess(decode_image(s.image), 256)
        ref = teacher(pre.image[None])["embed"][0]
        bound = codecs.error_bound(ref, "int8", channel_axis("embed")) + SLACK * (1 + ref.abs())
        err = (s.features["embed"] - ref).abs()
        assert (err <= bound).all() and err.max() > 0  # int8, within its bound
        assert s.features["block1"].shape == (K, 64)


def test_reduced_taps_are_the_teachers_at_the_stored_tokens(reduced, teacher):
    samples = list(read_cache(reduced, reduction=f"tokens={K}", codec=MIXED))
    assert len(samples) == 8
    for s in samples:
        pre = preprocess(decode_image(s.image), 256)
        assert torch.equal(s.tokens, token_positions(s.key, pre.input_hw, 256, K))
        fresh = teacher(pre.image[None])
        assert s.features["embed"].shape == (256, 16, 16)
        for name in ("block1", "block3"):
            ref = fresh[name][0].flatten(0, 1)[s.tokens]
            bound = codecs.error_bound(ref, "int8", channel_axis(name)) + SLACK * (1 + ref.abs())
            assert s.features[name].shape == (K, 64)
            assert ((s.features[name] - ref).abs() <= bound).all()
    report = verify_cache(reduced, teacher, num_recompute=3)
    assert report.ok and report.num_recomputed == 3 and 0 < report.max_error_ratio <= 1


def test_a_run_expecting_another_reduction_is_refused_naming_it(reduced, tmp_path, capsys):
    manifest = load_manifest(reduced)
    check_manifest(manifest, reduction="tokens=040")
    with pytest.raises(ValueError, match=r"reduction: cache has 'tokens=40', expected 'none'"):
        check_manifest(manifest, reduction="none")
    assert open_cache(reduced).facts["reduction"] == f"tokens={K}"
    argv = ["--shards", str(reduced), "--out", str(tmp_path / "run"), "--engine", "torch"]
    assert distill_main([*argv, "--reduction", "tokens=256", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "reduction: cache has 'tokens=40', expected 'tokens=256'" in err
    assert "--reduction" in err and not (tmp_path / "run").exists()


def test_a_rerun_with_another_reduction_is_refused(coco_root, tiny_ckpt, tmp_path, capsys):
    argv = ["--teacher", "vit_tiny", "--teacher-ckpt", str(tiny_ckpt), "--images", str(coco_root)]
    argv += ["--out", str(tmp_path), "--limit", "2", "--workers", "0", "--no-progress"]
    argv += ["--device", "cpu"]
    assert cache_main([*argv, "--reduction", "tokens=16"]) == 0, capsys.readouterr().err
    assert load_manifest(tmp_path)["reduction"] == "tokens=16"
    assert cache_main([*argv, "--reduction", "none"]) == 2
    assert "reduction: cache has 'tokens=16', this run 'none'" in capsys.readouterr().err
    assert cache_main([*argv, "--reduction", "pca=8"]) == 2
    assert "--reduction 'pca=8'" in capsys.readouterr().err


def test_a_cache_from_before_reductions_reads_as_none(teacher, coco_root, tmp_path):
    write_cache(teacher, plan_cache(str(coco_root), 4), tmp_path, progress=False)
    for name in ("manifest.json", "run.json"):
        path = tmp_path / name
        old = json.loads(path.read_text())
        del old["reduction"]
        path.write_text(json.dumps(old))
    assert open_cache(tmp_path).reduction == "none"
    check_manifest(load_manifest(tmp_path), reduction="none")
    manifest = write_cache(teacher, plan_cache(str(coco_root), 4), tmp_path, progress=False)
    assert manifest["complete"] and manifest["reduction"] == "none"  # resumes: nothing disagrees


@pytest.mark.slow
def test_sigkill_then_resume_on_a_reduced_cache_ends_like_an_uninterrupted_run(reduced, tmp_path):
    args = ["--shards", str(reduced), "--steps", "8", "--batch-size", "4", "--engine", "torch"]
    args += ["--checkpoint-every", "4", "--dld", "uniform", *BASE]
    killer = killer_script("launch/distill.py", kill_at=6)
    killed = run_distill(*args, "--out", str(tmp_path / "killed"), script=killer, check=False)
    assert killed.returncode == -9
    resumed = run_distill(*args, "--out", str(tmp_path / "killed"), "--resume", "auto")
    assert "at step 4" in resumed.stdout and "reduction tokens=40" in resumed.stdout
    run_distill(*args, "--out", str(tmp_path / "straight"))
    assert_same_encoder(tmp_path / "killed", tmp_path / "straight")
    losses = lambda out: [float(r["loss_block1"]) for r in read_log(out)]  # noqa: E731
    np.testing.assert_allclose(
        losses(tmp_path / "killed"), losses(tmp_path / "straight"), rtol=1e-5
    )
    assert all(v > 0 for v in losses(tmp_path / "straight"))
