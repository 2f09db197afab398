"""Model adapter: layer selection, channel counts, hooks, safe checkpoint loading."""
import pickle

import pytest
import torch
from torch import nn

from conceptevo.adapter import ModelAdapter, load_state_dict_file, select_layers
from conceptevo.errors import CheckpointError, LayerError


def small_net(width=4, classes=3):
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(2 * width, classes),
    )


def test_default_layers_are_convs_with_channels_known_before_data():
    ad = ModelAdapter(small_net(), input_shape=(3, 9, 7))
    assert ad.layer_names == ["0", "3"]
    assert ad.channels == {"0": 4, "3": 8}
    assert ad.spatial == {"0": (9, 7), "3": (4, 3)}
    assert ad.offsets == {"0": 0, "3": 4} and ad.num_neurons == 12
    assert ad.neuron_index()[4] == ("3", 0)


def test_selection_by_type_name_regex_and_errors():
    net = small_net()
    assert select_layers(net, nn.Linear) == ["7"]
    assert select_layers(net, (nn.Conv2d, nn.Linear)) == ["0", "3", "7"]
    assert select_layers(net, ["7", "0"]) == ["0", "7"]
    assert select_layers(net, "[03]") == ["0", "3"]
    with pytest.raises(LayerError, match="conv9"):
        select_layers(net, ["conv9"])
    with pytest.raises(LayerError, match="no layer named or matching"):
        select_layers(net, "features.*")
    with pytest.raises(LayerError, match="BatchNorm2d"):
        select_layers(net, nn.BatchNorm2d)
    ad = ModelAdapter(net, layers=nn.Linear)
    assert ad.channels == {"7": 3} and ad.spatial == {"7": (1, 1)}


def test_capture_and_replacing_hook():
    torch.manual_seed(0)
    net = small_net().eval()
    ad = ModelAdapter(net)
    x = torch.randn(2, 3, 8, 8)
    logits, outs = ad.capture(x)
    assert outs["0"].shape == (2, 4, 8, 8) and outs["3"].shape == (2, 8, 4, 4)
    torch.testing.assert_close(logits, net(x))
    with ad.hooks(lambda name, out: torch.zeros_like(out) if name == "3" else None):
        zeroed = net(x)
    torch.testing.assert_close(zeroed, net[7].bias.expand(2, 3))
    assert not net[0]._forward_hooks and not net[3]._forward_hooks, "hooks must be removed"


def test_checkpoint_round_trip_and_wrappers(tmp_path):
    a, b = small_net(), small_net()
    path = tmp_path / "ok.pt"
    torch.save(a.state_dict(), path)
    ModelAdapter(b).load_checkpoint(path)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    wrapped = tmp_path / "wrapped.pt"
    torch.save({"state_dict": {"module." + k: v for k, v in a.state_dict().items()}, "epoch": 3}, wrapped)
    assert set(load_state_dict_file(wrapped)) == set(a.state_dict())
    from safetensors.torch import save_file

    st = tmp_path / "ok.safetensors"
    save_file(a.state_dict(), str(st))
    ModelAdapter(small_net()).load_checkpoint(st)


def test_checkpoint_refusals(tmp_path):
    ad = ModelAdapter(small_net())
    with pytest.raises(CheckpointError, match="not found"):
        ad.load_checkpoint(tmp_path / "missing.pt")
    other = tmp_path / "other.pt"
    torch.save(small_net(width=5).state_dict(), other)
    with pytest.raises(CheckpointError, match=r"wrong shapes .*0\.weight"):
        ad.load_checkpoint(other)
    sd = small_net().state_dict()
    sd.pop("7.bias")
    sd["extra.weight"] = torch.zeros(1)
    partial = tmp_path / "partial.pt"
    torch.save(sd, partial)
    with pytest.raises(CheckpointError, match=r"missing keys .*7\.bias.*unexpected keys .*extra\.weight"):
        ad.load_checkpoint(partial)
    whole = tmp_path / "whole_model.pt"
    torch.save(small_net(), whole)  # pickles the module's code: must be refused, not executed
    with pytest.raises(CheckpointError, match="unpickle"):
        ad.load_checkpoint(whole)
    evil = tmp_path / "evil.pt"
    marker = tmp_path / "pwned.txt"

    class Evil:
        def __reduce__(self):  # unpickling calls open(marker, "w"): the file appears if the payload runs
            return (open, (str(marker), "w"))

    with open(evil, "wb") as fh:
        pickle.dump({"w": Evil()}, fh)
    with open(evil, "rb") as fh:  # the payload is real: a plain unpickle runs it
        pickle.load(fh).pop("w").close()
    assert marker.exists()
    marker.unlink()
    with pytest.raises(CheckpointError, match="evil.pt"):
        ad.load_checkpoint(evil)
    assert not marker.exists(), "loading a checkpoint ran code from it"
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\x00not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pt"):
        ad.load_checkpoint(junk)
    notdict = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], notdict)
    with pytest.raises(CheckpointError, match="not a state dict"):
        ad.load_checkpoint(notdict)


def test_capture_is_not_changed_by_a_following_inplace_relu():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(inplace=True), nn.Flatten(), nn.LazyLinear(2)).eval()
    net(torch.zeros(1, 3, 6, 6))
    ad = ModelAdapter(net, input_shape=(3, 6, 6))
    x = torch.randn(3, 3, 6, 6)
    _, outs = ad.capture(x)
    torch.testing.assert_close(outs["0"], net[0](x))
    assert (outs["0"] < 0).any(), "the pre-ReLU map must keep its negative values"


def test_probe_keeps_each_submodule_mode():
    net = small_net().train()
    net[0].eval()
    ModelAdapter(net)
    assert net.training and not net[0].training and net[3].training
