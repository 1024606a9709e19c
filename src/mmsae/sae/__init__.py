"""TopK sparse autoencoder: module and losses (:mod:`.model`), sparse kernels (:mod:`.kernels`),
checkpoints in sparsify's and SAELens' layouts (:mod:`.checkpoint`). Reads and writes nothing on import."""

from mmsae.sae.model import EncoderOutput, ForwardOutput, SaeConfig, SaeConfigError, TopKSAE, geometric_median

__all__ = [
    "EncoderOutput",
    "ForwardOutput",
    "SaeConfig",
    "SaeConfigError",
    "TopKSAE",
    "geometric_median",
]
