"""GPU scheduling without a GPU: a Ray node that declares 2 GPUs (logical resources: nothing real
behind them) packs 2 trials per GPU with --gpus-per-trial 0.5; each trial is told its GPU ids (and
CUDA_VISIBLE_DEVICES), finds no CUDA and trains on the CPU, and trials.csv records when it ran, on
which GPU ids and on what device. Around it, the resource decisions from given facts: a space file's
GPU share on a machine with GPUs, a share beyond what exists, GPUs only on other nodes of a cluster,
and --gpus-per-trial auto on this CPU machine."""
from __future__ import annotations

import json
from collections import Counter

import pandas as pd
import pytest
from conftest import TINY, run_cli

from tune_cifar.tuning import ray_session
from tune_cifar.core.config import TrainConfig, UserError
from tune_cifar.tuning.runner import fit_to_cluster
from tune_cifar.tuning.ray_session import RayOptions, trial_resources
from tune_cifar.core.spaces import Resources
from tune_cifar.tuning.trainable import placement

CLUSTER = RayOptions(address="10.0.0.1:6379")


def most_overlapping(trials: pd.DataFrame) -> tuple[int, pd.DataFrame]:
    """The largest number of trials running at one moment (from their start/end times) and those trials."""
    start, end = pd.to_datetime(trials["start"]), pd.to_datetime(trials["end"])
    best = trials.iloc[:0]
    for t in start:
        running = trials[(start <= t) & (t < end)]
        if len(running) > len(best):
            best = running
    return len(best), best


@pytest.fixture(scope="module")
def gpu_cluster():
    from ray.cluster_utils import Cluster
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 4, "num_gpus": 2, "include_dashboard": False})
    c.wait_for_nodes()
    yield c
    c.shutdown()


@pytest.mark.slow
def test_two_trials_per_declared_gpu(gpu_cluster, cifar_dir, tmp_path):
    # With a searcher, Tune keeps one trial pending at a time (tune_controller._get_max_pending_trials),
    # so the 4 workers start one after another (each `import torch` + data, ~5 s on a loaded 2-core
    # machine) and a trial that ends meanwhile hands its worker to the pending trial. The trials are
    # sized to outlast that ramp: 24 rounds each (grace period = max epochs: ASHA stops none); 12 were
    # too few once bf16 on a bf16 CPU made each round ~1.7x faster (trials of 12-20 s, a ramp of 14 s).
    rc, out, err = run_cli("search", TINY, "--address", gpu_cluster.address, "--gpus-per-trial", 0.5,
                           "--cpus-per-trial", 1, "--data-dir", cifar_dir, "--subset", 2000, "--num-samples", 8,
                           "--max-epochs", 12, "--grace-period", 12, "--results-dir", tmp_path, "--name", "packed",
                           "--no-report", "--no-tensorboard")
    assert rc == 0, err[-3000:]
    trials = pd.read_csv(tmp_path / "packed" / "trials.csv", dtype={"gpu_ids": str, "cuda_visible_devices": str})
    assert len(trials) == 8 and set(trials["status"]) == {"completed"}, trials[["status", "error"]]
    # each trial was given one GPU id, saw it as CUDA_VISIBLE_DEVICES, and fell back to the CPU
    assert set(trials["gpu_ids"]) == {"0", "1"}, trials["gpu_ids"].tolist()
    assert (trials["cuda_visible_devices"] == trials["gpu_ids"]).all()
    assert (trials["device"] == "cpu (no CUDA; assigned GPU ids " + trials["gpu_ids"] + ")").all()
    # ISO 8601 start and end, in order
    start, end = pd.to_datetime(trials["start"]), pd.to_datetime(trials["end"])
    assert (start < end).all() and all("T" in s for s in trials["start"])
    # 4 trials at once (Ray never packed more), two on each declared GPU
    n, running = most_overlapping(trials)
    print(trials[["trial", "start", "end", "gpu_ids", "cuda_visible_devices", "device"]].to_string(index=False))
    assert n == 4, trials[["trial", "start", "end", "gpu_ids"]].to_string()
    assert Counter(running["gpu_ids"]) == {"0": 2, "1": 2}, running[["trial", "gpu_ids"]]
    plan = json.loads((tmp_path / "packed" / "plan.json").read_text())
    assert plan["resources"] == {"cpu": 1.0, "gpu": 0.5}


