"""Bad input: exit status 2, one line on stderr naming the file and key (or the flag), nothing written.

Runs the CLI in-process (no Ray is started: every check comes before it)."""
from __future__ import annotations

import math

import pytest
import yaml
from conftest import ROOT, TINY
from hypothesis import given, settings
from hypothesis import strategies as st

from tune_cifar.core.config import UserError
from tune_cifar.core.spaces import DISTRIBUTIONS, parse_space

GOOD = yaml.safe_load(open(TINY))


def variant(**changes):
    """The test space with top-level keys replaced (None deletes)."""
    doc = yaml.safe_load(yaml.safe_dump(GOOD))
    for key, value in changes.items():
        if value is None:
            doc.pop(key, None)
        else:
            doc[key] = value
    return yaml.safe_dump(doc)


def space_with(**space):
    return variant(space={**GOOD["space"], **space}, default={})


BAD_SPACES = [
    ("not_yaml", "model: [simple_cnn\n", "not valid YAML"),
    ("not_mapping", "- a\n- b\n", "must be a YAML mapping"),
    ("unknown_key", variant(colour="red"), "unknown key 'colour'"),
    ("unknown_model", variant(model="lenet"), "model='lenet' is not one of"),
    ("unknown_mode", variant(mode="half"), "mode='half' is not one of"),
    ("missing_model", variant(model=None), "missing key 'model'"),
    ("unknown_optimizer", space_with(optimizer={"choice": ["sgd", "rmsprop"]}), "optimizer='rmsprop' is not one of"),
    ("unknown_distribution", space_with(lr={"normal": [0.1, 0.01]}), "unknown distribution 'normal'"),
    ("wrong_type", space_with(lr={"loguniform": ["a", 1]}), "space.lr.loguniform low must be a number"),
    ("wrong_type_choice", space_with(batch_size={"choice": ["big"]}), "batch_size='big' must be of type int"),
    ("empty_choice", space_with(optimizer={"choice": []}), "space.optimizer.choice must be a non-empty list"),
    ("log_low_zero", space_with(lr={"loguniform": [0, 0.1]}), "space.lr.loguniform: low must be > 0"),
    ("inverted_range", space_with(lr={"loguniform": [0.5, 0.01]}), "low must be < high"),
    ("batch_not_positive", space_with(batch_size={"choice": [64, 0]}), "batch_size=0 must be a positive integer"),
    ("batch_not_integer", space_with(batch_size={"choice": [64, 12.5]}), "batch_size=12.5 must be of type int"),
    ("not_searchable", space_with(model={"choice": ["vgg16"]}), "'model' cannot be searched"),
    ("grace_above_max", variant(budget={"max_epochs": 2, "grace_period": 3}), "grace_period=3 is above max_epochs=2"),
    ("gpu_zero", variant(resources={"gpu": 0, "cpu": 1}), "resources.gpu must be > 0"),
    ("cpu_negative", variant(resources={"gpu": 1, "cpu": -1}), "resources.cpu must be > 0"),
    ("unknown_fixed", variant(fixed={"colour": "red"}), "unknown key 'colour'"),
    ("bad_fixed_value", variant(fixed={"label_smoothing": 1.5}), "label_smoothing=1.5 must be in [0, 1)"),
    ("default_outside", variant(default={"lr": 5.0}), "default.lr=5.0 lies outside space.lr"),
    ("too_small_resolution", variant(model="alexnet", resolution=32), "too small for alexnet"),
]


@pytest.mark.parametrize("name, text, message", BAD_SPACES, ids=[b[0] for b in BAD_SPACES])
def test_bad_search_space_file(name, text, message, tmp_path, cli, cifar_dir):
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    results = tmp_path / "results"
    for command in (["search", path], ["kfold", path, "--k", "3"]):
        rc, out, err = cli(*command, "--data-dir", cifar_dir, "--results-dir", results)
        assert rc == 2
        assert len(err.strip().splitlines()) == 1, err
        assert message in err and str(path) in err, err
        assert not results.exists()


