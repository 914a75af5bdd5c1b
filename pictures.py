"""Pictures of what EVE learned, as PNG files written with pillow.

- reconstructions (MAE's picture): original | masked | reconstruction, one row per image, and a number for
  them: foreground_ratio, how much better than the background colour the removed object patches come out
  (foreground_ratios: also split by whether a visible object patch lies next to the removed one), held
  against a reconstruction without learning (nearest_visible_fill: copy the nearest visible pixel);
- expert usage: per MoE layer, the share of vision and of text assignments that each expert receives;
- routing: each image patch tinted by the expert it was sent to first, and the caption's tokens coloured
  the same way, per MoE layer: where modality-aware experts can be seen.

pretrain.py draws them every --picture-every steps. For a checkpoint, after the fact:
    python pictures.py runs/pretrain/last.pt                       # routing_<step>.png and recon_<step>.png beside it
    python pictures.py runs/pretrain/last.pt --n 6 --out-dir pics  # other pairs, another folder
    python pictures.py runs/pretrain/last.pt --n 200 --json data/shapes/retrieval_test.json  # the ratio on 200 test images
Curves of runs' metrics.jsonl files, and the concept probe's (drawn by plots.py; --help after the command):
    python pictures.py curves runs/a/metrics.jsonl runs/b/metrics.jsonl --out curves.png   # runs overlaid
    python pictures.py concepts runs/pretrain/metrics.jsonl --out concepts.png
"""
import argparse
import colorsys
import sys
from dataclasses import replace
from pathlib import Path

import torch
from PIL import Image, ImageDraw

import data
import evaluate
import plots
import training
from masking import patchify, unpatchify
from plots import font

VISION_COLOUR, TEXT_COLOUR = "#3b6fd4", "#e8892b"


def to_pil(img):
    """[3, H, W] normalised tensor -> PIL image."""
    arr = (data.denormalize(img.float().cpu()).clamp(0, 1) * 255).byte().permute(1, 2, 0).numpy()
    return Image.fromarray(arr)


def expert_colours(n):
    """n well-separated colours: hues around the wheel, alternating two lightnesses."""
    return [tuple(int(255 * c) for c in colorsys.hls_to_rgb(i / n, 0.45 if i % 2 else 0.6, 0.85)) for i in range(n)]


# ---- reconstructions ---------------------------------------------------------------------

def in_pixels(pred, target, cfg):
    """The decoder's prediction [N, L, p*p*3] in pixels: a norm_pix_loss prediction is per-patch normalised, so
    it is undone with the true patches' (target's) mean and variance, as MAE shows it."""
    if not cfg.norm_pix_loss:
        return pred.float()
    mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
    return pred.float() * (var + 1e-6) ** 0.5 + mean


def reconstruct(images, pred, mask, cfg):
    """(masked, reconstruction) images [N, 3, H, W]: removed patches grey (0) / predicted, visible ones pasted
    back as MAE shows them."""
    p = cfg.patch_size
    target = patchify(images, p)  # (N, L, p*p*3)
    pred = in_pixels(pred, target, cfg)
    m = mask.unsqueeze(-1)
    return unpatchify(target * (1 - m), p), unpatchify(pred * m + target * (1 - m), p)


def save_reconstruction(path, images, pred, mask, cfg, n=8):
    """PNG grid, one row per image: original | masked (removed patches grey) | reconstruction."""
    images, pred, mask = images[:n].float().cpu(), pred[:n].float().cpu(), mask[:n].float().cpu()
    masked, recon = reconstruct(images, pred, mask, cfg)
    S = cfg.image_size
    grid = Image.new("RGB", (3 * S + 4, len(images) * (S + 2)), "white")
    for i in range(len(images)):
        for j, t in enumerate((images[i], masked[i], recon[i])):
            grid.paste(to_pil(t), (j * (S + 2), i * (S + 2)))
    grid.resize((grid.width * 2, grid.height * 2), Image.NEAREST).save(path)


