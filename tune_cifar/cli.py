"""Command line: parse, call, print. Every bad input is one line on stderr and exit status 2."""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any

import yaml

from .core.config import UserError
from .core.finals import DEFAULT_FINAL, DEFAULT_TTA, FINALS, TTAS


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:           # one line, not argparse's usage block
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        sys.exit(2)


def key_value(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"'{text}' is not key=value")
    return key.strip().replace("-", "_"), yaml.safe_load(value)


def add_data_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", help="data folder: cifar-10-batches-py/, cifar-100-python/, or train/<class>/ "
                   "(+ test/<class>/) image folders; default: $TUNE_CIFAR_DATA, then ~/.cache/tune_cifar/data "
                   "(CIFAR-10 is downloaded there when missing)")
    p.add_argument("--dataset", choices=("cifar10", "cifar100"),
                   help="look only for this data set's pickles, and download it when missing (default: whatever "
                   "the data folder holds, else CIFAR-10)")
    p.add_argument("--offline", action="store_true",
                   help="never download data or ImageNet weights (also $TUNE_CIFAR_OFFLINE=1)")
    p.add_argument("--download", action="store_true", help="allow downloads even with $TUNE_CIFAR_OFFLINE=1")
    p.add_argument("--subset", type=int, help="stratified subset of the training images")
    p.add_argument("--weights", help="state-dict file of the pretrained backbone (frozen/full; default: "
                   "torchvision's ImageNet weights, downloaded when missing)")
    p.add_argument("--seed", type=int, default=0, help="seeds the searcher, the draws, weights and augmentation "
                   "(same seed = same configurations; default 0)")


def add_results_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument("--results-dir", type=Path, default=Path("results"),
                   help="where experiment folders are (default: results/ of the working directory)")


def add_experiment_flags(p: argparse.ArgumentParser) -> None:
    add_results_dir(p)
    p.add_argument("--name", help="experiment folder name (default: the search space's name)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted experiment as it was planned")
    p.add_argument("--overwrite", action="store_true", help="replace an existing experiment folder")


def gpus_per_trial(text: str) -> float | str:
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is neither a number nor auto") from None


def add_ray_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gpus-per-trial", type=gpus_per_trial, metavar="F|auto",
                   help="GPU fraction per trial (0.25: four trials share a GPU); auto: as many trials per GPU as "
                   "fit, from one measured training step (0 without a GPU)")
    p.add_argument("--cpus-per-trial", type=float, help="CPUs per trial (default: the space's resources.cpu, "
                   "fitted to this machine)")
    p.add_argument("--time-budget", type=float, metavar="SECONDS", help="whole command's wall-clock budget")
    p.add_argument("--max-failures", type=int, default=2, help="retries of a crashing trial from its checkpoint")
    p.add_argument("--address", help="join an existing Ray cluster: auto or HOST:PORT (also $RAY_ADDRESS)")
    p.add_argument("--storage", help="experiment storage every node can write (shared path or s3://...)")
    p.add_argument("--dashboard", action="store_true", help="start the Ray dashboard (127.0.0.1:8265)")
    p.add_argument("--dashboard-host", default="127.0.0.1", help="bind address of the dashboard")
    p.add_argument("--dashboard-port", type=int, default=8265, help="port of the dashboard (default 8265)")
    p.add_argument("--no-report", action="store_true", help="skip the plots and report.md at the end")
    p.add_argument("--verbose", action="store_true",
                   help="Ray's own progress output and worker logs instead of the compact trial table")
    p.add_argument("--no-tensorboard", dest="tensorboard", action="store_false",
                   help="no TensorBoard event files in the trial folders")
    p.add_argument("--mlflow", nargs="?", const="", metavar="URI",
                   help="log each trial as an MLflow run under one parent run (default store: SQLite in "
                   "results/EXP/mlruns; needs the mlflow extra)")


def add_run_flags(p: argparse.ArgumentParser) -> None:
    """The flags of every command that runs an experiment through Ray: data, experiment folder, Ray."""
    add_data_flags(p)
    add_experiment_flags(p)
    add_ray_flags(p)


def add_set(p: argparse.ArgumentParser, help: str) -> None:
    p.add_argument("--set", action="append", type=key_value, default=[], metavar="KEY=VALUE", help=help)


