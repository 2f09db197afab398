"""ConceptEvo engine: concept evolution of neurons during training (Park et al., CIKM 2023).

Public API (arrays in, arrays out):

    from conceptevo import data, models, train, adapter, stimuli, space
"""
__version__ = "0.1.0"

from .errors import (  # noqa: F401
    ActivationError,
    BackendError,
    CheckpointError,
    ConceptEvoError,
    DataError,
    EmbeddingError,
    InputError,
    LayerError,
)
