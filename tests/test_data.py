"""Tests of data.py: the shapes world against its ground truth, the tokenizer against known BERT
tokenizations, the readers against hand-written files (good and bad), collate and loader order."""
import json
import re
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data  # noqa: E402
from data import DataError  # noqa: E402

SMALL = dict(n_train=40, n_val=10, n_test=10, nlvr2_per_split=(40, 8, 8))
NUM = {w: i for i, w in enumerate(["zero", "one", "two", "three", "four", "five", "six", "seven", "eight"])}
MARGIN = 0.1 * 64  # the generator's relation margin at image_size 64


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return data.make_shapes_world(tmp_path_factory.mktemp("world"), seed=3, **SMALL)


def load(path):
    return json.loads(Path(path).read_text())


def scenes_of(world):
    return {s["image"]: s["objects"] for s in load(world["scenes"])}


# ----------------------------------------------------------------------------- shapes world
def test_generator_is_deterministic_and_ensure_reuses(world, tmp_path):
    other = data.make_shapes_world(tmp_path / "again", seed=3, **SMALL)
    files = sorted(p.relative_to(world["root"]) for p in Path(world["root"]).rglob("*") if p.is_file())
    assert len(files) == 60 + 12 + 2  # images, json files, vocab.txt and manifest.json
    for rel in files:
        assert (world["root"] / rel).read_bytes() == (other["root"] / rel).read_bytes(), rel
    # ensure_* keeps a matching world (mtime unchanged) and rebuilds for different parameters
    stamp = (other["root"] / "pretrain.json").stat().st_mtime_ns
    data.ensure_shapes_world(other["root"], seed=3, **SMALL)
    assert (other["root"] / "pretrain.json").stat().st_mtime_ns == stamp
    data.ensure_shapes_world(other["root"], seed=4, **SMALL)
    assert load(other["root"] / "manifest.json")["seed"] == 4
    assert (other["root"] / "pretrain.json").read_bytes() != (world["root"] / "pretrain.json").read_bytes()


def test_world_schemas(world):
    assert set(world) >= {"root", "images", "pretrain", "retrieval_train", "retrieval_val", "retrieval_test",
                          "vqa_train", "vqa_val", "vqa_test", "answer_list", "nlvr2_train", "nlvr2_val",
                          "nlvr2_test", "vocab"}
    pretrain = load(world["pretrain"])
    assert len(pretrain) == 40 and pretrain[0]["image"] == "images/train_00000.png"
    assert all(len(r["caption"]) == 5 and all(isinstance(c, str) for c in r["caption"]) for r in pretrain)
    rt = load(world["retrieval_train"])
    assert len(rt) == 200 and {type(r["caption"]) for r in rt} == {str} and rt[7]["image_id"] == 1
    for split, n in (("val", 10), ("test", 10)):
        rows = load(world[f"retrieval_{split}"])
        assert len(rows) == n and all(len(r["caption"]) == 5 and r["image"].startswith(f"images/{split}_")
                                      for r in rows)
    qids = []
    for split, n in (("train", 40), ("val", 10), ("test", 10)):
        rows = load(world[f"vqa_{split}"])
        assert len(rows) == 3 * n
        assert all(set(r) == {"question_id", "question", "image", "answer", "dataset"} and len(r["answer"]) == 10
                   and r["dataset"] == "shapes" for r in rows)
        qids += [r["question_id"] for r in rows]
    assert len(set(qids)) == len(qids)
    for split, n in (("train", 40), ("val", 8), ("test", 8)):
        rows = load(world[f"nlvr2_{split}"])
        assert len(rows) == n and all(len(r["images"]) == 2 and r["label"] in ("True", "False") for r in rows)
        assert all(r["identifier"].startswith(f"{split}-") and im.startswith(f"images/{split}_")
                   for r in rows for im in r["images"])
    assert data.WordPieceTokenizer.from_file(world["vocab"]).vocab[:5] == list(data.SPECIALS)


