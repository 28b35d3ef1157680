r"""Fidelity of a token-reduced cache on the reference teacher: is a student distilled from taps
stored at K tokens a sample as good as one distilled from whole taps, and do layer taps help at
all over the final embedding alone? Three arms at equal steps, paired per held-out instance.

    python launch/bench/cache_fidelity.py [--work runs/cache_fidelity] [--train-images 128] \
        [--held-images 40] [--steps 150] [--tokens 64] [--out launch/bench/results/cache_fidelity.json]

The teacher is the shipped `sam_mini` (512 px, a 32 x 32 token grid, taps 2 and 5). Training
scenes are `eval.scenes.photos`' train split (seed 1, as the demo's); held-out scenes its held
split (seed 2, photographs the teacher never trained on, as launch/bench/reference_teacher.py's).
Both caches use the codec `embed=fp16,blocks=int8`; the reduced one stores `--tokens` token
positions a sample (64 of 1,024 is the share that tokens=256 keeps of ViT-H's 4,096). The arms,
`dfa_t` from the same seed, batch, learning rate and steps:

- full: whole taps, progressive DLD weights;
- reduced: taps at the stored tokens, progressive DLD weights;
- final_only: the final embedding alone (DLD `final_only`, MobileSAM's and EdgeSAM's target).

Every arm trains `--seeds` times (the seed sets the student's initialisation and the data order).
A paired standard error over instances says nothing of the training run, so the results give
each comparison per seed and on the per-instance scores averaged over the seeds, and, as a
yardstick, how far two seeds of one arm differ ("seed 1 - seed 0").

`eval/coco.py --compare-ckpt sam_mini` scores each student on the held-out scenes with the GT-box
protocol (multimask argmax): GT mIoU, and teacher agreement (IoU of the student's mask with the
teacher's). Per-instance differences between arms give the paired means and standard errors
(`launch.bench.common.paired`). Stages already done under `--work` are reused. `arm` is the entry
for a claims benchmark, which imports no other benchmark but runs it in a child process:
`common.run_child("launch.bench.cache_fidelity:arm", work=..., steps=...)` returns the figures;
`main` writes the results JSON with the scale it ran at.
"""

import sys
from pathlib import Path

_here = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
sys.path.insert(0, str(_here.parents[1]))

import json  # noqa: E402
from dataclasses import asdict, dataclass  # noqa: E402

from launch.bench import common  # noqa: E402
from teachers.runtime.flags import parse_config  # noqa: E402
from teachers.sam_mini import SAM_MINI_PATH  # noqa: E402

CODEC = "embed=fp16,blocks=int8"
TRAIN_SEED, HELD_SEED = 1, 2
# arm -> (cache, extra distill flags)
ARMS = {
    "full": ("full", []),
    "reduced": ("reduced", []),
    "final_only": ("full", ["--dld", "final_only"]),
}
COMPARISONS = (("reduced", "full"), ("full", "final_only"), ("reduced", "final_only"))
METRICS = {"gt_iou": "iou", "agreement": "agreement"}  # figure -> per-instance record key


