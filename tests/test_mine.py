"""The mine stage: streaming top-K against brute force, samples, maps, bounded memory, selection, ground truth."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mmsae import activations as A
from mmsae import storage
from mmsae.config import MineConfig, RunConfig
from mmsae.examples import FeatureRecord, TopExamples
from mmsae.sae.checkpoint import save_sae
from mmsae.sae.model import SaeConfig, TopKSAE
from mmsae.stages import mine

D, LATENTS, K = 16, 24, 4
GRID = 2


def image_rows(i: int, rng: np.random.Generator) -> dict[str, list[int]]:
    """Token layout of image ``i``: base view 2x2, 1 or 2 tiles of 2x2 with a newline per merged row, text."""
    view, row, col = [], [], []
    for r in range(GRID):
        for c in range(GRID):
            view.append(0), row.append(r), col.append(c)
    tiles = 1 + i % 2
    for r in range(GRID):
        for t in range(tiles):
            for c in range(GRID):
                view.append(1 + t), row.append(r), col.append(c)
        view.append(-2), row.append(r), col.append(-1)
    for _ in range(2):
        view.append(-1), row.append(-1), col.append(-1)
    return {"view": view, "row": row, "col": col}


def acts_for(image_idx: int, n: int) -> torch.Tensor:
    """Activations that depend only on the image (so any split into shards gives the same rows)."""
    g = torch.Generator().manual_seed(7919 * image_idx + 11)
    return torch.randn(n, D, generator=g)


def make_shards(uri: str, n_images: int, images_per_shard: int, first_image: int = 0) -> str:
    rng = np.random.default_rng(0)
    files, refs, sizes = [], [], []
    for s, lo in enumerate(range(first_image, first_image + n_images, images_per_shard)):
        hi = min(lo + images_per_shard, first_image + n_images)
        parts = {c: [] for c in A.COLUMNS}
        for i in range(lo, hi):
            lay = image_rows(i, rng)
            n = len(lay["view"])
            parts["acts"].append(acts_for(i, n))
            parts["image_idx"].append(torch.full((n,), i))
            parts["token_pos"].append(torch.arange(3, 3 + n))
            for c in ("view", "row", "col"):
                parts[c].append(torch.tensor(lay[c]))
            sizes.append([i, 20 + i % 7, 16 + i % 5])
        cols = {c: torch.cat(v) for c, v in parts.items()}
        name = f"layers.1/{A.shard_name(0, s)}"
        storage.write_bytes(storage.join(uri, name), A.encode_shard(cols, {"hookpoint": "layers.1"}))
        files.append(name)
        refs.append({"name": name, "rows": int(cols["acts"].shape[0]), "first_image": lo, "end_image": hi})
    storage.write_bytes(storage.join(uri, "images.json"), json.dumps({"images": sizes, "skipped": []}).encode())
    files.append("images.json")
    storage.write_manifest(uri, A.KIND, files=files, extra={
        "hookpoints": ["layers.1"], "d": D, "dtype": "float32", "shards": {"layers.1": refs}, "family": "llava_next"})
    return uri


def make_sae(path: Path, latents: int = LATENTS, k: int = K, seed: int = 0) -> str:
    torch.manual_seed(seed)
    sae = TopKSAE(SaeConfig(d_in=D, num_latents=latents, k=k))
    with torch.no_grad():
        sae.encoder.bias.uniform_(-0.2, 0.2)
        sae.encoder.bias[latents - 1] = -1.5  # the last latent fires rarely but strongly: it must not be dropped
        sae.encoder.weight[latents - 1] *= 3
    save_sae(sae, str(path))
    return str(path)


def cfg_for(tmp_path: Path, shards: str, sae: str, **kw) -> RunConfig:
    cfg = RunConfig()
    cfg.tracking.enabled = False
    cfg.run.workdir = str(tmp_path / "work")
    cfg.mine = MineConfig.model_validate({"shards": shards, "sae": sae, "out": str(tmp_path / "mined"),
                                         "heatmaps": "none", "top_k": 5, "n_quantiles": 3, "n_random": 4, **kw})
    return cfg


@functools.lru_cache(maxsize=4)
def brute_force(shards: str, sae_path: str, score: str = "max", tokens: str = "image"):
    """Every image's score per feature from the dense latents of all rows at once."""
    from mmsae.sae.checkpoint import load_sae

    sae = load_sae(sae_path)
    cols = {c: torch.cat(v) for c, v in zip(A.COLUMNS, zip(*[
        [s[c] for c in A.COLUMNS] for s in A.ActivationShards(shards).iter_shards()], strict=True), strict=True)}
    keep = A.token_mask(cols, tokens)
    cols = {c: v[keep] for c, v in cols.items()}
    with torch.no_grad():
        dense = sae.dense_latents(cols["acts"])
    images = cols["image_idx"].unique().tolist()
    scores = torch.zeros(sae.num_latents, len(images))
    for j, i in enumerate(images):
        rows = dense[cols["image_idx"] == i]
        scores[:, j] = rows.max(0).values if score == "max" else rows.mean(0)
    return {"dense": dense, "cols": cols, "images": images, "scores": scores}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("mine")
    shards = make_shards(str(root / "acts"), n_images=90, images_per_shard=13)
    sae = make_sae(root / "sae" / "layers.1")
    return {"root": root, "shards": shards, "sae": str(root / "sae"), "sae_dir": sae}


