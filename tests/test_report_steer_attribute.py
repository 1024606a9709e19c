"""The report's views of the steer and attribute stages: each steered feature's dose-response on its card, the
Attributions section and the examples on each feature's card, the inputs' plumbing and the reuse rule."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import pytest
from PIL import Image
from test_report import (
    XSS,
    data_images,
    parse,
    render,
    section,
    write_jsonl,
)

from mmsae import dashboard_figures, storage
from mmsae.config import RunConfig
from mmsae.dashboard_attributions import heatmap_name
from mmsae.stages import report
from mmsae.stages._base import OutputMismatchError

# ---------------------------------------------------------------------------------------------------
# a hand-made steering artifact (the format the steer stage writes)

STRENGTHS = [2.0, 4.0, 8.0]
# feature -> per strength: (success per prompt, KL per prompt, steered NLL per prompt); None: not defined
ROWS = {
    12: {2.0: ([False, False, None, False], [0.1, 0.2, 0.3, 0.2], [0.5, 0.5, 0.4, 0.6]),
         4.0: ([True, False, None, False], [0.5, 0.7, 0.6, 0.6], [0.8, 0.9, 0.7, 1.0]),
         8.0: ([True, True, None, True], [2.0, 2.5, 1.5, 2.0], [1.5, 2.0, 1.0, 1.5])},
    3: {2.0: ([False, False, False, False], [0.0, 0.1, 0.0, 0.1], [0.3, 0.3, 0.3, 0.3]),
        4.0: ([False, True, False, False], [0.2, 0.2, 0.4, 0.2], [0.4, 0.5, 0.4, 0.3]),
        8.0: ([False, True, True, False], [0.9, 1.1, 1.0, 1.0], [0.6, 0.7, 0.5, 0.6])},
}
RANDOM = {12: {2.0: [False] * 4, 4.0: [False, False, False, True], 8.0: [False, True, False, False]},
          3: {2.0: [False] * 4, 4.0: [False] * 4, 8.0: [False, False, False, True]}}
"""The random baseline's successes per prompt, by the feature it is measured for."""
# dose_response.json values that no row gives: the plot must take them from the file
FILE_SUCCESS = {12: [0.125, 0.5625, 0.9375], 3: [0.0625, 0.3125, 0.4375]}
FILE_RANDOM = {12: [0.03125, 0.0625, 0.09375], 3: [0.0, 0.015625, 0.046875]}
FILE_KL = {12: [0.21, 0.66, 2.04], 3: [0.05, 0.27, 1.01]}
FILE_PERPLEXITY = {12: [1.7, 2.4, 4.6], 3: [1.35, 1.5, 1.8]}


def _row(feature: int, strength: float, prompt: int, success, kl: float, nll: float, **more) -> dict:
    return {"feature": feature, "strength": strength, "value": strength * 3.0, "prompt": f"describe image {prompt}",
            "image_idx": prompt, "baseline_output": "a small red square",
            "steered_output": f"steered {feature} at {strength} on {prompt}", "concept_words": ["red"],
            "metrics": {"kl_first_token": kl, "concept_hit": bool(success), "baseline_hit": success is None,
                        "success": success, "changed": True, "steered_nll": nll,
                        "steered_perplexity": math.exp(nll), "baseline_perplexity": 1.25}, **more}


