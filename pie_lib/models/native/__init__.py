"""pie_lib's own torch implementations of the decoder architectures in :mod:`pie_lib.models.arch`.

Why: importing ``transformers``' modeling stack (``modeling_utils``, which pulls in
``torch._dynamo``, ``torch.distributed.tensor``, sympy, scipy.optimize) costs ~2 s of every
``pie prune``. These modules need only torch, a config object and the safetensors files.

What must hold (``tests/test_native.py``):

- the module tree and parameter names are exactly the Hugging Face ones
  (``transformer.h.0.attn.c_attn``, ``model.layers.0.mlp.gate_proj``...), so every ArchSpec path,
  nnsight envoy, ``block.skip``, frozen-norm rule, CLT-RelP rewrite and safetensors key works as is;
- the forward runs transformers 5.24's operations in the same order (SDPA with ``is_causal`` when
  nothing is masked and the query covers every key, an explicit boolean mask otherwise), so on a
  CPU in float32 the logits are bitwise those of the Hugging Face model.

GPT-2 (:mod:`.gpt2`), Llama (:mod:`.llama`) and Gemma-2 (:mod:`.gemma2`, transformers' eager
attention path: SDPA cannot soft-cap) have native implementations (``ArchSpec.native``).
"""

from __future__ import annotations

from pie_lib.models.native.common import CausalLMOutput, KVCache
from pie_lib.models.native.loading import NATIVE_ARCHS, build_native, load_native_model

__all__ = ["NATIVE_ARCHS", "CausalLMOutput", "KVCache", "build_native", "load_native_model"]
