"""Run logs: a CSV row per step, TensorBoard when installed, and PNG plots of losses and weights."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from tqdm import tqdm

from distill.schedule import dld_weights


class StepLog:
    """Appends one CSV row per step to OUT/log.csv (and TensorBoard scalars when available).

    On resume, rows after the resumed step are dropped first, so the file never holds a step twice.
    """

    def __init__(self, out: Path, columns: list[str], resume_step: int = 0) -> None:
        self.path, self.columns = out / "log.csv", ["step", *columns]
        rows = self.read(self.path) if resume_step and self.path.exists() else []
        with open(self.path, "w", newline="") as f:
            writer = csv.DictWriter(f, self.columns)
            writer.writeheader()
            writer.writerows(r for r in rows if int(r["step"]) <= resume_step)
        self.tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / "tensorboard"))
        except ImportError:  # tensorboard is optional
            pass

    def write(self, step: int, values: dict[str, float]) -> None:
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, self.columns).writerow({"step": step, **values})
        if self.tb is not None:
            for key, value in values.items():
                self.tb.add_scalar(key.replace("_", "/", 1), value, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()

    @staticmethod
    def read(path: Path) -> list[dict[str, str]]:
        with open(path, newline="") as f:
            return list(csv.DictReader(f))


class RunProgress:
    """Rank 0's view of a run: a CSV/TensorBoard row per step, the progress bar, and a console
    line every `log_every` steps and on the last. Other ranks keep a disabled bar only."""

    def __init__(self, cfg, columns: list[str], start: int, rank: int) -> None:
        """For a run of a `distill.config.TrainConfig` (out, steps, progress, log_every) resumed
        at step `start` (0 for a fresh run)."""
        self.steps, self.log_every = cfg.steps, cfg.log_every
        self.log = StepLog(Path(cfg.out), columns, start) if rank == 0 else None
        show = rank == 0 and cfg.progress
        self.bar = tqdm(total=cfg.steps, initial=start, unit="step", disable=not show)

    def step(self, step: int, values: dict[str, float], line: str, **postfix: str) -> None:
        """Record step `step` (1-based): `values` go to the CSV, `line` to the console."""
        self.bar.update(1)
        if self.log is None:
            return
        self.log.write(step, values)
        self.bar.set_postfix(postfix)
        if step % self.log_every == 0 or step == self.steps:
            self.bar.write(f"step {step}/{self.steps} {line}")

    def close(self) -> None:
        self.bar.close()
        if self.log is not None:
            self.log.close()


def plot_run(out: Path, pair_names: list[str], dld: bool = True) -> Path:
    """OUT/training.png: loss per term (log scale), DLD weights (phase 1) or the images without
    prompts (phase 2, `dld` False), and learning rate over steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = StepLog.read(out / "log.csv")
    steps = [int(r["step"]) for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for name in ["total", *pair_names]:
        values = [float(r[f"loss_{name}"]) for r in rows]
        if any(math.isfinite(v) and v > 0 for v in values):
            axes[0].plot(steps, values, label=name, lw=2 if name == "total" else 1)
    axes[0].set(yscale="log", xlabel="step", title="distillation loss per term")
    if dld:
        for name in pair_names:
            axes[1].plot(steps, [float(r[f"weight_{name}"]) for r in rows], label=name)
        axes[1].set(xlabel="step", title="DLD weight per pair", ylim=(-0.02, 1.02))
    else:
        axes[1].plot(steps, [int(r["num_unprompted"]) for r in rows], label="without prompts")
        axes[1].set(xlabel="step", title="images without a usable annotation (so far)")
    axes[2].plot(steps, [float(r["lr"]) for r in rows])
    axes[2].set(xlabel="step", title="learning rate")
    return _save(fig, axes[:2], out / "training.png")


def plot_dld_modes(path: Path, pair_names: list[str], **kwargs: float) -> Path:
    """A figure of every DLD mode's weights over a run, for distill/README.md."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from distill.schedule import DLD_MODES

    progress = [i / 200 for i in range(201)]
    fig, axes = plt.subplots(1, len(DLD_MODES), figsize=(4 * len(DLD_MODES), 3.2), sharey=True)
    for ax, mode in zip(axes, DLD_MODES, strict=True):
        weights = [dld_weights(p, len(pair_names), mode, **kwargs) for p in progress]
        ax.stackplot(progress, list(zip(*weights, strict=True)), labels=pair_names)
        ax.set(title=mode, xlabel="training progress", xlim=(0, 1), ylim=(0, 1))
    axes[0].set_ylabel("weight (stacked)")
    axes[-1].legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_adapt(out: Path) -> Path:
    """OUT/training.png of an adaptation: losses (log scale), validation IoU and Dice, and the
    predicted over true mask area (1 is right; a collapsing decoder falls towards 0)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = StepLog.read(out / "log.csv")
    steps = [int(r["step"]) for r in rows]
    val = [r for r in rows if r.get("val_iou")]
    val_steps = [int(r["step"]) for r in val]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for name in ("total", "mask", "aux"):
        values = [float(r[f"loss_{name}"]) for r in rows]
        if any(math.isfinite(v) and v > 0 for v in values):
            axes[0].plot(steps, values, label=name, lw=2 if name == "total" else 1)
    axes[0].set(yscale="log", xlabel="step", title="training loss")
    for name in ("iou", "dice"):
        axes[1].plot(val_steps, [float(r[f"val_{name}"]) for r in val], "o-", label=name)
    if (out / "val_before.json").exists():
        before = json.loads((out / "val_before.json").read_text())["val_iou"]
        axes[1].axhline(before, color="gray", ls="--", lw=1, label="iou before")
    axes[1].set(xlabel="step", title="validation", ylim=(0, 1))
    axes[2].plot(val_steps, [float(r["val_area_ratio"]) for r in val], "o-")
    axes[2].axhline(1.0, color="gray", lw=0.8)
    axes[2].set(xlabel="step", title="predicted / true mask area (val)")
    return _save(fig, axes[:2], out / "training.png")


def _save(fig, legends, path: Path) -> Path:
    """Legends on `legends`, tight layout, `path` written at 100 dpi, the figure closed."""
    import matplotlib.pyplot as plt

    for ax in legends:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
