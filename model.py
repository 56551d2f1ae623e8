"""
The backbones, written from scratch in plain PyTorch, and the VLM that joins them.

1. ViT: one vision transformer, configured by flags, that reproduces four public families
   - CLIP ViT (Radford et al. 2021; HF transformers models/clip/modeling_clip.py): class token,
     pre-LayerNorm on the embeddings, quick_gelu, patch conv without bias.
   - DINOv2 (Oquab et al. 2023; HF models/dinov2/modeling_dinov2.py): class token, LayerScale,
     exact GELU, a final LayerNorm on every token.
   - SigLIP (Zhai et al. 2023; HF models/siglip/modeling_siglip.py): no class token, gelu_tanh,
     a final LayerNorm on every token (the attention-pooling head is not used by VLMs; skipped).
   - EVA ViT-g (Fang et al. 2023) as BLIP-2 / InstructBLIP / MiniGPT-4 use it (HF models/blip_2/modeling_blip_2.py
     Blip2VisionModel, instructblip InstructBlipVisionModel; 1408 wide, 39 of EVA's 40 blocks kept by HF's
     conversion): class token, patch conv with bias, exact GELU, fused qkv with q and v biases (k's is 0), the final
     LayerNorm (post_layernorm = LAVIS's ln_vision) on every token.
2. Decoder: one LLaMA-family decoder configured by flags: LLaMA-2 / Vicuna, Mistral (sliding
   window), Qwen2 (q/k/v bias), Gemma (sqrt(d) embedding scale, RMSNorm with (1 + w), GeGLU, tied
   head), SmolLM2 (LLaMA with tied embeddings), MPT (Press et al. 2022 ALiBi instead of RoPE, LayerNorm without bias,
   up-GELU-down MLP, tied head; HF models/mpt/modeling_mpt.py, and MPT-1B's MosaicGPT with QK LayerNorm). GQA, RoPE (rotate-half convention, as HF), a
   preallocated KV cache and `generate()` (greedy / temperature / top-p, beam search as transformers',
   stop tokens, batched left-padded prompts).
3. Loading: `from_pretrained(name_or_path)` for both, from a hub repo id or a local folder, single or
   sharded safetensors, through explicit HF-name -> our-name maps. Every key is consumed and every
   shape checked, or one error names all missing / unexpected / mismatched keys and the files.

The decoder block has empty seams (`pre`, `attn_in`, `ffn_side`) where fusion methods (fusion.py)
plug in; empty ModuleLists add no parameters, no state-dict keys and no cost.
"""

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# -----------------------------------------------------------------------------
# Configs. Plain dataclasses; `from_hf` reads a Hugging Face config.json dict.

VIT_TYPES = ('clip', 'clip_vision_model', 'dinov2', 'siglip', 'siglip_vision_model', 'blip_2_vision_model',
             'instructblip_vision_model')
LM_TYPES = ('llama', 'mistral', 'qwen2', 'gemma', 'mpt', 'mosaic_gpt')


@dataclass
class ViTConfig:
    kind: str = 'clip'              # 'clip' | 'dinov2' | 'siglip' | 'eva' (BLIP-2 / InstructBLIP's EVA ViT-g)
    image_size: int = 224
    patch_size: int = 14
    dim: int = 1024
    n_layers: int = 24
    n_heads: int = 16
    mlp_dim: int = 4096
    norm_eps: float = 1e-5
    act: str = 'quick_gelu'         # 'quick_gelu' (CLIP) | 'gelu' (DINOv2) | 'gelu_tanh' (SigLIP)
    cls_token: bool = True          # SigLIP has none
    pre_norm: bool = False          # CLIP's pre_layrnorm on the embeddings
    patch_bias: bool = False        # DINOv2 and SigLIP patch convs have a bias, CLIP's has not
    layer_scale: bool = False       # DINOv2

    @staticmethod
    def from_hf(d):
        """HF config.json dict -> ViTConfig. Accepts full CLIP/SigLIP configs (uses vision_config)
        and VLM configs that nest one (llava's vision_config)."""
        if 'vision_config' in d and d.get('model_type') not in ('clip_vision_model', 'siglip_vision_model',
                                                                'blip_2_vision_model', 'instructblip_vision_model'):
            d = d['vision_config']
        t = d.get('model_type')
        if t not in VIT_TYPES:
            raise ValueError(f"unknown vision model_type {t!r}; supported: {', '.join(VIT_TYPES)}")
        if t.startswith('clip'):
            act = d.get('hidden_act', 'quick_gelu')
            return ViTConfig(kind='clip', image_size=d.get('image_size', 224), patch_size=d.get('patch_size', 32),
                             dim=d.get('hidden_size', 768), n_layers=d.get('num_hidden_layers', 12),
                             n_heads=d.get('num_attention_heads', 12), mlp_dim=d.get('intermediate_size', 3072),
                             norm_eps=d.get('layer_norm_eps', 1e-5), act=_act_name(act),
                             cls_token=True, pre_norm=True, patch_bias=False, layer_scale=False)
        if t in ('blip_2_vision_model', 'instructblip_vision_model'):
            if not d.get('qkv_bias', True):
                raise ValueError(f"{t} with qkv_bias=false is not supported (every public BLIP-2 / InstructBLIP has it)")
            return ViTConfig(kind='eva', image_size=d.get('image_size', 224), patch_size=d.get('patch_size', 14),
                             dim=d.get('hidden_size', 1408), n_layers=d.get('num_hidden_layers', 39),
                             n_heads=d.get('num_attention_heads', 16), mlp_dim=d.get('intermediate_size', 6144),
                             norm_eps=d.get('layer_norm_eps', 1e-6), act=_act_name(d.get('hidden_act', 'gelu')),
                             cls_token=True, pre_norm=False, patch_bias=True, layer_scale=False)
        if t == 'dinov2':
            if d.get('use_swiglu_ffn'):
                raise ValueError("DINOv2 with use_swiglu_ffn (ViT-g) is not supported")
            dim = d.get('hidden_size', 768)
            return ViTConfig(kind='dinov2', image_size=d.get('image_size', 224), patch_size=d.get('patch_size', 14),
                             dim=dim, n_layers=d.get('num_hidden_layers', 12), n_heads=d.get('num_attention_heads', 12),
                             mlp_dim=int(dim * d.get('mlp_ratio', 4)), norm_eps=d.get('layer_norm_eps', 1e-6),
                             act=_act_name(d.get('hidden_act', 'gelu')), cls_token=True, pre_norm=False,
                             patch_bias=True, layer_scale=True)
        return ViTConfig(kind='siglip', image_size=d.get('image_size', 224), patch_size=d.get('patch_size', 16),
                         dim=d.get('hidden_size', 768), n_layers=d.get('num_hidden_layers', 12),
                         n_heads=d.get('num_attention_heads', 12), mlp_dim=d.get('intermediate_size', 3072),
                         norm_eps=d.get('layer_norm_eps', 1e-6), act=_act_name(d.get('hidden_act', 'gelu_pytorch_tanh')),
                         cls_token=False, pre_norm=False, patch_bias=True, layer_scale=False)


