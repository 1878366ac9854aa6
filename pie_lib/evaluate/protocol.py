"""Stage III, Evaluate: FADE-style scores of every description (spec §8).

For each described feature:

1. **Clarity** -- the generator writes texts expressing the description; their activations
   (value at the token of largest |activation|, BOS excluded) against the activations of every
   natural corpus context: ``|gini|``.
2. **Responsiveness / Purity** -- natural contexts sampled per the protocol are rated 0/1/2;
   ``|gini|`` and average precision of activation for rated-2 versus rated-0 samples.
3. **Faithfulness** -- the feature is steered (factors x its max natural |activation| x its
   decoder rows added to the MLP outputs of its target layers, all positions; greedy decoding)
   from natural prompts; continuations are rated; ``max(max_f p2(f) - p2(0), 0) / (1 - p2(0))``.

Protocols, and what each one is:

- ``fade``: FADE's sampling and settings -- ~500 rated samples (10% top + 4 percentile bins), and
  when fewer than ``sparse_threshold`` (15) of them are rated 2, one more round of ``n_samples``
  drawn the same way from the not-yet-rated contexts (FADE's sparse-concept retry); 15 generation
  calls; 50 prompts x 30 tokens; faithfulness only when clarity and responsiveness are >= 0.5.
  Steering clamps the feature's activation to ``c * a_max`` (FADE's definition,
  :mod:`pie_lib.evaluate.steering`; ``steering="add"`` keeps the additive intervention).
- ``pie``: the PIE reference's *sampling* (10 top + 10 random samples rated, 5 generated texts)
  with FADE's *metric definitions* as above (rated 2 against rated 0, ties by mid-ranks, the
  feature read at its own source layer). It is not the reference's metric code: that code compares
  rating 2 against {0, 1}, counts ties as losses and reads the residual after the layer; pie_lib
  does not reproduce those choices. The reference reports no faithfulness; ours (10 prompts x 16
  tokens, additive steering, no gate) is our addition.

The natural contexts come from the activation store of ``pie interpret``
(:meth:`~pie_lib.interpret.examples.ActivationStore.natural_acts`). In records mode, and on a
streaming store whose context sample is the whole corpus, that is every context's activation and
sampling is exact (``natural_sampling = "exact"``). On a larger corpus a streaming store gives held
contexts with weights (``"estimated"``): the exact top list, a uniform sample of the active
contexts, and the silent contexts of a uniform sample of all contexts; the silent / active shares
are exact, the percentile of an active context below the top list is estimated, clarity's natural
side is the uniform context sample, and the "pie" protocol's random draws are uniform over the
contexts outside the top (:mod:`pie_lib.evaluate.sampling`).

Every undefined score says why: ``faithfulness_status``, ``clarity_status`` and
``responsiveness_status`` (purity shares the latter).

Work is resumable: every finished feature is written to ``fade_<protocol>/rows/`` at once; a
feature whose LLM requests failed is marked ``request_failed`` and retried by a rerun.
"""

from __future__ import annotations

import json
import logging
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal, Sequence, cast

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from pie_lib.errors import DataFormatError, LLMRequestError, SettingError
from pie_lib.evaluate.judges import ConceptGenerator, Rater
from pie_lib.evaluate.metrics import clarity as clarity_score
from pie_lib.evaluate.metrics import faithfulness_score, responsiveness_purity
from pie_lib.evaluate.sampling import FADE_PERCENTILES, fade_sample_weighted, pie_sample, pie_sample_held
from pie_lib.evaluate.steering import steered_generate
from pie_lib.interpret.chat import make_chat
from pie_lib.interpret.corpus import CorpusConfig, make_contexts
from pie_lib.interpret.examples import (
    ActivationStore,
    FeatureKey,
    NaturalActs,
    encode_features,
    features_by_layer,
    pad_batch,
    pad_id_of,
)
from pie_lib.interpret.pipeline import check_settings, collect_rows, resolve_world
from pie_lib.llm import LLMConfig, Usage
from pie_lib.store import write_json, write_parquet

if TYPE_CHECKING:
    from pie_lib.clt.transcoder import CrossLayerTranscoder
    from pie_lib.models.loading import LoadedModel

log = logging.getLogger("pie_lib.evaluate")

