"""Captioning metrics through ``pycocoevalcap`` (the COCO caption evaluation code).

BLEU-1..4, METEOR 1.5, ROUGE-L and CIDEr-D exactly as the COCO caption server computes
them: captions are PTB-tokenised (lower-cased, punctuation dropped) by Stanford CoreNLP,
then scored. BLEU and CIDEr are CORPUS-level numbers (BLEU sums n-gram counts over the
corpus; CIDEr's IDF comes from the evaluated references, so a one-image corpus has
CIDEr 0 by construction), hence no per-sample half here: these functions run on the
driver over the whole split, after predictions are collected.

Java: METEOR (``meteor-1.5.jar``, started once per process and reused: loading its
paraphrase table takes seconds of CPU) and the PTB tokenizer run under ``java``. With no
``java`` on PATH, ``on_missing_java="raise"`` (default) raises ``JavaMissingError``;
``"skip"`` returns ``meteor=None``, tokenises with a Python approximation (so BLEU /
ROUGE-L / CIDEr are close to, not equal to, published numbers) and says so in
``warnings``. pycocoevalcap's tokenizer writes a temporary file next to its jar, so its
install directory must be writable.
"""

from __future__ import annotations

import functools
import math
import re
import shutil
from typing import Any, Hashable, Mapping, Sequence

import numpy as np

from raytrain.eval.metrics.matching import max_hit_assignment
from raytrain.formats.annotations import Box, box_iou

CAPTION_KEYS = ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "meteor", "rouge_l", "cider")
DENSE_IOUS = (0.3, 0.4, 0.5, 0.6, 0.7)  # DenseCap's IoU thresholds


class JavaMissingError(RuntimeError):
    """``java`` is not on PATH; METEOR and the PTB tokenizer need a JRE."""


def _java_available() -> bool:
    return shutil.which("java") is not None


def _check_java(on_missing_java: str) -> list[str]:
    """Warnings to report; raises JavaMissingError in "raise" mode when java is absent."""
    if on_missing_java not in ("raise", "skip"):
        raise ValueError(f"on_missing_java must be 'raise' or 'skip', got {on_missing_java!r}")
    if _java_available():
        return []
    if on_missing_java == "raise":
        raise JavaMissingError(
            "java not found on PATH: pycocoevalcap's METEOR and PTB tokenizer need a Java runtime "
            "(e.g. apt-get install default-jre-headless), or pass on_missing_java='skip'"
        )
    return [
        (
            "java not found: meteor is None and captions were tokenised by a Python approximation of the "
            "PTB tokenizer, so bleu/rouge_l/cider are not exactly comparable with published COCO numbers"
        )
    ]


def _clean(s: Any) -> str:
    """One line of text: every whitespace run (\\n, \\r, \\u2028, ...) becomes one space.

    The Java tools are line-based; a line break inside a caption would shift every
    following caption onto the wrong id.
    """
    return " ".join(str(s).split()) if s is not None else ""


