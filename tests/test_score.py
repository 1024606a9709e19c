"""The score stage and its scorers: each scorer on small inputs whose right answer is known (IoU of masks, concept
words, balanced accuracy of a scripted judge, CLIP score and GroundingDINO + SAM as tiny models built from their
configs), the stage end to end on a small toy world with the local explainer, the refusal of mismatched inputs,
the reuse rule, the component and the command."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from mmsae import examples, storage
from mmsae.config import RunConfig, ScoreConfig, ToyWorldConfig
from mmsae.explainers import Detection, EndpointError, Explainer, Explanation
from mmsae.explainers.local import LocalExplainer
from mmsae.scorers import Pair, PairScore, ScoreError, Skipped, Subject, derangement
from mmsae.scorers.detection import DetectionScorer, balanced_accuracy
from mmsae.scorers.iou import IouScorer, Segmenter, activation_mask, mask_iou
from mmsae.scorers.planted import (
    ConceptSegmenter,
    GroundTruthScorer,
    detected_concepts,
    named_concepts,
    shared_concepts,
)
from mmsae.stages import score
from mmsae.stages._base import KEY_FIELD, OutputMismatchError, StageOutputs

# ---------------------------------------------------------------------------------------------------
# IoU, masks and the baseline's pairing


def test_mask_iou_of_identical_disjoint_and_overlapping_masks():
    a = np.zeros((4, 6), bool)
    a[:2, :3] = True
    b = np.zeros((4, 6), bool)
    b[2:, 3:] = True
    half = np.zeros((4, 6), bool)
    half[:2, 1:4] = True  # 4 of a's 6 cells, 6 in all: 4 / 8
    assert mask_iou(a, a.copy()) == 1.0
    assert mask_iou(a, b) == 0.0
    assert mask_iou(a, half) == pytest.approx(4 / 8)
    assert mask_iou(np.zeros((2, 2), bool), np.zeros((2, 2), bool)) == 0.0
    with pytest.raises(ValueError, match="shapes"):
        mask_iou(a, a[:2])


def test_activation_mask_is_cut_at_a_fraction_of_its_own_maximum():
    heat = np.array([[0.0, 1.0], [2.0, 4.0]], np.float32)
    assert activation_mask(heat, 0.5).tolist() == [[False, False], [True, True]]
    assert activation_mask(heat, 0.25).tolist() == [[False, True], [True, True]]
    assert not activation_mask(np.zeros((2, 2), np.float32), 0.5).any()


def test_derangement_is_a_seeded_permutation_without_fixed_points():
    for n in (2, 3, 7, 50):
        for seed in range(20):
            order = derangement(n, seed)
            assert sorted(order) == list(range(n)) and all(order[i] != i for i in range(n))
    assert derangement(50, 1) == derangement(50, 1) != derangement(50, 2)
    assert derangement(1, 0) == derangement(0, 0) == []
    assert derangement(2, 5) == [1, 0]


# ---------------------------------------------------------------------------------------------------
# planted concepts


def test_concepts_are_named_as_whole_words_not_substrings():
    concepts = ["color:red", "texture:checkered", "texture:striped", "color:blue", "size:large"]
    assert named_concepts("checkered squares", concepts) == ["texture:checkered"]
    assert named_concepts("Red-striped things", concepts) == ["color:red", "texture:striped"]
    assert named_concepts("reddish bluetooth stripes", concepts) == []
    assert named_concepts("", concepts) == []


def test_shared_and_detected_concepts():
    concepts_of = {1: ["color:red", "size:large", "texture:solid"], 2: ["color:red", "texture:solid"],
                   3: ["color:red", "color:blue", "texture:solid"]}.__getitem__
    assert shared_concepts([1, 2, 3], concepts_of, ["color", "texture"], 3) == ["color:red", "texture:solid"]
    assert shared_concepts([1, 2, 3], concepts_of, ["color"], 3) == ["color:red"]
    assert shared_concepts([1, 2], concepts_of, ["color"], 3) == []  # too few top images to tell
    truth = {"kinds": ["color"], "concepts": [
        {"concept": "color:red", "kind": "color", "feature": 4, "f1_feature": 9},
        {"concept": "color:blue", "kind": "color", "feature": 4, "f1_feature": None},
        {"concept": "size:large", "kind": "size", "feature": 5, "f1_feature": 5}]}
    assert detected_concepts(truth) == {4: ["color:blue", "color:red"], 9: ["color:red"]}


def square(shape: tuple[int, int], top: int, left: int, side: int) -> np.ndarray:
    mask = np.zeros(shape, bool)
    mask[top:top + side, left:left + side] = True
    return mask


# image 0: a red striped object and a blue striped one; image 1: a red solid object only
MASKS = {(0, "color:red"): square((8, 8), 0, 0, 3), (0, "color:blue"): square((8, 8), 4, 4, 3),
         (0, "texture:striped"): square((8, 8), 0, 0, 3) | square((8, 8), 4, 4, 3),
         (1, "color:red"): square((8, 8), 2, 2, 4), (1, "texture:solid"): square((8, 8), 2, 2, 4)}
CONCEPTS = {0: ["color:blue", "color:red", "texture:striped"], 1: ["color:red", "texture:solid"]}


def planted_segmenter() -> ConceptSegmenter:
    return ConceptSegmenter(sorted({c for cs in CONCEPTS.values() for c in cs}), CONCEPTS.__getitem__,
                            lambda i, c: MASKS[(i, c)], lambda i: (8, 8))


def test_planted_segmentation_joins_within_a_kind_and_intersects_across_kinds():
    segmenter = planted_segmenter()
    red0, red1 = segmenter.segment("red", [0, 1])
    assert (red0 == MASKS[(0, "color:red")]).all() and (red1 == MASKS[(1, "color:red")]).all()
    (either,) = segmenter.segment("red or blue", [0])
    assert (either == MASKS[(0, "color:red")] | MASKS[(0, "color:blue")]).all()
    striped_blue, striped_blue_absent = segmenter.segment("blue striped", [0, 1])
    assert (striped_blue == MASKS[(0, "color:blue")]).all() and not striped_blue_absent.any()
    assert not segmenter.segment("a checkered circle", [0])[0].any()  # names nothing planted: empty
    assert segmenter.label("Red stripes") == {"concepts": ["color:red"]}


def test_iou_scorer_scores_the_mean_over_the_top_images():
    class Fixed(Segmenter):
        backend = "fixed"

        def segment(self, explanation, images):
            return [MASKS[(i, "color:red")] for i in images]

    class Active:
        """Feature 7 fires on image 0's red object exactly, and beside image 1's."""

        threshold = 0.5

        def mask(self, feature, image_idx):
            return {0: MASKS[(0, "color:red")], 1: square((8, 8), 6, 6, 2)}[image_idx]

    scorer = IouScorer(Fixed(), Active(), images=2)
    (result,) = scorer.score([Pair(7, "red", Subject(7, (0, 1, 5)))])
    assert isinstance(result, PairScore)
    assert result.details["ious"] == [1.0, 0.0] and result.score == 0.5 and result.details["images"] == [0, 1]
    assert result.details["activated_pct"] == pytest.approx(100 * (9 + 4) / 2 / 64)
    assert scorer.score([Pair(7, "red", Subject(7, ()))]) == [Skipped("no top images")]


def test_ground_truth_scores_whether_the_planted_concept_is_named():
    concepts_of = {i: (["color:red", "texture:solid"] if i < 3 else ["color:blue"]) for i in range(6)}.__getitem__
    scorer = GroundTruthScorer(concepts_of, ["color", "texture"], {9: ["color:blue"]}, min_images=3)
    red, blue_detector, nothing = Subject(1, (0, 1, 2)), Subject(9, (3, 4)), Subject(2, (0, 3, 4))
    right, also_right, wrong, detector, skipped = scorer.score([
        Pair(1, "solid red squares", red), Pair(1, "Solid.", red), Pair(5, "checkered", red),
        Pair(9, "blue things", blue_detector), Pair(2, "red", nothing)])
    assert (right.score, also_right.score, wrong.score) == (1.0, 1.0, 0.0)
    assert right.details == {"planted": ["color:red", "texture:solid"], "shared": ["color:red", "texture:solid"],
                             "detects": [], "named": ["color:red", "texture:solid"]}
    assert right.groups == ("shared",) and detector.groups == ("detectors",) and detector.score == 1.0
    assert skipped == Skipped("no planted concept")


# ---------------------------------------------------------------------------------------------------
# detection


def test_balanced_accuracy_weighs_both_kinds_equally():
    assert balanced_accuracy([True, True, False, False], [True, True, False, False]) == (1.0, 1.0, 1.0)
    assert balanced_accuracy([True] * 4, [True, False, False, False]) == (0.5, 1.0, 0.0)  # says yes to all: chance
    accuracy, tpr, tnr = balanced_accuracy([True, False, True, False, False], [True, True, True, False, False])
    assert (tpr, tnr) == (pytest.approx(2 / 3), 1.0) and accuracy == pytest.approx(5 / 6)
    with pytest.raises(ValueError):
        balanced_accuracy([True], [True])


class ScriptedJudge(Explainer):
    """Says an image matches when its one byte is in ``yes[explanation]``; records what it was shown."""

    backend = "scripted"
    model = "judge"
    prompt_hash = detect_prompt_hash = "h"

    def __init__(self, yes: dict[str, set[int]], fail: str | None = None, down: bool = False):
        self.yes, self.fail, self.down = yes, fail, down
        self.shown: list[tuple[str, list[int]]] = []
        self.closed = False

    def identity(self):
        return {"backend": self.backend}

    async def explain(self, images):
        return Explanation("unable")

    async def detect(self, explanation, images):
        await asyncio.sleep(0)
        if self.down:
            raise EndpointError("the endpoint is down")
        self.shown.append((explanation, [png[0] for png in images]))
        if explanation == self.fail:
            return Detection("failed", error="unparsable")
        return Detection("ok", matches=[png[0] in self.yes.get(explanation, set()) for png in images])

    async def aclose(self):
        self.closed = True


def test_detection_is_the_balanced_accuracy_of_the_judges_answers():
    judge = ScriptedJudge({"dogs": {1, 2, 11}, "cats": {1, 2, 3}, "noise": {11, 12}}, fail="broken")
    scorer = DetectionScorer(lambda: judge, lambda i: bytes([i]), images=3, seed=4)
    subject = Subject(5, top=(1, 2, 3, 4), activating=(1, 2, 3, 4), negatives=(11, 12, 13, 14))
    dogs, cats, noise, broken, lonely = scorer.score([
        Pair(5, "dogs", subject), Pair(6, "cats", subject), Pair(7, "noise", subject), Pair(8, "broken", subject),
        Pair(5, "dogs", Subject(5, top=(1,), activating=(1,)))])
    assert dogs.score == pytest.approx((2 / 3 + 2 / 3) / 2) and cats.score == 1.0
    assert noise.score == pytest.approx((0 + 1 / 3) / 2)  # no activating image called a match, two negatives
    assert cats.details["tpr"] == 1.0 and noise.details["tnr"] == pytest.approx(1 / 3)
    assert broken == Skipped("detection failed: unparsable") and lonely == Skipped("no non-activating images")
    assert judge.closed
    # three of each kind, shown in one seeded order per subject (the same for its baseline pairs)
    orders = {tuple(images) for _, images in judge.shown}
    assert len(orders) == 1 and sorted(next(iter(orders))) == [1, 2, 3, 11, 12, 13]
    assert dogs.details["images"] == list(next(iter(orders)))
    again = ScriptedJudge({"dogs": {1}})
    DetectionScorer(lambda: again, lambda i: bytes([i]), images=3, seed=5).score([Pair(5, "dogs", subject)])
    assert again.shown[0][1] != list(next(iter(orders)))  # another seed, another order


def test_an_explainer_that_cannot_answer_stops_detection():
    judge = ScriptedJudge({}, down=True)
    scorer = DetectionScorer(lambda: judge, lambda i: bytes([i]), images=2, seed=0)
    with pytest.raises(EndpointError, match="down"):
        scorer.score([Pair(1, "x", Subject(1, (1,), (1,), (2,)))] * 4)
    assert judge.closed


# ---------------------------------------------------------------------------------------------------
# CLIP, GroundingDINO and SAM as tiny models built from their configs


def letters_vocab() -> dict[str, int]:
    vocab: dict[str, int] = {}
    for code in range(ord("a"), ord("z") + 1):
        vocab[chr(code)] = len(vocab)
        vocab[chr(code) + "</w>"] = len(vocab)
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    return vocab


def save_tiny_clip(path: Path) -> str:
    import transformers

    vocab = letters_vocab()
    tokenizer = transformers.CLIPTokenizer(vocab=vocab, merges=[])
    special = {"bos_token_id": vocab["<|startoftext|>"], "eos_token_id": vocab["<|endoftext|>"],
               "pad_token_id": vocab["<|endoftext|>"]}
    config = transformers.CLIPConfig(
        text_config={"vocab_size": len(vocab), "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "max_position_embeddings": 32, **special},
        vision_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8}, projection_dim=8)
    torch.manual_seed(0)
    transformers.CLIPModel(config).save_pretrained(path)
    images = transformers.CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    transformers.CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(path)
    return str(path)


def save_tiny_grounding(path: Path) -> str:
    import transformers

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", "a", "red", "blue", "square", "things"]
    tokenizer = transformers.BertTokenizer(vocab={w: i for i, w in enumerate(words)})
    config = transformers.GroundingDinoConfig(
        backbone_config=transformers.SwinConfig(embed_dim=8, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1],
                                                window_size=4, image_size=64, patch_size=4, out_indices=[2, 3, 4]),
        text_config=transformers.BertConfig(vocab_size=len(words), hidden_size=16, num_hidden_layers=1,
                                            num_attention_heads=2, intermediate_size=32, max_position_embeddings=64),
        num_queries=6, encoder_layers=1, decoder_layers=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
        encoder_attention_heads=2, decoder_attention_heads=2, d_model=32, max_text_len=32, encoder_n_points=2,
        decoder_n_points=2)
    torch.manual_seed(0)
    transformers.GroundingDinoForObjectDetection(config).save_pretrained(path)
    images = transformers.GroundingDinoImageProcessorPil(size={"shortest_edge": 64, "longest_edge": 96})
    transformers.GroundingDinoProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(path)
    return str(path)


def save_tiny_sam(path: Path) -> str:
    import transformers

    config = transformers.SamConfig(
        vision_config=transformers.SamVisionConfig(
            hidden_size=16, output_channels=8, num_hidden_layers=2, num_attention_heads=2, image_size=64,
            patch_size=8, window_size=4, global_attn_indexes=[1], num_pos_feats=4, mlp_dim=32),
        prompt_encoder_config=transformers.SamPromptEncoderConfig(hidden_size=8, image_size=64, patch_size=8,
                                                                  mask_input_channels=4),
        mask_decoder_config=transformers.SamMaskDecoderConfig(hidden_size=8, num_hidden_layers=1,
                                                              num_attention_heads=2, mlp_dim=16,
                                                              iou_head_hidden_dim=8))
    torch.manual_seed(0)
    transformers.SamModel(config).save_pretrained(path)
    images = transformers.SamImageProcessorPil(size={"longest_edge": 64}, pad_size={"height": 64, "width": 64},
                                               mask_size={"longest_edge": 16}, mask_pad_size={"height": 16, "width": 16})
    transformers.SamProcessor(image_processor=images).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def tiny_scorer_models(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("scorer-models")
    return {"clip": save_tiny_clip(root / "clip"), "grounding": save_tiny_grounding(root / "grounding"),
            "sam": save_tiny_sam(root / "sam")}


def coloured(i: int) -> Image.Image:
    return Image.new("RGB", (40 + 4 * i, 30), (40 * i, 200 - 30 * i, 90))


def test_clip_score_is_100_times_the_positive_cosine_of_clips_own_forward(tiny_scorer_models):
    import transformers

    from mmsae.scorers.clip import ClipScorer

    scorer = ClipScorer(tiny_scorer_models["clip"], coloured, torch.device("cpu"), images=2, batch_size=3)
    pairs = [Pair(1, "red things", Subject(1, (0, 1, 2))), Pair(2, "blue", Subject(1, (0, 1, 2))),
             Pair(1, "red things", Subject(3, (2, 3)))]
    results = scorer.score(pairs)
    model = transformers.CLIPModel.from_pretrained(tiny_scorer_models["clip"]).eval()
    processor = transformers.CLIPProcessor.from_pretrained(tiny_scorer_models["clip"])
    for pair, result in zip(pairs, results, strict=True):
        images = list(pair.subject.top[:2])
        enc = processor(text=[pair.explanation], images=[coloured(i) for i in images], return_tensors="pt",
                        padding=True)
        with torch.no_grad():
            cosine = model(**enc).logits_per_text[0] / model.logit_scale.exp()
        assert result.details["images"] == images
        np.testing.assert_allclose(result.details["scores"], (100 * cosine.clamp(min=0)).tolist(), atol=1e-3)
        assert result.score == pytest.approx(float(np.mean(result.details["scores"])))
    assert len(scorer._image_embeds) == 4 and len(scorer._text_embeds) == 2  # each embedded once
    assert scorer.score([Pair(1, "x", Subject(1, ()))]) == [Skipped("no top images")]


def test_grounding_dino_boxes_prompt_sam_and_its_masks_are_joined(tiny_scorer_models):
    import transformers

    from mmsae.scorers.grounded import GroundedSegmenter, grounding_prompt

    assert grounding_prompt("  Red   Squares. ") == "red squares."
    segmenter = GroundedSegmenter(tiny_scorer_models["grounding"], tiny_scorer_models["sam"], coloured,
                                  torch.device("cpu"), box_threshold=0.0, text_threshold=0.0, batch_size=2)
    masks = segmenter.segment("red square", [0, 1, 2])
    assert [m.shape for m in masks] == [(30, 40), (30, 44), (30, 48)] and all(m.dtype == bool for m in masks)
    # every box passes a zero threshold; the joined mask is SAM's own answer for those boxes
    (boxes,) = segmenter._boxes("red square.", [coloured(1)])
    assert boxes.shape == (6, 4)
    sam = transformers.SamModel.from_pretrained(tiny_scorer_models["sam"]).eval()
    processor = transformers.SamProcessor.from_pretrained(tiny_scorer_models["sam"])
    enc = processor(images=coloured(1), input_boxes=[boxes.tolist()], return_tensors="pt")
    with torch.no_grad():
        predicted = sam(pixel_values=enc["pixel_values"], input_boxes=enc["input_boxes"], multimask_output=True)
    logits = processor.image_processor.post_process_masks(predicted.pred_masks, enc["original_sizes"],
                                                          enc["reshaped_input_sizes"], binarize=False)[0]
    expected = (logits.mean(dim=1) > 0).any(dim=0).numpy()
    assert (masks[1] == expected).all()
    strict = GroundedSegmenter(tiny_scorer_models["grounding"], tiny_scorer_models["sam"], coloured,
                               torch.device("cpu"), box_threshold=1.0, text_threshold=1.0)
    assert not any(m.any() for m in strict.segment("red square", [0, 1]))  # no box: nothing segmented


def test_a_checkpoint_folder_that_is_not_one_is_a_clear_error(tmp_path):
    from mmsae.scorers.clip import ClipScorer

    with pytest.raises(ScoreError, match=r"score\.clip_model .* is not a checkpoint folder"):
        ClipScorer(str(tmp_path), coloured, torch.device("cpu"))


# ---------------------------------------------------------------------------------------------------
# the stage on a small toy world: features that fire exactly on a planted colour's objects


COLOURS = {3: "red", 8: "green", 12: "blue", 20: "yellow", 30: "purple", 31: "orange"}
"""The planted features: feature id -> the colour whose objects it fires on."""
EXPLAINED = {3: ("ok", "red"), 8: ("ok", "Green squares"), 12: ("ok", "blue things"), 20: ("ok", "yellow"),
             30: ("unable", None), 31: ("failed", None)}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, str]:
    """A 60-scene toy world of the planted colours, a tiny LLaVA-NeXT whose views are 16 x 16 grids (its geometry and the local
    explainer's checkpoint) and an activation-shard manifest naming both."""
    from mmsae.data import toyworld
    from mmsae.models import save_tiny

    root = tmp_path_factory.mktemp("world")
    images = str(root / "images")
    toyworld.build(ToyWorldConfig(n_train=60, n_heldout=1, min_size=64, max_size=64, seed=3,
                                  colors=sorted(COLOURS.values())), images)
    model = str(save_tiny("llava_next", root / "lmm", image_size=64, patch_size=4))
    shards = str(root / "shards")
    storage.write_manifest(shards, "activation_shards", files=[], inputs={"image_set": images, "model": model},
                           extra={"hookpoints": ["layers.0"], "d": 8, "dtype": "float32", "split": "train",
                                  "shards": {"layers.0": []}})
    return {"images": images, "model": model, "shards": shards}


def mask_cells(mask: np.ndarray, grid: int) -> list[tuple[int, int]]:
    """The base-view cells (row, col) whose centre lies on the mask (a square image fills the base view)."""
    height, width = mask.shape
    return [(r, c) for r in range(grid) for c in range(grid)
            if mask[int((r + 0.5) * height / grid), int((c + 0.5) * width / grid)]]


def planted_top_examples(uri: str, world: dict[str, str], colours: dict[int, str] = COLOURS) -> str:
    """A top-examples artifact of features that fire on every base-view cell of their colour's objects: top images
    and quantile samples hold the colour, negatives do not; ground truth names each feature for its colour."""
    from mmsae import groundtruth
    from mmsae.data.images import load_image_set

    dataset = load_image_set(world["images"], "train")
    concepts, mask_of = dataset["concepts"], groundtruth.mask_reader(dataset)
    records, tokens, sizes = [], [], {}
    for feature, colour in sorted(colours.items()):
        concept = f"color:{colour}"
        holding = [i for i, cs in enumerate(concepts) if concept in cs]
        others = [i for i, cs in enumerate(concepts) if concept not in cs]
        top, quantiles, negatives = holding[:5], holding[5:7], others[:3]
        assert len(top) == 5 and len(quantiles) == 2, f"too few scenes with {concept}"
        for i in top + quantiles:
            tokens += [(feature, i, 0, r, c, r * 16 + c, 1.0) for r, c in mask_cells(mask_of(i, concept), 16)]
        for i in top + quantiles + negatives:
            sizes[str(i)] = {"width": 64, "height": 64}
        records.append(examples.FeatureRecord(
            feature, 0.01, 0.2, 1.0, 1.0, top=[{"image_idx": i, "score": 1.0 - 0.01 * r} for r, i in enumerate(top)],
            quantiles=[{"image_idx": i, "score": 0.5, "quantile": q} for q, i in enumerate(quantiles)],
            negatives=negatives).to_json())
    tokens.sort()
    columns = {name: torch.tensor([t[k] for t in tokens]) for k, name in enumerate(examples.MAP_DTYPES)}
    truth = {"kinds": ["color", "texture"], "threshold": 0.5, "concepts": [
        {"concept": f"color:{colour}", "kind": "color", "feature": feature, "f1_feature": feature}
        for feature, colour in colours.items()]}
    files = {examples.FEATURES_FILE: "".join(json.dumps(r) + "\n" for r in records).encode(),
             examples.MAPS_FILE: examples.encode_maps(columns), examples.IMAGES_FILE: json.dumps(sizes).encode(),
             examples.GROUND_TRUTH_FILE: json.dumps(truth).encode()}
    for name, data in files.items():
        storage.write_bytes(storage.join(uri, name), data)
    storage.write_manifest(uri, examples.KIND, files=list(files), format_version=2,
                           inputs={"sae": "sae-uri", "shards": world["shards"], "image_set": world["images"]},
                           extra={"hookpoint": "layers.0", "family": "llava_next", "top_k": 5, "features": sorted(colours),
                                  "selected": sorted(colours), "figures": {}})
    return uri


def write_explanations(uri: str, top_examples: str, explained: dict[int, tuple[str, str | None]] = EXPLAINED,
                       fingerprint: bool = True) -> str:
    """An explanations artifact as the explain stage writes it, made from ``top_examples``."""
    rows = [{"feature": f, "explanation": text, "status": status, "explainer_model": "m", "prompt_hash": "h",
             "raw_reply": text} for f, (status, text) in sorted(explained.items())]
    storage.write_text(storage.join(uri, score.EXPLANATIONS_FILE), "".join(json.dumps(r) + "\n" for r in rows))
    key = {KEY_FIELD: {"config": {}, "fingerprints": {"top_examples": storage.fingerprint(top_examples)}}}
    storage.write_manifest(uri, "explanations", files=[score.EXPLANATIONS_FILE], inputs={"top_examples": top_examples},
                           extra={"figures": {}, **(key if fingerprint else {})})
    return uri


TOY_COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "white")


