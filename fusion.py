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

from model import ViT, Decoder, VLM
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
    else:
        raise ValueError(f"unknown fusion {name!r}; one of: llava")
    model = VLM(vision, lm, fusion.to(device=device, dtype=dtype), vision_layer=cfg['vision_layer'],
                vision_norm=cfg['vision_norm'])
    if cfg.get('lora_r', 0):
        peft.apply_lora(model.lm, targets=cfg['lora_targets'], r=cfg['lora_r'], alpha=cfg['lora_alpha'],
                        dropout=cfg['lora_dropout'])
    peft.mark_trainable(model, cfg['trainable'])
    return model
