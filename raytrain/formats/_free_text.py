"""Free-text slots of the text grammars (``_text_parts.Text``: a dense caption's phrase) and the
vocabulary tables that keep them cheap on the decoding hot path. Pure: numpy, no torch.

What a phrase may hold. Between its quotes: any byte from 0x20 up but DEL, the backslash, the
open quote and the slot's ``excluded`` characters (the formats exclude ``<``, so no phrase spells
``<|im_end|>`` or ``</think>``, and the backtick, so none spells a closing fence); a backslash
only as ``\\\\`` or an escaped open quote (JSON and Python literals read both). Bytes from 0x80 are
taken as they come: a cut UTF-8 character decodes to U+FFFD, still a string character. The parsers
strip a phrase and reject an empty one, so the closing quote needs a VISIBLE byte first: one that
no whitespace character's UTF-8 holds (printable ASCII but space; from 0x80 all but the lead and
continuation bytes of U+0085, U+00A0, U+1680, U+2000..U+200A, U+2028/9, U+202F, U+205F, U+3000).
A phrase of only such characters (say "©" alone) is therefore refused, a rare loss that keeps the
check per byte.

A phrase's configuration is ``(quote index or -1 before it opens, bytes so far, inside an escape,
visible byte seen)``. Inside a phrase almost every token of a 150k vocabulary is allowed, so the
grammar does not walk the vocabulary there: ``FreeTextVocab`` sorts once per (vocabulary, quote)
the tokens made only of phrase bytes by length (with / without a visible byte), so the allowed
ones are two slices, and keeps apart the few tokens that close the phrase inside them (grouped by
what follows the quote, walked from the one state after the quote) or hold an escape.
"""

from __future__ import annotations

import re
import weakref
from typing import NamedTuple

import numpy as np

BACKSLASH = 0x5C
FILLER = ord("a")  # the visible byte of a fixed completion (the token budget's)
# bytes of the UTF-8 encodings of the non-ASCII characters str.strip() removes
_WS_HIGH = frozenset(b"".join(chr(c).encode() for c in (0x85, 0xA0, 0x1680, *range(0x2000, 0x200B), 0x2028, 0x2029, 0x202F, 0x205F, 0x3000)))


class TextBytes:
    """One Text part's byte classes, per quote: the quote byte, the phrase bytes, the visible ones."""

    def __init__(self, part):
        self.part = part
        self.quotes = tuple(ord(q) for q in part.quotes)
        self.quote_index = {q: i for i, q in enumerate(self.quotes)}
        base = frozenset(range(0x20, 0x100)) - {0x7F, BACKSLASH} - set(part.excluded.encode())
        self.plain = tuple(base - {q} for q in self.quotes)
        self.visible = tuple(p - {0x20} - _WS_HIGH for p in self.plain)
        self.max_bytes = part.max_bytes
        self._stop = tuple(re.compile(b"[^" + b"".join(re.escape(bytes((b,))) for b in sorted(p)) + b"]") for p in self.plain)
        self._hidden = tuple(bytes(sorted(set(range(256)) - v)) for v in self.visible)

    def read_on(self, cfg: tuple, keys: list[bytes], lo: int, hi: int, depth: int, found, step) -> None:
        """``found(m, state)`` for each of ``keys[lo:hi]`` whose bytes from ``depth`` on may follow the
        phrase configuration ``cfg``: a run of phrase bytes is read at once (the byte-by-byte rule
        holds for the run iff it holds at its end), from the first other byte on with ``step``."""
        phase, pos, (q, n, _, vis), values, objects = cfg
        made: dict = {}
        for m in range(lo, hi):
            rest = keys[m][depth:]
            hit = self._stop[q].search(rest)
            k = len(rest) if hit is None else hit.start()
            v = vis or bool(rest[:k].translate(None, self._hidden[q]))
            if n + k + (0 if v else 1) > self.max_bytes:
                continue
            ns = made.get((k, v))
            if ns is None:
                ns = made[(k, v)] = frozenset(((phase, pos, (q, n + k, False, v), values, objects),))
            for x in rest[k:]:
                ns = step(ns, x)
                if not ns:
                    break
            if ns:
                found(m, ns)

    def feed(self, partial: tuple, x: int):
        """(new partial, is content) after byte ``x``; ("close", False) when ``x`` closes the
        phrase; None when ``x`` may not come here."""
        q, n, esc, vis = partial
        if q < 0:
            qi = self.quote_index.get(x)
            return None if qi is None else ((qi, 0, False, False), False)
        if esc:
            return ((q, n + 1, False, True), True) if x in (BACKSLASH, self.quotes[q]) else None
        if x == self.quotes[q]:
            return ("close", False) if vis else None
        if x == BACKSLASH:
            return ((q, n + 1, True, vis), True) if n + 2 <= self.max_bytes else None
        if x in self.plain[q]:
            v = vis or x in self.visible[q]
            return ((q, n + 1, False, v), True) if n + (1 if v else 2) <= self.max_bytes else None
        return None

    def next_inputs(self, partial: tuple) -> set:
        q, n, esc, vis = partial
        if q < 0:
            return set(self.quotes)
        if esc:
            return {BACKSLASH, self.quotes[q]}
        return set(self.plain[q]) | {BACKSLASH} | ({self.quotes[q]} if vis else set())

    def completion(self, partial: tuple | None) -> list[int]:
        """The fixed completion: the shortest phrase (one filler byte) and its closing quote."""
        if partial is None or partial[0] < 0:
            return [self.quotes[0], FILLER, self.quotes[0]]
        q, _, esc, vis = partial
        return [self.quotes[q]] * 2 if esc else ([] if vis else [FILLER]) + [self.quotes[q]]

    def vocab(self, vocab, q: int) -> FreeTextVocab:
        return free_text_vocab(vocab, self.plain[q], self.visible[q], self.quotes[q])


