"""The explain stage and its explainers: the OpenAI-compatible client against a scripted loopback server
(faults, retries, the response cache, clear errors, the API key kept out of every file), the in-process
backend on the toy world's images, the reuse rule, the component, the command and the pipeline step."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import socket
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from mmsae import storage
from mmsae.config import ExplainConfig, RunConfig, dump_config
from mmsae.explainers import CachedExplainer, EndpointError, ExplainError, plan_explainer
from mmsae.explainers.cache import question_key
from mmsae.explainers.local import LocalExplainer, concept_words, shared_words
from mmsae.explainers.loopback import LoopbackServer, Question, Reply, fixed_reply
from mmsae.explainers.prompts import parse_detection, parse_explanation, parse_template
from mmsae.stages import explain
from mmsae.stages._base import OutputMismatchError, StageOutputs

MODEL = "toy-explainer"

# ---------------------------------------------------------------------------------------------------
# a top-examples artifact whose masked images say which feature they belong to


def feature_png(feature: int, rank: int, size: tuple[int, int] = (12, 8)) -> bytes:
    """A flat image whose red level is 10 x feature (read back by `feature_of`, even after resizing)."""
    buf = io.BytesIO()
    Image.new("RGB", size, (10 * feature, 20 * rank, 77)).save(buf, format="PNG")
    return buf.getvalue()


def feature_of(question: Question) -> int:
    with Image.open(io.BytesIO(question.images[0])) as img:
        return round(img.convert("RGB").getpixel((0, 0))[0] / 10)


def write_top_examples(uri: str, masked: dict[int, list[bytes]], silent: tuple[int, ...] = (),
                       hookpoint: str = "layers.1", shards: str = "shards-uri") -> str:
    """A top-examples artifact: each feature of ``masked`` with those masked heat maps (image_idx
    100 f + rank), each of ``silent`` without any top image; all of them selected."""
    lines, names, sizes = [], [], {}
    for feature in sorted([*masked, *silent]):
        pngs = masked.get(feature, [])
        top = [{"image_idx": 100 * feature + rank, "score": 5.0 - rank} for rank in range(len(pngs))]
        lines.append(json.dumps({"feature": feature, "frequency": 0.01 * bool(pngs), "image_frequency": 0.1,
                                 "max_activation": 5.0 * bool(pngs), "mean_activation": 1.0, "top": top,
                                 "quantiles": [], "negatives": []}))
        for rank, png in enumerate(pngs):
            name = f"heatmaps/f{feature:06d}/masked-{rank:02d}-{100 * feature + rank}.png"
            storage.write_bytes(storage.join(uri, name), png)
            names.append(name)
            sizes[str(100 * feature + rank)] = {"width": 12, "height": 8}
    storage.write_text(storage.join(uri, "features.jsonl"), "\n".join(lines) + "\n")
    storage.write_json(storage.join(uri, "images.json"), sizes)
    storage.write_manifest(uri, "top_examples", files=[*names, "features.jsonl", "images.json"],
                           format_version=2,
                           inputs={"sae": "sae-uri", "shards": shards, "image_set": "images-uri"},
                           extra={"hookpoint": hookpoint, "features": sorted([*masked, *silent]),
                                  "selected": sorted([*masked, *silent]), "figures": {}})
    return uri


def flat_top_examples(uri: str, features: range | list[int], silent: tuple[int, ...] = (),
                      images: int = 3) -> str:
    return write_top_examples(uri, {f: [feature_png(f, r) for r in range(images)] for f in features}, silent)


def config(tmp_path: Path, server_url: str = "", **explain_settings) -> RunConfig:
    cfg = RunConfig()
    cfg.run.workdir = str(tmp_path / "work")
    cfg.tracking.enabled = False
    settings = {"backend": "openai", "endpoint": server_url, "model": MODEL, "concurrency": 4,
                "timeout_s": 5.0, "max_retries": 3, "image_long_side": None, **explain_settings}
    cfg.explain = ExplainConfig(**settings)
    return cfg


def records(out: StageOutputs) -> dict[int, dict]:
    lines = Path(out.uri, explain.RECORDS_FILE).read_text().splitlines()
    return {r["feature"]: r for r in map(json.loads, lines)}


@pytest.fixture(autouse=True)
def no_openai_environment(monkeypatch):
    for name in ("OPENAI_BASE_URL", "OPENAI_API_KEY"):
        monkeypatch.delenv(name, raising=False)


# ---------------------------------------------------------------------------------------------------
# prompts and parsing


def test_replies_are_parsed_after_the_last_marker_and_unable_is_an_outcome():
    assert parse_explanation("Thinking... [EXPLANATION]: x\n[EXPLANATION]:  red  striped\n squares ") == \
        ("ok", "red striped squares")
    assert parse_explanation("[explanation]: Unable to produce descriptions") == ("unable", None)
    assert parse_explanation('[EXPLANATION]: "unable to tell."') == ("unable", None)
    assert parse_explanation("These look red.") == ("failed", None)
    assert parse_explanation("[EXPLANATION]:   ") == ("failed", None)
    assert parse_explanation(None) == ("failed", None)
    assert parse_detection("a\n[ANSWER]: 1, 0,1", 3) == [True, False, True]
    assert parse_detection("[ANSWER]: 1 0 1.", 3) == [True, False, True]
    assert parse_detection("[ANSWER]: 1,0", 3) is None
    assert parse_detection("[ANSWER]: yes, no, yes", 3) is None


def test_template_sections_placeholders_and_errors():
    text = "# comment {x}\n[SYSTEM]\nYou {role}.\n[USER]\nSee {n_images} images {x}\n"
    template = parse_template(text, "t.txt")
    assert template.render(n_images=3, role="judge", x="{y}") == ("You judge.", "See 3 images {y}")
    with pytest.raises(ExplainError, match=r"uses \{role\}"):
        template.render(n_images=3, x=1)
    with pytest.raises(ExplainError, match="no \\[USER\\] section"):
        parse_template("[SYSTEM]\nhello\n", "t.txt")
    assert parse_template("[USER]\na\n", "a").digest != parse_template("[USER]\nb\n", "b").digest


def test_backend_auto_follows_the_endpoint(tmp_path, monkeypatch):
    cfg = ExplainConfig(model=MODEL)
    with pytest.raises(ExplainError, match="local explainer's checkpoint .* does not exist"):
        plan_explainer(cfg, default_model=lambda: str(tmp_path / "no-model"))
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9/v1")
    plan = plan_explainer(cfg, default_model=lambda: "")
    assert (plan.backend, plan.settings.endpoint) == ("openai", "http://127.0.0.1:9/v1")
    with pytest.raises(ExplainError, match="explain.model is empty"):
        plan_explainer(ExplainConfig(), default_model=lambda: "")
    assert "api_key" not in " ".join(ExplainConfig.model_fields)


# ---------------------------------------------------------------------------------------------------
# the OpenAI-compatible backend through the stage

OK_FEATURES = range(0, 10)
UNABLE_FEATURES = range(10, 14)
NO_MARKER, EMPTY, NOT_JSON = (14, 15), 16, 17
SILENT = (18, 19)
STALL_S = 10.0


def faulty(question: Question) -> Reply:
    """Faults on the first attempts of some features, then the feature's reply."""
    feature, attempt = feature_of(question), question.attempt
    if feature == 1 and attempt == 1:
        return Reply(status=429, message="slow down", headers={"Retry-After": "1.5"})
    if feature == 2 and attempt <= 2:
        return Reply(status=429, message="slow down", headers={"Retry-After": "0.05"})
    if feature == 3 and attempt == 1:
        return Reply(status=500, message="boom")
    if feature == 4 and attempt == 1:
        return Reply(f"[EXPLANATION]: too late {feature}", delay_s=STALL_S)
    if feature in OK_FEATURES:
        return Reply(f"The highlighted regions show one thing.\n[EXPLANATION]: things of kind {feature}")
    if feature in UNABLE_FEATURES:
        return Reply("[EXPLANATION]: Unable to produce descriptions")
    if feature in NO_MARKER:
        return Reply("These look red to me.")
    if feature == EMPTY:
        return Reply("[EXPLANATION]:")
    return Reply(raw=b"<html>bad gateway</html>")


