"""The mine stage: streaming top-K against brute force, samples, maps, bounded memory, selection, ground truth."""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from mmsae import activations, mining, storage
from mmsae.config import MineConfig, RunConfig
from mmsae.examples import FeatureRecord, TopExamples
from mmsae.sae.checkpoint import save_sae
from mmsae.sae.model import SaeConfig, TopKSAE
from mmsae.selection import SelectionError, select_features
from mmsae.stages import mine
from mmsae.stages._base import KEY_FIELD, OutputMismatchError, read_summaries

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


def make_shards(uri: str, n_images: int, images_per_shard: int, first_image: int = 0,
                poison: dict[int, float] | None = None, count_nonfinite: bool = False) -> str:
    """Shards of generated activations; ``poison`` sets the first token of those images to a value (NaN or
    inf), ``count_nonfinite`` records the rows holding NaN or inf per shard, as the cache stage does."""
    rng = np.random.default_rng(0)
    files, refs, sizes = [], [], []
    for s, lo in enumerate(range(first_image, first_image + n_images, images_per_shard)):
        hi = min(lo + images_per_shard, first_image + n_images)
        parts = {c: [] for c in activations.COLUMNS}
        for i in range(lo, hi):
            lay = image_rows(i, rng)
            n = len(lay["view"])
            acts = acts_for(i, n)
            if i in (poison or {}):
                acts[0, 1] = poison[i]
            parts["acts"].append(acts)
            parts["image_idx"].append(torch.full((n,), i))
            parts["token_pos"].append(torch.arange(3, 3 + n))
            for c in ("view", "row", "col"):
                parts[c].append(torch.tensor(lay[c]))
            sizes.append([i, 20 + i % 7, 16 + i % 5])
        cols = {c: torch.cat(v) for c, v in parts.items()}
        name = f"layers.1/{activations.shard_name(0, s)}"
        storage.write_bytes(storage.join(uri, name), activations.encode_shard(cols, {"hookpoint": "layers.1"}))
        files.append(name)
        refs.append({"name": name, "rows": int(cols["acts"].shape[0]), "first_image": lo, "end_image": hi})
        if count_nonfinite:
            refs[-1]["nonfinite"] = int((~torch.isfinite(cols["acts"])).any(1).sum())
    storage.write_bytes(storage.join(uri, "images.json"), json.dumps({"images": sizes, "skipped": []}).encode())
    files.append("images.json")
    storage.write_manifest(uri, activations.KIND, files=files, extra={
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


def miner_for(num_latents: int, image_labels: torch.Tensor | None = None, purge_slack: int = mining.PURGE_SLACK,
              **settings) -> mining.Miner:
    """A miner with the given mine settings (the config's defaults for the rest)."""
    return mining.Miner.from_config(MineConfig(**settings), num_latents, image_labels=image_labels,
                                    purge_slack=purge_slack)


@functools.lru_cache(maxsize=4)
def brute_force(shards: str, sae_path: str, score: str = "max", tokens: str = "image"):
    """Every image's score per feature from the dense latents of all rows at once."""
    from mmsae.sae.checkpoint import load_sae

    sae = load_sae(sae_path)
    cols = {c: torch.cat(v) for c, v in zip(activations.COLUMNS, zip(*[
        [s[c] for c in activations.COLUMNS] for s in activations.ActivationShards(shards).iter_shards()], strict=True), strict=True)}
    keep = activations.token_mask(cols, tokens)
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
    from mmsae import groundtruth
    from mmsae.sae.checkpoint import load_sae

    bf = brute_force(setup["shards"], setup["sae_dir"])
    n = max(bf["images"]) + 1
    g = torch.Generator().manual_seed(3)
    concepts = [[c for c in ("a:x", "a:y", "b:z") if torch.rand(1, generator=g) < 0.4] for _ in range(n)]
    names, labels = groundtruth.concept_labels(concepts)
    assert names == sorted({c for cs in concepts for c in cs})
    assert all(bool(labels[i, names.index(c)]) == (c in concepts[i]) for i in range(n) for c in names)
    sae = load_sae(setup["sae_dir"])
    miner = miner_for(LATENTS, top_k=2, n_quantiles=0, n_random=0, image_labels=labels, max_block=LATENTS * 4)
    with torch.inference_mode():
        for cols in activations.ActivationShards(setup["shards"]).iter_shards():
            keep = activations.token_mask(cols, "image")
            miner.add_shard({c: v[keep] for c, v in cols.items()},
                                  lambda x: tuple(sae.encode(x)[:2]), 60)
    extra = miner.finish().label_counts
    fires = bf["scores"] > 0  # [features, images]
    lab = labels[bf["images"]].long()  # [images, concepts]
    assert torch.equal(extra["label_hits"], (fires.long() @ lab))
    assert torch.equal(extra["label_images"], lab.sum(0))
    assert torch.equal(extra["image_count"], fires.sum(1))
    det = groundtruth.best_detectors(extra["label_hits"], extra["image_count"], extra["label_images"], names,
                            list(range(LATENTS)))
    for j, c in enumerate(names):
        f1 = 2 * (fires.long() @ lab)[:, j].double() / (fires.sum(1) + lab[:, j].sum()).double()
        assert det[c].f1 == pytest.approx(float(f1.max()))
        assert det[c].feature == int(f1.argmax())
    with pytest.raises(mining.MineError, match="no labels"):
        miner_for(LATENTS, image_labels=labels[:1]).add(torch.ones(1, 1), torch.zeros(1, 1, dtype=torch.long), {
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
    keys = miner_for(LATENTS, n_random=4).image_keys(torch.tensor(bf["images"]))
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
                         if k < mining.EMPTY_KEY and i not in top)
        n, out = len(entries), []
        for q in range(n_quantiles):
            bucket = entries[q * n // n_quantiles: (q + 1) * n // n_quantiles]
            out += [(i, s, q) for s, i, _ in sorted(bucket, key=lambda e: e[2])[:per_q]]
        return out

    g = torch.Generator().manual_seed(n_quantiles * 100 + per_q * 10 + pool)
    for _ in range(20):
        m = miner_for(16, top_k=3, n_quantiles=n_quantiles, quantile_examples=per_q, quantile_pool=pool, n_random=0)
        shape = m.quantile_key.shape
        m.quantile_key = torch.randint(0, 40, shape, generator=g)
        m.quantile_key[torch.rand(shape, generator=g) < 0.3] = mining.EMPTY_KEY
        m.quantile_image = torch.where(m.quantile_key == mining.EMPTY_KEY, -1, torch.randint(0, 12, shape, generator=g))
        m.quantile_score = torch.randint(0, 4, shape, generator=g).float()
        m.top_image = torch.randint(-1, 12, (16, 3), generator=g)
        image, score, quantile = (t.tolist() for t in m._quantile_table())
        for p in range(16):
            want = by_definition(m.quantile_key[p].tolist(), m.quantile_image[p].tolist(), m.quantile_score[p].tolist(),
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
        miner = miner_for(LATENTS, top_k=3, n_quantiles=2, quantile_pool=2, n_random=2, purge_slack=0)
        with torch.no_grad():
            for cols in activations.ActivationShards(uri).iter_shards():
                keep = activations.token_mask(cols, "image")
                miner.add_shard({c: v[keep] for c, v in cols.items()}, encode, batch_rows=64)
        fixed = miner.state_bytes() - miner.map_store_bytes()
        return miner.peak_state_bytes, fixed, miner.tokens

    small, fixed_small, tok_small = peak(240)
    large, fixed_large, tok_large = peak(960)
    assert tok_large > 3.5 * tok_small
    assert fixed_large == fixed_small
    # the maps of the held pairs: at most features x (top 3 + pool 4) pairs x 14 image tokens, 24 bytes a row;
    # the store may grow PURGE_GROWTH times past them, plus one batch, before it is purged
    held = LATENTS * (3 + 4) * 14 * 24
    bound = fixed_small + mining.PURGE_GROWTH * held + 64 * K * 24
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
    assert select_features(recs, "all") == [0, 1, 2, 3, 4, 5]
    assert select_features(recs, "ids:4,1,99") == [1, 4]
    assert select_features(recs, "frequency:0.005..0.05") == [1, 3]
    assert select_features(recs, "most_active:3") == [2, 3, 4]  # ties of 0.2 both in
    assert select_features(recs, "most_active:1") == [2]  # tie broken by the lower id
    r1 = select_features(recs, "random:3", seed=1)
    assert r1 == select_features(recs, "random:3", seed=1) and len(r1) == 3 and 0 not in r1
    draws = {tuple(select_features(recs, "random:2", seed=s)) for s in range(20)}
    assert len(draws) > 3
    assert select_features(recs, "random:50") == [1, 2, 3, 4, 5]
    for bad in ("some", "frequency:0.5..0.1", "ids:", "random:x"):
        with pytest.raises(SelectionError, match="feature selection"):
            select_features(recs, bad)


def test_selected_features_are_recorded_in_the_manifest(setup, tmp_path):
    out = mine.run(cfg_for(tmp_path, setup["shards"], setup["sae"], select="most_active:4"))
    te = TopExamples(out.uri)
    freq = sorted(te.features(), key=lambda r: (-r.frequency, r.feature))[:4]
    assert te.selected == sorted(r.feature for r in freq)
    assert out.figures["features_selected"] == 4


def overwriting(cfg: RunConfig) -> RunConfig:
    cfg.run.overwrite = True
    return cfg


def test_sealed_artifact_is_reused_and_another_config_or_input_is_refused_unless_overwrite(setup, tmp_path,
                                                                                          monkeypatch):
    cfg = cfg_for(tmp_path, setup["shards"], setup["sae"])
    first = mine.run(cfg)
    manifest = tmp_path / "mined" / "manifest.json"
    stamp = manifest.stat().st_mtime_ns

    def boom(*a, **k):
        raise AssertionError("mined again")

    monkeypatch.setattr(mining.Miner, "add", boom)
    again = mine.run(cfg)
    assert again.figures == first.figures
    # settings that only bound memory or place the work do not make another artifact
    bounded = mine.run(cfg_for(tmp_path, setup["shards"], setup["sae"], batch_rows=7, max_block=LATENTS,
                               device="cpu"))
    assert bounded.figures == first.figures
    assert manifest.stat().st_mtime_ns == stamp
    # another config at the same out: refused, naming the setting, and left as it was
    with pytest.raises(OutputMismatchError, match=r"setting top_k: 5 -> 2.*run.overwrite=true"):
        mine.run(cfg_for(tmp_path, setup["shards"], setup["sae"], top_k=2))
    assert manifest.stat().st_mtime_ns == stamp
    storage.verify_artifact(first.uri, kind="top_examples")
    monkeypatch.undo()
    other = mine.run(overwriting(cfg_for(tmp_path, setup["shards"], setup["sae"], top_k=2)))
    te = TopExamples(other.uri)
    assert te.extra["top_k"] == 2 and all(len(r.top) <= 2 for r in te.features())
    storage.verify_artifact(other.uri, kind="top_examples")
    # the same URIs with rewritten inputs: refused, naming the input; with run.overwrite mined again
    shards = make_shards(str(tmp_path / "acts"), n_images=30, images_per_shard=13)
    assert mine.run(cfg_for(tmp_path / "rw", shards, setup["sae"])).figures["images"] == 30
    make_shards(shards, n_images=20, images_per_shard=13)
    with pytest.raises(OutputMismatchError, match="input shards was rewritten"):
        mine.run(cfg_for(tmp_path / "rw", shards, setup["sae"]))
    assert mine.run(overwriting(cfg_for(tmp_path / "rw", shards, setup["sae"]))).figures["images"] == 20


def test_a_rewritten_sae_is_refused_and_overwrite_mines_the_new_one(setup, tmp_path):
    sae = make_sae(tmp_path / "sae", seed=0)  # one SAE folder in sparsify's layout: no manifest
    cfg = cfg_for(tmp_path, setup["shards"], sae)
    first = mine.run(cfg)
    before = TopExamples(first.uri).features()
    make_sae(tmp_path / "sae", seed=1)  # another SAE at the same path
    with pytest.raises(OutputMismatchError, match="input sae was rewritten"):
        mine.run(cfg)
    assert TopExamples(first.uri).features() == before  # the sealed artifact is left as it was
    again = mine.run(overwriting(cfg))
    after = TopExamples(again.uri).features()
    bf = brute_force.__wrapped__(setup["shards"], sae)  # the new SAE (the cache is keyed by path)
    for rec in after:
        s = bf["scores"][rec.feature]
        expect = [bf["images"][j] for j in torch.argsort(s, descending=True)[:5].tolist() if s[j] > 0]
        assert rec.top_images == expect, rec.feature
    assert [r.top_images for r in after] != [r.top_images for r in before]
    assert again.figures["mean_l0"] == pytest.approx(float((bf["dense"] > 0).sum(1).float().mean()))
    assert again.figures["mean_l0"] != first.figures["mean_l0"]
    assert read_summaries(cfg.run.workdir, cfg.cache.layers[0])["mine"] == again.figures
    assert TopExamples(again.uri).extra[KEY_FIELD] == mine.output_key(
        cfg.mine.model_copy(update={"out": again.uri})).to_json()


@pytest.mark.parametrize("score", ["max", "mean"])
def test_batch_rows_and_max_block_do_not_change_the_artifacts_files(setup, tmp_path, score, single_thread):
    # what lets them stay out of the output key
    a = mine.run(cfg_for(tmp_path / "a", setup["shards"], setup["sae"], score=score, tokens="all"))
    b = mine.run(cfg_for(tmp_path / "b", setup["shards"], setup["sae"], score=score, tokens="all", batch_rows=7,
                         max_block=LATENTS))
    files_a, files_b = ({n: e.sha256 for n, e in storage.read_manifest(x.uri).files.items()} for x in (a, b))
    assert files_a == files_b and set(files_a) >= {"features.jsonl", "maps.safetensors", "images.json"}


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


def strict_json(text: str):
    """``json.loads`` that refuses the non-standard constants NaN, Infinity and -Infinity."""
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


@pytest.mark.parametrize("value", [math.inf, math.nan])
def test_shards_counted_with_nan_or_inf_are_refused_before_mining(setup, tmp_path, monkeypatch, value):
    shards = make_shards(str(tmp_path / "acts"), n_images=30, images_per_shard=13, poison={20: value, 21: value},
                         count_nonfinite=True)

    def boom(*a, **k):
        raise AssertionError("mined")

    monkeypatch.setattr(mining.Miner, "add", boom)
    with pytest.raises(mine.MineError, match=r"1 shards .*shard-000-00001\.safetensors \(2 rows\).*"
                                             r"cache\.model_dtype=float32"):
        mine.run(cfg_for(tmp_path, shards, setup["sae"]))
    assert not (tmp_path / "mined" / "manifest.json").exists()


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
def test_uncounted_shards_with_nan_or_inf_are_refused_while_mining_naming_the_shard(setup, tmp_path, value):
    # shards cached before the count was recorded: the codes are checked as they are encoded
    shards = make_shards(str(tmp_path / "acts"), n_images=30, images_per_shard=13, poison={27: value})
    assert activations.ActivationShards(shards).shards()[-1].nonfinite is None
    with pytest.raises(mine.MineError, match=r"shard-000-00002\.safetensors .* NaN or inf .*not recorded.*"
                                             r"cache\.model_dtype=float32"):
        mine.run(cfg_for(tmp_path, shards, setup["sae"]))
    assert not (tmp_path / "mined" / "manifest.json").exists()
    miner = miner_for(LATENTS)
    cols = {"image_idx": torch.tensor([0, 0]), "view": torch.zeros(2), "row": torch.zeros(2),
            "col": torch.zeros(2), "token_pos": torch.arange(2, dtype=torch.int32)}
    with pytest.raises(mining.NonFiniteCodesError, match="1 of 2 encoded rows"):
        miner.add(torch.tensor([[1.0, 0.5], [value, 0.1]]), torch.tensor([[0, 1], [2, 3]]), cols)


def test_every_json_file_of_the_artifact_is_standard_json(toy, tmp_path):
    out = mine.run(cfg_for(tmp_path, toy["shards"], toy["sae"], heatmaps="mined", top_k=2, heatmap_top=1))
    names = [n for n in storage.read_manifest(out.uri).files if n.endswith((".json", ".jsonl"))] + ["manifest.json"]
    assert {"features.jsonl", "images.json", "ground_truth.json"} <= set(names)
    for name in names:
        text = (Path(out.uri) / name).read_text()
        for line in text.splitlines() if name.endswith(".jsonl") else [text]:
            strict_json(line)


def test_activation_histograms_count_every_active_token_in_doubling_linear_bins(setup, mined):
    te, _ = mined
    bf = brute_force(setup["shards"], setup["sae_dir"])
    bins = mining.HISTOGRAM_BINS
    for rec in te.features():
        col = bf["dense"][:, rec.feature]
        on = col[col > 0].double()
        assert len(rec.histogram) == bins and sum(rec.histogram) == on.numel()
        if not on.numel():
            assert rec.histogram_upper == 0.0
            continue
        # the range: the smallest power of two above the largest activation
        upper = 2.0 ** math.floor(math.log2(float(on.max())) + 1)
        assert rec.histogram_upper == upper and rec.histogram_upper / 2 <= rec.max_activation < upper
        expect = torch.bincount((on * bins / upper).floor().long(), minlength=bins)
        assert rec.histogram == expect.tolist(), rec.feature


def test_histogram_counts_do_not_depend_on_the_order_or_batching_of_values():
    from mmsae.histogram import DoublingHistogram

    g = torch.Generator().manual_seed(0)
    values = torch.rand(4000, generator=g) ** 3 * torch.tensor([0.01, 1.0, 300.0, 2.0**-30]).repeat(1000)
    rows = torch.arange(4).repeat(1000)
    whole = DoublingHistogram(4, 16)
    whole.add(rows, values)
    parts = DoublingHistogram(4, 16)
    order = torch.randperm(4000, generator=g)
    for chunk in order.split(37):  # small chunks first: the ranges double many times
        parts.add(rows[chunk], values[chunk])
    assert torch.equal(whole.counts, parts.counts) and torch.equal(whole.upper(), parts.upper())
    assert whole.counts.sum(1).tolist() == [1000] * 4
    with pytest.raises(ValueError, match="power of two"):
        DoublingHistogram(4, 12)


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


def test_format_1_artifacts_are_still_read_and_later_formats_refused(mined, tmp_path):
    import shutil

    te, out = mined
    assert te.manifest.format_version == 2
    old = tmp_path / "v1"
    shutil.copytree(out.uri, old)
    lines = [json.loads(x) for x in (old / "features.jsonl").read_text().splitlines()]
    for line in lines:
        for name in ("histogram", "histogram_upper", "promoted", "suppressed"):
            line.pop(name)
    (old / "features.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    manifest = storage.read_manifest(str(old))
    storage.write_manifest(str(old), "top_examples", files=[n for n in manifest.files], extra=manifest.extra,
                           format_version=1)
    records = TopExamples(str(old)).features()
    assert [r.top for r in records] == [r.top for r in te.features()]
    assert all(r.histogram == [] and r.promoted == [] for r in records)
    storage.write_manifest(str(old), "top_examples", files=[n for n in manifest.files], extra=manifest.extra,
                           format_version=3)
    with pytest.raises(storage.ManifestError, match="format version 3.*reads versions"):
        TopExamples(str(old))


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


def test_heatmaps_are_bounded_in_size_aligned_and_ground_truth_keeps_the_original_resolution(toy, tmp_path):
    from PIL import Image

    from mmsae.data.images import load_image_set
    from mmsae.heatmaps import activation_map, load_patch_info, render_masked

    small = mine.run(cfg_for(tmp_path / "small", toy["shards"], toy["sae"], heatmaps="mined", top_k=3,
                             heatmap_top=1, heatmap_max_side=40))
    full = mine.run(cfg_for(tmp_path / "full", toy["shards"], toy["sae"], heatmaps="mined", top_k=3,
                            heatmap_top=1, heatmap_max_side=None))
    te, te_full = TopExamples(small.uri), TopExamples(full.uri)
    assert te.extra["heatmap_max_side"] == 40
    images = load_image_set(toy["world"], "train")
    info = load_patch_info(toy["model"])
    checked = 0
    for rec in te.features():
        for i in rec.top_images[:1]:
            w, h = te.image_size(i)
            png = Image.open(te.heatmap_uri(rec.feature, i, "masked"))
            assert max(png.size) == 40 and abs(png.size[0] / png.size[1] - w / h) < 0.05  # aspect ratio kept
            assert Image.open(te_full.heatmap_uri(rec.feature, i, "masked")).size == (w, h)
            # aligned: the full-size rendering scaled down is the small rendering, up to resampling
            heat = activation_map(te.activation_tokens(rec.feature, i), (h, w), info)
            scaled = render_masked(images[i]["image"].convert("RGB"), heat).resize(png.size, Image.Resampling.BOX)
            diff = np.abs(np.asarray(scaled, np.float32) - np.asarray(png.convert("RGB"), np.float32))
            assert diff.mean() < 4, (rec.feature, i, diff.mean())
            checked += 1
    assert checked > 10
    assert small.figures["heatmaps"] == full.figures["heatmaps"]
    # ground truth measures IoU on maps at the images' own resolution, whatever size the PNGs are drawn at
    gt = {k: v for k, v in small.figures.items() if k.startswith("gt_")}
    assert gt and gt == {k: v for k, v in full.figures.items() if k.startswith("gt_")}


def test_logit_tokens_are_the_unembedding_of_each_decoder_direction(toy, tmp_path):
    from transformers import AutoTokenizer

    from mmsae.models import load_lmm
    from mmsae.sae.checkpoint import load_sae

    out = mine.run(cfg_for(tmp_path, toy["shards"], toy["sae"], logit_tokens=4))
    lmm = load_lmm(toy["model"])
    head = lmm.model.get_output_embeddings().weight.detach()
    gain = lmm.model.model.language_model.norm.weight.detach()
    tokenizer = AutoTokenizer.from_pretrained(toy["model"])
    sae = load_sae(str(Path(toy["sae"]) / "layers.0"))
    for rec in TopExamples(out.uri).features():
        direction = sae.W_dec.detach()[rec.feature]
        logits = head @ (gain * direction / direction.norm())
        for got, order in ((rec.promoted, True), (rec.suppressed, False)):
            values, ids = logits.sort(descending=order)
            # a token that is a part of a character is named as the tokenizer names it
            names = [tokenizer.decode([i]) for i in ids[:4].tolist()]
            names = [n if "\ufffd" not in n else tokenizer.convert_ids_to_tokens(i)
                     for n, i in zip(names, ids[:4].tolist(), strict=True)]
            assert [t["token"] for t in got] == names
            np.testing.assert_allclose([t["logit"] for t in got], values[:4].tolist(), rtol=1e-4, atol=1e-5)
    # off, or a hook point whose width is not the unembedding's: no logit tokens, mining goes on
    off = mine.run(cfg_for(tmp_path / "off", toy["shards"], toy["sae"], logit_tokens=0))
    assert all(not r.promoted and not r.suppressed for r in TopExamples(off.uri).features())


def test_a_model_without_lm_head_weights_gives_no_logit_tokens(toy, tmp_path):
    import shutil

    from mmsae import unembed

    model = tmp_path / "model"
    shutil.copytree(toy["model"], model)
    (model / "model.safetensors").unlink()
    assert unembed.load_unembedding(str(model)) is None


def test_ground_truth_finds_a_planted_feature_and_ignores_shapes(toy):
    from mmsae import groundtruth
    from mmsae.data.images import load_image_set
    from mmsae.heatmaps import load_patch_info

    ds = load_image_set(toy["world"], "train")
    info = load_patch_info(toy["model"])
    concepts = ds["concepts"]
    masks = groundtruth.mask_reader(ds)
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

    matches = groundtruth.concept_matches(recs, concepts, top_k=3, tokens_of=tokens_of, mask_of=masks, info=info)
    by = {m.concept: m for m in matches}
    assert by["color:red"].feature == 5 and by["color:red"].precision == 1.0
    assert by["color:red"].iou > 0.2
    # a whole-image map covers far more than one object's mask
    assert by["color:red"].iou > groundtruth.concept_matches(recs, concepts, top_k=3, tokens_of=lambda f, i: full,
                                                    mask_of=masks, info=info)[
        [m.concept for m in matches].index("color:red")].iou
    assert any(m.kind == "shape" for m in matches)
    fig = groundtruth.summarize(matches, ["color", "texture"])
    assert fig["gt_concepts"] == sum(m.kind in ("color", "texture") for m in matches)
    assert "gt_topk_precision_shape" not in fig
    half = groundtruth.concept_matches(recs, concepts, top_k=6)
    assert {m.concept: m for m in half}["color:red"].precision == 0.5  # empty top slots count as misses

    # two features whose top images all hold red: the one whose map lies on the red object is the match,
    # whatever the ids; without maps to compare, the lower id
    same = [{"image_idx": i, "score": 1.0} for i in red]
    off = {k: v[:1] for k, v in full.items()}  # one corner cell: a map off the object
    for ids in ((1, 5), (5, 1)):
        tied = [FeatureRecord(ids[0], 0.1, 0.1, 1.0, 1.0, top=same), FeatureRecord(ids[1], 0.1, 0.1, 1.0, 1.0, top=same)]

        def by_map(f, i, local=ids[1]):
            return tokens_of(5, i) if f == local else off

        red_match = {m.concept: m for m in groundtruth.concept_matches(tied, concepts, top_k=3, tokens_of=by_map,
                                                              mask_of=masks, info=info)}["color:red"]
        assert (red_match.feature, red_match.tied) == (ids[1], 2)
        assert red_match.iou == pytest.approx(by["color:red"].iou)
    assert {m.concept: m for m in groundtruth.concept_matches(tied, concepts, top_k=3)}["color:red"].feature == 1


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
    assert mining.splitmix(torch.tensor(values)).tolist() == [reference(v % 2**64) for v in values]
