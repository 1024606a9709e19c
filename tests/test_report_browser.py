"""The report in a real headless browser (Debian's chromium): sorting script, rendered images, no injected script.

Skipped only when /usr/bin/chromium is absent. The screenshot is kept as tests-artifacts/report.png.
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image
from test_report import (
    FEATURES,
    XSS,
    explanations_for,
    heatmap_png,
    index_rows,
    make_top_examples,
    parse,
    section,
    top_images,
    write_jsonl,
)
from test_report_steer_attribute import FILE_SUCCESS, make_attributions, make_steering

from mmsae.config import RunConfig
from mmsae.stages import report

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[1] / "tests-artifacts"

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium "
                                "(apt-get install chromium)")


@pytest.fixture(scope="module")
def page(tmp_path_factory) -> Path:
    """A report with explanations (one hostile), two scorers, a steering artifact (one output hostile) and an
    attributions artifact (one prompt hostile)."""
    t = tmp_path_factory.mktemp("browser")
    cfg = RunConfig()
    cfg.run.workdir = str(t / "work")
    cfg.run.name = "toy-run"
    cfg.tracking.enabled = False
    make_top_examples(str(t / "work" / "mine"))
    expl = explanations_for(FEATURES)
    expl[0]["explanation"] = XSS
    scores = [{"feature": f, "scorer": s, "score": ((f * 7) % 10) / 10, "details": {"images": 8}}
              for f in FEATURES for s in ("iou", "clip")]
    out = report.run(cfg, explanations=write_jsonl(t / "e.jsonl", expl), scores=write_jsonl(t / "s.jsonl", scores),
                     steering=make_steering(t / "steer", hostile=True), attributions=make_attributions(t / "attribute"))
    return Path(out.uris["index"])


def chromium(tmp: Path, *args: str) -> str:
    """Run headless chromium with its own profile folder and no network services; returns stdout."""
    profile = tmp / f"profile-{len(list(tmp.glob('profile-*')))}"
    cmd = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={profile}", *args]
    env = {**os.environ, "HOME": str(tmp)}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def rendered_dom(tmp: Path, file: Path, fragment: str = "") -> str:
    return chromium(tmp, "--dump-dom", file.as_uri() + fragment)


def row_features(dom: str) -> list[int]:
    return [int(r.attrs["data-feature"]) for r in index_rows(parse(dom))]


def by(key: int, descending: bool = False) -> list[int]:
    return sorted(FEATURES, key=lambda f: FEATURES[f][key], reverse=descending)


def test_sort_fragment_orders_the_index_after_the_script_ran(page, tmp_path):
    dom = rendered_dom(tmp_path, page, "#sort=-frequency")
    assert row_features(dom) == by(0, descending=True) != sorted(FEATURES)
    th = parse(dom).find("th", data_key="frequency")
    assert th.attrs["aria-sort"] == "descending"
    dom = rendered_dom(tmp_path, page, "#sort=max-activation")
    assert row_features(dom) == by(2)


def test_clicking_a_header_sorts_descending_then_ascending(page, tmp_path):
    clicker = (
        "document.addEventListener('DOMContentLoaded', function () {"
        " var th = document.querySelector('th[data-key=\"max-activation\"]'); th.click();"
        " var ids = Array.prototype.map.call(document.querySelectorAll('#feature-index tbody tr'),"
        "   function (r) { return r.getAttribute('data-feature'); });"
        " document.body.setAttribute('data-after-one-click', ids.join(',')); th.click(); });"
    )
    html = page.read_text()
    digest = base64.b64encode(hashlib.sha256(clicker.encode()).digest()).decode()
    html = html.replace("script-src ", f"script-src 'sha256-{digest}' ", 1)
    html = html.replace("</head>", f"<script>{clicker}</script></head>", 1)
    probe = tmp_path / "clicked.html"
    probe.write_text(html)
    dom = rendered_dom(tmp_path, probe)
    after_one = parse(dom).find("body").attrs["data-after-one-click"]
    assert [int(x) for x in after_one.split(",")] == by(2, descending=True)
    assert row_features(dom) == by(2)
    assert parse(dom).find("th", data_key="max-activation").attrs["aria-sort"] == "ascending"


def test_rendered_sections_show_their_images_and_no_injected_script_ran(page, tmp_path):
    doc = parse(rendered_dom(tmp_path, page))
    for f in FEATURES:
        imgs = section(doc, f).find_all("img")
        assert len(imgs) == len(top_images(f))
        assert all(i.attrs["src"].startswith("data:image/png;base64,") for i in imgs)
    body = doc.find("body")
    assert "data-pwned" not in body.attrs
    assert len(doc.find_all("script")) == 1
    assert section(doc, 3).find("span", **{"class": "text"}).text() == XSS


def test_screenshot_shows_the_heatmaps(page, tmp_path):
    shot = tmp_path / "report.png"
    chromium(tmp_path, f"--screenshot={shot}", "--window-size=1280,2000", page.as_uri())
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / ".gitignore").write_text("*\n")
    shutil.copyfile(shot, ARTIFACTS / "report.png")
    img = Image.open(shot).convert("RGB")
    assert img.size == (1280, 2000)
    colours = {c for _, c in img.getcolors(maxcolors=1 << 20)}
    # the first overlay heat map of the first feature is on screen, scaled up without smoothing
    want = Image.open(io.BytesIO(heatmap_png(3, 0, "overlay"))).convert("RGB").getpixel((0, 0))
    assert any(all(abs(a - b) <= 3 for a, b in zip(c, want, strict=True)) for c in colours), want


def run_in_page(tmp_path: Path, page: Path, script: str) -> str:
    """The rendered DOM of the page with ``script`` run after it loaded (allowed by a hash added to the
    page's policy, as the page's own script is)."""
    digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
    html = page.read_text().replace("script-src ", f"script-src 'sha256-{digest}' ", 1)
    html = html.replace("</head>", f"<script>{script}</script></head>", 1)
    probe = tmp_path / f"probe-{len(list(tmp_path.glob('probe-*')))}.html"
    probe.write_text(html)
    return rendered_dom(tmp_path, probe)


def test_the_index_opens_sorted_by_image_frequency(page, tmp_path):
    assert row_features(rendered_dom(tmp_path, page)) == by(1, descending=True)


def test_search_shows_only_the_matching_features(page, tmp_path):
    searcher = (
        "document.addEventListener('DOMContentLoaded', function () {"
        " var box = document.getElementById('feature-search'); var seen = [];"
        " ['kind 4', '3', 'nothing like it', ''].forEach(function (q) {"
        "   box.value = q; box.dispatchEvent(new Event('input'));"
        "   var ids = Array.prototype.filter.call(document.querySelectorAll('#feature-index tbody tr'),"
        "     function (r) { return !r.hidden; }).map(function (r) { return r.getAttribute('data-feature'); });"
        "   seen.push(ids.join(',') + '|' + document.getElementById('search-count').textContent); });"
        " document.body.setAttribute('data-searches', seen.join(';')); });"
    )
    dom = parse(run_in_page(tmp_path, page, searcher))
    results = [s.split("|") for s in dom.find("body").attrs["data-searches"].split(";")]
    everyone = ",".join(str(f) for f in by(1, descending=True))
    # explanation text ("things of kind 41"); an id (3, whose explanation is another); nothing; an empty query
    # shows them all again
    assert results == [["41", "1 of 5 features"], ["3", "1 of 5 features"], ["", "0 of 5 features"],
                       [everyone, ""]]


def test_dose_response_plots_and_attribution_heatmaps_are_drawn(page, tmp_path):
    probe = (
        "window.addEventListener('load', function () {"
        " var dots = Array.prototype.map.call("
        "   document.querySelectorAll('#f-000012 .dose-plot g[data-series=\"feature\"] circle'),"
        "   function (c) { var r = c.getBoundingClientRect(); return r.width > 0 ? Math.round(r.top) : -1; });"
        " var imgs = Array.prototype.map.call(document.querySelectorAll('#attributions img'),"
        "   function (i) { return i.complete && i.naturalWidth > 0 && i.getBoundingClientRect().width > 0; });"
        " document.body.setAttribute('data-dots', dots.join(','));"
        " document.body.setAttribute('data-drawn', imgs.join(',')); });"
    )
    body = parse(run_in_page(tmp_path, page, probe)).find("body")
    tops = [int(y) for y in body.attrs["data-dots"].split(",")]
    assert len(tops) == len(FILE_SUCCESS[12]) and min(tops) >= 0
    assert tops == sorted(tops, reverse=True) and len(set(tops)) == len(tops)  # rising success, drawn higher
    drawn = body.attrs["data-drawn"].split(",")
    assert len(drawn) == 3 + 2 + 2 and set(drawn) == {"true"}  # each example's total map and its top features'
    assert "data-pwned" not in body.attrs
