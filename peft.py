"""
Parameter-efficient fine-tuning: one section per method, plus the helpers every method shares
(`mark_trainable`, `trainable_state_dict`, `merge`). PEFT modules replace or wrap nn.Linear layers
(LoRA / DoRA, IA3, bias / scale), add tokens (prompt tuning, through the VLM's `prompts` seam) or change the
attention (LLaMA-Adapter); any of them combines with any fusion method (fusion.py).
"""

import copy
import fnmatch
import functools
import math
import re

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import ViT, run_block

# -----------------------------------------------------------------------------
# LoRA: Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models" (arXiv 2106.09685); rsLoRA: Kalajdzievski
# 2023 (arXiv 2312.03732), scaling alpha / sqrt(r); DoRA: Liu et al. 2024, "Weight-Decomposed Low-Rank Adaptation"
# (arXiv 2402.09353). Reference: huggingface/peft src/peft/tuners/lora/layer.py (init, scaling, merge),
# tuners/lora/dora.py and variants.py (DoRA's magnitude, forward and merge).
#
#        x ──► W (frozen) ─────────────────────────────┐
#        │                                             ▼
#        └──► dropout ─► A (r x in) ─► * s ─► B (out x r) ─► (+) ─► y        s = alpha / r (rsLoRA: alpha / sqrt(r))
#
# B starts at zero, so the wrapped model equals the base model at step 0. s multiplies the r-wide side (peft
# multiplies the out-wide output; the same result, r instead of out multiplications per token).
# DoRA (dora=True): a magnitude m (out,) starts as the row norms of W + sBA; the output is
#     y = m / ||W + sBA||_row ⊙ (W x + s B A x) + b,    the norm detached from the graph (DoRA §4.3, as peft),
# which peft writes (m/n - 1) ⊙ base(x) + m/n ⊙ s B A x + base(x). At init m = n: the base model again.
# Targets (`targets`, config lora_targets): a bare name ('q', 'down') is that linear of every decoder block (the
# LM's own attn.q/k/v/o and ffn.gate/up/down, not what a fusion put in its seams); a dotted name is a path
# pattern on the whole VLM, matched with fnmatch, a trailing '.' taking every linear below it: 'vision.' (the
# tower), 'fusion.' (a projector, the Q-Former), 'lm.blocks.0.attn.q', 'vision.blocks.*.q'. The LM's head is never a
# target (the logits use its weight directly, and a tied head is the embedding).
# Trains (peft.apply): 'lora_' (A, B and DoRA's magnitude). Config: peft='lora', lora_r / _alpha / _dropout /
# _targets / _rslora / _dora.


class LinearWrapper(nn.Module):
    """What every PEFT wrapper of an nn.Linear is (LoRA, IA3, bias / scale): it reads like the linear it wraps
    (weight, bias, in / out features), so wrappers stack ('bias_scale+lora'); merge() folds the innermost first."""
    weight = property(lambda self: self.base.weight)
    bias = property(lambda self: self.base.bias)
    in_features = property(lambda self: self.base.in_features)
    out_features = property(lambda self: self.base.out_features)

    def linear(self):
        """The nn.Linear at the bottom of a stack of wrappers."""
        return self.base.linear() if isinstance(self.base, LinearWrapper) else self.base


def find_linears(model, targets, key):
    """[(name, nn.Linear or LinearWrapper)] of `model` (a VLM or a bare Decoder) that `targets` name (see above);
    the modules inside a wrapper are not candidates, the wrapper is. `key` names the config key in the errors: no
    match at all, or a path that matches nothing."""
    if isinstance(targets, str):
        targets = (targets,)
    lm = 'lm.' if hasattr(model, 'lm') else ''

    def hit(name, t):
        if '.' not in t:  # the decoder's own linear of that name, in every block
            return re.fullmatch(rf'{re.escape(lm)}blocks\.\d+\.(attn|ffn)\.{re.escape(t)}', name) is not None
        return fnmatch.fnmatchcase(name, t + '*' if t.endswith('.') else t)
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Linear, LinearWrapper))
               and not isinstance(model.get_submodule(n.rsplit('.', 1)[0]) if '.' in n else model, LinearWrapper)
               and n != lm + 'head']  # Decoder.logits reads the head's weight (tied or not), never calls it
    for t in targets:
        if '.' in t and not any(hit(n, t) for n, _ in linears):
            raise ValueError(f"{key}: {t!r} matches no nn.Linear of the model (e.g. {linears[0][0]!r})")
    hits = [(n, m) for n, m in linears if any(hit(n, t) for t in targets)]
    if not hits:
        raise ValueError(f"{key}={tuple(targets)} match no nn.Linear in {type(model).__name__}; bare names are the "
                         f"decoder blocks' attn.q/k/v/o and ffn.gate/up/down, dotted ones path patterns ('vision.')")
    return hits


def replace(model, name, new):
    """Put `new` where the submodule `name` is."""
    parent = model.get_submodule(name.rsplit('.', 1)[0]) if '.' in name else model
    setattr(parent, name.split('.')[-1], new)
    return new


