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

from model import ViT, Decoder, VLM, load_weights, read_config, resolve
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
# BLIP-2 Q-Former, and MiniGPT-4 (the same Q-Former, frozen, with one trainable projection)
# Li et al. 2023, "BLIP-2: Bootstrapping Language-Image Pre-training with Frozen Image Encoders and Large
# Language Models" (arXiv 2301.12597). Reference: salesforce/LAVIS lavis/models/blip2_models/blip2.py
# (init_Qformer, ln_vision), Qformer.py (BertLayer: crossattention, intermediate_query / output_query),
# blip2_opt.py (stage 2); parity reference: transformers models/blip_2/modeling_blip_2.py (Blip2QFormerModel).
# Zhu et al. 2023, "MiniGPT-4" (arXiv 2304.10592). Reference: Vision-CAIR/MiniGPT-4 minigpt4/models/mini_gpt4.py.


class QFormerAttention(nn.Module):
    """One BERT post-LayerNorm attention sub-layer: x <- LN(x + drop(o(attn(q(x), k(m), v(m))))), with
    m = x (self-attention) or the image features (cross-attention, kv_dim = the tower's width)."""

    def __init__(self, dim, n_heads, kv_dim=None, *, eps=1e-12):
        super().__init__()
        self.n_heads = n_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(kv_dim or dim, dim)
        self.v = nn.Linear(kv_dim or dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, x, mem=None, p=0.0):
        mem = x if mem is None else mem
        B, T, D = x.shape
        S, nh = mem.shape[1], self.n_heads
        q = self.q(x).view(B, T, nh, D // nh).transpose(1, 2)    # (B, nh, T, hd)
        k = self.k(mem).view(B, S, nh, D // nh).transpose(1, 2)  # (B, nh, S, hd)
        v = self.v(mem).view(B, S, nh, D // nh).transpose(1, 2)  # (B, nh, S, hd)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=p)  # no mask: all queries, all image tokens
        y = y.transpose(1, 2).reshape(B, T, D)  # (B, T, D)
        return self.norm(x + F.dropout(self.o(y), p, self.training))


class QFormerLayer(nn.Module):
    """Self-attention over the queries, cross-attention to the image (only in layers that have one), then the
    queries' own FFN (LAVIS intermediate_query / output_query: Linear -> GELU -> Linear, post-LN)."""

    def __init__(self, dim, n_heads, mlp_dim, *, vis_dim=None, eps=1e-12):
        super().__init__()
        self.attn = QFormerAttention(dim, n_heads, eps=eps)
        self.xattn = QFormerAttention(dim, n_heads, vis_dim, eps=eps) if vis_dim else None
        self.fc1 = nn.Linear(dim, mlp_dim)
        self.fc2 = nn.Linear(mlp_dim, dim)
        self.norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, x, img, p=0.0):
        x = self.attn(x, p=p)
        if self.xattn is not None:
            x = self.xattn(x, img, p=p)
        return self.norm(x + F.dropout(self.fc2(F.gelu(self.fc1(x))), p, self.training))


class QFormer(nn.Module):
    """The query path of BLIP-2's Querying Transformer: `n_queries` learned queries (1, Q, dim), init
    N(0, 0.02^2), through a LayerNorm (LAVIS: BertEmbeddings.LayerNorm, applied to the query embeddings when
    no text is given; HF: qformer.layernorm) and `n_layers` BERT layers; layer i cross-attends to the image
    iff i % cross_attention_freq == 0 (0, 2, ..., 10 in BLIP-2). BERT-base sizes by default (768 wide, 12
    heads, FFN 3072, GELU, LayerNorm eps 1e-12, dropout 0.1 on attention weights and sub-layer outputs).
    Dropout is active only while some Q-Former parameter trains: a frozen Q-Former (MiniGPT-4) runs as in
    eval mode, as MiniGPT-4's `disabled_train` keeps it. (B, N, vis_dim) image -> (B, Q, dim)."""

    def __init__(self, vis_dim, *, dim=768, n_layers=12, n_heads=12, n_queries=32, mlp_dim=None,
                 cross_attention_freq=2, eps=1e-12, dropout=0.1):
        super().__init__()
        if dim % n_heads:
            raise ValueError(f"Q-Former width {dim} is not a multiple of its {n_heads} heads (qformer_dim / qformer_heads)")
        self.cross_attention_freq, self.dropout = cross_attention_freq, dropout
        self.query = nn.Parameter(torch.empty(1, n_queries, dim))
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.layers = nn.ModuleList(
            QFormerLayer(dim, n_heads, mlp_dim or 4 * dim, vis_dim=vis_dim if i % cross_attention_freq == 0 else None,
                         eps=eps) for i in range(n_layers))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        """BERT's init (Linear weights and the queries N(0, 0.02^2), biases 0, LayerNorms 1 / 0). LAVIS starts
        the self-attention and FFN from bert-base-uncased and trains stage 1 before stage 2; here a Q-Former
        without qformer_init starts from this init instead (see QFormerFusion)."""
        nn.init.normal_(self.query, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, img):
        train = self.training and any(q.requires_grad for q in self.parameters())
        p = self.dropout if train else 0.0
        x = self.query.expand(img.shape[0], -1, -1)  # (B, Q, dim)
        x = F.dropout(self.norm(x), p, train)
        for layer in self.layers:
            x = layer(x, img, p)
        return x  # (B, Q, dim)


class QFormerFusion(nn.Module):
    """BLIP-2 stage 2 (LAVIS blip2_opt.py): tower features -> ln_vision (a trainable LayerNorm; LAVIS puts it
    on EVA ViT-g's 39th of 40 blocks) -> Q-Former -> Linear(dim -> d_LM) (LAVIS opt_proj / t5_proj, HF
    language_projection, PyTorch's default init) -> Q tokens that replace the Q "<image>" placeholders.
    BLIP-2 prepends them to the text ([queries][BOS] caption), which is this with a prompt that starts with
    "<image>", up to the BOS (here [BOS][queries] ...). The Q-Former reads every token the tower gives (CLS
    included, as BLIP-2's 257; `vision_feature` does not apply); the BLIP-2 recipe takes CLIP ViT-L/14 at
    vision_layer -2 without the final norm, LAVIS's clip_L (23 of 24 blocks) + ln_vision.
    - BLIP-2 stage 2 trains all of this module (ln_vision, queries, Q-Former, proj); tower and LLM frozen.
    - MiniGPT-4 (mini_gpt4.py): a pretrained BLIP-2 Q-Former, its queries and ln_vision frozen (loaded from
      LAVIS's blip2_pretrained_flant5xxl.pth, HF Salesforce/blip2-flan-t5-xxl), and only `proj` trains
      (llama_proj: Q-Former output 768 -> LLaMA width; 3.1M parameters for a 4096-wide LLM).
    Left out: the Q-Former's text branch (word / position embeddings, the text FFN `intermediate` / `output`,
    the MLM head) and the stage-1 losses that use it (ITC, ITM, ITG). Stage 2 and MiniGPT-4 never give text
    to the Q-Former (blip2_opt.py and mini_gpt4.py set those modules to None), and stage 1 needs BERT's
    tokenizer and large-batch contrastive training; start from a stage-1 Q-Former with load_blip2 instead
    (HF Salesforce/blip2-itm-vit-g is BLIP-2's stage-1 model). Without one, the Q-Former starts from BERT's
    random init, not from bert-base + stage 1: expect it to need more data than BLIP-2's stage 2."""

    def __init__(self, vis_dim, lm_dim, *, dim=768, n_layers=12, n_heads=12, n_queries=32, mlp_dim=None,
                 cross_attention_freq=2, eps=1e-12, vis_eps=1e-5, dropout=0.1):
        super().__init__()
        self.ln_vision = nn.LayerNorm(vis_dim, eps=vis_eps)  # LAVIS: nn.LayerNorm's default eps
        self.qformer = QFormer(vis_dim, dim=dim, n_layers=n_layers, n_heads=n_heads, n_queries=n_queries,
                               mlp_dim=mlp_dim, cross_attention_freq=cross_attention_freq, eps=eps, dropout=dropout)
        self.proj = nn.Linear(dim, lm_dim)

    def n_tokens(self, n_vis):
        return self.qformer.query.shape[1]  # the queries, whatever the tower's token count

    def forward(self, feats, *, has_image=None, ids=None):
        return self.proj(self.qformer(self.ln_vision(feats))), {}  # (B, N, Dv) -> (B, Q, d_LM)


# Loading a pretrained Q-Former from a Hugging Face Blip2 checkpoint (Blip2ForConditionalGeneration,
# Blip2Model, Blip2ForImageTextRetrieval). HF's conversion script (models/blip_2/convert_blip_2_original_to_pytorch.py)
# renames LAVIS's ln_vision to vision_model.post_layernorm and Qformer.bert.embeddings.LayerNorm to
# qformer.layernorm. Widths: the cross-attention keys / values and ln_vision are as wide as the checkpoint's
# tower, 1408 (EVA ViT-g/14) in every public BLIP-2, which our ViT does not implement. So a BLIP-2 Q-Former
# loads on a tower of that width only: CLIP ViT-L/14 (1024), DINOv2 and SigLIP towers cannot take it (the error
# says so); OpenCLIP ViT-g/14 (laion/CLIP-ViT-g-14-laion2B-s12B-b42K: 1408 wide, 40 blocks, 257 tokens at 224 px)
# fits every shape, but its features are not EVA-CLIP's, so the loaded Q-Former is a starting point to train
# (the BLIP-2 recipe), not a frozen drop-in (MiniGPT-4's recipe assumes the EVA tower). language_projection maps
# into OPT's / FlanT5's embeddings, never into one of our LLMs, so build_vlm leaves it out (projection=False).
# A hub id downloads the whole checkpoint (LLM included); a folder with config.json and a safetensors file that
# holds only query_tokens, qformer.* and vision_model.post_layernorm.* is enough.

BLIP2_IGNORE = ('vision_model.', 'language_model.', 'embeddings.', 'vision_projection.', 'text_projection.', 'itm_head.')


def blip2_key_map(n_layers, cross_attention_freq=2, *, projection=False):
    """HF Blip2 name -> our name inside QFormerFusion."""
    m = {'query_tokens': 'qformer.query',
         'qformer.layernorm.weight': 'qformer.norm.weight', 'qformer.layernorm.bias': 'qformer.norm.bias',
         'vision_model.post_layernorm.weight': 'ln_vision.weight', 'vision_model.post_layernorm.bias': 'ln_vision.bias'}
    if projection:
        m.update({'language_projection.weight': 'proj.weight', 'language_projection.bias': 'proj.bias'})
    layer = {'attention.attention.query': 'attn.q', 'attention.attention.key': 'attn.k',
             'attention.attention.value': 'attn.v', 'attention.output.dense': 'attn.o',
             'attention.output.LayerNorm': 'attn.norm',
             'intermediate_query.dense': 'fc1', 'output_query.dense': 'fc2', 'output_query.LayerNorm': 'norm'}
    cross = {'crossattention.attention.query': 'xattn.q', 'crossattention.attention.key': 'xattn.k',
             'crossattention.attention.value': 'xattn.v', 'crossattention.output.dense': 'xattn.o',
             'crossattention.output.LayerNorm': 'xattn.norm'}
    for i in range(n_layers):
        for hf, ours in (layer | (cross if i % cross_attention_freq == 0 else {})).items():
            for w in ('weight', 'bias'):
                m[f'qformer.encoder.layer.{i}.{hf}.{w}'] = f'qformer.layers.{i}.{ours}.{w}'
    return m


def blip2_config(name_or_path):
    """QFormerFusion's keyword arguments (all but lm_dim) from a HF Blip2 config.json (HF's defaults where a
    field is absent)."""
    d = read_config(resolve(name_or_path))
    if d.get('model_type') != 'blip-2':
        raise ValueError(f"qformer_init {name_or_path}: model_type {d.get('model_type')!r}, expected 'blip-2' "
                         f"(a Hugging Face Blip2 checkpoint such as Salesforce/blip2-opt-2.7b)")
    q, v = d.get('qformer_config') or {}, d.get('vision_config') or {}
    if q.get('hidden_act', 'gelu') != 'gelu':
        raise ValueError(f"qformer_init {name_or_path}: Q-Former activation {q['hidden_act']!r}, expected 'gelu'")
    return dict(vis_dim=v.get('hidden_size', 1408), dim=q.get('hidden_size', 768), n_layers=q.get('num_hidden_layers', 12),
                n_heads=q.get('num_attention_heads', 12), n_queries=d.get('num_query_tokens', 32),
                mlp_dim=q.get('intermediate_size', 3072), cross_attention_freq=q.get('cross_attention_frequency', 2),
                eps=q.get('layer_norm_eps', 1e-12), vis_eps=v.get('layer_norm_eps', 1e-6))


def load_blip2(fusion, name_or_path, *, projection=False, dtype=torch.float32, device='cpu'):
    """Copy a HF Blip2 checkpoint's query tokens, Q-Former and ln_vision (+ language_projection when
    projection=True) into `fusion` (a QFormerFusion of the checkpoint's shape, see blip2_config). Every one of
    those keys must be there with the right shape; the tower, the LLM and the text branch are skipped."""
    n = len(fusion.qformer.layers)
    parts = {'ln_vision': fusion.ln_vision, 'qformer': fusion.qformer} | ({'proj': fusion.proj} if projection else {})
    text_ffn = tuple(f'qformer.encoder.layer.{i}.{name}.' for i in range(n) for name in ('intermediate', 'output'))
    load_weights(nn.ModuleDict(parts), resolve(name_or_path), blip2_key_map(n, fusion.qformer.cross_attention_freq,
                 projection=projection), dtype=dtype, device=device,
                 ignore=BLIP2_IGNORE + text_ffn + (() if projection else ('language_projection.',)))
    return fusion


def qformer_fusion(cfg, vis_dim, lm_dim):
    """QFormerFusion for a train.py config: the qformer_* sizes, or with qformer_init a Blip2 checkpoint's
    (which must agree with them) with its weights loaded."""
    size = dict(dim=cfg['qformer_dim'], n_layers=cfg['qformer_layers'], n_heads=cfg['qformer_heads'],
                n_queries=cfg['qformer_queries'])
    if not cfg['qformer_init']:
        return QFormerFusion(vis_dim, lm_dim, **size)
    kw = blip2_config(cfg['qformer_init'])
    keys = dict(dim='qformer_dim', n_layers='qformer_layers', n_heads='qformer_heads', n_queries='qformer_queries')
    wrong = [f"{keys[k]}={v} but the checkpoint has {kw[k]}" for k, v in size.items() if kw[k] != v]
    if wrong:
        raise ValueError(f"qformer_init {cfg['qformer_init']}: " + '; '.join(wrong))
    if kw['vis_dim'] != vis_dim:
        raise ValueError(f"qformer_init {cfg['qformer_init']} cross-attends to {kw['vis_dim']}-wide image features "
                         f"(1408: EVA ViT-g), but the tower init_vision={cfg['init_vision']} is {vis_dim} wide; a "
                         f"pretrained Q-Former needs a tower of its width (or leave qformer_init empty)")
    return load_blip2(QFormerFusion(lm_dim=lm_dim, **kw), cfg['qformer_init'])

# -----------------------------------------------------------------------------
# Building a VLM from a config dict (train.py, eval.py and sample.py all go through here)


def build_vlm(cfg, dtype=torch.float32, device='cpu'):
    """cfg keys: init_vision, init_lm (hub id or folder), fusion, vision_layer, vision_norm, vision_feature,
    qformer_init / qformer_dim / qformer_layers / qformer_heads / qformer_queries (fusion 'qformer'),
    lora_r / lora_alpha / lora_dropout / lora_targets (r = 0: no LoRA), trainable (name patterns)."""
    vision = ViT.from_pretrained(cfg['init_vision'], dtype=dtype, device=device)
    lm = Decoder.from_pretrained(cfg['init_lm'], dtype=dtype, device=device)
    name = cfg['fusion']
    if name == 'llava':
        select = cfg['vision_feature'] if vision.cfg.cls_token else 'cls_patch'  # SigLIP: no CLS, all tokens are patches
        fusion = LLaVAProjector(vision.cfg.dim, lm.cfg.dim, select=select)
    elif name == 'qformer':
        fusion = qformer_fusion(cfg, vision.cfg.dim, lm.cfg.dim)
    else:
        raise ValueError(f"unknown fusion {name!r}; one of: llava, qformer")
    model = VLM(vision, lm, fusion.to(device=device, dtype=dtype), vision_layer=cfg['vision_layer'],
                vision_norm=cfg['vision_norm'])
    if cfg.get('lora_r', 0):
        peft.apply_lora(model.lm, targets=cfg['lora_targets'], r=cfg['lora_r'], alpha=cfg['lora_alpha'],
                        dropout=cfg['lora_dropout'])
    peft.mark_trainable(model, cfg['trainable'])
    return model
