"""What each token of a vocabulary spells, in BYTES, for the text grammars (``text_grammar.py``).

Ordinary tokens are byte strings: byte-level BPE tokens (Qwen, GPT-2) are mapped back through the
byte <-> printable-character table their pieces are written in, so a token may hold half of a
UTF-8 character; sentencepiece pieces (Gemma) have "▁" for a space and ``<0xAB>`` byte-fallback
pieces. Added tokens (``<|loc_0123|>``, ``<|im_end|>``) are never spelled out of bytes: the
tokenizer splits them off before BPE, so they are single SYMBOLS (``SYM + id``) in the grammar's
input; special ones never appear in decoded text.
"""

from __future__ import annotations

import math
import re
import weakref
from bisect import bisect_left
from collections.abc import Collection, Mapping, Sequence

SYM = 256  # grammar inputs: 0..255 bytes, SYM + id an added token


def _byte_decoder() -> dict[str, int]:
    """The byte-level BPE alphabet: printable Latin-1 bytes stand for themselves, the other bytes
    for the characters from U+0100 on, in byte order (GPT-2's table, which Qwen's tokenizer uses)."""
    kept = [*range(33, 127), *range(161, 173), *range(174, 256)]
    chars = {b: chr(b) for b in kept}
    n = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + n)
            n += 1
    return {c: b for b, c in chars.items()}


_BYTE_DECODER = _byte_decoder()
_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class TokenVocab:
    """``pieces``: {id: bytes} of the ordinary tokens; ``added``: {id: text} of added tokens;
    ``special``: ids that decoding with ``skip_special_tokens`` drops (never in an answer)."""

    def __init__(self, pieces: Mapping[int, bytes], added: Mapping[int, str] | None = None, special: Collection[int] = ()):
        added = dict(added or {})
        self.special = frozenset(int(t) for t in special)
        self.added = {int(t): s for t, s in added.items()}
        self.added_id: dict[str, int] = {}
        for t, s in sorted(self.added.items()):
            if t not in self.special:
                self.added_id.setdefault(s, t)
        by_key: dict[bytes, list[int]] = {}
        for t, b in pieces.items():
            t = int(t)
            if t in self.added or t in self.special or not b:
                continue
            by_key.setdefault(bytes(b), []).append(t)
        self.pieces = {t: k for k, ts in by_key.items() for t in ts}
        self.keys: list[bytes] = sorted(by_key)  # sorted: a prefix's tokens are one bisect range
        self.key_ids: list[tuple[int, ...]] = [tuple(sorted(by_key[k])) for k in self.keys]
        self.key_index = {k: i for i, k in enumerate(self.keys)}
        self.max_len = max(map(len, self.keys), default=1)

    def __len__(self) -> int:
        return len(self.pieces) + len(self.added)

    def min_tokens(self, run: bytes) -> float:
        """Fewest ordinary tokens that spell ``run`` exactly (inf if none do)."""
        keys, n = self.keys, len(run)
        best = [0.0] + [math.inf] * n
        for i in range(n):
            if best[i] == math.inf:
                continue
            for j in range(i + 1, min(n, i + self.max_len) + 1):
                piece = run[i:j]
                if piece in self.key_index:
                    best[j] = min(best[j], best[i] + 1)
                at = bisect_left(keys, piece)
                if at >= len(keys) or not keys[at].startswith(piece):
                    break  # no token starts with this piece: none with a longer one either
        return best[n]

    def input_of(self, t: int):
        """The bytes of ordinary token ``t``, ``SYM + t`` for an added token, None for a special or
        unknown one."""
        b = self.pieces.get(t)
        if b is not None:
            return b
        return SYM + t if t in self.added and t not in self.special else None

    def text_bytes(self, t: int) -> bytes:
        """What token ``t`` contributes to decoded text (special tokens: nothing)."""
        b = self.pieces.get(t)
        if b is not None:
            return b
        return b"" if t in self.special else self.added.get(t, "").encode()

    def decode(self, ids: Sequence[int]) -> str:
        """``tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)``
        for byte-level tokenizers (sentencepiece ones may also drop a first leading space)."""
        return b"".join(self.text_bytes(int(t)) for t in ids).decode("utf-8", errors="replace")

    @classmethod
    def from_tokenizer(cls, tokenizer) -> TokenVocab:
        """From a Hugging Face tokenizer (or processor): byte-level BPE or sentencepiece pieces."""
        tok = getattr(tokenizer, "tokenizer", tokenizer)
        added = {int(t): a.content if hasattr(a, "content") else str(a) for t, a in getattr(tok, "added_tokens_decoder", {}).items()}
        special = {int(t) for t in getattr(tok, "all_special_ids", [])}
        special |= {t for t, a in getattr(tok, "added_tokens_decoder", {}).items() if getattr(a, "special", False)}
        for t in special:
            added.setdefault(int(t), tok.convert_ids_to_tokens(int(t)))
        backend = getattr(tok, "backend_tokenizer", None)
        desc = repr(getattr(backend, "decoder", None)) + repr(getattr(backend, "pre_tokenizer", None)) if backend is not None else ""
        if "ByteLevel" in desc:
            def spell(piece: str) -> bytes | None:
                try:
                    return bytes(_BYTE_DECODER[c] for c in piece)
                except KeyError:  # not a byte-level piece
                    return None
        elif "▁" in desc or "Metaspace" in desc or "ByteFallback" in desc or hasattr(tok, "sp_model"):
            def spell(piece: str) -> bytes | None:
                m = _FALLBACK.fullmatch(piece)
                return bytes((int(m.group(1), 16),)) if m else piece.replace("▁", " ").encode()
        else:
            raise NotImplementedError(f"cannot read token bytes of {type(tok).__name__} (decoder {desc or 'unknown'})")
        pieces = {}
        for piece, t in tok.get_vocab().items():
            if t not in added:
                b = spell(piece)
                if b is not None:
                    pieces[t] = b
        return cls(pieces, added, special)


_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def token_vocab(tokenizer) -> TokenVocab:
    """``TokenVocab.from_tokenizer``, cached per tokenizer object (rebuilt when tokens were added)."""
    tok = getattr(tokenizer, "tokenizer", tokenizer)
    got = _CACHE.get(tok)
    if got is None or got[0] != len(tok):
        got = (len(tok), TokenVocab.from_tokenizer(tok))
        _CACHE[tok] = got
    return got[1]
