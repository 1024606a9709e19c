"""Stage train: TopK sparse autoencoders on cached activations, trained through DeepSpeed.

Reads: an activation-shard artifact (``train.shards``). Writes to ``train.out``: per SAE
``[<variant>/]<hookpoint>/cfg.json + sae.safetensors`` (EleutherAI sparsify's layout), ``metrics.json``,
``state/`` (DeepSpeed checkpoints with the data position and dead-latent counters, for resume) and a
manifest of kind ``sae`` written last.

One process or many: started in-process for one rank, or by the ``deepspeed`` launcher / ``torchrun``
(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT); nothing assumes SSH. Each shard of a window is
read by one rank and the rows are exchanged (a gloo group of the data stream's own), so every rank trains
on its slice of each global batch while storage is read once; the losses are normalised by the global
batch's variance, so W ranks compute the same step as one rank with the same global batch.
Several SAEs (a sweep over width and k, or several hook points) train from one pass over the data.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from mmsae import activations as A
from mmsae import storage, tracking
from mmsae.config import RunConfig, TrainConfig
from mmsae.stages.common import record_summary, stage_uri

log = logging.getLogger(__name__)

STEP = "train"
KIND = "sae"
STATE_DIR = "state"
RESUME_KEY = "resume-key.json"
"""Beside the training states: the config and inputs they belong to; a run resumes only from its own."""
_NOT_TRAINING = ("out", "log_every", "checkpoint_every", "keep_checkpoints", "eval_lm_images", "device",
                 "cpu_shm_comm")
"""Settings that may change between a run and its resumption (they do not change what is trained)."""


class TrainError(RuntimeError):
    """Training cannot start or go on; the message says what is wrong with which input."""


@dataclass(frozen=True)
class TrainOutputs:
    uri: str
    figures: dict[str, Any]


@dataclass(frozen=True)
class Variant:
    name: str
    hookpoint: str
    num_latents: int
    k: int
    lr: float

    @property
    def key(self) -> str:
        """Name inside the DeepSpeed module (no dots allowed)."""
        return f"{self.name}__{self.hookpoint}".replace(".", "_")

    @property
    def path(self) -> str:
        return f"{self.name}/{self.hookpoint}" if self.name else self.hookpoint


def run(cfg: RunConfig, shards: str | None = None, parent_run_id: str | None = None) -> TrainOutputs:
    """Train the configured SAE(s); ``shards`` overrides ``train.shards`` (the pipeline's input)."""
    t = cfg.train.model_copy(update={
        "shards": shards or cfg.train.shards or stage_uri(cfg.run.workdir, "cache"),
        "out": cfg.train.out or stage_uri(cfg.run.workdir, STEP),
    })
    with process_group(t) as (rank, world, local_rank), tracking.stage_run(
        STEP, parent_run_id=parent_run_id, config={"train": t.model_dump(mode="json")},
        uri=cfg.tracking.uri, experiment=cfg.tracking.experiment, enabled=cfg.tracking.enabled and rank == 0,
    ) as tr:
        figures = Trainer(t, rank, world, local_rank, tr).fit()
        if rank == 0:
            record_summary(cfg.run.workdir, STEP, figures)
    return TrainOutputs(t.out, figures)


# ---------------------------------------------------------------------------------------------------
# processes and devices


_LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@contextlib.contextmanager
def process_group(t: TrainConfig) -> Iterator[tuple[int, int, int]]:
    """Join the launcher's process group through DeepSpeed, or make a one-rank group in-process.

    Yields ``(rank, world, local_rank)``. A one-rank group made here lives only as long as the block:
    it rests on an in-memory store (no port is bound), and the launcher variables DeepSpeed reads
    are set for the block only, so the process (a test run, a notebook, a KFP driver that spawns
    more stages) is left as it was found.
    """
    import deepspeed

    if not (torch.cuda.is_available() and t.device != "cpu") and not t.cpu_shm_comm:
        # The shared-memory collective op is a C++ extension compiled on first use (minutes); gloo
        # does the same job without it. Marking it incompatible makes DeepSpeed skip the build.
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    backend = "nccl" if torch.cuda.is_available() and t.device != "cpu" else "gloo"
    if "RANK" in os.environ or torch.distributed.is_initialized():  # a launcher (or the caller) owns it
        if not torch.distributed.is_initialized():
            deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
        yield (torch.distributed.get_rank(), torch.distributed.get_world_size(),
               int(os.environ.get("LOCAL_RANK", "0")))
        return
    saved = {k: os.environ.get(k) for k in _LAUNCHER_ENV}
    os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "0"})
    try:
        torch.distributed.init_process_group(backend, store=torch.distributed.HashStore(), rank=0, world_size=1)
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
        yield 0, 1, 0
    finally:
        if torch.distributed.is_initialized():
            import deepspeed.comm

            deepspeed.comm.destroy_process_group()  # also drops DeepSpeed's cached subgroups
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _device(t: TrainConfig, local_rank: int) -> torch.device:
    if t.device == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    return torch.device(t.device)