def test_placement_falls_back_to_the_cpu():
    cfg = TrainConfig(model="simple_cnn", mode="scratch")
    used, where = placement(cfg, [1], cuda_available=False, cpus=2.0)
    assert used.device == "cpu" and used.threads == 2
    assert where == {"gpu_ids": "1", "device_used": "cpu (no CUDA; assigned GPU ids 1)"}
    used, where = placement(cfg.replace(device="cuda", threads=3), [], cuda_available=False, cpus=1.0)
    assert used.device == "cpu" and used.threads == 3 and where["device_used"] == "cpu (no CUDA)"
    used, where = placement(cfg.replace(device="cpu"), [], cuda_available=False, cpus=1.0)
    assert where == {"gpu_ids": "", "device_used": "cpu"}


def test_space_share_on_a_machine_with_gpus(monkeypatch):
    monkeypatch.setattr(ray_session, "gpus_present", lambda: 2)
    local = RayOptions()
    assert trial_resources(None, None, Resources(gpu=0.25, cpu=1), local) == {"cpu": 1, "gpu": 0.25}
    assert trial_resources(2.0, 1.0, Resources(gpu=0.25, cpu=1), local) == {"cpu": 1.0, "gpu": 2.0}
    # a space file written for a bigger machine is fitted to this one, with a note
    assert trial_resources(None, None, Resources(gpu=4, cpu=1), local)["gpu"] == 2
    # an explicit flag beyond what exists is an error
    with pytest.raises(UserError, match="more than the 2 GPU"):
        trial_resources(3.0, None, Resources(gpu=0.25, cpu=1), local)
    monkeypatch.setattr(ray_session, "gpus_present", lambda: 0)
    with pytest.raises(UserError, match="no GPU is visible"):
        trial_resources(0.5, None, Resources(gpu=0.25, cpu=1), local)
    assert trial_resources(None, None, Resources(gpu=0.25, cpu=1), local)["gpu"] == 0


def test_gpus_only_on_other_nodes_are_accepted(monkeypatch):
    monkeypatch.setattr(ray_session, "gpus_present", lambda: 0)          # the driver's machine has none
    assert trial_resources(0.5, 1.0, Resources(gpu=0.25, cpu=1), CLUSTER) == {"cpu": 1.0, "gpu": 0.5}
    facts = {"address": CLUSTER.address, "gpus": 8, "node_gpus": [0, 4, 4]}    # head without GPUs
    assert fit_to_cluster({"cpu": 1.0, "gpu": 0.5}, facts, explicit_gpu=True) == {"cpu": 1.0, "gpu": 0.5}
    # a share no single node can give: an error as a flag, the largest node's count from a space file
    with pytest.raises(UserError, match="at most 4 on one node"):
        fit_to_cluster({"cpu": 1.0, "gpu": 8.0}, facts, explicit_gpu=True)
    assert fit_to_cluster({"cpu": 1.0, "gpu": 8.0}, facts, explicit_gpu=False)["gpu"] == 4
    # a cluster without any GPU
    none = {"address": CLUSTER.address, "gpus": 0, "node_gpus": [0, 0]}
    with pytest.raises(UserError, match="has no GPU"):
        fit_to_cluster({"cpu": 1.0, "gpu": 0.5}, none, explicit_gpu=True)
    assert fit_to_cluster({"cpu": 1.0, "gpu": 0.5}, none, explicit_gpu=False) == {"cpu": 1.0, "gpu": 0}
    # an auto decision is recorded next to the resources, is no Ray resource, and is not a user's flag
    auto = {"cpu": 1.0, "gpu": 0.25, "gpu_share": {"auto": True, "gpus_per_trial": None}}
    assert fit_to_cluster(auto, none, explicit_gpu=True) == {"cpu": 1.0, "gpu": 0}
    assert fit_to_cluster(auto, facts, explicit_gpu=True) == {"cpu": 1.0, "gpu": 0.25}


