"""The training engine every job plugs into: set-up, one `step`, checkpoint/resume, stop on signal.

A job (distillation, phase-2 alignment, adaptation, re-distillation) brings a model, the
parameters that train, a loss function and its batches; the engine owns the rest:

    engine = build_engine(cfg, model, trainable, loss_fn, env, stop)
    start, job_state = engine.resume(ckpt_dir)          # (0, None) for a fresh run
    for step in range(start, cfg.steps):
        losses = engine.step(batches)                   # {"loss": ..., other named terms}
        if engine.stop_agreed or step + 1 == cfg.steps or ...:
            engine.save(ckpt_dir, step + 1, job_state)

`loss_fn(engine, batch) -> {"loss": scalar, name: scalar, ...}`: "loss" is optimised, every entry
is averaged over micro-batches and processes into what `step` returns. `engine.step_index` is
the 0-based step being taken (for schedules), `engine.dtype` the input dtype the model expects.

Two variants behind one interface: `DeepSpeedEngine` (any number of processes, bf16, ZeRO 0-2;
DeepSpeed's checkpoint files) and `TorchEngine` (plain PyTorch AdamW in one process, so loops
are tested in process on CPU). The learning rate is a pure function of the step
(`distill.schedule.lr_at`) set before every optimizer step in both. The engine knows nothing
about teachers, students or adapters.

Checkpoint save and resume, and the folder layout they keep, live in `distill.checkpoints`.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.distributed as dist

from distill.checkpoints import Checkpointing, latest_tag
from distill.config import TrainConfig, batch_layout, deepspeed_config, warmup_steps
from distill.schedule import lr_at
from teachers.runtime.files import (
    check_out_dir,
    safe_deepspeed_checkpoint_engine,
    save_atomic,
    write_text_atomic,
)
from teachers.runtime.placement import (
    DistEnv,
    dist_env,
    local_cuda_device,
    resolve_device,
    share_cpu_threads,
)
from teachers.runtime.preempt import Preempted, StopRequest

LossFn = Callable[["Engine", dict], dict[str, torch.Tensor]]
RecordFn = Callable[[int, dict[str, float], float], None]


def prepare_run_dir(cfg: TrainConfig, rank: int, product: str = "student.pt") -> Path:
    """A job's run folder `cfg.out` with its config.json, tried for writing before the work.
    Refused if it holds checkpoints and the run does not resume, and without `--overwrite` if it
    holds another run's `product` (the job's exported file) but no checkpoints, or a teacher
    cache. Returns the checkpoint folder, `cfg.out/checkpoints`."""
    out, ckpt_dir = Path(cfg.out), Path(cfg.out) / "checkpoints"
    if latest_tag(ckpt_dir) and cfg.resume != "auto":
        raise ValueError(
            f"{out} already holds checkpoints: pass --resume auto to continue, or choose another --out"
        )
    if not cfg.overwrite:
        if (out / product).is_file() and not latest_tag(ckpt_dir):
            raise ValueError(
                f"--out {out} holds {product} from another run (no checkpoints beside it): "
                "choose another --out, or pass --overwrite to replace it"
            )
        if (out / "manifest.json").is_file():
            raise ValueError(
                f"--out {out} holds a teacher cache (manifest.json): choose another --out for "
                "the run, or pass --overwrite to write into it anyway"
            )
    if rank == 0:
        check_out_dir(out)
        write_text_atomic(out / "config.json", json.dumps(cfg.to_json(), indent=1))
    return ckpt_dir


def start_processes(cfg: TrainConfig) -> DistEnv:
    """Read this process's placement; with DeepSpeed, start its process group (nccl on GPUs,
    gloo on CPUs) and, on CPUs, share the node's cores between its processes."""
    env = dist_env()
    batch_layout(cfg, env.world_size)  # a batch the processes cannot share fails before they meet
    device = resolve_device(cfg.device)
    if cfg.engine == "torch":
        if env.world_size > 1:
            raise ValueError("--engine torch runs one process: use --engine deepspeed for more")
    else:
        _init_deepspeed_group(env, device)
    if device == "cuda":
        torch.cuda.set_device(local_cuda_device(env))
    return env