def colour_captions(self, images):
    """A captioner naming every toy colour that covers at least 12 pixels of the image (what it shows)."""
    from mmsae.data import toyworld
    from mmsae.explainers.local import _Captions

    rgbs = np.array([toyworld.COLORS[c] for c in TOY_COLOURS], dtype=np.float32)
    texts = []
    for image in images:
        pixels = np.asarray(image, dtype=np.float32).reshape(-1, 3)
        near = np.linalg.norm(pixels[:, None, :] - rgbs[None], axis=-1) < 45
        texts.append(" and ".join(f"a {c} square" for c, n in zip(TOY_COLOURS, near.sum(0), strict=True) if n >= 12))
    return _Captions(texts, [10] * len(images), [4] * len(images))


def score_config(tmp_path: Path, world: dict[str, str], **settings) -> RunConfig:
    cfg = RunConfig()
    cfg.run.workdir = str(tmp_path / "work")
    cfg.tracking.enabled = False
    cfg.explain.backend, cfg.explain.model, cfg.explain.batch_size = "local", world["model"], 8
    cfg.score = ScoreConfig(**settings)
    return cfg


@pytest.fixture
def planted(tmp_path, world, monkeypatch) -> RunConfig:
    """Planted top examples and their explanations in the run's workdir, and the colour captioner."""
    monkeypatch.setattr(LocalExplainer, "_caption_batch", colour_captions)
    cfg = score_config(tmp_path, world)
    top = planted_top_examples(str(tmp_path / "work" / "mine"), world)
    write_explanations(str(tmp_path / "work" / "explain"), top)
    return cfg


