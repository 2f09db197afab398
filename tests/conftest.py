"""Shared test settings: small thread counts so the suite behaves on a 2-core CI machine."""
import os

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_addoption(parser):
    parser.addoption(
        "--rng-only", action="store_true",
        help="run only the tests that draw fresh random inputs (the `rng` fixture); with pytest-repeat's "
             "--count this hunts rare input-dependent failures (.ci/flake-hunt)",
    )


def pytest_collection_modifyitems(config, items):
    if config.getoption("--rng-only"):
        uses_rng = ["rng" in getattr(item, "fixturenames", ()) for item in items]
        config.hook.pytest_deselected(items=[item for item, keep in zip(items, uses_rng, strict=True) if not keep])
        items[:] = [item for item, keep in zip(items, uses_rng, strict=True) if keep]


@pytest.fixture
def rng():
    """A fresh, unseeded generator: every run tests new random inputs (the seed is printed on failure).

    ``CONCEPTEVO_RNG_SEED=<seed>`` replays a printed seed.
    """
    import numpy as np

    fixed = os.environ.get("CONCEPTEVO_RNG_SEED")
    seed = int(fixed) if fixed else int(np.random.SeedSequence().entropy % (2**32))
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