class FreeTextVocab:
    """A vocabulary's tokens as seen from inside a phrase quoted by ``quote``:

    * ``vis_ids`` / ``vis_len`` and ``ws_ids`` / ``ws_len``: tokens of phrase bytes only, with and
      without a visible byte, by byte length (ascending); ``plain_len[t]`` (-1: not such a token)
      and ``plain_vis[t]`` for any id;
    * ``close_keys``: sorted distinct texts that follow the closing quote in the tokens that hold
      one after phrase bytes, ``close_rows[i]``: (ids, phrase bytes before the quote, visible
      among them) of those tokens;
    * ``escapes``: (id, phrase bytes before the backslash, visible among them, the bytes from the
      backslash) of tokens that hold an allowed escape (or its backslash last) after phrase bytes.
    Any other token cannot come inside a phrase."""

    def __init__(self, vocab, plain: frozenset, visible: frozenset, quote: int):
        # vectorised over the sorted keys: one padded byte matrix, a lookup per byte class
        keys = vocab.keys
        lens = np.fromiter(map(len, keys), dtype=np.int64, count=len(keys))
        width = int(lens.max(initial=1))
        inside = np.arange(width) < lens[:, None]
        mat = np.zeros((len(keys), width), dtype=np.uint8)
        mat[inside] = np.frombuffer(b"".join(keys), dtype=np.uint8)
        is_plain, is_vis = np.zeros(256, dtype=bool), np.zeros(256, dtype=bool)
        is_plain[sorted(plain)], is_vis[sorted(visible)] = True, True
        ok = is_plain[mat] | ~inside
        stop = np.where(ok.all(axis=1), lens, ok.argmin(axis=1))  # index of the first non-phrase byte
        pvis = (is_vis[mat] & (np.arange(width) < stop[:, None])).any(axis=1)  # a visible byte before it
        counts = np.fromiter(map(len, vocab.key_ids), dtype=np.int64, count=len(keys))
        ids = np.fromiter((t for ts in vocab.key_ids for t in ts), dtype=np.int64, count=int(counts.sum()))
        row = np.repeat(np.arange(len(keys)), counts)  # the key of each id
        size = max([*vocab.pieces, *vocab.added, 0]) + 1
        self.plain_len = np.full(size, -1, dtype=np.int64)
        self.plain_vis = np.zeros(size, dtype=bool)
        whole = stop[row] == lens[row]
        self.plain_len[ids[whole]], self.plain_vis[ids[whole]] = lens[row][whole], pvis[row][whole]
        for name, sel in (("vis", whole & pvis[row]), ("ws", whole & ~pvis[row])):
            order = np.argsort(lens[row][sel], kind="stable")
            setattr(self, name + "_ids", ids[sel][order])
            setattr(self, name + "_len", lens[row][sel][order])
        rows: dict[bytes, list] = {}
        esc = []
        for i in np.nonzero(stop < lens)[0].tolist():  # the few tokens that leave the phrase's bytes
            key, k = keys[i], int(stop[i])
            if key[k] == quote:
                rows.setdefault(key[k + 1 :], []).extend((t, k, bool(pvis[i])) for t in vocab.key_ids[i])
            elif key[k:] == b"\\" or key[k : k + 2] in (b"\\\\", bytes((BACKSLASH, quote))):  # (an escape may end the token)
                esc.extend((t, k, bool(pvis[i]), key[k:]) for t in vocab.key_ids[i])
        self.close_keys = sorted(rows)
        self.close_rows = [tuple(np.array(c) for c in zip(*rows[k])) for k in self.close_keys]
        self.escapes = tuple(esc)


