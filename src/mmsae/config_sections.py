"""The sections of the run config: one pydantic model per stage (and for the run, tracking and the toy world).

`mmsae.config` assembles them into :class:`~mmsae.config.RunConfig` and reads, overrides and writes it; import
them from there. Every section forbids unknown keys; field docstrings are the settings' help text.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class ConfigError(ValueError):
    """A config file or override that does not fit the schema; the message names the dotted key."""


DEFAULT_SEED = 0
"""``run.seed`` when none is given (and the seed of a seeded section built on its own)."""


class Section(BaseModel):
    # overrides are parsed as YAML, so `run.name=2024` arrives as a number: text fields take it as text
    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True,
                              coerce_numbers_to_str=True)


class SeededSection(Section):
    """A section with a ``seed`` field (``int | None = None``, declared by each section) that defaults
    to ``run.seed`` (given by :class:`RunConfig`'s validation).

    Built on its own, a section whose seed is unset takes :data:`DEFAULT_SEED`. ``seed`` counts as set
    (``model_fields_set``) only when it was given as an int, so :class:`RunConfig` knows which to replace.
    """

    @model_validator(mode="after")
    def _seed_alone(self) -> SeededSection:
        if self.seed is None:
            self.__dict__["seed"] = DEFAULT_SEED  # bypasses assignment validation: no recursion
            self.model_fields_set.discard("seed")
        return self


class RunSection(Section):
    name: str = "mmsae"
    """Name of the run: the MLflow parent run's name and the default output folder's name."""
    workdir: str = "runs/mmsae"
    """Local path or s3:// URI under which stages write their artifacts unless a stage names its own."""
    seed: int = DEFAULT_SEED
    """Seed of every random choice of the run: each section's `seed` left unset (or null) takes this value;
    a section's own seed, when set, wins."""
    overwrite: bool = False
    """Replace a stage's existing output (sealed or partial) that was made from another config or other
    inputs; without it such an output is refused with an error naming what changed."""


class TrackingConfig(Section):
    enabled: bool = True
    """Log every stage to MLflow."""
    uri: str | None = None
    """MLflow tracking URI; default: $MLFLOW_TRACKING_URI, else a sqlite file `mlflow.db` in the working directory."""
    experiment: str = "mmsae"
    """MLflow experiment name (ignored when $MLFLOW_EXPERIMENT_ID or $MLFLOW_RUN_ID are set by Kubeflow)."""


class ToyWorldConfig(SeededSection):
    n_train: int = Field(6000, ge=1)
    """Number of training images."""
    n_heldout: int = Field(500, ge=1)
    """Number of held-out images (disjoint seeds), used to measure the toy LMM's captions."""
    min_size: int = Field(64, ge=32)
    """Smallest image side in pixels."""
    max_size: int = Field(64, ge=32)
    """Largest image side in pixels. 96 gives varied aspect ratios and multi-tile AnyRes views, which the toy
    LMM learns more slowly (more image tokens per image); the default 64 x 64 keeps its training short."""
    size_step: int = Field(8, ge=1)
    """Image sides are min_size plus a multiple of this."""
    long_side_max: bool = True
    """The longer image side is always max_size and only the other one varies (aspect ratios still do); False:
    both sides vary independently."""
    max_objects: int = Field(2, ge=1, le=4)
    """Most objects per scene (at least one)."""
    colors: list[str] = ["red", "green", "blue", "yellow", "purple", "orange", "white"]
    """Object colours (names known to the generator)."""
    textures: list[str] = ["solid", "striped", "dotted", "checkered"]
    """Object textures (names known to the generator)."""
    shapes: list[str] = ["square"]
    """Object shapes; shapes are hard for the toy LMM, so no threshold depends on them."""
    seed: int | None = None
    """Seed of the generator: the same seed gives the same images, byte for byte; default run.seed."""


class ToyLMMConfig(SeededSection):
    base_size: int = Field(64, ge=16)
    """Side of the base view (and of each AnyRes tile) in pixels."""
    patch_size: int = Field(16, ge=2)
    """Vision patch size in pixels (must divide base_size)."""
    grid_pinpoints: list[list[int]] | None = None
    """AnyRes resolutions as [height, width] pairs, multiples of base_size; default: every grid of up to 2x2
    tiles ([[b, b], [b, 2b], [2b, b], [2b, 2b]] for b = base_size)."""
    vision_hidden: int = Field(128, ge=8)
    """Width of the CLIP vision tower."""
    vision_layers: int = Field(3, ge=1)
    """Depth of the CLIP vision tower."""
    vision_heads: int = Field(4, ge=1)
    """Attention heads of the CLIP vision tower."""
    text_hidden: int = Field(128, ge=8)
    """Width of the Llama text model."""
    text_layers: int = Field(2, ge=1)
    """Depth of the Llama text model."""
    text_heads: int = Field(4, ge=1)
    """Attention heads of the Llama text model (half as many key/value heads)."""
    steps: int = Field(1500, ge=1)
    """Optimiser steps of caption training (the result depends on steps, never on wall time)."""
    batch_size: int = Field(32, ge=1)
    """Images per training step."""
    lr: float = Field(2e-3, gt=0)
    """Peak learning rate (linear warm-up, cosine decay)."""
    warmup_frac: float = Field(0.05, ge=0, lt=1)
    """Fraction of the steps spent warming the learning rate up linearly from zero."""
    min_lr_frac: float = Field(0.05, ge=0, le=1)
    """Learning rate at the last step, as a fraction of the peak."""
    weight_decay: float = Field(0.01, ge=0)
    """AdamW weight decay."""
    eval_batch_size: int = Field(100, ge=1)
    """Held-out images per batch of greedy captioning when measuring accuracy."""
    seed: int | None = None
    """Seed of the model's initialisation and of the batch order; default run.seed."""


class CacheConfig(Section):
    image_set: str = ""
    """Image set URI (HF dataset on disk, parquet or image folder; local or s3://); empty: the pipeline's input."""
    split: str | None = None
    """Split of a DatasetDict to read (default: `train`, or the only split)."""
    model: str = ""
    """LMM URI (save_pretrained directory, local or s3://); empty: the pipeline's input."""
    out: str = ""
    """Where to write the activation shards; empty: `<run.workdir>/cache`."""
    layers: list[int | str] = [-2]
    """Hook points: decoder-layer indices (negative from the end) or module names; one shard set each."""
    tokens: Literal["image", "text", "all"] = "image"
    """Which tokens to keep: image tokens (every view, newline tokens included), text tokens, or all."""
    views: Literal["all", "base"] = "all"
    """Image tokens of which views to keep: every AnyRes view (newline tokens included), or the base view only
    (one low-resolution view per image); text tokens are not affected."""
    token_fraction: float = Field(1.0, gt=0, le=1)
    """Share of the kept tokens to cache: each token is kept or not by a hash of (token_seed, image index,
    position), so the choice is the same on every run, rank and resume."""
    token_seed: int = 0
    """Seed of the token_fraction choice."""
    prompt: str | None = None
    """Text around the image, with `<image>` where the image goes; default: the model's own (or `<image>`)."""
    batch_size: int = Field(8, ge=1)
    """Images per forward pass."""
    shard_rows: int = Field(65536, ge=1)
    """Rows (tokens) per shard, at least; shards hold whole images."""
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    """Storage dtype of the activations."""
    model_dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    """Dtype the model runs in (bfloat16 on GPUs)."""
    device: str = "auto"
    """`auto` (cuda when present, with one device per local rank), `cpu` or `cuda:N`."""
    max_images: int | None = Field(None, ge=1)
    """Cache only the first N images of the set."""
    num_workers: int = Field(1, ge=0)
    """Image-decoding and preprocessing worker processes (0: in the main process)."""
    writers: int = Field(2, ge=1)
    """Shard sets encoded and written at once by background threads (each set's record and progress are still
    written in order). Host memory: the set being filled and up to writers + 1 sets in flight, each holding its
    rows (shard_rows x width x dtype bytes per hook point) and, while written, their concatenated and encoded
    copies; the forward passes wait beyond that."""
    max_skipped: float = Field(0.05, ge=0)
    """Most images that may fail to decode before the stage fails: a share of the image set when below 1
    (0.05: 5 %), else a count; every skipped image is listed in the manifest by name either way."""


class SaeVariant(Section):
    name: str = ""
    """Folder name of this SAE under train.out (default: `k{k}-m{num_latents}`)."""
    num_latents: int | None = Field(None, ge=1)
    """Dictionary width; default train.num_latents."""
    k: int | None = Field(None, ge=1)
    """Active latents per token; default train.k."""


class TrainConfig(SeededSection):
    shards: str = ""
    """Activation-shard artifact URI; empty: the pipeline's input (or `<run.workdir>/cache`)."""
    out: str = ""
    """Where the SAE checkpoints go; empty: `<run.workdir>/train`."""
    hookpoints: list[str] = []
    """Hook points of the shards to train on (one SAE each); empty: all of them."""
    num_latents: int | None = Field(None, ge=1)
    """Dictionary width; default `expansion_factor * d`."""
    expansion_factor: int = Field(32, ge=1)
    """Width as a multiple of the activation width, when num_latents is not given."""
    k: int = Field(64, ge=1)
    """Active latents per token (TopK)."""
    init_from: str = ""
    """Continue from SAEs in sparsify's layout at this URI (`<hookpoint>/cfg.json + sae.safetensors`, per
    variant folder for a sweep), e.g. a released SAE; their width and k replace num_latents and k."""
    sweep: list[SaeVariant] = []
    """Several SAEs trained at once from one pass over the data (each a width and k); empty: one SAE."""
    tokens: Literal["image", "text", "all"] = "all"
    """Which cached tokens to train on."""
    batch_size: int = Field(4096, ge=2)
    """Tokens per optimiser step, over all ranks (must divide by the world size)."""
    epochs: int = Field(1, ge=1)
    """Passes over the training tokens."""
    max_steps: int | None = Field(None, ge=1)
    """Stop after this many steps (default: the end of the last epoch)."""
    window_shards: int = Field(4, ge=1)
    """Shards read and shuffled together (rows of a window are permuted; shard order too, per epoch)."""
    lr: float | None = Field(None, gt=0)
    """Peak learning rate; default 2e-4 / sqrt(num_latents / 2**14)."""
    lr_warmup_steps: int = Field(1000, ge=0)
    """Linear warm-up steps (capped at a tenth of the run)."""
    lr_decay: Literal["cosine", "linear", "none"] = "cosine"
    """Decay after warm-up, down to lr_final_fraction of the peak."""
    lr_final_fraction: float = Field(0.1, ge=0, le=1)
    """Final learning rate as a fraction of the peak."""
    auxk_alpha: float = Field(1 / 32, ge=0)
    """Weight of the AuxK loss on dead latents (0 disables it)."""
    k_aux: int | None = Field(None, ge=1)
    """Dead latents used by AuxK; default d / 2."""
    dead_tokens: int = Field(10_000_000, ge=1)
    """A latent is dead when it has not fired for this many tokens."""
    multi_topk: bool = False
    """Add the Multi-TopK loss (4k latents, weight 1/8)."""
    b_dec_init: Literal["geometric_median", "mean"] = "geometric_median"
    """How the decoder bias is initialised from the first batch."""
    grad_clip: float = Field(0.0, ge=0)
    """Clip the gradient norm to this value (0: off). The norm is one over every trained parameter, so it is
    refused with a sweep, whose SAEs would then not train as they would alone."""
    zero_stage: int = Field(2, ge=0, le=2)
    """DeepSpeed ZeRO stage: 0, 1 or 2 (optimizer state and gradients sharded; the SAE weights stay whole).
    With one rank, stage 0 is used (nothing to partition)."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """`auto`: bf16 autocast on GPUs (fp32 master weights), fp32 on the CPU."""
    device: str = "auto"
    """`auto` (cuda:LOCAL_RANK when present), `cpu` or `cuda:N`."""
    heldout_fraction: float = Field(0.05, ge=0, lt=1)
    """Share of images held out of training, for the final FVU figures."""
    eval_lm_images: int = Field(64, ge=0)
    """Held-out captioned images on which to measure the LM loss with the SAE spliced in (0: off; needs an
    image set with a `caption` column)."""
    checkpoint_every: int = Field(1000, ge=1)
    """Save the full training state every this many steps (and at the end)."""
    keep_checkpoints: int = Field(2, ge=1)
    """Training states kept (the newest); older ones are deleted once a newer one is saved."""
    log_every: int = Field(50, ge=1)
    """Log metrics every this many steps."""
    seed: int | None = None
    """Seed of initialisation, data order and the held-out split; default run.seed."""
    cpu_shm_comm: bool = False
    """On the CPU, build DeepSpeed's shared-memory collective op (a C++ compile, done once)."""
    gpus_per_node: int = Field(0, ge=0)
    """Pipeline step: ranks started on each node, one per GPU; 0: every GPU the step sees (in a TrainJob, the
    step's GPU request). More than one: the step starts them with torchrun in its pod; one: in-process. Set
    on a machine without GPUs, it starts that many CPU ranks."""
    nodes: int = Field(1, ge=1)
    """Pipeline step: nodes to train on. More than one: the step runs the training as a Kubeflow Trainer
    TrainJob of this many nodes (with the step's resources, tolerations, node selector and env) and waits
    for it; its outputs must then be on shared storage (s3://)."""
    job_runtime: str = "torch-distributed"
    """nodes > 1: the ClusterTrainingRuntime the TrainJob runs under (a torchrun runtime, which sets
    PET_NNODES, PET_NODE_RANK, PET_MASTER_ADDR and PET_MASTER_PORT)."""
    job_namespace: str = ""
    """nodes > 1: namespace of the TrainJob; empty: the step's own."""
    job_overrides: Literal["podTemplateOverrides", "podSpecOverrides", "runtimePatches"] = "podTemplateOverrides"
    """nodes > 1: the TrainJob field that carries the nodes' tolerations, node selector, affinity and volumes,
    whose name depends on the Trainer release (`kubectl explain trainjob.spec` lists the one it knows); a
    field the cluster does not know is refused when the TrainJob is created."""

    @model_validator(mode="after")
    def _clip_alone(self) -> TrainConfig:
        if self.grad_clip > 0 and len(self.sweep) > 1:
            raise ValueError("grad_clip > 0 with a sweep of several SAEs: the clipped norm would be one over "
                             "all of them; train them separately or set grad_clip to 0")
        return self


class MineConfig(SeededSection):
    shards: str = ""
    """Activation-shard artifact URI; empty: the pipeline's input (or `<run.workdir>/cache`)."""
    sae: str = ""
    """SAE URI: the train stage's output, or one SAE folder in sparsify's layout (cfg.json + sae.safetensors);
    empty: the pipeline's input (or `<run.workdir>/train`)."""
    out: str = ""
    """Where the top examples go; empty: `<run.workdir>/mine`."""
    hookpoint: str = ""
    """Hook point to mine (its shards and its SAE); empty: the shards' first hook point."""
    variant: str = ""
    """SAE of a sweep to mine (its folder under the train stage's output); empty: the only one."""
    features: list[int] = []
    """Latents to mine; empty: every latent of the SAE."""
    tokens: Literal["image", "text", "all"] = "image"
    """Which cached tokens count: image tokens (every view, newline tokens included), text tokens, or all."""
    score: Literal["max", "mean"] = "max"
    """Image score of a feature: its max or its mean activation over the image's tokens (zeros included)."""
    top_k: int = Field(10, ge=1)
    """Top images kept per feature."""
    n_quantiles: int = Field(5, ge=0)
    """Score quantiles from which activating images outside the top are sampled (0: none)."""
    quantile_examples: int = Field(1, ge=1)
    """Images sampled per quantile."""
    quantile_pool: int = Field(2, ge=1)
    """Oversampling of the uniform sample of activating images that the quantiles are cut from: the sample
    holds quantile_pool * n_quantiles * quantile_examples images per feature."""
    n_random: int = Field(5, ge=0)
    """Random images per feature on which it never fires (negatives), drawn from one seeded sample of
    max(64, 16 * n_random) images (fewer for a feature that fires on almost all of them)."""
    batch_rows: int = Field(8192, ge=1)
    """Tokens per SAE encode call (whole images; at least one image)."""
    max_block: int = Field(2**22, ge=1)
    """Most (feature, image) scores computed at once; bounds the per-batch working memory."""
    select: str = Field("all", pattern=r"^(all|ids:\d+(,\d+)*|most_active:\d+|random:\d+|"
                        r"frequency:(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?\.\.(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?)$")
    """Features later stages take: `all`, `ids:3,17,42`, `frequency:LO..HI` (share of tokens, inclusive),
    `most_active:N` (highest token frequency) or `random:N` (seeded, among features that fire)."""
    heatmaps: Literal["mined", "selected", "none"] = "mined"
    """Heat-map PNGs of the top images of every mined feature, of the selected ones only, or none."""
    heatmap_top: int | None = Field(None, ge=1)
    """Heat maps for this many of each feature's top images; default all of them."""
    heatmap_max_side: int | None = Field(384, ge=16)
    """Long side in pixels of the heat-map PNGs: larger images are drawn scaled down to it (aspect ratio kept;
    the map is sampled at the original image's geometry, so it stays aligned); null: the images' own size."""
    logit_tokens: int = Field(10, ge=0)
    """Tokens each feature's decoder direction promotes and suppresses most through the LMM's unembedding
    (top and bottom of W_U · diag(final norm weight) · W_dec[f]), when the shards name a model with an LM
    head whose width is the SAE's; 0: not computed."""
    gt_kinds: list[str] = ["color", "texture"]
    """Concept kinds of an image set with ground truth (`kind:name` concepts + masks) that the ground-truth
    figures average over; shapes are not learnt by the toy LMM, so leave them out."""
    gt_iou_threshold: float = Field(0.5, gt=0, lt=1)
    """Ground-truth IoU: the heat map is cut at this fraction of its own maximum before it meets the mask."""
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    """Dtype the SAE encodes in."""
    device: str = "auto"
    """`auto` (cuda when present), `cpu` or `cuda:N`."""
    seed: int | None = None
    """Seed of the quantile, negative and random-selection samples; default run.seed."""


class ExplainConfig(Section):
    top_examples: str = ""
    """Top-examples artifact URI (the mine stage's output); empty: the pipeline's input (or
    `<run.workdir>/mine`)."""
    out: str = ""
    """Where the explanations go; empty: `<run.workdir>/explain`."""
    cache: str = ""
    """Folder of the response cache (one small JSON file per question asked), so that a rerun, a retried
    step or another layer of the run never asks the same question twice; empty:
    `<run.workdir>/explain-cache`."""
    backend: Literal["auto", "openai", "local"] = "auto"
    """Who explains: `openai`, an OpenAI-compatible chat-completions server serving a vision LMM (vLLM,
    SGLang, KServe, a hosted API); `local`, a LLaVA-family checkpoint in this process, which captions each
    masked image and keeps the concept words most captions share; `auto`: openai when explain.endpoint or
    $OPENAI_BASE_URL is set, else local."""
    endpoint: str = ""
    """openai: the API's base URL, e.g. `http://vllm:8000/v1`; empty: $OPENAI_BASE_URL. The API key is read
    from $OPENAI_API_KEY only, never from the config."""
    model: str = ""
    """openai: the name of the model the server serves (required); local: the checkpoint's URI (default: the
    model the shards were cached from)."""
    prompt_template: str = ""
    """openai: the explanation prompt, a template file (path or s3:// URI; format in the packaged
    mmsae/templates/explain_prompt.txt, after the paper's prompt); empty: the packaged one."""
    detect_template: str = ""
    """openai: the detection prompt the score stage asks (format in mmsae/templates/detect_prompt.txt); empty:
    the packaged one."""
    max_images: int = Field(5, ge=1)
    """Masked top images shown per feature: the first of its top images that have a masked heat map."""
    image_long_side: int | None = Field(384, ge=16)
    """openai: each image is scaled so its long side has this many pixels (aspect ratio kept) and sent as a
    base64 PNG; null: as the mine stage rendered it."""
    max_new_tokens: int | None = Field(None, ge=1)
    """Most tokens per reply; default: 300 from a server, the checkpoint's own generation config locally."""
    temperature: float = Field(0.0, ge=0)
    """openai: sampling temperature (0: greedy, as the paper); the local backend is always greedy."""
    concurrency: int = Field(32, ge=1)
    """Requests in flight at once (sized for one vLLM server); the local backend captions the images of the
    requests in flight together."""
    timeout_s: float = Field(120.0, gt=0)
    """openai: seconds an attempt may take before it is abandoned and retried."""
    max_retries: int = Field(5, ge=0)
    """openai: retries of an attempt that timed out, was rate-limited (429; Retry-After is honoured) or met a
    server error (5xx), with exponential backoff. After the last the stage fails with one error naming the
    endpoint; the answers so far stay in the cache."""
    vocabulary: list[str] = []
    """local: the concept words (or phrases) looked for in the captions, as whole words; empty: the toy
    world's colours and textures."""
    agreement: float = Field(0.5, ge=0, lt=1)
    """local: a concept word explains a feature when more than this share of its images' captions name it."""
    batch_size: int = Field(16, ge=1)
    """local: images per generate call."""
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    """local: dtype the checkpoint runs in."""
    device: str = "auto"
    """local: `auto` (cuda when present), `cpu` or `cuda:N`."""


class ScoreConfig(SeededSection):
    explanations: str = ""
    """Explanations artifact URI (the explain stage's output); empty: the pipeline's input (or
    `<run.workdir>/explain`)."""
    top_examples: str = ""
    """Top-examples artifact URI the explanations were made from (the mine stage's output); empty: the pipeline's
    input (or `<run.workdir>/mine`)."""
    out: str = ""
    """Where the scores go; empty: `<run.workdir>/score`."""
    scorers: list[Literal["iou", "clip", "detection", "ground_truth"]] = ["iou", "clip", "detection", "ground_truth"]
    """Scorers to run, each beside its random baseline (the explanation paired with another feature's images):
    `iou` (the feature's activation mask against a segmentation of what the explanation names), `clip` (CLIP
    score of the explanation against the top images), `detection` (can the explainer tell activating from
    non-activating images by the explanation: balanced accuracy) and `ground_truth` (does the explanation name
    the planted concept; toy world). A scorer that cannot run (no model configured, no planted concepts) is
    skipped with a logged reason."""
    top_images: int = Field(5, ge=1)
    """Top images per feature that IoU and CLIP score are measured on (the paper's top 5)."""
    iou_threshold: float = Field(0.5, gt=0, lt=1)
    """IoU: the activation map (full resolution, every view) is cut at this fraction of its own maximum."""
    grounding_model: str = ""
    """IoU on images without planted concepts: a GroundingDINO checkpoint (save_pretrained folder, local or
    s3://, e.g. IDEA-Research/grounding-dino-base) that finds boxes of what the explanation names; needs
    score.sam_model. Empty on the toy world: the planted concepts' own masks are the segmentation."""
    sam_model: str = ""
    """IoU: a SAM checkpoint (save_pretrained folder, local or s3://, e.g. facebook/sam-vit-huge) that turns
    the grounding boxes into masks."""
    box_threshold: float = Field(0.3, ge=0, le=1)
    """IoU: GroundingDINO's box score threshold (the paper's 0.3)."""
    text_threshold: float = Field(0.25, ge=0, le=1)
    """IoU: GroundingDINO's text score threshold."""
    clip_model: str = ""
    """CLIP score: a CLIP checkpoint (save_pretrained folder, local or s3://, e.g. openai/clip-vit-base-patch32);
    empty: the CLIP score is skipped."""
    detect_images: int = Field(5, ge=1)
    """Detection: activating images (the mine stage's quantile samples, else its top images) and as many
    non-activating ones (its negatives) shown per feature, at most."""
    batch_size: int = Field(8, ge=1)
    """Images per forward pass of CLIP, GroundingDINO and SAM."""
    concurrency: int = Field(16, ge=1)
    """Detection requests in flight at once (the explainer bounds its own concurrency too)."""
    device: str = "auto"
    """Where CLIP, GroundingDINO and SAM run: `auto` (cuda when present), `cpu` or `cuda:N`."""
    seed: int | None = None
    """Seed of the random baseline's pairing and of the order detection shows images in; default run.seed."""


class SteerConfig(SeededSection):
    top_examples: str = ""
    """Top-examples artifact URI (the mine stage's output): the SAE, its hook point, the LMM and image set the
    shards were cached from, each feature's max activation and, on the toy world, the planted concepts; empty:
    the pipeline's input (or `<run.workdir>/mine`)."""
    explanations: str = ""
    """Explanations artifact URI (the explain stage's output): the features explained with status ok are steered
    and their explanations' words are the concept looked for; empty: the pipeline's input (or
    `<run.workdir>/explain` when it exists)."""
    attributions: str = ""
    """Attributions artifact URI (the attribute stage's output), read when steer.source is `attributed`."""
    out: str = ""
    """Where the steering results go; empty: `<run.workdir>/steer`."""
    features: list[int] = []
    """Features to steer; empty: as steer.source says."""
    source: Literal["explained", "attributed"] = "explained"
    """Without steer.features: `explained`, the features the explain stage explained with status ok; `attributed`,
    the features the attribute stage attributed most (steer.attribution_top per example of steer.attributions)."""
    max_features: int = Field(64, ge=1)
    """Most features steered (the first ones of the list)."""
    attribution_top: int = Field(1, ge=1)
    """Top attributed features taken per example from steer.attributions."""
    strengths: list[float] = [1.0, 2.0, 4.0, 8.0]
    """Clamp values (a dose-response curve over them), in steer.strength_unit."""
    strength_unit: Literal["max_activation", "absolute"] = "max_activation"
    """`max_activation`: a strength is a multiple of the feature's max activation (the mine stage's); `absolute`:
    the value in the SAE's activation units."""
    positions: list[Literal["image", "prompt", "generated"]] = ["image", "prompt", "generated"]
    """Where the feature is clamped: image tokens, the prompt's text tokens, generated tokens (KV-cached, each as
    it is fed back). At the last decoder layer image tokens cannot reach the output (a warning says so)."""
    prompts: list[str] = []
    """Prompt texts (with `<image>` where the image goes), each paired with every image; empty: the prompt the
    shards were cached with (the model's own captioning prompt)."""
    images: int = Field(8, ge=1)
    """Held-out images steered on: the image set's `heldout` split when it has one, else images of the cached
    split that the train stage held out (train.heldout_fraction, train.seed)."""
    max_new_tokens: int = Field(16, ge=1)
    """Tokens generated per output (greedy)."""
    random_baseline: bool = True
    """Also steer one random feature per steered feature (seeded, among features that fire) at the same
    strengths, judged against the steered feature's concept: the baseline of every figure."""
    batch_size: int = Field(64, ge=1)
    """Generations per batch (features, strengths and prompts mixed; prompts left-padded)."""
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    """Dtype the LMM runs in (the SAE runs in float32)."""
    device: str = "auto"
    """`auto` (cuda when present), `cpu` or `cuda:N`."""
    seed: int | None = None
    """Seed of the random-feature baseline; default run.seed."""


class AttributionExample(Section):
    image_idx: int = Field(ge=0)
    """Image of the image set's split (steer's held-out split rule) the prompt shows."""
    prompt: str
    """Prompt text with `<image>` where the image goes; the answer is the token predicted after it."""
    answer: str
    """The answer token (a single token of the tokenizer)."""
    baseline: str
    """The token the answer is compared with: the metric is logit(answer) - logit(baseline)."""


class AttributeConfig(SeededSection):
    top_examples: str = ""
    """Top-examples artifact URI (the mine stage's output): the SAE, its hook point, the LMM and the image set;
    empty: the pipeline's input (or `<run.workdir>/mine`)."""
    out: str = ""
    """Where the attributions go; empty: `<run.workdir>/attribute`."""
    examples: list[AttributionExample] = []
    """Prompts with an image and an answer/baseline token pair; empty: held-out images captioned by the LMM
    itself, each cut before the first word of attribute.answer_words its caption names (the answer), against
    the word of that list the LMM ranks highest after it (the baseline)."""
    images: int = Field(16, ge=1)
    """Automatic examples: held-out images captioned (steer's held-out rule)."""
    answer_words: list[str] = []
    """Automatic examples: the words an answer is one of (whole words, single tokens); empty: the toy world's
    colours."""
    max_new_tokens: int = Field(16, ge=1)
    """Automatic examples: tokens of each caption generated."""
    top_features: int = Field(10, ge=1)
    """Features listed per example, by attribution (highest first)."""
    heatmaps: int = Field(3, ge=0)
    """Per example, image-token attribution maps drawn on the image for this many top features."""
    batch_size: int = Field(8, ge=1)
    """Examples per forward and backward pass."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Dtype the LMM runs in (the SAE runs in float32)."""
    device: str = "auto"
    """`auto` (cuda when present), `cpu` or `cuda:N`."""
    seed: int | None = None
    """Seed of the random baseline of the toy-world figures; default run.seed."""


class ReportConfig(Section):
    top_examples: str = ""
    """Top-examples artifact URI (the mine stage's output); default RUN.WORKDIR/mine."""
    explanations: str = ""
    """Explanations JSONL (a .jsonl file or an artifact folder holding one); empty: none shown."""
    scores: str = ""
    """Scores JSONL (a .jsonl file or an artifact folder holding one); empty: none shown."""
    steering: str = ""
    """Steering results: the steer stage's artifact folder (its rows, and each feature's dose-response from
    dose_response.json or, when absent, computed from the rows) or a steering .jsonl file; empty: none shown."""
    attributions: str = ""
    """Attributions artifact URI (the attribute stage's output folder); empty: no Attributions section."""
    attribution_examples: int = Field(24, ge=0)
    """Most attributed examples shown in the Attributions section (in the artifact's order), each with its prompt,
    answer and heat maps; a feature's card lists every example it is a top feature of."""
    out: str = ""
    """Output folder (local path or s3:// URI) for index.html; default RUN.WORKDIR/report."""
    title: str = ""
    """Page title; default `mmsae report: <run.name>`."""
    max_detail_features: int = Field(200, ge=0)
    """Most features shown in detail (images, heat maps, explanation, scores, steering); the index lists all."""
    detail_order: Literal["selected", "feature", "frequency", "max_activation", "score"] = "selected"
    """Which features get the detail sections when there are more than max_detail_features: the mine stage's
    selection (the features later stages explain) then highest max activation, lowest id, most frequent,
    highest max activation, or best mean score (features without scores last)."""
    images_per_feature: int = Field(9, ge=1)
    """Most top images (with heat maps) shown per feature."""
    heatmap: Literal["overlay", "masked", "both"] = "overlay"
    """Heat-map style shown: overlay (magnitude over the image), masked (inactive regions darkened), or both."""
    image_width: int = Field(160, ge=16)
    """Display size of each heat map in CSS pixels (its long side). Embedded at twice that size at most (sharp
    on HiDPI screens, and shown at that size when the image is clicked), as JPEG or PNG, whichever is
    smaller; small images are scaled up without smoothing."""
