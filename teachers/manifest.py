"""The cache's bookkeeping files, kept consistent by atomic renames alone (no file locks).

Caching ranks may run on different nodes of a shared filesystem (NFS, Lustre) where `flock` is
not honoured or not shared between clients, so nothing here locks:

- `run.json` (the settings) is created once: the first rank links a finished temporary file to
  the name, which either creates it or fails because it exists (`os.link` is atomic on NFS and
  Lustre); every later rank reads and compares. Only the inputs may change between runs
  (`INPUT_FIELDS`): run.json then records the new ones and the writer keeps the finished shards
  whose inputs are unchanged.
- Each finished shard gets its own *manifest part* `shard-NNNNNN.json` (sample count, sha256,
  keys), written to a temporary file and renamed into place by the rank that wrote the shard.
  The parts are the record: no process ever rewrites another's.
- `manifest.json` is derived from the parts (`merge_manifest`). A rank that merged from an older
  listing may replace a newer manifest, so every merge lists the parts again after its rename
  and merges once more if they changed: the last merge to land has seen every part that existed
  when the one before it landed, so the rank that finishes last leaves a complete manifest.
  `repair_cache` (run by `--verify`) rebuilds parts lost to an interruption from their shards
  and merges again, so a stale manifest never outlives a verify.
"""

from __future__ import annotations

import json
import tarfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from webdataset.tariterators import base_plus_ext

from teachers.codecs import parse_codecs
from teachers.reduction import NONE
from teachers.runtime.files import atomic_write, create_once, file_sha256
from teachers.teacher import feature_names

MANIFEST = "manifest.json"
RUN = "run.json"
FORMAT_VERSION = 1
SHARD_PREFIX, SHARD_DIGITS = "shard-", 6
STALE_TMP_S = 15 * 60  # a temporary file this old belongs to a writer that died


@dataclass(frozen=True)
class CacheRun:
    """What a cache was made with; a rerun into the same folder must match it field for field.

    codec: the codec spec ("fp16", or "embed=fp16,blocks=int8"); codecs: the codec of each
    stored field ("embed", "block{i}"); reduction: how the block outputs are reduced ("none",
    "tokens=256", `teachers.reduction`).
    """

    teacher: str
    teacher_sha256: str
    taps: list[int]
    codec: str
    codecs: dict[str, str]
    img_size: int
    preprocess_version: int
    samples_per_shard: int
    num_inputs: int
    inputs_sha256: str
    format_version: int = FORMAT_VERSION
    reduction: str = NONE


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
    """The manifest part of shard `index`: shard-NNNNNN.json beside it."""
    return out / shard_name(index).replace(".tar", ".json")


def _json(data: dict) -> str:
    return json.dumps(data, indent=1, sort_keys=True)


def write_json_atomic(path: Path, data: dict) -> None:
    """Write `path` whole or not at all: a synced temporary file renamed onto it."""
    atomic_write(path, lambda f: f.write(_json(data)))


def create_json_once(path: Path, data: dict) -> bool:
    """Create `path` with `data` unless it exists; True when this call created it."""
    return create_once(path, lambda f: f.write(_json(data)))


def with_codecs(settings: dict) -> dict:
    """Settings (run.json or manifest.json) with per-field `codecs`, derived from the single
    `codec` string of caches written before fields had their own codec; fields in feature
    order (embed, then the taps), whatever order the file keeps its keys in; and `reduction`
    "none" where a cache made before reductions has none (`teachers.reduction`)."""
    if "codec" not in settings and "codecs" not in settings:
        return settings
    settings = {"reduction": NONE} | settings
    fields = feature_names(settings.get("taps") or [])
    if "codecs" not in settings:
        return settings | {"codecs": parse_codecs(settings["codec"], fields, f"{RUN} codec")}
    stored = settings["codecs"]
    return settings | {"codecs": {f: stored[f] for f in fields if f in stored} | stored}


# Settings a rerun may change: the finished shards whose inputs are unchanged are kept
# (`teachers.cache`), so an input removed, added or replaced after a skip costs one shard.
INPUT_FIELDS = ("num_inputs", "inputs_sha256")


def claim_run(out: Path, run: CacheRun) -> dict | None:
    """Record the run settings, or check them against the ones OUT was started with. The inputs
    may differ: run.json then records this run's, and the settings it held are returned."""
    path = out / RUN
    if create_json_once(path, asdict(run)):
        return None
    old = with_codecs(json.loads(path.read_text()))
    diff = [
        f"{k}: cache has {old.get(k)!r}, this run {v!r}"
        for k, v in asdict(run).items()
        if k not in INPUT_FIELDS and old.get(k) != v
    ]
    if diff:
        raise ValueError(
            f"{out} already holds a cache made with other settings ({'; '.join(diff)}). "
            "Rerun with the same settings to resume, or choose another --out."
        )
    if all(old.get(k) == getattr(run, k) for k in INPUT_FIELDS):
        return None
    write_json_atomic(path, asdict(run))
    return old


