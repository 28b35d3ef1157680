r"""The cache at GPU speed: bytes per ViT-H sample, what one loader core decodes, and how many
images a second a node's storage can feed each GPU, beside what the GPU could compute.

    python launch/bench/cache_io.py [--samples 6] [--repeats 3] [--work runs/bench_cache_io] \
        [--out runs/bench_cache_io.json]

For each setting (a codec spec and a reduction, `teachers.codecs` and `teachers.reduction`), it
writes `--samples` ViT-H-shaped samples (final embedding [256, 64, 64], blocks 7, 15, 23, 31 of
[64, 64, 1280], synthetic values; a final-embedding-only row has no blocks) into one shard with
the cache writer's own `encode_sample`, and checks that the feature arrays in the shard have the
bytes `teachers.reduction.sample_nbytes` computes from the shapes. Loader throughput: one torch
thread reads the shard and decodes every sample with the training loader's `decode_sample` (npy
parsing, bulk dequantisation, token positions), once with the shard's pages dropped from the page
cache (posix_fadvise), so the bytes come from this machine's disk, and once from the page cache,
the CPU's part alone; settings take turns, medians over `--repeats` passes. Decoding and
preprocessing the image (a 2250 x 1500 JPEG: SA-1B's images have their short side at 1500 px) to
1024 px is timed on its own: the loader pays it for every setting alike.

The storage table divides a node's read bandwidth (1, 5, 20 GB/s shared by 8 GPUs) by the feature
bytes of a sample (the image and annotations, the same for every setting, not counted). The
compute-bound rate is what an H100 trains `dfa_s` at: about 95 GFLOPs a training image (3 x its
31.8 GFLOPs forward at 1024 px) at 10 to 30% of the ~990 TFLOPs dense bf16 peak.
"""

import sys
from pathlib import Path

_here = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
sys.path.insert(0, str(_here.parents[1]))

import io  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from types import SimpleNamespace  # noqa: E402

import torch  # noqa: E402
import webdataset as wds  # noqa: E402

from launch.bench import common  # noqa: E402
from teachers import codecs  # noqa: E402
from teachers.cache import encode_sample  # noqa: E402
from teachers.cache_read import decode_sample  # noqa: E402
from teachers.preprocess import decode_image, preprocess  # noqa: E402
from teachers.reduction import sample_nbytes  # noqa: E402
from teachers.runtime.flags import parse_config  # noqa: E402
from teachers.teacher import feature_names  # noqa: E402

TAPS, WIDTH, GRID, IMG_SIZE = (7, 15, 23, 31), 1280, 64, 1024
MIXED = "embed=fp16,blocks=int8"
# (codec, reduction, taps): the settings compared; the third to fifth fit a ViT-H sample with
# taps near 2.5 MB (launch/bench/cache_fidelity.py measures what each costs in quality)
SETTINGS = (
    ("fp16", "none", TAPS),
    (MIXED, "none", TAPS),
    ("int8", "tokens=256", TAPS),
    (MIXED, "tokens=64", TAPS),
    (MIXED, "tokens=256", TAPS),
    (MIXED, "tokens=448", TAPS),
    ("fp16", "tokens=256", TAPS),
    ("fp16", "none", ()),
)
NODE_GBPS = (1, 5, 20)
GPUS_PER_NODE = 8
TRAIN_GFLOPS = 95.0  # dfa_s at 1024 px: 31.8 GFLOPs forward, about 3x that for a training step
H100_BF16_TFLOPS = 990.0  # dense
UTILISATION = (0.1, 0.3)
SA1B_IMAGES_PER_PERCENT = 112_000


@dataclass
class CacheIOConfig:
    """What to measure."""

    samples: int = 6
    """Samples written per setting (one shard each)."""
    repeats: int = 3
    """Read passes over every shard; throughputs are their medians."""
    work: str = "runs/bench_cache_io"
    """Folder for the shards (about 0.5 GB at the defaults)."""
    out: str = "runs/bench_cache_io.json"
    """Results JSON."""
    seed: int = 0
    """Seed of the synthetic features."""

    def __post_init__(self) -> None:
        if self.samples < 1 or self.repeats < 1:
            raise ValueError("--samples and --repeats must be at least 1")


def label(codec: str, reduction: str, taps: tuple) -> str:
    return f"{codec}, {reduction}" if taps else f"{codec}, final embedding only"


