"""Bad racing flags: exit status 2, one line naming the flag, nothing written, Ray not started
(kfold, and the --cv-top stage of search)."""
from __future__ import annotations

import pytest
from conftest import TINY


def cases(cifar_dir):
    d = ["--data-dir", cifar_dir, "--subset", 1500]
    return [
        (["kfold", TINY, "--k", 3, "--race-alpha", 0, *d], "--race-alpha=0 must be in (0, 0.5]"),
        (["kfold", TINY, "--k", 3, "--race-alpha", 0.6, *d], "--race-alpha=0.6 must be in (0, 0.5]"),
        (["kfold", TINY, "--k", 3, "--race-alpha", -0.1, "--no-race", *d], "--race-alpha=-0.1"),
        (["kfold", TINY, "--k", 3, "--race-min-splits", 1, *d], "--race-min-splits=1 must be between 2 and the 3"),
        (["kfold", TINY, "--k", 3, "--race-min-splits", 4, *d], "--race-min-splits=4 must be between 2 and the 3"),
        (["kfold", TINY, "--k", 3, "--repeats", 2, "--race-min-splits", 7, *d],
         "--race-min-splits=7 must be between 2 and the 6 splits"),
        (["search", TINY, "--cv-top", 2, "--k", 3, "--race-alpha", 0.51, *d], "--race-alpha=0.51 must be in"),
        (["search", TINY, "--cv-top", 2, "--k", 3, "--race-min-splits", 4, *d], "--race-min-splits=4 must be"),
        (["search", TINY, "--race-alpha", 0.1, *d], "--race-alpha choose the racing of --cv-top"),
        (["search", TINY, "--no-race", *d], "--no-race, --race-min-splits and --race-alpha choose"),
    ]


def test_bad_race_flags(tmp_path, cli, cifar_dir, monkeypatch):
    # Ray not started: the one place that starts it is never reached (a test session's shared Ray may
    # already run in this process, so ray.is_initialized() would say nothing)
    import tune_cifar.tuning.ray_session as ray_session
    import tune_cifar.tuning.runner as runner
    started = []
    for module in (ray_session, runner):
        monkeypatch.setattr(module, "start_ray", lambda *a, **k: started.append(a))
    monkeypatch.chdir(tmp_path)                      # the default results/ would be here
    for args, message in cases(cifar_dir):
        rc, _, err = cli(*args, "--results-dir", tmp_path / "results")
        assert rc == 2, (args, err)
        assert len(err.strip().splitlines()) == 1 and message in err, (args, err)
        assert not list(tmp_path.iterdir()), args                     # nothing written
        assert not started, args


@pytest.mark.parametrize("alpha", ["x", "0.1.2"])
def test_a_race_alpha_that_is_no_number_is_argparse_error(cli, alpha):
    with pytest.raises(SystemExit) as e:
        cli("kfold", TINY, "--race-alpha", alpha)
    assert e.value.code == 2
