"""Ground truth on planted concepts: the top-K match, the detectors' maps and the headline figures."""

from __future__ import annotations

import numpy as np
import pytest

from mmsae import groundtruth
from mmsae.examples import FeatureRecord
from mmsae.models.geometry import PatchInfo

SIDE = 64
"""Images are SIDE x SIDE: one view of a 4 x 4 grid, each cell 16 px."""
INFO = PatchInfo(family="llava", image_token_id=0, tile_size=SIDE, patch_size=16, grid=4, has_cls=True,
                 select_strategy="default", size_shortest_edge=SIDE, crop_hw=(SIDE, SIDE))
CELL_MASK = np.zeros((SIDE, SIDE), dtype=bool)
CELL_MASK[:16, :16] = True
"""Every concept's object fills the top-left cell."""


def record(feature: int, top: list[int], quantiles: list[int] = ()) -> FeatureRecord:
    return FeatureRecord(feature, 0.1, 0.1, 1.0, 1.0,
                         top=[{"image_idx": i, "score": 1.0} for i in top],
                         quantiles=[{"image_idx": i, "score": 0.5, "quantile": 0} for i in quantiles])


def tokens(*cells: tuple[int, int, int, float]) -> dict[str, np.ndarray]:
    """Token-map rows ``(view, row, col, act)``; view -2 is an image-newline token (no place in the image)."""
    view, row, col, act = (np.array(c) for c in zip(*cells, strict=True)) if cells else ([], [], [], [])
    return {"view": np.asarray(view, dtype=np.int64), "row": np.asarray(row, dtype=np.int64),
            "col": np.asarray(col, dtype=np.int64), "act": np.asarray(act, dtype=np.float32)}


def reader(maps: dict[tuple[int, int], dict[str, np.ndarray]]):
    return lambda feature, image: maps.get((feature, image), tokens())


def mask_of(image: int, concept: str) -> np.ndarray:
    return CELL_MASK


def on_object_iou() -> float:
    """The IoU of a map that fires on the object's cell alone (the bilinear map spills a little past it)."""
    from mmsae.heatmaps import activation_map

    return groundtruth._iou(activation_map(tokens((0, 0, 0, 1.0)), (SIDE, SIDE), INFO), CELL_MASK, 0.5)


def test_a_map_on_the_object_overlaps_its_mask_and_one_beside_it_does_not():
    from mmsae.heatmaps import activation_map

    assert 0.8 < on_object_iou() <= 1.0
    assert groundtruth._iou(activation_map(tokens((0, 3, 3, 1.0)), (SIDE, SIDE), INFO), CELL_MASK, 0.5) == 0.0


def test_the_top_k_tie_is_broken_by_the_iou_then_the_lower_id():
    concepts = [["color:red"], ["color:red"], ["color:blue"]]
    records = [record(3, [0, 1]), record(7, [0, 1]), record(9, [0, 1]), record(11, [2])]
    on_object, off_object = tokens((0, 0, 0, 2.0)), tokens((0, 3, 3, 2.0))
    maps = {(3, 0): off_object, (3, 1): off_object, (7, 0): on_object, (7, 1): on_object,
            (9, 0): on_object, (9, 1): on_object}
    matches = groundtruth.concept_matches(records, concepts, top_k=2, tokens_of=reader(maps), mask_of=mask_of,
                                          info=INFO)
    red = next(m for m in matches if m.concept == "color:red")
    assert (red.feature, red.hits, red.tied, red.precision) == (7, 2, 3, 1.0)
    assert red.iou == pytest.approx(on_object_iou()) and red.iou_images == 2
    assert red.base_rate == pytest.approx(2 / 3)


def test_a_detector_whose_top_images_miss_the_concept_is_measured_on_its_quantile_samples():
    # feature 5 fires hardest on blue images, and on the red image it also fires on, on the red object
    concepts = [["color:blue"], ["color:blue"], ["color:red"], ["color:red"]]
    records = [record(5, top=[0, 1], quantiles=[1, 2])]
    maps = {(5, 0): tokens((0, 0, 0, 9.0)), (5, 1): tokens((0, 0, 0, 9.0)), (5, 2): tokens((0, 0, 0, 1.0))}
    det = {"color:red": groundtruth.Detection(5, 0.5, 0.33, 1.0)}
    red = next(m for m in groundtruth.concept_matches(records, concepts, top_k=2, tokens_of=reader(maps),
                                                      mask_of=mask_of, info=INFO, detectors=det)
               if m.concept == "color:red")
    assert red.f1_feature == 5 and red.f1_iou_images == 1
    assert red.f1_iou == pytest.approx(on_object_iou())
    assert red.f1_on_patches == pytest.approx(1.0)


