"""`gradood fit` / `gradood score`, and the README's Deploy section, executed."""

from __future__ import annotations

import contextlib
import csv
import io
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SmallCNN, seeded

import gradood
from gradood.cli import main

README = Path(__file__).resolve().parents[1] / "README.md"


def tiny_model() -> torch.nn.Module:
    """The `package.module:callable` the CLI tests load (this module is importable: tests/ is on sys.path)."""
    return seeded(SmallCNN, 3, in_ch=1, logit_scale=2.0)


def other_model() -> torch.nn.Module:
    return seeded(SmallCNN, 3, in_ch=1, n_classes=7)


def _pixels(n: int, seed: int, shape=(1, 8, 8)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 120, size=(n, *shape))
    return (base + rng.integers(0, 60, size=(1, *shape))).astype(np.uint8)  # one shared pattern + noise


@pytest.fixture
def files(tmp_path):
    torch.save(tiny_model().state_dict(), tmp_path / "w.pt")
    np.savez(tmp_path / "train.npz", x=_pixels(300, 0), y=np.arange(300) % 4)
    np.save(tmp_path / "test.npy", _pixels(100, 1))
    return tmp_path


def _run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(list(argv))
    return rc, out.getvalue(), err.getvalue()


def _fit(files, *extra: str) -> Path:
    rc, out, err = _run("fit", "test_deploy_cli:tiny_model", "--weights", str(files / "w.pt"), "--id",
                        str(files / "train.npz"), "--val-split", "100", "--detector", "knn", "--set", "k=5",
                        "--tpr", "0.9", "--out", str(files / "det"), "--no-progress", *extra)
    assert rc == 0, err
    assert "calibrated on 100 held-out ID samples" in out and "10-th lowest" in out and "exactly 10/101" in out
    return files / "det"


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_fit_then_score_equals_the_python_api(files):
    det_dir = _fit(files)
    rec = gradood.deploy.read_record(det_dir)
    assert rec["metadata"]["cli"]["model"]["kind"] == "callable" and rec["calibration"]["n"] == 100
    assert rec["metadata"]["cli"]["id"]["n_fit"] == 200
    rc, out, err = _run("score", str(det_dir), "--data", str(files / "test.npy"), "--out", str(files / "s.csv"),
                        "--model", "test_deploy_cli:tiny_model", "--weights", str(files / "w.pt"), "--batch-size", "32")
    assert rc == 0, err
    rows = _read_csv(files / "s.csv")
    assert list(rows[0]) == ["index", "score", "p_value", "accepted", "predicted_class"]  # no labels in a .npy
    assert [int(r["index"]) for r in rows] == list(range(100))
    det = gradood.load_detector(det_dir)
    model = tiny_model()
    model.load_state_dict(torch.load(files / "w.pt", weights_only=True))
    x = torch.from_numpy(np.load(files / "test.npy")).float() / 255.0
    sig = gradood.Probe(model).signals(x, progress=False)
    np.testing.assert_array_equal([float(r["score"]) for r in rows], det.score(sig))
    np.testing.assert_array_equal([float(r["p_value"]) for r in rows], det.p_values(sig))
    np.testing.assert_array_equal([r["accepted"] == "1" for r in rows], det.predict(sig))
    np.testing.assert_array_equal([int(r["predicted_class"]) for r in rows], sig.logits.argmax(1).numpy())
    share = np.mean([r["accepted"] == "1" for r in rows])
    assert f"accepted as in-distribution: {int(round(share * 100))} ({100 * share:.2f} %)" in out
    assert "score quantiles" in out


def test_score_never_runs_code_named_in_the_folder(files):
    det_dir = _fit(files)
    rc, _, err = _run("score", str(det_dir), "--data", str(files / "test.npy"), "--out", str(files / "s.csv"))
    assert rc == 2 and "pass --model" in err and "test_deploy_cli:tiny_model" in err
    assert not (files / "s.csv").exists()


