"""The final model: bagged split models and flip TTA as one module (training/final.py), chosen with
--final / --tta, tested once, saved in best_model.pt and exported (pt, pt2, onnx) so that a user's
runtime gives the tool's own predictions on the real test images."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from conftest import TINY, run_cli

from tune_cifar.core.config import TrainConfig
from tune_cifar.training.final import Bagged, FinalModel, FlipTTA, Member, predictor
from tune_cifar.training.models import architecture


class Fixed(nn.Module):
    """Logits that depend on the left half of the image only (so mirroring it changes them)."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        left = x[..., : x.shape[-1] // 2].mean(dim=(2, 3))       # (B, 3)
        return left @ self.weight                                # (B, C)


def test_bagging_is_the_log_of_the_mean_softmax():
    torch.manual_seed(0)
    a, b, c = (Fixed(torch.randn(3, 4) * 3) for _ in range(3))
    x = torch.randn(5, 3, 8, 8)
    got = Bagged([a, b, c])(x)
    expected = torch.log((a(x).softmax(1) + b(x).softmax(1) + c(x).softmax(1)) / 3)
    torch.testing.assert_close(got, expected)
    assert torch.allclose(got.exp().sum(1), torch.ones(5))
    # the ensemble's vote is not the vote of its first member: the members really are averaged
    assert not torch.equal(got.argmax(1), a(x).argmax(1)) or not torch.equal(got, a(x).log_softmax(1))


def test_flip_tta_averages_the_image_and_its_mirror():
    torch.manual_seed(1)
    m = Fixed(torch.randn(3, 4) * 3)
    x = torch.randn(6, 3, 8, 8)
    mirrored = torch.flip(x, dims=[3])
    assert not torch.allclose(m(x), m(mirrored))                  # the mirror is another view
    expected = torch.log((m(x).softmax(1) + m(mirrored).softmax(1)) / 2)
    torch.testing.assert_close(FlipTTA(m)(x), expected)
    # an image that is its own mirror gets the model's own softmax
    symmetric = torch.cat([x[..., :4], torch.flip(x[..., :4], dims=[3])], dim=3)
    torch.testing.assert_close(FlipTTA(m)(symmetric), m(symmetric).log_softmax(1))
    # TTA over an ensemble: the mean over members and views
    n = Fixed(torch.randn(3, 4))
    both = predictor([m, n], "flip")(x)
    views = [m(x), m(mirrored), n(x), n(mirrored)]
    torch.testing.assert_close(both, torch.log(sum(v.softmax(1) for v in views) / 4))


def test_a_single_model_without_tta_is_the_model_itself():
    m = Fixed(torch.randn(3, 4))
    assert predictor([m], "none") is m
    assert isinstance(predictor([m], "flip"), FlipTTA) and isinstance(predictor([m, m], "none"), Bagged)


def test_bagged_record_round_trips_through_weights_only_load(tmp_path):
    cfg = TrainConfig(model="simple_cnn", mode="scratch", width=8)
    torch.manual_seed(2)
    members = [Member(cfg, architecture("simple_cnn", "scratch", 10, 8).eval(), {"split": i}) for i in range(3)]
    final = FinalModel("bagging", "flip", members)
    torch.save(final.record([f"c{i}" for i in range(10)]), tmp_path / "best_model.pt")
    saved = torch.load(tmp_path / "best_model.pt", weights_only=True)
    assert saved["final"]["kind"] == "bagging" and saved["final"]["n_members"] == 3 and len(saved["members"]) == 3
    again = FinalModel.from_record(saved, where=str(tmp_path / "best_model.pt"))
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(again.predictor()(x), final.predictor()(x))
    assert [m.about["split"] for m in again.members] == [0, 1, 2]


def test_an_old_best_model_file_is_one_model_without_tta(tmp_path):
    cfg = TrainConfig(model="simple_cnn", mode="scratch", width=8)
    model = architecture("simple_cnn", "scratch", 10, 8).eval()
    saved = {"model": model.state_dict(), "config": cfg.to_dict(), "classes": [str(i) for i in range(10)]}
    final = FinalModel.from_record(saved, where=str(tmp_path / "best_model.pt"))
    assert (final.kind, final.tta, len(final.members)) == ("best_trial", "none", 1)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(final.predictor()(x), model(x))


@pytest.mark.parametrize("extra, flag", [
    (("--final", "bagging"), "--final"),                          # bagging needs the CV stage's split models
    (("--final", "retrain"), "--final"),
    (("--cv-top", 2, "--final", "boosting"), "--final"),
    (("--tta", "rotate"), "--tta"),
    (("--cv-top", 2, "--tta", "FLIP"), "--tta"),
])
def test_bad_final_flags_are_one_line_errors(extra, flag, cifar_dir, tmp_path):
    rc, _, err = run_cli("search", TINY, "--data-dir", cifar_dir, "--subset", 2000, "--results-dir", tmp_path / "r", *extra)
    assert rc == 2 and len(err.strip().splitlines()) == 1 and flag in err, err
    assert not (tmp_path / "r").exists()


