"""
Fusion methods: how visual features reach the language model. One self-contained section each.

Every fusion is an nn.Module called as `fusion(feats, has_image=, ids=)` on the vision tower's output
feats (B, N, Dv) (has_image (B,) bool, ids (B, T) the input ids) and returning (tokens, media):
  - tokens (B, n_tokens, d_lm) or None: spliced into the token embeddings at the IMAGE_TOKEN
    placeholders (the data expands each '<image>' into `n_tokens(N)` placeholders);
  - media: a dict the modules the fusion placed in the decoder's seams read from ctx.media.
`build_vlm(config)` at the bottom is the one place a config line picks a method.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import ViT, Decoder, VLM, Attention
import peft

# -----------------------------------------------------------------------------
# LLaVA-1.5 MLP projector
# Liu et al. 2023, "Improved Baselines with Visual Instruction Tuning" (arXiv 2310.03744).
# Reference: haotian-liu/LLaVA llava/model/multimodal_projector/builder.py ('mlp2x_gelu') and
# llava/model/multimodal_encoder/clip_encoder.py (select_layer -2, select_feature 'patch').


class LLaVAProjector(nn.Module):
    """Linear(Dv -> d) -> GELU -> Linear(d -> d) on every selected token. `select` is LLaVA's
    select_feature: 'patch' drops the CLS token (LLaVA-1.5's default), 'cls_patch' keeps it; 'cls' (ours)
    keeps only the CLS token, one visual token per image for tight compute budgets. Default PyTorch init,
    as LLaVA. Stage 1 trains only this module on captions (lr 1e-3, batch 256); stage 2 trains it with
    the LM (full, lr 2e-5, or LoRA r 128 / alpha 256, lr 2e-4) on instructions. With CLIP ViT-L/14-336
    at layer -2 and 'patch': 576 tokens of width d."""

    def __init__(self, vis_dim, lm_dim, *, select='patch'):
        super().__init__()
        if select not in ('patch', 'cls_patch', 'cls'):
            raise ValueError(f"vision_feature must be 'patch', 'cls_patch' or 'cls', not {select!r}")
        self.select = select
        self.fc1 = nn.Linear(vis_dim, lm_dim)
        self.fc2 = nn.Linear(lm_dim, lm_dim)

    def n_tokens(self, n_vis):
        return {'patch': n_vis - 1, 'cls_patch': n_vis, 'cls': 1}[self.select]

    def forward(self, feats, *, has_image=None, ids=None):
        x = {'patch': feats[:, 1:], 'cls_patch': feats, 'cls': feats[:, :1]}[self.select]  # (B, n, Dv)
        return self.fc2(F.gelu(self.fc1(x))), {}

# -----------------------------------------------------------------------------
# LaVIN: Mixture-of-Modality Adaptation (MMA)
# Luo et al. 2023, "Cheap and Quick: Efficient Vision-Language Instruction Tuning for Large Language Models"
# (arXiv 2305.15023). Reference: luogen1996/LaVIN lavin/mm_adapter.py (RepAdapter_Router, set_MMAdapter,
# set_Clip_Adapter, forward_llama_attn_cache), lavin/model.py (AdapterMLP, modality token and its mask),
# lavin/eval_model.py + lavin/generator.py (decoding), clip/model.py (the CLS of every 4th block),
# lavin/mm_adaptation.py (what trains), scripts/finetuning_sqa_7b.sh (hyperparameters).
#
#   sequence:  [m] [BOS] "Image: " v1 .. v6 " Question: ... Response:" "The answer is B. BECAUSE: ..." [EOS]
#              (text-only: [m] [BOS] "Image: N/A Question: ...")
#   m   = modality token, Embedding(2, d)[has_image]. No other token attends to it (mask[:, :, 1:, 0] =
#         -inf); it is there only for the routers to read its hidden state in every layer.
#   v_k = AdapterMLP(CLS token of CLIP after block 4k), k = 1..6: no ln_post, no proj, 6 x 1024 -> 6 x d.
#   every LLaMA block:  h = x + Attn(Router(attn_norm(x)))      (the FFN is unchanged)
#   every CLIP block:   x = x + Attn(Router(ln_1(x)))
#   Router(a) = a + s * (w0 * B(drop(A a)) + w1 * D(drop(A a))),   w = softmax(W_r a[:, 0] / t)
#
# A: d -> 8 (+bias; xavier weight, zero bias); B, D: 8 -> d block-diagonal with 2 groups (weights and biases
# zero: every router starts as the identity); W_r: d -> 2 (+bias, default init); dropout 0.1; s = 1; t = 10.
# Linear and purely additive: for fixed w a router folds into the next linear layer (RepAdapter).
# Trainable (LaVIN: every name with 'adapter'): the routers and this fusion, trainable=('fusion.', 'attn_in.'):
# 3,781,296 parameters with CLIP ViT-L/14 + LLaMA-7B. Config: fusion='lavin', router_temperature (t);
# the recipe is config/lavin_sqa.py.
#
# What x[:, 0] is, following the code:
# - LLaMA blocks run (batch, tokens, dim), so x[:, 0] is each row's first token: the (normed) modality token.
#   Our batches are left-padded at generation, so the VLM puts the modality token before the padding
#   (`LaVIN.prefix`, see model.VLM): column 0 is the modality token in every row, training and generation.
#   The routing weights computed at the full forward / prefill are kept in ctx.media and reused at every
#   decode step, as lavin/eval_model.py's cache_weights.
# - CLIP blocks run in LND layout (tokens, batch, dim) in clip/model.py, so the same x[:, 0] there is the
#   FIRST IMAGE OF THE BATCH, at each token position: every image is routed by the first image's tokens,
#   position by position. We follow the code (LaVINTowerRouter). So an image's visual tokens depend on which
#   image comes first in its batch (a text-only row carries a zero image, as in LaVIN), or with the feature
#   cache (eval.py CLI) on the first image of its 64-image chunk. At init the routers are the identity.
#
# Differences from the code:
# - Decoding: lavin/eval_model.py drops the modality token from the KV cache and numbers decode positions
#   without it, so generated tokens sit one RoPE position closer to the prompt than in training. We keep
#   the modality key in the cache (masked): KV-cache decoding equals the full forward, as in training.
# - The 6 CLS tokens are taken after every (L // 6)-th block: blocks 4, 8, ..., 24 for ViT-L/14 exactly as
#   the code's hard-coded (i + 1) % 4 == 0; other towers also give 6 (L when L < 6).
# - The official code runs in fp16 (routing weights cast to half); we use the run's dtype / autocast.
# - ScienceQA text: LaVIN SentencePiece-encodes "Image: ", the prompt and the answer separately; we tokenize
#   the whole text in one call (data.completion). A missing "The answer is X" counts wrong (LaVIN: random).


class GroupedLinear(nn.Module):
    """Block-diagonal linear map: the input's `groups` equal slices each go through their own nn.Linear
    (in/g -> out/g) and the outputs are concatenated. Equal to LaVIN's nn.Conv1d(in, out, kernel_size=1,
    groups=g) applied per token: conv.weight (out, in/g, 1) is the stack of our weights along the output
    dimension, conv.bias (out,) the concatenation of our biases (tests/test_fusion_lavin.py checks it)."""

    def __init__(self, in_features, out_features, *, groups=2):
        super().__init__()
        if in_features % groups or out_features % groups:
            raise ValueError(f"GroupedLinear: {in_features} -> {out_features} is not divisible into {groups} groups")
        self.parts = nn.ModuleList(nn.Linear(in_features // groups, out_features // groups) for _ in range(groups))

    def forward(self, x):
        chunks = x.chunk(len(self.parts), dim=-1)  # groups x (..., in/g)
        return torch.cat([f(c) for f, c in zip(self.parts, chunks)], dim=-1)  # (..., out)


class RepAdapterRouter(nn.Module):
    """LaVIN's RepAdapter_Router (lavin/mm_adapter.py), with nn.Linear for its kernel-size-1 Conv1d's:
    x + scale * (w0 * B(drop(A x)) + w1 * D(drop(A x))) with routing weights w (..., 2) from `route`.
    The subclasses below decide which token's features route (the LLaMA and CLIP sides differ)."""

    def __init__(self, dim, *, hidden=8, groups=2, scale=1.0, t=10.0, dropout=0.1):
        super().__init__()
        self.A = nn.Linear(dim, hidden)
        self.B = GroupedLinear(hidden, dim, groups=groups)
        self.D = GroupedLinear(hidden, dim, groups=groups)
        self.router = nn.Linear(dim, 2)  # LaVIN's expert_weights
        self.drop = nn.Dropout(dropout)
        self.scale, self.t = scale, t
        nn.init.xavier_uniform_(self.A.weight)
        nn.init.zeros_(self.A.bias)
        for p in (*self.B.parameters(), *self.D.parameters()):
            nn.init.zeros_(p)

    def route(self, x):
        """(..., dim) -> routing weights (..., 2)."""
        return torch.softmax(self.router(x) / self.t, dim=-1)

    def adapt(self, x, w):
        """x (B, T, dim), w broadcastable to (B, T, 2)."""
        h = self.drop(self.A(x))  # (B, T, hidden), shared by both experts
        return x + self.scale * (w[..., 0:1] * self.B(h) + w[..., 1:2] * self.D(h))


