"""The trained SAEs' figures on held-out images: reconstruction (FVU) and the LM loss with each SAE spliced in.

Held-out images are those :func:`mmsae.training.counting.heldout_images` keeps out of training. A token kind
without held-out tokens gets no figure but its count (``heldout_tokens_<kind>: 0``); with no held-out image at
all, :func:`heldout_note` says why.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from mmsae.activations import VIEW_TEXT, ActivationShards, ShardRef, token_mask
from mmsae.config import TrainConfig
from mmsae.training.counting import RowCounts, heldout_images
from mmsae.training.engine import SaeBundle, Variant

log = logging.getLogger(__name__)

TOKEN_KINDS = ("image", "text")


@dataclass
class _Moments:
    """Sums over held-out rows of one hook point and token kind: Σx per column, Σ‖x‖², row count."""

    sums: torch.Tensor
    squares: torch.Tensor
    rows: int = 0

    @classmethod
    def empty(cls, d: int, device: torch.device) -> _Moments:
        return cls(torch.zeros(d, dtype=torch.float64, device=device), torch.zeros((), dtype=torch.float64,
                                                                                     device=device))

    def add(self, x: torch.Tensor) -> None:
        self.sums += x.double().sum(0)
        self.squares += x.double().pow(2).sum()
        self.rows += x.shape[0]


def heldout_note(fraction: float, counts: RowCounts) -> str | None:
    """Why there are no held-out figures (``none: 26 images at heldout_fraction 0.01``), or None when some
    image is held out."""
    if fraction <= 0:
        return "none: heldout_fraction 0"
    if counts.heldout_images:
        return None
    return f"none: {counts.images} images at heldout_fraction {fraction}"


@dataclass
class Evaluator:
    """Evaluates the SAEs of ``bundle``; every rank calls :meth:`heldout`, rank 0 alone :meth:`lm_loss`."""

    bundle: SaeBundle
    shards: ActivationShards
    variants: list[Variant]
    t: TrainConfig
    device: torch.device
    rank: int = 0
    world: int = 1
    autocast: bool = False

    @torch.no_grad()
    def heldout(self) -> dict[str, dict[str, float]]:
        """Per variant key: held-out FVU of image and text tokens separately (sums over the held-out rows of
        every shard; each rank reads every ``world``-th shard whose image range holds a held-out image), the
        held-out token counts, and ``heldout_never_fired_pct``, the share of latents that fire on no held-out
        token with the final weights (it depends on how many tokens are held out; the mine stage counts it
        over the whole image set). A figure whose tokens are not there is left out."""
        errors: dict[tuple[str, str], float] = {}
        fired = {v.key: torch.zeros(v.num_latents, dtype=torch.bool, device=self.device) for v in self.variants}
        moments: dict[tuple[str, str], _Moments] = {}
        hookpoints = list(dict.fromkeys(v.hookpoint for v in self.variants))
        refs = {h: self.shards.shards(h) for h in hookpoints}
        for s in range(self.rank, len(refs[hookpoints[0]]), self.world):
            if not self._holds_heldout(refs[hookpoints[0]][s]):
                continue
            for h in hookpoints:
                cols = self.shards.read(refs[h][s])
                held = heldout_images(cols["image_idx"], self.t.heldout_fraction, self.t.seed)
                for kind in TOKEN_KINDS:
                    x = cols["acts"][held & token_mask(cols, kind)].float().to(self.device)
                    if x.shape[0] == 0:
                        continue
                    moments.setdefault((h, kind), _Moments.empty(x.shape[1], self.device)).add(x)
                    for v in self.variants:
                        if v.hookpoint == h:
                            errors[(v.key, kind)] = errors.get((v.key, kind), 0.0) + self._error(v, x, fired)
        return {v.key: self._figures(v, errors, fired[v.key], moments) for v in self.variants}

    def _holds_heldout(self, ref: ShardRef) -> bool:
        """Whether any image of the shard's image range (as the manifest gives it) is held out."""
        images = torch.arange(ref.first_image, ref.end_image)
        return bool(heldout_images(images, self.t.heldout_fraction, self.t.seed).any())

    def _error(self, v: Variant, x: torch.Tensor, fired: dict[str, torch.Tensor]) -> float:
        """Σ‖recon − x‖² of ``x`` through the variant's SAE; marks the latents that fired."""
        sae = self.bundle.saes[v.key]
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            acts, idx = sae.encode(x)
            recon = sae.decode(acts, idx).float()
        fired[v.key][idx[acts > 0]] = True
        return float((recon - x).pow(2).sum())

    def _figures(self, v: Variant, errors: dict[tuple[str, str], float], fired: torch.Tensor,
                 moments: dict[tuple[str, str], _Moments]) -> dict[str, float]:
        """One variant's figures from this rank's sums, all-reduced over the ranks."""
        d = self.shards.dim(v.hookpoint)
        ever = fired.to(torch.uint8)
        if self.world > 1:
            torch.distributed.all_reduce(ever, op=torch.distributed.ReduceOp.MAX)
        out: dict[str, float] = {}
        for kind in TOKEN_KINDS:
            m = moments.get((v.hookpoint, kind)) or _Moments.empty(d, self.device)
            error = torch.tensor([errors.get((v.key, kind), 0.0)], dtype=torch.float64, device=self.device)
            packed = torch.cat([error, m.sums, m.squares.reshape(1),
                                torch.tensor([float(m.rows)], dtype=torch.float64, device=self.device)])
            if self.world > 1:
                torch.distributed.all_reduce(packed)
            error_sum, sums, squares, rows = packed[0], packed[1 : 1 + d], packed[1 + d], int(packed[-1])
            if rows >= 2:
                variance = squares - (sums * sums).sum() / rows
                out[f"heldout_fvu_{kind}"] = float(error_sum / variance)
            out[f"heldout_tokens_{kind}"] = rows
        if not any(out[f"heldout_tokens_{kind}"] for kind in TOKEN_KINDS):
            return out  # nothing held out: no latent could have fired
        return {"heldout_never_fired_pct": 100.0 * float((ever == 0).float().mean()), **out}

    @torch.no_grad()
    def lm_loss(self) -> dict[str, dict[str, float]]:
        """Per variant key: the LM's caption loss on held-out images, clean, with the SAE spliced in and with
        the hook point's output zeroed, at the positions of the kind of tokens the SAE was trained on.

        ``loss_recovered`` is (zero - sae) / (zero - clean). Empty when the shards record no LMM or image set,
        or the image set has no captions.
        """
        from mmsae.data.images import load_image_set
        from mmsae.models import load_lmm

        if not self.shards.model or not self.shards.image_set:
            return {}
        images = load_image_set(self.shards.image_set, self.shards.split)
        if "caption" not in images.column_names:
            log.info("no captions in %s: LM loss with the SAE spliced in not measured", self.shards.image_set)
            return {}
        index = torch.arange(len(images))
        held = index[heldout_images(index, self.t.heldout_fraction, self.t.seed)][: self.t.eval_lm_images].tolist()
        if not held:
            return {}
        lmm = load_lmm(self.shards.model, device=self.device)
        totals: dict[str, list[float]] = {}
        for i in held:
            for name, loss in self._losses(lmm, images[i]).items():
                totals.setdefault(name, []).append(loss)
        mean = {name: sum(values) / len(values) for name, values in totals.items()}
        return {v.key: _lm_figures(mean["clean"], mean[v.key], mean["zero:" + v.hookpoint], len(held))
                for v in self.variants}

    def _losses(self, lmm, row: dict[str, Any]) -> dict[str, float]:
        """One captioned image's losses: ``clean``, per variant key, and ``zero:<hookpoint>``."""
        from mmsae.models import token_geometry
        from mmsae.stages._base import model_prompt

        prompt = self.shards.prompt or model_prompt(self.shards.model)
        image = row["image"].convert("RGB")
        enc_prompt = lmm.processor(images=[image], text=[prompt], return_tensors="pt")
        enc = lmm.processor(images=[image], text=[f"{prompt} {row['caption']}"], return_tensors="pt")
        enc = {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in enc.items()}
        labels = enc["input_ids"].clone()
        labels[:, : enc_prompt["input_ids"].shape[1]] = -100  # the caption alone is scored
        geometry = token_geometry(lmm.family, lmm.config, enc["input_ids"].cpu(), enc.get("image_sizes"),
                                  lmm.processor, batch_num_images=enc.get("batch_num_images"))
        view = torch.as_tensor(geometry.view).to(self.device)
        where = {"all": torch.ones_like(view, dtype=torch.bool), "image": view != VIEW_TEXT,
                 "text": view == VIEW_TEXT}[self.t.tokens]
        losses = {"clean": spliced_loss(lmm, enc, labels)}
        for v in self.variants:
            sae = self.bundle.saes[v.key]
            losses[v.key] = spliced_loss(lmm, enc, labels, v.hookpoint, where, lambda x, sae=sae: sae(x).sae_out)
            losses["zero:" + v.hookpoint] = spliced_loss(lmm, enc, labels, v.hookpoint, where, torch.zeros_like)
        return losses


def _lm_figures(clean: float, spliced: float, zero: float, images: int) -> dict[str, float]:
    return {
        "lm_loss_clean": clean,
        "lm_loss_sae": spliced,
        "lm_loss_zero": zero,
        "lm_delta_loss": spliced - clean,
        "loss_recovered": (zero - spliced) / (zero - clean) if zero != clean else float("nan"),
        "lm_eval_images": images,
    }


@torch.no_grad()
def spliced_loss(lmm, enc, labels, hookpoint=None, where=None, replace=None) -> float:
    """The LM loss on ``labels`` with the hook point's output replaced by ``replace(x)`` at ``where``
    (no hook point: the clean loss)."""
    from mmsae.models import resolve_hookpoint

    handle = None
    if replace is not None:
        def hook(_module, _args, out):
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
