"""
Fusion methods: how visual features reach the language model. One self-contained section each.

Every fusion is an nn.Module called as `fusion(feats, has_image=, ids=)` on the vision tower's output
feats (B, N, Dv) (has_image (B,) bool, ids (B, T) the input ids) and returning (tokens, media):
  - tokens (B, n_tokens, d_lm) or None: spliced into the token embeddings at the IMAGE_TOKEN
    placeholders (the data expands each '<image>' into `n_tokens(N)` placeholders);
  - media: a dict the modules the fusion placed in the decoder's seams read from ctx.media.
Several images per sample: VLM.embed flattens feats (B, M, N, Dv) / has_image (B, M) to (B*M, N, Dv) /
(B*M,), image j of row b at b*M + j, so feats.shape[0] // ids.shape[0] = M (1 for single-image batches).
A fusion that works image by image (LLaVA) needs nothing more; one that keeps per-row state (Flamingo) reads M.
`build_vlm(config)` at the bottom is the one place a config line picks a method.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import ViT, Decoder, VLM, IMAGE_TOKEN
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
# Flamingo: Perceiver Resampler + gated cross-attention dense blocks
# Alayrac et al. 2022, "Flamingo: a Visual Language Model for Few-Shot Learning" (arXiv 2204.14198), as
# OpenFlamingo builds it (Awadalla et al. 2023, arXiv 2308.01390). Reference: mlfoundations/open_flamingo
# open_flamingo/src/helpers.py (PerceiverResampler, MaskedCrossAttention, GatedCrossAttentionBlock),
# src/flamingo.py and src/flamingo_lm.py (media locations, cached media during generation, where the blocks go),
# src/factory.py (special tokens, what trains), train/data.py and train/train_utils.py (text format, labels,
# gradient masking, weight decay); lucidrains/flamingo-pytorch flamingo_pytorch.py for comparison.
#
#   each image ──ViT──► patch tokens (N, Dv) ──PerceiverResampler──► latents (64, Dv)
#                                                                           │ k, v
#   text x ──► [GatedCrossAttentionBlock: x += tanh(a_attn) XAttn(LN(x), latents of the latest <image>)
#                                          x += tanh(a_ff) FF(x)]  ──► LM layer ──► ...
#              (in blk.pre of every n-th layer; the LM, the tower and the pretrained vocabulary stay frozen)
#
# Tokens and the vocabulary. OpenFlamingo adds "<image>" and "<|endofchunk|>" to the tokenizer and resizes the
# embeddings; its text reads "<image>caption<|endofchunk|>" (LAION) or "text<image>sentence<|endofchunk|>
# <image>sentence<|endofchunk|>" (MMC4). Here the pretrained vocabulary stays as it is (model.py loads HF
# weights unchanged):
# - "<image>" is one IMAGE_TOKEN slot per image (n_tokens = 1) that VLM.embed fills with a learned vector,
#   `Flamingo.image_embed` (init N(0, 0.02): what HF's resize_token_embeddings gave OpenFlamingo's new rows). The
#   image itself reaches the LM only through cross-attention, never as input tokens.
# - "<|endofchunk|>" is the LM's own eos (data.py maps the string to tok.eos_id). It has to be an existing
#   row: it is a label (the model learns to end a chunk) and generation stops on it, and only tokens in the
#   vocabulary can be predicted without resizing the head. eos already means "this text ends here, new text
#   may follow", which is eoc's role, and eval.py already stops generating on it.
# - What trains mirrors OpenFlamingo's gradient masking (all input-embedding rows trainable, gradients zeroed
#   except for the two new rows): our one new row, image_embed, is a parameter of its own, so the LM's rows never
#   change. Not trained here: eoc's input row (d numbers in OpenFlamingo), because that row is eos's and
#   training it would change the frozen LM on text-only input.
#
# Media masking (only_attend_immediate_media=True, OpenFlamingo's and the paper's default): text_time =
# cumsum(ids == <image>) along the row; a token attends only to the 64 latents of image number text_time (the
# latest <image> at or before it, itself included); tokens before the first <image> get a zero attention output
# (OpenFlamingo zeroes their attention weights after the softmax; the output projection has no bias, so the
# result is 0). The media index is computed once per forward from `ids` (the fusion's forward) and kept in
# media; in KV-cache decode steps the new tokens carry no <image> and attend to the row's last image
# (flamingo_lm.py: use_cached_media). Rows or batches without any image: the cross-attention adds nothing, the
# gated FF still runs, exactly as for OpenFlamingo's tokens before the first image.
#
# Differences from the paper / lucidrains, following OpenFlamingo: no media-time (or frame) embeddings in the
# resampler (OpenFlamingo passes max_num_media=None, so images are told apart only by the masking; lucidrains
# adds learned media position embeddings, the paper temporal ones for video frames); one vision-width latent
# space with no projection before the resampler; the gated blocks run *before* layers idx with
# (idx + 1) % n == 0 (lucidrains: after layers with idx % n == 0). Vision features: the last layer's patch
# tokens without the CLS token (open_clip's output_tokens; the open_clip of OpenFlamingo's time returned them
# before ln_post: vision_layer=-1, vision_norm=False).
# Not implemented: attending to all previous images (only_attend_immediate_media=False), v1's
# use_media_placement_augmentation, video frames. Weight decay: OpenFlamingo decays only the gated
# cross-attention blocks (gates and norms included), not the resampler nor the embeddings; `decay_patterns`
# tells train.py so.
#
# Several images per sample (model.VLM): the fusion gets feats (B*M, N, Dv) with has_image (B*M,), M =
# feats.shape[0] // ids.shape[0]; the k-th "<image>" of a row goes with the row's k-th present image.
#
# Trainable parameters (computed from the shapes), CLIP ViT-L/14 (Dv 1024) + LLaMA-7B (d 4096, 32 layers),
# n = 4 (OpenFlamingo-9B): resampler 63,019,008 + 8 gated blocks x 139,476,994 + image_embed 4,096 =
# 1,178,839,056 (tests/test_fusion_flamingo.py). OpenFlamingo's factory prints 1,309,919,248 for the same
# shapes: it counts the whole input-embedding matrix (32,003 rows x 4096 with <image>, eoc and <PAD>) as
# trainable and masks the gradients of all but two rows.


class FeedForward(nn.Module):
    """LayerNorm -> Linear(dim, mult*dim) -> GELU -> Linear(mult*dim, dim), no biases (helpers.py FeedForward)."""

    def __init__(self, dim, *, mult=4):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, dim * mult, bias=False)
        self.fc2 = nn.Linear(dim * mult, dim, bias=False)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(self.norm(x))))


class PerceiverAttention(nn.Module):
    """Latents attend to [media; latents]: LayerNorm on each, q from the latents, k and v from the concatenation,
    softmax(q k^T / sqrt(dim_head)) v, no biases."""

    def __init__(self, dim, *, dim_head=64, heads=8):
        super().__init__()
        self.heads, self.dim_head = heads, dim_head
        self.norm_media = nn.LayerNorm(dim)
        self.norm_latents = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, heads * dim_head, bias=False)
        self.to_kv = nn.Linear(dim, 2 * heads * dim_head, bias=False)
        self.to_out = nn.Linear(heads * dim_head, dim, bias=False)

    def forward(self, x, latents):
        """x (B, N, D) media tokens, latents (B, n, D) -> (B, n, D)"""
        B, n, _ = latents.shape
        h, dh = self.heads, self.dim_head
        x, latents = self.norm_media(x), self.norm_latents(latents)
        q = self.to_q(latents).view(B, n, h, dh).transpose(1, 2)  # (B, h, n, dh)
        k, v = self.to_kv(torch.cat([x, latents], dim=1)).chunk(2, dim=-1)  # (B, N + n, h*dh) each
        k, v = (t.view(B, -1, h, dh).transpose(1, 2) for t in (k, v))  # (B, h, N + n, dh)
        out = F.scaled_dot_product_attention(q, k, v)  # scale dim_head^-0.5
        return self.to_out(out.transpose(1, 2).reshape(B, n, h * dh))


class PerceiverResampler(nn.Module):
    """A fixed number of learned latents (randn init) cross-attend to one image's tokens, `depth` times, each
    layer latents += attn(media, latents); latents += FF(latents); then a final LayerNorm. Any number of input
    tokens -> num_latents tokens of the same width."""

    def __init__(self, dim, *, depth=6, dim_head=64, heads=8, num_latents=64, ff_mult=4):
        super().__init__()
        self.latents = nn.Parameter(torch.randn(num_latents, dim))
        self.layers = nn.ModuleList(nn.ModuleList([PerceiverAttention(dim, dim_head=dim_head, heads=heads),
                                                   FeedForward(dim, mult=ff_mult)]) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):
        """x (B, N, D) -> (B, num_latents, D)"""
        latents = self.latents.expand(x.shape[0], -1, -1)  # (B, n, D)
        for attn, ff in self.layers:
            latents = latents + attn(x, latents)
            latents = latents + ff(latents)
        return self.norm(latents)


class MaskedCrossAttention(nn.Module):
    """Text queries (d -> heads x dim_head) attend to the latents of one image each (Dv -> k, v), no biases.
    `image` (B, T) says which image of the row each token sees (-1: none, output 0)."""

    def __init__(self, dim, dim_visual, *, dim_head=64, heads=8):
        super().__init__()
        self.heads, self.dim_head = heads, dim_head
        self.norm = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, heads * dim_head, bias=False)
        self.to_kv = nn.Linear(dim_visual, 2 * heads * dim_head, bias=False)
        self.to_out = nn.Linear(heads * dim_head, dim, bias=False)

    def forward(self, x, media, image):
        """x (B, T, d), media (B, M, n, Dv) latents of the row's images in order, image (B, T) long -> (B, T, d)"""
        B, T, _ = x.shape
        M, n = media.shape[1:3]
        h, dh = self.heads, self.dim_head
        q = self.to_q(self.norm(x)).view(B, T, h, dh).transpose(1, 2)  # (B, h, T, dh)
        k, v = self.to_kv(media.flatten(1, 2)).chunk(2, dim=-1)  # (B, M*n, h*dh) each
        k, v = (t.view(B, M * n, h, dh).transpose(1, 2) for t in (k, v))  # (B, h, M*n, dh)
        key_image = torch.arange(M * n, device=x.device) // n  # (M*n,) the image each key belongs to
        none = image < 0  # (B, T) tokens before the row's first image
        allowed = (key_image == image[..., None]) | none[..., None]  # (B, T, M*n); `none` rows: any, zeroed below
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None])  # (B, h, T, dh)
        out = out.masked_fill(none[:, None, :, None], 0.0)
        return self.to_out(out.transpose(1, 2).reshape(B, T, h * dh))


