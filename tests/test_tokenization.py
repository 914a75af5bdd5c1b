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



# --- byte-level BPE -------------------------------------------------------------------------------
# A hand-made RoBERTa-style vocabulary (ids are list positions) and merges, best first. The expected
# ids below were worked out by hand (and agree with HF's AutoTokenizer on the same files).
BPE_VOCAB = ["<s>", "<pad>", "</s>", "<unk>", "<mask>",
             "H", "e", "l", "o", "Ġ", "w", "r", "d", "a", "c", "f", "Ã", "©", "'", "s", "i", "t",  # 5-21: bytes
             "lo", "ll", "el", "He", "ello", "Ġw", "or", "Ġwor", "aa", "Ã©", "ca"]                    # 22-32: merges
BPE_MERGES = ["l o", "l l", "e l", "H e", "el lo", "Ġ w", "o r", "Ġw or", "a a", "Ã ©", "c a"]


def bpe(**kw):
    return tokenization.BytePairTokenizer(BPE_VOCAB, BPE_MERGES, **kw)


def test_byte_to_char_table():
    table = tokenization.byte_to_char()
    assert len(set(table.values())) == 256
    # printable Latin-1 stands for itself; the 68 others are shifted to 256+ in byte order:
    # bytes 0-32 -> U+0100-U+0120, 127-160 -> U+0121-U+0142, 173 -> U+0143
    assert table[ord("a")] == "a" and table[0xA9] == "©" and table[0xC3] == "Ã"
    assert (table[0], table[10], table[32], table[127], table[160], table[0xAD]) == ("Ā", "Ċ", "Ġ", "ġ", "ł", "Ń")


def test_gpt2_pre_tokenization():
    pre = tokenization.pre_tokenize
    assert pre("Hello  world") == ["Hello", " ", " world"]  # the last space of a run joins the word
    assert pre("x   ") == ["x", "   "] and pre("a\n\nb") == ["a", "\n", "\n", "b"]  # \s+(?!\S), then \s+
    assert pre("don't stop") == ["don", "'t", " stop"] and pre("it's") == ["it", "'s"]
    assert pre("DON'T") == ["DON", "'", "T"]  # contractions are lowercase only
    assert pre("3.14 abc123") == ["3", ".", "14", " abc", "123"] and pre("hi!!! ?") == ["hi", "!!!", " ?"]
    assert pre("café 中文 ٣½") == ["café", " 中文", " ٣½"]  # letters and numbers of any script
    assert pre("a\u00a0b") == ["a", "\u00a0", "b"]  # NBSP is whitespace but only " " joins a word
    assert pre("a \x1cb") == ["a", " \x1c", "b"]  # U+001C: str.isspace() says yes, the GPT-2 regex's \s no


def test_bpe_merges_by_rank_bytes_and_ids():
    tok = bpe()
    # H e l l o: "l o" (rank 0) beats "l l" (1), then "e l" (2) beats "H e" (3), then "el lo" (4)
    assert tok.tokenize("Hello") == ["H", "ello"]
    assert tok.tokenize("Hello world") == ["H", "ello", "Ġwor", "l", "d"]  # " world": Ġw, or, Ġwor; no "l d"
    assert tok.encode("Hello world") == [0, 5, 26, 29, 7, 12, 2]
    assert tok.encode(" café") == [0, 9, 32, 15, 31, 2]  # é is the bytes C3 A9 = "Ã©"
    assert tok.encode("aaa") == [0, 30, 13, 2]  # a repeated pair merges left to right
    assert tok.encode("it's") == [0, 20, 21, 18, 19, 2]
    assert tok.encode("Hexllo") == [0, 5, 26, 2]  # "x" is not in the vocabulary: dropped before merging
    assert tok.encode("Hello world  ") == [0, 5, 26, 29, 7, 12, 9, 9, 2]
    assert tok.encode("Hello world", max_len=4) == [0, 5, 26, 2]  # truncated, </s> kept
    assert bpe(add_prefix_space=True).encode("Hello") == [0, 9, 5, 26, 2]
    assert bpe(add_prefix_space=True).encode(" café") == [0, 9, 32, 15, 31, 2] and bpe(add_prefix_space=True).encode("") == [0, 2]
    assert tok.decode([0, 5, 26, 29, 7, 12, 2, 1, 1]) == "Hello world" and tok.decode([9, 32, 15, 31]) == " café"
    assert tok.decode([16]) == "\ufffd"  # half of a UTF-8 character
    assert (tok.cls_id, tok.pad_id, tok.sep_id, tok.unk_id, tok.mask_id) == (0, 1, 2, 3, 4)
    assert tok.special_ids == {0, 1, 2, 3, 4} and len(tok) == len(BPE_VOCAB)
    with pytest.raises(ValueError, match="max_len"):
        tok.encode("Hello", max_len=1)


