"""Training batches from the teacher cache: a resumable WebDataset pipeline.

Every micro-batch of a global step comes from its own *stream*: stream ``(slot, sub)`` where
``slot = rank * accum + micro_step`` names the micro-batch's place in the global batch and ``sub``
lets several loader workers serve one slot. A stream draws shards with replacement
(`webdataset.ResampledShards`, seeded by the stream id) from its own split of the shards (split
by node and worker when there are enough shards), shuffles samples within each drawn shard
(`webdataset.shuffle` with a buffer), decodes them, rebuilds the student input from the stored
image bytes with the shared preprocessing, and batches.

Why streams per slot: the global batch of step t is then the same samples whether it is made by
1 process accumulating 2 micro-batches or by 2 processes with one each, and a stream's position
is two integers (shards drawn, samples read from the current shard), so a resumed run continues
exactly where the checkpoint was taken, reading at most one shard again per stream.
"""

from __future__ import annotations

import random
import sys
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import islice

import torch
import webdataset as wds

from distill.prompting import NONE, sample_prompts
from teachers.cache_read import decode_sample
from teachers.preprocess import decode_image, preprocess, valid_mask
from teachers.runtime.preempt import ignore_in_worker, stop_workers
from teachers.teacher import feature_names

Position = tuple[int, int]  # (shards drawn before the current one, samples read from it)