class GatedCrossAttentionBlock(nn.Module):
    """GATED XATTN-DENSE, for a decoder block's `pre` seam (runs before the LM layer):
        x <- x + tanh(attn_gate) * MaskedCrossAttention(LN(x), media)
        x <- x + tanh(ff_gate) * FF(x)
    Both gates are scalars initialised at 0, so the frozen LM is unchanged at step 0."""

    def __init__(self, dim, dim_visual, *, dim_head=64, heads=8, ff_mult=4):
        super().__init__()
        self.attn = MaskedCrossAttention(dim, dim_visual, dim_head=dim_head, heads=heads)
        self.attn_gate = nn.Parameter(torch.zeros(1))
        self.ff = FeedForward(dim, mult=ff_mult)
        self.ff_gate = nn.Parameter(torch.zeros(1))

    def forward(self, x, ctx):
        media = ctx.media
        if 'flamingo_latents' in media:
            if ctx.cache is None or ctx.cache.pos == 0:  # full forward or prefill: the index computed from ids
                image = media['flamingo_image']  # (B, T)
                if image.shape != x.shape[:2]:
                    raise ValueError(f"Flamingo media index {tuple(image.shape)} does not match the input "
                                     f"{tuple(x.shape[:2])}: run the fusion on these ids")
            else:  # decode step with cached media: new tokens attend to the row's last image
                image = media['flamingo_last'][:, None].expand(-1, x.shape[1])  # (B, T_new)
            x = x + (self.attn_gate.tanh() * self.attn(x, media['flamingo_latents'], image)).to(x.dtype)
        return x + (self.ff_gate.tanh() * self.ff(x)).to(x.dtype)


