"""Tests for teachers/codecs.py: round trips within the documented bounds, and the bounds tight."""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
import torch

from teachers.codecs import CODECS, decode, encode, error_bound, from_npy_bytes, to_npy_bytes

# (shape, channel_axis): a final SAM embedding [256, h, w] and a ViT block output [h, w, C].
LAYOUTS = {"embedding": ((256, 6, 5), 0), "block": ((6, 5, 320), -1)}
STORED = {
    "fp16": {"q": np.float16},
    "bf16": {"q": np.uint16},
    "int8": {"q": np.int8, "scale": np.float32},
}


def _features(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Random features whose magnitudes span fp16's subnormals up to ~1e3, signs mixed."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    magnitude = torch.tensor([1e-6, 1e-3, 1.0, 1e3])  # 1e-6 is subnormal in fp16
    pick = torch.randint(len(magnitude), shape, generator=g)
    return x * magnitude[pick]


def _through_bytes(fields: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {name: from_npy_bytes(to_npy_bytes(a)) for name, a in fields.items()}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("codec", CODECS)
def test_round_trip_within_tight_bound(codec: str, layout: str) -> None:
    shape, axis = LAYOUTS[layout]
    x = _features(shape)
    y = decode(_through_bytes(encode(x, codec, axis)), codec, axis)
    bound = error_bound(x, codec, axis)
    err = (y - x).abs()
    assert bound.shape == x.shape and bound.dtype == torch.float32
    assert bool((err <= bound).all()), f"max err/bound {(err / bound).max():.4f} > 1"
    # A bound twice as loose as needed fails here: random data comes within 50% of it.
    assert (err / bound).max() > 0.5
    assert bool((bound > 0).all())


@pytest.mark.parametrize("codec", CODECS)
def test_bound_holds_on_plain_gaussian_features(codec: str) -> None:
    x = torch.randn(64, 64, 8, generator=torch.Generator().manual_seed(1))
    err = (decode(encode(x, codec, -1), codec, -1) - x).abs()
    ratio = err / error_bound(x, codec, -1)
    assert 0.5 < ratio.max() <= 1.0


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("codec", CODECS)
def test_shapes_and_dtypes(codec: str, layout: str) -> None:
    shape, axis = LAYOUTS[layout]
    x = _features(shape)
    fields = encode(x, codec, axis)
    assert {name: a.dtype for name, a in fields.items()} == {
        name: np.dtype(t) for name, t in STORED[codec].items()
    }
    assert fields["q"].shape == shape
    if codec == "int8":
        expected = list(shape)
        expected[axis] = 1
        assert list(fields["scale"].shape) == expected
    y = decode(fields, codec, axis)
    assert y.shape == x.shape and y.dtype == torch.float32 and y.device.type == "cpu"


def test_fp16_overflow_raises_with_max_value() -> None:
    x = torch.zeros(4, 3, 3)
    x[1, 2, 0] = 65504.0  # fp16 max: fits exactly
    assert decode(encode(x, "fp16", 0), "fp16", 0)[1, 2, 0] == 65504.0
    x[2, 0, 1] = -70000.0
    with pytest.raises(ValueError, match=r"max \|x\| = 70000.*65504"):
        encode(x, "fp16", 0)
    with pytest.raises(ValueError, match="65504"):
        error_bound(x, "fp16", 0)
    # The other codecs hold it.
    for codec in ("bf16", "int8"):
        err = (decode(encode(x, codec, 0), codec, 0) - x).abs()
        assert bool((err <= error_bound(x, codec, 0)).all())


@pytest.mark.parametrize("layout", LAYOUTS)
def test_int8_zero_token_decodes_to_zeros(layout: str) -> None:
    shape, axis = LAYOUTS[layout]
    x = _features(shape)
    token = (slice(None), 2, 3) if axis == 0 else (2, 3, slice(None))
    x[token] = 0.0
    fields = encode(x, "int8", axis)
    y = decode(fields, "int8", axis)
    assert not y.isnan().any()
    assert bool((y[token] == 0).all())
    assert fields["scale"][(0, 2, 3) if axis == 0 else (2, 3, 0)] == 0.0
    zeros = torch.zeros(shape)
    assert torch.equal(decode(encode(zeros, "int8", axis), "int8", axis), zeros)


def test_int8_clamps_to_127_and_keeps_token_max_exact_in_scale() -> None:
    x = torch.tensor([[3.0, -12.7, 1.0], [0.5, 0.25, -0.125]])  # tokens are rows
    fields = encode(x, "int8", -1)
    assert fields["q"].min() >= -127 and fields["q"].max() <= 127
    assert np.array_equal(np.abs(fields["q"]).max(axis=-1), [127, 127])
    np.testing.assert_allclose(fields["scale"][:, 0], [12.7 / 127, 0.5 / 127], rtol=1e-7)


def test_bf16_stores_uint16_bits_and_is_exact_on_bf16_values() -> None:
    x = torch.randn(256, 4, 4, generator=torch.Generator().manual_seed(2)) * 100
    x = x.to(torch.bfloat16).to(torch.float32)  # already representable in bf16
    fields = encode(x, "bf16", 0)
    assert fields["q"].dtype == np.uint16
    assert np.array_equal(
        fields["q"], x.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    )
    assert torch.equal(decode(_through_bytes(fields), "bf16", 0), x)


def test_fp16_bits_match_numpys_round_to_nearest_even() -> None:
    x = _features((64, 8, 8), seed=4)
    x[0, 0, :4] = torch.tensor([1 + 2**-11, 1 + 3 * 2**-11, 2**-25, 3 * 2**-25])  # ties
    assert np.array_equal(encode(x, "fp16", 0)["q"], x.numpy().astype(np.float16))


@pytest.mark.parametrize("codec", CODECS)
def test_half_precision_inputs_encode_like_their_float32_values(codec: str) -> None:
    x = torch.randn(8, 8, 16, generator=torch.Generator().manual_seed(3))
    for low in (torch.float16, torch.bfloat16):
        xl = x.to(low)
        a, b = encode(xl, codec, -1), encode(xl.to(torch.float32), codec, -1)
        assert all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("dtype", [np.float16, np.uint16, np.int8, np.float32])
def test_npy_bytes_round_trip(dtype: type) -> None:
    a = (np.arange(60).reshape(3, 4, 5) - 30).astype(dtype)
    b = to_npy_bytes(a)
    assert b.startswith(b"\x93NUMPY")
    out = from_npy_bytes(b)
    assert out.dtype == a.dtype and out.shape == a.shape and np.array_equal(out, a)
    assert np.array_equal(np.load(io.BytesIO(b)), a)  # stock numpy reads it


def test_npy_bytes_refuse_pickles() -> None:
    with pytest.raises(ValueError):
        to_npy_bytes(np.array([{"a": 1}], dtype=object))
    buffer = io.BytesIO()
    np.save(buffer, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError):
        from_npy_bytes(buffer.getvalue())


def test_decode_accepts_read_only_arrays_without_warnings() -> None:
    x = _features((6, 5, 32))
    for codec in CODECS:
        fields = encode(x, codec, -1)
        for a in fields.values():
            a.setflags(write=False)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            y = decode(fields, codec, -1)
        assert bool(((y - x).abs() <= error_bound(x, codec, -1)).all())


def test_unknown_codec_names_it_and_lists_codecs() -> None:
    x = torch.ones(2, 2)
    for call in (
        lambda: encode(x, "fp8", 0),
        lambda: decode({"q": np.ones((2, 2))}, "fp8", 0),
        lambda: error_bound(x, "fp8", 0),
    ):
        with pytest.raises(ValueError) as info:
            call()
        message = str(info.value)
        assert "'fp8'" in message and all(codec in message for codec in CODECS)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("codec", CODECS)
def test_non_finite_input_raises(codec: str, bad: float) -> None:
    x = torch.ones(4, 3, 3)
    x[0, 1, 2] = bad
    with pytest.raises(ValueError, match="1 non-finite"):
        encode(x, codec, 0)


def test_user_mistakes_raise_value_error() -> None:
    x = torch.ones(4, 3, 3)
    with pytest.raises(ValueError, match="channel_axis=3"):
        encode(x, "int8", 3)
    with pytest.raises(ValueError, match="float32"):
        encode(x.double(), "fp16", 0)
    with pytest.raises(ValueError, match="'scale'"):
        decode({"q": encode(x, "int8", 0)["q"]}, "int8", 0)
    with pytest.raises(ValueError, match="must be int8"):
        decode(encode(x, "fp16", 0), "int8", 0)
    fields = encode(x, "int8", 0)
    with pytest.raises(ValueError, match=r"expected \[1, 3, 3\]"):
        decode({"q": fields["q"], "scale": fields["scale"].reshape(3, 3, 1)}, "int8", 0)
