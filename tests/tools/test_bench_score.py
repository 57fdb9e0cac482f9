"""The scorer benchmark's target lines (learned-router bench): each target met or missed, with the figure."""

from __future__ import annotations

import pandas as pd

from learned_router.tools.bench_score import APGR, SHARE, verdicts


def test_each_target_is_met_or_missed_with_its_figure():
    table = pd.DataFrame(
        {"p50 ms (~30 tok)": [1.5, 9.0], "p50 ms (~250 tok)": [18.8, 40.0]}, index=["onnx int8", "onnx fp32"]
    )
    lines = verdicts(table, {SHARE: 0.004, APGR: 0.012})
    assert lines == [
        "target: onnx int8 p50 ms (~30 tok) <= 2: met (1.5)",
        "target: onnx int8 p50 ms (~250 tok) <= 6: MISSED (18.8)",
        "target: onnx int8 p50 at ~250 tok <= 3x the p50 at ~30 tok: MISSED (12.53x)",
        "target: int8 vs fp32 |strong share shift| <= 0.01: met (0.0040)",
        "target: int8 vs fp32 largest APGR drop <= 0.005: MISSED (0.0120)",
    ]


def test_routing_targets_are_left_out_without_prompts_to_measure_them():
    table = pd.DataFrame({"p50 ms (~30 tok)": [2.5], "p50 ms (~250 tok)": [5.0]}, index=["onnx int8"])
    assert verdicts(table, {}) == [
        "target: onnx int8 p50 ms (~30 tok) <= 2: MISSED (2.5)",
        "target: onnx int8 p50 ms (~250 tok) <= 6: met (5)",
        "target: onnx int8 p50 at ~250 tok <= 3x the p50 at ~30 tok: met (2.00x)",
    ]


def test_the_top_levels_added_latency_is_a_target():
    table = pd.DataFrame(
        {"p50 ms (~30 tok)": [2.2, 2.84], "p50 ms (~250 tok)": [17.9, 18.4]},
        index=["onnx int8", "onnx int8 + top level (4,096 keys)"],
    )
    assert verdicts(table, {})[-1] == "target: the top level adds <= 1 ms p50 at ~30 tok: met (0.64)"
    table.loc["onnx int8 + top level (4,096 keys)", "p50 ms (~30 tok)"] = 3.5
    assert verdicts(table, {})[-1].endswith("MISSED (1.3)")
