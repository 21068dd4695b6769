"""Command-line interface: ``gradood bench | list | demo | train | report``."""

from __future__ import annotations

import argparse
import sys
from typing import Any, Sequence

from .errors import GradoodError


def _table(title: str, rows: list[dict[str, Any]], columns: list[tuple[str, str]]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title, title_justify="left")
    for _key, header in columns:
        t.add_column(header, justify="left" if _key in ("detector", "ood_set", "name") else "right")
    for r in rows:
        t.add_row(*[_fmt(r.get(k)) for k, _ in columns])
    Console().print(t)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{100 * v:.2f}"
    return "" if v is None else str(v)


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    rows, info = run_demo(seed=args.seed, progress=not args.quiet)
    pivot: dict[str, dict[str, Any]] = {}
    oods = list(dict.fromkeys(r["ood_set"] for r in rows))
    for r in rows:
        p = pivot.setdefault(r["detector"], {"detector": r["detector"]})
        p[f"auroc:{r['ood_set']}"] = r["auroc"]
        p[f"fpr95:{r['ood_set']}"] = r["fpr95"]
    cols = [("detector", "detector")]
    for o in oods:
        cols += [(f"auroc:{o}", f"AUROC {o}"), (f"fpr95:{o}", f"FPR95 {o}")]
    _table(f"sklearn digits: MLP trained on 0-4 (test accuracy {100 * info['accuracy']:.1f}%, "
           f"{info['n_train']} train / {info['n_test']} ID test), AUROC / FPR95 in %, {info['seconds']:.1f} s",
           list(pivot.values()), cols)
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from .detectors import available, create

    rows = []
    for name in available():
        d = create(name)
        rows.append({"name": name, "signals": ", ".join(d.signals), "fits": "ID" if d.fits_on_id else "-",
                     "tunes": "OOD val" if d.tunes_on_ood else "-", "paper": d.paper.split(",")[0]})
    _table("detectors", rows, [("name", "name"), ("signals", "signals"), ("fits", "fits on"),
                               ("tunes", "tunes on"), ("paper", "source")])
    for what, mod in (("datasets", "gradood.data"), ("models", "gradood.models")):
        try:
            module = __import__(mod, fromlist=["available"])
            print(f"{what}: {', '.join(module.available())}")
        except (ImportError, AttributeError):
            pass
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    try:
        from .bench.runner import main as bench_main
    except ImportError:
        print("the benchmark runner is not installed in this version; running the digits demo instead", file=sys.stderr)
        return cmd_demo(args)
    return bench_main(args)


def cmd_train(args: argparse.Namespace) -> int:
    from .models.training import train_main

    return train_main(args.rest)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gradood", description="Post-hoc OOD detection for trained PyTorch classifiers.")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="seconds-long demo on sklearn digits (offline)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--quiet", action="store_true", help="no progress bars")
    d.set_defaults(func=cmd_demo)

    b = sub.add_parser("bench", help="run a benchmark spec (default: the built-in real benchmark)")
    b.add_argument("spec", nargs="?", default=None, help="TOML benchmark spec (default: built-in)")
    b.add_argument("--out", default="gradood-results", help="results folder (default: ./gradood-results)")
    b.add_argument("--cache", default=None, help="signal cache folder (default: <out>/cache)")
    b.add_argument("--detectors", default=None, help="comma-separated subset of detectors")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--quiet", action="store_true", help="no progress bars")
    b.add_argument("--no-report", action="store_true", help="skip the HTML report")
    b.set_defaults(func=cmd_bench)

    ls = sub.add_parser("list", help="list detectors, datasets and models")
    ls.set_defaults(func=cmd_list)

    t = sub.add_parser("train", help="train a model recipe, e.g. gradood train lenet-fmnist --out lenet.pt")
    t.add_argument("rest", nargs=argparse.REMAINDER)
    t.set_defaults(func=cmd_train)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except GradoodError as e:
        print(f"gradood: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gradood: interrupted; rerun the same command to resume from the cache.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