def make_steering(folder: Path, dose_file: bool = True, hostile: bool = False) -> str:
    """Write a steering artifact: rows, the random baseline's rows, and (``dose_file``) a dose_response.json
    whose values differ from what the rows give."""
    rows, random_rows = [], []
    for feature, by_strength in ROWS.items():
        for strength, (successes, kls, nlls) in by_strength.items():
            for p, (success, kl, nll) in enumerate(zip(successes, kls, nlls, strict=True)):
                rows.append(_row(feature, strength, p, success, kl, nll))
            for p, success in enumerate(RANDOM[feature][strength]):
                random_rows.append(_row(40 + feature, strength, p, success, 0.01, 0.2, for_feature=feature))
    if hostile:
        rows[0]["steered_output"] = XSS
    files = {"steering.jsonl": "".join(json.dumps(r) + "\n" for r in rows),
             "random_baseline.jsonl": "".join(json.dumps(r) + "\n" for r in random_rows)}
    if dose_file:
        features = {str(f): {"concept_words": ["red"], "best": None, "strengths": {
            str(s): {"n": 4, "success_rate": FILE_SUCCESS[f][i], "kl_mean": FILE_KL[f][i],
                     "perplexity": FILE_PERPLEXITY[f][i], "random_success_rate": FILE_RANDOM[f][i],
                     "random_kl_mean": 0.01, "random_perplexity": 1.2} for i, s in enumerate(STRENGTHS)}}
            for f in ROWS}
        files["dose_response.json"] = json.dumps({"features": features, "by_strength": {}, "baseline_perplexity": 1.25})
    for name, text in files.items():
        storage.write_text(storage.join(str(folder), name), text)
    storage.write_manifest(str(folder), "steering", files=list(files),
                           extra={"strengths": STRENGTHS, "strength_unit": "max_activation", "features": list(ROWS)})
    return str(folder)


def expected_from_rows(feature: int) -> tuple[list[float], list[float], list[float], list[float]]:
    """Success, random success, mean KL and perplexity per strength, by the steer stage's definitions."""
    success, random_success, kl, perplexity = [], [], [], []
    for s in STRENGTHS:
        defined = [x for x in ROWS[feature][s][0] if x is not None]
        success.append(sum(defined) / len(defined))
        random_success.append(sum(RANDOM[feature][s]) / len(RANDOM[feature][s]))
        kl.append(sum(ROWS[feature][s][1]) / 4)
        perplexity.append(math.exp(sum(ROWS[feature][s][2]) / 4))
    return success, random_success, kl, perplexity


# ---------------------------------------------------------------------------------------------------
# a hand-made attributions artifact (the format the attribute stage writes)

ATTRIBUTED = [
    {"example": 0, "image_idx": 5, "prompt": f"{XSS} describe :", "answer": "red", "baseline": "<b>blue</b>",
     "metric": 2.5, "features_total": 2.1, "error_total": 0.4,
     "top_features": [{"feature": 12, "attribution": 0.875, "image_share": 0.8},
                      {"feature": 3, "attribution": 0.375, "image_share": 0.5},
                      {"feature": 999, "attribution": 0.125, "image_share": None}]},
    {"example": 1, "image_idx": 6, "prompt": "describe : a small", "answer": "green", "baseline": "red",
     "metric": 1.5, "features_total": 1.0, "error_total": 0.5,
     "top_features": [{"feature": 7, "attribution": 0.625, "image_share": 1.0}]},
    {"example": 2, "image_idx": 7, "prompt": "describe :", "answer": "red", "baseline": "blue",
     "metric": 0.5, "features_total": 0.3, "error_total": 0.2,
     "top_features": [{"feature": 12, "attribution": 0.25, "image_share": 0.25}]},
]
DRAWN = 2
"""Heat maps drawn per example (attribute.heatmaps)."""


def attribution_png(example: int, feature: int | None, shade: int = 0) -> bytes:
    """A small PNG whose colour is unique to (example, feature)."""
    colour = ((example * 71 + 30) % 256, (0 if feature is None else feature * 13 + 50) % 256, (90 + shade) % 256)
    buf = io.BytesIO()
    Image.new("RGB", (10, 8), colour).save(buf, format="PNG")
    return buf.getvalue()


