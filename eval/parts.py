"""Several processes, one result: per-rank part files and their merge.

Image i (in image-id order) belongs to rank i % world_size, so every image is evaluated exactly
once whatever the world size; nothing is padded or duplicated (unlike DistributedSampler). Each
rank streams its records to `OUT.rank{r}-of-{w}.jsonl.partial` and renames it to
`OUT.rank{r}-of-{w}.jsonl` when done, so a part file that exists is complete. A part holds a
header line (rank, world size, the run's fingerprint), one line per record, and a footer line
(the images it covered, seconds). The merge reads every part, refuses parts of another run
(fingerprint), checks that the parts cover exactly the run's images, drops duplicate records by
id, and sorts them by id: its figures are those of a single process. No torch.distributed is
needed; part files stay beside the output after the merge.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from teachers.runtime.files import atomic_write, write_text_atomic


def part_path(out: str | Path, rank: int, world_size: int) -> Path:
    out = Path(out)
    return out.with_name(f"{out.name}.rank{rank}-of-{world_size}.jsonl")


def write_json(path: str | Path, obj: dict) -> None:
    """Write a JSON file atomically (readers never see half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(obj, indent=1) + "\n")


def write_jsonl(path: str | Path, records: Iterable[dict]) -> None:
    """Write one JSON object per line, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: f.writelines(json.dumps(r) + "\n" for r in records))


class PartWriter:
    """Streams one rank's records to its part file; `close(footer)` makes it visible."""

    def __init__(self, out: str | Path, rank: int, world_size: int, fingerprint: str) -> None:
        self.path = part_path(out, rank, world_size)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = self.path.with_name(f"{self.path.name}.partial")
        self._file = open(self._tmp, "w")  # noqa: SIM115 - closed in close()
        header = {"rank": rank, "world_size": world_size, "fingerprint": fingerprint}
        self._file.write(json.dumps({"header": header}) + "\n")

    def write(self, records: Iterable[dict]) -> None:
        for r in records:
            self._file.write(json.dumps(r) + "\n")

    def close(self, footer: dict) -> Path:
        self._file.write(json.dumps({"footer": footer}) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self._tmp, self.path)
        return self.path


def missing_parts(out: str | Path, world_size: int) -> list[int]:
    """Ranks whose finished part file is not there yet."""
    return [r for r in range(world_size) if not part_path(out, r, world_size).is_file()]


def read_part(path: Path, fingerprint: str) -> tuple[list[dict], dict]:
    """(records, footer) of a finished part file of this run."""
    with open(path) as f:
        lines = [json.loads(line) for line in f if line.strip()]
    if not lines or "header" not in lines[0] or "footer" not in lines[-1]:
        raise ValueError(f"{path}: not a complete eval part file")
    if lines[0]["header"]["fingerprint"] != fingerprint:
        raise ValueError(
            f"{path} comes from another run (other checkpoint, data or settings); delete it or "
            "rerun that rank with the same flags"
        )
    return lines[1:-1], lines[-1]["footer"]


def merge_records(parts: Sequence[Sequence[dict]]) -> list[dict]:
    """All records once each, sorted by id; a duplicate id must carry identical values."""
    by_id: dict[int, dict] = {}
    for records in parts:
        for r in records:
            seen = by_id.setdefault(r["id"], r)
            if seen != r:
                raise ValueError(f"two parts disagree on instance {r['id']}: {seen} vs {r}")
    return [by_id[k] for k in sorted(by_id)]


def read_parts(
    out: str | Path, world_size: int, fingerprint: str, image_ids: Sequence[int]
) -> tuple[list[dict], list[dict]]:
    """(merged records, footers) of all parts; they must cover exactly `image_ids`."""
    missing = missing_parts(out, world_size)
    if missing:
        raise FileNotFoundError(
            f"part files missing for ranks {missing}: "
            + ", ".join(str(part_path(out, r, world_size)) for r in missing[:3])
        )
    parts, footers = [], []
    for rank in range(world_size):
        records, footer = read_part(part_path(out, rank, world_size), fingerprint)
        parts.append(records)
        footers.append(footer)
    covered = {i for f in footers for i in f["image_ids"]}
    if covered != set(image_ids):
        raise ValueError(
            f"the part files cover {len(covered)} images, the run has {len(set(image_ids))}: "
            "were they written with other flags or --limit-images?"
        )
    return merge_records(parts), footers
