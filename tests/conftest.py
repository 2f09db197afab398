"""Shared test settings: small thread counts so the suite behaves on a 2-core CI machine."""
import os

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def rng():
    """A fresh, unseeded generator: every run tests new random inputs (the seed is printed on failure)."""
    import numpy as np

    seed = int(np.random.SeedSequence().entropy % (2**32))
    print(f"rng seed: {seed}")
    return np.random.default_rng(seed)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models: one thread avoids oversubscription on a shared CPU (restored after the module)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
