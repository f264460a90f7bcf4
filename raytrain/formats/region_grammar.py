"""Token-level grammar of PaliGemma dense-caption output (``<loc>``x4 phrase ; ...), for constrained decoding.

Pure state machine over token ids (no torch, no tokenizer), the sibling of ``formats/grammar.py``'s
``DetectionGrammar`` for regions, whose phrase is FREE text rather than one of a list of labels::

    output := region ( SEP region )* <eos>        at least one, at most `max_objects` regions
    region := <loc>{4} PHRASE                     box order y1 <= y2, x1 <= x2
    PHRASE := text tokens with at least one non-space character, at most `max_phrase` tokens

What ``formats.paligemma.parse`` reads back as a box and its label decides which tokens a phrase may
hold, on each token's text (``token_classes``): a phrase token has no ``;`` (the parser's object
separator) and no ``<`` (what ``<loc..>``, ``<seg..>``, ``<eos>`` spelled out of ordinary tokens start
with). A sentencepiece tokenizer writes the separator ``" ; "`` as pieces it may merge with their
neighbours (the tiny preset: ``"▁" ";" "▁"``; a real vocabulary has ``"▁;"`` and ``");"``), so the
separator is any token whose text is ``<phrase text>;<spaces>``; after it come at most
``MAX_GAP`` space-only tokens, then the next region's first ``<loc>``. A phrase may end in spaces.

The token budget works as in ``DetectionGrammar``: given ``remaining`` (tokens left, <eos>
included), only tokens after which the shortest completion still fits are allowed, so the output
ends with <eos> rather than being cut; when nothing fits, the budget is ignored. A prefix outside
the grammar is "dead": only <eos> may follow. No empty answer: a dense caption names at least one
region (the parser reads "" as an error). Duplicate regions are not refused (a box may carry two
phrases).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from raytrain.formats.grammar import _BOX_PAIRS, Allowed, PrefixAutomaton
from raytrain.formats.paligemma import NUM_LOC

MAX_GAP = 2  # space-only tokens between a separator and the next region's first <loc>
# token classes (token_classes)
OTHER, WORD, SPACE, SEP_WORD, SEP = 0, 1, 2, 3, 4
N_LOCS = 4


def token_classes(texts: Mapping[int, str], vocab_size: int, excluded: Sequence[int] = ()) -> np.ndarray:
    """Class of each token id (int8, ``vocab_size`` long) from its text as it reads inside decoded
    output (sentencepiece's "▁" as a space): WORD (a non-space character, no ``;`` or ``<``), SPACE
    (only spaces), SEP_WORD / SEP (one ``;`` followed by spaces only, with / without a non-space
    character before it, no ``<``), OTHER (anything else: never in a phrase). ``excluded`` ids
    (special tokens, <loc>, <seg>) and ids without a text are OTHER."""
    out = np.zeros(vocab_size, dtype=np.int8)
    for t, text in texts.items():
        if not 0 <= t < vocab_size or "<" in text or not text:
            continue
        if ";" not in text:
            out[t] = WORD if text.strip() else SPACE
        elif text.count(";") == 1 and not text.split(";")[1].strip():
            out[t] = SEP_WORD if text.split(";")[0].strip() else SEP
    out[[int(t) for t in excluded if 0 <= int(t) < vocab_size]] = OTHER
    return out


@dataclass(frozen=True)
class _State:
    phase: str  # "loc" | "phrase" | "gap" | "done" | "dead"
    cur: tuple[int, ...] = ()  # bins of the box being read (phase "loc")
    regions: int = 0  # regions whose 4 locs are complete
    count: int = 0  # tokens of the phrase ("phrase") / space tokens after the separator ("gap")
    word: bool = False  # the phrase has a non-space character


class RegionGrammar(PrefixAutomaton):
    """PaliGemma dense-caption grammar: ``<loc>``x4 then a free phrase, regions joined by a separator.

    ``loc_ids``: the 1024 ids of ``<loc0000>``..``<loc1023>`` in bin order. ``classes``: the class of
    every token id (``token_classes``); its length is the vocabulary the phrase masks cover.
    ``max_objects``: at most this many regions (None: unlimited). ``max_phrase``: tokens per phrase.
    """

    kind = "region"

    def __init__(self, loc_ids: Sequence[int], eos_id: int, classes: np.ndarray, max_objects: int | None = None,
                 max_phrase: int = 32):
        loc_ids = [int(i) for i in loc_ids]
        if len(loc_ids) != NUM_LOC or len(set(loc_ids)) != NUM_LOC:
            raise ValueError(f"need {NUM_LOC} distinct loc ids, got {len(set(loc_ids))}")
        if max_objects is not None and max_objects < 1:
            raise ValueError(f"max_objects must be >= 1 or None, got {max_objects}")
        if max_phrase < 1:
            raise ValueError(f"max_phrase must be >= 1, got {max_phrase}")
        classes = np.asarray(classes, dtype=np.int8)
        if not (classes == WORD).any():
            raise ValueError("no token can write a phrase (no WORD class)")
        if (classes[[t for t in loc_ids + [int(eos_id)] if t < len(classes)]] != OTHER).any():
            raise ValueError("<loc> and <eos> ids must be of class OTHER")
        self.loc_ids = np.asarray(loc_ids, dtype=np.int64)
        self.eos_id = int(eos_id)
        self.max_objects = max_objects
        self.max_phrase = int(max_phrase)
        self.classes = classes
        self._bin_of = {t: b for b, t in enumerate(loc_ids)}
        self._eos_mask = np.zeros(len(classes), dtype=bool)
        if self.eos_id < len(classes):
            self._eos_mask[self.eos_id] = True
        self._masks = {c: classes == c for c in (WORD, SPACE, SEP_WORD, SEP)}
        # phrase / gap answers by the token kinds they allow (a few dozen at most): a vocabulary mask
        # is as long as the vocabulary (257k for PaliGemma), so it is never made per state or budget
        self._shared: dict[tuple, Allowed] = {}
        self._start_walk(_State("loc"))  # prefix states and answers (PrefixAutomaton)

    # ------------------------------------------------------------------ walking a prefix

    def _more(self, s: _State) -> bool:
        return self.max_objects is None or s.regions < self.max_objects

    def _class(self, t: int) -> int:
        return int(self.classes[t]) if 0 <= t < len(self.classes) else OTHER

    def _step(self, s: _State, t: int) -> _State:
        b = self._bin_of.get(t)
        if s.phase in ("loc", "gap"):
            if b is not None and self._loc_mask(s.cur)[b]:
                cur = s.cur + (b,)
                if len(cur) == N_LOCS:
                    return _State("phrase", regions=s.regions + 1)
                return _State("loc", cur=cur, regions=s.regions)
            if s.phase == "gap" and self._class(t) == SPACE and s.count < MAX_GAP:
                return _State("gap", regions=s.regions, count=s.count + 1)
            return _State("dead")
        # phase "phrase"
        c = self._class(t)
        if t == self.eos_id:
            return _State("done", regions=s.regions) if s.word else _State("dead")
        if c in (WORD, SPACE) and s.count < self.max_phrase and (c == WORD or s.word or s.count + 1 < self.max_phrase):
            return _State("phrase", regions=s.regions, count=s.count + 1, word=s.word or c == WORD)
        if (c == SEP_WORD or (c == SEP and s.word)) and self._more(s):
            return _State("gap", regions=s.regions)
        return _State("dead")

    def _loc_mask(self, cur: tuple[int, ...]) -> np.ndarray:
        mask = np.ones(NUM_LOC, dtype=bool)
        k = len(cur)
        if k in _BOX_PAIRS:  # y2 >= y1, x2 >= x1
            mask[: cur[_BOX_PAIRS[k]]] = False
        return mask

    # ------------------------------------------------------------------ what may come next

    def allowed_from_state(self, s: _State, remaining: int | None = None) -> Allowed:
        """What `allowed` answers for ``s`` (cached: treat the returned masks as read-only). Phrase
        answers depend on a few flags only, so they are shared objects across states: the logits
        processor converts each once per generate call."""
        if s.phase in ("done", "dead"):
            key: tuple = ("end",)
        elif s.phase == "phrase":
            word_ok = s.count < self.max_phrase
            space_ok = s.count < self.max_phrase and (s.word or s.count + 1 < self.max_phrase)
            key = ("phrase", s.word, word_ok, space_ok, self._more(s), remaining)
        else:
            key = (s.phase, s.cur[:2], len(s.cur), s.count < MAX_GAP, remaining)
        return self._answer(key, s, remaining)

    def _allowed(self, s: _State, remaining: int | None) -> Allowed:
        # after the chosen token, `left` tokens must hold the shortest completion
        left = None if remaining is None else remaining - 1

        def fits(n: int) -> bool:
            return left is None or n <= left

        if s.phase == "loc":
            # after a loc at position k: the other locs, one phrase token, <eos>
            return Allowed((), self._loc_mask(s.cur) if fits(N_LOCS - len(s.cur) - 1 + 2) else None)
        if s.phase == "gap":  # more space, or the next region's first loc
            return self._shared_answer(space=s.count < MAX_GAP and fits(N_LOCS + 2), loc=fits(N_LOCS + 1))
        return self._shared_answer(
            word=s.count < self.max_phrase and fits(1),  # a word, then <eos>
            space=s.count < self.max_phrase and (s.word or s.count + 1 < self.max_phrase) and fits(1 if s.word else 2),
            sep_word=self._more(s) and fits(N_LOCS + 2),  # separator, a region's locs and one word, <eos>
            sep=s.word and self._more(s) and fits(N_LOCS + 2),
            eos=s.word,
        )

    def _shared_answer(self, word=False, space=False, sep_word=False, sep=False, eos=False, loc=False) -> Allowed:
        key = (word, space, sep_word, sep, eos, loc)
        got = self._shared.get(key)
        if got is None:
            vocab = np.zeros(len(self.classes), dtype=bool)
            for on, c in ((word, WORD), (space, SPACE), (sep_word, SEP_WORD), (sep, SEP)):
                if on:
                    vocab |= self._masks[c]
            if eos:
                vocab |= self._eos_mask
            locs = np.ones(NUM_LOC, dtype=bool) if loc else None
            got = self._shared[key] = Allowed((), locs, vocab if vocab.any() else None)
        return got
