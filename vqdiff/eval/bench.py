"""Timing and memory helpers shared by the benchmark scripts (scripts/bench_*.py)."""

import resource
import time
from collections.abc import Callable

import torch
from torch import nn


def synchronize(device) -> None:
    """Wait for the device's queued work (a no-op on a CPU), so that a clock reading covers it."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def seconds_per_call(fn: Callable, repeats: int, device="cpu", warmup: int = 1) -> float:
    """Mean wall-clock seconds of `repeats` calls of fn after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / repeats


def reset_peak_memory(device) -> None:
    """Start a new CUDA peak; a CPU's peak is the process's, which cannot be reset."""
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_bytes(device) -> int:
    """CUDA's max allocated since the last reset on a GPU, the process's peak resident set on a CPU."""
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def prepared(network: nn.Module, dtype: str, compile_mode: str | None) -> nn.Module:
    """The network as timed: its weights cast for `bf16-weights`, its forward compiled with `compile_mode`."""
    if dtype == "bf16-weights":
        network = network.to(torch.bfloat16)
    if compile_mode:  # one graph per batch size (the guided call is 2B)
        torch._dynamo.config.automatic_dynamic_shapes = False
        network.forward = torch.compile(network.forward, mode=compile_mode)
    return network


def autocast(device: torch.device, dtype: str):
    """bfloat16 autocast for `bfloat16` (float32 weights, as PERFORMANCE.md's anchors), else a no-op context."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bfloat16")
