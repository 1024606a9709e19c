"""The report stage: page structure, the right heat maps per feature, escaping, optional inputs, caps, tracking."""

import base64
import io
import json
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import save as save_safetensors

from mmsae import storage
from mmsae.config import ReportConfig, RunConfig
from mmsae.stages import report
from mmsae.stages._base import StageOutputs, read_summaries, record_summary

# ---------------------------------------------------------------------------------------------------
# a hand-made top-examples artifact (the format the mine stage writes)

# feature id -> (frequency, image_frequency, max_activation, mean_activation, number of top images)
FEATURES = {
    3: (0.02, 0.10, 5.0, 1.2, 4),
    7: (0.30, 0.80, 1.5, 0.4, 2),
    12: (0.001, 0.01, 9.0, 3.3, 3),
    20: (0.15, 0.50, 3.0, 0.9, 1),
    41: (0.07, 0.20, 0.5, 0.1, 2),
}
DEFAULT_ORDER = sorted(FEATURES, key=lambda f: (-FEATURES[f][1], -FEATURES[f][2], f))
"""The index's order when the page opens: image frequency, then max activation, descending."""
XSS = '<script>alert(1)</script> "quotes" & <img src=x onerror="document.body.setAttribute(\'data-pwned\',\'1\')">'


def heatmap_png(feature: int, rank: int, kind: str) -> bytes:
    """A small PNG whose colour is unique to (feature, rank, kind)."""
    colour = ((feature * 37) % 256, (rank * 61 + 20) % 256, 200 if kind == "overlay" else 60)
    img = Image.new("RGB", (12, 12), colour)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def top_images(feature: int, features: dict = FEATURES) -> list[int]:
    return [100 * feature + r for r in range(features[feature][4])]


SELECTED = [7, 41]


def make_top_examples(uri: str, features: dict = FEATURES, skip_heatmaps: tuple = (),
                      ground_truth: dict | None = None, fields: dict | None = None, heatmap=heatmap_png,
                      format_version: int = 1, figures: dict | None = None) -> str:
    """Write a top-examples artifact; ``skip_heatmaps`` lists (feature, rank) pairs left without PNGs,
    ``fields`` maps features to more fields of their records (format 2), ``heatmap(feature, rank, kind)`` makes
    the PNGs."""
    names, lines, sizes = [], [], {}
    maps: dict[str, list] = {k: [] for k in ("feature", "image_idx", "view", "row", "col", "token_pos", "act")}
    for f, (freq, ifreq, mx, mean, _) in sorted(features.items()):
        top = [{"image_idx": i, "score": round(mx - 0.5 * r, 3)} for r, i in enumerate(top_images(f, features))]
        quantiles = [{"image_idx": 9000 + f, "score": mean, "quantile": 1}]
        lines.append(json.dumps({
            "feature": f, "frequency": freq, "image_frequency": ifreq, "max_activation": mx,
            "mean_activation": mean, "top": top, "quantiles": quantiles, "negatives": [8000 + f],
            **(fields or {}).get(f, {}),
        }))
        for rank, t in enumerate(top):
            sizes[str(t["image_idx"])] = {"width": 12, "height": 12}
            for k, v in (("feature", f), ("image_idx", t["image_idx"]), ("view", 0), ("row", 0), ("col", 0),
                         ("token_pos", 5), ("act", t["score"])):
                maps[k].append(v)
            if (f, rank) in skip_heatmaps:
                continue
            for kind in ("overlay", "masked"):
                name = f"heatmaps/f{f:06d}/{kind}-{rank:02d}-{t['image_idx']}.png"
                storage.write_bytes(storage.join(uri, name), heatmap(f, rank, kind))
                names.append(name)
        sizes[str(9000 + f)] = {"width": 12, "height": 12}
    dtypes = {"feature": np.int32, "image_idx": np.int64, "view": np.int16, "row": np.int16, "col": np.int16,
              "token_pos": np.int32, "act": np.float32}
    storage.write_bytes(storage.join(uri, "maps.safetensors"),
                        save_safetensors({k: np.asarray(v, dtype=dtypes[k]) for k, v in maps.items()}))
    storage.write_text(storage.join(uri, "features.jsonl"), "\n".join(lines) + "\n")
    storage.write_json(storage.join(uri, "images.json"), sizes)
    names += ["features.jsonl", "maps.safetensors", "images.json"]
    if ground_truth is not None:
        storage.write_json(storage.join(uri, "ground_truth.json"), ground_truth)
        names.append("ground_truth.json")
    storage.write_manifest(
        uri, "top_examples", files=names, format_version=format_version,
        inputs={"sae": "sae-uri", "shards": "shards-uri", "image_set": "images-uri"},
        extra={"hookpoint": "layers.1", "family": "llava_next", "num_latents": 64, "k": 4, "score": "max",
               "top_k": 4, "n_quantiles": 1, "n_random": 1, "features": sorted(features),
               "selected": [f for f in SELECTED if f in features],
               "figures": figures or {"mined_features": len(features)}},
    )
    return uri


