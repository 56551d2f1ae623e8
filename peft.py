"""
Parameter-efficient fine-tuning: one section per method, plus the helpers every method shares
(`mark_trainable`, `trainable_state_dict`, `merge`). PEFT modules replace or wrap nn.Linear layers
(LoRA) or add modules; any of them combines with any fusion method (fusion.py).
"""

import math

import torch
import torch.nn as nn

# -----------------------------------------------------------------------------
# LoRA: Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models" (arXiv 2106.09685).
# Reference: huggingface/peft src/peft/tuners/lora/layer.py (init, scaling, merge).
#
#        x ──► W (frozen) ───────────────┐
#        │                               ▼
#        └──► dropout ─► A (r x in) ─► B (out x r) ─► * alpha/r ─► (+) ─► y
#
# B starts at zero, so the wrapped model equals the base model at step 0.


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, *, r=8, alpha=8, dropout=0.0):
        super().__init__()
        self.base = base
        self.lora_A = nn.Linear(base.in_features, r, bias=False, device=base.weight.device, dtype=base.weight.dtype)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, device=base.weight.device, dtype=base.weight.dtype)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # nn.Linear's default, as peft
        nn.init.zeros_(self.lora_B.weight)
        self.scaling = alpha / r
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

    def forward(self, x):
        y = self.base(x)
        if self.merged:
            return y
        return y + self.lora_B(self.lora_A(self.drop(x))) * self.scaling

    def delta(self):
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling  # (out, in)

    @torch.no_grad()
    def merge(self):
        """W += scaling * B A; a second call does nothing."""
        if not self.merged:
            self.base.weight += self.delta().to(self.base.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if self.merged:
            self.base.weight -= self.delta().to(self.base.weight.dtype)
            self.merged = False


def apply_lora(model, *, targets=('q', 'v'), r=8, alpha=8, dropout=0.0):
    """Wrap every nn.Linear whose name ends with one of `targets` (our names: attn.q/k/v/o,
    ffn.gate/up/down). Returns the number of layers wrapped; none is an error."""
    hits = [(name, m) for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and name.split('.')[-1] in targets]
    if not hits:
        raise ValueError(f"LoRA targets {targets} match no nn.Linear in {type(model).__name__}")
    for name, m in hits:
        parent = model.get_submodule(name.rsplit('.', 1)[0]) if '.' in name else model
        setattr(parent, name.split('.')[-1], LoRALinear(m, r=r, alpha=alpha, dropout=dropout))
    return len(hits)

# -----------------------------------------------------------------------------
# Applying a config's PEFT methods (fusion.build_vlm calls this). A method owns the config keys that carry its
# name as a prefix (lora_r, lora_alpha, ...) and gets them without it; it names the parameters that train by
# default, and build_vlm refuses a `trainable` override that freezes all of them.

METHODS = ('lora',)


def names(cfg):
    """The PEFT methods a config asks for: peft='' (none), 'lora', or several joined by '+'."""
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
            apply_lora(model.lm, **own)
            trains[name] = ('lora_',)
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
    """Fold every LoRA update into its base weight (for export or faster inference)."""
    for m in model.modules():
        if isinstance(m, LoRALinear):
            m.merge()
    return model
