"""metrics.py against hand-computed references, and evaluate.py's command line (no model, CPU, about a second)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from metrics import (fixed_answers, human_answers, metrics_table, nlvr2_accuracy, nlvr2_consistency,  # noqa: E402
                      normalize_vqa_answer, retrieval_recall, vqa_accuracy, vqa_score)


# ----------------------------------------------------------------------------- VQA normalisation
@pytest.mark.parametrize("raw, expected", [
    ("Two.", "2"),                      # trailing period dropped, number word -> digit
    ("the dog", "dog"), ("an apple", "apple"), ("A  Dog\n", "dog"),  # articles, case, whitespace
    ("dont", "don't"), ("isnt", "isn't"), ("don't", "don't"),      # contraction table; "'" is kept
    ("2.5", "2.5"), ("2.", "2"), ("a.m.", "am"), ("Mr. Smith", "mr smith"),  # period rule
    ("yes!", "yes"), ("(left)", "left"),            # punctuation not touching a space -> space, then split
    ("1,000", "1000"),                  # comma between digits: all punctuation deleted, not spaced
    ("10,000-20,000", "1000020000"),    # ... including the hyphen, because the rule looks at the whole text
    ("ten", "10"), ("none", "0"), ("zero", "0"),
    ("t-shirt", "t shirt"), ("yes/no", "yes no"), ("1/2", "1 2"),  # hyphen/slash between letters/digits
    ("black - white", "black white"), ("red, white", "red white"), ("3 + 4", "3 4"),  # touching a space: deleted
    ("red,white", "red white"),
    ("Im", "im"),                       # official table key is "Im", looked up after lowercasing: never fires
    ("somebody'd", "somebodyd"),        # the official table maps this one backwards
    ("x" + "." * 40, "x" + "." * 8),    # official sub(..., re.UNICODE) passes count=32: 32 periods go
])
def test_normalize_vqa_answer(raw, expected):
    assert normalize_vqa_answer(raw) == expected


# ----------------------------------------------------------------------------- VQA score
def test_vqa_score_brief_example():
    # "two" -> "2"; three humans said "2": leaving one of them out leaves 2 -> 2/3 (x3), else 3 -> 1 (x7)
    assert vqa_score("two", ["2", "2", "2", "3", "3", "3", "3", "4", "4", "5"]) == pytest.approx(0.9)


@pytest.mark.parametrize("m, expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (5, 1.0), (9, 1.0)])
def test_vqa_score_leave_one_out(m, expected):
    # m of 10 humans match. m=3: (3 * 2/3 + 7 * 1) / 10 = 0.9, not 1.0; m=4: every subset keeps >= 3 -> 1.0
    # m=1: (1 * 0 + 9 * 1/3) / 10 = 0.3; m=2: (2 * 1/3 + 8 * 2/3) / 10 = 0.6
    humans = ["cat"] * m + ["dog"] * (10 - m)
    assert vqa_score("cat", humans) == pytest.approx(expected)


def test_vqa_score_agreeing_humans_are_compared_raw():
    # all ten humans agree -> nothing but _strip on either side (master a013f00): case, articles, number words
    # and punctuation of the prediction are NOT normalised, so only the exact string scores
    assert vqa_score("yes", ["yes"] * 10) == 1.0
    assert vqa_score("  yes\n", ["yes"] * 10) == 1.0  # '\n'/'\t' and surrounding spaces go everywhere
    assert vqa_score("yes", ["yes\t"] * 5 + [" yes"] * 5) == 1.0  # identical once stripped: still "agreeing"
    for pred in ("Yes", "yes.", "a yes", "YES"):
        assert vqa_score(pred, ["yes"] * 10) == 0.0
    assert vqa_score("two", ["2"] * 10) == 0.0 and vqa_score("2", ["two"] * 10) == 0.0
    assert vqa_score("Two", ["Two"] * 10) == 1.0  # raw equality, capital letters and all


def test_vqa_score_disagreeing_humans_normalise_both_sides():
    # the case: humans disagree -> every answer and the prediction fully processed: "a dog" -> "dog"
    # matches 3 humans -> 0.9 (the revision before a013f00: prediction "dog" vs humans "dog", "dog", "a dog"
    # with punctuation processing only -> 2 matches -> 0.6)
    assert vqa_score("a dog", ["dog", "dog", "a dog"] + ["puppy"] * 7) == pytest.approx(0.9)
    # case: humans lowercased too now ("Yes" x 9 -> "yes": 10 matches; the old revision found 1 -> 0.3)
    assert vqa_score("yes", ["Yes"] * 9 + ["yes"]) == 1.0
    # number words on the human side ("two" -> "2"; old: untouched -> 1 match, 0.3)
    assert vqa_score("2", ["two", "two", "2"] + ["3"] * 7) == pytest.approx(0.9)
    # articles and contractions on the human side ("the cat" -> "cat", "dont" -> "don't")
    assert vqa_score("cat", ["the cat", "a cat"] + ["dog"] * 8) == pytest.approx(0.6)
    assert vqa_score("don't", ["dont"] * 4 + ["no"] + ["yes"] * 5) == 1.0
    # punctuation on both sides: "yes!" and "yes." -> "yes" (3 matches), "t-shirt" -> "t shirt" (2)
    assert vqa_score("yes!", ["yes."] * 3 + ["no"] * 7) == pytest.approx(0.9)
    assert vqa_score("t shirt", ["t-shirt", "T-Shirt", "shirt"] + ["top"] * 7) == pytest.approx(0.6)
    assert vqa_score("red, white", ["red white", "red-white"] + ["red"] * 8) == pytest.approx(0.6)


def test_vqa_score_single_answer_rows():
    # OUTSIDE the official rules (there one answer always scores 0): both sides normalised, then compared
    assert vqa_score("yes", ["yes"]) == 1.0
    assert vqa_score("Yes.", ["yes"]) == 1.0
    assert vqa_score("no", ["yes"]) == 0.0
    assert vqa_score("2", ["two"]) == 1.0
    with pytest.raises(ValueError):
        vqa_score("yes", [])


def test_human_answers_formats():
    assert human_answers({"answer": ["a", "b"]}) == ["a", "b"]
    assert human_answers({"answer": "a"}) == ["a"]
    assert human_answers({"answers": [{"answer": "x", "answer_id": 1}, {"answer": "y", "answer_id": 2}]}) == ["x", "y"]
    assert human_answers({"question": "q"}) == []  # a test split
    for bad in ({"answer": 3}, {"answer": [1, 2]}, {"answers": [{"id": 1}]}):
        with pytest.raises(ValueError):
            human_answers(bad)


def vqa_rows():
    anns = [
        {"question_id": 1, "answer": ["2", "2", "2", "3", "3", "3", "3", "4", "4", "5"], "answer_type": "number",
         "question_type": "how many"},
        {"question_id": 2, "answer": ["yes"] * 10, "answer_type": "yes/no", "question_type": "is the"},
        {"question_id": 3, "answer": ["red"] * 2 + ["blue"] * 8, "answer_type": "other", "question_type": "what color"},
        {"question_id": 4, "answer": ["cat"] * 10, "answer_type": "other", "question_type": "what"},
    ]
    preds = [{"question_id": 1, "answer": "two"}, {"question_id": 2, "answer": "yes"},
             {"question_id": "3", "answer": "red"}, {"question_id": 99, "answer": "dog"}]
    return preds, anns


def test_vqa_accuracy_with_missing_and_unknown():
    preds, anns = vqa_rows()
    m = vqa_accuracy(preds, anns)
    # scores 0.9, 1.0, 0.6, 0 (no prediction for 4) -> 62.5 %
    assert m["vqa_accuracy"] == pytest.approx(62.5)
    assert (m["n"], m["missing"], m["unknown"], m["duplicates"]) == (4, 1, 1, 0)
    assert m["per_type"]["answer_type"] == pytest.approx({"number": 90.0, "yes/no": 100.0, "other": 30.0})
    assert m["per_type"]["question_type"]["what color"] == pytest.approx(60.0)
    # a repeated prediction: the first one counts
    m2 = vqa_accuracy(preds + [{"question_id": 1, "answer": "5"}], anns)
    assert m2["vqa_accuracy"] == pytest.approx(62.5) and m2["duplicates"] == 1


def test_metrics_table_per_answer_and_question_type():
    preds, anns = vqa_rows()
    rows = metrics_table("vqa", vqa_accuracy(preds, anns))
    # q1 0.9 (number, how many), q2 1.0 (yes/no, is the), q3 0.6 (other, what color), q4 0 (other, what)
    assert rows == [("VQA accuracy", "62.50"),
                    (" by answer type", ""), ("  number", "90.00"), ("  other", "30.00"), ("  yes/no", "100.00"),
                    (" by question type", ""), ("  how many", "90.00"), ("  is the", "100.00"),
                    ("  what", "0.00"), ("  what color", "60.00"),
                    ("n", "4"), ("missing", "1")]
    # rows without the fields: no per-type section; only question_type: only that one
    plain = [{k: v for k, v in a.items() if k not in ("answer_type", "question_type")} for a in anns]
    assert [r[0] for r in metrics_table("vqa", vqa_accuracy(preds, plain))] == ["VQA accuracy", "n", "missing"]
    only_q = [{k: v for k, v in a.items() if k != "answer_type"} for a in anns]
    names = [r[0] for r in metrics_table("vqa", vqa_accuracy(preds, only_q))]
    assert " by answer type" not in names and " by question type" in names and "  what color" in names


def test_vqa_accuracy_bad_rows():
    with pytest.raises(ValueError, match="annotations row 1"):
        vqa_accuracy([], [{"question_id": 1, "answer": ["a", "b"]}, {"answer": ["x"]}])
    with pytest.raises(ValueError, match="predictions row 0"):
        vqa_accuracy([{"answer": "x"}], [{"question_id": 1, "answer": ["a", "b"]}])


# ----------------------------------------------------------------------------- retrieval
def albef_style_reference(s_i2t, s_t2i, img2txt, txt2img):
    """ALBEF's loop written out literally, with a stable argsort reversed (the documented tie rule)."""
    def recalls(ranks):
        return [100.0 * np.mean(ranks < k) for k in (1, 5, 10)]
    img_ranks = np.array([min(np.where(np.argsort(row, kind="stable")[::-1] == c)[0][0] for c in img2txt[i])
                          for i, row in enumerate(s_i2t)])
    txt_ranks = np.array([np.where(np.argsort(row, kind="stable")[::-1] == txt2img[t])[0][0]
                          for t, row in enumerate(s_t2i)])
    return recalls(img_ranks), recalls(txt_ranks)