def write_jsonl(path: Path, records: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def explanations_for(features) -> list[dict]:
    return [{"feature": f, "explanation": f"things of kind {f}", "status": "ok", "explainer_model": "toy-explainer",
             "prompt_hash": "abc", "raw_reply": f"It is things of kind {f}.", "latency": 0.5} for f in features]


# ---------------------------------------------------------------------------------------------------
# a small DOM from html.parser


VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


class Node:
    def __init__(self, tag: str, attrs: dict[str, str | None], parent: "Node | None"):
        self.tag, self.attrs, self.parent, self.children = tag, attrs, parent, []

    def text(self) -> str:
        return "".join(c if isinstance(c, str) else c.text() for c in self.children)

    def iter(self):
        for c in self.children:
            if isinstance(c, Node):
                yield c
                yield from c.iter()

    def find_all(self, tag: str | None = None, **attrs) -> "list[Node]":
        return [n for n in self.iter() if (tag is None or n.tag == tag)
                and all(n.attrs.get(k.replace("_", "-")) == v for k, v in attrs.items())]

    def find(self, tag: str | None = None, **attrs) -> "Node":
        found = self.find_all(tag, **attrs)
        assert found, f"no <{tag}> with {attrs}"
        return found[0]


class DomBuilder(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.root = Node("#document", {}, None)
        self.cur = self.root

    def handle_starttag(self, tag, attrs):
        node = Node(tag, dict(attrs), self.cur)
        self.cur.children.append(node)
        if tag not in VOID:
            self.cur = node

    def handle_startendtag(self, tag, attrs):
        self.cur.children.append(Node(tag, dict(attrs), self.cur))

    def handle_endtag(self, tag):
        n = self.cur
        while n is not None and n.tag != tag:
            n = n.parent
        if n is not None and n.parent is not None:
            self.cur = n.parent

    def handle_data(self, data):
        self.cur.children.append(data)


def parse(html: str) -> Node:
    b = DomBuilder()
    b.feed(html)
    b.close()
    return b.root


def index_rows(doc: Node) -> list[Node]:
    return doc.find("table", id="feature-index").find("tbody").find_all("tr")


def section(doc: Node, feature: int) -> Node:
    return doc.find("section", id=f"f-{feature:06d}")


def data_images(node: Node) -> list[bytes]:
    out = []
    for img in node.find_all("img"):
        src = img.attrs["src"]
        assert src.startswith("data:image/png;base64,"), src[:40]
        out.append(base64.b64decode(src.split(",", 1)[1]))
    return out


# ---------------------------------------------------------------------------------------------------
# fixtures


def render(run_cfg: RunConfig, **kw) -> tuple[Node, str, StageOutputs]:
    out = report.run(run_cfg, **kw)
    html = Path(out.uris["index"]).read_text()
    return parse(html), html, out


# ---------------------------------------------------------------------------------------------------
# tests


def test_index_lists_every_mined_feature_with_its_statistics(run_cfg):
    doc, _, out = render(run_cfg)
    rows = index_rows(doc)
    assert [int(r.attrs["data-feature"]) for r in rows] == DEFAULT_ORDER != sorted(FEATURES)
    for r in rows:
        freq, ifreq, mx, mean, _ = FEATURES[int(r.attrs["data-feature"])]
        assert float(r.attrs["data-frequency"]) == freq
        assert float(r.attrs["data-image-frequency"]) == ifreq
        assert float(r.attrs["data-max-activation"]) == mx
        assert float(r.attrs["data-mean-activation"]) == mean
    assert out.figures["features"] == len(FEATURES) and out.figures["features_detailed"] == len(FEATURES)
    assert out.uris["index"] == str(Path(run_cfg.run.workdir) / "report" / "index.html")


def test_each_detail_section_shows_its_own_overlay_heatmaps_in_rank_order(run_cfg):
    doc, _, out = render(run_cfg)
    for f in FEATURES:
        sec = section(doc, f)
        assert data_images(sec) == [heatmap_png(f, r, "overlay") for r in range(len(top_images(f)))]
        shown = [int(fig.attrs["data-image"]) for fig in sec.find_all("figure")]
        assert shown == top_images(f)
    assert out.figures["images"] == sum(v[4] for v in FEATURES.values())


def test_both_styles_and_the_per_feature_image_cap(run_cfg):
    run_cfg.report.heatmap = "both"
    run_cfg.report.images_per_feature = 2
    doc, _, _ = render(run_cfg)
    sec = section(doc, 3)  # four top images, capped to two
    expected = [heatmap_png(3, r, k) for r in range(2) for k in ("overlay", "masked")]
    assert data_images(sec) == expected
    assert [i.attrs["data-kind"] for i in sec.find_all("img")] == ["overlay", "masked"] * 2

    run_cfg.report.heatmap = "masked"
    doc, _, _ = render(run_cfg)
    assert data_images(section(doc, 20)) == [heatmap_png(20, 0, "masked")]


def test_a_missing_heatmap_shows_a_placeholder_not_a_broken_image(tmp_path, run_cfg):
    uri = make_top_examples(str(tmp_path / "other"), skip_heatmaps=((3, 1),))
    doc, _, _ = render(run_cfg, top_examples=uri)
    sec = section(doc, 3)
    assert len(sec.find_all("img")) == 3
    placeholder = sec.find_all("figure")[1].find("div", **{"data_kind": "overlay"})
    assert "no overlay heat map" in placeholder.text()


def test_model_text_is_escaped_everywhere(run_cfg, tmp_path):
    expl = explanations_for([3, 7])
    expl[0]["explanation"] = XSS
    expl[0]["raw_reply"] = XSS
    expl[1]["explainer_model"] = XSS
    scores = [{"feature": 3, "scorer": XSS, "score": 0.5, "details": {"note": XSS}}]
    steering = [{"feature": 3, "strength": 4.0, "prompt": XSS, "baseline_output": XSS, "steered_output": XSS,
                 "metrics": {"m": XSS}}]
    doc, html, _ = render(
        run_cfg, explanations=write_jsonl(tmp_path / "e.jsonl", expl),
        scores=write_jsonl(tmp_path / "s.jsonl", scores), steering=write_jsonl(tmp_path / "st.jsonl", steering))
    scripts = doc.find_all("script")
    assert len(scripts) == 1 and "alert" not in scripts[0].text()
    assert all(i.attrs["src"].startswith("data:") for i in doc.find_all("img"))
    assert not [n for n in doc.iter() if any(a.startswith("on") for a in n.attrs)]
    assert "<script>alert(1)</script>" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    sec = section(doc, 3)
    assert sec.find("span", **{"class": "text"}).text() == XSS  # shown as text, character for character
    assert XSS in sec.find("table", **{"class": "steering"}).text()
    row = {int(r.attrs["data-feature"]): r for r in index_rows(doc)}[3]
    assert row.attrs["data-explanation"] == XSS  # attribute values are quoted safely too


def test_without_optional_inputs_there_are_no_explanation_score_or_steering_parts(run_cfg):
    doc, _, out = render(run_cfg)
    keys = [th.attrs["data-key"] for th in doc.find("table", id="feature-index").find_all("th")]
    assert keys == ["feature", "frequency", "image-frequency", "max-activation", "mean-activation"]
    assert not doc.find_all(**{"class": "explanation"})
    assert not doc.find_all("table", **{"class": "scores"}) and not doc.find_all("table", **{"class": "steering"})
    assert not doc.find_all("section", id="baselines")
    assert out.figures["explained_features"] == 0 and out.figures["scored_features"] == 0


def test_explanations_scores_and_steering_appear_under_their_features(run_cfg, tmp_path):
    expl = explanations_for([3, 12])
    expl.append({"feature": 7, "explanation": "", "status": "unable", "explainer_model": "toy-explainer"})
    scores = [
        {"feature": 3, "scorer": "iou", "score": 0.8, "details": {"threshold": 0.5}},
        {"feature": 3, "scorer": "clip", "score": 0.2, "details": {}},
        {"feature": 12, "scorer": "iou", "score": 0.1, "details": {}},
        {"feature": None, "scorer": "iou", "score": 0.05, "details": {"baseline": "random"}},
        {"feature": 999, "scorer": "iou", "score": 0.9, "details": {}},  # not mined: left out
    ]
    steering = [{"feature": 12, "strength": s, "prompt": "Describe the image.", "baseline_output": "a square",
                 "steered_output": f"a red square x{s}", "metrics": {"concept_rate": s / 10}} for s in (2.0, 8.0)]
    doc, _, out = render(
        run_cfg, explanations=write_jsonl(tmp_path / "e.jsonl", expl),
        scores=write_jsonl(tmp_path / "s.jsonl", scores), steering=write_jsonl(tmp_path / "st.jsonl", steering))
    keys = [th.attrs["data-key"] for th in doc.find("table", id="feature-index").find_all("th")]
    assert keys[-3:] == ["score-iou", "score-clip", "score"] and "explanation" in keys
    rows = {int(r.attrs["data-feature"]): r for r in index_rows(doc)}
    assert float(rows[3].attrs["data-score-iou"]) == 0.8 and float(rows[3].attrs["data-score"]) == 0.5
    assert rows[7].attrs["data-score"] == "" and rows[7].attrs["data-explanation"].startswith("(unable)")
    assert section(doc, 12).find("span", **{"class": "text"}).text() == "things of kind 12"
    assert [tr.attrs["data-scorer"] for tr in section(doc, 3).find("table", **{"class": "scores"}).find_all("tr")
            if "data-scorer" in tr.attrs] == ["iou", "clip"]
    steer_rows = section(doc, 12).find("table", **{"class": "steering"}).find("tbody").find_all("tr")
    assert [r.find_all("td")[3].text() for r in steer_rows] == ["a red square x2.0", "a red square x8.0"]
    assert not section(doc, 20).find_all("table", **{"class": "steering"})
    assert "random" in doc.find("section", id="baselines").text()
    assert out.figures["explained_features"] == 2 and out.figures["scored_features"] == 2
    assert out.figures["steered_features"] == 1


def test_one_scorer_gives_a_single_score_column(run_cfg, tmp_path):
    scores = [{"feature": f, "scorer": "iou", "score": f / 100, "details": {}} for f in FEATURES]
    doc, _, _ = render(run_cfg, scores=write_jsonl(tmp_path / "s.jsonl", scores))
    th = doc.find("th", data_key="score")
    assert th.text() == "iou" and not doc.find_all("th", data_key="score-iou")
    assert [float(r.attrs["data-score"]) for r in index_rows(doc)] == [f / 100 for f in DEFAULT_ORDER]


def test_detail_cap_keeps_the_index_complete_and_links_only_detailed_features(run_cfg):
    def detailed(doc):
        return [int(s.attrs["data-feature"]) for s in doc.find_all("section", **{"class": "feature"})]

    run_cfg.report.max_detail_features = 2
    doc, _, out = render(run_cfg)  # default: the mine stage's selection
    assert detailed(doc) == SELECTED
    assert len(index_rows(doc)) == len(FEATURES)
    linked = {int(r.attrs["data-feature"]) for r in index_rows(doc) if r.find_all("a")}
    assert linked == set(SELECTED)
    assert out.figures["features_detailed"] == 2

    run_cfg.report.max_detail_features = 3  # the selection, then the highest max activation (12)
    assert detailed(render(run_cfg)[0]) == [7, 12, 41]
    run_cfg.report.max_detail_features = 2
    run_cfg.report.detail_order = "max_activation"
    assert detailed(render(run_cfg)[0]) == [3, 12]
    run_cfg.report.detail_order = "frequency"
    assert detailed(render(run_cfg)[0]) == [7, 20]


def test_sort_keys_and_script_are_present_and_allowed_by_the_page_policy(run_cfg):
    import hashlib

    doc, _, _ = render(run_cfg)
    ths = {th.attrs["data-key"]: th.attrs["data-type"] for th in doc.find_all("th")}
    assert ths["frequency"] == ths["max-activation"] == ths["feature"] == "number"
    script = doc.find("script").text()
    assert "sortBy" in script and "#sort=" in script
    digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
    csp = doc.find("meta", **{"http_equiv": "Content-Security-Policy"}).attrs["content"]
    assert f"'sha256-{digest}'" in csp and "default-src 'none'" in csp
    # nothing on the page points outside it
    for n in doc.iter():
        for a in ("src", "href"):
            v = n.attrs.get(a)
            assert v is None or v.startswith(("data:", "#")), (n.tag, a, v[:60])


def test_headline_figures_come_from_the_step_summaries(run_cfg):
    layer = run_cfg.cache.layers[0]  # the report's layer: it shows that layer's steps and the run-wide ones
    record_summary(run_cfg.run.workdir, "train", {"heldout_fvu_image": 0.1234567}, layer)
    record_summary(run_cfg.run.workdir, "cache", {"images": 7}, layer + 1)  # another layer's: not shown
    doc, _, out = render(run_cfg)
    cards = {c.attrs["data-step"]: c.text() for c in doc.find("section", id="headline").find_all("div", **{"class": "card"})}
    assert "heldout_fvu_image" in cards["train"] and "0.1235" in cards["train"]
    assert "mined_features" in cards["mine"]  # the mine figures from the artifact's manifest
    assert "cache" not in cards
    summary = read_summaries(run_cfg.run.workdir, layer)["report"]
    assert summary["index"] == out.uris["index"] and summary["features"] == len(FEATURES)
    doc, _, _ = render(run_cfg)  # a second report does not list the first as a headline step
    assert "report" not in {c.attrs["data-step"] for c in doc.find_all("div", **{"class": "card"})}


def test_report_folder_is_a_sealed_artifact(run_cfg):
    _, html, out = render(run_cfg)
    manifest = storage.verify_artifact(out.uri, kind="report")
    assert list(manifest.files) == ["index.html"]
    assert manifest.inputs["top_examples"] == str(Path(run_cfg.run.workdir) / "mine")
    assert html.startswith("<!DOCTYPE html>")


def test_ground_truth_of_planted_concepts_is_shown_with_links(tmp_path, run_cfg):
    gt = {"matches": [{"concept": "color:red", "kind": "color", "feature": 12, "precision": 0.9, "iou": 0.61,
                       "f1_feature": 7, "f1": 0.8},
                      {"concept": "texture:<b>striped</b>", "kind": "texture", "feature": None, "precision": 0.0,
                       "iou": None}],
          "figures": {"gt_topk_precision": 0.45}}
    uri = make_top_examples(str(tmp_path / "gt"), ground_truth=gt)
    doc, html, _ = render(run_cfg, top_examples=uri)
    tables = {t.attrs["data-table"]: t for t in doc.find("section", id="ground-truth").find_all("table")}
    rows = tables["matches"].find("tbody").find_all("tr")
    assert [a.attrs["href"] for a in rows[0].find_all("a")] == ["#f-000012", "#f-000007"]
    assert "color:red" in rows[0].text()
    assert "texture:<b>striped</b>" in rows[1].text() and "<b>striped" not in html
    assert "0.45" in tables["figures"].text()
    doc, _, _ = render(run_cfg)  # no ground truth in the artifact: no section
    assert not doc.find_all("section", id="ground-truth")


def test_a_corrupted_heatmap_is_refused_naming_the_file(tmp_path, run_cfg):
    uri = make_top_examples(str(tmp_path / "bad"))
    png = Path(uri) / "heatmaps" / "f000007" / "overlay-01-701.png"
    png.write_bytes(png.read_bytes()[:-4])
    with pytest.raises(storage.ChecksumError, match="overlay-01-701.png"):
        report.run(run_cfg, top_examples=uri)


def test_missing_or_wrong_top_examples_are_refused_naming_the_uri(run_cfg, tmp_path):
    with pytest.raises(report.ReportError, match="nowhere"):
        report.run(run_cfg, top_examples=str(tmp_path / "nowhere"))
    storage.write_manifest(str(tmp_path / "sae"), "sae", files=[])
    with pytest.raises(report.ReportError, match="top_examples"):
        report.run(run_cfg, top_examples=str(tmp_path / "sae"))


def test_jsonl_inputs_from_artifact_folders_and_bad_lines(tmp_path):
    folder = tmp_path / "explain"
    folder.mkdir()
    write_jsonl(folder / "explanations.jsonl", explanations_for([3]))
    write_jsonl(folder / "prompts.jsonl", [{"x": 1}])
    storage.write_manifest(str(folder), "explanations")
    assert report.read_jsonl(str(folder), "explanations")[0]["feature"] == 3
    (folder / "explanations.jsonl").write_text("{}\n")  # no longer matches its checksum
    with pytest.raises(storage.ChecksumError, match="explanations.jsonl"):
        report.read_jsonl(str(folder), "explanations")

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"feature": 1}\nnot json\n')
    with pytest.raises(report.ReportError, match="line 2"):
        report.read_jsonl(str(bad), "scores")
    with pytest.raises(report.ReportError, match="does not exist"):
        report.read_jsonl(str(tmp_path / "none.jsonl"), "scores")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(report.ReportError, match="no .jsonl"):
        report.read_jsonl(str(empty), "steering")


def test_report_config_rejects_unknown_styles():
    with pytest.raises(ValueError, match="heatmap"):
        ReportConfig(heatmap="sepia")


def test_run_logs_the_page_to_mlflow(run_cfg, tmp_path):
    from mlflow import MlflowClient

    run_cfg.tracking.enabled = True
    run_cfg.tracking.uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = report.run(run_cfg)
    client = MlflowClient(tracking_uri=run_cfg.tracking.uri)
    (run,) = client.search_runs([client.get_experiment_by_name("mmsae").experiment_id])
    assert [a.path for a in client.list_artifacts(run.info.run_id, "report")] == ["report/index.html"]
    assert run.data.metrics["features"] == len(FEATURES)
    assert run.data.tags["mmsae.report"] == out.uris["index"]


def test_component_copies_the_page_into_its_html_artifact(run_cfg, tmp_path):
    from kfp.dsl import HTML, Dataset, Metrics

    from mmsae.components.report import report as component
    from mmsae.config import dump_config

    top = Dataset(name="top_examples", uri="", metadata={"uri": str(Path(run_cfg.run.workdir) / "mine")})
    expl = Dataset(name="explanations", uri="", metadata={
        "uri": write_jsonl(tmp_path / "e.jsonl", explanations_for([7]))})
    page = HTML(name="report", uri=str(tmp_path / "report.html"))
    page.path = str(tmp_path / "report.html")
    metrics = Metrics(name="metrics", uri=str(tmp_path / "metrics"))
    logged = {}
    metrics.log_metric = lambda k, v: logged.__setitem__(k, v)
    component.python_func(config_yaml=dump_config(run_cfg), parent_run_id="", top_examples=top,
                          report=page, metrics=metrics, explanations=expl)
    html = Path(page.path).read_text()
    assert "things of kind 7" in html and page.metadata["uri"].endswith("index.html")
    assert logged["features"] == len(FEATURES) and logged["explained_features"] == 1


def test_component_runs_under_kfp_local_without_the_optional_inputs(run_cfg, tmp_path):
    from kfp import dsl, local
    from kfp.dsl import Dataset

    from mmsae.components.report import report as component
    from mmsae.config import dump_config

    mine = str(Path(run_cfg.run.workdir) / "mine")
    ptr = tmp_path / "top.json"
    ptr.write_text(json.dumps({"uri": mine}))
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "root"))

    @dsl.pipeline(name="report-only")
    def pipe(config_yaml: str):
        top = dsl.importer(artifact_uri=str(ptr), artifact_class=Dataset, metadata={"uri": mine})
        component(config_yaml=config_yaml, parent_run_id="", top_examples=top.output)

    pipe(config_yaml=dump_config(run_cfg))
    (page,) = [p for p in (tmp_path / "root").rglob("report") if p.is_file()]
    doc = parse(page.read_text())
    assert [int(r.attrs["data-feature"]) for r in index_rows(doc)] == DEFAULT_ORDER


