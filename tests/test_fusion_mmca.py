"""DeepSpeed-VisualChat fusion (fusion.py DSVLProjection, mmca_masks, MMCAAttention): the two masks on hand-made
sequences, the attention against an explicit computation of its formula and of the official code's arithmetic,
KV-cache generation and left padding, the LLaMA-7B / CLIP-L parameter count, and train.py with the recipe."""
import json
import math
import runpy
import sys

import pytest
import torch
import torch.nn.functional as F

import peft
from conftest import ROOT, randomize, rel_err
from fusion import DSVLProjection, MMCAAttention, build_vlm, mmca_masks, use_mmca
from model import IMAGE_TOKEN, VLM, Attention, Ctx, Decoder, KVCache, LMConfig, ViT, ViTConfig

I = IMAGE_TOKEN


def small_lm():
    return Decoder(LMConfig(vocab_size=8, dim=8, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=4, ffn_dim=8))


# The hand-made batch: row 0 = (text, image, image, text, text); row 1 = (pad, text, image, image, text),
# left-padded. Written out by hand: R[q][k] = 1 where query q may attend to key k.
IS_IMAGE = torch.tensor([[0, 1, 1, 0, 0], [0, 0, 1, 1, 0]]).bool()
PAD_MASK = torch.tensor([[1, 1, 1, 1, 1], [0, 1, 1, 1, 1]]).bool()
M_IMG = torch.tensor([
    [[0, 0, 0, 0, 0],    # text before any image: no image key (an empty row, see MMCAAttention (b))
     [0, 1, 0, 0, 0],    # image: only itself
     [0, 0, 1, 0, 0],    # image: only itself (not the image token before it)
     [0, 1, 1, 0, 0],    # text: both earlier image tokens
     [0, 1, 1, 0, 0]],
    [[0, 0, 0, 0, 0],    # padding
     [0, 0, 0, 0, 0],    # text before the image: empty row
     [0, 0, 1, 0, 0],
     [0, 0, 0, 1, 0],
     [0, 0, 1, 1, 0]]]).bool()
M_TXT = torch.tensor([
    [[1, 0, 0, 0, 0],    # text: itself
     [1, 0, 0, 0, 0],    # image: the text before it (edge case (a), as the official code)
     [1, 0, 0, 0, 0],
     [1, 0, 0, 1, 0],    # text: earlier text and itself, not the image tokens
     [1, 0, 0, 1, 1]],
    [[1, 0, 0, 0, 0],    # padding sees only itself (the decoder's convention: no empty softmax row)
     [0, 1, 0, 0, 0],    # real tokens never see the padding
     [0, 1, 0, 0, 0],
     [0, 1, 0, 0, 0],
     [0, 1, 0, 0, 1]]]).bool()


def test_masks_on_a_hand_made_sequence():
    mask = small_lm().attn_mask(2, 5, 0, PAD_MASK, 'cpu')  # causal + left padding, as Decoder.forward builds it
    m_img, m_txt = mmca_masks(IS_IMAGE, 5, mask)
    assert m_img.shape == m_txt.shape == (2, 1, 5, 5)
    assert torch.equal(m_img[:, 0], M_IMG) and torch.equal(m_txt[:, 0], M_TXT)
    m_img, m_txt = mmca_masks(IS_IMAGE[:1], 5)  # no decoder mask: plain causal
    assert torch.equal(m_img[:, 0], M_IMG[:1]) and torch.equal(m_txt[:, 0], M_TXT[:1])
    # a decode step: one new text token at position 5 sees the cached image keys and text keys
    is_image = F.pad(IS_IMAGE, (0, 1))
    mask = small_lm().attn_mask(2, 1, 5, F.pad(PAD_MASK, (0, 1), value=True), 'cpu')
    m_img, m_txt = mmca_masks(is_image, 1, mask)
    assert m_img[:, 0, 0].int().tolist() == [[0, 1, 1, 0, 0, 0], [0, 0, 1, 1, 0, 0]]
    assert m_txt[:, 0, 0].int().tolist() == [[1, 0, 0, 1, 1, 1], [0, 1, 0, 0, 1, 1]]


