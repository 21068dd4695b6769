"""Command-line interface: ``gradood bench | list | demo | train``.

Every subcommand has its own ``--help``. Common options (before or after the subcommand): ``-v`` / ``-vv``
for more diagnostics (``logging``, logger ``"gradood"``), ``-q`` for errors only and no progress bars,
``--no-progress``. Progress bars are drawn only when stderr is a terminal, so a log file never fills with
carriage returns. Output piped into a command that stops reading early (``gradood list | head``) ends
quietly.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shutil
import sys
import textwrap
from typing import Any, Callable, Sequence

from .errors import GradoodError

log = logging.getLogger("gradood")


class CommandError(GradoodError):
    """A subcommand could not run; the message says why and the exception's cause is the original error."""


# ---------------------------------------------------------------------------------------------- terminal
def setup_logging(verbosity: int) -> None:
    """Route the ``gradood`` logger to stderr: warnings by default, info at ``-v``, debug at ``-vv``, errors
    only at ``-q``."""
    level = {-1: logging.ERROR, 0: logging.WARNING, 1: logging.INFO}.get(max(-1, min(verbosity, 2)), logging.DEBUG)
    log.setLevel(level)
    if not any(getattr(h, "_gradood_cli", False) for h in log.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("gradood: %(levelname)s: %(message)s"))
        handler._gradood_cli = True  # type: ignore[attr-defined]
        log.addHandler(handler)
    log.propagate = False


def progress_enabled(args: argparse.Namespace, stream: Any = None) -> bool:
    """Progress bars only on an interactive terminal, and never with ``-q`` / ``--no-progress``."""
    if getattr(args, "no_progress", False) or _verbosity(args) < 0:
        return False
    stream = sys.stderr if stream is None else stream
    return bool(getattr(stream, "isatty", lambda: False)())


def _verbosity(args: argparse.Namespace) -> int:
    return int(getattr(args, "verbose", 0) or 0) - int(getattr(args, "quiet", 0) or 0)


def terminal_width() -> int:
    """Columns available (``$COLUMNS`` or the terminal's size; 80 when unknown)."""
    return max(40, shutil.get_terminal_size((80, 24)).columns)