@dataclass
class LMConfig:
    vocab_size: int = 32000
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 32
    head_dim: int = 128
    ffn_dim: int = 11008
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 4096
    act: str = 'silu'               # gate activation: 'silu' (SwiGLU) | 'gelu_tanh' (Gemma's GeGLU)
    qkv_bias: bool = False          # Qwen2; LLaMA's attention_bias puts a bias on q, k, v and o
    o_bias: bool = False
    tie_embeddings: bool = False    # Gemma, SmolLM2
    embed_scale: bool = False       # Gemma multiplies the embeddings by sqrt(dim)
    norm_plus_one: bool = False     # Gemma's RMSNorm scales by (1 + w)
    sliding_window: int = 0         # Mistral v0.1: a key is visible iff 0 <= q - k < window; 0 = off
    alibi: bool = False             # MPT: ALiBi biases instead of RoPE
    alibi_bias_max: float = 8.0     # MPT: slopes 2^(-alibi_bias_max * h / n_heads)
    norm: str = 'rms'               # 'rms' | 'layernorm' (MPT: LayerNorm without bias)
    gated_mlp: bool = True          # False: MPT's up -> GELU -> down
    qk_norm: bool = False           # MPT-1B (MosaicGPT attn_qk_ln): LayerNorm on q and k over the full width
    clip_qkv: float = 0.0           # MPT attn_config.clip_qkv: clamp q, k, v to +-clip; 0 = off
    attn_scale: float = 0.0         # MPT attn_config.softmax_scale; 0 = 1 / sqrt(head_dim)
    layout: str = 'llama'           # checkpoint key names: 'llama' (LLaMA family) | 'mpt' (HF Mpt) | 'mosaic_gpt'
    bos_id: int = 1
    eos_id: int = 2

    @staticmethod
    def from_hf(d):
        """HF config.json dict -> LMConfig. Accepts VLM configs that nest one (llava's text_config)."""
        if 'text_config' in d and d.get('model_type') not in LM_TYPES:
            d = d['text_config']
        t = d.get('model_type')
        if t not in LM_TYPES:
            raise ValueError(f"unknown language model_type {t!r}; supported: {', '.join(LM_TYPES)}")
        if t in ('mpt', 'mosaic_gpt'):
            return LMConfig.from_mpt(d)
        rope = d.get('rope_parameters') or d.get('rope_scaling') or {}  # transformers >= 5 | hub checkpoints
        rtype = rope.get('rope_type', rope.get('type', 'default'))
        if rtype != 'default':
            raise ValueError(f"rope type {rtype!r} is not supported (only plain RoPE)")
        theta = d.get('rope_theta', rope.get('rope_theta', 10000.0))
        n_heads = d['num_attention_heads']
        hd = d.get('head_dim') or d['hidden_size'] // n_heads
        window = d.get('sliding_window') or 0
        if t == 'qwen2':
            if d.get('use_sliding_window'):
                raise ValueError("Qwen2 with use_sliding_window=true is not supported")
            window = 0
        if t == 'llama':
            window = 0
        gemma = t == 'gemma'
        eos = d.get('eos_token_id', 2)
        act = (d.get('hidden_activation') or d.get('hidden_act', 'gelu_pytorch_tanh')) if gemma else d.get('hidden_act', 'silu')
        bias = bool(d.get('attention_bias', False))
        return LMConfig(
            vocab_size=d['vocab_size'], dim=d['hidden_size'], n_layers=d['num_hidden_layers'], n_heads=n_heads,
            n_kv_heads=d.get('num_key_value_heads') or n_heads, head_dim=hd, ffn_dim=d['intermediate_size'],
            norm_eps=d.get('rms_norm_eps', 1e-6), rope_theta=float(theta),
            max_seq_len=d.get('max_position_embeddings', 4096), act=_act_name(act),
            qkv_bias=bias or t == 'qwen2', o_bias=bias,
            tie_embeddings=bool(d.get('tie_word_embeddings', gemma)), embed_scale=gemma, norm_plus_one=gemma,
            sliding_window=window, bos_id=d.get('bos_token_id', 1) or 0,
            eos_id=eos[0] if isinstance(eos, list) else (eos if eos is not None else 2))


    @staticmethod
    def from_mpt(d):
        """MPT (transformers' MptConfig: attn_config dict) and MPT-1B's older MosaicGPT config (attn_* keys at the top
        level, as mosaicml/mpt-1b-redpajama-200b): no biases, LayerNorm without bias, ALiBi, tied head."""
        a = d.get('attn_config') or {}
        get = (lambda k, default: a.get(k, default)) if d['model_type'] == 'mpt' else \
            (lambda k, default: d.get('attn_' + k, d.get(k, default)) if k not in ('alibi', 'alibi_bias_max') else d.get(k, default))
        if not d.get('no_bias', True):
            raise ValueError("MPT with no_bias=false (biases on every Linear and LayerNorm) is not supported")
        if not get('alibi', d['model_type'] == 'mosaic_gpt'):
            raise ValueError("MPT without ALiBi (learned position embeddings) is not supported")
        if d.get('logit_scale') or get('prefix_lm', False) or get('attn_uses_sequence_id', False):
            raise ValueError("MPT with logit_scale / prefix_lm / attn_uses_sequence_id is not supported")
        dim, nh = d['d_model'], d['n_heads']
        return LMConfig(vocab_size=d['vocab_size'], dim=dim, n_layers=d['n_layers'], n_heads=nh, n_kv_heads=nh,
                        head_dim=dim // nh, ffn_dim=int(dim * d.get('expansion_ratio', d.get('mlp_ratio', 4))),
                        norm_eps=d.get('layer_norm_epsilon', 1e-5), max_seq_len=d.get('max_seq_len', 2048), act='gelu',
                        tie_embeddings=True, alibi=True, alibi_bias_max=float(get('alibi_bias_max', 8)), norm='layernorm',
                        gated_mlp=False, qk_norm=bool(get('qk_ln', False)), clip_qkv=float(get('clip_qkv', None) or 0),
                        attn_scale=float(get('softmax_scale', None) or 0), layout=d['model_type'], bos_id=d.get('bos_token_id') or 0,
                        eos_id=d.get('eos_token_id') if d.get('eos_token_id') is not None else 0)


def _act_name(hf_name):
    names = {'quick_gelu': 'quick_gelu', 'gelu': 'gelu', 'gelu_pytorch_tanh': 'gelu_tanh', 'gelu_new': 'gelu_tanh',
             'gelu_fast': 'gelu_tanh', 'silu': 'silu', 'swish': 'silu'}
    if hf_name not in names:
        raise ValueError(f"unsupported activation {hf_name!r}; supported: {', '.join(names)}")
    return names[hf_name]


def run_block(blk, *args, recompute=False):
    """blk(*args); with recompute (activation checkpointing, Chen et al. 2016) the block's activations are not
    kept for the backward but recomputed there, the dropout masks included: the same gradients for less memory."""
    if recompute and torch.is_grad_enabled():
        return checkpoint(blk, *args, use_reentrant=False)
    return blk(*args)


def act_fn(name, x):
    if name == 'quick_gelu':
        return x * torch.sigmoid(1.702 * x)
    if name == 'gelu_tanh':
        return F.gelu(x, approximate='tanh')
    if name == 'gelu':
        return F.gelu(x)
    return F.silu(x)

# -----------------------------------------------------------------------------
# Vision transformer


