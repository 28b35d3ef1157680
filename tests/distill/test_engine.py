"""The training engine in process, on CPU: its plain-PyTorch variant, and the distillation loop on it."""

from __future__ import annotations

import math
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

import distill.logs
from distill.checkpoints import latest_tag
from distill.config import DistillConfig, TrainConfig
from distill.engine import TorchEngine, build_engine
from distill.schedule import dld_weights, lr_at, step_progress
from distill.train import train
from students.load import load_sam
from teachers.runtime.placement import DistEnv
from teachers.runtime.preempt import Preempted, StopRequest


class Toy(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body, self.head = torch.nn.Linear(4, 8), torch.nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.body(x)))


def mse(engine, batch):
    err = (engine(batch["x"]).squeeze(-1) - batch["y"]) ** 2
    return {"loss": err.mean(), "max_error": err.max()}


def toy_batches(micro: int, seed: int = 0, start: int = 0):
    """An endless, seekable stream of regression micro-batches: batch i depends on i only."""
    i = start
    while True:
        g = torch.Generator().manual_seed(seed * 100_003 + i)
        x = torch.randn(micro, 4, generator=g)
        yield {"x": x, "y": x.sum(-1).sin(), "index": i}
        i += 1


def toy_engine(tmp_path: Path, model=None, params=None, loss_fn=mse, **overrides) -> TorchEngine:
    fields = dict(out=str(tmp_path), engine="torch", device="cpu", steps=10, batch_size=4, lr=1e-2)
    cfg = TrainConfig(**(fields | overrides))
    model = model or Toy()
    return build_engine(cfg, model, params or model.parameters(), loss_fn, DistEnv())


def test_a_step_changes_exactly_the_trainable_parameters(tmp_path):
    model = Toy()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    engine = toy_engine(tmp_path, model, model.head.parameters())
    losses = engine.step(toy_batches(4))
    assert set(losses) == {"loss", "max_error"} and losses["max_error"] >= losses["loss"] > 0
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in ("body.weight", "body.bias"))
    assert all(not torch.equal(before[k], after[k]) for k in ("head.weight", "head.bias"))


def test_a_strided_trainable_parameter_is_refused_by_name(tmp_path):
    model = Toy()
    model.body.weight = torch.nn.Parameter(torch.randn(4, 8).t())  # [8, 4], a transposed view
    with pytest.raises(AssertionError, match="body.weight is not contiguous"):
        toy_engine(tmp_path, model)
    model.body.weight.requires_grad_(False)  # a frozen one is never flattened: allowed
    toy_engine(tmp_path, model)


def test_accumulated_micro_batches_make_the_full_batch_step(tmp_path):
    whole, split = Toy(), Toy()
    toy_engine(tmp_path, whole, batch_size=4).step(toy_batches(4))
    engine = toy_engine(tmp_path, split, batch_size=4, micro_batch_size=2)
    assert engine.accum == 2

    def halves():
        batch = next(toy_batches(4))
        for part in (slice(0, 2), slice(2, 4)):
            yield {k: v[part] for k, v in batch.items() if k != "index"}

    engine.step(halves())
    for a, b in zip(whole.parameters(), split.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-6)


def test_learning_rate_follows_the_configured_warmup_and_cosine(tmp_path):
    engine = toy_engine(tmp_path, steps=10, warmup_steps=2, lr=0.1, min_lr_ratio=0.05)
    batches, seen = toy_batches(4), []
    for _ in range(10):
        engine.step(batches)
        seen.append(engine.lr)
        assert engine.optimizer.param_groups[0]["lr"] == engine.lr
    assert seen[:2] == pytest.approx([0.05, 0.1])  # linear warm-up reaches the peak on step 2
    assert seen[-1] == pytest.approx(0.1 * 0.05)  # the last step at the floor
    middle = 2 + (10 - 2) / 2  # the cosine's midpoint: halfway between peak and floor
    assert lr_at(int(middle) - 1, 10, 0.1, 2, 0.05) == pytest.approx(0.1 * (0.05 + 0.95 * 0.5))
    assert all(a > b for a, b in zip(seen[1:], seen[2:], strict=False))
    default = toy_engine(tmp_path, steps=200, lr=1.0, min_lr_ratio=0.0)  # no --warmup-steps
    assert default.warmup == 10  # default warm-up: 5% of steps
    batches, ramp = toy_batches(4), []
    for _ in range(11):
        default.step(batches)
        ramp.append(default.lr)
    assert ramp[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])  # peak on step 10
    assert ramp[10] < 1.0  # then the decay


