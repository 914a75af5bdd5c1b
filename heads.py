"""The heads beyond masked signal modeling: the ITC+ITM baseline EVE is compared with (ALBEF/VLMo-style
contrastive and matching losses, also retrieval's), and the fine-tuning heads (VQA, NLVR2 with or without
official EVE's bi-attention). EVEWithHeads is model.EVE plus these heads; pretrain.py and finetune.py build it.

Reading order: the baseline's helpers (gathering across ranks, hard negatives), the NLVR2 bi-attention head,
then EVEWithHeads: contrastive -> loss_itc / loss_itc_itm / loss_mlm, then vqa and nlvr2.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import EVE

NLVR2_HEADS = ("", "mlp", "biattn")  # none | an MLP on the two text [CLS] (official default) | bi-attention


def gather_with_grad(t):
    """Concatenate t from every DDP rank along dim 0, keeping the gradient to the local part."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return t
    if torch.distributed.get_world_size() == 1:
        return t
    import torch.distributed.nn.functional as dist_fn
    return torch.cat(dist_fn.all_gather(t), 0)


def text_keys(ids, mask):
    """One int64 per text, equal for equal token sequences whatever their padding: a polynomial hash of
    the real tokens (wrapping int64 arithmetic). ids, mask: [B, T] -> [B]."""
    powers = torch.full((ids.shape[1],), 1_000_003, dtype=torch.long, device=ids.device).cumprod(0)
    return ((ids.long() + 1) * mask.long() * powers).sum(1)


def sample_negatives(sim, positive, generator=None):
    """One hard negative per row, drawn with probability softmax(sim) over the non-positives.

    sim: (B, B') similarities, positive: (B, B') bool. Returns (B,) column indices.
    """
    if (positive.all(1)).any():
        raise ValueError("a row has no negative to sample (every pair in the batch is a positive)")
    weights = F.softmax(sim.float(), dim=1) + 1e-6  # the epsilon keeps rows with vanishing mass sampleable
    weights = weights.masked_fill(positive, 0.0)
    return torch.multinomial(weights, 1, generator=generator).squeeze(1)


def resize_image_pos(pos, grid):
    """Image position embeddings [1, 1 + g*g, D] resized to a grid x grid patch grid, bicubic, [CLS] kept: for
    fine-tuning at another resolution than pre-training (official EVE: VQA at 480 px, retrieval at 384 px)."""
    old = math.isqrt(pos.shape[1] - 1)
    if old == grid:
        return pos
    patches = pos[:, 1:].reshape(1, old, old, -1).permute(0, 3, 1, 2)  # (1, D, g, g)
    patches = F.interpolate(patches.float(), size=(grid, grid), mode="bicubic", align_corners=False)
    return torch.cat([pos[:, :1], patches.permute(0, 2, 3, 1).flatten(1, 2).to(pos.dtype)], dim=1)  # (1, 1 + grid^2, D)


