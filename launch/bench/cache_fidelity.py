r"""Fidelity of reduced caches on the reference teacher: is a student distilled from taps stored
at K tokens a sample, in a given codec, as good as one distilled from whole taps, and do layer
taps help at all over the final embedding alone? Arms at equal steps, paired per held-out instance.

    python launch/bench/cache_fidelity.py [--work runs/cache_fidelity] [--train-images 128] \
        [--held-images 40] [--steps 150] [--settings 'int8:tokens=64;embed=fp16,blocks=int8:tokens=16'] \
        [--jobs 2] [--out launch/bench/results/cache_fidelity.json]

The teacher is the shipped `sam_mini` (512 px, a 32 x 32 token grid, taps 2 and 5). Training
scenes are `eval.scenes.photos`' train split (seed 1, as the demo's); held-out scenes its held
split (seed 2, photographs the teacher never trained on, as launch/bench/reference_teacher.py's).
The arms, `dfa_t` from the same seed, batch, learning rate and steps:

- full: whole taps in `--codec`, progressive DLD weights;
- one arm a `--settings` pair `CODEC:REDUCTION` (`launch/cache_teacher.py`'s `--codec` and
  `--reduction`): taps at the stored tokens, progressive DLD weights. K of sam_mini's 1,024 tokens
  is the share that `tokens=4K` keeps of ViT-H's 4,096, so each arm also gives the bytes of a ViT-H
  sample in that setting (`teachers.reduction.sample_nbytes`, from the shapes);
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
import re  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402
from dataclasses import asdict, dataclass  # noqa: E402

from launch.bench import common  # noqa: E402
from teachers.codecs import codec_spec, parse_codecs  # noqa: E402
from teachers.reduction import canonical, num_tokens, sample_nbytes  # noqa: E402
from teachers.runtime.flags import parse_config  # noqa: E402
from teachers.sam_mini import SAM_MINI_PATH  # noqa: E402

MIXED = "embed=fp16,blocks=int8"
TRAIN_SEED, HELD_SEED = 1, 2
FIELDS = ("embed", "block2", "block5")  # sam_mini's cached features
VIT_H_TAPS, VIT_H_WIDTH, VIT_H_GRID = (7, 15, 23, 31), 1280, 64
TOKEN_SCALE = VIT_H_GRID**2 // 32**2  # ViT-H's tokens per sam_mini token
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
    codec: str = MIXED
    """Codec of the whole-tap cache (the full and final_only arms)."""
    settings: str = f"{MIXED}:tokens=64"
    """The reduced caches, one arm each: `;`-separated CODEC:REDUCTION pairs."""
    seed: int = 0
    """Seed of the first distillation run of every arm."""
    seeds: int = 2
    """Distillation runs of every arm, with seeds seed, seed + 1, ..."""
    jobs: int = 1
    """Distillation runs (each with its evaluation) at a time, one process each."""

    def __post_init__(self) -> None:
        for name in ("train_images", "held_images", "steps", "batch_size", "seeds", "jobs"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
        self.codec = codec_spec(parse_codecs(self.codec, FIELDS))
        self.settings = ";".join(f"{c}:{r}" for c, r in parse_settings(self.settings))

    def arms(self) -> dict[str, tuple[str, str, list[str]]]:
        """{arm: (codec, reduction, extra distill flags)}, in the table's order."""
        out = {"full": (self.codec, "none", [])}
        out |= {f"{c}, {r}": (c, r, []) for c, r in parse_settings(self.settings)}
        return out | {"final_only": (self.codec, "none", ["--dld", "final_only"])}


