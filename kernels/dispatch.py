"""One dispatch for the stimulus pass: validate, pick an implementation, fold a batch into a state.

Backends (all give bitwise-identical states; see ``reference`` for the definition):

=============  ===========================================================================
``reference``  plain PyTorch, any device; the definition used by the tests
``cpu``        Numba, CPU tensors (parallel over maps, no copy of NCHW / channels-last)
``triton``     fused Triton kernel, CUDA tensors; CPU tensors only with ``TRITON_INTERPRET=1``
``auto``       ``triton`` on CUDA when triton imports, ``cpu`` on the CPU, else ``reference``
=============  ===========================================================================
"""
from __future__ import annotations

import functools
from typing import Sequence

import numpy as np
import torch

from conceptevo.errors import ActivationError, BackendError, ConceptEvoError, DataError

from . import reference
from .state import TopKState

__all__ = ["BACKENDS", "available_backends", "resolve_backend", "spatial_max", "update", "merge"]

BACKENDS: tuple[str, ...] = ("auto", "reference", "cpu", "triton")


@functools.lru_cache(maxsize=None)
def _numba_problem() -> str | None:
    try:
        import numba  # noqa: F401
    except ImportError as exc:
        return f"numba is not installed ({exc})"
    return None


def _triton_problem() -> str | None:
    from . import triton_topk

    return triton_topk.available()


def available_backends() -> dict[str, str | None]:
    """Each concrete backend -> None when it can run in this process, else why not."""
    from . import triton_topk

    triton = _triton_problem()
    if triton is None and not torch.cuda.is_available() and not triton_topk.interpret_mode():
        triton = "no CUDA device is visible (TRITON_INTERPRET=1 runs it on the CPU, slowly)"
    return {"reference": None, "cpu": _numba_problem(), "triton": triton}


def resolve_backend(device: torch.device | str, backend: str = "auto") -> str:
    """The concrete backend that ``update`` uses for tensors on ``device``.

    Raises:
        BackendError: an unknown name, or a forced backend that cannot run on this device.
    """
    device = torch.device(device)
    name = (backend or "auto").lower()
    if name not in BACKENDS:
        raise BackendError(f"unknown top-k backend {backend!r}; choose one of {list(BACKENDS)}")
    if name == "auto":
        if device.type == "cuda" and _triton_problem() is None:
            return "triton"
        if device.type == "cpu" and _numba_problem() is None:
            return "cpu"
        return "reference"
    if name == "cpu":
        if device.type != "cpu":
            raise BackendError(f"top-k backend 'cpu' needs CPU tensors, got tensors on {device}")
        problem = _numba_problem()
        if problem is not None:
            raise BackendError(f"top-k backend 'cpu' was forced but cannot run: {problem}")
    if name == "triton":
        from . import triton_topk

        problem = _triton_problem()
        if problem is not None:
            raise BackendError(f"top-k backend 'triton' was forced but cannot run: {problem}")
        if device.type != "cuda" and not (device.type == "cpu" and triton_topk.interpret_mode()):
            raise BackendError(
                f"top-k backend 'triton' needs CUDA tensors, got tensors on {device} "
                "(set TRITON_INTERPRET=1 to run the kernel in Triton's interpreter on CPU tensors)"
            )
    return name


def _check_activations(activations: torch.Tensor, channels: int | None, device: torch.device | None) -> None:
    if not isinstance(activations, torch.Tensor):
        raise ActivationError(f"activations must be a torch.Tensor, got {type(activations).__name__}")
    if not activations.dtype.is_floating_point:
        raise ActivationError(f"activations must be a floating-point tensor, got {activations.dtype}")
    if activations.ndim not in (2, 4):
        raise ActivationError(
            f"activations must be (B, C, H, W) or (B, C), got shape {tuple(activations.shape)}"
        )
    if channels is not None and activations.shape[1] != channels:
        raise ActivationError(
            f"activations have {activations.shape[1]} channels but the state has {channels}"
        )
    if device is not None and activations.device != device:
        raise ActivationError(f"activations are on {activations.device} but the state is on {device}")