def sa1b_like_jpeg() -> bytes:
    """A 2250 x 1500 photograph as JPEG (quality 90): scikit-image's astronaut, upscaled."""
    from PIL import Image
    from skimage import data

    buffer = io.BytesIO()
    Image.fromarray(data.astronaut()).resize((2250, 1500), Image.BICUBIC).save(
        buffer, "JPEG", quality=90
    )
    return buffer.getvalue()


def write_shard(path: Path, setting: tuple, image: bytes, num: int, seed: int) -> None:
    """`num` samples of one setting, encoded as the cache writer encodes them."""
    codec, reduction, taps = setting
    teacher = SimpleNamespace(img_size=IMG_SIZE, name="vit_h", taps=taps)
    field_codecs = codecs.parse_codecs(codec, feature_names(taps))
    gen = torch.Generator().manual_seed(seed)
    with wds.TarWriter(str(path), mtime=0.0) as writer:
        for i in range(num):
            feats = {"embed": torch.randn(256, GRID, GRID, generator=gen)}
            feats |= {f"block{t}": torch.randn(GRID, GRID, WIDTH, generator=gen) for t in taps}
            rec = {
                "item": SimpleNamespace(key=f"sa_{i:06d}", ext="jpg"),
                "image": image,
                "ann": None,
                "orig_hw": (1500, 2250),
                "input_hw": (683, 1024),
            }
            writer.write(encode_sample(teacher, field_codecs, rec, feats, reduction))


def shard_array_bytes(path: Path) -> list[int]:
    """Per sample: bytes of the feature arrays in the shard (.npy headers aside)."""
    sizes = []
    for raw in wds.WebDataset(str(path), shardshuffle=False, empty_check=False):
        arrays = [codecs.from_npy_bytes(v) for k, v in raw.items() if k.endswith(".npy")]
        sizes.append(sum(a.nbytes for a in arrays))
    return sizes


def read_pass(path: Path, cold: bool) -> float:
    """Seconds to read the shard and decode every sample as the loader does; `cold`: its pages
    dropped from the page cache first, so the bytes come from the disk."""
    if cold:
        with open(path, "rb") as f:
            os.fsync(f.fileno())
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    start = time.perf_counter()
    for raw in wds.WebDataset(str(path), shardshuffle=False, empty_check=False):
        decode_sample(raw)
    return time.perf_counter() - start


def measure(cfg: CacheIOConfig) -> dict:
    """Every figure of the results JSON."""
    work = Path(cfg.work)
    work.mkdir(parents=True, exist_ok=True)
    image = sa1b_like_jpeg()
    paths = {}
    for i, setting in enumerate(SETTINGS):
        paths[setting] = work / f"setting{i}.tar"
        write_shard(paths[setting], setting, image, cfg.samples, cfg.seed)
    times = {(s, cold): [] for s in SETTINGS for cold in (True, False)}
    for r in range(cfg.repeats):
        for setting in SETTINGS[r % len(SETTINGS) :] + SETTINGS[: r % len(SETTINGS)]:
            for cold in (True, False):
                times[setting, cold].append(read_pass(paths[setting], cold))
    image_s = common.interleaved(
        {"image": lambda: preprocess(decode_image(image, "sa.jpg"), IMG_SIZE)}, repeats=5
    )["image"]
    rows = []
    for setting in SETTINGS:
        codec, reduction, taps = setting
        fields = feature_names(taps)
        shapes = sample_nbytes(
            GRID, dict.fromkeys(fields[1:], WIDTH), codecs.parse_codecs(codec, fields), reduction
        )
        nbytes, held = sum(shapes.values()), shard_array_bytes(paths[setting])
        if held != [nbytes] * cfg.samples:
            raise RuntimeError(f"{label(*setting)}: the shard holds {held} bytes, shapes {nbytes}")
        seconds = statistics.median(times[setting, True]) / cfg.samples
        warm = statistics.median(times[setting, False]) / cfg.samples
        shard_mb = paths[setting].stat().st_size / cfg.samples / 1e6
        both = 1 / (warm + image_s)  # the CPU's part: features from the page cache, and the image
        rows.append(
            {
                "setting": label(*setting),
                "codec": codec,
                "reduction": reduction,
                "taps": list(taps),
                "embed_bytes": shapes["embed"],
                "taps_bytes": nbytes - shapes["embed"],
                "sample_bytes": nbytes,
                "shard_mb_per_sample": shard_mb,
                "sa1b_1pct_tb": nbytes * SA1B_IMAGES_PER_PERCENT / 1e12,
                "features_per_s": 1 / seconds,
                "read_mb_per_s": shard_mb / seconds,
                "warm_features_per_s": 1 / warm,
                "warm_mb_per_s": shard_mb / warm,
                "with_image_per_s": both,
                "per_gpu_at_gbps": {str(g): g * 1e9 / GPUS_PER_NODE / nbytes for g in NODE_GBPS},
            }
        )
    compute = {f"{u:.0%}": u * H100_BF16_TFLOPS * 1e3 / TRAIN_GFLOPS for u in UTILISATION}
    result = {"rows": rows, "image_decode_per_s": 1 / image_s, "compute_bound_per_gpu": compute}
    return result | {"tables": doc_tables(result, cfg)}