@dataclass
class FidelityConfig:
    """One run of the cache-fidelity benchmark."""

    work: str = "runs/cache_fidelity"
    """Folder for scenes, caches, runs and evaluations (stages done there are reused)."""
    out: str = "launch/bench/results/cache_fidelity.json"
    """The results JSON."""
    train_images: int = 128
    """Training scenes cached for every arm."""
    held_images: int = 40
    """Held-out scenes scored (all their instances)."""
    steps: int = 150
    """Distillation steps of every arm."""
    batch_size: int = 8
    """Batch size of every arm."""
    lr: float = 2e-3
    """Peak learning rate of every arm."""
    tokens: int = 64
    """Token positions per sample of the reduced cache."""
    seed: int = 0
    """Seed of the first distillation run of every arm."""
    seeds: int = 2
    """Distillation runs of every arm, with seeds seed, seed + 1, ..."""

    def __post_init__(self) -> None:
        for name in ("train_images", "held_images", "steps", "batch_size", "tokens", "seeds"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1")


def make_caches(cfg: FidelityConfig, work: Path) -> dict[str, dict]:
    """Scenes and the two caches of sam_mini's features (written once); their manifests."""
    from eval.scenes.photos import make_photo_coco
    from teachers import load_teacher
    from teachers.cache import plan_cache, write_cache

    if not (work / "train" / "annotations").exists():
        make_photo_coco(work / "train", "train", cfg.train_images, seed=TRAIN_SEED)
    if not (work / "held" / "annotations").exists():
        make_photo_coco(work / "held", "held", cfg.held_images, seed=HELD_SEED)
    teacher = load_teacher("sam_mini")
    manifests = {}
    for name, reduce in (("full", "none"), ("reduced", f"tokens={cfg.tokens}")):
        plan = plan_cache(str(work / "train"), samples_per_shard=32)
        manifests[name] = write_cache(
            teacher, plan, work / f"cache_{name}", codec=CODEC, reduce=reduce, progress=False
        )
    return manifests


def run_name(arm: str, i: int) -> str:
    """The folder of an arm's i-th run: the arm's name, then arm_seed1, ..."""
    return arm if i == 0 else f"{arm}_seed{i}"


def distill(cfg: FidelityConfig, work: Path, arm: str, i: int) -> Path:
    """An arm's i-th launch/distill.py run (one process, the plain torch engine); its student.pt."""
    cache, extra = ARMS[arm]
    name = run_name(arm, i)
    student = work / name / "student.pt"
    if not student.exists():
        args = ["--shards", str(work / f"cache_{cache}"), "--out", str(work / name)]
        args += ["--student", "dfa_t", "--steps", str(cfg.steps), "--lr", str(cfg.lr)]
        args += ["--batch-size", str(cfg.batch_size), "--seed", str(cfg.seed + i), *extra]
        args += ["--engine", "torch", "--workers", "0", "--no-progress", "--device", "cpu"]
        args += ["--log-every", "25", "--checkpoint-every", str(cfg.steps)]
        common.run_script("launch/distill.py", *args, log=work / f"{name}.log")
    return student


def instances(work: Path, arm: str, student: Path) -> list[dict]:
    """Per held-out instance records of eval/coco.py (GT IoU, teacher IoU, agreement)."""
    report = work / f"eval_{arm}.json"
    if not report.exists():
        args = ["--ckpt", str(student), "--coco-root", str(work / "held"), "--device", "cpu"]
        args += ["--compare-ckpt", str(SAM_MINI_PATH), "--out", str(report), "--no-progress"]
        common.run_script("eval/coco.py", *args, log=report.with_suffix(".log"))
    lines = report.with_name(report.name + ".instances.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def measure(cfg: FidelityConfig) -> dict:
    """The whole benchmark (stages already done under `cfg.work` are reused): the figures of
    the results JSON, the scale it ran at first."""
    work = Path(cfg.work).resolve()  # the scripts it runs start in the repository
    work.mkdir(parents=True, exist_ok=True)
    manifests = make_caches(cfg, work)
    cache_bytes = {name: sum(s["bytes"] for s in m["shards"]) for name, m in manifests.items()}
    runs = {
        arm: [
            instances(work, run_name(arm, i), distill(cfg, work, arm, i)) for i in range(cfg.seeds)
        ]
        for arm in ARMS
    }
    # figure -> arm -> per seed {instance id: score in percent}
    scores = {
        m: {a: [{r["id"]: 100 * r[key][0] for r in rs} for rs in runs[a]] for a in ARMS}
        for m, key in METRICS.items()
    }
    teacher_gt = [100 * r["compare_iou"][0] for r in runs["full"][0]]
    result = {
        "scale": {
            "teacher": "sam_mini (512 px, 32 x 32 tokens, taps 2 and 5)",
            "student": "dfa_t",
            "codec": CODEC,
            "reduction": f"tokens={cfg.tokens}",
            "token_share": cfg.tokens / 1024,
            "num_instances": len(teacher_gt),
        }
        | {k: v for k, v in asdict(cfg).items() if k not in ("work", "out")},
        "cache_bytes": cache_bytes,
        "teacher_gt_miou": sum(teacher_gt) / len(teacher_gt),
        "pca_retained": pca_retained(work / "cache_full", cfg.tokens / 1024),
    }
    for m, by_arm in scores.items():
        result[f"{m}_by_seed"] = {a: [_mean(run) for run in runs] for a, runs in by_arm.items()}
        result[m] = {a: sum(v) / len(v) for a, v in result[f"{m}_by_seed"].items()}
    for new, base in COMPARISONS:
        result[f"{new} - {base}"] = {
            m: common.paired(_pooled(by_arm[base]), _pooled(by_arm[new]))
            | {"by_seed": [common.paired(b, n)["mean"] for b, n in zip(by_arm[base], by_arm[new])]}
            for m, by_arm in scores.items()
        }
    if cfg.seeds > 1:
        result["seed 1 - seed 0"] = {
            a: {m: common.paired(scores[m][a][0], scores[m][a][1]) for m in METRICS} for a in ARMS
        }
    return result | {"tables": {"fidelity": doc_table(result)}}


def pca_retained(cache: Path, share: float, num_samples: int = 64) -> dict[str, float]:
    """The alternative reduction, measured: the share of each tap's variance (over the tokens on
    real pixels of the first `num_samples` samples) that its top principal components keep, as
    many as `share` of the channels: the same bytes as keeping `share` of the tokens. Token
    subsampling keeps the loss exact in expectation; a projection loses the rest for good."""
    import torch

    from teachers.cache_read import read_cache
    from teachers.preprocess import valid_mask

    tokens: dict[str, list] = {}
    for i, sample in enumerate(read_cache(cache)):
        if i == num_samples:
            break
        valid = valid_mask(tuple(sample.meta["input_hw"]), sample.meta["img_size"])
        for name, x in sample.features.items():
            if name != "embed":
                tokens.setdefault(name, []).append(x[valid])
    retained = {}
    for name, parts in tokens.items():
        x = torch.cat(parts).double()
        eig = torch.linalg.eigvalsh(torch.cov(x.T)).flip(0)  # descending
        r = max(1, round(share * x.shape[1]))
        retained[name] = float(eig[:r].sum() / eig.sum())
    return retained | {"channels_kept": r, "of": x.shape[1]}


def _mean(scores: dict[int, float]) -> float:
    return sum(scores.values()) / len(scores)


def _pooled(runs: list[dict[int, float]]) -> dict[int, float]:
    """Per instance, the mean over an arm's runs."""
    return {k: sum(run[k] for run in runs) / len(runs) for k in runs[0]}


def doc_table(result: dict) -> dict:
    """The docs' table (`launch/bench/tables.py` renders it): caption, header, rows."""
    scale = result["scale"]
    names = {
        "full": "whole taps",
        "reduced": f"taps at `{scale['reduction']}`",
        "final_only": "final embedding only",
    }

    def seeds(values: list[float], spec: str) -> str:
        return "" if len(values) < 2 else f" ({', '.join(format(v, spec) for v in values)})"

    rows = [
        [names[a]]
        + [f"{result[m][a]:.1f}{seeds(result[f'{m}_by_seed'][a], '.1f')}" for m in METRICS]
        for a in ARMS
    ]
    for new, base in COMPARISONS:
        d = result[f"{new} - {base}"]
        cells = [
            f"{d[m]['mean']:+.2f} +- {d[m]['se']:.2f}{seeds(d[m]['by_seed'], '+.2f')}"
            for m in METRICS
        ]
        rows.append([f"{names[new]} - {names[base]}", *cells])
    for a, d in result.get("seed 1 - seed 0", {}).items():
        rows.append(
            [
                f"{names[a]}: seed 1 - seed 0",
                *(f"{d[m]['mean']:+.2f} +- {d[m]['se']:.2f}" for m in METRICS),
            ]
        )
    caption = (
        f"`dfa_t` distilled from `sam_mini` ({scale['train_images']} training scenes, "
        f"{scale['steps']} steps of batch {scale['batch_size']} for every run; codec "
        f"`{scale['codec']}`), {scale['seeds']} runs (seeds) an arm, scored on "
        f"{scale['num_instances']} held-out instances with GT boxes (teacher GT mIoU "
        f"{result['teacher_gt_miou']:.1f}). Arms: the mean over seeds (each seed's in brackets); "
        "differences: paired per instance on the scores averaged over seeds, with standard "
        "errors over instances (each seed's difference in brackets); the last rows show how far "
        "two seeds of one arm differ. The alternative at the same bytes, a fixed projection to "
        f"the top {result['pca_retained']['channels_kept']} of "
        f"{result['pca_retained']['of']} principal components, would keep "
        + " and ".join(
            f"{v:.0%} of {k}'s variance"
            for k, v in result["pca_retained"].items()
            if k.startswith("block")
        )
        + "."
    )
    return {"caption": caption, "header": ["student", "GT mIoU", "teacher agreement"], "rows": rows}


def arm(**settings: object) -> dict:
    """`measure` with `FidelityConfig(**settings)`: the figures, JSON-ready (for `run_child`)."""
    return measure(FidelityConfig(**settings))


def print_result(result: dict) -> None:
    table = result["tables"]["fidelity"]
    print(table["caption"])
    for row in [table["header"], *table["rows"]]:
        print(" | ".join(row))


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(FidelityConfig, argv, __doc__)
    result = measure(cfg)
    print_result(result)
    common.write_results(cfg.out, result, cfg, script=__file__, argv=argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
