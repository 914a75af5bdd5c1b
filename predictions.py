"""Prediction files: reading them, writing them in the servers' formats, and scoring them against annotation files
with the official metrics of metrics.py. Standard library and metrics.py only: no torch, no model.

  read_rows, write_json                  a JSON list of rows (also JSON lines and VQA's {"annotations": [...]});
                                         an atomic write
  check_each_question_once               a VQA submission covers every question of its split exactly once
  score_vqa_file, score_nlvr2_file,      (metrics, table rows) of a predictions file against an annotations
  score_fixed_answers                    file, and of the one-answer-per-question-type baseline

evaluate.py runs a model and writes its predictions with these; its command line scores files with them.
"""
import json
import os
from collections import Counter
from pathlib import Path

from metrics import fixed_answers, metrics_table, nlvr2_accuracy, nlvr2_consistency, question_kind, vqa_accuracy


# ----------------------------------------------------------------------------- reading and writing
def read_rows(path, what: str) -> list[dict]:
    """A JSON list of objects from `path` (also JSON lines, and the official VQA {"annotations": [...]});
    every error names the file and, where it applies, the row."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ValueError(f"{what} file {path}: cannot read it ({e.strerror})") from None
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as e:
        try:  # JSON lines, as NLVR2's own release
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError:
            raise ValueError(f"{what} file {path}: not valid JSON ({e})") from None
    if isinstance(rows, dict) and isinstance(rows.get("annotations"), list):
        rows = rows["annotations"]
    if not isinstance(rows, list):
        raise ValueError(f"{what} file {path}: expected a JSON list of rows, got a {type(rows).__name__}")
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ValueError(f"{what} file {path} row {i}: expected an object, got {type(row).__name__}")
    return rows


def write_json(path, obj) -> None:
    """JSON to a temporary file beside `path`, then renamed: a kill never leaves a half-written file at path."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(json.dumps(obj), encoding="utf-8")
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise ValueError(f"cannot write {path}: {e.strerror or e}") from None


def _require(rows: list[dict], keys: tuple, path, what: str) -> None:
    for i, row in enumerate(rows):
        for key in keys:
            if key not in row:
                raise ValueError(f"{what} file {path} row {i}: no '{key}'")


def _as_label(value, where: str) -> int:
    """NLVR2 labels and predictions: "True"/"False" (any case), true/false or 1/0 -> 1/0."""
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return int(value.strip().lower() == "true")
    if isinstance(value, (bool, int)) and value in (0, 1):
        return int(value)
    raise ValueError(f"{where}: expected True or False, got {value!r}")


# ----------------------------------------------------------------------------- a VQA submission
def _ids(ids, most=10) -> str:
    shown = ", ".join(map(str, ids[:most]))
    return f"id{'s' * (len(ids) > 1)} {shown}" + (f" and {len(ids) - most} more" if len(ids) > most else "")


def check_each_question_once(predictions: list[dict], questions: list[dict], where: str) -> None:
    """The VQA evaluation server takes a split's answers [{"question_id": int, "answer": str}] only when every
    question of the split has exactly one and every question id is an integer. Raises ValueError naming
    `where` (the split's file) and, for each problem, how many ids and which (the first ten)."""
    asked = Counter(q["question_id"] for q in questions)
    answered = Counter(p["question_id"] for p in predictions)
    problems = [(f"{len(ids)} question{'s' * (len(ids) > 1)} {what} ({_ids(ids)})", ids) for what, ids in (
        ("asked twice or more in the split", [q for q, n in asked.items() if n > 1]),
        ("without an answer", [q for q in asked if q not in answered]),
        ("answered twice or more", [q for q, n in answered.items() if n > 1]),
        ("answered but not in the split", [q for q in answered if q not in asked]),
        ("whose id is not an integer", [q for q in answered if not isinstance(q, int) or isinstance(q, bool)]))]
    problems = [text for text, ids in problems if ids]
    if problems:
        raise ValueError(f"{where}: the answers do not cover each of its {len(asked)} questions once: "
                         + "; ".join(problems))


