"""
Parameter-efficient fine-tuning: one section per method, plus the helpers every method shares
(`mark_trainable`, `trainable_state_dict`, `merge`). PEFT modules replace or wrap nn.Linear layers
(LoRA / DoRA, IA3, bias / scale), add tokens (prompt tuning, through the VLM's `prompts` seam) or change the
attention (LLaMA-Adapter); any of them combines with any fusion method (fusion.py).
"""

import fnmatch
import functools
import math
import re

import torch
import torch.nn as nn
import torch.nn.functional as F

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
# Applying a config's PEFT methods (fusion.build_vlm calls this). A method owns the config keys that carry its
# name as a prefix (lora_r, lora_alpha, ...) and gets them without it; it names the parameters that train by
# default, and build_vlm refuses a `trainable` override that freezes all of them.

METHODS = ('lora', 'ia3', 'prompt_tuning', 'llama_adapter', 'bias_scale')


def names(cfg):
    """The PEFT methods a config asks for: peft='' (none), 'lora', ..., or several joined by '+'."""
    chosen = [n for n in cfg.get('peft', '').split('+') if n]
    unknown = [n for n in chosen if n not in METHODS]
    if unknown:
        raise ValueError(f"unknown peft method {unknown[0]!r} in peft={cfg['peft']!r}; one of: {', '.join(METHODS)}")
    return chosen


def apply(model, cfg):
    """Apply the config's PEFT methods to a VLM; returns {method: parameter-name patterns that train by default}."""
    trains = {}
    for name in names(cfg):
        own = {k[len(name) + 1:]: v for k, v in cfg.items() if k.startswith(name + '_')}
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