def default_lr(num_latents: int) -> float:
    """The inverse-square-root scaling of Gao et al.: 2e-4 at 16k latents."""
    return 2e-4 / math.sqrt(num_latents / 2**14)


def lr_multiplier(step: int, total: int, warmup: int, decay: str, final: float) -> float:
    """Warm-up then decay, as a multiple of the peak learning rate, for optimiser step ``step``."""
    warmup = min(warmup, max(1, total // 10))
    if step < warmup:
        return (step + 1) / warmup
    if decay == "none" or total <= warmup:
        return 1.0
    frac = min(1.0, (step - warmup) / max(1, total - warmup))
    shape = 0.5 * (1 + math.cos(math.pi * frac)) if decay == "cosine" else 1.0 - frac
    return final + (1.0 - final) * shape


# ---------------------------------------------------------------------------------------------------
# the module DeepSpeed trains: every SAE of the run


@torch.no_grad()
def global_variance(x: torch.Tensor, world: int) -> torch.Tensor:
    """Σ‖x − mean‖² over the global batch, of which every rank holds a slice ``x`` (a constant: no gradient)."""
    x = x.float()
    stats = torch.cat([x.sum(0), x.pow(2).sum(0), torch.tensor([x.shape[0]], dtype=torch.float32, device=x.device)])
    if world > 1:
        torch.distributed.all_reduce(stats)
    d = x.shape[1]
    s, s2, n = stats[:d], stats[d : 2 * d], stats[-1]
    return (s2 - s * s / n).sum()


class SaeBundle(nn.Module):
    """All SAEs of a run in one module; ``forward`` returns the summed loss of one global step."""

    def __init__(self, variants: list[Variant], dims: dict[str, int] | int, t: TrainConfig):
        from mmsae.sae.model import SaeConfig, TopKSAE

        super().__init__()
        self.variants = variants
        self.saes = nn.ModuleDict()
        for v in variants:
            d = dims if isinstance(dims, int) else dims[v.hookpoint]
            sae_cfg = SaeConfig(d_in=d, num_latents=v.num_latents, k=v.k, multi_topk=t.multi_topk,
                                expansion_factor=max(1, v.num_latents // d))
            self.saes[v.key] = TopKSAE(sae_cfg)
        # ZeRO keeps a master copy of the weights that in-place rescaling would not reach, so decoder rows
        # are normalised in the forward pass (which also removes the gradient along each row)
        for sae in self.saes.values():
            sae.normalize_in_forward = True

    def forward(self, batch: dict[str, torch.Tensor], dead: dict[str, torch.Tensor], variance: dict[str, torch.Tensor],
                t: TrainConfig, world: int):
        total = None
        outs = {}
        for v in self.variants:
            sae = self.saes[v.key]
            out = sae(batch[v.hookpoint], dead_mask=dead[v.key] if t.auxk_alpha > 0 else None, k_aux=t.k_aux,
                      total_variance=variance[v.hookpoint], variance_of=lambda z: global_variance(z, world))
            loss, losses, metrics = sae.training_step_losses(out, auxk_alpha=t.auxk_alpha)
            outs[v.key] = (out, losses, metrics)
            # DeepSpeed averages gradients over ranks; each rank holds a slice of the global sums
            total = loss * world if total is None else total + loss * world
        return total, outs


def build_engine(bundle: SaeBundle, t: TrainConfig, world: int, total_steps: int):
    """The DeepSpeed engine that trains ``bundle`` over ``world`` ranks (one Adam group per SAE).

    With one rank ZeRO stage 0 is used whatever ``t.zero_stage`` says, and the engine's gradient all-reduce
    is switched off: there is nothing to partition or reduce. Measured on the CPU at 32 768 × 1024, 4096
    tokens: ZeRO-2 on one rank added ~0.95 s of CPU time per 5 s step (every gradient copied into its flat
    buffers during backward, the fp32 partition copied back after the update), stage 0's all-reduce of a
    one-member group ~0.65 s (all gradients flattened into one buffer and copied back); together the
    difference between ~55 % and ~63 % of the dense-encoder limit (``python -m bench train``).
    """
    import deepspeed

    stage = t.zero_stage if world > 1 else 0
    groups = [{"params": list(bundle.saes[v.key].parameters()), "lr": v.lr} for v in bundle.variants]
    # torch's fused Adam (CPU and CUDA): no DeepSpeed op to compile, and the fastest update measured here
    optimizer = torch.optim.Adam(groups, betas=(0.9, 0.999), eps=6.25e-10, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_multiplier(s, total_steps, t.lr_warmup_steps, t.lr_decay, t.lr_final_fraction))
    ds_config = {
        "train_batch_size": t.batch_size,
        "train_micro_batch_size_per_gpu": t.batch_size // world,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True,
        "gradient_clipping": t.grad_clip,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    engine, _, _, _ = deepspeed.initialize(model=bundle, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=ds_config)
    if world == 1:
        engine.enable_backward_allreduce = False  # what DeepSpeed itself sets when it has no process group
    return engine


# ---------------------------------------------------------------------------------------------------
# the trainer


class Trainer:
    def __init__(self, t: TrainConfig, rank: int, world: int, local_rank: int, tr):
        self.t, self.rank, self.world, self.tr = t, rank, world, tr
        self.device = _device(t, local_rank)
        try:
            self.shards = A.ActivationShards(t.shards)
        except (FileNotFoundError, storage.ManifestError) as e:
            raise TrainError(f"no activation shards at {t.shards}: {e}") from e
        hps = t.hookpoints or self.shards.hookpoints
        missing = [h for h in hps if h not in self.shards.hookpoints]
        if missing:
            raise TrainError(f"hook points {missing} are not in {t.shards}; it holds {self.shards.hookpoints}")
        if not self.shards.shards(hps[0]):
            raise TrainError(f"{t.shards} holds no shards")
        bad = [r for h in hps for r in self.shards.shards(h) if r.nonfinite]
        if bad:
            raise TrainError(f"{len(bad)} shards of {t.shards} hold NaN or inf (counted when they were written), "
                             f"e.g. {bad[0].name} ({bad[0].nonfinite} rows); re-cache them (e.g. cache.model_dtype=float32)")
        self.hookpoints = hps
        self.dims = {h: self.shards.dim(h) for h in hps}
        self.local_rank = local_rank
        self.variants = self._variants()
        self.autocast = t.precision == "bf16" or (t.precision == "auto" and self.device.type == "cuda")

    def _variants(self) -> list[Variant]:
        t = self.t
        specs = t.sweep or [None]
        out = []
        for spec in specs:
            k = (spec.k if spec and spec.k else t.k)
            widths = {h: (spec.num_latents if spec and spec.num_latents else t.num_latents)
                      or t.expansion_factor * self.dims[h] for h in self.hookpoints}
            name = "" if spec is None else (spec.name or f"k{k}-m{widths[self.hookpoints[0]]}")
            for h in self.hookpoints:
                m, kh = widths[h], k
                if t.init_from:
                    m, kh = self._init_shape(name, h)
                if kh > m:
                    raise TrainError(f"k = {kh} exceeds the number of latents {m}")
                out.append(Variant(name, h, m, kh, t.lr or default_lr(m)))
        return out

    def _init_path(self, variant_name: str, hookpoint: str) -> str:
        return storage.join(self.t.init_from, *( [variant_name] if variant_name else []), hookpoint)

    def _init_shape(self, name: str, hookpoint: str) -> tuple[int, int]:
        """Width and k of the SAE to continue from; its input width must be the activations'."""
        from mmsae.sae.checkpoint import read_config

        path = self._init_path(name, hookpoint)
        try:
            sae_cfg = read_config(path)
        except FileNotFoundError as e:
            raise TrainError(f"train.init_from: no SAE at {path}: {e}") from e
        if sae_cfg.d_in != self.dims[hookpoint]:
            raise TrainError(
                f"the SAE at {path} takes inputs of width {sae_cfg.d_in}, but the activations of {hookpoint} at "
                f"{self.t.shards} have width {self.dims[hookpoint]}"
            )
        return sae_cfg.effective_num_latents, sae_cfg.k

    # -- engine -----------------------------------------------------------------------------------------

    def _bundle(self) -> SaeBundle:
        torch.manual_seed(self.t.seed)
        bundle = SaeBundle(self.variants, self.dims, self.t).to(self.device)
        if self.t.init_from:
            from mmsae.sae.checkpoint import load_sae

            for v in self.variants:
                src = load_sae(self._init_path(v.name, v.hookpoint), device=self.device, dtype=torch.float32)
                with torch.no_grad():
                    for name, p in bundle.saes[v.key].named_parameters():
                        p.copy_(dict(src.named_parameters())[name])
        return bundle

    def _engine(self, bundle: SaeBundle, total_steps: int):
        return build_engine(bundle, self.t, self.world, total_steps)

    # -- state ------------------------------------------------------------------------------------------

    def _state_dir(self) -> Path:
        if storage.is_s3(self.t.out):
            from mmsae.models.loading import cache_dir_for

            return cache_dir_for(self.t.out) / "train-state"
        return Path(self.t.out) / STATE_DIR

    def _resume_key(self) -> dict[str, Any]:
        manifest = storage.read_bytes(storage.join(self.t.shards, storage.MANIFEST_NAME))
        return {"train": {k: v for k, v in self.t.model_dump(mode="json").items() if k not in _NOT_TRAINING},
                "shards_manifest_sha256": hashlib.sha256(manifest).hexdigest()}

    def _check_resume_key(self, local: Path) -> None:
        """Refuse to resume from states of another config or other shards (before anything is loaded)."""
        path = local / RESUME_KEY
        saved = json.loads(path.read_text()) if path.exists() else None
        key = self._resume_key()
        if saved == key:
            return
        if saved is None:
            why = f"it has no {RESUME_KEY}"
        elif saved.get("shards_manifest_sha256") != key["shards_manifest_sha256"]:
            why = f"the shards at {self.t.shards} were rewritten since"
        else:
            old, new = saved.get("train", {}), key["train"]
            diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            why = "it was trained with other settings: " + ", ".join(
                f"train.{k} {old.get(k)!r} -> {new.get(k)!r}" for k in diff)
        raise TrainError(f"{storage.join(self.t.out, STATE_DIR)} holds a training state this run cannot resume: {why}. "
                         f"Rerun with the old settings, or give train.out another place (or delete that state).")

    def _data_group(self):
        """A gloo group of all ranks for the data stream's reading thread (its exchanges of rows run beside
        the training step's collectives, so they need a group of their own); None with one rank."""
        if self.world == 1:
            return None
        return torch.distributed.new_group(backend="gloo")

    def _barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def _sync_state_down(self, local: Path) -> None:
        """On S3, the newest state is fetched once per node (local rank 0), then every rank proceeds."""
        if storage.is_s3(self.t.out) and self.local_rank == 0 and not (local / "latest").exists():
            remote = storage.join(self.t.out, STATE_DIR)
            if storage.exists(storage.join(remote, "latest")):
                tag = storage.read_text(storage.join(remote, "latest")).strip()
                storage.download_dir(storage.join(remote, tag), local / tag)
                if storage.exists(storage.join(remote, RESUME_KEY)):
                    storage.download_file(storage.join(remote, RESUME_KEY), local / RESUME_KEY)
                storage.write_text(str(local / "latest"), tag)  # last: a partial download is not a state
        self._barrier()

    def _save_state(self, engine, local: Path, tag: str, client: dict[str, Any]) -> None:
        """Save a state; on S3 each node uploads what its ranks wrote before ``latest`` moves; then prune."""
        if self.rank == 0 and not (local / RESUME_KEY).exists():
            local.mkdir(parents=True, exist_ok=True)
            storage.write_json(str(local / RESUME_KEY), self._resume_key())
        engine.save_checkpoint(str(local), tag=tag, client_state=client)
        self._barrier()
        remote = storage.join(self.t.out, STATE_DIR)
        if storage.is_s3(self.t.out):
            if self.local_rank == 0:
                storage.upload_dir(local / tag, storage.join(remote, tag))
            self._barrier()
            if self.rank == 0:
                storage.upload_file(local / RESUME_KEY, storage.join(remote, RESUME_KEY))
                storage.write_text(storage.join(remote, "latest"), tag)
        if self.local_rank == 0:
            tags = [p.name for p in local.iterdir() if p.is_dir()]
            for name in self._older_states(tags, tag):
                shutil.rmtree(local / name, ignore_errors=True)
        if storage.is_s3(self.t.out) and self.rank == 0:
            files = storage.list_files(remote)
            drop = self._older_states({f.split("/", 1)[0] for f in files}, tag)
            for f in files:
                if f.split("/", 1)[0] in drop:
                    storage.delete(storage.join(remote, f))

    def _older_states(self, names, tag: str) -> set[str]:
        """The state tags among ``names`` to delete once ``tag`` is saved: all but the newest kept ones."""
        older = sorted(n for n in names if n.startswith("step") and n != tag)
        return set(older[: max(0, len(older) - (self.t.keep_checkpoints - 1))])

    # -- loop -------------------------------------------------------------------------------------------

    def fit(self) -> dict[str, Any]:
        t = self.t
        try:
            sealed = storage.read_manifest(t.out, kind=KIND)
        except (FileNotFoundError, storage.ManifestError):
            sealed = None
        if sealed is not None and sealed.config == {"train": t.model_dump(mode="json")}:
            log.info("SAEs already trained at %s", t.out)
            return dict(sealed.extra["figures"])

        stream = A.BatchStream(
            self.shards, self.hookpoints, t.batch_size, epochs=t.epochs, seed=t.seed,
            window_shards=t.window_shards, rank=self.rank, world=self.world, tokens=t.tokens,
            heldout_fraction=t.heldout_fraction, group=self._data_group(),
        )
        total_steps = min(t.max_steps or 10**18, stream.estimated_steps())
        state_dir = self._state_dir()
        self._sync_state_down(state_dir)
        bundle = self._bundle()
        resuming = (state_dir / "latest").exists()
        if resuming:
            self._check_resume_key(state_dir)
        if not resuming and not t.init_from:
            # b_dec from the first global batch, before the optimizer copies the weights
            batches = stream.iterate()
            _, first = next(batches, (None, None))
            batches.close()  # now, on every rank: its reading thread's collectives must not overlap the next
            if first is None:
                raise TrainError(f"{t.shards} holds fewer training tokens than one batch of {t.batch_size}")
            self._init_b_dec(bundle, {h: x.to(self.device) for h, x in first.items()})
        engine = self._engine(bundle, total_steps)
        step, tokens_seen = 0, 0
        stream_state = A.StreamState()
        dead = {v.key: torch.zeros(v.num_latents, dtype=torch.int64, device=self.device) for v in self.variants}
        if resuming:
            _, client = engine.load_checkpoint(str(state_dir))
            step, tokens_seen = client["step"], client["tokens_seen"]
            stream_state = A.StreamState(**client["stream"])
            dead = {k: v.to(self.device) for k, v in client["tokens_since_fired"].items()}
            log.info("resumed at step %d (%s)", step, stream_state)

        bar = tqdm(total=total_steps, initial=step, desc="train", unit="step", disable=self.rank != 0)
        t0, tokens0 = time.perf_counter(), tokens_seen
        batches = stream.iterate(stream_state)
        try:
            for position, batch in batches:
                if step >= total_steps:
                    break
                stream_state = position
                batch = {h: x.to(self.device, non_blocking=True) for h, x in batch.items()}
                variance = {h: global_variance(x, self.world) for h, x in batch.items()}
                dead_mask = {k: c > t.dead_tokens for k, c in dead.items()}
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                    loss, outs = engine(batch, dead_mask, variance, t, self.world)
                engine.backward(loss)
                engine.step()
                self._update_dead(bundle, outs, dead)
                step += 1
                tokens_seen += t.batch_size
                bar.update(1)
                if step % t.log_every == 0 or step == total_steps:
                    self._log(step, outs, dead, engine, tokens_seen - tokens0, time.perf_counter() - t0)
                if step % t.checkpoint_every == 0:
                    self._checkpoint(engine, state_dir, step, tokens_seen, stream_state, dead)
        finally:
            batches.close()  # at the same point on every rank: the reading thread's exchanges end here
        bar.close()
        self._checkpoint(engine, state_dir, step, tokens_seen, stream_state, dead)
        figures = self._finish(bundle, step, tokens_seen, dead)
        return figures

    @torch.no_grad()
    def _init_b_dec(self, bundle: SaeBundle, batch: dict[str, torch.Tensor]) -> None:
        """b_dec from the first global batch (gathered over ranks, so every rank gets the same)."""
        for v in self.variants:
            x = batch[v.hookpoint].float()
            if self.world > 1:
                parts = [torch.empty_like(x) for _ in range(self.world)]
                torch.distributed.all_gather(parts, x)
                x = torch.cat(parts)
            bundle.saes[v.key].init_b_dec(x, method=self.t.b_dec_init)

    @torch.no_grad()
    def _update_dead(self, bundle: SaeBundle, outs, dead: dict[str, torch.Tensor]) -> None:
        for v in self.variants:
            fired = bundle.saes[v.key].fired_latents(outs[v.key][0])
            if self.world > 1:
                f = fired.to(torch.uint8)
                torch.distributed.all_reduce(f, op=torch.distributed.ReduceOp.MAX)
                fired = f.bool()
            dead[v.key] += self.t.batch_size
            dead[v.key][fired] = 0

    def _log(self, step, outs, dead, engine, tokens, seconds) -> None:
        metrics: dict[str, float] = {"tokens_per_s": tokens / max(seconds, 1e-9)}
        lrs = engine.get_lr()
        for i, v in enumerate(self.variants):
            _, losses, m = outs[v.key]
            p = f"{v.path}/"
            metrics[p + "fvu"] = float(losses["fvu"].detach())
            metrics[p + "auxk"] = float(losses["auxk"].detach())
            metrics[p + "l0"] = float(m["l0"])
            metrics[p + "dead_pct"] = 100.0 * float((dead[v.key] > self.t.dead_tokens).float().mean())
            metrics[p + "lr"] = float(lrs[i])
        if self.rank == 0:
            self.tr.log_metrics(metrics, step=step)
            log.info("step %d: %s", step, {k: round(val, 4) for k, val in metrics.items()})

    def _checkpoint(self, engine, state_dir: Path, step, tokens_seen, stream_state, dead) -> None:
        tag = f"step{step:08d}"
        client = {"step": step, "tokens_seen": tokens_seen, "stream": stream_state.as_dict(),
                  "tokens_since_fired": {k: v.cpu() for k, v in dead.items()}}
        self._save_state(engine, state_dir, tag, client)

    @torch.no_grad()
    def _finish(self, bundle: SaeBundle, step: int, tokens_seen: int, dead) -> dict[str, Any]:
        from mmsae.sae.checkpoint import save_sae

        t = self.t
        evals = self._evaluate(bundle)
        if self.rank == 0 and t.eval_lm_images > 0:
            for key, lm in self._lm_loss(bundle).items():
                evals[key].update(lm)
        figures: dict[str, Any] = {"steps": step, "tokens": tokens_seen}
        for v in self.variants:
            prefix = "" if len(self.variants) == 1 else f"{v.path}/"
            figures[prefix + "dead_pct"] = 100.0 * float((dead[v.key] > t.dead_tokens).float().mean())
            figures.update({prefix + k: val for k, val in evals[v.key].items()})
        if self.rank == 0:
            names = []
            for v in self.variants:
                sae = bundle.saes[v.key]
                sae.set_decoder_norm_to_unit_norm()  # what the forward used, now stored
                sae.normalize_in_forward = False
                save_sae(sae, storage.join(t.out, v.path))
                names += [f"{v.path}/{n}" for n in storage.list_files(storage.join(t.out, v.path))]
            storage.write_json(storage.join(t.out, "metrics.json"), figures)
            names.append("metrics.json")
            storage.write_manifest(
                t.out, KIND, files=names, config={"train": t.model_dump(mode="json")},
                inputs={"shards": t.shards},
                extra={"figures": figures, "dims": self.dims, "variants": [v.__dict__ for v in self.variants],
                       "hookpoints": self.hookpoints},
            )
            self.tr.log_metrics({k: float(val) for k, val in figures.items()})
        return figures

    @torch.no_grad()
    def _evaluate(self, bundle: SaeBundle) -> dict[str, dict[str, float]]:
        """Held-out FVU for image and text tokens separately (sums over the held-out rows of every shard), and
        the share of latents that fire on no held-out token with the final weights (``heldout_never_fired_pct``:
        it depends on how many tokens are held out; the mine stage counts it over the whole image set).
        ``dead_pct`` beside it is the training criterion: no firing in the last ``train.dead_tokens`` tokens."""
        t = self.t
        err: dict[tuple[str, str], float] = {}
        fired = {v.key: torch.zeros(v.num_latents, dtype=torch.bool, device=self.device) for v in self.variants}
        sums: dict[tuple[str, str], list[Any]] = {}
        refs = {h: self.shards.shards(h) for h in self.hookpoints}
        my_shards = range(self.rank, len(refs[self.hookpoints[0]]), self.world)
        for s in my_shards:
            for h in self.hookpoints:
                cols = self.shards.read(refs[h][s])
                held = A.heldout_images(cols["image_idx"], t.heldout_fraction, t.seed)
                for kind, km in (("image", A.token_mask(cols, "image")), ("text", A.token_mask(cols, "text"))):
                    x = cols["acts"][held & km].float().to(self.device)
                    if x.shape[0] == 0:
                        continue
                    key = (h, kind)
                    st = sums.setdefault(key, [torch.zeros(x.shape[1], dtype=torch.float64, device=self.device),
                                               torch.zeros((), dtype=torch.float64, device=self.device), 0])
                    st[0] += x.double().sum(0)
                    st[1] += x.double().pow(2).sum()
                    st[2] += x.shape[0]
                    for v in self.variants:
                        if v.hookpoint != h:
                            continue
                        sae = bundle.saes[v.key]
                        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                            acts, idx = sae.encode(x)
                            recon = sae.decode(acts, idx).float()
                        fired[v.key][idx[acts > 0]] = True
                        err[(v.key, kind)] = err.get((v.key, kind), 0.0) + float((recon - x).pow(2).sum())
        out: dict[str, dict[str, float]] = {}
        for v in self.variants:
            d = self.dims[v.hookpoint]
            f = fired[v.key].to(torch.uint8)
            if self.world > 1:
                torch.distributed.all_reduce(f, op=torch.distributed.ReduceOp.MAX)
            res = {"heldout_never_fired_pct": 100.0 * float((f == 0).float().mean())}
            for kind in ("image", "text"):
                st = sums.get((v.hookpoint, kind))
                e = torch.tensor([err.get((v.key, kind), 0.0)], dtype=torch.float64, device=self.device)
                if st is None:
                    st = [torch.zeros(d, dtype=torch.float64, device=self.device),
                          torch.zeros((), dtype=torch.float64, device=self.device), 0]
                packed = torch.cat([e, st[0], st[1].reshape(1),
                                    torch.tensor([float(st[2])], dtype=torch.float64, device=self.device)])
                if self.world > 1:
                    torch.distributed.all_reduce(packed)
                err_sum, s, s2, n = packed[0], packed[1 : 1 + d], packed[1 + d], packed[-1]
                if n < 2:
                    continue
                variance = s2 - (s * s).sum() / n
                res[f"heldout_fvu_{kind}"] = float(err_sum / variance)
                res[f"heldout_tokens_{kind}"] = int(n)
            out[v.key] = res
        return out

    @torch.no_grad()
    def _lm_loss(self, bundle: SaeBundle) -> dict[str, dict[str, float]]:
        """The LM's caption loss on held-out images: clean, with each SAE spliced in, and with the layer zeroed.

        Splices at the positions of the kind of tokens the SAE was trained on. ``loss_recovered`` is
        (zero - sae) / (zero - clean). Empty when the shards' inputs have no LMM or no captions.
        """
        from mmsae.data.images import load_image_set
        from mmsae.models import load_lmm, token_geometry
        from mmsae.stages.common import model_prompt

        inputs = self.shards.manifest.inputs
        cache_cfg = (self.shards.manifest.config or {}).get("cache", {})
        if not inputs.get("model") or not inputs.get("image_set"):
            return {}
        ds = load_image_set(inputs["image_set"], cache_cfg.get("split"))
        if "caption" not in ds.column_names:
            log.info("no captions in %s: LM loss with the SAE spliced in not measured", inputs["image_set"])
            return {}
        lmm = load_lmm(inputs["model"], device=self.device)
        prompt = cache_cfg.get("prompt") or model_prompt(inputs["model"])
        idx = torch.arange(len(ds))
        held = idx[A.heldout_images(idx, self.t.heldout_fraction, self.t.seed)][: self.t.eval_lm_images].tolist()
        if not held:
            return {}
        totals: dict[str, list[float]] = {}
        for i in held:
            row = ds[i]
            image = row["image"].convert("RGB")
            enc_prompt = lmm.processor(images=[image], text=[prompt], return_tensors="pt")
            enc = lmm.processor(images=[image], text=[f"{prompt} {row['caption']}"], return_tensors="pt")
            enc = {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in enc.items()}
            labels = enc["input_ids"].clone()
            labels[:, : enc_prompt["input_ids"].shape[1]] = -100
            geo = token_geometry(lmm.family, lmm.config, enc["input_ids"].cpu(), enc.get("image_sizes"), lmm.processor,
                                 batch_num_images=enc.get("batch_num_images"))
            view = torch.as_tensor(geo.view).to(self.device)
            where = {"all": torch.ones_like(view, dtype=torch.bool), "image": view != A.VIEW_TEXT,
                     "text": view == A.VIEW_TEXT}[self.t.tokens]

            totals.setdefault("clean", []).append(_spliced_loss(lmm, enc, labels))
            for v in self.variants:
                sae = bundle.saes[v.key]
                totals.setdefault(v.key, []).append(
                    _spliced_loss(lmm, enc, labels, v.hookpoint, where, lambda x, sae=sae: sae(x).sae_out))
                totals.setdefault("zero:" + v.hookpoint, []).append(
                    _spliced_loss(lmm, enc, labels, v.hookpoint, where, torch.zeros_like))
        mean = {k: sum(vals) / len(vals) for k, vals in totals.items()}
        out = {}
        for v in self.variants:
            zero, clean, spliced = mean["zero:" + v.hookpoint], mean["clean"], mean[v.key]
            out[v.key] = {
                "lm_loss_clean": clean,
                "lm_loss_sae": spliced,
                "lm_loss_zero": zero,
                "lm_delta_loss": spliced - clean,
                "loss_recovered": (zero - spliced) / (zero - clean) if zero != clean else float("nan"),
                "lm_eval_images": len(held),
            }
        return out


@torch.no_grad()
def _spliced_loss(lmm, enc, labels, hookpoint=None, where=None, replace=None) -> float:
    """The LM loss on ``labels`` with the hook point's output replaced by ``replace(x)`` at ``where``."""
    from mmsae.models import resolve_hookpoint

    handle = None
    if replace is not None:
        def hook(_m, _a, out):
            x = out[0] if isinstance(out, tuple) else out
            y = x.clone()
            y[where] = replace(x[where].float()).to(x.dtype)
            return (y, *out[1:]) if isinstance(out, tuple) else y

        handle = resolve_hookpoint(lmm.model, hookpoint).module.register_forward_hook(hook)
    try:
        return float(lmm.model(**enc, labels=labels).loss)
    finally:
        if handle is not None:
            handle.remove()
