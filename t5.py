"""
T5 / FlanT5 encoder-decoder, written from scratch in plain PyTorch (its own file: model.py holds the decoder-only
family). Raffel et al. 2020 (arXiv 1910.10683), T5 v1.1 and FlanT5 (Chung et al. 2022, arXiv 2210.11416); parity
reference transformers models/t5/modeling_t5.py (T5ForConditionalGeneration).

  encoder: embed -> [x += SelfAttn(RMS(x)) ; x += FFN(RMS(x))] x L -> RMS         bidirectional position buckets
  decoder: embed -> [x += CausalSelfAttn(RMS(x)) ; x += CrossAttn(RMS(x), enc) ; x += FFN(RMS(x))] x L -> RMS
           -> (* d^-0.5 in T5 v1.0, whose head is tied) -> head
  attention: scores = q k^T (no 1/sqrt(d): folded into the init) + a learned bias per (head, position bucket), one
  table per stack (HF: in its first layer), shared by all its layers; cross-attention has no position bias.
  FFN: T5 v1.0 relu (wi -> relu -> wo), v1.1 / FlanT5 gated-gelu (wo(gelu_tanh(wi_0 x) * wi_1 x)).
  norm: T5LayerNorm = RMSNorm without mean or bias (model.RMSNorm).
Loading through an explicit key map (model.load_weights); greedy / sampled generation and beam search with a
self-attention KV cache and the cross-attention keys / values computed once. Inside a VLM (InstructBLIP-FlanT5) the
visual tokens and the prompt go to the encoder, the answer to the decoder (model.VLM.encdec_forward).
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import RMSNorm, act_fn, load_weights, read_config, resolve, run_block, sample


@dataclass
class T5Config:
    vocab_size: int = 32128
    dim: int = 768
    n_layers: int = 12
    n_dec_layers: int = 12
    n_heads: int = 12
    head_dim: int = 64
    ffn_dim: int = 2048
    gated: bool = True              # T5 v1.1 / FlanT5 gated-gelu; False: v1.0 relu
    act: str = 'gelu_tanh'
    num_buckets: int = 32
    max_distance: int = 128
    norm_eps: float = 1e-6
    tie_embeddings: bool = False    # v1.0 ties the head to the embeddings
    scale_output: bool = False      # v1.0 scales the decoder output by d^-0.5 before the head
    decoder_start_id: int = 0
    eos_id: int = 1
    pad_id: int = 0
    max_seq_len: int = 512          # prompt tokens eval.py keeps (relative positions have no limit; LAVIS cuts at 128)

    @staticmethod
    def from_hf(d):
        """HF T5Config dict (also nested as an InstructBLIP text_config)."""
        if 'text_config' in d and d.get('model_type') != 't5':
            d = d['text_config']
        if d.get('model_type') != 't5':
            raise ValueError(f"unknown encoder-decoder model_type {d.get('model_type')!r}; supported: t5")
        proj = d.get('feed_forward_proj', 'relu')
        gated, act = proj.startswith('gated-'), proj.split('-')[-1]
        act = {'gelu': 'gelu_tanh', 'relu': 'relu'}.get(act)  # HF maps gated-gelu to gelu_new (tanh)
        if gated and d.get('dense_act_fn'):  # what HF runs when the config names it (LAVIS: exact 'gelu')
            act = {'gelu_new': 'gelu_tanh', 'gelu_pytorch_tanh': 'gelu_tanh', 'gelu': 'gelu'}.get(d['dense_act_fn'])
        if act is None or (act != 'relu' and not gated):
            raise ValueError(f"T5 feed_forward_proj {proj!r} is not supported (only 'relu' and 'gated-gelu')")
        return T5Config(vocab_size=d['vocab_size'], dim=d['d_model'], n_layers=d['num_layers'],
                        n_dec_layers=d.get('num_decoder_layers') or d['num_layers'], n_heads=d['num_heads'],
                        head_dim=d['d_kv'], ffn_dim=d['d_ff'], gated=gated, act=act,
                        num_buckets=d.get('relative_attention_num_buckets', 32),
                        max_distance=d.get('relative_attention_max_distance', 128),
                        norm_eps=d.get('layer_norm_epsilon', 1e-6), tie_embeddings=d.get('tie_word_embeddings', True),
                        # hub configs carry only tie_word_embeddings (FlanT5: false); transformers 5 saves both
                        scale_output=d.get('scale_decoder_outputs', d.get('tie_word_embeddings', True) is not False),
                        decoder_start_id=d.get('decoder_start_token_id') or 0, eos_id=d.get('eos_token_id', 1),
                        pad_id=d.get('pad_token_id', 0))


def position_buckets(rel, bidirectional, num_buckets, max_distance):
    """T5's bucket of each relative position rel = key - query: exact below half the buckets, then logarithmic up
    to max_distance; the encoder gives the sign half of the buckets, the decoder sees only the past."""
    buckets = torch.zeros_like(rel)
    if bidirectional:
        num_buckets //= 2
        buckets += (rel > 0).long() * num_buckets
        rel = rel.abs()
    else:
        rel = -rel.clamp(max=0)
    exact = num_buckets // 2
    large = exact + (torch.log(rel.float() / exact) / math.log(max_distance / exact) * (num_buckets - exact)).long()
    return buckets + torch.where(rel < exact, rel, large.clamp(max=num_buckets - 1))


def position_bias(table, cfg: T5Config, start, T, S, *, bidirectional, device):
    """(1, nh, T, S) learned bias (table: (num_buckets, nh)) of queries start..start+T-1 against keys 0..S-1."""
    rel = torch.arange(S, device=device)[None, :] - torch.arange(start, start + T, device=device)[:, None]
    b = position_buckets(rel, bidirectional, cfg.num_buckets, cfg.max_distance)
    return table(b).permute(2, 0, 1)[None]


class T5Attention(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.cfg = cfg
        inner = cfg.n_heads * cfg.head_dim
        self.q, self.k, self.v = (nn.Linear(cfg.dim, inner, bias=False) for _ in range(3))
        self.o = nn.Linear(inner, cfg.dim, bias=False)

    def forward(self, x, bias, mem=None, cache=None):
        """x (B, T, d); bias (B or 1, nh, T, S) additive (position bias + mask); mem: the encoder output
        (cross-attention); cache: a dict holding this layer's keys / values, extended (self) or reused (cross)."""
        B, T, _ = x.shape
        nh, hd = self.cfg.n_heads, self.cfg.head_dim
        q = self.q(x).view(B, T, nh, hd).transpose(1, 2)  # (B, nh, T, hd)
        if cache is not None and 'k' in cache and mem is not None:
            k, v = cache['k'], cache['v']  # cross-attention: the encoder's keys / values, computed once
        else:
            src = x if mem is None else mem
            k = self.k(src).view(B, src.shape[1], nh, hd).transpose(1, 2)  # (B, nh, S, hd)
            v = self.v(src).view(B, src.shape[1], nh, hd).transpose(1, 2)
            if cache is not None:
                if mem is None and 'k' in cache:
                    k, v = torch.cat([cache['k'], k], 2), torch.cat([cache['v'], v], 2)
                cache['k'], cache['v'] = k, v
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), scale=1.0)  # T5: no 1/sqrt(hd)
        return self.o(y.transpose(1, 2).reshape(B, T, -1))