def _image_ids(image_ids: torch.Tensor | np.ndarray | Sequence[int], batch: int, num_images: int) -> np.ndarray:
    """Validated int64 (B,) host copy of the ids: integers, distinct, in [0, N)."""
    if isinstance(image_ids, torch.Tensor):
        if image_ids.dtype.is_floating_point or image_ids.dtype.is_complex or image_ids.dtype == torch.bool:
            raise DataError(f"image_ids must be integers, got {image_ids.dtype}")
        ids = image_ids.detach().cpu().numpy()
    else:
        ids = np.asarray(image_ids)
        if ids.size and not np.issubdtype(ids.dtype, np.integer):
            raise DataError(f"image_ids must be integers, got {ids.dtype}")
    if ids.size == 0 and batch == 0:
        return np.zeros(0, dtype=np.int64)
    if ids.ndim != 1 or ids.shape[0] != batch:
        raise DataError(f"image_ids must have shape ({batch},) to match the batch, got {tuple(np.shape(image_ids))}")
    if batch:
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= num_images:
            bad = ids[(ids < 0) | (ids >= num_images)][:5].tolist()
            raise DataError(f"image ids {bad} are outside [0, {num_images}) (the state's num_images)")
        if np.unique(ids).size != batch:
            uniq, counts = np.unique(ids, return_counts=True)
            raise DataError(f"image ids repeat within the batch: {uniq[counts > 1][:5].tolist()}")
    return np.ascontiguousarray(ids, dtype=np.int64)


def _already_seen_error(ids: np.ndarray) -> DataError:
    return DataError(
        f"image ids {ids[:5].tolist()} were already folded into this state; "
        "each image may be fed once (a repeat would appear twice among a channel's stimuli)"
    )


