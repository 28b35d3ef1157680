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
An input that cannot be read or decoded is skipped (`on_bad="skip"`, the default: at SA-1B scale
one bad JPEG must not strand a cache) and listed with its reason in its shard's manifest part and
in manifest.json, or stops the run (`on_bad="stop"`) after the finished shards are recorded. A
rerun keeps each finished shard whose inputs are unchanged (the same keys; a skipped input is
tried again and rebuilds its shard once it reads) and whose file has its recorded size, and
writes the rest: removing, adding or replacing an input redoes only the shards it touches.
Each field may have its own codec (`--codec embed=fp16,blocks=int8`, `teachers.codecs`).
On a stop request (SIGUSR1/SIGTERM, see teachers/runtime/preempt.py) the writer finishes the
teacher batch in hand, drops the shard in progress, updates the manifest and raises `Preempted`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
from collections.abc import Iterator
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
    drop_shard,
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

ON_BAD = ("skip", "stop")


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
        try:
            image, ann = read_item(item)
            pre = preprocess(decode_image(image, item.origin), self.img_size)
        except (ValueError, OSError) as err:  # a bad input: skipped or fatal (`on_bad`)
            return {"item": item, "bad": str(err)}
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


@contextlib.contextmanager
def _naming(path: Path) -> Iterator[None]:
    """An OSError without a file name (a tar write on a full disk) names `path`."""
    try:
        yield
    except OSError as err:
        if err.filename is None and err.errno is not None:
            raise OSError(err.errno, os.strerror(err.errno), str(path)) from err
        raise


class _ShardWriter:
    """Writes one shard to `<name>.partial`, then fsyncs, records and renames it into place."""

    def __init__(self, out: Path, index: int) -> None:
        self.out, self.index = out, index
        self.final = out / shard_name(index)
        self.partial = self.final.with_name(self.final.name + ".partial")
        self.keys: list[str] = []
        self.skipped: list[dict] = []
        self.writer = wds.TarWriter(str(self.partial), mtime=0.0)

    @property
    def num_inputs(self) -> int:
        return len(self.keys) + len(self.skipped)

    def write(self, sample: dict) -> None:
        with _naming(self.partial):
            self.writer.write(sample)
        self.keys.append(sample["__key__"])

    def skip(self, item: SourceItem, reason: str) -> None:
        self.skipped.append({"key": item.key, "origin": item.origin, "reason": reason})

    def finish(self) -> None:
        with _naming(self.partial):
            self.writer.close()
        with open(self.partial, "rb") as f:
            os.fsync(f.fileno())
        record = shard_record(self.partial, self.keys, self.skipped) | {"name": self.final.name}
        os.replace(self.partial, self.final)
        write_json_atomic(record_path(self.out, self.index), record)

    def discard(self) -> None:
        """Close and delete the unfinished shard: it never gets its final name."""
        if self.partial.exists():
            with contextlib.suppress(OSError):  # a full disk fails the close's flush too
                self.writer.close()
            if self.writer.own_fileobj is not None:  # left open when that close failed
                with contextlib.suppress(OSError):
                    self.writer.own_fileobj.close()
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
    _drop_beyond(out, plan.num_shards)
    todo = []
    for i in range(env.rank, plan.num_shards, env.world_size):
        why = _redo_reason(out, plan, i, teacher.img_size)
        if why is None:
            continue
        if why:
            print(f"rank {env.rank}: rebuilding {shard_name(i)}: {why}", flush=True)
            drop_shard(out, i)
        todo.append(i)
        (out / (shard_name(i) + ".partial")).unlink(missing_ok=True)  # a killed run's leftover
    return run, todo


def _reads(item: SourceItem, img_size: int) -> bool:
    try:
        preprocess(decode_image(read_item(item)[0], item.origin), img_size)
    except (ValueError, OSError):
        return False
    return True


def _redo_reason(out: Path, plan: CachePlan, index: int, img_size: int) -> str | None:
    """None when shard `index` is finished for this plan; else why it must be written: "" when
    it never was, else what changed since (its inputs, its size, a skipped input that reads)."""
    part = read_part(out, index)
    if part is None:
        return ""
    planned = plan.shard_items(index)
    skipped = {s["key"] for s in part.get("skipped", [])}
    if sorted(part["keys"] + sorted(skipped)) != sorted(item.key for item in planned):
        return "its inputs changed since it was written"
    size = (out / shard_name(index)).stat().st_size
    if "bytes" in part and size != part["bytes"]:
        return f"it has {size} bytes, its manifest part {part['bytes']}"
    for item in planned:
        if item.key in skipped and _reads(item, img_size):
            return f"{item.origin}, skipped when it was written, now reads"
    return None


