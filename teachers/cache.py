"""Write the teacher-feature cache: WebDataset shards plus `manifest.json`.

Layout of OUT:
  shard-000000.tar ...   WebDataset shards (stock `webdataset` + `numpy` read them)
  shard-000000.json ...  per-shard record: sample count, sha256, keys (written after the shard)
  run.json               the settings the cache was started with; a rerun must match them
  manifest.json          run settings + every finished shard; "complete" once all are there

Sample fields (key `__key__`):
  jpg | png | ...        the original image bytes, not re-encoded
  embed.npy              final teacher embedding [256, h, w] in the codec's storage dtype
  block{i}.npy           tapped block output [h, w, C]
  {name}_scale.npy       int8 only: per-token float32 scale of the field above
  json                   {"key", "orig_hw", "input_hw", "img_size", "codec", "dtype", "teacher", "taps"}
  ann.json               the source annotations (SA-1B json, or COCO image entry + annotations)

Inputs are sorted by key and cut into consecutive shards of `samples_per_shard`; shard i belongs
to rank i % world_size. A shard is written to `<name>.partial` and appears by atomic rename, so a
crash leaves no half shard, and a rerun skips finished shards: no sample is ever written twice.
On a stop request (SIGUSR1/SIGTERM, see distill/preempt.py) the writer finishes the teacher batch
in hand, drops the shard in progress, updates the manifest and raises `Preempted`.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import webdataset as wds
from tqdm import tqdm

from distill.placement import DistEnv, dist_env
from distill.preempt import Preempted, StopRequest, ignore_in_worker, stop_workers
from teachers import codecs
from teachers.build import file_sha256
from teachers.preprocess import PREPROCESS_VERSION, decode_image, preprocess
from teachers.sources import SourceItem, list_sources, read_item
from teachers.teacher import EMBED, Teacher

MANIFEST = "manifest.json"
RUN = "run.json"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class CacheRun:
    """What a cache was made with; a rerun into the same folder must match it field for field."""

    teacher: str
    teacher_sha256: str
    taps: list[int]
    codec: str
    img_size: int
    preprocess_version: int
    samples_per_shard: int
    num_inputs: int
    inputs_sha256: str
    format_version: int = FORMAT_VERSION


SHARD_PREFIX, SHARD_DIGITS = "shard-", 6


def shard_name(index: int) -> str:
    """File name of shard `index`: shard-NNNNNN.tar."""
    return f"{SHARD_PREFIX}{index:0{SHARD_DIGITS}d}.tar"


def shard_index(name: str) -> int:
    """The index in a shard's file name (the inverse of `shard_name`)."""
    stem = Path(name).name.removesuffix(".tar")
    digits = stem.removeprefix(SHARD_PREFIX)
    if stem == digits or not digits.isdigit():
        raise ValueError(f"{name!r} is not a shard name ({shard_name(0)}, ...)")
    return int(digits)


def record_path(out: Path, index: int) -> Path:
    """The per-shard record beside shard `index`: shard-NNNNNN.json."""
    return out / shard_name(index).replace(".tar", ".json")


def channel_axis(field: str) -> int:
    """The final embedding is channels-first [256, h, w]; block outputs are channels-last."""
    return 0 if field == EMBED else -1


def write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)


