"""The acceptance machinery: each chosen part of parts.py timed, with its target and verdict, in a
fixed order (the parts without Ray first, so Ray's start slows none of them); the table it prints and
writes. `bench --accept` runs every part; `bench --only p2,p3` runs those parts the same way."""
from __future__ import annotations

import time
from typing import Any, Callable

from . import parts
from .parts import Bench
from .sizes import TARGETS, target_text, verdict

# part name (what --only takes) -> target key
ORDER = ("p1", "p4", "p4c", "p2", "p3", "p5", "p6", "p7", "pretrained")


def run_parts(b: Bench, chosen: set[str], before_searches: Callable[[], None]) -> list[dict[str, Any]]:
    """Each chosen part timed, with its target and verdict."""
    z, rows = b.z, []

    def part(pid: str, fn, sizes: str, label: str | None = None, check=None) -> dict[str, Any]:
        t0 = time.perf_counter()
        value, details = fn()
        seconds = time.perf_counter() - t0
        extra_ok = check(value, details, seconds) if check else True
        rows.append({"part": label or pid, "what": TARGETS[pid][0], "sizes": sizes,
                     "value": None if value is None else round(float(value), 4), "unit": TARGETS[pid][1],
                     "target": target_text(pid), "verdict": verdict(pid, value, b.dev, extra_ok),
                     "seconds": round(seconds, 1), "details": details})
        print(f"accept {rows[-1]['part']}: {rows[-1]['value']} (target {rows[-1]['target']}): "
              f"{rows[-1]['verdict']} [{seconds:.0f}s]", flush=True)
        return rows[-1]

    big = f"224 px rows at {z.p1_max_res}-64 px" if z.p1_max_res else "each model's own resolution"
    if "p1" in chosen:
        part("P1", lambda: parts.p1(b), f"{len(parts.MODEL_MODES)} rows, {big}, {z.p1_steps} timed steps")
    sizes4 = f"{z.p4_res} px, batch {z.p4_batch}, {z.p4_steps} timed steps"
    eager = part("P4", lambda: parts.p4(b), sizes4) if "p4" in chosen else None
    if "p4c" in chosen:
        compiled = part("P4c", lambda: parts.p4(b, z.p4_backend), sizes4 + f", backend {z.p4_backend}")
        if eager is not None:
            compiled["details"]["speedup_vs_eager"] = round(compiled["value"] / eager["value"], 3)
    if chosen & {"p2", "p3", "p5", "p6", "p7", "pretrained"}:
        before_searches()
    if "p2" in chosen:
        part("P2", lambda: parts.p2(b), f"{z.p2_trials} trials, {z.p2_epochs} epochs, subset {z.p2_subset or 'all'}")
    if "p3" in chosen:
        part("P3", lambda: parts.p3(b),
             f"{z.p3_trials} trials x 2 searches, {z.p3_epochs} epochs, subset {z.p3_subset or 'all'}")
    sizes5 = f"{z.p5_trials} trials x {z.p5_epochs} epochs, {z.p5_res} px, subset {z.p5_subset or 'all'}"
    if "p5" in chosen:
        p5 = part("P5", lambda: parts.p5(b), sizes5)
        if p5["details"].get("imagenet_weights"):
            rows.append({"part": "pretrained vgg16_frozen", "sizes": sizes5, "unit": "acc",
                         "what": "P5's search with the ImageNet weights: test accuracy",
                         "value": round(p5["details"]["test_acc"], 4), "target": target_text("pretrained"),
                         "verdict": "reported", "seconds": 0.0, "details": {}})
    if "p6" in chosen:
        acc = "P6cpu" if b.key == "cpu" else "P6"
        part(acc, lambda: parts.accuracy(b, "simple_cnn", z.p6, "p6"), describe(z.p6), label="P6",
             check=(lambda v, d, s: d["configurations"] >= 16) if acc == "P6cpu" else None)
    if "p7" in chosen:
        part("P7", lambda: parts.accuracy(b, "resnet18_scratch", z.p7, "p7"), describe(z.p7),
             check=lambda v, d, s: s <= 600)
    if "pretrained" in chosen:
        space, flags = z.pretrained
        model = space.split("_")[0]
        weights = parts.pretrained_weights(model)
        if weights is not None:
            part("pretrained", lambda: parts.accuracy(b, space, flags, "pretrained", weights), describe(flags),
                 label=f"pretrained {space}")
        else:
            from ..training.models import hub_cache_file
            rows.append({"part": f"pretrained {space}", "what": TARGETS["pretrained"][0], "sizes": describe(flags),
                         "value": None, "unit": "acc", "target": target_text("pretrained"),
                         "verdict": f"skipped: no ImageNet weights at {hub_cache_file(model)}", "seconds": 0.0,
                         "details": {}})
    return rows


