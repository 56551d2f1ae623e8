"""
Fusion methods: how visual features reach the language model. One section each, opened by its paper, its
reference code, a diagram or the equations and what trains, and closed by its deviations from the reference
code; `build_vlm(config)` at the bottom is the one place a config line picks a method.

The hooks a fusion may use (model.py knows nothing else about fusion methods):
  fusion(feats, has_image=, ids=) -> (tokens, media)    VLM.embed calls it on the tower's output feats
      (B, N, Dv) ((B*M, N, Dv) with M images per sample), has_image (B,) bool, ids (B, T) the input ids.
      tokens (B, n, d) or None: spliced into the token embeddings at the IMAGE_TOKEN placeholders;
      media: a dict every decoder block reads as ctx.media, at every generation step too.
  fusion.n_tokens(N)                  placeholders per image: the data expands each '<image>' into them
  fusion.trainable                    parameter-name patterns that train by default (build_vlm)
  fusion.image_features(vision, px)   optional: reads the tower its own way (LaVIN: the CLS of several blocks)
  fusion.prefix(has_image)            optional: (B, P, d) embeddings before every row (LaVIN's modality token)
  fusion.runs_without_images = True   optional: also called, with feats=None, for text-only batches (ADEM-VL)
  fusion.instruction_tokenizer        optional: a folder with the fusion's own tokenizer.json; the data then tokenizes
                                      each sample's instruction (its user text) in it, and the VLM passes
                                      fusion(..., instruction_ids=, instruction_mask=) (B, L) (InstructBLIP's Q-Former)
  fusion.decay_patterns               optional: the parameter names weight decay applies to (Flamingo)
  decoder Block seams (model.py)      pre: x <- f(x, ctx) before the layer (Flamingo); attn_in: a <- f(a, ctx)
                                      on the normed attention input (LaVIN); ffn_side: out += f(h, ctx) beside
                                      the FFN (ADEM-VL); attn.__class__: a subclass overriding `attend` (MMCA, LaVIN)
  ViTBlock seams (model.py)           attn_in: a <- f(a) (LaVIN); adapters: x += f(h) beside the MLP (ADEM-VL)
  Q-Former seams (for PEFT methods)   QFormer.embed_out: x <- f(x) on the embeddings; QFormerLayer.xattn_out:
                                      q <- f(q, q_in) after the cross-attention; QFormerLayer.side: out += f(a), a the
                                      self-attention output (peft.py's PETAL)
Empty seams add no parameters, no state-dict keys and no cost: the plain tower and LM load HF weights unchanged.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import IMAGE_TOKEN, Attention, Decoder, ViT, VLM, load_weights, read_config, resolve, run_block
import peft
from t5 import T5

# -----------------------------------------------------------------------------
# LLaVA-1.5 MLP projector
# Liu et al. 2023, "Improved Baselines with Visual Instruction Tuning" (arXiv 2310.03744).
# Reference: haotian-liu/LLaVA llava/model/multimodal_projector/builder.py ('mlp2x_gelu') and
# llava/model/multimodal_encoder/clip_encoder.py (select_layer -2, select_feature 'patch').


class SelectedTokens(nn.Module):
    """What LLaVA's and DS-VisualChat's projectors share: they map selected tower tokens one to one. `select`
    is LLaVA's select_feature (vision_feature): 'patch' drops the CLS token, 'cls_patch' keeps every token,
    'cls' (ours) keeps only the CLS token, one visual token per image for tight compute budgets."""

    trainable = ('fusion.',)  # parameter-name patterns that train by default (build_vlm)

    def __init__(self, select):
        super().__init__()
        if select not in ('patch', 'cls_patch', 'cls'):
            raise ValueError(f"vision_feature must be 'patch', 'cls_patch' or 'cls', not {select!r}")
        self.select = select

    def n_tokens(self, n_vis):
        return {'patch': n_vis - 1, 'cls_patch': n_vis, 'cls': 1}[self.select]

    def selected(self, feats):
        return {'patch': feats[:, 1:], 'cls_patch': feats, 'cls': feats[:, :1]}[self.select]  # (B, n, Dv)


class LLaVAProjector(SelectedTokens):
    """Linear(Dv -> d) -> GELU -> Linear(d -> d) on every selected token, PyTorch's default init as LLaVA. Stage 1
    trains only this module on captions (lr 1e-3, batch 256); stage 2 trains it with the LM (full, lr 2e-5, or
    LoRA r 128 / alpha 256, lr 2e-4) on instructions. CLIP ViT-L/14-336 at layer -2, 'patch': 576 tokens."""

    def __init__(self, vis_dim, lm_dim, *, select='patch', standardize=False):
        super().__init__(select)
        if standardize:  # ours (llava_standardize): a trained per-channel shift and scale of the tower feature
            self.in_shift = nn.Parameter(torch.zeros(vis_dim))  # train.py sets both from the training images'
            self.in_scale = nn.Parameter(torch.ones(vis_dim))   # features: -mean and 1 / std, before step 0
        self.fc1 = nn.Linear(vis_dim, lm_dim)
        self.fc2 = nn.Linear(lm_dim, lm_dim)

    def forward(self, feats, *, has_image=None, ids=None):
        x = self.selected(feats)  # (B, n, Dv)
        if hasattr(self, 'in_shift'):  # centred, unit-scale channels for fc1 (issue 12's easy-VQA recipe)
            x = (x + self.in_shift) * self.in_scale
        return self.fc2(F.gelu(self.fc1(x))), {}


def build_llava(vision, lm, *, select='patch', init='', standardize=False):
    """The LLaVA projector; with `init` (llava_init) a llava-hf checkpoint (hub id or folder) whose
    multi_modal_projector it loads: init_vision and init_lm may name the same checkpoint, a public LLaVA whole."""
    if init and standardize:
        raise ValueError("llava_standardize adds an input scaling that a loaded llava_init projector was not trained with")
    proj = LLaVAProjector(vision.cfg.dim, lm.cfg.dim, select=select, standardize=standardize)
    if init:
        folder = resolve(init)
        act = read_config(folder).get('projector_hidden_act', 'gelu')
        if act != 'gelu':
            raise ValueError(f"llava_init {init}: projector_hidden_act {act!r}; LLaVA-1.5's projector uses 'gelu'")
        key_map = {f'multi_modal_projector.linear_{i}.{p}': f'fc{i}.{p}' for i in (1, 2) for p in ('weight', 'bias')}
        load_weights(proj, folder, key_map, renames=('', ('model.', '')),  # newer saves: model.multi_modal_projector
                     ignore=('vision_tower.', 'language_model.', 'lm_head.', 'image_newline'))
    return proj

# Deviations from the reference code: select='cls' (the CLS token alone) and standardize (a per-channel input
# shift / scale set from the training features, then trained) are ours, for CPU budgets.

# -----------------------------------------------------------------------------
# BLIP-2 Q-Former, and MiniGPT-4 (the same Q-Former, frozen, with one trainable projection)
# Li et al. 2023, "BLIP-2" (arXiv 2301.12597). Reference: salesforce/LAVIS lavis/models/blip2_models/blip2.py
# (init_Qformer, ln_vision), Qformer.py (BertLayer), blip2_opt.py (stage 2); parity reference: transformers
# models/blip_2/modeling_blip_2.py (Blip2QFormerModel). Zhu et al. 2023, "MiniGPT-4" (arXiv 2304.10592):
# Vision-CAIR/MiniGPT-4 minigpt4/models/mini_gpt4.py.
#
#   tower feats (B, N, Dv) ──ln_vision──► keys / values ─────────┐ (every 2nd layer)
#   32 learned queries ─LN─► [self-attn ─► cross-attn ─► FFN] x 12 ─► proj ─► (B, 32, d) at the "<image>" slots
#
# Trains (QFormerFusion.trainable): ln_vision, the queries, the Q-Former and proj (BLIP-2 stage 2). MiniGPT-4:
# a pretrained BLIP-2 Q-Former (qformer_init) stays frozen and only proj trains (trainable=('fusion.proj.',)).
# Config: fusion='qformer', qformer_init / _dim / _layers / _heads / _queries; config/blip2_coco.py, minigpt4_coco.py.


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

    def forward(self, x, mem=None, p=0.0, mask=None):
        """mask (B, 1, 1, S) bool, True = key visible: the instruction's padding (InstructBLIP); None = all keys."""
        mem = x if mem is None else mem
        B, T, D = x.shape
        S, nh = mem.shape[1], self.n_heads
        q = self.q(x).view(B, T, nh, D // nh).transpose(1, 2)    # (B, nh, T, hd)
        k = self.k(mem).view(B, S, nh, D // nh).transpose(1, 2)  # (B, nh, S, hd)
        v = self.v(mem).view(B, S, nh, D // nh).transpose(1, 2)  # (B, nh, S, hd)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)  # the queries always see each other
        y = y.transpose(1, 2).reshape(B, T, D)  # (B, T, D)
        return self.norm(x + F.dropout(self.o(y), p, self.training))


class QFormerLayer(nn.Module):
    """Self-attention over the queries (and InstructBLIP's instruction tokens after them), cross-attention of the
    queries alone to the image (only in layers that have one), then the queries' own FFN (LAVIS intermediate_query /
    output_query: Linear -> GELU -> Linear, post-LN); instruction tokens go through the text FFN (intermediate /
    output, `text_ffn`) instead."""

    def __init__(self, dim, n_heads, mlp_dim, *, vis_dim=None, eps=1e-12, text_ffn=False):
        super().__init__()
        self.attn = QFormerAttention(dim, n_heads, eps=eps)
        self.xattn = QFormerAttention(dim, n_heads, vis_dim, eps=eps) if vis_dim else None
        self.fc1 = nn.Linear(dim, mlp_dim)
        self.fc2 = nn.Linear(mlp_dim, dim)
        self.norm = nn.LayerNorm(dim, eps=eps)
        if text_ffn:
            self.text_fc1, self.text_fc2 = nn.Linear(dim, mlp_dim), nn.Linear(mlp_dim, dim)
            self.text_norm = nn.LayerNorm(dim, eps=eps)
        # seams for PEFT methods (peft.py's PETAL), empty by default
        self.xattn_out = nn.ModuleList()  # q <- f(q, q_in) after the cross-attention, q_in its input
        self.side = nn.ModuleList()       # out <- out + f(a), a the self-attention sub-layer's output

    def forward(self, x, img, p=0.0, n_queries=None, mask=None):
        a = self.attn(x, p=p, mask=mask)
        q, t = a[:, :n_queries], a[:, n_queries:]  # (B, Q, dim), (B, L, dim) the instruction (L = 0 without one)
        if self.xattn is not None:
            q_in, q = q, self.xattn(q, img, p=p)
            for f in self.xattn_out:
                q = f(q, q_in)
        out = self.norm(q + F.dropout(self.fc2(F.gelu(self.fc1(q))), p, self.training))
        if t.shape[1]:
            t = self.text_norm(t + F.dropout(self.text_fc2(F.gelu(self.text_fc1(t))), p, self.training))
            out = torch.cat([out, t], dim=1)  # (B, Q + L, dim)
        for f in self.side:
            out = out + f(a)
        return out


class QFormer(nn.Module):
    """The query path of BLIP-2's Querying Transformer: `n_queries` learned queries (1, Q, dim) through a
    LayerNorm (LAVIS BertEmbeddings.LayerNorm, HF qformer.layernorm) and `n_layers` BERT layers; layer i
    cross-attends to the image iff i % cross_attention_freq == 0. BERT-base sizes by default (768 wide, 12
    heads, FFN 3072, GELU, eps 1e-12, dropout 0.1). Dropout is active only while some Q-Former parameter
    trains (MiniGPT-4's `disabled_train` keeps a frozen one in eval mode). (B, N, vis_dim) -> (B, Q, dim)."""

    def __init__(self, vis_dim, *, dim=768, n_layers=12, n_heads=12, n_queries=32, mlp_dim=None,
                 cross_attention_freq=2, eps=1e-12, dropout=0.1, text_vocab=0, text_positions=512):
        super().__init__()
        if dim % n_heads:
            raise ValueError(f"Q-Former width {dim} is not a multiple of its {n_heads} heads (qformer_dim / qformer_heads)")
        self.cross_attention_freq, self.dropout = cross_attention_freq, dropout
        self.query = nn.Parameter(torch.empty(1, n_queries, dim))
        self.norm = nn.LayerNorm(dim, eps=eps)
        if text_vocab:  # InstructBLIP: the instruction's BERT word and position embeddings
            self.word = nn.Embedding(text_vocab, dim)
            self.word_pos = nn.Embedding(text_positions, dim)
        self.layers = nn.ModuleList(
            QFormerLayer(dim, n_heads, mlp_dim or 4 * dim, vis_dim=vis_dim if i % cross_attention_freq == 0 else None,
                         eps=eps, text_ffn=bool(text_vocab)) for i in range(n_layers))
        self.embed_out = nn.ModuleList()  # PEFT seam, empty by default: x <- f(x) on the embeddings (PETAL's experts)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        """BERT's init: Linear weights and the queries N(0, 0.02^2), biases 0, LayerNorms 1 / 0."""
        nn.init.normal_(self.query, std=0.02)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
                if isinstance(m, nn.Linear):
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, img, text=None, text_mask=None):
        """img (B, N, vis_dim); text (B, L) InstructBLIP's instruction ids in the Q-Former's own (BERT) vocabulary,
        right-padded with text_mask (B, L) (False = padding), or None (BLIP-2) -> the query outputs (B, Q, dim)."""
        train = self.training and any(q.requires_grad for q in self.parameters())
        p = self.dropout if train else 0.0
        B, Q = img.shape[0], self.query.shape[1]
        x = self.query.expand(B, -1, -1)  # (B, Q, dim)
        mask = None
        if text is not None:
            if not hasattr(self, 'word'):
                raise ValueError("this Q-Former has no text embeddings (BLIP-2's): it takes no instruction tokens")
            if text.shape[1] > self.word_pos.num_embeddings:
                raise ValueError(f"instruction of {text.shape[1]} tokens > the Q-Former's "
                                 f"{self.word_pos.num_embeddings} positions")
            pos = torch.arange(text.shape[1], device=text.device)  # the instruction's positions start at 0
            x = torch.cat([x, (self.word(text) + self.word_pos(pos)).to(x.dtype)], dim=1)  # (B, Q + L, dim)
            if text_mask is not None:  # keys: every query, the instruction's real tokens
                mask = F.pad(text_mask.bool(), (Q, 0), value=True)[:, None, None, :]  # (B, 1, 1, Q + L)
        x = F.dropout(self.norm(x), p, train)
        for f in self.embed_out:
            x = f(x)
        for layer in self.layers:
            x = layer(x, img, p, Q, mask)
        return x[:, :Q]  # (B, Q, dim)


class QFormerFusion(nn.Module):
    """BLIP-2 stage 2 (LAVIS blip2_opt.py): ln_vision (a LayerNorm; LAVIS puts it on EVA ViT-g's 39th of 40
    blocks) -> Q-Former -> Linear(dim -> d_LM) (LAVIS opt_proj, HF language_projection; PyTorch's default init).
    It reads every token the tower gives (CLS included, BLIP-2's 257; `vision_feature` does not apply); the
    BLIP-2 recipe takes CLIP ViT-L/14 at vision_layer -2 without the final norm (LAVIS's clip_L)."""

    trainable = ('fusion.',)  # ln_vision, queries, Q-Former, proj (MiniGPT-4 deviates: trainable=('fusion.proj.',))
    instruction_tokenizer = ''  # InstructBLIP: its checkpoint's qformer_tokenizer/ folder (build_qformer sets it)

    def __init__(self, vis_dim, lm_dim, *, dim=768, n_layers=12, n_heads=12, n_queries=32, mlp_dim=None,
                 cross_attention_freq=2, eps=1e-12, vis_eps=1e-5, dropout=0.1, text_vocab=0, text_positions=512):
        super().__init__()
        self.ln_vision = nn.LayerNorm(vis_dim, eps=vis_eps)  # LAVIS: nn.LayerNorm's default eps
        self.qformer = QFormer(vis_dim, dim=dim, n_layers=n_layers, n_heads=n_heads, n_queries=n_queries,
                               mlp_dim=mlp_dim, cross_attention_freq=cross_attention_freq, eps=eps, dropout=dropout,
                               text_vocab=text_vocab, text_positions=text_positions)
        self.proj = nn.Linear(dim, lm_dim)

    def n_tokens(self, n_vis):
        return self.qformer.query.shape[1]  # the queries, whatever the tower's token count

    def forward(self, feats, *, has_image=None, ids=None, instruction_ids=None, instruction_mask=None):
        """instruction_ids / instruction_mask (B, L): InstructBLIP's instruction in the Q-Former's (BERT) vocabulary,
        right-padded (None: BLIP-2, or an InstructBLIP Q-Former run on its queries alone)."""
        return self.proj(self.qformer(self.ln_vision(feats), instruction_ids, instruction_mask)), {}  # (B, Q, d_LM)

# Deviations from the reference code
# - Left out for BLIP-2: the Q-Former's text branch (word / position embeddings, the text FFN, the MLM head) and
#   the stage-1 losses that use it (ITC, ITM, ITG); stage 2 and MiniGPT-4 never give it text (blip2_opt.py and
#   mini_gpt4.py set those modules to None). InstructBLIP (Dai et al. 2023, arXiv 2305.06500; LAVIS
#   blip2_t5_instruct.py; parity reference transformers models/instructblip InstructBlipQFormerModel) keeps the
#   embeddings and the text FFN for its instruction tokens (QFormer text_vocab, fusion(..., instruction_ids=,
#   instruction_mask=)): the data tokenizes each sample's user text (LAVIS's text_input, also the LM's prompt) with
#   the checkpoint's qformer_tokenizer ([CLS] ... [SEP], at most 128 tokens as LAVIS's max_txt_len; data.
#   instruction_inputs). With an encoder-decoder LM (InstructBLIP-FlanT5) the visual tokens and the prompt go to
#   the T5 encoder and the answer to its decoder (model.VLM.encdec_forward).
# - Without qformer_init the Q-Former starts from BERT's init, not bert-base + stage 1 (Salesforce/blip2-itm-vit-g
#   is BLIP-2's stage-1 model): it needs more data.
# - The queries come after BOS ([BOS][queries] prompt); BLIP-2 prepends them ([queries][BOS] caption).
# - Every public BLIP-2 Q-Former cross-attends to 1408-wide EVA ViT-g features: init_vision = the same Blip2 /
#   InstructBLIP checkpoint loads that tower (model.py ViT kind 'eva'), with vision_norm=False (ln_vision here is
#   HF's post_layernorm, which the tower's own final norm also holds).

# -----------------------------------------------------------------------------
# BLIP-2 Q-Former weights, from a HF Blip2 checkpoint (Blip2ForConditionalGeneration, Blip2Model,
# Blip2ForImageTextRetrieval). HF's conversion renamed LAVIS's ln_vision to vision_model.post_layernorm and
# Qformer.bert.embeddings.LayerNorm to qformer.layernorm. language_projection maps into OPT's / FlanT5's
# embeddings, never into one of our LLMs, so it is left out (projection=False). A hub id downloads the whole
# checkpoint; a folder with config.json and a safetensors file holding query_tokens, qformer.* and
# vision_model.post_layernorm.* is enough.

BLIP2_IGNORE = ('vision_model.', 'language_model.', 'embeddings.', 'vision_projection.', 'text_projection.', 'itm_head.')


def blip2_key_map(n_layers, cross_attention_freq=2, *, projection=False, instruct=False):
    """HF Blip2 name -> our name inside QFormerFusion; instruct=True: HF InstructBLIP's (the embeddings' LayerNorm
    under qformer.embeddings, word / position embeddings and the text FFN for the instruction tokens)."""
    norm = 'qformer.embeddings.layernorm' if instruct else 'qformer.layernorm'
    m = {'query_tokens': 'qformer.query', f'{norm}.weight': 'qformer.norm.weight', f'{norm}.bias': 'qformer.norm.bias',
         'vision_model.post_layernorm.weight': 'ln_vision.weight', 'vision_model.post_layernorm.bias': 'ln_vision.bias'}
    if instruct:
        m.update({'qformer.embeddings.word_embeddings.weight': 'qformer.word.weight',
                  'qformer.embeddings.position_embeddings.weight': 'qformer.word_pos.weight'})
    if projection:
        m.update({'language_projection.weight': 'proj.weight', 'language_projection.bias': 'proj.bias'})
    layer = {'attention.attention.query': 'attn.q', 'attention.attention.key': 'attn.k',
             'attention.attention.value': 'attn.v', 'attention.output.dense': 'attn.o',
             'attention.output.LayerNorm': 'attn.norm',
             'intermediate_query.dense': 'fc1', 'output_query.dense': 'fc2', 'output_query.LayerNorm': 'norm'}
    if instruct:
        layer |= {'intermediate.dense': 'text_fc1', 'output.dense': 'text_fc2', 'output.LayerNorm': 'text_norm'}
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
    if d.get('model_type') not in ('blip-2', 'instructblip'):
        raise ValueError(f"qformer_init {name_or_path}: model_type {d.get('model_type')!r}, expected 'blip-2' or "
                         f"'instructblip' (a Hugging Face Blip2 / InstructBLIP checkpoint such as "
                         f"Salesforce/blip2-opt-2.7b, Salesforce/instructblip-flan-t5-xl)")
    q, v = d.get('qformer_config') or {}, d.get('vision_config') or {}
    if q.get('hidden_act', 'gelu') != 'gelu':
        raise ValueError(f"qformer_init {name_or_path}: Q-Former activation {q['hidden_act']!r}, expected 'gelu'")
    return dict(vis_dim=v.get('hidden_size', 1408), dim=q.get('hidden_size', 768), n_layers=q.get('num_hidden_layers', 12),
                n_heads=q.get('num_attention_heads', 12), n_queries=d.get('num_query_tokens', 32),
                mlp_dim=q.get('intermediate_size', 3072), cross_attention_freq=q.get('cross_attention_frequency', 2),
                eps=q.get('layer_norm_eps', 1e-12), vis_eps=v.get('layer_norm_eps', 1e-6),
                **(dict(text_vocab=q.get('vocab_size', 30522), text_positions=q.get('max_position_embeddings', 512))
                   if d['model_type'] == 'instructblip' else {}))


def load_blip2(fusion, name_or_path, *, projection=False, dtype=torch.float32, device='cpu'):
    """Copy a HF Blip2 checkpoint's query tokens, Q-Former and ln_vision (+ language_projection when
    projection=True) into `fusion` (a QFormerFusion of the checkpoint's shape, see blip2_config). Every one of
    those keys must be there with the right shape; the tower, the LLM and the text branch are skipped."""
    n, instruct = len(fusion.qformer.layers), hasattr(fusion.qformer, 'word')
    parts = {'ln_vision': fusion.ln_vision, 'qformer': fusion.qformer} | ({'proj': fusion.proj} if projection else {})
    text_ffn = () if instruct else tuple(f'qformer.encoder.layer.{i}.{name}.' for i in range(n)
                                         for name in ('intermediate', 'output'))
    load_weights(nn.ModuleDict(parts), resolve(name_or_path), blip2_key_map(n, fusion.qformer.cross_attention_freq,
                 projection=projection, instruct=instruct), dtype=dtype, device=device,
                 ignore=BLIP2_IGNORE + text_ffn + (() if projection else ('language_projection.',)))
    fusion.pretrained_proj = projection  # PEFT methods that tune the Q-Former then leave it frozen (PETAL, head)
    return fusion


def build_qformer(vis_dim, lm_dim, *, init='', dim=768, layers=12, heads=12, queries=32, projection=False):
    """QFormerFusion for the qformer_* keys: a new one of these sizes, or with `init` (qformer_init) a Blip2
    checkpoint's, whose sizes must agree with them, with its weights loaded; projection=True also loads its
    language_projection (build_vlm: when the LM is that checkpoint's own, init_lm == qformer_init)."""
    size = dict(dim=dim, n_layers=layers, n_heads=heads, n_queries=queries)
    if not init:
        return QFormerFusion(vis_dim, lm_dim, **size)
    kw = blip2_config(init)
    keys = dict(dim='qformer_dim', n_layers='qformer_layers', n_heads='qformer_heads', n_queries='qformer_queries')
    wrong = [f"{keys[k]}={v} but the checkpoint has {kw[k]}" for k, v in size.items() if kw[k] != v]
    if wrong:
        raise ValueError(f"qformer_init {init}: " + '; '.join(wrong))
    if kw['vis_dim'] != vis_dim:
        raise ValueError(f"qformer_init {init} cross-attends to {kw['vis_dim']}-wide image features (1408: EVA "
                         f"ViT-g), but the tower (init_vision) is {vis_dim} wide; a pretrained Q-Former needs a tower "
                         f"of its width (or leave qformer_init empty)")
    fusion = load_blip2(QFormerFusion(lm_dim=lm_dim, **kw), init, projection=projection)
    if 'text_vocab' in kw:  # InstructBLIP: the instruction goes through its own BERT tokenizer
        folder = resolve(init) / 'qformer_tokenizer'
        if not (folder / 'tokenizer.json').is_file():
            raise FileNotFoundError(f"qformer_init {init}: an InstructBLIP checkpoint needs qformer_tokenizer/"
                                    f"tokenizer.json (the Q-Former's BERT tokenizer for the instruction), not in {folder}")
        fusion.instruction_tokenizer = str(folder)
    return fusion

# -----------------------------------------------------------------------------
# Perceiver Resampler (Flamingo's; Jaegle et al. 2021's Perceiver cross-attention with learned latents)
# Reference: mlfoundations/open_flamingo src/helpers.py (PerceiverResampler, PerceiverAttention, FeedForward);
# parity reference: transformers models/idefics/perceiver.py (IdeficsPerceiverResampler).
#   any number of image tokens (B, N, D) ──[latents += Attn(media, latents); latents += FF] x depth──► (B, 64, D)


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


# -----------------------------------------------------------------------------
# Flamingo: Perceiver Resampler + gated cross-attention dense blocks
# Alayrac et al. 2022 (arXiv 2204.14198), as OpenFlamingo builds it (Awadalla et al. 2023, arXiv 2308.01390).
# Reference: mlfoundations/open_flamingo src/helpers.py (PerceiverResampler, MaskedCrossAttention,
# GatedCrossAttentionBlock), src/flamingo.py + src/flamingo_lm.py (media locations, cached media in
# generation, block placement), src/factory.py, train/train_utils.py (what trains, weight decay).
#
#   each image ──ViT──► patch tokens (N, Dv) ──PerceiverResampler──► latents (64, Dv)
#                                                                           │ k, v
#   text x ──► [GatedCrossAttentionBlock: x += tanh(a_attn) XAttn(LN(x), latents of the latest <image>)
#                                          x += tanh(a_ff) FF(x)]  ──► LM layer ──► ...
#   in the `pre` seam of every n-th LM layer (flamingo_every); "<image>" is one slot per image, and a token
#   sees the latents of the latest <image> at or before it (none before the first: output 0).
#
# Trains (Flamingo.trainable): the resampler, the learned "<image>" embedding and the gated blocks, whose gates
# start at 0 (the frozen LM is unchanged at step 0). Recipe: config/flamingo_coco.py.


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
    image it may see (text_time = cumsum(ids == <image>) along the row, minus 1). Returns (tokens, media): tokens
    (B*M, 1, d) the learned "<image>" embedding for the IMAGE_TOKEN slots; media = {'flamingo_latents': (B, M,
    n, Dv) the row's images in order, 'flamingo_image': (B, T) each token's image (-1 before the first),
    'flamingo_last': (B,) for decode steps}. The k-th "<image>" of a row goes with its k-th present image.
    drop_cls: the tower has a CLS token that is not a patch (CLIP, DINOv2): patch tokens only, as open_clip's."""

    trainable = ('fusion.', '.pre.')  # the resampler, the <image> embedding, the gated blocks in lm.blocks.*.pre
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


def attach_flamingo(vision, lm, *, every=1):
    """The Flamingo fusion, with gated cross-attention blocks before every `every`-th LM layer (flamingo_every)."""
    add_gated_cross_attention(lm, vision.cfg.dim, every=every)
    return Flamingo(vision.cfg.dim, lm.cfg.dim, drop_cls=vision.cfg.cls_token)


def add_gated_cross_attention(lm, vis_dim, *, every=1, **kw):
    """Append a GatedCrossAttentionBlock to the `pre` seam of the layers idx with (idx + 1) % every == 0
    (OpenFlamingo's placement: every=4 gives layers 3, 7, ..., 31 of a 32-layer LM). Returns their count."""
    if every < 1 or every > len(lm.blocks):
        raise ValueError(f"flamingo_every must be in 1..{len(lm.blocks)} (the LM's layers), not {every}")
    ref = lm.embed.weight
    n = 0
    for idx, blk in enumerate(lm.blocks):
        if (idx + 1) % every == 0:
            blk.pre.append(GatedCrossAttentionBlock(lm.cfg.dim, vis_dim, **kw).to(device=ref.device, dtype=ref.dtype))
            n += 1
    return n

# Deviations from the reference code
# - The vocabulary is not resized. OpenFlamingo adds "<image>" and "<|endofchunk|>" rows to the embeddings; here
#   "<image>" is one IMAGE_TOKEN slot filled with `image_embed` (init N(0, 0.02), what resize_token_embeddings
#   gave OpenFlamingo's new row) and "<|endofchunk|>" is the LM's own eos (data.py), whose input row stays frozen
#   (OpenFlamingo trains it), so the LM is unchanged on text-only input.
# - Not implemented: attending to all previous images (only_attend_immediate_media=False), v1's media-placement
#   augmentation, video frames. Like OpenFlamingo (max_num_media=None) and unlike the paper, no media-time
#   embeddings; the gated blocks go before layers with (idx + 1) % n == 0 (lucidrains': after idx % n == 0).

# -----------------------------------------------------------------------------
# DeepSpeed-VisualChat: a Linear + LayerNorm projection, and multi-modal causal attention (MMCA)
# Yao et al. 2023, "DeepSpeed-VisualChat" (arXiv 2309.14327). Reference: microsoft/DeepSpeedExamples
# applications/DeepSpeed-VisualChat/utils/model/modeling_dsvl.py (build_projection 'baseline'),
# utils/model/third_party_model/hf_model/modeling_llama.py (_expand_mask with enable_mmca_attention),
# training/training_scripts/run_7b.sh (hyperparameters: config/mmca_llava.py).
#
#   visual tokens: Linear + LayerNorm, spliced at the "<image>" slots as in LLaVA; in every LM layer, with the
#   layer's own q, k, v, o (no new parameters) and S = q k^T / sqrt(hd):
#       out = softmax(S + M_img) V + softmax(S + M_txt) V        (total weight 2 on a row with both)
#   M_img: earlier image keys (an image query: only itself); M_txt: earlier text keys.
#
# Trains (DSVLProjection.trainable): the projection; config/mmca_llava.py adds the LM's embeddings as the
# official recipe. Config: fusion='mmca', mmca_attention (False: the projection with plain causal attention).


class DSVLProjection(SelectedTokens):
    """DeepSpeed-VisualChat's `vis_proj baseline`: Linear(Dv -> d) then LayerNorm(d, eps 1e-12) on every visual
    token, PyTorch's default init. The official code feeds it every token of CLIP's last layer without the
    post-LayerNorm (vision_layer=-1, vision_norm=False, select='cls_patch'). It also returns
    media['image_mask'] (B, T) = ids == IMAGE_TOKEN, the token types MMCAAttention reads at every step."""

    def __init__(self, vis_dim, lm_dim, *, select='cls_patch'):
        super().__init__(select)
        self.proj = nn.Linear(vis_dim, lm_dim)
        self.norm = nn.LayerNorm(lm_dim, eps=1e-12)

    def forward(self, feats, *, has_image=None, ids=None):
        media = {} if ids is None else {'image_mask': ids == IMAGE_TOKEN}  # (B, T) bool
        return self.norm(self.proj(self.selected(feats))), media


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
    """Multi-modal causal attention (the equation above), built by swapping each block's Attention class
    (`use_mmca`): same parameters and state-dict keys. Token types come from media['image_mask'], set at the
    full forward / prefill; positions past it (generated tokens, read through the KV cache) are text. Without
    image_mask (a batch with no images) this is plain causal attention. SDPA twice with boolean masks (GQA
    through enable_gqa); a row with no admissible key in one mask is given every key (so the kernel never sees
    an all-masked row) and then zeroed: that distribution gets weight 0 (see the deviations below)."""

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


def attach_mmca(vision, lm, *, select='cls_patch', attention=True):
    """The DS-VisualChat projection, and MMCA in every LM layer unless attention=False (mmca_attention: the
    same projection with plain causal attention, the paper's ablation)."""
    if attention:
        use_mmca(lm)
    return DSVLProjection(vision.cfg.dim, lm.cfg.dim, select=select)

# Deviations from the reference code
# - A row with no admissible key in one mask (text before the first image in M_img, an image row with no text
#   before it in M_txt, every row of M_img in a text-only sample) gets zero weight from that distribution.
#   The official code adds causal and type masks at finfo.min, so such a row spreads a uniform weight over its
#   past keys of the wrong type and its FUTURE keys of the right type: the system prompt sees the image after
#   it, the value depends on the left padding, and a text-only sample adds the running mean of V to every
#   token instead of reducing to the plain LM. Rows where both masks admit a key match the official code
#   exactly (tests/test_fusion_mmca.py checks both statements against a re-computation of its arithmetic).
# - Followed, though the paper's figure differs: image rows also see the earlier text through M_txt.

# -----------------------------------------------------------------------------
# ADEM-VL: parameter-free cross-attention beside every FFN, multiscale visual prompts, adaptive fusion
# Hao et al. 2024 (arXiv 2410.17779). Reference: Hao840/ADEM-VL adem/model.py (Avg2dSampler, Projector,
# insert_image_embeds), adem/adapter.py (Adapter, forward_llama, forward_clip), adem/build.py (what trains).
#
#   CLIP (penultimate layer, ln_post) F (B, 1 + 256, Dv), ADEMViTAdapters in its blocks
#     |- F[:, 0] (CLS) -> proj_cls -> one token spliced after "Image: " in the prompt
#     '- F[:, 1:] -> scales (256, 64): the 16x16 grid as is + avg-pooled to 8x8 -> proj -> * beta * has_image = V
#   keys SiLU(V + e1), values V + e2 (media); in every LM layer, beside the FFN on X = ffn_norm(h):
#     S = SiLU(X) keys^T  (B, T, 320; no heads, no 1/sqrt(d), no softmax); the floor(drop_ratio * 320) lowest
#     of each row set to 0 ("adaptive fusion"); out = h + FFN(X) + alpha * S values
#   A text-only sample has V = 0: keys SiLU(e1), values e2 = 0 at init, so the frozen LM is unchanged at step 0.
#
# Trains (ADEMFusion.trainable; every official '*adapter*'): proj, proj_cls, e1, e2 and the CLIP adapters.
# Config: fusion='adem', adem_scales / _hidden / _beta / _alpha / _drop_ratio / _adapter_dim; config/adem_sqa.py.


class LowRankProjector(nn.Module):
    """Linear(in -> hidden) -> SiLU -> Linear(hidden -> out), xavier-uniform weights, zero biases
    (ADEM-VL's `Projector`, hidden_proj 128: the paper's low-rank projection; LaVIN's visual projector
    AdapterMLP in lavin/model.py is the same module)."""

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

    trainable = ('fusion.', '.adapters.')  # proj, proj_cls, e1, e2 and the CLIP adapters: every official '*adapter*'
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


def attach_adem(vision, lm, *, scales=(256, 64), hidden=128, beta=0.01, alpha=0.1, drop_ratio=0.1, adapter_dim=12):
    """Put ADEM-VL's modules into the seams, an ADEMViTAdapter in every tower block (adapter_dim 0: none) and
    one parameter-free ADEMCrossAttention in every decoder block's ffn_side, and return the ADEMFusion."""
    if not vision.cfg.cls_token:
        raise ValueError(f"fusion 'adem' needs a vision tower with a CLS token (CLIP, DINOv2), not {vision.cfg.kind}")
    w = vision.patch.weight
    if adapter_dim > 0:
        for blk in vision.blocks:
            blk.adapters.append(ADEMViTAdapter(vision.cfg.dim, adapter_dim).to(device=w.device, dtype=w.dtype))
    for blk in lm.blocks:
        blk.ffn_side.append(ADEMCrossAttention(alpha=alpha, drop_ratio=drop_ratio))
    return ADEMFusion(vision.cfg.dim, lm.cfg.dim, scales=scales, hidden=hidden, beta=beta)

# Deviations from the reference code: none in the arithmetic; its quirks are kept (the drop also runs at
# inference; text-only samples still get e1 / e2; the CLIP adapters' 0.1 is hard-coded; the last tower block's
# adapter is built and counted but never runs, as the tower stops at the penultimate block).

# -----------------------------------------------------------------------------
# LaVIN: Mixture-of-Modality Adaptation (MMA)
# Luo et al. 2023, "Cheap and Quick" (arXiv 2305.15023). Reference: luogen1996/LaVIN lavin/mm_adapter.py
# (RepAdapter_Router, set_MMAdapter, set_Clip_Adapter), lavin/model.py (AdapterMLP, the modality token and its
# mask), lavin/eval_model.py (decoding), lavin/mm_adaptation.py (what trains), scripts/finetuning_sqa_7b.sh.
#
#   sequence:  [m] [BOS] "Image: " v1 .. v6 " Question: ... Response:" "The answer is B. BECAUSE: ..." [EOS]
#   m = Embedding(2, d)[has_image], which no other token attends to: the routers read its hidden state
#   v_k = AdapterMLP(CLS token of CLIP after block 4k), k = 1..6 (no ln_post, no proj)
#   every LLaMA block: h = x + Attn(Router(attn_norm(x)));  every CLIP block: x = x + Attn(Router(ln_1(x)))
#   Router(a) = a + s * (w0 * B(drop(A a)) + w1 * D(drop(A a))),  w = softmax(W_r a[:, 0] / t)
#   A: d -> 8; B, D: 8 -> d block-diagonal (2 groups), zero-initialised: every router starts as the identity
#
# Trains (LaVIN.trainable; every official '*adapter*'): the routers, the projector, the modality embedding.
# Config: fusion='lavin', lavin_temperature (t); the recipe is config/lavin_sqa.py.


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
    """In a decoder block's `attn_in` seam: routed by a[:, 0], each row's first token, the (normed) modality
    token: the VLM puts it before the left padding (`LaVIN.prefix`), so column 0 holds it in training and
    generation. The full forward / prefill stores the weights in ctx.media under this layer's key; decode steps
    reuse them (lavin/eval_model.py's cache_weights)."""

    def __init__(self, dim, *, layer, **kw):
        super().__init__(dim, **kw)
        self.key = f'lavin_route_{layer}'

    def forward(self, a, ctx):
        if ctx.cache is None or ctx.cache.pos == 0:
            ctx.media[self.key] = self.route(a[:, 0])  # (B, 2): the normed modality token in this layer
        return self.adapt(a, ctx.media[self.key][:, None])  # weights (B, 1, 2), the same for every token


class LaVINTowerRouter(RepAdapterRouter):
    """In a ViT block's `attn_in` seam. clip/model.py runs its blocks as (tokens, batch, dim), so the same
    x[:, 0] is the FIRST IMAGE OF THE BATCH at each token position: every image is routed by the first image's
    tokens, position by position. Followed: an image's visual tokens depend on which image comes first in its
    batch (a text-only row carries a zero image, as in LaVIN), or with the feature cache on the first image of
    its 64-image chunk. At init the routers are the identity."""

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


class LaVIN(nn.Module):
    """The input side of LaVIN: CLS tokens of several tower blocks through LowRankProjector (LaVIN's AdapterMLP; spliced at the image
    placeholders), and the modality token (put before every row through `prefix`). `attach_lavin` builds it
    and puts the routers into the tower and the LM."""

    trainable = ('fusion.', 'attn_in.')  # projector, modality embedding, the routers: every official '*adapter*'

    def __init__(self, vision_cfg, lm_dim, *, n_visual=6, hidden_proj=128):
        super().__init__()
        if not vision_cfg.cls_token:
            raise ValueError(f"LaVIN reads the CLS token, which a {vision_cfg.kind} tower does not have")
        every = max(1, vision_cfg.n_layers // n_visual)
        self.layers = list(range(every, every * min(n_visual, vision_cfg.n_layers) + 1, every))  # ViT-L: 4, 8, .., 24
        self.proj = LowRankProjector(vision_cfg.dim, hidden_proj, lm_dim)  # LaVIN's adapter_proj (AdapterMLP)
        self.modality = nn.Embedding(2, lm_dim)  # LaVIN's adapter_modality_embedding (default N(0, 1) init)

    def n_tokens(self, n_vis):
        return len(self.layers)

    def image_features(self, vision, pixels):
        """The CLS token after each of self.layers' blocks (1-based), without the final norm: (B, 6, Dv)."""
        x = vision.embed(pixels)  # (B, 1 + N, Dv)
        cls = []
        for i, blk in enumerate(vision.blocks[:self.layers[-1]], start=1):
            x = run_block(blk, x, recompute=vision.grad_checkpoint)
            if i in self.layers:
                cls.append(x[:, 0])
        return torch.stack(cls, dim=1)  # (B, n_visual, Dv)

    def prefix(self, has_image):
        return self.modality(has_image.long())[:, None]  # (B, 1, d)

    def forward(self, feats, *, has_image=None, ids=None):
        return self.proj(feats), {}  # (B, n_visual, d)


def attach_lavin(vision, lm, *, temperature=10.0, hidden=8, scale=1.0):
    """Put a router into every tower block and every LM block (swapping the LM's attention for
    LaVINAttention) and return the LaVIN fusion module. New modules take each block's device and dtype, so
    this also works on meta-device models. What trains: the fusion and the routers ('fusion.', 'attn_in.')."""
    kw = dict(hidden=hidden, scale=scale, t=temperature)
    for blk in vision.blocks:
        blk.attn_in.append(LaVINTowerRouter(vision.cfg.dim, **kw).to(blk.norm1.weight))
    for i, blk in enumerate(lm.blocks):
        blk.attn_in.append(LaVINRouter(lm.cfg.dim, layer=i, **kw).to(blk.attn_norm.weight))
        blk.attn.__class__ = LaVINAttention  # same parameters and state-dict keys
    return LaVIN(vision.cfg, lm.cfg.dim)

# Deviations from the reference code
# - Decoding: lavin/eval_model.py drops the modality token from the KV cache and numbers decode positions
#   without it, so generated tokens sit one RoPE position closer to the prompt than in training. We keep the
#   modality key in the cache (masked): KV-cache decoding equals the full forward, as in training.
# - The 6 CLS tokens come after every (L // 6)-th block: blocks 4, 8, ..., 24 for ViT-L/14, exactly the code's
#   hard-coded (i + 1) % 4 == 0; other towers also give 6 (L when L < 6).
# - The official code runs in fp16 (routing weights cast to half); we use the run's dtype / autocast.
# - ScienceQA text: LaVIN SentencePiece-encodes "Image: ", the prompt and the answer separately; we tokenize the
#   whole text in one call (template 'base', image_slot 'Image: <image>', no_image_slot 'Image: N/A '), the same
#   tokens on a legacy LLaMA tokenizer.json. A missing "The answer is X" counts wrong (LaVIN: a random option).

# -----------------------------------------------------------------------------
# Building a VLM from a config dict (train.py, eval.py and sample.py all go through here). A method owns the
# config keys that carry its name as a prefix (adem_alpha, lora_r, ...): its build_vlm branch gets them without
# the prefix, as keyword arguments, and they define the model (a resumed run takes them from its checkpoint).
# Each fusion class names what trains by default (`trainable`), as each PEFT method does in peft.apply; the
# config's `trainable` is only for deviating from that (full fine-tuning, MiniGPT-4's frozen Q-Former).

FUSIONS = ('llava', 'qformer', 'flamingo', 'mmca', 'adem', 'lavin')
MODEL_KEYS = ('init_vision', 'init_lm', 'fusion', 'peft', 'vision_layer', 'vision_norm', 'vision_feature', 'trainable')


def method_of(key):
    """The fusion or PEFT method whose prefix a config key carries ('adem_alpha' -> 'adem'), or None."""
    return next((m for m in FUSIONS + peft.METHODS if key.startswith(m + '_')), None)


def method_keys(cfg, method):
    """The keys of `method` in cfg, without its prefix: {'alpha': 0.1, ...} for 'adem'."""
    return {k[len(method) + 1:]: v for k, v in cfg.items() if method_of(k) == method}


def arch_keys(cfg):
    """The config keys build_vlm reads for this config: the general model keys and the chosen methods' own."""
    chosen = (cfg['fusion'], *peft.names(cfg))
    return [k for k in cfg if k in MODEL_KEYS or method_of(k) in chosen]


def is_encoder_decoder(name_or_path):
    """Whether a checkpoint's language model is an encoder-decoder (T5; also nested as an InstructBLIP /
    BLIP-2 text_config): its config.json decides, as transformers' is_encoder_decoder."""
    d = read_config(resolve(name_or_path))
    return d.get('model_type') == 't5' or (d.get('text_config') or {}).get('model_type') == 't5'


def build_vlm(cfg, dtype=torch.float32, device='cpu'):
    """cfg keys: init_vision, init_lm (hub id or folder), fusion (one of FUSIONS), peft ('' | 'lora' | ..., see
    peft.apply), vision_layer, vision_norm, vision_feature, trainable (name patterns; () = the methods'
    defaults), and the chosen methods' own prefixed keys (train.py's globals document them)."""
    vision = ViT.from_pretrained(cfg['init_vision'], dtype=dtype, device=device)
    name, own = cfg['fusion'], method_keys(cfg, cfg['fusion'])
    if is_encoder_decoder(cfg['init_lm']):  # T5 / FlanT5, or InstructBLIP-FlanT5's language_model
        if name not in ('qformer', 'llava'):
            raise ValueError(f"fusion {name!r} works inside a decoder-only LM's layers, but init_lm {cfg['init_lm']} is "
                             f"an encoder-decoder LM (T5): use an input-level fusion, 'qformer' or 'llava'")
        lm = T5.from_pretrained(cfg['init_lm'], dtype=dtype, device=device)
    else:
        lm = Decoder.from_pretrained(cfg['init_lm'], dtype=dtype, device=device)
    select = cfg.get('vision_feature', 'patch') if vision.cfg.cls_token else 'cls_patch'  # SigLIP: no CLS token
    if name == 'llava':
        fusion = build_llava(vision, lm, select=select, **own)
    elif name == 'qformer':  # an InstructBLIP / BLIP-2 checkpoint that is also init_lm brings its LM's projection
        fusion = build_qformer(vision.cfg.dim, lm.cfg.dim, projection=bool(own.get('init')) and
                               own.get('init') == cfg['init_lm'], **own)
    elif name == 'flamingo':
        fusion = attach_flamingo(vision, lm, **own)
    elif name == 'mmca':
        fusion = attach_mmca(vision, lm, select=select, **own)
    elif name == 'adem':
        fusion = attach_adem(vision, lm, **own)
    elif name == 'lavin':
        fusion = attach_lavin(vision, lm, **own)
    else:
        raise ValueError(f"unknown fusion {name!r}; one of: {', '.join(FUSIONS)}")
    model = VLM(vision, lm, fusion.to(device=device, dtype=dtype), vision_layer=cfg['vision_layer'],
                vision_norm=cfg['vision_norm'])
    tuned = peft.apply(model, cfg)  # a PEFT method that tunes the fusion itself may narrow fusion.trainable
    defaults = {f"fusion {name!r}": fusion.trainable,  # method -> the patterns that train by default
                **{f"peft {m!r}": ps for m, ps in tuned.items()}}
    patterns = tuple(cfg.get('trainable') or ()) or tuple(p for ps in defaults.values() for p in ps)
    peft.mark_trainable(model, patterns)
    for method, ps in defaults.items():  # a method whose every parameter is frozen cannot learn: an error
        for p in ps:
            hit = [q.requires_grad for n, q in model.named_parameters() if p in n]
            if hit and not any(hit):
                raise ValueError(f"trainable={patterns} freezes every parameter of {method} matching {p!r} (it trains "
                                 f"by default); add {p!r}, or leave trainable=() for the methods' defaults")
    return model
