"""Instruction-aware tokenization: the one code path every stage (trainer, export checks, runtime) uses.

It implements the rules of ``InstructorEmbedding==1.0.1`` (see README "Compatibility"): the text is stripped,
joined to the instruction with no separator, tokenized with the checkpoint's ``tokenizer.json`` (special tokens
appended by its post-processor), truncated at ``max_seq_length``; the instruction's own token count, taken on
``instruction.strip()`` without its final special token, says how many leading tokens the pooling leaves out,
with the rule ``n <= 1 -> 0``. ``strip=False`` gives the training-time variant: upstream trained on ``I + x`` with
no strip and counted the instruction's tokens on ``I`` as written.

A very long text is not tokenized whole (a 50 MB row would take gigabytes): only a prefix that already holds more
than ``max_seq_length`` tokens of complete words, so that its first ``max_seq_length`` tokens are those of the
whole text; past ``max_seq_length`` x 512 characters the text's long runs that give one token or none (whitespace,
removed characters, unknown characters, a WordPiece word over its length limit) are folded first
(``runtime.run_folding``), so no row makes the tokenizer hold more than that many characters (see
``InstructionTokenizer.bounded``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
from tokenizers import Tokenizer

from runtime.run_folding import RunFolder

# Bumped whenever the rules above change; engine manifests record it so a runtime can refuse a mismatch.
INSTRUCTION_RULES_VERSION = "instructor-1.0.1"

InputItem = Any  # str | [instruction, text] | [instruction, text, k]

_SURROGATE = re.compile("[\ud800-\udfff]")
# A text longer than max_seq_length x this many characters is cut to a prefix before tokenizing (real text averages
# 4 to 6 characters a token; the prefix grows when it holds too few tokens).
PREFIX_CHARS_PER_TOKEN = 32
# No text of more than max_seq_length x this many characters is tokenized for a truncated row: a longer one is folded
# (runtime.run_folding) down to a prefix of this many characters. Folded, every 512 characters of text give tokens
# (a SentencePiece piece is at most 16 characters, a WordPiece word 100), so the prefix still holds the first
# max_seq_length tokens; peak memory per row is bounded by it (T5, 512 tokens: 262,144 characters).
MAX_CHARS_PER_TOKEN = 512
KEEP_SLACK = 8  # cuts checked past two pieces' length, for characters the normalizer removes


def has_lone_surrogate(text: str) -> bool:
    """True for a str that is not valid Unicode text (``"\\ud800"`` in JSON gives one); no tokenizer takes it."""
    return not text.isascii() and _SURROGATE.search(text) is not None


def parse_input(item: InputItem, index: int = 0) -> tuple[str | None, str]:
    """Split one ``INSTRUCTOR.encode`` input into (instruction or None, text); a clear error names the row."""
    if isinstance(item, str):
        _check_text(item, index, "the text")
        return None, item
    if isinstance(item, (list, tuple)) and len(item) in (2, 3):
        instruction, text = item[0], item[1]
        if not isinstance(instruction, str):
            raise TypeError(f"input {index}: the instruction (element 0) must be a str, got {type(instruction).__name__}")
        if not isinstance(text, str):
            raise TypeError(f"input {index}: the text (element 1) must be a str, got {type(text).__name__}")
        _check_text(instruction, index, "the instruction (element 0)")
        _check_text(text, index, "the text (element 1)")
        return instruction, text
    if isinstance(item, (list, tuple)):
        raise ValueError(
            f"input {index}: expected [instruction, text] or [instruction, text, k], got a list of {len(item)} elements"
        )
    raise TypeError(f"input {index}: expected a str or an [instruction, text] list, got {type(item).__name__}")


def _check_text(text: str, index: int, what: str) -> None:
    if has_lone_surrogate(text):
        raise ValueError(f"input {index}: {what} is invalid unicode (lone surrogate)")


@dataclass
class Encoded:
    """Unpadded token ids of a list of inputs, with the per-row count of leading tokens left out of pooling."""

    ids: list[list[int]]
    instruction_count: np.ndarray  # int64 [n]
    truncated: np.ndarray  # bool [n]: the joined text was cut at max_seq_length

    @property
    def lengths(self) -> np.ndarray:
        return np.fromiter((len(r) for r in self.ids), dtype=np.int64, count=len(self.ids))

    def take(self, rows: Sequence[int] | np.ndarray | slice) -> "Encoded":
        """The given rows (indices in any order, or a slice), as a new ``Encoded``."""
        if isinstance(rows, slice):
            return Encoded(self.ids[rows], self.instruction_count[rows], self.truncated[rows])
        rows = np.asarray(rows, dtype=np.int64)
        return Encoded([self.ids[i] for i in rows.tolist()], self.instruction_count[rows], self.truncated[rows])


class InstructionTokenizer:
    """Tokenizes ``INSTRUCTOR.encode`` inputs with a checkpoint's ``tokenizer.json`` (Rust ``tokenizers``)."""

    def __init__(
        self,
        tokenizer_file: str | Path,
        max_seq_length: int = 512,
        do_lower_case: bool = False,
        strip: bool = True,
    ) -> None:
        path = Path(tokenizer_file)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: tokenizer file not found (a checkpoint needs a tokenizer.json)")
        try:
            self._tok = Tokenizer.from_file(str(path))
        except Exception as exc:  # the Rust error says what is wrong with the JSON
            raise ValueError(f"{path}: not a valid tokenizers JSON file ({exc})") from exc
        self.path = path
        self.max_seq_length = int(max_seq_length)
        self.do_lower_case = bool(do_lower_case)
        self.strip = bool(strip)
        self._tok.no_padding()
        self._tok.enable_truncation(max_length=self.max_seq_length)
        self.pad_token_id = _pad_token_id(self._tok, path)
        self._special_suffix = self._tok.post_processor is not None
        self._count_cache: dict[str, int] = {}
        self._untruncated: Tokenizer | None = None  # made on the first very long text
        self._folder: RunFolder | None = None
        self._longest_piece: int | None = None

    @classmethod
    def from_checkpoint(cls, folder: str | Path, strip: bool = True) -> "InstructionTokenizer":
        """Build from a sentence-transformers folder: ``tokenizer.json`` + ``sentence_bert_config.json``."""
        folder = Path(folder)
        cfg_path = folder / "sentence_bert_config.json"
        cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
        return cls(
            folder / "tokenizer.json",
            max_seq_length=int(cfg.get("max_seq_length") or 512),
            do_lower_case=bool(cfg.get("do_lower_case", False)),
            strip=strip,
        )

    @property
    def max_token_id(self) -> int:
        """The largest id this tokenizer can produce (the engine's embedding table must have a row for it)."""
        return max(self._tok.get_vocab(with_added_tokens=True).values())

    @property
    def special_tokens(self) -> tuple[list[int], list[int]]:
        """The ids the post-processor puts before and after a text (BERT: [CLS] / [SEP]; T5: none / </s>)."""
        with_special = self._tok.encode("a", add_special_tokens=True).ids
        plain = self._tok.encode("a", add_special_tokens=False).ids
        start = next(i for i in range(len(with_special)) if with_special[i : i + len(plain)] == plain)
        return with_special[:start], with_special[start + len(plain) :]

    def with_strip(self, strip: bool) -> "InstructionTokenizer":
        """The same tokenizer with the inference (strip) or training (no strip) rule."""
        return InstructionTokenizer(self.path, self.max_seq_length, self.do_lower_case, strip)

    def with_max_seq_length(self, max_seq_length: int) -> "InstructionTokenizer":
        """The same tokenizer truncating at ``max_seq_length`` tokens (``model.max_seq_length = n``)."""
        if isinstance(max_seq_length, bool) or not isinstance(max_seq_length, int) or max_seq_length < 2:
            raise ValueError(f"max_seq_length must be an int >= 2 (a token and the final special token), got {max_seq_length!r}")
        return InstructionTokenizer(self.path, max_seq_length, self.do_lower_case, self.strip)

    def _prepare(self, text: str) -> str:
        return text.lower() if self.do_lower_case else text

    def joined_text(self, instruction: str | None, text: str) -> str:
        """The string the encoder sees for one input, before tokenization."""
        if instruction is None:
            return self._prepare(text.strip() if self.strip else text)
        if self.strip:
            return self._prepare((instruction + text.strip()).strip())
        return self._prepare(instruction + text)

    def instruction_counts(self, instructions: Iterable[str | None]) -> np.ndarray:
        """Tokens of each instruction left out of pooling: ``len(tok(I.strip())) - 1``, and 0 where that is <= 1.

        The training variant counts on the instruction as written, as upstream ``train.py`` did (for ``"...: "`` one
        more token, the trailing ``▁``); the golden training loss matches only with that count.
        """
        instructions = list(instructions)
        missing = sorted({i for i in instructions if i is not None and i not in self._count_cache})
        if missing:
            texts = [self.bounded(self._prepare(i.strip() if self.strip else i)) for i in missing]
            encs = self._tok.encode_batch(texts, add_special_tokens=True)
            for instr, enc in zip(missing, encs):
                n = len(enc.ids) - (1 if self._special_suffix else 0)
                self._count_cache[instr] = 0 if n <= 1 else n
        return np.fromiter(
            (0 if i is None else self._count_cache[i] for i in instructions), dtype=np.int64, count=len(instructions)
        )

    @property
    def untruncated(self) -> Tokenizer:
        """The same Rust tokenizer without truncation (made on first use: very long texts and chunking need it)."""
        if self._untruncated is None:
            self._untruncated = Tokenizer.from_str(self._tok.to_str())
            self._untruncated.no_truncation()
            self._untruncated.no_padding()
        return self._untruncated

    @property
    def folder(self) -> RunFolder:
        """Folds the long one-token runs of a text (``runtime.run_folding``) with this tokenizer's own rules."""
        if self._folder is None:
            self._folder = RunFolder(self.untruncated)
        return self._folder

    def bounded(self, joined: str) -> str:
        """``joined``, or a string of at most ``max_seq_length`` x ``MAX_CHARS_PER_TOKEN`` characters whose first
        ``max_seq_length`` tokens (and truncation flag) are those of ``joined``.

        First a prefix: the pre-tokenizer splits text into words (T5: at spaces, BERT: at spaces and punctuation)
        and the model tokenizes each word on its own, so the tokens of every word that ends before the cut are
        final; the last two words of the prefix, which the cut or the normalizer's look-ahead may change, are not
        counted. When the prefix holds more than ``max_seq_length`` final tokens, truncating it gives the whole
        text's ids and truncation flag; otherwise the prefix grows (x4). A text past the character limit that still
        lacks them (one huge word, long runs of spaces, removed or unknown characters) is folded first
        (``runtime.run_folding``: the same ids), and its prefixes are searched in the same way. A folded prefix whose
        last word is still too long for that (a SentencePiece word of millions of known characters) is cut where
        every cut within two pieces' length of it gives the same first tokens: the Viterbi segmentation of the rest
        of the word cannot change them.
        """
        n = self.max_seq_length
        cut = n * PREFIX_CHARS_PER_TOKEN
        if len(joined) <= cut:
            return joined
        if self._final_tokens(joined[:cut]) > n:  # ordinary text stops here
            return joined[:cut]
        for short in (n * 4, n * 16):  # one long SentencePiece word from near the start
            if self._stable(joined, short):
                return joined[:short]
        limit = n * MAX_CHARS_PER_TOKEN
        cut *= 4
        while cut < min(len(joined), limit):
            if self._final_tokens(joined[:cut]) > n:
                return joined[:cut]
            cut *= 4
        if len(joined) <= limit:
            return joined
        text, complete = self.folder.fold(joined, budget=limit, first_tokens=n)
        if complete or text != joined[: len(text)]:  # something was folded: search the folded text's prefixes
            cut = n * PREFIX_CHARS_PER_TOKEN
            while cut < len(text):
                if self._final_tokens(text[:cut]) > n:
                    return text[:cut]
                cut *= 4
        if complete:
            return text
        for cut in (n * 4, n * 16, n * 64):
            if self._stable(text, cut):
                return text[:cut]
        return text  # the limit: a prefix of MAX_CHARS_PER_TOKEN x max_seq_length characters

    def _final_tokens(self, prefix: str) -> int:
        """Tokens of the words of ``prefix`` that no continuation can change (all words but the last two)."""
        words = [w for w in self.untruncated.encode(prefix, add_special_tokens=False).word_ids if w is not None]
        return sum(1 for w in words if w < words[-1] - 1) if words else 0

    def _stable(self, text: str, cut: int) -> bool:
        """Whether every prefix of ``text`` ending within two pieces' length of ``cut`` starts with the same
        ``max_seq_length`` + 1 tokens. For a Unigram (SentencePiece) model that proves them final: the best
        segmentation of any longer text has a token boundary in that window, and its tokens before the boundary are
        the best segmentation of that prefix."""
        if type(self._tok.model).__name__ != "Unigram" or cut >= len(text):
            return False
        if self._longest_piece is None:
            self._longest_piece = max(len(piece) for piece in self._tok.get_vocab(with_added_tokens=False))
        head, tail = self.special_tokens
        wanted = self.max_seq_length - len(head) - len(tail) + 1
        cuts = [c for c in range(cut - 2 * self._longest_piece - KEEP_SLACK, cut + 1) if c > 0]
        encs = self.untruncated.encode_batch([text[:c] for c in cuts], add_special_tokens=False)
        first = encs[0].ids[:wanted]
        return len(first) == wanted and all(e.ids[:wanted] == first for e in encs)

    def encode(self, inputs: Sequence[InputItem], truncate: bool = True) -> Encoded:
        """Token ids (unpadded) and instruction counts for a list of inputs, in input order.

        ``truncate=False`` keeps every token of every text (for ``runtime.chunking``); ``truncated`` then says which
        rows are longer than ``max_seq_length``.
        """
        parsed = [parse_input(item, i) for i, item in enumerate(inputs)]
        if truncate:
            joined = [self.bounded(self.joined_text(instr, text)) for instr, text in parsed]
            encs = self._tok.encode_batch(joined, add_special_tokens=True)
        else:  # every token is wanted: only the runs that give one token or none are folded
            limit = self.max_seq_length * MAX_CHARS_PER_TOKEN
            joined = [self.joined_text(instr, text) for instr, text in parsed]
            joined = [self.folder.fold(j)[0] if len(j) > limit else j for j in joined]
            encs = self.untruncated.encode_batch(joined, add_special_tokens=True)
            ids = [enc.ids for enc in encs]
            long = np.fromiter((len(r) > self.max_seq_length for r in ids), dtype=bool, count=len(ids))
            return Encoded(ids=ids, instruction_count=self.instruction_counts(i for i, _ in parsed), truncated=long)
        ids = [enc.ids for enc in encs]
        truncated = np.fromiter((bool(enc.overflowing) for enc in encs), dtype=bool, count=len(encs))
        counts = self.instruction_counts(instr for instr, _ in parsed)
        return Encoded(ids=ids, instruction_count=counts, truncated=truncated)

    def pad(self, encoded: Encoded, length: int | None = None) -> dict[str, np.ndarray]:
        """Right-pad to the longest row (or ``length``): int64 ``input_ids``, ``attention_mask``, ``instruction_count``."""
        lengths = encoded.lengths
        width = int(length if length is not None else (lengths.max() if len(lengths) else 0))
        input_ids = np.full((len(encoded.ids), width), self.pad_token_id, dtype=np.int64)
        attention_mask = np.zeros((len(encoded.ids), width), dtype=np.int64)
        for row, ids in enumerate(encoded.ids):
            input_ids[row, : len(ids)] = ids
            attention_mask[row, : len(ids)] = 1
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "instruction_count": encoded.instruction_count.astype(np.int64),
        }

    def __call__(self, inputs: Sequence[InputItem], length: int | None = None) -> dict[str, np.ndarray]:
        return self.pad(self.encode(inputs), length)


def _pad_token_id(tok: Tokenizer, path: Path) -> int:
    for name in ("<pad>", "[PAD]", "<|padding|>"):
        token_id = tok.token_to_id(name)
        if token_id is not None:
            return int(token_id)
    raise ValueError(f"{path}: the tokenizer has no padding token (<pad> or [PAD])")
