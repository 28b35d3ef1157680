r"""Training throughput from the cache against computing the teacher online, side by side.

    python launch/bench/distill_throughput.py [--teacher vit_tiny|vit_b|vit_h] [--student dfa_s] \
        [--batch-size 4] [--out runs/bench_distill]

Generates COCO-format images (`eval.scenes.synthetic`) in OUT/coco, caches a random-weight
teacher's features from them under OUT/cache, prints the throughput table and writes
OUT/results.json (or the --results file). One run measures, on the same generated images, student
and batch size:
  loader        the cache pipeline alone (shard read, feature decode, image decode + preprocess)
  step          the student step alone on a batch already in memory (forward, losses, backward,
                AdamW)
  from cache    loader + step: what distillation from the cache runs at
  online        image decode + preprocess + teacher forward + step: distillation without a cache
The teacher has random weights (timings do not depend on weights). Every step is the training
engine's `step` (`distill.engine`, its plain-PyTorch variant: the DeepSpeed one adds the same
per-step overhead to both set-ups), with the distillation loss of `distill.train`.
"""

import sys
from pathlib import Path

_here = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
sys.path.insert(0, str(_here.parents[1]))

from dataclasses import dataclass  # noqa: E402

import torch  # noqa: E402

from distill.config import DistillConfig  # noqa: E402
from distill.data import DataSpec, StreamLayout, make_loader  # noqa: E402
from distill.engine import build_engine  # noqa: E402
from distill.train import DistillLoss, DistillModel  # noqa: E402
from eval.scenes.synthetic import make_coco  # noqa: E402
from launch.bench import common  # noqa: E402
from students import build_student  # noqa: E402
from students.taps import student_taps_for  # noqa: E402
from teachers.build import TEACHER_SIZES, build_vit_tiny, sam_model_registry  # noqa: E402
from teachers.cache import plan_cache, write_cache  # noqa: E402
from teachers.cache_read import open_cache  # noqa: E402
from teachers.preprocess import decode_image, preprocess, valid_mask  # noqa: E402
from teachers.runtime.flags import parse_config  # noqa: E402
from teachers.runtime.placement import DistEnv  # noqa: E402
from teachers.runtime.preempt import stop_workers  # noqa: E402
from teachers.sources import list_sources, read_item  # noqa: E402
from teachers.teacher import Teacher  # noqa: E402


@dataclass
class BenchConfig:
    """Benchmark settings."""

    teacher: str = "vit_tiny"
    """Teacher architecture with random weights: vit_tiny (img 256) or vit_b/vit_l/vit_h (img 1024)."""
    student: str = "dfa_s"
    """Student registry name."""
    batch_size: int = 4
    """Samples per step."""
    steps: int = 6
    """Timed steps per set-up (after one warm-up step)."""
    workers: int = 2
    """Loader workers for the cache pipeline."""
    out: str = "runs/bench_distill"
    """Folder for the generated images and the cache."""
    results: str = ""
    """Results JSON (figures, command, machine, date); unset: OUT/results.json."""

    def __post_init__(self) -> None:
        if self.teacher not in TEACHER_SIZES:
            raise ValueError(
                f"--teacher {self.teacher!r}: choose one of {', '.join(TEACHER_SIZES)}"
            )
        if self.batch_size < 1 or self.steps < 1:
            raise ValueError("--batch-size and --steps must be at least 1")


def random_teacher(name: str) -> Teacher:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        sam = build_vit_tiny() if name == "vit_tiny" else sam_model_registry[name]()
    depth = TEACHER_SIZES[name][1]
    return Teacher(
        name,
        sam.image_encoder,
        [depth // 4 * i - 1 for i in range(1, 5)] if depth >= 8 else [1, 3],
        checkpoint_sha256="random",
    )


def prepare(cfg: BenchConfig, images: str, teacher: Teacher) -> str:
    """Cache `teacher`'s features of the images in `images` under OUT/cache; the cache folder."""
    cache = Path(cfg.out) / "cache"
    plan = plan_cache(images, cfg.batch_size * 2)
    write_cache(teacher, plan, cache, batch_size=cfg.batch_size, progress=False)
    return str(cache)


def run(cfg: BenchConfig, images: str, teacher: Teacher) -> list[tuple[str, float]]:
    """Images/s of each set-up, on the images in `images` and their cache (see `prepare`)."""
    torch.manual_seed(0)
    cache = open_cache(prepare(cfg, images, teacher))
    size = teacher.img_size
    student = build_student(cfg.student, img_size=size)
    width, depth = TEACHER_SIZES[cfg.teacher]
    model = DistillModel(student, student_taps_for(cache.taps, depth, len(student.blocks)), width)
    train_cfg = DistillConfig(
        shards=str(cache.folder),
        out=cfg.out,
        engine="torch",
        device="cpu",
        steps=1 << 30,
        batch_size=cfg.batch_size,
        dld="uniform",
    )
    engine = build_engine(
        train_cfg, model, model.parameters(), DistillLoss(train_cfg, cache), DistEnv()
    )

    spec = DataSpec(cache.shards, size, cache.taps, cfg.batch_size)
    loader = iter(make_loader(spec, StreamLayout.choose(0, 1, 1, cfg.workers)))
    fixed = next(loader)
    items = list_sources(images)

    def online() -> None:
        chosen = [items[int(i)] for i in torch.randint(len(items), (cfg.batch_size,))]
        pres = [preprocess(decode_image(read_item(it)[0]), size) for it in chosen]
        feats = teacher(torch.stack([p.image for p in pres]))
        batch = {
            "image": torch.stack([p.image for p in pres]),
            "valid": torch.stack([valid_mask(p.input_hw, size) for p in pres]),
            **feats,
        }
        engine.step(iter([batch]))

    per_step = common.interleaved(
        {
            "loader": lambda: next(loader),
            "step": lambda: engine.step(iter([fixed])),
            "from cache": lambda: engine.step(loader),
            "online teacher": online,
        },
        cfg.steps,
    )  # one untimed warm-up round first
    stop_workers(loader)
    return [(name, cfg.batch_size / seconds) for name, seconds in per_step.items()]


def report(cfg: BenchConfig, rates: dict[str, float]) -> None:
    print("\n| set-up | images/s | vs online teacher |\n|---|---|---|")
    for name, rate in rates.items():
        print(f"| {name} | {rate:.2f} | {rate / rates['online teacher']:.2f}x |")
    print(
        f"\nloader / step throughput: {rates['loader'] / rates['step']:.2f} "
        "(above 1: the loader keeps up with training)"
    )
    print(f"from cache / online teacher: {rates['from cache'] / rates['online teacher']:.2f}x")


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(BenchConfig, argv, __doc__)
    teacher = random_teacher(cfg.teacher)
    size = teacher.img_size
    images = Path(cfg.out) / "coco"
    make_coco(images, num_images=cfg.batch_size * 4, seed=0, min_side=size // 2, max_side=size)
    print(
        f"teacher {cfg.teacher} (random weights), student {cfg.student}, batch {cfg.batch_size}, "
        f"{torch.get_num_threads()} threads, {cfg.workers} loader workers"
    )
    rates = dict(run(cfg, str(images), teacher))
    report(cfg, rates)
    figures = {"images_per_s": rates}
    path = cfg.results or Path(cfg.out) / "results.json"
    common.write_results(path, figures, cfg, script=__file__, argv=argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
