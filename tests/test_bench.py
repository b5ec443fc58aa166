"""The bench's bookkeeping (no timing): per-step CPU times from the trainer's metrics, and the results table's
verdicts against the goals."""
from __future__ import annotations

from stages import bench


def test_cpu_steps_are_read_from_the_trainers_metrics():
    records = [{"step": k + 1, "step_s": 0.5 + k, "data_s": 0.02, "step_cpu_s": 0.9, "data_cpu_s": 0.015}
               for k in range(3)]
    assert bench._cpu_steps(records) == [(0.9, 0.015)] * 3


def test_cpu_steps_are_none_when_the_metrics_carry_no_cpu_times():
    records = [{"step": 1, "step_s": 0.5, "data_s": 0.02, "step_cpu_s": 0.9, "data_cpu_s": 0.015},
               {"step": 2, "step_s": 0.5, "data_s": 0.02}]
    assert bench._cpu_steps(records) is None
    assert bench._cpu_steps([]) is None


def test_table_says_pass_or_miss_beside_each_goal():
    rows = [{"name": "share", "share": 0.02, "cpu_share": 0.01, "goal": bench.DATA_SHARE_GOAL},
            {"name": "overhead", "ours": 1.2, "plain": 1.0, "cpu_ours": 1.05, "cpu_plain": 1.0,
             "goal": bench.OVERHEAD_GOAL, "ours_label": "a", "plain_label": "b"},
            {"name": "reference", "ours": 0.9, "plain": 1.0, "goal": bench.REFERENCE_GOAL, "ours_label": "a",
             "plain_label": "b"},
            {"name": "throughput", "ours": 30.0, "plain": 20.0, "ours_label": "a", "plain_label": "b"}]
    lines = bench.table(rows).splitlines()[2:]
    assert lines[0].endswith("| <= 5 % | PASS |")
    assert "1.20x (+20 %)" in lines[1] and "1.05x (+5 %)" in lines[1]
    assert lines[1].endswith("| **MISS** (in CPU time: PASS) |")
    assert lines[2].endswith("| <= 0.80x | **MISS** |")
    assert "1.50x" in lines[3] and lines[3].endswith("| | |")
    assert [r.get("pass") for r in rows] == [True, False, False, None]
