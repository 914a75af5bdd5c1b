"""Tests of prepare.py on small files written in the official formats (GT-Vision-Lab VQA v2, Visual Genome QA,
Karpathy's split files, lil-lab/nlvr NLVR2 JSON lines, img2dataset's folders and webdataset shards), each read
back with data.py's own readers. Expected rows and answer lists are written out by hand."""
import hashlib
import io
import json
import sys
import tarfile
from pathlib import Path

import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data  # noqa: E402
import prepare  # noqa: E402


def write_image(path, color=(200, 30, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 6), color).save(path)  # JPEG or PNG by the extension
    return path


def jpeg_bytes(color=(0, 90, 200)):
    buf = io.BytesIO()
    Image.new("RGB", (8, 6), color).save(buf, format="JPEG")
    return buf.getvalue()


def write_json(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj), encoding="utf-8")
    return path


def run(*argv):
    prepare.main([str(a) for a in argv])


def load(folder, name):
    return json.loads((Path(folder) / name).read_text(encoding="utf-8"))


def check_manifest(out):
    """Every file's sha256 is right, and per split rows in = rows out + skips."""
    manifest = load(out, "manifest.json")
    for name, digest in manifest["files"].items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == digest, name
    for split, s in manifest["splits"].items():
        assert s["rows_in"] == s["rows_out"] + sum(s["skipped"].values()), split
    return manifest


def assert_bad_input(capsys, argv, *fragments):
    with pytest.raises(SystemExit) as e:
        run(*argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    err = err.strip().splitlines()[-1]  # one line, after the progress bars
    assert err.startswith("error: ")
    for fragment in fragments:
        assert fragment in err, (fragment, err)


# ----------------------------------------------------------------------------- VQA v2 + Visual Genome
def ann(qid, image_id, answers, qtype="how many", atype="number"):
    return {"question_type": qtype, "multiple_choice_answer": answers[0], "image_id": image_id, "answer_type": atype,
            "question_id": qid, "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1}
                                            for i, a in enumerate(answers)]}


@pytest.fixture
def vqa_download(tmp_path):
    """Official VQA v2 files: train and val with annotations, test-dev with questions only. Image 99 is missing."""
    qdir, coco = tmp_path / "vqa", tmp_path / "coco"
    for split, ids in (("train2014", (9, 25)), ("val2014", (42,)), ("test2015", (1,))):
        for i in ids:
            write_image(coco / split / f"COCO_{split}_{i:012d}.jpg")
    train = [(9000, 9, ["two"] * 4 + ["2"] * 3 + ["Two."] * 3),  # all "2" once normalised: the majority
             (9001, 9, ["2"] * 10), (25000, 25, ["yes"] * 10), (25001, 25, ["yes"] * 9 + ["no"]),
             (99000, 99, ["red"] * 10)]  # image missing: skipped, so not counted for the answer list
    val = [(42000, 42, ["Yes"] * 6 + ["no"] * 4), (42001, 42, ["red"] * 10)]
    for split, rows in (("train2014", train), ("val2014", val)):
        write_json(qdir / f"v2_OpenEnded_mscoco_{split}_questions.json",
                   {"info": {}, "task_type": "Open-Ended", "data_type": "mscoco", "license": {}, "data_subtype": split,
                    "questions": [{"image_id": i, "question": f"question {q}?", "question_id": q} for q, i, _ in rows]})
        write_json(qdir / f"v2_mscoco_{split}_annotations.json",
                   {"info": {}, "license": {}, "data_subtype": split, "data_type": "mscoco",
                    "annotations": [ann(q, i, a) for q, i, a in rows]})
    write_json(qdir / "v2_OpenEnded_mscoco_test-dev2015_questions.json",
               {"data_subtype": "test-dev2015", "questions": [{"image_id": 1, "question": "What is it?",
                                                                "question_id": 1000}]})
    return qdir, coco