def _init_deepspeed_group(env: DistEnv, device: str) -> None:
    import deepspeed

    os.environ.update(
        RANK=str(env.rank), WORLD_SIZE=str(env.world_size), LOCAL_RANK=str(env.local_rank)
    )
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        if env.world_size > 1:
            raise ValueError(
                "MASTER_PORT is not set: launch several processes with deepspeed, torchrun or srun"
            )
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    if device == "cpu":
        share_cpu_threads()
    deepspeed.init_distributed(dist_backend="nccl" if device == "cuda" else "gloo", verbose=False)


class Engine(Checkpointing):
    """What both variants share: the step with accumulation, the non-finite guard, the agreed
    stop, the learning rate and the checkpoints (`Checkpointing`). Subclasses forward, backward,
    step the optimizer and read and write their own checkpoint files."""

    def __init__(
        self,
        cfg: TrainConfig,
        model: torch.nn.Module,
        loss_fn: LossFn,
        env: DistEnv,
        stop: StopRequest | None = None,
    ) -> None:
        self.cfg, self.model, self.loss_fn, self.env = cfg, model, loss_fn, env
        self.stop = stop or StopRequest()
        self.micro_batch, self.accum = batch_layout(cfg, env.world_size)
        self.device = torch.device(resolve_device(cfg.device))
        if self.device.type == "cuda":
            self.device = torch.device(local_cuda_device(env))
        self.dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float32
        self.warmup = warmup_steps(cfg)
        self.step_index = 0  # the step being taken (0-based); saved and restored
        self.num_nonfinite = 0
        self.stop_agreed = False
        self.lr = 0.0

    @property
    def distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1

    def all_reduce(self, values: list[float], op: str = "sum") -> list[float]:
        """Sum (or min, max) of `values` over the processes; one collective."""
        if not self.distributed:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64)
        ops = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}
        dist.all_reduce(t, op=ops[op])
        return t.tolist()

    def to_device(self, batch: dict) -> dict:
        return {
            k: v.to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) else v
            for k, v in batch.items()
        }

    def step(self, batches: Iterator[dict]) -> dict[str, float]:
        """One optimizer step over `accum` micro-batches drawn from `batches`; the named losses
        averaged over micro-batches and processes. A micro-batch whose loss is not finite on any
        process is skipped on all of them before backward (another is drawn); `max_nonfinite` in
        a row stop the run. The same collective that averages the losses carries each process's
        stop request, so all agree on stopping after this step (`stop_agreed`)."""
        self.lr = lr_at(
            self.step_index, self.cfg.steps, self.cfg.lr, self.warmup, self.cfg.min_lr_ratio
        )
        self._set_lr(self.lr)
        sums: dict[str, float] = {}
        done, in_a_row = 0, 0
        while done < self.accum:
            batch = self.to_device(next(batches))
            losses = self.loss_fn(self, batch)
            # Every process must agree before backward, or the gradient all-reduce would hang.
            if self.all_reduce([float(torch.isfinite(losses["loss"]))], "min")[0] < 1.0:
                self.num_nonfinite, in_a_row = self.num_nonfinite + 1, in_a_row + 1
                self._report_nonfinite(in_a_row)
                continue
            in_a_row = 0
            self._backward_and_step(losses["loss"], last=done + 1 == self.accum)
            for name, value in losses.items():
                sums[name] = sums.get(name, 0.0) + float(value.detach())
            done += 1
        totals = self.all_reduce([*sums.values(), float(self.stop.requested)])
        self.stop_agreed = totals[-1] > 0
        self.step_index += 1
        count = self.accum * self.env.world_size
        return {name: total / count for name, total in zip(sums, totals[:-1], strict=True)}

    def _report_nonfinite(self, in_a_row: int) -> None:
        print(
            f"step {self.step_index + 1}: non-finite loss, micro-batch skipped ({in_a_row} in a row)",
            file=sys.stderr,
            flush=True,
        )
        if in_a_row >= self.cfg.max_nonfinite:
            raise RuntimeError(
                f"{in_a_row} micro-batches in a row had a non-finite loss: stopping at step "
                f"{self.step_index + 1}. Lower --lr, use --precision fp32, or check the data."
            )

    def run(
        self, batches, ckpt_dir: Path, start: int, record: RecordFn, also_close: tuple = ()
    ) -> None:
        """The loop of every job: steps `start` .. `cfg.steps` - 1, one `step` each, then
        `record(step, losses, seconds)` (the job's log line, validation; 0-based step) and a
        checkpoint every `checkpoint_every` steps, at the last step and when a signal stopped
        the run, which then raises `Preempted`. `batches` (an iterator of micro-batches) also
        gives the job state to save: `batches.job_state()` (shared) and `batches.rank_state()`
        (this process's). However the loop ends, `batches.close()` ends its loader workers and
        every object of `also_close` (e.g. the progress bar) is closed."""
        try:
            self._loop(batches, ckpt_dir, start, record)
        finally:
            for closing in (*also_close, batches):
                closing.close()

    def _loop(self, batches, ckpt_dir: Path, start: int, record: RecordFn) -> None:
        cfg, saved = self.cfg, None
        for step in range(start, cfg.steps):
            tic = time.perf_counter()
            losses = self.step(batches)
            record(step, losses, time.perf_counter() - tic)
            last = step + 1 == cfg.steps
            if self.stop_agreed or last or (step + 1) % cfg.checkpoint_every == 0:
                saved = self.save(ckpt_dir, step + 1, batches.job_state(), batches.rank_state())
            if self.stop_agreed and not last:
                raise Preempted(
                    f"rank {self.env.rank}: stopped at step {step + 1} of {cfg.steps} on "
                    f"{self.stop.signal or 'a signal to another process'}: saved {saved}; "
                    "run again with --resume auto to continue"
                )

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def _set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    # Variant-specific parts; each variant sets `self.optimizer`.
    def __call__(self, *args: torch.Tensor) -> object:
        raise NotImplementedError

    def _backward_and_step(self, loss: torch.Tensor, last: bool) -> None:
        raise NotImplementedError