def test_bpe_files_and_errors(tmp_path):
    import json
    d = tmp_path / "bpe"
    d.mkdir()
    (d / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(BPE_VOCAB)}, ensure_ascii=False), encoding="utf-8")
    (d / "merges.txt").write_text("#version: 0.2\n" + "\n".join(BPE_MERGES) + "\n", encoding="utf-8")
    (d / "tokenizer_config.json").write_text(json.dumps({"add_prefix_space": True, "mask_token": {"content": "<mask>", "lstrip": True}}))
    tok = tokenization.BytePairTokenizer.from_dir(d)
    assert tok.merges == BPE_MERGES and tok.vocab == BPE_VOCAB and tok.add_prefix_space
    assert tok.encode("Hello") == [0, 9, 5, 26, 2]
    tok.save(tmp_path / "again")
    again = tokenization.BytePairTokenizer.from_dir(tmp_path / "again")
    assert again.state == tok.state
    # BERT-named specials come from the config (RoBERTa frames a text with cls_token ... sep_token)
    renamed = ["[CLS]", "[PAD]", "[SEP]", "[UNK]", "[MASK]"] + BPE_VOCAB[5:]
    (d / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(renamed)}, ensure_ascii=False), encoding="utf-8")
    (d / "special_tokens_map.json").write_text(json.dumps({"cls_token": "[CLS]", "sep_token": "[SEP]", "pad_token": "[PAD]",
                                                           "unk_token": "[UNK]", "mask_token": "[MASK]"}))
    assert tokenization.BytePairTokenizer.from_dir(d).encode("Hello") == [0, 9, 5, 26, 2]
    (d / "merges.txt").write_text("l o\nl x\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"merge 2 \('l x'\)"):
        tokenization.BytePairTokenizer.from_dir(d)
    (d / "vocab.json").write_text(json.dumps({"a": 0, "b": 2}))
    with pytest.raises(ValueError, match="vocab.json: token 'b' has id 2"):
        tokenization.BytePairTokenizer.from_dir(d)
    with pytest.raises(ValueError, match="lacks the special tokens"):
        tokenization.BytePairTokenizer(["a", "<s>"], [])
    with pytest.raises(ValueError, match="vocab.json: no such file"):
        tokenization.BytePairTokenizer.from_dir(tmp_path)


def test_tokenizers_through_a_checkpoint(tmp_path):
    import torch
    tok = bpe(add_prefix_space=True, max_len=5)
    wp = tokenization.WordPieceTokenizer(VOCAB)
    torch.save({"vocab": tok.state, "old": wp.vocab}, tmp_path / "ckpt.pt")  # "old": a checkpoint before BPE
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    back = tokenization.tokenizer_from_state(ckpt["vocab"], max_len=5)
    assert isinstance(back, tokenization.BytePairTokenizer) and back.state == tok.state
    assert back.encode("Hello world") == tok.encode("Hello world") == [0, 9, 5, 26, 2]
    old = tokenization.tokenizer_from_state(ckpt["old"])
    assert isinstance(old, tokenization.WordPieceTokenizer) and old.vocab == VOCAB and old.state == VOCAB
    assert old.tokenize("unaffable") == ["un", "##aff", "##able"]
    with pytest.raises(ValueError, match="not a stored tokenizer"):
        tokenization.tokenizer_from_state({"format": "sentencepiece"})


# --- the scripts with --bpe -------------------------------------------------------------------------

def write_shapes_bpe(world, folder):
    """A small byte-level BPE for the shapes world: the specials, all 256 byte characters, and merges that
    spell each of the first 30 words of its captions with a leading space (Ġ) letter by letter."""
    import json
    rows = json.loads(world["pretrain"].read_text())
    words = list(dict.fromkeys(w for r in rows for c in ([r["caption"]] if isinstance(r["caption"], str) else r["caption"])
                               for w in tokenization.pre_tokenize(" " + c.lower()) if w[1:].isalpha()))[:30]
    vocab = list(tokenization.BPE_SPECIALS.values()) + list(tokenization.byte_to_char().values())
    merges = []
    for w in words:
        w = "Ġ" + w[1:]
        for i in range(2, len(w) + 1):  # "Ġ r", "Ġr e", "Ġre d": each merge joins two tokens already there
            if w[:i] not in vocab:
                vocab.append(w[:i])
                merges.append(f"{w[:i - 1]} {w[i - 1]}")
    folder.mkdir()
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(m + "\n" for m in merges), encoding="utf-8")
    return words


def test_pretrain_resume_and_finetune_with_bpe(small_world, tmp_path):
    import torch
    import finetune
    import evaluate
    import pretrain
    from conftest import TINY_MODEL_FLAGS
    words = write_shapes_bpe(small_world, tmp_path / "bpe")
    tok = tokenization.BytePairTokenizer.from_dir(tmp_path / "bpe")
    assert [tok.vocab[i] for i in tok.encode(words[0])[1:-1]] == ["Ġ" + words[0][1:]]  # one token per known word
    out = tmp_path / "pre"
    flags = ["--train-json", str(small_world["pretrain"]), "--image-root", str(small_world["root"]), "--bpe", str(tmp_path / "bpe"),
             *TINY_MODEL_FLAGS, "--top-layers", "0",  # no MoE layer: faster, and the text side is what is tested
             "--out-dir", str(out), "--batch-size", "4", "--num-workers", "0"]
    with pytest.raises(SystemExit, match="nope/vocab.json: no such file"):
        pretrain.main(flags + ["--bpe", str(tmp_path / "nope")])
    pretrain.main(flags + ["--max-steps", "1"])
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["vocab"] == tok.state and ckpt["config"]["vocab_size"] == len(tok)
    pretrain.main(flags + ["--max-steps", "2", "--resume", "auto"])  # the BPE state in the checkpoint matches --bpe
    assert torch.load(out / "last.pt", weights_only=True)["step"] == 2
    ft = tmp_path / "ft"
    finetune.main(["--task", "vqa", "--init", str(out / "last.pt"), "--image-root", str(small_world["root"]),
                   "--answer-list", str(small_world["answer_list"]), "--out-dir", str(ft), "--batch-size", "4",
                   "--num-workers", "0", "--max-steps", "1", "--min-answer-count", "1"]
                  + [x for s in ("train", "val", "test") for x in (f"--{s}-json", str(small_world[f"vqa_{s}"]))])
    _, again, _ = evaluate.load_finetuned(ft / "best.pt", "cpu")
    assert isinstance(again, tokenization.BytePairTokenizer) and again.state == tok.state