def test_vqa_rows_answer_list_and_manifest(vqa_download, tmp_path):
    qdir, coco = vqa_download
    out = tmp_path / "out"
    run("vqa", "--questions-dir", qdir, "--coco-root", coco, "--out", out, "--min-answer-count", "2")
    train = load(out, "train.json")
    assert [r["question_id"] for r in train] == [9000, 9001, 25000, 25001]
    assert train[0] == {"question_id": 9000, "question": "question 9000?", "dataset": "vqa",
                        "image": "train2014/COCO_train2014_000000000009.jpg",
                        "answer": ["two"] * 4 + ["2"] * 3 + ["Two."] * 3,  # all ten human answers, as written
                        "question_type": "how many", "answer_type": "number"}
    # test-dev: no answers, images in test2015
    assert load(out, "test-dev.json") == [{"question_id": 1000, "question": "What is it?", "dataset": "vqa",
                                           "image": "test2015/COCO_test2015_000000000001.jpg"}]
    # majority answers, normalised: "2" (9000, 9001), "yes" (25000, 25001, 42000), "red" once (42001; 99000 dropped)
    assert load(out, "answer_list.json") == ["yes", "2"]
    manifest = check_manifest(out)
    assert manifest["splits"]["train"] == {"rows_in": 5, "rows_out": 4, "skipped": {"image missing": 1}}
    assert manifest["splits"]["test-dev"] == {"rows_in": 1, "rows_out": 1, "skipped": {}}
    assert manifest["answer_list"]["splits"] == ["train", "val"] and manifest["answer_list"]["min_count"] == 2
    assert sorted(manifest["files"]) == ["answer_list.json", "test-dev.json", "train.json", "val.json"]
    # data.py reads them: ten answers for training, none for test-dev
    ds = data.VQADataset(out / "train.json", coco, 16, answer_list_path=out / "answer_list.json")
    assert ds.answer_list == ["yes", "2"] and len(ds[0]["answers"]) == 10 and ds[0]["image"].shape == (3, 16, 16)
    assert data.VQADataset(out / "test-dev.json", coco, 16)[0]["answers"] == []


def test_vqa_normalisation_merges_answers(vqa_download, tmp_path):
    """Without the official normalisation, question 9000's majority would be "two" and "2" would count once."""
    qdir, coco = vqa_download
    out = tmp_path / "out"
    run("vqa", "--questions-dir", qdir, "--coco-root", coco, "--out", out, "--min-answer-count", "2",
        "--answer-splits", "train")
    assert load(out, "answer_list.json") == ["2", "yes"]  # train only: 2 questions each, ties alphabetical


def test_vqa_is_deterministic(vqa_download, tmp_path):
    qdir, coco = vqa_download
    for out in ("a", "b"):
        run("vqa", "--questions-dir", qdir, "--coco-root", coco, "--out", tmp_path / out, "--workers", "3")
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "b").iterdir()) and "manifest.json" in names
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_visual_genome_rows_and_merge(vqa_download, tmp_path):
    qdir, coco = vqa_download
    write_image(coco / "vg" / "VG_100K" / "1.jpg")
    write_image(coco / "vg" / "VG_100K_2" / "2.jpg")
    qas = [{"id": 1, "qas": [{"a_objects": [], "question": "What color is it?", "image_id": 1, "qa_id": 986768,
                              "answer": "Yes.", "q_objects": []},  # normalises to "yes": in the answer list
                             {"question": "What is it?", "image_id": 1, "qa_id": 986769, "answer": "purple"}]},
           {"id": 2, "qas": [{"question": "How many?", "image_id": 2, "qa_id": 5, "answer": "Two"}]},
           {"id": 3, "qas": [{"question": "Is it?", "image_id": 3, "qa_id": 6, "answer": "yes"}]},  # no image 3
           {"id": 4, "qas": []}]
    vg = write_json(tmp_path / "vg" / "question_answers.json", qas)
    out = tmp_path / "out"
    run("vqa", "--questions-dir", qdir, "--coco-root", coco, "--out", out, "--min-answer-count", "2",
        "--vg-qa", vg, "--vg-images", coco / "vg", "--merge", "train+val+vg")
    rows = load(out, "vg.json")
    assert rows == [{"question_id": 986768, "question": "What color is it?", "image": "vg/VG_100K/1.jpg",
                     "answer": ["Yes."], "dataset": "vg"},
                    {"question_id": 5, "question": "How many?", "image": "vg/VG_100K_2/2.jpg", "answer": ["Two"],
                     "dataset": "vg"}]
    assert check_manifest(out)["splits"]["vg"]["skipped"] == {"answer not in answer_list.json": 1, "image missing": 1}
    assert load(out, "train+val+vg.json") == load(out, "train.json") + load(out, "val.json") + rows
    assert len(data.VQADataset(out / "train+val+vg.json", coco, 16)) == 4 + 2 + 2


