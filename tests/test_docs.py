"""The documentation stands alone: every document a docstring, doc or comment refers to is in the repository,
nothing cites the project's private notes, and the API reference builds from the docstrings without a warning."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCANNED = [ROOT / "README.md", ROOT / "DEVELOPERS.md", *sorted((ROOT / "docs").glob("*.md")),
           *sorted((ROOT / "src").rglob("*.py")), *sorted((ROOT / "benchmarks").glob("*.py")),
           *sorted((ROOT / "tests").glob("*.py")), *sorted((ROOT / "src").rglob("*.toml"))]
#: files gradood *writes* (named in docstrings as outputs), not documents it refers to
WRITTEN_BY_GRADOOD = {"results.md"}
#: names of documents that exist only outside the repository (the notes the project was started from)
OUTSIDE = re.compile(r"method-specs|/work/shared|\.\./papers/|\.\./docs/")
DOC_REF = re.compile(r"(?<![\w./-])((?:[\w.-]+/)*[\w.-]+\.md)\b")


def _refs(path: Path) -> list[tuple[int, str]]:
    found = []
    for i, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        for m in DOC_REF.finditer(line):
            found.append((i, m.group(1)))
    return found


def _resolves(ref: str, source: Path) -> bool:
    ref = ref.split("#")[0]
    candidates = [ROOT / ref, source.parent / ref, ROOT / "docs" / ref]
    return any(c.is_file() for c in candidates)


def test_every_referenced_document_is_in_the_repository():
    missing = []
    for path in SCANNED:
        if path == Path(__file__):
            continue
        for line, ref in _refs(path):
            if Path(ref).name in WRITTEN_BY_GRADOOD and not ref.startswith("docs/"):
                continue
            if not _resolves(ref, path):
                missing.append(f"{path.relative_to(ROOT)}:{line}: {ref}")
    assert not missing, "references to documents that are not in the repository:\n" + "\n".join(missing)


def test_nothing_cites_documents_outside_the_repository():
    hits = [f"{p.relative_to(ROOT)}:{i}: {line.strip()[:100]}" for p in SCANNED if p != Path(__file__)
            for i, line in enumerate(p.read_text(errors="replace").splitlines(), 1) if OUTSIDE.search(line)]
    assert not hits, "cite docs/methods.md or docs/design.md instead:\n" + "\n".join(hits)


def test_the_scan_catches_a_dangling_reference(tmp_path):
    doc = tmp_path / "x.py"
    doc.write_text('"""See design.md and docs/nowhere.md (method-specs 2.4)."""\n')
    refs = [r for _, r in _refs(doc)]
    assert refs == ["design.md", "docs/nowhere.md"]
    assert _resolves("design.md", ROOT / "src" / "gradood" / "x.py")  # docs/design.md
    assert not _resolves("docs/nowhere.md", doc)
    assert OUTSIDE.search(doc.read_text())


def test_methods_doc_covers_every_detector_class():
    """Each detector class is described in docs/methods.md under its primary registry name (variants are
    covered by their class's entry)."""
    import gradood

    methods = (ROOT / "docs" / "methods.md").read_text()
    missing = sorted({type(gradood.create(n)).name for n in gradood.available()} - set(re.findall(r"`([\w-]+)", methods)))
    assert not missing, f"docs/methods.md has no entry for {missing}: add a row to section 7 or a section"


@pytest.mark.slow
def test_api_reference_builds_without_warnings(tmp_path):
    pytest.importorskip("pdoc", reason="pdoc is in the test extra (pip install -e '.[test]')")
    from gradood import _apidoc

    messages = _apidoc.build(tmp_path)
    assert not messages, "the API reference build warned:\n" + "\n".join(messages)
    pages = {p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.html")}
    for page in ("gradood.html", "gradood/detectors.html", "gradood/data.html", "gradood/metrics.html",
                 "gradood/probe.html", "gradood/signals.html", "gradood/bench/runner.html", "gradood/cli.html"):
        assert page in pages, f"{page} missing from the API reference"
    assert "higher = more in-distribution" in (tmp_path / "gradood" / "detectors.html").read_text()