def format_table(rows: list[dict[str, str]], columns: list[tuple[str, str, bool]], width: int) -> str:
    """Plain-text table in at most ``width`` columns. ``columns``: ``(key, header, wrap)``. Columns with
    ``wrap=False`` (names) are never cut; ``wrap=True`` columns share the remaining width and wrap onto
    continuation lines."""
    gap = 2
    natural = {k: max([len(h)] + [len(r.get(k, "")) for r in rows]) for k, h, _ in columns}
    fixed = sum(natural[k] for k, _, w in columns if not w) + gap * (len(columns) - 1)
    flexible = [k for k, _, w in columns if w]
    widths = dict(natural)
    room = width - fixed
    if flexible and sum(natural[k] for k in flexible) > room:
        # share the room in proportion to the natural widths, at least 12 characters each
        total = sum(natural[k] for k in flexible)
        for k in flexible:
            widths[k] = max(12, min(natural[k], room * natural[k] // total))
    lines = []

    def emit(cells: dict[str, list[str]]) -> None:
        height = max(len(v) for v in cells.values())
        for i in range(height):
            parts = [(cells[k][i] if i < len(cells[k]) else "").ljust(widths[k]) for k, _, _ in columns]
            lines.append((" " * gap).join(parts).rstrip())

    emit({k: [h] for k, h, _ in columns})
    emit({k: ["-" * widths[k]] for k, _, _ in columns})
    for r in rows:
        emit({k: (textwrap.wrap(r.get(k, ""), widths[k], break_on_hyphens=False) or [""]) if w
              else [r.get(k, "")] for k, _, w in columns})
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- list
def detector_rows() -> list[dict[str, str]]:
    """One row per registered detector: what it reads, fits and tunes, and its source."""
    from .detectors import available, create

    rows = []
    for name in available():
        d = create(name)
        rows.append({"name": name, "signals": ", ".join(d.signals), "fits": "ID" if d.fits_on_id else "-",
                     "tunes": "OOD val" if d.tunes_on_ood else "-", "model": "yes" if d.needs_model else "-",
                     "params": ", ".join(f"{k}={v!r}" for k, v in d.get_params().items()
                                         if not isinstance(v, (tuple, list)) or len(v) <= 4),
                     "paper": source_of(d)})
    return rows


def source_of(detector: Any) -> str:
    """The detector's source as "first author et al., venue year" (its structured ``citation``)."""
    citation = getattr(detector, "citation", None)
    if citation is not None:
        return citation.short
    # A detector without a structured citation yet (tests/test_cli.py requires one): best effort from its
    # free-text ``paper`` ("Authors, Title, Venue Year").
    log.debug("detector %s has no structured citation; the source column is parsed from its paper string",
              detector.label)
    text = detector.paper or ""
    first = re.split(r",| & | et al\.", text, maxsplit=1)[0].strip() or "?"
    many = bool(re.match(r"[^,]+( et al\.|,[^,]+&| &)", text))
    venues = re.findall(r"\b([A-Z][A-Za-z&.' ]*?) ((?:19|20)\d\d)\b", text)
    venue = f"{venues[-1][0]} {venues[-1][1]}" if venues else "?"
    return f"{first}{' et al.' if many else ''}, {venue}"


#: How the README names each detector module's family (a module missing here is named by its file name).
FAMILY_LABELS = {
    "logit_scores": "logit baselines", "softmax_family": "softmax family", "output_feature":
    "last-layer gradients in closed form and the output x feature family", "grodin": "GRODIN", "lowdim":
    "low-dimensional gradients", "gradient_family": "full-network GradNorm and GradOrth", "gradient_uncertainty":
    "gradient uncertainty", "gaia": "GAIA", "odin": "ODIN", "fssd": "FSSD", "mahalanobis": "Mahalanobis",
    "density": "class-conditional densities", "knn": "nearest neighbours", "vim": "ViM", "react": "ReAct",
    "shaping": "activation shaping", "feature_map": "feature-map shaping", "feature_geometry": "feature geometry",
    "gram": "Gram matrices", "openmax": "OpenMax", "mc_dropout": "MC dropout",
}


def readme_detector_summary() -> str:
    """The README's list of detectors, from the registry (tests/test_readme.py keeps the README in sync)."""
    from .detectors import available
    from .detectors.base import detector_class

    families: dict[str, list[str]] = {}
    for name in available():
        module = detector_class(name)[0].__module__.rsplit(".", 1)[-1]
        families.setdefault(FAMILY_LABELS.get(module, module), []).append(f"`{name}`")
    parts = [f"{label} ({', '.join(names)})" for label, names in families.items()]
    text = (f"* **{len(available())} registered detectors**, each with its paper's form under its own name: "
            + "; ".join(parts) + ".")
    import textwrap

    return textwrap.fill(text, width=115, subsequent_indent="  ", break_on_hyphens=False) + "\n"


def detectors_markdown() -> str:
    """The detector catalogue as Markdown (docs/detectors.md is this output)."""
    cols = [("name", "name"), ("signals", "reads"), ("fits", "fits on"), ("tunes", "tunes on"),
            ("model", "reruns model"), ("params", "hyperparameters (defaults)"), ("paper", "source")]
    lines = ["# Detectors", "",
             "Generated by `gradood list --markdown` from the registry. Every score: higher = more in-distribution.",
             "Detectors marked \"OOD val\" tune on an OOD validation split and are marked † in results tables.",
             "Formulas, defaults, costs and the papers' contradictions: [methods.md](methods.md).", "",
             "| " + " | ".join(h for _, h in cols) + " |", "|" + "---|" * len(cols)]
    for r in detector_rows():
        lines.append("| " + " | ".join(r[k].replace("|", "\\|") for k, _ in cols) + " |")
    return "\n".join(lines) + "\n"


def detectors_table(width: int) -> str:
    rows = [{**r, "fit": "+".join(w for w, on in (("ID", r["fits"] != "-"), ("OOD", r["tunes"] != "-")) if on) or "-"}
            for r in detector_rows()]
    cols: list[tuple[str, str, bool]] = [("name", "detector", False), ("fit", "fits on", False),
                                         ("model", "model", False)]
    if width >= 110:  # room for what each detector reads
        cols.append(("signals", "reads", True))
    cols.append(("paper", "source", True))
    legend = ("fits on: ID = fits on ID data, OOD = tunes on an OOD validation split (marked † in results); "
              "model: reruns the model (perturbation or gradients). Hyperparameters: gradood list detectors "
              "--markdown; formulas: docs/methods.md.")
    return format_table(rows, cols, width) + "\n\n" + textwrap.fill(legend, width)


def datasets_table(width: int) -> str:
    from . import data

    rows = []
    for name in data.available():
        spec = data.describe(name)
        rows.append({"name": name, "splits": ", ".join(spec.splits),
                     "summary": spec.summary + (" Needs root=." if spec.needs_root else "")})
    return format_table(rows, [("name", "dataset", False), ("splits", "splits", True),
                               ("summary", "what", True)], width)


def models_table(width: int) -> str:
    from . import models

    rows = []
    for name in models.available():
        info = models.describe(name)
        acc = ", ".join(f"{k} {100 * v:.1f}%" for k, v in (info.accuracy or {}).items())
        rows.append({"name": name, "dataset": info.dataset, "input": "x".join(map(str, info.input_shape)),
                     "accuracy": acc})
    return format_table(rows, [("name", "model", False), ("dataset", "trained on", False),
                               ("input", "input", False), ("accuracy", "accuracy", True)], width)


LISTINGS: dict[str, Callable[[int], str]] = {"detectors": detectors_table, "datasets": datasets_table,
                                             "models": models_table}


def cmd_list(args: argparse.Namespace) -> int:
    what = args.what
    if args.markdown:
        if what not in (None, "detectors"):
            raise CommandError(f"--markdown lists detectors only, not {what}: run `gradood list detectors --markdown`.")
        print(detectors_markdown(), end="")
        return 0
    width = terminal_width()
    sections = [what] if what else list(LISTINGS)
    for i, section in enumerate(sections):
        if len(sections) > 1:
            print(("\n" if i else "") + f"{section}:")
        print(LISTINGS[section](width))
    return 0


# ---------------------------------------------------------------------------------------------- demo / bench / train
def _pivot_table(title: str, rows: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    oods = list(dict.fromkeys(r["ood_set"] for r in rows))
    pivot: dict[str, dict[str, Any]] = {}
    for r in rows:
        p = pivot.setdefault(r["detector"], {"detector": r["detector"]})
        p[r["ood_set"]] = f"{100 * r['auroc']:.2f} / {100 * r['fpr95']:.2f}"
    t = Table(title=title, title_justify="left")
    t.add_column("detector", no_wrap=True)
    for o in oods:
        t.add_column(o, justify="right")
    for p in pivot.values():
        t.add_row(p["detector"], *[p.get(o, "") for o in oods])
    Console().print(t)


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    rows, info = run_demo(seed=args.seed, progress=progress_enabled(args))
    _pivot_table(f"sklearn digits: MLP trained on 0-4 (test accuracy {100 * info['accuracy']:.1f}%, "
                 f"{info['n_train']} train / {info['n_test']} ID test), AUROC % / FPR95 % per OOD set, "
                 f"{info['seconds']:.1f} s", rows)
    for name, why in info.get("skipped", {}).items():
        print(f"skipped {name}: {why}", file=sys.stderr)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    try:
        from .bench.runner import main as bench_main
    except ImportError as e:
        raise CommandError(f"the benchmark runner (gradood.bench.runner) failed to import: {type(e).__name__}: {e}. "
                           "Reinstall gradood (./dev test, or pip install gradood) and rerun.") from e
    # the runner reads args.quiet as "no progress bars"
    args.quiet = not progress_enabled(args)
    log.info("benchmark spec: %s", args.spec or "built-in default")
    return bench_main(args)


def cmd_train(args: argparse.Namespace) -> int:
    from .models.training import train_main

    argv = list(args.train_argv)
    if not progress_enabled(args) and "--no-progress" not in argv:
        argv.append("--no-progress")
    return train_main(argv)


# ---------------------------------------------------------------------------------------------- parser
def common_options(suppress_defaults: bool = False, progress_flag: bool = True) -> argparse.ArgumentParser:
    """Options every subcommand takes (``-v``, ``-q``, ``--no-progress``); pass a fresh one as
    ``parents=[common_options()]`` when adding a subcommand (argparse shares the parent's option objects)."""
    # SUPPRESS: an option given before the subcommand is not reset by the subcommand's default (readers use
    # getattr(args, name, default)); ``suppress_defaults`` is kept for callers that pass it
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("output")
    g.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS,
                   help="more diagnostics on stderr (-vv: debug)")
    g.add_argument("-q", "--quiet", action="count", default=argparse.SUPPRESS,
                   help="errors only, no progress bars")
    if progress_flag:
        g.add_argument("--no-progress", action="store_true", default=argparse.SUPPRESS,
                       help="no progress bars (they are drawn only when stderr is a terminal anyway)")
    return p


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gradood", parents=[common_options(suppress_defaults=True)],
        description="Post-hoc OOD detection for trained PyTorch classifiers. Every score: higher = more "
                    "in-distribution. `gradood <command> --help` explains each command.")
    sub = p.add_subparsers(dest="command", required=True, metavar="command")

    d = sub.add_parser("demo", parents=[common_options()], help="seconds-long demo on sklearn digits (offline)",
                       description="Train a small MLP on sklearn digits 0-4 and score digits 5-9 and noise as OOD "
                                   "with a few detectors; prints AUROC / FPR95 per OOD set.")
    d.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    d.set_defaults(func=cmd_demo)

    b = sub.add_parser("bench", parents=[common_options()], help="run a benchmark spec (default: the built-in real benchmark)",
                       description="Run a benchmark spec: every detector x model x OOD set, with cached signals "
                                   "(a rerun resumes). Writes results.csv/.json/.md and an HTML report. The spec "
                                   "format: docs/spec.md.")
    b.add_argument("spec", nargs="?", default=None,
                   help="TOML benchmark spec file, or the name of a built-in spec (default: the built-in default)")
    b.add_argument("--out", default=None, help="results folder (default: ./gradood-results for the default spec, "
                   "./gradood-results-<spec name> for any other, so that one spec's tables never overwrite another's)")
    b.add_argument("--cache", default=None, help="signal cache folder (default: <out>/cache)")
    b.add_argument("--detectors", default=None, help="comma-separated subset of detectors (see gradood list detectors)")
    b.add_argument("--no-report", action="store_true", help="skip the HTML report")
    b.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                   help="extract signals on a Ray cluster (pip install 'gradood[ray]'): no ADDRESS starts a local "
                        "one, 'auto' or ray://host:port joins a running cluster (docs/distributed.md)")
    b.add_argument("--ray-workers", type=int, default=2, metavar="N",
                   help="actors in the extraction pool, each holding the model (default 2)")
    b.add_argument("--ray-gpus", type=float, default=0, metavar="G", help="GPUs per actor (default 0: CPU)")
    b.add_argument("--example-spec", action="store_true",
                   help="print a commented spec that uses every key, and exit")
    b.add_argument("--spec-reference", action="store_true",
                   help="print the spec reference (docs/spec.md) as Markdown, and exit")
    b.set_defaults(func=cmd_bench)

    ls = sub.add_parser("list", parents=[common_options()], help="list detectors, datasets and models",
                        description="List what gradood provides. The layout fits the terminal width ($COLUMNS); "
                                    "names are never cut.")
    ls.add_argument("what", nargs="?", choices=sorted(LISTINGS), default=None,
                    help="one section only (default: all three)")
    ls.add_argument("--markdown", action="store_true",
                    help="print the detector catalogue as Markdown (the content of docs/detectors.md)")
    ls.set_defaults(func=cmd_list)

    from .models.training import _parser as train_parser

    # the recipe's own parser (models/training.py) provides the arguments, its -h and --no-progress
    t = sub.add_parser("train", parents=[common_options(progress_flag=False), train_parser()], add_help=False,
                       help="train a model recipe, e.g. gradood train lenet-fmnist --out lenet.pt",
                       description=train_parser().description)
    t.set_defaults(func=cmd_train)

    from .cli_deploy import add_deploy_commands

    add_deploy_commands(sub, common_options)  # gradood fit / gradood score (cli_deploy.py)
    return p