@pytest.mark.services
def test_report_reads_and_writes_s3(s3_env, run_cfg, tmp_path):
    run_cfg.run.workdir = f"{s3_env}/work"
    top = make_top_examples(f"{s3_env}/mine")
    expl = f"{s3_env}/explain/explanations.jsonl"
    storage.write_text(expl, "".join(json.dumps(e) + "\n" for e in explanations_for([20])))
    out = report.run(run_cfg, top_examples=top, explanations=expl)
    assert out.uris["index"] == f"{s3_env}/work/report/index.html"
    doc = parse(storage.read_text(out.uris["index"]))
    assert data_images(section(doc, 20)) == [heatmap_png(20, 0, "overlay")]
    assert section(doc, 20).find("span", **{"class": "text"}).text() == "things of kind 20"
    storage.verify_artifact(out.uri, kind="report")
    assert read_summaries(f"{s3_env}/work", run_cfg.cache.layers[0])["report"]["index"] == out.uris["index"]


# ---------------------------------------------------------------------------------------------------
# thumbnails, headline figures, the index's order and search, histograms and logit tokens


def photo_png(width: int, height: int, seed: int) -> bytes:
    """A photograph-like PNG (smooth colour fields, blurred shapes, sensor noise), as the mine stage writes."""
    from PIL import ImageDraw, ImageFilter

    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (5, 7, 3), dtype=np.uint8))
    img = coarse.resize((width, height), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(6):
        x, y = rng.integers(0, width), rng.integers(0, height)
        r = int(rng.integers(width // 12 + 1, width // 4 + 2))
        draw.ellipse((x - r, y - r, x + r, y + r), fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    img = img.filter(ImageFilter.GaussianBlur(2))
    noisy = np.asarray(img, np.float32) + rng.normal(0, 6, (height, width, 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def decoded(src: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))


def test_photo_heatmaps_are_embedded_as_small_thumbnails_and_keep_their_aspect(run_cfg, tmp_path):
    sizes = {3: (1000, 872), 7: (200, 1400)}
    features = {f: v for f, v in FEATURES.items() if f in sizes}
    pngs = {(f, r): photo_png(*sizes[f], seed=10 * f + r) for f in sizes for r in range(features[f][4])}
    uri = make_top_examples(str(tmp_path / "photos"), features=features,
                            heatmap=lambda f, rank, kind: pngs[(f, rank)])
    doc, html, out = render(run_cfg, top_examples=uri)
    for f, (w, h) in sizes.items():
        for img in section(doc, f).find_all("img"):
            shown = (int(img.attrs["width"]), int(img.attrs["height"]))
            assert max(shown) == 160 and abs(shown[0] / shown[1] - w / h) < 0.02  # in a 160 px box, aspect kept
            pixels = decoded(img.attrs["src"]).size
            assert max(pixels) == 320 and abs(pixels[0] / pixels[1] - w / h) < 0.02  # twice that, for HiDPI
            assert img.attrs["src"].startswith("data:image/jpeg;")  # the smaller encoding of a photograph
            assert "upscaled" not in img.attrs.get("class", "")
    stored = sum(len(p) for p in pngs.values())
    assert len(html) < stored / 20
    assert out.figures["bytes_per_detailed_feature"] == pytest.approx(len(html.encode()) / 2)
    assert out.figures["bytes_per_detailed_feature"] < 120_000


def test_small_flat_heatmaps_are_embedded_as_stored_and_scaled_up_without_smoothing(run_cfg):
    doc, _, _ = render(run_cfg)
    img = section(doc, 3).find("img")
    assert decoded(img.attrs["src"]).size == (12, 12) and img.attrs["class"] == "upscaled"
    assert (img.attrs["width"], img.attrs["height"]) == ("160", "160")


MINE_FIGURES = {"features_mined": 5, "dead_pct": 20.0, "peak_state_mib": 1.5, "mystery_figure": 7,
                "gt_topk_precision": 0.45, "gt_topk_precision_random": 0.12, "gt_f1": 0.6, "gt_f1_always_fires": 0.3,
                "gt_f1_texture": 0.5}


def test_headline_figures_have_labels_units_meanings_and_baselines_once(run_cfg, tmp_path):
    storage.write_json(storage.join(run_cfg.run.workdir, "summary", "train.json"),
                       {"heldout_fvu_image": 0.1234567, "dead_pct": 2.5, "k4-m64/layers.1/heldout_fvu_all": 0.2})
    storage.write_json(storage.join(run_cfg.run.workdir, "summary", "cache.json"), {"bytes_written": 3 * 2**20})
    gt = {"concepts": [{"concept": "color:red", "kind": "color", "feature": 12, "precision": 0.9, "f1_feature": 7}],
          "figures": {k: v for k, v in MINE_FIGURES.items() if k.startswith("gt_")}}
    uri = make_top_examples(str(tmp_path / "gt"), ground_truth=gt, figures=MINE_FIGURES)
    doc, html, _ = render(run_cfg, top_examples=uri)
    cards = doc.find("section", id="headline").find_all("div", **{"class": "card"})
    assert [c.attrs["data-step"] for c in cards] == ["cache", "train", "mine", "ground-truth"]  # pipeline order
    rows = {tr.attrs["data-key"]: tr for c in cards for tr in c.find_all("tr")}
    assert rows["heldout_fvu_image"].find("span", **{"class": "label"}).text() == "held-out FVU, image tokens"
    assert "unexplained" in rows["heldout_fvu_image"].find("span", **{"class": "meaning"}).text()
    assert "held-out FVU, all tokens (k4-m64/layers.1)" in rows["k4-m64/layers.1/heldout_fvu_all"].text()
    train_dead = cards[1].find("tr", data_key="dead_pct")
    mine_dead = cards[2].find("tr", data_key="dead_pct")
    assert "dead latents" in train_dead.text() and "features that never fire" in mine_dead.text()
    assert mine_dead.find("td", **{"class": "num value"}).text() == "20 %"
    assert cards[0].find("tr", data_key="bytes_written").find("td", **{"class": "num value"}).text() == "3 MiB"
    assert cards[2].find("tr", data_key="peak_state_mib").find("td", **{"class": "num value"}).text() == "1.5 MiB"
    # unknown figures are shown under their raw key
    assert rows["mystery_figure"].attrs["class"] == "unknown" and "mystery_figure" in rows["mystery_figure"].text()
    # baselines beside the figures they qualify, not as figures of their own; ground truth on its card
    precision = cards[3].find("tr", data_key="gt_topk_precision")
    assert "0.45" in precision.text() and "random: 0.12" in precision.find("td", **{"class": "num baseline"}).text()
    assert "always fires: 0.3" in cards[3].find("tr", data_key="gt_f1").text()
    assert "gt_topk_precision_random" not in rows and "gt_f1_always_fires" not in rows
    assert rows["gt_f1_texture"].find("span", **{"class": "label"}).text() == "detection F1, texture"
    # shown once: the ground-truth section does not repeat the figures of the headline
    tables = [t.attrs["data-table"] for t in doc.find("section", id="ground-truth").find_all("table")]
    assert tables == ["concepts"]
    assert html.count(">0.45<") == 1
    headers = [th.text() for th in doc.find("table", data_table="concepts").find_all("th")]
    assert headers[:3] == ["concept", "kind", "best feature"] and "detector feature" in headers


def test_index_opens_sorted_by_image_frequency_with_never_firing_features_last(run_cfg, tmp_path):
    features = {**FEATURES, 50: (0.0, 0.0, 0.0, 0.0, 0), 2: (0.0, 0.0, 0.0, 0.0, 0)}
    uri = make_top_examples(str(tmp_path / "dead"), features=features)
    doc, _, _ = render(run_cfg, top_examples=uri)
    order = [int(r.attrs["data-feature"]) for r in index_rows(doc)]
    assert order == DEFAULT_ORDER + [2, 50]
    table = doc.find("table", id="feature-index")
    assert table.attrs["data-sorted-by"] == "-image-frequency"
    assert table.find("th", data_key="image-frequency").attrs["aria-sort"] == "descending"
    assert doc.find("input", id="feature-search").attrs["type"] == "search"


TOKENS = {"promoted": [{"token": " red", "logit": 2.5}, {"token": "<b>crimson</b>", "logit": 1.25}],
          "suppressed": [{"token": " blue", "logit": -3.0}]}


def test_histograms_and_logit_tokens_are_shown_and_searchable(run_cfg, tmp_path):
    fields = {3: {"histogram": [0, 5, 100, 20, 0, 1] + [0] * 26, "histogram_upper": 8.0, **TOKENS},
              7: {"histogram": [0] * 32, "histogram_upper": 0.0, "promoted": [], "suppressed": []}}
    uri = make_top_examples(str(tmp_path / "v2"), fields=fields, format_version=2)
    doc, html, _ = render(run_cfg, top_examples=uri)
    sec = section(doc, 3)
    bars = sec.find("figure", **{"class": "histogram"}).find_all("rect")
    assert len(bars) == 6  # up to the last non-empty bin, of width 8 / 32
    heights = [float(b.attrs["height"]) for b in bars]
    assert heights[0] == 0 and heights[2] == max(heights) == 48 and 0 < heights[5] < heights[1] < heights[3]
    assert bars[2].find("title").text() == "0.5 to 0.75: 100 tokens"
    assert "126 tokens" in sec.find("figure", **{"class": "histogram"}).text()
    assert "1.5" in sec.find("figure", **{"class": "histogram"}).find("figcaption").text()
    promoted = [t.text() for t in sec.find("p", data_tokens="promoted").find_all("span", **{"class": "tok up"})]
    assert promoted == [" red", "<b>crimson</b>"] and "<b>crimson" not in html  # escaped, spaces kept
    assert [t.text() for t in sec.find("p", data_tokens="suppressed").find_all("span")][1:] == [" blue"]
    assert not section(doc, 7).find_all("figure", **{"class": "histogram"})
    rows = {int(r.attrs["data-feature"]): r for r in index_rows(doc)}
    assert [t.text() for t in rows[3].find("td", **{"class": "tokens"}).find_all("span")] == [" red", "<b>crimson</b>"]
    assert "crimson" in rows[3].attrs["data-search"] and "blue" not in rows[3].attrs["data-search"]
    assert "promotes" in [th.attrs["data-key"] for th in doc.find_all("th")]


def test_scores_are_shown_beside_their_random_baseline(run_cfg, tmp_path):
    scores = [{"feature": 3, "scorer": "iou", "score": 0.8}, {"feature": None, "scorer": "iou", "score": 0.05}]
    doc, _, _ = render(run_cfg, scores=write_jsonl(tmp_path / "s.jsonl", scores))
    row = section(doc, 3).find("table", **{"class": "scores"}).find("tr", data_scorer="iou")
    assert row.find("td", **{"class": "num baseline"}).text() == "0.05"
    assert doc.find("th", data_key="score").attrs["title"] == "random baseline: 0.05"