class T5FFN(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.act = cfg.act
        self.wi = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.wi_gate = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False) if cfg.gated else None  # HF wi_0; wi = wi_1
        self.wo = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)

    def forward(self, x):
        if self.wi_gate is None:
            return self.wo(F.relu(self.wi(x)))
        return self.wo(act_fn(self.act, self.wi_gate(x)) * self.wi(x))


class LayerCache:
    """One decoder layer's keys / values, each a dict {'k', 'v'}: self-attention's grow every step, cross-attention's
    are computed once. An object, not a dict: FSDP2 rebuilds the containers among a sharded block's arguments (to
    cast their tensors), which would lose what the block writes into them."""

    def __init__(self):
        self.self, self.cross = {}, {}


class T5Block(nn.Module):
    def __init__(self, cfg: T5Config, *, decoder):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = T5Attention(cfg)
        if decoder:
            self.xattn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
            self.xattn = T5Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn = T5FFN(cfg)

    def forward(self, x, bias, mem=None, mem_bias=None, cache=None):
        x = x + self.attn(self.attn_norm(x), bias, cache=None if cache is None else cache.self)
        if mem is not None:
            x = x + self.xattn(self.xattn_norm(x), mem_bias, mem=mem, cache=None if cache is None else cache.cross)
        return x + self.ffn(self.ffn_norm(x))


NEG = float('-inf')