def test_faults_are_retried_and_the_counts_are_exact_and_a_rerun_asks_only_what_is_unanswered(tmp_path):
    flat_top_examples(str(tmp_path / "work" / "mine"), range(18), silent=SILENT)
    with LoopbackServer(faulty) as server:
        cfg = config(tmp_path, server.base_url, timeout_s=2.0)
        out = explain.run(cfg)
        figures = out.figures
        counted = ("features", "ok", "unable", "failed", "no_examples", "requests", "cached")
        assert {k: figures[k] for k in counted} == {"features": 20, "ok": 10, "unable": 4, "failed": 4,
                                                   "no_examples": 2, "requests": 18, "cached": 0}
        attempts = {f: server.count(lambda q, f=f: feature_of(q) == f) for f in range(20)}
        assert attempts == {**dict.fromkeys(range(18), 1), 1: 2, 2: 3, 3: 2, 4: 2, 18: 0, 19: 0}
        first, second = [q.time for q in server.questions if feature_of(q) == 1]
        assert second - first >= 1.4  # Retry-After honoured (the SDK's own first backoff is at most 0.5 s)
        assert all(len(q.images) == 3 and q.model == MODEL and "3 images" in q.text for q in server.questions)

        got = records(out)
        assert list(got) == list(range(20))
        assert got[5]["explanation"] == "things of kind 5" and got[5]["status"] == "ok"
        assert got[5]["images"] == [500, 501, 502] and got[5]["prompt_tokens"] > 0
        assert got[4]["explanation"] == "things of kind 4"  # the stalled attempt timed out and was retried
        assert got[11] == {**got[11], "status": "unable", "explanation": None}
        assert got[14]["status"] == "failed" and got[14]["raw_reply"] == "These look red to me."
        assert got[NOT_JSON]["raw_reply"] == "<html>bad gateway</html>"
        assert got[NOT_JSON]["error"].startswith("the reply is not a chat completion")
        assert got[18] == {**got[18], "status": "no_examples", "raw_reply": None, "cached": False}
        assert {r["explainer_model"] for r in got.values()} == {MODEL}
        paper = json.loads(Path(out.uri, explain.PAPER_FILE).read_text())
        assert len(paper) == 18 and paper[5] == {"layers.1_feature5": "things of kind 5"}
        assert paper[10] == {"layers.1_feature10": "Unable to produce descriptions"}
        assert storage.read_manifest(out.uri, kind="explanations").extra["explainer_model"] == MODEL

        before = len(server.questions)
        assert explain.run(cfg).figures == figures  # sealed: reused, nothing asked
        assert len(server.questions) == before

        cfg.explain.out = str(tmp_path / "again")  # a new output: everything answered comes from the cache
        again = explain.run(cfg)
        asked = [feature_of(q) for q in server.questions[before:]]
        assert asked == [NOT_JSON]  # the one request that got no reply
        assert (again.figures["cached"], again.figures["requests"]) == (17, 1)
        assert sum(r["cached"] for r in records(again).values()) == 17
        assert {f: r["explanation"] for f, r in records(again).items()} == \
            {f: r["explanation"] for f, r in got.items()}


