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

from model import IMAGE_TOKEN, Attention, Decoder, ViT, VLM
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
# DeepSpeed-VisualChat: a Linear + LayerNorm projection, and multi-modal causal attention (MMCA)
# Yao et al. 2023, "DeepSpeed-VisualChat: Multi-Round Multi-Image Interleave Chat via Multi-Modal Causal
# Attention" (arXiv 2309.14327). Reference: microsoft/DeepSpeedExamples applications/DeepSpeed-VisualChat/
# utils/model/modeling_dsvl.py (build_projection 'baseline', concat), utils/model/third_party_model/hf_model/
# modeling_llama.py (_expand_mask with enable_mmca_attention, LlamaAttention.forward), training/main.py and
# training/training_scripts/run_7b.sh (hyperparameters: config/mmca_llava.py).


class DSVLProjection(nn.Module):
    """DeepSpeed-VisualChat's `vis_proj baseline`: Linear(Dv -> d) then LayerNorm(d, eps 1e-12) on every
    visual token, default PyTorch init; the tokens replace the "<image>" placeholders as in LLaVA. The
    official code feeds it CLIPVisionModel's last_hidden_state: every token (CLS + patches, 257 for
    CLIP ViT-L/14 at 224) of the last layer, without CLIP's post-LayerNorm, i.e. vision_layer=-1,
    vision_norm=False, select='cls_patch' here. (With QWen-VL's ViT-bigG the tower ends in its own
    resampler, 256 tokens of width 4096; model.py has no such tower.) `select` as LLaVAProjector's.
    The fusion also returns media['image_mask'] (B, T) = ids == IMAGE_TOKEN, the token types MMCAAttention
    reads at every layer and every generation step."""

    def __init__(self, vis_dim, lm_dim, *, select='cls_patch'):
        super().__init__()
        if select not in ('patch', 'cls_patch', 'cls'):
            raise ValueError(f"vision_feature must be 'patch', 'cls_patch' or 'cls', not {select!r}")
        self.select = select
        self.proj = nn.Linear(vis_dim, lm_dim)
        self.norm = nn.LayerNorm(lm_dim, eps=1e-12)

    def n_tokens(self, n_vis):
        return {'patch': n_vis - 1, 'cls_patch': n_vis, 'cls': 1}[self.select]

    def forward(self, feats, *, has_image=None, ids=None):
        x = {'patch': feats[:, 1:], 'cls_patch': feats, 'cls': feats[:, :1]}[self.select]  # (B, n, Dv)
        media = {} if ids is None else {'image_mask': ids == IMAGE_TOKEN}  # (B, T) bool
        return self.norm(self.proj(x)), media


def mmca_masks(is_image, n_queries, mask=None):
    """The two boolean masks of multi-modal causal attention (True = may attend), for the last `n_queries`
    of S positions (the new tokens; the first S - n_queries are in the KV cache).
    is_image (B, S) bool: which positions hold image tokens (everything else is text).
    mask: the decoder's ctx.mask (B, 1, T, S) (causal + left padding + sliding window) or None (causal).
      m_img (B, 1, T, S): image keys only; an image query keeps only its own position.
      m_txt (B, 1, T, S): text keys only (image queries too see the text before them, as the official code).
    Padding is neither: ctx.mask already hides it from every real query."""
    B, S = is_image.shape
    T = n_queries
    qi = torch.arange(S - T, S, device=is_image.device)[:, None]  # (T, 1) positions of the queries
    ki = torch.arange(S, device=is_image.device)[None, :]  # (1, S) positions of the keys
    allowed = ki <= qi if mask is None else mask  # (T, S) | (B, 1, T, S)
    key_img = is_image[:, None, None, :]  # (B, 1, 1, S)
    query_img = is_image[:, None, S - T:, None]  # (B, 1, T, 1)
    m_img = torch.where(query_img, ki == qi, allowed & key_img)  # (B, 1, T, S)
    m_txt = allowed & ~key_img  # (B, 1, T, S)
    return m_img, m_txt


