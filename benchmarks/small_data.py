"""The small-data benchmark of issue 21 (BENCHMARKS.md, "Small data sets"): stratified subsets of
CIFAR-10 written as image folders, and the default search command timed on them.

    # the folders: train/ with N stratified training images, test/ with 2,000 stratified test images
    python benchmarks/small_data.py make --cifar ../shared/cifar10 --n 500 --out /tmp/small/c500
    python benchmarks/small_data.py make --cifar ../shared/cifar10 --n 2000 --out /tmp/small/c2000
    # one run: the command after `--`, from the code in --code (PYTHONPATH), its exit code, wall time
    # and best.json's test accuracy appended to --json under --label
    python benchmarks/small_data.py run --json benchmarks/small_data_cpu_2026-12-01.json --label after \
        --code . -- search simple_cnn --data-dir /tmp/small/c500 --results-dir /tmp/small/r --name a500 --seed 0

The module imports nothing of tune_cifar, so the same file times the code before and after a change.
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

CIFAR_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def read_cifar(root: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The CIFAR-10 pickles under root (or root/cifar-10-batches-py) as uint8 HWC arrays + labels."""
    folder = root / "cifar-10-batches-py" if (root / "cifar-10-batches-py").exists() else root

    def batch(name: str) -> tuple[np.ndarray, np.ndarray]:
        with open(folder / name, "rb") as f:
            d = pickle.load(f, encoding="bytes")
        return d[b"data"].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), np.asarray(d[b"labels"])

    parts = [batch(f"data_batch_{i}") for i in range(1, 6)]
    test_x, test_y = batch("test_batch")
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]), test_x, test_y


def stratified(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    from sklearn.model_selection import train_test_split
    if n >= len(labels):
        return np.arange(len(labels))
    idx, _ = train_test_split(np.arange(len(labels)), train_size=n, stratify=labels, random_state=seed)
    return np.sort(idx)


def write_folder(out: Path, x: np.ndarray, y: np.ndarray, classes: list[int], gray: bool = False) -> None:
    from PIL import Image
    for i, (img, label) in enumerate(zip(x, y)):
        d = out / CIFAR_CLASSES[label]
        d.mkdir(parents=True, exist_ok=True)
        im = Image.fromarray(img)
        (im.convert("L") if gray else im).save(d / f"{i:05d}.png")


def make(cifar: Path, n: int, out: Path, n_test: int = 2000, classes: list[int] | None = None,
         gray: bool = False, seed: int = 0) -> None:
    """train/ with n stratified training images of `classes` (default all 10), test/ with n_test."""
    train_x, train_y, test_x, test_y = read_cifar(cifar)
    classes = classes or list(range(10))
    keep_tr, keep_te = np.isin(train_y, classes), np.isin(test_y, classes)
    train_x, train_y, test_x, test_y = train_x[keep_tr], train_y[keep_tr], test_x[keep_te], test_y[keep_te]
    tr, te = stratified(train_y, n, seed), stratified(test_y, n_test, seed)
    write_folder(out / "train", train_x[tr], train_y[tr], classes, gray)
    if n_test:
        write_folder(out / "test", test_x[te], test_y[te], classes, gray)


def run(json_path: Path, label: str, code: Path, argv: list[str]) -> dict:
    """Run `python -m tune_cifar ARGV` with PYTHONPATH=code; append one record to json_path."""
    env = dict(os.environ, PYTHONPATH=str(code.resolve()))
    t0 = time.time()
    p = subprocess.run([sys.executable, "-m", "tune_cifar", *argv], env=env, capture_output=True, text=True)
    wall = time.time() - t0
    rec = {"label": label, "code": str(code.resolve()), "command": "python -m tune_cifar " + " ".join(argv),
           "rc": p.returncode, "wall_s": round(wall, 1), "stderr_tail": p.stderr.strip().splitlines()[-1:],
           "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t0))}
    if "--results-dir" in argv and "--name" in argv:
        exp = Path(argv[argv.index("--results-dir") + 1]) / argv[argv.index("--name") + 1]
        for f in ("best.json",):
            if (exp / f).exists():
                best = json.loads((exp / f).read_text())
                rec.update({k: best.get(k) for k in ("test_acc", "val_acc", "trials", "status_counts",
                                                     "best_config", "epochs")})
        if (exp / "plan.json").exists():
            rec["plan_fitting"] = json.loads((exp / "plan.json").read_text()).get("fitting")
    records = json.loads(json_path.read_text()) if json_path.exists() else []
    records.append(rec)
    tmp = json_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(records, indent=1))
    tmp.replace(json_path)
    print(json.dumps({k: rec.get(k) for k in ("label", "command", "rc", "wall_s", "test_acc")}), flush=True)
    return rec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="what", required=True)
    m = sub.add_parser("make", help="write a stratified CIFAR-10 subset as an image folder")
    m.add_argument("--cifar", type=Path, default=Path(os.environ.get("TUNE_CIFAR_DATA", "../shared/cifar10")))
    m.add_argument("--n", type=int, required=True)
    m.add_argument("--n-test", type=int, default=2000)
    m.add_argument("--classes", type=int, nargs="*", default=None)
    m.add_argument("--gray", action="store_true")
    m.add_argument("--out", type=Path, required=True)
    r = sub.add_parser("run", help="time one tune_cifar command, append its record to a JSON file")
    r.add_argument("--json", type=Path, required=True)
    r.add_argument("--label", required=True)
    r.add_argument("--code", type=Path, default=Path("."))
    r.add_argument("argv", nargs=argparse.REMAINDER)
    a = ap.parse_args()
    if a.what == "make":
        make(a.cifar, a.n, a.out, a.n_test, a.classes, a.gray)
    else:
        run(a.json, a.label, a.code, a.argv[1:] if a.argv[:1] == ["--"] else a.argv)


if __name__ == "__main__":
    main()