def test_a_killed_run_resumes_from_the_cache(tmp_path):
    flat_top_examples(str(tmp_path / "work" / "mine"), range(12))
    down = {"from": 6}

    def failing(question: Question) -> Reply:
        if feature_of(question) >= down["from"]:
            return Reply(status=503, message="overloaded")
        return Reply(f"[EXPLANATION]: kind {feature_of(question)}")

    with LoopbackServer(failing) as server:
        cfg = config(tmp_path, server.base_url, max_retries=1, concurrency=2)
        message = rf"endpoint {server.base_url} kept failing after 1 retries \(503: overloaded\)"
        with pytest.raises(EndpointError, match=message):
            explain.run(cfg)
        assert not storage.exists(storage.join(cfg.run.workdir, "explain", "manifest.json"))
        answered = {feature_of(q) for q in server.questions if feature_of(q) < 6}
        assert answered
        before = len(server.questions)
        down["from"] = 99
        out = explain.run(cfg)
        asked = sorted(feature_of(q) for q in server.questions[before:])
    assert asked == sorted(set(range(12)) - answered)
    assert out.figures["ok"] == 12 and out.figures["cached"] == len(answered)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unreachable_endpoint_is_one_error_naming_it(tmp_path):
    flat_top_examples(str(tmp_path / "work" / "mine"), range(8))
    url = f"http://127.0.0.1:{free_port()}/v1"
    with pytest.raises(EndpointError) as err:
        explain.run(config(tmp_path, url, max_retries=1))
    assert str(err.value).startswith(f"cannot reach the explainer endpoint {url} after 1 retries")
    assert not list(Path(tmp_path / "work").glob("explain-cache/**/*.json"))

    settings = [f"run.workdir={tmp_path / 'work'}", "tracking.enabled=false", "explain.backend=openai",
                f"explain.endpoint={url}", f"explain.model={MODEL}", "explain.max_retries=0"]
    result = CliRunner().invoke(_cli_app(), ["explain", *[arg for s in settings for arg in ("--set", s)]])
    assert result.exit_code == 1
    assert f"error: cannot reach the explainer endpoint {url}" in result.output
    assert "Traceback" not in result.output


