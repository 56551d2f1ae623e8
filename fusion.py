"""
Fusion methods: how visual features reach the language model. One self-contained section each.

Every fusion is an nn.Module called as `fusion(feats, has_image=, ids=)` on the vision tower's output
feats (B, N, Dv) (has_image (B,) bool, ids (B, T) the input ids) and returning (tokens, media):
  - tokens (B, n_tokens, d_lm) or None: spliced into the token embeddings at the IMAGE_TOKEN
    placeholders (the data expands each '<image>' into `n_tokens(N)` placeholders);
  - media: a dict the modules the fusion placed in the decoder's seams read from ctx.media.
`build_vlm(config)` at the bottom is the one place a config line picks a method.
"""

import math

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
# ADEM-VL: parameter-free cross-attention in parallel with every FFN, multiscale visual prompts,
# adaptive fusion. Hao et al. 2024, "ADEM-VL: Adaptive and Embedded Fusion for Efficient Vision-Language
# Tuning" (arXiv 2410.17779). Reference code: Hao840/ADEM-VL adem/model.py (Avg2dSampler, Projector,
# Transformer.forward / insert_image_embeds), adem/adapter.py (Adapter, forward_llama, forward_clip),
# adem/build.py (what trains), clip/model.py (the tower stops at the penultimate block, ln_post on every
# token, no proj). What follows is what that code computes, quirks included (the drop also runs at
# inference; text-only samples still get e1 / e2; the CLIP adapters' 0.1 is hard-coded).
#
#   CLIP ViT-L/14 (penultimate layer, ln_post)  F: (B, 1 + 256, 1024), with ADEMViTAdapters in its blocks
#     |- F[:, 0]  (CLS) -> proj_cls -> one token spliced after "Image: " in the prompt (input level)
#     '- F[:, 1:] -> 16x16 grid -> scales (256, 64): as is + avg-pooled to 8x8 -> (B, 320, 1024)
#                 -> proj -> * beta * has_image = V (B, 320, d)
#   keys SiLU(V + e1), values V + e2, computed once per forward and put in media; in every LM layer,
#   in parallel with the FFN on its normed input X = ffn_norm(h):
#     S = SiLU(X) keys^T                 (B, T, 320)   no heads, no 1/sqrt(d), no softmax
#     S[S < the (floor(drop_ratio * 320) + 1)-th smallest of its row] = 0      ("adaptive fusion")
#     out = h + FFN(X) + alpha * S values
#
# A text-only sample has V = 0 (and no CLS slot: its prompt reads "Image: N/A"), so its keys are SiLU(e1)
# and its values e2: zero at init, which leaves the frozen LM exactly unchanged for it at step 0; after
# training e2 is not zero and the branch still acts on text-only samples.
# The LM-side branch has no parameters: each block gets an ADEMCrossAttention in its `ffn_side` seam that
# reads keys / values from ctx.media. With the KV cache nothing changes: a token's branch needs only that
# token and V, and media reaches every decoding step.
#
# Trainable (every official parameter named '*adapter*'): proj, proj_cls, e1, e2 (fusion.*) and the CLIP
# adapters (vision.blocks.*.adapters.*). With CLIP ViT-L/14 and LLaMA-7B: 2 x 320 x 4096 (e1, e2)
# + 2 x 659,584 (proj, proj_cls) + 24 x 2 x 1024 x 12 (CLIP adapters) = 4,530,432 (tests/test_fusion_adem.py).
# The 24th CLIP adapter is built but never runs (the tower stops at block 23), as in the official code,
# whose count includes it.


class LowRankProjector(nn.Module):
    """Linear(in -> hidden) -> SiLU -> Linear(hidden -> out), xavier-uniform weights, zero biases
    (ADEM-VL's `Projector`, hidden_proj 128: the paper's low-rank projection)."""

    def __init__(self, in_dim, hidden, out_dim):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden)
        self.fc2 = nn.Linear(hidden, out_dim)
        for fc in (self.fc1, self.fc2):
            nn.init.xavier_uniform_(fc.weight)
            nn.init.zeros_(fc.bias)

    def forward(self, x):
        return self.fc2(F.silu(self.fc1(x)))


