"""Stimulus extraction (conceptevo.stimuli) against a brute-force reference, and its guarantees:
one pass over many checkpoints == separate passes, batch-size independence, resume after a crash
(simulated and a real SIGKILL) == uninterrupted run, clear errors, cache hits.

Exactness tests use *integer nets*: integer weights and integer-valued images keep every
activation an exactly representable integer, so the activations do not depend on the order of
floating-point sums (oneDNN changes that order with the batch composition) and ties are plentiful.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from conceptevo.errors import ActivationError, CheckpointError, ConceptEvoError, InputError, LayerError
from conceptevo.stimuli import Extraction, Stimuli, StimulusOptions, extract_stimuli
from conceptevo.store import RunStore

KW = dict(progress=False)


# ------------------------------------------------------------------------------- fixtures
def make_net(width: int = 5) -> nn.Module:
    """conv(3->w) relu pool conv(w->4) relu flatten linear(64->6); names "0".."6"; 8x8 inputs."""
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(width, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 6),
    )


def int_state(seed: int, width: int = 5) -> dict[str, torch.Tensor]:
    """A state dict of make_net with small integer weights: activations are exact integers."""
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randint(-2, 3, v.shape, generator=g).float() for k, v in make_net(width).state_dict().items()}


def real_state(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return make_net().state_dict()


class ArrayDataset(torch.utils.data.Dataset):
    """In-memory float images returning (image, label); optional NaN image or delay per item."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, delay: float = 0.0):
        self.x, self.targets, self.delay = x, y.tolist(), delay

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        if self.delay:
            time.sleep(self.delay)
        return self.x[i], self.targets[i]


def int_images(rng: np.random.Generator, n: int) -> ArrayDataset:
    x = torch.from_numpy(rng.integers(-3, 4, size=(n, 3, 8, 8)).astype(np.float32))
    return ArrayDataset(x, torch.from_numpy(rng.integers(0, 3, size=n)))


def real_images(rng: np.random.Generator, n: int) -> ArrayDataset:
    return ArrayDataset(torch.from_numpy(rng.standard_normal((n, 3, 8, 8)).astype(np.float32)),
                        torch.from_numpy(rng.integers(0, 3, size=n)))


# ------------------------------------------------------------------- brute-force reference
def reference_stimuli(state, ds, layers, k, k_i) -> dict[str, dict[str, np.ndarray]]:
    """All activations of the whole dataset at once (O(images x neurons)), ranked with NumPy."""
    model = make_net(state["0.weight"].shape[0])
    model.load_state_dict(state)
    model.eval()
    mods = dict(model.named_modules())
    outs = {}
    handles = [mods[n].register_forward_hook(lambda m, i, o, n=n: outs.__setitem__(n, o.detach().clone()))
               for n in layers]
    with torch.no_grad():
        model(torch.stack([ds[i][0] for i in range(len(ds))]))
    for h in handles:
        h.remove()
    ref = {}
    for n in layers:
        a = outs[n].numpy()
        if a.ndim == 2:
            a = a[:, :, None, None]
        num, c, h, w = a.shape
        flat = a.reshape(num, c, h * w)
        pos = flat.argmax(axis=2)  # first maximum
        val = np.take_along_axis(flat, pos[:, :, None], 2)[:, :, 0].astype(np.float32) + np.float32(0)  # -0 -> +0
        ids = np.full((c, k), -1, np.int64)
        vals = np.full((c, k), -np.inf, np.float32)
        rows = np.full((c, k), -1, np.int32)
        cols = np.full((c, k), -1, np.int32)
        for ch in range(c):
            order = np.lexsort((np.arange(num), -val[:, ch]))[:k]
            m = len(order)
            ids[ch, :m], vals[ch, :m] = order, val[order, ch]
            rows[ch, :m], cols[ch, :m] = pos[order, ch] // w, pos[order, ch] % w
        resp = np.full((num, k_i), -1, np.int32)
        resp_v = np.full((num, k_i), -np.inf, np.float32)
        for i in range(num):
            order = np.lexsort((np.arange(c), -val[i]))[:k_i]
            resp[i, :len(order)], resp_v[i, :len(order)] = order, val[i, order]
        ref[n] = dict(ids=ids, values=vals, rows=rows, cols=cols, responsive=resp, responsive_values=resp_v)
    return ref