def test_step_progress_is_zero_on_the_first_step_and_one_on_the_last():
    assert step_progress(0, 50) == 0.0 and step_progress(49, 50) == 1.0
    assert step_progress(0, 1) == 1.0  # a one-step run is all end
    assert [step_progress(s, 5) for s in range(5)] == [0.0, 0.25, 0.5, 0.75, 1.0]
    with pytest.raises(ValueError, match="outside a 5-step run"):
        step_progress(5, 5)


def test_save_then_resume_equals_an_uninterrupted_run(tmp_path):
    straight = toy_engine(tmp_path / "a", micro_batch_size=2)
    batches = toy_batches(2)
    expected = [straight.step(batches)["loss"] for _ in range(10)]

    first = toy_engine(tmp_path / "b", micro_batch_size=2)
    batches = toy_batches(2)
    got = [first.step(batches)["loss"] for _ in range(4)]
    position = next(batches)["index"]  # the stream's position: 8 consumed
    first.save(tmp_path / "ckpt", 4, {"consumed": position}, {"rank": "own"})

    model = Toy()
    torch.nn.init.zeros_(model.head.weight)  # resume must overwrite every weight
    second = toy_engine(tmp_path / "c", model, micro_batch_size=2)
    step, job, mine = second.resume(tmp_path / "ckpt")
    assert (step, job, mine) == (4, {"consumed": 8}, {"rank": "own"})
    assert second.step_index == 4
    batches = toy_batches(2, start=job["consumed"])
    got += [second.step(batches)["loss"] for _ in range(6)]
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    for a, b in zip(straight.model.parameters(), second.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_checkpoints_are_pruned_and_latest_only_moves_after_a_complete_save(tmp_path, monkeypatch):
    engine = toy_engine(tmp_path, keep_checkpoints=2)
    ckpt = tmp_path / "ckpt"
    for step in (1, 2, 3):
        engine.save(ckpt, step, {})
    assert sorted(p.name for p in ckpt.iterdir() if p.is_dir()) == ["step00000002", "step00000003"]
    assert latest_tag(ckpt) == "step00000003"

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        engine.save(ckpt, 4, {})
    monkeypatch.undo()
    assert latest_tag(ckpt) == "step00000003"  # the crashed save never became the newest
    assert toy_engine(tmp_path).resume(ckpt)[0] == 3
    engine.save(ckpt, 5, {})  # a left-over newer folder is removed with the old ones
    assert sorted(p.name for p in ckpt.iterdir() if p.is_dir()) == ["step00000003", "step00000005"]


def test_nonfinite_micro_batches_are_skipped_and_too_many_stop_the_run(tmp_path):
    def poisoned(engine, batch):
        losses = mse(engine, batch)
        return losses | {"loss": losses["loss"] * math.nan} if batch["index"] % 2 else losses

    engine = toy_engine(tmp_path, loss_fn=poisoned, max_nonfinite=2)
    batches = toy_batches(4)
    for _ in range(3):
        assert math.isfinite(engine.step(batches)["loss"])
    assert engine.num_nonfinite == 2  # batches 1 and 3; each step drew a good one after
    assert all(torch.isfinite(p).all() for p in engine.model.parameters())
    always = toy_engine(
        tmp_path, loss_fn=lambda e, b: {"loss": torch.tensor(math.inf)}, max_nonfinite=3
    )
    with pytest.raises(RuntimeError, match="3 micro-batches in a row had a non-finite loss"):
        always.step(toy_batches(4))


def test_a_stop_request_is_agreed_after_the_step(tmp_path):
    stop = StopRequest()
    engine = toy_engine(tmp_path)
    engine.stop = stop
    batches = toy_batches(4)
    engine.step(batches)
    assert not engine.stop_agreed
    before = signal.getsignal(signal.SIGTERM)  # SIG_DFL, or a pytest-xdist worker's handler
    with stop:
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)  # a second signal only records
        engine.step(batches)
    assert engine.stop_agreed and stop.signal == "SIGUSR1"
    assert signal.getsignal(signal.SIGTERM) is before  # handlers restored