def test_scene_metadata_matches_pixels(world):
    # the centre pixel of every object has its colour: the ground truth used below describes the image
    for image, objects in scenes_of(world).items():
        pixels = np.asarray(Image.open(world["root"] / image).convert("RGB"))
        assert 1 <= len(objects) <= 4
        for o in objects:
            assert tuple(pixels[int(o["cy"]), int(o["cx"])]) == data.COLOURS[o["colour"]], (image, o)


def _has(objs, colour, shape, size=None):
    return any(o["colour"] == colour and o["shape"] == shape and size in (None, o["size"]) for o in objs)


def _rel(a, b, rel):
    dx, dy = a["cx"] - b["cx"], a["cy"] - b["cy"]
    return {"left of": dx < -MARGIN, "right of": dx > MARGIN, "above": dy < -MARGIN, "below": dy > MARGIN}[rel]


def caption_is_true(caption, objs):
    """An independent reading of every caption template; an unknown template counts as false."""
    listed = re.findall(r"an? (small|large) (\w+) (circle|square|triangle)", caption)
    if m := re.fullmatch(r"an? (\w+) (\w+) (left of|right of|above|below) an? (\w+) (\w+)", caption):
        return any(a is not b and (a["colour"], a["shape"]) == m.group(1, 2) and
                   (b["colour"], b["shape"]) == m.group(4, 5) and _rel(a, b, m.group(3))
                   for a in objs for b in objs)
    if m := re.fullmatch(r"(?:(\w+) shapes?: )?(.*?)( on a noisy background)?", caption):
        if listed and len(listed) > 1 or m.group(1) or m.group(3):
            return (m.group(1) is None or NUM[m.group(1)] == len(objs) == len(listed)) and \
                all(_has(objs, c, s, z) for z, c, s in listed)
    if m := re.fullmatch(r"(?:there (?:is|are) )?(\w+) (shapes?|objects?)", caption):
        return NUM[m.group(1)] == len(objs)
    if m := re.fullmatch(r"(\w+) (\w+) objects?", caption):
        return NUM[m.group(1)] == sum(o["colour"] == m.group(2) for o in objs)
    if m := re.fullmatch(r"(\w+) (circle|square|triangle)s?", caption):
        return NUM[m.group(1)] == sum(o["shape"] == m.group(2) for o in objs)
    if m := re.fullmatch(r"(?:there is )?an? (?:(small|large) )?(\w+) (\w+)(?: in the picture)?", caption):
        return _has(objs, m.group(2), m.group(3), m.group(1))
    return False


def test_captions_are_true_and_flip_swap_keeps_them_true(world):
    scenes, kinds = scenes_of(world), Counter()
    for split in ("val", "test"):
        for row in load(world[f"retrieval_{split}"]):
            objs = scenes[row["image"]]
            mirrored = [o | {"cx": 64 - o["cx"]} for o in objs]
            for caption in row["caption"]:
                assert caption_is_true(caption, objs), (caption, objs)
                assert caption_is_true(data.swap_left_right(caption), mirrored), caption
                is_count = re.match(r"(there are |there is )?(one|two|three|four) ", caption)
                kinds["relation" if re.search(" of |above|below", caption) else
                      "count" if is_count else "other"] += 1
    assert min(kinds.values()) >= 5, kinds  # the templates vary
    assert not caption_is_true("two shapes", [{"shape": "circle", "colour": "red", "size": "small"}])


def test_swap_left_right():
    assert data.swap_left_right("Left of the RIGHT one, left-hand; leftover right.") == \
        "Right of the LEFT one, right-hand; leftover left."


def vqa_normalise(answer):
    """The VQA evaluation's rules that matter here: case, periods, number words, articles."""
    # the official periodStrip "(?!<=\d)(\.)(?!\d)" has no real look-behind: "2." -> "2" too
    answer = re.sub(r"\.(?!\d)", "", answer.lower().strip())
    words = [w for w in answer.split() if w not in ("a", "an", "the")]
    return " ".join(str(NUM[w]) if w in NUM else "0" if w == "none" else w for w in words)


