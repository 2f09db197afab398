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


@pytest.fixture
def interrupt_training(monkeypatch):
    """``interrupt_training(steps_per_epoch)``: the built-in trainer raises KeyboardInterrupt in the
    middle of epoch 2 until ``.restore()`` is called (a crash to resume from)."""
    import conceptevo.train as train_mod

    real = train_mod._lr_at

    class Interrupt:
        def __call__(self, steps_per_epoch: int) -> None:
            def crash(step, *a):
                if step == steps_per_epoch + 1:  # in the middle of epoch 2
                    raise KeyboardInterrupt
                return real(step, *a)

            monkeypatch.setattr(train_mod, "_lr_at", crash)

        def restore(self) -> None:
            monkeypatch.setattr(train_mod, "_lr_at", real)

    return Interrupt()
