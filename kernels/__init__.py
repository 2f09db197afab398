"""Compute kernels of the stimulus pass: spatial max/argmax + streaming top-k, one dispatch.

Contract (docs/ARCHITECTURE.md, ``conceptevo.kernels``)::

    state = new_state(channels, k, num_images, k_i, device)
    update(state, activations, image_ids, backend="auto")   # in place, once per batch
    merged = merge(state_rank0, state_rank1)                # exact, associative
    arrays = state_to_numpy(state); state = state_from_numpy(arrays, device)

Implementations: ``reference`` (plain PyTorch, the definition), ``cpu`` (Numba), ``triton``
(CUDA; interpreter with ``TRITON_INTERPRET=1``). They produce bitwise-identical states.
"""
from .dispatch import BACKENDS, available_backends, merge, resolve_backend, spatial_max, update
from .state import STATE_FIELDS, TopKState, new_state, state_from_numpy, state_to_numpy

__all__ = [
    "TopKState",
    "new_state",
    "update",
    "merge",
    "state_to_numpy",
    "state_from_numpy",
    "spatial_max",
    "resolve_backend",
    "available_backends",
    "BACKENDS",
    "STATE_FIELDS",
]
