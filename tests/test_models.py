"""Models x modes: weights files written here load through the same path a user's --weights takes;
frozen mode trains exactly the head; wrong files are clear errors."""
from __future__ import annotations

import pytest
import torch
import torchvision

from tune_cifar.core.config import UserError
from tune_cifar.core.config import min_resolution, resolve_resolution
from tune_cifar.training.models import REGISTRY, build_model, entry, head_of, hub_cache_file

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


@pytest.mark.parametrize("name, mode, num_classes", [("simple_cnn", "scratch", 3), ("resnet18", "scratch", 100),
                                                     ("alexnet", "frozen", 100), ("vgg16", "full", 3),
                                                     ("resnet18", "full", 2)])
def test_the_head_has_one_output_per_class(name, mode, num_classes, weights_files, tmp_path):
    """Any number of classes (image folders, CIFAR-100): built, saved and rebuilt for export."""
    from tune_cifar.core.config import TrainConfig
    from tune_cifar.results.export import load_trained
    from tune_cifar.training.models import architecture
    weights = str(weights_files[name]) if mode != "scratch" else None
    model = build_model(name, mode, num_classes, width=16, weights=weights).eval()
    assert head_of(model, name).out_features == num_classes
    res = max(32, min_resolution(name))
    with torch.no_grad():
        assert model(torch.zeros(2, 3, res, res)).shape == (2, num_classes)
    classes = [f"c{i}" for i in range(num_classes)]
    cfg = TrainConfig(model=name, mode=mode, width=16, weights=weights)
    torch.save({"model": model.state_dict(), "config": cfg.to_dict(), "classes": classes}, tmp_path / "model.pt")
    loaded, _, loaded_classes = load_trained(tmp_path)
    assert loaded_classes == classes
    assert torch.equal(head_of(loaded, name).weight, head_of(model, name).weight)
    assert architecture(name, mode, num_classes, 16).state_dict().keys() == model.state_dict().keys()
