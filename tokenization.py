"""Tokenizers of EVE's text, from scratch: BERT-uncased WordPiece and byte-level BPE.

`WordPieceTokenizer` loads a BERT vocab.txt and tokenizes exactly like BERT (basic_tokenize: clean,
split CJK, lowercase, strip accents, split punctuation; then greedy longest-match-first WordPiece);
`build_vocab` makes a small vocabulary for a new corpus (the shapes world's).

`BytePairTokenizer` reads the vocab.json + merges.txt of GPT-2, RoBERTa and HF tokenizers' ByteLevelBPE
trainer (the format of the official EVE's 64k tokenizer, which it loads with HF `AutoTokenizer`) and gives
the ids HF's fast tokenizer gives: text -> GPT-2 pre-tokens -> UTF-8 bytes as printable characters ->
merges by rank. Both tokenizers share one interface (encode, decode, tokenize, the special ids, `state`
for checkpoints); `tokenizer_from_state` rebuilds either from what a checkpoint stores.
"""
import functools
import json
import re
import unicodedata
from collections import Counter
from pathlib import Path

SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")  # build_vocab puts them first: [PAD] = 0
_CJK_RANGES = ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F),
               (0x2B740, 0x2B81F), (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F))


class _SpecialIds:
    """What both tokenizers share: the special tokens' roles, their ids, and encode's framing.

    Roles: start (BERT's [CLS], RoBERTa's <s>), end ([SEP], </s>), pad, unk, mask. The start and end ids
    are called cls_id and sep_id whatever the tokens are named, so that the collate, masking and
    models need not know which tokenizer made the ids."""

    def _find_specials(self, token_to_id, start, end, pad, unk, mask):
        missing = [s for s in (pad, unk, start, end, mask) if s not in token_to_id]
        if missing:
            raise ValueError(f"vocabulary lacks the special tokens {missing}")
        self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id = (
            token_to_id[s] for s in (pad, unk, start, end, mask))
        self.special_ids = {self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id}

    def __len__(self):
        return len(self.vocab)

    def encode(self, text, max_len=None):
        """start ids end, truncated so that the length is <= max_len and the end token stays last."""
        max_len = max_len or self.max_len
        if max_len < 2:
            raise ValueError(f"max_len must be >= 2 to hold the start and end tokens, got {max_len}")
        return [self.cls_id] + self.text_ids(text)[: max_len - 2] + [self.sep_id]


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


class WordPieceTokenizer(_SpecialIds):
    """BERT-uncased tokenization: basic_tokenize, then greedy longest-match-first WordPiece."""

    def __init__(self, vocab, max_len=40):
        self.vocab = list(vocab)
        self.max_len = max_len
        self.token_to_id = {}
        for i, tok in enumerate(self.vocab):
            self.token_to_id.setdefault(tok, i)  # BERT keeps the first id of a duplicated token
        pad, unk, cls, sep, mask = SPECIALS
        self._find_specials(self.token_to_id, start=cls, end=sep, pad=pad, unk=unk, mask=mask)

    @classmethod
    def from_file(cls, path, max_len=40):
        """A BERT vocab.txt: one token per line, id = line number."""
        lines = Path(path).read_text(encoding="utf-8").split("\n")
        if lines and lines[-1] == "":
            lines.pop()  # the final newline does not start another token
        return cls([line.rstrip("\r") for line in lines], max_len)

    def save(self, path):
        Path(path).write_text("".join(t + "\n" for t in self.vocab), encoding="utf-8")

    @property
    def state(self):
        """What a checkpoint stores: the token list (the format of checkpoints before BPE existed)."""
        return self.vocab

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

    def text_ids(self, text):
        return [self.token_to_id.get(p, self.unk_id) for p in self.tokenize(text)]

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


# ---------------------------------------------------------------------------------------------------
# Byte-level BPE

