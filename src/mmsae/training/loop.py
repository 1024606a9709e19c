"""The training loop: every SAE of a run trained from one pass over the batch stream, resumable step by step.

The learning-rate schedule spans exactly the steps run (:meth:`BatchStream.total_steps`, capped by
``train.max_steps``); a state records that total and a resume under another is refused. b_dec comes from the
gathered first global batch; fired-latent masks are all-reduced with MAX, so every rank counts the same dead
latents; a state is saved every ``train.checkpoint_every`` steps and at the end.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm import tqdm

from mmsae.activations import ActivationShards
from mmsae.config import TrainConfig
from mmsae.stages._base import OutputKey, StageContext
from mmsae.training import TrainError
from mmsae.training.engine import SaeBundle, Variant, build_engine, global_variance, released
from mmsae.training.evaluation import Evaluator, heldout_note
from mmsae.training.state import TrainingStates
from mmsae.training.stream import BatchStream, StreamState

log = logging.getLogger(__name__)


@dataclass
class Progress:
    """Where training stands: what a state records besides the weights and the optimiser."""

    step: int = 0
    total_steps: int | None = None
    """The schedule's length (None in states that did not record it)."""
    tokens_seen: int = 0
    stream: StreamState = field(default_factory=StreamState)
    tokens_since_fired: dict[str, torch.Tensor] = field(default_factory=dict)
    """Per variant key and latent: tokens since it last fired (dead above ``train.dead_tokens``)."""

    def client_state(self) -> dict[str, Any]:
        return {"step": self.step, "total_steps": self.total_steps, "tokens_seen": self.tokens_seen,
                "stream": self.stream.as_dict(),
                "tokens_since_fired": {k: v.cpu() for k, v in self.tokens_since_fired.items()}}

    @classmethod
    def from_client_state(cls, client: dict[str, Any], device: torch.device) -> Progress:
        return cls(client["step"], client.get("total_steps"), client["tokens_seen"],
                   StreamState(**client["stream"]),
                   {k: v.to(device) for k, v in client["tokens_since_fired"].items()})


