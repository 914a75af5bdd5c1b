"""evaluate.py and predictions.py on splits without answers (the VQA server's file, each question once) and named
splits (NLVR2's dev and test-P), with a stand-in model whose answers are known by hand (CPU, about a second)."""
import json
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

import data
import evaluate
import predictions
from conftest import VOCAB
from tokenization import WordPieceTokenizer

ANSWERS = ["zero", "one", "two"]


class CountingModel(torch.nn.Module):
    """Answers each question with the number of its words, modulo 3 (ANSWERS): known without running a model."""
    cfg = SimpleNamespace(image_size=16, max_text_len=16)

    def vqa_logits(self, image, text_ids, text_mask):
        words = text_mask.sum(1) - 2  # (B,) tokens between [CLS] and [SEP]; each test word is one token
        return torch.nn.functional.one_hot(words % 3, 3).float(), None


def write(path, obj):
    path.write_text(json.dumps(obj))
    return path


@pytest.fixture
def test_split(tmp_path):
    """A VQA split without answers: one row has no "answer", one an empty list (prepare.py may write either)."""
    Image.new("RGB", (8, 8), "red").save(tmp_path / "a.png")
    rows = [{"question_id": 31, "question": "hello", "image": "a.png"},
            {"question_id": 7, "question": "hello world", "image": "a.png", "answer": []},
            {"question_id": 12, "question": "hello world hello", "image": "a.png"}]
    return tmp_path, rows


def run_split(folder, rows, **kw):
    path = write(folder / "vqa_test-dev.json", rows)
    return evaluate.evaluate_split("vqa", CountingModel(), WordPieceTokenizer(VOCAB), path, folder,
                                   torch.device("cpu"), answers=ANSWERS, batch_size=2, **kw)


def test_split_without_answers_gives_the_servers_file(test_split, capsys):
    folder, rows = test_split
    out = folder / "answers.json"
    m = run_split(folder, rows, predictions_path=out, name="test-dev")
    assert m == {"n": 3}
    # 1, 2 and 3 words: "one", "two", "zero"; int ids, in the split's order, nothing else in a row
    assert json.loads(out.read_text()) == [{"question_id": 31, "answer": "one"}, {"question_id": 7, "answer": "two"},
                                          {"question_id": 12, "answer": "zero"}]
    assert not list(folder.glob("*.tmp"))  # written atomically: the temporary file was renamed
    assert f"wrote 3 answers for 3 questions of test-dev (each once): {out}" in capsys.readouterr().out


def test_a_question_asked_twice_or_left_unanswered_is_refused(test_split):
    folder, rows = test_split
    out = folder / "answers.json"
    with pytest.raises(data.DataError, match=r"vqa_test-dev.json: .*of its 3 questions once: "
                                             r"1 question asked twice or more in the split \(id 7\)"):
        run_split(folder, rows + [dict(rows[1])], predictions_path=out)
    rows[0]["image"] = "missing.png"  # skipped as bad: no answer for 31, and the server would refuse the file
    with pytest.raises(data.DataError, match=r"1 question without an answer \(id 31\)"):
        run_split(folder, rows, predictions_path=out, skip_bad=True)
    assert not out.exists()


def test_check_each_question_once_names_the_ids_and_counts():
    questions = [{"question_id": q} for q in range(1, 15)]
    answers = [{"question_id": q, "answer": "x"} for q in [2, 2, 3, 99, "4"]]  # 2 twice, 99 unknown, "4" a string
    with pytest.raises(ValueError) as e:
        predictions.check_each_question_once(answers, questions, "split.json")
    text = str(e.value)
    assert text.startswith("split.json: the answers do not cover each of its 14 questions once: ")
    assert "12 questions without an answer (ids 1, 4, 5, 6, 7, 8, 9, 10, 11, 12 and 2 more)" in text
    assert "1 question answered twice or more (id 2)" in text
    assert "2 questions answered but not in the split (ids 99, 4)" in text
    assert "1 question whose id is not an integer (id 4)" in text
    predictions.check_each_question_once([{"question_id": q} for q in (14, *range(1, 14))], questions, "split.json")