class T5(nn.Module):
    """T5ForConditionalGeneration: encode(ids, mask) -> (B, S, d); decode(dec_ids, enc, enc_mask) -> logits."""

    is_encoder_decoder = True  # model.VLM: the prompt goes to encode(), the answer to decode()

    def __init__(self, cfg: T5Config):
        super().__init__()
        self.cfg = cfg
        self.grad_checkpoint = False  # recompute each block's activations in the backward (train.py's key)
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)  # HF shared, for both stacks
        # the position-bias tables, one per stack: HF keeps each in its stack's first layer; here they sit beside
        # the blocks, which FSDP shards one by one, since the bias is computed before the first block runs
        self.enc_rel = nn.Embedding(cfg.num_buckets, cfg.n_heads)
        self.dec_rel = nn.Embedding(cfg.num_buckets, cfg.n_heads)
        self.enc = nn.ModuleList(T5Block(cfg, decoder=False) for _ in range(cfg.n_layers))
        self.enc_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.dec = nn.ModuleList(T5Block(cfg, decoder=True) for _ in range(cfg.n_dec_layers))
        self.dec_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.head = None if cfg.tie_embeddings else nn.Linear(cfg.dim, cfg.vocab_size, bias=False)

    @property
    def blocks(self):
        """Every transformer block, encoder then decoder (train.py's FSDP units)."""
        return list(self.enc) + list(self.dec)

    def embed_tokens(self, ids):
        return self.embed(ids)  # T5 does not scale its embeddings

    @staticmethod
    def key_bias(mask, T):
        """(B, S) bool key mask (False = padding) -> (B, 1, T, S) additive."""
        return torch.zeros(mask.shape, device=mask.device).masked_fill(~mask.bool(), NEG)[:, None, None].expand(
            -1, 1, T, -1)

    def encode(self, ids=None, mask=None, *, embeds=None):
        """ids (B, S) or embeds (B, S, d) (InstructBLIP: query tokens + prompt), mask (B, S) -> (B, S, d)."""
        x = self.embed(ids) if embeds is None else embeds
        B, S, _ = x.shape
        bias = position_bias(self.enc_rel, self.cfg, 0, S, S, bidirectional=True, device=x.device)  # (1, nh, S, S)
        if mask is not None:
            bias = bias + self.key_bias(mask, S)
        for blk in self.enc:
            x = run_block(blk, x, bias, recompute=self.grad_checkpoint)
        return self.enc_norm(x)

    def decode(self, dec_ids, enc, enc_mask=None, cache=None):
        """Decoder logits (B, T, V) for dec_ids (B, T) after `cache['len']` cached positions."""
        x = self.embed(dec_ids)
        B, T, _ = x.shape
        start = cache['len'] if cache is not None else 0
        S = start + T
        bias = position_bias(self.dec_rel, self.cfg, start, T, S, bidirectional=False, device=x.device)  # (1, nh, T, S)
        causal = torch.arange(S, device=x.device)[None, :] <= torch.arange(start, S, device=x.device)[:, None]
        bias = bias.masked_fill(~causal, NEG)
        mem_bias = torch.zeros(B, 1, T, enc.shape[1], device=x.device) if enc_mask is None else \
            self.key_bias(enc_mask, T)
        for i, blk in enumerate(self.dec):
            x = run_block(blk, x, bias, enc, mem_bias, None if cache is None else cache['layers'][i],
                          recompute=self.grad_checkpoint and cache is None)
        if cache is not None:
            cache['len'] = S
        h = self.dec_norm(x)
        if self.cfg.scale_output:  # T5 v1.0 (tied head)
            h = h * self.cfg.dim ** -0.5
        return F.linear(h, self.embed.weight if self.head is None else self.head.weight)

    def forward(self, ids, dec_ids, mask=None):
        return self.decode(dec_ids, self.encode(ids, mask), mask)

    def new_cache(self):
        """The decoder's KV cache: 'len' cached positions, one LayerCache per decoder layer."""
        return {'len': 0, 'layers': [LayerCache() for _ in self.dec]}

    @torch.inference_mode()
    def stream(self, ids=None, mask=None, *, embeds=None, max_new_tokens=32, temperature=0.0, top_p=1.0,
               stop_ids=None, generator=None, all_done=None):
        """Yield the next token of every row, one (B,) tensor per step, from decoder_start_id, until every row has
        produced a stop token (default: eos; [] = none) or max_new_tokens; finished rows keep yielding their stop
        token. Greedy at temperature 0, else nucleus sampling (model.sample). ids (B, S) with mask (B, S) (False =
        padding, left or right: relative positions make both exact), or embeds (B, S, d) (the VLM's prompt).
        all_done(done (B,)) -> bool decides when to stop (FSDP: every rank, eval.run)."""
        enc = self.encode(ids, mask, embeds=embeds)
        B = enc.shape[0]
        stop = torch.tensor([self.cfg.eos_id] if stop_ids is None else (list(stop_ids) or [-1]), device=enc.device)
        cache = self.new_cache()
        tok = torch.full((B, 1), self.cfg.decoder_start_id, dtype=torch.long, device=enc.device)
        done = torch.zeros(B, dtype=torch.bool, device=enc.device)
        for _ in range(max_new_tokens):
            nxt = sample(self.decode(tok, enc, mask, cache)[:, -1].float(), temperature, top_p, generator)
            nxt = torch.where(done, stop[0], nxt)
            yield nxt
            done = done | torch.isin(nxt, stop)
            if all_done(done) if all_done is not None else bool(done.all()):
                return
            tok = nxt[:, None]

    def generate(self, ids=None, mask=None, *, num_beams=1, length_penalty=1.0, early_stopping=False, **kw):
        """(B, T_new) new tokens (decoder_start_id not included), rows that stopped early filled with their stop
        token; num_beams > 1: beam search (see beam_search), otherwise greedy / sampled (see stream)."""
        if num_beams > 1:
            return self.beam_search(ids, mask, num_beams=num_beams, length_penalty=length_penalty,
                                    early_stopping=early_stopping, **kw)
        return torch.stack(list(self.stream(ids, mask, **kw)), dim=1)

    @torch.inference_mode()
    def beam_search(self, ids=None, mask=None, *, embeds=None, num_beams, length_penalty=1.0, early_stopping=False,
                    max_new_tokens=32, stop_ids=None, temperature=0.0, top_p=1.0, generator=None, all_done=None):
        """Beam search as transformers' vectorised _beam_search, the same algorithm as model.Decoder.beam_search
        (which documents it), on the decoder: the encoder runs once per row and its output is repeated for the
        beams; each step keeps the top 2K continuations, finished hypotheses scored sum log p / len^length_penalty
        (len = new tokens, the stop token included). Returns (B, T_new), padded with the first stop id."""
        if temperature > 0:
            raise ValueError("beam search is deterministic here: temperature must be 0 (no beam sampling)")
        enc = self.encode(ids, mask, embeds=embeds)
        B, K, device = enc.shape[0], num_beams, enc.device
        enc = enc.repeat_interleave(K, dim=0)  # (B*K, S, d): row b's beams at b*K .. b*K + K - 1, as HF's expand
        mask = None if mask is None else mask.repeat_interleave(K, dim=0)
        stop_ids = [self.cfg.eos_id] if stop_ids is None else list(stop_ids)
        stop = torch.tensor(stop_ids or [-1], device=device)
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
        improvable = torch.ones(B, 1, dtype=torch.bool, device=device)
        rows = torch.arange(B, device=device)[:, None] * K  # (B, 1) first flat beam of each row
        cache = self.new_cache()
        tok = torch.full((B * K, 1), self.cfg.decoder_start_id, dtype=torch.long, device=device)
        for t in range(max_new_tokens):
            logp = torch.log_softmax(self.decode(tok, enc, mask, cache)[:, -1].float(), dim=-1)  # (B*K, V)
            V = logp.shape[-1]
            logp = (logp.view(B, K, V) + run_score[..., None]).view(B, K * V)
            top_lp, top_i = logp.topk(keep, dim=-1)  # (B, keep)
            parent, nxt = top_i // V, top_i % V
            cand = torch.take_along_dim(run_tok, parent[..., None], dim=1)  # (B, keep, max_new)
            cand[:, :, t] = nxt
            hit = torch.isin(nxt, stop) | (t + 1 == max_new_tokens)  # (B, keep)
            run_lp = top_lp + hit.float() * NEG  # the K best candidates that did not stop run on
            best = run_lp.topk(K, dim=-1).indices  # (B, K)
            run_tok, run_score = torch.take_along_dim(cand, best[..., None], 1), torch.take_along_dim(run_lp, best, 1)
            run_parent = torch.take_along_dim(parent, best, 1)
            just = hit & top_k_mask  # stopped candidates among the top K join the finished ones if good enough
            f = top_lp / ((t + 1) ** length_penalty)
            f = f + (fin_done.all(-1, keepdim=True) & (early_stopping is True)).float() * NEG
            f = f + (~improvable).float() * NEG + (~just).float() * NEG
            m_tok, m_score = torch.cat([fin_tok, cand], 1), torch.cat([fin_score, f], 1)
            m_len = torch.cat([fin_len, torch.full_like(nxt, t + 1)], 1)
            m_done = torch.cat([fin_done, just], 1)
            sel = m_score.topk(K, dim=-1).indices  # (B, K)
            fin_tok, fin_score = torch.take_along_dim(m_tok, sel[..., None], 1), torch.take_along_dim(m_score, sel, 1)
            fin_len, fin_done = torch.take_along_dim(m_len, sel, 1), torch.take_along_dim(m_done, sel, 1)
            n = max_new_tokens if early_stopping == 'never' and length_penalty > 0 else t + 1
            best_running = run_score[:, :1] / (n ** length_penalty)  # (B, 1) can it still beat the worst finished?
            worst = torch.where(fin_done, fin_score.min(-1, keepdim=True).values, NEG)  # (B, K)
            improvable = improvable & (best_running > worst).any(-1, keepdim=True)
            over = not bool(improvable.any()) or (bool(fin_done.all()) and early_stopping is True) or bool(hit.all())
            if all_done(torch.tensor([over], device=device)) if all_done is not None else over:
                break
            order = (run_parent + rows).flatten()  # each running beam continues its parent's self-attention cache
            for layer in cache['layers']:
                layer.self = {k: v.index_select(0, order) for k, v in layer.self.items()}
            tok = run_tok[:, :, t].reshape(B * K, 1)
        return fin_tok[:, 0, :int(fin_len[:, 0].max())]  # (B, T_new) the best hypothesis of each row

    @staticmethod
    def from_pretrained(name_or_path, dtype=torch.float32, device='cpu'):
        folder = resolve(name_or_path)
        cfg = T5Config.from_hf(read_config(folder))
        with torch.device('meta'):
            model = T5(cfg)
        load_weights(model, folder, t5_key_map(cfg), dtype=dtype, device=device,
                     renames=('', ('language_model.', '')),
                     ignore=('encoder.embed_tokens.weight', 'decoder.embed_tokens.weight', 'vision_model.', 'qformer.',
                             'query_tokens', 'language_projection.') + (('lm_head.weight',) if cfg.tie_embeddings else ()))
        return model.eval()


