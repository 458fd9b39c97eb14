"""Open report.html in headless Chromium: it loads without errors and its images render.

A copy of the report gets a small probe script (the report itself carries no
scripts) that records resource and script errors and, at `load`, each image's
`complete` and `naturalWidth` into a <pre> that `--dump-dom` prints. The
virtual time budget makes Chromium wait for the load event deterministically.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from analysis import pipeline

pytestmark = pytest.mark.browser

RUN = Path(__file__).resolve().parent / "fixtures" / "runs" / "20261125T100000Z-hostloop"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

PROBE = """<script>
window.__errors = [];
window.addEventListener('error', function (e) {
  var t = e.target;
  window.__errors.push(t && t.tagName ? 'resource failed: ' + t.tagName : String(e.message));
}, true);
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var h2 = document.querySelector('h2');
  var first = {tables: 0, rows: 0, images: 0, heads: []};
  for (var n = h2; n; n = n.nextElementSibling) {
    if (n.tagName === 'H2') {
      if (n.textContent.indexOf('Details') === 0) break;
      first.heads.push(n.textContent);
    }
    var tables = n.tagName === 'TABLE' ? [n] : Array.prototype.slice.call(
      n.querySelectorAll('table'));
    tables.forEach(function (t) { first.tables++; first.rows += t.rows.length; });
    first.images += n.tagName === 'IMG' ? 1 : n.querySelectorAll('img').length;
  }
  var r = {errors: window.__errors, title: document.title,
           first_h2: h2 ? h2.textContent : null, first: first,
           images: imgs.map(function (i) {
             return {complete: i.complete, w: i.naturalWidth, h: i.naturalHeight}; })};
  var d = document.createElement('pre');
  d.id = 'netbed-probe';
  d.textContent = JSON.stringify(r);
  document.body.appendChild(d);
});
</script>"""


def probe(html_file: Path, tmp_path: Path) -> dict:
    if CHROMIUM is None:
        pytest.skip("chromium not installed (apt-get install -y chromium)")
    page = tmp_path / f"probe-{html_file.name}"
    page.write_text(html_file.read_text().replace("<head>", "<head>" + PROBE, 1))
    argv = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
            "--virtual-time-budget=5000", "--dump-dom", page.as_uri()]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    m = re.search(r'<pre id="netbed-probe">(.*?)</pre>', out.stdout, re.S)
    assert m, f"probe missing; chromium exit {out.returncode}; stderr tail: {out.stderr[-800:]}"
    return json.loads(m.group(1).replace("&quot;", '"').replace("&amp;", "&"))


def test_report_loads_and_images_render(tmp_path: Path) -> None:
    run = tmp_path / RUN.name
    shutil.copytree(RUN, run)
    paths = pipeline.write_report(run, compare_to=RUN)
    r = probe(paths.html, tmp_path)
    assert r["errors"] == []
    assert r["title"].startswith("netbed report")
    assert r["first_h2"] == "The answer"  # the answer opens the report
    assert len(r["images"]) == len(paths.figures) == 4  # the answer's figure + 3
    for img in r["images"]:
        assert img["complete"] and img["w"] > 0 and img["h"] > 0


def test_probe_detects_a_broken_image(tmp_path: Path) -> None:
    """The check above can fail: a corrupt embedded image is reported."""
    bad = tmp_path / "bad.html"
    bad.write_text("<!DOCTYPE html><html><head><title>t</title></head><body>"
                   '<img src="data:image/png;base64,AAAAbm90IGEgcG5n"></body></html>')
    r = probe(bad, tmp_path)
    assert r["images"][0]["w"] == 0
    assert r["errors"] == ["resource failed: IMG"]


def test_the_claims_open_the_report_on_one_screen(tmp_path: Path) -> None:
    """A report of a synthetic run with the claims' metrics (tests/unit/claims_data.py):
    the first section has one table and one figure, and the figure renders."""
    import numpy as np

    from analysis.answer import build_answer_parts
    from analysis.collate import by_kind
    from analysis.compare import compare_to_baseline, summarize
    from analysis.report import build_report
    from tests.unit.claims_data import locality_run

    run = tmp_path / "20261207T000000Z-synthetic"
    run.mkdir()
    tidy = locality_run(np.random.default_rng(1))
    view = by_kind(tidy)
    parts = build_answer_parts(run, tidy, run / "analysis" / "plots")
    paths = build_report(run, tidy, {}, summarize(view), compare_to_baseline(view), None, [],
                         lead=[*parts.first, *parts.details])
    r = probe(paths.html, tmp_path)
    assert r["errors"] == []
    assert r["first_h2"] == "The answer"
    first = r["first"]
    assert first["tables"] == 1 and first["images"] == 1, first
    assert first["rows"] <= 21  # header + at most 20 contrasts
    assert first["heads"][-1] == "How to read the claims"
    assert all(img["complete"] and img["w"] > 0 for img in r["images"])
