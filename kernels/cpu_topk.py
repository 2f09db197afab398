"""CPU implementation with Numba: spatial max/argmax and streaming top-k merge.

The activation is read once, through NumPy views of the torch tensor (no copy):

* contiguous NCHW: one task per (image, channel) map. Long maps (>= 512 values): one vectorised
  pass keeping 64 independent running maxima with their first positions; short maps: a
  vectorised max/min pass, then a scan (from cache) for the first position holding the maximum;
* channels-last (NHWC) and (B, C) Linear outputs: one task per image (or per block of channels
  when the batch is smaller than the thread count), scanning positions in order and updating a
  running maximum per channel; the inner loop runs along contiguous channels and vectorises;
* any other layout is made contiguous first (one copy; hooks normally give one of the two above).

Batches of at least ``PARALLEL_MIN_ELEMENTS`` values are spread over Numba's threads (``prange``);
smaller ones run on the calling thread, because waking a thread pool costs more than the work
(and, on a machine whose cores are busy, a parallel region can wait milliseconds for a thread).

Values are compared through order-preserving integer keys of their bit patterns
(``key = bits ^ ((bits >> 31) & 0x7FF..F)``, with ``-0`` and ``+0`` sharing key 0), which lets the
compiler vectorise the reductions and read fp16 / bf16 natively as 16-bit patterns: half-precision
batches need no float32 copy; only the B x C maxima are converted back. NaN is recognised from the
extreme keys (above the key of +inf or below that of -inf). float64 and other float types are
converted to float32 first, which is the definition of a value (see ``reference``).

The merge into the (C, k) state and the per-image responsive rows are small single-threaded Numba
loops (insertion into sorted arrays) that write straight into the state's tensors through NumPy views.

Compilation is lazy (first call per dtype) and cached on disk (``cache=True``), so only the first
process that uses a given dtype pays the JIT time (seconds; loading from the cache takes ~0.5 s).
"""
from __future__ import annotations

import math

import numba
import numpy as np
import torch
from numba import njit, prange

from conceptevo.errors import ActivationError

from .state import TopKState

__all__ = ["spatial_max", "merge_candidates", "responsive", "warmup"]

# dtype -> (integer view, mask of the magnitude bits, bit pattern of +inf)
_FORMATS: dict[torch.dtype, tuple[torch.dtype, int, int]] = {
    torch.float32: (torch.int32, 0x7FFFFFFF, 0x7F800000),
    torch.float16: (torch.int16, 0x7FFF, 0x7C00),
    torch.bfloat16: (torch.int16, 0x7FFF, 0x7F80),
}
_I32_MIN = np.int32(-(2**31))
_I32_MAX = np.int32(2**31 - 1)
# Below this many activation values a batch is reduced on the calling thread only.
PARALLEL_MIN_ELEMENTS = 1 << 20


@njit(inline="always")
def _key(v, magmask):  # pragma: no cover - compiled
    """Order-preserving int32 key of a float's bit pattern (sign-extended to int32); -0 -> key of +0."""
    b = np.int32(v)
    k = np.int32(b ^ np.int32(np.int32(b >> np.int32(31)) & magmask))
    return np.int32(0) if k == np.int32(-1) else k


_LANES = 64          # independent running maxima per long map (vector lanes, unrolled)
_LANES_MIN_LEN = 512  # maps at least this long use the lane-wise scan