@dataclass
class StreamLayout:
    """How a rank's micro-batches map onto streams and loader workers.

    rank, world_size: this process and the number of processes.
    accum: micro-batches per process per step (gradient accumulation).
    subs: streams per slot (loader workers that serve one micro-batch slot).
    num_workers: DataLoader workers of this rank (0: the main process).
    """

    rank: int = 0
    world_size: int = 1
    accum: int = 1
    subs: int = 1
    num_workers: int = 0

    @classmethod
    def choose(cls, rank: int, world_size: int, accum: int, workers: int) -> StreamLayout:
        """Use up to `workers` loader workers; their number must divide the rank's streams."""
        if workers <= 0:
            return cls(rank, world_size, accum, 1, 0)
        subs = max(1, workers // accum)
        streams = accum * subs
        num = max(d for d in range(1, min(workers, streams) + 1) if streams % d == 0)
        return cls(rank, world_size, accum, subs, num)

    @property
    def key(self) -> list[int]:
        """What stream positions depend on: processes, accumulation, streams per slot."""
        return [self.world_size, self.accum, self.subs]

    @property
    def per_rank(self) -> int:
        return self.accum * self.subs

    def stream_id(self, logical: int) -> int:
        """Global id of this rank's logical stream `logical` (0 .. per_rank - 1)."""
        slot, sub = logical % self.accum, logical // self.accum
        return (self.rank * self.accum + slot) * self.subs + sub

    @property
    def total(self) -> int:
        return self.world_size * self.per_rank


@dataclass
class DataSpec:
    """What to read and how: shards, the student input size, fields, batching."""

    shards: list[str]
    img_size: int
    taps: list[int]
    micro_batch: int
    seed: int = 0
    shuffle_buffer: int = 32
    on_corrupt: str = "skip"  # or "stop"
    positions: dict[int, Position] = field(default_factory=dict)  # logical stream -> position
    first_micro_batch: int = 0  # micro-batches this rank consumed before (resume)
    num_corrupt: int = 0  # corrupt samples this rank skipped before (resume)
    max_prompts: int = 0  # > 0: each sample also carries prompts from its annotations (phase 2)
    num_unprompted: int = 0  # samples without a usable annotation this rank read before (resume)


def _shard_split(shards: list[str], stream: int, total: int) -> list[str]:
    return shards[stream::total] if len(shards) >= total else shards


class CacheStream(torch.utils.data.IterableDataset):
    """Yields this rank's micro-batches in training order, from any number of loader workers.

    Each batch: "image" [m, 3, S, S], "valid" [m, S/16, S/16] bool, "embed" [m, 256, S/16, S/16],
    "block{i}" [m, S/16, S/16, C] (or [m, K, C] with "tokens" [m, K], the positions a cache
    with a token reduction stores, `teachers.reduction`), plus "stream", "position" and "num_corrupt" (samples skipped
    since that stream's previous batch) for checkpoints and logs, and "keys". With
    `max_prompts`, also "input_hw" [m, 2] and the prompts of `distill.prompting.sample_prompts`
    ("prompt_box" [m, P, 4], "prompt_point" [m, P, 2], "prompt_kind" [m, P]), drawn by a
    generator seeded with the run's seed, the sample's key and the stream's shard count, so
    they do not depend on processes, workers or restarts.
    """

    def __init__(self, spec: DataSpec, layout: StreamLayout) -> None:
        super().__init__()
        self.spec, self.layout = spec, layout

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        worker, num = (info.id, info.num_workers) if info else (0, 1)
        streams: dict[int, Iterator[dict]] = {}
        per_rank, start = self.layout.per_rank, self.spec.first_micro_batch
        # The DataLoader takes batches from workers 0, 1, ... in turn; worker w's i-th batch is
        # the rank's micro-batch start + w + i * num, so the order survives a restart.
        for i in range(sys.maxsize):
            logical = (start + worker + i * num) % per_rank
            if logical not in streams:
                streams[logical] = self._batches(logical)
            yield next(streams[logical])

    def _samples(self, logical: int) -> Iterator[tuple[dict | None, Position]]:
        """Raw samples of one stream with the position after each; None marks an unreadable rest."""
        spec, layout = self.spec, self.layout
        stream = layout.stream_id(logical)
        urls = _shard_split(spec.shards, stream, layout.total)
        seed = spec.seed * 1_000_003 + stream
        draws = iter(
            wds.ResampledShards(urls, seed=seed, worker_seed=lambda: 0, deterministic=True)
        )
        drawn, skip = spec.positions.get(logical, (0, 0))
        for shard in islice(draws, drawn, None):
            rng = random.Random(seed * 7_919 + drawn)
            raw = wds.tarfile_samples([shard])
            raw = wds.shuffle(spec.shuffle_buffer, initial=spec.shuffle_buffer, rng=rng)(raw)
            read = 0
            try:
                for sample in raw:
                    read += 1
                    if read > skip:
                        yield sample, (drawn, read)
            except (tarfile.TarError, OSError, ValueError) as err:
                problem = f"shard {shard['url']} is unreadable after {read} samples: {err}"
                if spec.on_corrupt == "stop":
                    raise ValueError(problem) from err
                yield problem, (drawn, read)  # the rest of the shard, skipped and named
            drawn, skip = drawn + 1, 0

    def _batches(self, logical: int) -> Iterator[dict]:
        batch, corrupt = [], 0
        for raw, position in self._samples(logical):
            try:
                if isinstance(raw, str):
                    raise ValueError(raw)
                batch.append(self._decode(raw, position[0]))
            except ValueError as err:
                if self.spec.on_corrupt == "stop":
                    raise ValueError(
                        f"{err} (rerun with --on-corrupt skip to skip and count such samples)"
                    ) from err
                print(f"skipping corrupt sample: {err}", file=sys.stderr)
                corrupt += 1
                continue
            if len(batch) == self.spec.micro_batch:
                yield _collate(batch) | {
                    "stream": logical,
                    "position": position,
                    "num_corrupt": corrupt,
                }
                batch, corrupt = [], 0

    def _decode(self, raw: dict, drawn: int) -> dict:
        sample = decode_sample(raw)
        fields = feature_names(self.spec.taps)
        missing = [f for f in fields if f not in sample.features]
        if missing:
            raise ValueError(f"sample {sample.key!r} in {raw.get('__url__')} lacks {missing}")
        pre = preprocess(decode_image(sample.image, sample.key), self.spec.img_size)
        out = {
            "key": sample.key,
            "image": pre.image,
            "valid": valid_mask(pre.input_hw, self.spec.img_size),
            **{f: sample.features[f] for f in fields},
        }
        if sample.tokens is not None:
            out["tokens"] = sample.tokens
        if self.spec.max_prompts:
            rng = random.Random(f"{self.spec.seed}:{sample.key}:{drawn}")
            out["input_hw"] = torch.tensor(pre.input_hw)
            out |= sample_prompts(
                sample.ann, pre.orig_hw, self.spec.img_size, self.spec.max_prompts, rng
            )
        return out


def _collate(samples: list[dict]) -> dict:
    out = {k: torch.stack([s[k] for s in samples]) for k in samples[0] if k != "key"}
    out["keys"] = [s["key"] for s in samples]
    return out


def make_loader(spec: DataSpec, layout: StreamLayout) -> torch.utils.data.DataLoader:
    """A DataLoader over `CacheStream` (batches are made in the workers)."""
    return torch.utils.data.DataLoader(
        CacheStream(spec, layout),
        batch_size=None,
        num_workers=layout.num_workers,
        worker_init_fn=ignore_in_worker,
        persistent_workers=False,
        prefetch_factor=2 if layout.num_workers else None,
    )


class StreamTracker:
    """A rank's micro-batches in training order, remembering what a checkpoint must hold to
    continue exactly there: each stream's position, the micro-batches consumed, corrupt samples
    skipped. Positions follow the batches handed out, not the ones the workers prefetched."""

    def __init__(self, spec: DataSpec, layout: StreamLayout) -> None:
        self.layout = layout
        self.positions: dict[int, Position] = dict(spec.positions)
        self.consumed, self.num_corrupt = spec.first_micro_batch, spec.num_corrupt
        self.num_unprompted = spec.num_unprompted
        self._batches = iter(make_loader(spec, layout))

    def __iter__(self) -> StreamTracker:
        return self

    def __next__(self) -> dict:
        batch = next(self._batches)
        self.consumed += 1
        self.positions[batch["stream"]] = tuple(batch["position"])
        self.num_corrupt += int(batch["num_corrupt"])
        if "prompt_kind" in batch:
            self.num_unprompted += int((batch["prompt_kind"].amax(1) == NONE).sum())
        return batch

    def close(self) -> None:
        """End the loader workers (see `teachers.runtime.preempt.stop_workers`)."""
        stop_workers(self._batches)

    def job_state(self) -> dict:
        """What every rank shares: the layout the positions belong to, micro-batches consumed."""
        return {"layout": self.layout.key, "micro_batches": self.consumed}

    def rank_state(self) -> dict:
        return {
            "positions": dict(self.positions),
            "num_corrupt": self.num_corrupt,
            "num_unprompted": self.num_unprompted,
        }


def restore_streams(
    spec: DataSpec, layout: StreamLayout, job: dict | None, mine: dict | None, step: int
) -> None:
    """Put the data streams where a checkpoint left them (`StreamTracker.job_state` and this
    rank's `rank_state`), or reseed them if processes, accumulation or workers changed."""
    if job is None:
        return
    if job["layout"] == layout.key and mine is not None:
        spec.positions = {int(k): tuple(v) for k, v in mine["positions"].items()}
        spec.first_micro_batch, spec.num_corrupt = job["micro_batches"], mine["num_corrupt"]
        spec.num_unprompted = mine.get("num_unprompted", 0)
        return
    print(
        "WARNING: processes, accumulation or loader workers changed since the checkpoint: "
        "the data streams restart with a new seed instead of at their saved position",
        file=sys.stderr,
    )
    spec.seed += step
