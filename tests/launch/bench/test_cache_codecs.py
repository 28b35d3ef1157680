"""The codec benchmark's rows, the per-field ones included, on one small sample."""

import pytest

from launch.bench import cache_codecs as bench


def test_mixed_rows_take_the_embedding_and_block_sizes_of_their_codecs():
    cfg = bench.BenchConfig(samples=1, teacher="vit_b", taps=(2,))
    rows = {r["codec"]: r for r in bench.table_rows(bench.run(cfg))}
    assert list(rows) == ["fp32", "fp16", "bf16", "int8", *bench.MIXED]
    mixed, fp16, int8 = rows["embed=fp16,blocks=int8"], rows["fp16"], rows["int8"]
    assert mixed["embed MB"] == fp16["embed MB"] and mixed["block2 MB"] == int8["block2 MB"]
    assert mixed["total MB"] == pytest.approx(mixed["embed MB"] + mixed["block2 MB"])
    # errors: the embedding's as fp16's, the blocks' as int8's, every element within its bound
    assert mixed["rel RMS embed"] == fp16["rel RMS embed"]
    assert mixed["rel RMS blocks"] == int8["rel RMS blocks"]
    assert 0 < mixed["max err/bound"] <= 1
    bf16_mixed = rows["embed=bf16,blocks=int8"]
    assert bf16_mixed["rel RMS embed"] == rows["bf16"]["rel RMS embed"] > fp16["rel RMS embed"]