@njit(inline="always")
def _max_row(x, r, magmask, out_key, out_pos, out_lo):  # pragma: no cover - compiled
    """Row r of x (one map): max key, its first position, min key."""
    xr = x[r]
    length = xr.shape[0]
    if length >= _LANES_MIN_LEN:
        # Lane j sees positions j, j + LANES, ... in order and keeps its first maximum (strict >),
        # so the map's first maximum is the smallest position among the lanes holding the maximum.
        # One vectorised pass; the short tail after the last full group is scanned after it.
        best = np.full(_LANES, _I32_MIN, np.int32)
        grp = np.zeros(_LANES, np.int32)
        low = np.full(_LANES, _I32_MAX, np.int32)
        full = length // _LANES
        for g in range(full):
            base = g * _LANES
            gg = np.int32(g)
            for j in range(_LANES):
                k = _key(xr[base + j], magmask)
                bj = best[j]
                gt = k > bj
                best[j] = k if gt else bj
                grp[j] = gg if gt else grp[j]
                low[j] = min(low[j], k)
        hi = _I32_MIN
        pos = 0
        lo = _I32_MAX
        for j in range(_LANES):
            lo = min(lo, low[j])
            q = grp[j] * _LANES + j
            if best[j] > hi or (best[j] == hi and q < pos):
                hi = best[j]
                pos = q
        for i in range(full * _LANES, length):
            k = _key(xr[i], magmask)
            lo = min(lo, k)
            if k > hi:
                hi = k
                pos = i
    else:
        # Short maps: a vectorised max/min reduction, then the first position holding the maximum
        # (the row is in cache by then).
        hi = _I32_MIN
        lo = _I32_MAX
        for i in range(length):
            k = _key(xr[i], magmask)
            hi = max(hi, k)
            lo = min(lo, k)
        pos = 0
        for i in range(length):
            if _key(xr[i], magmask) == hi:
                pos = i
                break
    out_key[r] = hi
    out_pos[r] = pos
    out_lo[r] = lo


@njit(parallel=True, cache=True)
def _max_rows_par(x, magmask, out_key, out_pos, out_lo):  # pragma: no cover - compiled
    """x: (R, L) C-contiguous integer view, one map per row (NCHW); rows spread over threads."""
    for r in prange(x.shape[0]):
        _max_row(x, r, magmask, out_key, out_pos, out_lo)


@njit(cache=True)
def _max_rows_seq(x, magmask, out_key, out_pos, out_lo):  # pragma: no cover - compiled
    for r in range(x.shape[0]):
        _max_row(x, r, magmask, out_key, out_pos, out_lo)


@njit(inline="always")
def _max_nhwc_item(x, item, nchunks, chunk, magmask, out_key, out_pos, out_lo):  # pragma: no cover
    """Image item // nchunks, channel block item % nchunks of x (B, L, C): per channel max key,
    first position, min key."""
    nc = x.shape[2]
    b = item // nchunks
    c0 = (item % nchunks) * chunk
    c1 = min(c0 + chunk, nc)
    width = c1 - c0
    best = np.full(width, _I32_MIN, np.int32)
    pos = np.zeros(width, np.int32)
    lo = np.full(width, _I32_MAX, np.int32)
    for i in range(x.shape[1]):
        row = x[b, i, c0:c1]
        ii = np.int32(i)
        for j in range(width):  # vectorised along channels; strict > keeps the first maximum
            k = _key(row[j], magmask)
            bj = best[j]
            gt = k > bj
            best[j] = k if gt else bj
            pos[j] = ii if gt else pos[j]
            lo[j] = min(lo[j], k)
    for j in range(width):
        out_key[b, c0 + j] = best[j]
        out_pos[b, c0 + j] = pos[j]
        out_lo[b, c0 + j] = lo[j]


@njit(parallel=True, cache=True)
def _max_nhwc_par(x, magmask, chunk, out_key, out_pos, out_lo):  # pragma: no cover - compiled
    """x: (B, L, C) C-contiguous integer view (channels-last); (image, channel block) over threads."""
    nchunks = (x.shape[2] + chunk - 1) // chunk
    for item in prange(x.shape[0] * nchunks):
        _max_nhwc_item(x, item, nchunks, chunk, magmask, out_key, out_pos, out_lo)


@njit(cache=True)
def _max_nhwc_seq(x, magmask, chunk, out_key, out_pos, out_lo):  # pragma: no cover - compiled
    nchunks = (x.shape[2] + chunk - 1) // chunk
    for item in range(x.shape[0] * nchunks):
        _max_nhwc_item(x, item, nchunks, chunk, magmask, out_key, out_pos, out_lo)


