import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from teachers.sources import list_sources, read_item


def _jpeg(h: int, w: int, seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
        buf, "JPEG"
    )
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _sa1b_tar(path, ids, seed=0):
    """An SA-1B-style tar: sa_<id>.jpg plus sa_<id>.json per sample."""
    payloads = {}
    with tarfile.open(path, "w") as tar:
        for i in ids:
            jpg = _jpeg(30 + i, 40, seed + i)
            ann = json.dumps(
                {"image": {"image_id": i, "file_name": f"sa_{i}.jpg"}, "annotations": []}
            ).encode()
            _add(tar, f"sa_{i}.jpg", jpg)
            _add(tar, f"sa_{i}.json", ann)
            payloads[f"sa_{i}"] = (jpg, ann)
    return payloads


def test_sa1b_tars_with_brace_pattern(tmp_path):
    expected = _sa1b_tar(tmp_path / "sa_000020.tar", [3, 1]) | _sa1b_tar(
        tmp_path / "sa_000021.tar", [7]
    )
    items = list_sources(str(tmp_path / "sa_{000020..000021}.tar"))
    assert [i.key for i in items] == ["sa_1", "sa_3", "sa_7"]  # sorted by key
    for item in items:
        image, ann = read_item(item)
        assert (image, ann) == expected[item.key]  # original bytes, verbatim json
        assert item.ext == "jpg"


def test_folder_and_glob(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "x.jpg").write_bytes(_jpeg(10, 10, 0))
    (tmp_path / "a" / "b" / "y.v2.PNG").write_bytes(b"png")
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    items = list_sources(str(tmp_path / "a"))
    assert [(i.key, i.ext) for i in items] == [("b_y_v2", "png"), ("x", "jpg")]
    assert read_item(items[1]) == ((tmp_path / "a" / "x.jpg").read_bytes(), None)
    assert [i.key for i in list_sources(str(tmp_path / "a" / "*.jpg"))] == ["x"]


def test_bad_specs_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere does not exist"):
        list_sources(str(tmp_path / "nothere"))
    with pytest.raises(ValueError, match="matched no images"):
        list_sources(str(tmp_path / "*.jpg"))
    (tmp_path / "k").mkdir()
    (tmp_path / "k" / "a.jpg").write_bytes(b"1")
    (tmp_path / "k" / "a.png").write_bytes(b"2")
    with pytest.raises(ValueError, match="two inputs map to the sample key 'a'"):
        list_sources(str(tmp_path / "k"))
    (tmp_path / "broken.tar").write_bytes(b"\x01" * 700)
    with pytest.raises(ValueError, match="cannot read tar .*broken.tar"):
        list_sources(str(tmp_path / "broken.tar"))
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "instances_x.json").write_text("{}")
    with pytest.raises(ValueError, match="instances_x.json: not a COCO annotation file"):
        list_sources(str(tmp_path))
