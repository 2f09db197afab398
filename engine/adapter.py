"""Model adapter: choose layers, capture their outputs, load checkpoints safely.

A *neuron* is one channel of a chosen layer's output: a conv channel of a
``(B, C, H, W)`` output, or a unit of a ``(B, C)`` Linear output (a 1x1 map).

Layers are chosen by

* ``None`` -- every ``nn.Conv2d`` (the default of the paper's code);
* a module type (``nn.Conv2d``, ``nn.Linear``, a tuple of types);
* a list of module names (``["features.0", "features.3"]``);
* a string: an exact module name, else a regular expression matched against the
  full names (``r"features\\.\\d+"``).

The number of channels of every chosen layer is found before any data pass with
one forward pass of a single zero image of ``input_shape``.

Checkpoints are loaded with ``torch.load(..., weights_only=True)`` (or
safetensors), so a file that would need unpickling of code is refused, never
executed. Keys and shapes are checked against the model and every mismatch is
named in the error.
"""
from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import CheckpointError, LayerError

__all__ = [
    "EvalMode",
    "ModelAdapter",
    "checkpoint_epoch",
    "load_state_dict_file",
    "model_device_dtype",
    "select_layers",
]

LayerSpec = None | str | type | tuple | Sequence[str]
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net", "weights")


def select_layers(model: nn.Module, layers: LayerSpec = None) -> list[str]:
    """Names of the modules chosen by ``layers`` (see the module docstring), in model order."""
    named = [(n, m) for n, m in model.named_modules() if n]
    names = [n for n, _ in named]
    if layers is None:
        layers = nn.Conv2d
    if isinstance(layers, type) or (isinstance(layers, tuple) and all(isinstance(t, type) for t in layers)):
        chosen = [n for n, m in named if isinstance(m, layers)]
        if not chosen:
            kinds = layers.__name__ if isinstance(layers, type) else ", ".join(t.__name__ for t in layers)
            raise LayerError(f"the model has no layer of type {kinds}")
        return chosen
    if isinstance(layers, str):
        if layers in names:
            return [layers]
        try:
            pattern = re.compile(layers)
        except re.error as exc:
            raise LayerError(f"layer {layers!r} is not a module name and not a valid regex: {exc}") from None
        chosen = [n for n in names if pattern.fullmatch(n)]
        if not chosen:
            raise LayerError(f"no layer named or matching {layers!r}; the model has: {_preview(names)}")
        return chosen
    wanted = list(layers)
    missing = [n for n in wanted if n not in names]
    if missing:
        raise LayerError(f"unknown layer name(s) {missing}; the model has: {_preview(names)}")
    order = {n: i for i, n in enumerate(names)}
    return sorted(dict.fromkeys(wanted), key=order.__getitem__)


def _preview(names: Sequence[str], limit: int = 30) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a plain state dict from ``path`` without ever unpickling code.

    Accepts ``.pt``/``.pth``/``.bin`` files written by ``torch.save(model.state_dict())``
    (also wrapped as ``{"state_dict": ...}``; a ``module.`` prefix from DataParallel is
    stripped) and ``.safetensors`` files.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            obj: Any = load_file(str(path))
        except Exception as exc:  # corrupt header, truncated file
            raise CheckpointError(f"cannot read safetensors checkpoint {path}: {exc}") from None
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            msg = str(exc)
            if "weights_only" in msg or "Unsupported global" in msg or "pickle" in msg.lower():
                raise CheckpointError(
                    f"checkpoint {path} is not a plain state dict: loading it would unpickle code or "
                    f"arbitrary objects, which the engine refuses. Re-save it with "
                    f"torch.save(model.state_dict(), path). (torch said: {msg.splitlines()[0][:200]})"
                ) from None
            raise CheckpointError(f"cannot read checkpoint {path}: {msg.splitlines()[0][:300]}") from None
    if isinstance(obj, dict):
        for key in _WRAPPER_KEYS:
            inner = obj.get(key)
            if isinstance(inner, dict) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                obj = inner
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        kind = type(obj).__name__
        raise CheckpointError(
            f"checkpoint {path} holds a {kind}, not a state dict of tensors; save model.state_dict()"
        )
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module.") :]: v for k, v in obj.items()}
    return obj


