"""An independent forward of the replacement setting, in plain torch hooks (no nnsight): attention
patterns and norm scales frozen at their clean values, MLP outputs fixed (clean + an offset), and an
offset on the residual stream entering layer 0. The graph tests compare link weights against it."""

from __future__ import annotations

from typing import Any

import torch

from pie_lib.models.arch import get_path


class FrozenReplacement:
    """Record the clean state of one prompt, then rerun it with fixed additive writes."""

    def __init__(self, model: Any, input_ids: torch.Tensor) -> None:
        self.hf = model.hf
        self.arch = model.arch
        self.L = model.n_layers
        self.ids = input_ids.reshape(1, -1)
        self.layers = get_path(self.hf, self.arch.layers)
        self.clean: dict[str, torch.Tensor] = {}
        self._run(record=True)

    # ------------------------------------------------------------------ hooks
    def _norms(self) -> list[tuple[str, Any]]:
        out = [(f"{l}.{n}", get_path(self.layers[l], n)) for l in range(self.L) for n in self.arch.norms]
        return out + [("final", get_path(self.hf, self.arch.final_norm))]

    def _frozen(self, key: str, mod: Any, x: torch.Tensor) -> torch.Tensor:
        """The norm applied with the clean input's scale."""
        xc = self.clean[f"norm_in:{key}"].float()
        eps = float(getattr(mod, "variance_epsilon", getattr(mod, "eps", 1e-5)))
        xf = x.float()
        kind = self.arch.norm_kind
        if kind == "layernorm":
            s = torch.rsqrt(xc.var(-1, keepdim=True, unbiased=False) + eps)
            y = (xf - xf.mean(-1, keepdim=True)) * s * mod.weight.float() + mod.bias.float()
        else:
            s = torch.rsqrt(xc.pow(2).mean(-1, keepdim=True) + eps)
            w = mod.weight.float() + (1.0 if kind == "rms_offset" else 0.0)
            y = xf * s * w
        return y.to(x.dtype)

    def _run(
        self, record: bool, embed_offset: torch.Tensor | None = None, mlp_offsets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        handles = []
        resid: list[torch.Tensor] = [None] * self.L  # type: ignore[list-item]

        def pre_layer0(mod, args, kwargs):
            if record:
                self.clean["embed"] = (args[0] if args else kwargs["hidden_states"]).detach().clone()
                return None
            h = self.clean["embed"] + embed_offset.to(self.clean["embed"].dtype)
            if args:
                return (h, *args[1:]), kwargs
            kwargs["hidden_states"] = h
            return args, kwargs

        handles.append(self.layers[0].register_forward_pre_hook(pre_layer0, with_kwargs=True))
        for key, mod in self._norms():

            def norm_hook(mod, args, out, key=key):
                x = args[0]
                if record:
                    self.clean[f"norm_in:{key}"] = x.detach().clone()
                    return None
                return self._frozen(key, mod, x)

            handles.append(mod.register_forward_hook(norm_hook))
        for l in range(self.L):
            rmod = get_path(self.layers[l], self.arch.resid_mid)

            def read_resid(mod, args, l=l):
                resid[l] = args[0].detach().clone()

            handles.append(rmod.register_forward_pre_hook(read_resid))
            for p in self.arch.pattern_inputs:

                def pat_hook(mod, args, out, key=f"{l}.{p.path}", frac=p.fraction):
                    if record:
                        self.clean[f"pat:{key}"] = out.detach().clone()
                        return None
                    cut = out.shape[-1] * frac[0] // frac[1]
                    return torch.cat([self.clean[f"pat:{key}"][..., :cut], out[..., cut:]], dim=-1)

                handles.append(get_path(self.layers[l], p.path).register_forward_hook(pat_hook))

            def mlp_hook(mod, args, out, l=l):
                if record:
                    self.clean[f"mlp:{l}"] = out.detach().clone()
                    return None
                return self.clean[f"mlp:{l}"] + mlp_offsets[l].to(out.dtype)

            # registered after the norm hook, so Gemma-2's frozen post-MLP norm is applied first
            handles.append(get_path(self.layers[l], self.arch.mlp_out).register_forward_hook(mlp_hook))
        try:
            with torch.no_grad():
                out = self.hf(self.ids.to(next(self.hf.parameters()).device))
        finally:
            for h in handles:
                h.remove()
        logits = out.logits[0, -1].float()
        return torch.stack([r[0] for r in resid]).float(), logits

    def rerun(self, embed_offset: torch.Tensor, mlp_offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``embed_offset`` ``[T, D]``, ``mlp_offsets`` ``[L, T, D]`` -> (resid_mid ``[L, T, D]``, last logits ``[V]``)."""
        return self._run(False, embed_offset[None], mlp_offsets[:, None])
