"""Command line: parse, call, print. Every bad input is one line on stderr and exit status 2."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

from .config import UserError


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
    p.add_argument("--data-dir", help="CIFAR-10 folder (cifar-10-batches-py/ or train/ + test/ class folders); "
                   "default: $TUNE_CIFAR_DATA, then ~/.cache/tune_cifar/data")
    p.add_argument("--download", action="store_true", help="let torchvision download CIFAR-10 / weights")
    p.add_argument("--subset", type=int, help="stratified subset of the 50,000 training images")
    p.add_argument("--weights", help="state-dict file of the pretrained backbone (offline frozen/full)")
    p.add_argument("--seed", type=int, default=0)


def add_experiment_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--results-dir", type=Path, default=Path("results"))
    p.add_argument("--name", help="experiment folder name (default: the search space's name)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted experiment")
    p.add_argument("--overwrite", action="store_true", help="replace an existing experiment folder")


def add_ray_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gpus-per-trial", type=float, help="GPU fraction per trial (0.25: four trials share a GPU)")
    p.add_argument("--cpus-per-trial", type=float)
    p.add_argument("--time-budget", type=float, metavar="SECONDS", help="whole command's wall-clock budget")
    p.add_argument("--max-failures", type=int, default=2, help="retries of a crashing trial from its checkpoint")
    p.add_argument("--address", help="join an existing Ray cluster: auto or HOST:PORT (also $RAY_ADDRESS)")
    p.add_argument("--storage", help="experiment storage every node can write (shared path or s3://...)")
    p.add_argument("--dashboard", action="store_true", help="start the Ray dashboard (127.0.0.1:8265)")
    p.add_argument("--dashboard-host", default="127.0.0.1", help="bind address of the dashboard")
    p.add_argument("--dashboard-port", type=int, default=8265)
    p.add_argument("--no-report", action="store_true", help="skip the plots and report.md at the end")


def build_parser() -> Parser:
    parser = Parser(prog="tune_cifar", description="Hyper-parameter search and cross-validation for CIFAR-10 "
                    "classifiers (simple CNN, AlexNet, VGG16, ResNet18; scratch / frozen / full).")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    t = sub.add_parser("train", help="train one configuration (no Ray)")
    t.add_argument("space", metavar="NAME", help="search space (simple_cnn_scratch, vgg16_full, or a .yaml)")
    for flag, kind in (("lr", float), ("optimizer", str), ("batch-size", int), ("epochs", int),
                       ("weight-decay", float), ("momentum", float), ("width", int), ("resolution", int),
                       ("label-smoothing", float), ("schedule", str), ("augment", str), ("patience", int),
                       ("device", str), ("threads", int), ("evals-per-epoch", int)):
        t.add_argument(f"--{flag}", type=kind)
    t.add_argument("--set", action="append", type=key_value, default=[], metavar="KEY=VALUE")
    add_data_flags(t)
    add_experiment_flags(t)

    s = sub.add_parser("search", help="Ray Tune + Optuna TPE + ASHA search over a search space")
    s.add_argument("space", metavar="NAME")
    s.add_argument("--num-samples", type=int, help="number of trials")
    s.add_argument("--max-epochs", type=int)
    s.add_argument("--grace-period", type=float, help="epochs before ASHA may stop a trial")
    s.add_argument("--quick", action="store_true", help="small smoke preset (minutes on a 2-core CPU)")
    add_data_flags(s)
    add_experiment_flags(s)
    add_ray_flags(s)

    k = sub.add_parser("kfold", help="stratified K-fold cross-validation of configurations")
    k.add_argument("space", metavar="NAME")
    k.add_argument("--k", type=int, default=5)
    k.add_argument("--epochs", type=int, help="epochs per fold (default: the space's max_epochs)")
    k.add_argument("--num-samples", type=int, help="draw N configurations from the space (seeded)")
    k.add_argument("--from-search", metavar="EXP", help="cross-validate the best of a finished search")
    k.add_argument("--top", type=int, default=3, help="with --from-search: how many of its best trials")
    k.add_argument("--set", action="append", type=key_value, default=[], metavar="KEY=VALUE",
                   help="one explicit configuration (repeat for several keys)")
    add_data_flags(k)
    add_experiment_flags(k)
    add_ray_flags(k)

    r = sub.add_parser("report", help="plots and report.md of an experiment")
    r.add_argument("experiment", metavar="EXP")
    r.add_argument("--results-dir", type=Path, default=Path("results"))

    c = sub.add_parser("compare", help="scratch vs frozen vs full of one model")
    c.add_argument("model")
    c.add_argument("--results-dir", type=Path, default=Path("results"))
    c.add_argument("--run-missing", action="store_true", help="run missing modes with --quick budgets")
    c.add_argument("--data-dir")
    c.add_argument("--weights")

    e = sub.add_parser("export", help="export an experiment's best model")
    e.add_argument("experiment", metavar="EXP")
    e.add_argument("--format", choices=("pt", "torchscript", "onnx"), default="pt")
    e.add_argument("--results-dir", type=Path, default=Path("results"))
    e.add_argument("--out", type=Path)

    b = sub.add_parser("bench", help="throughput and search-overhead benchmark")
    b.add_argument("--device", choices=("cpu", "cuda"))
    b.add_argument("--quick", action="store_true")
    b.add_argument("--out", type=Path, default=Path("bench.json"))
    b.add_argument("--only", help="comma-separated scenarios: p1,p2,p3,p4,p5,cpu_budget")
    b.add_argument("--data-dir")
    return parser


def ray_options(a: argparse.Namespace):
    from .tuning import RayOptions
    return RayOptions(address=a.address, dashboard=a.dashboard, dashboard_host=a.dashboard_host,
                      dashboard_port=a.dashboard_port, storage=a.storage)


def cmd_train(a: argparse.Namespace) -> None:
    from .single import plan_train, run_train
    flags = ("lr", "optimizer", "batch_size", "epochs", "weight_decay", "momentum", "width", "resolution",
             "label_smoothing", "schedule", "augment", "patience", "device", "threads", "evals_per_epoch",
             "data_dir", "subset", "weights", "seed")
    overrides = {k: getattr(a, k) for k in flags if getattr(a, k) is not None}
    if a.download:
        overrides["download"] = True
    overrides.update(dict(a.set))
    cfg, exp = plan_train(a.space, overrides, a.results_dir, a.name, a.resume, a.overwrite)
    run_train(cfg, exp, a.resume, a.overwrite)


def cmd_search(a: argparse.Namespace) -> None:
    from .search import SearchOptions, plan_search, run_search
    opts = SearchOptions(results_dir=a.results_dir, name=a.name, num_samples=a.num_samples, max_epochs=a.max_epochs,
                         grace_period=a.grace_period, time_budget=a.time_budget, data_dir=a.data_dir,
                         subset=a.subset, download=a.download, weights=a.weights, gpus_per_trial=a.gpus_per_trial,
                         cpus_per_trial=a.cpus_per_trial, seed=a.seed, max_failures=a.max_failures,
                         resume=a.resume, overwrite=a.overwrite, quick=a.quick, report=not a.no_report,
                         ray=ray_options(a))
    run_search(plan_search(a.space, opts))


def cmd_kfold(a: argparse.Namespace) -> None:
    from .kfold import KFoldOptions, plan_kfold, run_kfold
    opts = KFoldOptions(results_dir=a.results_dir, name=a.name, k=a.k, epochs=a.epochs, num_samples=a.num_samples,
                        from_search=a.from_search, top=a.top, fixed=dict(a.set), data_dir=a.data_dir,
                        subset=a.subset, download=a.download, weights=a.weights, gpus_per_trial=a.gpus_per_trial,
                        cpus_per_trial=a.cpus_per_trial, seed=a.seed, max_failures=a.max_failures,
                        time_budget=a.time_budget, resume=a.resume, overwrite=a.overwrite,
                        report=not a.no_report, ray=ray_options(a))
    run_kfold(plan_kfold(a.space, opts))


def cmd_report(a: argparse.Namespace) -> None:
    from .report import experiment_path, write_report
    print(write_report(experiment_path(a.results_dir, a.experiment)))


def cmd_compare(a: argparse.Namespace) -> None:
    from .report import compare
    compare(a.model, a.results_dir, run_missing=a.run_missing, data_dir=a.data_dir, weights=a.weights)


def cmd_export(a: argparse.Namespace) -> None:
    from .export import export
    from .report import experiment_path
    print(export(experiment_path(a.results_dir, a.experiment), a.format, a.out))


def cmd_bench(a: argparse.Namespace) -> None:
    from .bench import run_bench
    run_bench(device=a.device, quick=a.quick, out=a.out, only=a.only, data_dir=a.data_dir)


COMMANDS = {"train": cmd_train, "search": cmd_search, "kfold": cmd_kfold, "report": cmd_report,
            "compare": cmd_compare, "export": cmd_export, "bench": cmd_bench}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        COMMANDS[args.command](args)
    except UserError as e:
        sys.stderr.write(f"tune_cifar {args.command}: error: {e}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("interrupted: continue with the same command and --resume\n")
        return 130
    return 0