class MMCAAttention(Attention):
    """Multi-modal causal attention: the block's own q/k/v/o and RoPE (no new parameters), scores S =
    q k^T / sqrt(hd) normalised twice, over image keys and over text keys separately, and summed:

        out = softmax(S + M_img) V + softmax(S + M_txt) V          (total weight 2 on a row with both)

    A text token attends causally to earlier text and, in a second distribution, to earlier image tokens;
    an image token attends to itself (M_img) and to the text before it (M_txt). Built by swapping each
    block's Attention class (`use_mmca`): the state-dict keys and the plain LM's weights are unchanged.
    Token types come from media['image_mask'], set once at the full forward / prefill; positions past it
    (generated tokens, read through the KV cache) are text. Without image_mask (a batch with no images)
    this is the plain causal attention, which is also what the formula gives there (see (b)).

    Two edge cases of the official code (modeling_llama.py _expand_mask / _prepare_decoder_attention_mask):
    (a) image-token rows see the earlier text through M_txt; the paper's picture has image tokens attend
        only to themselves. Followed: it is what the released models were trained with.
    (b) a row with no admissible key in one mask (text before the first image in M_img; an image row with
        no text before it in M_txt; every row of M_img in a text-only sample) is left to finfo.min
        arithmetic there: causal mask and type mask are added, so the row's past keys of the wrong type
        and its FUTURE keys of the right type both sit at exactly finfo.min (the rest at -inf), and the
        softmax spreads a uniform weight over them. DEVIATION: we give such a distribution zero weight
        (the row keeps only the other distribution). Reasons: the official row mixes in future tokens
        (the system prompt sees the image after it; an image first in a sequence would see the answer
        text), its value depends on the padding to its left (a left-padded row differs from the row
        alone), and with no image at all it adds the running mean of V to every text token instead of
        reducing to the plain LM. Rows where both masks admit a key match the official code exactly
        (tests/test_fusion_mmca.py checks both statements against a re-computation of its arithmetic).
    Implementation: SDPA twice with boolean masks (GQA through enable_gqa); an empty row is given every
    key (so the kernel never sees an all-masked row) and then zeroed."""

    def attend(self, q, k, v, ctx):
        is_image = ctx.media.get('image_mask')
        if is_image is None:
            return super().attend(q, k, v, ctx)
        T, S = q.shape[2], k.shape[2]
        is_image = F.pad(is_image, (0, S - is_image.shape[1]))  # (B, S); generated tokens are text
        out = torch.zeros_like(q)  # (B, nh, T, hd)
        for m in mmca_masks(is_image, T, ctx.mask):
            seen = m.any(-1, keepdim=True)  # (B, 1, T, 1): the row has an admissible key
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=m | ~seen, enable_gqa=True)
            out = out + y.masked_fill(~seen, 0.0)
        return out


def use_mmca(lm):
    """Swap every decoder block's attention for MMCAAttention (same parameters, same keys)."""
    for blk in lm.blocks:
        blk.attn.__class__ = MMCAAttention
    return lm

# -----------------------------------------------------------------------------
# Building a VLM from a config dict (train.py, eval.py and sample.py all go through here)


def build_vlm(cfg, dtype=torch.float32, device='cpu'):
    """cfg keys: init_vision, init_lm (hub id or folder), fusion, vision_layer, vision_norm, vision_feature,
    mmca_attention (fusion 'mmca'), lora_r / lora_alpha / lora_dropout / lora_targets (r = 0: no LoRA),
    trainable (name patterns)."""
    vision = ViT.from_pretrained(cfg['init_vision'], dtype=dtype, device=device)
    lm = Decoder.from_pretrained(cfg['init_lm'], dtype=dtype, device=device)
    name = cfg['fusion']
    if name == 'llava':
        select = cfg['vision_feature'] if vision.cfg.cls_token else 'cls_patch'  # SigLIP: no CLS, all tokens are patches
        fusion = LLaVAProjector(vision.cfg.dim, lm.cfg.dim, select=select)
    elif name == 'mmca':
        select = cfg['vision_feature'] if vision.cfg.cls_token else 'cls_patch'
        fusion = DSVLProjection(vision.cfg.dim, lm.cfg.dim, select=select)
        if cfg['mmca_attention']:  # False: the same projection with plain causal attention (the paper's ablation)
            use_mmca(lm)
    else:
        raise ValueError(f"unknown fusion {name!r}; one of: llava, mmca")
    model = VLM(vision, lm, fusion.to(device=device, dtype=dtype), vision_layer=cfg['vision_layer'],
                vision_norm=cfg['vision_norm'])
    if cfg.get('lora_r', 0):
        peft.apply_lora(model.lm, targets=cfg['lora_targets'], r=cfg['lora_r'], alpha=cfg['lora_alpha'],
                        dropout=cfg['lora_dropout'])
    peft.mark_trainable(model, cfg['trainable'])
    return model