def test_vqa_bad_input_names_file_and_row(vqa_download, tmp_path, capsys):
    qdir, coco = vqa_download
    path = qdir / "v2_OpenEnded_mscoco_val2014_questions.json"
    questions = json.loads(path.read_text())
    del questions["questions"][1]["image_id"]
    write_json(path, questions)
    out = tmp_path / "out"
    argv = ("vqa", "--questions-dir", qdir, "--coco-root", coco, "--out", out)
    assert_bad_input(capsys, argv, str(path), "questions row 1", "missing 'image_id'")
    assert not out.exists()  # nothing written, not even the splits that were fine
    assert_bad_input(capsys, argv + ("--merge", "train+vg"), "--merge train+vg", "train, val, test-dev")
    path.write_text(path.read_text()[:-20])  # truncated
    assert_bad_input(capsys, argv, str(path), "not valid JSON")
    path.unlink()
    (qdir / "v2_mscoco_val2014_annotations.json").unlink()
    ann_path = qdir / "v2_mscoco_train2014_annotations.json"
    anns = json.loads(ann_path.read_text())
    anns["annotations"][2]["answers"][4] = {"answer": 7}
    write_json(ann_path, anns)
    assert_bad_input(capsys, argv, str(ann_path), "annotations row 2, answers[4]", "'answer' should be str, got int")


# ----------------------------------------------------------------------------- Karpathy splits
def karpathy_image(imgid, split, captions, filename, filepath=None, cocoid=None):
    row = {"sentids": list(range(len(captions))), "imgid": imgid, "split": split, "filename": filename,
           "sentences": [{"tokens": c.lower().split(), "raw": c, "imgid": imgid, "sentid": k}
                         for k, c in enumerate(captions)]}
    row.update({} if filepath is None else {"filepath": filepath}, **({} if cocoid is None else {"cocoid": cocoid}))
    return row


def test_karpathy_coco(tmp_path):
    coco = tmp_path / "coco"
    name = lambda split, i: f"COCO_{split}_{i:012d}.jpg"  # noqa: E731
    for split, i in (("train2014", 57870), ("val2014", 522418), ("val2014", 391895), ("val2014", 184613)):
        write_image(coco / split / name(split, i))
    images = [karpathy_image(0, "train", ["A dog runs.", "  ", "A dog."], name("train2014", 57870), "train2014", 57870),
              karpathy_image(1, "restval", ["A cat sits."], name("val2014", 522418), "val2014", 522418),
              karpathy_image(2, "restval", ["Gone."], name("val2014", 7), "val2014", 7),  # image missing
              karpathy_image(3, "val", ["One.", "Two."], name("val2014", 391895), "val2014", 391895),
              karpathy_image(4, "test", ["Three.", "Four.", "Five."], name("val2014", 184613), "val2014", 184613)]
    split_file = write_json(tmp_path / "dataset_coco.json", {"images": images, "dataset": "coco"})
    out = tmp_path / "out"
    run("karpathy", "--split-file", split_file, "--image-root", coco, "--out", out)
    train_image, restval_image = "train2014/" + name("train2014", 57870), "val2014/" + name("val2014", 522418)
    assert load(out, "train.json") == [{"image": train_image, "caption": "A dog runs.", "image_id": 57870},
                                       {"image": train_image, "caption": "A dog.", "image_id": 57870},
                                       {"image": restval_image, "caption": "A cat sits.", "image_id": 522418}]
    assert load(out, "val.json") == [{"image": "val2014/" + name("val2014", 391895), "caption": ["One.", "Two."]}]
    assert load(out, "test.json")[0]["caption"] == ["Three.", "Four.", "Five."]
    assert load(out, "pretrain.json") == [{"image": train_image, "caption": ["A dog runs.", "A dog."]},
                                          {"image": restval_image, "caption": ["A cat sits."]}]
    splits = check_manifest(out)["splits"]
    assert splits["train"] == {"rows_in": 5, "rows_out": 3, "skipped": {"empty caption": 1, "image missing": 1}}
    assert splits["pretrain"] == {"rows_in": 3, "rows_out": 2, "skipped": {"image missing": 1}}
    train = data.RetrievalTrainDataset(out / "train.json", coco, 16)
    assert [train[i]["image_id"] for i in range(3)] == [0, 0, 1]  # renumbered by data.py in order
    ev = data.RetrievalEvalDataset(out / "test.json", coco, 16)
    assert ev.texts == ["Three.", "Four.", "Five."] and ev.img2txt == [[0, 1, 2]]
    assert data.PretrainDataset(out / "pretrain.json", coco, 16)[1]["text"] == "A cat sits."


