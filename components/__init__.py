"""KFP components: one thin wrapper per stage around ``mmsae.stages.<stage>.run``.

Each component receives the whole run config as YAML text (so one schema governs the CLI, the components
and the tests), the URIs of its inputs and the MLflow parent run id; it writes the URIs of its big outputs
into small pointer artifacts. Components run in images with ``mmsae`` and ``kfp`` preinstalled, named at
compile time by the variables below, so they install nothing at start; building those images is part of
the cluster deployment, not of this package.
"""

import os

#: Image of the CPU stages; override at compile time with $MMSAE_BASE_IMAGE.
BASE_IMAGE = os.environ.get("MMSAE_BASE_IMAGE", "ghcr.io/mmsae/mmsae-base:0.1.0")
#: Image of the GPU stages (CUDA + DeepSpeed); override with $MMSAE_TRAIN_IMAGE.
TRAIN_IMAGE = os.environ.get("MMSAE_TRAIN_IMAGE", "ghcr.io/mmsae/mmsae-train:0.1.0")
