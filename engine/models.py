"""Built-in models and the model factory.

``build_model(name, num_classes=10, **kw)`` knows:

``"vgg_small"``
    A VGG-style CNN sized for 32x32 inputs and fast CPU training: four blocks of
    3x3 convolutions (padding 1) + ReLU, each block closed by a 2x2 max-pool, an
    adaptive average pool to 2x2 (so any input of at least 16x16 works), then a
    classifier ``Linear -> ReLU -> Dropout -> Linear -> ReLU -> Dropout -> Linear``
    as in VGG16. Keyword arguments: ``channels=(16, 32, 64, 128)`` (width of the
    four blocks), ``hidden=256`` (width of the two hidden Linear layers),
    ``dropout=0.5``, ``batch_norm=False`` (True inserts ``features.bn<b>_<j>`` BatchNorm2d
    after every conv, VGG-BN style; the paper's VGGs and the built-in regimes have none).

    Module names (what ``ModelAdapter(layers=[...])`` takes)::

        features.conv1_1   3 -> c1        32x32   followed by features.relu1_1
        features.conv1_2   c1 -> c1       32x32   ... features.pool1
        features.conv2_1   c1 -> c2       16x16
        features.conv2_2   c2 -> c2       16x16   ... features.pool2
        features.conv3_1   c2 -> c3        8x8
        features.conv3_2   c3 -> c3        8x8    ... features.pool3
        features.conv4_1   c3 -> c4        4x4    ... features.pool4
        avgpool                                   (AdaptiveAvgPool2d(2))
        classifier.fc1, classifier.relu1, classifier.drop1,
        classifier.fc2, classifier.relu2, classifier.drop2,
        classifier.fc3 (the logits)

    Seven Conv2d layers: with the default channels 16+16+32+32+64+64+128 = 352
    conv neurons. Every ReLU is *not* in-place, so a forward hook on a conv layer
    sees the pre-activation map and keeps seeing it after the next layer ran.

``"vgg_small_nodrop"``
    The same network with both Dropout layers replaced by ``nn.Identity`` (module
    names unchanged), the paper's "VGG16 without dropout" used to overfit.

``"torchvision:<name>"``
    Any ``torchvision.models`` builder (``torchvision:vgg16``, ``torchvision:resnet50``,
    ...), built with ``weights=None`` and ``num_classes``; extra keyword arguments go
    to the builder. Layer names are torchvision's (e.g. ``features.0`` ... ``features.28``
    are VGG16's conv layers, ``layer1.0.conv1`` ... ResNet's). torchvision is an
    optional dependency (``pip install conceptevo[vision]``) imported only here, and
    only when such a name is asked for.

Any other ``torch.nn.Module`` can be handed to the later stages directly; nothing
in the engine assumes the VGG layout.
"""
from __future__ import annotations

import importlib
import math
from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch
from torch import nn

from .errors import ConceptEvoError

__all__ = ["VGGSmall", "build_model", "model_factory", "available_models", "VGG_SMALL_CONV_LAYERS"]

#: Names of the Conv2d modules of ``vgg_small`` / ``vgg_small_nodrop``, in forward order.
VGG_SMALL_CONV_LAYERS: tuple[str, ...] = (
    "features.conv1_1",
    "features.conv1_2",
    "features.conv2_1",
    "features.conv2_2",
    "features.conv3_1",
    "features.conv3_2",
    "features.conv4_1",
)

# (block, convs in block): the VGG pattern of two convs in the early blocks, one in the last
# (the last block works on 4x4 maps; a second conv there would add time but little).
_BLOCKS: tuple[int, ...] = (2, 2, 2, 1)


class VGGSmall(nn.Module):
    """VGG-style CNN for small images. See the module docstring for its layer names."""

    def __init__(
        self,
        num_classes: int = 10,
        channels: Sequence[int] = (16, 32, 64, 128),
        hidden: int = 256,
        dropout: float = 0.5,
        in_channels: int = 3,
        batch_norm: bool = False,
    ) -> None:
        super().__init__()
        channels = tuple(int(c) for c in channels)
        if len(channels) != len(_BLOCKS) or min(channels) < 1:
            raise ConceptEvoError(
                f"vgg_small: channels must be {len(_BLOCKS)} positive widths, got {channels!r}"
            )
        if num_classes < 1:
            raise ConceptEvoError(f"vgg_small: num_classes must be >= 1, got {num_classes}")
        if not 0.0 <= float(dropout) < 1.0:
            raise ConceptEvoError(f"vgg_small: dropout must be in [0, 1), got {dropout}")
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        c_in = in_channels
        for b, (n_conv, c_out) in enumerate(zip(_BLOCKS, channels), start=1):
            for j in range(1, n_conv + 1):
                layers[f"conv{b}_{j}"] = nn.Conv2d(c_in, c_out, kernel_size=3, padding=1)
                if batch_norm:
                    layers[f"bn{b}_{j}"] = nn.BatchNorm2d(c_out)
                layers[f"relu{b}_{j}"] = nn.ReLU(inplace=False)  # hooks must see pre-activations
                c_in = c_out
            layers[f"pool{b}"] = nn.MaxPool2d(2)
        self.features = nn.Sequential(layers)
        self.avgpool = nn.AdaptiveAvgPool2d(2)

        def drop() -> nn.Module:
            return nn.Dropout(dropout) if dropout > 0 else nn.Identity()

        self.classifier = nn.Sequential(
            OrderedDict(
                [
                    ("fc1", nn.Linear(c_in * 4, hidden)),
                    ("relu1", nn.ReLU(inplace=False)),
                    ("drop1", drop()),
                    ("fc2", nn.Linear(hidden, hidden)),
                    ("relu2", nn.ReLU(inplace=False)),
                    ("drop2", drop()),
                    ("fc3", nn.Linear(hidden, num_classes)),
                ]
            )
        )
        self.num_classes = num_classes
        self._init_weights()

    def _init_weights(self) -> None:
        # He initialisation with fan_in for every layer: keeps the forward signal's scale
        # through the ReLUs. torchvision's VGG (fan_out convs, N(0, 0.01) Linear) shrinks it,
        # which without BatchNorm leaves this net stuck at chance for several epochs.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
                nn.init.zeros_(m.bias)
        last = self.classifier.fc3
        nn.init.normal_(last.weight, 0.0, 1.0 / math.sqrt(last.in_features))  # unit-scale logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