def reference(q, k, v, masks):
    """The formula written out: sum over the boolean masks of softmax(q k^T / sqrt(hd) + mask) V, where a row
    with no admissible key contributes nothing. GQA by repeating each kv head for its group of query heads."""
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)  # (B, nh, S, hd)
    s = q.double() @ k.double().transpose(-1, -2) / math.sqrt(q.shape[-1])  # (B, nh, T, S)
    out = 0
    for m in masks:
        p = torch.softmax(s.masked_fill(~m[:, None], -math.inf), dim=-1).nan_to_num(0.0)  # empty row -> 0
        out = out + p @ v.double()
    return out


def attend(q, k, v, is_image, pad_mask=None):
    lm = small_lm()
    B, T = is_image.shape
    ctx = Ctx(cos=None, sin=None, mask=lm.attn_mask(B, T, 0, pad_mask, 'cpu'), media={'image_mask': is_image})
    return MMCAAttention(lm.cfg, 0).attend(q, k, v, ctx)


def test_attention_equals_the_formula_with_gqa():
    q, k, v = torch.randn(2, 4, 5, 4), torch.randn(2, 2, 5, 4), torch.randn(2, 2, 5, 4)  # 4 query heads, 2 kv heads
    out = attend(q, k, v, IS_IMAGE, PAD_MASK)
    assert rel_err(out, reference(q, k, v, [M_IMG, M_TXT])) < 1e-6
    # the two distributions really are normalised separately: a text row after the images carries weight 2
    ones = attend(q, k, torch.ones_like(v), IS_IMAGE, PAD_MASK)
    assert torch.allclose(ones[0, :, 3:], torch.full_like(ones[0, :, 3:], 2.0))
    assert torch.allclose(ones[0, :, 0], torch.ones_like(ones[0, :, 0]))  # text before any image: weight 1


def official(q, k, v, types):
    """DeepSpeed-VisualChat's arithmetic (modeling_llama.py, re-computed here): types 0 pad / 1 text / 2 image;
    additive masks at finfo.min for the wrong key type (image rows: everything but the diagonal in the image
    mask), each added to the causal mask (0 / finfo.min); two float32 softmaxes, summed."""
    B, S = types.shape
    lo = torch.finfo(torch.float32).min
    causal = torch.full((S, S), lo).triu(1)  # (S, S): 0 on and below the diagonal
    img = torch.where(types == 2, 0.0, lo)[:, None, :].expand(B, S, S).clone()  # (B, S, S)
    for b, j in (types == 2).nonzero().tolist():
        img[b, j] = lo
        img[b, j, j] = 0.0
    txt = torch.where(types == 1, 0.0, lo)[:, None, :].expand(B, S, S)
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    return sum(torch.softmax(s + (m + causal)[:, None], dim=-1) @ v for m in (img, txt))


def test_edge_cases_against_the_official_arithmetic():
    """(a) image rows see earlier text: as the official code. (b) rows with no admissible key: the official
    arithmetic spreads a uniform weight over the row's past keys of the wrong type AND its future keys of the
    right type (a leak); we give that distribution zero weight. Everywhere else the two agree."""
    q, k, v = torch.randn(1, 4, 5, 4), torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4)
    types = torch.tensor([[1, 2, 2, 1, 1]])
    ours, ref = attend(q, k, v, types == 2), official(q, k, v, types)
    assert rel_err(ours[:, :, 1:], ref[:, :, 1:]) < 1e-5  # rows 1-4 have keys in both masks: identical
    # row 0 (text before the image): the official image term is the plain mean of V over key 0 (its own past,
    # text) and keys 1, 2 (future image tokens); ours has no image term there
    vr = v.repeat_interleave(2, dim=1)
    assert torch.allclose(ref[:, :, 0] - ours[:, :, 0], vr[:, :, :3].mean(2), atol=1e-5)
    assert torch.allclose(ours[:, :, 0], vr[:, :, 0], atol=1e-6)  # ours: only its text distribution (itself)
    # an image first in the sequence: the official image rows average over the answer text after them
    types = torch.tensor([[2, 2, 1, 1, 1]])
    ours, ref = attend(q, k, v, types == 2), official(q, k, v, types)
    assert torch.allclose(ref[:, :, 0] - ours[:, :, 0], vr[:, :, [0, 2, 3, 4]].mean(2), atol=1e-5)