@functools.lru_cache(maxsize=None)
def byte_to_char():
    """GPT-2's byte -> character table: BPE works on strings, so each of the 256 bytes is written as one
    printable character. The 188 printable, non-space Latin-1 bytes stand for themselves; the other 68
    (controls, space, 0x7F-0xA0, soft hyphen 0xAD) become chr(256), chr(257), ... in byte order, so that a
    token never holds whitespace: space (the 33rd of them) is chr(256 + 32) = 'Ġ', newline 'Ċ'."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    table, shifted = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + shifted)
            shifted += 1
    return table


def _char_class(members):
    """A re character class body (no brackets) listing the code points in the sorted list as ranges."""
    ranges = []
    for cp in members:
        if ranges and ranges[-1][1] == cp - 1:
            ranges[-1][1] = cp
        else:
            ranges.append([cp, cp])
    return "".join(f"\\U{a:08x}-\\U{b:08x}" for a, b in ranges)


@functools.lru_cache(maxsize=None)  # once per process, when the first BPE tokenizer is made
def _pretokenizer():
    """GPT-2's pre-tokenization regex, as HF tokenizers runs it (with the Oniguruma engine):

        's|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+

    Python's re has no \\p{L} / \\p{N}, so the letter and number classes are listed from unicodedata's
    categories (L*, N*); and re's \\s also matches U+001C-U+001F, which Oniguruma's \\s (Unicode White_Space)
    does not, so whitespace is listed too. The alternation is the same, so re's leftmost-first matching
    splits exactly like the original: contractions (lowercase only) first; a word, a number or a run of
    other symbols, each with at most one leading space; `\\s+(?!\\S)` takes a run of whitespace but leaves
    its last character when a non-space follows, so that "a   b" -> "a", "  ", " b" (the space joins the
    word, and a lone newline before a word stays a token of its own via the final `\\s+`).
    Code points that Python's Unicode database (14.0 in 3.11) leaves unassigned but a newer one calls letters
    or numbers are "other" here."""
    letters, numbers, spaces = [], [], []
    for cp in range(0x110000):
        ch = chr(cp)
        cat = unicodedata.category(ch)
        if cat[0] == "L":
            letters.append(cp)
        elif cat[0] == "N":
            numbers.append(cp)
        elif ch in "\t\n\x0b\x0c\r\x85" or cat in ("Zs", "Zl", "Zp"):  # Unicode White_Space
            spaces.append(cp)
    L, N, S = _char_class(letters), _char_class(numbers), _char_class(spaces)
    return re.compile(rf"'s|'t|'re|'ve|'m|'ll|'d| ?[{L}]+| ?[{N}]+| ?[^{S}{L}{N}]+|[{S}]+(?![^{S}])|[{S}]+")


def pre_tokenize(text):
    """GPT-2's split of text into pre-tokens: BPE merges never cross their borders."""
    return _pretokenizer().findall(text)


# RoBERTa's special tokens, the ones HF's ByteLevelBPE examples train with; a tokenizer_config.json or
# special_tokens_map.json next to vocab.json overrides them, as it does for AutoTokenizer
BPE_SPECIALS = {"start": "<s>", "end": "</s>", "pad": "<pad>", "unk": "<unk>", "mask": "<mask>"}
_HF_KEYS = {"start": ("cls_token", "bos_token"), "end": ("sep_token", "eos_token"), "pad": ("pad_token",),
            "unk": ("unk_token",), "mask": ("mask_token",)}  # RoBERTa frames a text with cls and sep


