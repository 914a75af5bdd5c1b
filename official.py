"""The released EVE checkpoints (github ssyze/EVE) in this model: ONE table from their state-dict names to ours.

    python finetune.py --task vqa --init eve_base_pretrain.pth --bpe eve_bpe_64k/ ...   (see the README)

The official model is a `MultiwayTransformer` under `backbone.` plus task heads. Its names map onto EVE
(model.py, heads.py) by NAME_TABLE below; a few map onto a part of one of our tensors (the 32 experts of a layer are
stacked in one (E, D, H) tensor here, the two type embeddings are the rows of one nn.Embedding, the q and v
biases are the q and v thirds of one qkv bias, whose k third stays zero: a key bias never changes attention).
`official_config` reads the architecture off the tensor shapes; `convert` maps the names, prints what is not
used and stops with a list of every encoder tensor that could not be mapped (or that the checkpoint lacks).
"""
import math
import re

import torch

from heads import EVEWithHeads, resize_image_pos
from model import make_config

# (official name, our name, how). {i}: a layer, {e}: an expert, {w}: weight or bias. How:
#   copy: the same tensor; as: the same values in our shape; row N: row N of ours ({e} = the expert);
#   rowT: row {e} of ours, transposed (nn.Linear keeps (out, in), our stacked experts (in, out));
#   q / v: that third of our qkv bias; text_rows: the first max_text_len rows; pos: resized to our patch grid
L = "backbone.encoder.layers.{i}."
NAME_TABLE = [
    ("backbone.patch_embed.{w}", "patch_embed.{w}", "copy"),
    ("backbone.class_embedding_vision", "cls_token", "as"),  # (D,) -> (1, 1, D)
    ("backbone.pos_embed_vision", "image_pos", "pos"),  # (1 + L, D) -> (1, 1 + L, D)
    ("backbone.type_embed_vision", "type_embed.weight", "row 0"),
    ("backbone.type_embed_text", "type_embed.weight", "row 1"),
    ("backbone.word_embedding.weight", "word_embed.weight", "copy"),
    ("backbone.layer_norm_text.{w}", "word_norm.{w}", "copy"),  # word_embed_norm
    ("backbone.pos_embed_text", "text_pos.weight", "text_rows"),  # 196 rows; fine-tuning uses 40
    ("backbone.pre_layrnorm.{w}", "embed_norm.{w}", "copy"),
    ("backbone.norm.{w}", "norm.{w}", "copy"),
    (L + "norm1.{w}", "blocks.{i}.norm1.{w}", "copy"),
    (L + "attn.qkv.weight", "blocks.{i}.attn.qkv.weight", "copy"),
    (L + "attn.q_bias", "blocks.{i}.attn.qkv.bias", "q"),
    (L + "attn.v_bias", "blocks.{i}.attn.qkv.bias", "v"),
    (L + "attn.proj.{w}", "blocks.{i}.attn.proj.{w}", "copy"),
    (L + "gamma_1", "blocks.{i}.gamma1", "copy"),
    (L + "gamma_2", "blocks.{i}.gamma2", "copy"),
    (L + "norm2_imag.{w}", "blocks.{i}.ffn.norms.0.{w}", "copy"),  # multiway layers: multiway_norms
    (L + "norm2_text.{w}", "blocks.{i}.ffn.norms.1.{w}", "copy"),
    (L + "mlp_imag.fc1.{w}", "blocks.{i}.ffn.ffns.0.fc1.{w}", "copy"),
    (L + "mlp_imag.fc2.{w}", "blocks.{i}.ffn.ffns.0.fc2.{w}", "copy"),
    (L + "mlp_text.fc1.{w}", "blocks.{i}.ffn.ffns.1.fc1.{w}", "copy"),
    (L + "mlp_text.fc2.{w}", "blocks.{i}.ffn.ffns.1.fc2.{w}", "copy"),
    (L + "norm2_vl.{w}", "blocks.{i}.norm2.{w}", "copy"),  # MoE layers: one shared norm
    (L + "mlp_moe.moe.gate.wg.weight", "blocks.{i}.ffn.gate.weight", "copy"),
    (L + "mlp_moe.moe.vision_embed", "blocks.{i}.ffn.modality_embed.weight", "row 0"),
    (L + "mlp_moe.moe.text_embed", "blocks.{i}.ffn.modality_embed.weight", "row 1"),
    (L + "mlp_moe.moe.experts.experts.{e}.fc1.weight", "blocks.{i}.ffn.w1", "rowT"),
    (L + "mlp_moe.moe.experts.experts.{e}.fc1.bias", "blocks.{i}.ffn.b1", "row {e}"),
    (L + "mlp_moe.moe.experts.experts.{e}.fc2.weight", "blocks.{i}.ffn.w2", "rowT"),
    (L + "mlp_moe.moe.experts.experts.{e}.fc2.bias", "blocks.{i}.ffn.b2", "row {e}"),
    # heads: retrieval fine-tuning, pre-training (m- prefixed), VQA / NLVR2 ("output", told apart by shape)
    ("itc_vision_proj_head.weight", "itc_image.weight", "copy"),
    ("itc_text_proj_head.weight", "itc_text.weight", "copy"),
    ("itc_temp", "temp", "as"),
    ("itm_head.{w}", "itm_head.{w}", "copy"),
    ("mitc_vision_proj_head.weight", "itc_image.weight", "copy"),
    ("mitc_text_proj_head.weight", "itc_text.weight", "copy"),
    ("mitc_temp", "temp", "as"),
    ("mitm_head.{w}", "itm_head.{w}", "copy"),
    ("output.{j}.{w}", "{head}.{j}.{w}", "copy"),
    # the NLVR2 bi-attention head (--biattn; heads.NLVR2BiAttention): attn1/attn2 are nn.MultiheadAttention there
    ("attn{j}.in_proj_{w}", "nlvr2_head.attn{j}.in_proj_{w}", "copy"),
    ("attn{j}.out_proj.{w}", "nlvr2_head.attn{j}.out_proj.{w}", "copy"),
    ("fc.0.{w}", "nlvr2_head.fc.0.{w}", "copy"),
    ("attn_pool.fc.0.{w}", "nlvr2_head.pool.0.{w}", "copy"),
    ("nlvr2_output.{w}", "nlvr2_head.out.{w}", "copy"),
]
# official tensors that are not weights of the encoder this project runs
SKIPPED = {"backbone.position_ids_vision": "a buffer of position indices",
           "backbone.position_ids_text": "a buffer of position indices",
           "backbone.mask_embed_vision": "BEiT-style mask token (this model removes masked patches instead)"}


