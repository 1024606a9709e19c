"""The work over layers, planned: one layer's run config, the inputs' fingerprint and the next layer a
recurring run should (re)train (what the components of `mmsae.components.layers` run; no KFP here).

A per-layer run config is the run config with ``cache.layers`` set to that one layer and every stage output
under ``<run.workdir>/layers/<layer>/<stage>`` (an output set in the config gets ``/layer-<layer>`` appended),
so the layers of one run never share a folder. Its first line is a YAML comment naming the inputs'
fingerprint, so the KFP cache key of every per-layer task changes when the image set or the LMM changes.
"""

import hashlib
from collections.abc import Callable, Sequence

import yaml

from mmsae import storage

#: Config sections whose ``out`` is a stage's output folder.
STAGE_OUTPUTS = ("cache", "train", "mine", "explain", "score", "steer", "attribute", "report")
#: What a fingerprint of the inputs is made of (the names of the shards' key fingerprints).
INPUT_NAMES = ("image_set", "model")


def parse_layer(text: str) -> int | str:
    """A layer as the pipeline passes it (text) back as configured: ``"3"`` -> 3, names stay text."""
    value = yaml.safe_load(text)
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"layer {text!r} is neither a layer index nor a hook-point name")
    return value


def config_for_layer(cfg, layer: int | str):
    """The run config of one layer: ``cache.layers = [layer]`` and per-layer stage outputs."""
    from mmsae.stages._base import layer_slug

    cfg = cfg.model_copy(deep=True)
    cfg.cache.layers = [layer]
    slug = layer_slug(layer)
    for section_name in STAGE_OUTPUTS:
        section = getattr(cfg, section_name, None)
        if section is None or not hasattr(section, "out"):
            continue
        given = section.out
        section.out = (storage.join(given, f"layer-{slug}") if given
                       else storage.join(cfg.run.workdir, "layers", slug, section_name))
    return cfg


def inputs_fingerprint(image_set: str, model: str) -> str:
    """One short fingerprint of the image set and the LMM (changes when either is rewritten)."""
    prints = [storage.fingerprint(image_set), storage.fingerprint(model)]
    return hashlib.sha256("\0".join(prints).encode()).hexdigest()[:16]


def sae_staleness(sae_uri: str, fingerprints: dict[str, str]) -> str | None:
    """Why the SAE at ``sae_uri`` is out of date (its shards were cached from another image set or LMM than
    ``fingerprints``, by input name), or None when it is current."""
    from mmsae.stages._base import KEY_FIELD

    try:
        shards_uri = storage.read_manifest(sae_uri).inputs["shards"]
        recorded = storage.read_manifest(shards_uri).extra[KEY_FIELD]["fingerprints"]
    except (FileNotFoundError, KeyError, TypeError, storage.ManifestError) as e:
        return f"its shards' input fingerprints cannot be read ({e})"
    changed = [name for name in INPUT_NAMES if recorded.get(name) != fingerprints[name]]
    return f"{' and '.join(changed)} changed since" if changed else None


def choose_layer(layers: Sequence[int | str], finished_sae: Callable[[int | str], str | None],
                 staleness: Callable[[str], str | None]) -> tuple[int | str | None, str]:
    """The next layer to (re)train and why: the first layer with no finished SAE, else the first whose SAE
    is stale; ``(None, reason)`` when every layer is current."""
    stale = []
    for layer in layers:
        sae = finished_sae(layer)
        if sae is None:
            return layer, f"layer {layer} has no finished SAE"
        reason = staleness(sae)
        if reason:
            stale.append((layer, f"layer {layer}'s SAE at {sae} is stale: {reason}"))
    if stale:
        return stale[0]
    return None, f"every configured layer ({', '.join(map(str, layers))}) has a current SAE: nothing to do"


def finished_sae_in_mlflow(cfg, layer: int | str) -> str | None:
    """Where the newest FINISHED train stage run tagged with ``layer`` wrote its SAE (its param ``train.out``),
    from MLflow; None if there is none."""
    from mlflow import MlflowClient

    from mmsae import tracking

    client = MlflowClient(tracking_uri=tracking.resolve_tracking_uri(cfg.tracking.uri))
    experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    if experiment is None:
        return None
    runs = client.search_runs(
        [experiment.experiment_id], max_results=1, order_by=["attributes.start_time DESC"],
        filter_string=(f"tags.`{tracking.TAG_STAGE}` = 'train' and tags.`{tracking.TAG_LAYER}` = '{layer}' "
                       "and attributes.status = 'FINISHED'"))
    return runs[0].data.params.get("train.out") if runs else None
