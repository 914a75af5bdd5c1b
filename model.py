"""EVE: one Transformer for images and text, pre-trained by masked signal modeling (arXiv 2308.11971).

Self-attention is shared by both modalities; the feed-forward network of each layer is `multiway` (one FFN
per modality, as in VLMo and EVE's lower layers), `moe` (a modality-aware sparse mixture of experts, moe.py,
EVE's top layers) or `dense` (one shared FFN, for ablations). Every token carries an explicit modality id
(0 = vision, 1 = text) from the embeddings down to the FFNs and the router.

In the paper's order: the blocks (attention, FFNs), the config and presets, the pixel decoder, then EVE:
embed (and mask) -> encode -> decode -> the unified loss. The ITC+ITM baseline and the fine-tuning heads
are heads.py's. A little over 400 lines: the config and its presets belong beside the model they configure.
"""
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from masking import block_masking, patchify, random_masking, sincos_2d
from moe import ACTIVATIONS, OFFICIAL_GATING, MoE, MoEConfig, moe_summary

VISION, TEXT = 0, 1  # modality ids


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
        # every query attends to real tokens only: (B, 1, 1, S) broadcasts over heads and queries. Without
        # padding no mask at all, because the fused kernels are faster without one
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
        o, hidden = cfg.official, int(dim * cfg.mlp_ratio)
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=o.ln_eps), nn.LayerNorm(dim, eps=o.ln_eps)
        self.attn = Attention(dim, heads)
        if ffn == "moe":
            self.ffn = MoE(dim, hidden, cfg.moe, dropout=cfg.dropout, act=o.act)
        elif ffn == "multiway":
            self.ffn = MultiwayFFN(dim, hidden, dropout=cfg.dropout, act=o.act, norm_eps=o.ln_eps if o.multiway_norms else None)
            if o.multiway_norms:
                self.norm2 = nn.Identity()  # each modality's own norm sits in the FFN
        elif ffn == "dense":
            self.ffn = DenseFFN(dim, hidden, cfg.dropout, o.act)
        else:
            raise ValueError(f"unknown FFN kind {ffn!r}: use multiway, moe or dense")
        self.ffn_sees_padding = o.pad_text_to > 0  # official: padding goes through the FFN like a token
        use_ls = o.layerscale_init > 0
        self.gamma1 = nn.Parameter(o.layerscale_init * torch.ones(dim)) if use_ls else None
        self.gamma2 = nn.Parameter(o.layerscale_init * torch.ones(dim)) if use_ls else None
        self.drop_path = drop_path_rate

    def forward(self, x, modality, valid):
        """x: [B, S, D], modality: [B, S] long, valid: [B, S] bool (False on text padding)."""
        padded = not bool(valid.all())  # one host sync; indexing by `valid` below would sync anyway
        h = self.attn(self.norm1(x), valid if padded else None)
        x = x + drop_path(h if self.gamma1 is None else self.gamma1 * h, self.drop_path, self.training)
        # the FFN sees only real tokens, flattened: padding never reaches a router or an expert
        if padded and not self.ffn_sees_padding:
            flat, stats = self.ffn(self.norm2(x)[valid], modality[valid])  # (n, D)
            h = torch.zeros_like(x).index_put((valid,), flat.to(x.dtype))
        else:  # all tokens in position order (official EVE's, padding included): a view, no gather and no scatter
            flat, stats = self.ffn(self.norm2(x).flatten(0, 1), modality.flatten())  # (B*S, D)
            h = flat.to(x.dtype).view_as(x)
            if padded and stats is not None:  # the routing picture (pictures.py) shows real tokens only
                stats["first_expert"] = stats["first_expert"][valid.flatten()]
        x = x + drop_path(h if self.gamma2 is None else self.gamma2 * h, self.drop_path, self.training)
        return x, stats


# ---- the config ------------------------------------------------------------------------------------------

