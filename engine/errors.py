"""Exception types. Every error names the file, layer or parameter at fault."""


class ConceptEvoError(Exception):
    """Base class of every error the engine raises on purpose."""


class CheckpointError(ConceptEvoError):
    """A checkpoint that cannot be used: missing, pickled code, wrong keys or shapes."""


class DataError(ConceptEvoError):
    """A dataset problem: missing folder, unreadable or corrupt image, bad labels."""


class LayerError(ConceptEvoError):
    """A layer name or type that the model does not have."""


class ActivationError(ConceptEvoError):
    """Activations that cannot be ranked (NaN or infinite values)."""


class BackendError(ConceptEvoError):
    """A forced backend that is not installed or has no device."""


class EmbeddingError(ConceptEvoError):
    """The unified space cannot be built from these stimuli (e.g. no shared images)."""
