"""Process-wide settings that every vqdiff command and script applies at start (`errors.run_main`)."""

import ctypes
import ctypes.util
import os
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
MMAP_THRESHOLD = 32 << 20  # the largest glibc accepts on 64-bit systems
TRIM_THRESHOLD = 1 << 30


def keep_freed_memory() -> bool:
    """Have glibc's malloc keep freed memory for the next allocation instead of returning it to the kernel.

    PyTorch's CPU tensors come straight from malloc. By default glibc maps blocks above a threshold that moves
    with use (128 KiB at first) afresh and trims the heap whenever 2x that is free at its top, so a network's
    activations come back as fresh pages every call, each first touch a page fault: 5,000-54,000 per sampling
    step at the small config on 2 cores, and much of its run-to-run noise. Fixed thresholds (blocks up to 32 MiB
    from the heap, trimmed only above 1 GiB free) make that 0-3,500 (larger blocks are still mapped afresh).
    Returns whether it applied: glibc only, and not where the user set MALLOC_MMAP_THRESHOLD_ or
    MALLOC_TRIM_THRESHOLD_ themselves."""
    if not sys.platform.startswith("linux") or any(
            key in os.environ for key in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