def test_retrieval_multi_caption_by_hand():
    img2txt = [[0, 1], [2, 3, 4, 5, 6], [7, 8, 9, 10, 11]]
    txt2img = [0, 0, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2]
    orders = [[11, 10, 9, 1, 8, 7, 6, 5, 0, 4, 3, 2],   # image 0: caption 1 at rank 3, caption 0 at rank 8 -> 3
              [0, 1, 7, 8, 9, 10, 11, 2, 3, 4, 5, 6],   # image 1: best caption (2) at rank 7
              [7, 0, 1, 2, 3, 4, 5, 6, 8, 9, 10, 11]]   # image 2: caption 7 at rank 0
    s_i2t = np.zeros((3, 12))
    for i, order in enumerate(orders):
        s_i2t[i, order] = np.arange(12, 0, -1)
    s_t2i = np.full((12, 3), -10.0)
    for t, g in enumerate(txt2img):  # captions 0-5 find their image at rank 0, 6-8 at rank 1, 9-11 at rank 2
        rank = 0 if t < 6 else 1 if t < 9 else 2
        others = [j for j in range(3) if j != g]
        s_t2i[t, g] = 1.0 - rank
        s_t2i[t, others[:rank]] = 5.0
    r = retrieval_recall(s_i2t, s_t2i, img2txt, txt2img)
    # image->text ranks 3, 7, 0; text->image ranks 0 x6, 1 x3, 2 x3
    assert [r["txt_r1"], r["txt_r5"], r["txt_r10"]] == pytest.approx([100 / 3, 200 / 3, 100.0])
    assert [r["img_r1"], r["img_r5"], r["img_r10"]] == pytest.approx([50.0, 100.0, 100.0])
    assert r["txt_r_mean"] == pytest.approx(200 / 3) and r["img_r_mean"] == pytest.approx(250 / 3)
    assert r["r_mean"] == pytest.approx(75.0)
    assert list(r) == ["txt_r1", "txt_r5", "txt_r10", "txt_r_mean", "img_r1", "img_r5", "img_r10", "img_r_mean",
                       "r_mean"]


