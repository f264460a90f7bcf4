"""Token-level grammar of PaliGemma detection / pointing / segmentation output, for constrained decoding.

Pure state machine over token ids (no torch, no tokenizer): ``models/paligemma_decoding.py`` reads the ids
from the real processor (``grammar_from_processor``) and masks logits with ``allowed``.

Accepted sequences, with n = 2 loc tokens per object (point, ``<locY><locX>``) or 4 (box,
``<locY1><locX1><locY2><locX2>``; mask: the box's 4 then m = 16 ``<segNNN>`` codes, as
``formats/paligemma_masks.render_segments`` writes them)::

    output := object ( SEP object )* <eos>        at most `max_objects` objects
    object := <loc>{n} <seg>{m} LABEL             LABEL: one of the allowed labels; m = 0 unless mask

The label and the separator are not separate token sequences: a tokenizer may merge the
end of a label with what follows (sentencepiece does not split at spaces), so each label
is stored twice, as the ids of ``" <label> ; "`` (followed by the next object's locs) and
of ``" <label>"`` (followed by <eos>), both read from a rendered training target. The two
sets of sequences share one trie. On top of the syntax:

* box validity (boxes and masks): ``y2 >= y1`` and ``x2 >= x1``, by masking the bins below the start bin;
* no duplicate object: a loc that would complete an object whose bins equal an earlier
  object's is masked (with a look-ahead, so that no prefix is left without a valid
  completion: a box start ``(y1, x1=1023, y2)`` already used has no other ``x2``);
* a token budget: given the number of tokens ``remaining`` (``max_new_tokens`` minus those
  generated, <eos> included), only tokens after which the shortest completion still fits
  are allowed, so generation ends with <eos> instead of being cut inside an object. If
  even the shortest completion cannot fit, the budget is ignored (the output will be cut).

A prefix that is not in the grammar (a beam kept alive on a -inf score, a processor that
ran before this one) is "dead": only <eos> is allowed from it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from raytrain.formats.paligemma import NUM_LOC, NUM_SEG

N_LOCS = {"point": 2, "box": 4, "mask": 4}  # loc tokens per object
N_SEGS = {"mask": 16}  # <seg> tokens after them (the mask codec's 4x4 codes); none for the others
_BOX_PAIRS = {2: 0, 3: 1}  # box position -> position of the start bin it must not go below
_FAR = 10**9  # "unreachable" distance in the trie
_CACHE_ENTRIES = 50_000  # per-grammar prefix / answer caches are dropped past this many entries


def query_labels(query: str) -> list[str]:
    """Labels of a PaliGemma prompt query: ``"cat ; dog"`` -> ``["cat", "dog"]`` (order kept,
    duplicates and empty parts dropped), as multi-class ``detect`` prompts list them."""
    out: list[str] = []
    for part in query.split(";"):
        part = part.strip()
        if part and part not in out:
            out.append(part)
    return out


class Allowed(NamedTuple):
    """What may come next: ``tokens`` (non-loc token ids: words, <seg> codes, <eos>), ``locs``
    (bool mask over the 1024 bins, or None when no loc is allowed) and ``vocab`` (bool mask over
    the token ids, or None): for answers that allow most of the vocabulary (a free-text phrase),
    where listing the ids would be slow; it adds to ``tokens`` and ``locs``."""

    tokens: tuple[int, ...]
    locs: np.ndarray | None
    vocab: np.ndarray | None = None


@dataclass
class _Node:
    children: dict[int, int] = field(default_factory=dict)
    sep_end: bool = False  # " label ; " ends here: the next object's locs may follow
    final_end: bool = False  # " label" ends here: <eos> may follow
    to_sep: int = _FAR  # fewest tokens from here to a sep_end (0 if here; _FAR: none below)
    to_final: int = _FAR  # fewest tokens from here to a final_end


@dataclass(frozen=True)
class _State:
    phase: str  # "loc" | "label" | "empty" | "done" | "dead"
    cur: tuple[int, ...] = ()  # bins (then seg codes, masks) of the object being read (phase "loc")
    objects: tuple[tuple[int, ...], ...] = ()  # bins of every object whose locs are complete
    node: int = 0  # trie node (phase "label")


class PrefixAutomaton:
    """What the ``<loc>`` grammars share (DetectionGrammar here, region_grammar.RegionGrammar): a
    state per generated prefix, walked one token at a time from the longest prefix already seen,
    and the token budget's rule for answers.

    Decoding asks `allowed` once per row per step with a prefix one token longer than the last:
    the state of every prefix seen is kept (a step walks one token, not the whole prefix), and
    so is each answer (`_answer`). Grammars live as long as their processor, so both caches are
    dropped past _CACHE_ENTRIES. A subclass gives `_step(state, token)`, `_allowed(state,
    remaining)` and a start state with a ``phase`` ("done" and "dead" absorb what follows)."""

    def _start_walk(self, start) -> None:
        self._start = start
        self._states: dict[tuple[int, ...], object] = {(): start}
        self._answers: dict = {}

    def state(self, prefix: Sequence[int]):
        """State after the generated ids ``prefix`` (prompt excluded)."""
        key = tuple(int(t) for t in prefix)
        s = self._states.get(key)
        if s is not None:
            return s
        k = len(key)  # longest prefix whose state is known (the empty one always is)
        while key[:k] not in self._states:
            k -= 1
        s = self._states[key[:k]]
        if len(self._states) > _CACHE_ENTRIES:
            self._states = {(): self._start}
        for i in range(k, len(key)):
            if s.phase not in ("done", "dead"):  # done / dead absorb whatever follows
                s = self._step(s, key[i])
            self._states[key[: i + 1]] = s
        return s

    def allowed(self, prefix: Sequence[int], remaining: int | None = None) -> Allowed:
        """Tokens allowed after ``prefix``; ``remaining``: tokens left in the budget, counting
        the one about to be chosen (None: no budget)."""
        return self.allowed_from_state(self.state(prefix), remaining)

    def accepts(self, ids: Sequence[int]) -> bool:
        """True if ``ids`` (generated ids, <eos> included) is a complete sentence of the grammar."""
        return self.state(ids).phase == "done"

    def _answer(self, key, s, remaining: int | None) -> Allowed:
        """The cached answer under ``key`` (the caller's: what the answer depends on), computed
        for state ``s`` on a miss; its masks are made read-only (answers are shared)."""
        got = self._answers.get(key)
        if got is None:
            if len(self._answers) > _CACHE_ENTRIES:
                self._answers = {}
            got = self._answers[key] = self._within_budget(s, remaining)
            for m in (got.locs, got.vocab):
                if m is not None:
                    m.setflags(write=False)
        return got

    def _within_budget(self, s, remaining: int | None) -> Allowed:
        if s.phase in ("done", "dead"):
            return Allowed((self.eos_id,), None)
        full = self._allowed(s, None)
        if remaining is None:
            return full
        fit = self._allowed(s, remaining)
        if _allows_nothing(fit):
            return full  # nothing fits any more: keep to the grammar, the output will be cut
        return fit


def _allows_nothing(a: Allowed) -> bool:
    return not len(a.tokens) and (a.locs is None or not a.locs.any()) and (a.vocab is None or not a.vocab.any())


class DetectionGrammar(PrefixAutomaton):
    """PaliGemma ``<loc>`` output grammar for one example (one set of allowed labels).

    ``loc_ids``: the 1024 ids of ``<loc0000>``..``<loc1023>`` in bin order; ``seg_ids`` (kind
    "mask" only): the 128 ids of ``<seg000>``..``<seg127>`` in code order.
    ``label_sequences``: ``{label: (ids of " label ; ", ids of " label")}`` as the tokenizer
    writes them inside a rendered target (see ``models.paligemma_decoding.label_sequences``).
    ``max_objects``: at most this many objects (None: unlimited); then only the <eos> path.
    ``empty_ids``: the ids of the "nothing found" answer (negatives), <eos> excluded: ``()`` is
    <eos> right away; None allows no empty answer.
    """

    def __init__(
        self,
        loc_ids: Sequence[int],
        label_sequences: Mapping[str, tuple[Sequence[int], Sequence[int]]],
        eos_id: int,
        kind: str,
        max_objects: int | None = None,
        forbid_duplicates: bool = True,
        empty_ids: Sequence[int] | None = None,
        seg_ids: Sequence[int] | None = None,
    ):
        if kind not in N_LOCS:
            raise ValueError(f"unknown kind {kind!r}, expected one of {tuple(N_LOCS)}")
        loc_ids = [int(i) for i in loc_ids]
        if len(loc_ids) != NUM_LOC or len(set(loc_ids)) != NUM_LOC:
            raise ValueError(f"need {NUM_LOC} distinct loc ids, got {len(set(loc_ids))}")
        if not label_sequences:
            raise ValueError("at least one allowed label is needed")
        if max_objects is not None and max_objects < 1:
            raise ValueError(f"max_objects must be >= 1 or None, got {max_objects}")
        self.kind = kind
        self.n_locs = N_LOCS[kind]
        self.n_segs = N_SEGS.get(kind, 0)
        self.n_pos = self.n_locs + self.n_segs  # loc / seg tokens per object
        seg_ids = [int(i) for i in seg_ids or ()]
        if self.n_segs and (len(seg_ids) != NUM_SEG or len(set(seg_ids) | set(loc_ids)) != NUM_SEG + NUM_LOC):
            raise ValueError(f"kind {kind!r} needs {NUM_SEG} distinct seg ids, apart from the loc ids")
        self._code_of = {t: c for c, t in enumerate(seg_ids)} if self.n_segs else {}
        self.seg_ids = tuple(seg_ids) if self.n_segs else ()
        # the answer at a seg position that no duplicate restricts: one object, so that the logits
        # processor converts it once per generate call
        self._seg_answer = Allowed(self.seg_ids, None)
        self.eos_id = int(eos_id)
        self.max_objects = max_objects
        self.forbid_duplicates = forbid_duplicates
        self.empty_ids = None if empty_ids is None else tuple(int(t) for t in empty_ids)
        self.loc_ids = np.asarray(loc_ids, dtype=np.int64)
        self._bin_of = {t: b for b, t in enumerate(loc_ids)}
        self.labels = tuple(label_sequences)
        self._nodes = [_Node()]
        for label, (sep_seq, final_seq) in label_sequences.items():
            for seq, is_sep in ((sep_seq, True), (final_seq, False)):
                seq = [int(t) for t in seq]
                if not seq:
                    raise ValueError(f"label {label!r}: empty token sequence")
                bad = [t for t in seq if t in self._bin_of or t in self._code_of or t == self.eos_id]
                if bad:
                    raise ValueError(f"label {label!r}: its ids contain loc / eos / seg ids {bad}")
                n = 0
                for t in seq:
                    if t not in self._nodes[n].children:
                        self._nodes[n].children[t] = len(self._nodes)
                        self._nodes.append(_Node())
                    n = self._nodes[n].children[t]
                if is_sep:
                    self._nodes[n].sep_end = True
                else:
                    self._nodes[n].final_end = True
        self._distances(0)
        # Fewest tokens of a whole label ending in <eos>: for the token budget.
        self._min_final = self._nodes[0].to_final
        self._start_walk(_State("loc"))  # prefix states and answers (PrefixAutomaton)

    def _distances(self, n: int) -> None:
        # Trie depth is a label's token count: recursion is shallow.
        node = self._nodes[n]
        node.to_sep = 0 if node.sep_end else node.to_sep
        node.to_final = 0 if node.final_end else node.to_final
        for c in node.children.values():
            self._distances(c)
            node.to_sep = min(node.to_sep, self._nodes[c].to_sep + 1)
            node.to_final = min(node.to_final, self._nodes[c].to_final + 1)

    # ------------------------------------------------------------------ walking a prefix

    def _more(self, s: _State) -> bool:
        """May another object start after the current one? (in phase "label" the current
        object is already in ``s.objects``)"""
        return self.max_objects is None or len(s.objects) < self.max_objects

    def _step(self, s: _State, t: int) -> _State:
        b = self._bin_of.get(t)
        if s.phase == "loc":
            if not s.cur and not s.objects and self.empty_ids is not None:
                if t == self.eos_id and not self.empty_ids:
                    return _State("done")
                if self.empty_ids and t == self.empty_ids[0]:
                    return _State("empty", node=1)
            if len(s.cur) >= self.n_locs:  # a mask's seg codes
                b = self._code_of.get(t)
            if b is None or not self._loc_ok(s.cur, s.objects, b):
                return _State("dead")
            cur = s.cur + (b,)
            if len(cur) == self.n_pos:
                return _State("label", objects=s.objects + (cur,), node=0)
            return _State("loc", cur=cur, objects=s.objects)
        if s.phase == "label":
            node = self._nodes[s.node]
            if b is not None:
                if node.sep_end and self._more(s) and self._loc_ok((), s.objects, b):
                    return _State("loc", cur=(b,), objects=s.objects)
                return _State("dead")
            if t == self.eos_id:
                return _State("done", objects=s.objects) if node.final_end else _State("dead")
            child = node.children.get(t)
            if child is not None and (self._more(s) or self._nodes[child].to_final < _FAR):
                return _State("label", objects=s.objects, node=child)
            return _State("dead")
        if s.phase == "empty":  # inside the "nothing found" answer: its ids, then <eos>
            k = s.node
            if k == len(self.empty_ids):
                return _State("done") if t == self.eos_id else _State("dead")
            return _State("empty", node=k + 1) if t == self.empty_ids[k] else _State("dead")
        return s

    # ------------------------------------------------------------------ loc constraints

    def _completions(self, p: tuple[int, ...]) -> int:
        """Number of valid objects whose bins (and codes) start with ``p`` (box order constraints)."""
        if self.kind == "point":
            return NUM_LOC ** (2 - len(p))
        if self.n_segs:  # a mask: its box's completions times those of its codes
            codes = max(len(p) - self.n_locs, 0)
            return self._box_completions(p[: self.n_locs]) * NUM_SEG ** (self.n_segs - codes)
        return self._box_completions(p)

    @staticmethod
    def _box_completions(p: tuple[int, ...]) -> int:
        k = len(p)
        if k == 4:
            return 1
        if k == 3:
            return NUM_LOC - p[1]  # x2 in x1..1023
        if k == 2:
            return (NUM_LOC - p[0]) * (NUM_LOC - p[1])
        if k == 1:
            return (NUM_LOC - p[0]) * (NUM_LOC * (NUM_LOC + 1) // 2)
        return (NUM_LOC * (NUM_LOC + 1) // 2) ** 2

    def _loc_ok(self, cur: tuple[int, ...], objects: tuple[tuple[int, ...], ...], b: int) -> bool:
        k = len(cur)
        if not 0 <= b < (NUM_LOC if k < self.n_locs else NUM_SEG) or k >= self.n_pos:
            return False
        if self.n_locs == 4 and k in _BOX_PAIRS and b < cur[_BOX_PAIRS[k]]:
            return False
        if self.forbid_duplicates and objects:
            p = cur + (b,)
            seen = sum(1 for o in objects if o[: k + 1] == p)
            if seen and seen >= self._completions(p):
                return False
        return True

    def _loc_mask(self, cur: tuple[int, ...], objects: tuple[tuple[int, ...], ...]) -> np.ndarray:
        """Vectorised ``_loc_ok`` over all 1024 bins (tested equal to it)."""
        k = len(cur)
        mask = np.ones(NUM_LOC if k < self.n_locs else NUM_SEG, dtype=bool)
        if self.n_locs == 4 and k in _BOX_PAIRS:
            mask[: cur[_BOX_PAIRS[k]]] = False
        if self.forbid_duplicates and objects:
            counts: dict[int, int] = {}
            for o in objects:
                if o[:k] == cur:
                    counts[o[k]] = counts.get(o[k], 0) + 1
            for b, seen in counts.items():
                if seen >= self._completions(cur + (b,)):
                    mask[b] = False
        return mask

    # ------------------------------------------------------------------ what may come next

    def _shortest_from(self, node: int, more: bool) -> int:
        """Fewest tokens (<eos> included) that end the output from trie ``node``: finish this
        label, or (``more`` objects allowed) finish it with a separator and add the shortest object."""
        c = self._nodes[node]
        best = c.to_final + 1
        if more and c.to_sep < _FAR:
            best = min(best, c.to_sep + self.n_pos + self._min_final + 1)
        return best

    def allowed_from_state(self, s: _State, remaining: int | None = None) -> Allowed:
        """What `allowed` answers for state ``s`` (cached: treat the returned mask as read-only)."""
        return self._answer((s, remaining), s, remaining)

    def _allowed(self, s: _State, remaining: int | None) -> Allowed:
        # budget: after choosing a token, what is left (remaining - 1) must hold the shortest completion
        left = None if remaining is None else remaining - 1
        if s.phase == "empty":
            k = s.node
            return Allowed((self.eos_id,) if k == len(self.empty_ids) else (self.empty_ids[k],), None)
        if s.phase == "loc":
            k = len(s.cur)
            empty = ()
            if not s.cur and not s.objects and self.empty_ids is not None:
                fits = left is None or len(self.empty_ids) <= left
                empty = ((self.empty_ids[0],) if self.empty_ids else (self.eos_id,)) if fits else ()
            after_loc = self.n_pos - k - 1 + self._min_final + 1
            if left is not None and after_loc > left:
                return Allowed(empty, None)
            if k >= self.n_locs:  # a mask's seg codes: listed as tokens (128 ids)
                return self._seg_allowed(s)
            return Allowed(empty, self._loc_mask(s.cur, s.objects))
        node = self._nodes[s.node]
        more = self._more(s)
        tokens = []
        if node.final_end:
            tokens.append(self.eos_id)
        for t, c in node.children.items():
            cn = self._nodes[c]
            if not more and cn.to_final >= _FAR:
                continue
            if left is not None and self._shortest_from(c, more) > left:
                continue
            tokens.append(t)
        locs = None
        # a new object's first loc, if the rest of it (n-1 locs, a label, <eos>) still fits
        if node.sep_end and more and (left is None or self.n_pos - 1 + self._min_final + 1 <= left):
            locs = self._loc_mask((), s.objects)
        return Allowed(tuple(tokens), locs)

    def _seg_allowed(self, s: _State) -> Allowed:
        if not (self.forbid_duplicates and s.objects):
            return self._seg_answer
        mask = self._loc_mask(s.cur, s.objects)
        return self._seg_answer if mask.all() else Allowed(tuple(t for t, ok in zip(self.seg_ids, mask) if ok), None)


class AnyOf:
    """Either of several grammars with the `allowed` / `accepts` / `loc_ids` interface (e.g. Molmo's
    one-point ``<point ...>`` and several-point ``<points ...>`` answers): after a prefix, the tokens
    any grammar still reading it allows. A grammar the prefix has left is ignored, so its "only the
    end token" answer for dead prefixes never lets the output end early; when every grammar has
    left the prefix, only the end tokens remain."""

    def __init__(self, grammars: Sequence):
        if not grammars:
            raise ValueError("need at least one grammar")
        self.grammars = list(grammars)
        self.end_ids = tuple(dict.fromkeys(e for g in self.grammars for e in _end_ids(g)))
        self.eos_id = self.end_ids[0]
        self.loc_ids = np.zeros((0,), dtype=np.int64)
        if any(len(g.loc_ids) for g in self.grammars):
            raise ValueError("AnyOf combines text grammars (no <loc> masks)")

    def allowed(self, prefix: Sequence[int], remaining: int | None = None) -> Allowed:
        tokens: list[int] = []
        for g in self.grammars:
            if g.alive(prefix):
                tokens.extend(g.allowed(prefix, remaining).tokens)
        return Allowed(tuple(dict.fromkeys(tokens)) or self.end_ids, None)

    def accepts(self, ids: Sequence[int]) -> bool:
        return any(g.accepts(ids) for g in self.grammars)

    def reading(self, ids: Sequence[int]):
        """The grammar that reads most of `ids` (the one that accepts them, when one does)."""
        for g in self.grammars:
            if g.accepts(ids):
                return g
        return max(self.grammars, key=lambda g: g.read_length(ids))


def _end_ids(g) -> tuple[int, ...]:
    return tuple(getattr(g, "end_ids", None) or (g.eos_id,))