def multiscale(patches, scales):
    """Patch tokens (B, N, C) of a square grid -> (B, sum(scales), C): for each token count n in `scales`
    the grid average-pooled to sqrt(n) x sqrt(n) (the full grid passes unchanged), flattened row-major,
    concatenated (ADEM-VL's Avg2dSampler; '--down_sample_num 256 64' are token counts, not widths)."""
    B, N, C = patches.shape
    g = math.isqrt(N)
    if g * g != N:
        raise ValueError(f"ADEM-VL multiscale prompts need a square patch grid, got {N} patch tokens")
    grid = patches.transpose(1, 2).reshape(B, C, g, g)  # (B, C, g, g)
    out = []
    for n in scales:
        s = math.isqrt(n)
        if s * s != n or s > g:
            raise ValueError(f"adem_scales entry {n}: need a square number of at most {N} tokens "
                             f"(the tower's {g}x{g} patch grid)")
        x = grid if s == g else F.adaptive_avg_pool2d(grid, s)  # (B, C, s, s)
        out.append(x.flatten(2).transpose(1, 2))  # (B, s*s, C)
    return torch.cat(out, dim=1)  # (B, sum(scales), C)


class ADEMFusion(nn.Module):
    """The learned visual side of ADEM-VL: returns the projected CLS token (B, 1, d) for the "Image: "
    slot and media = {'adem_keys': SiLU(V + e1), 'adem_values': V + e2}, each (B, N_v, d), N_v = sum(scales).
    Called for text-only batches too (feats=None): their V is 0 but e1 / e2 still act."""

    runs_without_images = True  # VLM.embed calls it for batches without any image (see model.VLM)

    def __init__(self, vis_dim, lm_dim, *, scales=(256, 64), hidden=128, beta=0.01):
        super().__init__()
        self.scales, self.beta = tuple(scales), beta
        n_v = sum(self.scales)
        self.proj = LowRankProjector(vis_dim, hidden, lm_dim)      # official adapter_proj
        self.proj_cls = LowRankProjector(vis_dim, hidden, lm_dim)  # official adapter_proj_cls
        self.e1 = nn.Parameter(torch.randn(1, n_v, lm_dim) * 0.02)  # added to the keys (adapter_emb1)
        self.e2 = nn.Parameter(torch.zeros(1, n_v, lm_dim))         # added to the values (adapter_emb2)

    def n_tokens(self, n_vis):
        return 1  # the CLS token; the multiscale prompts enter through the FFN-side branch, not the sequence

    def forward(self, feats, *, has_image=None, ids=None):
        if feats is None:  # no image in the batch: V = 0
            v = self.e1.new_zeros(ids.shape[0], self.e1.shape[1], self.e1.shape[2])  # (B, N_v, d)
            tokens = None
        else:
            feats = feats.to(self.proj.fc1.weight.dtype)
            if has_image is None:
                has_image = torch.ones(feats.shape[0], dtype=torch.bool, device=feats.device)
            gate = self.beta * has_image.to(feats.dtype)[:, None, None]  # (B, 1, 1): beta * indicator
            v = gate * self.proj(multiscale(feats[:, 1:], self.scales))  # (B, N_v, d)
            tokens = self.proj_cls(feats[:, :1])  # (B, 1, d); not scaled by beta
        return tokens, {'adem_keys': F.silu(v + self.e1), 'adem_values': v + self.e2}


def adaptive_drop(scores, ratio):
    """Zero the floor(ratio * N_v) lowest scores of every row of scores (..., N_v): the threshold is the
    score at that rank of the ascending sort and only scores strictly below it go, so ties at the threshold
    stay (official Adapter.forward; in training and inference alike)."""
    k = int(ratio * scores.shape[-1])
    if k == 0:
        return scores
    tau = scores.sort(dim=-1).values[..., k:k + 1]  # (..., 1)
    return scores.masked_fill(scores < tau, 0.0)


