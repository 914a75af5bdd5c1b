"""Evaluation of EVE: the compact loops that run a fine-tuned model on VQA, NLVR2 and retrieval, and the command
line that scores prediction files or fine-tuned checkpoints with the official metrics of metrics.py.

finetune.py evaluates on val and test with evaluate_split. From the command line (a table; --json prints one
JSON object, the metrics, as the last line):
  python evaluate.py --task vqa --predictions vqa_preds.json --annotations vqa_val.json --json
  python evaluate.py --task nlvr2 --predictions nlvr2_preds.json --annotations nlvr_dev.json
The baseline that answers each kind of question with one fixed answer (chosen on the training questions):
  python evaluate.py --task vqa --fixed-answers data/shapes/vqa_train.json --annotations data/shapes/vqa_test.json
Score a fine-tuned checkpoint of finetune.py on its val or test data (the data paths are stored in it):
  python evaluate.py --task retrieval --checkpoint runs/finetune_retrieval/best.pt --split test --json
  python evaluate.py --task vqa --checkpoint runs/finetune_vqa/best.pt --split test --predictions vqa_test_preds.json
  (--annotations FILE and --image-root DIR score other data; --k-test and --rank set the retrieval re-ranking)
"""
import argparse
import contextlib
import json
from dataclasses import dataclass

import torch
from tqdm import tqdm

import checkpoints
import data
import training
from metrics import (fixed_answers, format_table, human_answers, metrics_table, nlvr2_accuracy, nlvr2_consistency,
                     question_kind, retrieval_recall, vqa_accuracy)
from heads import EVEWithHeads
from model import EVEConfig
from tokenization import tokenizer_from_state


@dataclass(frozen=True)
class Task:
    """A fine-tuning benchmark: what it trains, on which data, and which val metric picks best.pt."""
    objective: str  # the model.TASK_HEADS part(s) it trains
    train_set: type  # data.py class of its training JSON
    eval_set: type  # data.py class of its val and test JSON
    metric: str  # key of evaluate_split's metrics that selects the best checkpoint (higher is better)


# the fine-tuning tasks: finetune.py trains them, evaluate_split scores them, ablate.py tabulates their metrics
TASKS = {"vqa": Task("vqa", data.VQADataset, data.VQADataset, "vqa_accuracy"),
         "nlvr2": Task("nlvr2", data.NLVR2Dataset, data.NLVR2Dataset, "nlvr2_accuracy"),
         "retrieval": Task("itc_itm", data.RetrievalTrainDataset, data.RetrievalEvalDataset, "r_mean")}

NOT_CANDIDATE = -1e4  # retrieval score of a pair outside the query's top-k ITC candidates (ALBEF: -100)
RANK_MODES = ("itc", "itm", "itc+itm")  # how retrieval ranks a query's top-k candidates: see rerank_topk


# ----------------------------------------------------------------------------- predictions
def _batches(loader, device, desc):
    """The loader's batches on `device`, without the collator's count of skipped bad items (--skip-bad: they
    get no prediction), with a progress bar named desc (none if desc is None)."""
    for batch in tqdm(loader, desc=desc, leave=False, dynamic_ncols=True, disable=desc is None):
        batch = {k: v.to(device, non_blocking=True) if hasattr(v, "to") else v for k, v in batch.items() if k != "skipped"}
        if batch:  # empty when every item of the batch was skipped
            yield batch


def _inference(device):
    """no_grad, plus bf16 autocast on GPU (fp32 on CPU)."""
    stack = contextlib.ExitStack()
    stack.enter_context(torch.no_grad())
    stack.enter_context(training.autocast(device, "auto"))
    return stack


def predict_vqa(model, loader, answers, device):
    """The highest-scoring answer of each question: [{"question_id", "answer"}], the VQA server's format."""
    model.eval()
    preds = []
    with _inference(device):
        for b in _batches(loader, device, "eval vqa"):
            logits, _ = model.vqa_logits(b["image"], b["text_ids"], b["text_mask"])  # (B, num_answers)
            preds += [{"question_id": q, "answer": answers[k]}
                      for q, k in zip(b["question_id"].tolist(), logits.argmax(1).tolist())]
    return preds