def assert_same(a: Stimuli, b: Stimuli) -> None:
    assert list(a.layers) == list(b.layers)
    assert a.num_images == b.num_images
    for n in a.layers:
        for f in ("ids", "values", "rows", "cols", "responsive", "responsive_values"):
            x, y = getattr(a.layers[n], f), getattr(b.layers[n], f)
            assert x.dtype == y.dtype and x.shape == y.shape, (n, f)
            np.testing.assert_array_equal(x, y, err_msg=f"layer {n} field {f}")
    assert a.equals(b)


# ------------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("layers,k,k_i", [(None, 4, 3), (["0", "1", "3", "6"], 7, 6), (["1", "4"], 60, 9)])
def test_matches_bruteforce_reference(rng, layers, k, k_i):
    names = layers or ["0", "3"]
    # Integer activations make equal maxima among a neuron's stimuli likely but not certain (with
    # k = 4, about 1 draw in 25 has none): draw until the input has such a tie, so that the tie
    # order is exercised in every run.
    for _ in range(100):
        n = int(rng.integers(20, 45))
        ds = int_images(rng, n)
        state = int_state(int(rng.integers(1 << 30)))
        ref = reference_stimuli(state, ds, names, k, k_i)
        ties = [(v[:, 1:] == v[:, :-1]) & np.isfinite(v[:, 1:]) for v in (ref[nm]["values"] for nm in names)]
        if any(t.any() for t in ties):
            break
    else:
        raise AssertionError("100 random integer inputs without one tie among a neuron's stimuli")
    (got,) = extract_stimuli(make_net, [state], ds, layers=layers, k=k, k_i=k_i,
                             batch_size=int(rng.integers(1, 9)), **KW)
    assert list(got.layers) == names
    for name in names:
        for f, want in ref[name].items():
            np.testing.assert_array_equal(getattr(got.layers[name], f), want, err_msg=f"layer {name} {f}")


def test_stimuli_helpers_and_roundtrip(rng, tmp_path):
    ds = int_images(rng, 23)
    (s,) = extract_stimuli(make_net, [int_state(3)], ds, layers=["0", "3", "6"], k=5, k_i=2, batch_size=6,
                           names=["run/epoch_001"], **KW)
    assert s.name == "run/epoch_001" and s.num_neurons == 5 + 4 + 6 and s.k == 5 and s.k_i == 2
    ns = s.neuron_stimuli()
    assert ns.dtype == np.int64 and ns.shape == (15, 5)
    layer, channel = s.layer_of_neuron()
    for flat in range(15):  # the flat index walks layers in order, channels within
        np.testing.assert_array_equal(ns[flat], s.layers[layer[flat]].ids[channel[flat]])
    assert s.offsets == {"0": 0, "3": 5, "6": 9}
    store = RunStore(tmp_path / "run")
    s.save(store, "somewhere/x")
    back = Stimuli.load(store, "somewhere/x")
    assert_same(s, back)
    assert back.name == "run/epoch_001"


def test_one_pass_over_checkpoints_equals_separate_passes(rng):
    ds = real_images(rng, 31)  # real-valued weights and images: same batches -> bitwise equal
    states = [real_state(int(rng.integers(1 << 30))) for _ in range(3)]
    together = extract_stimuli(make_net, states, ds, layers=["0", "3", "6"], k=4, k_i=3, batch_size=8, **KW)
    swapped = extract_stimuli(make_net, states, ds, layers=["0", "3", "6"], k=4, k_i=3, batch_size=8,
                              swap_weights=True, **KW)
    for st, a, b in zip(states, together, swapped):
        (alone,) = extract_stimuli(make_net, [st], ds, layers=["0", "3", "6"], k=4, k_i=3, batch_size=8, **KW)
        assert_same(a, alone)
        assert_same(b, alone)
    assert not together[0].layers["0"].equals(together[1].layers["0"])  # the checkpoints really differ


def test_model_instance_and_own_weights(rng):
    ds = int_images(rng, 17)
    model = make_net()
    model.load_state_dict(int_state(5))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    (own,) = extract_stimuli(model, None, ds, k=3, k_i=2, batch_size=5, **KW)
    (given,) = extract_stimuli(make_net, [int_state(5)], ds, k=3, k_i=2, batch_size=5, **KW)
    assert_same(own, given)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # not modified
    assert model.training  # mode untouched


def test_result_independent_of_batch_size(rng):
    n = int(rng.integers(25, 40))
    ds = int_images(rng, n)
    states = [int_state(int(rng.integers(1 << 30))) for _ in range(2)]
    runs = [extract_stimuli(make_net, states, ds, layers=["0", "1", "6"], k=6, k_i=4, batch_size=b, **KW)
            for b in (1, 7, n, n + 5)]
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert_same(a, b)