def _cli_app():
    from mmsae.cli import app

    return app


@pytest.mark.parametrize(("model", "reply", "message"), [
    ("no-such-model", None, r"no model 'no-such-model' \(404: The model `no-such-model` does not exist.\)"),
    (MODEL, Reply(status=400, message="toy-explainer is not a multimodal model"), "refused the images"),
    (MODEL, Reply(status=401, message="invalid key"), r"refused the request \(401: invalid key\): the API"),
], ids=["wrong-model", "no-images", "bad-key"])
def test_a_request_no_feature_can_pass_stops_after_the_first_call(model, reply, message, tmp_path):
    flat_top_examples(str(tmp_path / "work" / "mine"), range(10))
    with LoopbackServer(lambda q: reply or Reply("[EXPLANATION]: x")) as server:
        with pytest.raises(EndpointError, match=message):
            explain.run(config(tmp_path, server.base_url, model=model))
        assert server.count() == 1


def test_the_api_key_is_sent_but_never_written_or_logged(tmp_path, monkeypatch, caplog):
    secret = "sk-mmsae-test-4f9c2b7d1e"
    monkeypatch.setenv("OPENAI_API_KEY", secret)
    flat_top_examples(str(tmp_path / "work" / "mine"), range(4))
    with LoopbackServer(fixed_reply("[EXPLANATION]: red")) as server, caplog.at_level(logging.DEBUG):
        cfg = config(tmp_path, server.base_url)
        cfg.tracking.enabled = True
        cfg.tracking.uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
        monkeypatch.chdir(tmp_path)
        explain.run(cfg)
        assert {q.authorization for q in server.questions} == {f"Bearer {secret}"}
    assert secret not in caplog.text and secret not in dump_config(cfg)
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert {"mlflow.db", explain.RECORDS_FILE} <= {p.name for p in written}
    assert [p for p in written if secret.encode() in p.read_bytes()] == []


@pytest.mark.services
def test_explaining_from_and_into_s3_with_the_cache_there(tmp_path, s3_env):
    flat_top_examples(f"{s3_env}/mine", range(4), silent=(9,))
    with LoopbackServer(fixed_reply()) as server:
        cfg = config(tmp_path, server.base_url)
        cfg.run.workdir = s3_env
        first = explain.run(cfg)
        assert first.uri == f"{s3_env}/explain" and first.figures["ok"] == 4
        assert len([n for n in storage.list_files(f"{s3_env}/explain-cache") if n.endswith(".json")]) == 4
        cfg.explain.out = f"{s3_env}/again"
        again = explain.run(cfg)
        assert server.count() == 4 and again.figures["cached"] == 4
    lines = storage.read_text(f"{s3_env}/again/{explain.RECORDS_FILE}").splitlines()
    assert [json.loads(line)["status"] for line in lines] == ["ok"] * 4 + ["no_examples"]


def test_images_are_sent_as_png_resized_to_the_long_side(tmp_path):
    flat_top_examples(str(tmp_path / "work" / "mine"), range(2))
    with LoopbackServer(fixed_reply()) as server:
        explain.run(config(tmp_path, server.base_url, image_long_side=36, max_images=2))
        sizes = {Image.open(io.BytesIO(png)).size for q in server.questions for png in q.images}
        formats = {Image.open(io.BytesIO(png)).format for q in server.questions for png in q.images}
    assert sizes == {(36, 24)} and formats == {"PNG"}
    assert [feature_of(q) for q in sorted(server.questions, key=feature_of)] == [0, 1]


