"""The cache IO benchmark (`launch/bench/cache_io.py`) with one sample a setting: the bytes it
reports are the shapes' and the written shards', and the storage table is their arithmetic."""

import pytest

from launch.bench.cache_io import CacheIOConfig, measure


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    work = tmp_path_factory.mktemp("cache_io")
    return measure(CacheIOConfig(samples=1, repeats=1, work=str(work)))


def test_bytes_per_vit_h_sample_by_setting(result):
    rows = {r["setting"]: r for r in result["rows"]}
    assert rows["fp16, none"]["sample_bytes"] == 44_040_192
    assert rows["embed=fp16,blocks=int8, none"]["sample_bytes"] == 23_134_208
    mixed = rows["embed=fp16,blocks=int8, tokens=256"]
    assert mixed["embed_bytes"] == 2_097_152 and mixed["taps_bytes"] == 1_315_840
    # the two settings under 2.5 MB with taps: everything int8 (the embedding too, one scale a
    # token), or the fp16 embedding with the taps at 64 tokens
    everything = rows["int8, tokens=256"]
    assert everything["embed_bytes"] == 256 * 64 * 64 + 4 * 64 * 64 == 1_064_960
    assert everything["sample_bytes"] == 1_064_960 + 1_315_840 == 2_380_800
    assert rows["embed=fp16,blocks=int8, tokens=64"]["sample_bytes"] == 2_426_112
    assert rows["fp16, final embedding only"]["sample_bytes"] == 2_097_152
    # the shard holds the arrays plus .npy and tar headers, the json and the image: a little more
    for r in result["rows"]:
        assert r["sample_bytes"] < r["shard_mb_per_sample"] * 1e6 < r["sample_bytes"] + 2e6


def test_storage_feed_is_bandwidth_over_bytes_and_the_compute_bound_is_the_flops(result):
    for r in result["rows"]:
        for gbps, rate in r["per_gpu_at_gbps"].items():
            assert rate == pytest.approx(int(gbps) * 1e9 / 8 / r["sample_bytes"])
        assert r["features_per_s"] > 0 and r["warm_features_per_s"] > 0
    # 990 TFLOPs x 10% / 95 GFLOPs a training image
    assert result["compute_bound_per_gpu"]["10%"] == pytest.approx(1042.1, abs=0.1)
    tables = result["tables"]
    assert len(tables["storage"]["rows"]) == len(result["rows"])
    assert tables["storage"]["rows"][2][:3] == ["`int8`", "`tokens=256`", "2.38"]