def bad_cli_cases(tmp_path, cifar_dir):
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "taken" / "s").mkdir(parents=True)
    d = ["--data-dir", cifar_dir]
    return [
        (["kfold", TINY, "--k", "1", *d], "--k=1: K-fold needs at least 2 folds"),
        (["kfold", TINY, "--k", "30", "--subset", "200", *d],
         "--k=30 is larger than the 20 images of the rarest class"),
        (["search", TINY, "--subset", "-5", *d], "--subset=-5 must be positive"),
        (["search", TINY, "--subset", "15", *d], "--subset=15 is too small"),
        (["kfold", TINY, "--subset", "15", *d], "--subset=15 is too small"),
        (["search", TINY, "--num-samples", "0", *d], "num_samples must be >= 1"),
        (["kfold", TINY, "--num-samples", "0", *d], "--num-samples=0 must be at least 1"),
        (["search", TINY, "--max-epochs", "1", "--grace-period", "2", *d], "grace_period=2.0 is above max_epochs=1"),
        (["search", TINY, "--time-budget", "10", *d], "--time-budget=10: must be more than the 15s kept"),
        (["kfold", TINY, "--time-budget", "-3", *d], "--time-budget=-3: must be more than"),
        (["search", TINY, "--gpus-per-trial", "0", *d], "gpu must be > 0"),
        (["search", TINY, "--gpus-per-trial", "2", *d], "--gpus-per-trial 2"),
        (["search", TINY, "--cpus-per-trial", "64", *d], "--cpus-per-trial 64 is more than"),
        (["search", TINY, "--data-dir", tmp_path / "missing"], "does not exist"),
        (["search", TINY, "--data-dir", tmp_path / "taken"], "no CIFAR-10 found"),
        (["search", "no_such_space", *d], "unknown search space 'no_such_space'"),
        (["search", TINY, "--results-dir", tmp_path / "a_file" / "r", *d], "is not a folder"),
        (["search", TINY, "--results-dir", tmp_path / "taken", "--name", "s", *d], "already exists: pass --resume"),
        (["search", TINY, "--resume", "--name", "nothing_here", *d], "no experiment folder"),
        (["kfold", TINY, "--set", "lr=-1", *d], "lr=-1.0 must be in (0, 10]"),
        (["kfold", TINY, "--set", "optimizer=rmsprop", *d], "optimizer='rmsprop' is not one of"),
        (["kfold", TINY, "--from-search", "nothing_here", *d], "trials.csv not found"),
        (["train", "resnet18_frozen", "--weights", tmp_path / "nope.pth", *d], "does not exist"),
        (["train", "resnet18_frozen", "--weights", tmp_path / "a_file", *d], "not a loadable state dict"),
        (["train", TINY, "--lr", "0", *d], "lr=0.0 must be in (0, 10]"),
        (["train", TINY, "--optimizer", "rmsprop", *d], "optimizer='rmsprop' is not one of"),
    ]


def test_bad_command_lines(tmp_path, cli, cifar_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)                      # the default results/ would be here
    cases = bad_cli_cases(tmp_path, cifar_dir)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    for args, message in cases:
        rc, out, err = cli(*args)
        assert rc == 2, (args, err)
        assert len(err.strip().splitlines()) == 1 and message in err, (args, err)
        assert sorted(p.name for p in tmp_path.rglob("*")) == before, args      # nothing written


def test_argparse_errors_are_one_line(cli):
    with pytest.raises(SystemExit) as e:
        cli("kfold", TINY, "--k", "three")
    assert e.value.code == 2


# --------------------------------------------------------------------------- property-based

numbers = st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=32), st.integers(-10, 2000),
                    st.text(max_size=3), st.booleans(), st.none())
ranges = st.builds(lambda kind, low, high: {kind: [low, high]}, st.sampled_from(["loguniform", "uniform", "int"]),
                   st.one_of(st.floats(-1, 1), st.integers(-5, 600)), st.one_of(st.floats(-1, 2), st.integers(-5, 600)))
