"""Running a fine-tuned EVE on a split: VQA and NLVR2 predictions, retrieval score matrices (ITC similarity,
ITM re-ranking of the top candidates), and the official metrics of a whole split (evaluate_split).

finetune.py evaluates on val and test with evaluate_split; `python evaluate.py --checkpoint ...` scores a saved
checkpoint with it (load_finetuned). The metrics themselves are the pure functions of evaluate.py.
"""
import contextlib
import json
from dataclasses import dataclass

import torch
from tqdm import tqdm

import checkpoints
import data
import training
from evaluate import human_answers, nlvr2_accuracy, nlvr2_consistency, retrieval_recall, vqa_accuracy
from model import EVE, EVEConfig
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
    model = EVE(EVEConfig(**ckpt["config"])).to(device)
    checkpoints.load_model_state(model, ckpt["model"], path)
    return model, tokenizer_from_state(ckpt["vocab"]), ckpt
