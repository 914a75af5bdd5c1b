"""Data for EVE: images, readers of the real formats, collate and loaders.

Bottom-up:
1. `load_image`: any PNG/JPEG mode -> normalised (3, S, S) tensor; `swap_left_right` keeps a
   caption true when its image is flipped (the augmentation itself is augment.py's).
2. Readers of the ALBEF/X-VLM JSON formats (pre-training, retrieval, VQA, NLVR2), one `Collator`
   and one DataLoader recipe (`make_loader`, `loader_set_epoch`) shared by all training scripts, whose
   `GlobalBatchSampler` gives every step the same samples on any number of processes.
The tokenizers are in tokenization.py, the synthetic shapes world in shapes.py.

Bad input data raises `DataError` naming the file, the 0-based row and the problem; with
`skip_bad=True` bad rows are skipped and counted in `dataset.skipped` instead.
"""
import json
import os
import random
import re
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from augment import augment_draws, random_crop_box


def use_huge_pages():
    """Transparent huge pages for CPU tensors of 2 MB or more (THP_MEM_ALLOC_ENABLE=0 opts out): faulting in
    each step's fresh gradients 4 KB at a time slows the MoE backward. PyTorch reads the setting once, at its
    first CPU allocation, so every entry point calls this first in main(); no project module allocates a
    tensor when imported (this one makes its normalisation constants on use for that reason)."""
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")


class DataError(Exception):
    """A problem with input data (file, row, image); the message says where and what."""


_LEFT_RIGHT = re.compile(r"\b(left|right)\b", re.IGNORECASE)


def swap_left_right(text):
    """Swap the words left and right (keeping case): the caption of a horizontally flipped image."""
    def swap(m):
        word = m.group(0)
        other = "right" if word.lower() == "left" else "left"
        return other.upper() if word.isupper() else other.capitalize() if word[0].isupper() else other
    return _LEFT_RIGHT.sub(swap, text)


# ----------------------------------------------------------------------------- images
IMAGE_MEAN = (0.5, 0.5, 0.5)
IMAGE_STD = (0.5, 0.5, 0.5)


def _mean_std(device=None):
    """IMAGE_MEAN and IMAGE_STD as (3, 1, 1) tensors, made on use: see use_huge_pages."""
    return (torch.tensor(IMAGE_MEAN, device=device).view(3, 1, 1),
            torch.tensor(IMAGE_STD, device=device).view(3, 1, 1))


def _to_rgb(img):
    if img.mode.startswith("I") or img.mode == "F":
        # 16/32-bit grey: convert("RGB") would clip at 255, so scale 0..65535 down to 0..255 first
        arr = np.asarray(img, dtype=np.float64) / (1.0 if img.mode == "F" else 257.0)
        img = Image.fromarray(np.clip(arr, 0, 255).round().astype(np.uint8))
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):  # composite on white, not on black
        img = Image.alpha_composite(Image.new("RGBA", img.size, (255, 255, 255, 255)), img.convert("RGBA"))
    return img.convert("RGB")


def load_image(path, image_size, crop=None, flip=False, transform=None):
    """Image file -> normalised FloatTensor (3, S, S). crop = (left, top, width, height) as fractions;
    transform: PIL image -> PIL image, applied last (colour jitter, RandAugment)."""
    try:
        with Image.open(path) as img:
            img.load()  # decode now, so corrupt or truncated files fail here
            img = _to_rgb(img)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"unreadable image {Path(path).resolve()}: {e}") from None
    w, h = img.size
    box = (0, 0, w, h) if crop is None else (
        crop[0] * w, crop[1] * h, (crop[0] + crop[2]) * w, (crop[1] + crop[3]) * h)
    img = img.resize((image_size, image_size), Image.Resampling.BICUBIC, box=box)
    if flip:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if transform is not None:
        img = transform(img)
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()
    mean, std = _mean_std()
    return (x - mean) / std