dist = st.one_of(ranges, st.dictionaries(st.sampled_from([*DISTRIBUTIONS, "normal"]), st.lists(numbers, max_size=4),
                                         min_size=1, max_size=2), numbers)
spaces = st.dictionaries(st.sampled_from(["lr", "weight_decay", "momentum", "batch_size", "optimizer", "width",
                                          "label_smoothing", "seed"]), dist, max_size=4)


@settings(max_examples=300, deadline=None)
@given(space=spaces, grace=numbers, max_epochs=numbers)
def test_validator_accepts_only_sound_spaces(space, grace, max_epochs):
    raw = {"model": "simple_cnn", "mode": "scratch", "space": space,
           "budget": {"grace_period": grace, "max_epochs": max_epochs}}
    try:
        spec = parse_space(raw, "prop.yaml")
    except UserError as e:
        assert str(e).startswith("prop.yaml") and "\n" not in str(e)
        return
    assert 0 < spec.budget.grace_period <= spec.budget.max_epochs
    for key, d in spec.space.items():
        if d.kind in ("loguniform", "uniform", "int"):
            low, high = d.values
            assert math.isfinite(low) and math.isfinite(high) and low < high
            assert d.kind != "loguniform" or low > 0
        else:
            assert len(d.values) >= 1
        assert d.contains(spec.default_point()[key])
        spec.base.replace(**{key: spec.default_point()[key]}).check()
    import optuna
    study = optuna.create_study()
    study.ask(spec.optuna_space())


@settings(max_examples=100, deadline=None)
@given(low=st.floats(max_value=0, allow_nan=False), high=st.floats(allow_nan=False))
def test_loguniform_needs_a_positive_low(low, high):
    with pytest.raises(UserError):
        parse_space({"model": "simple_cnn", "mode": "scratch", "space": {"lr": {"loguniform": [low, high]}}}, "p.yaml")


def test_every_shipped_space_is_valid():
    from tune_cifar.core.spaces import load_space
    names = sorted(p.stem for p in (ROOT / "search_spaces").glob("*.yaml"))
    assert {"simple_cnn_scratch", "alexnet_scratch", "alexnet_full", "vgg16_scratch", "vgg16_frozen", "vgg16_full",
            "resnet18_scratch", "resnet18_frozen", "resnet18_full"} <= set(names)
    for name in names:
        spec = load_space(name)
        assert {"lr", "optimizer", "batch_size"} <= set(spec.space)
    assert load_space("simple_cnn").name == "simple_cnn_scratch"


def test_exposed_dashboard_is_warned_about():
    from tune_cifar.tuning.ray_session import RayOptions, exposed_dashboard_warning
    assert exposed_dashboard_warning(RayOptions(dashboard=True)) is None          # 127.0.0.1 by default
    warning = exposed_dashboard_warning(RayOptions(dashboard=True, dashboard_host="0.0.0.0"))
    assert "CVE-2023-48022" in warning and "0.0.0.0" in warning


def test_hyper_parameters_read_back_from_csv_keep_their_types(tmp_path):
    """pandas reads an int column with a gap (a trial that never ran) as floats: 128 -> 128.0."""
    from tune_cifar.commands.kfold import configs_from_search
    from tune_cifar.core.spaces import load_space
    exp = tmp_path / "s"
    exp.mkdir()
    spec = load_space(TINY)
    (exp / "spec.yaml").write_text(yaml.safe_dump(spec.to_dict()))
    (exp / "trials.csv").write_text("trial,status,lr,optimizer,batch_size,last_val_acc,rounds\n"
                                    "1,completed,0.01,sgd,128,0.5,4\n2,not_run,,,,,0\n")
    (config,) = configs_from_search(spec, tmp_path, "s", top=3)
    assert config == {"lr": 0.01, "optimizer": "sgd", "batch_size": 128}
    assert type(config["batch_size"]) is int
