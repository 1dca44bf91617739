"""The tuned-table loader: one JSON format per device and kernel family, a warning once for a GPU
with no table of its own, none without a GPU."""

import warnings

import pytest

from jaxquant.core import tuned
from jaxquant.pallas.int8_matmul import triton as mm_k
from jaxquant.pallas.weight_only import triton as wo_k


@pytest.mark.parametrize("family", ["weight_only", "int8_matmul"])
def test_tables_load_and_describe_themselves(family):
    data = tuned.table(family, "NVIDIA H200")
    assert data["device"] == "NVIDIA H200" and data["about"] and data["table"]
    assert all("m_max" in row and "config" in row for row in data["table"])
    assert tuned.table(family, None) is data  # no GPU: the default device's, silently


def test_unknown_device_warns_once_and_uses_the_default():
    tuned.table.cache_clear()
    with pytest.warns(UserWarning, match="no tuned weight_only table for 'NVIDIA B200'"):
        data = tuned.table("weight_only", "NVIDIA B200")
    assert data is tuned.table("weight_only", None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tuned.table("weight_only", "NVIDIA B200")  # cached: no second warning


def test_heuristics_read_the_tables():
    cfg = mm_k.heuristics(8192, 8192, 8192, device_kind="NVIDIA H200")
    row = tuned.table("int8_matmul", "NVIDIA H200")["table"][-1]["config"]
    assert (cfg.block_m, cfg.block_n, cfg.block_k, cfg.num_stages) == (row["block_m"], row["block_n"],
                                                                       row["block_k"], row["num_stages"])
    assert mm_k.fused_quantize_max_m("NVIDIA H200") == tuned.table("int8_matmul", "NVIDIA H200")["fused_quantize_max_m"]
    cfg = wo_k.heuristics(1, 8192, 8192, 4, 128, device_kind="NVIDIA H200")
    row = next(r for r in tuned.table("weight_only", "NVIDIA H200")["table"] if 1 <= r["m_max"] and r["bits"] in (0, 4))
    assert (cfg.block_m, cfg.block_n, cfg.num_warps) == (16, row["config"]["block_n"], row["config"]["num_warps"])
