"""finetune.py, evaluate.py's evaluation loops and its --checkpoint path, on a tiny shapes world with a tiny model."""
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import data
import evaluate
import finetune
import metrics
import pretrain
import shapes
import tokenization
from model import make_config

ROOT = Path(__file__).resolve().parents[1]
MODEL = ["--preset", "micro"]
RUN = ["--batch-size", "8", "--num-workers", "0", "--max-steps", "1", "--min-answer-count", "1", "--k-test", "4"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    return shapes.make_shapes_world(root, n_train=24, n_val=8, n_test=8, nlvr2_per_split=(16, 8, 8))


def data_args(world, task):
    """Explicit paths: --data-dir would (re)build a full-size world."""
    return [str(a) for a in ["--task", task, "--image-root", world["root"], "--vocab", world["vocab"],
            "--answer-list", world["answer_list"]] + [
        x for split in ("train", "val", "test") for x in (f"--{split}-json", world[f"{task}_{split}"])]]


@pytest.fixture(scope="module")
def finetuned(world, tmp_path_factory):
    """One training step and the val + test evaluations of each task, from scratch."""
    runs = {}
    for task in ("vqa", "nlvr2", "retrieval"):
        out = tmp_path_factory.mktemp(task)
        results = finetune.main(data_args(world, task) + MODEL + RUN + ["--out-dir", str(out)])
        runs[task] = SimpleNamespace(out=out, results=results)
    return runs


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


@pytest.mark.parametrize("task,keys", [("vqa", ["vqa_accuracy"]), ("nlvr2", ["nlvr2_accuracy", "nlvr2_consistency"]),
                                       ("retrieval", ["txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10", "r_mean"])])
def test_one_step_and_evaluation(finetuned, task, keys):
    run = finetuned[task]
    results = json.loads((run.out / "results.json").read_text())
    assert results == json.loads(json.dumps(run.results))
    assert results["task"] == task and results["best_step"] == 1
    for split in ("val", "test"):
        assert all(isinstance(results[split][k], float) for k in keys), results[split]
    assert 0 <= results["test"][keys[0]] <= 100
    records = read_jsonl(run.out / "metrics.jsonl")
    assert [r.get("split") for r in records] == [None, "val", "test"] and records[0]["step"] == 1
    assert records[2][keys[0]] == results["test"][keys[0]]
    best = torch.load(run.out / "best.pt", weights_only=True)
    assert best["step"] == 1 and best["finetune_config"]["task"] == task and (run.out / "last.pt").exists()


def test_vqa_predictions_file(finetuned, world):
    preds = json.loads((finetuned["vqa"].out / "vqa_test_predictions.json").read_text())
    questions = json.loads(Path(world["vqa_test"]).read_text())
    assert sorted(p["question_id"] for p in preds) == sorted(q["question_id"] for q in questions)
    answers = set(json.loads(Path(world["answer_list"]).read_text()))
    assert all(set(p) == {"question_id", "answer"} and p["answer"] in answers for p in preds)
    # the server-format file scores like the run did
    m = metrics.vqa_accuracy(preds, questions)
    assert m["vqa_accuracy"] == pytest.approx(finetuned["vqa"].results["test"]["vqa_accuracy"])


def test_nlvr2_predictions_file_round_trip(finetuned, world, capsys):
    path = finetuned["nlvr2"].out / "nlvr2_test_predictions.json"
    m = evaluate.main(["--task", "nlvr2", "--predictions", str(path), "--annotations", str(world["nlvr2_test"]), "--json"])
    test = finetuned["nlvr2"].results["test"]
    assert m["nlvr2_accuracy"] == pytest.approx(test["nlvr2_accuracy"]) and m["missing"] == 0
    assert m["nlvr2_consistency"] == pytest.approx(test["nlvr2_consistency"])


# ---- VQA answers and targets ---------------------------------------------------------------

def test_vqa_soft_targets_by_hand():
    index = {"p": 0, "b": 1, "c": 2, "d": 3, "e": 4, "red": 5}
    humans = ["p"] + ["b"] * 2 + ["c"] * 3 + ["d"] * 4 + ["e"] * 5  # 1..5 annotators
    scores, ignored = metrics.soft_scores(humans + ["zebra", "zebra", "cat"], index)
    assert scores == {0: 0.3, 1: 0.6, 2: 0.9, 3: 1.0, 4: 1.0} and ignored == 3
    # answers are normalised as the official evaluation does: "Red." and "red" are one answer
    targets = finetune.vqa_targets([humans, ["Red.", "red", "the cat"], []], index)
    expected = torch.zeros(3, 6)
    expected[0, :5] = torch.tensor([0.3, 0.6, 0.9, 1.0, 1.0])
    expected[1, 5] = 0.6
    assert torch.equal(targets, expected)


def test_answer_vocabulary_counts_majority_answers(capsys, tmp_path):
    rows = [{"answer": ["two"] * 6 + ["3"] * 4}, {"answer": ["2"] * 10}, {"answer": ["yes"] * 7 + ["no"] * 3},
            {"answer": "No"}, {"answer": ["no"] * 10}, {"question_id": 9}]
    # majority answers: 2 (twice: "two" normalises to "2"), yes (once), no (twice); "3" is never a majority
    assert metrics.answer_vocabulary(rows, 1) == ["2", "no", "yes"]
    assert metrics.answer_vocabulary(rows, 2) == ["2", "no"]
    cfg = finetune.FinetuneConfig(min_answer_count=2)
    assert finetune.vqa_answers(cfg, rows) == ["2", "no"]
    out = capsys.readouterr().out  # outside {2, no}: the four "3" and the seven "yes"
    assert "11 of 41 human answers" in out and "1 questions have no target" in out
    # or the given list, normalised and deduplicated
    (tmp_path / "answers.json").write_text(json.dumps(["Two", "yes", "no", "2"]))
    cfg = finetune.FinetuneConfig(answer_vocab="list", answer_list=str(tmp_path / "answers.json"))
    assert finetune.vqa_answers(cfg, rows) == ["2", "yes", "no"]
    assert "4 of 41 human answers" in capsys.readouterr().out


# ---- retrieval re-ranking ------------------------------------------------------------------

class PairImages(torch.utils.data.Dataset):
    """N images (pixel value = image index) with one caption each, "c<i>" unless given."""

    def __init__(self, n, texts=None):
        self.texts, self.img2txt, self.txt2img = texts or [f"c{i}" for i in range(n)], [[i] for i in range(n)], list(range(n))

    def __len__(self):
        return len(self.texts)

    def __getitem__(self, i):
        return {"image": torch.full((3, 2, 2), float(i)), "index": i}


class StubModel(torch.nn.Module):
    """ITC puts each caption's true image SECOND (a neighbour first); the ITM stub knows the truth and
    records every pair it is asked about."""

    def __init__(self, tokenizer, n):
        super().__init__()
        self.cfg = SimpleNamespace(max_text_len=8, itc_dim=n)
        self.word_of = {tokenizer.token_to_id[f"c{i}"]: i for i in range(n) if f"c{i}" in tokenizer.token_to_id}
        self.n, self.scored = n, []

    def image_features(self, images):
        return torch.eye(self.n)[images[:, 0, 0, 0].long()]

    def text_features(self, ids, mask):
        t = torch.tensor([self.word_of[x] for x in ids[:, 1].tolist()])
        return 0.6 * torch.eye(self.n)[t] + 0.8 * torch.eye(self.n)[(t + 1) % self.n]  # sim 0.8 neighbour, 0.6 true

    def itc_temperature(self):
        return torch.tensor(0.5)

    def itm_logits(self, images, ids, mask):
        img = images[:, 0, 0, 0].long().tolist()
        txt = [self.word_of[x] for x in ids[:, 1].tolist()]
        self.scored += list(zip(img, txt))
        return torch.tensor([[0.0, 5.0 if i == t else -5.0] for i, t in zip(img, txt)]), []


def test_retrieval_reranking_with_stub_itm():
    n = 6
    dataset = PairImages(n)
    tokenizer = tokenization.WordPieceTokenizer(tokenization.build_vocab(dataset.texts))
    model = StubModel(tokenizer, n)
    i2t, t2i = evaluate.retrieval_scores(model, dataset, tokenizer, k_test=2, device=torch.device("cpu"), batch_size=4)
    # ITC alone ranks every true pair second; re-ranking its top 2 by the ITM stub puts it first
    sim = torch.eye(n) * 0.6 + torch.eye(n).roll(-1, dims=1) * 0.8  # sim[i, t]: 0.8 where t = i - 1
    itc = metrics.retrieval_recall(sim.numpy(), sim.t().numpy(), dataset.img2txt, dataset.txt2img)
    assert itc["txt_r1"] == 0 and itc["img_r1"] == 0
    m = metrics.retrieval_recall(i2t, t2i, dataset.img2txt, dataset.txt2img)
    assert m["r_mean"] == 100 and m["txt_r1"] == 100 and m["img_r1"] == 100
    # only the top-2 candidates were scored, each pair once; the others keep NOT_CANDIDATE
    candidates = {(i, i) for i in range(n)} | {((t + 1) % n, t) for t in range(n)}
    assert sorted(model.scored) == sorted(candidates)
    for i in range(n):
        for t in range(n):
            if (i, t) not in candidates:
                assert i2t[i, t] == evaluate.NOT_CANDIDATE and t2i[t, i] == evaluate.NOT_CANDIDATE


def test_retrieval_scores_rank_modes_with_stub():
    n = 6
    dataset = PairImages(n)
    tokenizer = tokenization.WordPieceTokenizer(tokenization.build_vocab(dataset.texts))
    cpu = torch.device("cpu")
    i2t, _ = evaluate.retrieval_scores(StubModel(tokenizer, n), dataset, tokenizer, 2, cpu, batch_size=4, rank="itc")
    assert i2t[0, 0] == pytest.approx(0.6) and i2t[1, 0] == pytest.approx(0.8)  # the similarities, no ITM
    model = StubModel(tokenizer, n)
    i2t, _ = evaluate.retrieval_scores(model, dataset, tokenizer, 2, cpu, batch_size=4, rank="itc+itm")
    # true pair: 0.6 / 0.5 (the stub's temperature) + 5 log-odds; the neighbour: 0.8 / 0.5 - 5
    assert i2t[0, 0] == pytest.approx(6.2) and i2t[1, 0] == pytest.approx(-3.4) and model.scored


def test_rerank_topk_modes_by_hand():
    # 2 images x 3 texts, top k=2 per query, temperature 0.5. Candidates: image 0 -> texts 0, 1; image 1 ->
    # texts 1, 2; every text -> both images (there are only two).
    sim = torch.tensor([[0.9, 0.5, 0.1], [0.2, 0.8, 0.7]])
    itm = torch.tensor([[-1.0, 0.5, 0.0], [2.0, 0.0, 4.0]])  # the ITM log-odds of every pair
    N = evaluate.NOT_CANDIDATE

    def rank(mode):
        return evaluate.rerank_topk(sim, 2, lambda i, t: itm[i, t], rank=mode, temp=0.5)

    i2t, t2i = rank("itc")  # the similarities
    assert torch.equal(i2t, sim) and torch.equal(t2i, sim.t())
    i2t, t2i = rank("itm")  # ITM replaces ITC on the candidates
    assert torch.allclose(i2t, torch.tensor([[-1.0, 0.5, N], [N, 0.0, 4.0]]))
    assert torch.allclose(t2i, torch.tensor([[-1.0, 2.0], [0.5, 0.0], [0.0, 4.0]]))
    i2t, t2i = rank("itc+itm")  # sim / 0.5 + itm: (0,0) 1.8 - 1, (0,1) 1.0 + 0.5, (1,1) 1.6 + 0, (1,2) 1.4 + 4 ...
    assert torch.allclose(i2t, torch.tensor([[0.8, 1.5, N], [N, 1.6, 5.4]]))
    assert torch.allclose(t2i, torch.tensor([[0.8, 2.4], [1.5, 1.6], [0.2, 5.4]]))
    # text 1's best image: image 1 by ITC (0.8 > 0.5), image 0 by ITM (0.5 > 0), image 1 by the sum (1.6 > 1.5);
    # image 0's best text: text 0 by ITC, text 1 by ITM and by the sum
    assert [int(rank(m)[1][1].argmax()) for m in ("itc", "itm", "itc+itm")] == [1, 0, 1]
    assert [int(rank(m)[0][0].argmax()) for m in ("itc", "itm", "itc+itm")] == [0, 1, 1]
    with pytest.raises(ValueError, match="rank mode"):
        rank("itm+itc")


def test_retrieval_scores_identical_captions_once():
    # caption 3 repeats caption 0: the model sees the same input, so each image scores it once, for both copies
    dataset = PairImages(4, texts=["c0", "c1", "c2", "c0"])
    tokenizer = tokenization.WordPieceTokenizer(tokenization.build_vocab(dataset.texts))
    model = StubModel(tokenizer, 4)
    i2t, t2i = evaluate.retrieval_scores(model, dataset, tokenizer, k_test=4, device=torch.device("cpu"), batch_size=3,
                                          rank="itm")
    assert sorted(model.scored) == [(i, t) for i in range(4) for t in range(3)]  # every image x distinct caption
    assert (i2t[:, 0] == i2t[:, 3]).all() and (t2i[0] == t2i[3]).all() and i2t[0, 0] == 5 and i2t[1, 0] == -5  # log-odds


def test_rerank_topk_never_scores_outside_topk():
    g = torch.Generator().manual_seed(0)
    sim = torch.rand(7, 20, generator=g)
    asked = []

    def score(img, txt):
        asked.extend(zip(img.tolist(), txt.tolist()))
        return torch.ones(len(img))

    i2t, t2i = evaluate.rerank_topk(sim, 3, score, rank="itm")
    top_t, top_i = sim.topk(3, dim=1).indices, sim.t().topk(3, dim=1).indices
    allowed = {(i, t) for i in range(7) for t in top_t[i].tolist()} | {(i, t) for t in range(20) for i in top_i[t].tolist()}
    assert set(asked) == allowed and len(asked) == len(allowed)
    assert ((i2t == 1).sum(1) == 3).all() and ((t2i == 1).sum(1) == 3).all()
    i2t, t2i = evaluate.rerank_topk(sim, 0, None)  # k_test 0: ITC only
    assert torch.equal(i2t, sim) and torch.equal(t2i, sim.t())


# ---- --init from a pre-training checkpoint ----------------------------------------------------

@pytest.fixture(scope="module")
def pretrained(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("pretrain")
    pretrain.main(["--train-json", str(world["pretrain"]), "--image-root", str(world["root"]), "--vocab", str(world["vocab"]),
                   "--out-dir", str(out), "--max-steps", "1", "--batch-size", "8", "--num-workers", "0"] + MODEL)
    return out / "last.pt"


def test_init_from_pretrain(world, pretrained, tmp_path, capsys):
    out = tmp_path / "ft"
    finetune.main(data_args(world, "vqa") + RUN + ["--init", str(pretrained), "--out-dir", str(out)])
    printed = capsys.readouterr().out
    assert "new (randomly initialised): vqa_head (6 tensors)" in printed
    src = torch.load(pretrained, weights_only=True)
    assert f"loaded {len(src['model'])} tensors" in printed
    best = torch.load(out / "best.pt", weights_only=True)
    assert best["config"]["dim"] == 64 and best["heads"]["num_answers"] > 0 and best["vocab"] == src["vocab"]
    # the pixel decoder is frozen for VQA: its weights are exactly the pre-trained ones
    for k in ("decoder.pred.weight", "mlm_bias"):
        assert torch.equal(best["model"][k], src["model"][k])
    assert not torch.equal(best["model"]["blocks.0.attn.qkv.weight"], torch.zeros(1))


def test_freeze_backbone_trains_the_head_alone(world, pretrained, tmp_path):
    """--freeze-backbone: after two steps every weight but the new NLVR2 head's is the checkpoint's, and the head moved
    (from its fresh init: the same run at lr 0, same seed)."""
    args = data_args(world, "nlvr2") + RUN + ["--max-steps", "2", "--init", str(pretrained)]
    finetune.main(args + ["--freeze-backbone", "--out-dir", str(tmp_path / "probe")])
    finetune.main(args + ["--lr", "0", "--out-dir", str(tmp_path / "fresh")])  # nothing moves
    probe = torch.load(tmp_path / "probe" / "last.pt", weights_only=True)["model"]
    fresh = torch.load(tmp_path / "fresh" / "last.pt", weights_only=True)["model"]
    src = torch.load(pretrained, weights_only=True)["model"]
    backbone = [k for k in src if k in probe and not k.startswith("nlvr2_head")]
    assert "blocks.0.attn.qkv.weight" in backbone and "embed_norm.weight" in backbone
    assert all(torch.equal(probe[k], src[k]) for k in backbone)
    head = [k for k in probe if k.startswith("nlvr2_head")]
    assert head and any(not torch.equal(probe[k], fresh[k]) for k in head)


def test_init_errors(world, pretrained, tmp_path):
    args = data_args(world, "nlvr2") + RUN + ["--out-dir", str(tmp_path)]
    with pytest.raises(SystemExit, match="no such checkpoint file"):
        finetune.main(args + ["--init", str(tmp_path / "nope.pt")])
    # a model of another size (here more text positions) does not fit the checkpoint; another image size does
    # (the position tables are resized: tests/test_recipe.py). No flag changes the model's size over an --init
    # checkpoint's any more: a checkpoint whose config asks for 40 text positions carries a table of 32.
    ckpt = torch.load(pretrained, weights_only=True)
    ckpt["config"]["max_text_len"] = 40
    torch.save(ckpt, tmp_path / "longer.pt")
    cmd = [sys.executable, "finetune.py"] + [str(a) for a in args] + ["--init", str(tmp_path / "longer.pt")]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "does not fit this model" in proc.stderr and "text_pos.weight: checkpoint (32, 64) vs model (40, 64)" in proc.stderr


# ---- the command line with --checkpoint ------------------------------------------------------

def cli(*args):
    proc = subprocess.run([sys.executable, "evaluate.py", *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_cli_checkpoint_and_predictions_round_trip(finetuned, world, tmp_path):
    run = finetuned["vqa"]
    preds = tmp_path / "preds.json"
    m = cli("--task", "vqa", "--checkpoint", run.out / "best.pt", "--split", "test", "--predictions", preds, "--json")
    assert m["vqa_accuracy"] == pytest.approx(run.results["test"]["vqa_accuracy"])
    again = cli("--task", "vqa", "--predictions", preds, "--annotations", world["vqa_test"], "--json")
    assert again["vqa_accuracy"] == pytest.approx(m["vqa_accuracy"]) and again["missing"] == 0
    r = cli("--task", "retrieval", "--checkpoint", finetuned["retrieval"].out / "best.pt", "--split", "val", "--json")
    assert r.pop("split") == "val" and r == pytest.approx(finetuned["retrieval"].results["val"])
    ckpt = finetuned["retrieval"].out / "best.pt"
    itc = cli("--task", "retrieval", "--checkpoint", ckpt, "--split", "val", "--rank", "itc", "--json")
    assert itc == pytest.approx(cli("--task", "retrieval", "--checkpoint", ckpt, "--split", "val", "--k-test", "0", "--json"))
    proc = subprocess.run([sys.executable, "evaluate.py", "--task", "retrieval", "--checkpoint", ckpt, "--rank", "sum"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--rank must be one of itc, itm, itc+itm" in proc.stderr


def test_evaluation_skips_bad_images(finetuned, world, tmp_path):
    """--skip-bad: a question whose image is missing gets no prediction (counted as missing); a retrieval
    image that is missing is never retrieved, and the rest is still scored."""
    cpu = torch.device("cpu")
    model, tokenizer, ckpt = evaluate.load_finetuned(finetuned["vqa"].out / "best.pt", cpu)
    rows = json.loads(Path(world["vqa_val"]).read_text())
    rows[1]["image"] = "images/nowhere.png"
    bad = tmp_path / "vqa_val.json"
    bad.write_text(json.dumps(rows))
    m = evaluate.evaluate_split("vqa", model, tokenizer, bad, world["root"], cpu, answers=ckpt["answers"],
                                 batch_size=1, skip_bad=True)
    assert m["missing"] == 1 and m["n"] == len(rows)
    model, tokenizer, ckpt = evaluate.load_finetuned(finetuned["retrieval"].out / "best.pt", cpu)
    rows = json.loads(Path(world["retrieval_val"]).read_text())
    rows[0]["image"] = "images/nowhere.png"
    bad = tmp_path / "retrieval_val.json"
    bad.write_text(json.dumps(rows))
    dataset = data.RetrievalEvalDataset(bad, world["root"], model.cfg.image_size, skip_bad=True)
    i2t, t2i = evaluate.retrieval_scores(model, dataset, tokenizer, 4, cpu, batch_size=3)
    assert (t2i[:, 0] <= evaluate.NOT_CANDIDATE).all() and (i2t[0] <= evaluate.NOT_CANDIDATE).all()
    assert (i2t[1:] > evaluate.NOT_CANDIDATE).sum() > 0


def test_train_fraction_uses_the_same_share_of_rows_for_every_seed(world, tmp_path, capsys):
    rows = len(json.loads(world["vqa_train"].read_text()))
    seen = []
    for seed in (0, 1):
        finetune.main(data_args(world, "vqa") + RUN + ["--train-fraction", "0.5", "--seed", str(seed),
                                                       "--out-dir", str(tmp_path / f"s{seed}")])
        seen.append([line for line in capsys.readouterr().out.splitlines() if "training rows" in line][0])
    assert f"vqa: {round(rows / 2)} training rows" in seen[0] and seen[0].split(",")[0] == seen[1].split(",")[0]
    with pytest.raises(SystemExit, match="train-fraction"):
        finetune.main(data_args(world, "vqa") + RUN + ["--train-fraction", "0", "--out-dir", str(tmp_path / "x")])


def test_retrieval_with_the_contrastive_objective_alone(world, pretrained, tmp_path):
    """--objective itc trains the ITC projections and leaves the ITM head frozen at the checkpoint's weights;
    a given --itc-temp sets the starting temperature over the checkpoint's (0.3, the micro preset's)."""
    args = data_args(world, "retrieval") + RUN
    finetune.main(args + ["--objective", "itc", "--rank", "itc", "--init", str(pretrained), "--itc-temp", "0.2",
                          "--out-dir", str(tmp_path / "itc")])
    best, src = torch.load(tmp_path / "itc" / "best.pt", weights_only=True), torch.load(pretrained, weights_only=True)
    assert best["finetune_config"]["objective"] == "itc"
    assert torch.equal(best["model"]["itm_head.weight"], src["model"]["itm_head.weight"])
    assert not torch.equal(best["model"]["itc_image.weight"], src["model"]["itc_image.weight"])
    assert abs(src["model"]["temp"].item() - 0.3) < 1e-6 and abs(best["model"]["temp"].item() - 0.2) < 1e-2  # one step
    with pytest.raises(SystemExit, match="trains no ITM head"):
        finetune.main(args + ["--objective", "itc", "--out-dir", str(tmp_path / "x")])
    with pytest.raises(SystemExit, match="must be one of"):
        finetune.main(data_args(world, "vqa") + RUN + ["--objective", "itc", "--out-dir", str(tmp_path / "y")])


def test_shapes_defaults_apply_unless_given(world, monkeypatch):
    """On the shapes world retrieval trains ITC alone at lr 2e-4, its temperature starting at 0.1, and ranks by
    it, unless those flags are given (each flag alone: the table's other values still apply)."""
    monkeypatch.setattr(finetune, "shapes_world", lambda folder, rank, world_size: world)
    cfg = make_config("micro")  # the preset's config, before the task's table

    def settle(**given):
        return finetune.settle({"task": "retrieval", **given}, cfg)

    got, overrides = settle()
    assert (got.objective, got.rank, got.epochs, got.lr) == ("itc", "itc", finetune.RECIPES["shapes"]["retrieval"]["epochs"], 2e-4)
    assert finetune.data_paths(got, 0, 1)["train_json"] == str(world["retrieval_train"])
    mine, _ = settle(rank="itm")
    assert (mine.objective, mine.rank, mine.lr) == ("itc", "itm", 2e-4)  # the given rank, the table's objective
    with pytest.raises(SystemExit, match="trains no ITM head"):  # which cannot rank by ITM: a clear error
        finetune.check_choices(mine)
    mine, _ = settle(rank="itm", objective="itc_itm")
    assert (mine.objective, mine.rank, mine.lr) == ("itc_itm", "itm", 2e-4)
    fast, _ = settle(lr=1e-3)
    assert (fast.objective, fast.lr) == ("itc", 1e-3)  # a given --lr wins; the others still apply
    assert finetune.settle({"task": "vqa"}, cfg)[0].lr == 5e-4
    own, own_overrides = settle(train_json="a", val_json="b", test_json="c")
    assert (own.objective, own.rank) == ("", "itc+itm")  # own data keeps ALBEF's recipe
    # a model field among them (the ITC temperature's start), under a given flag; not on own data
    assert overrides == {"itc_temp": 0.1}
    assert settle(itc_temp=0.3, image_size=64)[1] == {"itc_temp": 0.3, "image_size": 64}
    assert finetune.settle({"task": "vqa"}, cfg)[1] == {}
    assert own_overrides == {}
    assert finetune.settle({"task": "retrieval"}, cfg, fresh=False)[1] == {}  # a resumed run keeps its model


def test_eval_every_sets_the_val_steps(world, tmp_path):
    """Val after every --eval-every steps and at the last step; by default after every epoch (72 rows / 8 = 9 steps)."""
    def val_steps(*flags):
        out = tmp_path / "_".join(flags or ("default",))
        finetune.main(data_args(world, "vqa") + MODEL + RUN + ["--max-steps", "11", "--out-dir", str(out), *flags])
        return [r["step"] for r in read_jsonl(out / "metrics.jsonl") if r.get("split") == "val"]

    assert val_steps("--eval-every", "4") == [4, 8, 11]
    assert val_steps() == [9, 11]
