"""The running top-k state of one layer, its construction, validation and (de)serialisation.

A :class:`TopKState` holds, for every channel ``c`` of one layer, the ``k`` best images seen so far
(``values[c]``, ``ids[c]``, ``rows[c]``, ``cols[c]``, best first), and for every image id the
``k_i`` channels that image activated most (``resp_values[id]``, ``resp_ids[id]``).

Ordering (identical in every implementation):

* per channel: value descending, then image id ascending; empty slots (``id == -1``,
  ``value == -inf``) come after every real entry, even one whose value is ``-inf``;
* per image: value descending, then channel ascending; empty slots as above.

A value is the spatial maximum of the activation map, taken in float32, with ``-0.0`` stored as
``+0.0`` (so that equal maxima are also bitwise equal whichever element supplied them).
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch

from conceptevo.errors import ConceptEvoError, DataError, InputError

__all__ = ["TopKState", "new_state", "state_to_numpy", "state_from_numpy", "STATE_FIELDS"]

# name -> (torch dtype, numpy dtype, fill value)
_SPEC: dict[str, tuple[torch.dtype, np.dtype, float]] = {
    "values": (torch.float32, np.dtype(np.float32), float("-inf")),
    "ids": (torch.int64, np.dtype(np.int64), -1),
    "rows": (torch.int32, np.dtype(np.int32), -1),
    "cols": (torch.int32, np.dtype(np.int32), -1),
    "resp_values": (torch.float32, np.dtype(np.float32), float("-inf")),
    "resp_ids": (torch.int32, np.dtype(np.int32), -1),
}
STATE_FIELDS: tuple[str, ...] = tuple(_SPEC)


@dataclass
class TopKState:
    """Running stimuli state of ONE layer; every tensor lives on the layer's device.

    Attributes:
        values: float32 (C, k) spatial maxima, best first; ``-inf`` in empty slots.
        ids: int64 (C, k) image ids; ``-1`` while fewer than ``k`` images were seen.
        rows: int32 (C, k) row of the (first, row-major) maximum; ``-1`` when empty.
        cols: int32 (C, k) column of that maximum; ``-1`` when empty.
        resp_values: float32 (N, k_i) per image id: its k_i largest channel maxima.
        resp_ids: int32 (N, k_i) the channels of ``resp_values``; ``-1`` for images not seen yet.
    """

    values: torch.Tensor
    ids: torch.Tensor
    rows: torch.Tensor
    cols: torch.Tensor
    resp_values: torch.Tensor
    resp_ids: torch.Tensor

    @property
    def channels(self) -> int:
        return int(self.values.shape[0])

    @property
    def k(self) -> int:
        return int(self.values.shape[1])

    @property
    def num_images(self) -> int:
        return int(self.resp_values.shape[0])

    @property
    def k_i(self) -> int:
        return int(self.resp_values.shape[1])

    @property
    def device(self) -> torch.device:
        return self.values.device

    def seen(self) -> torch.Tensor:
        """Bool (N,) mask of the image ids already folded into this state.

        Only meaningful when ``k_i >= 1`` (the responsive rows are the record of what was seen).
        """
        if self.k_i == 0:
            raise DataError("this state keeps no responsive neurons (k_i=0), so it has no record of seen images")
        return self.resp_ids[:, 0] >= 0

    def to(self, device: str | torch.device) -> "TopKState":
        """A copy of the state on ``device`` (the same object when it is already there)."""
        device = torch.device(device)
        if self.device == device:
            return self
        return TopKState(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def clone(self) -> "TopKState":
        return TopKState(**{f.name: getattr(self, f.name).clone() for f in fields(self)})

    def validate(self, where: str = "state") -> None:
        """Raise :class:`ConceptEvoError` when shapes, dtypes, devices or memory layout are inconsistent."""
        shapes = {}
        for name, (dtype, _, _) in _SPEC.items():
            t = getattr(self, name)
            if not isinstance(t, torch.Tensor):
                raise ConceptEvoError(f"{where}.{name} must be a torch.Tensor, got {type(t).__name__}")
            if t.dtype != dtype:
                raise ConceptEvoError(f"{where}.{name} must be {dtype}, got {t.dtype}")
            if t.ndim != 2:
                raise ConceptEvoError(f"{where}.{name} must be 2-D, got shape {tuple(t.shape)}")
            if not t.is_contiguous():
                # The CPU kernels write through NumPy views of these tensors.
                raise ConceptEvoError(f"{where}.{name} must be contiguous")
            if t.device != self.values.device:
                raise ConceptEvoError(f"{where}.{name} is on {t.device}, {where}.values on {self.values.device}")
            shapes[name] = tuple(t.shape)
        for name in ("ids", "rows", "cols"):
            if shapes[name] != shapes["values"]:
                raise ConceptEvoError(f"{where}.{name} has shape {shapes[name]}, values {shapes['values']}")
        if shapes["resp_ids"] != shapes["resp_values"]:
            raise ConceptEvoError(
                f"{where}.resp_ids has shape {shapes['resp_ids']}, resp_values {shapes['resp_values']}"
            )
        if shapes["values"][0] < 1 or shapes["values"][1] < 1:
            raise ConceptEvoError(f"{where} needs at least one channel and k >= 1, got (C, k) = {shapes['values']}")


def _check_int(name: str, value: int, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise InputError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def new_state(channels: int, k: int, num_images: int, k_i: int, device: str | torch.device = "cpu") -> TopKState:
    """An empty state for a layer of ``channels`` channels over a dataset of ``num_images`` images.

    Args:
        channels: C, channels of the layer (>= 1).
        k: stimuli kept per channel (>= 1).
        num_images: N, the dataset size; image ids are ``0..N-1``.
        k_i: responsive channels kept per image (>= 0; 0 keeps none).
        device: where the tensors live (the layer's device).
    """
    c = _check_int("channels", channels, 1)
    k = _check_int("k", k, 1)
    n = _check_int("num_images", num_images, 0)
    ki = _check_int("k_i", k_i, 0)
    device = torch.device(device)
    shapes = {"values": (c, k), "ids": (c, k), "rows": (c, k), "cols": (c, k),
              "resp_values": (n, ki), "resp_ids": (n, ki)}
    return TopKState(**{
        name: torch.full(shapes[name], fill, dtype=dtype, device=device)
        for name, (dtype, _, fill) in _SPEC.items()
    })


def state_to_numpy(state: TopKState) -> dict[str, np.ndarray]:
    """The state as a dict of NumPy arrays (copies on the host), keys as the field names."""
    state.validate()
    return {name: getattr(state, name).detach().cpu().numpy().copy() for name in STATE_FIELDS}


def state_from_numpy(d: dict[str, np.ndarray], device: str | torch.device = "cpu") -> TopKState:
    """Rebuild a state written by :func:`state_to_numpy` (e.g. loaded from ``.npy`` files).

    Raises:
        ConceptEvoError: a field is missing or has the wrong dtype or shape.
    """
    missing = [name for name in STATE_FIELDS if name not in d]
    if missing:
        raise ConceptEvoError(f"state arrays are missing {missing}; expected keys {list(STATE_FIELDS)}")
    tensors = {}
    for name, (dtype, np_dtype, _) in _SPEC.items():
        arr = np.asarray(d[name])
        if arr.dtype != np_dtype:
            raise ConceptEvoError(f"state array {name!r} must be {np_dtype}, got {arr.dtype}")
        tensors[name] = torch.from_numpy(np.ascontiguousarray(arr).copy()).to(device)
    state = TopKState(**tensors)
    state.validate("loaded state")
    return state