def rows_of(out: StageOutputs) -> list[dict]:
    return [json.loads(line) for line in Path(out.uri, score.RECORDS_FILE).read_text().splitlines()]


def test_the_stage_scores_planted_features_far_above_their_random_baselines(planted, tmp_path):
    out = score.run(planted)
    figures = out.figures
    assert (figures["features"], figures["explained"], figures["skipped_unable"], figures["skipped_failed"]) == (6, 4, 1, 1)
    assert figures["ground_truth"] == figures["ground_truth_shared"] == 1.0 and figures["ground_truth_features"] == 4
    assert figures["ground_truth_random"] < 0.5
    assert figures["detection"] == 1.0 and figures["detection_random"] < 0.8
    assert figures["iou"] > 0.5 and figures["iou_random"] < 0.1
    rows = rows_of(out)
    for name in ("iou", "detection", "ground_truth"):
        mine = [r for r in rows if r["scorer"] == name]
        assert sorted(r["feature"] for r in mine if "feature" in r) == [3, 8, 12, 20]
        (baseline,) = [r for r in mine if "feature" not in r]
        assert baseline["baseline"] == "random" and baseline["score"] == pytest.approx(figures[f"{name}_random"])
        assert baseline["details"]["pairs"] == 4
    iou_of = {r["feature"]: r for r in rows if r["scorer"] == "iou" and "feature" in r}
    assert iou_of[8]["details"]["concepts"] == ["color:green"] and len(iou_of[8]["details"]["ious"]) == 5
    manifest = storage.read_manifest(out.uri, kind=score.KIND)
    assert manifest.extra["skipped_scorers"] == {"clip": "score.clip_model is not set"}
    assert manifest.extra["scorers"]["iou"]["backend"] == "planted_masks"
    assert Path(tmp_path, "work", "summary", "layers", "-2", "score.json").is_file()  # the config's one layer
    storage.verify_artifact(out.uri, kind=score.KIND)
    from mmsae.stages.report import read_jsonl

    assert read_jsonl(out.uri, "scores") == rows