def test_retrieval_perfect_and_reversed():
    n = 12
    eye = np.eye(n)
    ident = list(range(n))
    perfect = retrieval_recall(eye, eye, [[i] for i in ident], ident)
    assert all(v == 100.0 for v in perfect.values())
    # the right match scores lowest: rank 11 everywhere, outside the top 10
    reversed_ = retrieval_recall(-eye, -eye, [[i] for i in ident], ident)
    assert all(v == 0.0 for v in reversed_.values())


def test_retrieval_ties_later_index_first():
    ones = np.ones((2, 2))
    r = retrieval_recall(ones, ones, [[0], [1]], [0, 1])
    # all scores equal: index 1 ranks first, index 0 second -> only image 1 / caption 1 hit at R@1
    assert r["txt_r1"] == 50.0 and r["img_r1"] == 50.0 and r["txt_r5"] == 100.0
    # a tie between the right caption and a later wrong one loses R@1; with an earlier wrong one it wins
    assert retrieval_recall([[1.0, 1.0, 0.0]], [[1.0], [1.0], [1.0]], [[0]], [0, 0, 0])["txt_r1"] == 0.0
    assert retrieval_recall([[1.0, 1.0, 0.0]], [[1.0], [1.0], [1.0]], [[1]], [0, 0, 0])["txt_r1"] == 100.0


