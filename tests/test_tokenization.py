"""Tests of tokenization.py: the WordPiece tokenizer against known BERT tokenizations."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import tokenization  # noqa: E402
from conftest import VOCAB  # noqa: E402

def test_bert_basic_and_wordpiece_tokenization():
    tok = tokenization.WordPieceTokenizer(VOCAB)
    assert tok.tokenize("Hello, World!") == ["hello", ",", "world", "!"]
    assert tok.tokenize("unaffable") == ["un", "##aff", "##able"]
    assert tok.tokenize("Héllo Crème brûlée") == ["hello", "creme", "brulee"]
    assert tok.tokenize("don't") == ["don", "'", "t"]
    assert tok.tokenize("hellox zzz") == ["[UNK]", "[UNK]"]  # not fully splittable -> one [UNK]
    assert tok.tokenize("ab" + "b" * 99) == ["[UNK]"] and tok.tokenize("ab" + "b" * 98) == ["a"] + ["##b"] * 99
    assert tok.tokenize("hello中国world") == ["hello", "中", "国", "world"]
    assert tok.tokenize("hel\x00lo\tworld\u00a0the\ufffd") == ["hello", "world", "the"]  # cleaned text
    assert tok.tokenize("$hello^") == ["[UNK]", "hello", "[UNK]"]  # ASCII symbols are punctuation
    assert tokenization.basic_tokenize("A\u2014B «c»") == ["a", "\u2014", "b", "«", "c", "»"]


def test_encode_decode_truncation_and_specials(tmp_path):
    tok = tokenization.WordPieceTokenizer(VOCAB, max_len=6)
    ids = tok.encode("hello world hello world hello")
    assert len(ids) == 6 and ids[0] == tok.cls_id and ids[-1] == tok.sep_id
    assert tok.encode("hello", max_len=3) == [tok.cls_id, VOCAB.index("hello"), tok.sep_id]
    assert tok.decode(ids) == "hello world hello world" and tok.decode(tok.encode("unaffable")) == "unaffable"
    assert (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id) == (0, 1, 2, 3, 4)
    assert tok.special_ids == {0, 1, 2, 3, 4} and len(tok) == len(VOCAB)
    tok.save(tmp_path / "vocab.txt")
    again = tokenization.WordPieceTokenizer.from_file(tmp_path / "vocab.txt")
    assert again.vocab == VOCAB and again.tokenize("unaffable") == ["un", "##aff", "##able"]
    # specials are found by string, wherever they are
    shuffled = tokenization.WordPieceTokenizer(["x", "[MASK]", "[SEP]", "[CLS]", "[UNK]", "[PAD]"])
    assert (shuffled.pad_id, shuffled.mask_id) == (5, 1)
    with pytest.raises(ValueError, match="MASK"):
        tokenization.WordPieceTokenizer(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "hello"])


def test_build_vocab_covers_its_corpus():
    corpus = ["The cat sat.", "the dog, the CAT!", "Über naïve zebras", "a b"]
    vocab = tokenization.build_vocab(corpus)
    assert vocab[:5] == list(tokenization.SPECIALS) and vocab[5] == "the" and vocab.index("cat") < vocab.index("dog")
    tok = tokenization.WordPieceTokenizer(vocab)
    assert all(tok.unk_id not in tok.encode(t) for t in corpus + ["zebra tac god", "ubernaive"])
    small = tokenization.build_vocab(corpus, max_size=len(vocab) - 3)
    assert len(small) == len(vocab) - 3 and "the" in small and "zebras" not in small
    assert tokenization.WordPieceTokenizer(small).unk_id not in tokenization.WordPieceTokenizer(small).encode("zebras")
    assert "sat" not in tokenization.build_vocab(corpus, min_freq=2) and "cat" in tokenization.build_vocab(corpus, min_freq=2)