def _simple_tokenize(groups: Mapping[Hashable, Sequence[str]]) -> dict[Hashable, list[str]]:
    """Fallback without Java: lower-case, split words from punctuation, drop PTB's punctuation list."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PUNCTUATIONS

    drop = set(PUNCTUATIONS)
    word = re.compile(r"\w+(?:'\w+)?|[^\w\s]+")
    return {
        k: [" ".join(t for t in word.findall(c.lower()) if t not in drop) for c in caps] for k, caps in groups.items()
    }


def _tokenize(groups: Mapping[Hashable, Sequence[str]], java: bool) -> dict[Hashable, list[str]]:
    """PTB-tokenise ``{key: [caption, ...]}`` in ONE JVM call, checking nothing got shifted."""
    if not java:
        return _simple_tokenize(groups)
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    if not any(len(v) for v in groups.values()):
        return {k: [] for k in groups}
    out = PTBTokenizer().tokenize({k: [{"caption": c} for c in caps] for k, caps in groups.items()})
    for k, caps in groups.items():
        if len(out.get(k, ())) != len(caps):
            raise RuntimeError(f"PTB tokenizer returned {len(out.get(k, ()))} lines for {len(caps)} captions of {k!r}")
    return {k: out.get(k, []) for k in groups}


@functools.cache
def _meteor():
    """The process-wide METEOR scorer (a ``java -jar meteor-1.5.jar -stdio`` subprocess)."""
    from pycocoevalcap.meteor.meteor import Meteor

    return Meteor()


def _meteor_score(gts: dict, res: dict) -> tuple[float, list[float]]:
    """pycocoevalcap METEOR: (corpus score, per-id scores in ``gts`` order)."""
    try:
        score, scores = _meteor().compute_score(gts, res)
    except (ValueError, BrokenPipeError, OSError) as e:  # the JVM died: its stdout gave ""
        _meteor.cache_clear()
        raise RuntimeError(f"METEOR subprocess failed ({type(e).__name__}: {e}); is there memory for -Xmx2G?") from e
    return float(score), [float(s) for s in scores]


def caption_metrics(
    refs: Mapping[Hashable, Sequence[str]],
    hyps: Mapping[Hashable, str],
    on_missing_java: str = "raise",
) -> dict:
    """COCO caption metrics of ``hyps`` (one caption per id) against ``refs`` (several per id).

    Scored ids are those of ``refs`` with at least one reference. A scored id missing from
    ``hyps`` is scored with an empty caption (counted in ``n_missing_hyp``); ``hyps`` ids
    without references and ids whose reference list is empty cannot be scored and are
    counted (``n_hyp_without_ref``, ``n_empty_refs``), never silently dropped.

    Returns ``bleu_1`` .. ``bleu_4`` (corpus BLEU, pycocoevalcap's "closest" reference
    length), ``meteor`` (METEOR 1.5 corpus score, ``-l en -norm``), ``rouge_l``
    (mean per-caption ROUGE-L, beta 1.2), ``cider`` (CIDEr-D, mean over ids; corpus IDF),
    all floats in [0, 1] except CIDEr (0..10); ``None`` when nothing could be scored.
    Also ``n``, the counts above, ``tokenizer`` ("ptb" or "simple") and ``warnings``.
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    warnings = _check_java(on_missing_java)
    java = not warnings
    ids = [k for k, v in refs.items() if len(v) > 0]
    out: dict[str, Any] = dict.fromkeys(CAPTION_KEYS)
    out.update(
        n=len(ids),
        n_missing_hyp=sum(k not in hyps for k in ids),
        n_hyp_without_ref=sum(k not in refs for k in hyps),
        n_empty_refs=len(refs) - len(ids),
        tokenizer="ptb" if java else "simple",
        warnings=warnings,
    )
    if not ids:
        return out
    # Keys ("r", i) / ("h", i) let one tokenizer call carry refs and hyps.
    groups: dict[Hashable, list[str]] = {}
    for i in ids:
        groups[("r", i)] = [_clean(c) for c in refs[i]]
        groups[("h", i)] = [_clean(hyps.get(i, ""))]
    tok = _tokenize(groups, java)
    gts = {i: tok[("r", i)] for i in ids}
    res = {i: tok[("h", i)] for i in ids}

    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    for n, b in enumerate(bleu, start=1):
        out[f"bleu_{n}"] = float(b)
    out["rouge_l"] = float(Rouge().compute_score(gts, res)[0])
    out["cider"] = float(Cider().compute_score(gts, res)[0])
    if java:
        out["meteor"] = _meteor_score(gts, res)[0]
    return out


def _pct(t: float) -> str:
    return f"{round(t * 100):d}"