_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def free_text_vocab(vocab, plain: frozenset, visible: frozenset, quote: int) -> FreeTextVocab:
    """``FreeTextVocab`` cached per vocabulary object and byte classes (built once: ~0.5 s at 150k)."""
    per = _CACHE.setdefault(vocab, {})
    key = (plain, visible, quote)
    got = per.get(key)
    if got is None:
        got = per[key] = FreeTextVocab(vocab, plain, visible, quote)
    return got


class FreeGroup(NamedTuple):
    """The tokens of phrase bytes only allowed after a phrase configuration (made lazily)."""

    vis_ids: np.ndarray  # leave a visible byte seen
    ws_ids: np.ndarray  # leave it as it was
    cfg: tuple  # the phrase's configuration (_I, pos, partial, values, objects)
    table: FreeTextVocab
    room: int  # bytes the phrase may still take

    def next_cfg(self, t: int) -> tuple | None:
        """The configuration after token ``t`` of the group, None if ``t`` is not in it."""
        phase, pos, (q, n, _, vis), values, objects = self.cfg
        tb = self.table
        if not 0 <= t < len(tb.plain_len) or tb.plain_len[t] < 0:
            return None
        ln, tv = int(tb.plain_len[t]), bool(tb.plain_vis[t])
        if ln > self.room - (0 if vis or tv else 1):  # a phrase without a visible byte keeps room for one
            return None
        return (phase, pos, (q, n + ln, False, vis or tv), values, objects)


def free_group(cfg: tuple, tb: TextBytes, vocab) -> FreeGroup:
    """The group of a phrase configuration inside the phrase (not in an escape)."""
    q, n, _, vis = cfg[2]
    table = tb.vocab(vocab, q)
    room = tb.max_bytes - n
    a = int(np.searchsorted(table.vis_len, room, side="right"))
    b = int(np.searchsorted(table.ws_len, room - (0 if vis else 1), side="right"))
    return FreeGroup(table.vis_ids[:a], table.ws_ids[:b], cfg, table, room)


def phrase_successors(cfg: tuple, tb: TextBytes, vocab, closed: frozenset, walk, step) -> tuple:
    """What may follow the phrase configuration ``cfg`` (inside it, not in an escape): its tokens of
    phrase bytes only as one lazy ``FreeGroup``, and {token: state} of the few that close the phrase
    (``closed``: the state right after its closing quote, from where ``walk`` reads what follows the
    quote in them, grouped by that text) or hold an escape (stepped byte by byte with ``step``):
    the fields of text_grammar's ``_Succ``."""
    phase, pos, (q, n, _, vis), values, objects = cfg
    group = free_group(cfg, tb, vocab)
    table, room, states = group.table, group.room, {}

    def allow(i, ns):  # the tokens whose text after the closing quote is close_keys[i]
        tids, k, pvis = table.close_rows[i]
        for t in tids[(k <= room) & (pvis | vis)]:
            states[int(t)] = ns

    if closed:
        keys = table.close_keys
        if keys and keys[0] == b"":  # tokens that end with the quote
            allow(0, closed)
        walk(closed, keys, allow)
    for t, k, pvis, rest in table.escapes:
        if k + 2 <= room:
            ns = frozenset(((phase, pos, (q, n + k, False, vis or pvis), values, objects),))
            for x in rest:
                ns = step(ns, x)
                if not ns:
                    break
            if ns:
                states[t] = ns
    return states, None, {}, group
