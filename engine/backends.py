"""Backend discovery: use the GPU implementation of a stage when it can run, the CPU one otherwise.

Each stage has one *kind* of work and two implementations:

=========  ==================  ================
kind       GPU                 CPU
=========  ==================  ================
topk       ``triton``          ``cpu`` (Numba)
solve      ``torch-cuda``      ``scipy``
faiss      ``faiss-gpu``       ``faiss-cpu``
umap       ``cuml``            ``umap-learn``
=========  ==================  ================

``select(kind, prefer)`` with ``prefer="auto"`` picks the GPU one when its library
imports *and* a CUDA device is visible, else the CPU one, silently. ``prefer="gpu"``
(or the implementation's name) forces it and raises :class:`BackendError` naming
what is missing; ``prefer="cpu"`` always takes the CPU path. The environment
variable ``CONCEPTEVO_BACKEND_<KIND>`` (e.g. ``CONCEPTEVO_BACKEND_UMAP=cpu``) sets
the default preference. The choice is recorded in the run manifest by the caller.
"""
from __future__ import annotations

import functools
import importlib
import os

from .errors import BackendError

__all__ = ["select", "cuda_available", "resolve_device", "report", "KINDS"]

KINDS: dict[str, tuple[str, str]] = {
    "topk": ("triton", "cpu"),
    "solve": ("torch-cuda", "scipy"),
    "faiss": ("faiss-gpu", "faiss-cpu"),
    "umap": ("cuml", "umap-learn"),
}


@functools.lru_cache(maxsize=None)
def cuda_available() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:  # torch missing or broken driver: treat as no GPU
        return False


@functools.lru_cache(maxsize=None)
def _gpu_library_problem(kind: str) -> str | None:
    """None when the GPU implementation of ``kind`` can run here, else why not."""
    if not cuda_available():
        return "no CUDA device is visible"
    try:
        if kind == "topk":
            importlib.import_module("triton")
        elif kind == "faiss":
            faiss = importlib.import_module("faiss")
            if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() < 1:
                return "the installed faiss has no GPU support (install faiss-gpu)"
        elif kind == "umap":
            importlib.import_module("cuml")
        elif kind == "solve":
            pass  # torch with CUDA is enough
    except ImportError as exc:
        return f"{exc.name or exc} is not installed"
    return None


def select(kind: str, prefer: str | None = "auto") -> str:
    """Name of the implementation to use for ``kind`` (see the module docstring)."""
    if kind not in KINDS:
        raise BackendError(f"unknown backend kind {kind!r}; known: {sorted(KINDS)}")
    gpu, cpu = KINDS[kind]
    prefer = (prefer or os.environ.get(f"CONCEPTEVO_BACKEND_{kind.upper()}", "auto")).lower()
    if prefer in ("auto",):
        return gpu if _gpu_library_problem(kind) is None else cpu
    if prefer in ("cpu", cpu):
        return cpu
    if prefer in ("gpu", "cuda", gpu):
        problem = _gpu_library_problem(kind)
        if problem is not None:
            raise BackendError(f"backend {gpu!r} for {kind} was forced but cannot run: {problem}")
        return gpu
    raise BackendError(f"unknown backend {prefer!r} for {kind}; use auto, cpu, gpu, {gpu} or {cpu}")


def report() -> dict[str, str]:
    """What ``auto`` would choose for every kind, for the manifest and ``conceptevo info``."""
    return {kind: select(kind, "auto") for kind in KINDS}


def resolve_device(name: str):
    """``"auto"`` -> CUDA when a device is visible, else the CPU; any other name -> ``torch.device(name)``."""
    import torch

    if name == "auto":
        return torch.device("cuda" if cuda_available() else "cpu")
    return torch.device(name)