def read_part(out: Path, index: int) -> dict | None:
    """Shard `index`'s manifest part when it and its shard are both in place and the part is
    whole; None otherwise (the shard then counts as not finished)."""
    path = record_path(out, index)
    if not path.is_file() or not (out / shard_name(index)).is_file():
        return None
    try:
        part = json.loads(path.read_text())
        return part if {"name", "num_samples", "sha256", "keys"} <= set(part) else None
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):
        return None


def _entries(out: Path, num_shards: int) -> list[dict]:
    parts = (read_part(out, i) for i in range(num_shards))
    # "bytes" lets a reader find a missing or cut shard without hashing it (older parts lack it)
    fields = ("name", "num_samples", "sha256", "bytes", "skipped")
    return [{k: p[k] for k in fields if k in p} for p in parts if p]


def merge_manifest(out: Path, run: CacheRun, num_shards: int) -> dict:
    """Rewrite manifest.json from the manifest parts that exist now (see the module docstring
    for why it lists them again after writing). Every input a shard skipped is listed under
    "skipped" with its shard and reason, so num_samples + num_skipped counts the inputs."""
    shards = _entries(out, num_shards)
    while True:
        skipped = [{"shard": s["name"]} | x for s in shards for x in s.get("skipped", [])]
        manifest = asdict(run) | {
            "shards": [{k: v for k, v in s.items() if k != "skipped"} for s in shards],
            "num_shards": num_shards,
            "num_samples": sum(s["num_samples"] for s in shards),
            "num_skipped": len(skipped),
            "skipped": skipped,
            "complete": len(shards) == num_shards,
        }
        write_json_atomic(out / MANIFEST, manifest)
        now = _entries(out, num_shards)
        if now == shards:
            return manifest
        shards = now


def tar_keys(path: Path) -> list[str]:
    """The sample keys of a shard, in order (as webdataset groups its members)."""
    keys: dict[str, None] = {}
    with tarfile.open(path, "r:") as tar:
        for member in tar:
            if member.isfile():
                keys[base_plus_ext(member.name)[0]] = None
    return list(keys)


def shard_record(path: Path, keys: list[str], skipped: list[dict] | None = None) -> dict:
    """The manifest part of a finished shard file; `skipped`: the inputs of the shard that were
    left out ({"key", "origin", "reason"}), when there are any."""
    record = {
        "name": path.name,
        "num_samples": len(keys),
        "sha256": file_sha256(path),
        "bytes": path.stat().st_size,
        "keys": keys,
    }
    return record | ({"skipped": skipped} if skipped else {})


def drop_shard(out: Path, index: int) -> None:
    """Remove shard `index` and its manifest part (the part first: a shard without one counts
    as unfinished, and no repair rebuilds a part from a shard about to be replaced)."""
    record_path(out, index).unlink(missing_ok=True)
    (out / shard_name(index)).unlink(missing_ok=True)


def repair_cache(out: str | Path) -> dict[str, str]:
    """Rebuild the manifest parts that an interruption lost or left unreadable, from their
    finished shards (a shard gets its name only once written and synced), remove temporary
    files left by killed writers (older than `STALE_TMP_S`: a live writer's are younger), and
    merge manifest.json again. {file: what was done}."""
    out = Path(out)
    if not (out / RUN).is_file():
        return {}
    run_fields = with_codecs(json.loads((out / RUN).read_text()))
    run = CacheRun(**run_fields)
    num_shards = -(-run.num_inputs // run.samples_per_shard)
    repaired: dict[str, str] = {}
    for tmp in sorted(out.glob(".*.tmp")):
        if time.time() - tmp.stat().st_mtime < STALE_TMP_S:
            continue
        tmp.unlink(missing_ok=True)
        repaired[tmp.name] = "removed a temporary file left by an interrupted write"
    for i in range(num_shards):
        shard, part = out / shard_name(i), record_path(out, i)
        if not shard.is_file() or read_part(out, i) is not None:
            continue
        try:
            keys = tar_keys(shard)
        except (tarfile.TarError, OSError):
            continue  # the shard check names it
        was = "unreadable" if part.exists() else "missing"
        write_json_atomic(part, shard_record(shard, keys))
        repaired[part.name] = f"manifest part was {was}: rebuilt from {shard.name}"
    try:
        before = json.loads((out / MANIFEST).read_text()).get("shards")
    except (OSError, json.JSONDecodeError):
        before = None
    merged = merge_manifest(out, run, num_shards)
    if before != merged["shards"]:
        repaired[MANIFEST] = f"merged again from the parts: {len(merged['shards'])} shards"
    return repaired