def test_karpathy_flickr_and_bad_split(tmp_path, capsys):
    root = tmp_path / "flickr30k-images"
    write_image(root / "1000092795.jpg")
    images = [karpathy_image(0, "train", ["Two young guys."], "1000092795.jpg"),
              karpathy_image(1, "val", ["Hi."], "1000092795.jpg"), karpathy_image(2, "test", ["Ho."], "1000092795.jpg")]
    split_file = write_json(tmp_path / "dataset_flickr30k.json", {"images": images, "dataset": "flickr30k"})
    run("karpathy", "--split-file", split_file, "--image-root", root, "--out", tmp_path / "out", "--check", "exists")
    assert load(tmp_path / "out", "train.json") == [{"image": "1000092795.jpg", "caption": "Two young guys.",
                                                     "image_id": 0}]  # no cocoid: Karpathy's imgid
    images[2]["split"] = "dev"
    write_json(split_file, {"images": images})
    assert_bad_input(capsys, ("karpathy", "--split-file", split_file, "--image-root", root, "--out", tmp_path / "o2"),
                     str(split_file), "images row 2", "'dev'")


# ----------------------------------------------------------------------------- NLVR2
def nlvr2_line(identifier, label, sentence="There are two dogs.", **extra):
    return json.dumps({"validation": {"77": label}, "sentence": sentence, "left_url": "http://a/l.jpg", "writer": "103",
                       "label": label, "right_url": "http://a/r.jpg", "synset": "dog", "query": "dogs2",
                       "identifier": identifier, "extra_validations": {}, **extra})


def test_nlvr2(tmp_path, capsys):
    ddir, root = tmp_path / "nlvr2" / "data", tmp_path / "images"
    ddir.mkdir(parents=True)
    for k in (0, 1):
        write_image(root / "train" / "3" / f"train-10171-0-img{k}.png")
        write_image(root / "images" / "dev" / f"dev-850-0-img{k}.png")  # the dev zip's own layout
    write_image(root / "images" / "dev" / "dev-851-2-img0.png")  # its img1 is missing
    (ddir / "train.json").write_text(nlvr2_line("train-10171-0-1", "True", directory=3) + "\n")
    (ddir / "dev.json").write_text("\n".join([nlvr2_line("dev-850-0-0", "False"), nlvr2_line("dev-851-2-1", "True"),
                                              nlvr2_line("dev-850-0-1", "True", sentence=" ")]) + "\n")
    out = tmp_path / "out"
    run("nlvr2", "--data-dir", ddir, "--image-root", root, "--out", out)
    assert load(out, "train.json") == [{"images": ["train/3/train-10171-0-img0.png", "train/3/train-10171-0-img1.png"],
                                        "sentence": "There are two dogs.", "label": "True",
                                        "identifier": "train-10171-0-1"}]
    assert load(out, "val.json") == [{"images": ["images/dev/dev-850-0-img0.png", "images/dev/dev-850-0-img1.png"],
                                      "sentence": "There are two dogs.", "label": "False", "identifier": "dev-850-0-0"}]
    assert check_manifest(out)["splits"]["val"]["skipped"] == {"empty sentence": 1, "image missing": 1}
    item = data.NLVR2Dataset(out / "val.json", root, 16)[0]
    assert item["identifier"] == "dev-850-0-0" and item["label"] == 0 and item["image1"].shape == (3, 16, 16)
    # a malformed line, a train row without its directory, an identifier that is not split-set-pair-sentence
    argv = ("nlvr2", "--data-dir", ddir, "--image-root", root, "--out", tmp_path / "o2")
    (ddir / "dev.json").write_text(nlvr2_line("dev-850-0-0", "False") + "\n{\"sentence\": \n")
    assert_bad_input(capsys, argv, str(ddir / "dev.json"), "line 2", "not valid JSON")
    (ddir / "dev.json").write_text(nlvr2_line("dev-850-0", "False") + "\n")
    assert_bad_input(capsys, argv, "dev.json line 1", "'dev-850-0' is not split-set-pair-sentence")
    (ddir / "train.json").write_text(nlvr2_line("train-10171-0-1", "True") + "\n")
    assert_bad_input(capsys, argv, "train.json line 1", "missing 'directory'")
    assert not (tmp_path / "o2").exists()


