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
A split without answers (VQA test-dev, test) gives the evaluation server's file, checked to answer each question once:
  python evaluate.py --task vqa --checkpoint best.pt --annotations data/vqa/test-dev.json --predictions answers.json
Every result carries its split's name (--split; default val, or the annotations file's stem). NLVR2's dev and test-P
are a checkpoint's val and test (prepare.py's val.json and test.json), or name any file:
  python evaluate.py --task nlvr2 --checkpoint runs/finetune_nlvr2/best.pt --split dev --json
  python evaluate.py --task nlvr2 --checkpoint runs/finetune_nlvr2/best.pt --split test-P --json
  python evaluate.py --task nlvr2 --predictions preds.json --annotations data/nlvr2/test.json --split test-P
"""
import argparse
import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

import checkpoints
import data
import training
from metrics import (format_table, human_answers, metrics_table, nlvr2_accuracy, nlvr2_consistency, retrieval_recall,
                     vqa_accuracy)
from predictions import check_each_question_once, score_fixed_answers, score_nlvr2_file, score_vqa_file, write_json
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
    split_names: dict = field(default_factory=dict)  # the benchmark's own names of its val and test splits


# the fine-tuning tasks: finetune.py trains them, evaluate_split scores them, ablate.py tabulates their metrics
TASKS = {"vqa": Task("vqa", data.VQADataset, data.VQADataset, "vqa_accuracy"),
         "nlvr2": Task("nlvr2", data.NLVR2Dataset, data.NLVR2Dataset, "nlvr2_accuracy", {"dev": "val", "test-P": "test"}),
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
                   batch_size=64, num_workers=0, skip_bad=False, predictions_path=None, name=None) -> dict:
    """Metrics of `model` on one split file: vqa_accuracy (+ per_type, n, missing), nlvr2_accuracy and
    nlvr2_consistency, or txt_r1 ... img_r10 and r_mean (k_test and rank: see rerank_topk). predictions_path:
    where to write VQA predictions ([{"question_id", "answer"}]) or NLVR2 ones ([{"identifier" or "index",
    "prediction"}]). VQA rows without answers (test-dev, test) give predictions only: the file the evaluation
    server takes, checked to answer each question of the split once, and a line saying so, with the split's
    `name` (default: the file's stem). Raises data.DataError on bad data."""
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
        if all(human_answers(r) for r in dataset.rows):
            metrics = vqa_accuracy(rows, dataset.rows)
        else:  # a test split: nothing to score, so the file must be right for the server
            metrics = {"n": len(dataset.rows)}
            if predictions_path:
                try:  # a question left out by skip_bad, or asked twice in the file, would be refused there
                    check_each_question_once(rows, dataset.rows, str(json_path))
                except ValueError as e:
                    raise data.DataError(str(e)) from None
                write_json(predictions_path, rows)
                print(f"wrote {len(rows)} answers for {len(dataset.rows)} questions of "
                      f"{name or Path(json_path).stem} (each once): {predictions_path}")
            return metrics
    else:
        preds, labels, ids = predict_nlvr2(model, loader, device)
        rows = [({"identifier": x} if x else {"index": i}) | {"prediction": str(bool(p))}  # index: file order
                for i, (x, p) in enumerate(zip(ids, preds))]
        metrics = {"nlvr2_accuracy": nlvr2_accuracy(preds, labels),
                   "nlvr2_consistency": nlvr2_consistency(ids, preds, labels), "n": len(labels)}
    if predictions_path:
        write_json(predictions_path, rows)
    return metrics


def load_pretrained(path, device):
    """(model, tokenizer, checkpoint) of a pretrain.py (or finetune.py) checkpoint, weights loaded strictly; errors
    as one line."""
    ckpt = checkpoints.load_checkpoint(path)
    cfg = checkpoints.model_config(ckpt, path, EVEConfig)
    model = EVEWithHeads(cfg, **ckpt.get("heads", {})).to(device)
    checkpoints.load_model_state(model, ckpt["model"], path)
    return model, tokenizer_from_state(ckpt["vocab"], cfg.max_text_len), ckpt


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


# ----------------------------------------------------------------------------- command line
# task -> function(predictions file, annotations file) returning (metrics dict, table rows); add tasks here
FILE_SCORERS = {"vqa": score_vqa_file, "nlvr2": score_nlvr2_file}


def score_checkpoint(args, parser, name) -> tuple[dict, list]:
    """--checkpoint: run the fine-tuned model on split `name` of its own data (val or test, or NLVR2's names of
    them, dev and test-P: paths stored in the checkpoint), or on --annotations (and --image-root); --predictions
    then names the file to write."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer, ckpt = load_finetuned(args.checkpoint, device)
    fc = ckpt["finetune_config"]
    if fc["task"] != args.task:
        raise ValueError(f"{args.checkpoint} was fine-tuned for --task {fc['task']}, not {args.task}")
    stored = TASKS[args.task].split_names.get(name, name)  # NLVR2's dev and test-P are its val and test
    if not args.annotations and stored not in ("val", "test"):
        parser.error(f"--split {name}: the checkpoint stores its val and test files only; give this one with --annotations")
    json_path = args.annotations or fc[f"{stored}_json"]
    k_test = fc["k_test"] if args.k_test is None else args.k_test
    rank = fc.get("rank", "itm") if args.rank is None else args.rank  # checkpoints older than the option: itm
    if rank not in RANK_MODES:
        parser.error(f"--rank must be one of {', '.join(RANK_MODES)}, not {rank!r}")
    try:
        m = evaluate_split(args.task, model, tokenizer, json_path, args.image_root or fc["image_root"], device,
                           answers=ckpt.get("answers"), k_test=k_test, rank=rank, batch_size=args.batch_size,
                           num_workers=args.num_workers, predictions_path=args.predictions, name=name)
    except data.DataError as e:  # one clean line, also for errors raised in loader workers
        raise training.data_error_exit(e) from None
    return m, [("checkpoint", f"{args.checkpoint} (step {ckpt.get('step')})"), ("data", str(json_path))] + \
        metrics_table(args.task, m)


def score_files(args, parser, name) -> tuple[dict, list]:
    """--predictions and --annotations, or --fixed-answers and --annotations: score files, no model."""
    if args.fixed_answers:
        if args.task != "vqa" or args.predictions or not args.annotations:
            parser.error("--fixed-answers scores a VQA baseline: use it with --task vqa and --annotations only")
        return score_fixed_answers(args.fixed_answers, args.annotations)
    if args.task not in FILE_SCORERS:
        parser.error(f"--task {args.task} has no predictions-file format: score a model with --checkpoint")
    if not args.predictions or not args.annotations:
        parser.error(f"--task {args.task} needs --predictions and --annotations")
    m, table = FILE_SCORERS[args.task](args.predictions, args.annotations)
    return m, [("data", args.annotations)] + table


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", required=True, choices=list(TASKS), help="which benchmark to score")
    parser.add_argument("--split", help="the split's name, printed and in the JSON; with --checkpoint and no "
                        "--annotations, val or test (NLVR2: dev or test-P) picks its own data (default: val, or "
                        "the stem of --annotations' file name)")
    parser.add_argument("--predictions", help="predictions JSON: vqa [{question_id, answer}], "
                        "nlvr2 [{identifier or index, prediction}]; with --checkpoint, the file to write them to")
    parser.add_argument("--annotations", help="annotations JSON (ALBEF format; official VQA files work too); "
                        "with --checkpoint, the split's file, in place of the one stored in the checkpoint")
    parser.add_argument("--json", action="store_true", help="print one JSON object with the metrics instead of a table")
    parser.add_argument("--fixed-answers", metavar="TRAIN_JSON", help="vqa: score, instead of predictions, the best "
                        "fixed answer per question_type of TRAIN_JSON (a baseline that ignores the image)")
    group = parser.add_argument_group("scoring a fine-tuned checkpoint")
    group.add_argument("--checkpoint", help="finetune.py checkpoint (best.pt): run the model instead of reading predictions")
    group.add_argument("--image-root", help="folder of the images (default: the checkpoint's)")
    group.add_argument("--k-test", type=int, help="retrieval: ITM re-ranking candidates, 0 = ITC only (default: the checkpoint's)")
    group.add_argument("--rank", help="retrieval: rank those candidates by itc (similarity), itm (log-odds) or itc+itm "
                       "(ITC logit + ITM log-odds) (default: the checkpoint's)")
    group.add_argument("--batch-size", type=int, default=64, help="images or pairs per forward pass")
    group.add_argument("--num-workers", type=int, default=0, help="data loader processes")
    return parser


def main(argv=None) -> dict:
    """Score one split; returns its metrics with its name under "split" (also in the JSON and the table)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    name = args.split or (Path(args.annotations).stem if args.annotations else "val")
    try:
        if args.fixed_answers and args.checkpoint:
            parser.error("--fixed-answers scores a VQA baseline: use it with --task vqa and --annotations only")
        metrics, table = (score_checkpoint if args.checkpoint else score_files)(args, parser, name)
    except ValueError as e:  # bad data or paths: a message naming the file and row, exit code 2
        parser.error(str(e))
    metrics = {"split": name, **metrics}
    if args.json:
        print(json.dumps(metrics))
    else:
        print(format_table([("split", name)] + table))
    return metrics


if __name__ == "__main__":
    main()
