"""Screenshot of a benchmark report's overview, as headless Chromium shows it at 1400 px: the README's picture.

Captures the page from its top to the end of the first model's overview (verdict, heatmap, ROC figure),
then stores it as a 256-colour PNG (flat colours: a fraction of the RGB size, no visible loss). With many
detectors, ``--rows N`` keeps the heatmap's first N rows (the best by mean AUROC) in the picture and says
in a last row how many are left out; the report itself is not changed.

Usage (after ``./dev bench``, which writes ``gradood-results/``; reruns reuse its cached results)::

    python benchmarks/report_screenshot.py gradood-results docs/img/report-overview.png

For a quick look, a one-model run of ten detectors (about a minute)::

    gradood bench benchmarks/report_tiny.toml --out report-tiny
    python benchmarks/report_screenshot.py report-tiny /tmp/report-tiny.png

Needs selenium (the ``test`` extra) and Debian's ``chromium`` + ``chromium-driver`` (``./dev test`` installs them).
"""

from __future__ import annotations

import argparse
import base64
import io
import shutil
import sys
import tempfile
from pathlib import Path

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
        "--disable-background-networking", "--disable-component-update", "--no-first-run"]

# Hides heatmap rows after the first N and says so in a row of its own (only in the captured page).
_TRIM_JS = """
const n = arguments[0];
for (const body of document.querySelectorAll('table.heatmap tbody')) {
  const rows = Array.from(body.rows), hidden = rows.length - n;
  if (hidden <= 0) continue;
  rows.slice(n).forEach(r => r.style.display = 'none');
  const note = body.insertRow(), td = note.insertCell();
  td.colSpan = rows[0].cells.length;
  td.textContent = `... and ${hidden} more detectors (in the report)`;
  td.style.textAlign = 'center'; td.style.color = '#5b6570';
}
"""

# Bottom of the first model's overview: its ROC figure, else its heatmap legend (a report without scores).
_BOTTOM_JS = """
const g = document.querySelector('section.group');
const last = g.querySelector('figure.overview') || g.querySelector('.heat-legend');
return Math.ceil(last.getBoundingClientRect().bottom + window.scrollY);
"""


def screenshot(index: Path, width: int, max_height: int, rows: int) -> bytes:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ARGS:
        opts.add_argument(arg)
    opts.add_argument(f"--window-size={width},1000")
    with tempfile.TemporaryDirectory() as profile:
        opts.add_argument(f"--user-data-dir={profile}")
        driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
        try:
            driver.get(index.resolve().as_uri())
            if rows:
                driver.execute_script(_TRIM_JS, rows)
            height = min(driver.execute_script(_BOTTOM_JS) + 16, max_height)
            shot = driver.execute_cdp_cmd("Page.captureScreenshot", {
                "format": "png", "captureBeyondViewport": True,
                "clip": {"x": 0, "y": 0, "width": width, "height": height, "scale": 1}})
        finally:
            driver.quit()
    return base64.b64decode(shot["data"])


def compact_png(png: bytes) -> bytes:
    from PIL import Image

    with Image.open(io.BytesIO(png)) as im:
        small = im.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
        buf = io.BytesIO()
        small.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("report", type=Path, help="report folder (holds index.html), e.g. gradood-results")
    p.add_argument("out", type=Path, help="PNG to write, e.g. docs/img/report-overview.png")
    p.add_argument("--width", type=int, default=1400, help="window width in CSS px (default 1400)")
    p.add_argument("--max-height", type=int, default=2400, help="crop the capture at this height (default 2400)")
    p.add_argument("--rows", type=int, default=15, help="heatmap rows to show, best first (0 = all; default 15)")
    args = p.parse_args(argv)
    index = args.report / "index.html" if args.report.is_dir() else args.report
    if not index.is_file():
        p.error(f"{index} does not exist: run `gradood bench` (or ./dev bench) first, or pass a report folder")
    missing = [x for x in (CHROMIUM, CHROMEDRIVER) if not shutil.which(x)]
    if missing:
        p.error(f"{', '.join(missing)} not found: `apt-get install -y chromium chromium-driver` (./dev test does it)")
    png = compact_png(screenshot(index, args.width, args.max_height, args.rows))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(f".{args.out.name}.tmp")
    tmp.write_bytes(png)
    tmp.replace(args.out)
    print(f"{args.out}: {len(png) / 1024:.0f} KB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