def denormalize(x):
    """Inverse of load_image's normalisation, back to [0, 1]; works on (3,S,S) and (B,3,S,S)."""
    mean, std = _mean_std(x.device)
    return (x * std + mean).clamp(0, 1)


# ----------------------------------------------------------------------------- readers of the real formats
def _type_names(types):
    return " or ".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))


def _row_problem(row, required, optional):
    if not isinstance(row, dict):
        return f"row is a {type(row).__name__}, not an object"
    for key in required:
        if key not in row:
            return f"missing key '{key}'"
    for key, types in (required | {k: t for k, t in optional.items() if k in row}).items():
        value = row[key]
        if not isinstance(value, types) or isinstance(value, bool):  # bool would pass as int
            return f"'{key}' should be {_type_names(types)}, got {type(value).__name__}"
        if isinstance(value, str) and not value.strip():
            return f"empty '{key}'"
        # a list of non-empty strings, and not empty unless optional: [] is as if absent (a VQA test row's answers)
        if isinstance(value, list) and not ((value or key not in required)
                                            and all(isinstance(v, str) and v.strip() for v in value)):
            return f"'{key}' must be a non-empty list of non-empty strings"
    return None


def read_json_rows(path, required, skip_bad=False, optional=None, check=None):
    """Read a JSON list of row objects and validate their keys and types (required always, optional
    when present; check(row) returns a further problem or None). Returns (rows, skipped): skipped
    counts the problems of the rows left out with skip_bad; without it the first problem raises
    DataError, so rows[i] is row i of the file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path.name}: file not found: {path.resolve()}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path.name}: not valid JSON: {e}") from None
    if not isinstance(data, list):
        raise DataError(f"{path.name}: expected a JSON list of rows, got a {type(data).__name__}")
    rows, skipped = [], Counter()
    for i, row in enumerate(data):
        problem = _row_problem(row, required, optional or {})
        problem = problem or (check(row) if check else None)
        if problem is None:
            rows.append(row)
        elif skip_bad:
            skipped[problem] += 1
        else:
            raise DataError(f"{path.name} row {i}: {problem}")
    return rows, skipped


class Skip(str):
    """What a dataset returns instead of an item whose image failed to load under skip_bad: the
    reason travels with the batch (also out of worker processes) and the training loop counts it."""


class _JsonImageDataset(Dataset):
    """Shared by all readers: the validated rows, the image root and image loading with row errors."""
    required, optional = {}, {}

    def __init__(self, json_path, image_root, image_size, skip_bad=False, augment="none", seed=0):
        self.json_name, self.image_root = Path(json_path).name, Path(image_root)
        self.image_size, self.skip_bad = image_size, skip_bad
        self.augment, self.seed = augment, seed  # fine-tuning sets: a mode of augment.AUGMENTS
        # the epoch lives in shared memory, so the loader's persistent worker processes see set_epoch
        self._epoch = torch.zeros((), dtype=torch.long).share_memory_()
        if not self.image_root.is_dir():
            raise DataError(f"{self.json_name}: image root does not exist: {self.image_root.resolve()}")
        self.rows, self.skipped = read_json_rows(json_path, self.required, skip_bad, self.optional, self.check)
        self.file_rows = list(range(len(self.rows)))  # row i's number in the file (without skip_bad)

    def subset(self, indices):
        """Keep only these rows (a low-label run); errors still name each row's number in the file."""
        self.rows = [self.rows[i] for i in indices]
        self.file_rows = [self.file_rows[i] for i in indices]

    def check(self, row):  # format-specific checks beyond keys and types
        return None

    def set_epoch(self, epoch):
        self._epoch.fill_(epoch)

    @property
    def epoch(self):
        return int(self._epoch)

    def rng(self, index):
        """The random draws of item `index` depend only on (seed, epoch, index): reproducible and resumable
        with any number of workers."""
        return random.Random(f"{self.seed}-{self.epoch}-{index}")

    def flip(self, rng):
        """Whether a training item is mirrored (half of them, when augmenting)."""
        return self.augment != "none" and rng.random() < 0.5

    def __len__(self):
        return len(self.rows)

    def _image(self, index, relative, crop=None, flip=False, rng=None):
        """The image as a tensor, or a Skip when skip_bad and it is missing or unreadable. With rng, the crop and
        transform of fine-tuning augmentation (self.augment) are drawn from it."""
        path = self.image_root / relative
        transform = None
        if rng is not None:
            crop, transform = augment_draws(rng, self.augment)
        try:
            if not path.is_file():
                raise DataError(f"image not found: {path.resolve()}")
            return load_image(path, self.image_size, crop, flip, transform)
        except DataError as e:
            if not self.skip_bad:
                raise DataError(f"{self.json_name} row {self.file_rows[index]}: {e}") from None
            return Skip("image not found" if not path.is_file() else "unreadable image")


