"""Fine-tuning augmentation of training images, as the official EVE fine-tuning draws it: a random-resized crop
with a flip (the dataset swaps left and right in the text), colour jitter, or RandAugment. Every draw comes from
the caller's random.Random, so that a worker's augmentation is reproducible; the ops act on PIL images."""
import math

from PIL import Image, ImageEnhance, ImageOps

AUGMENTS = ("none", "flip", "color", "randaug")  # FinetuneConfig.augment; every mode but none crops and flips
RANDAUG_FILL = (128, 128, 128)  # what RandAugment's geometric ops uncover (official value)
# RandAugment as the official VQA fine-tuning draws it (ALBEF's RandomAugment(2, 7) over these 10 ops): at magnitude
# 7 of 10 an enhance factor of 0.7 * 1.8 + 0.1 = 1.36, shear 0.21, translation 7 px, rotation 21 degrees, each
# geometric op in a random direction (sign).
_AFFINE = lambda *coeffs: lambda img, sign: img.transform(  # noqa: E731
    img.size, Image.Transform.AFFINE, tuple(c * sign if isinstance(c, float) else c for c in coeffs),
    resample=Image.Resampling.BILINEAR, fillcolor=RANDAUG_FILL)
RANDAUG_OPS = {
    "identity": lambda img, sign: img,
    "autocontrast": lambda img, sign: ImageOps.autocontrast(img),
    "equalize": lambda img, sign: ImageOps.equalize(img),
    "brightness": lambda img, sign: ImageEnhance.Brightness(img).enhance(1.36),
    "sharpness": lambda img, sign: ImageEnhance.Sharpness(img).enhance(1.36),
    "shear_x": _AFFINE(1, 0.21, 0, 0, 1, 0),  # PIL's affine maps each output pixel (x, y) to an input pixel
    "shear_y": _AFFINE(1, 0, 0, 0.21, 1, 0),
    "translate_x": _AFFINE(1, 0, 7.0, 0, 1, 0),
    "translate_y": _AFFINE(1, 0, 0, 0, 1, 7.0),
    "rotate": lambda img, sign: img.rotate(21 * sign, Image.Resampling.BILINEAR, fillcolor=RANDAUG_FILL),
}


def random_crop_box(rng, scale, ratio=(3 / 4, 4 / 3)):
    """A random-resized crop as fractions (left, top, width, height): the area share uniform in `scale`, the
    aspect ratio log-uniform in `ratio`, the sides clipped to the image (torchvision retries instead)."""
    area, aspect = rng.uniform(*scale), math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
    w, h = min(1.0, math.sqrt(area * aspect)), min(1.0, math.sqrt(area / aspect))
    return rng.uniform(0, 1 - w), rng.uniform(0, 1 - h), w, h


def colour_jitter(rng, strength=0.4):
    """PIL image -> PIL image: brightness, contrast and saturation each scaled by a factor uniform in
    1 +- strength, in a random order (torchvision's ColorJitter(0.4, 0.4, 0.4) of the official 'color' option)."""
    steps = [(enhance, rng.uniform(1 - strength, 1 + strength))
             for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color)]
    rng.shuffle(steps)

    def apply(img):
        for enhance, factor in steps:
            img = enhance(img).enhance(factor)
        return img
    return apply


def rand_augment(rng, n=2, p=0.5):
    """PIL image -> PIL image: n ops of RANDAUG_OPS drawn with replacement, each applied with probability p."""
    names = sorted(RANDAUG_OPS)
    ops = [(names[rng.randrange(len(names))], rng.choice((-1, 1)), rng.random() < p) for _ in range(n)]

    def apply(img):
        for name, sign, used in ops:
            img = RANDAUG_OPS[name](img, sign) if used else img
        return img
    return apply


def augment_draws(rng, mode):
    """One training image's augmentation of `mode` (AUGMENTS), all drawn from rng now: (crop box for load_image,
    transform or None). The official fine-tuning crop keeps 0.5-1 of the area. The flip is drawn by the dataset,
    which also swaps left and right in the text."""
    if mode == "none":
        return None, None
    crop = random_crop_box(rng, (0.5, 1.0))
    return crop, colour_jitter(rng) if mode == "color" else rand_augment(rng) if mode == "randaug" else None