def test_the_random_baseline_pairs_each_explanation_with_another_features_images(planted):
    out = score.run(planted)
    details = {r["feature"]: r["details"] for r in rows_of(out) if r["scorer"] == "ground_truth" and "feature" in r}
    assert {f: d["named"] for f, d in details.items()} == {3: ["color:red"], 8: ["color:green"],
                                                             12: ["color:blue"], 20: ["color:yellow"]}
    features = [3, 8, 12, 20]
    explanations = {f: EXPLAINED[f][1] for f in features}
    other = derangement(4, planted.score.seed)
    subjects = {f: details[f]["planted"] for f in features}
    expected = np.mean([bool(named_concepts(explanations[features[i]], subjects[features[j]]))
                        for i, j in enumerate(other)])
    assert out.figures["ground_truth_random"] == pytest.approx(expected)


def test_clip_and_grounded_iou_run_through_the_stage(planted, tiny_scorer_models):
    planted.score = ScoreConfig(scorers=["iou", "clip"], clip_model=tiny_scorer_models["clip"], top_images=2,
                                grounding_model=tiny_scorer_models["grounding"], sam_model=tiny_scorer_models["sam"],
                                box_threshold=0.0, text_threshold=0.0)
    out = score.run(planted)
    rows = rows_of(out)
    assert {(r["scorer"], "feature" in r) for r in rows} == {("iou", True), ("iou", False), ("clip", True),
                                                             ("clip", False)}
    clip = [r for r in rows if r["scorer"] == "clip" and "feature" in r]
    assert all(len(r["details"]["scores"]) == 2 and 0 <= r["score"] <= 100 for r in clip)
    iou = {r["feature"]: r for r in rows if r["scorer"] == "iou" and "feature" in r}
    assert iou[8]["details"]["prompt"] == "green squares." and 0 <= iou[8]["score"] <= 1
    extra = storage.read_manifest(out.uri).extra
    assert extra["scorers"]["iou"]["backend"] == "grounding_dino+sam" and extra["skipped_scorers"] == {}
    assert set(storage.read_manifest(out.uri).inputs) == {"explanations", "top_examples", "grounding_model",
                                                          "sam_model", "clip_model"}