def _captions_of(row):
    return row["caption"] if isinstance(row["caption"], list) else [row["caption"]]


class PretrainDataset(_JsonImageDataset):
    """{"image", "caption": str or [str]} -> {"image", "text", "index"}. The caption choice and the
    augmentation depend only on (seed, epoch, index): reproducible and resumable with any workers."""
    required = {"image": str, "caption": (str, list)}

    def __init__(self, json_path, image_root, image_size, skip_bad=False, augment=False, seed=0):
        super().__init__(json_path, image_root, image_size, skip_bad, augment, seed)  # augment: on or off

    def __getitem__(self, index):
        row = self.rows[index]
        rng = self.rng(index)
        captions = _captions_of(row)
        text, crop, flip = captions[rng.randrange(len(captions))], None, False
        if self.augment:  # mild random-resized-crop (area 0.8-1, aspect 3/4-4/3) and a flip
            crop = random_crop_box(rng, (0.8, 1.0))
            flip = rng.random() < 0.5
            text = swap_left_right(text) if flip else text  # "left of" must stay true after the flip
        image = self._image(index, row["image"], crop, flip)
        return image if isinstance(image, Skip) else {"image": image, "text": text, "index": index}


class RetrievalTrainDataset(_JsonImageDataset):
    """{"image", "caption": str, "image_id"} -> {"image", "text", "image_id"}. Like ALBEF, image ids
    (int or str in the real files) are renumbered 0.. in order of first appearance."""
    required = {"image": str, "caption": str, "image_id": (int, str)}

    def __init__(self, json_path, image_root, image_size, skip_bad=False, augment="none", seed=0):
        super().__init__(json_path, image_root, image_size, skip_bad, augment, seed)
        self.image_ids = {}
        for row in self.rows:
            self.image_ids.setdefault(row["image_id"], len(self.image_ids))

    def __getitem__(self, index):
        row, rng = self.rows[index], self.rng(index)
        flip = self.flip(rng)
        image = self._image(index, row["image"], flip=flip, rng=rng)
        return image if isinstance(image, Skip) else {
            "image": image, "text": swap_left_right(row["caption"]) if flip else row["caption"],
            "image_id": self.image_ids[row["image_id"]]}


class RetrievalEvalDataset(_JsonImageDataset):
    """{"image", "caption": [str, ...]} -> images only; the texts and the index maps are attributes."""
    required = {"image": str, "caption": (str, list)}

    def __init__(self, json_path, image_root, image_size, skip_bad=False):
        super().__init__(json_path, image_root, image_size, skip_bad)
        self.texts, self.img2txt, self.txt2img = [], [], []
        for image_index, row in enumerate(self.rows):
            captions = _captions_of(row)
            self.img2txt.append(list(range(len(self.texts), len(self.texts) + len(captions))))
            self.txt2img += [image_index] * len(captions)
            self.texts += captions

    def __getitem__(self, index):
        row = self.rows[index]
        image = self._image(index, row["image"])
        return image if isinstance(image, Skip) else {"image": image, "index": index}


