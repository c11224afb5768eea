"""tune_cifar.tuning.searchers: real small Ray Tune runs of a toy trainable with ASHA, read back through
Optuna's own API: ASHA-stopped trials are PRUNED with their curve, complete ones ran every round;
feedback="complete" is Ray's old behaviour; the time budget's trials are closed; save/restore;
tune_space; random search is seeded and recorded."""
from __future__ import annotations

import math
import sys
import time

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from tune_cifar.tuning.searchers import (
    TruthfulOptunaSearch,
    make_scheduler,
    make_search_alg,
    search_callbacks,
    tune_space,
    told,
)

pytestmark = pytest.mark.slow          # end-to-end runs: `pytest -m 'not slow'` leaves them out

MAX_T = 4
SPACE = {"x": FloatDistribution(0.0, 1.0), "depth": IntDistribution(1, 3)}
# the first trial passes every rung (nothing to compare yet); the fourth, far weaker, is stopped at round 1
POINTS = [{"x": 0.95, "depth": 2}, {"x": 0.05, "depth": 1}, {"x": 0.9, "depth": 3}, {"x": 0.01, "depth": 1}]


def toy(config):
    """val_acc = f(config) * r / max_t at round r, status "running"; config["sleep"] s before every
    round after the first."""
    from ray import tune
    f = config["x"] * (0.9 + 0.05 * config["depth"])
    for r in range(1, config.get("max_t", MAX_T) + 1):
        time.sleep(config.get("sleep", 0.0) if r > 1 else 0.0)
        tune.report({"val_acc": f * r / MAX_T, "round": r, "status": "running"})


@pytest.fixture(scope="module", autouse=True)
def toy_by_value():
    """Ray workers cannot import this test module: ship its functions by value."""
    from ray import cloudpickle
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield
    cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


def storage_of(path):
    return optuna.storages.RDBStorage(f"sqlite:///{path}")


def run(tmp_path, name, search_alg, num_samples, param_space=None, time_budget_s=None):
    from ray import tune
    tuner = tune.Tuner(
        toy, param_space=param_space or {},
        tune_config=tune.TuneConfig(metric="val_acc", mode="max", search_alg=search_alg,
                                    scheduler=make_scheduler(MAX_T, 1, 2), num_samples=num_samples,
                                    reuse_actors=True, time_budget_s=time_budget_s),
        run_config=tune.RunConfig(name=name, storage_path=str(tmp_path / "ray"), verbose=0,
                                  callbacks=search_callbacks(search_alg)))
    return tuner.fit()


def tpe(tmp_path, name, feedback, points=POINTS):
    db = tmp_path / f"{name}.db"
    alg = make_search_alg("tpe", SPACE, points, "val_acc", "max", 7, storage_of(db), name, MAX_T, feedback=feedback)
    return alg, db


def load(db, name):
    return optuna.load_study(study_name=name, storage=f"sqlite:///{db}").get_trials(deepcopy=False)


def rounds(grid):
    """Ray's view: trial_id -> rounds run."""
    return {r.metrics["trial_id"]: r.metrics["training_iteration"] for r in grid}


def test_pruned_feedback_tells_the_truth(ray_session, tmp_path):
    alg, db = tpe(tmp_path, "truthful", "pruned")
    grid = run(tmp_path, "truthful", alg, 8)
    assert not grid.errors
    ray_rounds = rounds(grid)
    trials = load(db, "truthful")
    assert len(trials) == 8
    by_state = {s: [t for t in trials if t.state == s] for s in TrialState}
    assert len(by_state[TrialState.COMPLETE]) + len(by_state[TrialState.PRUNED]) == 8
    assert by_state[TrialState.PRUNED], "ASHA stopped no trial, or it reached Optuna as COMPLETE"
    assert by_state[TrialState.COMPLETE]
    for t in by_state[TrialState.PRUNED]:
        steps = sorted(t.intermediate_values)
        assert steps == list(range(1, steps[-1] + 1)) and steps[-1] < MAX_T, steps
        assert t.value == pytest.approx(t.intermediate_values[steps[-1]])   # Optuna: last intermediate value
    for t in by_state[TrialState.COMPLETE]:
        assert sorted(t.intermediate_values) == list(range(1, MAX_T + 1))
        assert t.value == pytest.approx(t.intermediate_values[MAX_T])
    # Ray and Optuna agree: every trial ran as many rounds as it has intermediate values
    assert sorted(ray_rounds.values()) == sorted(max(t.intermediate_values) for t in trials)
    assert sum(1 for n in ray_rounds.values() if n < MAX_T) == len(by_state[TrialState.PRUNED])
    # the known-good points were evaluated first, and the weak fourth one was pruned at round 1
    first = sorted(trials, key=lambda t: t.number)[:4]
    assert [t.params["x"] for t in first] == [p["x"] for p in POINTS]
    assert first[3].state == TrialState.PRUNED