def test_without_planted_concepts_or_models_iou_and_ground_truth_are_skipped_with_a_reason(planted, tmp_path):
    top = tmp_path / "work" / "mine"
    (top / examples.GROUND_TRUTH_FILE).unlink()
    manifest = storage.read_manifest(str(top))
    storage.write_manifest(str(top), examples.KIND, files=[n for n in manifest.files if n != examples.GROUND_TRUTH_FILE],
                           format_version=2, inputs=manifest.inputs, extra=manifest.extra)
    write_explanations(str(tmp_path / "work" / "explain"), str(top))
    out = score.run(planted)
    skipped = storage.read_manifest(out.uri).extra["skipped_scorers"]
    assert set(skipped) == {"iou", "clip", "ground_truth"} and "planted concepts" in skipped["iou"]
    assert out.figures["detection"] == 1.0 and {r["scorer"] for r in rows_of(out)} == {"detection"}
    planted.score.grounding_model = str(tmp_path)
    with pytest.raises(ScoreError, match=r"set score\.sam_model too"):
        score.run(planted)


def test_explanations_of_other_top_examples_are_refused(planted, world, tmp_path):
    work = tmp_path / "work"
    other = planted_top_examples(str(tmp_path / "other-mine"), world, {k: v for k, v in COLOURS.items() if k != 31})
    with pytest.raises(ScoreError, match=r"made from the top examples at .*work/mine, not from score\.top_examples "
                                         r".*other-mine"):
        score.run(planted, top_examples=other)
    planted_top_examples(str(work / "mine"), world)  # rewritten in place after the explanations were made
    with pytest.raises(ScoreError, match="before they were rewritten"):
        score.run(planted)
    write_explanations(str(work / "explain"), str(work / "mine"), {**EXPLAINED, 99: ("ok", "red")})
    with pytest.raises(ScoreError, match=r"explain features \[99\] that the top examples .* did not mine"):
        score.run(planted)
    write_explanations(str(work / "explain"), str(tmp_path / "other-mine"), fingerprint=False)  # by URI alone
    with pytest.raises(ScoreError, match="other-mine"):
        score.run(planted)