def t5_key_map(cfg: T5Config):
    """HF T5ForConditionalGeneration name -> ours."""
    m = {'shared.weight': 'embed.weight', 'encoder.final_layer_norm.weight': 'enc_norm.weight',
         'decoder.final_layer_norm.weight': 'dec_norm.weight',
         'encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight': 'enc_rel.weight',
         'decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight': 'dec_rel.weight'}
    if not cfg.tie_embeddings:
        m['lm_head.weight'] = 'head.weight'
    ffn = {'wi_0': 'wi_gate', 'wi_1': 'wi', 'wo': 'wo'} if cfg.gated else {'wi': 'wi', 'wo': 'wo'}
    for stack, ours, n in (('encoder', 'enc', cfg.n_layers), ('decoder', 'dec', cfg.n_dec_layers)):
        f = 2 if stack == 'decoder' else 1  # the FFN sub-layer's index
        for i in range(n):
            hf, o = f'{stack}.block.{i}.layer.', f'{ours}.{i}.'
            for p in 'qkvo':
                m[f'{hf}0.SelfAttention.{p}.weight'] = f'{o}attn.{p}.weight'
            m[f'{hf}0.layer_norm.weight'] = f'{o}attn_norm.weight'
            if stack == 'decoder':
                for p in 'qkvo':
                    m[f'{hf}1.EncDecAttention.{p}.weight'] = f'{o}xattn.{p}.weight'
                m[f'{hf}1.layer_norm.weight'] = f'{o}xattn_norm.weight'
            for a, b in ffn.items():
                m[f'{hf}{f}.DenseReluDense.{a}.weight'] = f'{o}ffn.{b}.weight'
            m[f'{hf}{f}.layer_norm.weight'] = f'{o}ffn_norm.weight'
    return m
