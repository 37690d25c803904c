"""Fold long runs of characters that tokenize the same whatever their length, so any text tokenizes in bounded memory.

A text's first ``max_seq_length`` tokens usually come from a short prefix of complete words (see
``InstructionTokenizer.bounded``). A few kinds of run break that: they hold millions of characters but give at most
one token, so the tokens after them come from far into the text, and the tokenizer would have to hold all of it
(a 50 MB row without spaces took 12.5 GB on a T5 tokenizer). For the two tokenizer families INSTRUCTOR checkpoints
use, these runs are, per character after the checkpoint's own normalizer:

- whitespace (``SPACE``): any run is one word break (T5 collapses it to one space, BERT splits at it);
- characters the normalizer removes (``DROP``: control and format characters, BERT's stripped accents);
- SentencePiece/Unigram: characters with no piece of their own (``UNK``): a run of them is one fused ``<unk>``,
  with a token boundary forced on both sides;
- WordPiece: word characters (``WORD``): a word longer than ``max_input_chars_per_word`` (100) is one ``[UNK]``.

``RunFolder.fold`` keeps the first and last few characters of every such run that is long (``DROP`` characters count
with any kind: they vanish), which tokenizes to the same ids, and stops once it has written ``budget`` characters.
Folds of ``UNK`` and ``WORD`` runs, where the ends of the kept pieces could compose across the cut, are checked on a
short probe with their context before they are used. Other tokenizer models (BPE, WordLevel) are left alone
(``enabled`` is False): for them whitespace or unknown characters carry tokens.

One more run matters only for the first tokens (``fold(..., first_tokens=n)``): one known character repeated
(``"." * 50_000_000``). SentencePiece segments it into pieces of that character whose arrangement is a tie broken by
the run's length: the first tokens depend on the length modulo the period ``P`` of the best pieces (16 for dots).
Such a run is cut to a length with the same remainder modulo ``P`` that still holds ``n`` tokens, and the cut is
checked against a run ``P`` x 4 longer.
"""

from __future__ import annotations

import json
import math

import numpy as np
from tokenizers import Tokenizer

OTHER, DROP, SPACE, UNK, WORD = 0, 1, 2, 3, 4
KEEP = 8  # characters kept at each end of a folded run (more than one grapheme lookup: 6 bytes)
BLOCK = 1 << 16  # characters classified at a time
PROBE = 32  # characters of context on each side of a fold that is checked
CHECK_LENGTH = 512  # a run up to this long is checked against itself; a longer one against a fold this long
REPEAT = 4096  # a repeated character is cut from runs of this length on (first_tokens only)


