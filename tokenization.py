"""Tokenizers of EVE's text: a from-scratch BERT-uncased WordPiece tokenizer.

`WordPieceTokenizer` loads a BERT vocab.txt and tokenizes exactly like BERT (basic_tokenize: clean,
split CJK, lowercase, strip accents, split punctuation; then greedy longest-match-first WordPiece);
`build_vocab` makes a small vocabulary for a new corpus (the shapes world's).
"""
import functools
import unicodedata
from collections import Counter
from pathlib import Path

SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")  # build_vocab puts them first: [PAD] = 0
_CJK_RANGES = ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F),
               (0x2B740, 0x2B81F), (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F))


@functools.lru_cache(maxsize=None)  # text is mostly ASCII: classify each distinct char once
def _is_punct(ch):
    # BERT counts all non-alphanumeric ASCII as punctuation, even "$" and "^" (category S*)
    cp = ord(ch)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(ch).startswith("P")


@functools.lru_cache(maxsize=None)
def _clean_char(ch):
    """What BERT's text cleaning turns ch into: itself, a space, nothing, or a spaced CJK ideograph."""
    cat = unicodedata.category(ch)
    if ch in " \t\n\r" or cat == "Zs":
        return " "  # every whitespace char counts as a space
    if ord(ch) == 0 or ord(ch) == 0xFFFD or cat.startswith("C"):
        return ""  # NUL, replacement char and control chars are dropped
    if any(lo <= ord(ch) <= hi for lo, hi in _CJK_RANGES):
        return f" {ch} "  # each ideograph is a word of its own
    return ch


def basic_tokenize(text):
    """BERT's BasicTokenizer with do_lower_case: clean, split CJK, lowercase, strip accents, split punct."""
    words = []
    for token in "".join(map(_clean_char, text)).split():
        token = unicodedata.normalize("NFD", token.lower())
        token = "".join(c for c in token if unicodedata.category(c) != "Mn")  # drop accents
        current = ""
        for c in token:
            if _is_punct(c):
                words += [current, c] if current else [c]
                current = ""
            else:
                current += c
        if current:
            words.append(current)
    return " ".join(words).split()  # BERT re-splits on whitespace after the punctuation split


class WordPieceTokenizer:
    """BERT-uncased tokenization: basic_tokenize, then greedy longest-match-first WordPiece."""

    def __init__(self, vocab, max_len=40):
        self.vocab = list(vocab)
        self.max_len = max_len
        self.token_to_id = {}
        for i, tok in enumerate(self.vocab):
            self.token_to_id.setdefault(tok, i)  # BERT keeps the first id of a duplicated token
        missing = [s for s in SPECIALS if s not in self.token_to_id]
        if missing:
            raise ValueError(f"vocabulary lacks the special tokens {missing}")
        self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id = (
            self.token_to_id[s] for s in SPECIALS)
        self.special_ids = {self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id}

    @classmethod
    def from_file(cls, path, max_len=40):
        """A BERT vocab.txt: one token per line, id = line number."""
        lines = Path(path).read_text(encoding="utf-8").split("\n")
        if lines and lines[-1] == "":
            lines.pop()  # the final newline does not start another token
        return cls([line.rstrip("\r") for line in lines], max_len)

    def save(self, path):
        Path(path).write_text("".join(t + "\n" for t in self.vocab), encoding="utf-8")

    def __len__(self):
        return len(self.vocab)

    def _wordpiece(self, word):
        if len(word) > 100:
            return ["[UNK]"]
        pieces, start = [], 0
        while start < len(word):
            end = len(word)
            while end > start:  # longest piece in the vocabulary first
                piece = word[start:end] if start == 0 else "##" + word[start:end]
                if piece in self.token_to_id:
                    break
                end -= 1
            else:
                return ["[UNK]"]  # one unmatched position makes the whole word unknown
            pieces.append(piece)
            start = end
        return pieces

    def tokenize(self, text):
        return [p for word in basic_tokenize(text) for p in self._wordpiece(word)]

    def encode(self, text, max_len=None):
        """[CLS] pieces [SEP], truncated so that the length is <= max_len and [SEP] stays last."""
        max_len = max_len or self.max_len
        if max_len < 2:
            raise ValueError(f"max_len must be >= 2 to hold [CLS] and [SEP], got {max_len}")
        ids = [self.token_to_id.get(p, self.unk_id) for p in self.tokenize(text)][: max_len - 2]
        return [self.cls_id] + ids + [self.sep_id]

    def decode(self, ids):
        pieces = [self.vocab[int(i)] for i in ids if int(i) not in self.special_ids]
        return " ".join(pieces).replace(" ##", "")


def build_vocab(texts, min_freq=1, max_size=None):
    """Specials, whole words by frequency (ties alphabetical), then every seen character and its
    '##' form, so that any word made of seen characters tokenizes without [UNK]. max_size caps the
    total size by dropping the rarest multi-character words (characters are never dropped)."""
    counts = Counter()
    for text, n in Counter(texts).items():  # corpora repeat texts: tokenize each distinct one once
        counts.update({w: c * n for w, c in Counter(basic_tokenize(text)).items()})
    chars = sorted({c for w in counts for c in w})
    char_tokens = chars + ["##" + c for c in chars]
    words = sorted((w for w, n in counts.items() if n >= min_freq), key=lambda w: (-counts[w], w))
    longer = [w for w in words if len(w) > 1]  # single characters are always kept, below
    if max_size is not None:
        longer = longer[: max(0, max_size - len(SPECIALS) - len(char_tokens))]
    kept = set(longer)
    words = [w for w in words if len(w) == 1 or w in kept]
    kept.update(words)
    return list(SPECIALS) + words + [t for t in char_tokens if t not in kept]