def test_k_larger_than_dataset_and_k_i_zero(rng):
    ds = int_images(rng, 5)
    (s,) = extract_stimuli(make_net, [int_state(1)], ds, k=8, k_i=0, batch_size=2, **KW)
    lay = s.layers["0"]
    assert (lay.ids[:, 5:] == -1).all() and np.isneginf(lay.values[:, 5:]).all()
    assert sorted(lay.ids[0, :5].tolist()) == [0, 1, 2, 3, 4]
    assert lay.responsive.shape == (5, 0) and lay.responsive_values.shape == (5, 0)


def test_wrong_layer_name_is_named(rng):
    ds = int_images(rng, 6)
    with pytest.raises(LayerError, match="features.nope"):
        extract_stimuli(make_net, [int_state(1)], ds, layers=["0", "features.nope"], **KW)


def test_architecture_mismatch_is_named_before_the_pass(rng, tmp_path):
    ds = int_images(rng, 12)
    good, bad = tmp_path / "good.pt", tmp_path / "wide_epoch_003.pt"
    torch.save(int_state(1), good)
    torch.save(int_state(2, width=7), bad)  # another architecture: conv widths differ
    seen = []
    with pytest.raises(CheckpointError, match=r"wide_epoch_003\.pt.*(0\.weight|wrong shapes)"):
        extract_stimuli(make_net, [good, bad], ds, batch_size=4, on_batch=lambda b, n: seen.append(n), **KW)
    assert seen == []  # nothing was processed
    with pytest.raises(CheckpointError, match="not found"):
        extract_stimuli(make_net, [tmp_path / "missing.pt"], ds, **KW)


def test_nan_activation_names_checkpoint_layer_and_image(rng):
    ds = real_images(rng, 19)
    bad_id = int(rng.integers(5, 19))
    ds.x[bad_id, 1, 2, 3] = float("nan")
    with pytest.raises(ActivationError) as info:
        extract_stimuli(make_net, [real_state(1), real_state(2)], ds, layers=["3", "6"], batch_size=4,
                        names=["a", "b"], **KW)
    msg = str(info.value)
    assert "'a'" in msg and "'3'" in msg and f"[{bad_id}]" in msg


def test_cache_second_call_loads(rng, tmp_path):
    ds = real_images(rng, 21)
    paths = []
    for i in range(3):
        paths.append(tmp_path / "ck" / f"epoch_{i:03d}.pt")
        paths[-1].parent.mkdir(exist_ok=True)
        torch.save(real_state(10 + i), paths[-1])
    store = RunStore(tmp_path / "run")
    calls = []
    first = extract_stimuli(make_net, paths, ds, k=3, k_i=2, batch_size=5, store=store,
                            on_batch=lambda b, n: calls.append(n), **KW)
    assert calls and calls[-1] == 21
    stages = store.manifest["stages"]
    assert set(stages) == {f"stimuli/epoch_{i:03d}" for i in range(3)}
    assert stages["stimuli/epoch_000"]["backends"]["topk"] in ("cpu", "reference", "triton")
    calls.clear()
    second = extract_stimuli(make_net, paths, ds, k=3, k_i=2, batch_size=9, store=store,
                             on_batch=lambda b, n: calls.append(n), **KW)
    assert calls == []  # loaded, not recomputed (batch size is not part of the key)
    for a, b in zip(first, second):
        assert_same(a, b)
    # a changed checkpoint is recomputed, alone; a changed k recomputes everything
    time.sleep(0.01)
    torch.save(real_state(99), paths[1])
    third = extract_stimuli(make_net, paths, ds, k=3, k_i=2, batch_size=5, store=store,
                            on_batch=lambda b, n: calls.append(n), **KW)
    assert calls and calls[-1] == 21
    assert_same(third[0], first[0]) and assert_same(third[2], first[2])
    assert not third[1].equals(first[1])
    (fresh,) = extract_stimuli(make_net, [paths[1]], ds, k=3, k_i=2, batch_size=5, **KW)
    assert_same(third[1], fresh)
    assert not store.path("stimuli/_progress").exists()


class _Crash(RuntimeError):
    pass