def test_complete_feedback_is_rays_old_behaviour(ray_session, tmp_path):
    alg, db = tpe(tmp_path, "old", "complete")
    assert search_callbacks(alg) == []
    grid = run(tmp_path, "old", alg, 6)
    assert not grid.errors
    trials = load(db, "old")
    assert len(trials) == 6 and all(t.state == TrialState.COMPLETE for t in trials)
    ran = sorted(rounds(grid).values())
    assert ran[0] < MAX_T, "ASHA stopped no trial"
    for t in trials:
        # Ray never passes the stopping round to on_trial_result: one intermediate value short
        n = max(t.intermediate_values, default=0) + 1
        assert sorted(t.intermediate_values) == list(range(1, n))
        assert n in ran


def test_time_budget_trials_are_pruned_not_left_running(ray_session, tmp_path):
    alg, db = tpe(tmp_path, "budget", "pruned", points=[])
    # round 1 at once, then 2.5 s a round: no trial reaches round 4 (7.5 s) within the 5 s budget
    grid = run(tmp_path, "budget", alg, 4, param_space={"sleep": 2.5}, time_budget_s=5)
    trials = load(db, "budget")
    assert trials and not grid.errors
    # Ray's OptunaSearch leaves these RUNNING: the time budget never calls on_trial_complete
    assert all(t.state == TrialState.PRUNED for t in trials), [t.state for t in trials]
    assert any(t.intermediate_values for t in trials)
    for t in trials:
        steps = sorted(t.intermediate_values)
        assert steps == list(range(1, len(steps) + 1)) and len(steps) < MAX_T


def test_tuner_pickle_keeps_callback_and_searcher_together(ray_session, tmp_path):
    """Tuner.restore unpickles tuner.pkl: the callback must still hold the searcher Tune uses."""
    from ray import cloudpickle, tune
    alg, _ = tpe(tmp_path, "pickled", "pruned")
    tune.Tuner(toy, tune_config=tune.TuneConfig(metric="val_acc", mode="max", search_alg=alg, num_samples=1),
               run_config=tune.RunConfig(name="pickled", storage_path=str(tmp_path / "ray"),
                                         callbacks=search_callbacks(alg)))
    state = cloudpickle.loads((tmp_path / "ray" / "pickled" / "tuner.pkl").read_bytes())
    restored = state["_tune_config"].search_alg
    assert isinstance(restored, TruthfulOptunaSearch) and restored is not alg
    assert state["_run_config"].callbacks[0].searcher is restored


def random_configs(tmp_path, name, seed):
    alg = make_search_alg("random", SPACE, [POINTS[0]], "val_acc", "max", seed, storage_of(tmp_path / f"{name}.db"),
                          name, MAX_T)
    grid = run(tmp_path, name, alg, 4, param_space={"max_t": 1, **tune_space(SPACE)})
    assert not grid.errors
    return [(r.config["x"], r.config["depth"]) for r in grid], tmp_path / f"{name}.db"


def test_random_search_is_seeded_and_recorded(ray_session, tmp_path):
    a, db = random_configs(tmp_path, "rand_a", 5)
    b, _ = random_configs(tmp_path, "rand_b", 5)
    assert sorted(a) == sorted(b)
    assert (POINTS[0]["x"], POINTS[0]["depth"]) in a
    assert len(set(a)) == 4 and all(0 <= x <= 1 and d in (1, 2, 3) for x, d in a)
    trials = load(db, "rand_a")                          # recorded: 1 round of max_t=4 -> PRUNED
    assert len(trials) == 4 and all(t.state == TrialState.PRUNED for t in trials)
    assert sorted((t.params["x"], t.params["depth"]) for t in trials) == sorted(a)
    assert all(list(t.intermediate_values) == [1] and t.user_attrs["ray_trial_id"] for t in trials)


def test_verdicts():
    m = "val_acc"
    assert told({m: 0.5, "training_iteration": 4, "status": "running"}, m, 4) == (TrialState.COMPLETE, 0.5)
    assert told({m: 0.5, "training_iteration": 2, "status": "running"}, m, 4) == (TrialState.PRUNED, None)
    assert told({m: 0.4, "training_iteration": 2, "status": "early_stopped"}, m, 4) == (TrialState.COMPLETE, 0.4)
    assert told({m: 0.0, "training_iteration": 1, "status": "diverged"}, m, 4) == (TrialState.COMPLETE, 0.0)
    assert told({m: 0.0, "training_iteration": 3, "status": "oom"}, m, 4) == (TrialState.COMPLETE, 0.0)
    assert told({m: math.nan, "training_iteration": 4}, m, 4) == (TrialState.FAIL, None)
    assert told(None, m, 4) == (TrialState.PRUNED, None)
    assert told(None, m, 4, error=True) == (TrialState.FAIL, None)