def make_attributions(folder: Path, rows: list[dict] = ATTRIBUTED, shade: int = 0) -> str:
    uri = str(folder)
    names = ["attributions.jsonl"]
    storage.write_text(storage.join(uri, "attributions.jsonl"), "".join(json.dumps(r) + "\n" for r in rows))
    for r in rows:
        for feature in [None, *(t["feature"] for t in r["top_features"][:DRAWN])]:
            name = heatmap_name(r["example"], feature)
            storage.write_bytes(storage.join(uri, name), attribution_png(r["example"], feature, shade))
            names.append(name)
    storage.write_manifest(uri, "attributions", files=names, extra={"hookpoint": "layers.1", "figures": {}})
    return uri


def plotted(sec, series: str) -> list[tuple[float, float]]:
    group = sec.find("figure", **{"class": "dose-plot"}).find("g", data_series=series)
    return [(float(c.attrs["data-strength"]), float(c.attrs["data-value"])) for c in group.find_all("circle")]


def cells(sec, stat: str) -> list[str]:
    return [td.text() for td in sec.find("table", **{"class": "dose-table"}).find_all("td", data_stat=stat)]


# ---------------------------------------------------------------------------------------------------
# dose-response


def test_each_steered_feature_card_plots_its_own_dose_response_from_the_file(run_cfg, tmp_path):
    doc, html, out = render(run_cfg, steering=make_steering(tmp_path / "steer", hostile=True))
    for feature in ROWS:
        sec = section(doc, feature)
        assert plotted(sec, "feature") == list(zip(STRENGTHS, FILE_SUCCESS[feature], strict=True))
        assert plotted(sec, "random") == list(zip(STRENGTHS, FILE_RANDOM[feature], strict=True))
        assert cells(sec, "kl") == [dashboard_figures.number(v) for v in FILE_KL[feature]]
        assert cells(sec, "perplexity") == [dashboard_figures.number(v) for v in FILE_PERPLEXITY[feature]]
        assert cells(sec, "success") == [f"{dashboard_figures.number(100 * v)} %" for v in FILE_SUCCESS[feature]]
        assert sec.find("div", **{"class": "dose"}).attrs["data-source"] == "dose_response.json"
        # higher success is drawn higher
        ys = [float(c.attrs["cy"]) for c in sec.find("g", data_series="feature").find_all("circle")]
        assert ys == sorted(ys, reverse=True) and len(set(ys)) == 3
    plot = section(doc, 12).find("figure", **{"class": "dose-plot"})
    assert "× max activation" in plot.find("text", data_axis="x").text()
    assert plot.find("text", data_axis="y").text() == "success (% of prompts)"
    assert plot.find("span", data_series="random").text() == "random feature (baseline)"
    assert "nats" in section(doc, 12).find("table", **{"class": "dose-table"}).text()
    for unsteered in (7, 20, 41):
        assert not section(doc, unsteered).find_all("figure", **{"class": "dose-plot"})
    # the example rows are kept, escaped
    examples = section(doc, 12).find("table", **{"class": "steering"}).find("tbody").find_all("tr")
    assert len(examples) == 12 and examples[0].find_all("td")[3].text() == XSS
    assert "<script>alert(1)</script>" not in html and len(doc.find_all("script")) == 1
    assert out.figures["dose_response_features"] == 2 and out.figures["steered_features"] == 2


def test_without_the_dose_file_the_curves_are_computed_from_the_rows(run_cfg, tmp_path):
    folder = make_steering(tmp_path / "steer", dose_file=False)
    for steering in (folder, str(Path(folder) / "steering.jsonl")):  # the folder, or its steering.jsonl
        doc, _, _ = render(run_cfg, steering=steering)
        for feature in ROWS:
            success, random_success, kl, perplexity = expected_from_rows(feature)
            sec = section(doc, feature)
            assert [v for _, v in plotted(sec, "feature")] == pytest.approx(success)
            assert [v for _, v in plotted(sec, "random")] == pytest.approx(random_success)
            assert cells(sec, "kl") == [dashboard_figures.number(v) for v in kl]
            assert cells(sec, "perplexity") == [dashboard_figures.number(v) for v in perplexity]
            assert sec.find("div", **{"class": "dose"}).attrs["data-source"] == "steering rows"
    assert success != FILE_SUCCESS[3]


