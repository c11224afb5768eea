"""A real two-node Ray cluster on this machine (head + one more node, each with its own CPU): the
same commands join it with --address, trials run on both nodes, results land in results/."""
from __future__ import annotations

import pandas as pd
import pytest
from conftest import TINY, run_cli

pytestmark = pytest.mark.slow          # end-to-end runs: `pytest -m 'not slow'` leaves them out


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    c.add_node(num_cpus=1)
    c.wait_for_nodes()
    yield c
    c.shutdown()


def test_search_and_kfold_use_both_nodes(cluster, cifar_dir, tmp_path):
    # Tune reuses a finished trial's actor for the next pending trial, so a second node only gets work
    # if its worker starts (Ray worker + `import torch`, seconds on a loaded 2-core machine) before the
    # first node runs out of trials. Real trials last minutes; these are sized to last ~15 s each so
    # that the test does not depend on that race.
    storage = tmp_path / "shared_storage"
    rc, out, err = run_cli("search", TINY, "--address", cluster.address, "--storage", storage,
                           "--data-dir", cifar_dir, "--subset", 10000, "--num-samples", 4, "--max-epochs", 2,
                           "--results-dir", tmp_path / "results", "--name", "on_cluster", "--no-report")
    assert rc == 0, err[-3000:]
    trials = pd.read_csv(tmp_path / "results" / "on_cluster" / "trials.csv")
    assert len(trials) == 4 and trials["node"].nunique() == 2, trials["node"].tolist()
    assert (storage / "on_cluster" / "tune").is_dir()                     # Tune wrote to the shared storage
    assert (tmp_path / "results" / "on_cluster" / "best.json").is_file()  # results came back to results/

    rc, out, err = run_cli("kfold", TINY, "--address", cluster.address, "--k", 2, "--data-dir", cifar_dir,
                           "--subset", 8000, "--epochs", 2, "--results-dir", tmp_path / "results", "--name", "kf",
                           "--no-report")
    assert rc == 0, err[-3000:]
    folds = pd.read_csv(tmp_path / "results" / "kf" / "kfold_folds.csv")
    assert len(folds) == 2 and set(folds["status"]) == {"completed"} and folds["node"].nunique() == 2
