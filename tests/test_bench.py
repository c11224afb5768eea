"""`bench --device cpu --accept --quick`: the acceptance command's code runs end to end on this CPU
(scaled-down sizes) and writes a JSON and a Markdown table with every part, its number, its target
and its verdict. What it measures is not asserted: speed is bench's business, not the tests'."""
from __future__ import annotations

import pytest

import json

import torch
from conftest import run_cli

from tune_cifar.bench.sizes import SIZES, TARGETS, target_text, verdict

PARTS = ["P1", "P4", "P4c", "P2", "P3", "P5", "P6", "P7"]


@pytest.mark.slow
def test_accept_quick_on_the_cpu(cifar_dir, tmp_path):
    out = tmp_path / "accept.json"
    rc, stdout, err = run_cli("bench", "--device", "cpu", "--accept", "--quick", "--data-dir", cifar_dir,
                              "--out", out, timeout=900)
    assert rc == 0, err[-3000:]
    results = json.loads(out.read_text())
    a = results["accept"]
    assert a["sizes"] == "cpu-quick" and "scaled down" in a["note"] and a["total_s"] > 0
    parts = {p["part"]: p for p in a["parts"]}
    assert [p["part"] for p in a["parts"][:len(PARTS)]] == PARTS
    for name in PARTS:
        p = parts[name]
        assert isinstance(p["value"], float) and p["value"] > 0, p
        assert p["target"] and p["what"] and p["sizes"] and p["seconds"] >= 0, p
        # GPU targets are not failures on a CPU; P2's target (a ratio of wall times) applies anywhere
        if name != "P2":
            assert p["verdict"] == "n/a on CPU", p
    assert parts["P2"]["target"] == "<= 1.25" and parts["P2"]["verdict"] in ("pass", "fail")
    assert len(parts["P1"]["details"]["rows"]) == 10
    assert parts["P4c"]["details"]["compile_backend"] == "aot_eager"
    assert 0 <= parts["P6"]["value"] <= 1 and 0 <= parts["P7"]["value"] <= 1
    pretrained = [p for name, p in parts.items() if name.startswith("pretrained")]
    assert pretrained and all(p["verdict"] == "reported" or p["verdict"].startswith("skipped") for p in pretrained)
    assert a["failed"] == sum(p["verdict"] == "fail" for p in a["parts"])

    md = out.with_suffix(".md").read_text()
    assert "| part | what | sizes | value | target | verdict | seconds |" in md and a["note"] in md
    for name in PARTS:
        row = next(line for line in md.splitlines() if line.startswith(f"| {name} |"))
        assert parts[name]["target"] in row and parts[name]["verdict"] in row
    assert md in stdout                      # the table is printed too


def test_verdicts_and_targets():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert verdict("P1", 0.97, cuda) == "pass" and verdict("P1", 0.9, cuda) == "fail"
    assert verdict("P1", 0.5, cpu) == "n/a on CPU"
    assert verdict("P2", 1.2, cpu) == "pass" and verdict("P2", 1.3, cuda) == "fail"
    assert verdict("P7", 0.95, cuda) == "pass" and verdict("P7", 0.95, cuda, extra_ok=False) == "fail"
    assert verdict("P6cpu", 0.84, cpu) == "pass" and verdict("P6cpu", 0.82, cpu) == "fail"
    assert verdict("P6cpu", 0.84, cuda) == "n/a on GPU"
    assert verdict("P5", None, cuda) == "fail" and verdict("pretrained", 0.9, cuda) == "reported"
    assert target_text("P4") == ">= 4,500 img/s on an H100" and target_text("P5") == "<= 120 s on an H100"
    assert target_text("P2") == "<= 1.25"
    assert set(SIZES) == {"cuda", "cuda-quick", "cpu", "cpu-quick"} and set(PARTS) <= set(TARGETS)
    # the acceptance sizes on a GPU are the ones BENCHMARKS.md states
    z = SIZES["cuda"]
    assert (z.p2_trials, z.p5_trials, z.p5_epochs, z.p5_res, z.p4_res) == (16, 32, 10, 224, 224)
    assert z.p7["time_budget"] <= 600 and z.p6["max_epochs"] == 16 and z.p5_subset is None


@pytest.mark.slow
def test_rungs_quick_measures_every_quarter_epoch(cifar_dir, tmp_path):
    """`bench --only rungs --quick`: every configuration runs to the end (nothing stopped), one row
    per quarter epoch of the space's max epochs, the last round correlating perfectly with itself."""
    from tune_cifar.core.spaces import load_space
    out = tmp_path / "rungs.json"
    rc, _, err = run_cli("bench", "--device", "cpu", "--only", "rungs", "--quick", "--data-dir", cifar_dir,
                         "--out", out, timeout=600)
    assert rc == 0, err[-3000:]
    r = json.loads(out.read_text())["rungs"]
    max_epochs = load_space("simple_cnn").budget.max_epochs
    assert r["max_epochs"] == max_epochs and r["evals_per_epoch"] == 4 and r["trials"] == r["configurations"] == 6
    rows = r["per_round"]
    assert [row["epoch"] for row in rows] == [(i + 1) / 4 for i in range(4 * max_epochs)]
    assert rows[-1]["spearman_vs_final"] == 1.0
    assert all(-1 <= row["spearman_vs_final"] <= 1 and 0 <= row["median_val_acc"] <= 1 for row in rows)
