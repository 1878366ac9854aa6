"""The attribution graph of one prompt's circuit: nodes, and links = direct effects in the replacement setting.

Nodes: the circuit's kept occurrences (CLT features), one embedding node per prompt token, one MLP
reconstruction-error node per (layer, position) and the metric's two logits (correct, wrong) at
the last position. Features of the active set outside the circuit are not nodes (as in a pruned
attribution graph): their writes are not attributed to anything.

A link ``source -> target`` is the source's write's direct effect on the target in the replacement
setting (:mod:`pie_lib.engine.graph`): attention patterns and norm scales frozen, MLPs replaced by
the CLT with its activations held fixed. Targets are kept occurrences' encoder pre-activations and
the two logits. For a write ``w`` into the residual stream the effect is ``<w, d target / d w>``:

- feature (l, t, i) with clean activation a: ``a * sum_{s >= l} <W_dec[l][i, s-l], g_s(t)>``;
- embedding at t: ``<e(t), g_emb(t)>`` (the residual stream entering layer 0);
- error (s, t): ``<mlp_out_s(t) - CLT reconstruction_s(t), g_s(t)>``.

Because that setting is linear, a link equals the change of its target when the source's write is
removed with everything else held fixed (what the tests check by an independent forward).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from pie_lib.clt.transcoder import CrossLayerTranscoder
from pie_lib.engine.graph import GraphTargets, PromptWrites, prompt_writes, replacement_target_gradients
from pie_lib.errors import SettingError
from pie_lib.graph.ids import cantor, embedding_node_id, error_node_id, feature_node_id, logit_node_id
from pie_lib.models.loading import LoadedModel

log = logging.getLogger("pie_lib.graph")


@dataclass
class GraphConfig:
    """How a circuit's graph is built.

    Attributes:
        edge_threshold: keep links with ``|weight| >= edge_threshold * max |weight|`` of the graph
            (a per-graph, relative threshold; 0 keeps every nonzero link).
        batch_size: target nodes per backward pass (the prompt is repeated this many times).
        error_nodes: add error nodes (those left with at least one link after the threshold).
    """

    edge_threshold: float = 0.01
    batch_size: int = 32
    error_nodes: bool = True

    def __post_init__(self) -> None:
        if not 0.0 <= self.edge_threshold < 1.0:
            raise SettingError(
                f"--edge-threshold {self.edge_threshold}: must be in [0, 1) (a fraction of the largest |link|)"
            )
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise SettingError(f"--batch-size {self.batch_size}: must be a positive integer")


@dataclass
class CircuitGraph:
    """One prompt's graph, ready to be written in circuit-tracer's schema.

    Attributes:
        nodes: node dicts (circuit-tracer ``Node`` fields), sources first, logits last.
        links: ``{"source", "target", "weight"}`` dicts after the edge threshold.
        adjacency: ``[n_targets, n_sources]`` every direct effect before the threshold
            (targets: kept occurrences then logits; sources: kept occurrences, embeddings, errors).
        prompt_tokens: the prompt's tokens as strings.
    """

    nodes: list[dict]
    links: list[dict]
    adjacency: torch.Tensor
    prompt_tokens: list[str]
    source_ids: list[str] = field(default_factory=list)
    target_ids: list[str] = field(default_factory=list)


def _clean_activations(clt: CrossLayerTranscoder, writes: PromptWrites) -> torch.Tensor:
    """``[L, T, F]`` CLT activations of the clean forward (CLT's own activation function)."""
    return clt.encode(writes.resid_mid.to(clt.device, clt.dtype)).float()


def direct_effects(
    model: LoadedModel,
    clt: CrossLayerTranscoder,
    input_ids: torch.Tensor,
    occurrences: torch.Tensor,
    targets_tokens: torch.Tensor,
    batch_size: int = 32,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Every direct effect between a circuit's nodes.

    Args:
        input_ids: ``[T]`` the clean prompt.
        occurrences: ``[K, 3]`` kept (layer, position, feature).
        targets_tokens: ``[M]`` logit tokens (the metric's correct and wrong targets).
    Returns:
        (adjacency ``[K + M, K + T + L*T]``: rows = targets (occurrences' pre-activations, then
        logits), columns = sources (occurrences, embeddings by position, errors by (layer, pos)
        flattened layer-major); extras: ``activation`` ``[K]``, ``pre_activation`` ``[K]``,
        ``logits`` ``[V]`` last-position logits, ``error_norm`` ``[L, T]``).
    """
    L, D = model.n_layers, model.d_model
    ids = input_ids.reshape(-1)
    T = ids.numel()
    K = occurrences.shape[0]
    occ = occurrences.long().cpu()
    lay, pos, feat = occ[:, 0], occ[:, 1], occ[:, 2]
    writes = prompt_writes(model, ids)
    acts = _clean_activations(clt, writes)  # [L, T, F]
    recon = clt.decode(acts.to(clt.dtype)).float().to(writes.mlp_out.device)  # [L, T, D]
    error = writes.mlp_out.float() - recon  # [L, T, D]
    a = acts[lay, pos, feat].cpu() if K else torch.zeros(0)
    pre = (
        clt.pre_activations(writes.resid_mid.to(clt.device, clt.dtype)).float()[lay, pos, feat].cpu()
        if K
        else torch.zeros(0)
    )

    M = targets_tokens.numel()
    tg = GraphTargets(
        layer=torch.cat([lay, torch.full((M,), -1, dtype=torch.long)]),
        pos=torch.cat([pos, torch.full((M,), T - 1, dtype=torch.long)]),
        enc=torch.cat([clt.W_enc[lay.to(clt.device), feat.to(clt.device)].float().cpu(), torch.zeros(M, D)]),
        bias=torch.cat([clt.b_enc[lay.to(clt.device), feat.to(clt.device)].float().cpu(), torch.zeros(M)]),
        token=torch.cat([torch.full((K,), -1, dtype=torch.long), targets_tokens.long().cpu()]),
    )
    # decoder rows of the kept occurrences, fetched once per source layer
    by_layer = {int(l): (lay == l).nonzero().squeeze(-1) for l in torch.unique(lay).tolist()}
    rows = {l: clt.decoder_rows(l, feat[idx].to(clt.device)).float() for l, idx in by_layer.items()}  # [U, n_out, D]
    emb = writes.embed.float()
    adj = torch.zeros(K + M, K + T + L * T)
    for lo in range(0, K + M, batch_size):
        hi = min(K + M, lo + batch_size)
        g = replacement_target_gradients(model, ids, tg.slice(lo, hi))
        gm = g.mlp.to(error.device)  # [L, N, T, D]
        for l, idx in by_layer.items():
            r = rows[l].to(gm.device)
            eff = torch.zeros(idx.numel(), hi - lo, device=gm.device)
            p = pos[idx].to(gm.device)
            for j, s in enumerate(clt.targets(l)):
                eff += torch.einsum("nud,ud->un", gm[s][:, p], r[:, j])
            adj[lo:hi, idx] = (eff * a[idx].to(gm.device)[:, None]).T.cpu()
        adj[lo:hi, K : K + T] = torch.einsum("td,ntd->nt", emb.to(gm.device), g.embed.to(gm.device)).cpu()
        adj[lo:hi, K + T :] = torch.einsum("std,sntd->nst", error, gm).reshape(hi - lo, L * T).cpu()
    return adj, {
        "activation": a,
        "pre_activation": pre,
        "logits": writes.last_logits.float().cpu(),
        "error_norm": error.norm(dim=-1).cpu(),
    }


def node_influence(adj: torch.Tensor, logit_weights: torch.Tensor) -> torch.Tensor:
    """circuit-tracer's notion of influence: how much of the logits' (probability-weighted) input
    flows through each node, along all paths, with every node's inputs normalised to sum 1.

    Args:
        adj: ``[K + M, n_sources]`` (targets = the first K sources, then M logits).
        logit_weights: ``[M]`` weights of the logit targets (their probabilities).
    Returns:
        ``[n_sources]`` influence of each source node.
    """
    K = adj.shape[0] - logit_weights.numel()
    a = adj.abs()
    a = a / a.sum(1, keepdim=True).clamp_min(1e-12)
    w = logit_weights / logit_weights.sum().clamp_min(1e-12)
    cur = w @ a[K:]  # [S]: one step back from the logits
    total = cur.clone()
    for _ in range(K + 1):  # paths through kept occurrences are at most K long
        cur = cur[:K] @ a[:K]
        if float(cur.abs().sum()) < 1e-12:
            break
        total += cur
    return total


def build_circuit_graph(
    model: LoadedModel,
    clt: CrossLayerTranscoder,
    input_ids: torch.Tensor,
    occurrences: list[list[int]] | torch.Tensor,
    correct: int,
    wrong: int,
    config: GraphConfig | None = None,
    descriptions: dict[tuple[int, int], str] | None = None,
) -> CircuitGraph:
    """Nodes and thresholded links of one prompt's circuit (module docstring).

    Args:
        input_ids: ``[T]`` clean prompt; occurrences: kept ``[layer, position, feature]`` triples.
        correct, wrong: the metric's target tokens; descriptions: ``(layer, feature) -> text`` (Stage II).
    """
    cfg = config or GraphConfig()
    occ = torch.as_tensor(occurrences, dtype=torch.long).reshape(-1, 3)
    ids = input_ids.reshape(-1).cpu()
    T, L = ids.numel(), model.n_layers
    bad = occ[
        (occ[:, 0] < 0)
        | (occ[:, 0] >= L)
        | (occ[:, 1] < 0)
        | (occ[:, 1] >= T)
        | (occ[:, 2] < 0)
        | (occ[:, 2] >= clt.n_features)
    ]
    if bad.numel():
        raise SettingError(
            f"occurrence {bad[0].tolist()} [layer, position, feature] does not fit this prompt ({T} tokens) and CLT "
            f"({L} layers x {clt.n_features} features); were the selections made with another model, CLT or data?"
        )
    logit_tokens = [int(correct)] if int(correct) == int(wrong) else [int(correct), int(wrong)]
    adj, extra = direct_effects(model, clt, ids, occ, torch.tensor(logit_tokens), cfg.batch_size)
    K = occ.shape[0]
    probs = torch.softmax(extra["logits"], -1)[torch.tensor(logit_tokens)]
    influence = node_influence(adj, probs)
    tok = model.tokenizer
    prompt_tokens = [tok.decode([int(t)]) for t in ids]

    src_ids = [feature_node_id(l, f, t) for l, t, f in occ.tolist()]
    src_ids += [embedding_node_id(int(v), t) for t, v in enumerate(ids.tolist())]
    src_ids += [error_node_id(s, t) for s in range(L) for t in range(T)]
    tgt_ids = src_ids[:K] + [logit_node_id(L, v, T - 1) for v in logit_tokens]

    # threshold relative to the graph's largest link
    mag = adj.abs()
    cut = cfg.edge_threshold * float(mag.max()) if mag.numel() else 0.0
    keep = (mag > 0) & (mag >= cut)
    if not cfg.error_nodes:
        keep[:, K + T :] = False
    kept_err = keep[:, K + T :].any(0)
    feature_ids = set(src_ids[:K])
    clash = [src_ids[K + T + j] for j in kept_err.nonzero().squeeze(-1).tolist() if src_ids[K + T + j] in feature_ids]
    if clash:  # "0_{layer}_{pos}" of an error can equal "0_{feature}_{pos}" of a layer-0 feature
        log.warning(
            "error node(s) %s share an id with a kept layer-0 feature in circuit-tracer's id scheme; "
            "they are left out of this graph",
            clash,
        )
        for cid in clash:
            keep[:, src_ids.index(cid, K + T)] = False
        kept_err = keep[:, K + T :].any(0)

    nodes: list[dict] = []
    desc = descriptions or {}
    for j, (l, t, f) in enumerate(occ.tolist()):
        nodes.append(
            {
                "node_id": src_ids[j],
                "feature": cantor(l, f),
                "layer": str(l),
                "ctx_idx": t,
                "feature_type": "cross layer transcoder",
                "jsNodeId": f"{l}_{f}-0",
                "clerp": desc.get((l, f), ""),
                "influence": float(influence[j]),
                "activation": float(extra["activation"][j]),
            }
        )
    for t, v in enumerate(ids.tolist()):
        nodes.append(
            {
                "node_id": src_ids[K + t],
                "feature": t,
                "layer": "E",
                "ctx_idx": t,
                "feature_type": "embedding",
                "jsNodeId": f"E_{v}-{t}",
                "influence": float(influence[K + t]),
            }
        )
    for j in kept_err.nonzero().squeeze(-1).tolist():
        s, t = divmod(j, T)
        nodes.append(
            {
                "node_id": src_ids[K + T + j],
                "feature": -1,
                "layer": str(s),
                "ctx_idx": t,
                "feature_type": "mlp reconstruction error",
                "jsNodeId": f"{s}_{t}-0",
                "influence": float(influence[K + T + j]),
            }
        )
    for m, v in enumerate(logit_tokens):
        p = float(probs[m])
        nodes.append(
            {
                "node_id": tgt_ids[K + m],
                "feature": v,
                "layer": str(L + 1),
                "ctx_idx": T - 1,
                "feature_type": "logit",
                "jsNodeId": f"L_{v}-{T - 1}",
                "token_prob": p,
                "is_target_logit": m == 0,
                "clerp": f'Output "{tok.decode([v])}" (p={p:.3f})',
            }
        )
    ti, si = keep.nonzero(as_tuple=True)
    links = [
        {"source": src_ids[s], "target": tgt_ids[t], "weight": float(adj[t, s])}
        for t, s in zip(ti.tolist(), si.tolist())
    ]
    return CircuitGraph(
        nodes=nodes, links=links, adjacency=adj, prompt_tokens=prompt_tokens, source_ids=src_ids, target_ids=tgt_ids
    )
