"""One PNG per observable: the reference and every candidate overlaid, and their ratios to it.

Bands are the statistical uncertainties of ``metrics.histogram`` (Poisson for counts, standard error
of the mean for profiles). A logarithmic axis is scaled to the drawn values, not to their bands (a
band reaching zero would stretch it over many decades). Showers outside a scalar's range are counted
in its outer bins, which are then hatched and the fractions given in the legend. Figures are built
without pyplot, so no global backend state is touched.
"""

from __future__ import annotations

import os

import numpy as np
from matplotlib.figure import Figure

from calofm.evaluation.metrics import Histogram, format_number
from calofm.evaluation.observables import PROFILE, SCALAR, Observable

REFERENCE_COLOUR = "0.35"
COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink")
Y_LABELS = {
    SCALAR: "fraction of showers",
    PROFILE: "mean energy per shower [MeV]",
}
SPECTRUM_Y_LABEL = "cells per shower"


def _steps(edges: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Values repeated once at the end, for ``step='post'`` drawing over all edges."""
    return np.append(values, values[-1])


def _band(ax, edges: np.ndarray, low: np.ndarray, high: np.ndarray, colour: str, alpha: float):
    ax.fill_between(
        edges,
        _steps(edges, low),
        _steps(edges, high),
        step="post",
        color=colour,
        alpha=alpha,
        linewidth=0,
    )


def _ratio(num: Histogram, den: Histogram) -> tuple[np.ndarray, np.ndarray]:
    """num/den and its uncertainty from num alone (the reference band is drawn separately)."""
    ok = den.values > 0
    ratio = np.full(len(den.values), np.nan)
    err = np.full(len(den.values), np.nan)
    ratio[ok] = num.values[ok] / den.values[ok]
    err[ok] = num.errors[ok] / den.values[ok]
    return ratio, err


def _outside(hist: Histogram) -> str:
    """A second legend line, '4.10% below, 0.300% above the range (...)', for a histogram with
    under- or overflow; nothing otherwise."""
    parts = [
        f"{format_number(100 * frac)}% {where}"
        for frac, where in ((hist.underflow, "below"), (hist.overflow, "above"))
        if frac > 0
    ]
    return f"\n{', '.join(parts)} the range (counted in the hatched outer bins)" if parts else ""


def _mark_outer_bins(ax, edges: np.ndarray, hists: list[Histogram]) -> None:
    """Hatch an outer bin that also holds the showers beyond the range, and say so in it."""
    for frac, lo, hi, text, align in (
        (max(h.underflow for h in hists), edges[0], edges[1], "underflow", "left"),
        (max(h.overflow for h in hists), edges[-2], edges[-1], "overflow", "right"),
    ):
        if frac > 0:
            ax.axvspan(lo, hi, facecolor="none", edgecolor="0.6", hatch="///", linewidth=0)
            ax.text(
                lo if align == "left" else hi,
                0.98,
                text,
                transform=ax.get_xaxis_transform(),
                ha=align,
                va="top",
                fontsize=7,
                color="0.3",
            )


def _log_limits(hists: list[Histogram]) -> tuple[float, float] | None:
    """y-limits of a log axis from the drawn values alone (not their bands)."""
    values = np.concatenate([h.values for h in hists])
    positive = values[np.isfinite(values) & (values > 0)]
    if not len(positive):
        return None
    return float(positive.min()) / 2, float(positive.max()) * 2


def plot_observable(
    obs: Observable,
    edges: np.ndarray,
    reference: Histogram,
    candidates: dict[str, Histogram],
    path: str | os.PathLike[str],
    legend: dict[str, str] | None = None,
    reference_name: str = "reference",
) -> Figure:
    """Draw ``obs`` into ``path`` (PNG) and return the figure; ``legend`` adds text (e.g. the
    metrics) per sample name."""
    legend = legend or {}
    labels = {
        name: f"{name} {legend.get(name, '')}".strip() + _outside(hist)
        for name, hist in [(reference_name, reference), *candidates.items()]
    }
    limits = _log_limits([reference, *candidates.values()]) if obs.log_y else None
    floor_y = limits[0] if limits else 0.0  # bands stop at the axis' bottom, not at zero
    # Fixed margins (a constrained layout costs more than the rest of the plot); the legend sits
    # in a header sized to its number of lines, so it never hides the data.
    header_in = 0.2 + 0.14 * (1 + sum(label.count("\n") + 1 for label in labels.values()))
    height_in = 5.0 + header_in
    fig = Figure(figsize=(6.4, height_in))
    fig.subplots_adjust(left=0.13, right=0.97, bottom=0.09, top=1 - header_in / height_in)
    top, bottom = fig.subplots(
        2, 1, sharex=True, gridspec_kw={"height_ratios": (3, 1), "hspace": 0.06}
    )

    ref = reference
    _band(
        top,
        edges,
        np.clip(ref.values - ref.errors, floor_y, None),
        ref.values + ref.errors,
        REFERENCE_COLOUR,
        0.25,
    )
    top.step(
        edges,
        _steps(edges, ref.values),
        where="post",
        color=REFERENCE_COLOUR,
        linewidth=2,
        label=labels[reference_name],
    )
    ref_rel = np.divide(
        ref.errors, ref.values, out=np.full(len(ref.values), np.nan), where=ref.values > 0
    )
    _band(bottom, edges, 1 - ref_rel, 1 + ref_rel, REFERENCE_COLOUR, 0.25)
    bottom.axhline(1.0, color=REFERENCE_COLOUR, linewidth=1)

    ratios = []
    for k, (name, hist) in enumerate(candidates.items()):
        colour = COLOURS[k % len(COLOURS)]
        top.step(
            edges,
            _steps(edges, hist.values),
            where="post",
            color=colour,
            linewidth=1.5,
            label=labels[name],
        )
        _band(
            top,
            edges,
            np.clip(hist.values - hist.errors, floor_y, None),
            hist.values + hist.errors,
            colour,
            0.2,
        )
        ratio, err = _ratio(hist, ref)
        ratios.append(ratio)
        bottom.step(edges, _steps(edges, ratio), where="post", color=colour, linewidth=1.5)
        _band(bottom, edges, ratio - err, ratio + err, colour, 0.2)

    finite = np.concatenate([r[np.isfinite(r)] for r in ratios]) if ratios else np.zeros(0)
    low = min(0.5, float(finite.min()) - 0.05) if len(finite) else 0.5
    high = max(1.5, float(finite.max()) + 0.05) if len(finite) else 1.5
    bottom.set_ylim(max(0.0, low), min(3.0, high))

    if obs.log_x:
        top.set_xscale("log")
    if obs.log_y:
        top.set_yscale("log")
        if limits:
            top.set_ylim(*limits)
    if obs.kind == SCALAR:
        _mark_outer_bins(top, edges, [reference, *candidates.values()])
    top.set_ylabel(Y_LABELS.get(obs.kind, SPECTRUM_Y_LABEL))
    fig.legend(
        loc="upper center",
        bbox_to_anchor=(0.55, 1.0),
        fontsize=7,
        frameon=False,
        title=obs.heading,
        title_fontproperties={"weight": "bold", "size": 9},
    )
    bottom.set_ylabel("ratio to reference")
    bottom.set_xlabel(obs.label)
    bottom.set_xlim(edges[0], edges[-1])
    fig.savefig(path, dpi=110, format="png")
    return fig