def test_rows_of_another_format_keep_their_table_and_get_no_plot(run_cfg, tmp_path):
    steering = [{"feature": 12, "strength": 2.0, "prompt": "p", "baseline_output": "a", "steered_output": "b",
                 "metrics": {"concept_rate": 0.5}}]
    doc, _, out = render(run_cfg, steering=write_jsonl(tmp_path / "st.jsonl", steering))
    sec = section(doc, 12)
    assert sec.find("table", **{"class": "steering"}) and not sec.find_all("div", **{"class": "dose"})
    assert out.figures["dose_response_features"] == 0


# ---------------------------------------------------------------------------------------------------
# attributions


def test_attributions_section_shows_the_capped_examples_with_their_heatmaps_and_links(run_cfg, tmp_path):
    run_cfg.report.attribution_examples = 2
    doc, html, out = render(run_cfg, attributions=make_attributions(tmp_path / "attribute"))
    sec = doc.find("section", id="attributions")
    articles = sec.find_all("article")
    assert [int(a.attrs["data-example"]) for a in articles] == [0, 1]
    assert "2 of 3 examples" in sec.find("h2").text()
    first = articles[0]
    assert first.find("p", **{"class": "prompt"}).find("span", **{"class": "text"}).text() == f"{XSS} describe :"
    assert "<script>alert(1)</script>" not in html and len(doc.find_all("script")) == 1
    assert first.find("span", data_token="answer").text() == "red"
    assert first.find("span", data_token="baseline").text() == "<b>blue</b>" and "<b>blue" not in html
    assert first.find("b", **{"class": "metric"}).text() == "2.5"
    # the all-features map first, then the drawn top features' maps, each its own
    assert data_images(first) == [attribution_png(0, None), attribution_png(0, 12), attribution_png(0, 3)]
    assert [f.attrs["data-heatmap"] for f in first.find_all("figure")] == ["total", "12", "3"]
    top = first.find("table", **{"class": "top-features"}).find("tbody").find_all("tr")
    assert [int(r.attrs["data-feature"]) for r in top] == [12, 3, 999]
    assert [r.find("td", data_stat="attribution").text() for r in top] == ["0.875", "0.375", "0.125"]
    assert [r.find("td", data_stat="image-share").text() for r in top] == ["80 %", "50 %", ""]
    # links go to cards that exist; a feature without a card (999: not mined) is not linked
    ids = {n.attrs["id"] for n in doc.iter() if "id" in n.attrs}
    links = [a.attrs["href"] for a in sec.find_all("a")]
    assert links and all(h[1:] in ids for h in links)
    assert [a.text() for a in top[0].find_all("a")] == ["12"] and not top[2].find_all("a")
    assert out.figures["attributed_examples"] == 2
    assert doc.find("nav").find_all("a", href="#attributions")


def test_a_feature_card_lists_the_examples_it_is_a_top_feature_of(run_cfg, tmp_path):
    run_cfg.report.attribution_examples = 2
    doc, _, _ = render(run_cfg, attributions=make_attributions(tmp_path / "attribute"))
    rows = section(doc, 12).find("table", **{"class": "attributed"}).find("tbody").find_all("tr")
    assert [int(r.attrs["data-example"]) for r in rows] == [0, 2]
    assert [a.attrs["href"] for a in rows[0].find_all("a")] == ["#attr-e0000"]
    assert doc.find("article", id="attr-e0000")
    assert not rows[1].find_all("a")  # example 2 is beyond the cap: listed, not linked
    assert [int(r.attrs["data-example"]) for r in
            section(doc, 7).find("table", **{"class": "attributed"}).find("tbody").find_all("tr")] == [1]
    assert not section(doc, 20).find_all("table", **{"class": "attributed"})


