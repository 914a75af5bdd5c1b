"""The official metrics of EVE's benchmarks as pure functions (standard library + numpy only).

This file imports nothing of the project, so the metrics can be used and tested without torch, the model or the
data code. evaluate.py runs a model and scores it with them; finetune.py uses the VQA normalisation for its answers.
  normalize_vqa_answer, vqa_score, vqa_accuracy   VQA v2, as GT-Vision-Lab/VQA vqaEval.py (master, a013f00)
  human_answers                                    the human answers of a VQA row, in either annotation format
  question_kind, fixed_answers                     VQA's one-answer-per-question-type baseline
  retrieval_recall                                 image-text retrieval R@1/5/10, as ALBEF's itm_eval
  nlvr2_accuracy, nlvr2_consistency                NLVR2, as lil-lab/nlvr nlvr2/eval/metrics.py
  metrics_table, format_table                      a metrics dict as printable rows
"""

import re
from collections import Counter, defaultdict

import numpy as np

# ----------------------------------------------------------------------------- VQA v2
# The tables of the official evaluation. Number words become digits ("none" counts as zero).
_NUMBERS = {w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten".split())}
_NUMBERS["none"] = "0"
_ARTICLES = {"a", "an", "the"}
# Words written without their apostrophe, as key:value. Lookup happens after lowercasing, so the official
# table's capitalised keys (Im, Ive, Id've, I'dve) never fire, and "somebody'd" really maps to "somebodyd".
_CONTRACTIONS = dict(kv.split(":") for kv in """
aint:ain't arent:aren't cant:can't couldve:could've couldnt:couldn't couldn'tve:couldn't've couldnt've:couldn't've
didnt:didn't doesnt:doesn't dont:don't hadnt:hadn't hadnt've:hadn't've hadn'tve:hadn't've hasnt:hasn't havent:haven't
hed:he'd hed've:he'd've he'dve:he'd've hes:he's howd:how'd howll:how'll hows:how's Id've:I'd've I'dve:I'd've Im:I'm
Ive:I've isnt:isn't itd:it'd itd've:it'd've it'dve:it'd've itll:it'll let's:let's maam:ma'am mightnt:mightn't
mightnt've:mightn't've mightn'tve:mightn't've mightve:might've mustnt:mustn't mustve:must've neednt:needn't
notve:not've oclock:o'clock oughtnt:oughtn't ow's'at:'ow's'at 'ows'at:'ow's'at 'ow'sat:'ow's'at shant:shan't
shed've:she'd've she'dve:she'd've she's:she's shouldve:should've shouldnt:shouldn't shouldnt've:shouldn't've
shouldn'tve:shouldn't've somebody'd:somebodyd somebodyd've:somebody'd've somebody'dve:somebody'd've
somebodyll:somebody'll somebodys:somebody's someoned:someone'd someoned've:someone'd've someone'dve:someone'd've
someonell:someone'll someones:someone's somethingd:something'd somethingd've:something'd've
something'dve:something'd've somethingll:something'll thats:that's thered:there'd thered've:there'd've
there'dve:there'd've therere:there're theres:there's theyd:they'd theyd've:they'd've they'dve:they'd've
theyll:they'll theyre:they're theyve:they've twas:'twas wasnt:wasn't wed've:we'd've we'dve:we'd've weve:we've
werent:weren't whatll:what'll whatre:what're whats:what's whatve:what've whens:when's whered:where'd wheres:where's
whereve:where've whod:who'd whod've:who'd've who'dve:who'd've wholl:who'll whos:who's whove:who've whyll:why'll
whyre:why're whys:why's wont:won't wouldve:would've wouldnt:wouldn't wouldnt've:wouldn't've wouldn'tve:wouldn't've
yall:y'all yall'll:y'all'll y'allll:y'all'll yall'd've:y'all'd've y'alld've:y'all'd've y'all'dve:y'all'd've
youd:you'd youd've:you'd've you'dve:you'd've youll:you'll youre:you're youve:you've""".split())
_PUNCT = ';/[]"{}()=+\\_-><@`,?!'  # the official list; "'" and ":" are kept, "." has its own rule
_NUM_COMMA = re.compile(r"\d,\d")  # a comma inside a number, as in "1,000"
_PERIOD = re.compile(r"\.(?!\d)")  # a period not followed by a digit: "2." loses it, "2.5" keeps it


def _process_punctuation(text: str) -> str:
    """The official processPunctuation.

    Each character of _PUNCT is deleted where it touches a space somewhere in the text ("red, white") or where
    the text holds a comma between digits anywhere ("1,000" -> "1000", "10,000-20,000" -> "1000020000");
    otherwise each occurrence becomes a space ("t-shirt" -> "t shirt"). These tests look at the original
    text, not the partly processed one. Then periods not followed by a digit are deleted. The official
    pattern "(?!<=\\d)(\\.)(?!\\d)" starts with a mistyped look-behind that never rejects anything, and its call
    passes re.UNICODE (= 32) as sub's `count`: only the first 32 such periods go. Both reproduced.
    """
    num_comma = _NUM_COMMA.search(text) is not None
    out = text
    for p in _PUNCT:
        out = out.replace(p, "" if (num_comma or p + " " in text or " " + p in text) else " ")
    return _PERIOD.sub("", out, count=32)


def _process_digit_article(text: str) -> str:
    """The official processDigitArticle: lowercase, split, number words -> digits, drop articles, contractions."""
    words = [_NUMBERS.get(w, w) for w in text.lower().split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def _strip(answer: str) -> str:
    """What the official evaluation does to EVERY answer, human or predicted: '\\n' and '\\t' become spaces and
    the ends are trimmed."""
    return answer.replace("\n", " ").replace("\t", " ").strip()


def normalize_vqa_answer(answer: str) -> str:
    """The official evaluation's full processing of one answer: _strip, then punctuation (_process_punctuation),
    then lowercasing, number words, articles and contractions (_process_digit_article). vqa_score applies it only
    where the official tool does (see there); finetune.py uses it to build answer classes and targets."""
    return _process_digit_article(_process_punctuation(_strip(answer)))


def vqa_score(prediction: str, humans: list[str]) -> float:
    """Accuracy of one answer in [0, 1], as GT-Vision-Lab/VQA vqaEval.py at master (commit a013f00):

    1. every answer, human and predicted, is _strip-ped;
    2. only if the stripped human answers are NOT all identical, every human answer AND the prediction get the
       full normalize_vqa_answer processing; if they are all identical, nothing more is done to either side,
       so "Yes" or "a dog" against ten "yes" / "dog" scores 0 (the official tool does the same);
    3. the score is the mean over the n leave-one-out subsets of the human answers of min(1, matches / 3): with
       10 answers, 0/1/2/3/4+ matches give 0, 0.3, 0.6, 0.9, 1.0. (The official code leaves one answer out
       by comparing answer dicts, which differ by their answer_id; each list entry here is one such answer.)

    The earlier revision (before a013f00) normalised the prediction always and gave disagreeing human answers
    punctuation processing only; humans ["dog", "dog", "a dog"] + 7 x ["puppy"] with prediction "a dog" score
    0.6 there and 0.9 here.

    OUTSIDE the official rules: a question with ONE human answer (VG-style rows), where the official formula
    always gives 0 (leaving the only answer out leaves no match). Here both sides get normalize_vqa_answer and
    the score is 1.0 if they are equal, else 0.0.
    """
    if not humans:
        raise ValueError("vqa_score: no human answers")
    if len(humans) == 1:  # not an official case: see the docstring
        return float(normalize_vqa_answer(prediction) == normalize_vqa_answer(humans[0]))
    pred, gts = _strip(prediction), [_strip(a) for a in humans]
    if len(set(gts)) > 1:  # the humans disagree: both sides fully processed
        pred, gts = normalize_vqa_answer(pred), [normalize_vqa_answer(a) for a in gts]
    hits = [g == pred for g in gts]
    m = sum(hits)  # leaving answer i out leaves m - hits[i] matching answers
    return sum(min(1.0, (m - h) / 3) for h in hits) / len(hits)


def human_answers(row: dict) -> list[str]:
    """The human answers of one VQA row: "answer": [str, ...] or str (ALBEF/X-VLM format), or the official
    annotation files' "answers": [{"answer": str, ...}, ...]. [] when the row has none (a test split).
    Raises ValueError when they are there but are not strings."""
    answers = row.get("answer", row.get("answers", []))
    if isinstance(answers, str):
        answers = [answers]
    if not isinstance(answers, list):
        raise ValueError(f"expected 'answer': [str, ...] or str, got {type(answers).__name__}")
    answers = [a.get("answer") if isinstance(a, dict) else a for a in answers]
    if not all(isinstance(a, str) for a in answers):
        raise ValueError("expected 'answer': [str, ...] or str (or 'answers': [{'answer': str}, ...])")
    return answers


def vqa_accuracy(predictions: list[dict], annotations: list[dict]) -> dict:
    """VQA accuracy over the annotated questions, in percent at full precision (the official tool rounds to 2
    decimals; print with :.2f). A question without a prediction scores 0 and counts in "missing";
    predictions for questions not in the annotations count in "unknown"; repeated predictions for one
    question (e.g. from a padded distributed sampler) count in "duplicates" and the first one is used.
    Question ids are compared as strings, so 7 and "7" match. per_type holds the same percentage per
    "answer_type" and per "question_type" for the rows that carry them.
    """
    answers = {}
    for i, row in enumerate(predictions):
        if not isinstance(row, dict) or "question_id" not in row or not isinstance(row.get("answer"), str):
            raise ValueError(f"predictions row {i}: expected {{'question_id': ..., 'answer': str}}")
        answers.setdefault(str(row["question_id"]), row["answer"])
    scores, seen, missing = [], set(), 0
    by_type = defaultdict(lambda: defaultdict(list))  # "answer_type" -> type -> scores
    for i, row in enumerate(annotations):
        if not isinstance(row, dict) or "question_id" not in row:
            raise ValueError(f"annotations row {i}: no 'question_id'")
        qid = str(row["question_id"])
        if qid in seen:
            raise ValueError(f"annotations row {i}: question_id {qid} appears twice")
        seen.add(qid)
        try:
            humans = human_answers(row)
        except ValueError as e:
            raise ValueError(f"annotations row {i}: {e}") from None
        if not humans:
            raise ValueError(f"annotations row {i}: no human answers (expected 'answer': [str, ...] or str)")
        missing += qid not in answers
        s = vqa_score(answers[qid], humans) if qid in answers else 0.0
        scores.append(s)
        for kind in ("answer_type", "question_type"):
            if kind in row:
                by_type[kind][str(row[kind])].append(s)
    if not scores:
        raise ValueError("annotations: no questions")
    pct = lambda xs: 100.0 * sum(xs) / len(xs)  # noqa: E731
    return {"vqa_accuracy": pct(scores), "per_type": {k: {t: pct(v) for t, v in d.items()} for k, d in by_type.items()},
            "n": len(scores), "missing": missing, "unknown": len(set(answers) - seen),
            "duplicates": len(predictions) - len(answers)}


def question_kind(row: dict) -> str:
    """The kind of question a VQA row asks, as fixed_answers groups them: its question_type, "" without one."""
    return str(row.get("question_type", ""))


def fixed_answers(train: list[dict], candidates: int = 50) -> dict:
    """The baseline that sees neither the image nor the question's words, only its kind (question_kind): for each
    kind in `train`, the one answer with the best mean vqa_score over those rows, among their `candidates` most
    frequent human answers (ties: the more frequent). Returns {kind: answer}."""
    groups = defaultdict(list)  # kind -> each row's human answers
    for i, row in enumerate(train):
        try:
            groups[question_kind(row)].append(human_answers(row))
        except ValueError as e:
            raise ValueError(f"training row {i}: {e}") from None
    best = {}
    for kind, rows in groups.items():
        common = [a for a, _ in Counter(a for humans in rows for a in humans).most_common(candidates)]
        best[kind] = max(common, key=lambda a: sum(vqa_score(a, humans) for humans in rows if humans))
    return best


# ----------------------------------------------------------------------------- retrieval
def _target_ranks(scores: np.ndarray, rows: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """0-based rank of scores[rows[p], targets[p]] in its row sorted descending, for every pair p.
    Ties as np.argsort(row, kind="stable")[::-1]: among equal scores the LATER column ranks first, so the rank
    is (#greater) + (#equal in later columns); no sort needed. Chunks of rows bound the memory."""
    out = np.empty(len(rows), dtype=np.int64)
    cols = np.arange(scores.shape[1])
    step = max(1, (1 << 22) // max(1, scores.shape[1]))
    for s in range(0, len(rows), step):
        r, t = rows[s:s + step], targets[s:s + step]
        block = scores[r]  # (P, N)
        target = block[np.arange(len(r)), t][:, None]  # (P, 1)
        out[s:s + step] = (block > target).sum(1) + ((block == target) & (cols > t[:, None])).sum(1)
    return out


def retrieval_recall(scores_i2t: np.ndarray, scores_t2i: np.ndarray, img2txt: list[list[int]],
                     txt2img: list[int]) -> dict:
    """ALBEF's itm_eval. scores_i2t: [N_img, N_txt], scores_t2i: [N_txt, N_img]; img2txt[i] lists image i's
    captions, txt2img[t] is caption t's image. An image's rank is the best rank of any of its captions in
    its row (an image without captions is never found, like ALBEF's rank 1e20); a caption's rank is that
    of its image in its row. R@k = percent of ranks < k. Keys: txt_r1/5/10 and txt_r_mean (image->text),
    img_r1/5/10 and img_r_mean (text->image), r_mean (mean of the six).

    Ties: ALBEF ranks by np.argsort(score)[::-1], so among equal scores the later index ranks first; that
    holds exactly for a stable sort, which is what is used here. (numpy's default sort is not stable on
    long rows, so ALBEF's own tie order there is arbitrary; exact ties are rare with float scores.)
    """
    s_i2t, s_t2i = np.asarray(scores_i2t, dtype=np.float64), np.asarray(scores_t2i, dtype=np.float64)
    if s_i2t.ndim != 2 or s_t2i.shape != s_i2t.shape[::-1]:
        raise ValueError(f"scores_i2t {s_i2t.shape}, scores_t2i {s_t2i.shape}: need [N_img, N_txt], [N_txt, N_img]")
    n_img, n_txt = s_i2t.shape
    if len(img2txt) != n_img or len(txt2img) != n_txt or n_img == 0 or n_txt == 0:
        raise ValueError(f"need len(img2txt) == {n_img} and len(txt2img) == {n_txt}, both > 0")
    if np.isnan(s_i2t).any() or np.isnan(s_t2i).any():
        raise ValueError("retrieval scores contain NaN")
    pair_img = np.array([i for i, caps in enumerate(img2txt) for _ in caps], dtype=np.int64)
    pair_txt = np.array([c for caps in img2txt for c in caps], dtype=np.int64)
    t2i = np.asarray(txt2img, dtype=np.int64)
    if (pair_txt < 0).any() or (pair_txt >= n_txt).any() or (t2i < 0).any() or (t2i >= n_img).any():
        raise ValueError("img2txt/txt2img hold an index outside the score matrices")
    img_rank = np.full(n_img, np.inf)
    np.minimum.at(img_rank, pair_img, _target_ranks(s_i2t, pair_img, pair_txt))  # best caption per image
    txt_rank = _target_ranks(s_t2i, np.arange(n_txt), t2i)
    out = {}
    for side, ranks in (("txt", img_rank), ("img", txt_rank)):
        for k in (1, 5, 10):
            out[f"{side}_r{k}"] = 100.0 * float(np.mean(ranks < k))
        out[f"{side}_r_mean"] = (out[f"{side}_r1"] + out[f"{side}_r5"] + out[f"{side}_r10"]) / 3
    out["r_mean"] = (out["txt_r_mean"] + out["img_r_mean"]) / 2
    return out


# ----------------------------------------------------------------------------- NLVR2
def nlvr2_accuracy(predictions: list, labels: list[int]) -> float:
    """Percent of predictions equal to their label (0/1); a None prediction (missing) counts as wrong."""
    if len(predictions) != len(labels) or not labels:
        raise ValueError(f"nlvr2: {len(predictions)} predictions for {len(labels)} labels")
    return 100.0 * sum(p == y for p, y in zip(predictions, labels)) / len(labels)


def nlvr2_consistency(identifiers: list[str] | None, predictions: list, labels: list[int]) -> float | None:
    """Percent of sentences whose every example is predicted correctly, as the official NLVR2 script.

    An identifier is split-setid-pairid-sentenceid ("dev-850-0-0"); the official script blanks the THIRD
    field (the image pair), so a group is split + set id + sentence id: "dev-850-0-0" and "dev-850-1-0"
    share a sentence, "dev-850-0-1" is another. None when any identifier is missing.
    """
    if not identifiers or not all(isinstance(x, str) and x for x in identifiers):
        return None
    if not len(identifiers) == len(predictions) == len(labels):
        raise ValueError("nlvr2_consistency: identifiers, predictions and labels differ in length")
    groups: dict[tuple, bool] = {}
    for i, (ident, p, y) in enumerate(zip(identifiers, predictions, labels)):
        parts = ident.split("-")
        if len(parts) < 3:
            raise ValueError(f"row {i}: identifier {ident!r} is not like 'dev-850-0-0'")
        key = tuple(parts[:2] + parts[3:])
        groups[key] = groups.get(key, True) and p == y
    return 100.0 * sum(groups.values()) / len(groups)


# ----------------------------------------------------------------------------- printing
def metrics_table(task, m) -> list:
    """(name, value) rows for printing a metrics dict (of vqa_accuracy, of the NLVR2 metrics or of
    retrieval_recall, as evaluate.evaluate_split returns them)."""
    if task == "vqa":
        if "vqa_accuracy" not in m:
            return [("VQA accuracy", "n/a (no answers: predictions only)"), ("n", str(m["n"]))]
        rows = [("VQA accuracy", f"{m['vqa_accuracy']:.2f}")]
        for kind in ("answer_type", "question_type"):  # each kind the annotations carry, e.g. "yes/no", "what color"
            per = m["per_type"].get(kind, {})
            rows += [(f" by {kind.replace('_', ' ')}", "")] * bool(per)
            rows += [(f"  {t}", f"{v:.2f}") for t, v in sorted(per.items())]
        return rows + [(k, str(m[k])) for k in ("n", "missing")]
    if task == "nlvr2":
        cons = m["nlvr2_consistency"]
        return [("NLVR2 accuracy", f"{m['nlvr2_accuracy']:.2f}"),
                ("NLVR2 consistency", "n/a (no identifiers)" if cons is None else f"{cons:.2f}"), ("n", str(m["n"]))]
    names = {"txt": "image->text", "img": "text->image"}
    rows = [(f"{names[s]} R@{k}", f"{m[f'{s}_r{k}']:.2f}") for s in ("txt", "img") for k in (1, 5, 10)]
    return rows + [("mean recall", f"{m['r_mean']:.2f}")]


def format_table(rows) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}".rstrip() for k, v in rows)


# ----------------------------------------------------------------------------- VQA answer classes
SOFT_SCORES = (0.0, 0.3, 0.6, 0.9, 1.0)  # VQA target of an answer given by 0, 1, 2, 3, 4+ annotators


def answer_vocabulary(rows, min_count):
    """The answers that are the majority answer of at least min_count training questions, most frequent
    first. Counting each question's majority answer (VQA v2's multiple_choice_answer) is the recipe of
    bottom-up attention, ViLT and VLMo: on VQA v2 train+val with min_count=9 it gives their 3,129 classes."""
    majority = Counter()
    for row in rows:
        answers = [normalize_vqa_answer(a) for a in human_answers(row)]
        if answers:
            majority[Counter(answers).most_common(1)[0][0]] += 1
    return sorted((a for a, n in majority.items() if n >= min_count), key=lambda a: (-majority[a], a))


def soft_scores(human_answers, answer_index):
    """{class: soft score} of one question (SOFT_SCORES by annotator count) and how many of its human
    answers fall outside the answer vocabulary (they are ignored)."""
    counts = Counter(normalize_vqa_answer(a) for a in human_answers)
    scores = {answer_index[a]: SOFT_SCORES[min(n, 4)] for a, n in counts.items() if a in answer_index}
    return scores, sum(n for a, n in counts.items() if a not in answer_index)
