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
from gradood.bench import plots as P
from gradood.bench.plots import detector_figure
from gradood.errors import InputError

OODS = [("cifar100", "near"), ("tin <near>", "near"), ("svhn", "far")]
EVIL = 'evil <script>alert("x")</script> & $a$'


def synthetic(n_models=2, detectors=("msp", "energy", "odin", EVIL), n=400, seed=0, boot=0):
    """Random scores per (model, detector, OOD set) and their result rows; ``odin`` tunes on OOD, so it has
    ID scores per OOD set (``id::<ood set>``), like the bench runner's OOD-tuned detectors."""
    rng = np.random.default_rng(seed)
    results, scores = [], {}
    for mi in range(n_models):
        model, idd = f"resnet18-{mi}", "cifar10"
        for di, det in enumerate(detectors):
            s_id = rng.normal(1.0 + 0.3 * di, 1.0, n)
            entry = {} if det == "odin" else {"id": s_id}
            for j, (o, grp) in enumerate(OODS):
                s_ood = rng.normal(0.4 * j, 1.0, n // 2)
                entry[o] = s_ood
                if det == "odin":
                    s_id = entry[f"id::{o}"] = rng.normal(1.0 + 0.3 * di + 0.1 * j, 1.0, n)
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
    """Collects ids, local links, image sources and table cells ``[class, text, attrs, row's detector link]``."""

    def __init__(self):
        super().__init__()
        self.ids, self.hrefs, self.srcs, self.cells, self.text = set(), [], [], [], []
        self._cell, self._row_det, self._in_det_link = None, "", False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "tr":
            self._row_det = ""
        self._in_det_link = tag == "a" and a.get("href", "").startswith("#det-")
        if "id" in a:
            self.ids.add(a["id"])
        if "href" in a:
            self.hrefs.append(a["href"])
        if tag in ("img", "script", "link") and "src" in a:
            self.srcs.append(a["src"])
        if tag == "td":
            self._cell = [a.get("class", ""), "", a, self._row_det]
            self.cells.append(self._cell)

    def handle_endtag(self, tag):
        if tag == "td":
            self._cell = None
        if tag == "a":
            self._in_det_link = False

    def handle_data(self, data):
        self.text.append(data)
        if self._in_det_link:
            self._row_det += data
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


def test_write_tables_lists_not_applicable_detectors(tmp_path):
    """Detectors whose method a model lacks are listed, with their reason, after the tables and in the JSON;
    a run without any writes neither the section nor the key."""
    results, _ = synthetic(n_models=1, boot=0)
    na = ["resnet18-0 / rankfeat: rankfeat found no activation layer with a\nfeature-map output (B x C x H x W)"]
    paths = R.write_tables(tmp_path / "a", results, not_applicable=na)
    md = paths["md"].read_text()
    assert md.rstrip().endswith("* resnet18-0 / rankfeat: rankfeat found no activation layer with a feature-map "
                                "output (B x C x H x W)")
    assert "## Not applicable" in md
    assert json.loads(paths["json"].read_text())["not_applicable"] == na
    assert len(R.read_results(paths["json"])) == len(results)
    # the report folder's tables (written by write_report) carry the list too
    R.write_report(tmp_path / "r", results, plots=False, not_applicable=na)
    assert "## Not applicable" in (tmp_path / "r" / "results.md").read_text()
    plain = R.write_tables(tmp_path / "b", results)
    assert "Not applicable" not in plain["md"].read_text()
    assert "not_applicable" not in json.loads(plain["json"].read_text())


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
    assert len(page.srcs) == len(scores) + 2  # one figure per (model, id_dataset, detector) + 2 overviews
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
    assert len(best) == 2 * 2 * n_cols  # 2 models x (AUROC, FPR95) blocks
    evil_auroc = [r["auroc"] for r in results if r["detector"] == EVIL and r["model"] == "resnet18-0"]
    assert f"{100 * evil_auroc[0]:.2f}" in [c[1] for c in best]


def test_heatmap_is_sorted_and_coloured_by_value(built):
    out, index, results, _ = built
    cells = [c[2] for c in _parse(index).cells if "data-value" in c[2]]
    half = len(cells) // 2  # two models' tables, in page order, no n/a cells
    for table in (cells[:half], cells[half:]):
        for metric, better in (("auroc", 1), ("fpr95", -1)):
            # the bluer a cell (blue minus red channel), the better its value: never the other way round
            pairs = sorted((better * float(c["data-value"]), int(c["style"][-2:], 16) - int(c["style"][-6:-4], 16))
                           for c in table if c["data-metric"] == metric)
            blueness = [b for _, b in pairs]
            assert blueness == sorted(blueness) and blueness[0] < 0 < blueness[-1]
        means = [float(c["data-value"]) for c in table if c.get("data-mean") == "all" and c["data-metric"] == "auroc"]
        assert len(means) == 4 and means == sorted(means, reverse=True)


def test_best_agnostic_when_tuned_detector_wins(tmp_path):
    rows = [row("odin", tuned=True, auroc=0.99, fpr95=0.01), row("msp", auroc=0.90, fpr95=0.40),
            row("energy", auroc=0.95, fpr95=0.20), row("tie", auroc=0.95, fpr95=0.2)]
    R.write_report(tmp_path, rows)
    page = _parse(tmp_path / "index.html")
    best = [c[1] for c in page.cells if "best" in c[0].split()]
    agn = [c[1] for c in page.cells if "best-agnostic" in c[0].split()]
    assert best == ["99.00", "1.00"]
    # rows sorted by AUROC (ties: FPR95, then name): odin, energy, tie, msp; ties at the shown precision all marked
    assert agn == ["95.00", "20.00", "95.00", "20.00"]
    page_text = (tmp_path / "index.html").read_text()
    verdict = re.sub(r"\s+", " ", page_text.split('<p class="verdict">')[1].split("</p>")[0])
    assert '<strong class="pick">energy</strong>' in verdict and "Next: tie (95.00 %), msp (90.00 %)" in verdict
    assert "OOD-tuned odin" in verdict


def test_no_agnostic_detector_is_named_when_all_tune_on_ood(tmp_path):
    rows = [row("odin", tuned=True, auroc=0.99), row("grodin", tuned=True, auroc=0.97)]
    text = re.sub(r"\s+", " ", "".join(_parse(R.write_report(tmp_path, rows)).text))
    assert "No OOD-agnostic detector has an AUROC on every OOD set here" in text
    assert "m / d: no OOD-agnostic detector has results on every OOD set" in text


def test_glance_names_each_models_choice(built):
    out, index, results, _ = built
    glance = index.read_text().split('<nav class="box glance">')[1].split("</nav>")[0]
    assert glance.count("<li>") == 2 and glance.count(f"<strong>{html.escape(EVIL, quote=True)}</strong>") == 2


def test_missing_scores_and_extra_ood_sets(tmp_path):
    results, scores = synthetic(n_models=1, detectors=("msp", "energy"))
    del scores[("resnet18-0", "cifar10", "energy")]
    scores[("resnet18-0", "cifar10", "msp")]["extra-noise"] = np.random.default_rng(1).normal(size=50)
    R.write_report(tmp_path, results, scores)
    page = _parse(tmp_path / "index.html")
    assert len(page.srcs) == 2 and "overview" in page.srcs[0]  # overview (msp only) + msp's figure
    assert "No scores were passed" in "".join(page.text)
    with Image.open(tmp_path / page.srcs[1]) as im:
        assert im.size[0] > 1.5 * im.size[1]  # 1 ROC + 4 histogram panels: 4 columns, 2 rows


def test_plots_false_and_no_scores(tmp_path):
    results, scores = synthetic(n_models=1, detectors=("msp",))
    R.write_report(tmp_path, results, scores, plots=False)
    assert _parse(tmp_path / "index.html").srcs == []
    assert not any((tmp_path / "plots").iterdir())


def test_detector_figure_layouts():
    rng = np.random.default_rng(0)
    s_id = rng.normal(size=300)
    sizes = []
    for k in (1, 3, 6, 1):  # 1 ROC + 6 histograms wrap to two rows of four
        png = detector_figure(s_id, {f"o{i}": rng.normal(size=100) for i in range(k)}, title="a $ b")
        with Image.open(io.BytesIO(png)) as im:
            sizes.append(im.size)
    assert sizes[0] == sizes[3] and sizes[1][0] > sizes[0][0] and sizes[2][1] > 1.6 * sizes[1][1]
    assert max(w for w, _ in sizes) <= P.MAX_WIDTH_PX  # never scaled down in the report


def test_constant_scores_plot():
    png = detector_figure(np.zeros(10), {"same": np.zeros(5)})
    assert png.startswith(b"\x89PNG")


# Detectors' scores differ by orders of magnitude (MSP in [0, 1], GradNorm ~1e3, Mahalanobis ~ -1e4): drawn one
# after another, each figure must show its own scores. (The bug: a reused figure kept the previous detector's
# data limits, and its y-range squashed the next detector's bars flat.)
SCALES = (1e-3, 1.0, 1e3, 1e-2)


def _detector_scores(rng, scale):
    return rng.normal(0, scale, 500), {"a": rng.normal(2 * scale, scale, 300), "b": rng.normal(-scale, 2 * scale, 200)}


def test_histograms_show_each_detectors_scores():
    rng = np.random.default_rng(0)
    for scale in SCALES:
        s_id, oods = _detector_scores(rng, scale)
        fig = P.draw_detector_figure(s_id, oods, title=f"scale {scale}")
        panels = [(ax, {ln.get_gid(): ln for ln in ax.lines if ln.get_gid()}) for ax in fig.axes]
        panels = [(ax, lines) for ax, lines in panels if lines]
        assert len(panels) == len(oods)
        for (ax, lines), (name, s_ood) in zip(panels, oods.items()):
            edges = lines["hist-id"].get_xdata()
            heights = []
            for gid, s in (("hist-id", s_id), ("hist-ood", s_ood)):
                assert np.mean((s >= edges[0]) & (s <= edges[-1])) >= 0.9, "x-range misses the scores"
                counts, _ = np.histogram(s, bins=edges)
                drawn = lines[gid].get_ydata()[:-1]  # steps-post: the last point repeats the last bar
                np.testing.assert_allclose(drawn, counts / (s.size * np.diff(edges)), rtol=1e-12)
                heights.append(drawn.max())
            lo, hi = ax.get_ylim()
            # the y-range covers the bars and is not much taller: the bars fill the panel
            assert lo == 0 and max(heights) <= hi <= 1.25 * max(heights), (scale, name, hi, heights)


def test_histogram_fills_are_drawn_in_the_png():
    """The rendered image itself: each OOD set's bar fill covers a sizeable part of its panel."""
    from matplotlib import colormaps

    rng = np.random.default_rng(1)
    fill = 255 - 0.35 * (255 - 255 * np.array(colormaps["tab10"](0)[:3]))  # OOD set 1's colour at alpha 0.35
    for scale in SCALES:
        s_id, oods = _detector_scores(rng, scale)
        with Image.open(io.BytesIO(detector_figure(s_id, oods))) as im:
            px = np.asarray(im.convert("RGB"), dtype=float)
            dpi = im.info["dpi"][0] if "dpi" in im.info else P.DPI
        n_fill = int((np.abs(px - fill).max(axis=2) <= 6).sum())
        # drawn: about 0.45 dpi^2 of fill; squashed flat or off-range (the old bug): a few pixels
        assert n_fill > 0.25 * dpi ** 2, (scale, n_fill)


def _visible_texts(fig):
    from matplotlib.text import Text

    fig.canvas.draw()  # tick labels exist only after a draw
    return [t for t in fig.findobj(Text) if t.get_visible() and t.get_text().strip()
            and (t.axes is None or t.axes.get_visible())]


def _overview_panels(rng, k=5, n=1000):
    return {f"ood{j} (near)": [(f"det{i}", rng.normal(3 + 0.3 * i, 1, n), rng.normal(0, 1, n // 2))
                               for i in range(k)] for j in range(3)}


def test_figures_are_legible_at_the_report_width():
    rng = np.random.default_rng(2)
    assert P.FONT_PT * P.DPI / 72 >= 12  # 9 pt = 12 CSS px when an image is shown at its natural size
    s_id, oods = _detector_scores(rng, 1.0)
    figs = [P.draw_detector_figure(s_id, {**oods, "c": oods["a"], "d": oods["b"]}, title="m / d / det"),
            P.draw_detector_figure(s_id, oods, log_fpr=True),
            P.draw_overview_roc_figure(_overview_panels(rng)),
            P.draw_overview_roc_figure(_overview_panels(rng), log_fpr=False)]
    for fig in figs:
        texts = _visible_texts(fig)
        assert len(texts) > 10
        small = [(t.get_text(), t.get_fontsize()) for t in texts if t.get_fontsize() < P.FONT_PT]
        assert not small
        assert fig.get_figwidth() * P.DPI <= P.MAX_WIDTH_PX + 0.5


def test_roc_log_fpr_axis():
    rng = np.random.default_rng(3)
    panels = _overview_panels(rng, n=1000)  # 500 OOD samples: the smallest non-zero FPR is 2e-3
    fig = P.draw_overview_roc_figure(panels, log_fpr=True, dashed=["det1"])
    for ax in fig.axes:
        assert ax.get_xscale() == "log" and ax.get_xlim() == pytest.approx((2e-3, 1.0))
        curves = [ln for ln in ax.lines if ln.get_label().startswith("det")]
        assert len(curves) == 5 and min(ln.get_xdata().min() for ln in curves) == pytest.approx(2e-3)
        assert [ln.get_linestyle() for ln in curves] == ["-", "--", "-", "-", "-"]
    lin = P.draw_overview_roc_figure(panels, log_fpr=False)
    assert all(ax.get_xscale() == "linear" and ax.get_xlim() == (0, 1) for ax in lin.axes)
    s_id, oods = _detector_scores(rng, 1.0)
    assert P.draw_detector_figure(s_id, oods).axes[0].get_xscale() == "linear"
    assert P.draw_detector_figure(s_id, oods, log_fpr=True).axes[0].get_xscale() == "log"


def test_per_ood_set_id_scores_of_tuned_detectors():
    """An OOD-tuned detector scores ID data once per OOD set: each curve uses its own ID scores."""
    rng = np.random.default_rng(4)
    ids = {"a": rng.normal(3, 1, 400), "b": rng.normal(0, 1e-3, 400)}  # e.g. ODIN at T = 1 vs T = 1000
    oods = {"a": rng.normal(0, 1, 200), "b": rng.normal(-1e-3, 1e-3, 200)}
    fig = P.draw_detector_figure(ids, oods)
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert labels == [f"{o} ({100 * metrics.auroc(ids[o], oods[o]):.1f})" for o in oods]
    for ax, o in zip(fig.axes[1:], oods):  # each panel's bins span its own scores
        edges = next(ln for ln in ax.lines if ln.get_gid() == "hist-id").get_xdata()
        for s in (ids[o], oods[o]):
            assert np.mean((s >= edges[0]) & (s <= edges[-1])) >= 0.9 and np.histogram(s, edges)[0].max() < 0.5 * s.size
    with pytest.raises(KeyError, match="no ID scores"):
        P.draw_detector_figure({"a": ids["a"]}, oods)


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


@pytest.mark.parametrize("kw,needle", [({"log_fpr": "yes"}, "log_fpr"), ({"top": 0}, "top"), ({"top": 2.5}, "top")])
def test_bad_report_options(tmp_path, kw, needle):
    with pytest.raises(InputError, match=needle):
        R.write_report(tmp_path, [row("a")], **kw)


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
               "--window-size=1400,1600"]


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


# Opens every collapsed section, then lists rendered text below 12 px (9 pt) and images shown smaller than their
# natural size (the figures' fonts are >= plots.FONT_PT at plots.DPI, i.e. >= 12.5 px at natural size).
_LEGIBILITY_JS = """
document.querySelectorAll('details').forEach(d => d.open = true);
const small = [];
for (const el of document.querySelectorAll('body *')) {
  const own = Array.from(el.childNodes).some(n => n.nodeType === 3 && n.textContent.trim());
  if (!own || el.getClientRects().length === 0) continue;
  const px = parseFloat(getComputedStyle(el).fontSize);
  if (px < 12) small.push([el.tagName, el.className, px, el.textContent.trim().slice(0, 40)]);
}
const shrunk = Array.from(document.images).filter(i => i.getBoundingClientRect().width < i.naturalWidth - 0.5)
  .map(i => [i.getAttribute('src'), i.getBoundingClientRect().width, i.naturalWidth]);
return [small, shrunk, window.innerWidth];
"""

_HEATMAP_JS = """
return Array.from(document.querySelectorAll('table.heatmap td[data-metric]'), td => {
  const t = td.closest('table'), tr = td.closest('tr');
  return [t.dataset.model, t.dataset.idDataset, tr.querySelector('th.det a').textContent, td.dataset.ood || null,
          td.dataset.mean || null, td.dataset.metric, td.dataset.value || null, td.innerText.trim()];
});
"""


def _check_heatmap_cells(cells, results_json: Path):
    """Every heatmap number equals results.json: per OOD set exactly, means as the mean of the rows."""
    rows = json.loads(results_json.read_text())["results"]
    exact = {(r["model"], r["id_dataset"], r["detector"], r["ood_set"], m): r[m]
             for r in rows for m in ("auroc", "fpr95")}
    per_ood = [c for c in cells if c[3] is not None]
    assert len(per_ood) == len(exact)  # every result shown once
    for model, idd, det, ood, _, metric, value, text in per_ood:
        v = exact[(model, idd, det, ood, metric)]
        assert text == ("n/a" if v is None else f"{100 * v:.2f}"), (det, ood, metric)
        assert value is None if v is None else float(value) == v
    groups = {(r["model"], r["id_dataset"], r["ood_set"]): r["ood_group"] for r in rows}
    for model, idd, det, _, mean, metric, value, text in (c for c in cells if c[4] is not None):
        sets = [o for (m, i, o), g in groups.items() if m == model and i == idd and mean in ("all", g)]
        v = np.mean([exact[(model, idd, det, o, metric)] for o in sets])
        assert float(value) == pytest.approx(v, abs=1e-15) and text == f"{100 * v:.2f}"
    # rows sorted by mean AUROC, best first
    for key in {(c[0], c[1]) for c in cells}:
        means = [float(c[6]) for c in cells if (c[0], c[1]) == key and c[4] == "all" and c[5] == "auroc"]
        assert means == sorted(means, reverse=True) and len(means) > 1


def _check_page(driver, url, out, n_images, n_groups):
    driver.get_log("browser")  # drop entries of earlier pages
    driver.get(url)
    assert driver.title == "gradood benchmark report"
    assert driver.find_element("tag name", "h1").text == "gradood benchmark report"
    tables = driver.find_elements("css selector", "table.heatmap")
    assert len(tables) == n_groups and all(t.is_displayed() for t in tables)
    verdicts = driver.find_elements("css selector", "p.verdict")
    assert len(verdicts) == n_groups and all(v.text.startswith("Best OOD-agnostic choice: ") for v in verdicts)
    assert driver.find_elements("css selector", "td.best")
    _check_heatmap_cells(driver.execute_script(_HEATMAP_JS), out / "results.json")
    small, shrunk, width = driver.execute_script(_LEGIBILITY_JS)
    assert width == 1400
    assert not small, f"text below 9 pt ({len(small)} elements): {small[:5]}"
    assert not shrunk, f"figures scaled down (their text would fall below 9 pt): {shrunk}"
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
    _check_page(browser, index.resolve().as_uri(), out, len(scores) + 2, n_groups=2)
    browser.save_screenshot(str(tmp_path / "report.png"))  # kept in pytest's tmp dir for a look
    assert (tmp_path / "report.png").stat().st_size > 10_000


@pytest.mark.browser
def test_report_renders_in_chromium_over_http(built, browser, http_root):
    out, index, _, scores = built
    state, base = http_root
    state["dir"] = str(out)
    _check_page(browser, f"{base}/index.html", out, len(scores) + 2, n_groups=2)
    # anchors navigate: the detector link of the first table row scrolls to its (collapsed) section
    browser.execute_script("document.querySelectorAll('details').forEach(d => d.open = false);")
    link = browser.find_element("css selector", "table.heatmap tbody th a")
    target = link.get_attribute("href").split("#", 1)[1]
    link.click()
    top, is_open, height = browser.execute_script(
        f"const t = document.getElementById({json.dumps(target)});"
        "return [t.getBoundingClientRect().top, t.closest('details').open, window.innerHeight];")
    assert is_open and 0 <= top < height  # the link opened the section and brought it into view