def test_cli_checks_a_submission_file_against_a_split_without_answers(tmp_path, capsys):
    split = write(tmp_path / "vqa_test.json", [{"question_id": q, "question": "?", "image": "a.png"} for q in (1, 2)])
    good = write(tmp_path / "good.json", [{"question_id": 2, "answer": "a"}, {"question_id": 1, "answer": "b"}])
    m = evaluate.main(["--task", "vqa", "--predictions", str(good), "--annotations", str(split), "--json"])
    assert m == {"split": "vqa_test", "n": 2}  # the name: the file's stem
    bad = write(tmp_path / "bad.json", [{"question_id": 2, "answer": "a"}])
    with pytest.raises(SystemExit):
        evaluate.main(["--task", "vqa", "--predictions", str(bad), "--annotations", str(split)])
    assert f"predictions file {bad} for {split}" in capsys.readouterr().err


def test_nlvr2_results_carry_the_split_name(tmp_path, capsys):
    anns = [{"identifier": f"test1-{s}-{p}-0", "sentence": "s", "images": ["l", "r"], "label": y}
            for s, p, y in [(0, 0, "True"), (0, 1, "False"), (1, 0, "True")]]
    preds = [{"identifier": a["identifier"], "prediction": "True"} for a in anns]
    a, p = write(tmp_path / "nlvr2_test1.json", anns), write(tmp_path / "preds.json", preds)
    m = evaluate.main(["--task", "nlvr2", "--split", "test-P", "--predictions", str(p), "--annotations", str(a), "--json"])
    # 2 of 3 right; sentence 0 (pairs 0 and 1) has a wrong pair, sentence 1 is right: consistency 50
    assert m["split"] == "test-P" and m["nlvr2_accuracy"] == pytest.approx(200 / 3)
    assert m["nlvr2_consistency"] == pytest.approx(50.0)
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["split"] == "test-P"
    evaluate.main(["--task", "nlvr2", "--split", "dev", "--predictions", str(p), "--annotations", str(a)])
    assert capsys.readouterr().out.splitlines()[0].split() == ["split", "dev"]  # the table's first row


class AlwaysTrue(torch.nn.Module):
    """An NLVR2 stand-in that says every statement is true."""
    cfg = SimpleNamespace(image_size=16, max_text_len=16)

    def nlvr2_logits(self, image0, image1, text_ids, text_mask):
        return torch.tensor([[0.0, 1.0]]).expand(len(image0), 2), None


def test_nlvr2_dev_and_test_p_are_a_checkpoints_val_and_test(tmp_path, monkeypatch, capsys):
    Image.new("RGB", (8, 8), "red").save(tmp_path / "a.png")
    files = {}
    for split, labels in (("val", ["True"] * 4), ("test", ["True", "False"])):  # accuracy 100 on val, 50 on test
        rows = [{"identifier": f"{split}-{i}-0-0", "sentence": "s", "images": ["a.png", "a.png"], "label": y}
                for i, y in enumerate(labels)]
        files[f"{split}_json"] = str(write(tmp_path / f"{split}.json", rows))
    ckpt = {"step": 5, "finetune_config": {"task": "nlvr2", "image_root": str(tmp_path), "k_test": 0, **files}}
    monkeypatch.setattr(evaluate, "load_finetuned", lambda path, device: (AlwaysTrue(), WordPieceTokenizer(VOCAB), ckpt))
    m = evaluate.main(["--task", "nlvr2", "--checkpoint", "best.pt", "--split", "test-P", "--json"])
    assert m["split"] == "test-P" and m["nlvr2_accuracy"] == 50.0 and m["n"] == 2
    m = evaluate.main(["--task", "nlvr2", "--checkpoint", "best.pt", "--split", "dev", "--json"])
    assert m["split"] == "dev" and m["nlvr2_accuracy"] == 100.0 and m["n"] == 4
    with pytest.raises(SystemExit):
        evaluate.main(["--task", "nlvr2", "--checkpoint", "best.pt", "--split", "test-U"])
    assert "--split test-U: the checkpoint stores its val and test files only" in capsys.readouterr().err


def test_write_json_is_atomic_and_names_the_file(tmp_path):
    predictions.write_json(tmp_path / "p.json", [{"question_id": 1, "answer": "x"}])
    assert json.loads((tmp_path / "p.json").read_text()) == [{"question_id": 1, "answer": "x"}]
    assert [f.name for f in tmp_path.iterdir()] == ["p.json"]
    with pytest.raises(ValueError, match="cannot write .*nowhere/p.json"):
        predictions.write_json(tmp_path / "nowhere" / "p.json", [])