class ModelAdapter:
    """Wraps any ``nn.Module``: chosen layers, their channel counts, hooks, checkpoints."""

    def __init__(self, model: nn.Module, layers: LayerSpec = None, input_shape: Sequence[int] = (3, 32, 32)):
        self.model = model
        self.input_shape = tuple(int(s) for s in input_shape)
        self.layer_names: list[str] = select_layers(model, layers)
        self._modules = dict(model.named_modules())
        self.channels: dict[str, int] = {}
        self.spatial: dict[str, tuple[int, int]] = {}
        self._probe_shapes()
        self.offsets: dict[str, int] = {}
        total = 0
        for name in self.layer_names:
            self.offsets[name] = total
            total += self.channels[name]
        self.num_neurons = total

    # -------------------------------------------------------------- shapes
    def _probe_shapes(self) -> None:
        """One forward of a zero image to learn every chosen layer's channels and map size."""
        modes = {m: m.training for m in self.model.modules()}  # restore each submodule's own mode
        self.model.eval()
        try:
            param = next(self.model.parameters(), None)
            device = param.device if param is not None else torch.device("cpu")
            dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
            x = torch.zeros((1, *self.input_shape), device=device, dtype=dtype)
            with torch.no_grad(), self.hooks(self._record_shape):
                self.model(x)
        finally:
            for m, mode in modes.items():
                m.training = mode
        never = [n for n in self.layer_names if n not in self.channels]
        if never:
            raise LayerError(f"layer(s) {never} did not run in the forward pass; they cannot be captured")

    def _record_shape(self, name: str, out: torch.Tensor) -> None:
        if out.dim() == 4:
            self.channels[name] = int(out.shape[1])
            self.spatial[name] = (int(out.shape[2]), int(out.shape[3]))
        elif out.dim() == 2:
            self.channels[name] = int(out.shape[1])
            self.spatial[name] = (1, 1)
        else:
            raise LayerError(
                f"layer {name!r} outputs a tensor of shape {tuple(out.shape)}; "
                "only (B, C, H, W) and (B, C) outputs have neurons"
            )

    # --------------------------------------------------------------- hooks
    @contextlib.contextmanager
    def hooks(self, fn: Callable[[str, torch.Tensor], torch.Tensor | None]) -> Iterator[None]:
        """Call ``fn(layer_name, output)`` for every chosen layer during forward passes.

        If ``fn`` returns a tensor, it replaces the layer's output (used to revert
        activations); returning ``None`` leaves the output unchanged.
        """
        handles = []
        for name in self.layer_names:

            def hook(_module, _inp, out, _name=name):
                if not isinstance(out, torch.Tensor):
                    raise LayerError(f"layer {_name!r} returns {type(out).__name__}, not a tensor")
                return fn(_name, out)

            handles.append(self._modules[name].register_forward_hook(hook))
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def capture(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Forward ``x`` and return (logits, {layer: output}) for every chosen layer.

        The outputs are copies: a following in-place op (``ReLU(inplace=True)`` in
        torchvision's VGG) would otherwise turn the kept tensor into the post-ReLU one.
        """
        outs: dict[str, torch.Tensor] = {}

        def keep(name: str, out: torch.Tensor) -> None:
            outs[name] = out.clone()

        with self.hooks(keep):
            logits = self.model(x)
        return logits, outs

    # ---------------------------------------------------------- checkpoints
    def check_state_dict(self, state: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
        """Refuse a state dict whose keys or shapes differ from the model's, naming them."""
        expected = self.model.state_dict()
        missing = [k for k in expected if k not in state]
        extra = [k for k in state if k not in expected]
        shapes = [
            f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
            for k, v in expected.items()
            if k in state and tuple(state[k].shape) != tuple(v.shape)
        ]
        if missing or extra or shapes:
            parts = []
            if missing:
                parts.append(f"missing keys {_preview(missing, 8)}")
            if extra:
                parts.append(f"unexpected keys {_preview(extra, 8)}")
            if shapes:
                parts.append(f"wrong shapes {_preview(shapes, 8)}")
            raise CheckpointError(
                f"{source} does not fit the model {type(self.model).__name__} "
                f"(a checkpoint of another architecture?): " + "; ".join(parts)
            )

    def load_checkpoint(self, path: str | Path) -> None:
        """Load a checkpoint file into the model (weights only, strict keys and shapes)."""
        state = load_state_dict_file(path)
        self.check_state_dict(state, source=f"checkpoint {path}")
        self.model.load_state_dict(state, strict=True)

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        self.check_state_dict(state, source="state dict")
        self.model.load_state_dict(state, strict=True)

    # ------------------------------------------------------------- neurons
    def neuron_index(self) -> list[tuple[str, int]]:
        """(layer, channel) of every neuron in the model's flat order."""
        return [(name, c) for name in self.layer_names for c in range(self.channels[name])]

    def __repr__(self) -> str:
        return f"ModelAdapter({type(self.model).__name__}, {len(self.layer_names)} layers, {self.num_neurons} neurons)"


def checkpoint_epoch(path: str | Path) -> int:
    """The epoch a checkpoint file names: the last integer in its stem (``epoch_012.pt`` -> 12)."""
    path = Path(path)
    nums = re.findall(r"\d+", path.stem)
    if not nums:
        raise CheckpointError(f"cannot read an epoch number from checkpoint name {path.name!r}")
    return int(nums[-1])


def model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Device and floating dtype of the first parameter (CPU, float32 for a model without any)."""
    p = next(model.parameters(), None)
    if p is None:
        return torch.device("cpu"), torch.float32
    return p.device, (p.dtype if p.is_floating_point() else torch.float32)


class EvalMode:
    """Put modules in eval() for a block and restore each one's mode after."""

    def __init__(self, *models: nn.Module):
        self.models = models
        self.modes: list[list[tuple[nn.Module, bool]]] = []

    def __enter__(self):
        for m in self.models:
            self.modes.append([(mod, mod.training) for mod in m.modules()])
            m.eval()
        return self

    def __exit__(self, *exc):
        for saved in self.modes:
            for mod, mode in saved:
                mod.training = mode
        return False
