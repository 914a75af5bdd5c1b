"""Bad input ends in a clear error or a counted skip; interrupted runs lose nothing; checkpoints
are never left half-written."""
import io
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image

import checkpoints
import data
import pretrain
import tokenization
from conftest import ROOT, TINY_MODEL_FLAGS
from model import EVE, make_config


@pytest.fixture()
def bad_world(tmp_path, small_world):
    """A copy of a few pre-training rows plus one bad image of each kind."""
    root = tmp_path / "bad"
    (root / "images").mkdir(parents=True)
    rows = json.loads(small_world["pretrain"].read_text())[:16]
    for row in rows:
        (root / row["image"]).write_bytes((small_world["root"] / row["image"]).read_bytes())
    png = (root / rows[0]["image"]).read_bytes()
    (root / "images" / "truncated.png").write_bytes(png[: len(png) // 2])
    (root / "images" / "empty.png").write_bytes(b"")
    (root / "images" / "text.png").write_text("not an image")
    Image.new("P", (40, 40)).save(root / "images" / "palette.png")
    Image.new("RGBA", (40, 40), (255, 0, 0, 128)).save(root / "images" / "rgba.png")
    Image.new("I;16", (40, 40)).save(root / "images" / "sixteen.png")
    Image.new("L", (40, 40), 90).save(root / "images" / "gray.png")
    return root, rows


def run_pretrain(flags, world, out_dir, *extra, timeout=120):
    cmd = [sys.executable, "pretrain.py", *flags, "--vocab", str(world["vocab"]), *TINY_MODEL_FLAGS,
           "--out-dir", str(out_dir), "--batch-size", "4", "--num-workers", "1", *extra]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def write_rows(root, rows, name="pretrain.json"):
    path = root / name
    path.write_text(json.dumps(rows))
    return ["--train-json", str(path), "--image-root", str(root)]


@pytest.mark.parametrize("image, message", [
    ("images/missing.png", "row 4: image not found"),
    ("images/truncated.png", "row 4: unreadable image"),
    ("images/empty.png", "row 4: unreadable image"),
    ("images/text.png", "row 4: unreadable image"),
])
def test_bad_image_is_a_clear_error_or_a_counted_skip(bad_world, small_world, tmp_path, image, message):
    root, rows = bad_world
    rows = rows[:4] + [{"image": image, "caption": "a red circle"}] + rows[4:15]  # 16 rows: one epoch sees all
    flags = write_rows(root, rows)
    done = run_pretrain(flags, small_world, tmp_path / "a", "--max-steps", "4", "--no-augment")
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert f"error: pretrain.json {message}" in done.stderr
    done = run_pretrain(flags, small_world, tmp_path / "b", "--max-steps", "4", "--skip-bad")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "skipped 1 bad items" in done.stderr and (tmp_path / "b" / "last.pt").exists()


def test_other_image_modes_are_converted_not_errors(bad_world, small_world, tmp_path):
    root, rows = bad_world
    odd = [{"image": f"images/{n}.png", "caption": "a shape"} for n in ("palette", "rgba", "sixteen", "gray")]
    done = run_pretrain(write_rows(root, odd + rows[:4]), small_world, tmp_path / "a", "--max-steps", "2")
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.parametrize("content, message", [
    ({"image": "x"}, "pretrain.json: expected a JSON list of rows"),
    ([{"caption": "a red circle"}], "pretrain.json row 0: missing key 'image'"),
    ([{"image": "images/a.png", "caption": "   "}], "pretrain.json row 0: .*caption"),
])
def test_bad_json_is_a_clear_error(bad_world, small_world, tmp_path, content, message):
    root, _ = bad_world
    (root / "pretrain.json").write_text(json.dumps(content))
    done = run_pretrain(["--train-json", str(root / "pretrain.json")], small_world, tmp_path, "--max-steps", "1")
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert any(__import__("re").search(message, line) for line in done.stderr.splitlines()), done.stderr


def test_skip_bad_counts_bad_json_rows(bad_world, small_world, tmp_path):
    root, rows = bad_world
    flags = write_rows(root, rows[:8] + [{"caption": "no image"}, {"image": "images/x.png", "caption": ""}])
    done = run_pretrain(flags, small_world, tmp_path, "--max-steps", "2", "--skip-bad")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "2 rows were left out when reading the data" in done.stderr


def test_long_captions_are_truncated(small_world):
    tok = tokenization.WordPieceTokenizer.from_file(small_world["vocab"])
    ids = tok.encode("a red circle " * 100, max_len=32)
    assert len(ids) == 32 and ids[0] == tok.cls_id and ids[-1] == tok.sep_id


def test_missing_paths_are_clear_errors(small_world, tmp_path):
    for flags, message in (
        (["--resume", str(tmp_path / "nope.pt")], "--resume"),
        (["--train-json", str(small_world["pretrain"]), "--image-root", str(tmp_path / "no_root")], "image root does not exist"),
        (["--train-json", str(tmp_path / "none.json")], "none.json: file not found"),
    ):
        done = run_pretrain(flags, small_world, tmp_path / "run", "--max-steps", "1")
        assert done.returncode != 0 and "Traceback" not in done.stderr and message in done.stderr, done.stderr


def test_checkpoint_of_another_preset_lists_mismatched_tensors():
    small = EVE(make_config("tiny", vocab_size=50, dim=64, depth=2, heads=2, num_experts=4))
    other = EVE(make_config("tiny", vocab_size=60, dim=64, depth=2, heads=2, num_experts=4))
    with pytest.raises(SystemExit, match=r"(?s)does not fit.*word_embed.weight: checkpoint \(60, 64\) vs model \(50, 64\)"):
        checkpoints.load_model_state(small, other.state_dict(), "other.pt")


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(small_world, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = EVE.mim_loss

    def poisoned(self, *args):  # the 5th step's loss is NaN
        calls["n"] += 1
        loss = real(self, *args)
        return loss * float("nan") if calls["n"] == 5 else loss

    monkeypatch.setattr(EVE, "mim_loss", poisoned)
    flags = ["--train-json", str(small_world["pretrain"]), "--vocab", str(small_world["vocab"]), *TINY_MODEL_FLAGS,
             "--out-dir", str(tmp_path), "--batch-size", "4", "--num-workers", "0", "--save-every", "2", "--max-steps", "10"]
    with pytest.raises(SystemExit, match="loss is nan at step 4"):
        pretrain.main(flags)
    last = torch.load(tmp_path / "last.pt", weights_only=True)
    assert last["step"] == 4 and all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())


def test_kill_during_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    checkpoints.save_checkpoint(tmp_path, 1, {"step": 1})
    real_save = torch.save

    def dying_save(obj, f):  # write half a file, then die as a kill would
        buffer = io.BytesIO()
        real_save(obj, buffer)
        with open(f, "wb") as out:
            out.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        checkpoints.save_checkpoint(tmp_path, 2, {"step": 2, "big": torch.zeros(1000)})
    monkeypatch.undo()
    assert torch.load(tmp_path / "last.pt")["step"] == 1
    assert not (tmp_path / "ckpt_0000002.pt").exists()
    for step in range(2, 7):  # the last K are kept
        checkpoints.save_checkpoint(tmp_path, step, {"step": step}, keep_last=3)
    assert sorted(p.name for p in tmp_path.glob("ckpt_*.pt")) == [f"ckpt_000000{s}.pt" for s in (4, 5, 6)]


def wait_for_step(out_dir, step, proc, timeout=120):
    log = out_dir / "metrics.jsonl"
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.stderr.read()
        if log.exists() and any(json.loads(l)["step"] >= step for l in log.read_text().splitlines() if '"step"' in l):
            return
        time.sleep(0.05)
    raise TimeoutError(f"no step {step} in {log}")


def start(world, out_dir, *extra):
    cmd = [sys.executable, "pretrain.py", "--train-json", str(world["pretrain"]), "--image-root", str(world["root"]),
           "--vocab", str(world["vocab"]), *TINY_MODEL_FLAGS, "--out-dir", str(out_dir), "--batch-size", "4",
           "--num-workers", "0", "--log-every", "1", "--save-every", "4", "--max-steps", "40", *extra]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.fixture(scope="module")
def straight_run(small_world, tmp_path_factory):
    """The uninterrupted run the killed ones are compared with."""
    out_dir = tmp_path_factory.mktemp("straight")
    straight = start(small_world, out_dir)
    assert straight.wait(timeout=300) == 0
    return torch.load(out_dir / "last.pt", weights_only=True)


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT])
def test_killed_run_resumes_to_the_uninterrupted_result(small_world, straight_run, tmp_path, how):
    proc = start(small_world, tmp_path / "killed")
    wait_for_step(tmp_path / "killed", 10, proc)
    proc.send_signal(how)
    proc.wait(timeout=60)
    logged = max(json.loads(l)["step"] for l in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines())
    saved = torch.load(tmp_path / "killed" / "last.pt", weights_only=True)["step"]
    if how == signal.SIGKILL:  # no chance to save: at most one save interval (4 steps) is redone
        assert logged - 4 <= saved <= logged  # killed mid-save at step 12 leaves 8: one interval redone
    else:  # a clean stop saves the step it stopped at and exits 0
        assert proc.returncode == 0 and saved == logged and "stopped by signal" in proc.stdout.read()
    resumed = start(small_world, tmp_path / "killed", "--resume", "auto")
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()
    a = straight_run
    b = torch.load(tmp_path / "killed" / "last.pt", weights_only=True)
    assert a["step"] == b["step"] == 40
    assert all(torch.equal(v, b["model"][k]) for k, v in a["model"].items())


