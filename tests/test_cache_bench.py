"""The bench on top of the content-addressed cache: reproducible result files, verified result and signal files,
and signal keys that follow the code computing them (issue 9 items 2 and 3, and reproducibility).

Reproducibility, by design: the result files hold no timings (a detector's seconds are printed, never stored)
and ``.npz`` members carry fixed timestamps, so the same spec on the same machine writes the same bytes --
every file under ``--out`` (tables, per-detector JSON/NPZ, the signal cache and checksum files) is compared
byte for byte, with nothing excluded. The HTML report (``--no-report`` here) is not part of that promise.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import gradood
from gradood import cache

SPEC = """
name = "cache-tiny"
batch_size = 50
ood_val = 20
checkpoint_every = 1
detectors = ["msp", "energy", {{ name = "knn", k = 5 }}, "mahalanobis", {{ name = "odin", temperature = 1000.0, eps = {eps} }}]

[[run]]
model = "lenet-fmnist"
id_fit = {{ dataset = "fashion_mnist", split = "train", stop = 50000, n = 200 }}
id_test = {{ dataset = "fashion_mnist", split = "test", n = 100 }}
ood = [
  {{ dataset = "mnist", split = "test", n = 100, group = "near" }},
  {{ dataset = "uniform_noise", name = "uniform noise", n = 100, group = "far" }},
]
"""


def write_spec(folder: Path, eps: float = 0.002) -> Path:
    p = folder / "cache-tiny.toml"
    p.write_text(SPEC.format(eps=eps))
    return p


def bench(spec: Path, out: Path, *extra: str) -> int:
    from gradood.cli import main

    return main(["bench", str(spec), "--out", str(out), "--quiet", "--no-report", *extra])


def files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def rows(out: Path) -> dict[tuple[str, str], dict]:
    doc = json.loads((out / "results.json").read_text())
    return {(r["detector"], r["ood_set"]): r for r in (doc["results"] if isinstance(doc, dict) else doc)}


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cache-bench")
    spec = write_spec(tmp)
    out = tmp / "a"
    assert bench(spec, out) == 0
    return spec, out


# ------------------------------------------------------------------------------ reproducibility
@pytest.mark.slow
def test_the_same_spec_twice_writes_the_same_bytes(first_run, tmp_path):
    spec, a = first_run
    b = tmp_path / "b"
    assert bench(spec, b) == 0
    got, want = files(b), files(a)
    assert {"results.csv", "results.json", "results.md"} <= set(want)
    per_detector = [f for f in want if f.startswith("runs/") and f.endswith((".json", ".npz"))]
    assert len(per_detector) == 2 * 5, per_detector  # a JSON and an NPZ per detector
    assert sorted(got) == sorted(want)
    assert [f for f in want if got[f] != want[f]] == [], "files that differ between two runs of one spec"
    assert not any("seconds" in r for r in rows(a).values()), "timings never enter the result files"


# ------------------------------------------------------------------------------ item 3: verified result files
def _flip_middle(p: Path, n: int = 32) -> None:
    data = bytearray(p.read_bytes())
    mid = len(data) // 2
    for i in range(mid, mid + n):
        data[i] ^= 0x55
    p.write_bytes(bytes(data))


DAMAGE = {
    "garbage json": ("runs/*/knn-*.json", lambda p: p.write_text("{ this is not json"), "bytes instead of"),
    "truncated npz": ("runs/*/mahalanobis-*.npz", lambda p: p.write_bytes(p.read_bytes()[:100]), "bytes instead of"),
    "flipped npz": ("runs/*/msp-*.npz", _flip_middle, "does not match its sha256"),
    "json checksum garbled": ("runs/*/energy-*.json", lambda p: cache.sidecar(p).write_text("]["),
                              "unreadable checksum file"),
    # (any cached features / logits array, whatever the folder layout)
    "flipped cached features": ("cache/**/*features*/*.npy", _flip_middle, "does not match its sha256"),
    "truncated cached logits": ("cache/**/*logits*/*.npy", lambda p: p.write_bytes(p.read_bytes()[:-7]),
                                "bytes instead of"),
}


@pytest.mark.slow
@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_damaged_results_and_signals_are_named_and_recomputed_to_the_same_numbers(first_run, tmp_path, kind,
                                                                                  capsys):
    spec, a = first_run
    out = tmp_path / "out"
    shutil.copytree(a, out)
    pattern, damage, message = DAMAGE[kind]
    targets = sorted(out.glob(pattern)) or sorted(out.glob(pattern.replace("*/*.npy", "*.npy")))
    assert targets, pattern
    for t in targets:
        damage(t)
    if pattern.startswith("cache/"):
        shutil.rmtree(out / "runs")  # the detectors must run again on the damaged signals
    with pytest.warns(cache.CacheWarning) as caught:
        assert bench(spec, out) == 0
        numbers = {k: {m: r[m] for m in ("auroc", "fpr95", "aupr_in", "aupr_out")} for k, r in rows(out).items()}
        assert numbers == {k: {m: r[m] for m in ("auroc", "fpr95", "aupr_in", "aupr_out")} for k, r in rows(a).items()}
    said = " ".join(str(w.message) for w in caught)
    assert str(targets[0]) in said and message in said, said
    assert "Traceback" not in capsys.readouterr().err
    # the same numbers as before the damage, byte for byte, and the folder is whole again
    assert (out / "results.json").read_bytes() == (a / "results.json").read_bytes()
    assert files(out) == files(a)


# ------------------------------------------------------------------------------ item 2: the code in the signal key
@pytest.mark.slow
def test_edited_perturbation_code_is_recomputed_on_a_rerun_into_the_same_folder(tmp_path):
    """Issue 9 item 2 as found: with ODIN's signal code inverted, a rerun into the same folder printed the old
    AUROC. Runs the CLI in a subprocess on a copy of gradood, edits the copy, reruns into the same folder."""
    src = tmp_path / "src"
    shutil.copytree(Path(gradood.__file__).parent, src / "gradood", ignore=shutil.ignore_patterns("__pycache__"))
    spec = write_spec(tmp_path, eps=0.01)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(src)}
    cmd = [sys.executable, "-c", "import sys, gradood; from gradood.cli import main; "
           f"assert gradood.__file__.startswith({str(src)!r}), gradood.__file__; sys.exit(main(sys.argv[1:]))",
           "bench", str(spec), "--out", str(out), "--quiet", "--no-report", "--detectors", "odin"]

    def odin_auroc() -> dict[str, float]:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return {o: r["auroc"] for (d, o), r in rows(out).items() if d == "odin"}

    before = odin_auroc()
    odin = src / "gradood" / "detectors" / "odin.py"
    text = odin.read_text()
    assert text.count("        return torch.stack(cols, dim=1)\n") == 1
    odin.write_text(text.replace("        return torch.stack(cols, dim=1)\n",
                                 "        return -torch.stack(cols, dim=1)  # inverted\n"))
    after = odin_auroc()
    assert before.keys() == after.keys() == {"mnist", "uniform noise"}
    for o in before:
        assert abs(before[o] - 0.5) > 0.05, before
        assert after[o] == pytest.approx(1.0 - before[o], abs=1e-12), (o, before[o], after[o])


@pytest.mark.slow
def test_signal_folder_is_per_model_and_holds_no_unkeyed_file(first_run):
    _, a = first_run
    cached = [p for p in (a / "cache").rglob("*") if p.is_file()]
    assert cached
    for p in cached:
        assert p.name.endswith(".sha256") or cache.sidecar(p).exists(), p
        if p.suffix == ".npy" and p.parent.name != "labels":
            key = cache.read_key(p)
            assert set(key) == {"request", "code", "model", "probe", "data"}, key
            assert re.fullmatch(r"[0-9a-f]{16}-[0-9a-f]{24}\.npy", p.name)
