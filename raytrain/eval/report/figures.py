"""The report's PNG figures from analysis results: training curves, parse failures, bias and
distance histograms, the reliability diagram.

matplotlib's object API only: no pyplot state, no backend switch for the caller. Each
``plot_*`` returns False (and writes nothing) when it has nothing to draw.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

# Reliability diagram colours, exact RGB (bars and the diagonal are drawn without
# anti-aliasing, so a test can find them in the PNG).
CAL_ACCURACY_COLOUR = (31, 119, 180)  # accuracy per confidence bin (bars)
CAL_CONFIDENCE_COLOUR = (214, 39, 40)  # mean confidence per bin (markers)
CAL_DIAGONAL_COLOUR = (44, 160, 44)  # perfect calibration, accuracy == confidence
CAL_COUNT_COLOUR = (148, 103, 189)  # predictions per bin (lower panel)


def _hex(rgb: tuple[int, int, int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*rgb)


def _figure(nrows: int, ncols: int, width: float, height: float, **kw):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    return fig, fig.subplots(nrows, ncols, squeeze=False, **kw)


_CURVE_PANELS = (
    ("loss", ("loss", "ce")),
    ("learning rate", ("lr",)),
    ("grad norm (before clipping)", ("grad_norm",)),
    ("throughput (samples / s)", ("samples_per_s",)),
)


def plot_curves(curves: dict, path: Path) -> bool:
    """loss / ce (+ validation losses), lr, grad norm, throughput vs step; restarts dashed."""
    series = curves["series"]
    extra = tuple(k for k in series if k.startswith(("val_", "eval_")) and "loss" in k)
    panels = [(t, tuple(k for k in keys + (extra if t == "loss" else ()) if k in series)) for t, keys in _CURVE_PANELS]
    panels = [(t, keys) for t, keys in panels if keys]
    if not panels:
        return False
    ncols = 2 if len(panels) > 1 else 1
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = _figure(nrows, ncols, 11, 3.6 * nrows)
    colours = ["tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:brown"]
    for ax, (title, keys) in zip(axes.flat, panels):
        for key, colour in zip(keys, colours):
            pts = np.asarray(series[key])
            for s in np.unique(pts[:, 2]):  # one line per segment: a restart never zigzags back
                seg = pts[pts[:, 2] == s]
                ax.plot(seg[:, 0], seg[:, 1], color=colour, lw=1.4, marker="." if len(seg) < 30 else None,
                        label=key if s == pts[0, 2] else None)
        vals = np.concatenate([np.asarray(series[k])[:, 1] for k in keys])
        if title != "learning rate" and vals.min() > 0 and vals.max() / vals.min() > 30:
            ax.set_yscale("log")
        for r in curves["restarts"]:
            ax.axvline(r["step"], color="0.3", ls="--", lw=1)
            ax.annotate(f"restart (from {r['resumed_from']})", (r["step"], 1), xycoords=("data", "axes fraction"),
                        xytext=(3, -12), textcoords="offset points", fontsize=8, color="0.3")
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(keys) > 1:
            ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.savefig(path)
    return True


def plot_errors(columns: dict[str, dict[str, int]], path: Path) -> bool:
    """Grouped horizontal bars: parse-failure reason x model column (columns without any
    failure are left out, except the trained model's)."""
    columns = {k: v for k, v in columns.items() if v or k == "trained"}
    # most frequent first; ties by name, so the figure does not depend on set order (hash seed)
    reasons = sorted({r for c in columns.values() for r in c}, key=lambda r: (-sum(c.get(r, 0) for c in columns.values()), r))
    if not reasons:
        return False
    names = list(columns)
    fig, axes = _figure(1, 1, 9, 1.4 + 0.28 * len(reasons) * len(names))
    ax = axes[0, 0]
    height = 0.8 / len(names)
    y = np.arange(len(reasons))
    for k, name in enumerate(names):
        counts = [columns[name].get(r, 0) for r in reasons]
        bars = ax.barh(y + k * height, counts, height=height, label=name)
        ax.bar_label(bars, labels=[str(c) if c else "" for c in counts], fontsize=8, padding=2)
    ax.set_yticks(y + height * (len(names) - 1) / 2, reasons)
    ax.invert_yaxis()
    ax.set_xlabel("rejected fragments")
    ax.set_title("parse failures by reason")
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(axis="x", alpha=0.3)
    fig.savefig(path)
    return True


def _stairs(ax, h: dict, colour: str, title: str, xlabel: str, marks: Sequence[tuple[float, str, str]] = (), sign: str = "+") -> None:
    ax.stairs(h["counts"], h["edges"], fill=True, color=colour, alpha=0.75)
    ax.axvline(0, color="black", lw=0.8)
    for x, style, label in marks:
        ax.axvline(x, color="black", ls=style, lw=1.2, label=label)
    out = f", {h['n_outside']} outside" if h["n_outside"] else ""
    ax.set_title(f"{title}\nn={h['n']}, mean {h['mean']:{sign}.3g}, median {h['median']:{sign}.3g}, std {h['std']:.3g}{out}", fontsize=9)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("count")
    ax.grid(alpha=0.3)
    if marks:
        ax.legend(fontsize=8)


def plot_bias(bias: dict, what: str, path: Path) -> bool:
    """dx / dy histograms of ``analysis.bias``, in pixels and in fractions of the image."""
    if not bias.get("n"):
        return False
    fig, axes = _figure(2, 2, 10, 7)
    for r, (unit, xlabel) in enumerate((("px", "source pixels"), ("norm", "fraction of image width / height"))):
        for c, axis in enumerate(("dx", "dy")):
            h = bias[f"{axis}_{unit}"]
            if not h.get("n"):
                axes[r, c].set_visible(False)
                continue
            _stairs(axes[r, c], h, "tab:red" if c == 0 else "tab:blue", f"{what}: {axis} = pred - GT ({unit})", xlabel,
                    [(h["mean"], "--", "mean")])
    fig.savefig(path)
    return True


def plot_distance(dist: dict, path: Path) -> bool:
    """Per-example distance error, pixels and fractions of the diagonal (success threshold marked)."""
    if not dist["px"].get("n"):
        return False
    fig, axes = _figure(1, 2, 10, 3.6)
    _stairs(axes[0, 0], dist["px"], "tab:purple", "distance error per example", "source pixels",
            [(dist["px"]["median"], ":", "median")], sign="")
    _stairs(axes[0, 1], dist["norm"], "tab:purple", "normalised distance error", "fraction of image diagonal",
            [(dist["success_frac"], "--", f"success < {dist['success_frac']}")], sign="")
    fig.savefig(path)
    return True


def plot_reliability(calibration: dict[str, dict], path: Path) -> bool:
    """One reliability diagram per model column (``analysis.calibration``): accuracy per
    confidence bin as bars spanning the bin, each bin's mean confidence as a marker, the
    diagonal of perfect calibration, ECE in the title; below, predictions per bin."""
    cols = [(c, cal) for c, cal in calibration.items() if any(b["count"] for b in cal["bins"])]
    if not cols:
        return False
    fig, axes = _figure(2, len(cols), max(4.6 * len(cols), 5.0), 6.2, sharex="col",
                        gridspec_kw={"height_ratios": (3, 1)})
    for k, (col, cal) in enumerate(cols):
        top, bottom = axes[0, k], axes[1, k]
        bins = [b for b in cal["bins"] if b["count"]]
        lo = np.array([b["lo"] for b in bins])
        width = np.array([b["hi"] - b["lo"] for b in bins])
        acc = np.array([b["accuracy"] if b["accuracy"] is not None else 0.0 for b in bins])
        top.plot([0, 1], [0, 1], color=_hex(CAL_DIAGONAL_COLOUR), lw=2, ls="--", antialiased=False,
                 label="perfect calibration", zorder=3)
        # white edges keep adjacent bins apart; no anti-aliasing keeps the fill colour exact
        top.bar(lo, acc, width=width, align="edge", color=_hex(CAL_ACCURACY_COLOUR), edgecolor="white",
                linewidth=1, antialiased=False, label="accuracy", zorder=2)
        conf = [(b["lo"] + (b["hi"] - b["lo"]) / 2, b["confidence"]) for b in bins if b["confidence"] is not None]
        if conf:
            top.plot(*zip(*conf), ls="none", marker="D", ms=5, color=_hex(CAL_CONFIDENCE_COLOUR),
                     label="mean confidence", zorder=4)
        ece = cal["ece"]
        top.set_title(f"{col}: ECE {ece:.4f}" if ece is not None else f"{col}: ECE -", fontsize=10)
        top.set_xlim(0, 1)
        top.set_ylim(0, 1.08)
        top.set_ylabel("accuracy")
        top.grid(alpha=0.3, zorder=0)
        top.legend(fontsize=7, loc="upper left")
        counts = bottom.bar(lo, [b["count"] for b in bins], width=width, align="edge", color=_hex(CAL_COUNT_COLOUR),
                            edgecolor="white", linewidth=1, antialiased=False)
        bottom.bar_label(counts, fontsize=7, padding=1)
        bottom.margins(y=0.25)  # room for the count labels
        bottom.set_xlabel("confidence")
        bottom.set_ylabel("predictions")
        bottom.grid(alpha=0.3)
    fig.savefig(path)
    return True