def parse_settings(text: str, flag: str = "--settings") -> list[tuple[str, str]]:
    """[(codec, reduction)] of `;`-separated CODEC:REDUCTION pairs, each a token reduction, in
    canonical form. Raises ``ValueError`` naming ``flag``."""
    pairs = []
    for item in filter(None, (t.strip() for t in text.split(";"))):
        codec, sep, reduction = item.rpartition(":")
        if not sep:
            raise ValueError(f"{flag} {item!r}: give CODEC:REDUCTION, e.g. int8:tokens=64")
        pair = (codec_spec(parse_codecs(codec, FIELDS, flag)), canonical(reduction, flag))
        if pair[1] == "none":
            raise ValueError(f"{flag} {item!r}: the whole-tap arm is always run; give tokens=K")
        if pair in pairs:
            raise ValueError(f"{flag} {item!r} is given twice")
        pairs.append(pair)
    if not pairs:
        raise ValueError(f"{flag} {text!r}: give at least one CODEC:REDUCTION pair")
    return pairs


def slug(name: str) -> str:
    """A folder name for an arm or a setting: "int8, tokens=64" -> "int8_tokens_64"."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def cache_dir(work: Path, codec: str, reduction: str, full_codec: str) -> Path:
    """The cache of a setting: cache_full for whole taps in the full arm's codec."""
    if (codec, reduction) == (full_codec, "none"):
        return work / "cache_full"
    return work / f"cache_{slug(f'{codec}, {reduction}')}"


def vit_h_bytes(codec: str, reduction: str, taps: bool = True) -> int:
    """Feature bytes of a ViT-H sample at 1024 px in the setting that keeps the share of ViT-H's
    tokens that `reduction` keeps of sam_mini's."""
    k = num_tokens(reduction)
    fields = ["embed", *(f"block{i}" for i in VIT_H_TAPS if taps)]
    widths = dict.fromkeys(fields[1:], VIT_H_WIDTH)
    vit_h = "none" if k is None else f"tokens={k * TOKEN_SCALE}"
    return sum(sample_nbytes(VIT_H_GRID, widths, parse_codecs(codec, fields), vit_h).values())


def make_caches(cfg: FidelityConfig, work: Path) -> dict[str, dict]:
    """Scenes and every arm's cache of sam_mini's features (written once): {arm: manifest}."""
    from eval.scenes.photos import make_photo_coco
    from teachers import load_teacher
    from teachers.cache import plan_cache, write_cache

    if not (work / "train" / "annotations").exists():
        make_photo_coco(work / "train", "train", cfg.train_images, seed=TRAIN_SEED)
    if not (work / "held" / "annotations").exists():
        make_photo_coco(work / "held", "held", cfg.held_images, seed=HELD_SEED)
    teacher = load_teacher("sam_mini")
    manifests = {}
    for arm, (codec, reduction, _) in cfg.arms().items():
        plan = plan_cache(str(work / "train"), samples_per_shard=32)
        out = cache_dir(work, codec, reduction, cfg.codec)
        manifests[arm] = write_cache(
            teacher, plan, out, codec=codec, reduce=reduction, progress=False
        )
    return manifests


def run_name(arm: str, i: int) -> str:
    """The folder of an arm's i-th run: the arm's slug, then slug_seed1, ..."""
    return slug(arm) if i == 0 else f"{slug(arm)}_seed{i}"


def distill(cfg: FidelityConfig, work: Path, arm: str, i: int) -> Path:
    """An arm's i-th launch/distill.py run (one process, the plain torch engine); its student.pt."""
    codec, reduction, extra = cfg.arms()[arm]
    name = run_name(arm, i)
    student = work / name / "student.pt"
    if not student.exists():
        shards = cache_dir(work, codec, reduction, cfg.codec)
        args = ["--shards", str(shards), "--out", str(work / name)]
        args += ["--student", "dfa_t", "--steps", str(cfg.steps), "--lr", str(cfg.lr)]
        args += ["--batch-size", str(cfg.batch_size), "--seed", str(cfg.seed + i), *extra]
        args += ["--engine", "torch", "--workers", "0", "--no-progress", "--device", "cpu"]
        args += ["--log-every", "25", "--checkpoint-every", str(cfg.steps)]
        common.run_script("launch/distill.py", *args, log=work / f"{name}.log")
    return student


