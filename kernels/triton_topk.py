"""Triton implementation for CUDA: a fused, stride-aware spatial max/argmax kernel.

The kernel reads every activation exactly once, in its own dtype (fp32, fp16, bf16, fp64 are
widened to float32 in registers, matching the reference's ``.float()``), through its strides, so
contiguous NCHW and channels-last batches both need no copy, and it writes only the B x C maxima,
their positions and a NaN flag -- no B x C x H x W temporary. Each program owns one image, a block
of channels and one segment of the H*W positions; positions are visited in increasing order and a
running maximum is replaced only by a strictly larger tile maximum, so the first row-major maximum
wins. Large maps with few (image, channel-block) programs are split into segments so the GPU stays
busy; the per-segment results are combined with a few torch ops (earliest segment among equals).

The B x C maxima are then merged into the (C, k) state and the responsive rows with the reference
torch code on the GPU (two stable sorts per row: exact tie-breaking; the arrays are tiny).

With ``TRITON_INTERPRET=1`` the same kernel runs in Triton's interpreter on CPU tensors (slow;
tests only). Triton decorates its own library once, when it is first imported, so the variable must
be in the environment before that import; our kernel is decorated lazily on first use (once per
setting), and a late setting is reported as a :class:`BackendError` rather than a cryptic failure.
"""
from __future__ import annotations

import functools
import os
from typing import Any

import torch

from conceptevo.errors import ActivationError, BackendError, InputError

__all__ = ["available", "interpret_mode", "spatial_max", "launch_config"]

_KERNELS: dict[bool, Any] = {}
_TILE = 4096          # elements per program per loop step (registers: 16 per thread with 8 warps)
_MIN_PROGRAMS = 512   # below this many (image, channel-block) programs, split H*W into segments


def available() -> str | None:
    """None when triton imports, else the reason it does not."""
    try:
        import triton  # noqa: F401
    except ImportError as exc:  # pragma: no cover - triton is a test dependency here
        return f"triton is not installed ({exc})"
    return None