class BytePairTokenizer(_SpecialIds):
    """Byte-level BPE with HF's fast RoBERTa tokenizer's ids (<s> ids </s> from encode).

    vocab: token strings, id = position; merges: "a b" strings, best (earliest) first. Special-token
    strings inside the text ("<mask>") are tokenized as plain text, as the WordPiece tokenizer here does
    ("[MASK]"): a caption cannot smuggle in a control token (HF would map it to the special id)."""

    def __init__(self, vocab, merges, specials=None, add_prefix_space=False, max_len=40):
        self.vocab, self.merges = list(vocab), list(merges)
        self.specials = {**BPE_SPECIALS, **(specials or {})}
        self.add_prefix_space, self.max_len = bool(add_prefix_space), max_len
        self.token_to_id = {tok: i for i, tok in enumerate(self.vocab)}
        if len(self.token_to_id) != len(self.vocab):
            raise ValueError("vocabulary has a token twice")
        self.ranks = {}
        for rank, merge in enumerate(self.merges):
            pair = tuple(merge.split(" "))
            if len(pair) != 2 or any(t not in self.token_to_id for t in (*pair, "".join(pair))):
                raise ValueError(f"merge {rank + 1} ({merge!r}): not two vocabulary tokens whose join is one too")
            self.ranks[pair] = rank  # a pair listed twice keeps its later rank, as in GPT-2 and HF
        self._find_specials(self.token_to_id, **self.specials)
        self.char_to_byte = {c: b for b, c in byte_to_char().items()}
        self._cache = {}  # pre-token -> its BPE tokens: captions repeat words a lot

    @classmethod
    def from_dir(cls, path, max_len=40):
        """A folder with vocab.json ({token: id}) and merges.txt, and optionally HF's tokenizer_config.json
        and special_tokens_map.json (special tokens, add_prefix_space); errors name the file and line."""
        path = Path(path)
        vocab_file, merges_file = path / "vocab.json", path / "merges.txt"
        for f in (vocab_file, merges_file):
            if not f.is_file():
                raise ValueError(f"{f}: no such file (a byte-level BPE folder holds vocab.json and merges.txt)")
        try:
            token_to_id = json.loads(vocab_file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{vocab_file}: not JSON ({e})") from None
        vocab = [None] * len(token_to_id)
        for tok, i in token_to_id.items():
            if not isinstance(i, int) or not 0 <= i < len(vocab) or vocab[i] is not None:
                raise ValueError(f"{vocab_file}: token {tok!r} has id {i!r}; ids must be 0..{len(vocab) - 1}, each once")
            vocab[i] = tok
        merges = []
        for n, line in enumerate(merges_file.read_text(encoding="utf-8").split("\n"), 1):
            line = line.rstrip("\r")  # a merges.txt written on Windows
            if not line or (n == 1 and line.startswith("#version")):
                continue  # HF writes a "#version: 0.2" header
            merges.append(line)
        config = {}
        for name in ("tokenizer_config.json", "special_tokens_map.json"):  # the map wins, as in transformers
            if (path / name).is_file():
                config.update(json.loads((path / name).read_text(encoding="utf-8")))
        specials = {}
        for role, keys in _HF_KEYS.items():
            value = next((config[k] for k in keys if config.get(k)), None)
            if value is not None:
                specials[role] = value["content"] if isinstance(value, dict) else value  # HF's AddedToken dict
        try:
            return cls(vocab, merges, specials, config.get("add_prefix_space", False), max_len)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None  # a bad merge or a missing special token

    def save(self, path):
        """vocab.json, merges.txt and a tokenizer_config.json that HF's AutoTokenizer also reads."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / "vocab.json").write_text(json.dumps(self.token_to_id, ensure_ascii=False), encoding="utf-8")
        (path / "merges.txt").write_text("#version: 0.2\n" + "".join(m + "\n" for m in self.merges), encoding="utf-8")
        config = {"tokenizer_class": "RobertaTokenizer", "add_prefix_space": self.add_prefix_space,
                  **{keys[0]: self.specials[role] for role, keys in _HF_KEYS.items()},
                  "bos_token": self.specials["start"], "eos_token": self.specials["end"]}
        (path / "tokenizer_config.json").write_text(json.dumps(config, indent=1), encoding="utf-8")

    @property
    def state(self):
        """What a checkpoint stores (plain lists, strings and a bool: loadable with weights_only)."""
        return {"format": "byte_bpe", "vocab": self.vocab, "merges": self.merges, "specials": self.specials,
                "add_prefix_space": self.add_prefix_space}

    def _bpe(self, word):
        """The BPE tokens of one pre-token, written in byte characters: merge the best-ranked adjacent pair,
        everywhere it occurs, until no adjacent pair has a merge."""
        if word in self._cache:
            return self._cache[word]
        # a character missing from the vocabulary is dropped before merging, as HF's BPE (no unk) does;
        # a vocabulary made by the ByteLevelBPE trainer holds all 256, so this never happens there
        parts = [c for c in word if c in self.token_to_id]
        while len(parts) > 1:
            best = min(zip(parts, parts[1:]), key=lambda pair: self.ranks.get(pair, len(self.ranks)))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])  # left to right: "aaa" with (a, a) -> "aa", "a"
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        if len(self._cache) > 100_000:
            self._cache.clear()  # bounded memory on a large corpus
        self._cache[word] = parts
        return parts

    def tokenize(self, text):
        """BPE tokens in byte characters: "Hello world" -> ["Hello", "Ġworld"]."""
        if self.add_prefix_space and text and not text.startswith(" "):
            text = " " + text  # as HF's fast tokenizer: "" stays empty, and a leading "\n" gets a space too
        table = byte_to_char()
        return [t for word in pre_tokenize(text)
                for t in self._bpe("".join(table[b] for b in word.encode("utf-8")))]

    def text_ids(self, text):
        return [self.token_to_id[t] for t in self.tokenize(text)]

    def decode(self, ids):
        """The text of the ids, special tokens left out; bytes that are not whole UTF-8 become U+FFFD."""
        chars = "".join(self.vocab[int(i)] for i in ids if int(i) not in self.special_ids)
        return bytes(self.char_to_byte[c] for c in chars).decode("utf-8", errors="replace")


def tokenizer_from_state(state, max_len=40):
    """The tokenizer a checkpoint stored as `state`: a token list is WordPiece (every checkpoint before
    BPE existed), a {"format": "byte_bpe", ...} dict is byte-level BPE."""
    if isinstance(state, dict) and state.get("format") == "byte_bpe":
        return BytePairTokenizer(state["vocab"], state["merges"], state["specials"], state["add_prefix_space"],
                                 max_len)
    if isinstance(state, (list, tuple)):
        return WordPieceTokenizer(state, max_len)
    raise ValueError(f"not a stored tokenizer: {type(state).__name__}")


def load_tokenizer(vocab="", bpe="", max_len=40):
    """The tokenizer of a script's --vocab (a BERT vocab.txt) or --bpe (a folder with vocab.json and
    merges.txt); errors as one line that names the file."""
    if vocab and bpe:
        raise ValueError("give --vocab (WordPiece) or --bpe (byte-level BPE), not both")
    if bpe:
        return BytePairTokenizer.from_dir(bpe, max_len)
    if not Path(vocab).is_file():
        raise ValueError(f"--vocab {vocab}: no such file")
    return WordPieceTokenizer.from_file(vocab, max_len)
