"""The official downloads -> the JSON formats data.py reads (CONVENTIONS.md); docs/DATA.md has the whole path.

    python prepare.py vqa --questions-dir downloads/vqa --coco-root /data/coco --out data/vqa
    python prepare.py vqa --questions-dir downloads/vqa --coco-root /data/coco --out data/vqa \\
        --vg-qa downloads/vg/question_answers.json --vg-images /data/coco/vg --merge train+val+vg
    python prepare.py karpathy --split-file dataset_coco.json --image-root /data/coco --out data/coco
    python prepare.py karpathy --split-file dataset_flickr30k.json --image-root /data/flickr30k-images --out data/f30k
    python prepare.py nlvr2 --data-dir nlvr/nlvr2/data --image-root /data/nlvr2 --out data/nlvr2
    python prepare.py img2dataset --input /data/cc3m --out data/cc3m     # CC3M, CC12M, SBU, LAION, ...

vqa: VQA v2's question and annotation files (train, val; test-dev and test have questions only), COCO images
under R/train2014, R/val2014, R/test2015; Visual Genome's QA as extra training rows. karpathy: Karpathy's split
files (restval goes into train) and a pre-training file. nlvr2: lil-lab/nlvr's JSON lines (train.json, dev.json,
test1.json). img2dataset: its folders, or its webdataset shards (images extracted to --images, default OUT/images).
Each writes its JSON files and OUT/manifest.json: per split the rows in and out and the rows skipped by reason,
the sha256 of every file, the settings. Bad input (malformed JSON, a row without a required field) stops with
one line naming the file and the row, exit status 2, before any JSON is written; files are written to a temporary
name, then renamed; the same inputs give byte-identical files. metrics.py gives the VQA answer normalisation.
"""
import argparse
import hashlib
import io
import json
import os
import tarfile
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from metrics import answer_vocabulary, normalize_vqa_answer


class BadInput(Exception):
    """Input that cannot be converted; the message names the file, the row and the problem."""


