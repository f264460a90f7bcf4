"""Answer grammars for TEXT output formats: constrained decoding and per-object confidences.

A format describes its answer as an ``AnswerGrammar`` (pure data, built next to the format, e.g.
``formats.qwen_grammar.answer_grammar``)::

    answer := head item (sep item)* tail  |  empty          at most `max_objects` items
    item   := a sequence of Lit / Num / Label / Token / Text parts (one object)

* ``Lit(text)``: literal text;
* ``Num(lo, hi, decimals, trim, ge)``: a number in ``[lo, hi]`` (integers in units of
  ``10**-decimals``) written as the format renders it: no leading zeros; with decimals, either
  Python's float repr of a value rounded to ``decimals`` (``trim``: "0.5", "1.0", "0.125") or
  exactly ``decimals`` digits; ``ge=j``: not below the value of the item's slot ``j`` (x2 >= x1);
* ``Label(rendered, quote)``: one of the allowed labels, each already escaped as the format
  writes it (``'"red circle"'``), ``quote`` characters at each end being syntax;
* ``Token(texts, ge)``: one of these added tokens (``<|loc_0123|>``), as ONE token;
* ``Text(quotes, max_bytes, excluded)``: free text in quotes (a dense caption's phrase;
  ``_free_text.py`` says which bytes, and how it stays cheap over a 150k vocabulary).

Slots (all but Lit) are numbered in item order; their values (scaled integers, label index, token
index, 0 for a Text) make up the object; with ``forbid_duplicates`` no object may repeat one.

``TextGrammar(answer, vocab, end_ids)`` compiles that against a tokenizer's vocabulary
(``TokenVocab``: the BYTES each ordinary token spells, byte-level BPE and sentencepiece alike, and
added tokens as single symbols) into the interface ``raytrain.predict.GrammarLogitsProcessor`` drives:
``allowed(generated_ids, remaining) -> Allowed(tokens, None)`` and ``loc_ids`` (empty).

How. The grammar runs as a byte-level automaton whose state is a set of configurations (phase,
part, partial slot text, slot values so far, earlier objects): a set, because a prefix may be read
two ways (``"```json\\n["`` starts both the empty and a non-empty answer; ``"12"`` may be a whole
number or the start of ``"123"``). The tokens allowed in a state are found by walking the sorted
vocabulary like a trie, one byte at a time, only along bytes the automaton accepts (bisect on the
sorted byte strings, no per-node memory), and are cached per state; added tokens are whole
symbols, and the 1024 of a Token slot (or a phrase's tokens) one group whose states are made only
for the token that is chosen (and one stand-in for the budget check). A configuration is kept only
if the object can still be finished without repeating an earlier one: no dead ends. Token budget: the upper bound ``U(state)`` on the tokens needed to finish is the fewest
tokens that spell one fixed completion (the first in a fixed order over slot values), <end>
included; with ``remaining`` tokens left only tokens after which ``U <= remaining - 1`` are allowed.
Because the completion after a token that starts it is the rest of the same completion, a state
that fits always has a token that fits; if the budget cannot hold the answer at all it is ignored.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Sequence
from dataclasses import replace
from typing import NamedTuple

import numpy as np

from raytrain.formats import _free_text as ft
from raytrain.formats import _text_parts as tp
from raytrain.formats._text_parts import AnswerGrammar, Label, Lit, Num, Part, Text, Token
from raytrain.formats._token_vocab import SYM, TokenVocab, token_vocab
from raytrain.formats.grammar import Allowed

__all__ = ["AnswerGrammar", "Label", "Lit", "Num", "Part", "Text", "TextGrammar", "Token", "TokenVocab", "compile_grammar",
           "token_vocab"]

# ---------------------------------------------------------------------------- engine


def _with_prefix(sorted_opts: list[bytes], s: bytes):
    """The strings of ``sorted_opts`` that start with ``s``."""
    at = bisect_left(sorted_opts, s)
    while at < len(sorted_opts) and sorted_opts[at].startswith(s):
        yield sorted_opts[at]
        at += 1


_H, _E, _I, _S, _T, _F = range(6)  # phases: head, empty answer, item, separator, tail, final
_DEAD: frozenset = frozenset()
_DONE: frozenset = frozenset({(-1,)})
_CACHE_STATES = 20_000  # per-state caches are dropped past this many states (~30-150 MB)


class _Succ(NamedTuple):
    states: dict  # token id -> state after it
    group: tuple | None  # (part, lowest index, excluded indices) of a Token slot's symbols, made lazily
    made: dict  # token id -> state, for the group's symbols (or free-text tokens) asked for so far
    free: ft.FreeGroup | None = None  # inside a phrase: its tokens of phrase bytes only, made lazily


class TextGrammar:
    """``AnswerGrammar`` compiled against a vocabulary; ``end_ids``: the tokens that end the answer
    (only where the grammar is complete)."""

    def __init__(self, answer: AnswerGrammar, vocab: TokenVocab, end_ids: Sequence[int]):
        self.answer = answer
        self.vocab = vocab
        self.end_ids = tuple(dict.fromkeys(int(e) for e in end_ids))
        if not self.end_ids:
            raise ValueError("need at least one end token id")
        self.eos_id = self.end_ids[0]
        self.loc_ids = np.zeros((0,), dtype=np.int64)  # no PaliGemma loc mask: every token is in `tokens`
        self.max_objects = answer.max_objects
        self._lits = {_H: answer.head.encode(), _S: answer.sep.encode(), _T: answer.tail.encode(),
                      _E: (answer.empty or "").encode()}
        self._item: list[tuple] = []  # (kind, part, slot, data)
        slot = 0
        for p in answer.item:
            if isinstance(p, Lit):
                self._item.append(("L", p, None, None if p.indexed else p.text.encode()))
                continue
            if isinstance(p, Label):
                data = tuple(r.encode() for r in p.rendered)
                order = sorted(range(len(data)), key=lambda i: (len(data[i]), i))  # shortest first: cheap completions
                self._item.append(("B", p, slot, (data, order, {o: i for i, o in enumerate(data)}, sorted(data))))
            elif isinstance(p, Token):
                syms = []
                for t in p.texts:
                    tid = vocab.added_id.get(t)
                    if tid is None:
                        raise ValueError(f"the tokenizer has no added token {t!r}")
                    syms.append(SYM + tid)
                self._item.append(("K", p, slot, (tuple(syms), {s: i for i, s in enumerate(syms)}, tuple(x - SYM for x in syms))))
            elif isinstance(p, Text):
                self._item.append(("X", p, slot, ft.TextBytes(p)))
            else:
                self._item.append(("N", p, slot, None))
            slot += 1
        self._n_slots = slot
        self._slot_pos = [i for i, (_, _, sl, _) in enumerate(self._item) if sl is not None]  # slot -> part
        self._dedupe = answer.forbid_duplicates
        self._start = frozenset(self._enter(_H, 0, (), ()) + (self._enter(_E, 0, (), ()) if answer.empty is not None else []))
        # any state's completion is at most this many bytes: past it the budget needs no checking
        obj = sum((len(p.text) + 4 if d is None else len(d)) if k == "L" else 1 if k == "K" else max(map(len, d[0])) if k == "B"
                  else 4 if k == "X" else len(str(p.hi // p.scale)) + (p.decimals + 1 if p.decimals else 0) for k, p, _, d in self._item)
        self._u_max = max(len(self._lits[_H]), len(self._lits[_S])) + obj + len(self._lits[_T])
        self._u_max = max(self._u_max, len(self._lits[_E])) + 2
        self._lenient: TextGrammar | None = None
        self._clear()

    def _lit(self, data, part, k: int) -> bytes:
        """A literal part's bytes in the k-th object (indexed literals depend on k)."""
        return part.for_object(k).encode() if data is None else data

    def _clear(self) -> None:
        self._trans: dict = {}
        self._succ: dict = {}
        self._u: dict = {}
        self._runs: dict = {}  # bytes -> fewest tokens spelling them
        self._root: list = [self._start, {}]
        self._n_prefixes = 0

    # ------------------------------------------------------------------ configurations

    def _enter(self, phase, pos, values, objects) -> list:
        """Configurations at the start of (phase, pos), following empty parts and object ends."""
        if phase == _I:
            if pos == len(self._item):
                return self._object_done(values, objects)
            kind, part, _, data = self._item[pos]
            if kind == "L" and not self._lit(data, part, len(objects)):
                return self._enter(_I, pos + 1, values, objects)
            return [(_I, pos, 0 if kind == "L" else b"" if kind in "NB" else (-1, 0, False, False) if kind == "X" else None, values, objects)]
        if pos < len(self._lits[phase]):
            return [(phase, pos, None, (), objects)]
        if phase in (_H, _S):
            return self._enter(_I, 0, (), objects)
        return [(_F, 0, None, (), objects)]

    def _object_done(self, values, objects) -> list:
        if self._dedupe and values in objects:
            return []
        objects = objects + (values,)
        more = self.max_objects is None or len(objects) < self.max_objects
        return (self._enter(_S, 0, (), objects) if more else []) + self._enter(_T, 0, (), objects)

    def _bound(self, part, values):
        ge = getattr(part, "ge", None)
        return None if ge is None else values[ge]

    def _feed(self, cfg, x: int) -> list:
        """[(configuration, tag)] after input ``x`` (a byte, or SYM + id of an added token). Tag:
        None outside items, else (object index, slot or None for syntax, index in the slot's text)."""
        phase, pos, partial, values, objects = cfg
        if phase == _F:
            return []
        if phase != _I:
            if x == self._lits[phase][pos]:
                return [(c, None) for c in self._enter(phase, pos + 1, values, objects)]
            return []
        kind, part, slot, data = self._item[pos]
        k = len(objects)
        if kind == "L":
            data = self._lit(data, part, k)
            if x != data[partial]:
                return []
            if partial + 1 < len(data):
                return [((_I, pos, partial + 1, values, objects), (k, None, 0))]
            return [(c, (k, None, 0)) for c in self._enter(_I, pos + 1, values, objects)]
        if kind == "K":
            i = data[1].get(x)
            b = self._bound(part, values)
            if i is None or (b is not None and i < b):
                return []
            return [(c, (k, slot, 0)) for c in self._enter(_I, pos + 1, values + (i,), objects)]
        if kind == "X":  # free text: quotes are syntax, the bytes between them its value
            got = data.feed(partial, x) if x < SYM else None
            if got is None:
                return []
            if got[0] == "close":
                return [(c, (k, None, 0)) for c in self._enter(_I, pos + 1, values + (0,), objects)]
            return [((_I, pos, got[0], values, objects), (k, slot if got[1] else None, partial[1]))]
        out = []
        done = None
        if kind == "N":
            b = self._bound(part, values)
            if x < SYM:
                s = partial + bytes((x,))
                if (x in tp.DIGITS or (x == 46 and part.decimals)) and tp.num_viable(part, s, b):
                    out.append(((_I, pos, s, values, objects), (k, slot, len(partial))))
            done = tp.num_complete(part, partial, b)
        else:  # label
            if x < SYM:
                s = partial + bytes((x,))
                if next(_with_prefix(data[3], s), None) is not None:
                    out.append(((_I, pos, s, values, objects), (k, slot, len(partial))))
            done = data[2].get(partial)
        if done is not None:  # the slot may end here: x then belongs to what follows
            for c in self._enter(_I, pos + 1, values + (done,), objects):
                out.extend(self._feed(c, x))
        return out

    def _values(self, j: int, partial: bytes, values: tuple):
        """Slot ``j``'s possible values in a FIXED order (the budget's completion relies on it)."""
        kind, part, _, data = self._item[self._slot_pos[j]]
        b = self._bound(part, values)
        if kind == "N":
            return tp.num_values(part, partial, b)
        if kind == "B":
            return (i for i in data[1] if data[0][i].startswith(partial))
        if kind == "X":
            return iter((0,))  # a phrase is not compared: its one value
        return iter(range(0 if b is None else b, len(data[0])))

    def _choose(self, pos, partial, values, objects) -> tuple | None:
        """Values of the whole current object: those set, then for the rest the first in ``_values``
        order that does not repeat an earlier object; None if every completion repeats one."""
        first_partial = partial if self._item[pos][2] is not None else b""
        live = [o for o in objects if o[: len(values)] == values] if self._dedupe else []

        def rec(j, vals, live):
            if j == self._n_slots:
                return None if vals in live else vals
            for v in self._values(j, first_partial if j == len(values) else b"", vals):
                nv = vals + (v,)
                r = rec(j + 1, nv, [o for o in live if o[j] == v])
                if r is not None:
                    return r
            return None

        return rec(len(values), values, live)

    def _alive(self, cfg) -> bool:
        """Can ``cfg`` still end the object it is in or about to start without repeating one?"""
        phase, pos, partial, values, objects = cfg
        if not self._dedupe or not objects:
            return True
        if phase == _S:  # a separator promises another object
            return self._choose(0, 0 if self._item[0][0] == "L" else b"", (), objects) is not None
        if phase != _I or not any(o[: len(values)] == values for o in objects):
            return True
        return self._choose(pos, partial, values, objects) is not None

    def _step(self, s: frozenset, x: int) -> frozenset:
        key = (s, x)
        got = self._trans.get(key)
        if got is None:
            got = frozenset(c for cfg in s for c, _ in self._feed(cfg, x) if self._alive(c))
            self._trans[key] = got
        return got

    def _next_inputs(self, cfg) -> set:
        """Inputs that may follow ``cfg`` (a superset: ``_step`` decides)."""
        phase, pos, partial, values, objects = cfg
        if phase == _F:
            return set()
        if phase != _I:
            return {self._lits[phase][pos]}
        kind, part, _, data = self._item[pos]
        if kind == "L":
            return {self._lit(data, part, len(objects))[partial]}
        if kind == "K":
            b = self._bound(part, values) or 0
            return set(data[0][b:])
        if kind == "X":
            return data.next_inputs(partial)
        if kind == "N":
            out = set(tp.DIGITS) | ({46} if part.decimals else set())
            done = tp.num_complete(part, partial, self._bound(part, values))
        else:
            out = {o[len(partial)] for o in _with_prefix(data[3], partial) if len(o) > len(partial)}
            done = data[2].get(partial)
        if done is not None:
            for c in self._enter(_I, pos + 1, values + (done,), objects):
                out |= self._next_inputs(c)
        return out

    # ------------------------------------------------------------------ tokens

    def _successors(self, s: frozenset) -> _Succ:
        """What may follow ``s`` (cached): {token id: state} plus, where one Token slot takes the
        symbols, the group of symbols whose states are made only when asked for."""
        got = self._succ.get(s)
        if got is not None:
            return got
        if len(self._succ) > _CACHE_STATES or len(self._trans) > 10 * _CACHE_STATES or self._n_prefixes > 10 * _CACHE_STATES:
            self._clear()
        states: dict = {}
        if self._in_phrase(s):
            (c,) = s
            closed = frozenset(x for x in self._enter(_I, c[1] + 1, c[3] + (0,), c[4]) if self._alive(x))
            got = self._succ[s] = _Succ(*ft.phrase_successors(c, self._item[c[1]][3], self.vocab, closed, self._walk, self._step))
            return got
        if any(c[0] == _F for c in s):
            for e in self.end_ids:
                states[e] = _DONE
        inputs = set().union(*(self._next_inputs(c) for c in s))
        self._walk(s, self.vocab.keys, lambda i, ns: states.update(dict.fromkeys(self.vocab.key_ids[i], ns)), inputs)
        syms = {x for x in inputs if x >= SYM}
        token_cfgs = [c for c in s if c[0] == _I and self._item[c[1]][0] == "K"]
        group = None
        if syms and len(token_cfgs) == 1 and not any(self._next_inputs(c) & syms for c in s if c not in token_cfgs):
            # One Token slot takes every symbol (1024 loc tokens): a symbol that does not start a
            # repeat of an earlier object leaves a live state whose completion differs only in that
            # symbol. Those states are made when asked for, and one stands for all in the budget check.
            _, pos, _, values, objects = token_cfgs[0]
            part, (opts, _, tids) = self._item[pos][1], self._item[pos][3]
            taken = frozenset(o[len(values)] for o in objects if o[: len(values)] == values) if self._dedupe else frozenset()
            b = self._bound(part, values) or 0
            for i in taken:
                if i >= b and (ns := self._step(s, opts[i])):
                    states[tids[i]] = ns
            group = (pos, b, taken)
        else:
            for x in syms:
                if ns := self._step(s, x):
                    states[x - SYM] = ns
        got = self._succ[s] = _Succ(states, group, {})
        return got

    def _walk(self, s: frozenset, keys: list[bytes], found, inputs=None) -> None:
        """Depth-first walk of the sorted byte strings ``keys`` as a trie from state ``s``, along the
        bytes the grammar accepts: ``found(i, state)`` for each key read whole (keys[i] non-empty)."""
        if inputs is None:
            inputs = set().union(*(self._next_inputs(c) for c in s))
        stack = [(s, b"", 0, len(keys), sorted(x for x in inputs if x < SYM))]
        while stack:
            st, prefix, lo, hi, nxt = stack.pop()
            for b in nxt:
                p2 = prefix + bytes((b,))
                i = bisect_left(keys, p2, lo, hi)
                if i >= hi or not keys[i].startswith(p2):
                    continue
                j = bisect_left(keys, prefix + bytes((b + 1,)), i, hi) if b < 255 else hi
                ns = self._step(st, b)
                if not ns:
                    continue
                if len(keys[i]) == len(p2):
                    found(i, ns)
                    i += 1
                if i < j and self._in_phrase(ns):  # nearly every byte may follow: read the keys' rest at once
                    (c,) = ns
                    self._item[c[1]][3].read_on(c, keys, i, j, len(p2), found, self._step)
                elif i < j:
                    more = sorted(x for x in set().union(*(self._next_inputs(c) for c in ns)) if x < SYM)
                    stack.append((ns, p2, i, j, more))

    def _in_phrase(self, s: frozenset) -> bool:
        """Is ``s`` one configuration inside a phrase (opened, not in an escape)?"""
        if len(s) != 1:
            return False
        (c,) = s
        return c[0] == _I and self._item[c[1]][0] == "X" and c[2][0] >= 0 and not c[2][2]

    def _group_ids(self, group) -> tuple[int, ...]:
        pos, b, taken = group
        tids = self._item[pos][3][2]
        return tids[b:] if not taken else tuple(t for i, t in enumerate(tids) if i >= b and i not in taken)

    def _next_state(self, s: frozenset, succ: _Succ, t: int) -> frozenset:
        ns = succ.states.get(t)
        if ns is not None:
            return ns
        if succ.free is not None:
            ns = succ.made.get(t)
            if ns is None:
                cfg = succ.free.next_cfg(t)
                if cfg is None:
                    return _DEAD
                ns = succ.made[t] = frozenset((cfg,))
            return ns
        if succ.group is not None:
            ns = succ.made.get(t)
            if ns is None:
                pos, b, taken = succ.group
                i = self._item[pos][3][1].get(SYM + t)
                if i is None or i < b or i in taken:
                    return _DEAD
                ns = succ.made[t] = self._step(s, SYM + t)
            return ns
        return _DEAD

    def _step_token(self, s: frozenset, t: int) -> frozenset:
        if s is _DONE or not s:
            return s
        succ = self._succ.get(s)
        if succ is not None:
            return self._next_state(s, succ, t)
        if t in self.end_ids:
            return _DONE if any(c[0] == _F for c in s) else _DEAD
        x = self.vocab.input_of(t)
        if x is None:
            return _DEAD
        for b in ((x,) if isinstance(x, int) else x):
            s = self._step(s, b)
            if not s:
                return _DEAD
        return s

    def state(self, prefix: Sequence[int]) -> frozenset:
        """State after the generated ids ``prefix`` (prompt excluded): a set of configurations,
        ``_DONE`` after an end token, empty when the prefix left the grammar."""
        node = self._root  # a trie of the prefixes seen: each step of a generation adds one node
        for t in prefix:
            if node[0] is _DONE or not node[0]:
                break
            child = node[1].get(t)
            if child is None:
                child = node[1][t] = [self._step_token(node[0], int(t)), {}]
                self._n_prefixes += 1
            node = child
        return node[0]

    def accepts(self, ids: Sequence[int]) -> bool:
        """True if ``ids`` (end token included) is a complete answer of the grammar."""
        return self.state(ids) is _DONE

    def alive(self, prefix: Sequence[int]) -> bool:
        """True while ``prefix`` can still become an answer (not done, not off the grammar)."""
        s = self.state(prefix)
        return s is not _DONE and bool(s)

    def read_length(self, ids: Sequence[int]) -> int:
        """How many of ``ids`` the grammar reads before they leave it."""
        for n in range(len(ids), -1, -1):
            s = self.state(ids[:n])
            if s is _DONE or s:
                return n
        return 0

    # ------------------------------------------------------------------ budget

    def _completion(self, cfg) -> list[int] | None:
        """Inputs of the fixed completion of ``cfg`` (end token excluded), or None."""
        phase, pos, partial, values, objects = cfg
        tail = list(self._lits[_T])
        if phase == _F:
            return []
        if phase in (_T, _E):
            return list(self._lits[phase][pos:])
        if phase in (_H, _S):
            rest = self._object_inputs(0, 0 if self._item[0][0] == "L" else b"", (), objects)
            return None if rest is None else list(self._lits[phase][pos:]) + rest + tail
        rest = self._object_inputs(pos, partial, values, objects)
        return None if rest is None else rest + tail

    def _object_inputs(self, pos, partial, values, objects) -> list[int] | None:
        vals = self._choose(pos, partial, values, objects)
        if vals is None:
            return None
        out: list[int] = []
        for p in range(pos, len(self._item)):
            kind, part, slot, data = self._item[p]
            if kind == "L":
                out.extend(self._lit(data, part, len(objects))[partial if p == pos else 0:])
            elif kind == "K":
                out.append(data[0][vals[slot]])
            elif kind == "X":
                out.extend(data.completion(partial if p == pos else None))
            else:
                text = data[0][vals[slot]] if kind == "B" else part.render(vals[slot]).encode()
                out.extend(text[len(partial) if p == pos else 0:])
        return out

    def _min_tokens(self, inputs: list[int]) -> float:
        """Fewest vocabulary tokens that spell ``inputs`` exactly (no token spans a symbol)."""
        total, run = 0.0, bytearray()
        for x in inputs + [SYM]:
            if x < SYM:
                run.append(x)
                continue
            if run:
                key = bytes(run)
                n = self._runs.get(key)
                if n is None:
                    n = self._runs[key] = self.vocab.min_tokens(key)
                total += n
                run.clear()
            total += 1
        return total - 1

    def tokens_to_finish(self, s: frozenset) -> float:
        """U(s): tokens (end token included) of the fixed completion; 0 when done, inf when dead."""
        if s is _DONE:
            return 0
        got = self._u.get(s)
        if got is None:
            got = math.inf
            for cfg in s:
                inputs = self._completion(cfg)
                if inputs is not None:
                    got = min(got, self._min_tokens(inputs) + 1)
            self._u[s] = got
        return got

    # ------------------------------------------------------------------ the processor's interface

    def allowed(self, generated_ids: Sequence[int], remaining: int | None = None) -> Allowed:
        """Tokens allowed after ``generated_ids``; ``remaining``: tokens left in the budget, counting
        the one about to be chosen (None: no budget). Done or off the grammar: the end tokens."""
        s = self.state(generated_ids)
        if s is _DONE or not s:
            return Allowed(self.end_ids, None)
        succ = self._successors(s)
        full = tuple(succ.states)
        # lazy groups: a Token slot's symbols; a phrase's tokens with / without a visible byte (arrays)
        groups = [g for g in ([self._group_ids(succ.group)] if succ.group else []) + list((succ.free or ())[:2]) if len(g)]

        def join(ts, gs):
            return np.concatenate([np.array(ts, dtype=np.int64), *gs]) if succ.free else ts + sum(gs, ())

        if remaining is None or remaining - 1 >= self._u_max or self.tokens_to_finish(s) > remaining:
            return Allowed(join(full, groups), None)
        fit = tuple(t for t in full if self.tokens_to_finish(succ.states[t]) <= remaining - 1)
        # a group's tokens all leave the same completion: one stands for all
        fit_groups = [g for g in groups if self.tokens_to_finish(self._next_state(s, succ, int(g[0]))) <= remaining - 1]
        return Allowed(join(fit, fit_groups) if fit or fit_groups else join(full, groups), None)

    # ------------------------------------------------------------------ reading an answer back

    def lenient(self) -> TextGrammar:
        """The same grammar without the object limit and the duplicate ban (reading outputs)."""
        if self._lenient is None:
            a = self.answer
            self._lenient = self if (a.max_objects is None and not a.forbid_duplicates) else \
                TextGrammar(replace(a, max_objects=None, forbid_duplicates=False), self.vocab, self.end_ids)
        return self._lenient

    def trace(self, inputs: Sequence[int]) -> tuple[list, list]:
        """One reading of ``inputs`` through the grammar: (tag per input read, values of the objects
        completed); stops where the inputs leave the grammar."""
        layer = {c: None for c in self._start}
        back = []
        for x in inputs:
            nxt: dict = {}
            for c in layer:
                for c2, tag in self._feed(c, x):
                    if c2 not in nxt and self._alive(c2):
                        nxt[c2] = (c, tag)
            if not nxt:
                break
            back.append(nxt)
            layer = nxt
        cur = max(layer, key=lambda c: (len(c[4]), c[0] == _F))
        objects = list(cur[4])
        tags = []
        for nxt in reversed(back):
            cur, tag = nxt[cur]
            tags.append(tag)
        return tags[::-1], objects

    def is_value(self, tag, objects) -> bool:
        """Does the input with ``tag`` spell a value character (a number, a token, a label's text)?"""
        if tag is None or tag[1] is None or tag[0] >= len(objects):
            return False
        kind, part, _, data = self._item[self._slot_pos[tag[1]]]
        if kind != "B":
            return True
        n = len(data[0][objects[tag[0]][tag[1]]])
        return part.quote <= tag[2] < n - part.quote


def compile_grammar(answer: AnswerGrammar, tokenizer, end_tokens: Sequence[str] | None = None) -> TextGrammar:
    """``TextGrammar`` for a Hugging Face tokenizer (or processor); ``end_tokens``: the tokens that
    end an answer (default: the tokenizer's eos token). Cheap: the vocabulary is read once per
    tokenizer; one grammar serves every row (and beam) of a batch that shares its labels."""
    tok = getattr(tokenizer, "tokenizer", tokenizer)
    ends = [tok.eos_token_id] if end_tokens is None else tok.convert_tokens_to_ids(list(end_tokens))
    if any(e is None for e in ends):
        raise ValueError(f"unknown end tokens {end_tokens}")
    return TextGrammar(answer, token_vocab(tok), ends)
