"""Backend selection: automatic fallback to the CPU, clear errors when forcing what is missing."""
import pytest

from conceptevo import backends
from conceptevo.errors import BackendError


@pytest.mark.parametrize("kind", sorted(backends.KINDS))
def test_auto_falls_back_without_error(kind, monkeypatch):
    monkeypatch.setattr(backends, "cuda_available", lambda: False)
    backends._gpu_library_problem.cache_clear()
    assert backends.select(kind, "auto") == backends.KINDS[kind][1]
    assert backends.select(kind, "cpu") == backends.KINDS[kind][1]


@pytest.mark.parametrize("kind", sorted(backends.KINDS))
def test_forcing_a_missing_gpu_backend_names_the_problem(kind, monkeypatch):
    monkeypatch.setattr(backends, "cuda_available", lambda: False)
    backends._gpu_library_problem.cache_clear()
    with pytest.raises(BackendError, match="forced but cannot run: no CUDA device"):
        backends.select(kind, "gpu")


def test_missing_library_is_named(monkeypatch):
    monkeypatch.setattr(backends, "cuda_available", lambda: True)
    backends._gpu_library_problem.cache_clear()
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *a, **kw):
        if name == "cuml":
            raise ImportError("No module named 'cuml'", name="cuml")
        return real_import(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(BackendError, match="cuml is not installed"):
        backends.select("umap", "cuml")
    backends._gpu_library_problem.cache_clear()


def test_unknown_names():
    with pytest.raises(BackendError, match="unknown backend kind"):
        backends.select("nope")
    with pytest.raises(BackendError, match="unknown backend 'fast'"):
        backends.select("umap", "fast")