def test_detection_is_parsed_per_image_and_cached(tmp_path):
    def judge(question: Question) -> Reply:
        assert 'described as: "things of kind 1"' in question.text
        return Reply("[ANSWER]: 1,0" if len(question.images) == 2 else "[ANSWER]: 1")

    async def ask(url: str):
        plan = plan_explainer(config(tmp_path, url).explain, default_model=lambda: "")
        explainer = CachedExplainer(plan.open(), str(tmp_path / "cache"))
        try:
            first = await explainer.detect("things of kind 1", [feature_png(1, 0), feature_png(2, 0)])
            again = await explainer.detect("things of kind 1", [feature_png(1, 0), feature_png(2, 0)])
            wrong = await explainer.detect("things of kind 1", [feature_png(1, 0)] * 3)
        finally:
            await explainer.aclose()
        return first, again, wrong

    with LoopbackServer(judge) as server:
        first, again, wrong = asyncio.run(ask(server.base_url))
        assert server.count() == 2
    assert (first.status, first.matches, first.cached) == ("ok", [True, False], False)
    assert (again.matches, again.cached) == ([True, False], True)
    assert (wrong.status, wrong.matches, wrong.raw_reply) == ("failed", None, "[ANSWER]: 1")
    assert question_key("detect", {"a": 1}, [b"x"], "e") != question_key("detect", {"a": 1}, [b"x"], "f")


def test_explanations_of_rewritten_top_examples_are_refused_then_redone_on_overwrite(tmp_path):
    mine = str(tmp_path / "work" / "mine")
    flat_top_examples(mine, range(6))
    with LoopbackServer(fixed_reply()) as server:
        cfg = config(tmp_path, server.base_url)
        assert explain.run(cfg).figures["ok"] == 6
        storage.delete(mine)
        flat_top_examples(mine, range(4))
        with pytest.raises(OutputMismatchError, match="input top_examples was rewritten or replaced"):
            explain.run(cfg)
        template = tmp_path / "prompt.txt"
        template.write_text("[USER]\nWhat do these {n_images} share?\n")
        cfg.explain.prompt_template = str(template)
        with pytest.raises(OutputMismatchError, match="setting prompt_template"):
            explain.run(cfg)
        cfg.run.overwrite = True
        redone = explain.run(cfg)
        assert server.questions[-1].text == "What do these 3 share?"
    assert (redone.figures["ok"], redone.figures["features"]) == (4, 4)
    assert list(records(redone)) == [0, 1, 2, 3]


def test_a_fired_feature_without_masked_heat_maps_is_an_error_before_any_call(tmp_path):
    write_top_examples(str(tmp_path / "work" / "mine"), {0: [feature_png(0, 0)]})
    manifest = storage.read_manifest(str(tmp_path / "work" / "mine"))
    storage.write_manifest(str(tmp_path / "work" / "mine"), "top_examples", files=["features.jsonl"],
                           format_version=2, inputs=manifest.inputs, extra=manifest.extra)
    with LoopbackServer(fixed_reply()) as server:
        with pytest.raises(ExplainError, match="no masked heat map of feature 0; run the mine stage with"):
            explain.run(config(tmp_path, server.base_url))
        assert server.count() == 0


# ---------------------------------------------------------------------------------------------------
# the local backend


def test_concept_words_match_whole_words():
    assert concept_words("a small checkered square", ["red", "checkered"]) == ["checkered"]
    assert concept_words("A RED, dotted square", ["red", "dotted", "light blue"]) == ["red", "dotted"]
    assert concept_words("a light  blue thing", ["blue", "light blue"]) == ["blue", "light blue"]
    captions = ["a red solid square", "a red striped square", "a blue solid square", "a red dotted square"]
    assert shared_words(captions, ["red", "blue", "solid", "striped"], 0.5) == ["red"]
    assert shared_words(captions, ["red", "blue", "solid", "striped"], 0.4) == ["red", "solid"]
    assert shared_words([], ["red"], 0.5) == []