def instances(work: Path, name: str, student: Path) -> list[dict]:
    """Per held-out instance records of eval/coco.py (GT IoU, teacher IoU, agreement)."""
    report = work / f"eval_{name}.json"
    if not report.exists():
        args = ["--ckpt", str(student), "--coco-root", str(work / "held"), "--device", "cpu"]
        args += ["--compare-ckpt", str(SAM_MINI_PATH), "--out", str(report), "--no-progress"]
        common.run_script("eval/coco.py", *args, log=report.with_suffix(".log"))
    lines = report.with_name(report.name + ".instances.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def run_arms(cfg: FidelityConfig, work: Path) -> dict[str, list[list[dict]]]:
    """{arm: per seed, the held-out instance records}; `cfg.jobs` runs at a time."""

    def one(job: tuple[str, int]) -> list[dict]:
        arm, i = job
        return instances(work, run_name(arm, i), distill(cfg, work, arm, i))

    jobs = [(arm, i) for arm in cfg.arms() for i in range(cfg.seeds)]
    with ThreadPoolExecutor(cfg.jobs) as pool:
        done = dict(zip(jobs, pool.map(one, jobs)))
    return {arm: [done[arm, i] for i in range(cfg.seeds)] for arm in cfg.arms()}


def comparisons(arms: list[str]) -> list[tuple[str, str]]:
    """(new, base) pairs: every reduced arm against whole taps, whole taps against the final
    embedding alone, every reduced arm against the final embedding alone."""
    reduced = [a for a in arms if a not in ("full", "final_only")]
    return [(a, "full") for a in reduced] + [(a, "final_only") for a in ["full", *reduced]]


def verdict(result: dict) -> dict:
    """Per reduced arm: its ViT-H bytes, whether its GT mIoU is within one standard error of
    whole taps' or better, and whether it is above the final embedding alone (paired means over
    seeds and instances); and whether whole taps are above the final embedding alone by more
    than one standard error on each figure ("taps help")."""
    full = result["full - final_only"]
    out = {"taps_help": {m: full[m]["mean"] > full[m]["se"] for m in METRICS}}
    for arm, vit_h in result["vit_h_bytes"].items():
        if arm in ("full", "final_only"):
            continue
        d, over = result[f"{arm} - full"]["gt_iou"], result[f"{arm} - final_only"]
        out[arm] = {
            "vit_h_bytes": vit_h,
            "gt_iou_within_se_of_full": d["mean"] >= -d["se"],
            "above_final_only": {m: over[m]["mean"] > 0 for m in METRICS},
        }
    return out


def measure(cfg: FidelityConfig) -> dict:
    """The whole benchmark (stages already done under `cfg.work` are reused): the figures of
    the results JSON, the scale it ran at first."""
    work = Path(cfg.work).resolve()  # the scripts it runs start in the repository
    work.mkdir(parents=True, exist_ok=True)
    manifests = make_caches(cfg, work)
    arms = cfg.arms()
    first_tokens = num_tokens(parse_settings(cfg.settings)[0][1])
    runs = run_arms(cfg, work)
    # figure -> arm -> per seed {instance id: score in percent}
    scores = {
        m: {a: [{r["id"]: 100 * r[key][0] for r in rs} for rs in runs[a]] for a in arms}
        for m, key in METRICS.items()
    }
    teacher_gt = [100 * r["compare_iou"][0] for r in runs["full"][0]]
    result = {
        "scale": {
            "teacher": "sam_mini (512 px, 32 x 32 tokens, taps 2 and 5)",
            "teacher_sha256": manifests["full"]["teacher_sha256"],
            "student": "dfa_t",
            "num_instances": len(teacher_gt),
        }
        | {k: v for k, v in asdict(cfg).items() if k not in ("work", "out", "jobs")},
        "arms": {a: {"codec": c, "reduction": r, "flags": x} for a, (c, r, x) in arms.items()},
        "cache_bytes": {a: sum(s["bytes"] for s in m["shards"]) for a, m in manifests.items()},
        "vit_h_bytes": {
            a: vit_h_bytes(c, r, taps=a != "final_only") for a, (c, r, _) in arms.items()
        },
        "teacher_gt_miou": sum(teacher_gt) / len(teacher_gt),
        "pca_retained": pca_retained(work / "cache_full", first_tokens / 1024),
    }
    for m, by_arm in scores.items():
        result[f"{m}_by_seed"] = {a: [_mean(run) for run in runs] for a, runs in by_arm.items()}
        result[m] = {a: sum(v) / len(v) for a, v in result[f"{m}_by_seed"].items()}
    for new, base in comparisons(list(arms)):
        result[f"{new} - {base}"] = {
            m: common.paired(_pooled(by_arm[base]), _pooled(by_arm[new]))
            | {"by_seed": [common.paired(b, n)["mean"] for b, n in zip(by_arm[base], by_arm[new])]}
            for m, by_arm in scores.items()
        }
    if cfg.seeds > 1:
        result["seed 1 - seed 0"] = {
            a: {m: common.paired(scores[m][a][0], scores[m][a][1]) for m in METRICS} for a in arms
        }
    result["verdict"] = verdict(result)
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


def arm_label(arm: str, spec: dict) -> str:
    """An arm's name in the docs."""
    if arm == "final_only":
        return "final embedding only"
    if spec["reduction"] == "none":
        return f"whole taps, `{spec['codec']}`"
    return f"taps at `{spec['reduction']}`, `{spec['codec']}`"


def doc_table(result: dict) -> dict:
    """The docs' table (`launch/bench/tables.py` renders it): caption, header, rows."""
    scale = result["scale"]
    names = {a: arm_label(a, spec) for a, spec in result["arms"].items()}

    def seeds(values: list[float], spec: str) -> str:
        return "" if len(values) < 2 else f" ({', '.join(format(v, spec) for v in values)})"

    rows = [
        [names[a], f"{result['vit_h_bytes'][a] / 1e6:.2f}"]
        + [f"{result[m][a]:.1f}{seeds(result[f'{m}_by_seed'][a], '.1f')}" for m in METRICS]
        for a in result["arms"]
    ]
    for new, base in comparisons(list(result["arms"])):
        d = result[f"{new} - {base}"]
        cells = [
            f"{d[m]['mean']:+.2f} +- {d[m]['se']:.2f}{seeds(d[m]['by_seed'], '+.2f')}"
            for m in METRICS
        ]
        rows.append([f"{names[new]} - {names[base]}", "", *cells])
    for a, d in result.get("seed 1 - seed 0", {}).items():
        cells = [f"{d[m]['mean']:+.2f} +- {d[m]['se']:.2f}" for m in METRICS]
        rows.append([f"{names[a]}: seed 1 - seed 0", "", *cells])
    pca = result["pca_retained"]
    caption = (
        f"`dfa_t` distilled from `sam_mini` ({scale['train_images']} training scenes, "
        f"{scale['steps']} steps of batch {scale['batch_size']} for every run), "
        f"{scale['seeds']} runs (seeds) an arm, scored on {scale['num_instances']} held-out "
        f"instances with GT boxes (teacher GT mIoU {result['teacher_gt_miou']:.1f}). K of "
        "sam_mini's 1,024 tokens is the share that `tokens=4K` keeps of ViT-H's 4,096: the ViT-H "
        "column gives the bytes of a ViT-H sample in that setting, from the shapes. Arms: the "
        "mean over seeds (each seed's in brackets); differences: paired per instance on the "
        "scores averaged over seeds, with standard errors over instances (each seed's difference "
        "in brackets); the last rows show how far two seeds of one arm differ. The alternative at "
        f"the bytes of the first reduced arm's taps, a fixed projection to the top "
        f"{pca['channels_kept']} of {pca['of']} principal components, would keep "
        + " and ".join(f"{v:.0%} of {k}'s variance" for k, v in pca.items() if k[:5] == "block")
        + "."
    )
    header = ["student", "ViT-H MB / sample", "GT mIoU", "teacher agreement"]
    return {"caption": caption, "header": header, "rows": rows}


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
