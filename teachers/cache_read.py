"""Read and verify the teacher-feature cache written by `teachers.cache`."""

from __future__ import annotations

import json
import random
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import webdataset as wds

from teachers import codecs, reduction
from teachers.cache import channel_axis
from teachers.manifest import (
    MANIFEST,
    record_path,
    repair_cache,
    shard_index,
    shard_name,
    tar_keys,
    with_codecs,
)
from teachers.preprocess import decode_image, preprocess
from teachers.runtime.files import file_sha256
from teachers.sources import IMAGE_EXTS, expand_spec
from teachers.teacher import EMBED, Teacher, feature_names


@dataclass
class CacheSample:
    """A decoded cache sample.

    features: "embed" [256, h, w] and "block{i}" [h, w, C], float32; [K, C] in a cache with a
    token reduction.
    meta: the sample's json (orig_hw, input_hw, img_size, codec, codecs, dtype, teacher, taps,
    reduction).
    ann: the source annotations, or None.
    tokens: the stored token positions [K] (int64) of a token reduction, else None.
    """

    key: str
    image: bytes
    image_ext: str
    features: dict[str, torch.Tensor]
    meta: dict
    ann: dict | None = None
    tokens: torch.Tensor | None = None


def load_manifest(cache_dir: str | Path) -> dict:
    path = Path(cache_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(
            f"no {MANIFEST} in {cache_dir}: not a teacher cache, or caching never finished a shard"
        )
    try:
        return with_codecs(json.loads(path.read_text()))
    except json.JSONDecodeError as err:
        raise ValueError(
            f"{path}: corrupt manifest ({err}); launch/cache_teacher.py --out {cache_dir} "
            "--verify 0 merges it again from the shards' manifest parts"
        ) from err
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from err


def field_codecs(settings: dict) -> dict[str, str]:
    """{field: codec} of a manifest or a sample's json, also of those written before fields had
    their own codec (one `codec` string for all)."""
    return with_codecs(settings)["codecs"]


def _check_codec(manifest: dict, want: str) -> str | None:
    """What differs between the cache's codecs and the spec `want`, or None."""
    have = field_codecs(manifest)
    expected = codecs.parse_codecs(want, list(have))
    if have == expected:
        return None
    text = f"codec: cache has {codecs.codec_spec(have)!r}, expected {codecs.codec_spec(expected)!r}"
    if len(set(have.values())) > 1 or len(set(expected.values())) > 1:
        fields = [f"{f} is {have[f]}, not {expected[f]}" for f in have if have[f] != expected[f]]
        text += f" ({'; '.join(fields)})"
    return text


# The training flags that state a cache fact (distill.config.DistillConfig).
FACT_FLAGS = {
    "teacher": "--teacher",
    "taps": "--teacher-taps",
    "img_size": "--img-size",
    "codec": "--codec",
    "reduction": "--reduction",
}


def check_manifest(manifest: dict, source: str = "cache", **expected: object) -> None:
    """Refuse a cache whose manifest differs from what the caller expects.

    expected: any of teacher, taps, img_size, codec, reduction, preprocess_version; None values
    are skipped. codec is a spec ("int8", "embed=fp16,blocks=int8") compared field by field;
    reduction a spec ("none", "tokens=256"), "none" for a cache made before reductions.
    """
    wrong: dict[str, str] = {}
    for key, want in expected.items():
        if want is None:
            continue
        if key == "codec":
            if (text := _check_codec(manifest, want)) is not None:
                wrong[key] = text
            continue
        have = manifest.get(key)
        if key == "reduction":
            have, want = have or reduction.NONE, reduction.canonical(str(want), "--reduction")
        if key == "taps":
            have, want = sorted(have or []), sorted(want)
        if have != want:
            wrong[key] = f"{key}: cache has {have!r}, expected {want!r}"
    if wrong:
        flags = ", ".join(FACT_FLAGS.get(k, k) for k in wrong)
        raise ValueError(
            f"{source} does not match this run: {'; '.join(wrong.values())} (give {flags} as "
            "the cache has it, or leave it unset to take the cache's)"
        )


def shard_paths(cache_dir: str | Path, manifest: dict) -> list[str]:
    return [str(Path(cache_dir) / s["name"]) for s in manifest["shards"]]


def check_shards_present(cache_dir: Path, manifest: dict, chosen: list[str]) -> None:
    """Every shard of `chosen` that the manifest lists exists with its recorded size: a complete
    manifest is a promise, and a run on a cache that lost a shard would otherwise train on the
    rest in silence. A ValueError names the first shard that is missing or cut, and the fix."""
    listed = {s["name"]: s for s in manifest.get("shards", [])}
    for path in map(Path, chosen):
        entry = listed.get(path.name)
        if entry is None:
            continue
        if not path.is_file():
            problem = "is missing"
        elif "bytes" in entry and path.stat().st_size != entry["bytes"]:
            problem = f"has {path.stat().st_size} bytes, the manifest {entry['bytes']}"
        else:
            continue
        raise ValueError(
            f"{path} {problem} (listed in {cache_dir / MANIFEST}): restore it, or rerun "
            "launch/cache_teacher.py with the same flags, which rebuilds it"
        )


@dataclass(frozen=True)
class CacheInfo:
    """A cache's shards and the teacher's facts its manifest records.

    shards: the shard files to read (all of the manifest's, or those a glob chose).
    features: the stored feature names ("embed", then "block{i}" per tap).
    codec: the codec spec ("fp16", "embed=fp16,blocks=int8"); codecs: each feature's codec.
    reduction: how the block outputs are stored ("none", "tokens=256", `teachers.reduction`).
    """

    folder: Path
    shards: list[str]
    teacher: str
    teacher_sha256: str
    taps: list[int]
    img_size: int
    codec: str
    codecs: dict[str, str]
    features: list[str]
    num_samples: int
    complete: bool
    manifest: dict
    reduction: str = reduction.NONE

    @property
    def facts(self) -> dict[str, object]:
        """The facts a run may state and must then agree with: teacher, taps, img_size, codec,
        reduction."""
        return {
            "teacher": self.teacher,
            "taps": self.taps,
            "img_size": self.img_size,
            "codec": self.codec,
            "reduction": self.reduction,
        }


def open_cache(spec: str | Path) -> CacheInfo:
    """Open a cache folder (with manifest.json) or a glob of its shards: its shards and facts."""
    paths = expand_spec(str(spec))
    if len(paths) == 1 and paths[0].is_dir():
        folder = paths[0]
        manifest = load_manifest(folder)
        shards = shard_paths(folder, manifest)
        check_shards_present(folder, manifest, shards)
    else:
        shards = [str(p) for p in paths if p.suffix == ".tar" and p.is_file()]
        if not shards:
            raise ValueError(f"--shards {str(spec)!r} matched no shard files")
        folder = Path(shards[0]).parent
        manifest = load_manifest(folder)
        check_shards_present(folder, manifest, shards)
    try:
        return CacheInfo(
            folder=folder,
            shards=shards,
            teacher=manifest["teacher"],
            teacher_sha256=manifest["teacher_sha256"],
            taps=list(manifest["taps"]),
            img_size=int(manifest["img_size"]),
            codec=manifest["codec"],
            codecs=field_codecs(manifest),
            features=feature_names(manifest["taps"]),
            num_samples=int(manifest["num_samples"]),
            complete=bool(manifest["complete"]),
            manifest=manifest,
            reduction=manifest.get("reduction", reduction.NONE),
        )
    except KeyError as err:
        raise ValueError(
            f"{folder / MANIFEST} lacks the key {err}: not a manifest of this cache format"
        ) from err


def decode_sample(raw: dict) -> CacheSample:
    """Decode a raw WebDataset sample (bytes values) from a cache shard."""
    key = raw["__key__"]
    try:
        meta = json.loads(raw["json"])
        ext = next(e for e in IMAGE_EXTS if e in raw)
        per_field = field_codecs(meta)
        features = {}
        for name in feature_names(meta["taps"]):
            stored = {"q": codecs.from_npy_bytes(raw[f"{name}.npy"])}
            if f"{name}_scale.npy" in raw:
                stored["scale"] = codecs.from_npy_bytes(raw[f"{name}_scale.npy"])
            features[name] = codecs.decode(stored, per_field[name], channel_axis(name))
        ann = json.loads(raw["ann.json"]) if "ann.json" in raw else None
        tokens = raw.get(f"{reduction.TOKENS}.npy")
        if tokens is not None:
            tokens = torch.from_numpy(codecs.from_npy_bytes(tokens).astype("int64"))
    except (KeyError, StopIteration, ValueError, json.JSONDecodeError) as err:
        raise ValueError(
            f"sample {key!r} in {raw.get('__url__', '?')} is corrupt: {err!r}"
        ) from err
    return CacheSample(key, raw[ext], ext, features, meta, ann, tokens)


def read_cache(
    cache_dir: str | Path, *, allow_incomplete: bool = False, **expected: object
) -> Iterator[CacheSample]:
    """Yield every sample of a cache in shard order, after checking its manifest.

    expected: teacher, taps, img_size, codec (see `check_manifest`; codec per field).
    """
    manifest = load_manifest(cache_dir)
    check_manifest(manifest, f"cache {cache_dir}", **expected)
    if not manifest["complete"] and not allow_incomplete:
        raise ValueError(
            f"cache {cache_dir} is incomplete ({len(manifest['shards'])} of {manifest['num_shards']} "
            "shards): rerun the caching command to finish it"
        )
    dataset = wds.WebDataset(
        shard_paths(cache_dir, manifest), shardshuffle=False, empty_check=False
    )
    for raw in dataset:
        yield decode_sample(raw)


def cache_images(spec: str, num: int, img_size: int, flag: str = "--calib-shards") -> torch.Tensor:
    """The first `num` (or fewer) images of a teacher cache (folder or shard glob), preprocessed
    as the teacher saw them: [N, 3, S, S], e.g. to calibrate int8 or score pruning on data the
    cache already holds. Errors name `flag`."""
    info = open_cache(spec)
    if info.img_size != img_size:
        raise ValueError(
            f"{flag} {spec}: the cache holds {info.img_size} px images, the student runs at "
            f"{img_size}"
        )
    images = []
    for sample in read_cache(info.folder, allow_incomplete=True):
        images.append(preprocess(decode_image(sample.image, sample.key), img_size).image)
        if len(images) == num:
            break
    if not images:
        raise ValueError(f"{flag} {spec}: the cache holds no samples")
    return torch.stack(images)


@dataclass
class VerifyReport:
    bad_shards: dict[str, str] = field(default_factory=dict)  # shard name -> reason
    repaired: dict[str, str] = field(default_factory=dict)  # file -> what `repair_cache` did
    num_checked_shards: int = 0
    num_checked_samples: int = 0
    num_recomputed: int = 0
    max_error_ratio: float = 0.0  # worst |cached - recomputed| / allowed, over recomputed samples

    @property
    def ok(self) -> bool:
        return not self.bad_shards


def _check_shard(cache_dir: Path, entry: dict) -> str | None:
    path = cache_dir / entry["name"]
    if not path.is_file():
        return "file missing"
    if file_sha256(path) != entry["sha256"]:
        return "sha256 mismatch"
    try:
        count = len(tar_keys(path))
    except (tarfile.TarError, OSError) as err:
        return f"unreadable tar ({err})"
    if count != entry["num_samples"]:
        return f"{count} samples, manifest says {entry['num_samples']}"
    return None


def _recompute(teacher: Teacher, sample: CacheSample, slack: float) -> float:
    """Worst ratio of the cached error to the allowed error for one sample."""
    pre = preprocess(decode_image(sample.image, sample.key), teacher.img_size)
    fresh = teacher(pre.image[None])
    worst, per_field = 0.0, field_codecs(sample.meta)
    if sample.tokens is not None:
        k, hw = len(sample.tokens), sample.meta["input_hw"]
        if not torch.equal(
            sample.tokens, reduction.token_positions(sample.key, hw, teacher.img_size, k)
        ):
            return float("inf")  # positions the key does not give: the layer loss would mislead
    for name, cached in sample.features.items():
        ref = fresh[name][0]
        if sample.tokens is not None and name != EMBED:  # stored at the sample's token positions
            ref = reduction.take_tokens(ref, sample.tokens)
        bound = codecs.error_bound(ref, per_field[name], channel_axis(name))
        allowed = bound + slack * (1 + ref.abs())
        worst = max(worst, float(((cached - ref).abs() / allowed).max()))
    return worst


def verify_cache(
    cache_dir: str | Path,
    teacher: Teacher | None = None,
    num_recompute: int = 0,
    seed: int = 0,
    slack: float = 1e-4,
    repair: bool = True,
) -> VerifyReport:
    """Re-check every shard's sha256 and sample count; recompute `num_recompute` random samples
    with `teacher` and compare within the codec's bound plus `slack` (batch-size rounding).

    With `repair`, first rebuild lost or unreadable manifest parts from their shards and merge
    manifest.json again (`teachers.manifest.repair_cache`), which `report.repaired` lists."""
    cache_dir = Path(cache_dir)
    report = VerifyReport(repaired=repair_cache(cache_dir) if repair else {})
    manifest = load_manifest(cache_dir)
    listed = {s["name"] for s in manifest["shards"]}
    for i in range(manifest["num_shards"]):
        name = shard_name(i)
        if name not in listed:
            report.bad_shards[name] = "not finished (rerun the caching command)"
    for entry in manifest["shards"]:
        report.num_checked_shards += 1
        reason = _check_shard(cache_dir, entry)
        if reason:
            report.bad_shards[entry["name"]] = reason
        else:
            report.num_checked_samples += entry["num_samples"]
    if teacher is None or num_recompute <= 0:
        return report
    if (
        teacher.checkpoint_sha256 != manifest["teacher_sha256"]
        or teacher.name != manifest["teacher"]
    ):
        raise ValueError(
            f"the verifying teacher is not the one that made {cache_dir} (name or checkpoint sha256 differ)"
        )
    good = [e for e in manifest["shards"] if e["name"] not in report.bad_shards]
    keys = [
        (e["name"], k)
        for e in good
        for k in json.loads(record_path(cache_dir, shard_index(e["name"])).read_text())["keys"]
    ]
    chosen = set(random.Random(seed).sample(keys, min(num_recompute, len(keys))))
    urls = sorted({str(cache_dir / name) for name, _ in chosen})
    for raw in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        shard = Path(raw["__url__"]).name
        if (shard, raw["__key__"]) not in chosen:
            continue
        ratio = _recompute(teacher, decode_sample(raw), slack)
        report.num_recomputed += 1
        report.max_error_ratio = max(report.max_error_ratio, ratio)
        if ratio > 1:
            report.bad_shards[shard] = (
                f"sample {raw['__key__']} differs from the teacher ({ratio:.2f}x the codec bound)"
            )
    return report
