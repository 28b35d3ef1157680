r"""SAM-Lightening's claims (and EdgeSAM's phase 2), measured against the reference teacher: one
benchmark, every arm at equal data, steps and seed, paired per held-out instance.

    python launch/bench/claims.py [--work runs/claims] [--quick] \
        [--arms distill,dld,attention,phase2,deploy,adapters] [--out launch/bench/results/claims.json]

The teacher is the shipped `sam_mini` (teachers/sam_mini.py). Training scenes are
`eval.scenes.photos`' train split (seed 1), held-out scenes its held split (seed 2: photographs the
teacher never trained on). The teacher's features (`embed=fp16,blocks=int8`, its taps) are cached
once; every student is `dfa_t` distilled from that cache with the same batch, learning rate, seed
and steps, one process (`--engine torch`), and scored by `eval/coco.py` on the held-out scenes with
the GT-box protocol (multimask argmax; phase 2 also single-mask): per-instance GT IoU, and for the
distilled student the IoU with the teacher's mask (agreement). Each comparison is the paired mean
of the per-instance differences (points of IoU x 100), its standard error and the instances.

Arms (the questions of the plot's panels):

- distill: the distilled student (progressive DLD) against the undistilled one (the same `dfa_t`,
  initial weights, the teacher's decoder), the teacher and the box-fill baseline; the share of the
  teacher's GT mIoU the student keeps; and the same run with the next seed, the noise floor of
  every comparison (the paired standard error counts the held-out instances, not the training
  run's own spread).
- dld: progressive, stepwise, uniform and final_only layer weights (`--dld`).
- attention: DFA against windowed-only (`tile=8`) and global attention (`tile=64`) in every block
  of the same width, depth and MLP; plus CPU latency at 1024 px of the three, timed in turns.
- phase2: from the distilled student, `--extra-steps` of phase 2 (`--mask-target soft` and `hard`)
  against as many more phase-1 steps (final embedding, `--init`), single-mask and multimask.
- deploy: int8 through PyTorch (`torch.ao` dynamic, the Linear layers) and through onnxruntime
  (the encoder ONNX quantized dynamic and static, `students.quant`, scored through
  `students.onnx.OrtEncoder`), and heads/MLP pruning at half (`students.prune`, activation
  criterion on training scenes), before and after `--extra-steps` of re-distillation: the change
  in GT mIoU against the fp32 student.
- adapters: every registered adapter method (`students.adapters`) trained `--extra-steps` from the
  distilled student on a camouflage domain (held-out photographs, each object cut from its own
  background; the mask's box as the prompt) and scored by eval/masks.py on its val split: the gain over the un-adapted student
  and over `decoder` (the mask decoder alone), with trainable parameters, saved-activation bytes
  and encoder latency against the student's.

Stages done under `--work` are reused; `--work` records the setup (work/setup.json), and a run
with another setup there is refused, naming what differs. --quick: a few scenes and steps (the
test's budget): the figures that must hold at any size are that distillation beats no
distillation and int8 keeps the fp32 student's mIoU within a point.
"""

import sys
from pathlib import Path

_here = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
sys.path.insert(0, str(_here.parents[1]))

from dataclasses import dataclass  # noqa: E402

from launch.bench import common  # noqa: E402
from launch.bench._claims import report  # noqa: E402
from launch.bench._claims.arms import RUNNERS  # noqa: E402
from launch.bench._claims.stages import ARMS, CODEC, make_data  # noqa: E402
from teachers.runtime.exits import exit_status  # noqa: E402
from teachers.runtime.flags import parse_config  # noqa: E402
from teachers.sam_mini import SAM_MINI_PATH  # noqa: E402

QUICK = dict(train_images=8, held_images=3, steps=8, extra_steps=2, batch_size=4, repeats=1)


@dataclass
class ClaimsConfig:
    """One run of the claims benchmark."""

    work: str = "runs/claims"
    """Folder for scenes, the cache, runs and evaluations (stages done there are reused)."""
    out: str = "launch/bench/results/claims.json"
    """The results JSON (the plot is written beside it, .png)."""
    arms: tuple[str, ...] = ARMS
    """Arms to run (distill always runs: the others start from or compare with it)."""
    quick: bool = False
    """The test's budget: a few scenes and steps (overrides the sizes below)."""
    train_images: int = 128
    """Training scenes cached for every arm."""
    held_images: int = 40
    """Held-out scenes scored (all their instances)."""
    steps: int = 150
    """Distillation steps of every phase-1 arm."""
    extra_steps: int = 40
    """Steps of each continuation from the distilled student (phase 2, more phase 1,
    re-distillation of a pruned student)."""
    batch_size: int = 8
    """Batch size of every run."""
    lr: float = 2e-3
    """Peak learning rate of every phase-1 arm."""
    repeats: int = 5
    """Timed runs per encoder in the attention arm's latency."""
    seed: int = 0
    """Seed of every distillation run."""

    def __post_init__(self) -> None:
        unknown = set(self.arms) - set(ARMS)
        if unknown:
            raise ValueError(f"--arms {sorted(unknown)}: choose from {', '.join(ARMS)}")
        for name, value in self.sizes.items():
            if value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {value}")

    @property
    def sizes(self) -> dict:
        """The sizes this run uses: the flags', or --quick's."""
        return {k: getattr(self, k) for k in QUICK} | (QUICK if self.quick else {})

    def setup(self) -> dict:
        """What the stages under --work depend on."""
        from teachers.runtime.files import file_sha256

        teacher = {"teacher": "sam_mini", "teacher_sha256": file_sha256(SAM_MINI_PATH)}
        return {**self.sizes, "lr": self.lr, "seed": self.seed, "codec": CODEC, **teacher}


def run(cfg: ClaimsConfig) -> dict:
    """Every asked arm (distill first); the figures."""
    work = Path(cfg.work).resolve()  # the scripts it runs start in the repository
    common.check_setup(work, cfg.setup())
    make_data(cfg, work)
    result = {"setup": cfg.setup()}
    for arm in ARMS:
        if arm == "distill" or arm in cfg.arms:
            print(f"== {arm}", flush=True)
            result[arm] = RUNNERS[arm](cfg, work)
    return result


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(ClaimsConfig, argv, __doc__)

    def bench() -> None:
        result = run(cfg)
        report.print_result(result)
        out = Path(cfg.out)
        result["tables"] = report.tables(result)
        result["plot"] = str(report.plot(result, out.with_suffix(".png")))
        common.write_results(out, result, cfg, script=__file__, argv=argv)
        print(f"wrote {out} and {result['plot']}")

    return exit_status(bench)


if __name__ == "__main__":
    sys.exit(main())