def test_without_images_it_is_plain_causal_attention():
    """No image token: M_img admits no key on any row, so (decision (b)) the image distribution contributes
    nothing and M_txt is the causal mask: exactly the plain attention. (The official arithmetic would add the
    running mean of V to every row instead.)"""
    q, k, v = torch.randn(2, 4, 5, 4), torch.randn(2, 2, 5, 4), torch.randn(2, 2, 5, 4)
    lm = small_lm()
    plain = {}
    for pad_mask in (None, PAD_MASK):
        ctx = Ctx(cos=None, sin=None, mask=lm.attn_mask(2, 5, 0, pad_mask, 'cpu'))
        plain[pad_mask is None] = Attention(lm.cfg, 0).attend(q, k, v, ctx)
        assert rel_err(attend(q, k, v, torch.zeros(2, 5, dtype=torch.bool), pad_mask), plain[pad_mask is None]) < 1e-6
    ref = official(q, k, v, torch.ones(2, 5, dtype=torch.long))
    running_mean = v.repeat_interleave(2, dim=1).cumsum(2) / torch.arange(1, 6)[:, None]  # (B, nh, T, hd)
    assert torch.allclose(ref - plain[True], running_mean, atol=1e-5)


# -----------------------------------------------------------------------------
# the whole model on the tiny stand-ins (conftest `tiny`)

def config(tiny, **kw):
    cfg = dict(init_vision=tiny['clip'], init_lm=tiny['lm'], fusion='mmca', mmca_attention=True, vision_layer=-1,
               vision_norm=False, vision_feature='cls_patch', lora_r=0, trainable=('fusion.',))
    cfg.update(kw)
    return cfg


@pytest.fixture(scope='module')
def vlms(tiny):
    """MMCA and the same model with plain causal attention (same weights), random enough to tell them apart."""
    pytest.importorskip('transformers')
    torch.manual_seed(0)
    on = randomize(build_vlm(config(tiny)).eval(), std=0.3)
    off = build_vlm(config(tiny, mmca_attention=False)).eval()
    off.load_state_dict(on.state_dict())
    return on, off


def prompt(text_before, n_img, text_after):
    return [5 + i % 40 for i in range(text_before)] + [I] * n_img + [50 + i % 40 for i in range(text_after)]


def test_built_model_and_ablation(vlms):
    on, off = vlms
    assert all(type(b.attn) is MMCAAttention for b in on.lm.blocks)
    assert all(type(b.attn) is Attention for b in off.lm.blocks)
    assert on.state_dict().keys() == off.state_dict().keys()  # MMCA adds no parameters
    assert isinstance(on.fusion, DSVLProjection) and on.fusion.norm.eps == 1e-12
    n = on.fusion.n_tokens(on.vision.n_tokens(32))
    assert n == 17  # CLS + 4 x 4 patches
    ids = torch.tensor([prompt(4, n, 6)])
    feats = torch.randn(1, 17, 32)
    with torch.no_grad():
        a, b = on(ids, feats=feats), off(ids, feats=feats)
        assert rel_err(a, b) > 0.1  # the attention pattern matters ...
        text = torch.tensor([prompt(10, 0, 6)])
        plain = on.lm.logits(on.lm(text))
        assert rel_err(on(text, feats=feats, has_image=torch.tensor([False])), plain) < 1e-5  # ... but not without images
        assert rel_err(off(text, feats=feats, has_image=torch.tensor([False])), plain) < 1e-5


def test_kv_cache_generation_equals_the_full_forward(vlms):
    model, _ = vlms
    ids = torch.tensor([prompt(3, 17, 5), prompt(6, 17, 2)])
    feats = torch.randn(2, 17, 32)
    new = model.generate(ids, feats=feats, max_new_tokens=6)  # prefill + 6 decode steps through the KV cache
    full = torch.cat([ids, new], dim=1)
    with torch.no_grad():
        x, media = model.embed(full, feats)
        h_full = model.lm(embeds=x, media=media)  # (B, T + 6, d), one pass, masks from the whole sequence
        assert torch.equal(model.lm.logits(h_full[:, ids.shape[1] - 1:-1]).argmax(-1), new)
        # hidden states step by step: the types of the cached keys come from the prefill's media
        x, media = model.embed(ids, feats)
        cache = KVCache(model.lm.cfg, 2, full.shape[1], x.dtype, 'cpu')
        hs = [model.lm(embeds=x, cache=cache, media=media)]
        for t in range(new.shape[1]):
            hs.append(model.lm(new[:, t:t + 1], cache=cache, media=media))
    assert rel_err(torch.cat(hs, dim=1), h_full) < 1e-5