def dense_caption_metrics(
    gt_regions: Sequence[tuple[Hashable, Box, str]],
    pred_regions: Sequence[tuple[Hashable, Box, str, Any]],
    iou_thresholds: Sequence[float] = DENSE_IOUS,
    on_missing_java: str = "raise",
) -> dict:
    """Dense captioning (region + phrase), a simplified DenseCap protocol.

    Per image and per IoU threshold ``t``, predicted and GT regions are matched one-to-one
    by box IoU (``IoU >= t``; most matches first, then highest IoU, by
    ``matching.max_hit_assignment``; box labels ignored). Each matched pair's predicted
    phrase is scored by METEOR against its GT phrase (PTB-tokenised, as in
    ``caption_metrics``). DenseCap itself ranks predictions by score, merges overlapping GT
    boxes and reports AP over (IoU, METEOR) threshold pairs; this protocol does not rank,
    so ``score`` (4th field, kept so the same region list feeds an AP later) is unused.

    Returns ``n_images`` (with GT or predictions), ``n_gt``, ``n_pred`` and, for each
    ``t`` with suffix ``round(100 t)`` (e.g. ``_50``):
    ``recall_<t>`` (matched GT / GT), ``precision_<t>`` (matched / predictions),
    ``meteor_<t>`` (mean METEOR over matched pairs; None if none),
    ``meteor_per_gt_<t>`` (sum of matched METEOR / GT: unmatched GT count 0),
    ``unmatched_gt_<t>``, ``unmatched_pred_<t>``; plus ``recall_mean``, ``meteor_mean``,
    ``meteor_per_gt_mean`` (means over thresholds of the defined values), ``warnings``.
    With no ``java`` and ``on_missing_java="skip"`` every METEOR value is None.
    """
    warnings = _check_java(on_missing_java)
    java = not warnings
    by_image: dict[Hashable, tuple[list, list]] = {}
    for image_id, box, phrase in gt_regions:
        by_image.setdefault(image_id, ([], []))[0].append((box, _clean(phrase)))
    for image_id, box, phrase, *_ in pred_regions:
        by_image.setdefault(image_id, ([], []))[1].append((box, _clean(phrase)))

    # matched[t] = list of (pred phrase, gt phrase) pairs over all images
    matched: dict[float, list[tuple[str, str]]] = {t: [] for t in iou_thresholds}
    for gts, preds in by_image.values():
        if not gts or not preds:
            continue
        iou = np.array([[box_iou(g, p) for p, _ in preds] for g, _ in gts], dtype=np.float64)  # (G, P)
        for t in iou_thresholds:
            rows, cols = max_hit_assignment(iou >= t, iou)
            matched[t].extend((preds[j][1], gts[i][1]) for i, j in zip(rows, cols))

    # METEOR once per distinct (pred, gt) phrase pair, in one tokenizer and one METEOR call
    pairs = sorted({p for m in matched.values() for p in m})
    meteor: dict[tuple[str, str], float] = {}
    if pairs and java:
        phrases = sorted({s for p in pairs for s in p})
        tok = _tokenize({k: [s] for k, s in enumerate(phrases)}, True)
        tok_of = {s: tok[k][0] for k, s in enumerate(phrases)}
        gts_m = {k: [tok_of[g]] for k, (_, g) in enumerate(pairs)}
        res_m = {k: [tok_of[p]] for k, (p, _) in enumerate(pairs)}
        _, scores = _meteor_score(gts_m, res_m)
        meteor = dict(zip(pairs, scores))

    n_gt, n_pred = len(gt_regions), len(pred_regions)
    out: dict[str, Any] = {"n_images": len(by_image), "n_gt": n_gt, "n_pred": n_pred}
    means: dict[str, list[float]] = {"recall": [], "meteor": [], "meteor_per_gt": []}
    for t in iou_thresholds:
        m, s = len(matched[t]), _pct(t)
        ms = [meteor[p] for p in matched[t]] if java else []
        vals = {
            "recall": m / n_gt if n_gt else None,
            "precision": m / n_pred if n_pred else None,
            "meteor": float(np.mean(ms)) if ms else None,
            "meteor_per_gt": float(np.sum(ms)) / n_gt if java and n_gt else None,
        }
        for k, v in vals.items():
            out[f"{k}_{s}"] = v
            if k in means and v is not None and math.isfinite(v):
                means[k].append(v)
        out[f"unmatched_gt_{s}"] = n_gt - m
        out[f"unmatched_pred_{s}"] = n_pred - m
    for k, vs in means.items():
        out[f"{k}_mean"] = float(np.mean(vs)) if vs else None
    out["warnings"] = warnings
    return out
