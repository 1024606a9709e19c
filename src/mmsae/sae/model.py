"""The TopK sparse autoencoder (Gao et al. 2024 recipe, EleutherAI sparsify's layout): config, module, losses.

Reads and writes no files (see :mod:`mmsae.sae.checkpoint` for that).

* :class:`SaeConfig` holds the keys of sparsify's ``cfg.json`` (``expansion_factor``, ``normalize_decoder``,
  ``num_latents``, ``k``, ``multi_topk``) plus ``d_in``. Legacy keys of older releases (``signed``,
  ``skip_connection``, ``transcode``, ``activation``) are accepted and dropped with a warning when they hold
  the only supported value, and rejected otherwise.
* :class:`TopKSAE` has ``encoder`` (``nn.Linear(d_in, num_latents)``), ``W_dec`` ``[num_latents, d_in]``
  with unit-norm rows and ``b_dec`` ``[d_in]``. ``encode`` is ``TopK(ReLU(encoder(x - b_dec)))``;
  ``decode`` is sparse; ``forward`` returns :class:`ForwardOutput` with the FVU, the AuxK loss (top
  ``k_aux`` dead latents reconstruct the detached residual, OpenAI recipe) and the Multi-TopK FVU.
* :meth:`TopKSAE.training_step_losses` turns a :class:`ForwardOutput` into ``(loss, losses, metrics)``
  dicts, so a trainer can log any SAE variant without knowing its losses.

Training-loop concerns (optimiser, schedules, dead-latent counters, data) live with the trainer. Per step
the trainer (:mod:`mmsae.stages.train`) calls ``forward`` → ``training_step_losses`` → ``backward`` →
``optimizer.step()`` and marks latents as fired with :meth:`TopKSAE.fired_latents`. Its optimizer
(DeepSpeed ZeRO) keeps a master copy of the weights that in-place rescaling would not reach, so it sets
``normalize_in_forward``: the decoder rows are normalised in the forward pass, autograd through that
normalisation removes the gradient along each row, and :meth:`TopKSAE.set_decoder_norm_to_unit_norm` stores
the rows normalised once, before saving. A trainer whose optimizer updates the parameters in place may
instead leave the rows as they are in the forward pass and call
:meth:`TopKSAE.remove_gradient_parallel_to_decoder_directions` before and
:meth:`TopKSAE.set_decoder_norm_to_unit_norm` after each ``optimizer.step()`` (sparsify's loop).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any, Literal, NamedTuple

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from torch import Tensor, nn

from mmsae.sae.kernels import (
    SparsePattern,
    TopKEncoding,
    default_chunk_rows,
    sparse_decode,
    sparse_decode_with_aux,
    topk_encode,
)

logger = logging.getLogger(__name__)

__all__ = [
    "EncoderOutput",
    "ForwardOutput",
    "SaeConfig",
    "SaeConfigError",
    "TopKSAE",
    "geometric_median",
]


class SaeConfigError(ValueError):
    """An SAE configuration asks for something this implementation does not support."""


LEGACY_KEYS: dict[str, Any] = {"signed": False, "jumprelu": False}
"""Keys older sparsify versions wrote and current ones drop, with the only value this implementation supports."""
SPARSIFY_KEYS: dict[str, Any] = {"activation": "topk", "skip_connection": False, "transcode": False}
"""Keys current sparsify writes for other architectures, with the value that means this one (a plain TopK SAE)."""


class SaeConfig(BaseModel):
    """Architecture of a TopK SAE; the fields are the keys of sparsify's ``cfg.json``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    d_in: int = Field(gt=0, description="Width of the activations the SAE reads (the LM's hidden size).")
    expansion_factor: int = Field(
        32, gt=0, description="num_latents = d_in * expansion_factor when num_latents is 0."
    )
    normalize_decoder: bool = Field(True, description="Keep the decoder rows at unit norm.")
    num_latents: int = Field(0, ge=0, description="Number of latents; 0 means d_in * expansion_factor.")
    k: int = Field(32, gt=0, description="Number of latents active per token.")
    multi_topk: bool = Field(False, description="Also reconstruct with the top 4k latents (Multi-TopK loss).")

    @model_validator(mode="before")
    @classmethod
    def _drop_legacy_keys(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        for key, supported in {**LEGACY_KEYS, **SPARSIFY_KEYS}.items():
            if key not in data:
                continue
            value = data.pop(key)
            if value != supported:
                raise SaeConfigError(
                    f"SAE config key {key!r} = {value!r} is not supported; only {key!r} = {supported!r} "
                    "(a plain TopK SAE) is"
                )
            if key in LEGACY_KEYS:
                logger.info("dropping the legacy SAE config key %r = %r, as sparsify does", key, value)
        known = set(cls.model_fields)
        unknown = sorted(set(data) - known)
        if unknown:
            raise SaeConfigError(
                f"unknown SAE config key(s) {unknown}; expected some of {sorted(known)} "
                f"(and {sorted({**SPARSIFY_KEYS, **LEGACY_KEYS})} at their TopK values)"
            )
        return data

    @model_validator(mode="after")
    def _check_k(self) -> SaeConfig:
        m = self.effective_num_latents
        needed = 4 * self.k if self.multi_topk else self.k
        if needed > m:
            what = "4 * k (multi_topk)" if self.multi_topk else "k"
            raise SaeConfigError(f"{what} = {needed} exceeds the number of latents {m}")
        return self

    @classmethod
    def from_cfg_json(cls, raw: Mapping[str, Any], source: str = "SAE config") -> SaeConfig:
        """Validate a ``cfg.json`` mapping; every problem is raised as one :class:`SaeConfigError`.

        (Constructing the model directly raises pydantic's ``ValidationError``, also a ``ValueError``.)
        """
        try:
            return cls.model_validate(dict(raw))
        except ValidationError as err:
            problems = []
            for e in err.errors():
                msg = str(e["msg"]).removeprefix("Value error, ")
                loc = ".".join(str(p) for p in e["loc"])
                problems.append(f"{msg} (field {loc!r})" if loc else msg)
            raise SaeConfigError(f"{source}: " + "; ".join(problems)) from err

    @property
    def effective_num_latents(self) -> int:
        """``num_latents`` if set, else ``d_in * expansion_factor``."""
        return self.num_latents or self.d_in * self.expansion_factor

    def to_cfg_json(self) -> dict[str, Any]:
        """The ``cfg.json`` content sparsify writes (its fields plus ``d_in``)."""
        return {
            "expansion_factor": self.expansion_factor,
            "normalize_decoder": self.normalize_decoder,
            "num_latents": self.num_latents,
            "k": self.k,
            "multi_topk": self.multi_topk,
            "d_in": self.d_in,
        }


class EncoderOutput(NamedTuple):
    """Top-k activations (``>= 0``) and their latent indices, both ``[..., k]``."""

    top_acts: Tensor
    top_indices: Tensor


class ForwardOutput(NamedTuple):
    """Output of :meth:`TopKSAE.forward`.

    ``latent_acts``/``latent_indices`` are the top-k ones even with Multi-TopK (sparsify returns the 4k
    ones there). ``auxk_loss`` and ``multi_topk_fvu`` are 0-d zeros when not computed.
    """

    sae_out: Tensor
    latent_acts: Tensor
    latent_indices: Tensor
    fvu: Tensor
    auxk_loss: Tensor
    multi_topk_fvu: Tensor


def geometric_median(points: Tensor, max_iter: int = 100, tol: float = 1e-5, eps: float = 1e-8) -> Tensor:
    """Geometric median of ``points`` ``[n, d]`` by Weiszfeld's iterations (``[d]``, float32 or wider).

    Starts at the mean; stops when the estimate moves less than ``tol`` (relative to the points' scale,
    ``max(1, mean distance to the mean)``) or after ``max_iter`` iterations. Distances are floored at
    ``eps`` so a point that coincides with the estimate does not divide by zero.
    """
    if points.dim() != 2 or points.shape[0] == 0:
        raise ValueError(f"points must be a non-empty [n, d] tensor, got shape {tuple(points.shape)}")
    pts = points.detach().to(torch.promote_types(points.dtype, torch.float32))
    guess = pts.mean(0)
    scale = max(1.0, float(torch.linalg.vector_norm(pts - guess, dim=1).mean()))
    for _ in range(max_iter):
        dist = torch.linalg.vector_norm(pts - guess, dim=1).clamp_min(eps)
        weights = dist.reciprocal()
        new = (weights[:, None] * pts).sum(0) / weights.sum()
        moved = float(torch.linalg.vector_norm(new - guess))
        guess = new
        if moved < tol * scale:
            break
    return guess


@torch.no_grad()
def project_out_parallel_(grad: Tensor, weight: Tensor) -> Tensor:
    """In place: remove from each row of ``grad`` its component along the same (unit-norm) row of ``weight``."""
    m, d = grad.shape
    # row-wise dot products as a batched [1, d] @ [d, 1] product: no [m, d] temporary (vecdot makes one)
    parallel = torch.bmm(grad.reshape(m, 1, d), weight.reshape(m, d, 1)).reshape(m, 1)
    return grad.addcmul_(weight, parallel, value=-1.0)


AUX_SUBSET_RATIO = 4
"""AuxK runs densely over the dead latents when at most 1 / AUX_SUBSET_RATIO of the latents are dead."""


class _AuxKPlan(NamedTuple):
    """The AuxK term of one forward pass: dead latents on the model's device (None without any), width
    (0: no AuxK term) and whether it runs densely over the dead latents' columns and rows (else through the
    sparse kernels with a ``k_aux``-wide pattern)."""

    mask: Tensor | None
    k_aux: int
    dead_subset: bool


def _batch_variance(z: Tensor) -> Tensor:
    """``Σ‖z − mean(z)‖²`` over the rows of ``z``."""
    return (z - z.mean(0)).pow(2).sum()


def _sum_of_squares(flat: Tensor) -> Tensor:
    """``Σ flat²`` of a 1-D tensor, in its own precision (never autocast's); a dot product (no squared copy)
    where BLAS has one."""
    with torch.autocast(flat.device.type, enabled=False):
        if flat.dtype in (torch.float32, torch.float64):
            return torch.dot(flat, flat)
        return flat.float().pow(2).sum()


class _SquaredDistance(torch.autograd.Function):
    """``(Σ (a − b)², a − b)``: the difference is made once and returned (not differentiable), the sum taken
    without a squared copy, and the backward's gradient is its only new tensor of that size (instead of the
    four or five temporaries ``(a - b).pow(2).sum()`` leaves to autograd)."""

    @staticmethod
    def forward(ctx: Any, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        diff = a - b
        ctx.save_for_backward(diff)
        ctx.mark_non_differentiable(diff)
        return _sum_of_squares(diff.reshape(-1)), diff

    @staticmethod
    def backward(ctx: Any, grad: Tensor, _grad_diff: Any) -> tuple[Tensor | None, Tensor | None]:  # type: ignore[override]
        (diff,) = ctx.saved_tensors
        need_a, need_b = ctx.needs_input_grad
        if not (need_a or need_b):
            return None, None
        grad_a = diff * (2.0 * grad)
        if not need_b:
            return grad_a, None
        return (grad_a if need_a else None), (-grad_a if need_a else grad_a.neg_())


def squared_distance(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """``Σ (a − b)²`` (differentiable in ``a`` and ``b``) and ``a − b`` (not differentiable)."""
    return _SquaredDistance.apply(a, b)


class TopKSAE(nn.Module):
    """TopK sparse autoencoder with a tied-at-init, unit-norm decoder (sparsify's parameter names)."""

    def __init__(
        self,
        cfg: SaeConfig,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        chunk_rows: int | None = None,
    ) -> None:
        """``chunk_rows`` sets tokens per encoder chunk (default: a 512 MiB pre-activation buffer, see
        :data:`~mmsae.sae.kernels.DEFAULT_CHUNK_BYTES`).

        ``normalize_in_forward`` starts False (the decoder rows are used as stored); see :meth:`decoder_weight`.
        """
        super().__init__()
        self.cfg = cfg
        self.d_in = cfg.d_in
        self.num_latents = cfg.effective_num_latents
        self.chunk_rows = chunk_rows
        self.encoder = nn.Linear(self.d_in, self.num_latents, device=device, dtype=dtype)
        with torch.no_grad():
            self.encoder.bias.zero_()
        self.W_dec = nn.Parameter(self.encoder.weight.detach().clone())
        self.normalize_in_forward = False
        self.b_dec = nn.Parameter(torch.zeros(self.d_in, device=device, dtype=self.encoder.weight.dtype))
        if cfg.normalize_decoder:
            self.set_decoder_norm_to_unit_norm()

    # ------------------------------------------------------------------------------------------- basics

    @property
    def device(self) -> torch.device:
        return self.encoder.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.encoder.weight.dtype

    def extra_repr(self) -> str:
        return f"d_in={self.d_in}, num_latents={self.num_latents}, k={self.cfg.k}, multi_topk={self.cfg.multi_topk}"

    @torch.no_grad()
    def init_b_dec(
        self, sample: Tensor, method: Literal["geometric_median", "mean"] = "geometric_median"
    ) -> Tensor:
        """Set ``b_dec`` from a sample of activations ``[..., d_in]`` (sparsify/OpenAI: at the first step)."""
        pts = sample.reshape(-1, sample.shape[-1])
        if pts.shape[-1] != self.d_in:
            raise ValueError(f"sample has width {pts.shape[-1]}, expected d_in = {self.d_in}")
        if method == "geometric_median":
            center = geometric_median(pts)
        elif method == "mean":
            center = pts.to(torch.promote_types(pts.dtype, torch.float32)).mean(0)
        else:
            raise ValueError(f"unknown b_dec init method {method!r}; expected 'geometric_median' or 'mean'")
        self.b_dec.copy_(center.to(self.b_dec.dtype))
        return self.b_dec

    @torch.no_grad()
    def set_decoder_norm_to_unit_norm(self) -> None:
        """Rescale every decoder row to unit L2 norm, in place (at init; before saving rows that were normalised
        in the forward pass; after each step of an optimizer that updates the parameters in place)."""
        eps = torch.finfo(self.W_dec.dtype).eps
        norm = torch.linalg.vector_norm(self.W_dec, dim=1, keepdim=True)
        self.W_dec.div_(norm + eps)

    @torch.no_grad()
    def remove_gradient_parallel_to_decoder_directions(self) -> None:
        """Project out of ``W_dec.grad`` the component along each (unit-norm) decoder row.

        For a trainer that rescales the rows in place after each step (not one that sets
        ``normalize_in_forward``, where autograd already removes this component): call after ``backward`` and
        before ``optimizer.step()``; keeps Adam from spending its update on the norm that
        :meth:`set_decoder_norm_to_unit_norm` removes again.
        """
        grad = self.W_dec.grad
        if grad is None:
            raise RuntimeError(
                "W_dec has no gradient; call this after backward() and before optimizer.step()"
            )
        project_out_parallel_(grad, self.W_dec)

    def decoder_weight(self) -> Tensor:
        """The decoder rows the forward pass uses.

        With ``normalize_in_forward`` (set by trainers whose optimizer keeps its own master copy of the
        weights, as DeepSpeed ZeRO does, so that rescaling the parameters in place after a step would be
        undone) the rows are normalised here instead: the output uses unit-norm rows, and autograd through the
        normalisation removes the gradient component along each row. Otherwise the parameter as it is.
        ``decode`` and ``forward`` do not build this copy: they pass ``normalize_rows`` to
        :func:`~mmsae.sae.kernels.sparse_decode`, which applies the same normalisation to the selected rows
        only (no ``[num_latents, d_in]`` division and its autograd per step).
        """
        if not self.normalize_in_forward:
            return self.W_dec
        eps = torch.finfo(self.W_dec.dtype).eps
        return self.W_dec / (torch.linalg.vector_norm(self.W_dec, dim=1, keepdim=True) + eps)

    def _chunk_rows(self) -> int:
        return self.chunk_rows or default_chunk_rows(self.num_latents, self.encoder.weight.element_size())

    def _flat_input(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.d_in:
            raise ValueError(f"input has width {x.shape[-1]}, expected d_in = {self.d_in}")
        return x.reshape(-1, self.d_in).to(self.dtype)

    # --------------------------------------------------------------------------------- encode / decode

    def encode(self, x: Tensor) -> EncoderOutput:
        """``TopK(ReLU(encoder(x - b_dec)))`` for ``x`` ``[..., d_in]``: ``[..., k]`` values and indices."""
        lead = x.shape[:-1]
        enc = topk_encode(
            self._flat_input(x),
            self.b_dec,
            self.encoder.weight,
            self.encoder.bias,
            self.cfg.k,
            chunk_rows=self._chunk_rows(),
        )
        return EncoderOutput(enc.acts.reshape(*lead, -1), enc.indices.reshape(*lead, -1))

    def decode(self, top_acts: Tensor, top_indices: Tensor) -> Tensor:
        """``Σ_j top_acts[..., j] · W_dec[top_indices[..., j]] + b_dec`` ``[..., d_in]`` (sparse)."""
        lead = top_acts.shape[:-1]
        k = top_acts.shape[-1]
        out = sparse_decode(
            top_acts.reshape(-1, k).to(self.dtype),
            top_indices.reshape(-1, k),
            self.W_dec,
            self.b_dec,
            normalize_rows=self.normalize_in_forward,
        )
        return out.reshape(*lead, self.d_in)

    def dense_latents(self, x: Tensor) -> Tensor:
        """Encode to a dense ``[..., num_latents]`` activation matrix (for analysis; memory-hungry)."""
        acts, idx = self.encode(x)
        return acts.new_zeros(*acts.shape[:-1], self.num_latents).scatter_(-1, idx, acts)

    # ------------------------------------------------------------------------------------------ forward

    def forward(
        self,
        x: Tensor,
        dead_mask: Tensor | None = None,
        k_aux: int | None = None,
        total_variance: Tensor | None = None,
        variance_of: Callable[[Tensor], Tensor] | None = None,
    ) -> ForwardOutput:
        """Reconstruct ``x`` ``[..., d_in]`` and compute the training losses.

        Args:
            x: activations; flattened to ``[n, d_in]`` (``n >= 2``: the FVU divides by the batch variance).
            dead_mask: optional ``[num_latents]`` bool, True for latents counted as dead. With any dead
                latent the AuxK loss is computed, as in OpenAI's recipe (Gao et al. 2024): the top ``k_aux``
                dead latents by pre-activation reconstruct the residual ``e = x - x_hat`` (``x_hat`` detached, no
                ``b_dec``), and the squared error is normalised by the residual's own variance
                ``Σ‖e − mean(e)‖²`` (not the input's: the residual is much smaller once the SAE fits).
            k_aux: AuxK width, default ``d_in // 2``.
            total_variance: the FVU's denominator, ``Σ‖x − mean(x)‖²``; default: ``variance_of(x)``.
            variance_of: ``Σ‖z − mean(z)‖²`` of a ``[n, d_in]`` tensor; default: over this batch. Data-parallel
                training passes one over the global batch (every rank holds a slice), so each rank's losses
                are its share of one global FVU and AuxK loss.

        Returns:
            :class:`ForwardOutput`; ``sae_out`` has the shape of ``x``, latents ``[..., k]``.
        """
        lead = x.shape[:-1]
        y = self._flat_input(x)
        k = self.cfg.k
        aux = self._auxk_plan(dead_mask, k_aux)
        enc, top_acts, top_idx, pattern = self._encode_for_forward(y, aux)

        # with normalize_in_forward the decoder applies decoder_weight()'s normalisation itself (fused)
        norm = self.normalize_in_forward
        e_hat = None
        if aux.k_aux > 0:  # AuxK's reconstruction of the residual in the same decode (one W_dec gradient)
            sae_out, e_hat = sparse_decode_with_aux(
                top_acts, top_idx, self.W_dec, self.b_dec, enc.aux_acts, enc.aux_indices,
                aux_subset=enc.aux_subset, pattern=pattern, normalize_rows=norm,
            )
        else:
            sae_out = sparse_decode(top_acts, top_idx, self.W_dec, self.b_dec, pattern=pattern, normalize_rows=norm)
        if variance_of is None:
            variance_of = _batch_variance
        if total_variance is None:
            total_variance = variance_of(y)
        squared_error, residual = squared_distance(y, sae_out)
        fvu = squared_error / total_variance
        zero = fvu.new_zeros(())
        auxk_loss = self._auxk_loss(e_hat, residual, variance_of) if e_hat is not None else zero
        multi_topk_fvu = self._multi_topk_fvu(y, enc, total_variance) if self.cfg.multi_topk else zero

        return ForwardOutput(
            sae_out=sae_out.reshape(*lead, self.d_in).to(x.dtype),
            latent_acts=top_acts.reshape(*lead, k),
            latent_indices=top_idx.reshape(*lead, k),
            fvu=fvu,
            auxk_loss=auxk_loss,
            multi_topk_fvu=multi_topk_fvu,
        )

    def _auxk_plan(self, dead_mask: Tensor | None, k_aux: int | None) -> _AuxKPlan:
        """Check ``dead_mask`` and decide the AuxK term: its dead latents, width and path."""
        if dead_mask is None:
            return _AuxKPlan(None, 0, False)
        if dead_mask.shape != (self.num_latents,) or dead_mask.dtype != torch.bool:
            raise ValueError(
                f"dead_mask must be a bool tensor of shape [{self.num_latents}], got "
                f"{dead_mask.dtype} {tuple(dead_mask.shape)}"
            )
        num_dead = int(dead_mask.sum())
        if num_dead == 0:
            return _AuxKPlan(None, 0, False)
        k_aux_full = self.d_in // 2 if k_aux is None else int(k_aux)
        if k_aux_full <= 0:
            raise ValueError(f"k_aux must be positive, got {k_aux_full}")
        # Few dead latents (the usual case once training settles): AuxK as dense products over the dead
        # subset only, which beats k_aux-wide sparse gathers; many dead (early on): the sparse kernels.
        dead_subset = num_dead * AUX_SUBSET_RATIO <= self.num_latents
        return _AuxKPlan(dead_mask.to(self.device), min(k_aux_full, num_dead), dead_subset)

    def _encode_for_forward(
        self, y: Tensor, aux: _AuxKPlan
    ) -> tuple[TopKEncoding, Tensor, Tensor, SparsePattern | None]:
        """Encode ``y`` ``[n, d_in]`` once: the kernel's encoding (its top ``4k`` with Multi-TopK; the AuxK
        selection, taken from the same encoder product), the top-k values and indices ``[n, k]`` and their
        sparse pattern (None with Multi-TopK, where the top k are picked from the 4k)."""
        k = self.cfg.k
        k_fetch = 4 * k if self.cfg.multi_topk else k
        box: list[SparsePattern | None] = [None]
        enc = topk_encode(
            y,
            self.b_dec,
            self.encoder.weight,
            self.encoder.bias,
            k_fetch,
            aux_mask=aux.mask if aux.k_aux > 0 else None,
            k_aux=aux.k_aux,
            aux_dense=aux.dead_subset,
            chunk_rows=self._chunk_rows(),
            pattern_box=box if k_fetch == k else None,
        )
        if k_fetch == k:
            return enc, enc.acts, enc.indices, box[0]
        top_acts, pos = enc.acts.topk(k, dim=1, sorted=False)
        return enc, top_acts, enc.indices.gather(1, pos), None

    def _auxk_loss(self, e_hat: Tensor, residual: Tensor, variance_of: Callable[[Tensor], Tensor]) -> Tensor:
        """AuxK loss: the squared error of the dead latents' reconstruction ``e_hat`` of the detached
        ``residual``, over the residual's variance."""
        e = residual.detach()
        return squared_distance(e_hat, e)[0] / variance_of(e.float()).clamp_min(1e-12)

    def _multi_topk_fvu(self, y: Tensor, enc: TopKEncoding, total_variance: Tensor) -> Tensor:
        """FVU of the reconstruction from all ``4k`` latents the encoder selected (Multi-TopK)."""
        multi_out = sparse_decode(
            enc.acts, enc.indices, self.W_dec, self.b_dec, normalize_rows=self.normalize_in_forward
        )
        return squared_distance(multi_out, y)[0] / total_variance

    # ----------------------------------------------------------------------------- step contract

    def fired_latents(self, out: ForwardOutput | EncoderOutput) -> Tensor:
        """``[num_latents]`` bool: latents with a positive activation somewhere in ``out``.

        Use this (not the raw indices) to reset dead-latent counters: where fewer than ``k``
        pre-activations of a token are positive, some selected indices carry an activation of 0.
        """
        acts, idx = (out.latent_acts, out.latent_indices) if isinstance(out, ForwardOutput) else out
        positive = (acts > 0).reshape(-1).to(torch.float32)
        return torch.bincount(idx.reshape(-1), weights=positive, minlength=self.num_latents) > 0

    def training_step_losses(
        self,
        out: ForwardOutput,
        auxk_alpha: float = 0.0,
        multi_topk_weight: float = 1.0 / 8.0,
    ) -> tuple[Tensor, dict[str, Tensor], dict[str, Tensor]]:
        """The scalar training loss and the dicts a trainer logs (the generic step contract).

        ``loss = fvu + auxk_alpha * auxk + multi_topk_weight * multi_topk_fvu`` (the last term only with
        ``multi_topk``). ``losses`` holds the unweighted terms (``fvu``, ``auxk``, ``multi_topk_fvu``);
        ``metrics`` holds detached 0-d tensors: ``l0`` (mean positive activations per token),
        ``explained_variance`` (``1 - fvu``) and ``frac_fired`` (fraction of latents active in the batch).
        Nothing here synchronises with the device; convert with ``float()`` when logging.
        """
        loss = out.fvu + auxk_alpha * out.auxk_loss
        if self.cfg.multi_topk:
            loss = loss + multi_topk_weight * out.multi_topk_fvu
        losses = {"fvu": out.fvu, "auxk": out.auxk_loss, "multi_topk_fvu": out.multi_topk_fvu}
        with torch.no_grad():
            acts = out.latent_acts.reshape(-1, out.latent_acts.shape[-1])
            metrics = {
                "l0": (acts > 0).sum(-1).to(torch.float32).mean(),
                "explained_variance": 1.0 - out.fvu.detach(),
                "frac_fired": self.fired_latents(out).to(torch.float32).mean(),
            }
        return loss, losses, metrics