def test_gpus_per_trial_auto_on_this_cpu_machine(cifar_dir, tmp_path, capsys):
    from tune_cifar.cli import build_parser, options, ray_options
    from tune_cifar.commands.search import SearchOptions, plan_search
    a = build_parser().parse_args(["search", TINY, "--gpus-per-trial", "auto", "--data-dir", str(cifar_dir),
                                   "--subset", "2000", "--results-dir", str(tmp_path), "--name", "auto"])
    assert a.gpus_per_trial == "auto"
    plan = plan_search(a.space, options(SearchOptions, a, ray=ray_options(a)))
    assert "--gpus-per-trial auto: no GPU: trials run on the CPU" in capsys.readouterr().out
    record = json.loads(json.dumps(plan.record()))           # what run() writes as plan.json
    assert record["resources"]["gpu"] == 0 and plan.resources["gpu"] == 0
    assert record["resources"]["gpu_share"] == {"auto": True, "gpus_per_trial": 0,
                                                "note": "no GPU: trials run on the CPU"}
    assert record["options"]["gpus_per_trial"] == "auto"
    assert plan.kind == "search" and not (tmp_path / "auto").exists()     # planned, nothing written
    assert fit_to_cluster(plan.resources, {"address": "local", "gpus": 0}, explicit_gpu=True) == {"cpu": 1, "gpu": 0}


def test_placement_on_a_gpu(monkeypatch):
    import torch
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    cfg = TrainConfig(model="simple_cnn", mode="scratch")
    used, where = placement(cfg, [1], cuda_available=True, cpus=2.0)
    assert used == cfg                        # threads stay with the GPU (None), the device stays auto
    assert where == {"gpu_ids": "1", "device_used": "cuda:0 (NVIDIA H100 80GB HBM3; GPU ids 1)"}


def test_gpus_per_trial_auto_on_a_gpu_machine(cifar_dir, tmp_path, monkeypatch, capsys):
    """The measured step is replaced by given figures (no GPU here): 20 GiB peak on an 80 GiB card
    -> 3 trials per GPU, 0.3333 GPU each, in the resources Tune gets and recorded beside them."""
    from tune_cifar.training import gpu_share
    from tune_cifar.cli import build_parser, options, ray_options
    from tune_cifar.commands.search import SearchOptions, plan_search
    monkeypatch.setattr(ray_session, "gpus_present", lambda: 1)
    calls = []

    def measure_space(spec, cfg, device="cuda:0"):
        calls.append((cfg.batch_size, cfg.subset))
        return 20 * gpu_share.GIB, 80 * gpu_share.GIB, gpu_share.GIB
    monkeypatch.setattr(gpu_share, "measure_space", measure_space)
    a = build_parser().parse_args(["search", TINY, "--gpus-per-trial", "auto", "--data-dir", str(cifar_dir),
                                   "--subset", "2000", "--results-dir", str(tmp_path), "--name", "auto"])
    plan = plan_search(a.space, options(SearchOptions, a, ray=ray_options(a)))
    assert calls == [(256, 2000)]             # measured once, on the trials' base config
    share = plan.resources["gpu_share"]
    assert plan.resources["gpu"] == 0.3333 and share["trials_per_gpu"] == 3 and share["resident_gib"] == 1.0
    assert share["batch_size"] == 128         # the space's largest batch size
    assert "3 trials per GPU" in capsys.readouterr().out
    assert plan.record()["resources"] == plan.resources
    assert fit_to_cluster(plan.resources, {"address": "local", "gpus": 1, "node_gpus": [1]},
                          explicit_gpu=True) == {"cpu": 1, "gpu": 0.3333}


def test_measured_step_and_resident_bytes():
    """What `auto` measures on a GPU, run here on the CPU: the heaviest configuration of a space and
    one training step of it (pixel and frozen modes), and the data / feature bytes a trial keeps."""
    from tune_cifar.training import gpu_share
    from tune_cifar.core.spaces import load_space
    spec = load_space("resnet18_frozen")
    heavy = gpu_share.heaviest_config(spec, spec.base)
    assert heavy.batch_size == 512 and heavy.mode == "frozen"
    gpu_share.training_step(heavy.replace(resolution=32, batch_size=16), "cpu")()
    simple = load_space(TINY)
    gpu_share.training_step(gpu_share.heaviest_config(simple, simple.base), "cpu")()
    image = 3 * 32 * 32
    assert gpu_share.resident_bytes(simple.base, 900, 100, 1000, image) == 2000 * image
    # frozen: + features of every training image plain and flipped and every validation image (bf16
    # for ResNet18), counted twice for the concatenation that builds them
    assert gpu_share.feature_dim(spec.base) == 512
    assert gpu_share.resident_bytes(spec.base, 900, 100, 1000, image) == 2000 * image + 2 * 1900 * 512 * 2
