"""Every code block of the README runs as written (or says, in the README, why it is not run).

Rules for README authors: a fenced block's language says what it is. ``python`` blocks run in order in one
shared namespace (like a session: a later block may use names from an earlier one); ``sh`` blocks are
``gradood ...`` command lines, each run through the CLI; ``text`` blocks are output printed by a command (not
code). A code block that must not run (it installs packages or runs for minutes) is preceded by the line
``<!-- not executed: <reason> -->``.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
CODE_LANGUAGES = {"python", "sh", "bash"}
BLOCK = re.compile(r"(?:<!--\s*not executed:(?P<reason>[^>]*?)-->[ \t]*\n)?^```(?P<lang>[\w-]*)[ \t]*\n(?P<body>.*?)^```",
                   re.S | re.M)


def blocks() -> list[dict[str, str]]:
    return [{"lang": m["lang"], "body": m["body"], "reason": (m["reason"] or "").strip(),
             "line": str(README.read_text()[:m.start()].count("\n") + 1)}
            for m in BLOCK.finditer(README.read_text())]


def runnable(lang: str) -> list[dict[str, str]]:
    return [b for b in blocks() if b["lang"] == lang and not b["reason"]]


def test_every_block_is_code_that_runs_or_output_or_says_why_not():
    for b in blocks():
        assert b["lang"] in CODE_LANGUAGES | {"text"}, (
            f"README line {b['line']}: fenced block without a known language ({b['lang']!r}); use python, sh, "
            "bash (not executed: give the reason) or text (output)")
        if b["lang"] == "bash":
            assert len(b["reason"]) > 10, f"README line {b['line']}: bash blocks are not run; say why"
        if b["reason"]:
            assert len(b["reason"]) > 10, f"README line {b['line']}: the reason for not running is too short"
    assert runnable("python") and runnable("sh")


def test_readme_has_exactly_two_setup_commands():
    bash = [b for b in blocks() if b["lang"] == "bash"]
    commands = [line.split("#")[0].strip() for line in bash[0]["body"].splitlines() if line.strip()]
    assert commands == ["./dev bench", "./dev test"]
    ci = (ROOT / ".ci" / "run").read_text()
    assert "./dev test" in ci


@pytest.fixture(scope="module")
def python_session(tmp_path_factory):
    """Run every python block in order in one namespace (in a scratch folder: blocks may write files); record
    the passes over the data."""
    from gradood.signals import Signals

    cwd = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("readme-python"))

    passes: list[int] = []  # id() of the Signals object of each pass over the data
    extract = Signals._extract

    def counting_extract(self, *args, **kwargs):
        passes.append(id(self))
        return extract(self, *args, **kwargs)

    Signals._extract = counting_extract
    namespace: dict = {}
    outputs, snapshots = [], []
    try:
        for b in runnable("python"):
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                exec(compile(b["body"], f"README.md:{b['line']}", "exec"), namespace)
            outputs.append(out.getvalue())
            snapshots.append(dict(namespace))
    finally:
        Signals._extract = extract
        os.chdir(cwd)
    return snapshots, outputs, passes


@pytest.mark.slow
def test_python_blocks_run_and_detect_ood(python_session):
    snapshots, outputs, _ = python_session
    assert "auroc" in outputs[0]
    first = snapshots[0]  # the API example on sklearn digits
    metrics = first["gradood"].evaluate(first["detector"].score(first["test"]), first["detector"].score(first["ood"]))
    assert 0.6 < metrics["auroc"] <= 1.0
    printed = "".join(outputs)
    for d in snapshots[-1]["detectors"]:
        auroc = float(re.search(rf"^{re.escape(d.name)}\s+AUROC ([0-9.]+)$", printed, re.M).group(1))
        assert auroc > 0.8, f"{d.name} on MNIST vs Fashion-MNIST: AUROC {auroc}"


@pytest.mark.slow
def test_several_detectors_read_each_dataset_once(python_session):
    snapshots, _, passes = python_session
    last = snapshots[-1]
    assert len(last["detectors"]) > 3
    # signals_for: one pass per dataset (fit set, ID test, OOD) for all the detectors
    per_set = {name: passes.count(id(last[name])) for name in ("train", "test", "ood")}
    assert per_set == {"train": 1, "test": 1, "ood": 1}, per_set


@pytest.mark.slow
def test_shell_blocks_run(capsys, tmp_path, monkeypatch):
    from gradood import cli

    monkeypatch.chdir(tmp_path)  # commands may write files (results, CSVs)

    lines = [line.split("#")[0].strip() for b in runnable("sh") for line in b["body"].splitlines()]
    lines = [line for line in lines if line]
    assert lines
    for line in lines:
        argv = shlex.split(line)
        assert argv[0] == "gradood", f"sh blocks hold gradood commands: {line!r}"
        try:
            code = cli.main(argv[1:])
        except SystemExit as e:  # --help
            code = e.code
        out = capsys.readouterr().out
        assert code == 0 and out.strip(), f"`{line}` failed or printed nothing"


def test_detector_catalogue_in_docs_matches_the_registry():
    from gradood.cli import detectors_markdown

    docs = ROOT / "docs" / "detectors.md"
    assert docs.read_text() == detectors_markdown(), "regenerate with: gradood list --markdown > docs/detectors.md"


def test_readme_detector_list_comes_from_the_registry():
    from gradood.cli import readme_detector_summary

    text = README.read_text()
    start = text.index("<!-- detectors:")
    block = text[text.index("\n", start) + 1: text.index("<!-- /detectors -->")]
    assert block == readme_detector_summary(), (
        "regenerate the README block between the <!-- detectors --> markers with "
        "python -c 'from gradood.cli import readme_detector_summary as r; print(r(), end=\"\")'")