def test_retrieval_matches_literal_loop_with_many_ties():
    rng = np.random.default_rng(0)
    n_img, per = 9, 3
    s_i2t = rng.integers(0, 4, size=(n_img, n_img * per)).astype(np.float32)  # few values: many ties
    s_t2i = rng.integers(0, 4, size=(n_img * per, n_img)).astype(np.float32)
    img2txt = [list(range(i * per, (i + 1) * per)) for i in range(n_img)]
    txt2img = [t // per for t in range(n_img * per)]
    r = retrieval_recall(s_i2t, s_t2i, img2txt, txt2img)
    ref_txt, ref_img = albef_style_reference(s_i2t, s_t2i, img2txt, txt2img)
    assert [r["txt_r1"], r["txt_r5"], r["txt_r10"]] == pytest.approx(ref_txt)
    assert [r["img_r1"], r["img_r5"], r["img_r10"]] == pytest.approx(ref_img)


def test_retrieval_bad_shapes():
    with pytest.raises(ValueError):
        retrieval_recall(np.zeros((2, 3)), np.zeros((2, 3)), [[0], [1]], [0, 1, 1])
    with pytest.raises(ValueError):
        retrieval_recall(np.zeros((1, 2)), np.zeros((2, 1)), [[5]], [0, 0])


# ----------------------------------------------------------------------------- NLVR2
def test_nlvr2_accuracy_and_consistency():
    assert nlvr2_accuracy([1, 0, 1, 1], [1, 1, 1, 0]) == 50.0
    assert nlvr2_accuracy([1, None], [1, 0]) == 50.0  # a missing prediction is wrong
    ids = ["dev-1-0-0", "dev-1-1-0", "dev-1-0-1", "dev-1-1-1", "dev-2-0-0"]
    preds, labels = [1, 0, 1, 0, 1], [1, 0, 1, 1, 1]  # only row 3 (sentence dev-1-*-1) is wrong
    # sentences (pair id blanked): dev-1-_-0 all right, dev-1-_-1 not, dev-2-_-0 right -> 2 of 3
    assert nlvr2_consistency(ids, preds, labels) == pytest.approx(200 / 3)
    assert nlvr2_consistency(ids, labels, labels) == 100.0
    assert nlvr2_consistency(None, preds, labels) is None
    assert nlvr2_consistency([], [], []) is None
    assert nlvr2_consistency(["dev-1-0-0", None], [1, 1], [1, 1]) is None
    with pytest.raises(ValueError):
        nlvr2_accuracy([1], [1, 0])


# ----------------------------------------------------------------------------- command line
def test_metrics_import_nothing_of_the_project():
    # metrics.py is pure: importing it loads neither torch nor any module of this project
    code = ("import sys, metrics; project = {p.stem for p in __import__('pathlib').Path('.').glob('*.py')}; "
            "print(sorted((project - {'metrics'}) & set(sys.modules)), 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["[]", "False"]


def run_cli(*args):
    return subprocess.run([sys.executable, "evaluate.py", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)


def cli_metrics(*args):
    """evaluate.py with --json: the metrics it printed as its last line (the run must succeed)."""
    out = run_cli(*args, "--json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def write(path, obj):
    path.write_text(json.dumps(obj))
    return path


def test_cli_vqa_round_trip(tmp_path):
    preds, anns = vqa_rows()
    p, a = write(tmp_path / "preds.json", preds), write(tmp_path / "anns.json", anns)
    m = cli_metrics("--task", "vqa", "--predictions", p, "--annotations", a)
    assert m["vqa_accuracy"] == pytest.approx(62.5) and m["missing"] == 1 and m["unknown"] == 1
    table = run_cli("--task", "vqa", "--predictions", p, "--annotations", a)
    assert table.returncode == 0 and "62.50" in table.stdout
    assert " by question type" in table.stdout and "  what color" in table.stdout  # the per-type rows are printed


def fixed_answer_world():
    """Training rows where the best fixed answer by VQA score is not each row's majority answer."""
    train = [{"question_id": 1, "question_type": "colour", "answer": ["red"] * 10},
             {"question_id": 2, "question_type": "colour", "answer": ["red"] * 10},
             {"question_id": 3, "question_type": "colour", "answer": ["blue"] * 10},
             # "square" is the most frequent answer (10) and each row's majority is another shape, but "circle"
             # (4 of 10 in two rows) scores 1.0 + 1.0, every other answer 1.0 in one row
             {"question_id": 4, "question_type": "shape", "answer": ["square"] * 10},
             {"question_id": 5, "question_type": "shape", "answer": ["circle"] * 4 + ["triangle"] * 6},
             {"question_id": 9, "question_type": "shape", "answer": ["circle"] * 4 + ["oval"] * 6},
             {"question_id": 6, "answer": ["yes"] * 10}]  # no type: grouped under ""
    test = [{"question_id": 7, "question_type": "colour", "answer": ["red"] * 10},
            {"question_id": 8, "question_type": "shape", "answer": ["circle"] * 2 + ["square"] * 8}]
    return train, test


def test_fixed_answers_by_vqa_score_not_majority():
    train, _ = fixed_answer_world()
    assert fixed_answers(train) == {"colour": "red", "shape": "circle", "": "yes"}
    with pytest.raises(ValueError, match="training row 0"):
        fixed_answers([{"question_id": 1, "answer": 3}])


def test_cli_fixed_answers(tmp_path):
    train, test = fixed_answer_world()
    t, a = write(tmp_path / "train.json", train), write(tmp_path / "test.json", test)
    m = cli_metrics("--task", "vqa", "--fixed-answers", t, "--annotations", a)
    # "red" scores 1.0; "circle" against 2 circle + 8 square: 2 left-outs of 1/3 and 8 of 2/3 -> 0.6
    assert m["vqa_accuracy"] == pytest.approx(80.0)
    assert m["per_type"]["question_type"] == pytest.approx({"colour": 100.0, "shape": 60.0})
    table = run_cli("--task", "vqa", "--fixed-answers", t, "--annotations", a)
    assert "colour: red, shape: circle" in table.stdout
    bad = run_cli("--task", "nlvr2", "--fixed-answers", t, "--annotations", a)
    assert bad.returncode == 2 and "--task vqa" in bad.stderr


def test_cli_nlvr2_round_trip(tmp_path):
    ids = ["dev-1-0-0", "dev-1-1-0", "dev-1-0-1", "dev-1-1-1", "dev-2-0-0"]
    labels = ["True", "False", "True", "True", "False"]
    anns = [{"identifier": i, "sentence": "s", "images": ["l", "r"], "label": y} for i, y in zip(ids, labels)]
    # by identifier, in another order; row dev-1-1-1 predicted wrong; dev-2-0-0 has no prediction
    preds = [{"identifier": "dev-1-0-1", "prediction": "True"}, {"identifier": "dev-1-0-0", "prediction": "True"},
             {"identifier": "dev-1-1-0", "prediction": "False"}, {"identifier": "dev-1-1-1", "prediction": "False"},
             {"identifier": "test-9-0-0", "prediction": "True"}]
    p, a = write(tmp_path / "preds.json", preds), write(tmp_path / "anns.json", anns)
    m = cli_metrics("--task", "nlvr2", "--predictions", p, "--annotations", a)
    # 3 of 5 right; sentences dev-1-_-0 right, dev-1-_-1 wrong, dev-2-_-0 missing -> 1 of 3
    assert m["nlvr2_accuracy"] == pytest.approx(60.0) and m["nlvr2_consistency"] == pytest.approx(100 / 3)
    assert (m["missing"], m["unknown"]) == (1, 1)
    # no identifiers: matched by row order; consistency is null
    anon = [{k: v for k, v in r.items() if k != "identifier"} for r in anns]
    a2 = write(tmp_path / "anon.json", anon)
    p2 = write(tmp_path / "order.json", [{"prediction": x} for x in ["True", "True", "True", "True", "True"]])
    m2 = json.loads(run_cli("--task", "nlvr2", "--predictions", p2, "--annotations", a2, "--json")
                    .stdout.strip().splitlines()[-1])
    assert m2["nlvr2_accuracy"] == pytest.approx(60.0) and m2["nlvr2_consistency"] is None


@pytest.mark.parametrize("case", ["missing", "not_list", "no_qid", "bad_json", "bad_answers"])
def test_cli_bad_files(tmp_path, case):
    preds, anns = vqa_rows()
    p, a = write(tmp_path / "preds.json", preds), write(tmp_path / "anns.json", anns)
    bad = tmp_path / "bad.json"
    if case == "not_list":
        write(bad, {"question_id": 1})
    elif case == "no_qid":
        write(bad, [{"question_id": 1, "answer": "x"}, {"answer": "y"}])
    elif case == "bad_json":
        bad.write_text("[{")
    elif case == "bad_answers":
        write(bad, [{"question_id": 1, "answer": "x"}, {"question_id": 2, "answer": []}])
    args = ["--predictions", bad, "--annotations", a] if case in ("not_list", "no_qid") else \
           ["--predictions", p, "--annotations", bad]
    out = run_cli("--task", "vqa", *args)
    assert out.returncode == 2
    assert str(bad) in out.stderr and "Traceback" not in out.stderr
    if case in ("no_qid", "bad_answers"):
        assert "row 1" in out.stderr