def describe(flags: dict[str, Any]) -> str:
    words = {"subset": "subset", "max_epochs": "epochs", "num_samples": "trials", "time_budget": "--time-budget",
             "set_resolution": "px"}
    return ", ".join(f"{words.get(k, k)} {v}" for k, v in flags.items()) or "the space's budget"


def parts_markdown(results: dict[str, Any]) -> str:
    a = results["accept"]
    lines = [f"# bench --accept {results['date']} on {results['device']}", "",
             f"sizes: {a['sizes']} — {a['note']}", "",
             "| part | what | sizes | value | target | verdict | seconds |", "|---" * 7 + "|"]
    for p in a["parts"]:
        v = p["value"]
        value = "—" if v is None else (f"{v:,.1f} {p['unit']}" if p["unit"] in ("img/s", "s") else f"{v:.3f}")
        lines.append(f"| {p['part']} | {p['what']} | {p['sizes']} | {value} | {p['target']} | {p['verdict']} | "
                     f"{p['seconds']:.0f} |")
    lines += ["", f"total {a['total_s']:.0f} s; {a['passed']} pass, {a['failed']} fail", ""]
    p1 = next((p for p in a["parts"] if p["part"] == "P1"), None)
    if p1 is not None:
        lines += ["| model | mode | px | batch | synthetic img/s | pipeline img/s | P1 |", "|---" * 7 + "|"]
        lines += [f"| {r['model']} | {r['mode']} | {r['resolution']} | {r['batch']} | {r['synthetic_img_s']:,.1f} | "
                  f"{r['pipeline_img_s']:,.1f} | {r['P1']:.3f} |" for r in p1["details"]["rows"]]
        lines.append("")
    return "\n".join(lines)


def studies_markdown(results: dict[str, Any]) -> str:
    lines = []
    if "search_quality" in results:
        q = results["search_quality"]
        lines += [f"search quality: simple_cnn, {q['budget_s']} s per run, subset {q['subset']}, "
                  f"seeds {q['seeds']}", "",
                  "| variant | configurations evaluated | best val acc | test acc | p (test, paired vs a) |",
                  "|---" * 5 + "|"]
        for variant, row in q["table"].items():
            def ms(key, row=row, fmt=".4f"):
                m, sd = row[key]["mean"], row[key]["std"]
                return f"{m:{fmt}} +- {sd:{fmt}}" if sd is not None else f"{m:{fmt}}"
            p = row.get("p_test_acc_vs_a")
            lines.append(f"| {variant} | {ms('configurations', fmt='.1f')} | {ms('best_val_acc')} | {ms('test_acc')} | "
                         f"{'' if p is None else f'{p:.3f}'} |")
        lines.append("")
    if "rungs" in results:
        lines += ["| round | epoch | Spearman vs final | median val acc |", "|---" * 4 + "|"]
        lines += [f"| {r['round']} | {r['epoch']:.2f} | {r['spearman_vs_final']:+.3f} | {r['median_val_acc']:.3f} |"
                  for r in results["rungs"]["per_round"]]
        lines.append("")
    if "racing" in results:
        from .racing import racing_markdown
        lines += racing_markdown(results["racing"])
    if "final_model" in results:
        from .final_model import markdown as final_model_markdown
        lines += final_model_markdown(results["final_model"])
    if "cpu_budget" in results:
        import json
        lines += [f"**cpu_budget**: `{json.dumps(results['cpu_budget'])}`", ""]
    return "\n".join(lines)
