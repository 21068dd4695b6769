"""Benchmark report: tables (CSV/JSON/Markdown), the HTML page's structure, and the page in headless Chromium."""

from __future__ import annotations

import csv
import html
import http.server
import io
import json
import os
import re
import shutil
import threading
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gradood import metrics
from gradood.bench import report as R
from gradood.bench.plots import detector_figure
from gradood.errors import InputError

OODS = [("cifar100", "near"), ("tin <near>", "near"), ("svhn", "far")]
EVIL = 'evil <script>alert("x")</script> & $a$'


def synthetic(n_models=2, detectors=("msp", "energy", "odin", EVIL), n=400, seed=0, boot=0):
    """Random scores per (model, detector, OOD set) and their result rows; ``odin`` tunes on OOD."""
    rng = np.random.default_rng(seed)
    results, scores = [], {}
    for mi in range(n_models):
        model, idd = f"resnet18-{mi}", "cifar10"
        for di, det in enumerate(detectors):
            s_id = rng.normal(1.0 + 0.3 * di, 1.0, n)
            entry = {"id": s_id}
            for j, (o, grp) in enumerate(OODS):
                s_ood = rng.normal(0.4 * j, 1.0, n // 2)
                entry[o] = s_ood
                results.append(dict(model=model, id_dataset=idd, ood_set=o, ood_group=grp, detector=det,
                                    tunes_on_ood=det == "odin", **metrics.evaluate(s_id, s_ood, bootstrap=boot)))
            scores[(model, idd, det)] = entry
    return results, scores


def row(det, ood="svhn", group="far", tuned=False, auroc=0.9, fpr95=0.3, **kw):
    base = dict(model="m", id_dataset="d", ood_set=ood, ood_group=group, detector=det, tunes_on_ood=tuned,
                auroc=auroc, fpr95=fpr95, aupr_in=0.9, aupr_out=0.8, fpr80=0.2, detection_error=0.1)
    base.update(kw)
    return base


class _Page(HTMLParser):
    """Collects ids, local links, image sources and table-cell classes of a page."""

    def __init__(self):
        super().__init__()
        self.ids, self.hrefs, self.srcs, self.cells, self.text = set(), [], [], [], []
        self._cell = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "id" in a:
            self.ids.add(a["id"])
        if "href" in a:
            self.hrefs.append(a["href"])
        if tag in ("img", "script", "link") and "src" in a:
            self.srcs.append(a["src"])
        if tag == "td":
            self._cell = [a.get("class", ""), ""]
            self.cells.append(self._cell)

    def handle_endtag(self, tag):
        if tag == "td":
            self._cell = None

    def handle_data(self, data):
        self.text.append(data)
        if self._cell is not None:
            self._cell[1] += data


def _parse(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text(encoding="utf-8"))
    return page


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    results, scores = synthetic(boot=50)
    index = R.write_report(out, results, scores)
    return out, index, results, scores


# ------------------------------------------------------------------------------------ tables
def test_write_tables_csv_json_md(tmp_path):
    results, _ = synthetic(n_models=1, boot=20)
    results[0]["seconds"] = np.float32(1.5)  # extra keys survive, numpy scalars become plain numbers
    paths = R.write_tables(tmp_path, results)
    assert set(paths) == {"csv", "json", "md"} and all(p.exists() for p in paths.values())

    lines = list(csv.DictReader(io.StringIO(paths["csv"].read_text())))
    assert len(lines) == len(results)
    assert list(lines[0])[:12] == [*R.REQUIRED_KEYS, *R.METRIC_KEYS]
    assert "auroc_ci_low" in lines[0] and lines[0]["seconds"] == "1.5" and lines[1]["seconds"] == ""
    assert float(lines[0]["auroc"]) == pytest.approx(results[0]["auroc"])
    assert lines[0]["detector"] == "msp" and lines[-1]["detector"] == EVIL

    back = R.read_results(paths["json"])
    assert len(back) == len(results)
    assert back[0]["auroc_ci"] == pytest.approx(results[0]["auroc_ci"]) and isinstance(back[0]["auroc_ci"], tuple)
    assert json.loads(paths["json"].read_text())["schema"] == R.JSON_SCHEMA

    md = paths["md"].read_text()
    assert "## resnet18-0 / cifar10" in md and "odin †" in md
    assert "<script>" not in md and r"\<script\>" in md
    table = [ln for ln in md.splitlines() if ln.startswith("| ")]
    assert len(table) == 1 + 4  # header + one line per detector
    assert md.count("**") >= 2 + 2 * 2 * 5  # legend + a bold best per column (5) and metric (2)


def test_tables_round_trip_through_write_report(tmp_path):
    results, scores = synthetic(n_models=1, detectors=("msp",))
    R.write_report(tmp_path, results, scores)
    assert R.read_results(tmp_path / "results.json")[0]["auroc"] == pytest.approx(results[0]["auroc"])


def test_nan_and_none_metrics_are_na(tmp_path):
    rows = [row("a", auroc=float("nan")), row("b", fpr95=None), row("a", ood="x", group="near"),
            row("b", ood="x", group="near")]
    R.write_report(tmp_path, rows)
    page = _parse(tmp_path / "index.html")
    na = [c for c in page.cells if "na" in c[0].split()]
    assert na and all(c[1] == "n/a" for c in na)
    data = json.loads((tmp_path / "results.json").read_text())["results"]
    assert data[0]["auroc"] is None and data[1]["fpr95"] is None


# ------------------------------------------------------------------------------------ HTML structure
def test_report_folder_is_self_contained(built):
    out, index, results, scores = built
    assert index == out / "index.html"
    page = _parse(index)
    assert len(page.srcs) == len(scores)  # one figure per (model, id_dataset, detector)
    for src in page.srcs:
        assert not re.match(r"^[a-z]+:", src) and not src.startswith("/"), src  # relative, local
        assert (out / src).is_file()
    for href in page.hrefs:
        if href.startswith("#"):
            assert href[1:] in page.ids, f"dangling anchor {href}"
        else:
            assert not re.match(r"^(https?:)?//", href), href
            assert href.startswith("data:") or (out / href).is_file(), href
    html_text = index.read_text()
    assert "http://" not in html_text.replace("http-equiv", "") and "https://" not in html_text
    assert "<script" not in html_text and "@import" not in html_text and "url(" not in html_text


def test_text_is_escaped(built):
    out, index, *_ = built
    html_text = index.read_text()
    assert "<script>" not in html_text
    assert html.escape(EVIL, quote=True) in html_text


def test_tables_mark_tuned_and_best(built):
    out, index, results, _ = built
    page = _parse(index)
    text = "".join(page.text)
    assert "\u2020" in text and "tunes on OOD validation data" in text
    # the synthetic data makes the last detector the best everywhere
    best = [c for c in page.cells if "best" in c[0].split()]
    n_cols = 3 + 1 + 1  # 3 OOD sets, near avg (2 near sets), avg; no far avg (a single far set)
    assert len(best) == 2 * 2 * n_cols  # 2 models x (AUROC, FPR95) tables
    evil_auroc = [r["auroc"] for r in results if r["detector"] == EVIL and r["model"] == "resnet18-0"]
    assert f"{100 * evil_auroc[0]:.2f}" in [c[1] for c in best]


def test_best_agnostic_when_tuned_detector_wins(tmp_path):
    rows = [row("odin", tuned=True, auroc=0.99, fpr95=0.01), row("msp", auroc=0.90, fpr95=0.40),
            row("energy", auroc=0.95, fpr95=0.20), row("tie", auroc=0.95, fpr95=0.2)]
    R.write_report(tmp_path, rows)
    page = _parse(tmp_path / "index.html")
    best = [c[1] for c in page.cells if "best" in c[0].split()]
    agn = [c[1] for c in page.cells if "best-agnostic" in c[0].split()]
    assert best == ["99.00", "1.00"]
    assert agn == ["95.00", "95.00", "20.00", "20.00"]  # ties at the shown precision are all marked


def test_missing_scores_and_extra_ood_sets(tmp_path):
    results, scores = synthetic(n_models=1, detectors=("msp", "energy"))
    del scores[("resnet18-0", "cifar10", "energy")]
    scores[("resnet18-0", "cifar10", "msp")]["extra-noise"] = np.random.default_rng(1).normal(size=50)
    R.write_report(tmp_path, results, scores)
    page = _parse(tmp_path / "index.html")
    assert len(page.srcs) == 1
    assert "No scores were passed" in "".join(page.text)
    with Image.open(tmp_path / page.srcs[0]) as im:
        assert im.size[0] > 4 * im.size[1]  # 1 ROC + 4 histogram panels side by side


def test_plots_false_and_no_scores(tmp_path):
    results, scores = synthetic(n_models=1, detectors=("msp",))
    R.write_report(tmp_path, results, scores, plots=False)
    assert _parse(tmp_path / "index.html").srcs == []
    assert not any((tmp_path / "plots").iterdir())


def test_detector_figure_layouts():
    rng = np.random.default_rng(0)
    s_id = rng.normal(size=300)
    sizes = []
    for k in (1, 4, 6, 1):  # reuses cached layouts; 6 OOD sets wrap to two rows
        png = detector_figure(s_id, {f"o{i}": rng.normal(size=100) for i in range(k)}, title="a $ b")
        with Image.open(io.BytesIO(png)) as im:
            sizes.append(im.size)
    assert sizes[0] == sizes[3] and sizes[1][0] > sizes[0][0] and sizes[2][1] > sizes[1][1]


def test_constant_scores_plot():
    png = detector_figure(np.zeros(10), {"same": np.zeros(5)})
    assert png.startswith(b"\x89PNG")


# ------------------------------------------------------------------------------------ atomic writes
def test_no_temp_files_left(built):
    out, *_ = built
    assert not [p for p in out.rglob(".*.tmp")]


def test_failed_write_keeps_old_file(tmp_path, monkeypatch):
    target = tmp_path / "x.txt"
    target.write_text("old")

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(R.os, "replace", boom)
    with pytest.raises(OSError):
        R._atomic_write(target, "new")
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["x.txt"]


# ------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("rows,needle", [
    ([], "results is empty"),
    ([{"model": "m"}], "lacks the keys"),
    ([row("a", group="middle")], "ood_group"),
    ([row("a"), row("a")], "appears twice"),
    ([row("a", auroc=95.0)], "outside [0, 1]"),
    ([row("a", auroc="high")], "not a number"),
    ([row("a", auroc_ci=(0.1, 0.2, 0.3))], "(low, high)"),
    ([row("a", ood="x", group="near"), row("b", ood="x", group="far")], "both"),
    (["not a dict"], "must be a dict"),
])
def test_bad_results(tmp_path, rows, needle):
    with pytest.raises(InputError) as err:
        R.write_report(tmp_path, rows)
    assert needle in str(err.value)