def predict_nlvr2(model, loader, device):
    """(predictions, labels, identifiers): 0/1 lists and the rows' identifiers ("" where a row has none)."""
    model.eval()
    preds, labels, identifiers = [], [], []
    with _inference(device):
        for b in _batches(loader, device, "eval nlvr2"):
            logits, _ = model.nlvr2_logits(b["image0"], b["image1"], b["text_ids"], b["text_mask"])  # (B, 2)
            preds += logits.argmax(1).tolist()
            labels += b["label"].tolist()
            identifiers += b["identifier"]
    return preds, labels, identifiers


def rerank_topk(sim, k_test, score_pairs, rank="itc+itm", temp=1.0):
    """ALBEF's re-ranking, with a choice of score for the candidates. sim: [N_img, N_txt] ITC similarities.
    Every image's top k_test texts and every text's top k_test images are the candidates; score_pairs(image_idx
    [P], text_idx [P]) -> [P] gives their ITM score (the match log-odds). rank (RANK_MODES):
      itc      the ITC similarities themselves, no ITM (also what k_test <= 0 gives);
      itm      a candidate's score is its ITM score alone (ALBEF's), so an untrained ITM head can scramble
               a good ITC order;
      itc+itm  a candidate's score is sim / temp (the ITC logit) + its ITM score: both heads vote.
    With itm and itc+itm every other pair gets NOT_CANDIDATE, below every candidate. A pair in both candidate
    lists is scored once. Returns (scores_i2t [N_img, N_txt], scores_t2i [N_txt, N_img])."""
    if rank not in RANK_MODES:
        raise ValueError(f"unknown retrieval rank mode {rank!r}; choose from {RANK_MODES}")
    if k_test <= 0 or rank == "itc":
        return sim.clone(), sim.t().clone()
    n_img, n_txt = sim.shape
    top_t = sim.topk(min(k_test, n_txt), dim=1).indices  # (N_img, k): each image's candidate texts
    top_i = sim.t().topk(min(k_test, n_img), dim=1).indices  # (N_txt, k): each text's candidate images
    img = torch.cat([torch.arange(n_img).repeat_interleave(top_t.shape[1]), top_i.flatten()])
    txt = torch.cat([top_t.flatten(), torch.arange(n_txt).repeat_interleave(top_i.shape[1])])
    pairs, where = torch.unique(img * n_txt + txt, return_inverse=True)  # sorted by image, then text
    scores = score_pairs(pairs // n_txt, pairs % n_txt).float().cpu()[where]  # back to one score per candidate
    if rank == "itc+itm":
        scores = scores + sim[img, txt].float() / temp
    i2t = torch.full((n_img, n_txt), NOT_CANDIDATE)
    t2i = torch.full((n_txt, n_img), NOT_CANDIDATE)
    n = top_t.numel()  # the first n candidates are the images' lists, the rest the texts'
    i2t[img[:n], txt[:n]] = scores[:n]
    t2i[txt[n:], img[n:]] = scores[n:]
    return i2t, t2i


def retrieval_scores(model, dataset, tokenizer, k_test, device, batch_size=64, num_workers=0, rank="itc+itm"):
    """Score matrices for retrieval_recall on a RetrievalEvalDataset: ITC similarity of every image-text pair
    (features in batches), then re-ranking of the top k_test candidates by `rank` (rerank_topk). The ITM score
    is the match log-odds, logit[1] - logit[0]: monotonic in the match probability, without its saturation at 1.
    Returns (scores_i2t [N_img, N_txt], scores_t2i [N_txt, N_img]) as numpy arrays."""
    model.eval()
    collate = data.Collator(tokenizer, model.cfg.max_text_len)
    images = data.make_loader(dataset, batch_size, collate, shuffle=False, num_workers=num_workers)
    texts = collate([{"text": t} for t in dataset.texts])  # text_ids (N_txt, T), text_mask
    img_feat = torch.zeros(len(dataset), model.cfg.itc_dim)
    loaded = torch.zeros(len(dataset), dtype=torch.bool)  # False for images skipped as bad (skip_bad)
    with _inference(device):
        for b in _batches(images, device, "eval retrieval: image features"):
            img_feat[b["index"].cpu()] = model.image_features(b["image"]).float().cpu()
            loaded[b["index"].cpu()] = True
        txt_feat = torch.cat([model.text_features(texts["text_ids"][s:s + batch_size].to(device),
                                                  texts["text_mask"][s:s + batch_size].to(device)).float().cpu()
                              for s in range(0, len(dataset.texts), batch_size)])
    sim = img_feat @ txt_feat.t()  # (N_img, N_txt)
    sim[~loaded] = 2 * NOT_CANDIDATE  # a skipped image is nobody's candidate

    # identical captions (frequent in the shapes world) are scored once per image
    caption_id = {}
    uid = torch.tensor([caption_id.setdefault(t, len(caption_id)) for t in dataset.texts])  # text -> caption
    first = torch.full((len(caption_id),), len(uid)).scatter_reduce(0, uid, torch.arange(len(uid)), "amin")

    def itm_scores(img_idx, txt_idx):
        """ITM log-odds of the pairs (sorted by image): each image is loaded once more, its pairs run in batches."""
        pairs, where = torch.unique(img_idx * len(first) + uid[txt_idx], return_inverse=True)
        img_idx, txt_idx = pairs // len(first), first[pairs % len(first)]
        out = torch.full((len(pairs),), 2 * NOT_CANDIDATE)  # pairs of skipped images keep a low score
        bar = tqdm(total=len(pairs), desc="eval retrieval: ITM re-ranking (pairs)", leave=False, dynamic_ncols=True)
        with _inference(device):
            for b in _batches(images, device, None):
                index = b["index"].cpu()
                lo, hi = torch.searchsorted(img_idx, torch.stack([index[0], index[-1] + 1])).tolist()
                row_of = torch.full((int(index[-1] - index[0]) + 1,), -1)
                row_of[index - index[0]] = torch.arange(len(index))  # image index -> row of this batch
                for s in range(lo, hi, batch_size):
                    p = torch.arange(s, min(s + batch_size, hi))
                    rows = row_of[img_idx[p] - index[0]]
                    p, rows = p[rows >= 0], rows[rows >= 0]
                    if len(p):
                        mask = texts["text_mask"][txt_idx[p]]
                        T = int(mask.sum(1).max())  # drop the columns that are padding in every pair of the chunk
                        ids, mask = texts["text_ids"][txt_idx[p], :T].to(device), mask[:, :T].to(device)
                        logits, _ = model.itm_logits(b["image"][rows.to(device)], ids, mask)
                        out[p] = (logits[:, 1] - logits[:, 0]).float().cpu()
                bar.update(hi - lo)
        bar.close()
        return out[where]

    i2t, t2i = rerank_topk(sim, k_test, itm_scores, rank, float(model.itc_temperature().detach()))
    return i2t.numpy(), t2i.numpy()


# ----------------------------------------------------------------------------- scoring a split
def evaluate_split(task, model, tokenizer, json_path, image_root, device, answers=None, k_test=16, rank="itc+itm",
                   batch_size=64, num_workers=0, skip_bad=False, predictions_path=None) -> dict:
    """Metrics of `model` on one split file: vqa_accuracy (+ per_type, n, missing), nlvr2_accuracy and
    nlvr2_consistency, or txt_r1 ... img_r10 and r_mean (k_test and rank: see rerank_topk). predictions_path:
    where to write VQA predictions ([{"question_id", "answer"}]) or NLVR2 ones ([{"identifier" or "index",
    "prediction"}]). VQA rows without answers (a test-dev split) give predictions only. Raises data.DataError
    on bad data."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {sorted(TASKS)}")
    dataset = TASKS[task].eval_set(json_path, image_root, model.cfg.image_size, skip_bad=skip_bad)
    if task == "retrieval":
        i2t, t2i = retrieval_scores(model, dataset, tokenizer, k_test, device, batch_size, num_workers, rank)
        return retrieval_recall(i2t, t2i, dataset.img2txt, dataset.txt2img)
    loader = data.make_loader(dataset, batch_size, data.Collator(tokenizer, model.cfg.max_text_len), shuffle=False,
                              num_workers=num_workers)
    if task == "vqa":
        rows = predict_vqa(model, loader, answers, device)
        has_answers = all(human_answers(r) for r in dataset.rows)
        metrics = vqa_accuracy(rows, dataset.rows) if has_answers else {"n": len(dataset.rows)}
    else:
        preds, labels, ids = predict_nlvr2(model, loader, device)
        rows = [({"identifier": x} if x else {"index": i}) | {"prediction": str(bool(p))}  # index: file order
                for i, (x, p) in enumerate(zip(ids, preds))]
        metrics = {"nlvr2_accuracy": nlvr2_accuracy(preds, labels),
                   "nlvr2_consistency": nlvr2_consistency(ids, preds, labels), "n": len(labels)}
    if predictions_path:
        with open(predictions_path, "w", encoding="utf-8") as f:
            json.dump(rows, f)
    return metrics


def load_finetuned(path, device):
    """(model, tokenizer, checkpoint) of a finetune.py checkpoint (best.pt or last.pt), weights loaded strictly."""
    ckpt = checkpoints.load_checkpoint(path)
    if "finetune_config" not in ckpt:
        raise ValueError(f"{path} is not a finetune.py checkpoint (no 'finetune_config'; a pretrain.py "
                         f"checkpoint has no task head: fine-tune it first)")
    try:
        cfg = EVEConfig.from_dict(ckpt["config"])
    except (ValueError, TypeError) as e:
        raise ValueError(f"{path}: {e}") from None
    model = EVEWithHeads(cfg, **ckpt.get("heads", {})).to(device)
    checkpoints.load_model_state(model, ckpt["model"], path)
    return model, tokenizer_from_state(ckpt["vocab"]), ckpt


# ----------------------------------------------------------------------------- command line: prediction files
def _read_rows(path: str, what: str) -> list[dict]:
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


def _require(rows: list[dict], keys: tuple, path: str, what: str) -> None:
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


def _files(args, parser) -> tuple[list[dict], list[dict]]:
    if not args.predictions or not args.annotations:
        parser.error(f"--task {args.task} needs --predictions and --annotations")
    return _read_rows(args.predictions, "predictions"), _read_rows(args.annotations, "annotations")


def score_fixed_answers(args, parser) -> tuple[dict, list]:
    """--fixed-answers TRAIN_JSON: score fixed_answers(TRAIN_JSON), one answer per question type, on --annotations."""
    if not args.annotations:
        parser.error("--fixed-answers needs --annotations (the questions to score)")
    anns, train = _read_rows(args.annotations, "annotations"), _read_rows(args.fixed_answers, "training")
    _require(anns, ("question_id",), args.annotations, "annotations")
    try:
        best = fixed_answers(train)
    except ValueError as e:
        raise ValueError(f"training file {args.fixed_answers}: {e}") from None
    preds = [{"question_id": r["question_id"], "answer": best.get(question_kind(r), "")} for r in anns]
    try:
        m = vqa_accuracy(preds, anns)
    except ValueError as e:
        raise ValueError(f"annotations file {args.annotations}: {e}") from None
    answers = ", ".join(f"{k or '(no type)'}: {a}" for k, a in sorted(best.items()))
    return m, [("fixed answer per question type", answers)] + metrics_table("vqa", m)


def score_vqa_files(args, parser) -> tuple[dict, list]:
    preds, anns = _files(args, parser)
    _require(preds, ("question_id", "answer"), args.predictions, "predictions")
    _require(anns, ("question_id",), args.annotations, "annotations")
    try:
        m = vqa_accuracy(preds, anns)
    except ValueError as e:  # name both files: the message says which of them and which row
        raise ValueError(f"scoring {args.predictions} against {args.annotations}: {e}") from None
    return m, metrics_table("vqa", m) + [(k, str(m[k])) for k in ("unknown", "duplicates")]


def score_nlvr2_files(args, parser) -> tuple[dict, list]:
    """Predictions [{"identifier" or "index", "prediction": "True"/"False"}] are matched to the annotation
    rows by "identifier" when the row has one, else by "index" (0-based annotation row), else by their own
    position in the file. Unmatched predictions count in "unknown"; rows without one count as wrong, in "missing"."""
    preds, anns = _files(args, parser)
    _require(preds, ("prediction",), args.predictions, "predictions")
    _require(anns, ("label",), args.annotations, "annotations")
    labels = [_as_label(r["label"], f"annotations file {args.annotations} row {i}") for i, r in enumerate(anns)]
    ids = [r.get("identifier") for r in anns]
    row_of = {x: i for i, x in enumerate(ids) if x is not None}
    guess, unknown = [None] * len(anns), 0
    for j, row in enumerate(preds):
        where = f"predictions file {args.predictions} row {j}"
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


def score_checkpoint(args, parser) -> tuple[dict, list]:
    """--checkpoint: run the fine-tuned model on --split of its own data (paths stored in the checkpoint;
    --annotations and --image-root override them); --predictions then names the file to write."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer, ckpt = load_finetuned(args.checkpoint, device)
    fc = ckpt["finetune_config"]
    if fc["task"] != args.task:
        raise ValueError(f"{args.checkpoint} was fine-tuned for --task {fc['task']}, not {args.task}")
    json_path = args.annotations or fc[f"{args.split}_json"]
    k_test = fc["k_test"] if args.k_test is None else args.k_test
    rank = fc.get("rank", "itm") if args.rank is None else args.rank  # checkpoints older than the option: itm
    if rank not in RANK_MODES:
        parser.error(f"--rank must be one of {', '.join(RANK_MODES)}, not {rank!r}")
    try:
        m = evaluate_split(args.task, model, tokenizer, json_path, args.image_root or fc["image_root"], device,
                           answers=ckpt.get("answers"), k_test=k_test, rank=rank, batch_size=args.batch_size,
                           num_workers=args.num_workers, predictions_path=args.predictions)
    except data.DataError as e:  # one clean line, also for errors raised in loader workers
        raise training.data_error_exit(e) from None
    return m, [("checkpoint", f"{args.checkpoint} (step {ckpt.get('step')})"), ("data", str(json_path))] + \
        metrics_table(args.task, m)


def _needs_checkpoint(args, parser):
    parser.error(f"--task {args.task} has no predictions-file format: score a model with --checkpoint")


# ----------------------------------------------------------------------------- command line
# task -> function(args, parser) returning (metrics dict, table rows) for prediction files; add tasks here
FILE_SCORERS = {"vqa": score_vqa_files, "nlvr2": score_nlvr2_files, "retrieval": _needs_checkpoint}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", required=True, choices=list(FILE_SCORERS), help="which benchmark to score")
    parser.add_argument("--predictions", help="predictions JSON: vqa [{question_id, answer}], "
                        "nlvr2 [{identifier or index, prediction}]; with --checkpoint, the file to write them to")
    parser.add_argument("--annotations", help="annotations JSON (ALBEF format; official VQA files work too); "
                        "with --checkpoint, overrides the split's file stored in the checkpoint")
    parser.add_argument("--json", action="store_true", help="print one JSON object with the metrics instead of a table")
    parser.add_argument("--fixed-answers", metavar="TRAIN_JSON", help="vqa: score, instead of predictions, the best "
                        "fixed answer per question_type of TRAIN_JSON (a baseline that ignores the image)")
    group = parser.add_argument_group("scoring a fine-tuned checkpoint")
    group.add_argument("--checkpoint", help="finetune.py checkpoint (best.pt): run the model instead of reading predictions")
    group.add_argument("--split", default="val", choices=["val", "test"], help="which of its data splits")
    group.add_argument("--image-root", help="folder of the images (default: the checkpoint's)")
    group.add_argument("--k-test", type=int, help="retrieval: ITM re-ranking candidates, 0 = ITC only (default: the checkpoint's)")
    group.add_argument("--rank", help="retrieval: rank those candidates by itc (similarity), itm (log-odds) or itc+itm "
                       "(ITC logit + ITM log-odds) (default: the checkpoint's)")
    group.add_argument("--batch-size", type=int, default=64, help="images or pairs per forward pass")
    group.add_argument("--num-workers", type=int, default=0, help="data loader processes")
    return parser


def main(argv=None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.fixed_answers and (args.task != "vqa" or args.checkpoint or args.predictions):
            parser.error("--fixed-answers scores a VQA baseline: use it with --task vqa and --annotations only")
        score = score_checkpoint if args.checkpoint else score_fixed_answers if args.fixed_answers else FILE_SCORERS[args.task]
        metrics, table = score(args, parser)
    except ValueError as e:  # bad data or paths: a message naming the file and row, exit code 2
        parser.error(str(e))
    if args.json:
        print(json.dumps(metrics))
    else:
        print(format_table(table))
    return metrics


if __name__ == "__main__":
    main()