READERS = {
    "pretrain": (data.PretrainDataset, {"image": "images/a.png", "caption": ["a red circle", "a shape"]}),
    "retrieval_train": (data.RetrievalTrainDataset, {"image": "images/a.png", "caption": "a red circle", "image_id": 3}),
    "retrieval_test": (data.RetrievalEvalDataset, {"image": "images/a.png", "caption": ["a red circle"]}),
    "vqa": (data.VQADataset, {"question_id": 1, "question": "what color?", "image": "images/a.png", "answer": ["red"]}),
    "nlvr2": (data.NLVR2Dataset, {"images": ["images/a.png", "images/a.png"], "sentence": "both red", "label": "True"}),
}


def mutate_row(row, rng):
    row = json.loads(json.dumps(row))
    key = rng.choice(sorted(row))
    action = rng.randrange(4)
    if action == 0:
        del row[key]
    elif action == 1:
        row[key] = rng.choice([None, 7, 1.5, [], {}, "", "   ", ["x"], True])
    elif action == 2:
        row[rng.choice(["image", "images"])] = rng.choice(["images/nope.png", ["images/a.png"], "../../etc", 5])
    else:
        row["label"] = rng.choice(["true", "1", 1, "False "])
    return row


def corrupt_png(png, rng):
    b = bytearray(png)
    kind = rng.randrange(3)
    if kind == 0:
        return bytes(b[: rng.randrange(len(b))])
    if kind == 1:
        for _ in range(rng.randrange(1, 20)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        return bytes(b)
    return bytes(rng.randrange(256) for _ in range(rng.randrange(200)))


@pytest.mark.parametrize("name", READERS)
def test_fuzz_every_reader_ends_in_a_clear_error_or_a_counted_skip(tmp_path, name):
    cls, good = READERS[name]
    rng = random.Random(name)
    (tmp_path / "images").mkdir()
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), "red").save(buffer, format="PNG")
    png = buffer.getvalue()
    (tmp_path / "images" / "a.png").write_bytes(png)
    for case in range(40):
        (tmp_path / "images" / "b.png").write_bytes(corrupt_png(png, rng))
        rows = [good, mutate_row(good, rng), json.loads(json.dumps(good).replace("a.png", "b.png"))]
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(rows))
        for skip_bad in (False, True):
            try:
                ds = cls(path, tmp_path, 8, skip_bad=skip_bad)
                items = [ds[i] for i in range(len(ds))]
            except data.DataError as e:
                assert not skip_bad and f"{name}.json" in str(e) and "row" in str(e), str(e)
                continue
            skips = [x for x in items if isinstance(x, data.Skip)]
            good_items = [x for x in items if not isinstance(x, data.Skip)]
            # every row is accounted for: loaded, skipped with a reason, or counted when read
            assert len(good_items) + len(skips) + sum(ds.skipped.values()) == 3
            assert all(x[next(k for k in x if k.startswith("image"))].shape == (3, 8, 8) for x in good_items)
