"""The command line explains itself: readable at 80 columns, one citation style, real --help everywhere, quiet on a
closed pipe, progress bars only on a terminal, logging levels, and errors (never fallbacks) when imports fail."""

from __future__ import annotations

import io
import logging
import re
import subprocess
import sys

import pytest

import gradood
from gradood import cli

SUBCOMMANDS = {"demo": ["--seed"], "bench": ["--out", "--detectors", "--no-report"], "list": ["--markdown"],
               "train": ["--out", "--epochs", "--train-subset", "lenet-fmnist"]}


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_list_at_80_columns_shows_every_detector_name_whole(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    code, out, _ = run(capsys, "list")
    assert code == 0
    lines = out.splitlines()
    assert max(len(line) for line in lines) <= 80
    first_words = {line.split()[0] for line in lines if line.strip()}
    for name in gradood.available():
        assert name in first_words, f"{name} is not shown whole at the start of a line"
    for section in ("detectors:", "datasets:", "models:"):
        assert section in lines


def test_list_sections_separately(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    _, out, _ = run(capsys, "list", "models")
    assert "mnist-cnn-ccexam" in out and "msp" not in out.split()
    _, out, _ = run(capsys, "list", "datasets")
    assert "fashion_mnist" in out and "mnist-cnn-ccexam" not in out
    _, out, _ = run(capsys, "list", "detectors")
    assert "mahalanobis-ensemble-tuned" in out and "fashion_mnist" not in out


def test_wide_terminal_adds_what_each_detector_reads(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "140")
    _, out, _ = run(capsys, "list", "detectors")
    assert "reads" in out.splitlines()[0] and "param-grads" in out


def test_format_table_wraps_flexible_columns_and_never_cuts_names():
    rows = [{"name": "a-very-long-detector-name-indeed", "src": "word " * 30}]
    text = cli.format_table(rows, [("name", "name", False), ("src", "source", True)], width=60)
    assert all(len(line) <= 60 for line in text.splitlines())
    assert "a-very-long-detector-name-indeed" in text
    assert text.count("word") == 30


def test_every_detector_has_a_structured_citation_in_one_style():
    pattern = re.compile(r"^(Anonymous|[A-Z][\w'-]+( et al\.)?), [A-Za-z][\w &]*[A-Za-z] (19|20)\d\d$")
    for row in cli.detector_rows():
        assert pattern.match(row["paper"]), f"{row['name']}: source {row['paper']!r} is not 'First et al., venue year'"
    for name in gradood.available():
        citation = gradood.create(name).citation
        assert citation.title and citation.year and citation.venue


def test_a_detector_without_structured_citation_still_lists_in_the_same_style():
    class Uncited(gradood.Detector):
        name = "uncited"
        paper = "Doe, Roe & Poe, A Title, With Commas, ICML 2020 (arXiv 2001.00001)"

    assert cli.source_of(Uncited()) == "Doe et al., ICML 2020"


def _all_subcommands() -> list[str]:
    import argparse

    sub = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sorted(sub.choices)


def test_the_core_subcommands_exist():
    assert set(SUBCOMMANDS) <= set(_all_subcommands())


@pytest.mark.parametrize("command", _all_subcommands())
def test_every_subcommand_has_a_real_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: gradood {command}")
    for option in SUBCOMMANDS.get(command, []) + ["--verbose", "--quiet"]:
        assert option in out, f"gradood {command} --help does not document {option}"
    assert "rest" not in out.split()
    description = out.split("\n\n")[1]
    assert len(description) > 20 and not description.startswith(("positional", "options")), \
        f"gradood {command} --help has no description"


def test_train_passes_its_arguments_verbatim(monkeypatch):
    seen = {}

    def fake_train_main(argv):
        seen["argv"] = argv
        return 0

    monkeypatch.setattr("gradood.models.training.train_main", fake_train_main)
    assert cli.main(["train", "lenet-fmnist", "--out", "x.pt", "--epochs", "1", "-v"]) == 0
    # not a terminal under pytest: the recipe's own progress bar is switched off
    assert seen["argv"] == ["lenet-fmnist", "--out", "x.pt", "--epochs", "1", "--no-progress"]


def test_closed_pipe_ends_quietly():
    code = ("import sys; from gradood.cli import main; sys.exit(main(['list']))")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={"COLUMNS": "80", "PATH": ""} | _python_env())
    proc.stdout.readline()  # like `head -1`: read a little, then stop reading
    proc.stdout.close()
    err = proc.stderr.read().decode()
    proc.wait(timeout=120)
    assert "Traceback" not in err and "BrokenPipe" not in err, err
    assert proc.returncode == 0


def _python_env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if k.startswith(("PYTHON", "HOME", "GRADOOD", "OMP", "VIRTUAL"))}


