"""The bench's bookkeeping (no timing): per-step CPU times from the trainer's clock calls, and the results table's
verdicts against the goals."""
from __future__ import annotations

import pytest

from stages import bench


def _stamps_and_records(steps: int):
    """What the trainer's loop does with its clock: one call before the loop, three per step."""
    stamps, records = [(100.0, 10.0)], []
    wall, cpu = 100.0, 10.0
    for k in range(steps):
        start = (wall + 0.01, cpu + 0.01)  # before next(loader)
        got = (start[0] + 0.02, start[1] + 0.015)  # after it
        end = (got[0] + 0.5 + k, got[1] + 0.9)  # the step's end
        records.append({"step": k + 1, "step_s": end[0] - wall, "data_s": got[0] - start[0]})
        stamps += [start, got, end]
        wall, cpu = end
    return stamps, records


def test_cpu_steps_follow_the_trainers_clock():
    stamps, records = _stamps_and_records(3)
    cpu = bench._cpu_steps(stamps, records)
    assert cpu == [pytest.approx((0.925, 0.015))] * 3


def test_cpu_steps_refuse_a_clock_pattern_that_does_not_reproduce_the_metrics():
    stamps, records = _stamps_and_records(3)
    assert bench._cpu_steps(stamps[:-1], records) is None  # a call missing
    records[1]["step_s"] += 0.001  # a step timed differently
    assert bench._cpu_steps(stamps, records) is None


def test_clock_tap_returns_the_wall_clock_and_notes_cpu_time():
    tap = bench._ClockTap()
    a = tap.time()
    assert tap.perf_counter() > 0 and len(tap.stamps) == 1 and tap.stamps[0][0] == a


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