class LaVINRouter(RepAdapterRouter):
    """In a decoder block's `attn_in` seam: routed by the row's modality token (column 0, see above). The
    full forward / prefill stores the weights in ctx.media under this layer's key; decode steps read them."""

    def __init__(self, dim, *, layer, **kw):
        super().__init__(dim, **kw)
        self.key = f'lavin_route_{layer}'

    def forward(self, a, ctx):
        if ctx.cache is None or ctx.cache.pos == 0:
            ctx.media[self.key] = self.route(a[:, 0])  # (B, 2): the normed modality token in this layer
        return self.adapt(a, ctx.media[self.key][:, None])  # weights (B, 1, 2), the same for every token


class LaVINTowerRouter(RepAdapterRouter):
    """In a ViT block's `attn_in` seam: routed, as clip/model.py's LND layout does, by the batch's first image
    at each token position (the quirk described above)."""

    def forward(self, a):
        return self.adapt(a, self.route(a[0])[None])  # a (B, N, Dv); weights (1, N, 2) from image 0


class LaVINAttention(Attention):
    """Causal attention in which no query after column 0 sees key 0, the modality token (lavin/model.py:
    mask[:, :, 1:, 0] = -inf); the key stays in the KV cache and stays hidden at decode steps."""

    def attend(self, q, k, v, ctx):
        T, S = q.shape[2], k.shape[2]
        qi = torch.arange(S - T, S, device=q.device)[:, None]  # (T, 1) query columns (the cache's numbering)
        ki = torch.arange(S, device=q.device)[None, :]  # (1, S)
        mask = ctx.mask if ctx.mask is not None else ki <= qi  # (B, 1, T, S) or (T, S); True = may attend
        mask = mask & ~((ki == 0) & (qi > 0))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