def _train_argv(argv: Sequence[str]) -> list[str]:
    """The arguments after ``train`` (recorded verbatim in the checkpoint's JSON), minus the CLI-wide options."""
    rest = list(argv[list(argv).index("train") + 1:])
    return [a for a in rest if a not in ("-v", "-vv", "--verbose", "-q", "--quiet")]


def _version() -> str:
    from . import __version__

    return __version__


def _report(e: BaseException, verbosity: int) -> None:
    print(f"gradood: error: {e}", file=sys.stderr)
    cause = e.__cause__
    while cause is not None:
        print(f"  caused by {type(cause).__name__}: {cause}", file=sys.stderr)
        cause = cause.__cause__
    if verbosity > 0:
        import traceback

        traceback.print_exception(e, file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.command == "train":
        args.train_argv = _train_argv(argv)
    verbosity = _verbosity(args)
    setup_logging(verbosity)
    log.debug("gradood %s, python %s, command line: %s", _version(), sys.version.split()[0], argv)
    try:
        return int(args.func(args) or 0)
    except GradoodError as e:
        _report(e, verbosity)
        return 2
    except BrokenPipeError:
        # the reader stopped early (`gradood list | head`): not an error; keep Python from complaining at exit
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print("gradood: interrupted; rerun the same command to resume from the cache.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