def test_only_features_with_a_card_are_linked(run_cfg, tmp_path):
    run_cfg.report.max_detail_features = 2  # the mine stage's selection: 7 and 41
    doc, _, _ = render(run_cfg, attributions=make_attributions(tmp_path / "attribute"))
    sec = doc.find("section", id="attributions")
    assert {a.attrs["href"] for a in sec.find_all("a")} == {"#f-000007"}


def test_top_features_show_their_explanations_when_there_are_any(run_cfg, tmp_path):
    uri = make_attributions(tmp_path / "attribute")
    doc, _, _ = render(run_cfg, attributions=uri)
    assert not doc.find("table", **{"class": "top-features"}).find_all("td", **{"class": "expl"})
    explanations = [{"feature": 12, "explanation": "<i>red things</i>", "status": "ok"}]
    doc, _, _ = render(run_cfg, attributions=uri, explanations=write_jsonl(tmp_path / "e.jsonl", explanations))
    top = doc.find("article", id="attr-e0000").find("table", **{"class": "top-features"}).find("tbody").find_all("tr")
    assert [r.find("td", **{"class": "expl"}).text() for r in top] == ["<i>red things</i>", "", ""]


def test_without_attributions_there_is_no_section(run_cfg):
    doc, _, out = render(run_cfg)
    assert not doc.find_all("section", id="attributions") and out.figures["attributed_examples"] == 0


def test_a_wrong_attributions_artifact_is_refused_naming_the_setting(run_cfg, tmp_path):
    with pytest.raises(report.ReportError, match="report.attributions: no attributions artifact"):
        report.run(run_cfg, attributions=str(Path(run_cfg.run.workdir) / "mine"))


def test_a_corrupted_attribution_heatmap_is_refused_naming_the_file(run_cfg, tmp_path):
    uri = make_attributions(tmp_path / "attribute")
    png = Path(uri) / heatmap_name(1, 7)
    png.write_bytes(png.read_bytes()[:-3])
    with pytest.raises(storage.ChecksumError, match="e0001-f000007.png"):
        report.run(run_cfg, attributions=uri)


# ---------------------------------------------------------------------------------------------------
# plumbing


def test_rewritten_attributions_change_the_report_key(run_cfg, tmp_path):
    run_cfg.run.overwrite = False
    uri = make_attributions(tmp_path / "attribute")
    first = report.run(run_cfg, attributions=uri)
    assert storage.read_manifest(first.uri).inputs["attributions"] == uri
    page = Path(first.uris["index"]).read_bytes()
    assert report.run(run_cfg, attributions=uri).figures == first.figures  # same inputs: reused
    assert Path(first.uris["index"]).read_bytes() == page

    make_attributions(tmp_path / "attribute", shade=100)  # the same examples, other heat maps
    with pytest.raises(OutputMismatchError, match="input attributions was rewritten or replaced"):
        report.run(run_cfg, attributions=uri)
    run_cfg.run.overwrite = True
    again = report.run(run_cfg, attributions=uri)
    doc = parse(Path(again.uris["index"]).read_text())
    assert data_images(doc.find("article", id="attr-e0001"))[0] == attribution_png(1, None, shade=100)


def test_attributions_come_from_the_config_and_the_argument_overrides_it(run_cfg, tmp_path):
    run_cfg.report.attributions = make_attributions(tmp_path / "configured", rows=ATTRIBUTED[:1])
    assert report.run(run_cfg).figures["attributed_examples"] == 1
    assert report.run(run_cfg, attributions=make_attributions(tmp_path / "given")).figures["attributed_examples"] == 3


