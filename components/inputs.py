"""Component that resolves the run's inputs: the image set and the LMM.

When the config names both (``cache.image_set`` and ``cache.model``) they are checked and passed on;
otherwise the built-in toy world and its trained toy LMM are built (``mmsae.stages.toyworld``).
"""

from kfp import dsl
from kfp.dsl import Dataset, Metrics, Model, Output

from mmsae.components import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def inputs(
    config_yaml: str,
    parent_run_id: str,
    image_set: Output[Dataset],
    lmm: Output[Model],
    metrics: Output[Metrics],
):
    """Point ``image_set`` and ``lmm`` at the configured URIs, or at a freshly built toy world."""
    from mmsae import storage
    from mmsae.components.metrics import log_figures
    from mmsae.components.pointers import write_pointer
    from mmsae.config import config_from_yaml
    from mmsae.stages import toyworld

    cfg = config_from_yaml(config_yaml)
    if bool(cfg.cache.image_set) != bool(cfg.cache.model):
        given, missing = ("cache.image_set", "cache.model") if cfg.cache.image_set else ("cache.model",
                                                                                         "cache.image_set")
        raise ValueError(f"{given} is set but {missing} is empty: give both, or neither for the toy world")
    if cfg.cache.image_set and cfg.cache.model:
        for what, uri in (("cache.image_set", cfg.cache.image_set), ("cache.model", cfg.cache.model)):
            if not storage.exists(uri):
                raise FileNotFoundError(f"{what} = {uri} does not exist")
        write_pointer(image_set, cfg.cache.image_set)
        write_pointer(lmm, cfg.cache.model)
        return
    out = toyworld.run(cfg, parent_run_id=parent_run_id or None)
    write_pointer(image_set, out.uri)
    write_pointer(lmm, out.uris["lmm"])
    log_figures(metrics, out.figures)