def foreground_ratios(images, pred, mask, cfg, threshold=0.5):
    """The pixel loss on removed patches that show part of an object, over the loss of painting those patches
    in the image's background colour: 1 = no better than the background, 0 = perfect. A pixel counts as an
    object's when a channel lies more than `threshold` (normalised units: 0.25 of the 0..1 range) from the
    image's median colour, the background of the shapes world's dark, noisy scenes.
    Returned for all such patches ("all") and split by whether one of the 8 neighbouring patches is a visible
    object patch ("near": a shape to continue is in sight) or not ("far"): {name: (ratio, patches)}, ratio nan
    where there is no such patch.
    images: [N, 3, H, W], pred: [N, L, p*p*3], mask: [N, L] with 1 = removed."""
    p, side = cfg.patch_size, cfg.image_size // cfg.patch_size
    target = patchify(images.float(), p)  # (N, L, p*p*3), pixel order (p, p, 3)
    pred = in_pixels(pred, target, cfg)
    background = images.float().flatten(2).median(-1).values  # (N, 3)
    pixels = target.view(*target.shape[:2], p * p, 3)
    deviation = pixels - background[:, None, None, :]  # (N, L, p*p, 3)
    has_object = (deviation.abs().amax(-1) > threshold).any(-1)  # (N, L)
    removed = mask.bool()
    visible_object = (has_object & ~removed).float().view(-1, 1, side, side)
    near = torch.nn.functional.max_pool2d(visible_object, 3, 1, 1).view_as(removed).bool()  # (N, L)
    model_loss = ((pred - target) ** 2).mean(-1)  # (N, L)
    background_loss = (deviation ** 2).mean((-1, -2))
    out = {}
    for name, chosen in (("all", has_object & removed), ("near", has_object & removed & near),
                         ("far", has_object & removed & ~near)):
        ratio = (model_loss[chosen].mean() / background_loss[chosen].mean()).item() if chosen.any() else float("nan")
        out[name] = (ratio, int(chosen.sum()))
    return out