def toy_world_features(tmp_path: Path) -> tuple[str, dict[int, str]]:
    """Top examples of one feature per colour concept of a small toy world: the scenes showing that colour,
    masked to it as the mine stage draws a perfect detector's heat map."""
    from mmsae.config import ToyWorldConfig
    from mmsae.data import toyworld

    scenes = toyworld.generate(ToyWorldConfig(n_train=60, seed=3), "train", 60)
    colours = ["red", "green", "blue", "yellow"]
    masked = {}
    for feature, colour in enumerate(colours):
        showing = [s for s in scenes if f"color:{colour}" in s.concepts][:4]
        masked[feature] = [png_of(_masked(s.image, s.mask(f"color:{colour}"))) for s in showing]
    uri = write_top_examples(str(tmp_path / "work" / "mine"), masked, silent=(7,))
    return uri, dict(enumerate(colours))


def _masked(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    return (image * (1 - 0.88 * (1 - mask.astype(np.float32)))[..., None]).astype(np.uint8)


def png_of(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array.astype(np.uint8), "RGB").save(buf, format="PNG")
    return buf.getvalue()


def colour_captions(self, images):
    """A captioner that names the toy colour nearest to the bright pixels of each image (what it sees)."""
    from mmsae.data import toyworld
    from mmsae.explainers.local import _Captions

    names, rgbs = list(toyworld.COLORS), np.array(list(toyworld.COLORS.values()), dtype=np.float32)
    texts = []
    for image in images:
        pixels = np.asarray(image, dtype=np.float32).reshape(-1, 3)
        bright = pixels[pixels.max(axis=1) > 100]
        nearest = np.argmin(((bright[:, None, :] - rgbs[None]) ** 2).sum(-1), axis=1)
        texts.append(f"a small {names[np.bincount(nearest).argmax()]} square" if len(bright) else "")
    return _Captions(texts, [10] * len(images), [4] * len(images))


@pytest.fixture
def tiny_checkpoint(tmp_path_factory) -> str:
    from mmsae.models import save_tiny

    return str(save_tiny("llava_next", tmp_path_factory.mktemp("tiny") / "lmm"))


def test_local_backend_explains_the_toy_concepts_through_the_stage(tmp_path, tiny_checkpoint, monkeypatch):
    top, colours = toy_world_features(tmp_path)
    monkeypatch.setattr(LocalExplainer, "_caption_batch", colour_captions)
    cfg = config(tmp_path, backend="local", model=tiny_checkpoint, batch_size=6, concurrency=4)
    out = explain.run(cfg)
    got = records(out)
    assert {f: got[f]["explanation"] for f in colours} == colours
    assert got[7]["status"] == "no_examples"
    assert got[0]["raw_reply"].splitlines() == ["a small red square"] * 4
    assert out.figures["ok"] == 4 and storage.read_manifest(out.uri).extra["backend"] == "local"
    assert got[0]["explainer_model"] == tiny_checkpoint and got[0]["prompt_hash"]

    cfg.explain.out = str(tmp_path / "again")
    calls = []
    monkeypatch.setattr(LocalExplainer, "_caption_batch", lambda self, images: calls.append(images))
    assert explain.run(cfg).figures["cached"] == 4 and calls == []

    async def judge():
        plan = plan_explainer(cfg.explain, default_model=lambda: "")
        monkeypatch.setattr(LocalExplainer, "_caption_batch", colour_captions)
        explainer = plan.open()
        red, blue = (storage.read_bytes(storage.join(top, f"heatmaps/f{f:06d}/masked-00-{100 * f}.png"))
                     for f in (0, 2))
        try:
            return (await explainer.detect("red things", [red, blue, red]),
                    await explainer.detect("squares", [red]))
        finally:
            await explainer.aclose()

    detection, vague = asyncio.run(judge())
    assert (detection.status, detection.matches) == ("ok", [True, False, True])
    assert vague.status == "failed" and "names none of the concept words" in vague.error


def test_local_backend_captions_with_a_real_checkpoint(tmp_path, tiny_checkpoint):
    flat_top_examples(str(tmp_path / "work" / "mine"), range(3))
    cfg = config(tmp_path, backend="local", model=tiny_checkpoint, max_new_tokens=4, batch_size=4)
    out = explain.run(cfg)
    got = records(out)
    assert {r["status"] for r in got.values()} <= {"ok", "unable"}
    assert out.figures["ok"] + out.figures["unable"] == 3
    assert all(len(r["raw_reply"].split("\n")) == 3 for r in got.values())
    assert all(0 < r["completion_tokens"] <= 3 * 4 and r["prompt_tokens"] > 0 for r in got.values())