def vqa_truth(question, objs):
    def only(pred):
        found = [o for o in objs if pred(o)]
        return found[0] if len(found) == 1 else None
    if m := re.fullmatch(r"how many (\w+)s are there\?", question):
        return str(sum(m.group(1) in ("shape", o["shape"]) for o in objs))
    if m := re.fullmatch(r"how many (\w+) objects are there\?", question):
        return str(sum(o["colour"] == m.group(1) for o in objs))
    if m := re.fullmatch(r"is there an? (\w+) (\w+)\?", question):
        return "yes" if _has(objs, *m.group(1, 2)) else "no"
    if m := re.fullmatch(r"what color is the (?:(small|large) )?(\w+)\?", question):
        return only(lambda o: o["shape"] == m.group(2) and m.group(1) in (None, o["size"]))["colour"]
    if m := re.fullmatch(r"what shape is the (?:(small|large) )?(\w+) object\?", question):
        return only(lambda o: o["colour"] == m.group(2) and m.group(1) in (None, o["size"]))["shape"]
    if m := re.fullmatch(r"what (shape|color) is (?:the shape )?(left of|right of|above|below) the (\w+) (\w+)\?",
                         question):
        ref = only(lambda o: (o["colour"], o["shape"]) == m.group(3, 4))
        axis = "cx" if "of" in m.group(2) else "cy"
        assert all(abs(o[axis] - ref[axis]) > MARGIN for o in objs if o is not ref)  # unambiguous
        hit = only(lambda o: o is not ref and _rel(o, ref, m.group(2)))
        return hit["shape" if m.group(1) == "shape" else "colour"]
    raise AssertionError(f"unknown question template: {question}")


def test_vqa_answers_true_normalised_and_in_answer_list(world):
    scenes, answer_list = scenes_of(world), load(world["answer_list"])
    assert answer_list == sorted(answer_list)
    kinds = Counter()
    for split in ("train", "val", "test"):
        rows = load(world[f"vqa_{split}"])
        for row in rows:
            # canonical (already normalised) answers; the majority, at least 7 of 10, is the truth
            assert all(vqa_normalise(a) == a for a in row["answer"]), row["answer"]
            (majority, n), = Counter(row["answer"]).most_common(1)
            assert n >= 7 and majority == vqa_truth(row["question"], scenes[row["image"]]), row
            assert set(row["answer"]) <= set(answer_list)
            kinds[" ".join(row["question"].split()[:2])] += 1
        yes_no = Counter(Counter(r["answer"]).most_common(1)[0][0] for r in rows if r["question"].startswith("is there"))
        assert abs(yes_no["yes"] - yes_no["no"]) <= 1, yes_no
    assert set(kinds) == {"what color", "what shape", "how many", "is there"}
    assert any(" of the " in r["question"] or "above" in r["question"] for r in load(world["vqa_train"]))


def nlvr2_truth(sentence, left, right):
    side = {"left": left, "right": right}
    if m := re.fullmatch(r"the (left|right) image has more shapes than the (left|right) image", sentence):
        return len(side[m.group(1)]) > len(side[m.group(2)])
    if sentence == "both images have the same number of shapes":
        return len(left) == len(right)
    if m := re.fullmatch(r"both images contain an? (\w+) object", sentence):
        return all(any(o["colour"] == m.group(1) for o in s) for s in (left, right))
    if m := re.fullmatch(r"neither image contains an? (\w+) object", sentence):
        return not any(o["colour"] == m.group(1) for o in left + right)
    if m := re.fullmatch(r"there (?:is|are) exactly (\w+) (circle|square|triangle)s? in total", sentence):
        return NUM[m.group(1)] == sum(o["shape"] == m.group(2) for o in left + right)
    if m := re.fullmatch(r"there is an? (?:(\w+) )?(circle|square|triangle) in the (left|right) image", sentence):
        return any(o["shape"] == m.group(2) and m.group(1) in (None, o["colour"]) for o in side[m.group(3)])
    if m := re.fullmatch(r"the (left|right) image contains exactly (\w+) objects?", sentence):
        return len(side[m.group(1)]) == NUM[m.group(2)]
    raise AssertionError(f"unknown NLVR2 template: {sentence}")


