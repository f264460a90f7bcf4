"""Seed 003's exploratory statistics of a caption dataset, for the prep report.

Seed 003 (RISC: five captions per image) reports caption lengths (4-50 tokens, mean 11.10; 20-268
characters, mean 61.74), exact duplicates (14,632 captions), and how much an image's captions
agree with each other (mean BLEU-4 0.21 across caption sets). `raytrain prepare` computes the same
for every source with several captions per row, on the captions as converted (before any
caption selection) of the rows it keeps:

* lengths: words (runs of letters and digits, lower-cased, as the caption metrics' simple tokenizer)
  and characters, as min / mean / max, quartiles and the word-length histogram;
* duplicates: captions repeating another caption of the SAME image (exact text after whitespace
  normalisation), images with such a repeat, and captions repeating any earlier caption of the
  dataset (seed 003's count: total minus distinct);
* agreement: each caption scored against the image's OTHER captions as references, BLEU-1..4
  (Papineni et al. 2002: clipped n-gram precisions, brevity penalty against the closest reference
  length). ``bleu_corpus`` pools the counts over all captions; ``bleu_sentence_mean`` averages the
  per-caption scores, zero n-gram matches smoothed to 0.1 (Chen & Cherry 2014, method 1; a
  caption of 3 words has no 4-gram at all and would otherwise score 0).

The work is split the way `prepare` runs: each Ray Data task fills a `CaptionStats` with its
rows (`add`), ships it as JSON (`to_dict`), the driver `merge`s them and writes `summary()`.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections import Counter
from collections.abc import Sequence

MAX_N = 4
SMOOTH_EPSILON = 0.1
_WORD = re.compile(r"[^\W_]+")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def _ngrams(toks: Sequence[str], n: int) -> Counter:
    return Counter(tuple(toks[i : i + n]) for i in range(len(toks) - n + 1))


def bleu_counts(hyp: Sequence[str], refs: Sequence[Sequence[str]], max_n: int = MAX_N) -> tuple[list[int], list[int], int, int]:
    """(clipped matches per n, hypothesis n-grams per n, hypothesis length, closest reference
    length; ties to the shorter) of one hypothesis against its references."""
    matches, totals = [], []
    for n in range(1, max_n + 1):
        h = _ngrams(hyp, n)
        most: Counter = Counter()
        for r in refs:
            for g, c in _ngrams(r, n).items():
                most[g] = max(most[g], c)
        matches.append(sum(min(c, most[g]) for g, c in h.items()))
        totals.append(max(len(hyp) - n + 1, 0))
    ref_len = min((abs(len(r) - len(hyp)), len(r)) for r in refs)[1]
    return matches, totals, len(hyp), ref_len


def bleu(matches: Sequence[int], totals: Sequence[int], hyp_len: int, ref_len: int, n: int, smooth: bool = False) -> float:
    """BLEU-n from counts: geometric mean of the first n precisions times the brevity penalty.
    `smooth`: a precision with no match counts as SMOOTH_EPSILON / its n-gram count."""
    if hyp_len == 0:
        return 0.0
    logs = []
    for k in range(n):
        if totals[k] == 0:
            return 0.0
        m = matches[k] if matches[k] or not smooth else SMOOTH_EPSILON
        if m == 0:
            return 0.0
        logs.append(math.log(m / totals[k]))
    bp = 1.0 if hyp_len > ref_len else math.exp(1 - ref_len / hyp_len)
    return bp * math.exp(sum(logs) / n)


def _text_key(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]


class CaptionStats:
    """Mergeable counts over images with captions (see the module doc)."""

    def __init__(self):
        self.images = 0
        self.captions = 0
        self.per_image: Counter = Counter()  # captions per image -> images
        self.word_lengths: Counter = Counter()
        self.char_lengths: Counter = Counter()
        self.dup_in_image = 0
        self.images_with_dup = 0
        self.texts: Counter = Counter()  # hash of a caption's text -> occurrences (dataset duplicates)
        self.scored = 0  # captions with at least one other caption of their image
        self.sentence_bleu = [0.0] * MAX_N
        self.matches = [0] * MAX_N
        self.totals = [0] * MAX_N
        self.hyp_len = 0
        self.ref_len = 0

    def add(self, captions: Sequence[str]) -> None:
        """One image's captions (whitespace-normalised text)."""
        caps = [" ".join(c.split()) for c in captions]
        caps = [c for c in caps if c]
        if not caps:
            return
        self.images += 1
        self.captions += len(caps)
        self.per_image[len(caps)] += 1
        toks = [words(c) for c in caps]
        for c, t in zip(caps, toks):
            self.word_lengths[len(t)] += 1
            self.char_lengths[len(c)] += 1
            self.texts[_text_key(c)] += 1
        repeats = len(caps) - len(set(caps))
        self.dup_in_image += repeats
        self.images_with_dup += int(repeats > 0)
        for i, hyp in enumerate(toks):
            refs = toks[:i] + toks[i + 1 :]
            if not refs:
                continue
            m, t, hl, rl = bleu_counts(hyp, refs)
            self.scored += 1
            for n in range(MAX_N):
                self.matches[n] += m[n]
                self.totals[n] += t[n]
                self.sentence_bleu[n] += bleu(m, t, hl, rl, n + 1, smooth=True)
            self.hyp_len += hl
            self.ref_len += rl

    # -- transport between Ray tasks and the driver

    _COUNTERS = ("per_image", "word_lengths", "char_lengths", "texts")
    _SCALARS = ("images", "captions", "dup_in_image", "images_with_dup", "scored", "hyp_len", "ref_len")
    _LISTS = ("sentence_bleu", "matches", "totals")

    def to_dict(self) -> dict:
        """JSON-ready counts (counter keys as strings)."""
        out: dict = {k: getattr(self, k) for k in self._SCALARS + self._LISTS}
        out.update({k: {str(x): n for x, n in getattr(self, k).items()} for k in self._COUNTERS})
        return out

    def merge(self, d: dict) -> CaptionStats:
        """Add another task's `to_dict` counts; returns self."""
        for k in self._SCALARS:
            setattr(self, k, getattr(self, k) + d[k])
        for k in self._LISTS:
            setattr(self, k, [a + b for a, b in zip(getattr(self, k), d[k])])
        for k in self._COUNTERS:
            getattr(self, k).update({(x if k == "texts" else int(x)): n for x, n in d[k].items()})
        return self

    # -- the report

    def summary(self) -> dict:
        """The statistics the prep report stores under "statistics" -> "captions" ({} without captions)."""
        if not self.captions:
            return {}
        out = {
            "images": self.images,
            "captions": self.captions,
            "captions_per_image": {str(k): v for k, v in sorted(self.per_image.items())},
            "words": _distribution(self.word_lengths),
            "characters": _distribution(self.char_lengths),
            "duplicates": {
                "within_image": self.dup_in_image,
                "images_with_duplicates": self.images_with_dup,
                "dataset": self.captions - len(self.texts),
            },
            "word_length_histogram": {str(k): v for k, v in sorted(self.word_lengths.items())},
        }
        if self.scored:
            out["caption_vs_caption"] = {
                "captions_scored": self.scored,
                "bleu_corpus": {f"bleu_{n + 1}": round(bleu(self.matches, self.totals, self.hyp_len, self.ref_len, n + 1), 4)
                                for n in range(MAX_N)},
                "bleu_sentence_mean": {f"bleu_{n + 1}": round(self.sentence_bleu[n] / self.scored, 4) for n in range(MAX_N)},
            }
        return out