class VQADataset(_JsonImageDataset):
    """{"question_id", "question", "image", "answer": [str] or str} -> {"image", "text",
    "question_id", "answers"}. "answer" may be absent (the VQA test split has none): answers = []."""
    required = {"question_id": int, "question": str, "image": str}
    optional = {"answer": (str, list)}

    def __init__(self, json_path, image_root, image_size, answer_list_path=None, skip_bad=False, augment="none", seed=0):
        super().__init__(json_path, image_root, image_size, skip_bad, augment, seed)
        self.answer_list = None
        if answer_list_path is not None:
            path = Path(answer_list_path)
            if not path.is_file():
                raise DataError(f"{path.name}: file not found: {path.resolve()}")
            self.answer_list = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(self.answer_list, list) or not all(isinstance(a, str) for a in self.answer_list):
                raise DataError(f"{path.name}: expected a JSON list of answer strings")

    def __getitem__(self, index):
        row, rng = self.rows[index], self.rng(index)
        answers = row.get("answer", [])
        answers = [answers] if isinstance(answers, str) else list(answers)
        flip = self.flip(rng)  # "what is left of the cube?" on the mirrored image asks for what is right of it
        image = self._image(index, row["image"], flip=flip, rng=rng)
        if flip:
            answers = [swap_left_right(a) for a in answers]
        return image if isinstance(image, Skip) else {
            "image": image, "text": swap_left_right(row["question"]) if flip else row["question"],
            "question_id": row["question_id"], "answers": answers}


class NLVR2Dataset(_JsonImageDataset):
    """{"images": [left, right], "sentence", "label": "True"/"False"} -> {"image0", "image1", "text",
    "label": 1/0, "identifier"}."""
    required = {"images": list, "sentence": str, "label": str}
    optional = {"identifier": str}

    def check(self, row):
        if len(row["images"]) != 2:
            return f"'images' must hold exactly 2 images, got {len(row['images'])}"
        if row["label"] not in ("True", "False"):
            return f"'label' must be \"True\" or \"False\", got {row['label']!r}"
        return None

    def __getitem__(self, index):
        row, rng = self.rows[index], self.rng(index)
        # a flip mirrors the whole pair as shown side by side: each image flipped, the two swapped, and left/right
        # swapped in the sentence ("the left image has a dog on the right" stays true); the label is unchanged
        flip = self.flip(rng)
        images = [self._image(index, p, flip=flip, rng=rng) for p in row["images"]]
        skips = [x for x in images if isinstance(x, Skip)]
        if flip:
            images.reverse()
        return skips[0] if skips else {
            "image0": images[0], "image1": images[1], "text": swap_left_right(row["sentence"]) if flip else row["sentence"],
            "label": int(row["label"] == "True"), "identifier": row.get("identifier", "")}


# ----------------------------------------------------------------------------- batches and loaders
def pad_ids(ids, pad_id):
    """Token-id lists -> text_ids (B, T) padded with pad_id to the longest, text_mask (B, T; True on real tokens)."""
    lengths = torch.tensor([len(x) for x in ids])
    text_ids = torch.full((len(ids), int(lengths.max())), pad_id)
    for b, x in enumerate(ids):
        text_ids[b, :len(x)] = torch.tensor(x)
    return text_ids, torch.arange(text_ids.shape[1]) < lengths[:, None]


class Collator:
    """Items -> batch: stacks tensors, tokenizes and pads "text" into text_ids (B, T) and text_mask
    (B, T; True on [CLS]..[SEP]), ints -> LongTensor, the rest lists. Skipped items are left out and
    counted by reason in batch["skipped"]; a batch of skips only holds just that."""

    def __init__(self, tokenizer, max_len):
        self.tokenizer, self.max_len = tokenizer, max_len

    def __call__(self, items):
        kept = [item for item in items if not isinstance(item, Skip)]
        batch = {"skipped": Counter(item for item in items if isinstance(item, Skip))}
        if not kept:
            return batch
        for key in kept[0]:
            values = [item[key] for item in kept]
            if key == "text":
                ids = [self.tokenizer.encode(t, self.max_len) for t in values]
                batch["text_ids"], batch["text_mask"] = pad_ids(ids, self.tokenizer.pad_id)
            elif isinstance(values[0], torch.Tensor):
                batch[key] = torch.stack(values)
            elif isinstance(values[0], int):
                batch[key] = torch.tensor(values, dtype=torch.long)
            else:
                batch[key] = values
        return batch


