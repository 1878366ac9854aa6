"""The cross-layer transcoder (CLT) as pie_lib uses it: encode residual streams, decode writes.

Notation (spec §1): L layers, D = d_model, F features per layer. Feature i of source layer l
reads ``hook_resid_mid`` of layer l and writes into ``hook_mlp_out`` of every target layer
s in ``targets(l)``. For a CLT ``targets(l) = l, ..., L-1``; for a per-layer transcoder set (PLT)
``targets(l) = l`` only. Decoder rows of layer l have shape ``[n_out(l), D]``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor

from pie_lib.clt.lazy import LazyDecoder
from pie_lib.errors import NumericalError, ShapeMismatchError

Activation = Literal["relu", "jumprelu", "topk"]


@dataclass
class CLTConfig:
    """What ``config.yaml`` says, plus what the tensor shapes say (n_layers, d_model, F)."""

    model_kind: Literal["cross_layer_transcoder", "transcoder_set"] = "cross_layer_transcoder"
    feature_input_hook: str = "hook_resid_mid"
    feature_output_hook: str = "hook_mlp_out"
    model_name: str | None = None
    activation: Activation = "relu"
    k: int | None = None
    n_layers: int = 0
    d_model: int = 0
    n_features: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def is_cross_layer(self) -> bool:
        return self.model_kind == "cross_layer_transcoder"


class CrossLayerTranscoder:
    """Encoders held in memory (they are needed whole to encode), decoders lazy.

    Args:
        config: the parsed config.
        W_enc: ``[L, F, D]`` encoder weights.
        b_enc: ``[L, F]`` encoder biases.
        b_dec: ``[L, D]`` decoder biases (one per *target* layer).
        threshold: ``[L, F]`` JumpReLU thresholds, or None for ReLU/TopK.
        decoder: lazy decoder giving rows ``[U, n_out(l), D]`` of source layer l.
    """

    def __init__(
        self,
        config: CLTConfig,
        W_enc: torch.Tensor,
        b_enc: torch.Tensor,
        b_dec: torch.Tensor,
        threshold: torch.Tensor | None,
        decoder: LazyDecoder,
    ) -> None:
        self.config = config
        self.W_enc = W_enc
        self.b_enc = b_enc
        self.b_dec = b_dec
        self.threshold = threshold
        self.decoder = decoder

    # ------------------------------------------------------------------ shapes
    @property
    def n_layers(self) -> int:
        return self.W_enc.shape[0]

    @property
    def n_features(self) -> int:
        return self.W_enc.shape[1]

    @property
    def d_model(self) -> int:
        return self.W_enc.shape[2]

    @property
    def device(self) -> torch.device:
        return self.W_enc.device

    @property
    def dtype(self) -> torch.dtype:
        return self.W_enc.dtype

    def n_out(self, layer: int) -> int:
        """Number of target layers source layer ``layer`` writes to."""
        return self.n_layers - layer if self.config.is_cross_layer else 1

    def targets(self, layer: int) -> range:
        return range(layer, layer + self.n_out(layer))

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "CrossLayerTranscoder":
        """Move encoders (and the decoder cache target) to ``device`` / ``dtype`` in place."""
        kw: dict[str, Any] = {k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None}
        self.W_enc = self.W_enc.to(**kw)
        self.b_enc = self.b_enc.to(**kw)
        self.b_dec = self.b_dec.to(**kw)
        if self.threshold is not None:
            self.threshold = self.threshold.to(**kw)
        self.decoder.to(**kw)
        return self

    # ------------------------------------------------------------------ encode
    def pre_activations(self, resid_mid: torch.Tensor, layer: int | None = None) -> torch.Tensor:
        """Encoder pre-activations.

        Args:
            resid_mid: ``[L, ..., D]`` residual streams at every layer (or ``[..., D]`` with ``layer``).
        Returns:
            ``[L, ..., F]`` (or ``[..., F]``).
        """
        if resid_mid.shape[-1] != self.d_model:
            raise ShapeMismatchError(
                f"resid_mid has d_model {resid_mid.shape[-1]} but the CLT expects {self.d_model}; "
                "use the CLT trained for this model"
            )
        x = resid_mid.to(self.W_enc.dtype)
        if layer is not None:
            return (x @ self.W_enc[layer].T).add_(self.b_enc[layer])  # in place: the same bits as ``+``
        if x.shape[0] != self.n_layers:
            raise ShapeMismatchError(f"resid_mid has {x.shape[0]} layers but the CLT has {self.n_layers}")
        lead = x.shape[1:-1]
        flat = x.reshape(self.n_layers, -1, self.d_model)
        pre = torch.baddbmm(self.b_enc[:, None, :], flat, self.W_enc.transpose(1, 2))
        return pre.reshape(self.n_layers, *lead, self.n_features)

    def activation_fn(self, pre: torch.Tensor, layer: int | None = None) -> torch.Tensor:
        """ReLU, JumpReLU (keep pre where pre > threshold) or TopK, per the config."""
        if self.threshold is not None:
            thr = (
                self.threshold[layer]
                if layer is not None
                else self.threshold.reshape(self.n_layers, *([1] * (pre.dim() - 2)), self.n_features)
            )
            return pre * (pre > thr)
        acts = torch.relu(pre)
        if self.config.activation == "topk" and self.config.k:
            k = min(int(self.config.k), acts.shape[-1])
            vals, idx = acts.topk(k, dim=-1)
            acts = torch.zeros_like(acts).scatter_(-1, idx, vals)
        return acts

    def encode(self, resid_mid: torch.Tensor, layer: int | None = None) -> torch.Tensor:
        """Feature activations ``[L, ..., F]`` from residual streams ``[L, ..., D]``."""
        return self.activation_fn(self.pre_activations(resid_mid, layer), layer)

    def active_entries(self, rows: Float[Tensor, "n D"], layer: int) -> tuple[Int[Tensor, "A 2"], Float[Tensor, " A"]]:
        """The nonzero activations of ``rows`` at ``layer``, sparse: ``(row, feature)`` ``[A, 2]``
        (row-major order) and their values ``[A]``, each entry and bit those of
        ``encode(rows, layer).nonzero()``.

        ReLU and JumpReLU read the mask ``pre > threshold`` and the values off the pre-activations,
        so no dense activation tensor is built: where ``pre > thr``, ``pre * 1`` and ``relu(pre)``
        are ``pre``. That needs finite pre-activations (``NaN * 0`` would be a NaN "activation"), so
        a NaN/Inf one is an error. TopK keeps the dense path.
        """
        pre = self.pre_activations(rows, layer)  # [n, F]
        if self.threshold is None and self.config.activation == "topk" and self.config.k:
            acts = self.activation_fn(pre, layer)
            idx = acts.nonzero()
            return idx, acts[idx[:, 0], idx[:, 1]]
        if pre.numel():
            lo, hi = torch.aminmax(pre)  # one pass; NaN propagates into both
            if not (bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))):
                raise NumericalError(
                    f"CLT layer {layer}: NaN/Inf encoder pre-activations (corrupt CLT weights, or residual "
                    f"streams that overflow {self.dtype}); check the CLT and the model"
                )
        thr = self.threshold[layer] if self.threshold is not None else None
        active = pre > (thr if thr is not None else 0)  # [n, F]
        if thr is not None and bool((thr < 0).any()):
            active &= pre != 0  # a negative threshold passes pre = 0, whose activation is 0
        idx = active.nonzero()
        return idx, pre[idx[:, 0], idx[:, 1]]

    # ------------------------------------------------------------------ decode
    def decoder_rows(self, layer: int, features: torch.Tensor) -> torch.Tensor:
        """Decoder rows ``[U, n_out(layer), D]`` for feature indices ``features`` ``[U]``."""
        return self.decoder.rows(layer, features)

    def decode(self, acts: torch.Tensor) -> torch.Tensor:
        """Reconstruction of every layer's MLP output from dense activations.

        Only features active somewhere in ``acts`` have their decoder rows fetched.

        Args:
            acts: ``[L, ..., F]`` feature activations.
        Returns:
            ``[L, ..., D]``: ``recon[s] = sum_{l: s in targets(l)} acts[l] @ W_dec[l][:, s-l] + b_dec[s]``.
        """
        L = self.n_layers
        lead = acts.shape[1:-1]
        flat = acts.reshape(L, -1, self.n_features)
        out = self.b_dec.to(flat.dtype)[:, None, :].expand(L, flat.shape[1], self.d_model).clone()
        for layer in range(L):
            used = (flat[layer] != 0).any(dim=0).nonzero().squeeze(-1)
            if used.numel() == 0:
                continue
            rows = self.decoder_rows(layer, used).to(flat.dtype)  # [U, n_out, D]
            writes = torch.einsum("nu,usd->snd", flat[layer][:, used], rows)
            out[layer : layer + self.n_out(layer)] += writes
        return out.reshape(L, *lead, self.d_model)


def fvu(recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Fraction of variance unexplained per layer.

    FVU_s = sum ||target_s - recon_s||^2 / sum ||target_s - mean(target_s)||^2, the sums over
    every token (and the mean a per-dimension mean over tokens).

    Args:
        recon, target: ``[L, N, D]`` (or ``[L, ..., D]``).
    Returns:
        ``[L]``.
    """
    L, D = target.shape[0], target.shape[-1]
    t = target.reshape(L, -1, D).double()
    r = recon.reshape(L, -1, D).double()
    resid = (t - r).pow(2).sum(dim=(1, 2))
    total = (t - t.mean(dim=1, keepdim=True)).pow(2).sum(dim=(1, 2))
    return (resid / total.clamp_min(1e-30)).float()


def mean_l0(acts: torch.Tensor) -> torch.Tensor:
    """Mean number of active features per token, per layer: ``[L, ..., F]`` -> ``[L]``."""
    L, F = acts.shape[0], acts.shape[-1]
    return (acts.reshape(L, -1, F) != 0).sum(-1).float().mean(-1)