class LoRALinear(LinearWrapper):
    def __init__(self, base: nn.Linear, *, r=8, alpha=8, dropout=0.0, rslora=False, dora=False):
        super().__init__()
        if dora and not isinstance(base, nn.Linear):  # its norm needs the layer's own W
            raise ValueError(f"lora_dora=True on a layer another PEFT method already wraps ({type(base).__name__})")
        self.base = base
        kw = dict(bias=False, device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Linear(base.in_features, r, **kw)
        self.lora_B = nn.Linear(r, base.out_features, **kw)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # nn.Linear's default, as peft
        nn.init.zeros_(self.lora_B.weight)
        self.scaling = alpha / math.sqrt(r) if rslora else alpha / r
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # DoRA's magnitude: ||W + sBA|| per output row (= ||W|| since B = 0)
        self.lora_magnitude = nn.Parameter(self.weight_norm().detach()) if dora else None
        self.merged = False

    def delta(self):
        """s B A (out, in), in the adapter's dtype."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    def weight_norm(self):
        """||W + s B A|| of each output row (out,) (peft's get_weight_norm)."""
        return torch.linalg.norm(self.base.weight.to(self.lora_A.weight.dtype) + self.delta(), dim=1)

    def forward(self, x):
        y = self.base(x)
        if self.merged:
            return y
        d = self.drop(x).to(self.lora_A.weight.dtype)
        lora = self.lora_B(self.lora_A(d) * self.scaling)  # (..., out)
        if self.lora_magnitude is None:
            return y + lora.to(y.dtype)
        f = self.lora_magnitude / self.weight_norm().detach()  # (out,) m / ||W + sBA||, no gradient through the norm
        if isinstance(self.drop, nn.Identity) or not self.training:
            wx = y if self.base.bias is None else y - self.base.bias  # W x without the bias
        else:  # W applied to the dropped-out input, as peft
            wx = F.linear(d, self.base.weight.to(d.dtype))
        return (y + (f - 1) * wx + f * lora).to(y.dtype)

    @torch.no_grad()
    def merge(self):
        """W <- W + sBA (DoRA: m / ||W + sBA|| ⊙ (W + sBA)); a second call does nothing."""
        if self.merged:
            return
        W = self.base.weight
        if self.lora_magnitude is None:
            W += self.delta().to(W.dtype)
        else:
            self.merged_norm = self.weight_norm()  # kept for unmerge: the norm of the unmerged weight
            f = (self.lora_magnitude / self.merged_norm)[:, None]  # (out, 1)
            W.copy_((f * (W.to(f.dtype) + self.delta())).to(W.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if not self.merged:
            return
        W = self.base.weight
        if self.lora_magnitude is None:
            W -= self.delta().to(W.dtype)
        else:
            f = (self.lora_magnitude / self.merged_norm)[:, None]
            W.copy_((W.to(f.dtype) / f - self.delta()).to(W.dtype))
        self.merged = False


def apply_lora(model, *, targets=('q', 'v'), r=8, alpha=8, dropout=0.0, rslora=False, dora=False):
    """Wrap every nn.Linear that `targets` names (see the section's notes) of `model` (a VLM or a Decoder) in a
    LoRALinear. Returns {name: LoRALinear} of the wrapped layers."""
    if not isinstance(r, int) or r < 1:
        raise ValueError(f"lora_r must be a positive int, got {r!r}")
    return {name: replace(model, name, LoRALinear(m, r=r, alpha=alpha, dropout=dropout, rslora=rslora, dora=dora))
            for name, m in find_linears(model, targets, 'lora_targets')}

# Deviations from the reference code
# - The scaling multiplies A x (r wide) instead of the output (out wide): equal in exact arithmetic, ~1e-7 apart
#   in float32. DoRA's norm is computed in the adapter's dtype (float32 master weights) rather than the input's
#   (peft casts W and BA to x's dtype first): the same in float32, more exact under bf16 autocast.
# - No DoRA caching, no lora_bias, no fan_in_fan_out (our linears are all nn.Linear), no Embedding / Conv LoRA.

# -----------------------------------------------------------------------------
# IA3: Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context Learning"
# (arXiv 2205.05638). Reference: huggingface/peft src/peft/tuners/ia3/layer.py (Linear: forward, merge).
#
#   feed-forward target (ffn.down):  y = W (x ⊙ l)       l (in,)
#   other targets (attn.k, attn.v):   y = (W x + b) ⊙ l   l (out,)
#
# l starts at ones: the base model at step 0. Linear in W, so it merges: W ⊙ l along the input or output axis
# (and the bias ⊙ l for an output target). Targets as LoRA's (bare names or path patterns); `feedforward` says
# which of them scale their input and must be among the targets (peft's feedforward_modules).
# Trains: 'ia3_'. Config: peft='ia3', ia3_targets (peft's llama defaults k, v, down), ia3_feedforward (down).


class IA3Linear(LinearWrapper):
    def __init__(self, base: nn.Linear, *, feedforward=False):
        super().__init__()
        self.base, self.feedforward = base, feedforward
        n = base.in_features if feedforward else base.out_features
        self.ia3_l = nn.Parameter(torch.ones(n, device=base.weight.device, dtype=base.weight.dtype))
        self.merged = False

    def forward(self, x):
        if self.merged:
            return self.base(x)
        if self.feedforward:  # scale the input (peft: in l's dtype, back to x's)
            return self.base((x.to(self.ia3_l.dtype) * self.ia3_l).to(x.dtype))
        y = self.base(x)
        return (y * self.ia3_l).to(y.dtype)

    @torch.no_grad()
    def merge(self):
        if self.merged:
            return
        W, b, l = self.base.weight, self.base.bias, self.ia3_l
        W.copy_((W * (l[None, :] if self.feedforward else l[:, None])).to(W.dtype))
        if b is not None and not self.feedforward:
            b.copy_((b * l).to(b.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if not self.merged:
            return
        W, b, l = self.base.weight, self.base.bias, self.ia3_l
        W.copy_((W / (l[None, :] if self.feedforward else l[:, None])).to(W.dtype))
        if b is not None and not self.feedforward:
            b.copy_((b / l).to(b.dtype))
        self.merged = False


def apply_ia3(model, *, targets=('k', 'v', 'down'), feedforward=('down',)):
    """Wrap the linears `targets` names in IA3Linear; those `feedforward` names scale their input. Returns
    {name: IA3Linear}."""
    hits = find_linears(model, targets, 'ia3_targets')
    ff = {n for n, _ in find_linears(model, feedforward, 'ia3_feedforward')} if feedforward else set()
    if ff - {n for n, _ in hits}:
        raise ValueError(f"ia3_feedforward={tuple(feedforward)} names layers that ia3_targets={tuple(targets)} "
                         f"does not ({sorted(ff - {n for n, _ in hits})[0]}); it must be a subset of the targets")
    return {name: replace(model, name, IA3Linear(m, feedforward=name in ff)) for name, m in hits}

# Deviations from the reference code
# - l is a vector (out,) / (in,), peft's a matrix (out, 1) / (1, in): the same values, and 1-D, so AdamW gives it
#   no weight decay here (train.py decays only matrices). unmerge divides by l exactly (peft adds 1e-8).

# -----------------------------------------------------------------------------
# Prompt tuning: Lester et al. 2021, "The Power of Scale for Parameter-Efficient Prompt Tuning" (arXiv 2104.08691).
# Reference: huggingface/peft src/peft/tuners/prompt_tuning/model.py (PromptEmbedding, its inits) and
# peft_model.py PeftModelForCausalLM.forward (the prompts before inputs_embeds, the mask and labels extended).
#
#   LM input:  [fusion prefix (LaVIN), P_1 .. P_N, text tokens with the visual tokens spliced in]
#
# N virtual tokens P (an nn.Embedding (N, d)) go in the VLM's `prompts` seam (model.VLM), so they are in front of
# every row, with or without images, and ahead of a left-padded prompt's padding; they carry no label and no
# output (the logits stay aligned with the ids, as peft's labels get -100 there), the positions count them
# (the text starts at position N, as in peft where position_ids run over the whole input), and the KV cache
# holds them while decoding. Init: N(0, 1) (peft's RANDOM) or, with init_text, the embeddings of its tokens
# (with BOS when the tokenizer adds one, as peft's `tokenizer(text)`), repeated or cut to N (peft's TEXT).
# The LM's embeddings are not trained, so the prompts are the whole update: the base model is NOT unchanged
# at init (no zero init exists for an inserted token).
# Trains: 'prompt_tuning.'. Config: peft='prompt_tuning', prompt_tuning_tokens, prompt_tuning_init_text.


class PromptEmbedding(nn.Module):
    def __init__(self, n, dim, *, init=None, device=None, dtype=None):
        super().__init__()
        self.embedding = nn.Embedding(n, dim, device=device, dtype=dtype)  # N(0, 1), peft's RANDOM
        if init is not None:
            with torch.no_grad():
                self.embedding.weight.copy_(init)

    def forward(self, batch):
        return self.embedding.weight[None].expand(batch, -1, -1)  # (B, N, d)


def apply_prompt_tuning(model, *, tokens=20, init_text='', tokenizer=None):
    """Put N=`tokens` virtual tokens in front of the VLM's text (model.prompts['prompt_tuning']), random or
    initialised from `init_text` through `tokenizer` (text -> ids). Returns {'prompts.prompt_tuning': module}."""
    if not hasattr(model, 'prompts'):
        raise ValueError("prompt tuning goes through the VLM's `prompts` seam: apply it to a model.VLM")
    if not isinstance(tokens, int) or tokens < 1:
        raise ValueError(f"prompt_tuning_tokens must be a positive int, got {tokens!r}")
    lm, init = model.lm, None
    w = lm.embed.weight
    if init_text:
        if tokenizer is None:
            raise ValueError("prompt_tuning_init_text needs a tokenizer (peft.apply loads the LM's)")
        ids = list(tokenizer(init_text))
        if not ids:
            raise ValueError(f"prompt_tuning_init_text={init_text!r} has no tokens")
        ids = (ids * math.ceil(tokens / len(ids)))[:tokens]  # repeated or cut to N, as peft
        with torch.no_grad():  # embed_tokens: Gemma's scale included (the input the LM sees for these tokens)
            init = lm.embed_tokens(torch.tensor(ids, device=w.device)).float()
    model.prompts['prompt_tuning'] = PromptEmbedding(tokens, lm.cfg.dim, init=init, device=w.device, dtype=w.dtype)
    return {'prompts.prompt_tuning': model.prompts['prompt_tuning']}

# Deviations from the reference code
# - Gemma: our prompts enter after the LM's sqrt(d) embedding scale (HF Gemma scales inputs_embeds, prompts
#   included), and the text init takes the scaled embeddings: the same input as peft's at init, a different
#   parametrisation (a factor sqrt(d)) while training.
# - SAMPLE_VOCAB init is not offered; the prompts are in the LM's dtype (peft: float32; train.py makes trained
#   weights float32 anyway).
# - With a fusion prefix (LaVIN's modality token) the prompts come after it: LaVIN's routers read the token at
#   position 0.

# -----------------------------------------------------------------------------
# LLaMA-Adapter v1: Zhang et al. 2023, "LLaMA-Adapter: Efficient Fine-tuning of Language Models with Zero-init
# Attention" (arXiv 2303.16199). Reference: OpenGVLab/LLaMA-Adapter alpaca_finetuning_v1/llama/model.py
# (Attention.forward with `adapter`, Transformer.forward: adapter_query, the top adapter_layer layers) and
# finetuning.sh (adapter_len 10, adapter_layer 30 of LLaMA-7B's 32).
#
#   in each block i >= start: K prompts P_i (K, d), keys / values from the block's FROZEN k, v projections
#   (no norm, no RoPE); the attention over the tokens is unchanged, the prompt has its own softmax:
#       y = softmax(q K_t^T / sqrt(d_h) + causal) V_t  +  tanh(g) ⊙ softmax(q K_p^T / sqrt(d_h)) V_p
#   g (1, H, 1, 1) per head, zero-init: the base model at step 0. P ~ N(0, 1) (official nn.Embedding).
#
# start = 2 is "all but the first 2 layers" (the official top 30 of 32 at 7B; a 30-layer SmolLM2 gets 28).
# Built by giving each adapted attention a subclass of its own class (`attend` calls the class's own attend),
# so it also composes with a fusion that swapped the attention (MMCA, LaVIN).
# Trains: 'llama_adapter_' (prompts, gates): LLaMA-7B 30 x (10 x 4096 + 32) = 1,229,760.
# Config: peft='llama_adapter', llama_adapter_tokens (K), llama_adapter_start.


class LlamaAdapterAttention:
    """Mixed in before a block's attention class; owns llama_adapter_prompt (K, d) and llama_adapter_gate."""

    def attend(self, q, k, v, ctx):
        y = super().attend(q, k, v, ctx)  # (B, nh, T, hd) the tokens' own attention
        B, (K, _), hd = q.shape[0], self.llama_adapter_prompt.shape, self.cfg.head_dim
        p = self.llama_adapter_prompt.to(q.dtype)  # (K, d)
        kp = self.k(p).view(1, K, self.cfg.n_kv_heads, hd).transpose(1, 2).expand(B, -1, -1, -1)  # (B, n_kv, K, hd)
        vp = self.v(p).view(1, K, self.cfg.n_kv_heads, hd).transpose(1, 2).expand(B, -1, -1, -1)
        yp = F.scaled_dot_product_attention(q, kp, vp, enable_gqa=True, scale=self.cfg.attn_scale or None)  # no mask
        return y + self.llama_adapter_gate.tanh().to(q.dtype) * yp


@functools.cache
def _llama_adapter_class(cls):
    return type(f'LlamaAdapter{cls.__name__}', (LlamaAdapterAttention, cls), {})


def apply_llama_adapter(lm, *, tokens=10, start=2):
    """Prompts and gates in the attention of blocks start .. n_layers - 1 of a Decoder. Returns {name: attention}."""
    n = lm.cfg.n_layers
    if not isinstance(tokens, int) or tokens < 1:
        raise ValueError(f"llama_adapter_tokens must be a positive int, got {tokens!r}")
    if not isinstance(start, int) or not 0 <= start < n:
        raise ValueError(f"llama_adapter_start must be in [0, {n - 1}] (the first adapted block), got {start!r}")
    added = {}
    for i in range(start, n):
        attn = lm.blocks[i].attn
        if isinstance(attn, LlamaAdapterAttention):
            raise ValueError(f"blocks.{i}.attn already has a LLaMA-Adapter")
        w = attn.o.weight  # new parameters take the block's device and dtype
        attn.__class__ = _llama_adapter_class(type(attn))
        attn.llama_adapter_prompt = nn.Parameter(torch.randn(tokens, lm.cfg.dim, device=w.device).to(w.dtype))
        attn.llama_adapter_gate = nn.Parameter(torch.zeros(1, lm.cfg.n_heads, 1, 1, device=w.device, dtype=w.dtype))
        added[f'blocks.{i}.attn'] = attn
    return added

# Deviations from the reference code
# - The official code concatenates [V_p; V_t] and one score matrix with the two softmaxes side by side; we run
#   SDPA twice (the same sum). The blocks below `start` run without the official no_grad: in a text-only run
#   nothing before them trains, so autograd stores nothing for them anyway; in a VLM the gradient of a trained
#   projector / Q-Former has to pass through them.
# - With GQA (not in LLaMA-1) the prompt keys have n_kv heads, shared by their query groups; the gates stay
#   per query head. MPT's clip_qkv / QK LayerNorm are not applied to the prompt keys.
# - The multimodal v1 variant (a projected CLIP feature added to every prompt) is not built here.

# -----------------------------------------------------------------------------
# Bias / scale tuning, LLaMA-Adapter v2's fine-tuning stage: Gao et al. 2023, "LLaMA-Adapter V2" (arXiv
# 2304.15010) §3.1. Reference: OpenGVLab/LLaMA-Adapter llama_adapter_v2_multimodal7b/llama/llama.py (w_bias: zero
# biases on wq, wo, w1, w2, w3; the norms train) and the paper's scale, as lit-llama's adapter_v2.py writes it:
#
#   y = s ⊙ (W x + b_0 + b)     b zeros, s ones (out,): the base model at step 0; b_0 the layer's own bias if any
#
# on the frozen linears `targets` names (wq, wo, w1, w2, w3 = q, o, gate, down, up; LoRA's target syntax).
# Linear: it merges into W <- s ⊙ W, bias <- s ⊙ (b_0 + b) (a layer without a bias gets one).
# Trains: 'bias_scale_' and the LM's RMSNorms (every block's attn_norm, ffn_norm and the final norm).
# Config: peft='bias_scale', bias_scale_targets.


class BiasScaleLinear(LinearWrapper):
    def __init__(self, base: nn.Linear):
        super().__init__()
        self.base = base
        kw = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.bias_scale_bias = nn.Parameter(torch.zeros(base.out_features, **kw))
        self.bias_scale_scale = nn.Parameter(torch.ones(base.out_features, **kw))
        self.merged = False

    def forward(self, x):
        y = self.base(x)
        if self.merged:
            return y
        return (self.bias_scale_scale * (y + self.bias_scale_bias)).to(y.dtype)

    @torch.no_grad()
    def merge(self):
        if self.merged:
            return
        lin, s, b = self.linear(), self.bias_scale_scale, self.bias_scale_bias
        W, self.had_bias = lin.weight, lin.bias is not None
        b0 = lin.bias if self.had_bias else torch.zeros_like(b)
        W.copy_((W * s[:, None]).to(W.dtype))
        lin.bias = nn.Parameter((s * (b0 + b)).to(W.dtype), requires_grad=False)
        self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if not self.merged:
            return
        lin, s, b = self.linear(), self.bias_scale_scale, self.bias_scale_bias
        W = lin.weight
        W.copy_((W / s[:, None]).to(W.dtype))
        b0 = lin.bias / s - b
        lin.bias = nn.Parameter(b0.to(W.dtype), requires_grad=False) if self.had_bias else None
        self.merged = False


def apply_bias_scale(model, *, targets=('q', 'o', 'gate', 'up', 'down')):
    """Wrap the linears `targets` names in BiasScaleLinear. Returns {name: BiasScaleLinear}."""
    return {name: replace(model, name, BiasScaleLinear(m)) for name, m in find_linears(model, targets, 'bias_scale_targets')}

# Deviations from the reference code
# - The official multimodal code adds the biases only (its scale is 1 throughout); the scales follow the paper
#   and lit-llama. Its optional LoRA (r 16) is peft='bias_scale+lora' here.
# - A bias merged into a layer without one adds a `bias` parameter to that layer (for export / inference).


# -----------------------------------------------------------------------------
# Bottleneck adapters: Sung et al. 2022, "VL-Adapter" (arXiv 2112.06825), after Houlsby et al. 2019.
# Reference: ylsung/VL_adapter VL-T5/src/adapters/adapter_modeling.py (Adapter), adapter_controller.py
# (AdapterController: y + adapter(y)), my_transformers/modeling_t5.py (T5LayerSelfAttention / T5LayerFF: on the
# sub-layer's output, before the residual), adapters/config.py (gelu_new, no extra LayerNorm), single_adapter.sh.
#
#   x ─► norm ─► sublayer ─► y ─► y + Up(GELU(Down(y))) ─► (+ x)      Down d -> d/8, Up d/8 -> d, with biases
#
# Trains (apply's patterns): the adapters and the LM's norms (VL-Adapter unfreezes the layer norms); with
# vision=True also the tower's adapters and its LayerNorms.


class Adapted(nn.Module):
    """base(x) followed by a residual bottleneck adapter on its output (the sub-layer's output projection)."""

    def __init__(self, base, dim, *, reduction=8):
        super().__init__()
        self.base = base
        ref = next(base.parameters())
        self.adapter_down = nn.Linear(dim, dim // reduction, device=ref.device, dtype=ref.dtype)  # default init,
        self.adapter_up = nn.Linear(dim // reduction, dim, device=ref.device, dtype=ref.dtype)    # as VL-Adapter's

    def forward(self, x):
        y = self.base(x)
        return y + self.adapter_up(F.gelu(self.adapter_down(y), approximate='tanh'))  # gelu_new


def apply_adapters(model, *, reduction=8, vision=False, vision_blocks=None):
    """Adapters on the attention and FFN outputs (attn.o, ffn.down) of every LM block; with vision=True also on
    the tower's (o, fc2) in its first `vision_blocks` blocks (the ones the VLM runs). Returns the patterns that
    train."""
    if reduction < 1 or model.lm.cfg.dim % reduction:
        raise ValueError(f"adapters_reduction={reduction} must divide the LM width {model.lm.cfg.dim}")
    for blk in model.lm.blocks:
        blk.attn.o = Adapted(blk.attn.o, model.lm.cfg.dim, reduction=reduction)
        blk.ffn.down = Adapted(blk.ffn.down, model.lm.cfg.dim, reduction=reduction)
    trains = ('adapter_', 'attn_norm.', 'ffn_norm.', 'lm.norm.')
    if vision:
        n = len(model.vision.blocks) if vision_blocks is None else vision_blocks
        for i, blk in enumerate(model.vision.blocks[:n]):
            blk.o = Adapted(blk.o, model.vision.cfg.dim, reduction=reduction)
            blk.fc2 = Adapted(blk.fc2, model.vision.cfg.dim, reduction=reduction)
            trains += (f'vision.blocks.{i}.norm1.', f'vision.blocks.{i}.norm2.')
    return trains

# Deviations from the reference code
# - VL-Adapter adapts T5 / BART (encoder, decoder and its cross-attention); ours is a decoder-only LM, so the
#   adapters sit after its self-attention and FFN only. Its up-projection is not zero-initialised (nn.Linear's
#   default), so the adapted model differs from the base one at step 0; we follow it.
# - In the tower the adapter sits on o / fc2, before DINOv2's LayerScale (CLIP and SigLIP have none).

# -----------------------------------------------------------------------------
# CLIP-Adapter: Gao et al. 2021, "CLIP-Adapter" (arXiv 2110.04544). Reference: gaopengcuhk/CLIP-Adapter
# clip_adapter.py (Adapter: Linear -> ReLU -> Linear -> ReLU, no biases, reduction 4; ratio 0.2).
#
#   f' = ratio * ReLU(W2 ReLU(W1 f)) + (1 - ratio) * f        on every visual token, before the fusion


class CLIPAdapter(nn.Module):
    def __init__(self, dim, *, reduction=4, ratio=0.2):
        super().__init__()
        self.fc1 = nn.Linear(dim, dim // reduction, bias=False)  # both default init, as the official code
        self.fc2 = nn.Linear(dim // reduction, dim, bias=False)
        self.ratio = ratio

    def forward(self, feats):
        return self.ratio * F.relu(self.fc2(F.relu(self.fc1(feats)))) + (1 - self.ratio) * feats  # (B, N, Dv)


def apply_clip_adapter(model, *, reduction=4, ratio=0.2):
    """An adaptation to generative VLMs: CLIP-Adapter adapts CLIP's pooled image embedding for cosine
    classification against class-name prompts; here it adapts every token the tower hands the fusion
    (VLM.feature_adapters, after the feature cache, so the frozen tower's features are still computed once), and
    the LM's next-token loss trains it."""
    dim = model.vision.cfg.dim
    if reduction < 1 or dim % reduction:
        raise ValueError(f"clip_adapter_reduction={reduction} must divide the tower width {dim}")
    ref = next(model.vision.parameters())
    adapter = CLIPAdapter(dim, reduction=reduction, ratio=ratio)
    model.feature_adapters['clip_adapter'] = adapter.to(ref.device, ref.dtype)
    return ('feature_adapters.clip_adapter.',)

# Deviations from the reference code: the width follows the tower (the official code hard-codes RN50's 1024).

# -----------------------------------------------------------------------------
# MaPLe: Khattak et al. 2023, "MaPLe: Multi-modal Prompt Learning" (arXiv 2210.03117). Reference:
# muzairkhattak/multimodal-prompt-learning trainers/maple.py (MultiModalPromptLearner), clip/model.py
# (ResidualAttentionBlock_MaPLe, VisionTransformer_MaPLe); configs/trainers/MaPLe/vit_b16_c2_ep5_batch4_2ctx.yaml.
#
#   layer i < J:  LM      [prefix | P_i (n_ctx, d) | text]          P_0 enters as input tokens, P_i replaces the
#                 tower   [CLS | patches | Linear_i(P_i) (n_ctx, Dv)]  previous layer's prompts (i = 1 .. J-1)


class MaPLePrompts(nn.Module):
    """The J language prompts (J, n_ctx, d) and their J projections into the tower (Linear d -> Dv)."""

    def __init__(self, lm_dim, vis_dim, *, n_ctx=2, depth=9):
        super().__init__()
        self.text = nn.Parameter(torch.empty(depth, n_ctx, lm_dim))
        nn.init.normal_(self.text, std=0.02)
        deep = nn.Linear(lm_dim, vis_dim)  # the deeper projections are clones of one layer: all start equal
        self.proj = nn.ModuleList([nn.Linear(lm_dim, vis_dim)] + [copy.deepcopy(deep) for _ in range(depth - 1)])

    def vision(self, i):
        return self.proj[i](self.text[i])  # (n_ctx, Dv)


class MaPLeViT(ViT):
    """The tower with MaPLe's vision prompts after its tokens in the first J blocks; their outputs are dropped."""

    def forward(self, pixels, layer=-1, norm=False):
        n = layer % (self.cfg.n_layers + 1)
        x = self.embed(pixels)  # (B, N, Dv)
        N = x.shape[1]
        for i, blk in enumerate(self.blocks[:n]):
            if i < len(self.maple.proj):  # appended at block 0, then replacing the previous block's prompts
                p = self.maple.vision(i).to(x.dtype).expand(x.shape[0], -1, -1)  # (B, n_ctx, Dv)
                x = torch.cat([x[:, :N], p], dim=1)  # (B, N + n_ctx, Dv)
            x = run_block(blk, x, recompute=self.grad_checkpoint)
        x = x[:, :N]  # (B, N, Dv)
        return self.norm(x) if norm else x


class MaPLeInputPrompt(nn.Module):
    """Layer 0's language prompts, as input tokens before the text (VLM.prompts: f(B) -> (B, n_ctx, d))."""

    def __init__(self, maple):
        super().__init__()
        self.maple = (maple,)  # a tuple, not a submodule: the prompts are registered once, in the tower

    def forward(self, B):
        return self.maple[0].text[0].expand(B, -1, -1)


class MaPLeDeepPrompt(MaPLeInputPrompt):
    """Layer i's language prompts replacing the previous layer's at [offset, offset + n_ctx) (a Block.pre seam);
    decoding steps after the prompt (a filled KV cache) hold no prompt positions and pass unchanged."""

    def __init__(self, maple, *, layer, offset=0):
        super().__init__(maple)
        self.layer, self.offset = layer, offset

    def forward(self, x, ctx):
        if ctx.cache is not None and ctx.cache.pos > 0:
            return x
        p = self.maple[0].text[self.layer].to(x.dtype).expand(x.shape[0], -1, -1)  # (B, n_ctx, d)
        return torch.cat([x[:, :self.offset], p, x[:, self.offset + p.shape[1]:]], dim=1)  # (B, T, d)


def apply_maple(model, *, n_ctx=2, depth=9, vision_blocks=None):
    """MaPLe's prompts in the first `depth` LM and tower layers (the official depth 9, 2 context tokens).
    The generative adaptation: MaPLe tunes CLIP for classification, its language prompts in the *text encoder*
    among class-name tokens, and only the pooled embeddings meet (cosine logits). A generative VLM has no text
    encoder: the language prompts go into the LLM (VLM.prompts, before the text, like prompt tuning) with deep
    replacements in its first J layers, the coupled vision prompts into the first J tower layers, their tower
    outputs are dropped so that the fusion sees the tower's usual tokens, and the LM's next-token loss trains both
    sides."""
    n_vis = len(model.vision.blocks) if vision_blocks is None else vision_blocks
    if not 1 <= depth <= min(len(model.lm.blocks), n_vis):
        raise ValueError(f"maple_depth={depth} must be between 1 and the layers both run: {len(model.lm.blocks)} in "
                         f"the LM, {n_vis} in the tower")
    if hasattr(model.fusion, 'image_features'):
        raise ValueError(f"maple: fusion {type(model.fusion).__name__} reads the tower its own way "
                         f"(image_features), so MaPLe's vision prompts would never run")
    ref = next(model.vision.parameters())
    maple = MaPLePrompts(model.lm.cfg.dim, model.vision.cfg.dim, n_ctx=n_ctx, depth=depth).to(ref.device, ref.dtype)
    model.vision.__class__ = MaPLeViT
    model.vision.maple = maple  # in the tower, so that the VLM runs the tower with autograd (and caches nothing)
    offset = model.fusion.prefix(torch.zeros(1, dtype=torch.bool)).shape[1] if hasattr(model.fusion, 'prefix') else 0
    model.prompts['maple'] = MaPLeInputPrompt(maple)
    for i in range(1, depth):
        model.lm.blocks[i].pre.insert(0, MaPLeDeepPrompt(maple, layer=i, offset=offset))
    return ('vision.maple.',)

# Deviations from the reference code
# - All language prompts start N(0, 0.02^2); MaPLe initialises the first layer's from "a photo of a" (we have no
#   text encoder to put them in).
# - The first vision prompts join after the tower's embeddings (after CLIP's pre-LayerNorm; MaPLe: before it).
# - MaPLe's prompts must be the last PEFT prompts added (they sit right after the fusion's prefix).

# -----------------------------------------------------------------------------
# Head tuning: PETAL's baseline (melonking32/PETAL train.py, train_mode 'head': the names holding '11', 'bert' and
# 'intermediate', i.e. the first FFN linear of the Q-Former's last layer, query and text branches). Ours tunes the
# first FFN linear of the last layer of the target: the Q-Former's fc1 (+ text_fc1 with an instruction branch), or
# the LM's last block's gate (up for MPT, whose MLP is not gated).


def apply_head_tuning(model, *, target='auto'):
    if target == 'auto':
        target = 'qformer' if hasattr(model.fusion, 'qformer') else 'lm'
    if target == 'qformer':
        if not hasattr(model.fusion, 'qformer'):
            raise ValueError(f"head_target='qformer' needs a fusion with a Q-Former (fusion='qformer'); "
                             f"{type(model.fusion).__name__} has none: use head_target='lm'")
        i = len(model.fusion.qformer.layers) - 1
        # the Q-Former is what is tuned; a new projection still trains, a loaded one (InstructBLIP's) stays frozen
        model.fusion.trainable = () if getattr(model.fusion, 'pretrained_proj', False) else ('fusion.proj.',)
        return (f'fusion.qformer.layers.{i}.fc1.',) + \
            ((f'fusion.qformer.layers.{i}.text_fc1.',) if hasattr(model.fusion.qformer.layers[i], 'text_fc1') else ())
    if target == 'lm':
        i = len(model.lm.blocks) - 1
        return (f"lm.blocks.{i}.ffn.{'gate' if model.lm.blocks[i].ffn.gate is not None else 'up'}.",)
    raise ValueError(f"head_target must be 'auto', 'qformer' or 'lm', not {target!r}")

# Deviations from the reference code: with a Q-Former whose projection into our LM is new (not loaded from an
# InstructBLIP checkpoint with its own LM), that projection trains too; PETAL's InstructBLIP keeps its pretrained
# t5_proj frozen, as we do when it is loaded.
# -----------------------------------------------------------------------------
# PETAL: Zhai et al. 2023, "When Parameter-efficient Tuning Meets General-purpose Vision-language Models"
# (arXiv 2312.12458). Reference: melonking32/PETAL lavis/models/blip2_models/Qformer_PETAL_MOE.py
# (BertSelfAttention, BertLayer, BertModel), blip2_t5_instruct_petal_moe.py (the shared factors), train.py.
#
#   mode approximation, on q / k / v of every attention layer (one mode vector lambda (R, 1) each):
#       y = W x + V( Dropout0.1(U x) M ),   M[i, j] = sum_k C[i, j, k] lambda[k]        U: in -> R, V: R -> out (0)
#       U, V, C (R x R x R) shared by all layers; cross-attention k / v use a second set on the image features
#   per layer:       out <- out + 0.1 (a * gamma + beta)      a = the self-attention sub-layer's output
#   embeddings:      e <- 0.6 e + 0.4 mean_j Up_j(Down_j(e))  6 low-rank experts, no router
#
# Target: the Q-Former (as the paper: fusion='qformer'), or, our extension, the LM's attention (q / k / v of every
# block; a = the block's normed post-attention stream ffn_norm(x), the pre-norm counterpart of BERT's
# LayerNorm(x + attn(x)); the experts on the LM's input embeddings, before block 0).


class PETALFactors(nn.Module):
    """U, V, C of one side, shared by every projection that reads it (R = rank)."""

    def __init__(self, in_dim, out_dim, rank):
        super().__init__()
        self.U = nn.Linear(in_dim, rank, bias=False)  # default init
        self.V = nn.Linear(rank, out_dim, bias=False)
        self.C = nn.Parameter(torch.empty(rank, rank, rank))
        nn.init.zeros_(self.V.weight)  # zero: the projections start as the frozen ones
        nn.init.xavier_uniform_(self.C)


class PETALLinear(nn.Module):
    def __init__(self, base, factors, *, dropout=0.1):
        super().__init__()
        self.base = base
        self.petal_mode = nn.Parameter(torch.empty(factors.C.shape[0], 1))
        nn.init.xavier_uniform_(self.petal_mode)
        self.drop = nn.Dropout(dropout)
        self.factors = (factors,)  # a tuple: shared factors are registered once, on the target module

    def delta(self, x):
        f = self.factors[0]
        M = (f.C @ self.petal_mode)[..., 0]  # (R, R, 1) -> (R, R)
        return f.V(self.drop(f.U(x)) @ M)  # (..., out)

    def forward(self, x):
        return self.base(x) + self.delta(x)


class PETALScaleShift(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.petal_scale = nn.Parameter(torch.empty(dim).normal_(std=2e-4))
        self.petal_shift = nn.Parameter(torch.empty(dim).normal_(std=2e-4))

    def forward(self, a, ctx=None):
        return (0.1 * (a * self.petal_scale + self.petal_shift)).to(a.dtype)  # float32 parameters, bf16 activations


class PETALExperts(nn.Module):
    """The 'adaptive instruction MoE': experts Linear(d -> r) -> Linear(r -> d) with biases, averaged."""

    def __init__(self, dim, *, n=6, rank=64):
        super().__init__()
        self.petal_down = nn.ModuleList(nn.Linear(dim, rank) for _ in range(n))
        self.petal_up = nn.ModuleList(nn.Linear(rank, dim) for _ in range(n))
        for m in (*self.petal_down, *self.petal_up):  # BERT's init (BertModel.init_weights reaches them)
            nn.init.normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)

    def forward(self, x, ctx=None):
        experts = sum(up(down(x)) for down, up in zip(self.petal_down, self.petal_up)) / len(self.petal_down)
        return 0.6 * x + 0.4 * experts


class PETALBatchContext(nn.Module):
    """The released code's BertLayer quirk: after each cross-attention, query 0 gains 0.1 x the batch mean of
    query 0's self-attention output (so a sample's output depends on its batch)."""

    def forward(self, q, q_in):
        return torch.cat([q[:, :1] + 0.1 * q_in[:, 0].mean(0), q[:, 1:]], dim=1)  # (B, Q, dim)


def apply_petal(model, *, target='auto', rank=64, dropout=0.1, experts=6, expert_rank=64, batch_context=True,
                ib=False):
    if target == 'auto':
        target = 'qformer' if hasattr(model.fusion, 'qformer') else 'lm'
    if target == 'qformer':
        if not hasattr(model.fusion, 'qformer'):
            raise ValueError(f"petal_target='qformer' needs a fusion with a Q-Former (fusion='qformer'); "
                             f"{type(model.fusion).__name__} has none: use petal_target='lm'")
        qf = model.fusion.qformer
        dim = qf.query.shape[-1]
        xattns = [layer.xattn for layer in qf.layers if layer.xattn is not None]
        qf.petal_factors = nn.ModuleDict({'text': PETALFactors(dim, dim, rank)} |
                                         ({'image': PETALFactors(xattns[0].k.in_features, dim, rank)} if xattns else {}))
        for layer in qf.layers:
            for attn, kv in ((layer.attn, 'text'), (layer.xattn, 'image')):
                if attn is not None:
                    attn.q = PETALLinear(attn.q, qf.petal_factors['text'], dropout=dropout)
                    attn.k = PETALLinear(attn.k, qf.petal_factors[kv], dropout=dropout)
                    attn.v = PETALLinear(attn.v, qf.petal_factors[kv], dropout=dropout)
            if layer.xattn is not None and batch_context:
                layer.xattn_out.append(PETALBatchContext())
            layer.side.append(PETALScaleShift(dim))
        qf.embed_out.append(PETALExperts(dim, n=experts, rank=expert_rank))
        # the Q-Former is what PETAL tunes; a new projection still trains, a loaded one (InstructBLIP's) stays frozen
        model.fusion.trainable = () if getattr(model.fusion, 'pretrained_proj', False) else ('fusion.proj.',)
        target_module, ref = qf, qf.query
    elif target == 'lm':
        lm, cfg = model.lm, model.lm.cfg
        q_out, kv_out = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
        lm.petal_factors = nn.ModuleDict({'q': PETALFactors(cfg.dim, q_out, rank)} |
                                         ({'kv': PETALFactors(cfg.dim, kv_out, rank)} if kv_out != q_out else {}))
        kv = lm.petal_factors['kv' if kv_out != q_out else 'q']  # grouped-query k / v are narrower than q
        for blk in lm.blocks:
            blk.attn.q = PETALLinear(blk.attn.q, lm.petal_factors['q'], dropout=dropout)
            blk.attn.k = PETALLinear(blk.attn.k, kv, dropout=dropout)
            blk.attn.v = PETALLinear(blk.attn.v, kv, dropout=dropout)
            blk.ffn_side.append(PETALScaleShift(cfg.dim))
        lm.blocks[0].pre.insert(0, PETALExperts(cfg.dim, n=experts, rank=expert_rank))  # on the input embeddings
        target_module, ref = lm, lm.embed.weight
    else:
        raise ValueError(f"petal_target must be 'auto', 'qformer' or 'lm', not {target!r}")
    target_module.to(ref.device, ref.dtype)  # the new parameters on the target's device and dtype
    if ib:
        if target != 'qformer':
            raise ValueError("petal_ib=True needs petal_target='qformer' (the bottleneck is on the Q-Former's output)")
        apply_petal_ib(model)
    return ('petal_',)

# Deviations from the reference code
# - The released BertLayer also creates CP_scalecross / CP_shiftcross (18,432 numbers at BERT-base) whose addition
#   is commented out; they are left out (tests/test_peft_adapters.py counts both).
# - The experts act on the Q-Former's embeddings after their dropout, as the code; its instruction tokens reach
#   them only when the VLM hands the Q-Former an instruction (fusion.py's InstructBLIP note).
# - With a KV cache LAVIS's k / v of the cached part get no update; our Q-Former never caches.
# - The information-bottleneck loss is not in the released model: petal_ib (next section) adds the authors' variant.

# -----------------------------------------------------------------------------
# PETAL's information-bottleneck term (petal_ib=True). Not in the released model (blip2_t5_instruct_petal_moe.py
# returns the LM loss alone); the authors' variant ships only as bytecode, lavis/models/blip2_models/__pycache__/
# blip2_t5_instruct_aurora_information_bottleneck.cpython-310.pyc, built on the released source of its estimators,
# model_loader_modify.py (ModelWrapper, CLUBSample, MINE). Read from that bytecode (python3.10 -m dis):
#   Wrapper = ModelWrapper(num_cluster=len(t5 tokenizer)); every 'weight' xavier_normal_, every 'bias' 0
#   para_info = nn.Parameter(tensor(0.0)), trained
#   loss = lm_loss + para_info * Wrapper(image_embeds, qformer_output[:, :Q], targets)
#   Wrapper: I_zy = CLUB(mean_q Z, mean_t onehot(Y)), I_xz = MINE(mean_n X, mean_q Z), returns I_zy - 0.1 I_xz
# with X = ln_vision(ViT(image)) (the Q-Former's image input), Z its query outputs, Y the target tokens.


class PETALInfoBottleneck(nn.Module):
    def __init__(self, vis_dim, dim, vocab, *, beta=0.1):
        super().__init__()
        self.petal_club_mu = nn.Sequential(nn.Linear(dim, 32), nn.ReLU(), nn.Linear(32, vocab))       # CLUBSample,
        self.petal_club_logvar = nn.Sequential(nn.Linear(dim, 32), nn.ReLU(), nn.Linear(32, vocab), nn.Tanh())  # 32
        self.petal_mine = nn.Sequential(nn.Linear(vis_dim + dim, 64), nn.ReLU(), nn.Linear(64, 1))  # MINE, 64 wide
        for name, p in self.named_parameters():
            (nn.init.xavier_normal_ if 'weight' in name else nn.init.zeros_)(p)
        self.petal_info = nn.Parameter(torch.tensor(0.0))  # para_info: the term's learned weight, starting at 0
        self.beta, self.vocab, self.seen = beta, vocab, []

    def record(self, qformer, args, z):  # forward hook on the Q-Former: its image input and query outputs
        if torch.is_grad_enabled():
            self.seen[:] = [(args[0], z)]

    def forward(self, labels):
        """para_info * (I(Z; Y) upper bound - beta I(X; Z) lower bound), 0 for a batch without images."""
        if not self.seen:
            return 0.0
        (x, z), self.seen[:] = self.seen[0], []
        keep = (labels != -100).float()  # (B, T): the answer tokens; y = their mean one-hot (B, vocab), scattered
        y = torch.zeros(len(labels), self.vocab, device=labels.device).scatter_add_(1, labels.clamp(min=0), keep)
        y = y / keep.sum(1, keepdim=True).clamp(min=1)
        x, z = x.float().mean(1), z.float().mean(1)  # (B, Dv), (B, dim)
        mu, logvar = self.petal_club_mu(z), self.petal_club_logvar(z)  # CLUBSample.forward
        neg = y[torch.randperm(len(y), device=y.device)]
        i_zy = ((-(mu - y) ** 2 + (mu - neg) ** 2) / (logvar.exp() + 1e-6)).sum(-1).mean() / 2
        t0 = self.petal_mine(torch.cat([x, z], -1))  # MINE.forward: Donsker-Varadhan with shuffled z
        t1 = self.petal_mine(torch.cat([x, z[torch.randint(len(z), (len(z),), device=z.device)]], -1)).view(-1)
        i_xz = t0.mean() - (torch.logsumexp(t1, 0) - math.log(len(t1)))
        return self.petal_info * (i_zy - self.beta * i_xz)


def apply_petal_ib(model):
    qf = model.fusion.qformer
    ib = PETALInfoBottleneck(qf.petal_factors['image'].U.in_features, qf.query.shape[-1], model.lm.cfg.vocab_size)
    model.aux_losses['petal'] = ib.to(qf.query.device)
    qf.register_forward_hook(ib.record)

# Deviations from the authors' code: Y is the bag of answer tokens (their T5 targets also count padding, as class
# 0); under gradient accumulation the term is added once per micro-batch; validation losses leave it out.

# -----------------------------------------------------------------------------
# Applying a config's PEFT methods (fusion.build_vlm calls this). A method owns the config keys that carry its
# name as a prefix (lora_r, lora_alpha, ...) and gets them without it; it names the parameters that train by
# default, and build_vlm refuses a `trainable` override that freezes all of them.

METHODS = ('lora', 'ia3', 'prompt_tuning', 'llama_adapter', 'bias_scale', 'adapters', 'clip_adapter', 'maple', 'head',
           'petal')


def names(cfg):
    """The PEFT methods a config asks for: peft='' (none), 'lora', ..., or several joined by '+'."""
    chosen = [n for n in cfg.get('peft', '').split('+') if n]
    unknown = [n for n in chosen if n not in METHODS]
    if unknown:
        raise ValueError(f"unknown peft method {unknown[0]!r} in peft={cfg['peft']!r}; one of: {', '.join(METHODS)}")
    return chosen


DECODER_ONLY = ('ia3', 'llama_adapter', 'bias_scale', 'adapters', 'maple')  # they use model.Decoder's blocks and seams


def apply(model, cfg):
    """Apply the config's PEFT methods to a VLM; returns {method: parameter-name patterns that train by default}."""
    trains = {}
    vision_blocks = cfg.get('vision_layer', -1) % (len(model.vision.blocks) + 1)  # the tower blocks the VLM runs
    for name in names(cfg):
        own = {k[len(name) + 1:]: v for k, v in cfg.items() if k.startswith(name + '_')}
        if getattr(model.lm, 'is_encoder_decoder', False) and (name in DECODER_ONLY or own.get('target') == 'lm'):
            raise ValueError(f"peft={name!r} acts on a decoder-only LM's blocks, but init_lm is an encoder-decoder "
                             f"(T5); on InstructBLIP-FlanT5 use lora (with path targets), prompt_tuning, head, "
                             f"petal or clip_adapter")
        if name == 'lora':
            apply_lora(model, **own)
            trains[name] = ('lora_',)
        elif name == 'ia3':
            apply_ia3(model, **own)
            trains[name] = ('ia3_',)
        elif name == 'prompt_tuning':
            tok = None
            if own.get('init_text'):  # the LM's own tokenizer, with BOS when it adds one (as HF's tokenizer(text))
                import data
                from model import resolve
                t = data.Tokenizer(resolve(cfg['init_lm']))
                tok = functools.partial(t.encode, bos=t.add_bos)
            apply_prompt_tuning(model, tokenizer=tok, **own)
            trains[name] = ('prompt_tuning.',)
        elif name == 'llama_adapter':
            apply_llama_adapter(model.lm, **own)
            trains[name] = ('llama_adapter_',)
        elif name == 'bias_scale':
            apply_bias_scale(model, **own)
            trains[name] = ('bias_scale_', 'attn_norm.', 'ffn_norm.', 'lm.norm.')  # + the LM's RMSNorms
        elif name == 'adapters':
            trains[name] = apply_adapters(model, vision_blocks=vision_blocks, **own)
        elif name == 'clip_adapter':
            trains[name] = apply_clip_adapter(model, **own)
        elif name == 'maple':
            trains[name] = apply_maple(model, vision_blocks=vision_blocks, **own)
        elif name == 'head':
            trains[name] = apply_head_tuning(model, **own)
        elif name == 'petal':
            trains[name] = apply_petal(model, **own)
    return trains

# -----------------------------------------------------------------------------
# Shared helpers


def mark_trainable(model, patterns):
    """requires_grad = True exactly for parameters whose name contains one of `patterns`
    ('fusion.', 'lora_', 'lm.', ...); everything else is frozen. Returns the trainable count."""
    n = 0
    for name, p in model.named_parameters():
        p.requires_grad_(any(s in name for s in patterns))
        n += p.numel() if p.requires_grad else 0
    if n == 0:
        raise ValueError(f"trainable patterns {patterns} match no parameter")
    return n


def trainable_state_dict(model):
    """Only what trains: what a checkpoint needs on top of the public base weights."""
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def load_trainable_state_dict(model, state, where='checkpoint', *, partial=False):
    """Load a trainable_state_dict back. The checkpoint must hold exactly the model's trainable
    parameters with the same shapes: anything else means it came from a different model / method.
    partial=True (a stage-1 checkpoint starting stage 2): trainable parameters it lacks keep their init."""
    params = dict(model.named_parameters())
    want = set() if partial else {n for n, p in params.items() if p.requires_grad}
    unknown = sorted(set(state) - set(params))
    missing = sorted(want - set(state))
    shapes = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(params[k].shape)}"
              for k, v in state.items() if k in params and v.shape != params[k].shape]
    if unknown or missing or shapes:
        raise ValueError(f"{where} does not match this model (built from a different config?):"
                         + (f"\n  not in the model: {', '.join(unknown[:8])}" if unknown else '')
                         + (f"\n  trainable but not in the checkpoint: {', '.join(missing[:8])}" if missing else '')
                         + (f"\n  wrong shape: {'; '.join(shapes[:8])}" if shapes else ''))
    with torch.no_grad():
        for k, v in state.items():
            params[k].copy_(v)


def merge(model):
    """Fold every linear update (LoRA, DoRA, IA3, bias / scale) into its base weight (for export or faster
    inference); a second call does nothing. Prompts and LLaMA-Adapter stay as they are (not linear in W)."""
    for m in reversed(list(model.modules())):  # a wrapper after the ones inside it: W <- outer(inner(W))
        if isinstance(m, LinearWrapper):
            m.merge()
    return model
