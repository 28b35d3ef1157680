"""Write the teacher-feature cache: WebDataset shards plus `manifest.json`.

Layout of OUT:
  shard-000000.tar ...   WebDataset shards (stock `webdataset` + `numpy` read them)
  shard-000000.json ...  manifest part of each shard: sample count, sha256, keys (after the shard)
  run.json               the settings the cache was started with; a rerun must match them
  manifest.json          run settings + every finished shard; "complete" once all are there

Sample fields (key `__key__`):
  jpg | png | ...        the original image bytes, not re-encoded
  embed.npy              final teacher embedding [256, h, w] in its codec's storage dtype
  block{i}.npy           tapped block output [h, w, C]
  {name}_scale.npy       int8 only: per-token float32 scale of the field above
  tokens.npy             with --reduction tokens=K: the K stored token positions (int32); the
                         block outputs are then [K, C] (`teachers.reduction`)
  json                   {"key", "orig_hw", "input_hw", "img_size", "codec", "codecs", "dtype",
                          "dtypes", "teacher", "taps", "reduction"}: codec is the spec, codecs and
                          dtypes per field
  ann.json               the source annotations (SA-1B json, or COCO image entry + annotations)

Inputs are sorted by key and cut into consecutive shards of `samples_per_shard`; shard i belongs
to rank i % world_size. A shard is written to `<name>.partial` and appears by atomic rename, so a
crash leaves no half shard, and a rerun skips finished shards: no sample is ever written twice.
No file is locked, so ranks on different nodes of NFS or Lustre can share OUT (teachers.manifest).
Each field may have its own codec (`--codec embed=fp16,blocks=int8`, `teachers.codecs`).
On a stop request (SIGUSR1/SIGTERM, see teachers/runtime/preempt.py) the writer finishes the
teacher batch in hand, drops the shard in progress, updates the manifest and raises `Preempted`.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import webdataset as wds
from tqdm import tqdm

from teachers import codecs, reduction
from teachers.manifest import (  # noqa: F401 (the cache's names, re-exported)
    MANIFEST,
    RUN,
    CacheRun,
    claim_run,
    merge_manifest,
    read_part,
    record_path,
    shard_index,
    shard_name,
    shard_record,
    write_json_atomic,
)
from teachers.preprocess import PREPROCESS_VERSION, decode_image, preprocess
from teachers.runtime.placement import DistEnv, dist_env
from teachers.runtime.preempt import Preempted, StopRequest, ignore_in_worker, stop_workers
from teachers.sources import SourceItem, list_sources, read_item
from teachers.teacher import EMBED, Teacher, feature_names


def channel_axis(field: str) -> int:
    """The final embedding is channels-first [256, h, w]; block outputs are channels-last."""
    return 0 if field == EMBED else -1


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


def encode_sample(
    teacher: Teacher,
    field_codecs: dict[str, str],
    rec: dict,
    feats: dict[str, torch.Tensor],
    reduce: str = reduction.NONE,
) -> dict:
    """One WebDataset sample from a decoded record and its teacher outputs (batch dim removed),
    each field stored with its codec from `field_codecs` ({"embed": "fp16", "block7": ...}) and
    the block outputs reduced as `reduce` says ("none", "tokens=K")."""
    item: SourceItem = rec["item"]
    sample = {"__key__": item.key, item.ext: rec["image"]}
    if (k := reduction.num_tokens(reduce)) is not None:
        positions = reduction.token_positions(item.key, rec["input_hw"], teacher.img_size, k)
        feats = reduction.reduce_features(feats, positions)
        sample[f"{reduction.TOKENS}.npy"] = codecs.to_npy_bytes(
            positions.numpy().astype(reduction.TOKEN_DTYPE)
        )
    dtypes = {}
    for field, value in feats.items():
        encoded = codecs.encode(value, field_codecs[field], channel_axis(field))
        sample[f"{field}.npy"] = codecs.to_npy_bytes(encoded["q"])
        dtypes[field] = str(encoded["q"].dtype)
        if "scale" in encoded:
            sample[f"{field}_scale.npy"] = codecs.to_npy_bytes(encoded["scale"])
    meta = {
        "key": item.key,
        "orig_hw": list(rec["orig_hw"]),
        "input_hw": list(rec["input_hw"]),
        "img_size": teacher.img_size,
        "codec": codecs.codec_spec(field_codecs),
        "codecs": field_codecs,
        "dtype": dtypes[EMBED] if len(set(dtypes.values())) == 1 else "mixed",
        "dtypes": dtypes,
        "teacher": teacher.name,
        "taps": list(teacher.taps),
        "reduction": reduction.canonical(reduce),
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
        record = shard_record(self.partial, self.keys) | {"name": self.final.name}
        os.replace(self.partial, self.final)
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
    teacher: Teacher, plan: CachePlan, out: Path, codec: str, env: DistEnv, reduce: str
) -> tuple[CacheRun, list[int]]:
    """Claim OUT for this run's settings; this rank's unfinished shards, their leftovers removed."""
    field_codecs = codecs.parse_codecs(codec, feature_names(teacher.taps))
    out.mkdir(parents=True, exist_ok=True)
    run = CacheRun(
        teacher.name,
        teacher.checkpoint_sha256 or "",
        list(teacher.taps),
        codecs.codec_spec(field_codecs),
        field_codecs,
        teacher.img_size,
        PREPROCESS_VERSION,
        plan.samples_per_shard,
        len(plan.items),
        plan.inputs_sha256(),
        reduction=reduction.canonical(reduce),
    )
    claim_run(out, run)
    todo = [i for i in range(env.rank, plan.num_shards, env.world_size) if not read_part(out, i)]
    for i in todo:  # leftovers of a killed run
        (out / (shard_name(i) + ".partial")).unlink(missing_ok=True)
    return run, todo


def write_cache(
    teacher: Teacher,
    plan: CachePlan,
    out: str | Path,
    *,
    codec: str = "fp16",
    reduce: str = reduction.NONE,
    batch_size: int = 8,
    workers: int = 0,
    env: DistEnv | None = None,
    progress: bool = True,
    stop: StopRequest | None = None,
) -> dict:
    """Cache `teacher`'s features for this rank's shards of `plan` in OUT; return the manifest.

    codec: one codec for every field, or per field ("embed=fp16,blocks=int8", see
    `teachers.codecs.parse_codecs`). reduce: "none", or "tokens=K" to store each tapped block at
    K token positions per sample (`teachers.reduction`).

    With `stop`, a request seen after a teacher batch drops the shard in progress (finished ones
    stay), updates the manifest and raises `Preempted`; a rerun redoes only the dropped shards.
    """
    env = env or dist_env()
    out = Path(out)
    run, todo = _start(teacher, plan, out, codec, env, reduce)
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
                    encode_sample(
                        teacher,
                        run.codecs,
                        rec,
                        {k: v[j].cpu() for k, v in feats.items()},
                        run.reduction,
                    )
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
    return merge_manifest(out, run, plan.num_shards)


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
    manifest = merge_manifest(out, run, plan.num_shards)
    raise Preempted(
        f"rank {env.rank}/{env.world_size}: {signal} received: stopped after finishing "
        f"{num_finished} shard(s) in this run{dropped}; {out} has {len(manifest['shards'])} of "
        f"{manifest['num_shards']} shards: rerun the same command to finish it"
    )