def test_sealed_scores_are_reused_refused_after_new_explanations_and_redone_on_overwrite(planted, tmp_path,
                                                                                         monkeypatch):
    planted.score.scorers = ["ground_truth"]
    first = score.run(planted)
    real = score._score
    monkeypatch.setattr(score, "_score", lambda *a, **k: pytest.fail("a sealed output was scored again"))
    assert score.run(planted).figures == first.figures
    planted.score.concurrency, planted.score.device = 3, "cpu"  # outside the key
    assert score.run(planted).figures == first.figures
    write_explanations(str(tmp_path / "work" / "explain"), str(tmp_path / "work" / "mine"),
                       {**EXPLAINED, 3: ("ok", "checkered")})
    with pytest.raises(OutputMismatchError, match="input explanations was rewritten"):
        score.run(planted)
    planted.score.top_images = 3
    with pytest.raises(OutputMismatchError, match="setting top_images: 5 -> 3"):
        score.run(planted)
    monkeypatch.setattr(score, "_score", real)
    planted.run.overwrite = True
    again = score.run(planted)
    assert again.figures["ground_truth"] == 0.75 and first.figures["ground_truth"] == 1.0


def test_the_command_scores_and_reports_a_missing_input_in_one_line(planted, tmp_path):
    from mmsae.cli import app

    runner = CliRunner()
    common = ["--set", f"run.workdir={tmp_path / 'work'}", "--set", "tracking.enabled=false", "--set",
              "score.scorers=[ground_truth]"]
    result = runner.invoke(app, ["score", *common, "--out", str(tmp_path / "scored")])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["ground_truth"] == 1.0 and (tmp_path / "scored" / score.RECORDS_FILE).is_file()
    result = runner.invoke(app, ["score", *common, "--explanations", str(tmp_path / "nowhere")])
    assert result.exit_code == 1
    assert result.stderr.strip().startswith("error: score.explanations") and "Traceback" not in result.output


