"""Helpers shared by the benchmark scripts (run as ``python benchmarks/bench_*.py``)."""
from __future__ import annotations

import contextlib
import os
import platform


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo (``platform.processor()`` is often empty)."""
    model = platform.processor() or "cpu"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return model


def machine_line(device: object = None, extra: str = "") -> str:
    """One line naming the machine a figure was measured on, for the tables and RESULTS.md.

    ``device`` (a torch device or string) names the GPU when it is a CUDA device; otherwise the CPU
    and its core count are named. ``extra`` is appended (threads, backend, load...).
    """
    text = None
    if device is not None and str(device).startswith("cuda"):
        import torch

        if torch.cuda.is_available():
            text = f"{torch.cuda.get_device_name(torch.device(str(device)))} (CUDA {torch.version.cuda})"
    if text is None:
        text = f"{cpu_model()}, {os.cpu_count()} logical cores"
    return f"{text}, {extra}" if extra else text
