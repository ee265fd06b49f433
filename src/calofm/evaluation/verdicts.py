"""How far a candidate is from the reference, judged against the Geant4 floor: the ratios, the
levels and the one-sentence verdict that the report, its page and ``calofm evaluate`` share.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from calofm.evaluation.metrics import format_number

FLOOR = "floor"
# A candidate's W1x100 up to this multiple of the floor counts as "at the floor".
AT_FLOOR = 1.5
# Verdict levels: the worse of the level of the median floor ratio and that of the classifier.
VERDICTS = (
    "indistinguishable from {ref} at this sample size",
    "close to {ref}",
    "clearly different from {ref}",
    "far from {ref}",
)
RATIO_LEVELS = (AT_FLOOR, 3.0, 10.0)  # median W1x100 / floor below each: level 0, 1, 2
AUC_LEVELS = (0.75, 0.95)  # AUC below each (and above the floor's + 0.05): level 1, 2


def metric_value(entry: dict, obs: str, key: str = "w1x100") -> float | None:
    """One metric of an observable in a candidate's (or the floor's) entry; None if undefined."""
    value = entry["observables"][obs].get(key)
    return None if value is None or not math.isfinite(value) else float(value)


def floor_ratio(candidate: dict, floor: dict, obs: str) -> float | None:
    """A candidate's W1x100 over the floor's for one observable (None where undefined)."""
    cand, base = metric_value(candidate, obs), metric_value(floor, obs)
    return cand / base if cand is not None and base else None


def level_of(value: float, levels: tuple[float, ...]) -> int:
    """The index of the first of ``levels`` that ``value`` does not exceed (all: their count)."""
    return next((k for k, edge in enumerate(levels) if value <= edge), len(levels))


def verdict(
    name: str, metrics: dict, headings: Mapping[str, str], reference_word: str = "Geant4"
) -> dict:
    """How far one candidate is from the reference, in numbers and in one sentence.

    Judged on the observables that are not energy slices: the median of their W1x100 over the
    floor's, how many are within ``AT_FLOOR`` times it, the three furthest, and the classifier.
    """
    entry, floor = metrics["candidates"][name], metrics[FLOOR]
    ratios = {
        obs: r
        for obs in metrics["observables"]
        if obs in headings and (r := floor_ratio(entry, floor, obs)) is not None
    }
    median = float(np.median(list(ratios.values()))) if ratios else None
    at_floor = sum(r <= AT_FLOOR for r in ratios.values())
    furthest = sorted(ratios.items(), key=lambda kv: -kv[1])[:3]
    auc, floor_auc = entry["classifier_auc"], floor["classifier_auc"]
    auc_level = 0 if auc <= floor_auc + 0.05 else 1 + level_of(auc, AUC_LEVELS)
    ratio_level = level_of(median, RATIO_LEVELS) if median is not None else len(RATIO_LEVELS)
    level = max(auc_level, ratio_level)
    words = VERDICTS[level].format(ref=reference_word)
    details = (
        f"A classifier tells its showers from the reference's with AUC {format_number(auc)}"
        f" (0.5 would be indistinguishable; two halves of the reference give"
        f" {format_number(floor_auc)})."
    )
    if median is not None:
        details += (
            f" Its W1×100 is a median {format_number(median)}× the floor over {len(ratios)}"
            f" observables, {at_floor} of them within {AT_FLOOR:g}× the floor; furthest: "
            + ", ".join(f"{headings[o].lower()} ({format_number(r)}×)" for o, r in furthest)
            + "."
        )
    return {
        "level": level,
        "words": words,
        "details": details,
        "text": f"{name}: {words}. {details}",
        "median_floor_ratio": median,
        "n_at_floor": at_floor,
        "n_observables": len(ratios),
        "furthest": [[o, r] for o, r in furthest],
        "classifier_auc": auc,
        "floor_classifier_auc": floor_auc,
    }