def _distribution(hist: Counter) -> dict:
    """min / mean / max and quartiles of a length histogram."""
    n = sum(hist.values())
    values = sorted(hist.items())

    def quantile(q: float) -> int:
        rank, seen = q * (n - 1), 0
        for v, c in values:
            seen += c
            if seen > rank:
                return v
        return values[-1][0]

    return {"min": values[0][0], "mean": round(sum(v * c for v, c in values) / n, 2), "max": values[-1][0],
            "p25": quantile(0.25), "median": quantile(0.5), "p75": quantile(0.75)}


def summary_lines(stats: dict) -> list[tuple[str, str]]:
    """The statistics as (name, value) lines for `raytrain prepare`'s printed summary."""
    if not stats:
        return []
    w, c, d = stats["words"], stats["characters"], stats["duplicates"]
    lines = [
        ("captions (images)", f"{stats['captions']:,} ({stats['images']:,})"),
        ("caption words min / mean / max", f"{w['min']} / {w['mean']} / {w['max']}"),
        ("caption characters min / mean / max", f"{c['min']} / {c['mean']} / {c['max']}"),
        ("duplicate captions: same image (images)", f"{d['within_image']:,} ({d['images_with_duplicates']:,})"),
        ("duplicate captions: whole dataset", f"{d['dataset']:,}"),
    ]
    agree = stats.get("caption_vs_caption")
    if agree:
        lines.append(("caption vs other captions BLEU-4 (corpus / sentence mean)",
                      f"{agree['bleu_corpus']['bleu_4']} / {agree['bleu_sentence_mean']['bleu_4']}"))
    return lines