def test_cache_mine_explain_and_score_chain_on_a_toy_world(tmp_path, monkeypatch):
    """The stage on what the real stages write: AnyRes maps over several views, quantile samples, negatives."""
    from mmsae.data import toyworld
    from mmsae.models import save_tiny
    from mmsae.sae.checkpoint import save_sae
    from mmsae.sae.model import SaeConfig, TopKSAE
    from mmsae.stages import cache, explain, mine

    world = str(tmp_path / "world")
    toyworld.build(ToyWorldConfig(n_train=30, n_heldout=1, min_size=64, max_size=80), world)
    model = str(save_tiny("llava_next", tmp_path / "lmm", text_layers=2))
    cfg = score_config(tmp_path, {"model": model})
    cfg.cache = cfg.cache.model_copy(update={"image_set": world, "model": model, "layers": [0], "num_workers": 0,
                                             "split": "train"})
    cfg.mine = cfg.mine.model_copy(update={"top_k": 4, "n_quantiles": 2, "n_random": 3, "logit_tokens": 0})
    cache.run(cfg)
    torch.manual_seed(0)
    save_sae(TopKSAE(SaeConfig(d_in=64, num_latents=16, k=4)), str(tmp_path / "work" / "train" / "layers.0"))
    mine.run(cfg)
    monkeypatch.setattr(LocalExplainer, "_caption_batch", colour_captions)
    explained = explain.run(cfg)
    assert explained.figures["ok"] >= 2
    out = score.run(cfg)
    rows = rows_of(out)
    figures = out.figures
    assert figures["explained"] == explained.figures["ok"]
    assert 0 <= figures["iou"] <= 1 and 0 <= figures["iou_random"] <= 1
    assert 0 <= figures["detection"] <= 1 and figures["iou_features"] == figures["explained"]
    baselines = {r["scorer"] for r in rows if "feature" not in r}
    assert {"iou", "detection"} <= baselines and all(r["baseline"] == "random" for r in rows if "feature" not in r)
    storage.verify_artifact(out.uri, kind=score.KIND)


def test_one_explanation_has_no_baseline_and_none_leaves_nothing_to_score(planted, tmp_path):
    work = tmp_path / "work"
    planted.score.scorers = ["ground_truth", "detection"]
    write_explanations(str(work / "explain"), str(work / "mine"), {3: ("ok", "red"), 8: ("unable", None)})
    out = score.run(planted)
    assert [(r.get("feature"), r["scorer"]) for r in rows_of(out)] == [(3, "ground_truth"), (3, "detection")]
    assert out.figures["ground_truth"] == 1.0 and out.figures["ground_truth_random"] is None
    write_explanations(str(work / "explain"), str(work / "mine"), {3: ("failed", None), 8: ("no_examples", None)})
    planted.run.overwrite = True
    out = score.run(planted)
    assert rows_of(out) == [] and (out.figures["explained"], out.figures["skipped_failed"]) == (0, 1)
    assert "ground_truth" not in out.figures and storage.read_manifest(out.uri).extra["features"] == []


# ---------------------------------------------------------------------------------------------------
# the pipeline step
