"""One error family: a bad value from the caller is a ConceptEvoError and a ValueError, in every stage."""
import numpy as np
import pytest

from conceptevo import errors, image_embedding, neuron_embedding, pairs
from conceptevo.kernels import state


@pytest.mark.parametrize("call", [
    lambda: pairs.build_pairs(np.array([[0, 1], [0, 1]]), 5, repeats=0),
    lambda: neuron_embedding.train(np.array([[0, 1]]), 5, dim=0, progress=False),
    lambda: state.new_state(channels=0, k=3, num_images=4, k_i=0),
    lambda: image_embedding.fit(np.array([[0, 1]]), np.zeros((1, 2)), 5, ridge=-1.0),
    lambda: image_embedding.fit(np.array([[0, 9]]), np.zeros((1, 2)), 5),
])
def test_bad_values_raise_one_family_that_is_also_value_error(call):
    with pytest.raises(errors.InputError) as info:
        call()
    assert isinstance(info.value, errors.ConceptEvoError) and isinstance(info.value, ValueError)


def test_hierarchy():
    for cls in (errors.DataError, errors.LayerError, errors.EmbeddingError, errors.InputError):
        assert issubclass(cls, errors.ConceptEvoError) and issubclass(cls, ValueError), cls
    for cls in (errors.CheckpointError, errors.BackendError, errors.ActivationError):
        assert issubclass(cls, errors.ConceptEvoError) and not issubclass(cls, ValueError), cls
