"""A real two-node Ray cluster on this machine (head + one more node, each with its own CPU): the
same commands join it with --address, trials run on both nodes, results land in results/."""
from __future__ import annotations

import pandas as pd
import pytest
from conftest import TINY, run_cli


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    c.add_node(num_cpus=1)
    c.wait_for_nodes()
    yield c
    c.shutdown()


def test_search_and_kfold_use_both_nodes(cluster, cifar_dir, tmp_path):
    storage = tmp_path / "shared_storage"
    rc, out, err = run_cli("search", TINY, "--address", cluster.address, "--storage", storage,
                           "--data-dir", cifar_dir, "--subset", 2000, "--num-samples", 4, "--max-epochs", 1,
                           "--results-dir", tmp_path / "results", "--name", "on_cluster", "--no-report")
    assert rc == 0, err[-3000:]
    trials = pd.read_csv(tmp_path / "results" / "on_cluster" / "trials.csv")
    assert len(trials) == 4 and trials["node"].nunique() == 2, trials["node"].tolist()
    assert (storage / "on_cluster" / "tune").is_dir()                     # Tune wrote to the shared storage
    assert (tmp_path / "results" / "on_cluster" / "best.json").is_file()  # results came back to results/

    rc, out, err = run_cli("kfold", TINY, "--address", cluster.address, "--k", 2, "--data-dir", cifar_dir,
                           "--subset", 1000, "--epochs", 1, "--results-dir", tmp_path / "results", "--name", "kf",
                           "--no-report")
    assert rc == 0, err[-3000:]
    folds = pd.read_csv(tmp_path / "results" / "kf" / "kfold_folds.csv")
    assert len(folds) == 2 and set(folds["status"]) == {"completed"} and folds["node"].nunique() == 2
