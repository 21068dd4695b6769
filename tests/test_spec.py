"""The benchmark spec schema: every key checked (type, range, spelling), safe unique labels, every problem
reported together before any work starts, and clear errors for results folders that cannot be written."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest

import gradood
from gradood.bench.spec import DATA_FIELDS, DETECTOR_FIELDS, RUN_FIELDS, TOP_FIELDS, parse_spec

from conftest import count_forward_passes

BASE = """
name = "t"
batch_size = 50
ood_val = 60
detectors = ["msp", "energy"]

[[run]]
model = "lenet-fmnist"
id_fit = { dataset = "fashion_mnist", split = "train", stop = 50000, n = 300 }
id_val = { dataset = "fashion_mnist", split = "train", start = 50000, n = 100 }
id_test = { dataset = "fashion_mnist", split = "test", n = 200 }
ood = [
  { dataset = "mnist", split = "test", n = 200, group = "near" },
  { dataset = "uniform_noise", name = "uniform noise", n = 200, group = "far" },
]
"""


def edited(old: str, new: str) -> str:
    assert old in BASE, old
    return BASE.replace(old, new, 1)


def problems_of(text: str) -> str:
    with pytest.raises(gradood.ConfigError) as e:
        parse_spec(text, "t.toml")
    return str(e.value)


def test_the_base_spec_is_valid():
    spec = parse_spec(BASE, "t.toml")
    assert [d.display for d in spec.runs[0].detectors] == ["msp", "energy"]
    assert spec.batch_size == 50 and spec.ood_val == 60


# ---------------------------------------------------------------------- labels become file names
@pytest.mark.parametrize("label", ["../../x", "a/b", "a\\b", "x" * 300, "..", "", "tab\tname", "new\nline"])
def test_unsafe_detector_labels_are_refused(label):
    text = edited('detectors = ["msp", "energy"]', f'detectors = ["msp", {{ name = "energy", label = {json.dumps(label)} }}]')
    msg = problems_of(text)
    assert "label" in msg and ("safe name" in msg or "non-empty" in msg), msg


def test_safe_labels_with_spaces_and_brackets_are_accepted():
    text = edited('detectors = ["msp", "energy"]', 'detectors = ["msp", { name = "energy", label = "Energy (T=1) v1.0+" }]'
                  .replace("=1", " 1"))
    spec = parse_spec(text, "t.toml")
    assert spec.runs[0].detectors[1].display == "Energy (T 1) v1.0+"


def test_dataset_display_names_are_labels_too():
    msg = problems_of(edited('name = "uniform noise"', 'name = "../noise"'))
    assert "ood[1] name" in msg and "safe name" in msg


def test_duplicate_detector_labels_are_refused_not_dropped():
    msg = problems_of(edited('detectors = ["msp", "energy"]', 'detectors = ["msp", { name = "knn", k = 3, label = "msp" }]'))
    assert "'msp' is listed twice" in msg and 'label = "msp-2"' in msg
    msg = problems_of(edited('detectors = ["msp", "energy"]', 'detectors = ["msp", "energy", "msp"]'))
    assert "listed twice (drop the repeat)" in msg


def test_duplicate_ood_names_are_refused():
    msg = problems_of(edited('name = "uniform noise"', 'name = "mnist"'))
    assert "two OOD sets are called 'mnist'" in msg


# ---------------------------------------------------------------------- unknown keys at every level
@pytest.mark.parametrize("old,new,where,typo,meant", [
    ("ood_val = 60", "ood_vall = 60", "top level", "ood_vall", "ood_val"),
    ("id_val = {", "id_vall = {", "run 1", "id_vall", "id_val"),
    ('split = "test", n = 200 }', 'splt = "test", n = 200 }', "run 1 id_test", "splt", "split"),
    ('detectors = ["msp", "energy"]', 'detectors = ["msp", { name = "knn", lable = "k" }]', "unknown hyperparameter", "lable", ""),
])
def test_unknown_keys_are_refused_with_a_suggestion(old, new, where, typo, meant):
    msg = problems_of(edited(old, new))
    assert where in msg and typo in msg, msg
    if meant:
        assert f"Did you mean {meant!r}" in msg


def test_unknown_detector_gets_a_suggestion():
    msg = problems_of(edited('detectors = ["msp", "energy"]', 'detectors = ["msp", "enrgy"]'))
    assert "unknown detector 'enrgy'. Did you mean 'energy'?" in msg


# ---------------------------------------------------------------------- types and ranges
@pytest.mark.parametrize("old,new,expect", [
    ("batch_size = 50", 'batch_size = "big"', "batch_size: must be an integer, got 'big'"),
    ("batch_size = 50", "batch_size = 0", "batch_size: must be >= 1"),
    ("batch_size = 50", "batch_size = true", "batch_size: must be an integer, got True"),
    ("ood_val = 60", 'seed = "abc"\nood_val = 60', "seed: must be an integer, got 'abc'"),
    ("ood_val = 60", "ood_val = -100", "ood_val: must be >= 1, got -100"),
    ("ood_val = 60", "ood_val = 1.5", "ood_val: must be an integer"),
    ("start = 50000", 'start = "a"', "id_val start: must be an integer, got 'a'"),
    ("start = 50000", "start = -5", "id_val start: must be >= 0"),
    ('split = "test", n = 200 }', 'split = "test", n = 200, resize = 0 }', "id_test resize: must be >= 1, got 0"),
    ('split = "test", n = 200 }', 'split = "test", n = 2.5 }', "id_test n: must be an integer"),
    ('split = "test", n = 200 }', 'split = "test", n = 200, channels = 2 }', "channels: must be one of 1, 3"),
    ('group = "near"', 'group = "close"', "group: must be one of 'near', 'far'"),
    ('stop = 50000, n = 300', 'start = 10, stop = 5, n = 300', "stop (5) must be greater than start (10)"),
    ('model = "lenet-fmnist"', "model = 3", "model: must be a non-empty string"),
    ('detectors = ["msp", "energy"]', 'detectors = []', "detectors must be a non-empty list"),
    ('detectors = ["msp", "energy"]', 'detectors = [{ name = "knn", k = "5" }]', "k must be"),
])
def test_bad_types_and_ranges_are_config_errors(old, new, expect):
    msg = problems_of(edited(old, new))
    assert expect in msg, msg


def test_every_problem_is_reported_together():
    text = edited("batch_size = 50", 'batch_size = "big"')
    text = text.replace("ood_val = 60", "ood_val = -1").replace("id_val = {", "id_vall = {")
    text = text.replace('detectors = ["msp", "energy"]', 'detectors = ["msp", "nope", { name = "energy", label = "a/b" }]')
    msg = problems_of(text)
    assert "has 5 problems" in msg, msg
    for part in ("batch_size", "ood_val", "id_vall", "'nope'", "'a/b'"):
        assert part in msg, part


def test_every_schema_field_is_documented():
    for table in (TOP_FIELDS, RUN_FIELDS, DATA_FIELDS, DETECTOR_FIELDS):
        for key, f in table.items():
            assert f.doc, key


def test_example_spec_documents_every_key_and_parses():
    from gradood.bench.spec import example_spec

    text = example_spec()
    for table in (TOP_FIELDS, RUN_FIELDS, DATA_FIELDS, DETECTOR_FIELDS):
        for key in table:
            assert key in text, key
    spec = parse_spec(text, "example.toml")
    assert len(spec.runs) == 2
    from gradood.bench.runner import validate_data, validate_names

    validate_names(spec)  # its models, datasets and splits exist
    validate_data(spec)  # and its sizes fit the data


def test_docs_spec_md_is_the_generated_reference():
    from gradood.bench.spec import spec_reference_markdown

    doc = Path(__file__).resolve().parent.parent / "docs" / "spec.md"
    assert doc.read_text() == spec_reference_markdown(), "regenerate: gradood bench --spec-reference > docs/spec.md"


# ---------------------------------------------------------------------- data-dependent checks, before any work
@pytest.mark.parametrize("old,new,expect", [
    ('split = "test", n = 200 }', 'split = "test", n = 999999 }', "n = 999999 samples but has only 10000"),
    ("ood_val = 60", "ood_val = 150", "ood_val = 150 but the OOD set mnist has 200 samples: hold out at most half (100)"),
    ("start = 50000, n = 100", "start = 59990, n = 100", "n = 100 samples but has only 10 in start/stop"),
])
def test_sizes_are_checked_against_the_data_before_any_work(tmp_path, monkeypatch, old, new, expect):
    from gradood.bench.runner import run_benchmark

    p = tmp_path / "s.toml"
    p.write_text(edited(old, new))
    calls = count_forward_passes(monkeypatch)
    with pytest.raises(gradood.ConfigError, match=expect.replace("(", r"\(").replace(")", r"\)")):
        run_benchmark(gradood.bench.spec.load_spec(p), tmp_path / "out", progress=False, log=lambda m: None)
    assert calls["n"] == 0
    assert not (tmp_path / "out").exists()


def test_split_holdout_refuses_to_shrink_silently():
    from gradood.bench.runner import split_holdout

    v, t = split_holdout(10, 5, 0)
    assert len(v) == 5 and len(t) == 5 and not set(v) & set(t)
    for bad in (-100, 0, 6):
        with pytest.raises(gradood.ConfigError, match="ood_val must be between 1 and half"):
            split_holdout(10, bad, 0)


# ---------------------------------------------------------------------- results folders that cannot be written
def run_cli(*args: str) -> int:
    from gradood.cli import main

    return main(list(args))


@pytest.fixture
def spec_file(tmp_path):
    p = tmp_path / "s.toml"
    p.write_text(BASE)
    return p


def test_out_that_is_a_file_is_a_clear_error(tmp_path, spec_file, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    assert run_cli("bench", str(spec_file), "--out", str(f), "--quiet", "--no-report") == 2
    err = capsys.readouterr().err
    assert "is a file, not a folder" in err and "Traceback" not in err


def test_out_that_cannot_be_created_is_a_clear_error(spec_file, capsys):
    # /proc refuses new folders even to root, so this holds however the tests run
    assert run_cli("bench", str(spec_file), "--out", "/proc/gradood-results", "--quiet", "--no-report") == 2
    err = capsys.readouterr().err
    assert "cannot be written" in err and "choose a writable folder" in err and "Traceback" not in err


def test_full_disk_mid_run_is_a_clear_error(tmp_path, spec_file, capsys, monkeypatch):
    from gradood.bench import runner

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "out" / "runs" / "x.npz"))

    monkeypatch.setattr(runner.ResultStore, "save", full)
    assert run_cli("bench", str(spec_file), "--out", str(tmp_path / "out"), "--quiet", "--no-report",
                   "--detectors", "msp") == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and "free disk space" in err and "x.npz" in err


def test_when_every_detector_fails_the_errors_are_shown(tmp_path, spec_file, capsys, monkeypatch):
    from gradood.bench import runner

    def broken(ref, *a, **k):
        raise RuntimeError(f"boom in {ref.name}")

    monkeypatch.setattr(runner, "_fit_and_score", broken)
    assert run_cli("bench", str(spec_file), "--out", str(tmp_path / "out"), "--quiet", "--no-report") == 2
    err = capsys.readouterr().err
    assert "boom in msp" in err and "boom in energy" in err
    assert "every detector failed" in err and "results is empty" not in err