def add_race_flags(p: argparse.ArgumentParser, stage: str = "") -> None:
    """Racing over the cross-validation splits (commands/kfold.py, core/racing.py)."""
    p.add_argument("--no-race", dest="race", action="store_false",
                   help=f"{stage}train every split of every configuration (default: race, dropping a configuration "
                   "significantly worse than the best so far)")
    p.add_argument("--race-min-splits", type=int, metavar="N",
                   help=f"{stage}splits every configuration runs before the first drop (default 3; 2..k x repeats)")
    p.add_argument("--race-alpha", type=float, default=0.05, metavar="P",
                   help=f"{stage}drop at a Holm-adjusted one-sided p below P, in (0, 0.5] (default 0.05)")


def add_tta_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tta", choices=TTAS, help="test-time augmentation of the final model: none, or flip (the mean "
                   f"softmax of the image and its horizontal mirror). Default: {DEFAULT_TTA}")


# The TrainConfig fields `train` takes as flags (--batch-size for batch_size, ...); more with --set.
TRAIN_FLAGS = (("lr", float), ("optimizer", str), ("batch_size", int), ("epochs", int), ("weight_decay", float),
               ("momentum", float), ("width", int), ("resolution", int), ("label_smoothing", float),
               ("schedule", str), ("augment", str), ("patience", int), ("device", str), ("threads", int),
               ("evals_per_epoch", int))