def test_cli_mismatches_are_clear_errors_with_nothing_written(files, tmp_path):
    det_dir = _fit(files)
    score = ["score", str(det_dir), "--out", str(files / "s.csv"), "--model", "test_deploy_cli:tiny_model",
             "--weights", str(files / "w.pt")]
    np.save(files / "big.npy", _pixels(10, 2, shape=(1, 9, 9)))
    cases = [
        (score + ["--data", str(files / "big.npy")], r"shape \(1, 9, 9\).*\(1, 8, 8\).*resize"),
        (score[:4] + ["--model", "test_deploy_cli:other_model", "--data", str(files / "test.npy")],
         "4 classes, but these signals have 7"),
        (["score", str(files), "--data", str(files / "test.npy"), "--out", str(files / "s.csv")],
         "not a gradood detector folder"),
        (score + ["--data", str(files / "missing.npy")], "no such file"),
        (score + ["--data", str(files / "test.npy"), "--weights", str(files / "train.npz")], "state dict"),
        (["fit", "test_deploy_cli:other_model", "--weights", str(files / "w.pt"), "--id", str(files / "train.npz"),
          "--detector", "knn", "--out", str(tmp_path / "x")], "do not fit"),
        (["fit", "test_deploy_cli:tiny_model", "--id", str(files / "train.npz"), "--detector", "knn",
          "--out", str(det_dir)], "--overwrite"),
        (["fit", "test_deploy_cli:tiny_model", "--id", str(files / "train.npz"), "--detector", "knn",
          "--out", str(files)], "never writes into other folders"),
        (["fit", "test_deploy_cli:tiny_model", "--id", str(files / "train.npz"), "--detector", "odin-tuned",
          "--out", str(tmp_path / "x")], "tunes on OOD"),
        (["fit", "test_deploy_cli:tiny_model", "--id", str(files / "train.npz"), "--detector", "knn", "--set", "k",
          "--out", str(tmp_path / "x")], "use key=value"),
        (["fit", "test_deploy_cli:tiny_model", "--id", str(files / "train.npz"), "--detector", "msp",
          "--val-split", "10", "--out", str(tmp_path / "x")], "needs at least 19"),
        (["fit", "no_such_module_xyz:f", "--id", str(files / "train.npz"), "--detector", "msp",
          "--out", str(tmp_path / "x")], "cannot import 'no_such_module_xyz'"),
    ]
    for argv, pattern in cases:
        rc, out, err = _run(*argv, "--no-progress")
        assert rc == 2 and re.search(pattern, err), (argv, err)
        assert not (files / "s.csv").exists() and not (tmp_path / "x").exists()
    assert sorted(p.name for p in files.iterdir() if p.name.startswith(".")) == []  # no temporaries left


def test_score_interrupted_leaves_no_csv(files, monkeypatch):
    det_dir = _fit(files)
    from gradood.deploy.guard import Guard

    calls = {"n": 0}
    real = Guard.forward

    def failing(self, x):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(self, x)

    monkeypatch.setattr(Guard, "forward", failing)
    rc, _, _ = _run("score", str(det_dir), "--data", str(files / "test.npy"), "--out", str(files / "s.csv"),
                    "--model", "test_deploy_cli:tiny_model", "--weights", str(files / "w.pt"), "--batch-size", "32")
    assert rc == 130 and not (files / "s.csv").exists()
    assert [p.name for p in files.iterdir() if p.name.startswith(".")] == []


def test_score_an_image_folder(files):
    from PIL import Image

    det_dir = _fit(files)
    for c in ("a", "b"):
        (files / "imgs" / c).mkdir(parents=True)
        for i, px in enumerate(_pixels(3, 5 + len(c) + ord(c), shape=(1, 16, 16))):  # resized to the model's 8x8
            Image.fromarray(px[0]).save(files / "imgs" / c / f"{i}.png")
    rc, out, err = _run("score", str(det_dir), "--data", str(files / "imgs"), "--out", str(files / "s.csv"),
                        "--model", "test_deploy_cli:tiny_model", "--weights", str(files / "w.pt"))
    assert rc == 0, err
    rows = _read_csv(files / "s.csv")
    assert len(rows) == 6 and [r["label"] for r in rows] == ["0"] * 3 + ["1"] * 3


# ---------------------------------------------------------------------- README "Deploy"
def _deploy_section() -> str:
    text = README.read_text()
    assert "\n## Deploy\n" in text, "the README must have a Deploy section"
    return text.split("\n## Deploy\n", 1)[1].split("\n## ", 1)[0]


def test_readme_deploy_python_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = re.findall(r"```python\n(.*?)```", _deploy_section(), flags=re.S)
    assert len(code) == 1
    out, ns = io.StringIO(), {}
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        exec(compile(code[0], "README.md#deploy", "exec"), ns)
    id_share = float(re.search(r"ID test accepted: (\d+)%", out.getvalue()).group(1))
    ood_share = float(re.search(r"digits 5-9 accepted: (\d+)%", out.getvalue()).group(1))
    assert 85 <= id_share <= 100 and ood_share < id_share
    assert (tmp_path / "knn-digits" / "detector.json").is_file()
    assert isinstance(ns["guard"], torch.nn.Module) and ns["out"].p_values is not None


@pytest.mark.slow
def test_readme_deploy_commands_run(tmp_path, monkeypatch):
    """The CLI pair as written, on fewer samples (the full fit takes minutes): --n-fit and --limit added."""
    monkeypatch.chdir(tmp_path)
    block = re.findall(r"```sh\n(.*?)```", _deploy_section(), flags=re.S)[0]
    commands = [shlex.split(line.split("#")[0]) for line in block.splitlines() if line.strip()]
    assert [c[:2] for c in commands] == [["gradood", "fit"], ["gradood", "score"], ["gradood", "score"]]
    claimed = [float(m) for m in re.findall(r"accepts ([\d.]+) %", block)]
    assert len(claimed) == 2 and 93 <= claimed[0] <= 97 and claimed[1] < 20  # the figures measured in full
    shares = []
    for argv in commands:
        extra = ["--n-fit", "3000", "--val-split", "1000"] if argv[1] == "fit" else ["--limit", "1000"]
        rc, out, err = _run(*argv[1:], *extra, "--no-progress")
        assert rc == 0, err
        if argv[1] == "score":
            shares.append(float(re.search(r"\(([\d.]+) %\)", out).group(1)))
            assert len(_read_csv(tmp_path / argv[argv.index("--out") + 1])) == 1000
    assert 90 <= shares[0] <= 99 and shares[1] < 25