class TorchEngine(Engine):
    """Plain PyTorch, one process: AdamW, accumulation by summing micro-batch gradients, norm
    clipping, bf16 autocast for `--precision bf16` (fp32 weights). Checkpoint: one file per tag,
    `model`, `optimizer`, `client`, loaded with `weights_only=True`."""

    FILE = "engine.pt"

    def __init__(self, cfg, model, params, loss_fn, env, stop=None) -> None:
        super().__init__(cfg, model, loss_fn, env, stop)
        self.model = model.to(self.device)
        self.params = [p for p in params if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.optimizer.zero_grad(set_to_none=True)

    def __call__(self, *args: torch.Tensor) -> object:
        with torch.autocast(self.device.type, torch.bfloat16, enabled=self.dtype == torch.bfloat16):
            return self.model(*args)

    def _backward_and_step(self, loss: torch.Tensor, last: bool) -> None:
        (loss / self.accum).backward()
        if not last:
            return
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def _save_files(self, ckpt_dir: Path, tag: str, client: dict) -> None:
        folder = ckpt_dir / tag
        folder.mkdir(parents=True, exist_ok=True)
        frozen = self.frozen_names()
        state = {
            "model": {k: v for k, v in self.model.state_dict().items() if k not in frozen},
            "optimizer": self.optimizer.state_dict(),
            "client": client,
        }
        save_atomic(state, folder / self.FILE)

    def _load_files(self, ckpt_dir: Path, tag: str) -> dict:
        path = ckpt_dir / tag / self.FILE
        if not path.is_file():
            raise ValueError(f"{path} not found: {ckpt_dir} was not written by --engine torch")
        state = torch.load(path, map_location=self.device, weights_only=True)
        missing, unexpected = self.model.load_state_dict(state["model"], strict=False)
        if unexpected or set(missing) - self.frozen_names():
            raise ValueError(
                f"{path} holds another model: unexpected {sorted(unexpected)[:5]}, missing "
                f"{sorted(set(missing) - self.frozen_names())[:5]}"
            )
        self.optimizer.load_state_dict(state["optimizer"])
        return state["client"]


class DeepSpeedEngine(Engine):
    """DeepSpeed: the model wrapped by `deepspeed.initialize` with our AdamW and the derived
    config (`distill.config.deepspeed_config`); DeepSpeed's checkpoint layout, loaded with
    `weights_only=True`."""

    def __init__(self, cfg, model, params, loss_fn, env, stop=None) -> None:
        import deepspeed

        super().__init__(cfg, model, loss_fn, env, stop)
        trainable = [p for p in params if p.requires_grad]
        self.trainable = trainable
        optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.ds, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=deepspeed_config(cfg, env.world_size)
        )
        self.ds.checkpoint_engine = safe_deepspeed_checkpoint_engine(self.ds._config)
        self.device = self.ds.device

    def __call__(self, *args: torch.Tensor) -> object:
        return self.ds(*args)

    def _backward_and_step(self, loss: torch.Tensor, last: bool) -> None:
        # DeepSpeed counts micro-steps itself and steps the optimizer on the accumulation boundary.
        # Its gradient all-reduce expects the same tensors on every process, but a forward may
        # leave parameters unused on one process only (Conv-LoRA routes each image to one
        # expert): a zero-weighted touch gives every trainable parameter a gradient (0 if unused).
        touch = sum(p.reshape(-1)[0] for p in self.trainable)
        self.ds.backward(loss + 0.0 * touch)
        self.ds.step()

    def _save_files(self, ckpt_dir: Path, tag: str, client: dict) -> None:
        self.ds.save_checkpoint(
            str(ckpt_dir),
            tag=tag,
            client_state=client,
            save_latest=False,
            exclude_frozen_parameters=bool(self.frozen_names()),
        )

    def _load_files(self, ckpt_dir: Path, tag: str) -> dict:
        # Frozen parameters are not in the file (see `frozen_names`); everything else must be.
        _, client = self.ds.load_checkpoint(
            str(ckpt_dir), tag=tag, load_module_strict=not self.frozen_names()
        )
        if client is None:
            raise ValueError(f"{ckpt_dir / tag} could not be loaded as a DeepSpeed checkpoint")
        return client


def build_engine(
    cfg: TrainConfig,
    model: torch.nn.Module,
    params,
    loss_fn: LossFn,
    env: DistEnv,
    stop: StopRequest | None = None,
) -> Engine:
    """The engine `cfg.engine` names, training `params` of `model` with `loss_fn`."""
    params = list(params)
    check_contiguous(model, params)
    variant = {"deepspeed": DeepSpeedEngine, "torch": TorchEngine}[cfg.engine]
    return variant(cfg, model, params, loss_fn, env, stop)


def check_contiguous(model: torch.nn.Module, params: list[torch.nn.Parameter]) -> None:
    """Trainable parameters must be contiguous: DeepSpeed's broadcast fails on a strided view
    (a channels_last conv weight) deep inside `initialize`, naming nothing; this names it."""
    for name, p in model.named_parameters():
        if p.requires_grad and not p.is_contiguous() and any(p is q for q in params):
            raise AssertionError(f"trainable parameter {name} is not contiguous ({p.stride()})")
