"""Plain-PyTorch reference: the definition every fast path is tested against.

Readable rather than fast, and device-agnostic (the Triton backend reuses :func:`merge_candidates`
and :func:`responsive` on the GPU, where the B x C maxima are small).

Definitions:

* spatial maximum of a map: the maximum of the map converted to float32; its position is the
  first maximum in row-major order (``torch.argmax`` returns the first maximal index);
  ``-0.0`` is stored as ``+0.0``;
* per-channel top-k: the k best of (state entries + batch candidates) in the order value
  descending, image id ascending, empty slots (id -1) last;
* responsive channels of an image: its k_i best channels in the order value descending, channel
  ascending.
"""
from __future__ import annotations

import torch

from conceptevo.errors import ActivationError

from .state import TopKState

__all__ = ["spatial_max", "merge_candidates", "responsive", "merge_topk", "lex_order", "canonical_zero"]

_EMPTY_KEY = torch.iinfo(torch.int64).max  # sort key of an empty slot: after every real image id


def canonical_zero(values: torch.Tensor) -> torch.Tensor:
    """``values`` with ``-0.0`` replaced by ``+0.0`` (equal maxima become bitwise equal)."""
    return torch.where(values == 0, torch.zeros((), dtype=values.dtype, device=values.device), values)


def spatial_max(activations: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (image, channel) spatial maximum and the flat row-major index ``row * W + col`` of its first occurrence.

    Args:
        activations: (B, C, H, W) or (B, C) floating tensor, any memory format.

    Returns:
        values float32 (B, C), positions int64 (B, C).

    Raises:
        ActivationError: the batch contains NaN.
    """
    x = activations.float()
    b, c = x.shape[:2]
    flat = x.reshape(b, c, -1)
    if bool(torch.isnan(flat).any()):
        raise ActivationError("NaN activations in the batch: the top-k stimuli cannot be ranked")
    if flat.shape[2] == 0:
        raise ActivationError(f"activation maps are empty (shape {tuple(activations.shape)})")
    pos = torch.argmax(flat, dim=2)
    values = canonical_zero(torch.gather(flat, 2, pos.unsqueeze(2)).squeeze(2))
    return values, pos


def lex_order(values: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Per-row permutation sorting by (value desc, key asc); negative keys (empty slots) go last."""
    keys = torch.where(keys < 0, torch.full_like(keys, _EMPTY_KEY), keys)
    by_key = torch.argsort(keys, dim=1, stable=True)
    by_value = torch.argsort(torch.gather(values, 1, by_key), dim=1, descending=True, stable=True)
    return torch.gather(by_key, 1, by_value)


def merge_topk(
    values: torch.Tensor, ids: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The k best columns of each row of the (C, M) candidate arrays, best first, padded with empty slots."""
    order = lex_order(values, ids)[:, :k]
    out = [torch.gather(t, 1, order) for t in (values, ids, rows, cols)]
    short = k - out[0].shape[1]
    if short > 0:
        fills = (float("-inf"), -1, -1, -1)
        out = [torch.cat([t, torch.full((t.shape[0], short), f, dtype=t.dtype, device=t.device)], 1)
               for t, f in zip(out, fills)]
    return out[0], out[1], out[2], out[3]


def merge_candidates(
    state: TopKState, values: torch.Tensor, pos: torch.Tensor, width: int, image_ids: torch.Tensor
) -> None:
    """Fold one batch of spatial maxima into the per-channel top-k of ``state`` (in place).

    Args:
        values: float32 (B, C) spatial maxima; pos: (B, C) flat positions ``row * width + col``.
        image_ids: int64 (B,) on the state's device.
    """
    b, c = values.shape
    dev = state.device
    cand_ids = image_ids.to(dev, torch.int64).unsqueeze(0).expand(c, b)
    pos_t = pos.to(dev, torch.int64).t()
    cand_rows = (pos_t // width).to(torch.int32)
    cand_cols = (pos_t % width).to(torch.int32)
    v, i, r, cl = merge_topk(
        torch.cat([state.values, values.to(dev).t()], 1),
        torch.cat([state.ids, cand_ids], 1),
        torch.cat([state.rows, cand_rows], 1),
        torch.cat([state.cols, cand_cols], 1),
        state.k,
    )
    state.values.copy_(v)
    state.ids.copy_(i)
    state.rows.copy_(r)
    state.cols.copy_(cl)


def responsive(state: TopKState, values: torch.Tensor, image_ids: torch.Tensor) -> None:
    """Write each image's k_i best channels (value desc, channel asc) into its responsive row (in place)."""
    k_i = state.k_i
    if k_i == 0:
        return
    b, c = values.shape
    dev = state.device
    channels = torch.arange(c, device=dev).unsqueeze(0).expand(b, c)
    order = lex_order(values.to(dev), channels)[:, :k_i]
    top_v = torch.gather(values.to(dev), 1, order)
    top_c = order.to(torch.int32)
    if c < k_i:
        pad = k_i - c
        top_v = torch.cat([top_v, torch.full((b, pad), float("-inf"), device=dev)], 1)
        top_c = torch.cat([top_c, torch.full((b, pad), -1, dtype=torch.int32, device=dev)], 1)
    rows = image_ids.to(dev, torch.int64)
    state.resp_values[rows] = top_v
    state.resp_ids[rows] = top_c