def test_a_detector_that_shows_on_no_image_of_its_concept_counts_iou_zero():
    concepts = [["color:blue"], ["color:red"]]
    records = [record(5, top=[0])]
    det = {"color:red": groundtruth.Detection(5, 0.5, 0.5, 0.5)}
    red = next(m for m in groundtruth.concept_matches(records, concepts, top_k=1,
                                                      tokens_of=reader({(5, 0): tokens((0, 0, 0, 1.0))}),
                                                      mask_of=mask_of, info=INFO, detectors=det)
               if m.concept == "color:red")
    assert (red.f1_iou, red.f1_iou_images, red.f1_on_patches) == (0.0, 0, None)


def test_a_detector_firing_on_image_newline_tokens_has_no_map_and_says_so():
    concepts = [["texture:dotted"], ["texture:dotted"]]
    records = [record(4, top=[0, 1])]
    maps = {(4, 0): tokens((-2, 0, -1, 3.0), (-2, 1, -1, 3.0)),  # newline tokens only: an empty map
            (4, 1): tokens((-2, 0, -1, 2.0), (0, 0, 0, 2.0))}  # half of it on the object's cell
    det = {"texture:dotted": groundtruth.Detection(4, 1.0, 1.0, 1.0)}
    (dotted,) = groundtruth.concept_matches(records, concepts, top_k=2, tokens_of=reader(maps), mask_of=mask_of,
                                            info=INFO, detectors=det)
    assert dotted.f1_iou_images == 2
    assert dotted.f1_iou == pytest.approx(on_object_iou() / 2)  # 0 on the image whose map is empty
    assert dotted.f1_on_patches == pytest.approx(2.0 / 10.0)
    figures = groundtruth.summarize([dotted], ["texture"])
    assert figures["gt_f1_on_patches_texture"] == pytest.approx(0.2)
    assert figures["gt_f1_iou_texture"] == pytest.approx(on_object_iou() / 2)


def _match(concept: str, precision: float, f1: float, base_rate: float = 0.25) -> groundtruth.ConceptMatch:
    return groundtruth.ConceptMatch(concept, concept.split(":")[0], 1, round(precision * 10), 10, precision, 0.5,
                                    10, base_rate, f1_feature=2, f1=f1, f1_precision=f1, f1_recall=f1, f1_iou=0.3)


def test_the_headline_separates_saes_that_top_k_precision_cannot():
    good = [_match("color:red", 1.0, 0.6), _match("texture:solid", 1.0, 0.7)]
    better = [_match("color:red", 1.0, 0.8), _match("texture:solid", 1.0, 0.9)]
    kinds = ["color", "texture"]
    a, b = groundtruth.summarize(good, kinds), groundtruth.summarize(better, kinds)
    assert next(iter(a)) == groundtruth.HEADLINE == "gt_f1"
    assert a["gt_topk_precision"] == b["gt_topk_precision"] == 1.0
    assert a[groundtruth.HEADLINE] == pytest.approx(0.65) and b[groundtruth.HEADLINE] == pytest.approx(0.85)
    assert a["gt_f1_always_fires"] == pytest.approx(2 * 0.25 / 1.25)
    assert a["gt_f1_color"] == pytest.approx(0.6) and a["gt_f1_texture"] == pytest.approx(0.7)
    # the other figures stay available under their names
    assert {"gt_concepts", "gt_topk_precision_random", "gt_features_distinct", "gt_iou", "gt_f1_features_distinct",
            "gt_f1_iou", "gt_topk_precision_color", "gt_iou_color", "gt_f1_recall_color", "gt_f1_iou_color"} <= set(a)


def test_without_detectors_the_figures_are_the_top_k_ones_and_other_kinds_do_not_count():
    plain = [groundtruth.ConceptMatch("color:red", "color", 1, 10, 10, 1.0, 0.5, 10, 0.2),
             groundtruth.ConceptMatch("shape:square", "shape", 2, 2, 10, 0.2, 0.1, 2, 1.0)]
    figures = groundtruth.summarize(plain, ["color"])
    assert groundtruth.HEADLINE not in figures
    assert figures["gt_concepts"] == 1 and figures["gt_topk_precision"] == 1.0 and figures["gt_iou"] == 0.5
    assert groundtruth.summarize(plain, ["texture"]) == {}
