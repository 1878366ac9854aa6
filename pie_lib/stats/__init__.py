"""Statistics for PIE results tables (one row per method, K, seed, prompt): what the reviewers
asked for (spec §9) -- multi-seed mean ± std with bootstrap CIs, paired tests, TOST equivalence
behind "K=50 matches K=75", the effective budget with its CI, and the matched-seed ablation of
the reranking. Everything is seeded and vectorised; imports are lazy.

Every statistic is over independent prompts (:mod:`pie_lib.stats.design`): seeds that share
prompts are averaged within a prompt (prompts resampled as clusters), seed-specific prompts are
resampled hierarchically; every result reports ``n_prompts``, ``n_seeds``, ``unit``.

- :func:`summarize` -- mean (BCa CI), median (CI), geometric mean (CI), seed spread per (method, K).
- :func:`paired_test` -- paired t, Wilcoxon, BCa CI, Cohen's dz, geometric-mean ratio of two cells.
- :func:`tost` -- two one-sided paired t-tests for equivalence within a pre-specified ±margin
  (and x(1 ± ratio_margin) on the log scale), with the equivalence bound.
- :func:`mib_faithfulness`, :func:`mib_cpr_cmd` -- MIB faithfulness / completeness as ratios of
  means, CPR / CMD on that aggregate over a fraction ladder reaching 1.0.
- :func:`effective_budget` -- K at which a baseline's mean curve matches the reference at k_ref.
- :func:`matched_seed_ablation` -- ablated - full per K and seed (the reranking's effect alone).
- :func:`effective_budget_table`, :func:`format_effective_budget_table`, :func:`to_markdown`,
  :func:`to_latex` -- the report table.
"""

from __future__ import annotations

from pie_lib._lazy import lazy_getattr

_LAZY = {
    "summarize": "pie_lib.stats.bootstrap",
    "bootstrap_indices": "pie_lib.stats.draws",
    "bootstrap_weights": "pie_lib.stats.draws",
    "bootstrap_means": "pie_lib.stats.bootstrap",
    "bootstrap_mean_ci": "pie_lib.stats.bootstrap",
    "percentile_ci": "pie_lib.stats.bootstrap",
    "BootstrapCI": "pie_lib.stats.bootstrap",
    "describe": "pie_lib.stats.bootstrap",
    "Design": "pie_lib.stats.design",
    "detect_design": "pie_lib.stats.design",
    "PROMPT_ID_COLUMNS": "pie_lib.stats.design",
    "bca_interval": "pie_lib.stats.resample",
    "mean_t": "pie_lib.stats.resample",
    "paired_test": "pie_lib.stats.paired",
    "PairedTestResult": "pie_lib.stats.paired",
    "matched_seed_ablation": "pie_lib.stats.paired",
    "mib_faithfulness": "pie_lib.stats.faithfulness",
    "mib_cpr_cmd": "pie_lib.stats.faithfulness",
    "per_prompt_ratios": "pie_lib.stats.faithfulness",
    "tost": "pie_lib.stats.equivalence",
    "TostResult": "pie_lib.stats.equivalence",
    "effective_budget": "pie_lib.stats.budget",
    "EffectiveBudgetResult": "pie_lib.stats.budget",
    "crossing_budget": "pie_lib.stats.budget",
    "cost_saving": "pie_lib.stats.budget",
    "effective_budget_table": "pie_lib.stats.tables",
    "format_effective_budget_table": "pie_lib.stats.tables",
    "to_markdown": "pie_lib.stats.tables",
    "to_latex": "pie_lib.stats.tables",
    "MissingResultError": "pie_lib.stats._frame",
    "UnpairedDataError": "pie_lib.stats._frame",
}

__all__ = sorted(_LAZY)

__getattr__ = lazy_getattr("pie_lib.stats", _LAZY)