# ----------------------------------------------------------------------------- reading, checking, writing
def read_json(path, lines=False):
    """A JSON file, or with lines=True the (line number, text) of a JSON-lines file; BadInput if unreadable."""
    try:
        text = Path(path).read_text(encoding="utf-8")
        return list(enumerate(text.splitlines(), 1)) if lines else json.loads(text)
    except OSError as e:
        raise BadInput(f"{path}: cannot read it ({e.strerror or e})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadInput(f"{path}: not valid JSON ({e})") from None


def field(row, key, types, where):
    """row[key], checked to be one of `types` (never a bool); else BadInput naming `where` (file and row)."""
    types = types if isinstance(types, tuple) else (types,)
    if not isinstance(row, dict):
        raise BadInput(f"{where}: expected an object, got {type(row).__name__}")
    if key not in row:
        raise BadInput(f"{where}: missing '{key}'")
    if isinstance(row[key], bool) or not isinstance(row[key], types):
        names = " or ".join(t.__name__ for t in types)
        raise BadInput(f"{where}: '{key}' should be {names}, got {type(row[key]).__name__}")
    return row[key]


def readable(source):
    """Whether PIL opens and verifies an image file or file object."""
    try:
        with Image.open(source) as img:
            img.verify()
        return True
    except Exception:  # a broken file raises OSError, SyntaxError, ValueError, struct.error, ... by format
        return False


@lru_cache(maxsize=None)  # VQA asks ~5 questions per image; Karpathy's train rows repeat each image ~5 times
def image_problem(path, check):
    """None if the image is there and (check "verify") PIL verifies it, else the reason to skip its rows."""
    if not os.path.isfile(path):
        return "image missing"
    return None if check == "exists" or readable(path) else "unreadable image"


def drop_bad_images(rows, split, root, args, rep):
    """The rows all of whose images ("image", or NLVR2's "images") pass the check, in order; the others are
    counted in rep by reason. The distinct files are checked in threads (file reads release the GIL)."""
    if not Path(root).is_dir():
        raise BadInput(f"image root {root}: no such folder")
    paths = [[os.path.join(root, p) for p in row.get("images", [row.get("image")])] for row in rows]
    unique = sorted({p for ps in paths for p in ps})
    with ThreadPoolExecutor(args.workers) as pool:
        list(tqdm(pool.map(lambda p: image_problem(p, args.check), unique), total=len(unique),
                  desc=f"{split} images", leave=False))
    kept = []
    for row, ps in zip(rows, paths):
        problem = next((image_problem(p, args.check) for p in ps if image_problem(p, args.check)), None)
        if problem:
            rep.skip(split, problem)
        else:
            kept.append(row)
    return kept


def locate(root, folder):
    """A split's image folder relative to root: `folder`, or `images/folder` where the download put it there."""
    root = Path(root)
    return f"images/{folder}" if not (root / folder).is_dir() and (root / "images" / folder).is_dir() else folder


def write_atomic(path, blob):
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(blob)
    os.replace(tmp, path)  # readers see the old file or the whole new one, never half of it


class Report:
    """What one command did, written last as OUT/manifest.json: per split the rows in and out and the skips by
    reason (rows_in = rows_out + all skips), the files written with their sha256, and the settings."""

    def __init__(self, args):
        self.out, self.files = Path(args.out), {}  # file name -> its bytes, all written at the end
        settings = {k: v for k, v in sorted(vars(args).items()) if k not in ("run", "command", "out", "workers")}
        self.manifest = {"command": args.command, "settings": settings, "splits": {}, "files": {}}
        image_problem.cache_clear()  # images may have changed since an earlier command in this process

    def split(self, name):
        return self.manifest["splits"].setdefault(name, {"rows_in": 0, "rows_out": 0, "skipped": {}})

    def skip(self, split, reason, n=1):
        skipped = self.split(split)["skipped"]
        if n:
            skipped[reason] = skipped.get(reason, 0) + n

    def add(self, name, rows, split=None):
        """Queue a JSON file; with split, its rows are that split's rows out."""
        if split is not None:
            self.split(split)["rows_out"] = len(rows)
        self.files[name] = (json.dumps(rows, ensure_ascii=False) + "\n").encode("utf-8")

    def write(self):
        self.out.mkdir(parents=True, exist_ok=True)
        self.manifest["files"] = {name: hashlib.sha256(blob).hexdigest() for name, blob in self.files.items()}
        self.files["manifest.json"] = (json.dumps(self.manifest, indent=1, ensure_ascii=False) + "\n").encode()
        for name, blob in self.files.items():
            write_atomic(self.out / name, blob)
        for split, s in self.manifest["splits"].items():
            skips = ", ".join(f"{n} {reason}" for reason, n in s["skipped"].items()) or "none skipped"
            print(f"{split}: {s['rows_in']} rows in, {s['rows_out']} out ({skips})")
        print(f"wrote {', '.join(self.files)} to {self.out}")


# ----------------------------------------------------------------------------- VQA v2 and Visual Genome QA
VQA_FILES = {  # split: (questions file, annotations file or None, COCO image folder); test-dev's images are test2015's
    "train": ("v2_OpenEnded_mscoco_train2014_questions.json", "v2_mscoco_train2014_annotations.json", "train2014"),
    "val": ("v2_OpenEnded_mscoco_val2014_questions.json", "v2_mscoco_val2014_annotations.json", "val2014"),
    "test-dev": ("v2_OpenEnded_mscoco_test-dev2015_questions.json", None, "test2015"),
    "test": ("v2_OpenEnded_mscoco_test2015_questions.json", None, "test2015"),
}
ANSWER_RULE = ("each question's majority human answer after the official VQA normalisation "
               "(metrics.normalize_vqa_answer), counted over the kept questions of {splits}; the answers that are "
               "the majority of at least {min_count} questions, most frequent first, ties in alphabetical order "
               "(metrics.answer_vocabulary)")


def vqa_annotations(path):
    """question_id -> {"answer": the ten human answers, "question_type", "answer_type"} of an annotations file."""
    out = {}
    for i, ann in enumerate(field(read_json(path), "annotations", list, str(path))):
        where = f"{path}: annotations row {i}"
        answers = field(ann, "answers", list, where)
        out[field(ann, "question_id", int, where)] = {
            "answer": [field(a, "answer", str, f"{where}, answers[{j}]") for j, a in enumerate(answers)],
            "question_type": field(ann, "question_type", str, where), "answer_type": field(ann, "answer_type", str, where)}
    return out


def vqa_split(split, args, rep):
    """The rows of one split: question, COCO image path, and (where annotated) the answers and types."""
    qname, aname, folder = VQA_FILES[split]
    qpath, apath = Path(args.questions_dir) / qname, Path(args.questions_dir) / (aname or "")
    anns = vqa_annotations(apath) if aname and apath.is_file() else None
    if aname and anns is None:
        print(f"note: {apath} not found: {split} is written without answers")
    questions = field(read_json(qpath), "questions", list, str(qpath))
    rep.split(split)["rows_in"] = len(questions)
    prefix, rows = locate(args.coco_root, folder), []
    for i, q in enumerate(tqdm(questions, desc=f"vqa {split}", leave=False)):
        where = f"{qpath}: questions row {i}"
        qid, image_id = field(q, "question_id", int, where), field(q, "image_id", int, where)
        row = {"question_id": qid, "question": field(q, "question", str, where).strip(),
               "image": f"{prefix}/COCO_{folder}_{image_id:012d}.jpg", "dataset": "vqa"}
        if anns is not None:
            if qid not in anns:
                raise BadInput(f"{where}: question_id {qid} has no annotation in {apath}")
            row.update(anns[qid])
        if not row["question"]:
            rep.skip(split, "empty question")
        elif any(not a.strip() for a in row.get("answer", [])):  # data.py reads no empty answer
            rep.skip(split, "empty answer")
        else:
            rows.append(row)
    return drop_bad_images(rows, split, args.coco_root, args, rep)


def vg_rows(args, answers, rep):
    """Visual Genome's question_answers.json -> VQA rows of dataset "vg" with one answer, image paths relative to
    the COCO root. With an answer list, only answers in it are kept (a question without a class teaches nothing)."""
    index = {}  # VG image id -> its path relative to the COCO root; the download spreads them over two folders
    for folder in (Path(args.vg_images) / sub for sub in ("", "VG_100K", "VG_100K_2")):
        for name in sorted(os.listdir(folder)) if folder.is_dir() else []:
            stem, ext = os.path.splitext(name)
            if stem.isdigit() and ext.lower() == ".jpg":
                index.setdefault(int(stem), Path(os.path.relpath(folder / name, args.coco_root)).as_posix())
    data = read_json(args.vg_qa)
    if not isinstance(data, list):
        raise BadInput(f"{args.vg_qa}: expected a JSON list of images with their 'qas'")
    rows, split = [], rep.split("vg")
    for i, entry in enumerate(tqdm(data, desc="vg", leave=False)):
        for j, qa in enumerate(field(entry, "qas", list, f"{args.vg_qa}: row {i}")):
            where, split["rows_in"] = f"{args.vg_qa}: row {i}, qas[{j}]", split["rows_in"] + 1
            qid, image_id = field(qa, "qa_id", int, where), field(qa, "image_id", int, where)
            question, answer = field(qa, "question", str, where).strip(), field(qa, "answer", str, where).strip()
            if not question or not answer:
                rep.skip("vg", "empty question or answer")
            elif answers is not None and normalize_vqa_answer(answer) not in answers:
                rep.skip("vg", "answer not in answer_list.json")
            elif image_id not in index:
                rep.skip("vg", "image missing")
            else:
                rows.append({"question_id": qid, "question": question, "image": index[image_id],
                             "answer": [answer], "dataset": "vg"})
    return drop_bad_images(rows, "vg", args.coco_root, args, rep)


def vqa(args):
    rep, present = Report(args), [s for s, f in VQA_FILES.items() if (Path(args.questions_dir) / f[0]).is_file()]
    if not present:
        raise BadInput(f"{args.questions_dir}: none of {', '.join(f[0] for f in VQA_FILES.values())}")
    unknown = [s for s in args.answer_splits.split(",") if s not in VQA_FILES]
    if unknown:
        raise BadInput(f"--answer-splits: {', '.join(unknown)} is not one of {', '.join(VQA_FILES)}")
    known = present + (["vg"] if args.vg_qa else [])
    for merge in args.merge:  # e.g. train+val+vg, the official EVE fine-tuning set
        if not set(merge.split("+")) <= set(known):
            raise BadInput(f"--merge {merge}: the splits here are {', '.join(known)}")
    splits = {s: vqa_split(s, args, rep) for s in present}
    counted = [s for s in args.answer_splits.split(",") if any("answer" in r for r in splits.get(s, []))]
    answers = answer_vocabulary([r for s in counted for r in splits[s]], args.min_answer_count) if counted else None
    if counted:
        rule = ANSWER_RULE.format(splits="+".join(counted), min_count=args.min_answer_count)
        rep.manifest["answer_list"] = {"rule": rule, "splits": counted, "min_count": args.min_answer_count,
                                       "answers": len(answers)}
        rep.add("answer_list.json", answers)
        print(f"answer_list.json: {len(answers)} answers: {rule}")
    else:
        print(f"note: no answer_list.json: no annotated split among --answer-splits {args.answer_splits}")
    if args.vg_qa:
        splits["vg"] = vg_rows(args, None if answers is None else set(answers), rep)
    for s, rows in splits.items():
        rep.add(f"{s}.json", rows, split=s)
    for merge in args.merge:
        rep.add(f"{merge}.json", [r for p in merge.split("+") for r in splits[p]])
    rep.write()


# ----------------------------------------------------------------------------- Karpathy COCO / Flickr30k
def karpathy(args):
    """Karpathy's split file -> train.json (a row per caption; image_id: COCO's cocoid, else Karpathy's imgid),
    val.json and test.json (a row per image with its captions), pretrain.json (a row per training image)."""
    rep = Report(args)
    per_caption, per_image = {"train": []}, {"pretrain": [], "val": [], "test": []}
    images = field(read_json(args.split_file), "images", list, str(args.split_file))
    for i, img in enumerate(tqdm(images, desc="karpathy", leave=False)):
        where = f"{args.split_file}: images row {i}"
        split = field(img, "split", str, where)
        if split not in ("train", "restval", "val", "test"):
            raise BadInput(f"{where}: 'split' should be train, restval, val or test, got {split!r}")
        split = "train" if split == "restval" else split  # restval: the COCO val images outside the 5k val/test
        name = field(img, "filename", str, where)
        path = f"{field(img, 'filepath', str, where)}/{name}" if "filepath" in img else name
        image_id = field(img, "cocoid", int, where) if "cocoid" in img else field(img, "imgid", int, where)
        captions = [field(sentence, "raw", str, f"{where}, sentences[{j}]").strip()
                    for j, sentence in enumerate(field(img, "sentences", list, where))]
        if split == "train":
            rep.split("train")["rows_in"] += len(captions)
            rep.skip("train", "empty caption", captions.count(""))
            per_caption["train"] += [{"image": path, "caption": c, "image_id": image_id} for c in captions if c]
        s = "pretrain" if split == "train" else split
        rep.split(s)["rows_in"] += 1
        if any(captions):
            per_image[s].append({"image": path, "caption": [c for c in captions if c]})
        else:
            rep.skip(s, "empty caption")
    for s, rows in {**per_caption, **per_image}.items():
        rep.add(f"{s}.json", drop_bad_images(rows, s, args.image_root, args, rep), split=s)
    rep.write()


# ----------------------------------------------------------------------------- NLVR2
NLVR2_FILES = {"train": "train.json", "val": "dev.json", "test": "test1.json", "test2": "test2.json"}


def nlvr2_rows(split, path, args, rep):
    """One JSON-lines file -> pair rows. The identifier split-set-pair-sentence ("dev-850-0-0") names the images
    split-set-pair-img0.png and -img1.png in its split's folder; train's sit in train/<directory>/."""
    rows, folders = [], {}
    for line_no, line in tqdm(read_json(path, lines=True), desc=f"nlvr2 {split}", leave=False):
        where = f"{path} line {line_no}"
        if not line.strip():
            continue
        try:
            ex = json.loads(line)
        except json.JSONDecodeError as e:
            raise BadInput(f"{where}: not valid JSON ({e})") from None
        rep.split(split)["rows_in"] += 1
        identifier = field(ex, "identifier", str, where)
        parts = identifier.split("-")
        if len(parts) != 4 or not all(parts):
            raise BadInput(f"{where}: identifier {identifier!r} is not split-set-pair-sentence")
        label = field(ex, "label", str, where).capitalize()
        if label not in ("True", "False"):
            raise BadInput(f"{where}: 'label' should be \"True\" or \"False\", got {ex['label']!r}")
        folder = folders.setdefault(parts[0], locate(args.image_root, parts[0]))
        if split == "train" or "directory" in ex:
            folder = f"{folder}/{field(ex, 'directory', (int, str), where)}"
        stem, sentence = "-".join(parts[:3]), field(ex, "sentence", str, where).strip()
        if sentence:
            rows.append({"images": [f"{folder}/{stem}-img0.png", f"{folder}/{stem}-img1.png"],
                         "sentence": sentence, "label": label, "identifier": identifier})
        else:
            rep.skip(split, "empty sentence")
    return drop_bad_images(rows, split, args.image_root, args, rep)


def nlvr2(args):
    data_dir = Path(args.data_dir)
    if Path(args.out).resolve() == data_dir.resolve():
        raise BadInput(f"--out {args.out} is --data-dir: its train.json would replace the official one")
    present = {s: data_dir / name for s, name in NLVR2_FILES.items() if (data_dir / name).is_file()}
    if not present:
        raise BadInput(f"{data_dir}: none of {', '.join(NLVR2_FILES.values())}")
    rep = Report(args)
    for split, path in present.items():
        rep.add(f"{split}.json", nlvr2_rows(split, path, args, rep), split=split)
    rep.write()


# ----------------------------------------------------------------------------- img2dataset
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")  # img2dataset's --encode_format choices


def img2dataset_samples(source):
    """(key "00000/000000001", {extension: bytes or path}, where) of img2dataset's output: its webdataset shards
    (00000.tar: a sample's members key.jpg, key.txt, key.json follow one another; the key is the name up to
    the first dot, webdataset's rule), else its "files" output (shard folders 00000/ of the same names)."""
    shards = sorted(source.glob("*.tar"))
    for shard in shards:
        try:
            with tarfile.open(shard) as tar:
                key, files = None, {}
                for m in (m for m in tar if m.isfile()):
                    head, base = os.path.split(os.path.normpath(m.name))
                    name, _, ext = base.partition(".")
                    if os.path.join(head, name) != key and files:
                        yield f"{shard.stem}/{key}", files, f"{shard} member {key}.json"
                        files = {}
                    key, files[ext.lower()] = os.path.join(head, name), tar.extractfile(m).read()
                if files:
                    yield f"{shard.stem}/{key}", files, f"{shard} member {key}.json"
        except (tarfile.TarError, OSError, EOFError) as e:
            raise BadInput(f"{shard}: not a readable tar file ({e})") from None
    for shard in [] if shards else sorted(p for p in source.iterdir() if p.is_dir()):
        samples = defaultdict(dict)
        for p in sorted(shard.iterdir()):
            name, _, ext = p.name.partition(".")
            samples[name][ext.lower()] = p
        for name, files in samples.items():
            yield f"{shard.name}/{name}", files, f"{shard / name}.json"


def img2dataset(args):
    """img2dataset output -> pretrain.json [{"image", "caption"}]. Image paths are relative to the input folder
    for the "files" output; shards' images are verified and extracted to --images, the root then."""
    rep, source = Report(args), Path(args.input)
    if not source.is_dir():
        raise BadInput(f"--input {source}: no such folder")
    shards = any(source.glob("*.tar"))
    image_root = Path(args.images or Path(args.out) / "images") if shards else source
    split, rows = rep.split("pretrain"), []
    for key, files, where in tqdm(img2dataset_samples(source), desc="img2dataset", unit=" samples"):
        read = lambda ext: files[ext] if isinstance(files[ext], bytes) else files[ext].read_bytes()  # noqa: E731
        split["rows_in"], meta = split["rows_in"] + 1, {}
        if "json" in files:  # img2dataset's metadata: status, url, caption, sizes, ...
            try:
                meta = json.loads(read("json"))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise BadInput(f"{where}: not valid JSON ({e})") from None
            if not isinstance(meta, dict):
                raise BadInput(f"{where}: expected an object, got {type(meta).__name__}")
        try:
            caption = str(read("txt").decode("utf-8") if "txt" in files else meta.get("caption") or "").strip()
        except UnicodeDecodeError:
            caption = None
        ext = next((e for e in IMAGE_EXTS if e in files), None)
        if meta.get("status", "success") != "success":  # written only by img2dataset versions that kept failures
            rep.skip("pretrain", f"status {meta['status']}")
        elif not caption:
            rep.skip("pretrain", "empty caption" if caption == "" else "caption not UTF-8")
        elif ext is None:
            rep.skip("pretrain", "image missing")
        elif shards and args.check == "verify" and not readable(io.BytesIO(files[ext])):
            rep.skip("pretrain", "unreadable image")
        else:
            if shards:  # each extracted image is whole (written, then renamed); a rerun overwrites it
                (image_root / key).parent.mkdir(parents=True, exist_ok=True)
                write_atomic(image_root / f"{key}.{ext}", files[ext])
            rows.append({"image": f"{key}.{ext}", "caption": caption})
    if not shards:
        rows = drop_bad_images(rows, "pretrain", image_root, args, rep)
    rep.manifest["image_root"] = str(image_root)
    rep.add("pretrain.json", rows, split="pretrain")
    rep.write()
    print(f"for pretrain.py: --train-json {Path(args.out) / 'pretrain.json'} --image-root {image_root}")


# ----------------------------------------------------------------------------- command line
def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--out", required=True, help="output folder: the JSON files and manifest.json")
    common.add_argument("--check", choices=("verify", "exists"), default="verify",
                        help="image check: verify (there, and PIL verifies it) | exists (faster)")
    common.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="threads checking images")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("vqa", parents=[common], help="VQA v2 (+ Visual Genome QA)")
    p.add_argument("--questions-dir", required=True, help="folder of the official question and annotation files")
    p.add_argument("--coco-root", required=True, help="the image root: COCO's train2014/, val2014/, test2015/")
    p.add_argument("--answer-splits", default="train,val", help="annotated splits counted for answer_list.json")
    p.add_argument("--min-answer-count", type=int, default=9,
                   help="answer_list.json: the majority answers of at least this many questions (9: the usual 3,129)")
    p.add_argument("--vg-qa", default="", help="Visual Genome's question_answers.json: extra training rows, vg.json")
    p.add_argument("--vg-images", default="", help="VG's image folder (VG_100K/, VG_100K_2/), best under --coco-root")
    p.add_argument("--merge", action="append", default=[], metavar="A+B",
                   help="also write A+B.json, the rows of splits A and B (e.g. train+val+vg); repeatable")
    p.set_defaults(run=vqa)
    p = sub.add_parser("karpathy", parents=[common], help="COCO or Flickr30k retrieval from a Karpathy split file")
    p.add_argument("--split-file", required=True, help="dataset_coco.json or dataset_flickr30k.json")
    p.add_argument("--image-root", required=True, help="the folder its filepath/filename are relative to")
    p.set_defaults(run=karpathy)
    p = sub.add_parser("nlvr2", parents=[common], help="NLVR2 from lil-lab/nlvr's JSON-lines files")
    p.add_argument("--data-dir", required=True, help="folder of train.json, dev.json, test1.json (nlvr2/data)")
    p.add_argument("--image-root", required=True, help="folder of train/<directory>/, dev/, test1/ (or images/dev/ ...)")
    p.set_defaults(run=nlvr2)
    p = sub.add_parser("img2dataset", parents=[common], help="image-text pairs downloaded by img2dataset")
    p.add_argument("--input", required=True, help="img2dataset's output folder (shard folders or .tar shards)")
    p.add_argument("--images", default="", help="where the shards' images are extracted (default: OUT/images)")
    p.set_defaults(run=img2dataset)
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "vqa" and args.vg_qa and not args.vg_images:
        parser.error("--vg-qa needs --vg-images")
    try:
        args.run(args)
    except BadInput as e:  # one line, exit status 2; no JSON written
        parser.exit(2, f"error: {e}\n")


if __name__ == "__main__":
    main()