class CrossAttention(nn.Module):
    """Multi-head attention of one sequence's tokens over another's. The tensor names are those of PyTorch's
    nn.MultiheadAttention, which official EVE's NLVR2 head uses (in_proj_weight holds the q, k, v projections
    stacked), so its released weights map by name."""

    def __init__(self, dim, heads, dropout=0.0):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        nn.init.trunc_normal_(self.in_proj_weight, std=0.02)

    def forward(self, x, context, context_valid):
        """x: [N, Tq, D] queries, context: [N, Tk, D] keys and values, context_valid: [N, Tk] (False = padding)."""
        N, Tq, D = x.shape
        (wq, wk, wv), (bq, bk, bv) = self.in_proj_weight.chunk(3), self.in_proj_bias.chunk(3)
        split = lambda t: t.view(N, t.shape[1], self.heads, D // self.heads).transpose(1, 2)  # noqa: E731 (N, nh, T, hs)
        q, k, v = split(F.linear(x, wq, bq)), split(F.linear(context, wk, bk)), split(F.linear(context, wv, bv))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=context_valid[:, None, None, :],
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(y.transpose(1, 2).reshape(N, Tq, D))


class NLVR2BiAttention(nn.Module):
    """Official EVE's NLVR2 head with bi-attention (its --biattn, after UNITER): every token of the (left image,
    sentence) pass attends to the (right image, sentence) pass and vice versa; each side is fused with what it read
    (one shared Linear(2D, D) + ReLU), pooled by learned attention weights, and both pools are classified."""

    def __init__(self, dim, heads, dropout=0.1):
        super().__init__()
        self.attn1, self.attn2 = CrossAttention(dim, heads, dropout), CrossAttention(dim, heads, dropout)  # l->r, r->l
        self.fc = nn.Sequential(nn.Linear(2 * dim, dim), nn.ReLU(), nn.Dropout(dropout))
        self.pool = nn.Sequential(nn.Linear(dim, 1), nn.ReLU())  # one pooling score per token
        self.pool_dropout = nn.Dropout(dropout)
        self.out = nn.Linear(2 * dim, 2)

    def attention_pool(self, x, valid):
        """x: [N, T, D], valid: [N, T] -> the softmax(score)-weighted sum of the valid tokens [N, D]."""
        weights = self.pool(x).squeeze(-1).masked_fill(~valid, float("-inf")).softmax(-1)  # (N, T)
        return (self.pool_dropout(weights).unsqueeze(1) @ x).squeeze(1)

    def forward(self, left, left_valid, right, right_valid):
        """left, right: [N, T, D] final hidden states of the two passes, *_valid: [N, T] -> logits [N, 2]."""
        left_fused = self.fc(torch.cat([self.attn1(left, right, right_valid), left], dim=-1))
        right_fused = self.fc(torch.cat([self.attn2(right, left, left_valid), right], dim=-1))
        pooled = [self.attention_pool(left_fused, left_valid), self.attention_pool(right_fused, right_valid)]
        return self.out(torch.cat(pooled, dim=-1))


class EVEWithHeads(EVE):
    """EVE with the ITC+ITM baseline's heads and, when asked, a VQA head of num_answers classes and an NLVR2 head
    (nlvr2_head: "mlp" or "biattn"). The heads are task choices, not model config: a checkpoint stores them apart."""
    TASK_HEADS = {**EVE.TASK_HEADS,
                  "itc_itm": ("itc_image", "itc_text", "temp", "pooler", "itm_head"),  # the contrastive baseline
                  "itc": ("itc_image", "itc_text", "temp"),  # its contrastive half alone (a cheap retrieval objective)
                  "mlm": ("mlm_transform", "mlm_bias"),  # masked text with the full image (optional, with itc_itm)
                  "vqa": ("vqa_head",), "nlvr2": ("nlvr2_head",)}  # fine-tuning; retrieval fine-tunes with itc_itm or itc

    def __init__(self, cfg, num_answers=0, nlvr2_head=""):
        if nlvr2_head not in NLVR2_HEADS:
            raise ValueError(f"unknown NLVR2 head {nlvr2_head!r}; choose from mlp, biattn")
        # plain attributes, set before EVE.__init__ calls add_heads below
        self.num_answers, self.nlvr2_head_kind = num_answers, nlvr2_head
        super().__init__(cfg)

    def heads_config(self):
        """What a checkpoint stores besides the model config to rebuild these heads."""
        return dict(num_answers=self.num_answers, nlvr2_head=self.nlvr2_head_kind)

    def add_heads(self):
        D, o = self.cfg.dim, self.cfg.official
        self.itc_image = nn.Linear(D, self.cfg.itc_dim, bias=o.itc_bias)
        self.itc_text = nn.Linear(D, self.cfg.itc_dim, bias=o.itc_bias)
        self.temp = nn.Parameter(torch.tensor(self.cfg.itc_temp))
        self.pooler = nn.Sequential(nn.Linear(D, D), nn.Tanh()) if o.itm_pooler else nn.Identity()
        self.itm_head = nn.Linear(D, 2)
        if self.num_answers:
            self.vqa_head = nn.Sequential(nn.Linear(D, 2 * D), nn.LayerNorm(2 * D), nn.GELU(),
                                          nn.Linear(2 * D, self.num_answers))
        if self.nlvr2_head_kind == "biattn":
            self.nlvr2_head = NLVR2BiAttention(D, self.cfg.heads)
        elif self.nlvr2_head_kind == "mlp":
            self.nlvr2_head = nn.Sequential(nn.Linear(2 * D, 2 * D), nn.LayerNorm(2 * D), nn.GELU(), nn.Linear(2 * D, 2))

    def freeze_unused_heads(self, task, backbone=False):
        """Freeze the heads that `task` never uses, so that DDP finds no unused parameters and the optimizer
        leaves them alone. backbone=True freezes the embeddings and the encoder too: only task's heads learn,
        a probe of what the representation holds."""
        used = {h for part in task.split("+") for h in self.TASK_HEADS.get(part, ())}
        if self.cfg.image_mask_ratio == 0:  # MSM then has nothing to reconstruct
            used.discard("decoder")
        if backbone:
            self.requires_grad_(False)
        for head in {h for heads in self.TASK_HEADS.values() for h in heads}:
            if hasattr(self, head):  # a module, or a parameter (temp, mlm_bias)
                getattr(self, head).requires_grad_(head in used)

    # ---- the ITC+ITM baseline (and retrieval): contrastive features, matching, optional MLM ------------------

    def itc_embedding(self, enc, head):
        """L2-normalised ITC embedding [N, itc_dim] of the [CLS] of a one-modality encoding (encode's dict);
        head: self.itc_image or self.itc_text."""
        return F.normalize(head(enc["hidden"][:, 0]), dim=-1)

    def image_features(self, images):
        """ITC embedding of images: [N, itc_dim]."""
        return self.itc_embedding(self.encode(images=images), self.itc_image)

    def text_features(self, text_ids, text_mask):
        """ITC embedding of texts: [N, itc_dim]."""
        return self.itc_embedding(self.encode(text_ids=text_ids, text_mask=text_mask), self.itc_text)

    def itc_temperature(self):
        """The learned ITC temperature, kept in [0.001, 0.5] (ALBEF's bounds) so the logits cannot blow up."""
        return self.temp.clamp(0.001, 0.5)

    def fused_cls(self, images, text_ids, text_mask):
        """The text [CLS] of an image+text pass: [N, D], plus the pass's MoE stats."""
        enc = self.encode(images, text_ids, text_mask)
        return enc["hidden"][:, enc["n_image"]], enc["moe"]

    def itm_logits(self, images, text_ids, text_mask):
        cls, stats = self.fused_cls(images, text_ids, text_mask)
        return self.itm_head(self.pooler(cls)), stats

    def contrastive(self, batch):
        """Image-text contrastive loss over all DDP ranks: one image pass and one text pass. Returns the loss, the
        local ITC embeddings img, txt [B, E], which local pairs are positives of each other [B, B], the temperature
        and the MoE stats of the two passes."""
        images, ids, tmask = batch["image"], batch["text_ids"], batch["text_mask"]
        B = images.shape[0]
        enc_i, enc_t = self.encode(images=images), self.encode(text_ids=ids, text_mask=tmask)
        img, txt = self.itc_embedding(enc_i, self.itc_image), self.itc_embedding(enc_t, self.itc_text)  # (B, E)
        # positives: the same image id, or by default the pair's own position across ranks
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        pair_ids = batch.get("image_id", torch.arange(B, device=images.device) + rank * B)
        keys = text_keys(ids, tmask)  # an identical caption of another image describes this image too
        img_all, txt_all = gather_with_grad(img), gather_with_grad(txt)
        ids_all, keys_all = gather_with_grad(pair_ids), gather_with_grad(keys)
        positive = (pair_ids[:, None] == ids_all[None, :]) | (keys[:, None] == keys_all[None, :])  # (B, B*world)
        targets = positive.float() / positive.sum(1, keepdim=True)
        temp = self.itc_temperature()
        sim_i2t, sim_t2i = img @ txt_all.t() / temp, txt @ img_all.t() / temp
        loss = (F.cross_entropy(sim_i2t.float(), targets) + F.cross_entropy(sim_t2i.float(), targets)) / 2
        local_pos = (pair_ids[:, None] == pair_ids[None, :]) | (keys[:, None] == keys[None, :])
        return loss, img, txt, local_pos, temp, enc_i["moe"] + enc_t["moe"]

    def loss_itc(self, batch):
        """The contrastive loss alone (a cheaper retrieval objective: two encoder passes per step, not five)."""
        loss_itc, *_, stats = self.contrastive(batch)
        return {"loss_itc": loss_itc}, stats, 2

    def loss_itc_itm(self, batch):
        """The contrastive loss, then image-text matching on the positives and on one hard negative image per
        text and one hard negative text per image."""
        images, ids, tmask = batch["image"], batch["text_ids"], batch["text_mask"]
        B = images.shape[0]
        loss_itc, img, txt, local_pos, temp, stats = self.contrastive(batch)
        with torch.no_grad():  # hard negatives from the local batch, never a positive
            neg_img = sample_negatives(txt @ img.t() / temp, local_pos)  # for each text
            neg_txt = sample_negatives(img @ txt.t() / temp, local_pos)  # for each image
        itm_images = torch.cat([images, images[neg_img], images])
        itm_ids = torch.cat([ids, ids, ids[neg_txt]])
        itm_mask = torch.cat([tmask, tmask, tmask[neg_txt]])
        logits, itm_stats = self.itm_logits(itm_images, itm_ids, itm_mask)
        labels = torch.cat([torch.ones(B), torch.zeros(2 * B)]).long().to(images.device)
        loss_itm = F.cross_entropy(logits.float(), labels)
        return {"loss_itc": loss_itc, "loss_itm": loss_itm}, stats + itm_stats, 3

    def loss_mlm(self, batch):
        """Masked text with the FULL image (the optional MLM of the ITC+ITM baseline)."""
        enc = self.encode(batch["image"], batch["mlm_ids"], batch["text_mask"])
        loss, _ = self.mlm_loss(enc["hidden"][:, enc["n_image"]:], batch["mlm_labels"])
        return {"loss_mlm": loss}, enc["moe"], 1

    # ---- fine-tuning heads -----------------------------------------------------------------------------------

    def vqa_logits(self, images, text_ids, text_mask):
        cls, stats = self.fused_cls(images, text_ids, text_mask)
        return self.vqa_head(cls), stats

    def nlvr2_logits(self, image0, image1, text_ids, text_mask):
        if self.nlvr2_head_kind == "biattn":  # the whole token sequences of both passes meet in the head
            left, right = self.encode(image0, text_ids, text_mask), self.encode(image1, text_ids, text_mask)
            valid = torch.cat([text_mask.new_ones(text_mask.shape[0], left["n_image"]), text_mask], 1).bool()  # (N, S)
            return self.nlvr2_head(left["hidden"], valid, right["hidden"], valid), left["moe"] + right["moe"]
        left, s0 = self.fused_cls(image0, text_ids, text_mask)
        right, s1 = self.fused_cls(image1, text_ids, text_mask)
        return self.nlvr2_head(torch.cat([left, right], dim=-1)), s0 + s1

    def loss_vqa(self, batch):
        """Binary cross-entropy against soft answer scores, scaled by the number of answers (VLMo/ALBEF)."""
        logits, stats = self.vqa_logits(batch["image"], batch["text_ids"], batch["text_mask"])
        targets = batch["vqa_targets"]
        loss = F.binary_cross_entropy_with_logits(logits.float(), targets) * targets.shape[1]
        return {"loss_vqa": loss, "logits": logits.detach()}, stats, 1

    def loss_nlvr2(self, batch):
        logits, stats = self.nlvr2_logits(batch["image0"], batch["image1"], batch["text_ids"], batch["text_mask"])
        return {"loss_nlvr2": F.cross_entropy(logits.float(), batch["label"]), "logits": logits.detach()}, stats, 2