def test_nlvr2_labels_true_balanced_and_grouped_by_four(world):
    scenes = scenes_of(world)
    for split in ("train", "val", "test"):
        rows = load(world[f"nlvr2_{split}"])
        assert Counter(r["label"] for r in rows) == {"True": len(rows) // 2, "False": len(rows) // 2}
        groups = Counter()
        for r in rows:
            assert str(nlvr2_truth(r["sentence"], *(scenes[i] for i in r["images"]))) == r["label"], r
            _, sentence_no, pair_no, _ = r["identifier"].split("-")
            groups[sentence_no] += 1
        assert set(groups.values()) == {4}
        by_sentence = {}
        for r in rows:
            by_sentence.setdefault(r["identifier"].split("-")[1], set()).add(r["sentence"])
        assert all(len(s) == 1 for s in by_sentence.values())


# ----------------------------------------------------------------------------- tokenizer
VOCAB = list(data.SPECIALS) + ["hello", "world", ",", "!", "'", "don", "t", "un", "##aff", "##able", "creme",
                               "brulee", "the", "a", "##b", "中", "国", "hel", "##lo"]


def test_bert_basic_and_wordpiece_tokenization():
    tok = data.WordPieceTokenizer(VOCAB)
    assert tok.tokenize("Hello, World!") == ["hello", ",", "world", "!"]
    assert tok.tokenize("unaffable") == ["un", "##aff", "##able"]
    assert tok.tokenize("Héllo Crème brûlée") == ["hello", "creme", "brulee"]
    assert tok.tokenize("don't") == ["don", "'", "t"]
    assert tok.tokenize("hellox zzz") == ["[UNK]", "[UNK]"]  # not fully splittable -> one [UNK]
    assert tok.tokenize("ab" + "b" * 99) == ["[UNK]"] and tok.tokenize("ab" + "b" * 98) == ["a"] + ["##b"] * 99
    assert tok.tokenize("hello中国world") == ["hello", "中", "国", "world"]
    assert tok.tokenize("hel\x00lo\tworld\u00a0the\ufffd") == ["hello", "world", "the"]  # cleaned text
    assert tok.tokenize("$hello^") == ["[UNK]", "hello", "[UNK]"]  # ASCII symbols are punctuation
    assert data.basic_tokenize("A\u2014B «c»") == ["a", "\u2014", "b", "«", "c", "»"]


def test_encode_decode_truncation_and_specials(tmp_path):
    tok = data.WordPieceTokenizer(VOCAB, max_len=6)
    ids = tok.encode("hello world hello world hello")
    assert len(ids) == 6 and ids[0] == tok.cls_id and ids[-1] == tok.sep_id
    assert tok.encode("hello", max_len=3) == [tok.cls_id, VOCAB.index("hello"), tok.sep_id]
    assert tok.decode(ids) == "hello world hello world" and tok.decode(tok.encode("unaffable")) == "unaffable"
    assert (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id) == (0, 1, 2, 3, 4)
    assert tok.special_ids == {0, 1, 2, 3, 4} and len(tok) == len(VOCAB)
    tok.save(tmp_path / "vocab.txt")
    again = data.WordPieceTokenizer.from_file(tmp_path / "vocab.txt")
    assert again.vocab == VOCAB and again.tokenize("unaffable") == ["un", "##aff", "##able"]
    # specials are found by string, wherever they are
    shuffled = data.WordPieceTokenizer(["x", "[MASK]", "[SEP]", "[CLS]", "[UNK]", "[PAD]"])
    assert (shuffled.pad_id, shuffled.mask_id) == (5, 1)
    with pytest.raises(ValueError, match="MASK"):
        data.WordPieceTokenizer(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "hello"])


def test_build_vocab_covers_its_corpus():
    corpus = ["The cat sat.", "the dog, the CAT!", "Über naïve zebras", "a b"]
    vocab = data.build_vocab(corpus)
    assert vocab[:5] == list(data.SPECIALS) and vocab[5] == "the" and vocab.index("cat") < vocab.index("dog")
    tok = data.WordPieceTokenizer(vocab)
    assert all(tok.unk_id not in tok.encode(t) for t in corpus + ["zebra tac god", "ubernaive"])
    small = data.build_vocab(corpus, max_size=len(vocab) - 3)
    assert len(small) == len(vocab) - 3 and "the" in small and "zebras" not in small
    assert data.WordPieceTokenizer(small).unk_id not in data.WordPieceTokenizer(small).encode("zebras")
    assert "sat" not in data.build_vocab(corpus, min_freq=2) and "cat" in data.build_vocab(corpus, min_freq=2)


