"""Per-field codecs (`--codec embed=fp16,blocks=int8`): the spec, the shards, the manifest, the
reader's and the distiller's checks, and the bytes a ViT-H sample takes."""

import json

import pytest
import webdataset as wds

from eval.scenes.synthetic import make_coco
from launch.distill import main as distill_main
from teachers import DEFAULT_TAPS, codecs, preprocess
from teachers.build import TEACHER_SIZES
from teachers.cache import channel_axis, plan_cache, write_cache
from teachers.cache_cli import main as cache_main
from teachers.cache_read import check_manifest, load_manifest, open_cache, read_cache
from teachers.preprocess import decode_image
from teachers.teacher import feature_names

MIXED = "embed=fp16,blocks=int8"
SLACK = 1e-5  # teacher rounding differences between batch sizes on the CPU
FIELDS = feature_names([7, 15, 23, 31])


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco")
    make_coco(root, num_images=4, seed=0)
    return root


@pytest.fixture(scope="module")
def mixed_cache(teacher, coco_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("mixed")
    plan = plan_cache(str(coco_root), 2)
    write_cache(teacher, plan, out, codec=MIXED, batch_size=2, progress=False)
    return out


def test_spec_names_fields_blocks_and_single_blocks():
    assert codecs.parse_codecs("int8", FIELDS) == dict.fromkeys(FIELDS, "int8")
    mixed = codecs.parse_codecs(MIXED, FIELDS)
    assert mixed == {"embed": "fp16"} | dict.fromkeys(FIELDS[1:], "int8")
    assert codecs.codec_spec(mixed) == MIXED
    one = codecs.parse_codecs("blocks=int8, block31=bf16", FIELDS)  # a block wins over blocks
    assert one == {"embed": "fp16", "block7": "int8", "block15": "int8", "block23": "int8"} | {
        "block31": "bf16"
    }
    assert codecs.codec_spec(one) == "embed=fp16,block7=int8,block15=int8,block23=int8,block31=bf16"
    assert codecs.codec_spec(codecs.parse_codecs("embed=int8,blocks=int8", FIELDS)) == "int8"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("fp8", "--codec 'fp8': choose one of fp16, bf16, int8, or per field"),
        ("embed=fp8", "embed='fp8': choose one of fp16, bf16, int8"),
        ("embed=fp16,head=int8", "no field head; the fields are embed, blocks, block7"),
        ("embed=fp16,embed=int8", "embed is given twice"),
        ("embed=fp16,int8", "'int8' is not FIELD=CODEC"),
    ],
)
def test_bad_specs_name_the_flag_and_the_choices(spec, message):
    with pytest.raises(ValueError, match="--codec") as err:
        codecs.parse_codecs(spec, FIELDS)
    assert message in str(err.value)


def test_mixed_cache_reads_back_within_each_fields_bound(teacher, coco_root, mixed_cache):
    manifest = load_manifest(mixed_cache)
    assert manifest["codec"] == MIXED
    assert manifest["codecs"] == {"embed": "fp16", "block1": "int8", "block3": "int8"}
    samples = list(read_cache(mixed_cache, codec=MIXED, taps=[1, 3]))
    assert len(samples) == 4
    for s in samples:
        assert s.meta["dtypes"] == {"embed": "float16", "block1": "int8", "block3": "int8"}
        fresh = teacher(preprocess(decode_image(s.image), 256).image[None])
        for name, codec in (("embed", "fp16"), ("block1", "int8"), ("block3", "int8")):
            ref, cached = fresh[name][0], s.features[name]
            bound = codecs.error_bound(ref, codec, channel_axis(name)) + SLACK * (1 + ref.abs())
            err = (cached - ref).abs()
            assert (err <= bound).all(), f"{name}: {float((err / bound).max())}x the {codec} bound"
        # int8 really is coarser than fp16 would have been on the blocks
        block = fresh["block3"][0]
        fp16_bound = codecs.error_bound(block, "fp16", -1)
        assert ((s.features["block3"] - block).abs() > fp16_bound).any()


def test_stored_bytes_are_what_the_shards_hold(mixed_cache):
    raw = next(iter(wds.WebDataset(str(mixed_cache / "shard-000000.tar"), shardshuffle=False)))
    for name, shape, codec in (
        ("embed", (256, 16, 16), "fp16"),
        ("block1", (16, 16, 64), "int8"),
    ):
        arrays = [codecs.from_npy_bytes(raw[f"{name}.npy"])]
        if codec == "int8":
            arrays.append(codecs.from_npy_bytes(raw[f"{name}_scale.npy"]))
        assert arrays[0].shape == shape
        assert sum(a.nbytes for a in arrays) == codecs.stored_nbytes(
            shape, codec, channel_axis(name)
        )