def _build_vgg_small(num_classes: int, **kw) -> nn.Module:
    return VGGSmall(num_classes=num_classes, **kw)


def _build_vgg_small_nodrop(num_classes: int, **kw) -> nn.Module:
    if kw.pop("dropout", 0.0):
        raise ConceptEvoError("vgg_small_nodrop has no dropout; use vgg_small to set dropout")
    return VGGSmall(num_classes=num_classes, dropout=0.0, **kw)


_BUILTIN = {"vgg_small": _build_vgg_small, "vgg_small_nodrop": _build_vgg_small_nodrop}


def available_models() -> list[str]:
    """Names ``build_model`` accepts without torchvision (plus ``torchvision:<name>`` with it)."""
    return sorted(_BUILTIN)


def _build_torchvision(arch: str, num_classes: int, **kw) -> nn.Module:
    try:
        tv_models = importlib.import_module("torchvision.models")
    except ImportError as exc:
        raise ConceptEvoError(
            f"model 'torchvision:{arch}' needs torchvision, which is not installed "
            "(pip install torchvision, or pip install 'conceptevo[vision]')"
        ) from exc
    kw.setdefault("weights", None)  # never download weights: no network in CI, and the init is the point
    try:
        builder = tv_models.get_model_builder(arch)
    except ValueError as exc:
        raise ConceptEvoError(
            f"torchvision has no model named {arch!r}; known: {', '.join(sorted(tv_models.list_models()))}"
        ) from exc
    try:
        return builder(num_classes=num_classes, **kw)
    except TypeError as exc:
        raise ConceptEvoError(
            f"torchvision:{arch} does not accept these arguments {sorted(kw)}: {exc}") from exc


def build_model(name: str, num_classes: int = 10, **kw) -> nn.Module:
    """Build a fresh (randomly initialised) model by name.

    ``name`` is ``"vgg_small"``, ``"vgg_small_nodrop"`` or ``"torchvision:<arch>"``; ``kw``
    goes to the builder (``channels``, ``hidden``, ``dropout`` for the built-ins). The
    initialisation draws from torch's global RNG: call ``torch.manual_seed`` first for a
    reproducible model.
    """
    if not isinstance(name, str):
        raise ConceptEvoError(f"model name must be a string, got {type(name).__name__}")
    if name.startswith("torchvision:"):
        arch = name.split(":", 1)[1].strip()
        if not arch:
            raise ConceptEvoError("model name 'torchvision:' needs an architecture, e.g. 'torchvision:vgg16'")
        return _build_torchvision(arch, num_classes, **kw)
    try:
        builder = _BUILTIN[name]
    except KeyError:
        raise ConceptEvoError(
            f"unknown model {name!r}; built-in models: {', '.join(available_models())}, "
            "or 'torchvision:<name>' (e.g. 'torchvision:vgg16') when torchvision is installed"
        ) from None
    try:
        return builder(num_classes, **kw)
    except TypeError as exc:
        raise ConceptEvoError(f"model {name!r}: bad arguments {sorted(kw)}: {exc}") from exc


def model_factory(name: str, num_classes: int) -> Callable[[], nn.Module]:
    """A zero-argument constructor for the model a config or the command line names.

    ``"module.path:function"`` imports that function (it is called with no arguments);
    any other name is a :func:`build_model` name, checked now so a typo fails early.
    """
    if ":" in name and not name.startswith("torchvision:"):
        mod_name, _, attr = name.partition(":")
        try:
            fn = getattr(importlib.import_module(mod_name), attr)
        except (ImportError, AttributeError) as exc:
            raise ConceptEvoError(f"model factory {name!r} cannot be imported: {exc}") from None
        return fn
    build_model(name, num_classes=num_classes)  # fail early on an unknown name
    return lambda: build_model(name, num_classes=num_classes)
