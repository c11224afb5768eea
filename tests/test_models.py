"""Models x modes: weights files written here load through the same path a user's --weights takes;
frozen mode trains exactly the head; wrong files are clear errors."""
from __future__ import annotations

import pytest
import torch
import torchvision

from tune_cifar.config import UserError
from tune_cifar.models import REGISTRY, build_model, entry, head_of, hub_cache_file, resolve_resolution

PRETRAINED = ["alexnet", "vgg16", "resnet18"]


@pytest.fixture(scope="module")
def weights_files(tmp_path_factory):
    """An ImageNet-shaped state dict per architecture, as torchvision would ship it (random values)."""
    d = tmp_path_factory.mktemp("weights")
    files = {}
    for name in PRETRAINED:
        torch.manual_seed(0)
        files[name] = d / f"{name}.pth"
        torch.save(torchvision.models.get_model(name, weights=None).state_dict(), files[name])
    return files


@pytest.mark.parametrize("name", PRETRAINED)
def test_weights_file_loads_and_frozen_trains_only_the_head(name, weights_files):
    state = torch.load(weights_files[name], weights_only=True)
    full = build_model(name, "full", weights=str(weights_files[name]))
    for key, value in full.state_dict().items():            # every backbone tensor came from the file
        if not key.startswith(entry(name).head):
            assert torch.equal(value, state[key]), key
    assert head_of(full, name).out_features == 10
    assert all(p.requires_grad for p in full.parameters())

    frozen = build_model(name, "frozen", weights=str(weights_files[name]))
    trainable = sum(p.numel() for p in frozen.parameters() if p.requires_grad)
    head = head_of(frozen, name)
    assert trainable == head.weight.numel() + head.bias.numel()
    assert all(p.requires_grad for p in head.parameters())


@pytest.mark.parametrize("name", list(REGISTRY))
def test_scratch_models_run_at_their_resolution(name):
    res = resolve_resolution(name, "scratch", None)
    model = build_model(name, "scratch").eval()
    with torch.no_grad():
        assert model(torch.zeros(2, 3, res, res)).shape == (2, 10)


def test_alexnet_needs_resized_input():
    assert resolve_resolution("alexnet", "scratch", None) == 64
    assert resolve_resolution("alexnet", "full", None) == 224
    with pytest.raises(UserError, match="too small for alexnet"):
        resolve_resolution("alexnet", "scratch", 32)


def test_weights_for_another_architecture(weights_files):
    with pytest.raises(UserError, match="does not fit vgg16"):
        build_model("vgg16", "full", weights=str(weights_files["resnet18"]))


def test_weights_file_missing_or_not_a_state_dict(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        build_model("resnet18", "frozen", weights=str(tmp_path / "nope.pth"))
    (tmp_path / "junk.pth").write_bytes(b"not a torch file")
    with pytest.raises(UserError, match="not a loadable state dict"):
        build_model("resnet18", "frozen", weights=str(tmp_path / "junk.pth"))
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(UserError, match="not a state dict"):
        build_model("resnet18", "frozen", weights=str(tmp_path / "list.pth"))


def test_no_weights_offline_names_the_cache_file_and_the_flag(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))     # an empty cache
    with pytest.raises(UserError) as e:
        build_model("vgg16", "full")
    assert str(hub_cache_file("vgg16")) in str(e.value) and "--weights" in str(e.value)


def test_simple_cnn_has_no_pretrained_modes():
    with pytest.raises(UserError, match="no pretrained weights"):
        build_model("simple_cnn", "frozen")
