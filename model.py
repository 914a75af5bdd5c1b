"""EVE: one Transformer for images and text, pre-trained by masked signal modeling.

Self-attention is shared by both modalities; the feed-forward network of each layer is
`multiway` (one FFN per modality, as in VLMo and EVE's lower layers), `moe` (a
modality-aware sparse mixture of experts, moe.py, EVE's top layers) or `dense` (one
shared FFN, for ablations). Every token carries an explicit modality id (0 = vision,
1 = text) from the embeddings down to the FFNs and the router.

Order: leaf modules, config and presets, the model. EVE itself reads in the paper's order: embed and
mask -> encode -> decode -> loss_msm, then the ITC+ITM baseline, then the fine-tuning heads, then forward.
"""
import math
from dataclasses import dataclass, asdict

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from masking import block_masking, patchify, random_masking
from moe import ACTIVATIONS, MoE

VISION, TEXT = 0, 1  # modality ids
# The training objectives ("parts") and the heads each uses beyond the encoder (EVE attribute names). Part p's
# loss is the method EVE.loss_<p>. A task is one part or several joined by '+' ("msm", "itc_itm+mlm"): forward
# sums their losses and freeze_unused_heads freezes every head none of them uses.
TASK_HEADS = {"msm": ("decoder", "mlm_transform", "mlm_bias"),  # the paper's masked signal modeling
              "itc_itm": ("itc_image", "itc_text", "temp", "pooler", "itm_head"),  # the contrastive baseline
              "itc": ("itc_image", "itc_text", "temp"),  # its contrastive half alone (a cheap retrieval objective)
              "mlm": ("mlm_transform", "mlm_bias"),  # masked text with the full image (optional, with itc_itm)
              "vqa": ("vqa_head",), "nlvr2": ("nlvr2_head",)}  # fine-tuning; retrieval fine-tunes with itc_itm or itc


def drop_path(x, p, training):
    """Stochastic depth: drop the whole residual branch of a sample with probability p."""
    if p == 0.0 or not training:
        return x
    keep = x.new_empty(x.shape[0], *([1] * (x.dim() - 1))).bernoulli_(1 - p)
    return x * keep / (1 - p)