@dataclass
class OfficialConfig:
    """Official EVE's (github ssyze/EVE) choices where this project's defaults differ; OFFICIAL switches them all
    on (the base and large presets), each is a switch alone. docs/OFFICIAL.md says why each default differs."""
    layerscale_init: float = 0.0  # LayerScale initial value; 0 = off (official: 0.1)
    act: str = "gelu"  # FFN and expert activation: gelu | quick_gelu (x * sigmoid(1.702 x), official)
    ln_eps: float = 1e-5  # epsilon of the encoder's LayerNorms (official: 1e-6)
    multiway_norms: bool = False  # multiway layers: a pre-FFN LayerNorm per modality (official); False: one shared
    word_embed_norm: bool = False  # a LayerNorm of the word embeddings before position and type are added (official)
    text_embed_dropout: float = 0.0  # dropout on the word embeddings (official: 0.1)
    itc_bias: bool = True  # biases in the ITC projections (official: none)
    itm_pooler: bool = True  # ITM head on a tanh pooler of the text [CLS] (ALBEF); False: on the [CLS] itself (official)
    # text padded to this many tokens of pad_id, and the padding sent through the FFNs and the MoE like a token: it
    # takes expert slots, counts towards capacity and the balancing loss (official: 40); 0: kept out of the FFNs
    pad_text_to: int = 0


OFFICIAL = OfficialConfig(layerscale_init=0.1, act="quick_gelu", ln_eps=1e-6, multiway_norms=True,
                          word_embed_norm=True, text_embed_dropout=0.1, itc_bias=False, itm_pooler=False, pad_text_to=40)


