"""Numbers the PIE paper reports, as data, for the tables that place our toy numbers next to them.

Source: Chen, He, Mesgarani (2026), "Prune, Interpret, Evaluate: A Cross-Layer Transcoder-Native
Framework for Efficient Circuit Discovery via Feature Attribution", arXiv:2604.16889 -- copied
from the project spec (``pie-method.md`` §9). Method keys are ``pie_lib`` registry names
(``pie methods``); :data:`METHOD_LABELS` gives the paper's spelling.
"""

from __future__ import annotations

CITATION = "Chen, He, Mesgarani (2026), arXiv:2604.16889, §9 of the project spec"

#: Registry name -> the paper's method name.
METHOD_LABELS: dict[str, str] = {
    "fap": "FAP",
    "fap-synergy": "FAP-Synergy",
    "fap-signal": "FAP-Signal",
    "clt-relp": "CLT-RelP",
    "act-mag": "Activation-Magnitude",
    "act-mag-delta": "Activation-Magnitude (|Δa|)",
    "random": "Random",
    "factp": "FActP",
    "acdc": "ACDC",
    "edge-pruning": "Edge Pruning",
    "edge-pruning-shared": "Edge Pruning (shared)",
    "hap": "HAP",
    "ensemble-mean": "Ensemble (mean)",
    "ensemble-min": "Ensemble (min)",
    "ensemble-max": "Ensemble (max)",
    "ensemble-seq": "Ensemble (sequential)",
}

#: IOI last-token KL, mean ± std over prompts: model -> method -> K -> (mean, std).
IOI_KL: dict[str, dict[str, dict[int, tuple[float, float]]]] = {
    "Llama-3.2-1B": {
        "clt-relp": {50: (1.32, 0.62), 100: (1.15, 0.54), 200: (0.87, 0.41)},
        "fap": {50: (1.33, 0.60), 100: (1.13, 0.53), 200: (0.85, 0.42)},
        "fap-synergy": {50: (1.22, 0.56), 100: (1.12, 0.52), 200: (0.85, 0.42)},
        "act-mag": {50: (1.59, 0.69), 100: (1.52, 0.65), 200: (1.32, 0.59)},
    },
    "Gemma-2-2B": {
        "clt-relp": {50: (0.86, 0.43), 100: (0.75, 0.37), 200: (0.53, 0.28)},
        "fap": {50: (0.91, 0.46), 100: (0.74, 0.37), 200: (0.52, 0.29)},
        "fap-synergy": {50: (0.82, 0.42), 100: (0.73, 0.36), 200: (0.52, 0.29)},
        "act-mag": {50: (1.29, 0.59), 100: (1.25, 0.58), 200: (1.18, 0.56)},
    },
}

#: Effective budget (IOI mean last-token KL): FAP-Synergy at K=50 against baselines at K=75.
#: model -> (method, K) -> mean KL.
EFFECTIVE_BUDGET: dict[str, dict[tuple[str, int], float]] = {
    "Llama-3.2-1B": {("fap-synergy", 50): 1.22, ("fap", 75): 1.22, ("clt-relp", 75): 1.23},
    "Gemma-2-2B": {("fap-synergy", 50): 0.82, ("fap", 75): 0.81, ("clt-relp", 75): 0.80},
}

#: FADE scores at K=50 on Doc-String, FAP-Synergy: model -> metric -> value.
FADE_DOCSTRING_K50: dict[str, dict[str, float]] = {
    "Llama-3.2-1B": {"clarity": 0.765, "purity": 0.581, "responsiveness": 0.652},
    "Gemma-2-2B": {"clarity": 0.774, "purity": 0.675, "responsiveness": 0.735},
}
FADE_METHOD = "fap-synergy"

#: Public CLT checkpoints the paper used: model -> (hub id, layers, features per layer, d_model).
CLT_CHECKPOINTS: dict[str, tuple[str, int, int, int]] = {
    "Llama-3.2-1B": ("mntss/clt-llama-3.2-1b-524k", 16, 32768, 2048),
    "Gemma-2-2B": ("mntss/clt-gemma-2-2b-426k", 26, 16384, 2304),
}

#: Hub ids of the models, for the commands of real runs.
MODEL_IDS: dict[str, str] = {"Llama-3.2-1B": "meta-llama/Llama-3.2-1B", "Gemma-2-2B": "google/gemma-2-2b"}

__all__ = [
    "CITATION",
    "CLT_CHECKPOINTS",
    "EFFECTIVE_BUDGET",
    "FADE_DOCSTRING_K50",
    "FADE_METHOD",
    "IOI_KL",
    "METHOD_LABELS",
    "MODEL_IDS",
]