ProtocolName = Literal["fade", "pie"]

FADE_COLUMNS = [
    "layer",
    "feature",
    "description",
    "clarity",
    "responsiveness",
    "purity",
    "faithfulness",
    "faithfulness_status",
    "clarity_status",
    "responsiveness_status",
    "n_rated",
    "n_rated_0",
    "n_rated_1",
    "n_rated_2",
    "n_unrated",
    "n_generated",
    "n_natural",
    "n_sparse_resampled",
    "parse_failures",
    "calls",
    "prompt_tokens",
    "completion_tokens",
    "cache_hits",
    "protocol",
    "backend",
    "llm_model",
    "max_act",
    "status",
    "error",
    "p2_by_factor",
    "natural_sampling",
]


@dataclass
class ProtocolConfig:
    """One evaluation protocol. Build with :meth:`named` ("fade" or "pie") and adjust fields.

    Attributes:
        sampling: "stratified" (FADE: ``n_samples``, ``top_fraction`` from the top, the rest over
            ``percentiles`` bins) or "top_random" (``n_top`` + ``n_random``).
        n_generation_calls, n_per_generation, n_generated: generator requests, texts asked per
            request, texts kept (None: all unique).
        rating_batch_size, max_failed_retries: rater settings (FADE: 15 texts / call, 1 re-ask).
        factors: steering factors (x the max natural |activation|); 0 is the unsteered baseline.
        n_steer_prompts, steer_prompt_tokens, gen_tokens: faithfulness prompts (natural contexts
            cut to one length, BOS included) and continuation length.
        faithfulness_gate: compute faithfulness only when clarity and responsiveness reach it
            (None: always).
        steering: "add" (``c * a_max * W_dec`` added) or "clamp" (activation set to ``c * a_max``).
        sparse_threshold, max_sparse_retries: FADE's sparse-concept retry (stratified sampling
            only): while fewer than ``sparse_threshold`` samples are rated 2, rate another
            ``n_samples`` drawn the same way from the unrated contexts, at most
            ``max_sparse_retries`` times (FADE: 15, 1; the "pie" protocol: no retry).
    """

    name: str = "pie"
    sampling: Literal["stratified", "top_random"] = "top_random"
    n_samples: int = 500
    top_fraction: float = 0.1
    percentiles: tuple[int, ...] = FADE_PERCENTILES
    n_top: int = 10
    n_random: int = 10
    n_generation_calls: int = 1
    n_per_generation: int = 5
    n_generated: int | None = 5
    rating_batch_size: int = 15
    max_failed_retries: int = 1
    factors: tuple[float, ...] = (-50, -10, -1, 0, 1, 10, 50)
    n_steer_prompts: int = 10
    steer_prompt_tokens: int = 8
    gen_tokens: int = 16
    faithfulness_gate: float | None = None
    generate_temperature: float = 0.7
    rate_temperature: float = 0.0
    seed: int = 0
    features_per_chunk: int = 8
    steer_batch_size: int = 64
    text_batch_size: int = 32
    ctx_len: int = 64
    sparse_threshold: int = 15
    max_sparse_retries: int = 0
    steering: Literal["add", "clamp"] = "add"

    @classmethod
    def named(cls, name: ProtocolName | str) -> "ProtocolConfig":
        if name == "pie":
            return cls()
        if name == "fade":
            return cls(
                name="fade",
                sampling="stratified",
                n_samples=500,
                top_fraction=0.1,
                n_generation_calls=15,
                n_per_generation=10,
                n_generated=None,
                n_steer_prompts=50,
                steer_prompt_tokens=16,
                gen_tokens=30,
                faithfulness_gate=0.5,
                max_sparse_retries=1,
                steering="clamp",
            )
        raise DataFormatError(f"unknown protocol {name!r}; use 'pie' or 'fade'")


@dataclass
class _FeatureState:
    """Working state of one feature while it is evaluated."""

    layer: int
    feature: int
    description: str | None
    max_act: float
    usage: Usage = field(default_factory=Usage)
    parse_failures: int = 0
    generated: list[str] = field(default_factory=list)
    natural_idx: np.ndarray | None = None  # positions (in the store's contexts) of the rated natural samples
    natural_acts: np.ndarray | None = None  # their activations
    ratings: np.ndarray | None = None
    error: str | None = None
    n_sparse_resampled: int = 0
    row: dict = field(default_factory=dict)