def spatial_max(activations: torch.Tensor, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per (image, channel) spatial maximum and the (row, col) of its first row-major occurrence.

    Args:
        activations: (B, C, H, W) or (B, C) floating tensor, contiguous or channels-last.
        backend: "auto" | "reference" | "cpu" | "triton".

    Returns:
        values float32 (B, C), rows int32 (B, C), cols int32 (B, C), on the activations' device.

    Raises:
        ActivationError: NaN in the batch, or a malformed tensor.
    """
    _check_activations(activations, None, None)
    name = resolve_backend(activations.device, backend)
    width = activations.shape[3] if activations.ndim == 4 else 1
    if activations.shape[0] == 0 or activations.shape[1] == 0:
        empty = torch.zeros(activations.shape[:2], dtype=torch.int32, device=activations.device)
        return empty.float(), empty, empty.clone()
    values, pos = _maxima(activations, name)
    pos = torch.as_tensor(pos, device=values.device).to(torch.int64)
    return values, (pos // width).to(torch.int32), (pos % width).to(torch.int32)


def _maxima(activations: torch.Tensor, backend: str):
    """(values float32 (B, C), positions (B, C)); raises on NaN. positions: ndarray for cpu, else tensor."""
    if backend == "cpu":
        from . import cpu_topk

        return cpu_topk.spatial_max(activations)
    if backend == "triton":
        from . import triton_topk

        values, pos, has_nan = triton_topk.spatial_max(activations)
        if bool(has_nan):
            raise ActivationError("NaN activations in the batch: the top-k stimuli cannot be ranked")
        return values, pos
    return reference.spatial_max(activations)


def update(state: TopKState, activations: torch.Tensor, image_ids: torch.Tensor | np.ndarray | Sequence[int],
           backend: str = "auto") -> None:
    """Fold one batch of a layer's outputs into ``state`` in place.

    Each (image, channel) map is reduced to its spatial maximum and first row-major argmax; the
    batch's maxima then join the per-channel top-k (value desc, image id asc) and each image's
    row of responsive channels (value desc, channel asc) is written at its id. The result does not
    depend on the batch size, the order of the batches, or the backend.

    Args:
        state: the layer's running state (see :func:`new_state`).
        activations: (B, C, H, W) any float dtype, contiguous or channels-last; or (B, C) for a
            Linear layer (a 1x1 map). On the state's device.
        image_ids: int64 (B,) distinct ids in [0, N), not fed to this state before (checked when
            ``k_i >= 1``: the responsive rows record the images seen). Host or device tensor,
            NumPy array or sequence.
        backend: "auto" | "reference" | "cpu" | "triton" (see :func:`resolve_backend`).

    Raises:
        ActivationError: NaN anywhere in the batch (the state is left unchanged), or a tensor of
            the wrong shape / dtype / device. Callers add the layer name.
        DataError: bad image ids (range, repeats, already seen).
        BackendError: a forced backend that cannot run here.
    """
    state.validate()
    _check_activations(activations, state.channels, state.device)
    ids = _image_ids(image_ids, int(activations.shape[0]), state.num_images)
    name = resolve_backend(state.device, backend)
    if ids.shape[0] == 0:
        return  # an empty batch (e.g. the tail of a shard) changes nothing
    with torch.no_grad():  # hooks may fire while autograd records; the state never needs gradients
        _update(state, activations.detach(), ids, name)


def _update(state: TopKState, activations: torch.Tensor, ids: np.ndarray, name: str) -> None:
    width = activations.shape[3] if activations.ndim == 4 else 1
    check_seen = state.k_i > 0

    if name == "cpu":
        from . import cpu_topk

        if check_seen:
            seen = state.resp_ids.numpy()[ids, 0] >= 0
            if seen.any():
                raise _already_seen_error(ids[seen])
        values, pos = cpu_topk.spatial_max(activations)
        cpu_topk.merge_candidates(state, values, pos, width, ids)
        cpu_topk.responsive(state, values, ids)
        return

    ids_dev = torch.from_numpy(ids).to(state.device)
    if name == "triton":
        from . import triton_topk

        values, pos, has_nan = triton_topk.spatial_max(activations)
        flags = [has_nan]
        if check_seen:
            flags.append((state.resp_ids[ids_dev, 0] >= 0).any())
        bad_nan, *bad_seen = torch.stack(flags).tolist()  # one host synchronisation for all checks
        if bad_nan:
            raise ActivationError("NaN activations in the batch: the top-k stimuli cannot be ranked")
    else:
        if check_seen:
            bad_seen = [bool((state.resp_ids[ids_dev, 0] >= 0).any())]
        values, pos = reference.spatial_max(activations)
    if check_seen and bad_seen[0]:
        seen = (state.resp_ids[ids_dev, 0] >= 0).cpu().numpy()
        raise _already_seen_error(ids[seen])
    reference.merge_candidates(state, values, pos, width, ids_dev)
    reference.responsive(state, values, ids_dev)


def merge(a: TopKState, b: TopKState) -> TopKState:
    """Exact merge of two states over DISJOINT image sets (e.g. two ranks' shards of a dataset).

    Per channel: the k best of the union (value desc, image id asc), so the merge is associative
    and commutative and equals one stream over both shards. Responsive rows: each image's row is
    taken from the state that saw it.

    Raises:
        ConceptEvoError: the states differ in shape or device.
        DataError: an image id appears in both (among one channel's stimuli, or, when ``k_i >= 1``,
            among the responsive rows of both) -- the shards were not disjoint.
    """
    a.validate("merge(a, .)")
    b.validate("merge(., b)")
    for attr in ("channels", "k", "num_images", "k_i"):
        if getattr(a, attr) != getattr(b, attr):
            raise ConceptEvoError(f"cannot merge states with different {attr}: {getattr(a, attr)} vs {getattr(b, attr)}")
    if a.device != b.device:
        raise ConceptEvoError(f"cannot merge states on different devices ({a.device} and {b.device}); move one first")
    ids = torch.cat([a.ids, b.ids], 1)
    sorted_ids = torch.sort(ids, dim=1).values
    dup = (sorted_ids[:, 1:] == sorted_ids[:, :-1]) & (sorted_ids[:, 1:] >= 0)
    if bool(dup.any()):
        raise DataError(
            f"image ids {sorted_ids[:, 1:][dup].unique()[:5].tolist()} are in both states; "
            "merge needs states built from disjoint images"
        )
    if a.k_i > 0:
        a_seen, b_seen = a.seen(), b.seen()
        both = a_seen & b_seen
        if bool(both.any()):
            raise DataError(
                f"image ids {torch.nonzero(both).flatten()[:5].tolist()} were fed to both states; "
                "merge needs states built from disjoint images"
            )
    v, i, r, c = reference.merge_topk(
        torch.cat([a.values, b.values], 1), ids, torch.cat([a.rows, b.rows], 1), torch.cat([a.cols, b.cols], 1), a.k
    )
    if a.k_i > 0:
        take_a = a_seen.unsqueeze(1)
        resp_values = torch.where(take_a, a.resp_values, b.resp_values)
        resp_ids = torch.where(take_a, a.resp_ids, b.resp_ids)
    else:
        resp_values, resp_ids = a.resp_values.clone(), a.resp_ids.clone()
    return TopKState(values=v.contiguous(), ids=i.contiguous(), rows=r.contiguous(), cols=c.contiguous(),
                     resp_values=resp_values.contiguous(), resp_ids=resp_ids.contiguous())