def test_bad_scores(tmp_path):
    results, scores = synthetic(n_models=1, detectors=("msp",))
    scores[("resnet18-0", "cifar10", "msp")]["svhn"][3] = np.nan
    with pytest.raises(InputError, match=r"svhn.*NaN"):
        R.write_report(tmp_path, results, scores)
    del scores[("resnet18-0", "cifar10", "msp")]["id"]
    with pytest.raises(InputError, match="no 'id' array"):
        R.write_report(tmp_path, results, scores)


def test_read_results_rejects_other_json(tmp_path):
    p = tmp_path / "r.json"
    p.write_text("[1, 2]")
    with pytest.raises(InputError, match="not a gradood results file"):
        R.read_results(p)


# ------------------------------------------------------------------------------------ browser
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
CHROME_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
               "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run",
               "--window-size=1300,1600"]


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not shutil.which(p)]
    if missing:
        pytest.fail(f"{', '.join(missing)} not found: the report tests need headless Chromium; run `./dev test` "
                    f"(it installs the Debian packages chromium and chromium-driver) or "
                    f"`apt-get install -y chromium chromium-driver`", pytrace=False)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in CHROME_ARGS:
        opts.add_argument(arg)
    opts.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")  # fresh profile
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


@pytest.fixture()
def http_root():
    """A local static server on 127.0.0.1 (ephemeral port) serving a folder set per test."""
    state = {"dir": "."}

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **kw):
            super().__init__(*a, directory=state["dir"], **kw)

        def log_message(self, *args):  # keep pytest output clean
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield state, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _check_page(driver, url, n_images, n_groups):
    driver.get_log("browser")  # drop entries of earlier pages
    driver.get(url)
    assert driver.title == "gradood benchmark report"
    assert driver.find_element("tag name", "h1").text == "gradood benchmark report"
    tables = driver.find_elements("css selector", "table.summary")
    assert len(tables) == 2 * n_groups and all(t.is_displayed() for t in tables)
    assert tables[0].find_elements("css selector", "tbody tr")[0].text.startswith("msp")
    assert driver.find_elements("css selector", "td.best")
    images = driver.execute_script(
        "return Array.from(document.images, i => [i.getAttribute('src'), i.complete, i.naturalWidth]);")
    assert len(images) == n_images
    broken = [src for src, complete, width in images if not (complete and width > 0)]
    assert not broken, f"images not rendered: {broken}"
    dangling = driver.execute_script(
        "return Array.from(document.querySelectorAll('a[href^=\"#\"]'), a => a.getAttribute('href'))"
        ".filter(h => !document.getElementById(h.slice(1)));")
    assert not dangling
    severe = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    assert not severe, f"browser console errors: {severe}"


@pytest.mark.browser
def test_report_renders_in_chromium_from_file(built, browser, tmp_path):
    out, index, _, scores = built
    _check_page(browser, index.resolve().as_uri(), len(scores), n_groups=2)
    browser.save_screenshot(str(tmp_path / "report.png"))  # kept in pytest's tmp dir for a look
    assert (tmp_path / "report.png").stat().st_size > 10_000


@pytest.mark.browser
def test_report_renders_in_chromium_over_http(built, browser, http_root):
    out, index, _, scores = built
    state, base = http_root
    state["dir"] = str(out)
    _check_page(browser, f"{base}/index.html", len(scores), n_groups=2)
    # anchors navigate: the detector link of the first table row scrolls to its section
    link = browser.find_element("css selector", "table.summary tbody th a")
    target = link.get_attribute("href").split("#", 1)[1]
    link.click()
    assert browser.execute_script(f"return document.getElementById({json.dumps(target)}).getBoundingClientRect().top") < 50
