"""The parts an answer grammar is written in (``text_grammar.py`` explains them), and how a number
slot's partial text constrains its value. Pure: no tokenizer, no torch."""

from __future__ import annotations

from dataclasses import dataclass

# ---------------------------------------------------------------------------- description


@dataclass(frozen=True)
class Lit:
    text: str
    indexed: bool = False  # "{i}" in text is the 1-based index of the object (Molmo's x1, y1, x2, ...)

    def for_object(self, k: int) -> str:
        """The literal in the k-th (0-based) object."""
        return self.text.format(i=k + 1) if self.indexed else self.text


@dataclass(frozen=True)
class Num:
    lo: int
    hi: int
    decimals: int = 0
    trim: bool = True
    ge: int | None = None

    @property
    def scale(self) -> int:
        return 10**self.decimals

    def render(self, v: int) -> str:
        if not self.decimals:
            return str(v)
        ip, fr = divmod(v, self.scale)
        fs = str(fr).zfill(self.decimals)
        return f"{ip}.{(fs.rstrip('0') or '0') if self.trim else fs}"


@dataclass(frozen=True)
class Label:
    rendered: tuple[str, ...]
    quote: int = 0


@dataclass(frozen=True)
class Token:
    texts: tuple[str, ...]
    ge: int | None = None


@dataclass(frozen=True)
class Text:
    """Free text in quotes (a dense caption's phrase): opened and closed by one of ``quotes``,
    1..``max_bytes`` bytes between them; formats/_free_text.py says which bytes it may hold."""

    quotes: tuple[str, ...] = ('"',)
    max_bytes: int = 200
    excluded: str = ""  # further ASCII characters it may not hold (what would break the parser)


Part = Lit | Num | Label | Token | Text


@dataclass(frozen=True)
class AnswerGrammar:
    item: tuple[Part, ...]
    head: str = ""
    sep: str = ""
    tail: str = ""
    empty: str | None = None  # the "nothing found" answer; None: at least one object
    max_objects: int | None = None
    forbid_duplicates: bool = True

    def __post_init__(self):
        slots = [p for p in self.item if not isinstance(p, Lit)]
        if not slots:
            raise ValueError("an item needs at least one Num / Label / Token slot")
        if self.max_objects is not None and self.max_objects < 1:
            raise ValueError(f"max_objects must be >= 1 or None, got {self.max_objects}")
        for j, p in enumerate(slots):
            if isinstance(p, Label) and (not p.rendered or len(set(p.rendered)) != len(p.rendered)):
                raise ValueError("a Label needs distinct, non-empty rendered labels")
            if isinstance(p, Num) and not 0 <= p.lo <= p.hi:
                raise ValueError(f"bad number range [{p.lo}, {p.hi}]")
            if isinstance(p, Token) and not p.texts:
                raise ValueError("a Token slot needs at least one token")
            if isinstance(p, Text) and (not p.quotes or any(len(q) != 1 or not q.isascii() for q in p.quotes + tuple(p.excluded))
                                        or p.max_bytes < 2 or len(set(p.quotes)) != len(p.quotes)):
                raise ValueError("a Text slot needs distinct one-character ASCII quotes and max_bytes >= 2")
            ge = getattr(p, "ge", None)
            if ge is not None:
                ref = slots[ge] if 0 <= ge < j else None
                # x2 >= x1 needs the same value scale, and x2's range must reach every x1
                if type(ref) is not type(p) or (isinstance(p, Num) and (ref.decimals, ref.lo, ref.hi) != (p.decimals, p.lo, p.hi)) \
                        or (isinstance(p, Token) and ref.texts != p.texts):
                    raise ValueError(f"slot {j}: ge={ge} must name an earlier slot of the same kind and range")


# ---------------------------------------------------------------------------- numbers

DIGITS = frozenset(b"0123456789")


def num_reach(p: Num, s: bytes) -> list[tuple[int, int]] | None:
    """Values (scaled ints, ascending disjoint intervals) whose rendering starts with ``s``; None if
    ``s`` starts no rendering at all."""
    if not s:
        return [(0, p.hi)]
    ip_s, dot, fr_s = s.partition(b".")
    if not ip_s or any(c not in DIGITS for c in ip_s) or (len(ip_s) > 1 and ip_s[0] == 48):
        return None
    D, d = p.scale, p.decimals
    if not dot:
        ip = int(ip_s)
        if ip == 0:
            return [(0, D - 1)]
        out, k = [], 0
        while ip * 10**k * D <= p.hi:  # the integer part may still grow by k digits
            out.append((ip * 10**k * D, (ip + 1) * 10**k * D - 1))
            k += 1
        return out
    if not d or len(fr_s) > d or any(c not in DIGITS for c in fr_s):
        return None
    span = 10 ** (d - len(fr_s))
    base = int(ip_s) * D + (int(fr_s) if fr_s else 0) * span
    # trimmed renderings never end in 0 (but "X.0"): "0.10" only starts 0.101 .. 0.109
    lo = base + 1 if p.trim and len(fr_s) >= 2 and fr_s[-1] == 48 else base
    return [(lo, base + span - 1)] if lo <= base + span - 1 else None


def num_values(p: Num, s: bytes, bound: int | None):
    """Values in ascending order that ``s`` can still become, within [max(lo, bound), hi]."""
    lo = p.lo if bound is None else max(p.lo, bound)
    for a, b in num_reach(p, s) or ():
        yield from range(max(a, lo), min(b, p.hi) + 1)


def num_viable(p: Num, s: bytes, bound: int | None) -> bool:
    return next(num_values(p, s, bound), None) is not None


def num_complete(p: Num, s: bytes, bound: int | None) -> int | None:
    """The value ``s`` renders, if it is a whole rendering in range."""
    if not s or (p.decimals and b"." not in s):
        return None
    reach = num_reach(p, s)
    if not reach:
        return None
    v = reach[0][0]
    lo = p.lo if bound is None else max(p.lo, bound)
    return v if lo <= v <= p.hi and p.render(v).encode() == s else None