# ----------------------------------------------------------------------------- scoring files
def score_vqa_file(predictions_path, annotations_path) -> tuple[dict, list]:
    """VQA accuracy of the predictions; on a split without answers, only the check that they are a file the
    evaluation server takes (check_each_question_once)."""
    preds, anns = read_rows(predictions_path, "predictions"), read_rows(annotations_path, "annotations")
    _require(preds, ("question_id", "answer"), predictions_path, "predictions")
    _require(anns, ("question_id",), annotations_path, "annotations")
    if not any(r.get("answer", r.get("answers")) for r in anns):  # test-dev, test: is it a file the server takes?
        check_each_question_once(preds, anns, f"predictions file {predictions_path} for {annotations_path}")
        m = {"n": len(anns)}
        return m, metrics_table("vqa", m) + [("submission", f"{len(preds)} answers, one for each question")]
    try:
        m = vqa_accuracy(preds, anns)
    except ValueError as e:  # name both files: the message says which of them and which row
        raise ValueError(f"scoring {predictions_path} against {annotations_path}: {e}") from None
    return m, metrics_table("vqa", m) + [(k, str(m[k])) for k in ("unknown", "duplicates")]


def score_nlvr2_file(predictions_path, annotations_path) -> tuple[dict, list]:
    """Predictions [{"identifier" or "index", "prediction": "True"/"False"}] are matched to the annotation
    rows by "identifier" when the row has one, else by "index" (0-based annotation row), else by their own
    position in the file. Unmatched predictions count in "unknown"; rows without one count as wrong, in "missing"."""
    preds, anns = read_rows(predictions_path, "predictions"), read_rows(annotations_path, "annotations")
    _require(preds, ("prediction",), predictions_path, "predictions")
    _require(anns, ("label",), annotations_path, "annotations")
    labels = [_as_label(r["label"], f"annotations file {annotations_path} row {i}") for i, r in enumerate(anns)]
    ids = [r.get("identifier") for r in anns]
    row_of = {x: i for i, x in enumerate(ids) if x is not None}
    guess, unknown = [None] * len(anns), 0
    for j, row in enumerate(preds):
        where = f"predictions file {predictions_path} row {j}"
        i = row_of.get(row["identifier"]) if "identifier" in row else row.get("index", j)
        if i is not None and (not isinstance(i, int) or isinstance(i, bool)):
            raise ValueError(f"{where}: 'index' must be an integer, got {i!r}")
        if i is None or not 0 <= i < len(anns) or guess[i] is not None:
            unknown += 1
            continue
        guess[i] = _as_label(row["prediction"], where)
    m = {"nlvr2_accuracy": nlvr2_accuracy(guess, labels), "nlvr2_consistency": nlvr2_consistency(ids, guess, labels),
         "n": len(anns), "missing": guess.count(None), "unknown": unknown}
    return m, metrics_table("nlvr2", m) + [(k, str(m[k])) for k in ("missing", "unknown")]


def score_fixed_answers(train_path, annotations_path) -> tuple[dict, list]:
    """The baseline fixed_answers(train file), one answer per question type, scored on the annotations file."""
    anns, train = read_rows(annotations_path, "annotations"), read_rows(train_path, "training")
    _require(anns, ("question_id",), annotations_path, "annotations")
    try:
        best = fixed_answers(train)
    except ValueError as e:
        raise ValueError(f"training file {train_path}: {e}") from None
    preds = [{"question_id": r["question_id"], "answer": best.get(question_kind(r), "")} for r in anns]
    try:
        m = vqa_accuracy(preds, anns)
    except ValueError as e:
        raise ValueError(f"annotations file {annotations_path}: {e}") from None
    answers = ", ".join(f"{k or '(no type)'}: {a}" for k, a in sorted(best.items()))
    return m, [("fixed answer per question type", answers)] + metrics_table("vqa", m)