# ----------------------------------------------------------------------------- images and readers
def write_png(path, mode="RGB", size=(12, 10), value=None):
    value = value if value is not None else {"RGB": (200, 30, 30), "L": 128, "RGBA": (255, 0, 0, 0),
                                             "LA": (0, 0), "I;16": 65535, "P": 3}[mode]
    Image.new(mode, size, value).save(path)
    return path


@pytest.mark.parametrize("mode,expected", [("RGB", (200 / 255, 30 / 255, 30 / 255)), ("L", (128 / 255,) * 3),
                                           ("RGBA", (1.0, 1.0, 1.0)), ("LA", (1.0, 1.0, 1.0)),
                                           ("I;16", (1.0, 1.0, 1.0)), ("P", None)])
def test_load_image_modes(tmp_path, mode, expected):
    x = data.load_image(write_png(tmp_path / "x.png", mode), 8)  # transparent RGBA/LA -> white
    assert x.shape == (3, 8, 8) and x.dtype == torch.float32
    if expected is not None:
        assert torch.allclose(data.denormalize(x).mean((1, 2)), torch.tensor(expected), atol=0.01)
    half = Image.fromarray(np.full((4, 4), 32896, dtype=np.uint16))  # mid-grey 16-bit
    half.save(tmp_path / "half.png")
    assert abs(data.denormalize(data.load_image(tmp_path / "half.png", 4)).mean() - 0.5) < 0.01