class AdapterMLP(nn.Module):
    """LaVIN's visual projector (lavin/model.py): Linear(Dv -> 128) -> SiLU -> Linear(128 -> d), xavier
    weights, zero biases."""

    def __init__(self, in_dim, hidden, out_dim):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden)
        self.fc2 = nn.Linear(hidden, out_dim)
        for fc in (self.fc1, self.fc2):
            nn.init.xavier_uniform_(fc.weight)
            nn.init.zeros_(fc.bias)

    def forward(self, x):
        return self.fc2(F.silu(self.fc1(x)))


class LaVIN(nn.Module):
    """The input side of LaVIN: CLS tokens of several tower blocks through AdapterMLP (spliced at the image
    placeholders), and the modality token (put before every row through `prefix`). `attach_lavin` builds it
    and puts the routers into the tower and the LM."""

    def __init__(self, vision_cfg, lm_dim, *, n_visual=6, hidden_proj=128):
        super().__init__()
        if not vision_cfg.cls_token:
            raise ValueError(f"LaVIN reads the CLS token, which a {vision_cfg.kind} tower does not have")
        every = max(1, vision_cfg.n_layers // n_visual)
        self.layers = list(range(every, every * min(n_visual, vision_cfg.n_layers) + 1, every))  # ViT-L: 4, 8, .., 24
        self.proj = AdapterMLP(vision_cfg.dim, hidden_proj, lm_dim)  # LaVIN's adapter_proj
        self.modality = nn.Embedding(2, lm_dim)  # LaVIN's adapter_modality_embedding (default N(0, 1) init)

    def n_tokens(self, n_vis):
        return len(self.layers)

    def image_features(self, vision, pixels):
        """The CLS token after each of self.layers' blocks (1-based), without the final norm: (B, 6, Dv)."""
        x = vision.embed(pixels)  # (B, 1 + N, Dv)
        cls = []
        for i, blk in enumerate(vision.blocks[:self.layers[-1]], start=1):
            x = blk(x)
            if i in self.layers:
                cls.append(x[:, 0])
        return torch.stack(cls, dim=1)  # (B, n_visual, Dv)

    def prefix(self, has_image):
        return self.modality(has_image.long())[:, None]  # (B, 1, d)

    def forward(self, feats, *, has_image=None, ids=None):
        return self.proj(feats), {}  # (B, n_visual, d)


def attach_lavin(vision, lm, *, t=10.0, hidden=8, scale=1.0):
    """Put a router into every tower block and every LM block (swapping the LM's attention for
    LaVINAttention) and return the LaVIN fusion module. New modules take each block's device and dtype, so
    this also works on meta-device models. What trains: the fusion and the routers ('fusion.', 'attn_in.')."""
    kw = dict(hidden=hidden, scale=scale, t=t)
    for blk in vision.blocks:
        blk.attn_in.append(LaVINTowerRouter(vision.cfg.dim, **kw).to(blk.norm1.weight))
    for i, blk in enumerate(lm.blocks):
        blk.attn_in.append(LaVINRouter(lm.cfg.dim, layer=i, **kw).to(blk.attn_norm.weight))
        blk.attn.__class__ = LaVINAttention  # same parameters and state-dict keys
    return LaVIN(vision.cfg, lm.cfg.dim)

# -----------------------------------------------------------------------------
# Building a VLM from a config dict (train.py, eval.py and sample.py all go through here)


def build_vlm(cfg, dtype=torch.float32, device='cpu'):
    """cfg keys: init_vision, init_lm (hub id or folder), fusion, vision_layer, vision_norm, vision_feature,
    lora_r / lora_alpha / lora_dropout / lora_targets (r = 0: no LoRA), trainable (name patterns)."""
    vision = ViT.from_pretrained(cfg['init_vision'], dtype=dtype, device=device)
    lm = Decoder.from_pretrained(cfg['init_lm'], dtype=dtype, device=device)
    name = cfg['fusion']
    if name == 'llava':
        select = cfg['vision_feature'] if vision.cfg.cls_token else 'cls_patch'  # SigLIP: no CLS, all tokens are patches
        fusion = LLaVAProjector(vision.cfg.dim, lm.cfg.dim, select=select)
    elif name == 'lavin':
        fusion = attach_lavin(vision, lm, t=cfg['router_temperature'])
    else:
        raise ValueError(f"unknown fusion {name!r}; one of: llava, lavin")
    model = VLM(vision, lm, fusion.to(device=device, dtype=dtype), vision_layer=cfg['vision_layer'],
                vision_norm=cfg['vision_norm'])
    if cfg.get('lora_r', 0):
        peft.apply_lora(model.lm, targets=cfg['lora_targets'], r=cfg['lora_r'], alpha=cfg['lora_alpha'],
                        dropout=cfg['lora_dropout'])
    peft.mark_trainable(model, cfg['trainable'])
    return model