class Flamingo(nn.Module):
    """The input side of Flamingo: resample every image to `num_latents` tokens and tell each text token which
    image it may see. Returns (tokens, media): tokens (B*M, 1, d) the learned "<image>" embedding for the
    IMAGE_TOKEN slots; media = {'flamingo_latents': (B, M, n, Dv) the row's images in order,
    'flamingo_image': (B, T) the image index of every token (-1 before the first), 'flamingo_last': (B,)}.
    The gated blocks that read media are made by `add_gated_cross_attention`. drop_cls: the tower has a CLS
    token that is not a patch (CLIP, DINOv2)."""

    decay_patterns = ('.pre.',)  # train.py: weight decay on the gated cross-attention blocks only (OpenFlamingo)

    def __init__(self, vis_dim, lm_dim, *, drop_cls=True, num_latents=64, depth=6, heads=8, dim_head=64, ff_mult=4):
        super().__init__()
        self.drop_cls = drop_cls
        self.resampler = PerceiverResampler(vis_dim, depth=depth, dim_head=dim_head, heads=heads,
                                            num_latents=num_latents, ff_mult=ff_mult)
        self.image_embed = nn.Parameter(torch.randn(lm_dim) * 0.02)

    def n_tokens(self, n_vis):
        return 1  # "<image>" is one slot; the image enters through cross-attention

    def forward(self, feats, *, has_image=None, ids=None):
        """feats (B*M, N, Dv): M images per row (image j of row b at b*M + j); has_image (B*M,); ids (B, T)."""
        if ids is None:
            raise ValueError("Flamingo needs the input ids to place the images (VLM.embed passes them)")
        B, BM = ids.shape[0], feats.shape[0]
        if BM % B:
            raise ValueError(f"feats has {BM} images for {B} rows; expected M images per row (B*M)")
        M = BM // B
        if has_image is None:
            has_image = torch.ones(BM, dtype=torch.bool, device=feats.device)
        present = has_image.view(B, M)
        is_image = ids == IMAGE_TOKEN  # (B, T)
        n_img = is_image.sum(1)  # (B,)
        if not torch.equal(n_img, present.sum(1)):
            raise ValueError(f"'<image>' placeholders per row {n_img.tolist()} do not match the images per row "
                             f"{present.sum(1).tolist()}")
        x = feats[:, 1:] if self.drop_cls else feats  # (B*M, N, Dv) patch tokens
        lat = self.resampler(x[has_image])  # (n_present, n, Dv), only the images that exist
        # the k-th <image> of a row sees the row's k-th present image: pack them to the front of each row
        rows, cols = present.nonzero(as_tuple=True)  # row-major, the order of lat
        slot = present.long().cumsum(1)[rows, cols] - 1  # (n_present,)
        latents = lat.new_zeros(B, M, *lat.shape[1:])  # (B, M, n, Dv)
        latents[rows, slot] = lat
        text_time = is_image.long().cumsum(1)  # (B, T) how many <image> so far, this token included
        media = {'flamingo_latents': latents, 'flamingo_image': text_time - 1, 'flamingo_last': n_img - 1}
        return self.image_embed.expand(BM, 1, -1), media