class ViTBlock(nn.Module):
    """Pre-norm transformer block; DINOv2 adds LayerScale (a learned per-channel gain) on both branches."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        d, self.cfg = cfg.dim, cfg
        self.norm1 = nn.LayerNorm(d, eps=cfg.norm_eps)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.norm2 = nn.LayerNorm(d, eps=cfg.norm_eps)
        self.fc1 = nn.Linear(d, cfg.mlp_dim)
        self.fc2 = nn.Linear(cfg.mlp_dim, d)
        self.ls1 = nn.Parameter(torch.ones(d)) if cfg.layer_scale else None
        self.ls2 = nn.Parameter(torch.ones(d)) if cfg.layer_scale else None
        # seams for adapters in the tower (empty by default)
        self.attn_in = nn.ModuleList()   # a <- f(a) on the normed attention input (LaVIN's router adapters)
        self.adapters = nn.ModuleList()  # x <- x + f(h), in parallel with the MLP on its normed input (ADEM-VL)

    def attn(self, x):
        B, T, D = x.shape
        nh = self.cfg.n_heads
        q, k, v = (f(x).view(B, T, nh, D // nh).transpose(1, 2) for f in (self.q, self.k, self.v))  # (B, nh, T, hd)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.o(y.transpose(1, 2).reshape(B, T, D))  # (B, T, D)

    def forward(self, x):
        a = self.norm1(x)
        for f in self.attn_in:
            a = f(a)
        a = self.attn(a)
        x = x + (a * self.ls1 if self.ls1 is not None else a)
        h = self.norm2(x)
        m = self.fc2(act_fn(self.cfg.act, self.fc1(h)))
        x = x + (m * self.ls2 if self.ls2 is not None else m)
        for f in self.adapters:
            x = x + f(h)
        return x


class ViT(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        self.grid = cfg.image_size // cfg.patch_size  # side of the stored position grid
        n_pos = self.grid ** 2 + int(cfg.cls_token)
        self.patch = nn.Conv2d(3, cfg.dim, cfg.patch_size, cfg.patch_size, bias=cfg.patch_bias)
        self.cls = nn.Parameter(torch.zeros(1, 1, cfg.dim)) if cfg.cls_token else None
        self.pos = nn.Parameter(torch.zeros(1, n_pos, cfg.dim))
        self.pre_norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps) if cfg.pre_norm else None
        self.blocks = nn.ModuleList(ViTBlock(cfg) for _ in range(cfg.n_layers))
        self.grad_checkpoint = False  # recompute each block's activations in the backward (train.py's key)
        # CLIP: post_layernorm (HF applies it to the pooled CLS only); DINOv2 / SigLIP: on every token
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)

    def n_tokens(self, image_size):
        """Tokens the tower outputs for a square image of this size (patches [+ CLS])."""
        return (image_size // self.cfg.patch_size) ** 2 + int(self.cfg.cls_token)

    def pos_embed(self, gh, gw):
        """Position embeddings for a gh x gw patch grid; bicubic interpolation (in float32, as HF
        DINOv2) of the stored grid when the image size differs from the pretraining size."""
        if gh == self.grid and gw == self.grid:
            return self.pos
        n_cls = int(self.cfg.cls_token)
        cls_pos, grid_pos = self.pos[:, :n_cls], self.pos[:, n_cls:]
        D = self.cfg.dim
        g = grid_pos.reshape(1, self.grid, self.grid, D).permute(0, 3, 1, 2)  # (1, D, grid, grid)
        g = F.interpolate(g.float(), size=(gh, gw), mode='bicubic', align_corners=False).to(self.pos.dtype)
        g = g.permute(0, 2, 3, 1).reshape(1, gh * gw, D)  # (1, gh*gw, D)
        return torch.cat([cls_pos, g], dim=1)

    def embed(self, pixels):
        x = self.patch(pixels.to(self.patch.weight.dtype))  # (B, D, gh, gw)
        B, D, gh, gw = x.shape
        x = x.flatten(2).transpose(1, 2)  # (B, gh*gw, D)
        if self.cls is not None:
            x = torch.cat([self.cls.expand(B, -1, -1), x], dim=1)  # (B, 1 + gh*gw, D)
        x = x + self.pos_embed(gh, gw)
        return self.pre_norm(x) if self.pre_norm is not None else x

    def forward(self, pixels, layer=-1, norm=False):
        """Hidden state `layer` in HF's hidden_states indexing (0 = embeddings, i = after block i,
        -1 = last, -2 = penultimate as LLaVA uses); only the blocks needed are run. norm=True applies
        the final LayerNorm (DINOv2 / SigLIP last_hidden_state; ADEM-VL's ln_post on CLIP)."""
        n = layer % (self.cfg.n_layers + 1)
        x = self.embed(pixels)
        for blk in self.blocks[:n]:
            x = run_block(blk, x, recompute=self.grad_checkpoint)
        return self.norm(x) if norm else x  # (B, [1 +] N, D)

    def hidden_states(self, pixels):
        """All hidden states, as HF's output_hidden_states (for tests and feature probing)."""
        hs = [self.embed(pixels)]
        for blk in self.blocks:
            hs.append(blk(hs[-1]))
        return hs

    @staticmethod
    def from_pretrained(name_or_path, dtype=torch.float32, device='cpu'):
        folder = resolve(name_or_path)
        cfg = ViTConfig.from_hf(read_config(folder))
        with torch.device('meta'):
            model = ViT(cfg)
        load_weights(model, folder, vit_key_map(cfg), dtype=dtype, device=device,
                     renames=('', 'vision_model.', 'vision_tower.vision_model.', 'model.vision_tower.vision_model.',
                              'vision_tower.', 'model.vision_tower.'),  # llava-hf saves (hub; transformers 5)
                     ignore=VIT_IGNORE)
        return model.eval()


# keys of other parts of bigger checkpoints (CLIPModel's text tower, llava-hf's LM and projector) and
# buffers that HF saves but that carry nothing we compute with
VIT_IGNORE = ('text_model.', 'visual_projection.', 'text_projection', 'logit_scale', 'logit_bias', 'head.',
              'embeddings.mask_token', 'position_ids', 'language_model.', 'model.language_model.', 'lm_head.',
              'multi_modal_projector.', 'model.multi_modal_projector.', 'qformer.', 'query_tokens',
              'language_projection.')


def vit_key_map(cfg: ViTConfig):
    """HF name -> our name, for the vision tower (without the 'vision_model.' prefix)."""
    m = {}
    if cfg.kind == 'clip':
        m.update({'embeddings.class_embedding': 'cls', 'embeddings.patch_embedding.weight': 'patch.weight',
                  'embeddings.position_embedding.weight': 'pos',
                  'pre_layrnorm.weight': 'pre_norm.weight', 'pre_layrnorm.bias': 'pre_norm.bias',
                  'post_layernorm.weight': 'norm.weight', 'post_layernorm.bias': 'norm.bias'})
        blk = {'layer_norm1': 'norm1', 'self_attn.q_proj': 'q', 'self_attn.k_proj': 'k', 'self_attn.v_proj': 'v',
               'self_attn.out_proj': 'o', 'layer_norm2': 'norm2', 'mlp.fc1': 'fc1', 'mlp.fc2': 'fc2'}
        layers = 'encoder.layers'
    elif cfg.kind == 'dinov2':
        m.update({'embeddings.cls_token': 'cls', 'embeddings.patch_embeddings.projection.weight': 'patch.weight',
                  'embeddings.patch_embeddings.projection.bias': 'patch.bias', 'embeddings.position_embeddings': 'pos',
                  'layernorm.weight': 'norm.weight', 'layernorm.bias': 'norm.bias'})
        blk = {'norm1': 'norm1', 'attention.attention.query': 'q', 'attention.attention.key': 'k',
               'attention.attention.value': 'v', 'attention.output.dense': 'o', 'norm2': 'norm2',
               'mlp.fc1': 'fc1', 'mlp.fc2': 'fc2'}
        layers = 'encoder.layer'
    elif cfg.kind == 'eva':  # HF Blip2VisionModel / InstructBlipVisionModel (EVA ViT-g, Fang et al. 2023)
        m.update({'embeddings.class_embedding': 'cls', 'embeddings.patch_embedding.weight': 'patch.weight',
                  'embeddings.patch_embedding.bias': 'patch.bias', 'embeddings.position_embedding': 'pos',
                  'post_layernorm.weight': 'norm.weight', 'post_layernorm.bias': 'norm.bias'})
        blk = {'layer_norm1': 'norm1', 'self_attn.projection': 'o', 'layer_norm2': 'norm2', 'mlp.fc1': 'fc1',
               'mlp.fc2': 'fc2'}
        layers = 'encoder.layers'
        for i in range(cfg.n_layers):  # one fused qkv; its bias is (q_bias, 0, v_bias), loaded as it is stored
            for p in ('weight', 'bias'):
                m[f'{layers}.{i}.self_attn.qkv.{p}'] = tuple(f'blocks.{i}.{x}.{p}' for x in 'qkv')
    else:  # siglip
        m.update({'embeddings.patch_embedding.weight': 'patch.weight', 'embeddings.patch_embedding.bias': 'patch.bias',
                  'embeddings.position_embedding.weight': 'pos',
                  'post_layernorm.weight': 'norm.weight', 'post_layernorm.bias': 'norm.bias'})
        blk = {'layer_norm1': 'norm1', 'self_attn.q_proj': 'q', 'self_attn.k_proj': 'k', 'self_attn.v_proj': 'v',
               'self_attn.out_proj': 'o', 'layer_norm2': 'norm2', 'mlp.fc1': 'fc1', 'mlp.fc2': 'fc2'}
        layers = 'encoder.layers'
    for i in range(cfg.n_layers):
        for hf, ours in blk.items():
            for p in ('weight', 'bias'):
                m[f'{layers}.{i}.{hf}.{p}'] = f'blocks.{i}.{ours}.{p}'
        if cfg.layer_scale:
            m[f'{layers}.{i}.layer_scale1.lambda1'] = f'blocks.{i}.ls1'
            m[f'{layers}.{i}.layer_scale2.lambda1'] = f'blocks.{i}.ls2'
    return m

# -----------------------------------------------------------------------------
# Decoder LM


class RMSNorm(nn.Module):
    """RMSNorm computed in float32 (as HF). LLaMA: w * x.to(dtype); Gemma: (x * (1 + w)).to(dtype)."""

    def __init__(self, dim, eps=1e-6, plus_one=False):
        super().__init__()
        self.eps, self.plus_one = eps, plus_one
        self.weight = nn.Parameter(torch.zeros(dim) if plus_one else torch.ones(dim))

    def forward(self, x):
        h = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)  # = h * rsqrt(mean(h^2) + eps), one kernel on GPUs
        if self.plus_one:
            return (h * (1.0 + self.weight.float())).type_as(x)
        return self.weight * h.type_as(x)


