"""Dynamic layer-wise distillation (DLD) weights: a pure function of training progress.

Pairs are ordered shallow to deep and the last pair is the final embedding. SAM-Lightening does
not publish its formula; this is our reading of "dynamic layer-wise distillation":

- ``progressive``: a Gaussian bump of width ``sigma`` pairs slides from the shallowest pair
  (progress 0) past the final embedding (progress ``end``), so the weight moves smoothly from
  shallow to deep pairs and ends on the final embedding. The final embedding's weight never drops
  below ``floor``; the other pairs share the rest in proportion to the bump.
- ``stepwise``: one pair at a time, advancing every ``every`` of training (FastSAM3D's code
  advances one layer every k epochs; the caller converts epochs to progress), with the final
  embedding held at ``floor`` until its turn.
- ``final_only``: only the final embedding (the MobileSAM baseline).
- ``uniform``: every pair weighs the same.

Progress is that of the step being taken (`step_progress`): 0 on a run's first step and 1 on
its last, so every schedule reaches its end point (a one-step run is at progress 1).

Every mode's weights sum to one. In ``progressive`` and ``stepwise`` the final embedding's weight
and the weighted mean depth never decrease as training progresses (tested).
"""

from __future__ import annotations

import math

DLD_MODES = ("progressive", "stepwise", "final_only", "uniform")


def _check(progress: float, num_pairs: int, mode: str, floor: float) -> None:
    if mode not in DLD_MODES:
        raise ValueError(f"unknown DLD mode {mode!r}; choose one of {', '.join(DLD_MODES)}")
    if num_pairs < 1:
        raise ValueError(f"DLD needs at least one pair (the final embedding), got {num_pairs}")
    if not 0.0 <= floor <= 1.0:
        raise ValueError(f"DLD floor must be in [0, 1], got {floor}")
    if not math.isfinite(progress):
        raise ValueError(f"training progress must be finite, got {progress}")


def _with_floor(weights: list[float], floor: float) -> list[float]:
    """Raise the last (final-embedding) weight to `floor`, rescaling the others to sum to one."""
    final = weights[-1]
    if final >= floor or len(weights) == 1:
        return weights
    rest = sum(weights[:-1])
    return [w * (1.0 - floor) / rest for w in weights[:-1]] + [floor]


def dld_weights(
    progress: float,
    num_pairs: int,
    mode: str = "progressive",
    *,
    floor: float = 0.2,
    sigma: float = 0.6,
    end: float = 0.8,
    every: float | None = None,
) -> list[float]:
    """Weights of `num_pairs` distillation pairs (last = final embedding) at `progress` in [0, 1].

    floor: least weight of the final embedding (progressive, stepwise).
    sigma, end: progressive bump width in pairs, and the progress at which it has passed the
        final embedding (about 99.8% of the weight is then on it, given the floor and sigma 0.6).
    every: stepwise period as a fraction of training; default 1 / num_pairs.
    """
    _check(progress, num_pairs, mode, floor)
    progress = min(max(progress, 0.0), 1.0)
    k = num_pairs
    if mode == "uniform":
        return [1.0 / k] * k
    if mode == "final_only":
        return [0.0] * (k - 1) + [1.0]
    if mode == "stepwise":
        period = every if every is not None else 1.0 / k
        if period <= 0:
            raise ValueError(f"stepwise DLD period must be positive, got {period}")
        active = min(k - 1, int(progress / period + 1e-9))
        weights = [0.0] * k
        weights[active] = 1.0
        return _with_floor(weights, floor)
    # progressive: the bump's centre goes from pair 0 to 3 sigma beyond the last pair.
    centre = (k - 1 + 3.0 * sigma) * min(1.0, progress / end)
    bump = [math.exp(-0.5 * ((i - centre) / sigma) ** 2) for i in range(k)]
    total = sum(bump)
    return _with_floor([b / total for b in bump], floor)


def pair_every_from_epochs(epochs: float, steps_per_epoch: int, total_steps: int) -> float:
    """The stepwise period as a fraction of training, from a period in epochs."""
    return epochs * steps_per_epoch / max(total_steps, 1)


def step_progress(step: int, steps: int) -> float:
    """Training progress of step `step` (0-based) of a `steps`-step run, the one being taken: 0 on
    the first step, 1 on the last, evenly between, so a schedule's end point is used. A one-step
    run is all end: progress 1."""
    if not 0 <= step < steps:
        raise ValueError(f"step {step} is outside a {steps}-step run")
    return step / (steps - 1) if steps > 1 else 1.0


def lr_at(step: int, steps: int, peak: float, warmup: int, min_ratio: float) -> float:
    """Learning rate of step `step` (0-based) of `steps`: linear warm-up reaching `peak` on step
    `warmup - 1`, then cosine decay reaching `min_ratio * peak` on the last step (nanoGPT's
    schedule, without the constant tail)."""
    if not 0 <= step < steps:
        raise ValueError(f"step {step} is outside a {steps}-step run")
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup + 1) / (steps - warmup)
    return peak * (min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * t)))
