"""Components that plan the work over layers: the configured layers, one layer's run config (headed by the
inputs' fingerprint), and the next layer a recurring run should (re)train; the logic is in
`mmsae.components.planning`.
"""

from kfp import dsl
from kfp.dsl import Dataset, Input, Model

from mmsae.components import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def plan_layers(config_yaml: str, parent_run_id: str) -> list:
    """One item per configured layer (``cache.layers``), one SAE each: ``{"layer": <layer as text>,
    "parent_run_id": ...}``; the loop's steps take both from their item alone."""
    from mmsae.config import config_from_yaml

    return [{"layer": str(layer), "parent_run_id": parent_run_id}
            for layer in config_from_yaml(config_yaml).cache.layers]


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def layer_config(config_yaml: str, layer: str, image_set: Input[Dataset], lmm: Input[Model]) -> str:
    """The run config of one layer (see the module), headed by the inputs' fingerprint."""
    from mmsae.components.planning import config_for_layer, inputs_fingerprint, parse_layer
    from mmsae.components.pointers import read_pointer
    from mmsae.config import config_from_yaml, dump_config

    fingerprint = inputs_fingerprint(read_pointer(image_set), read_pointer(lmm))
    cfg = config_for_layer(config_from_yaml(config_yaml), parse_layer(layer))
    return f"# inputs fingerprint: {fingerprint}\n{dump_config(cfg)}"


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def next_layer(config_yaml: str, image_set: Input[Dataset], lmm: Input[Model]) -> str:
    """The next configured layer to (re)train, as text; '' when every layer has a current SAE."""
    import logging

    from mmsae import storage
    from mmsae.components.planning import choose_layer, finished_sae_in_mlflow, sae_staleness
    from mmsae.components.pointers import read_pointer
    from mmsae.config import config_from_yaml

    logging.basicConfig(level=logging.INFO)
    cfg = config_from_yaml(config_yaml)
    fingerprints = {"image_set": storage.fingerprint(read_pointer(image_set)),
                    "model": storage.fingerprint(read_pointer(lmm))}
    layer, reason = choose_layer(cfg.cache.layers, lambda each: finished_sae_in_mlflow(cfg, each),
                                 lambda sae: sae_staleness(sae, fingerprints))
    logging.getLogger("mmsae.next_layer").info(reason)
    return "" if layer is None else str(layer)