def build_parser() -> Parser:
    parser = Parser(prog="tune_cifar", description="Hyper-parameter search and cross-validation for CIFAR-10 "
                    "classifiers (simple CNN, AlexNet, VGG16, ResNet18; scratch / frozen / full).")
    sub = parser.add_subparsers(dest="subcommand", required=True, parser_class=Parser)

    t = sub.add_parser("train", help="train one configuration (no Ray)")
    t.add_argument("space", metavar="NAME", help="search space (simple_cnn_scratch, vgg16_full, or a .yaml)")
    for key, kind in TRAIN_FLAGS:
        t.add_argument(f"--{key.replace('_', '-')}", type=kind, help=f"the TrainConfig field {key} "
                       "(default: the space's default point and fixed settings)")
    add_set(t, "any other TrainConfig field (repeatable)")
    add_tta_flag(t)
    add_data_flags(t)
    add_experiment_flags(t)

    s = sub.add_parser("search", help="Ray Tune + Optuna TPE + ASHA search over a search space")
    s.add_argument("space", metavar="NAME", help="search space (simple_cnn, vgg16_full, ..., or a .yaml)")
    s.add_argument("--num-samples", type=int, help="number of trials")
    s.add_argument("--max-epochs", type=int, help="epochs of a trial that runs its whole budget")
    s.add_argument("--grace-period", type=float, help="epochs before ASHA may stop a trial")
    s.add_argument("--searcher", choices=("tpe", "random"),
                   help="tpe: Optuna TPE (default); random: Ray Tune's random search (space file: budget.searcher)")
    s.add_argument("--study-feedback", choices=("pruned", "complete"), default="pruned",
                   help=argparse.SUPPRESS)      # "complete": the old, untruthful study (for bench search_quality)
    s.add_argument("--quick", action="store_true", help="small smoke preset (minutes on a 2-core CPU)")
    s.add_argument("--cv-top", type=int, metavar="N", help="cross-validate the N best configurations, retrain "
                   "the winner on all search images and test it once (see --k, --repeats)")
    s.add_argument("--k", type=int, default=5, help="with --cv-top: folds")
    s.add_argument("--repeats", type=int, default=1, help="with --cv-top: repeats of the K-fold split")
    s.add_argument("--final", choices=FINALS, help="with --cv-top, the final model: retrain (the winner retrained on "
                   "all search images) or bagging (the winner's split models of the cross-validation, softmax "
                   f"averaged; no extra training). Default: {DEFAULT_FINAL}")
    add_tta_flag(s)
    add_race_flags(s, "with --cv-top: ")
    add_run_flags(s)

    k = sub.add_parser("kfold", help="stratified K-fold cross-validation of configurations")
    k.add_argument("space", metavar="NAME", help="search space (simple_cnn, vgg16_full, ..., or a .yaml)")
    k.add_argument("--k", type=int, default=5, help="folds (default 5)")
    k.add_argument("--repeats", type=int, default=1, help="repeat the K-fold split R times (seeded): J = K x R splits")
    k.add_argument("--epochs", type=int, help="epochs per fold (default: the space's max_epochs)")
    k.add_argument("--num-samples", type=int,
                   help="N configurations: the default point, then seeded Sobol points spread over the space")
    k.add_argument("--from-search", metavar="EXP", help="cross-validate the best of a finished search")
    k.add_argument("--top", type=int, default=3, help="with --from-search: how many of its best trials")
    add_set(k, "one explicit configuration (repeat for several keys)")
    add_race_flags(k)
    add_run_flags(k)

    r = sub.add_parser("report", help="plots and report.md of an experiment")
    r.add_argument("experiment", metavar="EXP", help="experiment folder name in --results-dir, or a path")
    add_results_dir(r)

    c = sub.add_parser("compare", help="scratch vs frozen vs full of one model: from its searches, or "
                       "cross-validated on the same folds with --k")
    c.add_argument("model", help="simple_cnn, alexnet, vgg16 or resnet18")
    c.add_argument("--run-missing", action="store_true", help="run missing modes with --quick budgets")
    c.add_argument("--k", type=int, help="cross-validate the modes (each its search's best configuration, "
                   "else its space's default point) on the same K folds, with paired tests")
    c.add_argument("--repeats", type=int, default=1, help="with --k: repeats of the K-fold split")
    c.add_argument("--epochs", type=int, help="with --k: epochs per fold (default: each space's max_epochs)")
    add_set(c, "with --k: a setting for every mode (e.g. resolution=64 on a CPU)")
    add_race_flags(c, "with --k: ")
    add_run_flags(c)

    e = sub.add_parser("export", help="export an experiment's best model")
    e.add_argument("experiment", metavar="EXP", help="experiment folder name in --results-dir, or a path")
    e.add_argument("--format", choices=("pt", "pt2", "onnx", "torchscript"), default="pt",
                   help="pt: the saved record; pt2: torch.export ExportedProgram; onnx: dynamo exporter; "
                   "torchscript: deprecated by torch 2.14 (use pt2)")
    add_results_dir(e)
    e.add_argument("--out", type=Path, help="output file (default: next to best_model.pt)")

    d = sub.add_parser("dashboard", help="optuna-dashboard on an experiment's Optuna study (127.0.0.1, until Ctrl-C)")
    d.add_argument("experiment", metavar="EXP", help="experiment folder name in --results-dir, or a path")
    d.add_argument("--port", type=int, default=8080, help="port on 127.0.0.1 (default 8080; 0: any free one)")
    add_results_dir(d)

    b = sub.add_parser("bench", help="throughput and search-overhead benchmark")
    b.add_argument("--device", choices=("cpu", "cuda"), help="where to measure (default: cuda when present)")
    b.add_argument("--quick", action="store_true", help="every part scaled down to run in minutes")
    b.add_argument("--out", type=Path, default=Path("bench.json"), help="JSON of every number (and OUT.md)")
    b.add_argument("--work-dir", type=Path, help="folder for the benchmark's experiments (default: a new temporary "
                   "folder); experiments that finished there before are reused")
    b.add_argument("--only", help="comma-separated parts: p1,p4,p4c,p2,p3,p5,p6,p7,pretrained (the acceptance "
                   "parts, run as --accept runs them) and the studies cpu_budget,search_quality,rungs,racing,"
                   "final_model")
    b.add_argument("--accept", action="store_true",
                   help="the acceptance set (P1-P7 and the accuracy runs) at fixed sizes per device, each part timed, "
                   "with its target and pass/fail; writes OUT.json and OUT.md")
    b.add_argument("--data-dir", help="the real data for the searches (default: as for search)")
    return parser


def ray_options(a: argparse.Namespace):
    from .tuning.ray_session import RayOptions
    return RayOptions(address=a.address, dashboard=a.dashboard, dashboard_host=a.dashboard_host,
                      dashboard_port=a.dashboard_port, storage=a.storage, verbose=a.verbose)


def options(cls, a: argparse.Namespace, **extra: Any):
    """A command's options dataclass from the parsed flags of the same names."""
    values = {f.name: getattr(a, f.name) for f in dataclasses.fields(cls) if hasattr(a, f.name)}
    return cls(**{**values, **extra})


def report_step(a: argparse.Namespace):
    """The report the runner makes at the end (the CLI hands it over, so Ray code never imports it)."""
    if a.no_report:
        return None
    from .results.report import write_report
    return write_report


def pin_dataset(a: argparse.Namespace) -> None:
    """--dataset: find (or download) that data set now and hand its folder on as --data-dir, so the
    commands (which look up whatever a folder holds) read exactly it."""
    if a.dataset:
        from .data.sources import downloads_allowed, resolve_data_dir
        a.data_dir = resolve_data_dir(a.data_dir, downloads_allowed(a.download, a.offline), a.dataset)