class GlobalBatchSampler(Sampler):
    """One process's micro-batches (lists of dataset indices), laid out so that the samples of an optimizer step,
    and how they are cut into micro-batches, do not depend on how many processes share the work.

    Each epoch the n indices are shuffled by (seed, epoch) (or kept in order) and cut into global batches of
    micro * accum * world indices, one per optimizer step. Global batch s is cut into accum * world slots of
    `micro` consecutive indices, and slot m = rank * accum + j is this process's micro-batch j of step s: one
    process with accum 2 gets the micro-batches that two processes with accum 1 get between them.
    drop_last: no short last step; without it (one slot only) the last micro-batch may be short."""

    def __init__(self, n, micro, accum=1, rank=0, world=1, shuffle=True, seed=0, drop_last=True):
        if accum * world > 1 and not drop_last:
            raise ValueError("a short last global batch cannot be cut into equal micro-batches: use drop_last")
        self.n, self.micro, self.accum, self.rank, self.slots = n, micro, accum, rank, accum * world
        self.shuffle, self.seed = shuffle, seed
        self.steps = n // (micro * self.slots) if drop_last else -(-n // micro)  # steps per epoch
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch, start=0):
        """The next pass yields epoch `epoch` from this process's micro-batch `start` on (a resumed run
        skips the ones before it without reading them)."""
        self.epoch, self.start = epoch, start

    def __len__(self):  # this process's micro-batches in a whole epoch
        return self.steps * self.accum

    def __iter__(self):
        # the same permutation as RandomSampler with a generator seeded seed + epoch: one process without
        # accumulation keeps the data order it had before global batches
        order = (torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch))
                 if self.shuffle else torch.arange(self.n))
        size = self.micro * self.slots  # the global batch
        for k in range(self.start, len(self)):
            step, j = divmod(k, self.accum)
            first = step * size + (self.rank * self.accum + j) * self.micro
            yield order[first:first + self.micro].tolist()


def make_loader(dataset, batch_size, collator, shuffle, seed=0, num_workers=0, drop_last=False,
                accum=1, rank=0, world=1):
    """The one loader recipe of the training scripts and the evaluation: micro-batches of batch_size items, accum of
    them per process and step on `world` processes (GlobalBatchSampler); call loader_set_epoch(loader, e) each
    epoch."""
    sampler = GlobalBatchSampler(len(dataset), batch_size, accum, rank, world, shuffle, seed, drop_last)
    # workers persist across epochs (starting them anew each epoch stalls training) and read the epoch
    # from the dataset's shared memory; the loader's own generator keeps it from drawing worker seeds from the
    # global torch RNG
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=collator, num_workers=num_workers,
                      persistent_workers=num_workers > 0, generator=torch.Generator().manual_seed(seed))


def loader_set_epoch(loader, epoch, start=0):
    """Make the data of `epoch` a pure function of (seed, epoch), so a resumed run sees the same, and begin the
    loader's next pass at its batch `start`. Returns how many batches that pass still yields before `start`:
    0 when its sampler skips them unread (GlobalBatchSampler), else `start` (the caller reads and drops them)."""
    sampler, skip = loader.batch_sampler, start
    if isinstance(sampler, GlobalBatchSampler):
        sampler.set_epoch(epoch, start)
        skip = 0
    if hasattr(loader.dataset, "set_epoch"):
        loader.dataset.set_epoch(epoch)
    return skip