class Attention(nn.Module):
    """Multi-head self-attention shared by image and text tokens."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, valid):
        """x: [B, S, D]; valid: [B, S] bool key-padding mask, or None when nothing is padded."""
        B, S, D = x.shape
        q, k, v = self.qkv(x).view(B, S, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # (B, nh, S, hs) each
        # key-padding mask: every query may attend to real tokens only; (B, 1, 1, S) broadcasts over heads and
        # queries. Without padding no mask at all: the fused kernels are faster without one
        mask = None if valid is None else valid[:, None, None, :]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(y.transpose(1, 2).reshape(B, S, D))


class MLP(nn.Module):
    def __init__(self, dim, hidden, dropout=0.0, act="gelu"):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.act = ACTIVATIONS[act]  # gelu | quick_gelu (official EVE)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        return self.dropout(self.fc2(self.act(self.fc1(x))))


class DenseFFN(MLP):
    """One FFN for every token, whatever its modality (the ablation baseline)."""

    def forward(self, x, modality):
        return super().forward(x), None


class MultiwayFFN(nn.Module):
    """One FFN per modality; a token only ever reaches its own modality's FFN. With norm_eps, each modality
    also has its own pre-FFN LayerNorm (official EVE's norm2_imag / norm2_text; the block's norm2 is then off)."""

    def __init__(self, dim, hidden, num_modalities=2, dropout=0.0, act="gelu", norm_eps=None):
        super().__init__()
        self.ffns = nn.ModuleList(MLP(dim, hidden, dropout, act) for _ in range(num_modalities))
        self.norms = None if norm_eps is None else nn.ModuleList(nn.LayerNorm(dim, eps=norm_eps) for _ in range(num_modalities))

    def forward(self, x, modality):  # x: (n, D), modality: (n,)
        y = None
        for m, ffn in enumerate(self.ffns):
            # an empty slice still runs, so that every parameter gets a (zero) gradient under DDP
            idx = (modality == m).nonzero().squeeze(1)
            xm = x.index_select(0, idx)  # (n_m, D)
            out = ffn(xm if self.norms is None else self.norms[m](xm))  # (n_m, D)
            y = out.new_empty(x.shape[0], out.shape[1]) if y is None else y  # the FFN's dtype (bf16 under autocast)
            y.index_copy_(0, idx, out)  # in place: every row is written by exactly one modality
        return y.to(x.dtype), None


class Block(nn.Module):
    """Pre-LN Transformer block: shared attention, then the layer's kind of FFN."""

    def __init__(self, cfg, dim, heads, ffn, drop_path_rate=0.0):
        super().__init__()
        hidden = int(dim * cfg.mlp_ratio)
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=cfg.ln_eps), nn.LayerNorm(dim, eps=cfg.ln_eps)
        self.attn = Attention(dim, heads)
        if ffn == "moe":
            self.ffn = MoE(dim, hidden, cfg.num_experts, cfg.top_k, modality_routing=cfg.modality_routing,
                           capacity_factor=cfg.capacity_factor, router_jitter=cfg.router_jitter, dropout=cfg.dropout,
                           act=cfg.act, embed_to_experts=cfg.moe_embed_to_experts, min_capacity=cfg.min_capacity,
                           renorm_kept=cfg.moe_renorm_kept, sample_second=cfg.moe_second == "gumbel",
                           aux_first_only=cfg.moe_aux == "official")
        elif ffn == "multiway":
            self.ffn = MultiwayFFN(dim, hidden, dropout=cfg.dropout, act=cfg.act,
                                   norm_eps=cfg.ln_eps if cfg.multiway_norms else None)
            if cfg.multiway_norms:
                self.norm2 = nn.Identity()  # each modality's own norm sits in the FFN
        elif ffn == "dense":
            self.ffn = DenseFFN(dim, hidden, cfg.dropout, cfg.act)
        else:
            raise ValueError(f"unknown FFN kind {ffn!r}: use multiway, moe or dense")
        use_ls = cfg.layerscale_init > 0
        self.gamma1 = nn.Parameter(cfg.layerscale_init * torch.ones(dim)) if use_ls else None
        self.gamma2 = nn.Parameter(cfg.layerscale_init * torch.ones(dim)) if use_ls else None
        self.drop_path = drop_path_rate

    def forward(self, x, modality, valid):
        """x: [B, S, D], modality: [B, S] long, valid: [B, S] bool (False on text padding)."""
        padded = not bool(valid.all())  # one host sync; indexing by `valid` below would sync anyway
        h = self.attn(self.norm1(x), valid if padded else None)
        x = x + drop_path(h if self.gamma1 is None else self.gamma1 * h, self.drop_path, self.training)
        # the FFN sees only real tokens, flattened: padding never reaches a router or an expert
        if padded:
            flat, stats = self.ffn(self.norm2(x)[valid], modality[valid])  # (n, D)
            h = torch.zeros_like(x).index_put((valid,), flat.to(x.dtype))
        else:  # nothing to remove: a view, no gather and no scatter
            flat, stats = self.ffn(self.norm2(x).flatten(0, 1), modality.flatten())  # (B*S, D)
            h = flat.to(x.dtype).view_as(x)
        x = x + drop_path(h if self.gamma2 is None else self.gamma2 * h, self.drop_path, self.training)
        return x, stats