def vit_h_sample_bytes(spec: str) -> int:
    """Bytes of the arrays of one ViT-H sample at 1024 px with its four default taps."""
    width, grid = TEACHER_SIZES["vit_h"][0], 1024 // 16
    fields = feature_names(DEFAULT_TAPS["vit_h"])
    per_field = codecs.parse_codecs(spec, fields)
    shapes = {f: (256, grid, grid) if f == "embed" else (grid, grid, width) for f in fields}
    return sum(codecs.stored_nbytes(shapes[f], per_field[f], channel_axis(f)) for f in fields)


def test_mixed_vit_h_sample_is_about_half_of_fp16():
    fp16, mixed = vit_h_sample_bytes("fp16"), vit_h_sample_bytes(MIXED)
    assert fp16 == 44_040_192  # 2 bytes x (256 x 64 x 64 + 4 x 64 x 64 x 1280)
    # embed at fp16 (2,097,152) + 4 blocks of int8 values and float32 per-token scales
    assert mixed == 2 * 256 * 64 * 64 + 4 * (64 * 64 * 1280 + 4 * 64 * 64) == 23_134_208
    assert mixed / fp16 == pytest.approx(0.5253, abs=1e-4)
    assert vit_h_sample_bytes("int8") == 22_102_016  # all int8: only 4.5% smaller than mixed


def test_manifest_check_names_the_differing_field(mixed_cache):
    manifest = load_manifest(mixed_cache)
    check_manifest(manifest, codec="embed=fp16,blocks=int8")
    check_manifest(manifest, codec="blocks=int8")  # embed keeps fp16 when not named
    with pytest.raises(ValueError) as err:
        check_manifest(manifest, codec="embed=fp16,blocks=int8,block3=bf16")
    assert (
        "codec: cache has 'embed=fp16,blocks=int8', expected 'embed=fp16,block1=int8,"
        "block3=bf16' (block3 is int8, not bf16) (give --codec as the cache has it"
    ) in str(err.value)
    with pytest.raises(
        ValueError,
        match=r"codec: cache has 'embed=fp16,blocks=int8', expected "
        r"'fp16' \(block1 is int8, not fp16; block3 is int8, not fp16\)",
    ):
        check_manifest(manifest, codec="fp16")


def test_old_single_codec_manifest_still_reads(teacher, coco_root, tmp_path):
    write_cache(teacher, plan_cache(str(coco_root), 2), tmp_path, codec="int8", progress=False)
    for name in ("manifest.json", "run.json"):  # as caches were written before per-field codecs
        path = tmp_path / name
        old = json.loads(path.read_text())
        del old["codecs"]
        path.write_text(json.dumps(old))
    info = open_cache(tmp_path)
    assert info.codec == "int8" and info.codecs == dict.fromkeys(
        ["embed", "block1", "block3"], "int8"
    )
    assert len(list(read_cache(tmp_path, codec="int8"))) == 4
    with pytest.raises(ValueError, match="codec: cache has 'int8', expected 'fp16'"):
        check_manifest(load_manifest(tmp_path), codec="fp16")
    # a rerun with the same settings resumes the old cache (no codecs key to disagree on)
    manifest = write_cache(
        teacher, plan_cache(str(coco_root), 2), tmp_path, codec="int8", progress=False
    )
    assert manifest["complete"] and manifest["codecs"]["block3"] == "int8"


@pytest.mark.parametrize("phase", [[], ["--phase", "decoder", "--init", "student.pt"]])
def test_distill_refuses_a_cache_of_another_per_field_codec(mixed_cache, tmp_path, capsys, phase):
    argv = ["--shards", str(mixed_cache), "--out", str(tmp_path / "run"), "--engine", "torch"]
    argv += ["--codec", "embed=bf16,blocks=int8", "--no-progress", *phase]
    assert distill_main(argv) == 2
    err = capsys.readouterr().err
    assert "codec: cache has 'embed=fp16,blocks=int8', expected 'embed=bf16,blocks=int8'" in err
    assert "(embed is fp16, not bf16)" in err
    assert not (tmp_path / "run").exists()


def test_cache_cli_writes_the_mixed_codec(coco_root, tiny_ckpt, tmp_path, capsys):
    argv = ["--teacher", "vit_tiny", "--teacher-ckpt", str(tiny_ckpt), "--images", str(coco_root)]
    argv += ["--out", str(tmp_path), "--codec", "blocks=int8", "--limit", "2", "--workers", "0"]
    argv += ["--no-progress", "--device", "cpu"]
    assert cache_main(argv) == 0, capsys.readouterr().err
    assert load_manifest(tmp_path)["codec"] == MIXED
    assert cache_main([*argv[:-2], "--codec", "int8", "--device", "cpu"]) == 2
    assert "codec: cache has 'embed=fp16,blocks=int8', this run 'int8'" in capsys.readouterr().err
