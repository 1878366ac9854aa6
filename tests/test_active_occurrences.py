"""The sparse encode of a batch's active set is bit for bit the dense one.

:func:`active_occurrences` encodes only the rows whose activations can differ (no BOS, no corrupted
position whose residual stream is the clean one) and reads the active entries off the
pre-activations (:meth:`CrossLayerTranscoder.active_entries`). The reference here is the dense
path it replaced: every row encoded in one matmul per layer and side, BOS zeroed, ``nonzero``, the
union by ``index_add``.
"""

from __future__ import annotations

import pytest
import torch

from pie_lib.clt.lazy import LazyDecoder
from pie_lib.clt.transcoder import CLTConfig, CrossLayerTranscoder
from pie_lib.engine.traces import ForwardCache
from pie_lib.errors import NumericalError
from pie_lib.prune.occurrences import active_occurrences, matmul_rows

L, F, D = 3, 96, 16


def _clt(activation: str = "jumprelu", negative: bool = False, seed: int = 0) -> CrossLayerTranscoder:
    g = torch.Generator().manual_seed(seed)
    thr = torch.rand(L, F, generator=g) * 2.0
    if negative:
        thr[:, ::3] = -0.5  # a negative threshold passes pre = 0
    cfg = CLTConfig(activation=activation, k=5 if activation == "topk" else None, n_layers=L, d_model=D, n_features=F)  # type: ignore[arg-type]
    return CrossLayerTranscoder(
        cfg,
        torch.randn(L, F, D, generator=g),
        torch.randn(L, F, generator=g),
        torch.zeros(L, D),
        thr if activation == "jumprelu" else None,
        LazyDecoder([torch.randn(F, L - i, D, generator=g) for i in range(L)]),
    )


def _dense_reference(clt: CrossLayerTranscoder, clean: ForwardCache, corr: ForwardCache | None, zero_bos: bool):
    """The dense path: ``[B, T, F]`` activations per layer and side, then the union."""
    _, B, T, _ = clean.resid_mid.shape
    keys, vals_c, vals_o = [], [], []
    for layer in range(L):
        for side, cache in (("c", clean), ("o", corr)):
            if cache is None:
                continue
            x = cache.resid_mid[layer]
            acts = clt.activation_fn(x @ clt.W_enc[layer].T + clt.b_enc[layer], layer)
            if zero_bos:
                acts[:, 0] = 0
            idx = acts.nonzero()
            v = acts[idx[:, 0], idx[:, 1], idx[:, 2]]
            keys.append(((idx[:, 0] * L + layer) * T + idx[:, 1]) * F + idx[:, 2])
            vals_c.append(v if side == "c" else torch.zeros_like(v))
            vals_o.append(v if side == "o" else torch.zeros_like(v))
    uniq, inv = torch.unique(torch.cat(keys), return_inverse=True)
    a_c = torch.zeros(uniq.numel()).index_add_(0, inv, torch.cat(vals_c))
    a_o = torch.zeros(uniq.numel()).index_add_(0, inv, torch.cat(vals_o))
    return uniq, a_c, a_o


def _caches(B: int, T: int, shared: int, seed: int = 1, differ_last_only: bool = False):
    """Clean and corrupted residual streams whose first ``shared`` positions are bit for bit equal."""
    g = torch.Generator().manual_seed(seed)
    clean = torch.randn(L, B, T, D, generator=g) * 2
    corr = torch.randn(L, B, T, D, generator=g) * 2
    corr[:, :, :shared] = clean[:, :, :shared]
    if differ_last_only:  # one corrupted row differs from its clean row: it must be topped up to 4 rows
        corr.copy_(clean)
        corr[:, 0, -1] += 1.0
    z = torch.zeros(1)
    return ForwardCache(clean, clean, z), ForwardCache(corr, corr, z)


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.view(torch.int32)


@pytest.mark.parametrize(
    "activation,negative", [("jumprelu", False), ("jumprelu", True), ("relu", False), ("topk", False)]
)
@pytest.mark.parametrize(
    "B,T,shared,last_only", [(5, 9, 3, False), (4, 7, 0, False), (3, 6, 6, False), (1, 3, 1, False), (6, 8, 0, True)]
)
@pytest.mark.parametrize("zero_bos", [True, False])
@pytest.mark.parametrize("zero_corruption", [False, True])
def test_sparse_encode_is_the_dense_one(
    activation, negative, B, T, shared, last_only, zero_bos, zero_corruption, one_torch_thread
):
    """Bitwise on one thread, like every exactness claim of the patch engine (``one_torch_thread``):
    with two, torch's CPU matmul rounds a row by how its threads split the input, so a row subset
    need not round as the whole batch (measured: the 6 x 8 one-differing-row case fails)."""
    clt = _clt(activation, negative)
    clean, corr = _caches(B, T, shared, differ_last_only=last_only)
    if negative:  # rows of zeros with a zero bias: pre = 0 exactly, which a negative threshold lets through
        clt.b_enc[:, ::3] = 0.0
        clean.resid_mid[:, :, -1] = 0.0
    corr_in = None if zero_corruption else corr
    occ = active_occurrences(clt, clean, corr_in, zero_bos=zero_bos)
    uniq, a_c, a_o = _dense_reference(clt, clean, corr_in, zero_bos)
    key = ((occ.prompt * L + occ.layer) * T + occ.pos) * F + occ.feat
    assert len(occ) > 0 and torch.equal(key, uniq)
    assert torch.equal(_bits(occ.a_clean), _bits(a_c)) and torch.equal(_bits(occ.a_corr), _bits(a_o))


@pytest.mark.parametrize(
    "activation,negative", [("jumprelu", False), ("jumprelu", True), ("relu", False), ("topk", False)]
)
def test_active_entries_are_encode_nonzero(activation, negative):
    clt = _clt(activation, negative)
    x = torch.randn(37, D) * 2
    x[5] = 0.0
    clt.b_enc[:, ::3] = 0.0
    for layer in range(L):
        acts = clt.encode(x, layer=layer)
        idx, vals = clt.active_entries(x, layer)
        ref = acts.nonzero()
        assert torch.equal(idx, ref) and torch.equal(_bits(vals), _bits(acts[ref[:, 0], ref[:, 1]]))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_pre_activations_are_an_error(bad):
    clt = _clt()
    x = torch.randn(6, D)
    x[2, 3] = bad
    with pytest.raises(NumericalError, match="CLT layer 1: NaN/Inf"):
        clt.active_entries(x, 1)


def test_matmul_rows_tops_up_to_four():
    want = torch.zeros(3, 4, dtype=torch.bool)
    assert torch.equal(matmul_rows(want), want)  # nothing wanted: nothing encoded
    want[1, 2] = True
    rows = matmul_rows(want)
    assert int(rows.sum()) == 4 and bool(rows[1, 2]) and rows.flatten()[:3].all()
    many = torch.ones(2, 3, dtype=torch.bool)
    many[0, 0] = False
    assert torch.equal(matmul_rows(many), many)
    small = torch.tensor([[False, True, False]])  # a whole input of 3 rows: all of them, as before
    assert matmul_rows(small).all()