def test_left_padded_batch_equals_each_row_alone(vlms):
    import data
    model, _ = vlms
    rows = [prompt(2, 17, 3), prompt(7, 17, 5), prompt(4, 0, 2)]  # the last one has no image
    has_image = torch.tensor([True, True, False])
    feats = torch.randn(3, 17, 32)
    ids, mask = data.left_pad(rows, pad_id=0)

    def prefill(ids, mask, feats, has_image):  # what Decoder.stream does before the first token
        with torch.no_grad():
            x, media = model.embed(ids, feats, has_image)
            pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
            return model.lm(embeds=x, pos=pos, pad_mask=None if mask.all() else mask, media=media)

    h = prefill(ids, mask, feats, has_image)
    new = model.generate(ids, pad_mask=mask, feats=feats, has_image=has_image, max_new_tokens=5)
    for i, r in enumerate(rows):
        one = torch.tensor([r])
        f = feats[i:i + 1] if has_image[i] else None
        h1 = prefill(one, torch.ones_like(one, dtype=torch.bool), f, has_image[i:i + 1])
        assert rel_err(h[i, -len(r):], h1[0]) < 1e-5
        assert torch.equal(new[i], model.generate(one, feats=f, max_new_tokens=5)[0])


def test_trainable_parameters_llama7b_clip_l():
    """CLIP ViT-L/14 (224 px) + LLaMA-7B on the meta device. The projection: 1024 x 4096 + 4096 (Linear) +
    2 x 4096 (LayerNorm) = 4,206,592. The official recipe also trains the input word embedding
    (32000 x 4096 = 131,072,000; a few more rows there for its added special tokens): 135,278,592."""
    with torch.device('meta'):
        vision, lm = ViT(ViTConfig()), Decoder(LMConfig())
        model = VLM(vision, lm, DSVLProjection(vision.cfg.dim, lm.cfg.dim, select='cls_patch'))
    keys = set(model.state_dict())
    use_mmca(lm)
    assert set(model.state_dict()) == keys  # no new parameters, no new keys
    assert model.fusion.n_tokens(vision.n_tokens(224)) == 257
    assert peft.mark_trainable(model, ('fusion.',)) == 4_206_592
    assert peft.mark_trainable(model, ('fusion.', 'lm.embed.')) == 135_278_592


def test_recipe_takes_two_steps(tiny, shapes_json, tmp_path, monkeypatch):
    """config/mmca_llava.py builds and trains with the tiny stand-ins for CLIP-L/14 and LLaMA-2-7B."""
    pytest.importorskip('transformers')
    from safetensors.torch import load_file
    monkeypatch.setattr(sys, 'argv', ['train.py', str(ROOT / 'config' / 'mmca_llava.py'), f'--init_vision={tiny["clip"]}',
                                      f'--init_lm={tiny["lm"]}', f'--data_root={shapes_json}', '--image_root=',
                                      f'--out_dir={tmp_path}', '--max_iters=2', '--batch_size=2', '--global_batch=2',
                                      '--template=qwen2', '--dtype=float32', '--eval_iters=1', '--max_len=128',
                                      '--device=cpu', '--log_interval=1'])
    g = runpy.run_path(str(ROOT / 'train.py'), run_name='__main__')
    assert g['step'] == 2 and g['fusion'] == 'mmca' and g['n_image_tokens'] == 17
    assert (g['learning_rate'], g['warmup_ratio'], g['beta2'], g['trainable']) == (1e-3, 0.1, 0.95, ('fusion.', 'lm.embed.'))
    assert all(type(b.attn) is MMCAAttention for b in g['raw_model'].lm.blocks)
    ls = [r['loss'] for r in map(json.loads, open(tmp_path / 'log.jsonl')) if 'loss' in r]
    assert len(ls) == 2 and all(math.isfinite(x) for x in ls)
    ckpt = torch.load(tmp_path / 'ckpt.pt', weights_only=True)
    assert set(ckpt['model']) == {'fusion.proj.weight', 'fusion.proj.bias', 'fusion.norm.weight', 'fusion.norm.bias',
                                  'lm.embed.weight'}
    assert ckpt['config']['mmca_attention'] is True
    start = load_file(f'{tiny["lm"]}/model.safetensors')['model.embed_tokens.weight']
    assert not torch.equal(ckpt['model']['lm.embed.weight'], start)  # the word embedding trained
