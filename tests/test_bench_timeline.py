"""benchmarks/common.kernel_timeline: idle time and gaps from a profile's GPU intervals, overlaps counted once."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.autograd import DeviceType

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from common import device_intervals, kernel_timeline  # noqa: E402


def test_idle_gaps_are_grouped_by_neighbours_and_overlaps_count_once():
    # two steps; b overlaps a (a PDL launch), x ends inside a: the gap after them is a's, not x's
    step = [(0, 10, "a"), (1, 5, "x"), (5, 12, "b"), (15, 20, "c"), (20, 30, "a"), (33, 40, "b")]
    intervals = step + [(s + 50, e + 50, n) for s, e, n in step]
    tl = kernel_timeline(intervals[::-1], steps=2)  # any order in
    assert tl["span_us_per_step"] == pytest.approx(90 / 2)
    # per step: 12 -> 15 (b -> c), 30 -> 33 (a -> b); between the steps 40 -> 50 (b -> a)
    assert tl["idle_us_per_step"] == pytest.approx((3 + 3 + 10 + 3 + 3) / 2)
    gaps = {(g["after"], g["before"]): (g["us_per_step"], g["per_step"]) for g in tl["gaps"]}
    assert gaps == {("b", "c"): (3.0, 1.0), ("a", "b"): (3.0, 1.0), ("b", "a"): (5.0, 0.5)}
    assert tl["gaps"][0]["after"] == "b" and tl["gaps"][0]["before"] == "a"  # longest total first


def test_top_limits_the_rows_and_no_intervals_is_zero():
    intervals = [(10 * i, 10 * i + 5, f"k{i}") for i in range(20)]
    tl = kernel_timeline(intervals, steps=1, top=3)
    assert len(tl["gaps"]) == 3 and tl["idle_us_per_step"] == pytest.approx(19 * 5)
    assert kernel_timeline([], steps=4) == {"span_us_per_step": 0.0, "idle_us_per_step": 0.0, "gaps": []}


def test_device_intervals_keeps_gpu_activity_only():
    def evt(device, start, end, name):
        return SimpleNamespace(device_type=device, time_range=SimpleNamespace(start=start, end=end), name=name)

    prof = SimpleNamespace(events=lambda: [evt(DeviceType.CPU, 0, 9, "aten::mm"), evt(DeviceType.CUDA, 1, 4, "gemv"),
                                           evt(DeviceType.CUDA, 5, 5, "empty")])
    assert device_intervals(prof) == [(1, 4, "gemv")]


def test_a_cpu_profile_has_no_gpu_intervals():
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        torch.ones(8).sum()
    assert device_intervals(prof) == []