@contextmanager
def _locked(out: Path) -> Iterator[None]:
    """Serialise run.json and manifest updates between processes sharing OUT."""
    with open(out / ".lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def claim_run(out: Path, run: CacheRun) -> None:
    """Record the run settings, or check them against the ones OUT was started with."""
    with _locked(out):
        path = out / RUN
        if not path.exists():
            write_json_atomic(path, asdict(run))
            return
        old = json.loads(path.read_text())
        diff = [
            f"{k}: cache has {old.get(k)!r}, this run {v!r}"
            for k, v in asdict(run).items()
            if old.get(k) != v
        ]
        if diff:
            raise ValueError(
                f"{out} already holds a cache made with other settings ({'; '.join(diff)}). "
                "Rerun with the same settings to resume, or choose another --out."
            )


def _shard_done(out: Path, index: int) -> bool:
    return record_path(out, index).exists() and (out / shard_name(index)).exists()


def update_manifest(out: Path, run: CacheRun, num_shards: int) -> dict:
    """Rewrite manifest.json from the per-shard records that exist now."""
    with _locked(out):
        shards = []
        for i in range(num_shards):
            if _shard_done(out, i):
                record = json.loads(record_path(out, i).read_text())
                shards.append({k: record[k] for k in ("name", "num_samples", "sha256")})
        manifest = asdict(run) | {
            "shards": shards,
            "num_shards": num_shards,
            "num_samples": sum(s["num_samples"] for s in shards),
            "complete": len(shards) == num_shards,
        }
        write_json_atomic(out / MANIFEST, manifest)
    return manifest


class _Decoded(torch.utils.data.Dataset):
    """Reads and preprocesses inputs (in DataLoader workers when there are any)."""

    def __init__(self, items: list[SourceItem], img_size: int) -> None:
        self.items, self.img_size = items, img_size

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        item = self.items[i]
        image, ann = read_item(item)
        pre = preprocess(decode_image(image, item.origin), self.img_size)
        return {
            "item": item,
            "image": image,
            "ann": ann,
            "x": pre.image,
            "orig_hw": pre.orig_hw,
            "input_hw": pre.input_hw,
        }


def _collate(batch: list[dict]) -> list[dict]:
    return batch


def encode_sample(teacher: Teacher, codec: str, rec: dict, feats: dict[str, torch.Tensor]) -> dict:
    """One WebDataset sample from a decoded record and its teacher outputs (batch dim removed)."""
    item: SourceItem = rec["item"]
    sample = {"__key__": item.key, item.ext: rec["image"]}
    dtype = None
    for field, value in feats.items():
        encoded = codecs.encode(value, codec, channel_axis(field))
        sample[f"{field}.npy"] = codecs.to_npy_bytes(encoded["q"])
        dtype = str(encoded["q"].dtype)
        if "scale" in encoded:
            sample[f"{field}_scale.npy"] = codecs.to_npy_bytes(encoded["scale"])
    meta = {
        "key": item.key,
        "orig_hw": list(rec["orig_hw"]),
        "input_hw": list(rec["input_hw"]),
        "img_size": teacher.img_size,
        "codec": codec,
        "dtype": dtype,
        "teacher": teacher.name,
        "taps": list(teacher.taps),
    }
    sample["json"] = json.dumps(meta).encode()
    if rec["ann"] is not None:
        sample["ann.json"] = rec["ann"]
    return sample


class _ShardWriter:
    """Writes one shard to `<name>.partial`, then fsyncs, records and renames it into place."""

    def __init__(self, out: Path, index: int) -> None:
        self.out, self.index = out, index
        self.final = out / shard_name(index)
        self.partial = self.final.with_name(self.final.name + ".partial")
        self.keys: list[str] = []
        self.writer = wds.TarWriter(str(self.partial), mtime=0.0)

    def write(self, sample: dict) -> None:
        self.writer.write(sample)
        self.keys.append(sample["__key__"])

    def finish(self) -> None:
        self.writer.close()
        with open(self.partial, "rb") as f:
            os.fsync(f.fileno())
        sha = file_sha256(self.partial)
        os.replace(self.partial, self.final)
        record = {
            "name": self.final.name,
            "num_samples": len(self.keys),
            "sha256": sha,
            "keys": self.keys,
        }
        write_json_atomic(record_path(self.out, self.index), record)

    def discard(self) -> None:
        """Close and delete the unfinished shard: it never gets its final name."""
        self.writer.close()
        self.partial.unlink(missing_ok=True)


@dataclass
class CachePlan:
    items: list[SourceItem]
    samples_per_shard: int

    @property
    def num_shards(self) -> int:
        return -(-len(self.items) // self.samples_per_shard)

    def shard_items(self, index: int) -> list[SourceItem]:
        n = self.samples_per_shard
        return self.items[index * n : (index + 1) * n]

    def inputs_sha256(self) -> str:
        return hashlib.sha256("\n".join(i.key for i in self.items).encode()).hexdigest()


def plan_cache(images: str, samples_per_shard: int, limit: int | None = None) -> CachePlan:
    if samples_per_shard < 1:
        raise ValueError(f"--samples-per-shard must be at least 1, got {samples_per_shard}")
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be at least 1, got {limit}")
    items = list_sources(images)
    return CachePlan(items[:limit] if limit else items, samples_per_shard)


def _start(
    teacher: Teacher, plan: CachePlan, out: Path, codec: str, env: DistEnv
) -> tuple[CacheRun, list[int]]:
    """Claim OUT for this run's settings; this rank's unfinished shards, their leftovers removed."""
    if codec not in codecs.CODECS:
        raise ValueError(f"--codec {codec!r}: choose one of {', '.join(codecs.CODECS)}")
    out.mkdir(parents=True, exist_ok=True)
    run = CacheRun(
        teacher.name,
        teacher.checkpoint_sha256 or "",
        list(teacher.taps),
        codec,
        teacher.img_size,
        PREPROCESS_VERSION,
        plan.samples_per_shard,
        len(plan.items),
        plan.inputs_sha256(),
    )
    claim_run(out, run)
    todo = [i for i in range(env.rank, plan.num_shards, env.world_size) if not _shard_done(out, i)]
    for i in todo:  # leftovers of a killed run
        (out / (shard_name(i) + ".partial")).unlink(missing_ok=True)
    return run, todo


def write_cache(
    teacher: Teacher,
    plan: CachePlan,
    out: str | Path,
    *,
    codec: str = "fp16",
    batch_size: int = 8,
    workers: int = 0,
    env: DistEnv | None = None,
    progress: bool = True,
    stop: StopRequest | None = None,
) -> dict:
    """Cache `teacher`'s features for this rank's shards of `plan` in OUT; return the manifest.

    With `stop`, a request seen after a teacher batch drops the shard in progress (finished ones
    stay), updates the manifest and raises `Preempted`; a rerun redoes only the dropped shards.
    """
    env = env or dist_env()
    out = Path(out)
    run, todo = _start(teacher, plan, out, codec, env)
    items = [item for i in todo for item in plan.shard_items(i)]
    loader = torch.utils.data.DataLoader(
        _Decoded(items, teacher.img_size),
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=_collate,
        worker_init_fn=ignore_in_worker,
    )
    device = next(teacher.parameters()).device
    bar = tqdm(total=len(items), unit="img", desc=f"cache rank {env.rank}", disable=not progress)
    shards = iter(todo)
    writer: _ShardWriter | None = None
    num_done = num_finished = 0
    if stop is not None and stop.requested and items:  # came while the teacher loaded
        _leave(out, run, plan, env, writer, num_finished, stop.signal)
    batches = iter(loader)
    try:
        for batch in batches:
            feats = teacher(torch.stack([r["x"] for r in batch]).to(device))
            for j, rec in enumerate(batch):
                if writer is None:
                    writer = _ShardWriter(out, next(shards))
                writer.write(
                    encode_sample(teacher, codec, rec, {k: v[j].cpu() for k, v in feats.items()})
                )
                if len(writer.keys) == len(plan.shard_items(writer.index)):
                    writer.finish()
                    writer, num_finished = None, num_finished + 1
            bar.update(len(batch))
            num_done += len(batch)
            if stop is not None and stop.requested and num_done < len(items):
                _leave(out, run, plan, env, writer, num_finished, stop.signal)
    finally:
        bar.close()
        stop_workers(batches)
    return update_manifest(out, run, plan.num_shards)


def _leave(
    out: Path,
    run: CacheRun,
    plan: CachePlan,
    env: DistEnv,
    writer: _ShardWriter | None,
    num_finished: int,
    signal: str | None,
) -> None:
    """Drop the shard in progress, record the finished ones, raise `Preempted`."""
    dropped = ""
    if writer is not None:
        writer.discard()
        dropped = f"; dropped the unfinished {writer.final.name}, which a rerun redoes"
    manifest = update_manifest(out, run, plan.num_shards)
    raise Preempted(
        f"rank {env.rank}/{env.world_size}: {signal} received: stopped after finishing "
        f"{num_finished} shard(s) in this run{dropped}; {out} has {len(manifest['shards'])} of "
        f"{manifest['num_shards']} shards: rerun the same command to finish it"
    )