def cmd_train(a: argparse.Namespace) -> None:
    from .data.sources import downloads_allowed
    from .commands.train import plan_train, run_train, train_tta
    pin_dataset(a)
    flags = [key for key, _ in TRAIN_FLAGS] + ["data_dir", "subset", "weights", "seed"]
    overrides = {k: getattr(a, k) for k in flags if getattr(a, k) is not None}
    overrides.update(dict(a.set))
    cfg, exp = plan_train(a.space, overrides, a.results_dir, a.name, a.resume, a.overwrite,
                          download=downloads_allowed(a.download, a.offline))
    run_train(cfg, exp, a.resume, a.overwrite, command=a.command, tta=train_tta(a.tta, exp, a.resume))


def cmd_search(a: argparse.Namespace) -> None:
    from .tuning.runner import run
    from .commands.search import SearchOptions, plan_search
    pin_dataset(a)
    plan = plan_search(a.space, options(SearchOptions, a, ray=ray_options(a)))
    if plan.opts.cv_top is None:
        summary = run(plan, report=report_step(a))
    else:
        from .commands.selection import run_selection
        summary = run_selection(plan, report=report_step(a))
    print(f"test_acc={summary['test_acc']:.4f}")


def cmd_kfold(a: argparse.Namespace) -> None:
    from .tuning.runner import run
    from .commands.kfold import KFoldOptions, plan_kfold
    pin_dataset(a)
    run(plan_kfold(a.space, options(KFoldOptions, a, fixed=dict(a.set), ray=ray_options(a))), report=report_step(a))


def cmd_report(a: argparse.Namespace) -> None:
    from .results.folders import experiment_path
    from .results.report import write_report
    print(write_report(experiment_path(a.results_dir, a.experiment)))


def cmd_compare(a: argparse.Namespace) -> None:
    from .results.compare import compare_modes, missing_modes
    pin_dataset(a)
    if a.run_missing:
        for mode in missing_modes(a.model, a.results_dir):
            name = f"{a.model}_{mode}"
            args = ["search", name, "--quick", "--results-dir", a.results_dir, "--name", f"{name}_quick",
                    "--seed", a.seed]
            for flag, value in (("--data-dir", a.data_dir), ("--weights", a.weights), ("--subset", a.subset)):
                args += [flag, value] if value is not None else []
            args += [flag for flag, on in (("--offline", a.offline), ("--download", a.download)) if on]
            if main(args) != 0:
                raise UserError(f"--run-missing: the {mode} search failed (see above)")
    if a.k is None:
        compare_modes(a.model, a.results_dir)
        return
    from .tuning.runner import run
    from .commands.kfold import KFoldOptions, plan_modes
    run(plan_modes(a.model, options(KFoldOptions, a, fixed=dict(a.set), ray=ray_options(a))), report=report_step(a))


def cmd_export(a: argparse.Namespace) -> None:
    from .results.export import export
    from .results.folders import experiment_path
    print(export(experiment_path(a.results_dir, a.experiment), a.format, a.out))


def cmd_dashboard(a: argparse.Namespace) -> None:
    from .results.dashboard import serve
    serve(a.results_dir, a.experiment, a.port)


def cmd_bench(a: argparse.Namespace) -> None:
    from .bench.run import run_bench
    run_bench(main, device=a.device, quick=a.quick, out=a.out, only=a.only, data_dir=a.data_dir, accept=a.accept,
              work_dir=a.work_dir)


COMMANDS = {"train": cmd_train, "search": cmd_search, "kfold": cmd_kfold, "report": cmd_report,
            "compare": cmd_compare, "export": cmd_export, "bench": cmd_bench, "dashboard": cmd_dashboard}


def main(argv: list[str] | None = None) -> int:
    from .results.folders import command_line
    args = build_parser().parse_args(None if argv is None else [str(x) for x in argv])
    args.command = command_line(None if argv is None else [str(x) for x in argv])  # recorded in spec.yaml
    from .results.lock import command_scope
    from .tuning.stop_signal import sigterm_interrupts
    try:
        # the experiment locks the command takes are held until it ends; SIGTERM stops it as Ctrl-C does
        with command_scope(args.command), sigterm_interrupts():
            COMMANDS[args.subcommand](args)
    except UserError as e:
        sys.stderr.write(f"tune_cifar {args.subcommand}: error: {e}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("interrupted: continue with the same command and --resume\n")
        return 130
    return 0