def test_train_rejects_an_unknown_tta(cifar_dir, tmp_path):
    rc, _, err = run_cli("train", TINY, "--data-dir", cifar_dir, "--results-dir", tmp_path / "r", "--tta", "mirror")
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "--tta" in err, err
    assert not (tmp_path / "r").exists()


def agreement(predicted: np.ndarray, tool: list[int]) -> float:
    return float(np.mean(predicted == np.asarray(tool)))


@pytest.mark.slow
def test_bagging_with_flip_end_to_end_and_its_exports_agree(ray_session, cli, cifar_dir, cifar, tmp_path):
    """search --cv-top 2 --k 3 --final bagging --tta flip: the winner's 3 split models with flip TTA
    tested once; plan.json and best.json say so; the ONNX (onnxruntime) and pt2 (torch.export.load)
    exports predict what the tool predicted on the 10,000 real test images."""
    results = tmp_path / "r"
    args = ("search", TINY, "--data-dir", cifar_dir, "--subset", 2000, "--num-samples", 3, "--max-epochs", 1,
            "--cv-top", 2, "--k", 3, "--final", "bagging", "--tta", "flip", "--results-dir", results,
            "--name", "bag", "--no-report")
    rc, out, err = cli(*args)
    assert rc == 0, err
    exp = results / "bag"
    plan = json.loads((exp / "plan.json").read_text())
    assert plan["options"]["final"] == "bagging" and plan["options"]["tta"] == "flip"
    best = json.loads((exp / "best.json").read_text())
    assert best["final"]["kind"] == "bagging" and best["final"]["tta"] == "flip" and best["final"]["n_members"] == 3
    assert [m["split"] for m in best["final"]["members"]] == [0, 1, 2]
    assert not (exp / "retrain.pt").exists()                    # bagging trains nothing more
    saved = torch.load(exp / "best_model.pt", weights_only=True)
    assert len(saved["members"]) == 3 and saved["final"]["tta"] == "flip"
    for member in saved["members"]:                             # the winner's configuration, 3 different models
        for key, value in best["best_config"].items():
            assert member["config"][key] == pytest.approx(value)
    first = saved["members"][0]["model"]
    assert all(not torch.equal(first[k], m["model"][k]) for m in saved["members"][1:] for k in first
               if k.endswith("weight"))
    tool = json.loads((exp / "test_predictions.json").read_text())
    assert best["test_acc"] == pytest.approx(agreement(np.asarray(tool["predictions"]), tool["labels"]))

    # --resume of the finished experiment keeps the plan's final model, and --final contradicting it is an error
    rc, _, err = cli("search", TINY, "--final", "retrain", "--results-dir", results, "--name", "bag", "--resume")
    assert rc == 2 and "--final" in err and len(err.strip().splitlines()) == 1, err

    from tune_cifar.data.store import to_model_input
    x = to_model_input(torch.from_numpy(cifar.test_x), 32)
    rc, out, err = cli("export", exp, "--format", "onnx")
    assert rc == 0, err
    onnx_file = Path(out.strip().splitlines()[-1])
    meta = json.loads(onnx_file.with_name(onnx_file.name + ".json").read_text())
    assert meta["final"] == {"kind": "bagging", "tta": "flip", "n_members": 3} and "log-probabilities" in meta["output"]
    import onnx
    import onnxruntime
    onnx.checker.check_model(onnx.load(str(onnx_file)))
    session = onnxruntime.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape[0] == "batch"          # any batch size
    served = np.concatenate([session.run(None, {"image": x[i:i + 1000].numpy()})[0] for i in range(0, len(x), 1000)])
    assert np.allclose(np.exp(served).sum(1), 1, atol=1e-4)      # the mean softmax, as log-probabilities
    onnx_agree = agreement(served.argmax(1), tool["predictions"])
    assert onnx_agree >= 0.995, onnx_agree

    rc, out, err = cli("export", exp, "--format", "pt2")
    assert rc == 0, err
    program = torch.export.load(out.strip().splitlines()[-1]).module()
    with torch.no_grad():
        got = torch.cat([program(x[i:i + 1000]) for i in range(0, len(x), 1000)]).argmax(1).numpy()
        one = program(x[:1])                                     # a batch of one works too
    assert one.shape == (1, 10)
    pt2_agree = agreement(got, tool["predictions"])
    assert pt2_agree >= 0.995, pt2_agree
    print(f"agreement with test_predictions.json: onnx {onnx_agree:.4f}, pt2 {pt2_agree:.4f}; "
          f"test_acc {best['test_acc']:.4f}")