def nearest_visible_fill(images, mask, p):
    """A reconstruction without learning, to hold the decoder's against: every removed pixel takes the colour
    of the nearest visible pixel (distance between pixel centres; of equally near ones, the first in raster
    order). It continues an edge that is in sight and paints the background where nothing is.
    images: [N, 3, H, W], mask: [N, L] with 1 = removed -> patches [N, L, p*p*3] in the decoder's pixel order."""
    N, _, H, W = images.shape
    removed = mask.bool().view(N, H // p, 1, W // p, 1).expand(-1, -1, p, -1, p).reshape(N, H * W)  # per pixel
    yx = torch.stack(torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij"), -1).view(-1, 2).float()
    filled = images.float().flatten(2).clone()  # (N, 3, H*W)
    for pixels, gone in zip(filled, removed):
        if gone.all():  # nothing in sight: the data's mean colour (0 in normalised units)
            pixels.zero_()
        elif gone.any():
            nearest = torch.cdist(yx[gone], yx[~gone]).argmin(1)  # (removed pixels,) index among the visible
            pixels[:, gone] = pixels[:, ~gone][:, nearest]
    return patchify(filled.view_as(images), p)


def foreground_ratio(images, pred, mask, cfg, threshold=0.5):
    """foreground_ratios(...)'s ratio over all removed object patches (a float, nan if there is none)."""
    return foreground_ratios(images, pred, mask, cfg, threshold)["all"][0]


# ---- expert usage ------------------------------------------------------------------------

def save_expert_usage(path, load):
    """PNG bar chart per MoE layer: for each expert (x axis, numbered), the share of all vision (blue) and of
    all text (orange) assignments it received (y axis; each modality's bars sum to 100%). load: per layer (2, E)."""
    E = load[0].shape[1]
    W, bar_h, left, f, small = max(480, 40 + 22 * E), 110, 44, font(12), font(10)
    panel = bar_h + 58
    img = Image.new("RGB", (W, len(load) * panel + 30), "white")
    draw = ImageDraw.Draw(img)
    draw.rectangle([left, 6, left + 10, 16], fill=VISION_COLOUR)
    draw.text((left + 14, 4), "vision tokens", fill="black", font=f)
    draw.rectangle([left + 120, 6, left + 130, 16], fill=TEXT_COLOUR)
    draw.text((left + 134, 4), "text tokens", fill="black", font=f)
    for r, layer in enumerate(load):  # layer: (2, E) assignment counts
        layer = layer.float().cpu()
        share = layer / layer.sum(1, keepdim=True).clamp(min=1)
        top, peak = 30 + r * panel + 16, max(share.max().item(), 1e-9)
        draw.text((left, top - 16), f"MoE layer {r}", fill="black", font=f)
        draw.line([left, top, left, top + bar_h], fill="black")  # y axis, labelled at 0 and the peak share
        draw.text((2, top - 6), f"{100 * peak:.0f}%", fill="black", font=small)
        draw.text((2, top + bar_h - 6), "0%", fill="black", font=small)
        slot = (W - left - 10) / E
        for e in range(E):
            for m, colour in enumerate((VISION_COLOUR, TEXT_COLOUR)):
                h = share[m, e].item() / peak * bar_h
                x0 = left + 2 + e * slot + m * (slot - 2) / 2
                draw.rectangle([x0, top + bar_h - h, x0 + (slot - 2) / 2 - 1, top + bar_h], fill=colour)
            draw.text((left + 2 + e * slot + slot / 2 - 4, top + bar_h + 2), str(e), fill="black", font=small)
        draw.text((left + (W - left) / 2 - 60, top + bar_h + 16), "expert (share of assignments)", fill="black", font=small)
    img.save(path)


# ---- routing -----------------------------------------------------------------------------

@torch.no_grad()
def first_experts(model, images, text_ids, text_mask):
    """Each token's first-choice expert in every MoE layer, from one image+text pass (no masking).
    Returns a list over MoE layers of [N, S] long (-1 on padding); S = 1 + patches + text length."""
    model.eval()
    enc = model.encode(images, text_ids, text_mask)
    n_image = enc["n_image"]
    valid = torch.cat([torch.ones(images.shape[0], n_image, dtype=torch.bool, device=images.device), text_mask.bool()], 1)
    out = []
    for stats in enc["moe"]:  # stats["first_expert"]: (n_valid,) in the row-major order of valid
        grid = torch.full(valid.shape, -1, dtype=torch.long, device=valid.device)
        grid[valid] = stats["first_expert"]
        out.append(grid.cpu())
    return out


def save_routing(path, images, text_ids, text_mask, experts, tokenizer, cfg, scale=4):
    """PNG, one row per pair and one column per MoE layer: the image with each patch tinted by its first expert
    and, below it, the caption's tokens on the same colours; a legend of the experts on top.
    experts: first_experts(...)."""
    E, side, p = cfg.moe.num_experts, cfg.image_size // cfg.patch_size, cfg.patch_size
    colours, f = expert_colours(E), font(11)
    S = cfg.image_size * scale
    cell_w, cell_h = max(S, 260) + 12, S + 64
    img = Image.new("RGB", (len(experts) * cell_w + 8, 40 + len(images) * cell_h), "white")
    draw = ImageDraw.Draw(img)
    x = 6
    draw.text((x, 4), "first-choice expert:", fill="black", font=f)
    x += 110
    for e, c in enumerate(colours):  # legend
        draw.rectangle([x, 6, x + 14, 18], fill=c)
        draw.text((x + 17, 5), str(e), fill="black", font=f)
        x += 34
    for layer, grid in enumerate(experts):
        draw.text((6 + layer * cell_w, 22), f"MoE layer {layer}", fill="black", font=f)
        for i in range(len(images)):
            x0, y0 = 6 + layer * cell_w, 40 + i * cell_h
            picture = to_pil(images[i]).resize((S, S), Image.NEAREST).convert("RGBA")
            tint = Image.new("RGBA", (S, S), (0, 0, 0, 0))
            tint_draw = ImageDraw.Draw(tint)
            for k in range(side * side):  # patch k is token 1 + k ([CLS_v] first)
                r, c = divmod(k, side)
                tint_draw.rectangle([c * p * scale, r * p * scale, (c + 1) * p * scale - 1, (r + 1) * p * scale - 1],
                                    fill=colours[int(grid[i, 1 + k])] + (110,), outline=colours[int(grid[i, 1 + k])] + (255,))
            img.paste(Image.alpha_composite(picture, tint).convert("RGB"), (x0, y0))
            tx, ty = x0, y0 + S + 4  # the caption's tokens, each on its expert's colour
            for t in range(1, int(text_mask[i].sum()) - 1):  # [CLS] and [SEP] left out
                word = tokenizer.decode([text_ids[i, t]]) or "?"
                e = int(grid[i, 1 + side * side + t])
                w = draw.textlength(word, font=f) + 6
                if tx + w > x0 + cell_w - 8:
                    tx, ty = x0, ty + 16
                draw.rectangle([tx, ty, tx + w, ty + 14], fill=colours[e])
                draw.text((tx + 3, ty + 1), word, fill="black", font=f)
                tx += w + 2
    img.save(path)


# ---- a checkpoint's pictures ---------------------------------------------------------------

def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("curves", "concepts"):  # charts of metrics.jsonl files, not of a checkpoint
        return plots.main(argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a pretrain.py checkpoint (last.pt or ckpt_<step>.pt)")
    parser.add_argument("--json", help="pre-training JSON to take pairs from (default: the checkpoint's)")
    parser.add_argument("--image-root", help="folder of its images (default: the checkpoint's)")
    parser.add_argument("--n", type=int, default=4, help="how many pairs")
    parser.add_argument("--seed", type=int, default=0, help="which masks (reconstruction picture)")
    parser.add_argument("--out-dir", help="where to write the PNGs (default: the checkpoint's folder)")
    args = parser.parse_args(argv)
    model, tokenizer, ckpt = evaluate.load_pretrained(args.checkpoint, torch.device("cpu"))
    cfg, tc = model.cfg, ckpt.get("train_config", {})
    json_path = args.json or tc.get("train_json") or str(Path(tc.get("data_dir", "data/shapes")) / "pretrain.json")
    image_root = args.image_root or tc.get("image_root") or str(Path(json_path).parent)
    try:
        dataset = data.PretrainDataset(json_path, image_root, cfg.image_size)
        batch = data.Collator(tokenizer, cfg.max_text_len)([dataset[i] for i in range(min(args.n, len(dataset)))])
    except data.DataError as e:
        raise training.data_error_exit(e) from None
    out_dir, step = Path(args.out_dir or Path(args.checkpoint).parent), ckpt.get("step", 0)
    out_dir.mkdir(parents=True, exist_ok=True)
    if any(kind == "moe" for kind in cfg.ffn_kinds()):
        few = {k: batch[k][:6] for k in ("image", "text_ids", "text_mask")}  # a picture of 6 pairs at most
        experts = first_experts(model, few["image"], few["text_ids"], few["text_mask"])
        save_routing(out_dir / f"routing_{step:07d}.png", few["image"], few["text_ids"], few["text_mask"],
                     experts, tokenizer, cfg)
    if cfg.image_mask_ratio > 0:
        torch.manual_seed(args.seed)
        with torch.no_grad():
            enc = model.encode(batch["image"], batch["text_ids"], batch["text_mask"], cfg.image_mask_ratio)
            pred = model.decoder(enc["hidden"][:, :enc["n_image"]], enc["ids_restore"])  # the caption unmasked
        save_reconstruction(out_dir / f"recon_{step:07d}.png", batch["image"], pred, enc["mask"], cfg)
        fill = nearest_visible_fill(batch["image"], enc["mask"], cfg.patch_size)
        plain = replace(cfg, norm_pix_loss=False)  # the fill is in pixels, not per-patch normalised
        for what, ratios in (("recon_fg_ratio", foreground_ratios(batch["image"], pred, enc["mask"], cfg)),
                             ("copying the nearest visible pixel instead (no learning)",
                              foreground_ratios(batch["image"], fill, enc["mask"], plain))):
            print(f"{what} on these {len(batch['image'])} pairs: {ratios['all'][0]:.3f} "
                  f"(1 = the background colour's loss; {ratios['all'][1]} removed object patches), "
                  f"next to a visible object patch {ratios['near'][0]:.3f} ({ratios['near'][1]}), "
                  f"none nearby {ratios['far'][0]:.3f} ({ratios['far'][1]})")
    print(f"pictures of {args.checkpoint} (step {step}) in {out_dir}")


if __name__ == "__main__":
    main()