def test_torch_engine_refuses_zero_and_several_processes(tmp_path):
    with pytest.raises(ValueError, match="--zero-stage needs --engine deepspeed"):
        TrainConfig(out=str(tmp_path), engine="torch", zero_stage=1)
    with pytest.raises(ValueError, match="--precision 'fp16': choose one of fp32, bf16"):
        TrainConfig(out=str(tmp_path), precision="fp16")


# The distillation loop on the plain engine, in process.


def distill_cfg(cache: Path, out: Path, **overrides) -> DistillConfig:
    fields = dict(shards=str(cache), out=str(out), student="dfa_t", steps=8, batch_size=2)
    fields |= dict(engine="torch", device="cpu", workers=0, progress=False, checkpoint_every=100)
    return DistillConfig(**(fields | overrides))


def test_the_cache_manifest_supplies_the_teacher_facts(cache, tmp_path, capsys):
    cfg = distill_cfg(cache, tmp_path / "run", steps=2)
    assert (cfg.teacher, cfg.teacher_taps, cfg.img_size, cfg.codec) == (None, None, None, None)
    train(cfg)
    out = capsys.readouterr().out
    assert "teacher vit_tiny, taps [1, 3], img_size 256, codec fp16, reduction none" in out
    assert "(teacher, taps, img_size, codec, reduction from its manifest)" in out
    assert load_sam(tmp_path / "run" / "student.pt").image_encoder.img_size == 256
    with pytest.raises(ValueError, match="img_size: cache has 256, expected 1024"):
        train(distill_cfg(cache, tmp_path / "bad", img_size=1024))


def test_a_signal_mid_run_saves_there_and_resume_ends_like_an_uninterrupted_run(
    cache, tmp_path, monkeypatch
):
    train(distill_cfg(cache, tmp_path / "straight"))
    write = distill.logs.StepLog.write

    def signal_at_step_3(self, step, values):
        write(self, step, values)
        if step == 3:
            os.kill(os.getpid(), signal.SIGUSR1)

    monkeypatch.setattr(distill.logs.StepLog, "write", signal_at_step_3)
    run = tmp_path / "stopped"
    with StopRequest() as stop, pytest.raises(Preempted, match="stopped at step 4 of 8 on SIGUSR1"):
        train(distill_cfg(cache, run, checkpoint_every=3), stop)
    monkeypatch.undo()
    assert latest_tag(run / "checkpoints") == "step00000004"  # not a multiple of 3
    assert not (run / "student.pt").exists()
    train(distill_cfg(cache, run, checkpoint_every=3, resume="auto"))
    a = load_sam(run / "student.pt").image_encoder.state_dict()
    b = load_sam(tmp_path / "straight" / "student.pt").image_encoder.state_dict()
    for key in b:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5)
    rows = lambda out: distill.logs.StepLog.read(out / "log.csv")  # noqa: E731
    assert [int(r["step"]) for r in rows(run)] == list(range(1, 9))
    np.testing.assert_allclose(
        [float(r["loss_total"]) for r in rows(run)],
        [float(r["loss_total"]) for r in rows(tmp_path / "straight")],
        rtol=1e-5,
    )


@pytest.mark.parametrize("steps", [1, 3])
def test_dld_sees_progress_0_on_the_first_step_and_1_on_the_last(cache, tmp_path, steps):
    train(distill_cfg(cache, tmp_path / "run", steps=steps, dld="stepwise", dld_floor=0.1))
    rows = distill.logs.StepLog.read(tmp_path / "run" / "log.csv")
    weights = [[float(r[f"weight_{p}"]) for p in ("block1", "block3", "embed")] for r in rows]
    if steps > 1:  # progress 0: the shallowest pair, the final embedding at its floor
        assert weights[0] == pytest.approx(dld_weights(0.0, 3, "stepwise", floor=0.1))
        assert weights[0] == pytest.approx([0.9, 0.0, 0.1])
    assert weights[-1] == pytest.approx([0.0, 0.0, 1.0])  # progress 1: the final embedding alone


def test_a_checkpoint_without_engine_state_is_refused_by_name(tmp_path):
    engine = toy_engine(tmp_path)
    engine.save(tmp_path / "ckpt", 2, {})
    path = tmp_path / "ckpt" / "step00000002" / "engine.pt"
    state = torch.load(path, weights_only=True)
    torch.save(state | {"client": {"step": 2}}, path)  # what an older trainer wrote
    with pytest.raises(ValueError, match="step00000002 was written by an older trainer"):
        toy_engine(tmp_path).resume(tmp_path / "ckpt")