class _Stream(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self._tty = tty

    def isatty(self) -> bool:
        return self._tty


def test_progress_bars_only_on_a_terminal():
    args = cli.build_parser().parse_args(["list"])
    assert cli.progress_enabled(args, _Stream(tty=True))
    assert not cli.progress_enabled(args, _Stream(tty=False))
    for flags in (["list", "-q"], ["list", "--no-progress"]):
        assert not cli.progress_enabled(cli.build_parser().parse_args(flags), _Stream(tty=True))


@pytest.mark.parametrize("flags, level", [([], logging.WARNING), (["-v"], logging.INFO), (["-vv"], logging.DEBUG),
                                          (["-q"], logging.ERROR)])
def test_verbosity_sets_the_gradood_log_level(flags, level, capsys):
    assert cli.main(["list", "models", *flags]) == 0
    assert logging.getLogger("gradood").level == level


def test_bench_runner_import_failure_is_an_error_with_its_cause(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gradood.bench.runner", None)  # makes `import` raise ImportError
    called = []
    monkeypatch.setattr("gradood.demo.run_demo", lambda *a, **k: called.append(1))
    code, out, err = run(capsys, "bench", "--no-report")
    assert code == 2 and not called, "must not fall back to the demo"
    assert "benchmark runner" in err and "caused by ModuleNotFoundError" in err


def test_listing_import_failure_is_not_swallowed(monkeypatch):
    def broken():
        raise ImportError("no module named 'x'")

    monkeypatch.setattr("gradood.models.available", broken)
    with pytest.raises(ImportError, match="no module named 'x'"):
        cli.main(["list", "models"])


def test_markdown_is_for_detectors_only(capsys):
    code, _, err = run(capsys, "list", "datasets", "--markdown")
    assert code == 2 and "detectors" in err


def test_missing_detector_module_is_an_error_with_its_cause():
    from gradood.detectors import _all

    with pytest.raises(_all.DetectorImportError, match="does not exist") as e:
        _all.import_detector_module("no_such_detector_module")
    assert isinstance(e.value.__cause__, ModuleNotFoundError)


def test_detector_module_failing_to_import_is_an_error_with_its_cause(tmp_path, monkeypatch):
    from gradood.detectors import _all

    pkg = __import__("gradood.detectors", fromlist=["x"])
    broken = tmp_path / "broken_det.py"
    broken.write_text("import no_such_dependency_xyz\n")
    monkeypatch.setattr(pkg, "__path__", [*pkg.__path__, str(tmp_path)])
    with pytest.raises(_all.DetectorImportError, match="no_such_dependency_xyz") as e:
        _all.import_detector_module("broken_det")
    assert isinstance(e.value.__cause__, ModuleNotFoundError)
    broken.write_text("raise RuntimeError('boom')\n")
    sys.modules.pop("gradood.detectors.broken_det", None)
    with pytest.raises(_all.DetectorImportError, match="boom"):
        _all.import_detector_module("broken_det")
    sys.modules.pop("gradood.detectors.broken_det", None)
