"""Image sources for the teacher cache: a folder, a glob, WebDataset/SA-1B tars, a COCO layout.

`list_sources(spec)` turns the `--images` SPEC into a sorted list of `SourceItem`s with stable,
unique keys; `read_item` returns an item's original image bytes (never re-encoded) and its source
annotations. The sorted order is what makes sharding deterministic across ranks and reruns.
"""

from __future__ import annotations

import glob
import itertools
import json
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path

import braceexpand

IMAGE_EXTS = ("jpg", "jpeg", "png", "bmp", "webp", "tif", "tiff")


@dataclass(frozen=True)
class SourceItem:
    """One input image.

    key: stable sample key (letters, digits, '_' and '-'; unique within a SPEC).
    path: the image file, or the tar holding it.
    ext: the image's file extension, lower case, 'jpeg' spelled 'jpg'.
    offset, size: byte range of the image inside `path` when it is a tar member.
    ann_offset, ann_size: byte range of the member's json (SA-1B annotations) inside the tar.
    ann: JSON text of the COCO image entry and its annotations, for COCO sources.
    """

    key: str
    path: str
    ext: str
    offset: int | None = None
    size: int | None = None
    ann_offset: int | None = None
    ann_size: int | None = None
    ann: str | None = None

    @property
    def origin(self) -> str:
        return self.path if self.offset is None else f"{self.path}@{self.offset}"


def sanitize_key(text: str) -> str:
    """WebDataset splits a member name at the first '.', so keys keep only safe characters."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", text)


def _ext(name: str) -> str:
    ext = name.rsplit(".", 1)[-1].lower()
    return "jpg" if ext == "jpeg" else ext


def _is_image(name: str) -> bool:
    return "." in name and name.rsplit(".", 1)[-1].lower() in IMAGE_EXTS


def _folder_items(root: Path) -> list[SourceItem]:
    files = sorted(p for p in root.rglob("*") if p.is_file() and _is_image(p.name))
    return [
        SourceItem(sanitize_key(str(p.relative_to(root).with_suffix(""))), str(p), _ext(p.name))
        for p in files
    ]


def _tar_items(path: Path) -> list[SourceItem]:
    """Group tar members by WebDataset key (name up to the first '.' of the basename)."""
    groups: dict[str, dict[str, tarfile.TarInfo]] = {}
    try:
        with tarfile.open(path, "r:") as tar:
            for m in tar:
                if not m.isfile() or "." not in Path(m.name).name:
                    continue
                base, _, suffix = Path(m.name).name.partition(".")
                groups.setdefault(str(Path(m.name).parent / base), {})[suffix.lower()] = m
    except tarfile.TarError as err:
        raise ValueError(f"cannot read tar {path}: {err}") from err
    items = []
    for name, members in sorted(groups.items()):
        image = next((members[e] for e in IMAGE_EXTS if e in members), None)
        if image is None:
            continue
        ann = members.get("json")
        items.append(
            SourceItem(
                sanitize_key(name.removeprefix("./")),
                str(path),
                _ext(image.name),
                image.offset_data,
                image.size,
                None if ann is None else ann.offset_data,
                None if ann is None else ann.size,
            )
        )
    return items


def _coco_items(ann_file: Path) -> list[SourceItem]:
    """Images of one COCO `instances_<split>.json`, found in `<root>/<split>/`."""
    match = re.fullmatch(r"instances_(.+)\.json", ann_file.name)
    if match is None or ann_file.parent.name != "annotations":
        raise ValueError(f"{ann_file}: expected <root>/annotations/instances_<split>.json")
    split, root = match.group(1), ann_file.parent.parent
    try:
        data = json.loads(ann_file.read_text())
        images, anns = data["images"], data.get("annotations", [])
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{ann_file}: not a COCO annotation file ({err})") from err
    by_image: dict[int, list[dict]] = {}
    for a in anns:
        by_image.setdefault(a["image_id"], []).append(a)
    items = []
    for img in images:
        path = root / split / img["file_name"]
        info = {
            "source": f"coco:{ann_file.name}",
            "image": img,
            "annotations": by_image.get(img["id"], []),
        }
        key = sanitize_key(f"{split}_{Path(img['file_name']).with_suffix('')}")
        items.append(SourceItem(key, str(path), _ext(path.name), ann=json.dumps(info)))
    return items


def expand_spec(spec: str) -> list[Path]:
    """Brace-expand SPEC, then glob each pattern that has wildcards (sorted)."""
    paths: list[Path] = []
    for pattern in braceexpand.braceexpand(spec):
        if any(c in pattern for c in "*?["):
            paths.extend(Path(p) for p in sorted(glob.glob(pattern, recursive=True)))
        else:
            paths.append(Path(pattern))
    return paths


def _items_for(path: Path) -> list[SourceItem]:
    if path.is_dir():
        coco = sorted((path / "annotations").glob("instances_*.json"))
        return [i for f in coco for i in _coco_items(f)] if coco else _folder_items(path)
    if not path.exists():
        raise FileNotFoundError(f"--images: {path} does not exist")
    if path.suffix == ".tar":
        return _tar_items(path)
    if path.suffix == ".json":
        return _coco_items(path)
    if _is_image(path.name):
        return [SourceItem(sanitize_key(path.stem), str(path), _ext(path.name))]
    raise ValueError(f"--images: {path} is neither a folder, a .tar, a COCO .json nor an image")


def list_sources(spec: str) -> list[SourceItem]:
    """All images named by SPEC, sorted by key. SPEC: a folder (a COCO layout when it has
    annotations/instances_*.json), a glob, brace-expanded tars ('sa_{000020..000029}.tar'), a COCO
    annotation json, or an image file."""
    items = [item for path in expand_spec(spec) for item in _items_for(path)]
    if not items:
        raise ValueError(f"--images {spec!r} matched no images")
    items.sort(key=lambda i: i.key)
    for a, b in itertools.pairwise(items):
        if a.key == b.key:
            raise ValueError(
                f"--images: two inputs map to the sample key {a.key!r}: {a.origin} and {b.origin}"
            )
    return items


def _read_range(path: str, offset: int, size: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read(size)
    if len(data) != size:
        raise ValueError(f"{path}: truncated member at byte {offset}")
    return data


def read_item(item: SourceItem) -> tuple[bytes, bytes | None]:
    """Original image bytes and the annotations as JSON bytes (None when the source has none)."""
    if item.offset is None:
        path = Path(item.path)
        if not path.is_file():
            raise FileNotFoundError(f"image file not found: {path}")
        image = path.read_bytes()
    else:
        image = _read_range(item.path, item.offset, item.size)
    if item.ann is not None:
        return image, item.ann.encode()
    if item.ann_offset is not None:
        return image, _read_range(item.path, item.ann_offset, item.ann_size)
    return image, None