def _compile(pattern):
    """'a.{i}.b.{w}' -> a regex with named groups."""
    groups = {"i": r"\d+", "e": r"\d+", "j": r"\d+", "w": r"weight|bias"}
    rx = re.escape(pattern)
    for g, body in groups.items():
        rx = rx.replace(re.escape("{" + g + "}"), f"(?P<{g}>{body})")
    return re.compile(rx + "$")


RULES = [(_compile(o), ours, how) for o, ours, how in NAME_TABLE]


def state_dict_of(ckpt):
    """The official state dict inside a loaded checkpoint file ({'model': ...} or the bare dict), else None."""
    sd = ckpt.get("model", ckpt) if isinstance(ckpt, dict) else None
    if isinstance(sd, dict) and any(isinstance(k, str) and k.startswith("backbone.") for k in sd):
        return sd
    return None


def official_config(sd, **overrides):
    """EVEConfig of an official state dict: the official architecture values (the base preset; large differs only
    in sizes) with the sizes read off the tensors, 64-wide heads; overrides (e.g. image_size, to fine-tune at
    another resolution) win. The official padding comes with the preset (text padded to 40 tokens, routed like
    tokens: pad_text_to); give pad_id=tokenizer.pad_id, since the padding tokens' ids steer their routing."""
    dim = sd["backbone.word_embedding.weight"].shape[1]
    layers = {int(m.group(1)) for k in sd for m in [re.match(r"backbone\.encoder\.layers\.(\d+)\.", k)] if m}
    moe = sorted({int(m.group(1)) for k in sd for m in [re.match(r"backbone\.encoder\.layers\.(\d+)\.mlp_moe\.", k)] if m})
    depth = max(layers) + 1
    if moe != list(range(depth - len(moe), depth)):
        raise SystemExit(f"error: MoE layers {moe} of a {depth}-layer checkpoint are not its top layers")
    experts = {int(m.group(1)) for k in sd for m in [re.search(r"experts\.experts\.(\d+)\.", k)] if m}
    fc1 = sd.get("backbone.encoder.layers.0.mlp_imag.fc1.weight")
    patch = sd["backbone.patch_embed.weight"].shape[-1]
    grid = math.isqrt(sd["backbone.pos_embed_vision"].shape[0] - 1)
    found = dict(dim=dim, heads=max(1, dim // 64), depth=depth, top_layers=len(moe), num_experts=max(experts) + 1 if experts else 0,
                 vocab_size=sd["backbone.word_embedding.weight"].shape[0], patch_size=patch, image_size=grid * patch)
    if fc1 is not None:
        found["mlp_ratio"] = fc1.shape[0] / dim
    for name, field in (("itc_vision_proj_head.weight", "itc_dim"), ("mitc_vision_proj_head.weight", "itc_dim")):
        if name in sd:
            found[field] = sd[name].shape[0]
    return make_config("base", **{**found, **overrides})


def official_nlvr2_head(sd):
    """The NLVR2 head kind of an official state dict: biattn for a model fine-tuned with --biattn, else mlp."""
    return "biattn" if "attn1.in_proj_weight" in sd else "mlp"


def _target(name, sd):
    """(our name, how, layer/expert groups) of one official name, or None."""
    for rx, ours, how in RULES:
        m = rx.match(name)
        if m:
            g = m.groupdict()
            if ours.startswith("{head}"):  # VQA: Linear(D, 2D) first; NLVR2: Linear(2D, 2D)
                first = sd["output.0.weight"] if "output.0.weight" in sd else None
                g["head"] = "nlvr2_head" if first is not None and first.shape[0] == first.shape[1] else "vqa_head"
            return ours.format(**g), how.format(**g), g
    return None


def convert(sd, model, source="the checkpoint", verbose=True):
    """Our state dict from an official one. Prints what is not used; stops (SystemExit) with a list of every
    encoder tensor of the checkpoint that has no place here and every encoder tensor of ours it does not fill."""
    own = model.state_dict()
    heads = {h for hs in EVEWithHeads.TASK_HEADS.values() for h in hs}
    is_head = lambda k: k.split(".")[0] in heads  # noqa: E731
    out, filled, unmapped, unused = {}, {}, [], []
    for name, t in sd.items():
        if name in SKIPPED:
            continue
        hit = _target(name, sd)
        if hit is None or hit[0] not in own:
            (unused if not name.startswith("backbone.") else unmapped).append(f"  {name} {tuple(t.shape)}")
            continue
        ours, how, g = hit
        ref, t = own[ours], t.detach().float().to(own[ours].dtype)
        if ours not in out:  # a tensor filled in parts starts at zero (the k third of the qkv bias stays zero)
            out[ours] = torch.zeros_like(ref)
        dst = out[ours]
        if how == "copy" or how == "as":
            src, dst_view = t.reshape(ref.shape) if how == "as" else t, dst
        elif how.startswith("row"):
            row = int(g["e"]) if how == "rowT" else int(how.split()[1])
            src, dst_view = (t.t() if how == "rowT" else t), dst[row]
        elif how in ("q", "v"):
            D = ref.shape[0] // 3
            src, dst_view = t, dst[:D] if how == "q" else dst[2 * D:]
        elif how == "text_rows":
            if t.shape[0] < ref.shape[0]:
                unmapped.append(f"  {name} {tuple(t.shape)}: fewer text positions than max_text_len={ref.shape[0]}")
                continue
            src, dst_view = t[:ref.shape[0]], dst
        else:  # pos: bicubic over the patch grid, [CLS] kept, when fine-tuning at another resolution
            grid = math.isqrt(ref.shape[1] - 1)
            src, dst_view = resize_image_pos(t.unsqueeze(0), grid), dst
        if src.shape != dst_view.shape:
            (unused if is_head(ours) else unmapped).append(
                f"  {name} {tuple(t.shape)} -> {ours} {tuple(dst_view.shape)}: shapes differ")
            continue
        dst_view.copy_(src)
        filled[ours] = filled.get(ours, 0) + 1
    # a tensor filled in parts needs every part: every expert / type row, the q and the v bias
    parts = {k: 2 if k.endswith("attn.qkv.bias") else own[k].shape[0] for k in out
             if re.search(r"type_embed|modality_embed|ffn\.[wb][12]$|qkv\.bias", k)}
    lacking = [f"  {k}" for k in own if not is_head(k) and filled.get(k, 0) < parts.get(k, 1)]
    if unmapped or lacking:
        raise SystemExit(f"error: {source} does not map onto this model (official.py NAME_TABLE):\n"
                         + ("checkpoint tensors with no place here:\n" + "\n".join(unmapped) + "\n" if unmapped else "")
                         + ("tensors of this model the checkpoint does not fill:\n" + "\n".join(lacking) if lacking else ""))
    if verbose:
        print(f"official EVE checkpoint {source}: {sum(filled.values())} tensors mapped onto {len(out)} of ours")
        if unused:
            print("official heads not used here (new heads are trained instead):\n" + "\n".join(unused))
    return {k: v for k, v in out.items() if filled.get(k)}
