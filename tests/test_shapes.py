"""Tests of shapes.py: the shapes world against its ground truth (pixels, captions, answers, labels)."""
import json
import re
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data  # noqa: E402
import shapes  # noqa: E402
import tokenization  # noqa: E402

SMALL = dict(n_train=40, n_val=10, n_test=10, nlvr2_per_split=(40, 8, 8))
NUM = {w: i for i, w in enumerate(["zero", "one", "two", "three", "four", "five", "six", "seven", "eight"])}
MARGIN = 0.1 * 64  # the generator's relation margin at image_size 64


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return shapes.make_shapes_world(tmp_path_factory.mktemp("world"), seed=3, **SMALL)


def load(path):
    return json.loads(Path(path).read_text())


def scenes_of(world):
    return {s["image"]: s["objects"] for s in load(world["scenes"])}


# ----------------------------------------------------------------------------- shapes world
def test_generator_is_deterministic_and_ensure_reuses(world, tmp_path):
    other = shapes.make_shapes_world(tmp_path / "again", seed=3, **SMALL)
    files = sorted(p.relative_to(world["root"]) for p in Path(world["root"]).rglob("*") if p.is_file())
    assert len(files) == 60 + 12 + 2  # images, json files, vocab.txt and manifest.json
    for rel in files:
        assert (world["root"] / rel).read_bytes() == (other["root"] / rel).read_bytes(), rel
    # ensure_* keeps a matching world (mtime unchanged) and rebuilds for different parameters
    stamp = (other["root"] / "pretrain.json").stat().st_mtime_ns
    shapes.ensure_shapes_world(other["root"], seed=3, **SMALL)
    assert (other["root"] / "pretrain.json").stat().st_mtime_ns == stamp
    shapes.ensure_shapes_world(other["root"], seed=4, **SMALL)
    assert load(other["root"] / "manifest.json")["seed"] == 4
    assert (other["root"] / "pretrain.json").read_bytes() != (world["root"] / "pretrain.json").read_bytes()


def test_the_scripts_keep_a_world_made_with_other_sizes(world, tmp_path, monkeypatch):
    """shapes_world (--data-dir) uses a finished world of any sizes as it is; an absent, unfinished or
    older-version one is made with the defaults (make_shapes_world stood in for: the real one takes 25 s)."""
    made = []
    monkeypatch.setattr(shapes, "make_shapes_world", lambda root, **kw: made.append(Path(root)))
    stamp = (world["root"] / "nlvr2_train.json").stat().st_mtime_ns
    assert shapes.shapes_world(world["root"], 0, 1)["nlvr2_train"] == world["root"] / "nlvr2_train.json"
    assert made == [] and (world["root"] / "nlvr2_train.json").stat().st_mtime_ns == stamp
    old = tmp_path / "old"
    old.mkdir()
    (old / "manifest.json").write_text(json.dumps(load(world["root"] / "manifest.json") | {"version": 1}))
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "pretrain.json").write_text("[]")  # files but no manifest: an interrupted make
    for folder in (tmp_path / "absent", old, unfinished):
        shapes.shapes_world(folder, 0, 1)
    assert made == [tmp_path / "absent", old, unfinished]
    shapes.shapes_world(tmp_path / "absent2", 1, 1)  # another rank never writes
    assert len(made) == 3


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
        assert all(set(r) == {"question_id", "question", "image", "answer", "dataset", "question_type", "answer_type"}
                   and len(r["answer"]) == 10 and r["dataset"] == "shapes" for r in rows)
        qids += [r["question_id"] for r in rows]
    assert len(set(qids)) == len(qids)
    for split, n in (("train", 40), ("val", 8), ("test", 8)):
        rows = load(world[f"nlvr2_{split}"])
        assert len(rows) == n and all(len(r["images"]) == 2 and r["label"] in ("True", "False") for r in rows)
        assert all(r["identifier"].startswith(f"{split}-") and im.startswith(f"images/{split}_")
                   for r in rows for im in r["images"])
    assert tokenization.WordPieceTokenizer.from_file(world["vocab"]).vocab[:5] == list(tokenization.SPECIALS)