class Trainer:
    """Trains the ``variants`` on ``shards`` as one rank of ``ctx``; states go under ``t.out``."""

    def __init__(self, t: TrainConfig, shards: ActivationShards, variants: list[Variant], ctx: StageContext,
                 key: OutputKey, *, overwrite: bool):
        self.t, self.shards, self.variants, self.ctx = t, shards, variants, ctx
        self.rank, self.world = ctx.rank, ctx.world
        self.device = ctx.device(t.device)
        self.hookpoints = list(dict.fromkeys(v.hookpoint for v in variants))
        self.dims = {h: shards.dim(h) for h in self.hookpoints}
        self.autocast = t.precision == "bf16" or (t.precision == "auto" and self.device.type == "cuda")
        self.states = TrainingStates(t.out, key, ctx, keep=t.keep_checkpoints, overwrite=overwrite)
        self.heldout_note: str | None = None
        """Why no held-out figure is given (None when some image is held out)."""

    def fit(self) -> tuple[SaeBundle, dict[str, Any]]:
        """Train (or resume) to the end; the trained SAEs and their headline figures."""
        t = self.t
        stream = BatchStream(
            self.shards, self.hookpoints, t.batch_size, epochs=t.epochs, seed=t.seed,
            window_shards=t.window_shards, rank=self.rank, world=self.world, tokens=t.tokens,
            heldout_fraction=t.heldout_fraction, group=self._data_group(),
        )
        total_steps = min(t.max_steps or 10**18, stream.total_steps())
        self._check_heldout(stream)
        resuming = self.states.prepare()
        bundle = self._bundle()
        if not resuming and not t.init_from:
            self._init_b_dec(bundle, stream)  # before the optimizer copies the weights
        with released(build_engine(bundle, t, self.world, total_steps)) as engine:
            progress = self._progress(engine, resuming, total_steps)
            self._train(engine, bundle, stream, progress, total_steps)
        return bundle, self._figures(bundle, progress)

    def _progress(self, engine, resuming: bool, total_steps: int) -> Progress:
        """The progress to start from: the saved training state's when resuming, else fresh counters."""
        if resuming:
            progress = Progress.from_client_state(self.states.load(engine), self.device)
            if progress.total_steps not in (None, total_steps):
                raise TrainError(f"the training state at step {progress.step} under {self.t.out} follows a "
                                 f"schedule of {progress.total_steps} steps, but these shards and settings give "
                                 f"{total_steps}; train elsewhere, or with run.overwrite=true")
            log.info("resumed at step %d of %d (%s)", progress.step, total_steps, progress.stream)
        else:
            progress = Progress(tokens_since_fired={
                v.key: torch.zeros(v.num_latents, dtype=torch.int64, device=self.device) for v in self.variants})
        progress.total_steps = total_steps
        return progress

    def _train(self, engine, bundle: SaeBundle, stream: BatchStream, progress: Progress, total_steps: int) -> None:
        t = self.t
        bar = tqdm(total=total_steps, initial=progress.step, desc="train", unit="step", disable=not self.ctx.is_main)
        started, tokens_before = time.perf_counter(), progress.tokens_seen
        batches = stream.iterate(progress.stream)
        try:
            for position, batch in batches:
                if progress.step >= total_steps:
                    break
                progress.stream = position
                outs, lrs = self._step(engine, bundle, batch, progress.tokens_since_fired)
                progress.step += 1
                progress.tokens_seen += t.batch_size
                bar.update(1)
                if progress.step % t.log_every == 0 or progress.step == total_steps:
                    self._log(progress, outs, lrs, progress.tokens_seen - tokens_before,
                              time.perf_counter() - started)
                if progress.step % t.checkpoint_every == 0:
                    self.states.save(engine, progress.step, progress.client_state())
        finally:
            batches.close()  # at the same point on every rank: the reading thread's exchanges end here
        bar.close()
        self.states.save(engine, progress.step, progress.client_state())

    def _step(self, engine, bundle: SaeBundle, batch: dict[str, torch.Tensor], dead: dict[str, torch.Tensor]):
        """One optimiser step on this rank's slice of a global batch; the per-variant outputs and the learning
        rates the step was taken with."""
        t = self.t
        batch = {h: x.to(self.device, non_blocking=True) for h, x in batch.items()}
        variance = {h: global_variance(x, self.world) for h, x in batch.items()}
        dead_mask = {k: c > t.dead_tokens for k, c in dead.items()}
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            loss, outs = engine(batch, dead_mask, variance, t, self.world)
        engine.backward(loss)
        lrs = engine.get_lr()  # the schedule moves on in engine.step()
        engine.step()
        self._update_dead(bundle, outs, dead)
        return outs, lrs

    def _check_heldout(self, stream: BatchStream) -> None:
        """Say, before training, when no image is held out: then no held-out figure is given."""
        counts, fraction = stream.counts(), self.t.heldout_fraction
        self.heldout_note = heldout_note(fraction, counts)
        if self.heldout_note and self.ctx.is_main:
            if fraction > 0:
                log.warning("no image is held out (%s images at train.heldout_fraction %s): no held-out "
                            "figure is given", counts.images, fraction)
            else:
                log.info("train.heldout_fraction is 0: no held-out figure is given")

    def _data_group(self):
        """A gloo group of all ranks for the data stream's reading thread (its exchanges of rows run beside
        the training step's collectives, so they need a group of their own); None with one rank."""
        if self.world == 1:
            return None
        return torch.distributed.new_group(backend="gloo")

    def _bundle(self) -> SaeBundle:
        """The SAEs, seeded, or continued from ``train.init_from``."""
        torch.manual_seed(self.t.seed)
        bundle = SaeBundle(self.variants, self.dims, self.t).to(self.device)
        if self.t.init_from:
            from mmsae import storage
            from mmsae.sae.checkpoint import load_sae

            for v in self.variants:
                source = load_sae(storage.join(self.t.init_from, v.path), device=self.device, dtype=torch.float32)
                weights = dict(source.named_parameters())
                with torch.no_grad():
                    for name, p in bundle.saes[v.key].named_parameters():
                        p.copy_(weights[name])
        return bundle

    @torch.no_grad()
    def _init_b_dec(self, bundle: SaeBundle, stream: BatchStream) -> None:
        """b_dec from the first global batch (gathered over ranks, so every rank gets the same)."""
        batches = stream.iterate()
        _, first = next(batches, (None, None))
        batches.close()  # now, on every rank: its reading thread's collectives must not overlap the next
        if first is None:
            raise TrainError(f"{self.t.shards} holds fewer training tokens than one batch of {self.t.batch_size}")
        for v in self.variants:
            x = first[v.hookpoint].to(self.device).float()
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
                fired_any = fired.to(torch.uint8)
                torch.distributed.all_reduce(fired_any, op=torch.distributed.ReduceOp.MAX)
                fired = fired_any.bool()
            dead[v.key] += self.t.batch_size
            dead[v.key][fired] = 0

    def _dead_pct(self, progress: Progress, v: Variant) -> float:
        return 100.0 * float((progress.tokens_since_fired[v.key] > self.t.dead_tokens).float().mean())

    def _log(self, progress: Progress, outs, lrs: list[float], tokens: int, seconds: float) -> None:
        metrics: dict[str, float] = {"tokens_per_s": tokens / max(seconds, 1e-9)}
        for i, v in enumerate(self.variants):
            _, losses, step_metrics = outs[v.key]
            prefix = f"{v.path}/"
            metrics[prefix + "fvu"] = float(losses["fvu"].detach())
            metrics[prefix + "auxk"] = float(losses["auxk"].detach())
            metrics[prefix + "l0"] = float(step_metrics["l0"])
            metrics[prefix + "dead_pct"] = self._dead_pct(progress, v)
            metrics[prefix + "lr"] = float(lrs[i])
        self.ctx.log_progress(metrics, progress.step)
        if self.ctx.is_main:
            log.info("step %d: %s", progress.step, {k: round(val, 4) for k, val in metrics.items()})

    @torch.no_grad()
    def _figures(self, bundle: SaeBundle, progress: Progress) -> dict[str, Any]:
        """The headline figures: steps, tokens and, per variant, dead share and held-out evaluation."""
        evaluator = Evaluator(bundle, self.shards, self.variants, self.t, self.device, self.rank, self.world,
                              self.autocast)
        evals = evaluator.heldout()
        if self.ctx.is_main and self.t.eval_lm_images > 0:
            for key, figures in evaluator.lm_loss().items():
                evals[key].update(figures)
        out: dict[str, Any] = {"steps": progress.step, "tokens": progress.tokens_seen}
        if self.heldout_note:
            out["heldout"] = self.heldout_note
        for v in self.variants:
            prefix = "" if len(self.variants) == 1 else f"{v.path}/"
            out[prefix + "dead_pct"] = self._dead_pct(progress, v)
            out.update({prefix + name: value for name, value in evals[v.key].items()})
        return out
