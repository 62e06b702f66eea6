"""The benchmark scripts' shared helpers measure what they say."""

import time

import torch

from vqdiff.eval.bench import peak_memory_bytes, reset_peak_memory, seconds_per_call


def test_seconds_per_call_times_the_repeats_after_the_warm_up():
    calls = []

    def fn():
        calls.append(time.perf_counter())
        time.sleep(0.02 if len(calls) > 2 else 0.2)  # slow warm-up calls must not count

    seconds = seconds_per_call(fn, repeats=3, warmup=2)
    assert len(calls) == 5
    assert 0.02 <= seconds < 0.1


def test_peak_memory_sees_a_large_allocation_on_the_cpu():
    reset_peak_memory("cpu")
    before = peak_memory_bytes("cpu")
    block = torch.ones(64 * 2**20 + before // 4, dtype=torch.float32)  # more than the peak so far
    assert peak_memory_bytes("cpu") >= before + 2**28
    del block
