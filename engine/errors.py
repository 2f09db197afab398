"""Exception types. Every error names the file, layer or parameter at fault.

One family: every error the engine raises on purpose is a :class:`ConceptEvoError`.
Where the caller passed a bad value (an argument out of range, an array of the wrong
shape or dtype, stimuli that cannot make a space, a layer the model lacks, a corrupt
image) the error is an :class:`InputError`, which is also a :class:`ValueError`, so
both ``except ConceptEvoError`` and the usual ``except ValueError`` catch it::

    ConceptEvoError
    ├── InputError (also ValueError)     a bad argument value: shapes, dtypes, ranges, names
    │   ├── DataError                    dataset: missing folder, corrupt image, bad labels
    │   ├── LayerError                   a layer name or type the model does not have
    │   └── EmbeddingError               stimuli / vectors that cannot make the unified space
    ├── CheckpointError                  a checkpoint file that cannot be used
    ├── ActivationError                  activations that cannot be ranked (NaN / inf)
    └── BackendError                     a forced backend that is missing or has no device
"""


class ConceptEvoError(Exception):
    """Base class of every error the engine raises on purpose."""


class InputError(ConceptEvoError, ValueError):
    """A bad value passed by the caller: out of range, wrong shape or dtype, unknown name."""


class CheckpointError(ConceptEvoError):
    """A checkpoint that cannot be used: missing, pickled code, wrong keys or shapes."""


class DataError(InputError):
    """A dataset problem: missing folder, unreadable or corrupt image, bad labels."""


class LayerError(InputError):
    """A layer name or type that the model does not have."""


class ActivationError(ConceptEvoError):
    """Activations that cannot be ranked (NaN or infinite values)."""


class BackendError(ConceptEvoError):
    """A forced backend that is not installed or has no device."""


class EmbeddingError(InputError):
    """The unified space cannot be built from these stimuli (e.g. no shared images)."""
