"""The benchmark runner: spec validation, an end-to-end run on real data, resume after a hard kill."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import gradood
from gradood.bench.spec import load_spec, parse_spec

from conftest import count_forward_passes

TINY = """
name = "tiny"
batch_size = 50
ood_val = 60
checkpoint_every = 1
detectors = ["msp", "energy", {{ name = "knn", k = 5 }}, "rg", "fssd", "odin-tuned"]

[overrides.odin-tuned]
temperatures = [1.0, 1000.0]
epsilons = [0.0, 0.002]

[[run]]
model = "lenet-fmnist"
id_fit = {{ dataset = "fashion_mnist", split = "train", stop = 50000, n = 300 }}
id_val = {{ dataset = "fashion_mnist", split = "train", start = 50000, n = 100 }}
id_test = {{ dataset = "fashion_mnist", split = "test", n = {n_test} }}
ood = [
  {{ dataset = "mnist", split = "test", n = 200, group = "near" }},
  {{ dataset = "uniform_noise", name = "uniform noise", n = 200, group = "far" }},
]
"""


def tiny_spec(tmp_path: Path, n_test: int = 200) -> Path:
    p = tmp_path / "tiny.toml"
    p.write_text(TINY.format(n_test=n_test))
    return p


def run_cli(*args: str) -> int:
    from gradood.cli import main

    return main(list(args))


# ---------------------------------------------------------------------- validation before running
def test_default_spec_is_valid_and_covers_every_detector():
    spec = load_spec()
    names = {d.name for d in spec.runs[0].detectors}
    for name in gradood.available():
        d = gradood.create(name)
        if not getattr(type(d), "in_all", True):  # mc-dropout: only for models with dropout, named explicitly
            assert name not in names
            continue
        # output-feature's default duplicates energy-x-l1 and is deduplicated on purpose
        assert name in names or name == "output-feature", name
    models = {r.model for r in spec.runs}
    assert models == {"mnist-cnn-digitrec", "mnist-cnn-ccexam", "lenet-fmnist"}
    assert d is not None


@pytest.mark.parametrize("bad,pattern", [
    ('model = "no-such-model"', "unknown model 'no-such-model'"),
    ('id_test = { dataset = "no_such_data" }', "unknown dataset 'no_such_data'"),
    ('detectors = ["msp", "no-such-detector"]', "unknown detector 'no-such-detector'"),
    ('detectors = [{ name = "knn", kk = 3 }]', r"unknown hyperparameter\(s\) \['kk'\]"),
    ('detectors = [{ name = "knn", k = -1 }]', "k must be a positive integer"),
    ('ood = [{ dataset = "foolbox_cifar10", n = 5 }]', r"shape \(3, 32, 32\).*expects \(1, 28, 28\).*resize = 28.*channels = 1"),
])
def test_bad_specs_fail_before_running_with_the_fix(tmp_path, bad, pattern):
    key = bad.split(" =")[0]
    lines = []
    for line in TINY.format(n_test=200).splitlines():
        lines.append(line)
    text = "\n".join(lines)
    if key in ("detectors",):
        text = text.replace(next(line for line in lines if line.startswith("detectors =")), bad)
    elif key == "ood":
        start = text.index("ood = [")
        text = text[:start] + bad + "\n"
    else:
        text = text.replace(next(line for line in lines if line.startswith(key + " =")), bad)
    p = tmp_path / "bad.toml"
    p.write_text(text)
    with pytest.raises(gradood.ConfigError, match=pattern):
        from gradood.bench.runner import run_benchmark

        run_benchmark(load_spec(p), tmp_path / "out", progress=False, log=lambda m: None)


@pytest.mark.parametrize("text,pattern", [
    ("name = [", "not valid TOML"),
    ('name = "x"', r"at least one \[\[run\]\]"),
    ('[[run]]\nmodel = "lenet-fmnist"', "missing 'id_fit'"),
    ('colour = 1\n[[run]]\nmodel="m"\nid_fit="mnist"\nid_test="mnist"\nood=["mnist"]', "top level: unknown key 'colour'"),
    ('[[run]]\nmodel="m"\nid_fit={ dataset="mnist", nn=3 }\nid_test="mnist"\nood=["mnist"]', "id_fit: unknown key 'nn'. Did you mean 'n'"),
    ('[overrides.nope]\nk=1\n[[run]]\nmodel="m"\nid_fit="mnist"\nid_test="mnist"\nood=["mnist"]', "unknown detector"),
])
def test_spec_syntax_errors(text, pattern):
    with pytest.raises(gradood.ConfigError, match=pattern):
        parse_spec(text, "t.toml")


def test_missing_spec_file_names_the_builtin_specs(tmp_path):
    with pytest.raises(gradood.ConfigError, match="does not exist.*default"):
        load_spec(tmp_path / "nope.toml")


# ---------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    spec = tiny_spec(tmp)
    out = tmp / "out"
    assert run_cli("bench", str(spec), "--out", str(out), "--quiet") == 0
    return spec, out


def test_end_to_end_writes_tables_and_report(finished_run):
    _, out = finished_run
    rows = json.loads((out / "results.json").read_text())
    rows = rows["results"] if isinstance(rows, dict) else rows
    dets = {r["detector"] for r in rows}
    assert dets == {"msp", "energy", "knn", "rg", "fssd", "odin-tuned"}
    assert {r["ood_set"] for r in rows} == {"mnist", "uniform noise"}
    for r in rows:
        assert 0.0 <= r["auroc"] <= 1.0 and 0.0 <= r["fpr95"] <= 1.0
        assert r["tunes_on_ood"] == (r["detector"] == "odin-tuned")
        assert r["ood_group"] == ("near" if r["ood_set"] == "mnist" else "far")
    # LeNet separates Fashion-MNIST from uniform noise almost perfectly with any logit score
    msp_noise = next(r for r in rows if r["detector"] == "msp" and r["ood_set"] == "uniform noise")
    assert msp_noise["auroc"] > 0.9
    for f in ("results.csv", "results.md", "index.html"):
        assert (out / f).stat().st_size > 0
    assert not list(out.rglob("*.tmp")), "atomic writes leave no temporary files"


def test_rerun_reuses_cached_signals_and_results(finished_run, monkeypatch):
    spec, out = finished_run
    before = (out / "results.json").read_text()
    calls = count_forward_passes(monkeypatch)
    assert run_cli("bench", str(spec), "--out", str(out), "--quiet", "--no-report") == 0
    assert calls["n"] == 0, "a finished benchmark must not run the model again"
    assert json.loads((out / "results.json").read_text()) == json.loads(before)


@pytest.mark.parametrize("changed", ["code", "weights"])
def test_changed_code_or_weights_never_reuse_cached_signals_or_results(finished_run, tmp_path, monkeypatch,
                                                                       changed):
    import shutil

    from gradood.bench import runner

    spec, out = finished_run
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    if changed == "code":
        from gradood import cache

        real_code, real_source = cache.code_fingerprint, runner.source_fingerprint
        monkeypatch.setattr(cache, "code_fingerprint", lambda cls: "edited-" + real_code(cls))
        monkeypatch.setattr(runner, "source_fingerprint", lambda *parts: "edited-" + real_source(*parts))
    else:
        real_load = runner.load_model

        def retrained(name):
            info = real_load(name)
            with torch.no_grad():
                next(info.model.parameters()).view(-1)[0] += 1e-3
            info.fingerprint = runner.model_fingerprint(info.model)
            return info

        monkeypatch.setattr(runner, "load_model", retrained)
    calls = count_forward_passes(monkeypatch)
    said = "other gradood code" if changed == "code" else "another model"
    with pytest.warns(gradood.cache.CacheWarning, match=f"'logits' of .* holds it only for {said}"):
        assert run_cli("bench", str(spec), "--out", str(copy), "--quiet", "--no-report", "--detectors", "msp") == 0
    assert calls["n"] > 0, f"changed {changed}: the cached signals of the old {changed} must not be reused"
    assert len(list((copy / "runs").iterdir())) == 2, "the old results stay, in their own folder"


def test_model_fingerprint_follows_the_weights():
    import copy

    from gradood.bench.runner import model_fingerprint

    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
    twin = copy.deepcopy(model)
    assert model_fingerprint(model) == model_fingerprint(twin)
    with torch.no_grad():
        twin[2].weight[0, 0] += 1e-6
    assert model_fingerprint(model) != model_fingerprint(twin)


def test_hard_kill_mid_extraction_then_rerun_gives_the_same_table(finished_run, tmp_path):
    spec, reference_out = finished_run
    out = tmp_path / "out"
    # A child process that dies hard (no cleanup, like SIGKILL) after 7 forward passes, i.e. mid-extraction.
    killer = textwrap.dedent(f"""
        import os, gradood
        from gradood.cli import main
        original = gradood.Probe.forward
        count = [0]
        def dying(self, *a, **k):
            count[0] += 1
            if count[0] > 7:
                os._exit(9)
            return original(self, *a, **k)
        gradood.Probe.forward = dying
        main(["bench", {str(spec)!r}, "--out", {str(out)!r}, "--quiet", "--no-report"])
    """)
    proc = subprocess.run([sys.executable, "-c", killer], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 9, proc.stderr[-2000:]
    shards = list(out.rglob("partial-*/shard-*.npz"))
    assert shards, "the killed run should have left finished shards of the interrupted extraction"
    assert not (out / "results.json").exists()
    assert run_cli("bench", str(spec), "--out", str(out), "--quiet", "--no-report") == 0
    got = json.loads((out / "results.json").read_text())
    want = json.loads((reference_out / "results.json").read_text())
    key = lambda r: (r["detector"], r["ood_set"])  # noqa: E731
    got_rows = sorted(got["results"] if isinstance(got, dict) else got, key=key)
    want_rows = sorted(want["results"] if isinstance(want, dict) else want, key=key)
    assert [key(r) for r in got_rows] == [key(r) for r in want_rows]
    for g, w in zip(got_rows, want_rows):
        for m in ("auroc", "fpr95", "aupr_in", "aupr_out"):
            assert g[m] == pytest.approx(w[m], abs=1e-12), (key(g), m)
    assert not list(out.rglob("partial-*")), "finished extractions remove their shards"


def test_detector_filter_runs_only_those(tmp_path, finished_run):
    spec, _ = finished_run
    out = tmp_path / "only"
    assert run_cli("bench", str(spec), "--out", str(out), "--quiet", "--no-report", "--detectors", "msp") == 0
    rows = json.loads((out / "results.json").read_text())
    rows = rows["results"] if isinstance(rows, dict) else rows
    assert {r["detector"] for r in rows} == {"msp"}


def test_each_spec_writes_its_own_results_folder_by_default(tmp_path, monkeypatch):
    from gradood.bench.runner import default_out

    spec = tiny_spec(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert run_cli("bench", str(spec), "--quiet", "--no-report", "--detectors", "msp") == 0
    assert (tmp_path / "gradood-results-tiny" / "results.json").exists()
    assert not (tmp_path / "gradood-results").exists(), "another spec must not overwrite the default's tables"
    assert default_out(load_spec(None)) == Path("gradood-results")
    assert default_out(parse_spec(TINY.format(n_test=10).replace('"tiny"', '"../a b"'))) == Path("gradood-results-_a_b")


def test_cli_list_shows_detectors_datasets_models(capsys):
    assert run_cli("list") == 0
    out = capsys.readouterr().out
    for word in ("grodin", "fssd", "lowdim", "mnist", "fashion_mnist", "lenet-fmnist"):
        assert word in out


def test_unknown_spec_on_the_cli_is_a_clean_error(capsys, tmp_path):
    assert run_cli("bench", str(tmp_path / "missing.toml"), "--out", str(tmp_path / "o"), "--quiet") == 2
    assert "does not exist" in capsys.readouterr().err

