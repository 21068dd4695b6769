"""CLINC150: 150 in-scope intents and out-of-scope queries (Larson et al., EMNLP 2019; CC BY 3.0).

The "full" release (``data_full.json``, 2.5 MB) ships inside gradood with its licence and attribution
(``gradood/data/files/clinc150/``), so the text benchmark runs offline; users with a network and a copy of
gradood without package data get it from the authors' repository, sha256-checked.

Splits: ``train`` / ``val`` / ``test`` (in scope, 15 000 / 3 000 / 4 500, labels 0..149 = the intents in
alphabetical order), ``oos_train`` / ``oos_val`` / ``oos_test`` (out of scope, 100 / 100 / 1 000, label -1),
and ``oos`` = ``oos_val`` followed by ``oos_test`` with the validation rows marked (``val_rows``) so the
benchmark tunes on the official validation queries and tests on the official test queries.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np

from ..errors import InputError
from .arrays import UNLABELLED
from .sources import Resource, SystemFile, Url, fetch
from .text import TextDataset

SHA256 = "36923c3705a59e08fe9c3883d8bc2dd966ef93e22cb78ac41171782a698d56e0"
URL = "https://raw.githubusercontent.com/clinc/oos-eval/master/data/data_full.json"
PACKAGED = Path(__file__).resolve().parent / "files" / "clinc150" / "data_full.json"
LICENCE = "CC BY 3.0 (Larson et al., EMNLP 2019, https://github.com/clinc/oos-eval)"
SPLITS = ("train", "val", "test", "oos_train", "oos_val", "oos_test", "oos")
SIZES = {"train": 15000, "val": 3000, "test": 4500, "oos_train": 100, "oos_val": 100, "oos_test": 1000}


class PackagedFile(SystemFile):
    """A file shipped inside gradood (used in place, never deleted)."""

    def describe(self) -> str:
        return f"copy shipped with gradood ({self.path})"


RESOURCE = Resource("clinc150/data_full.json", SHA256, (PackagedFile(str(PACKAGED)), Url(URL)), licence=LICENCE)


@functools.lru_cache(maxsize=2)
def _read(root: str | None) -> dict:
    path = fetch(RESOURCE, root=root)
    raw = json.loads(Path(path).read_text(encoding="utf-8"))
    for k, n in SIZES.items():
        if len(raw.get(k, ())) != n:
            raise InputError(f"{path}: split {k!r} has {len(raw.get(k, ()))} queries, expected {n}.")
    return raw


def intents(root: str | None = None) -> tuple[str, ...]:
    """The 150 in-scope intent names, sorted (index = label)."""
    return tuple(sorted({intent for _, intent in _read(root)["train"]}))


def load_clinc150(split: str = "test", root: str | None = None) -> TextDataset:
    """One split of CLINC150 as a :class:`TextDataset` (``root``: a folder holding ``data_full.json``)."""
    if split not in SPLITS:
        raise InputError(f"CLINC150 has no split {split!r}; its splits are {', '.join(SPLITS)}.")
    raw = _read(None if root is None else str(root))
    classes = intents(None if root is None else str(root))
    index = {c: i for i, c in enumerate(classes)}
    parts = ("oos_val", "oos_test") if split == "oos" else (split,)
    texts, labels = [], []
    for part in parts:
        for text, intent in raw[part]:
            texts.append(text)
            labels.append(UNLABELLED if part.startswith("oos") else index[intent])
    val_rows = np.arange(SIZES["oos_val"], dtype=np.int64) if split == "oos" else None
    return TextDataset(tuple(texts), np.asarray(labels, dtype=np.int64), classes, name="clinc150", split=split,
                       source="CLINC150 data_full.json (Larson et al., EMNLP 2019)", licence=LICENCE,
                       val_rows=val_rows)