class ADEMCrossAttention(nn.Module):
    """Parameter-free cross-attention for the decoder's `ffn_side` seam: x (B, T, d) = ffn_norm(h) ->
    alpha * drop(SiLU(x) keys^T) values (official Adapter with hidden_dim=0, scaled by `s` = alpha)."""

    def __init__(self, *, alpha=0.1, drop_ratio=0.1):
        super().__init__()
        if not 0.0 <= drop_ratio < 1.0:
            raise ValueError(f"adem_drop_ratio must be in [0, 1), got {drop_ratio}")
        self.alpha, self.drop_ratio = alpha, drop_ratio

    def forward(self, x, ctx):
        if 'adem_keys' not in ctx.media:
            raise ValueError("ADEM-VL's FFN-side branch needs the media of ADEMFusion: run the VLM, not its lm alone")
        keys, values = ctx.media['adem_keys'].to(x.dtype), ctx.media['adem_values'].to(x.dtype)  # (B, N_v, d)
        s = F.silu(x) @ keys.transpose(1, 2)  # (B, T, N_v)
        s = adaptive_drop(s, self.drop_ratio)
        return self.alpha * (s @ values)  # (B, T, d)

    def extra_repr(self):
        return f"alpha={self.alpha}, drop_ratio={self.drop_ratio}"


class ADEMViTAdapter(nn.Module):
    """Bottleneck in parallel with a CLIP block's MLP, for the ViTBlock `adapters` seam: h = ln_2(x) ->
    scale * fc2(Dropout(0.1)(GELU(fc1 h))); fc1 dim -> hidden (default init), fc2 hidden -> dim (zeros), no
    biases, scale 0.1 hard-coded (official set_Clip_Adapter with --adapter_dim 12)."""

    def __init__(self, dim, hidden=12, *, scale=0.1):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=False)
        self.fc2 = nn.Linear(hidden, dim, bias=False)
        nn.init.zeros_(self.fc2.weight)
        self.drop = nn.Dropout(0.1)
        self.scale = scale

    def forward(self, h):
        return self.scale * self.fc2(self.drop(F.gelu(self.fc1(h))))


def attach_adem(vision, lm, *, alpha=0.1, drop_ratio=0.1, adapter_dim=12):
    """Put ADEM-VL's modules into the seams: an ADEMViTAdapter in every tower block (adapter_dim 0: none)
    and one parameter-free ADEMCrossAttention in every decoder block's ffn_side. Returns nothing."""
    w = vision.patch.weight
    if adapter_dim > 0:
        for blk in vision.blocks:
            blk.adapters.append(ADEMViTAdapter(vision.cfg.dim, adapter_dim).to(device=w.device, dtype=w.dtype))
    for blk in lm.blocks:
        blk.ffn_side.append(ADEMCrossAttention(alpha=alpha, drop_ratio=drop_ratio))

# -----------------------------------------------------------------------------
# Building a VLM from a config dict (train.py, eval.py and sample.py all go through here)

FUSIONS = ('llava', 'mmca', 'adem')


def build_vlm(cfg, dtype=torch.float32, device='cpu'):
    """cfg keys: init_vision, init_lm (hub id or folder), fusion, vision_layer, vision_norm, vision_feature,
    lora_r / lora_alpha / lora_dropout / lora_targets (r = 0: no LoRA), trainable (name patterns), and each
    method's own keys (train.py's globals document them)."""
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
    elif name == 'adem':
        if not vision.cfg.cls_token:
            raise ValueError("fusion 'adem' needs a vision tower with a CLS token (CLIP, DINOv2), not SigLIP")
        fusion = ADEMFusion(vision.cfg.dim, lm.cfg.dim, scales=cfg['adem_scales'], hidden=cfg['adem_hidden'],
                            beta=cfg['adem_beta'])
        attach_adem(vision, lm, alpha=cfg['adem_alpha'], drop_ratio=cfg['adem_drop_ratio'],
                    adapter_dim=cfg['adem_adapter_dim'])
    else:
        raise ValueError(f"unknown fusion {name!r}; one of: {', '.join(FUSIONS)}")
    model = VLM(vision, lm, fusion.to(device=device, dtype=dtype), vision_layer=cfg['vision_layer'],
                vision_norm=cfg['vision_norm'])
    if cfg.get('lora_r', 0):
        peft.apply_lora(model.lm, targets=cfg['lora_targets'], r=cfg['lora_r'], alpha=cfg['lora_alpha'],
                        dropout=cfg['lora_dropout'])
    peft.mark_trainable(model, cfg['trainable'])
    return model
