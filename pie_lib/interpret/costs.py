"""What interpretation costs, from measured counts (spec §3, Effective Budget).

The Effective-Budget claim says K=50 circuits of FAP-Synergy match K=75 circuits of baselines;
the saving in *interpretation* is then the cost of explaining the features of the smaller
circuits instead of the larger ones. :func:`effective_budget_cost_saving` measures it from the
descriptions table (calls and tokens each feature actually took) and the selections (which
features each circuit holds) -- nothing is assumed about cost per feature.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Sequence

import pandas as pd

from pie_lib.errors import DataFormatError
from pie_lib.selections import query_selections, read_selections

COST_COLUMNS = ("calls", "prompt_tokens", "completion_tokens")


@dataclass
class BudgetCostSaving:
    """Interpretation cost at two budgets and the saving of the smaller one.

    Attributes:
        table: one row per budget: k, method, n_circuits, features_per_circuit (mean),
            n_unique_features, per-circuit mean and union totals of calls / tokens, n_imputed
            (features of those circuits without a measured cost, charged the mean measured cost).
        saving: fractional saving ``1 - cost(k_small) / cost(k_large)`` per measure, for
            ``per_circuit`` (explaining each circuit separately) and ``union`` (each distinct
            feature once); NaN when the larger cost is 0.
        cost_per_feature: the mean measured cost of one feature (calls, tokens).
    """

    table: pd.DataFrame
    saving: dict[str, float] = field(default_factory=dict)
    cost_per_feature: dict[str, float] = field(default_factory=dict)


def _circuits(recs: Sequence[dict], k: int, method: str | None) -> list[set[tuple[int, int]]]:
    return [{(int(l), int(f)) for l, _p, f in r["occurrences"]} for r in query_selections(recs, methods=method, ks=k)]


def effective_budget_cost_saving(
    desc_table: pd.DataFrame | str | os.PathLike,
    selections: Sequence[dict] | str | os.PathLike,
    k_small: int = 50,
    k_large: int = 75,
    method_small: str | None = None,
    method_large: str | None = None,
) -> BudgetCostSaving:
    """Saving of explaining the features of K=``k_small`` circuits instead of K=``k_large`` ones.

    Cost of a feature = its measured ``calls``, ``prompt_tokens``, ``completion_tokens`` (and
    their sum ``total_tokens``) in ``desc_table``; features of a circuit that were not explained
    are charged the mean measured cost (counted in ``n_imputed``). A circuit's cost = the sum
    over its distinct features (features per circuit x cost per feature, feature by feature).

    Args:
        desc_table: the descriptions table of :func:`~pie_lib.interpret.interpret` (or its path).
        selections: the selections (records or ``selections.jsonl``) with both budgets.
        method_small, method_large: restrict each budget to one method (e.g. "fap-synergy" at 50
            against "fap" at 75); None: every method at that K.
    """
    desc = pd.read_parquet(desc_table) if isinstance(desc_table, (str, os.PathLike)) else desc_table
    recs = read_selections(selections) if isinstance(selections, (str, os.PathLike)) else list(selections)
    measured = desc[desc["calls"] > 0] if "calls" in desc else desc.iloc[0:0]
    if len(measured) == 0:
        raise DataFormatError(
            "no feature in the descriptions table has a measured cost (calls > 0); run `pie interpret` first"
        )
    cost = measured.set_index(["layer", "feature"])[list(COST_COLUMNS)].astype(float)
    cost["total_tokens"] = cost["prompt_tokens"] + cost["completion_tokens"]
    mean = cost.mean()
    lookup = cost.to_dict("index")
    measures = ["calls", "prompt_tokens", "completion_tokens", "total_tokens"]

    rows = []
    for k, method in ((k_small, method_small), (k_large, method_large)):
        circuits = _circuits(recs, k, method)
        if not circuits:
            raise DataFormatError(f"no selections with k={k}" + (f" and method={method!r}" if method else ""))
        per = {m: 0.0 for m in measures}
        union: set[tuple[int, int]] = set().union(*circuits)
        for c in circuits:
            for key in c:
                v = lookup.get(key)
                for m in measures:
                    per[m] += v[m] if v is not None else mean[m]
        tot = {m: sum((lookup[key][m] if key in lookup else mean[m]) for key in union) for m in measures}
        rows.append(
            {
                "k": k,
                "method": method or "any",
                "n_circuits": len(circuits),
                "features_per_circuit": sum(len(c) for c in circuits) / len(circuits),
                "n_unique_features": len(union),
                "n_imputed": sum(key not in lookup for key in union),
                **{f"{m}_per_circuit": per[m] / len(circuits) for m in measures},
                **{f"{m}_union": tot[m] for m in measures},
            }
        )
    table = pd.DataFrame(rows)
    saving = {}
    for scope in ("per_circuit", "union"):
        for m in measures:
            small, large = table.loc[0, f"{m}_{scope}"], table.loc[1, f"{m}_{scope}"]
            saving[f"{m}_{scope}"] = 1.0 - small / large if large > 0 else math.nan
    return BudgetCostSaving(table, saving, {m: float(mean[m]) for m in measures})