def interpret_mode() -> bool:
    """True when ``TRITON_INTERPRET=1``: kernels then run in the interpreter on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def _build() -> Any:
    import triton
    import triton.language as tl

    @triton.jit
    def spatial_max_kernel(
        x_ptr, val_ptr, pos_ptr, nan_ptr,
        B, C, HW, W, seg_len,
        sb, sc, sh, sw,
        FLAT: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
    ):
        b = tl.program_id(0)
        cblk = tl.program_id(1)
        seg = tl.program_id(2)
        ch = cblk * BLOCK_C + tl.arange(0, BLOCK_C)
        cmask = ch < C
        # int64 offsets: a batch may hold more than 2**31 elements
        base = x_ptr + b.to(tl.int64) * sb + ch.to(tl.int64)[:, None] * sc
        start = seg * seg_len
        end = tl.minimum(start + seg_len, HW)
        best = tl.full([BLOCK_C], float("-inf"), tl.float32)
        best_pos = tl.zeros([BLOCK_C], tl.int32) + start  # an all -inf segment: its first position
        nan = tl.zeros([BLOCK_C], tl.int32)
        for off in range(start, end, BLOCK_HW):
            hw = off + tl.arange(0, BLOCK_HW)
            hmask = hw < end
            if FLAT:  # H and W collapse into one stride (NCHW and NHWC both do)
                ptrs = base + hw.to(tl.int64)[None, :] * sw
            else:
                ptrs = base + (hw // W).to(tl.int64)[None, :] * sh + (hw % W).to(tl.int64)[None, :] * sw
            m = cmask[:, None] & hmask[None, :]
            x = tl.load(ptrs, mask=m, other=float("-inf")).to(tl.float32)
            nan = tl.maximum(nan, tl.max((x != x).to(tl.int32), axis=1))
            tmax = tl.max(x, axis=1)
            # first position of the tile maximum (masked lanes, all at the tail, never come first)
            tpos = tl.min(tl.where(x == tmax[:, None], hw[None, :], 2147483647), axis=1)
            better = tmax > best
            best = tl.where(better, tmax, best)
            best_pos = tl.where(better, tpos, best_pos)
        best = tl.where(best == 0.0, 0.0, best)  # -0.0 -> +0.0
        out = (seg * B + b) * C + ch
        tl.store(val_ptr + out, best, mask=cmask)
        tl.store(pos_ptr + out, best_pos, mask=cmask)
        tl.store(nan_ptr + out, nan.to(tl.int8), mask=cmask)

    return spatial_max_kernel


def _kernel() -> Any:
    mode = interpret_mode()
    if mode:
        import triton.language as tl
        from triton.runtime.interpreter import InterpretedFunction

        # triton decorates its own library (tl.zeros, tl.max, ...) once, when it is first imported
        if not isinstance(tl.standard.zeros, InterpretedFunction):
            raise BackendError(
                "TRITON_INTERPRET=1 was set after triton was imported; set it in the environment "
                "before the first `import triton` (e.g. when starting the process)"
            )
    if mode not in _KERNELS:
        _KERNELS[mode] = _build()  # triton.jit reads TRITON_INTERPRET when it decorates
    return _KERNELS[mode]


@functools.lru_cache(maxsize=None)
def _sm_count(index: int | None) -> int:
    return torch.cuda.get_device_properties(index if index is not None else torch.cuda.current_device()).multi_processor_count


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def launch_config(shape: tuple[int, int, int, int], strides: tuple[int, int, int, int],
                  segments: int | None = None, sm_count: int = 132, tile_hw: int | None = None) -> dict[str, int]:
    """Block sizes, grid and segment length for a (B, C, H, W) batch with the given element strides.

    ``segments`` and ``tile_hw`` (positions per tile, a power of two) override the automatic choice (tests, tuning).
    """
    b, c, h, w = shape
    _, sc, sh, sw = strides
    hw = h * w
    # H and W collapse into one stride for NCHW, NHWC and every degenerate (H or W == 1) map.
    if h == 1:
        flat_stride = sw
    elif w == 1:
        flat_stride = sh
    elif sh == w * sw:
        flat_stride = sw
    else:
        flat_stride = None
    if hw == 1:
        channels_fast = True
    elif flat_stride is not None:
        channels_fast = sc == 1 and flat_stride != 1
    else:
        channels_fast = sc == 1
    if channels_fast:  # channels-last or (B, C): contiguous along channels, go wide there
        block_c = min(_pow2_at_least(c), 128)
        block_hw = max(1, min(_pow2_at_least(hw), _TILE // block_c))
    else:  # maps contiguous: go long along H*W
        block_hw = min(_pow2_at_least(hw), 1024)
        block_c = max(1, min(_pow2_at_least(c), _TILE // block_hw))
    if tile_hw is not None:
        if tile_hw < 1 or tile_hw & (tile_hw - 1):
            raise InputError(f"tile_hw must be a power of two, got {tile_hw}")
        block_hw = tile_hw
    n_cblk = -(-c // block_c)
    if segments is None:
        programs = b * n_cblk
        segments = 1
        if programs < _MIN_PROGRAMS:
            segments = min(-(-hw // block_hw), -(-4 * sm_count // max(programs, 1)))
    segments = max(1, int(segments))
    seg_len = -(-hw // segments)
    seg_len = -(-seg_len // block_hw) * block_hw  # whole tiles per segment
    segments = -(-hw // seg_len)
    return {"FLAT": int(flat_stride is not None), "flat_stride": flat_stride if flat_stride is not None else 0,
            "BLOCK_C": block_c, "BLOCK_HW": block_hw, "grid_c": n_cblk, "segments": segments,
            "seg_len": seg_len}


def spatial_max(activations: torch.Tensor, segments: int | None = None,
                tile_hw: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Spatial maxima float32 (B, C), flat first-max positions int32 (B, C) and a NaN flag (0-dim bool).

    The NaN flag stays on the device so the caller can combine it with its other checks in a
    single host synchronisation.

    Args:
        activations: (B, C, H, W) or (B, C) floating tensor on CUDA (or on the CPU in interpret mode).
        segments: force the number of H*W segments (tests); default: automatic.
        tile_hw: force the positions per tile, a power of two (tests); default: automatic.
    """
    problem = available()
    if problem is not None:
        raise BackendError(f"the Triton top-k backend cannot run: {problem}")
    x = activations.detach()
    if x.device.type != "cuda" and not interpret_mode():
        raise BackendError(
            f"the Triton top-k backend needs CUDA tensors (got {x.device}); "
            "set TRITON_INTERPRET=1 to run it in Triton's interpreter on CPU tensors"
        )
    if x.ndim == 2:
        x = x[:, :, None, None]
    b, c, h, w = x.shape
    if h * w == 0:
        raise ActivationError(f"activation maps are empty (shape {tuple(activations.shape)})")
    sm_count = _sm_count(x.device.index) if x.device.type == "cuda" else 132
    cfg = launch_config((b, c, h, w), tuple(x.stride()), segments, sm_count, tile_hw)
    s = cfg["segments"]
    vals = torch.empty((s, b, c), dtype=torch.float32, device=x.device)
    pos = torch.empty((s, b, c), dtype=torch.int32, device=x.device)
    nan = torch.empty((s, b, c), dtype=torch.int8, device=x.device)
    sb, sc, sh, sw = x.stride()
    if cfg["FLAT"]:
        sw = cfg["flat_stride"]
    grid = (b, cfg["grid_c"], s)
    _kernel()[grid](
        x, vals, pos, nan, b, c, h * w, w, cfg["seg_len"], sb, sc, sh, sw,
        FLAT=bool(cfg["FLAT"]), BLOCK_C=cfg["BLOCK_C"], BLOCK_HW=cfg["BLOCK_HW"],
        num_warps=8 if cfg["BLOCK_C"] * cfg["BLOCK_HW"] >= 2048 else 4,
    )
    has_nan = nan.any()
    if s == 1:
        return vals[0], pos[0], has_nan
    # Earliest segment holding the overall maximum (values are canonical: equal means bitwise equal).
    best = vals.amax(dim=0)
    seg_idx = torch.arange(s, device=x.device).view(s, 1, 1)
    first = torch.where(vals == best.unsqueeze(0), seg_idx, s).amin(dim=0)
    return best, torch.gather(pos, 0, first.unsqueeze(0)).squeeze(0), has_nan
