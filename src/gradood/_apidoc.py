"""Build the API reference from the docstrings with pdoc: ``python -m gradood._apidoc [OUT_DIR]`` (default
``docs/api``; pdoc is in the ``test`` extra). tests/test_docs.py builds it and fails on any warning.

pdoc documents only the submodules a package lists in ``__all__``; gradood's packages export functions and
classes there, so every public module (no ``_`` in its dotted name) is passed as a root, without overlaps
(pdoc warns when a module is added twice).
"""

from __future__ import annotations

import pkgutil
import sys
import warnings
from pathlib import Path


def public_module_roots() -> list[str]:
    """Public gradood modules as pdoc roots whose submodule walks do not overlap."""
    from pdoc.extract import walk_specs

    import gradood

    names = ["gradood"] + sorted(m.name for m in pkgutil.walk_packages(gradood.__path__, "gradood.")
                                 if not any(part.startswith("_") for part in m.name.split(".")))
    roots: list[str] = []
    covered: set[str] = set()
    for name in names:
        if name not in covered:
            roots.append(name)
            covered.update(walk_specs([name]))
    return roots


def build(out_dir: str | Path) -> list[str]:
    """Write the HTML reference into ``out_dir``; return the warnings pdoc raised (empty when clean)."""
    import pdoc

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pdoc.pdoc(*public_module_roots(), output_directory=Path(out_dir))
    return sorted({f"{w.category.__name__}: {w.message}" for w in caught})


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    out = Path(argv[0] if argv else "docs/api")
    problems = build(out)
    for p in problems:
        print(f"warning: {p}", file=sys.stderr)
    print(f"API reference: {out / 'index.html'}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