def doc_tables(result: dict, cfg: CacheIOConfig) -> dict:
    """The docs' two tables (`launch/bench/tables.py` renders them): caption, header, rows."""
    rows, image = result["rows"], result["image_decode_per_s"]
    loader = [
        [f"`{r['codec']}`", f"`{r['reduction']}`" if r["taps"] else "final embedding only"]
        + [f"{r['sample_bytes'] / 1e6:.2f}", f"{r['sa1b_1pct_tb']:.2f}"]
        + [f"{r[k]:.1f}" for k in ("features_per_s", "warm_features_per_s", "with_image_per_s")]
        + [f"{r['read_mb_per_s']:.0f}", f"{r['warm_mb_per_s']:.0f}"]
        for r in rows
    ]
    low = min(result["compute_bound_per_gpu"].values())
    storage = [
        row[:3]
        + [f"{v:,.0f}" for v in r["per_gpu_at_gbps"].values()]
        + [f"{low / r['warm_features_per_s']:.0f}", f"{low / r['with_image_per_s']:.0f}"]
        for row, r in zip(loader, rows)
    ]
    bound = " and ".join(f"{v:,.0f} at {k}" for k, v in result["compute_bound_per_gpu"].items())
    return {
        "loader": {
            "caption": (
                f"ViT-H-shaped samples (synthetic values, {cfg.samples} a setting); MB = 1e6 bytes "
                "of feature arrays, checked against the written shard; one loader core (one torch "
                "thread) reading a shard from this machine's disk or its page cache and decoding "
                "every sample (`decode_sample`); 'with image' adds to the page-cache rate the image's "
                f"decoding and preprocessing ({image:.1f} images/s alone, a 2250 x 1500 JPEG to "
                "1024 px), which the loader pays for every setting alike."
            ),
            "header": ["codec", "reduction", "MB / sample", "1% of SA-1B (TB)"]
            + ["samples/s, disk", "samples/s, page cache", "samples/s with image"]
            + ["MB/s, disk", "MB/s, page cache"],
            "rows": loader,
        },
        "storage": {
            "caption": (
                "Images/s per GPU that a node's storage can feed (8 GPUs a node, feature bytes "
                f"only), beside the compute-bound rate of `dfa_s` on an H100: {bound} of its "
                "~990 TFLOPs dense bf16 peak (95 GFLOPs a training image). The last columns: "
                f"loader cores per GPU that {low:,.0f} images/s needs (per-core rates of the "
                "table above, from the page cache)."
            ),
            "header": ["codec", "reduction", "MB / sample"]
            + [f"{g} GB/s a node" for g in NODE_GBPS]
            + ["cores / GPU, features", "cores / GPU, with image"],
            "rows": storage,
        },
    }


def print_result(result: dict) -> None:
    print(f"{'setting':<44} {'MB':>6} {'feat/s':>8} {'MB/s':>7} {'+img/s':>7}  img/s/GPU @1,5,20")
    for r in result["rows"]:
        feeds = ", ".join(f"{v:.0f}" for v in r["per_gpu_at_gbps"].values())
        print(
            f"{r['setting']:<44} {r['sample_bytes'] / 1e6:>6.2f} {r['features_per_s']:>8.1f} "
            f"{r['read_mb_per_s']:>7.0f} {r['with_image_per_s']:>7.1f}  {feeds}"
        )
    bound = ", ".join(f"{k}: {v:.0f}" for k, v in result["compute_bound_per_gpu"].items())
    print(f"image decode + preprocess: {result['image_decode_per_s']:.1f}/s; compute {bound}")


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(CacheIOConfig, argv, __doc__)
    torch.set_num_threads(1)  # per core: the figures a loader worker gets
    result = measure(cfg)
    print_result(result)
    common.write_results(cfg.out, result, cfg, script=__file__, argv=argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
