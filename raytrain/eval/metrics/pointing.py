"""Pointing metrics of seed report 000 (section 5.1), in SOURCE-image pixels.

Two halves:

* ``score_points`` runs per sample on Ray Data workers (inside ``map_batches``) and
  returns a small flat dict of plain Python numbers / ``None``.
* ``aggregate_pointing`` runs on the driver over all per-sample dicts.

The same functions score the trained model, the untrained model and blind baselines
(``centre_point``), so the numbers are comparable.

Undefined values are ``None`` in per-sample dicts. Aggregation also treats ``NaN`` as
undefined, because a column of ``None`` becomes ``NaN`` after a round trip through
pandas / Arrow in Ray Data.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

import numpy as np

from raytrain.formats.annotations import Point
from raytrain.eval.metrics.values import finite

# A prediction is a success when closer than this fraction of the image diagonal (seed 000).
DEFAULT_SUCCESS_FRAC = 0.05

# Keys of one scored sample, in order. Kept here so batch code can build empty columns.
SAMPLE_KEYS = ("valid", "distance", "norm_distance", "se_x", "se_y", "ae_x", "ae_y", "success")

# Keys of the aggregate, in the order a report prints them.
AGGREGATE_KEYS = (
    "n",
    "n_valid",
    "valid_rate",
    "mean_distance",
    "median_distance",
    "std_distance",
    "mean_norm_distance",
    "median_norm_distance",
    "mse_x",
    "mse_y",
    "mae_x",
    "mae_y",
    "success_rate",
    "success_rate_all",
)


def centre_point(width: int, height: int) -> Point:
    """Blind baseline: the centre of a ``width`` x ``height`` image, in source pixels."""
    return Point(x=width / 2.0, y=height / 2.0)


def closest_offsets(pred: Sequence[Point], gt: Sequence[Point]) -> np.ndarray:
    """``(G, 2)`` float array: ``(dx, dy) = pred - GT`` in pixels from each GT point to its
    CLOSEST predicted point, the pairing ``score_points`` measures (several GT points may
    share one prediction). Shape ``(0, 2)`` when either side is empty."""
    if len(gt) == 0 or len(pred) == 0:
        return np.zeros((0, 2), dtype=np.float64)
    g = np.array([(p.x, p.y) for p in gt], dtype=np.float64)  # (G, 2)
    q = np.array([(p.x, p.y) for p in pred], dtype=np.float64)  # (P, 2)
    diff = q[None, :, :] - g[:, None, :]  # (G, P, 2): pred - gt
    closest = np.sqrt((diff**2).sum(-1)).argmin(axis=1)  # (G,)
    return diff[np.arange(len(g)), closest]


def score_points(
    pred: Sequence[Point] | None,
    gt: Sequence[Point],
    width: int,
    height: int,
    success_frac: float = DEFAULT_SUCCESS_FRAC,
) -> dict:
    """Score one sample's predicted points against its ground-truth points.

    ``pred=None`` means the model output did not parse: ``valid=0`` and every other
    value is ``None``. For a parsed prediction, each GT point is matched to its CLOSEST
    predicted point (several GT points may share one prediction; extra predictions are
    not penalised, as in the seed), then over the GT points:

    * ``distance``: mean Euclidean distance, pixels.
    * ``norm_distance``: ``distance`` / image diagonal ``sqrt(width**2 + height**2)``.
    * ``se_x``/``se_y``: mean squared x / y error of those matches, pixels**2.
    * ``ae_x``/``ae_y``: mean absolute x / y error, pixels.
    * ``success``: 1 if ``norm_distance < success_frac`` (strict) else 0.

    Labels are ignored. Edge cases (the seed drops samples without GT points, so it
    never meets them):

    * parsed but empty ``pred`` with GT points: ``valid=1``, ``success=0``, distances
      ``None`` (there is no closest point to measure).
    * empty ``gt``: distances ``None``; ``success=1`` iff ``pred`` is empty too
      (the model correctly pointed at nothing).
    * ``width``/``height`` giving a zero diagonal: ``norm_distance`` and ``success``
      are ``None``.
    """
    out: dict[str, Any] = dict.fromkeys(SAMPLE_KEYS)
    if pred is None:
        out["valid"] = 0
        return out
    out["valid"] = 1
    if len(gt) == 0:
        out["success"] = int(len(pred) == 0)
        return out
    if len(pred) == 0:
        out["success"] = 0
        return out

    off = closest_offsets(pred, gt)  # (G, 2)
    d = np.sqrt((off**2).sum(-1))  # (G,)
    dx, dy = off[:, 0], off[:, 1]

    distance = float(d.mean())
    out["distance"] = distance
    out["se_x"] = float((dx**2).mean())
    out["se_y"] = float((dy**2).mean())
    out["ae_x"] = float(np.abs(dx).mean())
    out["ae_y"] = float(np.abs(dy).mean())
    diagonal = math.hypot(width, height)
    if diagonal > 0:
        out["norm_distance"] = distance / diagonal
        out["success"] = int(out["norm_distance"] < success_frac)
    return out



def _mean(xs: list[float]) -> float | None:
    return float(np.mean(xs)) if xs else None


def aggregate_pointing(samples: Iterable[dict]) -> dict:
    """Aggregate per-sample ``score_points`` dicts (driver side). Never raises.

    Distance / error statistics are over valid samples with a defined value (as the
    seed reports them). ``std_distance`` is the population std (numpy's default,
    ``ddof=0``). ``success_rate`` is over valid samples (the seed's "Mean Success
    Rate"); ``success_rate_all`` counts invalid samples as failures over all ``n``.
    Undefined values (no samples, no valid samples) are ``None``, so the result passes
    ``json.dumps(..., allow_nan=False)``.
    """
    n = 0
    n_valid = 0
    cols: dict[str, list[float]] = {k: [] for k in SAMPLE_KEYS if k != "valid"}
    for s in samples:
        n += 1
        if not s or finite(s.get("valid")) != 1.0:
            continue
        n_valid += 1
        for k, col in cols.items():
            v = finite(s.get(k))
            if v is not None:
                col.append(v)

    dist = cols["distance"]
    norm = cols["norm_distance"]
    succ = cols["success"]
    return {
        "n": n,
        "n_valid": n_valid,
        "valid_rate": n_valid / n if n else None,
        "mean_distance": _mean(dist),
        "median_distance": float(np.median(dist)) if dist else None,
        "std_distance": float(np.std(dist)) if dist else None,
        "mean_norm_distance": _mean(norm),
        "median_norm_distance": float(np.median(norm)) if norm else None,
        "mse_x": _mean(cols["se_x"]),
        "mse_y": _mean(cols["se_y"]),
        "mae_x": _mean(cols["ae_x"]),
        "mae_y": _mean(cols["ae_y"]),
        "success_rate": _mean(succ),
        "success_rate_all": float(sum(succ)) / n if n else None,
    }