def rope_tables(pos, head_dim, theta, dtype):
    """cos and signed sin tables for integer positions pos (B, T) -> (B, T, head_dim) each, computed in float32.
    Su et al. 2021 (RoFormer); HF's rotate-half layout: frequencies repeated over both halves. The sin table
    carries rotate_half's sign (-sin on the first half), so that apply_rope needs no concatenation per call."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=pos.device).float() / head_dim))
    ang = pos.float()[..., None] * inv_freq  # (B, T, head_dim/2)
    cos, sin = ang.cos(), ang.sin()
    return torch.cat([cos, cos], dim=-1).to(dtype), torch.cat([-sin, sin], dim=-1).to(dtype)  # once per forward


def apply_rope(x, cos, sin):
    """x (B, nh, T, hd); cos, signed sin (B, T, hd). Rotates pairs (i, i + hd/2): HF's
    x * cos + rotate_half(x) * sin with rotate_half(x) = cat(-x2, x1) = roll(x, hd/2) * sign, the sign in `sin`
    (the same numbers bit for bit, one copy fewer)."""
    return x * cos[:, None] + x.roll(x.shape[-1] // 2, dims=-1) * sin[:, None]


@dataclass
class Ctx:
    """What every block needs besides x: rotary tables, the attention mask, the KV cache, and
    `media`: whatever the fusion method put there for its modules (visual tokens, masks, gates)."""
    cos: torch.Tensor
    sin: torch.Tensor
    mask: torch.Tensor = None       # (B, 1, T, S) bool, True = may attend; None = plain causal
    cache: 'KVCache' = None
    media: dict = field(default_factory=dict)
    seq_lens: torch.Tensor = None   # packed samples: the lengths (n,) of the samples laid end to end in one row


class KVCache:
    """Preallocated keys and values, one (B, n_kv, max_len, hd) pair per layer; `pos` is how many
    positions are filled. A static buffer avoids re-allocating (and copying) every decode step."""

    def __init__(self, cfg: LMConfig, batch, max_len, dtype, device):
        shape = (batch, cfg.n_kv_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layers)]
        self.pos = 0
        self.max_len = max_len

    def reorder(self, rows):
        """Keep batch rows `rows` (n,) of every layer, in that order (beam search: each beam continues its parent)."""
        self.k = [k.index_select(0, rows) for k in self.k]
        self.v = [v.index_select(0, rows) for v in self.v]

    def update(self, layer, k, v):
        """Write k, v (B, n_kv, T, hd) at [pos, pos + T) and return the filled prefix."""
        T = k.shape[2]
        end = self.pos + T
        self.k[layer][:, :, self.pos:end] = k
        self.v[layer][:, :, self.pos:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class Attention(nn.Module):
    """Causal self-attention with grouped-query heads (Ainslie et al. 2023) and RoPE.
    Subclasses (MMCA, LLaMA-Adapter) override `attend` to change how scores become outputs."""

    def __init__(self, cfg: LMConfig, layer_idx):
        super().__init__()
        self.cfg, self.layer_idx = cfg, layer_idx
        hd = cfg.head_dim
        self.q = nn.Linear(cfg.dim, cfg.n_heads * hd, bias=cfg.qkv_bias)
        self.k = nn.Linear(cfg.dim, cfg.n_kv_heads * hd, bias=cfg.qkv_bias)
        self.v = nn.Linear(cfg.dim, cfg.n_kv_heads * hd, bias=cfg.qkv_bias)
        self.o = nn.Linear(cfg.n_heads * hd, cfg.dim, bias=cfg.o_bias)
        if cfg.qk_norm:  # MosaicGPT's q_ln / k_ln, over the whole width before the head split
            self.q_norm, self.k_norm = make_norm(cfg, cfg.n_heads * hd), make_norm(cfg, cfg.n_kv_heads * hd)

    def forward(self, x, ctx: Ctx):
        B, T, _ = x.shape
        hd, c = self.cfg.head_dim, self.cfg.clip_qkv
        q, k, v = self.q(x), self.k(x), self.v(x)
        if c:  # MPT clamps the fused Wqkv output
            q, k, v = q.clamp(-c, c), k.clamp(-c, c), v.clamp(-c, c)
        if self.cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(B, T, self.cfg.n_heads, hd).transpose(1, 2)  # (B, nh, T, hd)
        k = k.view(B, T, self.cfg.n_kv_heads, hd).transpose(1, 2)  # (B, n_kv, T, hd)
        v = v.view(B, T, self.cfg.n_kv_heads, hd).transpose(1, 2)
        if ctx.cos is not None:  # RoPE; ALiBi (MPT) is in ctx.mask instead
            q, k = apply_rope(q, ctx.cos, ctx.sin), apply_rope(k, ctx.cos, ctx.sin)
        if ctx.cache is not None:
            k, v = ctx.cache.update(self.layer_idx, k, v)  # (B, n_kv, S, hd), S = cached + T
        y = self.attend(q, k, v, ctx)  # (B, nh, T, hd)
        return self.o(y.transpose(1, 2).reshape(B, T, -1))

    def attend(self, q, k, v, ctx: Ctx):
        scale = self.cfg.attn_scale or None
        if ctx.seq_lens is not None:
            return packed_attention(q, k, v, ctx.seq_lens, scale)
        if ctx.mask is None:  # plain causal over T == S, or a single query that may see every key
            return F.scaled_dot_product_attention(q, k, v, is_causal=q.shape[2] > 1, enable_gqa=True, scale=scale)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=ctx.mask, enable_gqa=True, scale=scale)


@torch.compiler.disable  # the lengths change every batch: a compiled block calls this eagerly, and the lengths come
def packed_attention(q, k, v, seq_lens, scale=None):  # as a tensor, whose values compiled code does not guard on
    """Padding-free packing (as flash-attn's varlen kernels, Dao 2023): q, k, v (1, nh | n_kv, T, hd) hold several
    samples end to end, T = sum(seq_lens); each attends causally to itself only. One causal SDPA per sample costs
    what the samples cost alone (one masked T x T attention would cost the square of the row)."""
    n = seq_lens.tolist()
    out = [F.scaled_dot_product_attention(qi, ki, vi, is_causal=True, enable_gqa=True, scale=scale)
           for qi, ki, vi in zip(q.split(n, 2), k.split(n, 2), v.split(n, 2))]
    return torch.cat(out, dim=2)  # (1, nh, T, hd)


class MLP(nn.Module):
    """Gated MLP: down(act(gate(x)) * up(x)). SwiGLU (Shazeer 2020) for LLaMA, GeGLU for Gemma. MPT's is not gated:
    down(GELU(up(x)))."""

    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.act = cfg.act
        self.gate = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False) if cfg.gated_mlp else None
        self.up = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.down = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)

    def forward(self, x):
        if self.gate is None:
            return self.down(act_fn(self.act, self.up(x)))
        return self.down(act_fn(self.act, self.gate(x)) * self.up(x))


def make_norm(cfg: LMConfig, dim=None):
    """RMSNorm (LLaMA family), or MPT's LayerNorm without bias."""
    if cfg.norm == 'layernorm':
        return nn.LayerNorm(dim or cfg.dim, eps=cfg.norm_eps, bias=False)
    return RMSNorm(dim or cfg.dim, cfg.norm_eps, cfg.norm_plus_one)


def alibi_slopes(n_heads, bias_max=8.0):
    """ALiBi (Press et al. 2022) slopes (n_heads,) as MPT: 2^(-bias_max * i / n) for i = 1..n with n the next power
    of two; for other head counts the odd-indexed then the even-indexed slopes of that n, first n_heads of them."""
    n = 2 ** math.ceil(math.log2(n_heads))
    slopes = 1.0 / 2 ** (torch.arange(1, n + 1).float() * (bias_max / n))
    if n != n_heads:
        slopes = torch.cat([slopes[1::2], slopes[::2]])[:n_heads]
    return slopes


class Block(nn.Module):
    def __init__(self, cfg: LMConfig, layer_idx):
        super().__init__()
        self.attn_norm = make_norm(cfg)
        self.attn = Attention(cfg, layer_idx)
        self.ffn_norm = make_norm(cfg)
        self.ffn = MLP(cfg)
        # seams for fusion methods (fusion.py); empty by default
        self.pre = nn.ModuleList()       # x <- f(x, ctx) before the layer (Flamingo gated cross-attention)
        self.attn_in = nn.ModuleList()   # a <- f(a, ctx) on the normed attention input (LaVIN router adapters)
        self.ffn_side = nn.ModuleList()  # x <- x + f(h, ctx), in parallel with the FFN (ADEM-VL)

    def forward(self, x, ctx: Ctx):
        for f in self.pre:
            x = f(x, ctx)
        a = self.attn_norm(x)
        for f in self.attn_in:
            a = f(a, ctx)
        x = x + self.attn(a, ctx)
        h = self.ffn_norm(x)
        out = x + self.ffn(h)
        for f in self.ffn_side:
            out = out + f(h, ctx)
        return out


class Decoder(nn.Module):
    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.grad_checkpoint = False  # recompute each block's activations in the backward (train.py's key)
        self.norm = make_norm(cfg)
        self.head = None if cfg.tie_embeddings else nn.Linear(cfg.dim, cfg.vocab_size, bias=False)

    def embed_tokens(self, idx):
        x = self.embed(idx)
        if self.cfg.embed_scale:  # Gemma; the factor is rounded to the embedding dtype, as HF does
            x = x * torch.tensor(self.cfg.dim ** 0.5, dtype=x.dtype)
        return x

    def logits(self, h):
        return F.linear(h, self.embed.weight) if self.head is None else self.head(h)  # head: nn.Linear or Int8Linear

    def forward(self, idx=None, *, embeds=None, pos=None, pad_mask=None, cache=None, media=None, seq_lens=None):
        """Final-normed hidden states (B, T, D); apply `logits()` for the vocabulary.
        idx (B, T) token ids, or embeds (B, T, D) already embedded (the VLM splices visual tokens).
        pos (B, T) positions (default: cache.pos + arange). pad_mask (B, S) bool over every key
        position (cached + new; False = padding), for left-padded batches. media: fusion memory.
        seq_lens: a packed row (B = 1) of samples with these lengths, end to end: positions restart at every
        sample and attention stays inside it (data.pack), so the row computes what the samples compute alone."""
        x = self.embed_tokens(idx) if embeds is None else embeds
        B, T, _ = x.shape
        start = cache.pos if cache is not None else 0
        if seq_lens is not None:
            seq_lens = tuple(int(n) for n in seq_lens)
            if B != 1 or sum(seq_lens) != T or cache is not None or pad_mask is not None:
                raise ValueError(f"packed samples (seq_lens, {len(seq_lens)} of them, {sum(seq_lens)} tokens) need one row "
                                 f"of exactly that many tokens, no cache and no pad_mask; got a ({B}, {T}) input")
            if self.cfg.alibi or self.cfg.sliding_window:
                raise ValueError("packed samples are not supported with ALiBi (MPT) or a sliding window (Mistral)")
            pos = torch.cat([torch.arange(n, device=x.device) for n in seq_lens])[None]  # (1, T), 0 at each start
            seq_lens = torch.tensor(seq_lens)  # (n,) on the host: packed_attention splits by it
        if pos is None:
            pos = torch.arange(start, start + T, device=x.device).expand(B, T)
        cos, sin = (None, None) if self.cfg.alibi else rope_tables(pos, self.cfg.head_dim, self.cfg.rope_theta, x.dtype)
        mask = self.attn_mask(B, T, start, pad_mask, x.device)
        if self.cfg.alibi:
            mask = self.alibi_bias(mask, B, T, start, x.dtype, x.device)
        ctx = Ctx(cos=cos, sin=sin, mask=mask, cache=cache, media=media if media is not None else {}, seq_lens=seq_lens)
        for blk in self.blocks:
            x = run_block(blk, x, ctx, recompute=self.grad_checkpoint)
        if cache is not None:
            cache.pos += T
        return self.norm(x)

    def attn_mask(self, B, T, start, pad_mask, device):
        """Boolean (B, 1, T, S) mask, or None when SDPA's own causal flag is exact (no padding, no
        window, no cached prefix with several new tokens)."""
        W = self.cfg.sliding_window
        S = start + T
        if pad_mask is None and (W == 0 or S <= W) and (start == 0 or T == 1):
            return None
        qi = torch.arange(start, S, device=device)[:, None]  # (T, 1) absolute query positions
        ki = torch.arange(S, device=device)[None, :]  # (1, S)
        m = ki <= qi
        if W:
            m = m & (qi - ki < W)
        m = m[None, None].expand(B, 1, T, S)
        if pad_mask is not None:
            m = m & pad_mask[:, None, None, :S].bool()
            m = m | (ki == qi)  # a padding query sees itself, so its softmax row is never empty
        return m

    def alibi_bias(self, mask, B, T, start, dtype, device):
        """MPT's attention bias: slope_h * (k - q) on cache indices, -inf where `mask` forbids (B or 1, nh, T, S).
        MPT adds slope_h * (k - (S - 1)); the two differ by a constant per query row, which softmax ignores."""
        S = start + T
        qi = torch.arange(start, S, device=device)[:, None]  # (T, 1)
        ki = torch.arange(S, device=device)[None, :]  # (1, S)
        slopes = alibi_slopes(self.cfg.n_heads, self.cfg.alibi_bias_max).to(device)
        bias = (slopes[:, None, None] * (ki - qi)).to(dtype)[None]  # (1, nh, T, S)
        if mask is None:
            mask = (ki <= qi)[None, None]  # (1, 1, T, S)
        return bias.masked_fill(~mask, float('-inf'))

    @staticmethod
    def from_pretrained(name_or_path, dtype=torch.float32, device='cpu'):
        folder = resolve(name_or_path)
        cfg = LMConfig.from_hf(read_config(folder))
        with torch.device('meta'):
            model = Decoder(cfg)
        load_weights(model, folder, lm_key_map(cfg), dtype=dtype, device=device,
                     renames=('', ('language_model.', ''), ('model.language_model.', 'model.')),
                     ignore=LM_IGNORE + (('lm_head.weight',) if cfg.tie_embeddings else ()))
        return model.eval()

    # --- generation -------------------------------------------------------------------------

    @torch.inference_mode()
    def stream(self, idx, *, pad_mask=None, embeds=None, media=None, max_new_tokens=64, temperature=0.0,
               top_p=1.0, stop_ids=(), generator=None, all_done=None):
        """Yield the next token of every row, one (B,) tensor per step, until every row has produced
        a stop token or max_new_tokens. idx (B, T) prompt ids, left-padded with pad_mask (B, T)
        (False on padding). embeds (B, T, D) replaces the prompt embeddings (VLM prompts).
        Finished rows keep yielding their stop token; callers cut at the first stop. all_done(done (B,))
        -> bool decides when to stop (default: every row here is done; FSDP: on every rank, eval.run)."""
        B, T = idx.shape
        if T + max_new_tokens > self.cfg.max_seq_len:
            raise ValueError(f"prompt ({T} tokens) + max_new_tokens ({max_new_tokens}) exceeds the context "
                             f"length {self.cfg.max_seq_len}")
        device = idx.device
        dtype = (embeds if embeds is not None else self.embed.weight).dtype
        cache = KVCache(self.cfg, B, T + max_new_tokens, dtype, device)
        mask = torch.ones(B, T + max_new_tokens, dtype=torch.bool, device=device)
        if pad_mask is not None:
            mask[:, :T] = pad_mask.bool()
        # positions count real tokens only, so a left-padded row matches its unpadded self (as HF)
        pos = (mask[:, :T].long().cumsum(-1) - 1).clamp(min=0)
        use_mask = mask if pad_mask is not None and not bool(pad_mask.all()) else None
        stop = torch.tensor(list(stop_ids) or [-1], device=device)
        done = torch.zeros(B, dtype=torch.bool, device=device)
        h = self(idx, embeds=embeds, pos=pos, pad_mask=use_mask, cache=cache, media=media)[:, -1]
        nxt_pos = pos[:, -1:] + 1
        for _ in range(max_new_tokens):
            tok = sample(self.logits(h).float(), temperature, top_p, generator)
            tok = torch.where(done, stop[0], tok)
            yield tok
            done = done | torch.isin(tok, stop)
            if all_done(done) if all_done is not None else bool(done.all()):
                return
            h = self(tok[:, None], pos=nxt_pos, pad_mask=use_mask, cache=cache, media=media)[:, -1]
            nxt_pos = nxt_pos + 1

    def generate(self, idx, *, num_beams=1, length_penalty=1.0, early_stopping=False, **kw):
        """(B, T_new) new tokens; rows that stopped early are filled with their stop token. num_beams > 1: beam
        search (see beam_search), otherwise greedy / sampled (see stream)."""
        if num_beams > 1:
            return self.beam_search(idx, num_beams=num_beams, length_penalty=length_penalty,
                                    early_stopping=early_stopping, **kw)
        return torch.stack(list(self.stream(idx, **kw)), dim=1)

    @torch.inference_mode()
    def beam_search(self, idx, *, num_beams, length_penalty=1.0, early_stopping=False, pad_mask=None, embeds=None,
                    media=None, max_new_tokens=64, stop_ids=(), temperature=0.0, top_p=1.0, generator=None,
                    all_done=None):
        """Beam search as transformers' GenerationMixin._beam_search (generation/utils.py, the vectorised one):
        per row the best of `num_beams` hypotheses by sum log p / len^length_penalty (len = new tokens, the stop
        token included). Each step keeps the top 2K (K (1 + n_stop) with more stop ids) continuations of all beams;
        those among the top K that end in a stop token (or reach max_new_tokens) become finished hypotheses, the
        best K others run on. early_stopping: False (HF's default: stop a row when its best running beam, scored at
        the current length, cannot beat its worst finished one), True (stop once K hypotheses are finished) or
        'never' (with length_penalty > 0, score the best running beam at the maximal length). Arguments as stream;
        media tensors are per row (B, ...) and are repeated for the beams. Returns (B, T_new), padded with the
        first stop id after a row's stop token."""
        if temperature > 0:
            raise ValueError("beam search is deterministic here: temperature must be 0 (no beam sampling)")
        B, T = idx.shape
        K = num_beams
        if T + max_new_tokens > self.cfg.max_seq_len:
            raise ValueError(f"prompt ({T} tokens) + max_new_tokens ({max_new_tokens}) exceeds the context "
                             f"length {self.cfg.max_seq_len}")
        device = idx.device

        def beams(t):  # (B, ...) -> (B*K, ...): row b's beams at b*K .. b*K + K - 1, as HF's expand
            return t.repeat_interleave(K, dim=0) if torch.is_tensor(t) and t.dim() and t.shape[0] == B else t
        idx, embeds = beams(idx), None if embeds is None else beams(embeds)
        media = {k: beams(v) for k, v in (media or {}).items()}
        dtype = (embeds if embeds is not None else self.embed.weight).dtype
        cache = KVCache(self.cfg, B * K, T + max_new_tokens, dtype, device)
        mask = torch.ones(B * K, T + max_new_tokens, dtype=torch.bool, device=device)
        if pad_mask is not None:
            mask[:, :T] = beams(pad_mask.bool())
        pos = (mask[:, :T].long().cumsum(-1) - 1).clamp(min=0)  # as stream: positions count real tokens only
        use_mask = mask if pad_mask is not None and not bool(pad_mask.all()) else None
        stop = torch.tensor(list(stop_ids) or [-1], device=device)
        fill = int(stop[0]) if stop_ids else 0
        keep = max(2, 1 + len(stop_ids)) * K  # candidates per row: enough that K survive K stopping
        top_k_mask = torch.arange(keep, device=device) < K  # only the K best candidates may finish
        NEG = -1.0e9
        run_tok = torch.full((B, K, max_new_tokens), fill, dtype=torch.long, device=device)
        run_score = torch.zeros(B, K, device=device)
        run_score[:, 1:] = NEG  # all beams start equal: only the first one may expand at step 0
        fin_tok, fin_score = run_tok.clone(), torch.full((B, K), NEG, device=device)
        fin_len = torch.zeros(B, K, dtype=torch.long, device=device)
        fin_done = torch.zeros(B, K, dtype=torch.bool, device=device)
        improvable = torch.ones(B, 1, dtype=torch.bool, device=device)  # HF's is_early_stop_heuristic_unsatisfied
        h = self(idx, embeds=embeds, pos=pos, pad_mask=use_mask, cache=cache, media=media)[:, -1]
        nxt_pos = pos[:, -1:] + 1
        rows = torch.arange(B, device=device)[:, None] * K  # (B, 1) first flat beam of each row
        for t in range(max_new_tokens):
            logp = torch.log_softmax(self.logits(h).float(), dim=-1)  # (B*K, V)
            V = logp.shape[-1]
            logp = (logp.view(B, K, V) + run_score[..., None]).view(B, K * V)
            top_lp, top_i = logp.topk(keep, dim=-1)  # (B, keep)
            parent, tok = top_i // V, top_i % V
            cand = torch.take_along_dim(run_tok, parent[..., None], dim=1)  # (B, keep, max_new)
            cand[:, :, t] = tok
            hit = torch.isin(tok, stop) | (t + 1 == max_new_tokens)  # (B, keep) a stop token, or the length limit
            # the K best candidates that did not stop run on
            run_lp = top_lp + hit.float() * NEG
            best = run_lp.topk(K, dim=-1).indices  # (B, K)
            run_tok, run_score = torch.take_along_dim(cand, best[..., None], 1), torch.take_along_dim(run_lp, best, 1)
            run_parent = torch.take_along_dim(parent, best, 1)
            # stopped candidates among the top K join the finished hypotheses if they beat the worst kept one
            just = hit & top_k_mask
            f = top_lp / ((t + 1) ** length_penalty)
            f = f + (fin_done.all(-1, keepdim=True) & (early_stopping is True)).float() * NEG
            f = f + (~improvable).float() * NEG
            f = f + (~just).float() * NEG
            m_tok, m_score = torch.cat([fin_tok, cand], 1), torch.cat([fin_score, f], 1)
            m_len = torch.cat([fin_len, torch.full_like(tok, t + 1)], 1)
            m_done = torch.cat([fin_done, just], 1)
            sel = m_score.topk(K, dim=-1).indices  # (B, K)
            fin_tok, fin_score = torch.take_along_dim(m_tok, sel[..., None], 1), torch.take_along_dim(m_score, sel, 1)
            fin_len, fin_done = torch.take_along_dim(m_len, sel, 1), torch.take_along_dim(m_done, sel, 1)
            # can a running beam still beat the worst finished one?
            n = max_new_tokens if early_stopping == 'never' and length_penalty > 0 else t + 1
            best_running = run_score[:, :1] / (n ** length_penalty)  # (B, 1)
            worst = torch.where(fin_done, fin_score.min(-1, keepdim=True).values, NEG)  # (B, K)
            improvable = improvable & (best_running > worst).any(-1, keepdim=True)
            over = not bool(improvable.any()) or (bool(fin_done.all()) and early_stopping is True) or bool(hit.all())
            if all_done(torch.tensor([over], device=device)) if all_done is not None else over:  # FSDP: every rank
                break
            cache.reorder((run_parent + rows).flatten())  # each running beam continues its parent's cache
            h = self(run_tok[:, :, t].reshape(B * K, 1), pos=nxt_pos, pad_mask=use_mask, cache=cache,
                     media=media)[:, -1]
            nxt_pos = nxt_pos + 1
        return fin_tok[:, 0, :int(fin_len[:, 0].max())]  # (B, T_new) the best hypothesis of each row


def sample(logits, temperature=0.0, top_p=1.0, generator=None):
    """Next token from (B, V) logits: greedy at temperature 0, else nucleus sampling (Holtzman et
    al. 2020): keep the smallest set of tokens whose probability reaches top_p."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        p, order = probs.sort(dim=-1, descending=True)
        drop = p.cumsum(-1) - p > top_p  # tokens entirely beyond the nucleus
        p = p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, p)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


LM_IGNORE = ('rotary_emb.inv_freq', 'vision_tower.', 'model.vision_tower.', 'vision_model.',
             'multi_modal_projector.', 'model.multi_modal_projector.',
             'qformer.', 'query_tokens', 'language_projection.')  # BLIP-2 / InstructBLIP-Vicuna saves: the fusion's


def lm_key_map(cfg: LMConfig):
    """HF name -> our name for LLaMA / Mistral / Qwen2 / Gemma checkpoints (MPT: mpt_key_map)."""
    if cfg.layout != 'llama':
        return mpt_key_map(cfg)
    m = {'model.embed_tokens.weight': 'embed.weight', 'model.norm.weight': 'norm.weight'}
    if not cfg.tie_embeddings:
        m['lm_head.weight'] = 'head.weight'
    blk = {'input_layernorm.weight': 'attn_norm.weight', 'post_attention_layernorm.weight': 'ffn_norm.weight',
           'self_attn.q_proj.weight': 'attn.q.weight', 'self_attn.k_proj.weight': 'attn.k.weight',
           'self_attn.v_proj.weight': 'attn.v.weight', 'self_attn.o_proj.weight': 'attn.o.weight',
           'mlp.gate_proj.weight': 'ffn.gate.weight', 'mlp.up_proj.weight': 'ffn.up.weight',
           'mlp.down_proj.weight': 'ffn.down.weight'}
    if cfg.qkv_bias:
        blk.update({f'self_attn.{p}_proj.bias': f'attn.{p}.bias' for p in 'qkv'})
    if cfg.o_bias:
        blk['self_attn.o_proj.bias'] = 'attn.o.bias'
    for i in range(cfg.n_layers):
        for hf, ours in blk.items():
            m[f'model.layers.{i}.{hf}'] = f'blocks.{i}.{ours}'
    return m


def mpt_key_map(cfg: LMConfig):
    """HF name -> ours for MPT: transformers' MptForCausalLM names ('mpt'), or MosaicGPT's ('mosaic_gpt': MosaicML
    examples' gpt_blocks.py GPTBlock ln_1 / attn / ln_2 / mlp.mlp_up / mlp_down, transformer.ln_f). The fused Wqkv
    maps to a tuple: load_weights splits it into equal q, k, v rows. The head is tied to transformer.wte."""
    mos = cfg.layout == 'mosaic_gpt'
    m = {'transformer.wte.weight': 'embed.weight', f'transformer.{"ln_f" if mos else "norm_f"}.weight': 'norm.weight'}
    names = ('ln_1', 'ln_2', 'mlp.mlp_up', 'mlp.mlp_down') if mos else ('norm_1', 'norm_2', 'ffn.up_proj', 'ffn.down_proj')
    for i in range(cfg.n_layers):
        hf, ours = f'transformer.blocks.{i}.', f'blocks.{i}.'
        m[hf + 'attn.Wqkv.weight'] = tuple(ours + f'attn.{p}.weight' for p in 'qkv')
        m.update({hf + 'attn.out_proj.weight': ours + 'attn.o.weight', hf + f'{names[0]}.weight': ours + 'attn_norm.weight',
                  hf + f'{names[1]}.weight': ours + 'ffn_norm.weight', hf + f'{names[2]}.weight': ours + 'ffn.up.weight',
                  hf + f'{names[3]}.weight': ours + 'ffn.down.weight'})
        if cfg.qk_norm:
            m.update({hf + 'attn.q_ln.weight': ours + 'attn.q_norm.weight', hf + 'attn.k_ln.weight': ours + 'attn.k_norm.weight'})
    return m

# -----------------------------------------------------------------------------
# Loading Hugging Face checkpoints (safetensors only; no transformers at run time)


def resolve(name_or_path):
    """A local folder, or a hub repo id downloaded (config, tokenizer, safetensors) into the
    huggingface_hub cache; HF_HUB_OFFLINE=1 uses the cache only."""
    p = Path(name_or_path).expanduser()
    if p.is_dir():
        return p
    if p.exists():
        raise ValueError(f"{p} is a file; expected a checkpoint folder (config.json + *.safetensors) or a hub repo id")
    # a path that looks local is never tried on the hub: ./x, /x, ~/x, a/b/c, checkpoints/x (convert.py's
    # folders), or a first part that is a local folder
    first = str(name_or_path).split('/')[0]
    if str(name_or_path).startswith(('.', '/', '~')) or str(name_or_path).count('/') != 1 or first == 'checkpoints' \
            or Path(first).is_dir():
        hint = "; `python convert.py` writes the offline checkpoints/ folders" if 'checkpoints' in p.parts else ''
        raise FileNotFoundError(f"checkpoint folder {p} does not exist (relative to {Path.cwd()}){hint}; "
                                f"a hub repo id is 'org/name'")
    from huggingface_hub import snapshot_download
    try:
        return Path(snapshot_download(str(name_or_path), allow_patterns=[
            '*.json', '*.safetensors', 'tokenizer*', '*.model', '*.txt']))
    except Exception as e:
        raise FileNotFoundError(f"could not fetch {name_or_path!r} from the Hugging Face hub or its local cache "
                                f"(HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', '0')}): {e}") from e


def atomic_save(obj, path):
    """torch.save to a temporary file in the same folder, then rename over `path`: a crash midway
    leaves the previous file intact (os.replace is atomic on POSIX and Windows)."""
    path = Path(path)
    tmp = path.with_name(path.name + f'.tmp{os.getpid()}')
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def remove_stale_temporaries(path):
    """Delete the `path`.tmp<pid> files that an atomic_save killed midway left behind (their process is gone);
    returns their names."""
    path, removed = Path(path), []
    for tmp in path.parent.glob(path.name + '.tmp*'):
        pid = tmp.name[len(path.name) + 4:]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)  # signal 0: only asks whether the process exists
            continue
        except ProcessLookupError:
            tmp.unlink()
            removed.append(tmp.name)
        except PermissionError:
            continue  # another user's live process
    return removed


def load_checkpoint(path):
    """A train.py checkpoint (dict with 'model', 'config', ...), loaded with weights_only=True. A file that is
    not one says so and names itself; it is never unpickled (a file of unknown origin could run code)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path} not found")
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # torch's message would suggest weights_only=False: unsafe here
        raise ValueError(f"checkpoint {path} is corrupt or not a checkpoint of this project "
                         f"({os.path.getsize(path)} bytes; torch.load raised {type(e).__name__})") from None
    if not isinstance(ckpt, dict) or not {'model', 'config'} <= set(ckpt):
        raise ValueError(f"checkpoint {path} is not a checkpoint of this project (train.py's ckpt.pt holds "
                         f"'model' and 'config'; this file holds {type(ckpt).__name__} "
                         f"{sorted(ckpt)[:8] if isinstance(ckpt, dict) else ''})")
    return ckpt


def read_config(folder):
    path = Path(folder) / 'config.json'
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: a checkpoint folder needs config.json")
    with open(path) as f:
        return json.load(f)


def safetensors_files(folder):
    """The checkpoint's safetensors files: model.safetensors, or the shards an index lists."""
    folder = Path(folder)
    index = folder / 'model.safetensors.index.json'
    if index.exists():
        with open(index) as f:
            shards = sorted(set(json.load(f)['weight_map'].values()))
        files = [folder / s for s in shards]
    else:
        files = sorted(folder.glob('*.safetensors'))
    missing = [str(f) for f in files if not f.exists()]
    if not files or missing:
        raise FileNotFoundError(f"no safetensors weights in {folder}" + (f" (missing shards: {missing})" if missing else ""))
    return files


def load_weights(model, folder, key_map, *, dtype=torch.float32, device='cpu', renames=('',), ignore=()):
    """Copy a checkpoint into `model` (built on the meta device) through `key_map` (HF -> ours).
    `renames`: key prefixes that wrap this tower in bigger checkpoints ('vision_model.' in a full
    CLIPModel, 'model.language_model.' -> 'model.' in a llava-hf save, ...); the one that matches most
    keys is stripped. Keys starting (or ending) with an `ignore` entry belong to something else (the
    other tower, a projector, buffers) and are skipped. Every other key must map, every parameter must
    be filled, every shape must agree: problems are collected and raised once, naming keys and files."""
    from safetensors import safe_open
    files = safetensors_files(folder)
    params = dict(model.named_parameters())
    ours_of = {hf: v if isinstance(v, tuple) else (v,) for hf, v in key_map.items()}  # a tuple: a fused tensor's parts
    mapped = {o for v in ours_of.values() for o in v}
    assert mapped == set(params), f"key map and model disagree: {mapped ^ set(params)}"
    handles = [safe_open(str(p), framework='pt', device='cpu') for p in files]
    keys = [(h, k) for h in handles for k in h.keys()]
    renames = [r if isinstance(r, tuple) else (r, '') for r in renames]

    def rename(k, old, new):
        return new + k[len(old):] if k.startswith(old) else k
    old, new = max(renames, key=lambda r: sum(rename(k, *r) in key_map for _, k in keys))
    state, unexpected, mismatched = {}, [], {}
    for h, key in keys:
        k = rename(key, old, new)
        if k not in key_map:
            if not any(x.startswith(i) or x.endswith(i) for i in ignore for x in (k, key)):
                unexpected.append(key)
            continue
        parts = ours_of[k]
        t = h.get_tensor(key)
        if parts == ('cls',) and t.dim() == 1:  # CLIP stores its class embedding as (D,)
            t = t.view(1, 1, -1)
        if parts == ('pos',) and t.dim() == 2:  # an nn.Embedding weight (N, D) -> (1, N, D)
            t = t.unsqueeze(0)
        want = torch.Size([sum(params[o].shape[0] for o in parts), *params[parts[0]].shape[1:]])  # fused along dim 0
        if t.shape != want:
            mismatched[k] = f"{key}: checkpoint {tuple(t.shape)} vs model {tuple(want)}"
            continue
        for o, piece in zip(parts, t.split([params[o].shape[0] for o in parts])):
            state[o] = piece.to(device=device, dtype=dtype)
    inverse = {o: hf for hf, v in ours_of.items() for o in v}
    missing = list(dict.fromkeys(rename(inverse[p], new, old) for p in params  # as named on disk, once per fused key
                                 if p not in state and inverse[p] not in mismatched))
    if missing or unexpected or mismatched:
        msg = [f"checkpoint {folder} ({', '.join(f.name for f in files)}) does not match {type(model).__name__}:"]
        for name, ks in (('missing', missing), ('unexpected', unexpected), ('wrong shape', list(mismatched.values()))):
            if ks:
                msg.append(f"  {len(ks)} {name}: " + ', '.join(ks[:8]) + (' ...' if len(ks) > 8 else ''))
        raise ValueError('\n'.join(msg))
    model.load_state_dict(state, strict=True, assign=True)
    return model

# -----------------------------------------------------------------------------
# Quantized frozen linears: int8 weight-only for CPU inference, 4-bit NF4 under LoRA (QLoRA)
#
# Decoding one token at batch 1 reads every weight once: on a CPU it is bound by memory bandwidth, so
# weights in 1 byte instead of 4 decode up to ~4x faster. Int8Linear is gpt-fast's int8 weight-only scheme
# (pytorch-labs/gpt-fast quantize.py WeightOnlyInt8QuantHandler): a symmetric absmax scale per output row,
# computed by torch's own kernel torch._weight_int8pack_mm. NF4Linear is QLoRA's frozen base (Dettmers et
# al. 2023, arXiv 2305.14314): 4-bit NormalFloat in blocks of 64, the block scales themselves quantised to
# 8 bits (double quantisation), dequantised per matmul in the activation dtype; torchao's NF4Tensor (the one
# torchtune's QLoRA uses; runtime-optional: pip install torchao), whose backward never builds a weight gradient.
#
# Deviations from the reference code: QLoRA quantises the block scales in blocks of 256; a matrix whose number of
# 64-blocks 256 does not divide (SmolLM2's 576 x 576: 5,184) uses the largest divisor below 256 instead (torchao
# asserts divisibility). No paged optimizer (bitsandbytes' paged AdamW): the LoRA parameters' AdamW state is small.
# The int8 path keeps the embedding lookup in its own dtype and gives a tied head its own int8 copy.


class Int8Linear(nn.Module):
    """y = x W^T + b with W = scale[:, None] * W_int8 (per output row absmax / 127). Inference only. The product
    runs on bfloat16 activations (torch's kernel is fast there; its float32 path is a slow fallback): outputs
    carry bfloat16 rounding on top of the int8 weights', and come back in the input's dtype."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127  # (out,)
        self.register_buffer('weight_int8', torch.round(w / scale[:, None]).to(torch.int8))  # (out, in)
        self.register_buffer('scale', scale.to(torch.bfloat16))
        self.bias = linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x):
        x2 = x.reshape(-1, self.in_features).to(torch.bfloat16)  # (tokens, in)
        y = torch._weight_int8pack_mm(x2, self.weight_int8, self.scale).to(x.dtype)
        y = y.view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def dequantized(self):
        return self.scale.float()[:, None] * self.weight_int8.float()  # (out, in)


class NF4Linear(nn.Module):
    """A frozen nn.Linear with its weight in NF4 (QLoRA); the bias, if any, stays as it was."""

    def __init__(self, linear: nn.Linear, block_size=64, scaler_block_size=256):
        super().__init__()
        try:
            from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4
        except ImportError:
            raise ImportError("QLoRA's NF4 weights need torchao (pip install torchao)") from None
        n = linear.weight.numel()
        if n % block_size:
            raise ValueError(f"NF4 needs weights whose size divides into blocks of {block_size}; "
                             f"{tuple(linear.weight.shape)} does not")
        n_blocks = n // block_size  # the scales are quantised in blocks of up to 256 (QLoRA's); the largest divisor
        scaler_block_size = max(d for d in range(1, scaler_block_size + 1) if n_blocks % d == 0)
        self.weight = nn.Parameter(to_nf4(linear.weight.detach(), block_size, scaler_block_size), requires_grad=False)
        self.bias = linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x):
        from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import linear_nf4
        y = linear_nf4(x, self.weight)
        return y if self.bias is None else y + self.bias

    def dequantized(self):
        return self.weight.get_original_weight()  # (out, in), what forward multiplies by


def quantize_linears(module, kind='int8', *, skip=('lora_',)):
    """Replace every frozen nn.Linear under `module` (none of whose parameters trains, and whose name has no
    `skip` part: LoRA's own A and B stay) by its Int8Linear ('int8') or NF4Linear ('nf4'). A LoRALinear's
    frozen `base` is replaced too, which makes LoRA on it QLoRA. Returns the number replaced."""
    make = {'int8': Int8Linear, 'nf4': NF4Linear}
    if kind not in make:
        raise ValueError(f"quantize kind must be one of {sorted(make)}, got {kind!r}")
    hits = [(name, m) for name, m in module.named_modules() if type(m) is nn.Linear
            and not any(p.requires_grad for p in m.parameters()) and not any(s in name for s in skip)]
    for name, m in hits:
        parent = module.get_submodule(name.rsplit('.', 1)[0]) if '.' in name else module
        setattr(parent, name.rsplit('.', 1)[-1], make[kind](m))
    return len(hits)


def quantize_int8(lm: 'Decoder'):
    """A decoder for fast CPU decoding: every block linear and the vocabulary head in int8 (a tied head gets
    its own int8 copy; the embedding lookup stays as it is). In place; returns lm."""
    with torch.no_grad():
        if lm.head is None:
            lm.head = nn.Linear(lm.cfg.dim, lm.cfg.vocab_size, bias=False, device=lm.embed.weight.device,
                                dtype=lm.embed.weight.dtype)
            lm.head.weight.copy_(lm.embed.weight)
            lm.head.requires_grad_(False)
        lm.requires_grad_(False)
        quantize_linears(lm, 'int8')
    return lm

# -----------------------------------------------------------------------------
# The VLM: vision tower -> fusion -> decoder

IGNORE_INDEX = -100  # label of positions that carry no loss (prompt, padding, visual tokens)
IMAGE_TOKEN = -200   # placeholder id in input_ids; each is replaced by one visual token (LLaVA's IMAGE_TOKEN_INDEX)


class VLM(nn.Module):
    """A vision tower and a decoder joined by a fusion method (fusion.py); the LM may also be an encoder-decoder
    (t5.T5, `lm.is_encoder_decoder`: see encdec_forward). The fusion is called as
    fusion(feats, has_image=, ids=) and returns (tokens, media): `tokens` (B, n, d) are spliced into the
    token embeddings at the IMAGE_TOKEN positions (input-level fusion: LLaVA, Q-Former, ADEM-VL's CLS);
    `media` (a dict) reaches the modules the fusion placed in the decoder's seams through ctx.media, at
    every step of generation too (attention-level fusion: Flamingo, ADEM-VL, LaVIN, MMCA). A fusion that
    changes the attention itself swaps a block's Attention for a subclass overriding `attend`.
    One image per sample: pixels / feats are (B, ...) with has_image (B,) False for text-only rows. Several
    images per sample: pixels (B, M, 3, H, W) / feats (B, M, N, Dv) with has_image (B, M), each row's images in
    the order of its IMAGE_TOKEN runs, missing ones (has_image False) anywhere; the fusion sees them flattened
    to (B*M, ...), image j of row b at b*M + j.
    Optional fusion attributes:
      - `fusion.image_features(vision, pixels)` replaces the tower call, for a fusion that reads the
        tower its own way (LaVIN: the CLS token of several layers); the feature cache goes through it too.
      - `fusion.prefix(has_image)` -> (B, P, d): embeddings put before every row, for every batch (with
        or without images), ahead of the padding of a left-padded prompt (LaVIN's modality token); it gets
        has_image per row. They carry no label and no output: logits stay aligned with `ids`.
      - `fusion.runs_without_images = True`: a batch without any image still calls the fusion, with
        feats=None (ADEM-VL's learned key/value embeddings act on text-only samples); otherwise such a
        batch skips it.
    A seam for PEFT methods, empty by default: `prompts`, modules called as f(B) -> (B, N, d), whose tokens go
    after the fusion's prefix and before the text (peft.py's prompt tuning); like the prefix they carry no label
    and no output. With such prompts the fusion sees the ids of the whole sequence, the prefix positions as
    ordinary text (id 0), so that its media (Flamingo's image index, MMCA's token types) line up with the embeddings.
    Another, `feature_adapters`: modules called as feats <- f(feats) on the tower's features (B, N, Dv) before the
    fusion, after the feature cache (peft.py's CLIP-Adapter); and `aux_losses`, modules called as f(labels) -> a
    scalar that forward(labels=) adds to the loss (peft.py's PETAL information bottleneck)."""

    def __init__(self, vision: ViT, lm: Decoder, fusion: nn.Module, *, vision_layer=-1, vision_norm=False):
        super().__init__()
        self.vision, self.lm, self.fusion = vision, lm, fusion
        self.vision_layer, self.vision_norm = vision_layer, vision_norm
        self.prompts = nn.ModuleDict()  # PEFT seam: method name -> f(B) -> (B, N, d) (prompt tuning)
        self.feature_adapters = nn.ModuleDict()  # PEFT seam: method name -> feats <- f(feats) before the fusion
        self.aux_losses = nn.ModuleDict()  # PEFT seam: method name -> f(labels) -> a term added to the loss

    def image_features(self, pixels):
        """(B, 3, H, W) -> (B, N, Dv), or (B, M, 3, H, W) -> (B, M, N, Dv); without autograd when no tower
        parameter trains."""
        if pixels.dim() == 5:  # several images per sample
            return self.image_features(pixels.flatten(0, 1)).unflatten(0, pixels.shape[:2])
        train_tower = any(p.requires_grad for p in self.vision.parameters())
        with torch.set_grad_enabled(train_tower and torch.is_grad_enabled()):
            if hasattr(self.fusion, 'image_features'):
                return self.fusion.image_features(self.vision, pixels)
            return self.vision(pixels, layer=self.vision_layer, norm=self.vision_norm)

    def embed(self, ids, feats, has_image=None, fusion_inputs=None):
        """Token embeddings (B, P + T, d) with the visual tokens spliced in and the fusion's prefix (P tokens,
        usually none) in front, and the fusion's media. fusion_inputs: extra keyword arguments for the fusion
        (InstructBLIP's instruction_ids / instruction_mask: the instruction in the Q-Former's vocabulary)."""
        x = self.lm.embed_tokens(ids.clamp(min=0))  # (B, T, d); placeholders embed as id 0, then overwritten
        if feats is not None and feats.dim() == 4:  # (B, M, N, Dv) -> (B*M, N, Dv): image j of row b at b*M + j
            feats = feats.flatten(0, 1)
            has_image = has_image.flatten() if has_image is not None else None
        for f in self.feature_adapters.values() if feats is not None else ():  # (B, N, Dv) -> (B, N, Dv)
            feats = f(feats)
        if has_image is None:
            n = feats.shape[0] if feats is not None else ids.shape[0]
            has_image = torch.full((n,), feats is not None, dtype=torch.bool, device=ids.device)
        for f in self.prompts.values():  # PEFT prompts go right before the text (after the fusion's prefix)
            x = torch.cat([f(ids.shape[0]).to(x.dtype), x], dim=1)  # (B, N + T, d)
        if hasattr(self.fusion, 'prefix'):
            row_has_image = has_image.view(ids.shape[0], -1).any(1)  # (B,)
            x = torch.cat([self.fusion.prefix(row_has_image).to(x.dtype), x], dim=1)  # (B, P + T, d)
        if feats is None and not getattr(self.fusion, 'runs_without_images', False):
            return x, {}
        P = x.shape[1] - ids.shape[1]
        ids = F.pad(ids, (P, 0)) if P and self.prompts else ids  # (B, P + T): prefix positions are text
        tokens, media = self.fusion(feats, has_image=has_image, ids=ids, **(fusion_inputs or {}))
        slots = ids == IMAGE_TOKEN  # (B, T) or (B, P + T)
        if tokens is not None:
            tokens = tokens[has_image]  # (n_img, n, d)
            if tokens.numel() // tokens.shape[-1] != int(slots.sum()):
                raise ValueError(f"the batch has {int(slots.sum())} image placeholder positions but the fusion made "
                                 f"{tokens.shape[0]} x {tokens.shape[1]} visual tokens; the data must expand '<image>' "
                                 f"into fusion.n_tokens placeholders per image")
            slots = F.pad(slots, (x.shape[1] - ids.shape[1], 0))  # (B, P + T): no slot in the prefix
            x = x.masked_scatter(slots[..., None], tokens.to(x.dtype))
        elif slots.any():
            raise ValueError(f"{type(self.fusion).__name__} adds no input tokens but the batch has image placeholders")
        return x, media

    def forward(self, ids, *, pixels=None, feats=None, has_image=None, labels=None, n_norm=None, fusion_inputs=None,
                pad_mask=None, dec_ids=None, seq_lens=None):
        """Logits (B, T, V), or with labels the summed next-token loss over labelled positions divided
        by n_norm (default: their count), computing the vocabulary head only where a label is.
        An encoder-decoder LM (lm.is_encoder_decoder, t5.T5): see encdec_forward (pad_mask, dec_ids).
        seq_lens: ids is one packed row of samples with these lengths (data.pack; input-level fusions only)."""
        if feats is None and pixels is not None:
            feats = self.image_features(pixels)
        x, media = self.embed(ids, feats, has_image, fusion_inputs)
        if getattr(self.lm, 'is_encoder_decoder', False):
            if seq_lens is not None:
                raise ValueError("packed samples (pack=True) need a decoder-only LM")
            return self.encdec_forward(x, labels, n_norm=n_norm, pad_mask=pad_mask, dec_ids=dec_ids)
        if seq_lens is not None and (media or x.shape[1] != ids.shape[1]):
            raise ValueError(f"packed samples need a fusion that only splices input tokens (LLaVA, Q-Former); "
                             f"{type(self.fusion).__name__} adds media or a prefix")
        h = self.lm(embeds=x, media=media, seq_lens=seq_lens)[:, x.shape[1] - ids.shape[1]:]  # drop the prefix: (B, T, d)
        if labels is None:
            return self.lm.logits(h)
        tgt = labels[:, 1:]
        keep = tgt != IGNORE_INDEX
        logits = self.lm.logits(h[:, :-1][keep]).float()  # (n_labelled, V)
        n = n_norm if n_norm is not None else keep.sum().clamp(min=1)
        return F.cross_entropy(logits, tgt[keep], reduction='sum') / n + sum(f(labels) for f in self.aux_losses.values())

    def encdec_forward(self, x, labels=None, *, n_norm=None, pad_mask=None, dec_ids=None):
        """An encoder-decoder LM (InstructBLIP-FlanT5, LAVIS blip2_t5_instruct.py): the prompt with its visual tokens
        goes to the encoder, the answer to the decoder. With labels, x (B, T, d) is a training sample as the data
        lays it out for any LM ([prompt][answer][right padding], the answer's tokens labelled, one run per row):
        encoder input x[:, :first label] (with its padding masked), decoder targets the labelled tokens, decoder
        input [decoder_start] + targets[:-1] (T5's shift_right); returns the summed loss / n_norm (default: the
        target count). Without labels: decoder logits (B, L, V) of dec_ids (B, L) given x with pad_mask (B, T)."""
        if labels is None:
            return self.lm.decode(dec_ids, self.lm.encode(embeds=x, mask=pad_mask), pad_mask)
        B, T = labels.shape
        lab = labels != IGNORE_INDEX  # (B, T)
        n_lab = lab.sum(1)  # (B,)
        first = torch.where(n_lab > 0, lab.long().argmax(1), T)  # (B,) the answer's start (T: a row without one)
        pos = torch.arange(T, device=labels.device)
        if not torch.equal(lab, (pos >= first[:, None]) & (pos < (first + n_lab)[:, None])):
            raise ValueError("an encoder-decoder LM trains on one answer per sample: the labelled tokens must be one "
                             "run after the prompt (multi-turn conversations need a decoder-only LM)")
        S, L = int(first.max()), max(int(n_lab.max()), 1)
        enc_mask = pos[None, :S] < first[:, None]  # (B, S) the prompt; what follows it in a row is padding here
        enc = self.lm.encode(embeds=x[:, :S], mask=enc_mask)  # (B, S, d)
        j = torch.arange(L, device=labels.device)
        tgt = labels.gather(1, (first[:, None] + j).clamp(max=T - 1))  # (B, L) the answer, left-aligned
        tgt = tgt.masked_fill(j >= n_lab[:, None], IGNORE_INDEX)
        dec_in = torch.cat([torch.full_like(tgt[:, :1], self.lm.cfg.decoder_start_id), tgt[:, :-1]], 1)
        logits = self.lm.decode(dec_in.masked_fill(dec_in == IGNORE_INDEX, self.lm.cfg.pad_id), enc, enc_mask)
        keep = tgt != IGNORE_INDEX
        n = n_norm if n_norm is not None else keep.sum().clamp(min=1)
        return (F.cross_entropy(logits[keep].float(), tgt[keep], reduction='sum') / n
                + sum(f(labels) for f in self.aux_losses.values()))  # PETAL's bottleneck on InstructBLIP-FlanT5

    @torch.inference_mode()
    def generate(self, ids, *, pad_mask=None, pixels=None, feats=None, has_image=None, fusion_inputs=None, **kw):
        """Greedy / sampled / beam-searched (num_beams > 1) continuation of left-padded prompts (B, T) with their
        images; see Decoder.generate (an encoder-decoder LM: its generate, from the encoded prompt)."""
        ids, x, media, pad_mask = self.prompt(ids, pad_mask, pixels, feats, has_image, fusion_inputs)
        if getattr(self.lm, 'is_encoder_decoder', False):
            return self.lm.generate(embeds=x, mask=pad_mask, **kw)
        return self.lm.generate(ids, embeds=x, media=media, pad_mask=pad_mask, **kw)

    @torch.inference_mode()
    def stream(self, ids, *, pad_mask=None, pixels=None, feats=None, has_image=None, fusion_inputs=None, **kw):
        ids, x, media, pad_mask = self.prompt(ids, pad_mask, pixels, feats, has_image, fusion_inputs)
        if getattr(self.lm, 'is_encoder_decoder', False):
            yield from self.lm.stream(embeds=x, mask=pad_mask, **kw)
            return
        yield from self.lm.stream(ids, embeds=x, media=media, pad_mask=pad_mask, **kw)

    def prompt(self, ids, pad_mask, pixels, feats, has_image, fusion_inputs=None):
        """The prompt's ids, embeddings, media and pad mask as the decoder generates from them."""
        if feats is None and pixels is not None:
            feats = self.image_features(pixels)
        x, media = self.embed(ids, feats, has_image, fusion_inputs)
        P = x.shape[1] - ids.shape[1]
        if P:  # the prefix goes before the left padding, and is never padding itself
            ids = F.pad(ids, (P, 0))
            pad_mask = None if pad_mask is None else F.pad(pad_mask.bool(), (P, 0), value=True)
        return ids, x, media, pad_mask
