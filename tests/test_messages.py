"""Every entry point's numeric flags at zero, negative and too-large values: each mistake ends
with exit 2 and one line naming the flag and the fix; a value that still works but not as
expected runs and says so in a note naming the flag."""

from __future__ import annotations

import pytest

from eval.cli import main as eval_main
from eval.masks import main as masks_main
from eval.scenes.synthetic import make_coco
from launch.adapt import main as adapt_main
from launch.distill import main as distill_main
from teachers.cache_cli import main as cache_main

PLACEMENT = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "MASTER_PORT")


@pytest.fixture(autouse=True)
def one_process(monkeypatch):
    for name in PLACEMENT:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco")
    make_coco(root, num_images=2, seed=0)
    return root


def _error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


CACHE = [
    (["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
    (["--samples-per-shard", "0"], "--samples-per-shard must be at least 1, got 0"),
    (["--samples-per-shard", "-4"], "--samples-per-shard must be at least 1, got -4"),
    (["--limit", "0"], "--limit must be at least 1, got 0"),
    (["--limit", "-1"], "--limit must be at least 1, got -1"),
    (["--workers", "-1"], "--workers must be 0 (decode in the main process) or more, got -1"),
    (["--verify", "-2"], "--verify N recomputes N samples: give 0 (checksums only) or more"),
    (["--layers", "7,40"], "--layers 7,40: vit_h has blocks 0..31; 40 is not one of them"),
    (["--layers", "-1"], "--layers -1: vit_h has blocks 0..31; -1 is not one of them"),
    (["--codec", "embed=fp32"], "--codec 'embed=fp32': embed='fp32': choose one of fp16"),
]


@pytest.mark.parametrize(("argv", "message"), CACHE)
def test_cache_flags(argv, message, capsys):
    assert cache_main(["--out", "o", "--images", "i", *argv]) == 2
    assert message in _error(capsys)


def _cache_args(coco_root, tiny_ckpt, out):
    return [
        "--teacher",
        "vit_tiny",
        "--teacher-ckpt",
        str(tiny_ckpt),
        "--images",
        str(coco_root),
        "--out",
        str(out),
        "--workers",
        "0",
        "--no-progress",
        "--device",
        "cpu",
    ]


def test_cache_notes_limit_beyond_inputs_and_idle_processes(
    coco_root, tiny_ckpt, tmp_path, monkeypatch, capsys
):
    args = _cache_args(coco_root, tiny_ckpt, tmp_path / "c")
    assert cache_main([*args, "--limit", "100"]) == 0
    assert "note: --limit 100 is more than the 2 inputs of --images: caching all" in (
        capsys.readouterr().out
    )
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")  # rank 1 would find no shard: 2 inputs, 1 shard
    assert (
        cache_main([*_cache_args(coco_root, tiny_ckpt, tmp_path / "d"), "--samples-per-shard", "2"])
        == 0
    )
    out = capsys.readouterr().out
    assert (
        "note: 2 inputs make 1 shard(s) of --samples-per-shard 2 for 2 processes, so 1 "
        "process(es) have nothing to cache: use --samples-per-shard 1 or less"
    ) in out
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert (
        cache_main([*_cache_args(coco_root, tiny_ckpt, tmp_path / "e"), "--samples-per-shard", "1"])
        == 0
    )
    assert "have nothing to cache: use at most 2 processes" in capsys.readouterr().out


def test_verify_beyond_the_cache_recomputes_all_and_says_so(coco_root, tiny_ckpt, tmp_path, capsys):
    assert cache_main(_cache_args(coco_root, tiny_ckpt, tmp_path)) == 0
    capsys.readouterr()
    argv = ["--out", str(tmp_path), "--verify", "50", "--teacher", "vit_tiny"]
    assert cache_main([*argv, "--teacher-ckpt", str(tiny_ckpt), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "note: --verify 50 asks for more samples than" in out and "holds (2)" in out
    assert "recomputed 2 " in out and "cache OK" in out


TRAIN = [
    (["--steps", "0"], "--steps must be at least 1, got 0"),
    (["--batch-size", "-8"], "--batch-size must be at least 1, got -8"),
    (["--micro-batch-size", "0"], "--micro-batch-size must be at least 1, got 0; leave it unset"),
    (
        ["--batch-size", "6", "--micro-batch-size", "4"],
        "--batch-size 6 must be a multiple of --micro-batch-size 4 x 1 processes = 4",
    ),
    (["--checkpoint-every", "0"], "--checkpoint-every must be at least 1, got 0"),
    (["--keep-checkpoints", "0"], "--keep-checkpoints must be at least 1, got 0"),
    (["--log-every", "-1"], "--log-every must be at least 1, got -1"),
    (["--max-nonfinite", "0"], "--max-nonfinite must be at least 1, got 0"),
    (["--lr", "0"], "--lr must be positive, got 0.0"),
    (["--weight-decay", "-0.1"], "--weight-decay must be 0 or more, got -0.1"),
    (["--grad-clip", "-1"], "--grad-clip must be 0 or more (0 disables it), got -1.0"),
    (["--warmup-steps", "-5"], "--warmup-steps must be 0 or more, got -5"),
    (["--min-lr-ratio", "2"], "--min-lr-ratio is a fraction of --lr: give 0 to 1, got 2.0"),
    (["--workers", "-1"], "--workers must be 0 or more, got -1"),
]
DISTILL = [
    (["--shuffle-buffer", "0"], "--shuffle-buffer must be at least 1, got 0"),
    (["--dld-floor", "1.5"], "--dld-floor is the final embedding's least weight: give 0 to 1"),
    (["--dld-every-epochs", "0"], "--dld-every-epochs must be positive, got 0.0; leave it unset"),
    (["--img-size", "100"], "--img-size must be a positive multiple of 16 (the patch size)"),
    (
        ["--phase", "decoder", "--init", "s.pt", "--max-prompts", "0"],
        "--max-prompts must be at least 1, got 0",
    ),
    (
        ["--phase", "decoder", "--init", "s.pt", "--decode-iters", "-1"],
        "--decode-iters must be 0 or more, got -1",
    ),
    (
        ["--phase", "decoder", "--init", "s.pt", "--feature-weight", "-1"],
        "--feature-weight must be 0 or more, got -1.0",
    ),
    (
        ["--student-options", "embed_dim"],
        "--student-options 'embed_dim': 'embed_dim' is not key=number (e.g. embed_dim=64)",
    ),
    (
        ["--student-options", "embed_dim=64", "--init", "s.pt"],
        "--student-options with --init: the architecture comes from the --init file",
    ),
]


@pytest.fixture(scope="module")
def tiny_cache(coco_root, tiny_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("cache")
    assert cache_main(_cache_args(coco_root, tiny_ckpt, out)) == 0
    return out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--teacher-taps", "1,40"],
            "taps: cache has [1, 3], expected [1, 40] (give --teacher-taps",
        ),
        (["--img-size", "1024"], "img_size: cache has 256, expected 1024 (give --img-size as the"),
        (["--img-size", "1024", "--codec", "int8"], "(give --img-size, --codec as the cache has"),
    ],
)
def test_distill_facts_beyond_the_cache(argv, message, tiny_cache, tmp_path, capsys):
    run = ["--shards", str(tiny_cache), "--out", str(tmp_path / "r"), "--engine", "torch"]
    assert distill_main([*run, *argv]) == 2
    err = _error(capsys)
    assert message in err and "or leave it unset to take the cache's" in err


@pytest.mark.parametrize(("argv", "message"), TRAIN + DISTILL)
def test_distill_flags(argv, message, tmp_path, capsys):
    assert distill_main(["--shards", "s", "--out", str(tmp_path / "r"), *argv]) == 2
    assert message in _error(capsys)


@pytest.mark.parametrize(
    ("argv", "message"), TRAIN + [(["--val-every", "0"], "--val-every must be at least 1, got 0")]
)
def test_adapt_flags(argv, message, tmp_path, capsys):
    assert adapt_main(["--ckpt", "c.pt", "--data", "d", "--out", str(tmp_path / "r"), *argv]) == 2
    assert message in _error(capsys)


@pytest.mark.parametrize("main", [distill_main, adapt_main], ids=["distill", "adapt"])
def test_a_batch_smaller_than_the_processes_names_the_fix(main, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    argv = ["--shards", "s"] if main is distill_main else ["--ckpt", "c.pt", "--data", "d"]
    assert main([*argv, "--out", str(tmp_path / "r"), "--batch-size", "1"]) == 2
    err = _error(capsys)
    assert (
        "--batch-size 1 is the global batch, shared by the 2 processes: it must be at least, and "
        "a multiple of, 2 (the number of processes); e.g. --batch-size 2"
    ) in err
    assert "micro-batch 0" not in err
    assert main([*argv, "--out", str(tmp_path / "r"), "--batch-size", "5"]) == 2
    err = _error(capsys)
    assert "--batch-size 5 is the global batch" in err and "e.g. --batch-size 4" in err


EVAL = [
    (["--num-clicks", "0"], "--num-clicks must be at least 1, got 0"),
    (["--prompt", "point", "--num-clicks", "-2"], "--num-clicks must be at least 1, got -2"),
    (["--limit-images", "0"], "--limit-images must be at least 1, got 0"),
    (["--prompt-chunk", "0"], "--prompt-chunk must be at least 1, got 0"),
    (["--vis-limit", "-1"], "--vis-limit must be at least 0, got -1"),
]


@pytest.mark.parametrize("dataset", ["coco", "lvis"])
@pytest.mark.parametrize(("argv", "message"), EVAL)
def test_eval_flags(dataset, argv, message, capsys):
    lvis = ["--lvis-json", "v.json"] if dataset == "lvis" else []
    assert eval_main(dataset, ["--ckpt", "c.pth", "--coco-root", "r", *lvis, *argv]) == 2
    assert message in _error(capsys)


def test_eval_notes_a_limit_beyond_the_images(coco_root, tiny_ckpt, capsys):
    argv = ["--ckpt", str(tiny_ckpt), "--coco-root", str(coco_root), "--limit-images", "40"]
    assert eval_main("coco", [*argv, "--no-progress", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "note: --limit-images 40 is more than the 2 images with something to evaluate" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--limit", "0"], "--limit must be at least 1, got 0"),
        (["--limit", "-3"], "--limit must be at least 1, got -3"),
        (["--vis-limit", "-1"], "--vis-limit must be at least 0, got -1"),
    ],
)
def test_masks_flags(argv, message, tmp_path, capsys):
    assert masks_main(["--ckpt", "c.pt", "--data", str(tmp_path), *argv]) == 2
    assert message in _error(capsys)
