"""Tests of data.py: images, the readers against hand-written files (good and bad), collate and loader order."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data  # noqa: E402
import tokenization  # noqa: E402
from conftest import VOCAB  # noqa: E402
from data import DataError  # noqa: E402


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
    tok = tokenization.WordPieceTokenizer(VOCAB)
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
    collate = data.Collator(tokenization.WordPieceTokenizer(VOCAB), 8)
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


def test_worker_processes_give_the_same_batches(small_world):
    world = small_world
    tok = tokenization.WordPieceTokenizer.from_file(world["vocab"])
    ds = data.PretrainDataset(world["pretrain"], world["root"], 32, augment=True, seed=2)
    batches = []
    for workers in (0, 2):  # two epochs of one loader: its workers persist and see the new epoch
        loader = data.make_loader(ds, 8, data.Collator(tok, 30), shuffle=True, seed=1, num_workers=workers)
        assert loader.persistent_workers == (workers > 0)
        epochs = []
        for epoch in (3, 4):
            data.loader_set_epoch(loader, epoch)
            epochs.append(list(loader))
        batches.append(epochs)
    assert len(batches[0][0]) == -(-len(ds) // 8)  # the last batch is short
    for epoch in (0, 1):
        for a, b in zip(batches[0][epoch], batches[1][epoch]):
            assert torch.equal(a["image"], b["image"]) and torch.equal(a["text_ids"], b["text_ids"])
            assert tok.unk_id not in a["text_ids"]  # the world's vocabulary covers its captions
    first, second = ({int(i): img for b in epoch for i, img in zip(b["index"], b["image"])} for epoch in batches[1])
    assert any(not torch.equal(first[i], second[i]) for i in first)  # epoch 4's crops and flips are new draws


def test_subset_keeps_rows_and_file_row_numbers(tmp_path, image_root):
    rows = [{"image": "a.png", "caption": f"c{i}", "image_id": i} for i in range(4)]
    rows[3]["image"] = "missing.png"
    (tmp_path / "rt.json").write_text(json.dumps(rows))
    ds = data.RetrievalTrainDataset(tmp_path / "rt.json", image_root, 8)
    ds.subset([1, 3])
    assert len(ds) == 2 and ds[0]["text"] == "c1"
    with pytest.raises(DataError, match="rt.json row 3: image not found"):  # the file's row, not the subset's
        ds[1]