@pytest.fixture(scope="module")
def mined(setup, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mined")
    out = mine.run(cfg_for(tmp, setup["shards"], setup["sae"], max_block=LATENTS * 5, batch_rows=50))
    return TopExamples(out.uri), out


@pytest.mark.parametrize("score,tokens,top_k", [("max", "image", 5), ("mean", "image", 5), ("max", "all", 5),
                                                ("max", "image", 60)])
def test_streaming_top_k_equals_brute_force_over_all_images(setup, tmp_path, score, tokens, top_k, single_thread):
    # tiny batches and blocks: many merges per shard; top_k 60 > the activating images of many features
    out = mine.run(cfg_for(tmp_path, setup["shards"], setup["sae"], score=score, tokens=tokens, top_k=top_k,
                           max_block=LATENTS * 3, batch_rows=40))
    te = TopExamples(out.uri)
    bf = brute_force(setup["shards"], setup["sae_dir"], score, tokens)
    assert [r.feature for r in te.features()] == list(range(LATENTS))
    short = 0
    for rec in te.features():
        s = bf["scores"][rec.feature]
        order = torch.argsort(s, descending=True)
        expect = [(bf["images"][j], float(s[j])) for j in order[:top_k].tolist() if s[j] > 0]
        short += len(expect) < top_k
        got = [(t["image_idx"], t["score"]) for t in rec.top]
        assert [i for i, _ in got] == [i for i, _ in expect], rec.feature
        np.testing.assert_allclose([x for _, x in got], [x for _, x in expect], rtol=1e-5)
    if top_k == 60:
        assert short > 0


def test_frequencies_and_activation_stats_match_a_brute_force_count(setup, mined):
    te, _ = mined
    bf = brute_force(setup["shards"], setup["sae_dir"])
    dense = bf["dense"]
    n_tok, n_img = dense.shape[0], len(bf["images"])
    for rec in te.features():
        col = dense[:, rec.feature]
        on = col > 0
        assert rec.frequency == pytest.approx(int(on.sum()) / n_tok)
        assert rec.image_frequency == pytest.approx(int((bf["scores"][rec.feature] > 0).sum()) / n_img)
        assert rec.max_activation == pytest.approx(float(col.max()), rel=1e-5)
        if on.any():
            assert rec.mean_activation == pytest.approx(float(col[on].mean()), rel=1e-4)
    assert te.extra["figures"]["tokens"] == n_tok and te.extra["figures"]["images"] == n_img


def test_label_counts_match_a_brute_force_count_and_pick_the_best_f1_detector(setup, single_thread):
    from mmsae import groundtruth as GT
    from mmsae.sae.checkpoint import load_sae

    bf = brute_force(setup["shards"], setup["sae_dir"])
    n = max(bf["images"]) + 1
    g = torch.Generator().manual_seed(3)
    concepts = [[c for c in ("a:x", "a:y", "b:z") if torch.rand(1, generator=g) < 0.4] for _ in range(n)]
    names, labels = GT.concept_labels(concepts)
    assert names == sorted({c for cs in concepts for c in cs})
    assert all(bool(labels[i, names.index(c)]) == (c in concepts[i]) for i in range(n) for c in names)
    sae = load_sae(setup["sae_dir"])
    miner = mine.Miner(LATENTS, top_k=2, n_quantiles=0, n_random=0, image_labels=labels, max_block=LATENTS * 4)
    with torch.inference_mode():
        for cols in A.ActivationShards(setup["shards"]).iter_shards():
            keep = A.token_mask(cols, "image")
            miner.add_shard({c: v[keep] for c, v in cols.items()},
                                  lambda x: tuple(sae.encode(x)[:2]), 60)
    extra = miner.finish().extra
    fires = bf["scores"] > 0  # [features, images]
    lab = labels[bf["images"]].long()  # [images, concepts]
    assert torch.equal(extra["label_hits"], (fires.long() @ lab))
    assert torch.equal(extra["label_images"], lab.sum(0))
    assert torch.equal(extra["image_count"], fires.sum(1))
    det = GT.best_detectors(extra["label_hits"], extra["image_count"], extra["label_images"], names,
                            list(range(LATENTS)))
    for j, c in enumerate(names):
        f1 = 2 * (fires.long() @ lab)[:, j].double() / (fires.sum(1) + lab[:, j].sum()).double()
        assert det[c].f1 == pytest.approx(float(f1.max()))
        assert det[c].feature == int(f1.argmax())
    with pytest.raises(mine.MineError, match="no labels"):
        mine.Miner(LATENTS, image_labels=labels[:1]).add(torch.ones(1, 1), torch.zeros(1, 1, dtype=torch.long), {
            "image_idx": torch.tensor([5]), "view": torch.zeros(1), "row": torch.zeros(1), "col": torch.zeros(1),
            "token_pos": torch.zeros(1, dtype=torch.int32)})


def test_the_last_feature_is_mined(setup, mined):
    te, _ = mined
    last = te.feature(LATENTS - 1)
    assert last.top, "the last latent fires on some images and must have top images"
    assert te.activation_tokens(LATENTS - 1, last.top[0]["image_idx"])["act"].size > 0
    assert LATENTS - 1 in te.extra["features"]


def test_maps_hold_exactly_the_kept_images_nonzero_tokens_over_all_views(setup, mined):
    te, _ = mined
    bf = brute_force(setup["shards"], setup["sae_dir"])
    dense, cols = bf["dense"], bf["cols"]
    views_seen = set()
    total = 0
    for rec in te.features():
        kept = set(rec.top_images) | set(rec.quantile_images)
        for i in kept:
            rows = (cols["image_idx"] == i) & (dense[:, rec.feature] > 0)
            expect = sorted(zip(cols["token_pos"][rows].tolist(), cols["view"][rows].tolist(),
                                cols["row"][rows].tolist(), cols["col"][rows].tolist(),
                                dense[rows, rec.feature].tolist(), strict=True))
            got = te.activation_tokens(rec.feature, i)
            got_rows = sorted(zip(got["token_pos"].tolist(), got["view"].tolist(), got["row"].tolist(),
                                  got["col"].tolist(), got["act"].tolist(), strict=True))
            assert [g[:4] for g in got_rows] == [e[:4] for e in expect], (rec.feature, i)
            np.testing.assert_allclose([g[4] for g in got_rows], [e[4] for e in expect], rtol=1e-5)
            views_seen |= set(got["view"].tolist())
            total += len(got_rows)
    assert {0, 1, 2, -2} <= views_seen  # base view, both tiles and newline tokens
    assert -1 not in views_seen  # text tokens are not mined by default
    assert te.extra["figures"]["map_rows"] == total  # nothing else is stored


def test_quantile_and_negative_samples_are_as_specified(setup, mined):
    te, _ = mined
    bf = brute_force(setup["shards"], setup["sae_dir"])
    col_of = {i: j for j, i in enumerate(bf["images"])}
    keys = mine.Miner(LATENTS, n_random=4).image_keys(torch.tensor(bf["images"]))
    pool = [bf["images"][j] for j in torch.argsort(keys).tolist()][:64]
    some_quantiles = some_negatives = 0
    for rec in te.features():
        s = bf["scores"][rec.feature]
        top = set(rec.top_images)
        assert len(rec.quantiles) <= 3
        qs = [q["quantile"] for q in rec.quantiles]
        assert qs == sorted(qs) and set(qs) <= {0, 1, 2}
        for q in rec.quantiles:
            assert q["image_idx"] not in top
            assert float(s[col_of[q["image_idx"]]]) == pytest.approx(q["score"], rel=1e-5) and q["score"] > 0
        scores = [q["score"] for q in rec.quantiles]
        assert scores == sorted(scores)  # higher quantiles hold higher scores
        activating_outside_top = int((s > 0).sum()) - len(top)
        if activating_outside_top >= 6:  # a pool of 2 x 3 images, cut into 3 quantiles of one each
            assert len(rec.quantiles) == 3
            some_quantiles += 1
        # negatives: the first 4 images, in the pool's hash order, of the 64 lowest-hash images, where it never fires
        expect = [i for i in pool if float(s[col_of[i]]) == 0.0][:4]
        assert rec.negatives == expect
        some_negatives += len(expect) == 4
    assert some_quantiles > LATENTS // 2 and some_negatives > LATENTS // 2


@pytest.mark.parametrize("n_quantiles,per_q,pool", [(1, 1, 1), (3, 1, 2), (5, 2, 3), (2, 3, 1)])
def test_quantile_buckets_follow_their_definition_over_the_pool(n_quantiles, per_q, pool):
    # the definition, one feature at a time: pool entries that are not top images, ordered by (score, image,
    # key), cut into equal-count buckets; per bucket the per_q lowest keys. Small integer keys and scores make
    # ties and empty buckets common.
    def by_definition(keys, images, scores, top):
        entries = sorted((s, i, k) for k, i, s in zip(keys, images, scores, strict=True)
                         if k < mine._NO_KEY and i not in top)
        n, out = len(entries), []
        for q in range(n_quantiles):
            bucket = entries[q * n // n_quantiles: (q + 1) * n // n_quantiles]
            out += [(i, s, q) for s, i, _ in sorted(bucket, key=lambda e: e[2])[:per_q]]
        return out

    g = torch.Generator().manual_seed(n_quantiles * 100 + per_q * 10 + pool)
    for _ in range(20):
        m = mine.Miner(16, top_k=3, n_quantiles=n_quantiles, quantile_examples=per_q, quantile_pool=pool, n_random=0)
        shape = m.res_key.shape
        m.res_key = torch.randint(0, 40, shape, generator=g)
        m.res_key[torch.rand(shape, generator=g) < 0.3] = mine._NO_KEY
        m.res_image = torch.where(m.res_key == mine._NO_KEY, -1, torch.randint(0, 12, shape, generator=g))
        m.res_score = torch.randint(0, 4, shape, generator=g).float()
        m.top_image = torch.randint(-1, 12, (16, 3), generator=g)
        image, score, quantile = (t.tolist() for t in m._quantile_table())
        for p in range(16):
            want = by_definition(m.res_key[p].tolist(), m.res_image[p].tolist(), m.res_score[p].tolist(),
                                 {i for i in m.top_image[p].tolist() if i >= 0})
            got = [(i, s, q) for i, s, q in zip(image[p], score[p], quantile[p], strict=True) if i >= 0]
            assert got == want


def test_samples_do_not_depend_on_how_images_fall_into_shards_but_on_the_seed(setup, tmp_path):
    other = make_shards(str(tmp_path / "acts-other"), n_images=90, images_per_shard=31)
    a = mine.run(cfg_for(tmp_path / "a", setup["shards"], setup["sae"], batch_rows=100))
    b = mine.run(cfg_for(tmp_path / "b", other, setup["sae"], batch_rows=1000))
    c = mine.run(cfg_for(tmp_path / "c", setup["shards"], setup["sae"], seed=1))
    fa, fb, fc = (TopExamples(x.uri).features() for x in (a, b, c))
    assert [(r.quantile_images, r.negatives, r.top_images) for r in fa] == \
        [(r.quantile_images, r.negatives, r.top_images) for r in fb]
    assert [r.negatives for r in fa] != [r.negatives for r in fc]
    assert [r.top_images for r in fa] == [r.top_images for r in fc]


def test_negatives_are_spread_over_the_image_set(setup, tmp_path):
    """Bottom-k hashing gives a uniform sample: negatives come from early and late images alike."""
    out = mine.run(cfg_for(tmp_path, setup["shards"], setup["sae"], n_random=10))
    negs = [i for r in TopExamples(out.uri).features() for i in r.negatives]
    assert len(negs) > 50
    assert 0.3 < np.mean(np.asarray(negs) < 45) < 0.7


def test_state_memory_does_not_grow_with_the_number_of_shards(tmp_path, single_thread):
    sae = TopKSAE(SaeConfig(d_in=D, num_latents=LATENTS, k=K))

    def encode(x):
        out = sae.encode(x)
        return out.top_acts, out.top_indices

    def peak(n_images: int) -> tuple[int, int, int]:
        uri = make_shards(str(tmp_path / f"acts-{n_images}"), n_images=n_images, images_per_shard=10)
        miner = mine.Miner(LATENTS, top_k=3, n_quantiles=2, quantile_pool=2, n_random=2, purge_slack=0)
        with torch.no_grad():
            for cols in A.ActivationShards(uri).iter_shards():
                keep = A.token_mask(cols, "image")
                miner.add_shard({c: v[keep] for c, v in cols.items()}, encode, batch_rows=64)
        fixed = miner.state_bytes() - sum(t.numel() * t.element_size() for s in miner.store for t in s.values())
        return miner.peak_state_bytes, fixed, miner.tokens

    small, fixed_small, tok_small = peak(240)
    large, fixed_large, tok_large = peak(960)
    assert tok_large > 3.5 * tok_small
    assert fixed_large == fixed_small
    # the maps of the held pairs: at most features x (top 3 + pool 4) pairs x 14 image tokens, 24 bytes a row;
    # the store may grow PURGE_GROWTH times past them, plus one batch, before it is purged
    held = LATENTS * (3 + 4) * 14 * 24
    bound = fixed_small + mine.PURGE_GROWTH * held + 64 * K * 24
    assert large <= bound and large < 1.3 * small, (small, large, bound)
    every_token = tok_large * K * 24  # what keeping every active token would take
    assert large < every_token / 2


def test_mining_a_selection_of_features_gives_their_records_only(setup, tmp_path, mined):
    te_all, _ = mined
    out = mine.run(cfg_for(tmp_path, setup["shards"], setup["sae"], features=[LATENTS - 1, 3, 7]))
    te = TopExamples(out.uri)
    assert [r.feature for r in te.features()] == [3, 7, LATENTS - 1]
    for r in te.features():
        ref = te_all.feature(r.feature)
        assert r.top == ref.top and r.frequency == pytest.approx(ref.frequency)
    assert set(te.activation_tokens(7, te.feature(7).top_images[0])["feature"].tolist()) == {7}
    with pytest.raises(mine.MineError, match="out of range"):
        mine.run(cfg_for(tmp_path / "bad", setup["shards"], setup["sae"], features=[LATENTS]))


def _rec(f: int, freq: float, alive: bool = True) -> FeatureRecord:
    return FeatureRecord(feature=f, frequency=freq, image_frequency=0.5 if alive else 0.0, max_activation=1.0,
                         mean_activation=0.5, top=[{"image_idx": 0, "score": 1.0}] if alive else [])


def test_feature_selection_variants():
    recs = [_rec(f, freq) for f, freq in enumerate([0.0, 0.01, 0.2, 0.05, 0.2, 0.001])]
    recs[0] = _rec(0, 0.0, alive=False)
    assert mine.select_features(recs, "all") == [0, 1, 2, 3, 4, 5]
    assert mine.select_features(recs, "ids:4,1,99") == [1, 4]
    assert mine.select_features(recs, "frequency:0.005..0.05") == [1, 3]
    assert mine.select_features(recs, "most_active:3") == [2, 3, 4]  # ties of 0.2 both in
    assert mine.select_features(recs, "most_active:1") == [2]  # tie broken by the lower id
    r1 = mine.select_features(recs, "random:3", seed=1)
    assert r1 == mine.select_features(recs, "random:3", seed=1) and len(r1) == 3 and 0 not in r1
    draws = {tuple(mine.select_features(recs, "random:2", seed=s)) for s in range(20)}
    assert len(draws) > 3
    assert mine.select_features(recs, "random:50") == [1, 2, 3, 4, 5]
    for bad in ("some", "frequency:0.5..0.1", "ids:", "random:x"):
        with pytest.raises(mine.SelectionError, match="feature selection"):
            mine.select_features(recs, bad)


def test_selected_features_are_recorded_in_the_manifest(setup, tmp_path):
    out = mine.run(cfg_for(tmp_path, setup["shards"], setup["sae"], select="most_active:4"))
    te = TopExamples(out.uri)
    freq = sorted(te.features(), key=lambda r: (-r.frequency, r.feature))[:4]
    assert te.selected == sorted(r.feature for r in freq)
    assert out.figures["features_selected"] == 4


def test_sealed_artifact_is_reused_and_another_config_replaces_it(setup, tmp_path, monkeypatch):
    cfg = cfg_for(tmp_path, setup["shards"], setup["sae"])
    first = mine.run(cfg)
    stamp = (tmp_path / "mined" / "manifest.json").stat().st_mtime_ns

    def boom(*a, **k):
        raise AssertionError("mined again")

    monkeypatch.setattr(mine.Miner, "add", boom)
    again = mine.run(cfg)
    assert again.figures == first.figures
    assert (tmp_path / "mined" / "manifest.json").stat().st_mtime_ns == stamp
    monkeypatch.undo()
    # the same URIs with rewritten inputs are mined again
    shards = make_shards(str(tmp_path / "acts"), n_images=30, images_per_shard=13)
    first = mine.run(cfg_for(tmp_path, shards, setup["sae"]))
    make_shards(shards, n_images=20, images_per_shard=13)
    assert mine.run(cfg_for(tmp_path, shards, setup["sae"])).figures["images"] == 20
    other = mine.run(cfg_for(tmp_path, setup["shards"], setup["sae"], top_k=2))
    te = TopExamples(other.uri)
    assert te.extra["top_k"] == 2 and all(len(r.top) <= 2 for r in te.features())
    storage.verify_artifact(other.uri, kind="top_examples")


def test_a_sweep_needs_a_variant_and_a_width_mismatch_is_refused(setup, tmp_path):
    sweep = tmp_path / "sweep"
    make_sae(sweep / "k2-m24" / "layers.1", k=2)
    make_sae(sweep / "k4-m24" / "layers.1")
    storage.write_manifest(str(sweep), "sae", files=[], extra={
        "variants": [{"name": "k2-m24"}, {"name": "k4-m24"}], "hookpoints": ["layers.1"]})
    with pytest.raises(mine.MineError, match="mine.variant"):
        mine.run(cfg_for(tmp_path, setup["shards"], str(sweep)))
    out = mine.run(cfg_for(tmp_path, setup["shards"], str(sweep), variant="k2-m24"))
    assert TopExamples(out.uri).extra["k"] == 2
    wide = tmp_path / "wide" / "layers.1"
    save_sae(TopKSAE(SaeConfig(d_in=D + 1, num_latents=8, k=2)), str(wide))
    with pytest.raises(mine.MineError, match=rf"width {D + 1}.*width {D}"):
        mine.run(cfg_for(tmp_path / "w", setup["shards"], str(wide)))
    with pytest.raises(mine.MineError, match="no activation shards"):
        mine.run(cfg_for(tmp_path / "n", str(tmp_path / "nothing"), setup["sae"]))


def test_reader_answers_the_formats_questions(setup, mined):
    te, out = mined
    rec = te.features()[0]
    i = rec.top_images[0]
    w, h = te.image_size(i)
    assert (w, h) == (20 + i % 7, 16 + i % 5)
    for q in rec.quantiles:
        te.image_size(q["image_idx"])
    for n in rec.negatives:
        te.image_size(n)
    assert te.heatmap_uri(rec.feature, i, "overlay") is None  # heat maps were off
    assert set(te.activation_tokens(rec.feature, 10**6)) == {"feature", "image_idx", "view", "row", "col",
                                                              "token_pos", "act"}
    with pytest.raises(KeyError, match="not in"):
        te.feature(10**6)
    for key in ("hookpoint", "family", "num_latents", "k", "score", "top_k", "n_quantiles", "n_random",
                "features", "figures"):
        assert key in te.extra
    assert te.manifest.inputs["sae"] == setup["sae"] and te.manifest.inputs["shards"] == setup["shards"]
    lines = storage.read_text(storage.join(out.uri, "features.jsonl")).splitlines()
    assert [json.loads(x)["feature"] for x in lines] == list(range(LATENTS))


# ------------------------------------------------------------------------------------------------
# heat maps and ground truth, end to end on a tiny LLaVA-NeXT and a small toy world


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    from mmsae.config import ToyWorldConfig
    from mmsae.data import toyworld
    from mmsae.models import save_tiny
    from mmsae.stages import cache

    root = tmp_path_factory.mktemp("toy")
    world = str(root / "world")
    toyworld.build(ToyWorldConfig(n_train=24, n_heldout=1, min_size=64, max_size=80, shapes=["square", "circle"]), world)
    model = str(save_tiny("llava_next", root / "lmm", text_layers=2))
    cfg = RunConfig()
    cfg.tracking.enabled = False
    cfg.run.workdir = str(root / "work")
    cfg.cache = cfg.cache.model_copy(update={"image_set": world, "model": model, "out": str(root / "acts"),
                                             "layers": [0], "num_workers": 0, "split": "train"})
    cache.run(cfg)
    torch.manual_seed(0)
    sae = TopKSAE(SaeConfig(d_in=64, num_latents=32, k=4))
    save_sae(sae, str(root / "sae" / "layers.0"))
    return {"root": root, "world": world, "shards": str(root / "acts"), "sae": str(root / "sae"), "model": model}


def test_heatmaps_and_ground_truth_end_to_end(toy, tmp_path):
    from PIL import Image

    cfg = cfg_for(tmp_path, toy["shards"], toy["sae"], heatmaps="mined", top_k=3, heatmap_top=2)
    out = mine.run(cfg)
    te = TopExamples(out.uri)
    sizes = {int(i): wh for i, wh in ((r[0], (r[1], r[2])) for r in
                                      json.loads(storage.read_text(toy["shards"] + "/images.json"))["images"])}
    n = 0
    for rec in te.features():
        for rank, i in enumerate(rec.top_images):
            for kind in ("overlay", "masked"):
                uri = te.heatmap_uri(rec.feature, i, kind)
                if rank >= 2:
                    assert uri is None
                    continue
                assert uri.endswith(f"heatmaps/f{rec.feature:06d}/{kind}-{rank:02d}-{i}.png")
                img = Image.open(uri)
                assert img.size == sizes[i] == te.image_size(i)
                n += 1
    assert n == out.figures["heatmaps"] > 0
    gt = te.ground_truth()
    assert gt is not None and gt["kinds"] == ["color", "texture"]
    assert 0 <= out.figures["gt_topk_precision"] <= 1 and 0 <= out.figures["gt_iou"] <= 1
    assert {c["kind"] for c in gt["concepts"]} >= {"color", "texture", "size"}
    assert out.figures["gt_concepts"] == sum(c["kind"] in ("color", "texture") for c in gt["concepts"])
    # every concept also has its best detector over all images, with an F1 from its precision and recall
    for c in gt["concepts"]:
        p, r = c["f1_precision"], c["f1_recall"]
        assert c["f1"] == pytest.approx(2 * p * r / (p + r) if p + r else 0.0)
    assert out.figures["gt_f1"] > out.figures["gt_f1_always_fires"]
    storage.verify_artifact(out.uri, kind="top_examples")


def test_ground_truth_finds_a_planted_feature_and_ignores_shapes(toy):
    from mmsae import groundtruth as GT
    from mmsae.data.images import load_image_set
    from mmsae.heatmaps import load_patch_info

    ds = load_image_set(toy["world"], "train")
    info = load_patch_info(toy["model"])
    concepts = ds["concepts"]
    masks = GT.mask_reader(ds)
    red = [i for i, c in enumerate(concepts) if "color:red" in c][:3]
    assert len(red) == 3
    # feature 5's top images hold red, and its map covers every base-view cell of each image fully
    full = {"view": np.zeros(16, np.int16), "row": np.repeat(np.arange(4), 4).astype(np.int16),
            "col": np.tile(np.arange(4), 4).astype(np.int16), "act": np.ones(16, np.float32)}
    other = [i for i, c in enumerate(concepts) if "color:red" not in c][:3]
    recs = [FeatureRecord(5, 0.1, 0.1, 1.0, 1.0, top=[{"image_idx": i, "score": 1.0} for i in red]),
            FeatureRecord(2, 0.1, 0.1, 1.0, 1.0, top=[{"image_idx": i, "score": 1.0} for i in other])]

    def tokens_of(f, i):
        if f == 5:  # only the red object's cells
            m = masks(i, "color:red")
            h, w = m.shape
            on = np.array([m[int((r + .5) * h / 4), int((c + .5) * w / 4)] for r, c in zip(full["row"], full["col"],
                                                                                         strict=True)])
            return {k: v[on] for k, v in full.items()}
        return full

    matches = GT.concept_matches(recs, concepts, top_k=3, tokens_of=tokens_of, mask_of=masks, info=info)
    by = {m.concept: m for m in matches}
    assert by["color:red"].feature == 5 and by["color:red"].precision == 1.0
    assert by["color:red"].iou > 0.2
    # a whole-image map covers far more than one object's mask
    assert by["color:red"].iou > GT.concept_matches(recs, concepts, top_k=3, tokens_of=lambda f, i: full,
                                                    mask_of=masks, info=info)[
        [m.concept for m in matches].index("color:red")].iou
    assert any(m.kind == "shape" for m in matches)
    fig = GT.summarize(matches, ["color", "texture"])
    assert fig["gt_concepts"] == sum(m.kind in ("color", "texture") for m in matches)
    assert "gt_topk_precision_shape" not in fig
    half = GT.concept_matches(recs, concepts, top_k=6)
    assert {m.concept: m for m in half}["color:red"].precision == 0.5  # empty top slots count as misses

    # two features whose top images all hold red: the one whose map lies on the red object is the match,
    # whatever the ids; without maps to compare, the lower id
    same = [{"image_idx": i, "score": 1.0} for i in red]
    off = {k: v[:1] for k, v in full.items()}  # one corner cell: a map off the object
    for ids in ((1, 5), (5, 1)):
        tied = [FeatureRecord(ids[0], 0.1, 0.1, 1.0, 1.0, top=same), FeatureRecord(ids[1], 0.1, 0.1, 1.0, 1.0, top=same)]

        def by_map(f, i, local=ids[1]):
            return tokens_of(5, i) if f == local else off

        red_match = {m.concept: m for m in GT.concept_matches(tied, concepts, top_k=3, tokens_of=by_map,
                                                              mask_of=masks, info=info)}["color:red"]
        assert (red_match.feature, red_match.tied) == (ids[1], 2)
        assert red_match.iou == pytest.approx(by["color:red"].iou)
    assert {m.concept: m for m in GT.concept_matches(tied, concepts, top_k=3)}["color:red"].feature == 1


def test_component_points_to_the_artifact_and_logs_its_figures(setup, tmp_path):
    from kfp.dsl import Dataset, Metrics, Model

    from mmsae.components.mine import mine as component
    from mmsae.config import dump_config

    cfg = cfg_for(tmp_path, "", "")
    shards = Dataset(name="shards", uri="", metadata={"uri": setup["shards"]})
    sae = Model(name="sae", uri="", metadata={"uri": setup["sae"]})
    top = Dataset(name="top_examples", uri=str(tmp_path / "pointer"))
    top.path = str(tmp_path / "pointer")
    metrics = Metrics(name="metrics", uri=str(tmp_path / "metrics"))
    logged = {}
    metrics.log_metric = lambda k, v: logged.__setitem__(k, v)
    component.python_func(config_yaml=dump_config(cfg), parent_run_id="", shards=shards, sae=sae,
                          top_examples=top, metrics=metrics)
    assert top.metadata["uri"] == str(tmp_path / "mined")
    assert json.loads(Path(top.path).read_text()) == {"uri": str(tmp_path / "mined")}
    assert logged["features_mined"] == LATENTS and logged["images"] == 90
    assert TopExamples(top.metadata["uri"]).manifest.inputs["shards"] == setup["shards"]


@pytest.mark.services
def test_mining_into_s3_and_reading_back(toy, s3_env):
    out = mine.run(cfg_for(Path(toy["root"]) / "s3run", toy["shards"], toy["sae"], out=f"{s3_env}/mined",
                           heatmaps="selected", select="most_active:2", top_k=2))
    te = TopExamples(out.uri)
    assert out.uri.startswith("s3://")
    for f in te.selected:
        rec = te.feature(f)
        png = te.heatmap_bytes(f, rec.top_images[0], "masked")
        assert png is not None and png[:4] == b"\x89PNG"
        assert te.heatmap_uri(f, rec.top_images[0], "overlay").startswith(s3_env)
    unselected = [r for r in te.features() if r.feature not in te.selected and r.top]
    assert unselected and te.heatmap_uri(unselected[0].feature, unselected[0].top_images[0]) is None
    assert out.figures["heatmaps"] == 2 * sum(len(te.feature(f).top) for f in te.selected)
    storage.verify_artifact(out.uri, kind="top_examples")


def test_sample_hash_is_splitmix64():
    def reference(z: int) -> int:  # splitmix64's finaliser on uint64, cut to 62 bits
        m = (1 << 64) - 1
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9 & m
        z = (z ^ (z >> 27)) * 0x94D049BB133111EB & m
        return (z ^ (z >> 31)) & ((1 << 62) - 1)

    values = [0, 1, 2, 12345, 2**40 + 7, 2**62, -5, -(2**63)]
    assert mine._mix(torch.tensor(values)).tolist() == [reference(v % 2**64) for v in values]