def _threads(elements: int) -> int:
    """Threads worth waking for a reduction over ``elements`` values: small batches stay on one
    thread (a parallel region costs tens of microseconds, far more on a busy machine)."""
    return numba.get_num_threads() if elements >= PARALLEL_MIN_ELEMENTS else 1


def _nhwc_chunk(batch: int, channels: int, threads: int) -> int:
    """Channels per task: whole images when the batch feeds every thread, else blocks of 64+."""
    if threads <= 1 or batch >= 2 * threads:
        return max(channels, 1)
    pieces = math.ceil(2 * threads / max(batch, 1))
    return max(64, 64 * math.ceil(math.ceil(channels / pieces) / 64))


def _keys_to_float32(keys: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """Invert the key (no NaN left at this point) and widen to float32."""
    int_dtype, magmask, _ = _FORMATS[dtype]
    bits = np.where(keys < 0, keys ^ np.int32(magmask), keys)
    if int_dtype == torch.int16:
        return torch.from_numpy(bits.astype(np.int16)).view(dtype).float()
    return torch.from_numpy(bits.astype(np.int32)).view(torch.float32)


def spatial_max(activations: torch.Tensor) -> tuple[torch.Tensor, np.ndarray]:
    """Spatial maxima float32 (B, C) and flat first-max positions int32 (B, C) of a CPU batch.

    Raises:
        ActivationError: NaN in the batch.
    """
    x = activations.detach()
    if x.ndim == 2:
        x = x[:, :, None, None]
    b, c, h, w = x.shape
    length = h * w
    if length == 0:
        raise ActivationError(f"activation maps are empty (shape {tuple(activations.shape)})")
    if x.dtype not in _FORMATS:
        x = x.float()  # float64 etc.: the value is defined in float32; .float() keeps the memory format
    int_dtype, magmask, inf_bits = _FORMATS[x.dtype]
    magmask = np.int32(magmask)
    out_key = np.empty((b, c), dtype=np.int32)
    out_pos = np.empty((b, c), dtype=np.int32)
    out_lo = np.empty((b, c), dtype=np.int32)
    if length == 1:
        # (B, C) data: channels-last kernel with one position; a view for regular strides
        view = x.reshape(b, 1, c).view(int_dtype).numpy()
        nhwc = True
    elif not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        view = x.permute(0, 2, 3, 1).view(int_dtype).numpy().reshape(b, length, c)  # no copy
        nhwc = True
    else:
        view = x.contiguous().view(int_dtype).numpy().reshape(b * c, length)  # no copy for NCHW
        nhwc = False
    threads = _threads(b * c * length)
    if nhwc:
        kernel = _max_nhwc_par if threads > 1 else _max_nhwc_seq
        kernel(np.ascontiguousarray(view), magmask, _nhwc_chunk(b, c, threads), out_key, out_pos, out_lo)
    else:
        kernel = _max_rows_par if threads > 1 else _max_rows_seq
        kernel(view, magmask, out_key.reshape(-1), out_pos.reshape(-1), out_lo.reshape(-1))
    # NaN patterns have keys above +inf's or below -inf's
    if int(out_key.max()) > inf_bits or int(out_lo.min()) < -inf_bits - 1:
        raise ActivationError("NaN activations in the batch: the top-k stimuli cannot be ranked")
    return _keys_to_float32(out_key, x.dtype), out_pos


# -- merge into the running state ---------------------------------------------------------------

@njit(inline="always")
def _better(v, i, v2, i2):  # pragma: no cover - compiled
    """(v, i) ranks before (v2, i2): value desc, image id asc; an empty slot (i2 < 0) ranks last."""
    if i2 < 0:
        return True
    return v > v2 or (v == v2 and i < i2)


# The merge and responsive loops touch only B x C numbers (plus k per channel): a single thread
# does them in microseconds, less than waking a thread pool would cost.
@njit(cache=True)
def _merge_kernel(cand_val, cand_pos, width, ids, sv, sid, srow, scol):  # pragma: no cover - compiled
    nb, nc = cand_val.shape
    k = sv.shape[1]
    # Pass 1 (vectorised along channels): the batch's best value per channel. In steady state most
    # channels' k-th value beats all of it, and those channels are skipped without a scan.
    top = np.full(nc, -np.inf, np.float32)
    for b in range(nb):
        row = cand_val[b]
        for c in range(nc):
            v = row[c]
            t = top[c]
            top[c] = v if v > t else t
    for c in range(nc):
        if sid[c, k - 1] >= 0 and top[c] < sv[c, k - 1]:
            continue
        for b in range(nb):
            v = cand_val[b, c]
            i = ids[b]
            if not _better(v, i, sv[c, k - 1], sid[c, k - 1]):
                continue
            j = k - 1
            while j > 0 and _better(v, i, sv[c, j - 1], sid[c, j - 1]):
                sv[c, j] = sv[c, j - 1]
                sid[c, j] = sid[c, j - 1]
                srow[c, j] = srow[c, j - 1]
                scol[c, j] = scol[c, j - 1]
                j -= 1
            p = cand_pos[b, c]
            sv[c, j] = v
            sid[c, j] = i
            srow[c, j] = p // width
            scol[c, j] = p % width


@njit(cache=True)
def _responsive_kernel(cand_val, ids, rv, rid):  # pragma: no cover - compiled
    nb, nc = cand_val.shape
    k_i = rv.shape[1]
    for b in range(nb):
        row = ids[b]
        filled = 0
        for c in range(nc):
            v = cand_val[b, c]
            # Channels arrive in ascending order, so an equal value never moves ahead (channel asc).
            if filled == k_i:
                if not v > rv[row, k_i - 1]:
                    continue
                j = k_i - 1
            else:
                j = filled
                filled += 1
            while j > 0 and v > rv[row, j - 1]:
                rv[row, j] = rv[row, j - 1]
                rid[row, j] = rid[row, j - 1]
                j -= 1
            rv[row, j] = v
            rid[row, j] = c
        for j in range(filled, k_i):
            rv[row, j] = -np.inf
            rid[row, j] = -1


def merge_candidates(state: TopKState, values: torch.Tensor, pos: np.ndarray, width: int,
                     image_ids: np.ndarray) -> None:
    """Fold a batch's maxima into the per-channel top-k of a CPU state (in place)."""
    _merge_kernel(values.numpy(), pos, int(width), image_ids, state.values.numpy(), state.ids.numpy(),
                  state.rows.numpy(), state.cols.numpy())


def responsive(state: TopKState, values: torch.Tensor, image_ids: np.ndarray) -> None:
    """Write each image's k_i best channels into its responsive row of a CPU state (in place)."""
    if state.k_i == 0:
        return
    _responsive_kernel(values.numpy(), image_ids, state.resp_values.numpy(), state.resp_ids.numpy())


def warmup(dtypes: tuple[torch.dtype, ...] = (torch.float32,)) -> None:
    """Compile (or load from the on-disk cache) the kernels for ``dtypes`` now, not on the first batch."""
    from .state import new_state

    for dtype in dtypes:
        int_dtype, magmask, _ = _FORMATS[dtype]
        np_int = np.int16 if int_dtype == torch.int16 else np.int32
        out = [np.zeros(4, np.int32) for _ in range(3)]
        for kernel in (_max_rows_par, _max_rows_seq):
            kernel(np.zeros((4, 3), np_int), np.int32(magmask), *out)
        for kernel in (_max_nhwc_par, _max_nhwc_seq):
            kernel(np.zeros((2, 3, 2), np_int), np.int32(magmask), 2, *(o.reshape(2, 2) for o in out))
    st = new_state(2, 2, 2, 1)
    v, p = spatial_max(torch.zeros(2, 2, 2, 2))
    ids = np.arange(2, dtype=np.int64)
    merge_candidates(st, v, p, 2, ids)
    responsive(st, v, ids)