# --------------------------------------------------------------------------- activations of texts
def text_activations(
    model: LoadedModel,
    clt: CrossLayerTranscoder,
    token_lists: Sequence[Sequence[int]],
    keys: Sequence[FeatureKey],
    batch_size: int = 32,
) -> np.ndarray:
    """Activation of feature ``keys[i]`` on text ``token_lists[i]``: the value at its token of
    largest |activation|, BOS excluded.

    One ``run_with_cache`` per batch and one restricted encode per source layer in the batch.

    Returns:
        ``[n]`` float64.
    """
    from pie_lib.engine.traces import run_with_cache

    out = np.zeros(len(token_lists), dtype=np.float64)
    pad = pad_id_of(model.tokenizer)
    for lo in range(0, len(token_lists), batch_size):
        toks, ks = token_lists[lo : lo + batch_size], keys[lo : lo + batch_size]
        ids, valid = pad_batch(toks, pad)
        cache = run_with_cache(model, ids)
        for layer, feats in features_by_layer(ks).items():
            rows = torch.tensor([i for i, (l, _) in enumerate(ks) if l == layer])
            col_of = {int(f): j for j, f in enumerate(feats.tolist())}
            cols = torch.tensor([col_of[int(ks[i][1])] for i in rows.tolist()])
            acts = encode_features(clt, cache.resid_mid[layer][rows], layer, feats).float().cpu()  # [r, T, U]
            vals = acts[torch.arange(len(rows)), :, cols] * valid[rows]  # [r, T]
            best = vals.abs().argmax(dim=1)
            out[lo + rows.numpy()] = vals[torch.arange(len(rows)), best].numpy()
    return out


# --------------------------------------------------------------------------- evaluate
def _resolve_descriptions(descriptions: str | os.PathLike | pd.DataFrame) -> tuple[pd.DataFrame, Path | None]:
    if isinstance(descriptions, pd.DataFrame):
        return descriptions, None
    path = Path(descriptions)
    if path.is_dir():
        path = path / "descriptions.parquet"
    from pie_lib.store import read_parquet

    table = read_parquet(
        path,
        "descriptions table of `pie interpret`",
        "rerun `pie interpret` to write it again",
        columns=("layer", "feature", "description"),
    )
    return table, path.parent