class RunFolder:
    """Folds the long runs of one tokenizer (``Tokenizer`` without truncation); see the module doc."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tok = tokenizer
        model = type(tokenizer.model).__name__
        self._wordpiece = model == "WordPiece"
        self.enabled = model in ("Unigram", "WordPiece")
        self._max_word = int(getattr(tokenizer.model, "max_input_chars_per_word", 100)) if self._wordpiece else 0
        self._absorbing = (DROP, SPACE, WORD) if self._wordpiece else (DROP, SPACE, UNK)
        self._classes: dict[int, tuple[int, int]] = {}  # code point -> (class, normalized length)
        self._table = np.full(0x110000, -1, dtype=np.int8)  # code point -> class, -1 until first seen
        self._periods: dict[str, tuple[int, int] | None] = {}  # character -> (period, longest piece) of its runs
        self._scores: dict[str, float] | None = None

    # -- characters --------------------------------------------------------------------------------------------------

    def char_class(self, ch: str) -> tuple[int, int]:
        """(class, length after normalization) of one character, from the tokenizer's own normalizer and vocabulary."""
        cp = ord(ch)
        known = self._classes.get(cp)
        if known is None:
            known = self._classes[cp] = self._classify(ch)
        return known

    def _classify(self, ch: str) -> tuple[int, int]:
        normalizer = self._tok.normalizer
        norm = normalizer.normalize_str(ch) if normalizer is not None else ch
        if not norm:
            return DROP, 0
        if not norm.strip():
            return SPACE, len(norm)
        if any(c.isspace() for c in norm):  # e.g. BERT pads CJK characters with spaces: a word of their own
            return OTHER, len(norm)
        if self._wordpiece:
            pre = self._tok.pre_tokenizer
            alone = pre is None or len(pre.pre_tokenize_str("a" + norm + "a")) == 1  # punctuation is split off
            return (WORD if alone else OTHER), len(norm)
        unknown = all(self._tok.token_to_id(c) is None for c in norm)
        return (UNK if unknown else OTHER), len(norm)

    def _block_classes(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """The code points of ``text`` and the class of each (int8), each distinct character classified once."""
        points = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
        classes = self._table[points]
        unseen = classes < 0
        if unseen.any():
            for cp in np.unique(points[unseen]).tolist():
                self._table[cp] = self.char_class(chr(cp))[0]
            classes = self._table[points]
        return points, classes

    # -- one character repeated (SentencePiece, first tokens only) --------------------------------------------------

    def _period(self, ch: str) -> tuple[int, int] | None:
        """(period, longest piece) of the segmentation of a long run of ``ch``: the lengths of its best-scoring pieces
        per character set the period; None when no piece is made of ``ch`` alone."""
        if ch not in self._periods:
            if self._scores is None:
                vocab = json.loads(self._tok.to_str())["model"].get("vocab", [])
                self._scores = {piece: float(score) for piece, score in vocab}
            pieces = [(len(p), sc) for p, sc in self._scores.items() if p and p == ch * len(p)]
            if not pieces:
                self._periods[ch] = None
            else:
                best = max(sc / n for n, sc in pieces)
                period = math.lcm(*(n for n, sc in pieces if sc / n >= best - 1e-9))
                self._periods[ch] = (period, max(n for n, _ in pieces)) if period <= 256 else None
        return self._periods[ch]

    def _repeat_end(self, text: str, start: int, stop: int, ch: str) -> int:
        """The end (at most ``stop``) of the run of ``ch`` that goes on at ``start``."""
        pos, cp = start, ord(ch)
        while pos < stop:
            points = np.frombuffer(text[pos : min(stop, pos + BLOCK)].encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
            other = np.flatnonzero(points != cp)
            if len(other):
                return pos + int(other[0])
            pos += len(points)
        return stop

    def _cut_repeat(self, text: str, start: int, end: int, first_tokens: int) -> str | None:
        """A run of one character cut to the same length modulo its period, long enough for ``first_tokens`` pieces,
        if a run ``period`` x 4 longer gives the same first tokens; else None."""
        ch, length = text[start], end - start
        known = self._period(ch)
        if known is None:
            return None
        period, longest = known
        base = (first_tokens + 8) * longest + REPEAT
        if length <= base + 4 * period:
            return None
        cut = base + (length - base) % period
        left, right = text[max(0, start - PROBE) : start], text[end : end + PROBE]
        got, want = self._tok.encode_batch([left + ch * cut + right, left + ch * (cut + 4 * period) + right],
                                           add_special_tokens=False)
        n = first_tokens + 8
        if got.ids[:n] != want.ids[:n] or got.ids[-8:] != want.ids[-8:]:
            return None
        return ch * cut

    # -- runs --------------------------------------------------------------------------------------------------------

    def _run_end(self, text: str, start: int, stop: int, kind: int) -> int:
        """The end (at most ``stop``) of the run of ``kind`` (and ``DROP``) characters that goes on at ``start``."""
        pos = start
        while pos < stop:
            _, block = self._block_classes(text[pos : min(stop, pos + BLOCK)])
            outside = np.flatnonzero((block != kind) & (block != DROP))
            if len(outside):
                return pos + int(outside[0])
            pos += len(block)
        return stop

    def _folded(self, text: str, start: int, end: int, kind: int) -> str | None:
        """The short stand-in for ``text[start:end]``, or None when the run is too short to fold (or its fold fails
        its check)."""
        head = KEEP
        if kind == WORD:  # keep a head that is still over the WordPiece limit after normalization
            length = 0
            for i in range(start, min(end, start + 64 * (self._max_word + KEEP))):
                length += self.char_class(text[i])[1]
                if length > self._max_word + KEEP:
                    head = i + 1 - start
                    break
            else:
                return None  # a word under the limit (or one mostly of removed characters) is kept as it is
        if end - start <= head + 3 * KEEP:
            return None
        kept = text[start : start + head] + text[end - KEEP : end]
        if kind != DROP and all(self.char_class(c)[0] == DROP for c in kept):  # its one real character is inside
            inner = self._run_end(text, start, end, DROP)
            kept = text[start : start + head] + text[inner] + text[end - KEEP : end]
        if kind in (UNK, WORD) and not self._same_tokens(text, start, end, kept):
            return None
        return kept

    def _same_tokens(self, text: str, start: int, end: int, kept: str) -> bool:
        """Whether ``kept`` tokenizes like the run it replaces, within ``PROBE`` characters of context: the run
        itself when short, else a fold of ``CHECK_LENGTH`` characters (a composition across the cut shows in both)."""
        left, right = text[max(0, start - PROBE) : start], text[end : end + PROBE]
        half = CHECK_LENGTH // 2
        reference = text[start:end] if end - start <= CHECK_LENGTH else text[start : start + half] + text[end - half : end]
        got, want = self._tok.encode_batch([left + kept + right, left + reference + right], add_special_tokens=False)
        return got.ids == want.ids

    def fold(self, text: str, budget: int | None = None, first_tokens: int | None = None) -> tuple[str, bool]:
        """``text`` with its long absorbing runs folded: (the folded text, True), or, once ``budget`` characters are
        written, (a folded prefix, False). Either tokenizes to the same ids as the text (or that prefix of it);
        with ``first_tokens``, runs of one repeated character are cut too, and only that many first ids are kept."""
        if not self.enabled:
            return (text, True) if budget is None or len(text) <= budget else (text[:budget], False)
        out: list[str] = []
        repeats = first_tokens if not self._wordpiece else None  # WordPiece: a repeated character is a WORD run
        _, complete = self._fold_range(text, 0, len(text), self._absorbing, out, 0, budget, repeats)
        return "".join(out), complete

    def _fold_range(self, text: str, start: int, stop: int, absorbing: tuple[int, ...], out: list[str], written: int,
                    budget: int | None, first_tokens: int | None = None) -> tuple[int, bool]:
        """Append ``text[start:stop]`` to ``out`` (which holds ``written`` characters) with its long runs of
        ``absorbing`` kinds (and, given ``first_tokens``, of one repeated character) folded; (characters in
        ``out``, False when the budget ran out first)."""
        pos = start
        while pos < stop:
            points, classes = self._block_classes(text[pos : min(stop, pos + BLOCK)])
            block = _Block(classes, absorbing, points if first_tokens else None)
            next_pos, i = pos + block.size, 0
            while i < block.size:
                if budget is not None and written >= budget:
                    return written, False
                j = block.next_absorbing(i)
                repeat = block.next_repeat(i)
                if repeat is not None and repeat[0] <= j:
                    if repeat[0] > i:
                        j = repeat[0]
                    else:  # one character repeated from i on
                        end = pos + repeat[1]
                        if end == pos + block.size and end < stop:
                            end = self._repeat_end(text, end, stop, text[pos + i])
                        piece = self._cut_repeat(text, pos + i, end, first_tokens) if first_tokens else None
                        if piece is None:  # kept as it is, up to the budget
                            end = _capped(end, pos + i, budget, written)
                            piece = text[pos + i : end]
                        out.append(piece)
                        written += len(piece)
                        if end >= pos + block.size:
                            next_pos = end
                            break
                        i = end - pos
                        continue
                if j > i:  # characters that give tokens of their own: copied
                    j = _capped(j, i, budget, written)
                    out.append(text[pos + i : pos + j])
                    written += j - i
                    i = j
                    continue
                kind, end = block.run(i)
                end += pos
                if end == pos + block.size and end < stop:  # the run goes on past this block
                    end = self._run_end(text, end, stop, kind)
                piece = self._folded(text, pos + i, end, kind)
                if piece is None and kind == WORD:  # a word under the limit: only its removed characters fold
                    written, complete = self._fold_range(text, pos + i, end, (DROP,), out, written, budget)
                    if not complete:
                        return written, False
                elif piece is None:  # kept as it is, up to the budget
                    end = _capped(end, pos + i, budget, written)
                    out.append(text[pos + i : end])
                    written += end - pos - i
                else:
                    out.append(piece)
                    written += len(piece)
                if end >= pos + block.size:
                    next_pos = end
                    break
                i = end - pos
            pos = next_pos
        return written, True


def _capped(end: int, start: int, budget: int | None, written: int) -> int:
    """``end``, or sooner where copying ``[start, end)`` would take ``out`` past ``budget`` characters."""
    return end if budget is None else min(end, start + budget - written)


class _Block:
    """One block's classes with the indexes that find the next run and its end in O(log n)."""

    def __init__(self, classes: np.ndarray, absorbing: tuple[int, ...], points: np.ndarray | None = None) -> None:
        self.size = len(classes)
        self._repeats = np.empty((0, 2), dtype=np.int64)
        if points is not None and len(points) >= REPEAT:  # runs of one known character, REPEAT long or more
            edges = np.flatnonzero(points[1:] != points[:-1]) + 1
            bounds = np.stack([np.r_[0, edges], np.r_[edges, len(points)]], axis=1)
            long = bounds[(bounds[:, 1] - bounds[:, 0] >= REPEAT) | (bounds[:, 1] == len(points))]  # or going on
            self._repeats = long[~np.isin(classes[long[:, 0]], absorbing)]
        self._absorbing = absorbing
        self._absorb_at = np.flatnonzero(np.isin(classes, absorbing))
        self._real_at = np.flatnonzero(classes != DROP)  # characters that are not removed
        self._real_class = classes[self._real_at]
        self._changes = np.flatnonzero(self._real_class[1:] != self._real_class[:-1]) + 1

    def next_repeat(self, i: int) -> tuple[int, int] | None:
        """The next run of one character (start, end) that ends after ``i``, if any."""
        k = int(np.searchsorted(self._repeats[:, 1], i, side="right"))
        return (max(i, int(self._repeats[k, 0])), int(self._repeats[k, 1])) if k < len(self._repeats) else None

    def next_absorbing(self, i: int) -> int:
        k = int(np.searchsorted(self._absorb_at, i))
        return int(self._absorb_at[k]) if k < len(self._absorb_at) else self.size

    def run(self, i: int) -> tuple[int, int]:
        """(kind, end) of the run at ``i``: ``DROP`` characters, then characters of one absorbing kind (and ``DROP``)."""
        p = int(np.searchsorted(self._real_at, i))
        if p == len(self._real_at):
            return DROP, self.size
        kind = int(self._real_class[p])
        if kind not in self._absorbing:
            return DROP, int(self._real_at[p])
        q = int(np.searchsorted(self._changes, p + 1))
        return kind, int(self._real_at[self._changes[q]]) if q < len(self._changes) else self.size