@dataclass
class EVEConfig:
    image_size: int = 64  # input resolution (square)
    patch_size: int = 8  # patch side; (image_size / patch_size)^2 patches
    vocab_size: int = 30522  # WordPiece vocabulary; pretrain.py sets it from the tokenizer
    pad_id: int = 0  # the tokenizer's padding id ([PAD] = 0 in WordPiece); official padding (pad_text_to) is made of it
    max_text_len: int = 32  # text positions, [CLS] and [SEP] included
    dim: int = 192  # encoder width
    depth: int = 6  # encoder layers
    heads: int = 3  # attention heads
    mlp_ratio: float = 4.0  # FFN hidden = mlp_ratio * dim
    ffn: str = "multiway"  # FFN of the lower layers: multiway | moe | dense
    top_ffn: str = "moe"  # FFN of the top `top_layers` layers: multiway | moe | dense
    top_layers: int = 2  # how many of the top layers use top_ffn
    moe: MoEConfig = field(default_factory=MoEConfig)  # the MoE layers' experts, router and capacity
    drop_path: float = 0.0  # stochastic depth rate of the last layer (linear from 0)
    dropout: float = 0.0  # dropout after each FFN
    decoder_dim: int = 128  # pixel decoder width
    decoder_depth: int = 2  # pixel decoder blocks
    decoder_heads: int = 4  # pixel decoder heads
    image_mask_ratio: float = 0.75  # share of patches removed for MSM
    image_masking: str = "random"  # random (MAE) | block (BEiT, ablation)
    norm_pix_loss: bool = False  # per-patch normalised pixel target (MAE)
    mlm_weight: float = 1.0  # weight of the masked-text loss in the unified loss
    itc_dim: int = 128  # ITC projection width (the baseline's, heads.py)
    itc_temp: float = 0.07  # initial ITC temperature (learned, kept in [0.001, 0.5]); ALBEF/CLIP start at 0.07
    grad_checkpoint: bool = False  # activation checkpointing, per encoder block
    official: OfficialConfig = field(default_factory=OfficialConfig)  # official EVE's choices (OFFICIAL)

    @property
    def num_patches(self):
        return (self.image_size // self.patch_size) ** 2

    def ffn_kinds(self):
        return [self.top_ffn if i >= self.depth - self.top_layers else self.ffn for i in range(self.depth)]

    @classmethod
    def from_dict(cls, d):
        """The config of asdict(config), as a checkpoint stores it. A dict with other fields (a checkpoint of
        an older version of this project) raises ValueError naming them."""
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown or not isinstance(d.get("moe"), dict):
            raise ValueError(f"its model config has fields this version does not know ({', '.join(sorted(unknown))}): "
                             "written by an older version of this project; train it again")
        return cls(**{**d, "moe": MoEConfig(**d["moe"]), "official": OfficialConfig(**d["official"])})

    def param_counts(self):
        """(total, activated per token). A token uses one multiway branch and top_k experts of each MoE layer."""
        with torch.device("meta"):
            model = EVE(self)
        total = sum(p.numel() for p in model.parameters())
        idle = 0
        for block in model.blocks:
            if isinstance(block.ffn, MoE):
                per_expert = sum(p[0].numel() for p in (block.ffn.w1, block.ffn.b1, block.ffn.w2, block.ffn.b2))
                idle += (self.moe.num_experts - self.moe.top_k) * per_expert
            elif isinstance(block.ffn, MultiwayFFN):
                idle += sum(p.numel() for p in block.ffn.ffns[1].parameters())
        return total, total - idle

    def __str__(self):
        total, active = self.param_counts()
        return f"{self!r}\nparameters: {total / 1e6:.2f}M total, {active / 1e6:.2f}M activated per token"


def _sized(moe=None, official=None, **fields):
    """An EVEConfig of the given sizes; moe: the MoEConfig's fields; official: an OfficialConfig."""
    return EVEConfig(moe=MoEConfig(**(moe or {})), official=official or OfficialConfig(), **fields)


PRESETS = {
    # from scratch at 64 px, ITC starting at 0.07 stayed at ln(batch): the image features collapse; 0.3 learns
    "tiny": _sized(itc_temp=0.3),
    "small": _sized(image_size=128, patch_size=16, dim=384, depth=8, heads=6, moe=dict(num_experts=16),
                    decoder_dim=256, decoder_depth=2, decoder_heads=8, itc_dim=256, max_text_len=40),
    # the official ITC projections keep the width (itc_proj_dim defaults to hidden_size; the configs' embed_dim is unused)
    "base": _sized(image_size=224, patch_size=16, dim=768, depth=12, heads=12, top_layers=2, drop_path=0.1,
                   moe=dict(num_experts=32, **OFFICIAL_GATING), official=OFFICIAL,
                   decoder_dim=512, decoder_depth=4, decoder_heads=16, itc_dim=768, max_text_len=40),
    "large": _sized(image_size=224, patch_size=16, dim=1024, depth=24, heads=16, top_layers=3, drop_path=0.1,
                    moe=dict(num_experts=32, **OFFICIAL_GATING), official=OFFICIAL,
                    decoder_dim=512, decoder_depth=4, decoder_heads=16, itc_dim=1024, max_text_len=40),
    # for the test suite and a first look in seconds
    "micro": _sized(image_size=32, dim=64, depth=2, heads=2, top_layers=1, moe=dict(num_experts=4),
                    decoder_dim=32, decoder_depth=1, decoder_heads=2, itc_dim=32, itc_temp=0.3),
}
MOE_FIELDS = {f.name for f in fields(MoEConfig)}
OFFICIAL_FIELDS = {f.name for f in fields(OfficialConfig)}


def make_config(preset="tiny", **overrides):
    """A preset (or a config) with some fields replaced by name, a field of EVEConfig, of its MoEConfig or of
    its OfficialConfig: make_config('base', num_experts=16, act='gelu')."""
    if not isinstance(preset, EVEConfig) and preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    d = asdict(preset if isinstance(preset, EVEConfig) else PRESETS[preset])
    for name, value in overrides.items():
        group = "moe" if name in MOE_FIELDS else "official" if name in OFFICIAL_FIELDS else None
        if group is None and name not in d:
            raise ValueError(f"unknown model config field {name!r}")
        (d[group] if group else d)[name] = value
    return EVEConfig.from_dict(d)


def is_official(cfg):
    """Whether cfg makes all of official EVE's choices (the base and large presets, the released checkpoints)."""
    return cfg.official == OFFICIAL and all(getattr(cfg.moe, k) == v for k, v in OFFICIAL_GATING.items())


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


class EVE(nn.Module):
    """The encoder and masked signal modeling. heads.EVEWithHeads adds the ITC+ITM baseline and the task heads."""
    # each training objective ("part") and the heads it uses beyond the encoder; part p's loss is self.loss_<p>.
    # A task is one part or several joined by '+' ("msm", "itc_itm+mlm")
    TASK_HEADS = {"msm": ("decoder", "mlm_transform", "mlm_bias")}

    def __init__(self, cfg: EVEConfig):
        super().__init__()
        self.cfg = cfg
        D, p, o = cfg.dim, cfg.patch_size, cfg.official
        if o.pad_text_to > cfg.max_text_len:
            raise ValueError(f"pad_text_to={o.pad_text_to} exceeds max_text_len={cfg.max_text_len} (the text positions)")
        # embeddings: position embeddings are added before masking, so a visible patch keeps its place
        self.patch_embed = nn.Conv2d(3, D, kernel_size=p, stride=p)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.image_pos = nn.Parameter(torch.zeros(1, 1 + cfg.num_patches, D))
        self.word_embed = nn.Embedding(cfg.vocab_size, D)
        self.text_pos = nn.Embedding(cfg.max_text_len, D)
        # official EVE normalises the words alone first (then dropout), and all tokens again after position and type
        self.word_norm = nn.LayerNorm(D, eps=o.ln_eps) if o.word_embed_norm else nn.Identity()
        self.word_dropout = nn.Dropout(o.text_embed_dropout)
        self.embed_norm = nn.LayerNorm(D, eps=o.ln_eps)  # over word/patch + position + type embeddings
        self.type_embed = nn.Embedding(2, D)
        rates = [cfg.drop_path * i / max(1, cfg.depth - 1) for i in range(cfg.depth)]
        self.blocks = nn.ModuleList(Block(cfg, D, cfg.heads, kind, r) for kind, r in zip(cfg.ffn_kinds(), rates))
        self.norm = nn.LayerNorm(D, eps=o.ln_eps)
        # masked signal modeling: the MLM head (tied to the word embeddings) and the pixel decoder
        self.mlm_transform = nn.Sequential(nn.Linear(D, D), nn.GELU(), nn.LayerNorm(D))
        self.mlm_bias = nn.Parameter(torch.zeros(cfg.vocab_size))
        self.decoder = PixelDecoder(cfg)
        self.add_heads()  # here, so that all parameters are initialised below, in the order they were made
        self.apply(self._init_weights)
        for t in (self.cls_token, self.image_pos, self.decoder.mask_token, self.decoder.pos_embed):
            nn.init.normal_(t, std=0.02)
        with torch.no_grad():  # the decoder starts from the patch grid's geometry, so it paints removed patches in place
            self.decoder.pos_embed[0, 1:] = sincos_2d(cfg.decoder_dim, cfg.image_size // p)

    def add_heads(self):
        """Where a subclass adds its heads (heads.EVEWithHeads)."""

    def _init_weights(self, m):
        if isinstance(m, (nn.Linear, nn.Conv2d, nn.Embedding)):
            nn.init.trunc_normal_(m.weight, std=0.02)
        if isinstance(m, (nn.Linear, nn.Conv2d)) and m.bias is not None:
            nn.init.zeros_(m.bias)

    # ---- the paper's path: embed (and mask) -> encode -> decode -> loss_msm ----------------------------------

    def embed_image(self, images, mask_ratio=0.0):
        """images: [N, 3, H, W] -> tokens [N, 1 + L_keep, D] ([CLS_v] first), mask [N, L], ids_restore [N, L]."""
        x = self.patch_embed(images).flatten(2).transpose(1, 2) + self.image_pos[:, 1:]  # (N, L, D)
        mask = ids_restore = None
        if mask_ratio > 0 and self.cfg.image_masking == "block":
            side = self.cfg.image_size // self.cfg.patch_size
            x, mask, ids_restore = block_masking(x, (side, side), mask_ratio)
        elif mask_ratio > 0:
            x, mask, ids_restore = random_masking(x, mask_ratio)
        cls = (self.cls_token + self.image_pos[:, :1]).expand(x.shape[0], -1, -1)
        # the norm brings image tokens to the text tokens' scale: without it they barely move the fused [CLS]
        return self.embed_norm(torch.cat([cls, x], dim=1) + self.type_embed.weight[VISION]), mask, ids_restore

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
        added = 0  # text positions padded on here, cut off the result again
        if images is not None:
            x, mask, ids_restore = self.embed_image(images, mask_ratio)
            parts.append(x)
            modality.append(torch.full(x.shape[:2], VISION, device=x.device))
            valid.append(torch.ones(x.shape[:2], dtype=torch.bool, device=x.device))
        if text_ids is not None:
            tmask = text_mask.bool() if text_mask is not None else torch.ones_like(text_ids, dtype=torch.bool)
            added = max(0, self.cfg.official.pad_text_to - text_ids.shape[1])
            if added:  # official EVE's text is always 40 tokens, and its padding is routed like a token (Block)
                text_ids = F.pad(text_ids, (0, added), value=self.cfg.pad_id)
                tmask = F.pad(tmask, (0, added), value=False)
            t = self.embed_text(text_ids)
            parts.append(t)
            modality.append(torch.full(t.shape[:2], TEXT, device=t.device))
            valid.append(tmask)
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
        hidden = self.norm(x[:, :-added] if added else x)  # (N, S, D): the caller's tokens only
        return dict(hidden=hidden, n_image=n_image, mask=mask, ids_restore=ids_restore, moe=moe_stats)

    def mlm_loss(self, hidden, labels):
        """Masked-token prediction on the masked positions only. hidden: [N, T, D], labels: [N, T]."""
        picked = labels != -100
        logits = self.mlm_logits(hidden[picked])  # (n_masked, vocab)
        return F.cross_entropy(logits.float(), labels[picked]), logits

    def mlm_logits(self, hidden):
        """The MLM head: [..., D] -> [..., vocab], tied to the input word embeddings."""
        return F.linear(self.mlm_transform(hidden), self.word_embed.weight, self.mlm_bias)

    def mim_loss(self, images, pred, mask):
        """Masked image modeling: MSE of the predicted pixels on the removed patches only. pred: [N, L, p*p*3],
        mask: [N, L] with 1 = removed."""
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

    # ---- training: the sum of a task's losses ----------------------------------------------------------------

    def forward(self, batch, task="msm", mask_ratio=None):
        """batch: the collator's dict, plus 'mlm_ids'/'mlm_labels' (masked text) for msm and mlm,
        'vqa_targets' for vqa. task: '+'-joined parts of TASK_HEADS. mask_ratio: MSM's image mask ratio
        (default: the config's).

        Returns {'loss': weighted total, 'loss_<part>': each part, 'loss_moe', ...}.
        """
        out, moe_stats, passes = {}, [], 0
        for name in task.split("+"):
            if name not in self.TASK_HEADS:
                raise ValueError(f"unknown task part {name!r}; choose from {sorted(self.TASK_HEADS)}")
            loss_fn = getattr(self, f"loss_{name}")  # each part's loss method: (losses, MoE stats, encoder passes)
            losses, stats, n = loss_fn(batch, mask_ratio) if name == "msm" else loss_fn(batch)
            out.update(losses)
            moe_stats += stats
            passes += n
        out.update(moe_summary(moe_stats, passes, self.cfg.moe))
        weights = {"loss_mlm": self.cfg.mlm_weight}
        out["loss"] = sum(weights.get(k, 1.0) * v for k, v in out.items() if k.startswith("loss_"))
        return out

if __name__ == "__main__":  # python model.py: the presets and their parameter counts
    for name, preset in PRESETS.items():
        total, active = preset.param_counts()
        print(f"{name:6s} {preset.image_size}px/{preset.patch_size} width {preset.dim} depth {preset.depth} "
              f"experts {preset.moe.num_experts} (top-{preset.moe.top_k}, top {preset.top_layers} layers): "
              f"{total / 1e6:.1f}M total, {active / 1e6:.1f}M activated per token")