def test_bad_images_raise_dataerror(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    good = write_png(tmp_path / "good.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(good[: len(good) // 2])
    (tmp_path / "junk.png").write_bytes(b"not an image at all")
    for name in ("empty.png", "cut.png", "junk.png"):
        with pytest.raises(DataError, match=f"unreadable image .*{name}"):
            data.load_image(tmp_path / name, 8)


@pytest.fixture
def image_root(tmp_path):
    root = tmp_path / "imgs"
    root.mkdir()
    for name in ("a.png", "b.png"):
        write_png(root / name, size=(16, 16))
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    return root


READERS = {  # dataset, a good row, bad rows with the problem each must report
    "pretrain": (data.PretrainDataset, {"image": "a.png", "caption": ["a red thing", "red"]},
                 [({"image": "a.png"}, "missing key 'caption'"), ({"image": "a.png", "caption": "  "}, "empty"),
                  ({"image": "a.png", "caption": ["x", ""]}, "non-empty")]),
    "retrieval_train": (data.RetrievalTrainDataset, {"image": "a.png", "caption": "red", "image_id": 7},
                        [({"image": "a.png", "caption": "red", "image_id": 1.5}, "'image_id' should be")]),
    "retrieval_test": (data.RetrievalEvalDataset, {"image": "a.png", "caption": ["red", "a red square"]},
                       [({"caption": ["x"]}, "missing key 'image'")]),
    "vqa_train": (data.VQADataset, {"question_id": 5, "question": "what?", "image": "a.png", "answer": "red"},
                  [({"question_id": 6, "image": "a.png", "answer": ["x"]}, "missing key 'question'")]),
    "nlvr2_train": (data.NLVR2Dataset, {"images": ["a.png", "b.png"], "sentence": "s", "label": "False"},
                    [({"images": ["a.png"], "sentence": "s", "label": "True"}, "exactly 2 images"),
                     ({"images": ["a.png", "b.png"], "sentence": "s", "label": "yes"}, "label")]),
}


@pytest.mark.parametrize("name", READERS)
def test_reader_bad_rows_raise_or_are_skipped(tmp_path, image_root, name):
    cls, good, bad = READERS[name]
    for row, problem in bad:
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps([good, good, row]))
        with pytest.raises(DataError, match=rf"^{name}\.json row 2: .*{problem}"):
            cls(path, image_root, 8)
        ds = cls(path, image_root, 8, skip_bad=True)
        assert len(ds) == 2 and sum(ds.skipped.values()) == 1 and problem.split()[0] in next(iter(ds.skipped))


@pytest.mark.parametrize("name", READERS)
def test_reader_missing_and_corrupt_images(tmp_path, image_root, name):
    cls, good, _ = READERS[name]
    path = tmp_path / f"{name}.json"
    for image, problem in (("missing.png", "image not found: .*missing.png"), ("corrupt.png", "unreadable image")):
        row = json.loads(json.dumps(good).replace("a.png", image))
        path.write_text(json.dumps([good, row]))
        ds = cls(path, image_root, 8)
        assert ds[0] is not None
        with pytest.raises(DataError, match=rf"^{name}\.json row 1: {problem}"):
            ds[1]
        ds = cls(path, image_root, 8, skip_bad=True)
        assert isinstance(ds[1], data.Skip) and ds[1] == problem.split(":")[0]


def test_reader_file_level_errors(tmp_path, image_root):
    path = tmp_path / "vqa_val.json"
    with pytest.raises(DataError, match="vqa_val.json: file not found"):
        data.VQADataset(path, image_root, 8)
    path.write_text(json.dumps({"question": "not a list"}))
    with pytest.raises(DataError, match="vqa_val.json: expected a JSON list"):
        data.VQADataset(path, image_root, 8)
    path.write_text("[{")
    with pytest.raises(DataError, match="vqa_val.json: not valid JSON"):
        data.VQADataset(path, image_root, 8)
    path.write_text("[]")
    with pytest.raises(DataError, match="image root does not exist"):
        data.VQADataset(path, tmp_path / "nowhere", 8)
    path.write_text(json.dumps(["a string row"]))
    with pytest.raises(DataError, match="vqa_val.json row 0: row is a str"):
        data.VQADataset(path, image_root, 8)


def test_reader_items(tmp_path, image_root):
    def make(name, rows, cls, **kw):
        (tmp_path / name).write_text(json.dumps(rows))
        return cls(tmp_path / name, image_root, 8, **kw)
    rt = make("rt.json", [{"image": "a.png", "caption": "x", "image_id": "coco_9"},
                          {"image": "b.png", "caption": "y", "image_id": "coco_3"},
                          {"image": "a.png", "caption": "z", "image_id": "coco_9"}], data.RetrievalTrainDataset)
    assert [rt[i]["image_id"] for i in range(3)] == [0, 1, 0] and rt[1]["text"] == "y"
    ev = make("re.json", [{"image": "a.png", "caption": ["p", "q"]}, {"image": "b.png", "caption": "r"}],
              data.RetrievalEvalDataset)
    assert ev.texts == ["p", "q", "r"] and ev.img2txt == [[0, 1], [2]] and ev.txt2img == [0, 0, 1]
    assert set(ev[1]) == {"image", "index"} and ev[1]["index"] == 1
    (tmp_path / "answers.json").write_text(json.dumps(["red", "blue"]))
    vqa = make("v.json", [{"question_id": 5, "question": "q?", "image": "a.png", "answer": "red"},
                          {"question_id": 6, "question": "q2?", "image": "a.png"}], data.VQADataset,
               answer_list_path=tmp_path / "answers.json")
    assert vqa[0]["answers"] == ["red"] and vqa[1]["answers"] == [] and vqa.answer_list == ["red", "blue"]
    nl = make("n.json", [{"images": ["a.png", "b.png"], "sentence": "s", "label": "True",
                          "identifier": "x-1-0-0"}], data.NLVR2Dataset)
    assert nl[0]["label"] == 1 and nl[0]["identifier"] == "x-1-0-0" and nl[0]["image1"].shape == (3, 8, 8)


def test_pretrain_flip_swaps_left_right_and_is_seeded(tmp_path):
    # left half red, right half blue; the caption must follow a flip
    pixels = np.zeros((32, 32, 3), np.uint8)
    pixels[:, :16] = (255, 0, 0)
    pixels[:, 16:] = (0, 0, 255)
    Image.fromarray(pixels).save(tmp_path / "lr.png")
    (tmp_path / "p.json").write_text(json.dumps([{"image": "lr.png", "caption": "red on the left"}] * 2))
    ds = data.PretrainDataset(tmp_path / "p.json", tmp_path, 16, augment=True, seed=1)
    texts = set()
    for epoch in range(12):
        ds.set_epoch(epoch)
        item = ds[0]
        red_left = item["image"][0, :, :4].mean() > item["image"][0, :, -4:].mean()
        assert item["text"] == ("red on the left" if red_left else "red on the right")
        texts.add(item["text"])
        again = data.PretrainDataset(tmp_path / "p.json", tmp_path, 16, augment=True, seed=1)
        again.set_epoch(epoch)
        assert torch.equal(again[0]["image"], item["image"])  # a pure function of (seed, epoch, index)
    assert len(texts) == 2


# ----------------------------------------------------------------------------- collate and loaders
def test_collator_pads_masks_and_counts_skips():
    tok = data.WordPieceTokenizer(VOCAB)
    collate = data.Collator(tok, max_len=5)
    items = [{"image": torch.zeros(3, 4, 4), "text": "hello", "label": 1, "identifier": "a", "answers": ["x"]},
             data.Skip("unreadable image"),
             {"image": torch.ones(3, 4, 4), "text": "hello world hello world", "label": 0, "identifier": "b",
              "answers": ["y", "z"]}]
    batch = collate(items)
    assert batch["skipped"] == {"unreadable image": 1} and batch["image"].shape == (2, 3, 4, 4)
    hello, world = VOCAB.index("hello"), VOCAB.index("world")
    assert batch["text_ids"].tolist() == [[2, hello, 3, 0, 0], [2, hello, world, hello, 3]]
    assert batch["text_mask"].tolist() == [[True, True, True, False, False], [True] * 5]
    assert batch["text_mask"].dtype == torch.bool and batch["label"].dtype == torch.long
    assert batch["identifier"] == ["a", "b"] and batch["answers"] == [["x"], ["y", "z"]]
    assert collate([data.Skip("image not found")] * 2) == {"skipped": {"image not found": 2}}


class Numbers(torch.utils.data.Dataset):
    def __len__(self):
        return 20

    def __getitem__(self, i):
        return {"index": i}


def order(loader):
    return [i for batch in loader for i in batch["index"].tolist()]


def test_loader_order_is_a_function_of_seed_and_epoch():
    collate = data.Collator(data.WordPieceTokenizer(VOCAB), 8)
    first = data.make_loader(Numbers(), 4, collate, shuffle=True, seed=5)
    epochs = []
    for epoch in range(3):
        data.loader_set_epoch(first, epoch)
        epochs.append(order(first))
    assert all(sorted(e) == list(range(20)) for e in epochs) and len({tuple(e) for e in epochs}) == 3
    resumed = data.make_loader(Numbers(), 4, collate, shuffle=True, seed=5)
    data.loader_set_epoch(resumed, 2)
    assert order(resumed) == epochs[2]
    assert order(data.make_loader(Numbers(), 4, collate, shuffle=True, seed=5)) == epochs[0]
    assert order(data.make_loader(Numbers(), 4, collate, shuffle=True, seed=6)) != epochs[0]
    assert order(data.make_loader(Numbers(), 4, collate, shuffle=False)) == list(range(20))
    state = torch.get_rng_state()
    order(first)
    assert torch.equal(torch.get_rng_state(), state)  # iterating leaves the global RNG (model side) alone


def test_worker_processes_give_the_same_batches(world):
    tok = data.WordPieceTokenizer.from_file(world["vocab"])
    ds = data.PretrainDataset(world["pretrain"], world["root"], 32, augment=True, seed=2)
    batches = []
    for workers in (0, 2):
        loader = data.make_loader(ds, 8, data.Collator(tok, 30), shuffle=True, seed=1, num_workers=workers)
        data.loader_set_epoch(loader, 3)
        batches.append(list(loader))
    assert len(batches[0]) == 5
    for a, b in zip(*batches):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["text_ids"], b["text_ids"])
        assert tok.unk_id not in a["text_ids"]  # the world's vocabulary covers its captions