def result(acc, it, status="running"):
    return {"val_acc": acc, "training_iteration": it, "round": it, "status": status}


def test_searcher_calls_directly_and_save_restore(tmp_path):
    db = tmp_path / "direct.db"

    def fresh():
        return make_search_alg("tpe", SPACE, [], "val_acc", "max", 1, storage_of(db), "direct", 3)

    s = fresh()
    for tid in ("a", "b", "c", "d"):
        assert set(s.suggest(tid)) == {"x", "depth"}
    s.on_trial_result("a", result(0.1, 1))
    s.on_trial_result("a", result(0.2, 2))
    s.on_trial_complete("a", result(0.3, 3))                        # ran max_t=3 rounds
    s.on_trial_result("b", result(0.1, 1))
    s.on_trial_complete("b", result(0.05, 2))                       # stopped by ASHA at round 2
    s.on_trial_result("c", result(0.1, 1))
    s.save(str(tmp_path / "searcher.pkl"))
    s.on_trial_result("c", result(0.15, 2))                         # stored after the last save
    s.on_trial_complete("d", error=True)

    r = fresh()                                                     # what Tuner.restore does
    r.restore(str(tmp_path / "searcher.pkl"))
    assert r.max_t == 3 and r.feedback == "pruned"
    r.on_trial_result("c", result(0.99, 1))                         # re-run rounds: already stored, skipped
    r.on_trial_result("c", result(0.99, 2))
    r.on_trial_complete("c", result(0.8, 3, status="running"))
    r.on_trial_complete("d", error=True)                            # the study says finished: ignored

    t = {x.number: x for x in load(db, "direct")}
    assert (t[0].state, t[0].value, t[0].intermediate_values) == (TrialState.COMPLETE, 0.3, {1: 0.1, 2: 0.2, 3: 0.3})
    assert (t[1].state, t[1].value, t[1].intermediate_values) == (TrialState.PRUNED, 0.05, {1: 0.1, 2: 0.05})
    assert (t[2].state, t[2].value, t[2].intermediate_values) == (TrialState.COMPLETE, 0.8, {1: 0.1, 2: 0.15, 3: 0.8})
    assert t[3].state == TrialState.FAIL and t[3].value is None


def test_tune_space_conversion():
    from ray.tune.search.sample import Categorical, Float, Integer, LogUniform, Uniform
    space = tune_space({
        "lr": FloatDistribution(1e-4, 0.3, log=True),
        "drop": FloatDistribution(0.0, 0.5),
        "drop_q": FloatDistribution(0.0, 0.5, step=0.25),
        "width": IntDistribution(16, 64),
        "wide": IntDistribution(8, 512, log=True),
        "stride": IntDistribution(2, 10, step=4),
        "opt": CategoricalDistribution(["sgd", "adam"]),
        "bs": CategoricalDistribution([128, 256]),
    })
    assert isinstance(space["lr"], Float) and isinstance(space["lr"].get_sampler(), LogUniform)
    assert (space["lr"].lower, space["lr"].upper) == (1e-4, 0.3)
    assert isinstance(space["drop"], Float) and isinstance(space["drop"].get_sampler(), Uniform)
    assert space["drop_q"].categories == [0.0, 0.25, 0.5]
    assert isinstance(space["width"], Integer) and (space["width"].lower, space["width"].upper) == (16, 65)
    assert isinstance(space["wide"].get_sampler(), LogUniform) and space["wide"].upper == 513
    assert space["stride"].categories == [2, 6, 10]
    assert isinstance(space["opt"], Categorical) and space["opt"].categories == ["sgd", "adam"]
    assert space["bs"].categories == [128, 256]
    samples = {space["width"].sample() for _ in range(2000)}
    assert min(samples) == 16 and max(samples) == 64                 # Optuna's high is inclusive
    assert tune_space({"a/b": FloatDistribution(0, 1)})["a"]["b"].upper == 1
    with pytest.raises(ValueError):
        make_search_alg("grid", SPACE, [], "val_acc", "max", 0, None, "x", 4)
    with pytest.raises(ValueError):
        make_search_alg("tpe", SPACE, [], "val_acc", "max", 0, None, "x", 4, feedback="maybe")


def test_scheduler_brackets():
    s = make_scheduler(9, 1, 3, brackets=2)
    assert len(s._brackets) == 2 and s._max_t == 9
    assert isinstance(make_search_alg("tpe", SPACE, [], "val_acc", "max", 0, None, "x", 4), TruthfulOptunaSearch)