# ----------------------------------------------------------------------------- img2dataset
def meta(key, caption, status="success"):
    return json.dumps({"url": f"http://x/{key}.jpg", "caption": caption, "key": key, "status": status,
                       "error_message": None, "width": 8, "height": 6, "original_width": 8, "original_height": 6},
                      indent=4).encode()


# key: (image bytes or None, caption, status); as img2dataset writes them, plus the broken cases
SAMPLES = {"000000000": (jpeg_bytes(), "a red bus", "success"),
           "000000001": (None, "an orphan caption", "success"),  # image lost (a truncated copy)
           "000000002": (jpeg_bytes(), "  ", "success"),  # empty caption
           "000000003": (b"\xff\xd8 not a jpeg", "broken", "success"),  # unreadable image
           "000000004": (None, "failed", "failed_to_download"),  # kept by versions that wrote failures
           "000000005": (jpeg_bytes((10, 200, 10)), "a green field", "success")}
EXPECTED_SKIPS = {"image missing": 1, "empty caption": 1, "unreadable image": 1, "status failed_to_download": 1}


def test_img2dataset_folders(tmp_path):
    source = tmp_path / "cc3m"
    (source / "00000").mkdir(parents=True)
    (source / "00000_stats.json").write_text("{}")  # img2dataset's own files beside the shard folders
    for key, (image, caption, status) in SAMPLES.items():
        if image is not None:
            (source / "00000" / f"{key}.jpg").write_bytes(image)
        (source / "00000" / f"{key}.txt").write_text(caption)
        (source / "00000" / f"{key}.json").write_bytes(meta(key, caption, status))
    out = tmp_path / "out"
    run("img2dataset", "--input", source, "--out", out)
    assert load(out, "pretrain.json") == [{"image": "00000/000000000.jpg", "caption": "a red bus"},
                                          {"image": "00000/000000005.jpg", "caption": "a green field"}]
    assert check_manifest(out)["splits"]["pretrain"]["skipped"] == EXPECTED_SKIPS
    assert data.PretrainDataset(out / "pretrain.json", source, 16)[1]["text"] == "a green field"


def test_img2dataset_shards(tmp_path, capsys):
    source = tmp_path / "cc3m"
    source.mkdir()
    with tarfile.open(source / "00000.tar", "w") as tar:
        for key, (image, caption, status) in SAMPLES.items():
            members = {"jpg": image, "txt": caption.encode(), "json": meta(key, caption, status)}
            for ext, blob in members.items():
                if blob is not None:
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(blob)
                    tar.addfile(info, io.BytesIO(blob))
    out = tmp_path / "out"
    run("img2dataset", "--input", source, "--out", out)
    rows = load(out, "pretrain.json")
    assert rows == [{"image": "00000/000000000.jpg", "caption": "a red bus"},
                    {"image": "00000/000000005.jpg", "caption": "a green field"}]
    assert (out / "images" / "00000" / "000000005.jpg").read_bytes() == SAMPLES["000000005"][0]
    assert not (out / "images" / "00000" / "000000003.jpg").exists()  # the unreadable one is not extracted
    assert check_manifest(out)["splits"]["pretrain"]["skipped"] == EXPECTED_SKIPS
    assert data.PretrainDataset(out / "pretrain.json", out / "images", 16)[0]["image"].shape == (3, 16, 16)
    # a sample whose metadata is not JSON: the shard and member are named
    with tarfile.open(source / "00001.tar", "w") as tar:
        info = tarfile.TarInfo("000010000.json")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"{x}"))
    assert_bad_input(capsys, ("img2dataset", "--input", source, "--out", tmp_path / "o2"),
                     str(source / "00001.tar"), "member 000010000.json", "not valid JSON")
    assert not (tmp_path / "o2" / "pretrain.json").exists()