def test_scene_metadata_matches_pixels(world):
    # the centre pixel of every object has its colour: the ground truth used below describes the image
    for image, objects in scenes_of(world).items():
        pixels = np.asarray(Image.open(world["root"] / image).convert("RGB"))
        assert 1 <= len(objects) <= 4
        for o in objects:
            assert tuple(pixels[int(o["cy"]), int(o["cx"])]) == shapes.COLOURS[o["colour"]], (image, o)


def _has(objs, colour, shape, size=None):
    return any(o["colour"] == colour and o["shape"] == shape and size in (None, o["size"]) for o in objs)


def _rel(a, b, rel):
    dx, dy = a["cx"] - b["cx"], a["cy"] - b["cy"]
    return {"left of": dx < -MARGIN, "right of": dx > MARGIN, "above": dy < -MARGIN, "below": dy > MARGIN}[rel]


def _region(o):  # the 3 x 3 grid of the image the captions name a lone object's place by
    return ("top", "middle", "bottom")[min(2, int(3 * o["cy"] / 64))], ("left", "centre", "right")[min(2, int(3 * o["cx"] / 64))]


def caption_is_true(caption, objs):
    """An independent reading of every caption template: true when it names exactly the scene's objects (size,
    colour, shape), a lone object's region, and a true count or relation. An unknown template counts as false."""
    def the(colour, shape):
        found = [o for o in objs if (o["colour"], o["shape"]) == (colour, shape)]
        return found[0] if len(found) == 1 else None
    everything = sorted((o["size"], o["colour"], o["shape"]) for o in objs)
    obj = r"an? (small|large) (\w+) (circle|square|triangle)"
    rel = r"(left of|right of|above|below)"
    if m := re.fullmatch(f"{obj} {rel} {obj}", caption):  # two objects and how they lie
        a, b = the(*m.group(2, 3)), the(*m.group(6, 7))
        return sorted([m.group(1, 2, 3), m.group(5, 6, 7)]) == everything and _rel(a, b, m.group(4))
    m = re.fullmatch(r"(?:(\w+) shapes?: |there (?:is|are) (\w+) objects?: )?(.+?)"
                     r"(?: at the (top|middle|bottom) (left|centre|right))?"
                     rf"(?: on a noisy background|; the (\w+) (\w+) is {rel} the (\w+) (\w+))?", caption)
    listing = re.fullmatch(rf"{obj}((, {obj})* and {obj})?", m.group(3)) if m else None
    if not listing:
        return False
    count = m.group(1) or m.group(2)
    region = m.group(4, 5) if m.group(4) else None
    relation = m.group(6) and _rel(the(*m.group(6, 7)), the(*m.group(9, 10)), m.group(8))
    return (sorted(re.findall(obj, m.group(3))) == everything and (count is None or NUM[count] == len(objs))
            and (region == _region(objs[0]) if len(objs) == 1 else region is None)
            and (m.group(6) is None or relation))


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
    red = {"shape": "circle", "colour": "red", "size": "small", "cx": 10.0, "cy": 10.0}
    assert caption_is_true("one shape: a small red circle at the top left", [red])
    assert not caption_is_true("two shapes: a small red circle at the top left", [red])
    assert not caption_is_true("a small red circle at the bottom left", [red])
    assert not caption_is_true("a small red circle", [red, red | {"colour": "blue", "cx": 50.0}])  # names one of two


def test_each_val_and_test_caption_names_one_image(world):
    for split in ("val", "test"):
        owners = {}
        for row in load(world[f"retrieval_{split}"]):
            for caption in set(row["caption"]):
                assert owners.setdefault(caption, row["image"]) == row["image"], (caption, owners[caption], row["image"])


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
            # the recorded types, read independently from the question's wording (VQA v2's answer types)
            q = row["question"]
            kind = ("existence" if q.startswith("is there") else "count" if q.startswith("how many") else
                    "relation" if re.search(r"(left of|right of|above|below) the", q) else
                    "colour" if q.startswith("what color") else "shape")
            answer_type = {"existence": "yes/no", "count": "number"}.get(kind, "other")
            assert (row["question_type"], row["answer_type"]) == (kind, answer_type), row
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

