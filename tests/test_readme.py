"""The README's API example runs as written and gives sensible numbers."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_exactly_two_setup_commands():
    bash = re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S)
    commands = [line.split("#")[0].strip() for block in bash[:1] for line in block.splitlines() if line.strip()]
    assert commands == ["./dev bench", "./dev test"]
    ci = (Path(__file__).resolve().parents[1] / ".ci" / "run").read_text()
    assert "./dev test" in ci


def test_api_example_runs_and_detects_ood():
    blocks = python_blocks()
    assert blocks, "the README must show the Python API"
    out = io.StringIO()
    namespace: dict = {}
    with contextlib.redirect_stdout(out):
        exec(compile(blocks[0], "README.md", "exec"), namespace)
    printed = out.getvalue()
    assert "auroc" in printed
    metrics = namespace["gradood"].evaluate(namespace["detector"].score(namespace["test"]),
                                             namespace["detector"].score(namespace["ood"]))
    assert 0.6 < metrics["auroc"] <= 1.0


def test_detector_catalogue_in_docs_matches_the_registry():
    from gradood.cli import detectors_markdown

    docs = Path(__file__).resolve().parents[1] / "docs" / "detectors.md"
    assert docs.read_text() == detectors_markdown(), "regenerate with: gradood list --markdown > docs/detectors.md"