def _drop_beyond(out: Path, num_shards: int) -> None:
    """Remove shards past the plan's last one (left by a run over more inputs)."""
    for path in sorted(out.glob(shard_name(0).replace("000000", "*"))):
        index = shard_index(path.name)
        if index >= num_shards:
            print(f"removing {path.name}: the inputs now make {num_shards} shard(s)", flush=True)
            drop_shard(out, index)


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
    on_bad: str = "skip",
) -> dict:
    """Cache `teacher`'s features for this rank's shards of `plan` in OUT; return the manifest.

    codec: one codec for every field, or per field ("embed=fp16,blocks=int8", see
    `teachers.codecs.parse_codecs`). reduce: "none", or "tokens=K" to store each tapped block at
    K token positions per sample (`teachers.reduction`).

    With `stop`, a request seen after a teacher batch drops the shard in progress (finished ones
    stay), updates the manifest and raises `Preempted`; a rerun redoes only the dropped shards.
    on_bad: "skip" leaves out an input that cannot be read or decoded and lists it in the
    manifest; "stop" raises a ValueError naming it, after recording the finished shards.
    """
    if on_bad not in ON_BAD:
        raise ValueError(f"--on-bad {on_bad!r}: choose one of {', '.join(ON_BAD)}")
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
    bar = tqdm(total=len(items), unit="img", desc=f"cache rank {env.rank}", disable=not progress)
    shards = iter(todo)
    writer: _ShardWriter | None = None
    num_done = num_finished = 0
    if stop is not None and stop.requested and items:  # came while the teacher loaded
        _leave(out, run, plan, env, writer, num_finished, stop.signal)
    batches = iter(loader)
    try:
        for batch in batches:
            if on_bad == "stop" and (bad := next((r for r in batch if "bad" in r), None)):
                _stop_on_bad(out, run, plan, writer, bad["bad"])
            writer, finished = _write_batch(teacher, run, plan, out, batch, writer, shards)
            num_finished += finished
            bar.update(len(batch))
            num_done += len(batch)
            if stop is not None and stop.requested and num_done < len(items):
                _leave(out, run, plan, env, writer, num_finished, stop.signal)
    except BaseException:
        if writer is not None:  # its space freed (a full disk); a rerun writes it again
            writer.discard()
        raise
    finally:
        bar.close()
        stop_workers(batches)
    return merge_manifest(out, run, plan.num_shards)


def _write_batch(
    teacher: Teacher,
    run: CacheRun,
    plan: CachePlan,
    out: Path,
    batch: list[dict],
    writer: _ShardWriter | None,
    shards: Iterator[int],
) -> tuple[_ShardWriter | None, int]:
    """The teacher on the batch's good inputs, each sample written (a bad input recorded as
    skipped) in order; the shard in progress and the number of shards finished."""
    good = [r for r in batch if "bad" not in r]
    feats = {}
    if good:
        feats = teacher(torch.stack([r["x"] for r in good]).to(next(teacher.parameters()).device))
    num_finished, j = 0, 0
    try:
        for rec in batch:
            if writer is None:
                writer = _ShardWriter(out, next(shards))
            if "bad" in rec:
                writer.skip(rec["item"], rec["bad"])
                tqdm.write(f"skipped input {rec['item'].key}: {rec['bad']}", file=sys.stderr)
            else:
                sample = {k: v[j].cpu() for k, v in feats.items()}
                writer.write(encode_sample(teacher, run.codecs, rec, sample, run.reduction))
                j += 1
            if writer.num_inputs == len(plan.shard_items(writer.index)):
                writer.finish()
                writer, num_finished = None, num_finished + 1
    except BaseException:
        if writer is not None:  # its space freed (a full disk); a rerun writes it again
            writer.discard()
        raise
    return writer, num_finished


def _stop_on_bad(
    out: Path, run: CacheRun, plan: CachePlan, writer: _ShardWriter | None, reason: str
) -> None:
    """`on_bad="stop"`: drop the shard in progress, record the finished ones, name the input."""
    if writer is not None:
        writer.discard()
    manifest = merge_manifest(out, run, plan.num_shards)
    raise ValueError(
        f"{reason} (--on-bad stop): {out} keeps its {len(manifest['shards'])} finished shard(s); "
        "fix or remove the input and rerun, or rerun with --on-bad skip, which leaves it out "
        f"and lists it in {MANIFEST}"
    )


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