@pytest.mark.parametrize("save_every,crash_after", [(2, 5), (3, 2)])
def test_resume_after_crash_equals_uninterrupted(rng, tmp_path, save_every, crash_after):
    n = 37
    ds = real_images(rng, n)
    states = [real_state(int(rng.integers(1 << 30))) for _ in range(2)]
    kw = dict(layers=["0", "3", "6"], k=4, k_i=3, batch_size=4, **KW)
    want = extract_stimuli(make_net, states, ds, **kw)
    store = RunStore(tmp_path / "run")

    def crash(batches, next_id):
        if batches == crash_after:
            raise _Crash

    with pytest.raises(_Crash):
        extract_stimuli(make_net, states, ds, store=store, save_every=save_every, on_batch=crash, **kw)
    saved = (crash_after // save_every) * save_every * 4
    doc_path = store.path("stimuli/_progress/main/progress.json")
    assert json.loads(doc_path.read_text())["processed"] == saved if saved else not doc_path.exists()
    firsts = []
    got = extract_stimuli(make_net, states, ds, store=store, save_every=save_every,
                          on_batch=lambda b, i: firsts.append(i), **kw)
    assert firsts[0] == min(n, saved + 4)  # continued after the last save, not from 0
    for a, b in zip(got, want):
        assert_same(a, b)
    if save_every != 2:
        return
    # resume=False starts over (and still gives the same result)
    with pytest.raises(_Crash):
        extract_stimuli(make_net, states, ds, store=store, save_every=save_every, on_batch=crash,
                        recompute=True, **kw)
    firsts.clear()
    again = extract_stimuli(make_net, states, ds, store=store, save_every=save_every, resume=False,
                            recompute=True, on_batch=lambda b, i: firsts.append(i), **kw)
    assert firsts[0] == 4
    for a, b in zip(again, want):
        assert_same(a, b)


def test_resume_ignores_progress_of_other_parameters(rng, tmp_path):
    ds = real_images(rng, 20)
    st = [real_state(4)]
    store = RunStore(tmp_path / "run")

    def crash(batches, next_id):
        if batches == 3:
            raise _Crash

    with pytest.raises(_Crash):
        extract_stimuli(make_net, st, ds, k=3, k_i=2, batch_size=4, store=store, save_every=1, on_batch=crash, **KW)
    firsts = []
    got = extract_stimuli(make_net, st, ds, k=4, k_i=2, batch_size=4, store=store, save_every=1,
                          on_batch=lambda b, i: firsts.append(i), **KW)  # k changed: start over
    assert firsts[0] == 4
    assert_same(got[0], extract_stimuli(make_net, st, ds, k=4, k_i=2, batch_size=4, **KW)[0])


_CHILD = """
import sys, time, torch
sys.path.insert(0, {tests!r})
torch.set_num_threads(1)
from test_stimuli import ArrayDataset, make_net
from conceptevo.stimuli import extract_stimuli
x, y = torch.load({data!r})
ds = ArrayDataset(x, y, delay=0.01)
extract_stimuli(make_net, {ckpts!r}, ds, layers=["0", "3", "6"], k=4, k_i=3, batch_size=4,
                store={run!r}, save_every=1, progress=False)
print("finished")
"""


def test_resume_after_sigkill(rng, tmp_path):
    n = 64
    ds = real_images(rng, n)
    torch.save((ds.x, torch.tensor(ds.targets)), tmp_path / "data.pt")
    ckpts = []
    for i in range(2):
        ckpts.append(str(tmp_path / f"epoch_{i}.pt"))
        torch.save(real_state(int(rng.integers(1 << 30))), ckpts[-1])
    run = tmp_path / "run"
    script = _CHILD.format(tests=str(Path(__file__).parent), data=str(tmp_path / "data.pt"), ckpts=ckpts, run=str(run))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(script)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    doc_path = run / "stimuli" / "_progress" / "main" / "progress.json"
    deadline = time.time() + 60
    processed = 0
    while time.time() < deadline and proc.poll() is None:
        if doc_path.exists():
            try:
                processed = json.loads(doc_path.read_text())["processed"]
            except (ValueError, OSError):
                processed = 0
            if processed >= 12:
                break
        time.sleep(0.005)
    if proc.poll() is not None:
        out, err = proc.communicate()
        pytest.fail(f"child ended before it could be killed: {out.decode()} {err.decode()[-2000:]}")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    saved = json.loads(doc_path.read_text())["processed"]
    assert 12 <= saved < n
    kw = dict(layers=["0", "3", "6"], k=4, k_i=3, batch_size=4, **KW)
    firsts = []
    got = extract_stimuli(make_net, ckpts, ds, store=RunStore(run), save_every=1,
                          on_batch=lambda b, i: firsts.append(i), **kw)
    assert firsts[0] == saved + 4
    want = extract_stimuli(make_net, ckpts, ds, **kw)
    for a, b in zip(got, want):
        assert_same(a, b)


def test_amp_bf16_matches_reference_of_bf16_activations(rng):
    """amp=True on the CPU: the maxima are those of the bf16 activations (ranked as floats)."""
    ds = real_images(rng, 15)
    state = real_state(7)
    (got,) = extract_stimuli(make_net, [state], ds, layers=["0"], k=4, k_i=3, batch_size=15, amp=True, **KW)
    model = make_net()
    model.load_state_dict(state)
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        act = model[0](torch.stack([ds[i][0] for i in range(15)]))
    assert act.dtype == torch.bfloat16
    maxima = act.float().amax(dim=(2, 3)).numpy()
    for ch in range(5):
        order = np.lexsort((np.arange(15), -maxima[:, ch]))[:4]
        np.testing.assert_array_equal(got.layers["0"].ids[ch], order)
        np.testing.assert_array_equal(got.layers["0"].values[ch], maxima[order, ch])


# ------------------------------------------------------------ diverged checkpoints, accuracy
def test_diverged_checkpoints_are_recorded_and_the_rest_carries_on(rng, tmp_path):
    ds = real_images(rng, 37)
    good, nan_weights, nan_later = real_state(1), real_state(2), real_state(3)
    nan_weights["3.weight"][0, 0, 0, 0] = float("nan")          # diverged weights
    nan_later["0.bias"][:] = float("inf")                         # inf - inf -> NaN after the first conv
    bad_img = 11
    ds.x[bad_img, 0, 0, 0] = 1e38                                 # one image overflows a finite net too
    huge = real_state(4)
    huge["0.weight"].mul_(1e37)
    store = RunStore(tmp_path / "run")
    out = extract_stimuli(make_net, [good, nan_weights, nan_later, huge], ds, k=3, k_i=2, batch_size=8,
                          store=store, names=["good", "nan_w", "inf_bias", "huge"], on_diverged="record", **KW)
    # the healthy checkpoint equals a pass on its own
    alone = extract_stimuli(make_net, [good], ds, k=3, k_i=2, batch_size=8, **KW)[0]
    assert out[0].diverged is None
    assert_same(out[0], alone)
    assert "non-finite weights in 3.weight" in out[1].diverged and out[1].layers == {}
    assert "non-finite weights in 0.bias" in out[2].diverged
    assert out[3].diverged is not None and out[3].layers == {}
    # the record survives a reload from the store (no recomputation needed)
    again = extract_stimuli(make_net, [good, nan_weights, nan_later, huge], ds, k=3, k_i=2, batch_size=8,
                            store=store, names=["good", "nan_w", "inf_bias", "huge"], on_diverged="record", **KW)
    assert [s.diverged for s in again] == [s.diverged for s in out]
    # by default a NaN still stops the pass with an error naming the checkpoint
    with pytest.raises(ActivationError, match="nan_w|NaN"):
        extract_stimuli(make_net, [nan_later], ds, k=3, batch_size=8, names=["nan_w"], **KW)


def test_nan_activation_names_the_layer_and_first_bad_images(rng):
    ds = real_images(rng, 30)
    ds.x[7, 1, 2, 3] = float("nan")
    ds.x[19, 0, 0, 0] = float("nan")
    out = extract_stimuli(make_net, [real_state(1)], ds, k=3, batch_size=64, names=["c"], on_diverged="record",
                          **KW)
    assert out[0].diverged.startswith("NaN activations in layer '0'") and "[7, 19]" in out[0].diverged


def test_accuracy_from_the_pass_equals_a_plain_evaluation(rng):
    ds = real_images(rng, 53)
    ds.targets = rng.integers(0, 6, 53).tolist()
    states = [real_state(s) for s in (1, 2)]
    out = extract_stimuli(make_net, states, ds, k=3, k_i=1, batch_size=8, accuracy=True, **KW)
    plain = extract_stimuli(make_net, states, ds, k=3, k_i=1, batch_size=8, **KW)
    y = torch.tensor(ds.targets)
    for st, stim, ref in zip(states, out, plain):
        net = make_net()
        net.load_state_dict(st)
        with torch.no_grad():
            logits = net(torch.stack([ds[i][0] for i in range(len(ds))]))
        top5 = logits.topk(5, dim=1).indices
        assert stim.accuracy["images"] == 53
        assert stim.accuracy["top1"] == pytest.approx(float((top5[:, 0] == y).float().mean()))
        assert stim.accuracy["top5"] == pytest.approx(float((top5 == y[:, None]).any(1).float().mean()))
        assert_same(stim, ref)  # running the head changes no stimulus
        assert ref.accuracy is None


# ------------------------------------------------------------------------ StimulusOptions
def test_options_object_and_keywords_give_identical_stimuli(rng, tmp_path):
    """The same settings as keywords, as a StimulusOptions, and through Extraction: the same arrays --
    and they are the settings asked for, not the defaults (k=3, k_i=2, two layers)."""
    ds = real_images(rng, int(rng.integers(20, 40)))
    states = [real_state(int(rng.integers(1 << 30))) for _ in range(2)]
    kw = {"layers": ["0", "3"], "k": 3, "k_i": 2, "batch_size": int(rng.integers(2, 9)), "device": "cpu",
          "backend": "auto", "progress": False, "accuracy": True, "on_diverged": "record", "input_shape": (3, 8, 8)}
    by_keywords = extract_stimuli(make_net, states, ds, names=["a", "b"], **kw)
    options = StimulusOptions(**kw)
    by_options = extract_stimuli(make_net, states, ds, names=["a", "b"], options=options)
    plan = Extraction(make_net, states, ds, names=["a", "b"], options=options)
    assert plan.options is options
    by_plan = [plan.to_stimuli(spec, st) for spec, st in
               zip(plan.checkpoints, plan.run_shard(plan.checkpoints, progress=False))]
    for got in (by_options, by_plan):
        for a, b in zip(by_keywords, got):
            assert a.name == b.name and a.accuracy == b.accuracy
            assert_same(a, b)
    for s in by_keywords:
        assert s.layer_names == ["0", "3"] and s.k == 3 and s.k_i == 2 and s.accuracy is not None
    # with a store: the options' run fields (recompute) are honoured, and the cache key is the same
    store = RunStore(tmp_path / "run")
    first = extract_stimuli(make_net, states, ds, store=store, names=["a", "b"], options=options)
    again = extract_stimuli(make_net, states, ds, store=store, names=["a", "b"], **kw)  # cache hit
    for a, b, c in zip(by_keywords, first, again):
        assert_same(a, b)
        assert_same(a, c)


@pytest.mark.parametrize("field,value", [
    ("k", 0), ("k_i", -1), ("batch_size", 2.5), ("num_workers", True), ("save_every", -3),
    ("on_diverged", "ignore"), ("amp", "fp8"), ("backend", "fast"), ("device", "gpu0"),
    ("input_shape", (3, 0, 8)), ("progress", "yes"), ("observer", "print"), ("dataset_key", 7),
])
def test_bad_option_names_the_field(rng, field, value):
    with pytest.raises(InputError, match=rf"StimulusOptions\.{field} must be .*, got " + re.escape(repr(value))) as info:
        StimulusOptions(**{field: value})
    assert isinstance(info.value, ValueError) and isinstance(info.value, ConceptEvoError)
    # the keyword path checks the same way, before any model or data is touched
    with pytest.raises(InputError, match=rf"StimulusOptions\.{field} "):
        extract_stimuli(make_net, None, int_images(rng, 4), **{field: value})
    with pytest.raises(InputError, match=rf"StimulusOptions\.{field} "):
        Extraction(make_net, None, int_images(rng, 4), **{field: value})


def test_option_given_twice_or_unknown_is_refused(rng):
    ds = int_images(rng, 6)
    options = StimulusOptions(k=3, progress=False)
    for call in (extract_stimuli, Extraction):
        with pytest.raises(InputError, match="k given both in options and as keyword"):
            call(make_net, None, ds, options=options, k=3)  # even the same value: one place per field
        with pytest.raises(InputError, match="batch_size, layers given both"):
            call(make_net, None, ds, options=options, batch_size=2, layers=["0"])
        with pytest.raises(TypeError, match="'kk' \\(did you mean 'k'\\?\\)"):
            call(make_net, None, ds, kk=3)
    with pytest.raises(InputError, match="options must be a StimulusOptions, got dict"):
        extract_stimuli(make_net, None, ds, options={"k": 3})
    with pytest.raises(Exception, match="frozen|cannot assign"):
        options.k = 5  # validated once: no later change can skip the checks
    (s,) = extract_stimuli(make_net, None, ds, options=dataclasses.replace(options, k=2))
    assert s.k == 2