def test_component_and_cli_pass_the_attributions_on(run_cfg, tmp_path):
    from kfp.dsl import HTML, Dataset, Metrics
    from typer.testing import CliRunner

    from mmsae.cli import app
    from mmsae.components.report import report as component
    from mmsae.config import dump_config

    uri = make_attributions(tmp_path / "attribute")
    top = Dataset(name="top_examples", uri="", metadata={"uri": str(Path(run_cfg.run.workdir) / "mine")})
    page = HTML(name="report", uri=str(tmp_path / "report.html"))
    page.path = str(tmp_path / "report.html")
    metrics = Metrics(name="metrics", uri=str(tmp_path / "metrics"))
    logged = {}
    metrics.log_metric = lambda k, v: logged.__setitem__(k, v)
    component.python_func(config_yaml=dump_config(run_cfg), parent_run_id="", top_examples=top, report=page,
                          metrics=metrics, attributions=Dataset(name="attributions", uri="", metadata={"uri": uri}))
    assert parse(Path(page.path).read_text()).find("article", id="attr-e0002")
    assert logged["attributed_examples"] == len(ATTRIBUTED)

    out = tmp_path / "cli-report"
    result = CliRunner().invoke(app, ["report", "--set", f"run.workdir={run_cfg.run.workdir}", "--set",
                                      "tracking.enabled=false", "--attributions", uri, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert parse((out / "index.html").read_text()).find("article", id="attr-e0001")


def test_the_report_reads_the_files_the_stages_write():
    """The report names the steer and attribute stages' files without importing them (they load torch)."""
    from mmsae.stages import attribute, steer

    assert (report.STEERING_KIND, report.STEERING_RECORDS, report.STEERING_RANDOM, report.STEERING_DOSE) == (
        steer.KIND, steer.RECORDS_FILE, steer.RANDOM_FILE, steer.DOSE_FILE)
    assert (report.ATTRIBUTIONS_KIND, report.ATTRIBUTIONS_RECORDS) == (attribute.KIND, attribute.RECORDS_FILE)
    for example, feature in ((0, None), (3, 12), (1234, 98765)):
        assert heatmap_name(example, feature) == attribute.heatmap_name(example, feature)


def test_headline_figures_of_steer_and_attribute_are_labelled_after_steer():
    figures = {"attribute": {"examples": 12, "metric_mean": 1.5, "error_share": 0.2, "active_features_mean": 9.5,
                             "concept_examples": 10, "top_is_matched": 0.7, "top_is_matched_random": 0.1,
                             "top_is_concept": 0.8, "top_is_concept_random": 0.2},
               "steer": {"success_best": 0.6, "success_best_random": 0.05, "kl_at_best": 1.25,
                         "perplexity_at_best": 3.0, "baseline_perplexity": 1.5},
               "mine": {"features_alive": 4}}
    cards = dashboard_figures.headline(figures)
    assert [c["step"] for c in cards] == ["mine", "steer", "attribute"]
    rows = {r["key"]: r for r in cards[2]["rows"]}
    assert all(r["known"] for r in rows.values())
    assert set(rows) == {"examples", "metric_mean", "error_share", "active_features_mean", "concept_examples",
                         "top_is_matched", "top_is_concept"}  # the random ones beside them, not rows of their own
    assert rows["top_is_matched"]["baseline"] == {"label": "random active feature", "key": "top_is_matched_random",
                                                  "value": "0.1"}
    assert rows["top_is_concept"]["baseline"]["value"] == "0.2" and rows["metric_mean"]["value"] == "1.5 logits"
    steer_rows = {r["key"]: r for r in cards[1]["rows"]}
    assert steer_rows["success_best"]["baseline"]["value"] == "0.05"
    assert steer_rows["perplexity_at_best"]["baseline"]["label"] == "unsteered"
    assert steer_rows["kl_at_best"]["value"] == "1.25 nats"


def test_report_config_takes_the_attribution_settings():
    cfg = RunConfig.model_validate({"report": {"attributions": "s3://b/attribute", "attribution_examples": 5}})
    assert (cfg.report.attributions, cfg.report.attribution_examples) == ("s3://b/attribute", 5)
    with pytest.raises(ValueError, match="attribution_examples"):
        RunConfig.model_validate({"report": {"attribution_examples": -1}})