def add_gated_cross_attention(lm, vis_dim, *, every=1, **kw):
    """Append a GatedCrossAttentionBlock to the `pre` seam of the layers idx with (idx + 1) % every == 0
    (OpenFlamingo's placement: every=4 gives layers 3, 7, ..., 31 of a 32-layer LM). Returns their count."""
    if every < 1 or every > len(lm.blocks):
        raise ValueError(f"cross_attn_every_n_layers must be in 1..{len(lm.blocks)} (the LM's layers), not {every}")
    ref = lm.embed.weight
    n = 0
    for idx, blk in enumerate(lm.blocks):
        if (idx + 1) % every == 0:
            blk.pre.append(GatedCrossAttentionBlock(lm.cfg.dim, vis_dim, **kw).to(device=ref.device, dtype=ref.dtype))
            n += 1
    return n

# -----------------------------------------------------------------------------
# Building a VLM from a config dict (train.py, eval.py and sample.py all go through here)


def build_vlm(cfg, dtype=torch.float32, device='cpu'):
    """cfg keys: init_vision, init_lm (hub id or folder), fusion, vision_layer, vision_norm, vision_feature,
    cross_attn_every_n_layers (Flamingo), lora_r / lora_alpha / lora_dropout / lora_targets (r = 0: no LoRA),
    trainable (name patterns)."""
    vision = ViT.from_pretrained(cfg['init_vision'], dtype=dtype, device=device)
    lm = Decoder.from_pretrained(cfg['init_lm'], dtype=dtype, device=device)
    name = cfg['fusion']
    if name == 'llava':
        select = cfg['vision_feature'] if vision.cfg.cls_token else 'cls_patch'  # SigLIP: no CLS, all tokens are patches
        fusion = LLaVAProjector(vision.cfg.dim, lm.cfg.dim, select=select)
    elif name == 'flamingo':
        fusion = Flamingo(vision.cfg.dim, lm.cfg.dim, drop_cls=vision.cfg.cls_token)
        add_gated_cross_attention(lm, vision.cfg.dim, every=cfg['cross_attn_every_n_layers'])
    else:
        raise ValueError(f"unknown fusion {name!r}; one of: llava, flamingo")
    model = VLM(vision, lm, fusion.to(device=device, dtype=dtype), vision_layer=cfg['vision_layer'],
                vision_norm=cfg['vision_norm'])
    if cfg.get('lora_r', 0):
        peft.apply_lora(model.lm, targets=cfg['lora_targets'], r=cfg['lora_r'], alpha=cfg['lora_alpha'],
                        dropout=cfg['lora_dropout'])
    peft.mark_trainable(model, cfg['trainable'])
    if name == 'flamingo' and not any(p.requires_grad for n, p in model.named_parameters() if '.pre.' in n):
        raise ValueError(f"fusion='flamingo' with trainable={cfg['trainable']} freezes the gated cross-attention "
                         f"blocks (lm.blocks.*.pre.*): with their gates at 0 nothing could learn; add '.pre.'")
    return model