def evaluate(
    descriptions: str | os.PathLike | pd.DataFrame,
    *,
    protocol: ProtocolName | ProtocolConfig = "pie",
    backend: str | None = None,
    llm: LLMConfig | None = None,
    model: str | os.PathLike | LoadedModel | None = None,
    clt: str | os.PathLike | CrossLayerTranscoder | None = None,
    device: str | None = None,
    remote: bool | str | None = None,
    model_backend: str = "auto",
    examples: str | os.PathLike | None = None,
    out: str | os.PathLike | None = None,
    max_features: int | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """FADE scores of every description.

    Args:
        descriptions: ``descriptions.parquet`` of ``pie interpret`` (or its folder, or the table).
        protocol: "pie" (default), "fade", or a :class:`ProtocolConfig`.
        backend, llm: generator / rater backend (default offline; the API key comes from the
            environment and is never written).
        model, clt, device, remote: default: those recorded by ``pie interpret`` next to the
            descriptions (``interpret_config.json``).
        model_backend: "auto" (default) and "hf" load the model through transformers: steering
            generates text, which the native backend does not do; "native" is refused.
        examples: the activation store folder (default ``<descriptions folder>/examples``).
        out: output folder (default: the descriptions' folder).
    Returns:
        One row per feature with columns :data:`FADE_COLUMNS` (also written to
        ``out/fade_<protocol>.parquet``).
    """
    table, where = _resolve_descriptions(descriptions)
    pc = protocol if isinstance(protocol, ProtocolConfig) else ProtocolConfig.named(protocol)
    run_cfg: dict = {}
    if where is not None and (where / "interpret_config.json").exists():
        try:
            run_cfg = json.loads((where / "interpret_config.json").read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError):
            raise DataFormatError(
                f"{where / 'interpret_config.json'}: corrupt (not JSON); rerun `pie interpret`, or pass --model "
                "and --clt and delete the file"
            ) from None
        if not isinstance(run_cfg, dict):
            raise DataFormatError(
                f"{where / 'interpret_config.json'}: not a pie interpret config; rerun `pie interpret`"
            )
    store_dir = Path(examples) if examples is not None else (where / "examples" if where is not None else None)
    if store_dir is None:
        raise DataFormatError("evaluate needs the activation store of `pie interpret`: pass examples=<out>/examples")
    store = ActivationStore(store_dir)
    out = Path(out) if out is not None else (where or Path("pie_out/evaluate"))
    out.mkdir(parents=True, exist_ok=True)

    rows_dir = out / f"fade_{pc.name}" / "rows"
    rows_dir.mkdir(parents=True, exist_ok=True)
    check_settings(out / f"fade_{pc.name}" / "config.json", {"protocol": asdict(pc)})
    llm_cfg = replace(llm or LLMConfig())  # a copy: the caller's config is not modified
    if backend is not None:
        llm_cfg.backend = backend  # type: ignore[assignment]
    if llm_cfg.backend != "offline" and llm_cfg.cache_dir is None:
        llm_cfg.cache_dir = out / "llm_cache"
    llm_cfg = llm_cfg.resolved()
    chat = make_chat(llm_cfg)
    generator = ConceptGenerator(chat, temperature=pc.generate_temperature)
    rater = Rater(
        chat, temperature=pc.rate_temperature, batch_size=pc.rating_batch_size, max_failed_retries=pc.max_failed_retries
    )

    world_remote: bool | str = run_cfg.get("remote", False) if remote is None else remote
    if model_backend == "native":
        raise SettingError(
            "pie evaluate steers the model with generate, which the native model backend does not do; "
            "use --model-backend hf (or auto, which loads hf here)"
        )
    lm, tc, _ = resolve_world(
        model if model is not None else run_cfg.get("model"),
        clt if clt is not None else run_cfg.get("clt"),
        device or (run_cfg.get("device") if model is None else None),
        world_remote,
        model_backend="hf",  # steering generates (engine/generation.py, engine/clamp.py)
    )

    if max_features is not None:
        table = table.head(max_features)
    keys = [(int(l), int(f)) for l, f in zip(table["layer"], table["feature"])]
    stats = store.feature_stats(keys).set_index(["layer", "feature"])

    states: list[_FeatureState] = []
    for (l, f), desc in zip(keys, table["description"]):
        p = rows_dir / f"L{l}_F{f}.json"
        if p.exists():
            r = json.loads(p.read_text())
            if (
                r["status"] != "request_failed"
                and r["description"] == desc
                and r["backend"] == chat.kind
                and r["llm_model"] == chat.model
            ):
                continue
        desc = None if desc is None or (isinstance(desc, float) and math.isnan(desc)) else str(desc)
        states.append(_FeatureState(l, f, desc, float(stats.loc[(l, f), "max_act"])))

    natural: dict[FeatureKey, NaturalActs] = {}  # the chunk's features: activations on the corpus contexts
    rng = np.random.default_rng(pc.seed)
    steer_prompts = _steer_prompts(store, pc, rng)
    workers = max(1, llm_cfg.workers)
    bar = tqdm(total=len(states), desc=f"evaluate ({pc.name}, {chat.kind})", disable=not progress, unit="feature")
    for c0 in range(0, len(states), pc.features_per_chunk):
        chunk = states[c0 : c0 + pc.features_per_chunk]
        for s in chunk:
            if s.description is not None and s.max_act != 0:
                natural[(s.layer, s.feature)] = store.natural_acts(s.layer, s.feature)
                s.row["natural_sampling"] = "exact" if natural[(s.layer, s.feature)].exact else "estimated"
        live = [s for s in chunk if s.description is not None and s.max_act != 0]
        # --- LLM: concept texts and natural-sample ratings (one thread per feature)
        _parallel(
            workers, lambda s: _judge_natural(s, store, natural[(s.layer, s.feature)], pc, generator, rater), live
        )
        live = [s for s in live if s.error is None]
        # --- model: clarity activations of the generated texts, all features of the chunk at once
        _score_activation_metrics(lm, tc, live, natural, pc)
        # --- faithfulness for the features that pass the gate
        steer = [s for s in live if _gate(s, pc) == "computed"]
        if steer:
            _faithfulness(lm, tc, steer, steer_prompts, pc, rater, workers, progress)
        for s in chunk:
            row = _final_row(s, pc, chat)
            write_json(row, rows_dir / f"L{s.layer}_F{s.feature}.json", indent=1, default=str)
            natural.pop((s.layer, s.feature), None)  # [N] per feature: keep only the chunk's in memory
        bar.update(len(chunk))
    bar.close()
    n_failed = sum(s.error is not None for s in states)
    if n_failed:
        log.warning("%d of %d features hit LLM request failures; rerun to retry them", n_failed, len(states))
    res = collect_rows(rows_dir, keys)
    if len(res) and "natural_sampling" not in res:  # rows written before the column existed
        res["natural_sampling"] = None
    res = cast(pd.DataFrame, res[FADE_COLUMNS]).sort_values(["layer", "feature"]).reset_index(drop=True)
    write_parquet(res, out / f"fade_{pc.name}.parquet")
    return res


def _parallel(workers: int, fn: Callable[[Any], None], items: list) -> None:
    if workers > 1 and len(items) > 1:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            list(pool.map(fn, items))
    else:
        for it in items:
            fn(it)


def _judge_natural(
    s: _FeatureState,
    store: ActivationStore,
    nat: NaturalActs,
    pc: ProtocolConfig,
    generator: ConceptGenerator,
    rater: Rater,
) -> None:
    """Generator texts and ratings of the sampled natural contexts for one feature."""
    rng = np.random.default_rng([pc.seed, s.layer, s.feature])
    if pc.sampling == "stratified":
        held = fade_sample_weighted(nat.acts, nat.weight, pc.n_samples, pc.top_fraction, pc.percentiles, rng)
        s.natural_idx, s.natural_acts = nat.pos[held], nat.acts[held]
    elif nat.exact:
        idx = pie_sample(nat.acts, pc.n_top, pc.n_random, rng)
        s.natural_idx, s.natural_acts = nat.pos[idx], nat.acts[idx]
    else:
        if pc.n_top > nat.n_top_exact and nat.n_active > nat.n_top_exact:
            raise DataFormatError(
                f"protocol n_top {pc.n_top} > the {nat.n_top_exact} top contexts the streaming store keeps for "
                f"feature ({s.layer}, {s.feature}); rerun `pie interpret` with a larger --eval-top"
            )
        top, rand = pie_sample_held(nat.acts, nat.pos, nat.n_top_exact, nat.uniform_pos, pc.n_top, pc.n_random, rng)
        s.natural_idx = np.concatenate([nat.pos[top], nat.uniform_pos[rand]])
        s.natural_acts = np.concatenate([nat.acts[top], nat.uniform_acts[rand]])
    texts = store.contexts["text"].to_numpy()[s.natural_idx].tolist()
    try:
        g = generator.generate(str(s.description), pc.n_generation_calls, pc.n_per_generation, pc.n_generated)
        s.usage, s.parse_failures, s.generated = s.usage + g.usage, s.parse_failures + g.parse_failures, g.texts
        r = rater.rate(str(s.description), texts)
        s.usage, s.parse_failures, s.ratings = s.usage + r.usage, s.parse_failures + r.parse_failures, r.ratings
        if pc.sampling == "stratified":
            _sparse_retry(s, store, nat, pc, rater, rng)
    except LLMRequestError as exc:
        s.error = str(exc)


def _sparse_retry(
    s: _FeatureState,
    store: ActivationStore,
    nat: NaturalActs,
    pc: ProtocolConfig,
    rater: Rater,
    rng: np.random.Generator,
) -> None:
    """FADE's sparse-concept retry: too few samples rated 2 -> rate ``n_samples`` more, drawn
    with the same stratified scheme from the contexts not rated yet (at most ``max_sparse_retries``)."""
    for _ in range(pc.max_sparse_retries):
        assert s.natural_idx is not None and s.ratings is not None and s.natural_acts is not None
        if int((s.ratings == 2).sum()) >= pc.sparse_threshold:
            return
        unrated = np.flatnonzero(~np.isin(nat.pos, s.natural_idx))  # held contexts not rated yet
        if unrated.size == 0:
            return
        extra = unrated[
            fade_sample_weighted(
                nat.acts[unrated], nat.weight[unrated], pc.n_samples, pc.top_fraction, pc.percentiles, rng
            )
        ]
        r = rater.rate(str(s.description), store.contexts["text"].to_numpy()[nat.pos[extra]].tolist())
        s.usage, s.parse_failures = s.usage + r.usage, s.parse_failures + r.parse_failures
        s.natural_idx = np.concatenate([s.natural_idx, nat.pos[extra]])
        s.natural_acts = np.concatenate([s.natural_acts, nat.acts[extra]])
        s.ratings = np.concatenate([s.ratings, r.ratings])
        s.n_sparse_resampled += int(extra.size)


def _tokens(model: LoadedModel, texts: list[str], ctx_len: int) -> list[list[int]]:
    cfg = CorpusConfig(ctx_len=ctx_len, max_chunks_per_doc=1)
    ctxs = make_contexts(model.tokenizer, texts, cfg)
    return [c.token_ids for c in ctxs]


def _score_activation_metrics(
    model: LoadedModel, clt: CrossLayerTranscoder, states: list[_FeatureState], natural: dict, pc: ProtocolConfig
) -> None:
    texts, keys, owner = [], [], []
    for j, s in enumerate(states):
        toks = _tokens(model, s.generated, pc.ctx_len) if s.generated else []
        texts += toks
        keys += [(s.layer, s.feature)] * len(toks)
        owner += [j] * len(toks)
    acts = text_activations(model, clt, texts, keys, pc.text_batch_size) if texts else np.zeros(0)
    owner_arr = np.asarray(owner, dtype=np.int64)
    for j, s in enumerate(states):
        nat = natural[(s.layer, s.feature)]
        syn = acts[owner_arr == j]
        s.row["n_generated"] = int(len(syn))
        s.row["clarity"] = clarity_score(nat.uniform_acts, syn)  # every context, or a uniform sample of them
        assert s.natural_acts is not None and s.ratings is not None
        resp, pur = responsiveness_purity(s.natural_acts, s.ratings)
        s.row["responsiveness"], s.row["purity"] = resp, pur


def _gate(s: _FeatureState, pc: ProtocolConfig) -> str:
    if s.description is None:
        return "not computed: no description"
    if s.max_act == 0:
        return "not computed: feature never active on the corpus"
    if s.error is not None:
        return "failed: LLM request error"
    if pc.faithfulness_gate is None:
        return "computed"
    c, r = s.row.get("clarity", math.nan), s.row.get("responsiveness", math.nan)
    if math.isnan(c) or math.isnan(r):
        return "skipped: clarity or responsiveness undefined (FADE gate)"
    if c < pc.faithfulness_gate or r < pc.faithfulness_gate:
        return f"skipped: clarity or responsiveness < {pc.faithfulness_gate:g} (FADE gate)"
    return "computed"


def _steer_prompts(store: ActivationStore, pc: ProtocolConfig, rng: np.random.Generator) -> torch.Tensor:
    """``[P, T0]`` prompts: random natural contexts cut to one length (BOS included)."""
    toks = store.contexts["token_ids"].map(list).tolist()
    lens = np.array([len(t) for t in toks])
    long_enough = np.flatnonzero(lens >= min(pc.steer_prompt_tokens, lens.max()))
    pick = rng.choice(long_enough, min(pc.n_steer_prompts, len(long_enough)), replace=False)
    T0 = int(min(pc.steer_prompt_tokens, lens[pick].min()))
    return torch.tensor([toks[i][:T0] for i in pick], dtype=torch.long)


def _faithfulness(
    model: LoadedModel,
    clt: CrossLayerTranscoder,
    states: list[_FeatureState],
    prompts: torch.Tensor,
    pc: ProtocolConfig,
    rater: Rater,
    workers: int,
    progress: bool,
) -> None:
    keys = [(s.layer, s.feature) for s in states]
    scales = [abs(s.max_act) for s in states]
    gen = steered_generate(
        model, clt, keys, scales, prompts, pc.factors, pc.gen_tokens, pc.steer_batch_size, mode=pc.steering
    )  # [U,K,P,G]
    tok = model.tokenizer
    U, K, P, _ = gen.shape
    conts = [
        [[tok.decode(gen[u, k, p].tolist(), skip_special_tokens=True) for p in range(P)] for k in range(K)]
        for u in range(U)
    ]

    def rate_one(j: int) -> None:
        s = states[j]
        flat = [t for k in range(K) for t in conts[j][k]]
        try:
            r = rater.rate(str(s.description), flat)
        except LLMRequestError as exc:
            s.error = str(exc)
            return
        s.usage, s.parse_failures = s.usage + r.usage, s.parse_failures + r.parse_failures
        ratings = r.ratings.reshape(K, P)
        p2 = {}
        for k, f in enumerate(pc.factors):
            rated = ratings[k][ratings[k] >= 0]
            p2[float(f)] = float((rated == 2).mean()) if len(rated) else math.nan
        p2 = {f: v for f, v in p2.items() if not math.isnan(v)}
        s.row["faithfulness"] = faithfulness_score(p2)
        s.row["p2_by_factor"] = json.dumps(p2)

    _parallel(workers, rate_one, list(range(len(states))))


def _common_status(s: _FeatureState) -> str | None:
    if s.description is None:
        return "not computed: no description"
    if s.max_act == 0:
        return "not computed: feature never active on the corpus"
    if s.error is not None:
        return "failed: LLM request error"
    return None


def _clarity_status(s: _FeatureState) -> str:
    """Why clarity is (un)defined: it needs generated concept texts and natural activations."""
    why = _common_status(s)
    if why:
        return why
    if not s.row.get("n_generated"):
        return "undefined: the generator returned no usable text"
    return "computed" if not math.isnan(s.row.get("clarity", math.nan)) else "undefined: no natural activations"


def _responsiveness_status(s: _FeatureState, ratings: np.ndarray) -> str:
    """Why responsiveness / purity are (un)defined: they need samples rated 2 and samples rated 0."""
    why = _common_status(s)
    if why:
        return why
    if not (ratings == 2).any():
        return "undefined: no sample rated 2"
    if not (ratings == 0).any():
        return "undefined: no sample rated 0"
    return "computed"


def _final_row(s: _FeatureState, pc: ProtocolConfig, chat: Any) -> dict:
    ratings = s.ratings if s.ratings is not None else np.zeros(0, dtype=np.int64)
    status = "ok" if s.error is None else "request_failed"
    if s.description is None:
        status = "no_description"
    elif s.max_act == 0:
        status = "never_active"
    fstatus = _gate(s, pc)
    if fstatus == "computed" and "faithfulness" not in s.row:
        fstatus = "failed: LLM request error" if s.error else "not computed: no rated continuation"
    nan = math.nan
    return {
        "layer": s.layer,
        "feature": s.feature,
        "description": s.description,
        "clarity": s.row.get("clarity", nan),
        "responsiveness": s.row.get("responsiveness", nan),
        "purity": s.row.get("purity", nan),
        "faithfulness": s.row.get("faithfulness", nan) if s.error is None else nan,
        "faithfulness_status": fstatus,
        "clarity_status": _clarity_status(s),
        "responsiveness_status": _responsiveness_status(s, ratings),
        "n_rated": int((ratings >= 0).sum()),
        "n_rated_0": int((ratings == 0).sum()),
        "n_rated_1": int((ratings == 1).sum()),
        "n_rated_2": int((ratings == 2).sum()),
        "n_unrated": int((ratings < 0).sum()),
        "n_generated": int(s.row.get("n_generated", 0)),
        "n_natural": int(len(s.natural_idx)) if s.natural_idx is not None else 0,
        "n_sparse_resampled": s.n_sparse_resampled,
        "parse_failures": s.parse_failures,
        **s.usage.to_dict(),
        "protocol": pc.name,
        "backend": chat.kind,
        "llm_model": chat.model,
        "max_act": s.max_act,
        "status": status,
        "error": s.error,
        "p2_by_factor": s.row.get("p2_by_factor"),
        "natural_sampling": s.row.get("natural_sampling"),
    }
