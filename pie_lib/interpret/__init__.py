"""Stage II, Interpret: activation examples, explainers, descriptions, interpretation cost.

- :func:`interpret` -- selections -> ``descriptions.parquet`` (examples + one description per feature).
- :class:`ActivationStore` -- sparse activations over a corpus; top and quantile examples.
- :func:`make_explainer` -- the explainer for an :class:`~pie_lib.llm.LLMConfig` (offline / openai / hf).
- :func:`effective_budget_cost_saving` -- measured interpretation saving of K=50 vs K=75 circuits.

Names are imported lazily so ``import pie_lib.interpret`` stays fast.
"""

from __future__ import annotations

from pie_lib._lazy import lazy_getattr

_LAZY = {
    "interpret": "pie_lib.interpret.pipeline",
    "InterpretConfig": "pie_lib.interpret.pipeline",
    "read_selections": "pie_lib.interpret.pipeline",
    "features_from_selections": "pie_lib.interpret.pipeline",
    "ActivationStore": "pie_lib.interpret.examples",
    "ExampleConfig": "pie_lib.interpret.examples",
    "FeatureExamples": "pie_lib.interpret.examples",
    "encode_features": "pie_lib.interpret.examples",
    "CorpusConfig": "pie_lib.interpret.corpus",
    "ChatExplainer": "pie_lib.interpret.explainers",
    "ExplainConfig": "pie_lib.interpret.explainers",
    "Explanation": "pie_lib.interpret.explainers",
    "Explainer": "pie_lib.interpret.explainers",
    "make_explainer": "pie_lib.interpret.explainers",
    "effective_budget_cost_saving": "pie_lib.interpret.costs",
    "BudgetCostSaving": "pie_lib.interpret.costs",
}

__all__ = sorted(_LAZY)

__getattr__ = lazy_getattr("pie_lib.interpret", _LAZY)