@dataclass
class EVEConfig:
    image_size: int = 64  # input resolution (square)
    patch_size: int = 8  # patch side; (image_size / patch_size)^2 patches
    vocab_size: int = 30522  # WordPiece vocabulary; pretrain.py sets it from the tokenizer
    max_text_len: int = 32  # text positions, [CLS] and [SEP] included
    dim: int = 192  # encoder width
    depth: int = 6  # encoder layers
    heads: int = 3  # attention heads
    mlp_ratio: float = 4.0  # FFN hidden = mlp_ratio * dim
    ffn: str = "multiway"  # FFN of the lower layers: multiway | moe | dense
    top_ffn: str = "moe"  # FFN of the top `top_layers` layers: multiway | moe | dense
    top_layers: int = 2  # how many of the top layers use top_ffn
    num_experts: int = 8  # experts per MoE layer
    top_k: int = 2  # experts per token
    modality_routing: bool = True  # the router is told each token's modality
    capacity_factor: float = 0.0  # expert capacity as a multiple of the fair share, training and evaluation; 0 = dropless
    min_capacity: int = 0  # with capacity_factor > 0, each expert keeps at least this many assignments (official: 4)
    moe_renorm_kept: bool = False  # renormalise a token's top-k weights over its assignments that capacity kept (official)
    moe_second: str = "top"  # experts after the first, in training: top (deterministic) | gumbel (official: Gumbel-max sampled)
    moe_embed_to_experts: bool = False  # the experts get x + modality embedding, the router's input (official); False: x
    router_jitter: float = 0.0  # multiplicative router-input noise, training only
    moe_aux: str = "topk"  # load-balancing loss: topk (every choice counted, summed over MoE layers) | official (E * sum of
    # mean prob x first-choice share, averaged over MoE layers)
    moe_aux_weight: float = 0.001  # load-balancing loss weight (official EVE value)
    moe_z_weight: float = 0.0  # router z-loss weight
    layerscale_init: float = 0.0  # LayerScale initial value; 0 = off
    act: str = "gelu"  # FFN and expert activation: gelu | quick_gelu (x * sigmoid(1.702 x), official)
    ln_eps: float = 1e-5  # epsilon of the encoder's LayerNorms (official: 1e-6)
    multiway_norms: bool = False  # multiway layers: a pre-FFN LayerNorm per modality (official); False: one shared
    image_embed_norm: bool = True  # the embedding LayerNorm normalises image tokens too (official); False = text only
    word_embed_norm: bool = False  # a LayerNorm of the word embeddings before position and type are added (official)
    text_embed_dropout: float = 0.0  # dropout on the word embeddings (official: 0.1)
    drop_path: float = 0.0  # stochastic depth rate of the last layer (linear from 0)
    dropout: float = 0.0  # dropout after each FFN
    decoder_dim: int = 128  # pixel decoder width
    decoder_depth: int = 2  # pixel decoder blocks
    decoder_heads: int = 4  # pixel decoder heads
    image_mask_ratio: float = 0.75  # share of patches removed for MSM
    image_masking: str = "random"  # random (MAE) | block (BEiT, ablation)
    pos_init: str = "random"  # initial image position table of the encoder: random (normal, std 0.02; official) | sincos
    # (MAE's 2D table; fine-tuning from an MSM checkpoint with it is worse: README)
    decoder_pos_init: str = "sincos"  # initial position table of the pixel decoder: sincos (MAE's 2D table, learned from
    # there; the decoder then paints removed patches in place) | random (normal, std 0.02; a haze: README)
    norm_pix_loss: bool = False  # per-patch normalised pixel target (MAE)
    mlm_weight: float = 1.0  # weight of the masked-text loss
    itc_dim: int = 128  # ITC projection width
    itc_bias: bool = True  # biases in the ITC projections (official: none)
    itm_pooler: bool = True  # ITM head on a tanh pooler of the text [CLS] (ALBEF); False: on the [CLS] itself (official)
    itc_temp: float = 0.07  # initial ITC temperature (learned, kept in [0.001, 0.5]); ALBEF/CLIP start at 0.07
    num_answers: int = 0  # VQA classifier outputs; 0 = no VQA head
    nlvr2_head: bool = False  # add the NLVR2 pair classifier
    nlvr2_biattn: bool = False  # NLVR2 head: bi-attention between the two passes' tokens + attention pooling (official
    # --biattn, NLVR2BiAttention); False: an MLP on the two text [CLS] (the official default)
    grad_checkpoint: bool = False  # activation checkpointing, per encoder block

    @property
    def num_patches(self):
        return (self.image_size // self.patch_size) ** 2

    def ffn_kinds(self):
        return [self.top_ffn if i >= self.depth - self.top_layers else self.ffn for i in range(self.depth)]

    def param_counts(self):
        """(total, activated per token). A token uses one multiway branch and top_k experts of each MoE layer."""
        with torch.device("meta"):
            model = EVE(self)
        total = sum(p.numel() for p in model.parameters())
        idle = 0
        for block in model.blocks:
            if isinstance(block.ffn, MoE):
                per_expert = sum(p[0].numel() for p in (block.ffn.w1, block.ffn.b1, block.ffn.w2, block.ffn.b2))
                idle += (self.num_experts - self.top_k) * per_expert
            elif isinstance(block.ffn, MultiwayFFN):
                idle += sum(p.numel() for p in block.ffn.ffns[1].parameters())
        return total, total - idle

    def __str__(self):
        total, active = self.param_counts()
        return f"{self!r}\nparameters: {total / 1e6:.2f}M total, {active / 1e6:.2f}M activated per token"


# official EVE's architecture (github ssyze/EVE: multiway_transformer.py, sharded_moe.py, the task models, the
# configs), used by the base and large presets; the README's "How this differs" table lists each with the default
OFFICIAL = dict(capacity_factor=1.0, min_capacity=4, moe_renorm_kept=True, moe_second="gumbel", moe_embed_to_experts=True,
                moe_aux="official", layerscale_init=0.1, drop_path=0.1, act="quick_gelu", ln_eps=1e-6, multiway_norms=True,
                word_embed_norm=True, text_embed_dropout=0.1, itc_bias=False, itm_pooler=False)

PRESETS = {
    # from scratch at 64 px, ITC starting at 0.07 stayed at ln(batch) for 60 retrieval steps (the image
    # features collapse); starting at 0.3 it learned (python finetune.py --task retrieval --max-steps 60 --itc-temp T).
    # Retrieval fine-tuning on the shapes world starts at 0.1 instead (finetune.SHAPES_DEFAULTS: README, measured)
    "tiny": EVEConfig(itc_temp=0.3),
    "small": EVEConfig(image_size=128, patch_size=16, dim=384, depth=8, heads=6, num_experts=16,
                       decoder_dim=256, decoder_depth=2, decoder_heads=8, itc_dim=256, max_text_len=40),
    # the official ITC projections keep the width (itc_proj_dim defaults to hidden_size; the configs' embed_dim is unused)
    "base": EVEConfig(image_size=224, patch_size=16, dim=768, depth=12, heads=12, num_experts=32, top_layers=2,
                      decoder_dim=512, decoder_depth=4, decoder_heads=16, itc_dim=768, max_text_len=40, **OFFICIAL),
    "large": EVEConfig(image_size=224, patch_size=16, dim=1024, depth=24, heads=16, num_experts=32, top_layers=3,
                       decoder_dim=512, decoder_depth=4, decoder_heads=16, itc_dim=1024, max_text_len=40, **OFFICIAL),
}


def make_config(preset="tiny", **overrides):
    """A preset with some fields replaced, e.g. make_config('base', num_experts=16)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    return EVEConfig(**{**asdict(PRESETS[preset]), **overrides})


def resize_image_pos(pos, grid):
    """Image position embeddings [1, 1 + g*g, D] resized to a grid x grid patch grid, bicubic, [CLS] kept: for
    fine-tuning at another resolution than pre-training (official EVE: VQA at 480 px, retrieval at 384 px)."""
    old = math.isqrt(pos.shape[1] - 1)
    if old == grid:
        return pos
    patches = pos[:, 1:].reshape(1, old, old, -1).permute(0, 3, 1, 2)  # (1, D, g, g)
    patches = F.interpolate(patches.float(), size=(grid, grid), mode="bicubic", align_corners=False)
    return torch.cat([pos[:, :1], patches.permute(0, 2, 3, 1).flatten(1, 2).to(pos.dtype)], dim=1)  # (1, 1 + grid^2, D)


def sincos_2d(dim, side):
    """MAE's fixed 2D sine-cosine position table for a side x side patch grid: [side*side, dim], row-major. Half
    of the channels encode the row, half the column, each as sines and cosines of geometric frequencies."""
    if dim % 4:
        raise ValueError(f"sincos position embeddings need a width divisible by 4, got {dim}")
    freqs = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))  # (dim/4,)
    rows, cols = torch.meshgrid(torch.arange(side, dtype=torch.float64), torch.arange(side, dtype=torch.float64),
                                indexing="ij")
    def encode(coord):  # (side*side,) -> (side*side, dim/2)
        angles = coord.flatten()[:, None] * freqs[None, :]
        return torch.cat([angles.sin(), angles.cos()], dim=1)
    return torch.cat([encode(rows), encode(cols)], dim=1).float()


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


class PixelDecoder(nn.Module):
    """MAE-style light decoder: visible image tokens plus a learned mask token per removed
    patch, its own position embeddings, a few blocks, and a linear map to p*p*3 pixels."""

    def __init__(self, cfg):
        super().__init__()
        self.embed = nn.Linear(cfg.dim, cfg.decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.decoder_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + cfg.num_patches, cfg.decoder_dim))
        self.blocks = nn.ModuleList(Block(cfg, cfg.decoder_dim, cfg.decoder_heads, "dense") for _ in range(cfg.decoder_depth))
        self.norm = nn.LayerNorm(cfg.decoder_dim)
        self.pred = nn.Linear(cfg.decoder_dim, cfg.patch_size ** 2 * 3)

    def forward(self, x, ids_restore):
        """x: [N, 1 + L_keep, D] encoder image tokens ([CLS_v] first), ids_restore: [N, L] -> pixels [N, L, p*p*3]."""
        x = self.embed(x)
        N, L = ids_restore.shape
        masks = self.mask_token.expand(N, L + 1 - x.shape[1], -1).to(x.dtype)
        patches = torch.cat([x[:, 1:], masks], dim=1)  # (N, L, Dd) in shuffled order
        patches = torch.gather(patches, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[2]))
        x = torch.cat([x[:, :1], patches], dim=1) + self.pos_embed
        modality = torch.full(x.shape[:2], VISION, device=x.device)
        valid = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        for block in self.blocks:
            x, _ = block(x, modality, valid)
        return self.pred(self.norm(x))[:, 1:]


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


class EVE(nn.Module):
    def __init__(self, cfg: EVEConfig):
        super().__init__()
        self.cfg = cfg
        D, p = cfg.dim, cfg.patch_size
        # embeddings: position embeddings are added before masking, so a visible patch keeps its place
        self.patch_embed = nn.Conv2d(3, D, kernel_size=p, stride=p)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.image_pos = nn.Parameter(torch.zeros(1, 1 + cfg.num_patches, D))
        self.word_embed = nn.Embedding(cfg.vocab_size, D)
        self.text_pos = nn.Embedding(cfg.max_text_len, D)
        # official EVE normalises the words alone first (then dropout), and all tokens again after position and type
        self.word_norm = nn.LayerNorm(D, eps=cfg.ln_eps) if cfg.word_embed_norm else nn.Identity()
        self.word_dropout = nn.Dropout(cfg.text_embed_dropout)
        self.embed_norm = nn.LayerNorm(D, eps=cfg.ln_eps)  # over word/patch + position + type embeddings
        self.type_embed = nn.Embedding(2, D)
        rates = [cfg.drop_path * i / max(1, cfg.depth - 1) for i in range(cfg.depth)]
        self.blocks = nn.ModuleList(Block(cfg, D, cfg.heads, kind, r) for kind, r in zip(cfg.ffn_kinds(), rates))
        self.norm = nn.LayerNorm(D, eps=cfg.ln_eps)
        # heads
        self.mlm_transform = nn.Sequential(nn.Linear(D, D), nn.GELU(), nn.LayerNorm(D))
        self.mlm_bias = nn.Parameter(torch.zeros(cfg.vocab_size))  # decoder weight is tied to word_embed
        self.decoder = PixelDecoder(cfg)
        self.itc_image = nn.Linear(D, cfg.itc_dim, bias=cfg.itc_bias)
        self.itc_text = nn.Linear(D, cfg.itc_dim, bias=cfg.itc_bias)
        self.temp = nn.Parameter(torch.tensor(cfg.itc_temp))
        self.pooler = nn.Sequential(nn.Linear(D, D), nn.Tanh()) if cfg.itm_pooler else nn.Identity()
        self.itm_head = nn.Linear(D, 2)
        if cfg.num_answers:
            self.vqa_head = nn.Sequential(nn.Linear(D, 2 * D), nn.LayerNorm(2 * D), nn.GELU(), nn.Linear(2 * D, cfg.num_answers))
        if cfg.nlvr2_head and cfg.nlvr2_biattn:
            self.nlvr2_head = NLVR2BiAttention(D, cfg.heads)
        elif cfg.nlvr2_head:
            self.nlvr2_head = nn.Sequential(nn.Linear(2 * D, 2 * D), nn.LayerNorm(2 * D), nn.GELU(), nn.Linear(2 * D, 2))
        self.apply(self._init_weights)
        for t in (self.cls_token, self.image_pos, self.decoder.mask_token, self.decoder.pos_embed):
            nn.init.normal_(t, std=0.02)
        side = cfg.image_size // cfg.patch_size
        for name, table, init in (("pos_init", self.image_pos, cfg.pos_init),
                                  ("decoder_pos_init", self.decoder.pos_embed, cfg.decoder_pos_init)):
            if init == "sincos":  # the patch grid's geometry from the start; [CLS] keeps its random row
                with torch.no_grad():
                    table[0, 1:] = sincos_2d(table.shape[-1], side)
            elif init != "random":
                raise ValueError(f"unknown {name} {init!r}: use random or sincos")

    def _init_weights(self, m):
        if isinstance(m, (nn.Linear, nn.Conv2d, nn.Embedding)):
            nn.init.trunc_normal_(m.weight, std=0.02)
        if isinstance(m, (nn.Linear, nn.Conv2d)) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def freeze_unused_heads(self, task, backbone=False):
        """Freeze the heads that `task` never uses, so that DDP finds no unused parameters
        (no find_unused_parameters needed) and the optimizer leaves them alone. backbone=True freezes the
        embeddings and the encoder too: only task's heads learn, a probe of what the representation holds."""
        used = {h for part in task.split("+") for h in TASK_HEADS.get(part, ())}
        if self.cfg.image_mask_ratio == 0:  # MSM then has nothing to reconstruct
            used.discard("decoder")
        if backbone:
            self.requires_grad_(False)
        for head in {h for heads in TASK_HEADS.values() for h in heads}:
            if hasattr(self, head):  # a module, or a parameter (temp, mlm_bias)
                getattr(self, head).requires_grad_(head in used)

    # ---- the paper's path: embed (and mask) -> encode -> decode -> loss_msm ----------------------------------

    def embed_image(self, images, mask_ratio=0.0):
        """images: [N, 3, H, W] -> tokens [N, 1 + L_keep, D] ([CLS_v] first), mask [N, L], ids_restore [N, L]."""
        x = self.patch_embed(images).flatten(2).transpose(1, 2) + self.image_pos[:, 1:]  # (N, L, D)
        mask = ids_restore = None
        if mask_ratio > 0:
            if self.cfg.image_masking == "block":
                side = self.cfg.image_size // self.cfg.patch_size
                x, mask, ids_restore = block_masking(x, (side, side), mask_ratio)
            else:
                x, mask, ids_restore = random_masking(x, mask_ratio)
        cls = (self.cls_token + self.image_pos[:, :1]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + self.type_embed.weight[VISION]
        # without the norm, image tokens start at about a fifth of the text tokens' scale and barely move the fused [CLS]
        return (self.embed_norm(x) if self.cfg.image_embed_norm else x), mask, ids_restore

    def embed_text(self, ids):
        """ids: [N, T] -> [N, T, D]."""
        if ids.shape[1] > self.cfg.max_text_len:
            raise ValueError(f"text of {ids.shape[1]} tokens exceeds max_text_len={self.cfg.max_text_len}")
        pos = self.text_pos(torch.arange(ids.shape[1], device=ids.device))
        words = self.word_dropout(self.word_norm(self.word_embed(ids)))  # (N, T, D)
        return self.embed_norm(words + pos + self.type_embed.weight[TEXT])

    def encode(self, images=None, text_ids=None, text_mask=None, mask_ratio=0.0):
        """Image only, text only, or image+text as one sequence [CLS_v, visible patches, text].

        Returns a dict: hidden [N, S, D] (after the final norm), n_image (image tokens in
        front), mask / ids_restore of the image masking, moe (stats of each MoE layer).
        """
        parts, modality, valid = [], [], []
        mask = ids_restore = None
        if images is not None:
            x, mask, ids_restore = self.embed_image(images, mask_ratio)
            parts.append(x)
            modality.append(torch.full(x.shape[:2], VISION, device=x.device))
            valid.append(torch.ones(x.shape[:2], dtype=torch.bool, device=x.device))
        if text_ids is not None:
            t = self.embed_text(text_ids)
            parts.append(t)
            modality.append(torch.full(t.shape[:2], TEXT, device=t.device))
            valid.append(text_mask.bool() if text_mask is not None else torch.ones(t.shape[:2], dtype=torch.bool, device=t.device))
        x, modality, valid = torch.cat(parts, 1), torch.cat(modality, 1), torch.cat(valid, 1)
        moe_stats = []
        for block in self.blocks:
            if self.cfg.grad_checkpoint and self.training:
                x, stats = torch.utils.checkpoint.checkpoint(block, x, modality, valid, use_reentrant=False)
            else:
                x, stats = block(x, modality, valid)
            if stats is not None:
                moe_stats.append(stats)
        n_image = parts[0].shape[1] if images is not None else 0
        return dict(hidden=self.norm(x), n_image=n_image, mask=mask, ids_restore=ids_restore, moe=moe_stats)

    def mlm_loss(self, hidden, labels):
        """Masked-token prediction on the masked positions only. hidden: [N, T, D], labels: [N, T]."""
        picked = labels != -100
        h = self.mlm_transform(hidden[picked])  # (n_masked, D)
        logits = F.linear(h, self.word_embed.weight, self.mlm_bias)  # tied to the input embeddings
        return F.cross_entropy(logits.float(), labels[picked]), logits

    def mim_loss(self, images, pred, mask):
        """Masked image modeling: MSE of the predicted pixels on the removed patches only. pred: [N, L, p*p*3], mask: [N, L] with 1 = removed."""
        target = patchify(images, self.cfg.patch_size)
        if self.cfg.norm_pix_loss:
            mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
            target = (target - mean) / (var + 1e-6) ** 0.5
        loss = ((pred.float() - target) ** 2).mean(-1)  # (N, L) per patch
        return (loss * mask).sum() / mask.sum()

    def loss_msm(self, batch, mask_ratio=None):
        """Masked signal modeling = masked image modeling (pixels of the removed patches, mim_loss) + masked
        language modeling (mlm_loss), in ONE pass over the visible patches and the masked text. mask_ratio:
        the share of patches removed (default: cfg.image_mask_ratio); with 0 no patch is removed, so there is
        no image loss (masked text, full image)."""
        ratio = self.cfg.image_mask_ratio if mask_ratio is None else mask_ratio
        enc = self.encode(batch["image"], batch["mlm_ids"], batch["text_mask"], ratio)
        n = enc["n_image"]
        loss_mlm, _ = self.mlm_loss(enc["hidden"][:, n:], batch["mlm_labels"])
        out = {"loss_mlm": loss_mlm}
        if enc["mask"] is not None:
            pred = self.decoder(enc["hidden"][:, :n], enc["ids_restore"])
            out.update(loss_mim=self.mim_loss(batch["image"], pred, enc["mask"]), pred=pred.detach(), mask=enc["mask"])
        return out, enc["moe"], 1

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
        if self.cfg.nlvr2_biattn:  # the whole token sequences of both passes meet in the head
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

    # ---- training: the sum of a task's losses ----------------------------------------------------------------

    def forward(self, batch, task="msm", mask_ratio=None):
        """batch: the collator's dict, plus 'mlm_ids'/'mlm_labels' (masked text) for msm and mlm,
        'vqa_targets' for vqa. task: '+'-joined parts of TASK_HEADS. mask_ratio: MSM's image mask ratio
        (default: the config's).

        Returns {'loss': weighted total, 'loss_<part>': each part, 'loss_moe', ...}.
        """
        out, moe_stats, passes = {}, [], 0
        for name in task.split("+"):
            if name not in TASK_HEADS:
                raise ValueError(f"unknown task part {name!r}; choose from {sorted(TASK_HEADS)}")
            loss_fn = getattr(self, f"loss_{name}")  # each part's loss method: (losses, MoE stats, encoder passes)
            losses, stats, n = loss_fn(batch, mask_ratio) if name == "msm" else loss_fn(batch)
            out.update(losses)
            moe_stats += stats
            passes += n
        out.update(self.moe_summary(moe_stats, passes))
        weights = {"loss_mlm": self.cfg.mlm_weight}
        out["loss"] = sum(weights.get(k, 1.0) * v for k, v in out.items() if k.startswith("loss_"))
        return out

    def moe_summary(self, stats, passes):
        """Auxiliary loss averaged over encoder passes; per-layer expert load summed over them."""
        if not stats:
            return {}
        n_layers = len(stats) // passes
        aux = sum(s["aux_loss"] for s in stats) / passes  # summed over layers (each layer's already official or topk)
        if self.cfg.moe_aux == "official":
            aux = aux / n_layers  # official EVE averages over its MoE layers
        z = sum(s["z_loss"] for s in stats) / passes
        load = [sum(s["tokens_per_expert"] for s in stats[i::n_layers]) for i in range(n_layers)]
        return {"loss_moe": self.cfg.moe_aux_weight * aux + self.cfg.moe_z_weight * z,
                "moe_aux": aux.detach() / n_layers, "moe_load": load,  # load[i]: (modalities, experts)
                "moe_drop": sum(s["drop_fraction"] for s in stats).detach() / len(stats)}


if __name__ == "__main__":  # python model.py: the presets and their parameter counts
    for name, preset in PRESETS.items():
        total, active = preset.param_counts()
        print(f"{name:6s} {preset.image_size}px/{preset.patch_size} width {preset.dim} depth {preset.depth} "
              f"experts {preset.num_experts} (top-{preset.top_k}, top {preset.top_layers} layers): "
              f"{total / 1e6:.1f}M total, {active / 1e6:.1f}M activated per token")
