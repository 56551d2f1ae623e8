"""Flamingo (fusion.py) on tiny random models: the resampler against transformers' IDEFICS perceiver, shapes,
placement and what trains, zero gates, the media mask on hand-made interleaved sequences, KV-cache generation
with two images, the parameter count at LLaMA-7B / ViT-L/14 shapes, OpenFlamingo's interleaved labels, the
several-images-per-sample path through data -> eval.image_inputs -> VLM, and train.py with config/flamingo_coco.py."""
import copy
import json
import runpy
import sys

import pytest
import torch
import torch.nn as nn

import data
import eval as evaluate
import peft
from conftest import ROOT, randomize, rel_err, shape_image
from fusion import (Flamingo, GatedCrossAttentionBlock, PerceiverResampler, add_gated_cross_attention, build_vlm)
from model import IGNORE_INDEX, IMAGE_TOKEN, Ctx, Decoder, KVCache, LMConfig, ViT, ViTConfig, VLM

I = IMAGE_TOKEN


def small_vlm(*, every=2, n_layers=4, seed=0):
    """Random ViT (32 px, patch 8: 16 patches + CLS, width 32) + random 4-layer LLaMA (width 64) + a small
    Flamingo (8 latents, depth 2, 2 heads x 16)."""
    torch.manual_seed(seed)
    vit = randomize(ViT(ViTConfig(image_size=32, patch_size=8, dim=32, n_layers=2, n_heads=4, mlp_dim=64)), seed=seed)
    lm = randomize(Decoder(LMConfig(vocab_size=97, dim=64, n_layers=n_layers, n_heads=4, n_kv_heads=2, head_dim=16,
                                    ffn_dim=128, max_seq_len=64)), std=0.1, seed=seed)
    fusion = Flamingo(32, 64, num_latents=8, depth=2, heads=2, dim_head=16)
    add_gated_cross_attention(lm, 32, every=every, heads=2, dim_head=16)
    return VLM(vit, lm, fusion).eval()


def open_gates(model, attn=0.8, ff=0.5):
    with torch.no_grad():
        for blk in model.lm.blocks:
            for g in blk.pre:
                g.attn_gate.fill_(attn)
                g.ff_gate.fill_(ff)
    return model


def lm_alone(model):
    """The same decoder with its `pre` seams emptied."""
    lm = copy.deepcopy(model.lm)
    for blk in lm.blocks:
        blk.pre = nn.ModuleList()
    return lm


def feats_for(model, B, M, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        return model.image_features(torch.randn(B, M, 3, 32, 32, generator=g))  # (B, M, 17, 32)

# -----------------------------------------------------------------------------
# modules


def test_resampler_matches_idefics_perceiver_with_gelu():
    """transformers' IDEFICS perceiver is the same lucidrains-derived module, except that its MLP uses ReLU where
    OpenFlamingo's FeedForward uses GELU: with the activation swapped, outputs agree."""
    T = pytest.importorskip('transformers')
    from transformers.models.idefics.perceiver import IdeficsPerceiverResampler
    cfg = T.IdeficsConfig(vision_config=dict(embed_dim=32), perceiver_config=dict(qk_layer_norms_perceiver=False))
    ref = randomize(IdeficsPerceiverResampler(cfg, 32, 3, 2, 16, 8), std=0.3).eval()
    for _, mlp in ref.blocks:
        mlp.act = nn.GELU()
    ours = PerceiverResampler(32, depth=3, heads=2, dim_head=16, num_latents=8)
    with torch.no_grad():
        ours.latents.copy_(ref.latents)
        for (attn, ff), (r_attn, r_mlp) in zip(ours.layers, ref.blocks):
            attn.norm_media.load_state_dict(r_attn.context_layer_norm.state_dict())
            attn.norm_latents.load_state_dict(r_attn.latents_layer_norm.state_dict())
            attn.to_q.weight.copy_(r_attn.q_proj.weight)
            attn.to_kv.weight.copy_(torch.cat([r_attn.k_proj.weight, r_attn.v_proj.weight]))  # chunk(2): k then v
            attn.to_out.weight.copy_(r_attn.output_proj.weight)
            ff.norm.load_state_dict(r_mlp.ln.state_dict())
            ff.fc1.weight.copy_(r_mlp.fc.weight)
            ff.fc2.weight.copy_(r_mlp.c_proj.weight)
        ours.norm.load_state_dict(ref.layer_norm.state_dict())
        x = torch.randn(5, 16, 32)
        out = ours(x)
        assert out.shape == (5, 8, 32)
        assert rel_err(out, ref(x)) < 1e-5


def test_shapes():
    model = small_vlm()
    feats = feats_for(model, 2, 3)  # (2, 3, 17, 32): 3 images per row, CLS + 16 patches
    assert model.fusion.resampler(feats.flatten(0, 1)[:, 1:]).shape == (6, 8, 32)
    ids = torch.tensor([[5, I, 6, I, 7, I, 8], [5, 6, I, 7, 8, 9, 10]])
    has = torch.tensor([[True, True, True], [True, False, False]])
    tokens, media = model.fusion(feats.flatten(0, 1), has_image=has.flatten(), ids=ids)
    assert tokens.shape == (6, 1, 64) and model.fusion.n_tokens(17) == 1
    assert media['flamingo_latents'].shape == (2, 3, 8, 32) and media['flamingo_image'].shape == (2, 7)
    x = torch.randn(2, 7, 64)
    blk = model.lm.blocks[1].pre[0]
    assert isinstance(blk, GatedCrossAttentionBlock) and blk(x, Ctx(cos=None, sin=None, media=media)).shape == (2, 7, 64)
    with pytest.raises(ValueError, match=r"placeholders per row \[3, 2\] do not match the images per row \[3, 1\]"):
        model.fusion(feats.flatten(0, 1), has_image=has.flatten(), ids=ids.masked_fill(ids == 9, I))


@pytest.mark.parametrize('every,layers', [(1, [0, 1, 2, 3, 4, 5]), (2, [1, 3, 5]), (3, [2, 5]), (4, [3]), (6, [5])])
def test_gated_blocks_every_n_layers(every, layers):
    """OpenFlamingo (flamingo_lm.py): a block where (idx + 1) % n == 0, running before that layer."""
    lm = Decoder(LMConfig(vocab_size=50, dim=64, n_layers=6, n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=128))
    assert add_gated_cross_attention(lm, 32, every=every) == len(layers) == 6 // every
    assert [i for i, b in enumerate(lm.blocks) if len(b.pre)] == layers
    assert all(len(b.pre) <= 1 for b in lm.blocks)
    with pytest.raises(ValueError, match='flamingo_every must be in 1..6'):
        add_gated_cross_attention(lm, 32, every=7)


def test_build_vlm_trains_resampler_image_embedding_and_gated_blocks(tiny):
    cfg = dict(init_vision=tiny['clip'], init_lm=tiny['lm'], fusion='flamingo', vision_layer=-1, vision_norm=False,
               vision_feature='patch', flamingo_every=1, lora_r=0, trainable=('fusion.', '.pre.'))
    model = build_vlm(cfg)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    per_block = {'attn_gate', 'ff_gate', 'attn.norm.weight', 'attn.norm.bias', 'attn.to_q.weight', 'attn.to_kv.weight',
                 'attn.to_out.weight', 'ff.norm.weight', 'ff.norm.bias', 'ff.fc1.weight', 'ff.fc2.weight'}
    per_layer = {'norm_media.weight', 'norm_media.bias', 'norm_latents.weight', 'norm_latents.bias', 'to_q.weight',
                 'to_kv.weight', 'to_out.weight'}
    expected = {'fusion.image_embed', 'fusion.resampler.latents', 'fusion.resampler.norm.weight',
                'fusion.resampler.norm.bias'}
    expected |= {f'fusion.resampler.layers.{i}.0.{n}' for i in range(6) for n in per_layer}
    expected |= {f'fusion.resampler.layers.{i}.1.{n}' for i in range(6) for n in
                 ('norm.weight', 'norm.bias', 'fc1.weight', 'fc2.weight')}
    expected |= {f'lm.blocks.{i}.pre.0.{n}' for i in range(2) for n in per_block}  # the tiny LM has 2 layers
    assert names == expected
    r = model.fusion.resampler
    assert r.latents.shape == (64, 32) and len(r.layers) == 6 and r.layers[0][0].to_q.weight.shape == (512, 32)
    assert model.lm.blocks[0].pre[0].attn.to_kv.weight.shape == (1024, 32)  # Dv -> 2 x 8 heads x 64
    assert all(b.pre[0].attn_gate.item() == 0.0 == b.pre[0].ff_gate.item() for b in model.lm.blocks)
    with pytest.raises(ValueError, match=r"freezes every parameter of fusion 'flamingo' matching '\.pre\.'.*add '\.pre\.'"):
        build_vlm({**cfg, 'trainable': ('fusion.',)})


def test_trainable_parameters_llama7b_clip_vitl14_meta():
    """CLIP ViT-L/14 (Dv 1024) + LLaMA-7B (d 4096, 32 layers), cross_attn_every_n_layers 4 (OpenFlamingo-9B),
    built on the meta device; counts worked out from the shapes in OpenFlamingo's helpers.py."""
    with torch.device('meta'):
        vit, lm = ViT(ViTConfig()), Decoder(LMConfig())
        fusion = Flamingo(vit.cfg.dim, lm.cfg.dim)
        n_blocks = add_gated_cross_attention(lm, vit.cfg.dim, every=4)
        model = VLM(vit, lm, fusion)
    n = peft.mark_trainable(model, ('fusion.', '.pre.'))
    D, d, inner = 1024, 4096, 8 * 64
    perceiver_layer = 2 * 2 * D + D * inner + D * 2 * inner + inner * D + (2 * D + 2 * D * 4 * D)
    resampler = 6 * perceiver_layer + 64 * D + 2 * D
    block = 2 * d + d * inner + D * 2 * inner + inner * d + (2 * d + 2 * d * 4 * d) + 2
    assert n_blocks == 8 and [i for i, b in enumerate(lm.blocks) if len(b.pre)] == [3, 7, 11, 15, 19, 23, 27, 31]
    assert sum(p.numel() for p in model.fusion.resampler.parameters()) == resampler == 63_019_008
    assert sum(p.numel() for p in lm.blocks[3].pre.parameters()) == block == 139_476_994
    assert n == resampler + 8 * block + d == 1_178_839_056  # the number fusion.py states
    # OpenFlamingo's factory counts every row of the (resized) input embedding as trainable: 32,000 LLaMA rows
    # + <|endofchunk|>, <image>, <PAD>; all but two have their gradients masked to zero
    assert n - d + 32_003 * d == 1_309_919_248

# -----------------------------------------------------------------------------
# zero gates, media masking


@torch.no_grad()
def test_zero_gates_leave_the_frozen_lm_unchanged():
    model = small_vlm(every=1)
    ids = torch.tensor([[5, 6, I, 7, 8, I, 9, 10], [5, I, 7, 8, 9, 10, 11, 12]])
    has = torch.tensor([[True, True], [True, False]])
    feats = feats_for(model, 2, 2)
    x, media = model.embed(ids, feats, has)  # the image slots hold the learned <image> embedding
    alone = lm_alone(model)
    assert torch.equal(model(ids, feats=feats, has_image=has), alone.logits(alone(embeds=x)))
    text = torch.tensor([[5, 6, 7], [8, 9, 10]])
    assert torch.equal(model(text), alone.logits(alone(text)))  # a text-only batch: no media at all
    gen = model.generate(ids, feats=feats, has_image=has, max_new_tokens=5)
    assert torch.equal(gen, alone.generate(ids, embeds=x, max_new_tokens=5))
    open_gates(model)  # ... and the blocks are live: open gates change the logits
    assert not torch.equal(model(ids, feats=feats, has_image=has), alone.logits(alone(embeds=x)))


def reference_cross_attention(attn, x, media, image):
    """Token by token: softmax(q k^T / sqrt(dh)) v over the latents of its own image only; 0 without one."""
    B, T, _ = x.shape
    h, dh = attn.heads, attn.dim_head
    out = torch.zeros_like(x)
    for b in range(B):
        for t in range(T):
            if image[b, t] < 0:
                continue
            q = attn.to_q(attn.norm(x[b, t])).view(h, dh)
            k, v = attn.to_kv(media[b, image[b, t]]).chunk(2, dim=-1)  # (n, h*dh)
            k, v = k.view(-1, h, dh), v.view(-1, h, dh)
            w = torch.softmax(torch.einsum('hd,nhd->hn', q, k) / dh ** 0.5, dim=-1)
            out[b, t] = attn.to_out(torch.einsum('hn,nhd->hd', w, v).reshape(-1))
    return out


@torch.no_grad()
def test_media_mask_on_an_interleaved_sequence():
    model = open_gates(small_vlm(every=1))
    ids = torch.tensor([[5, 6, I, 7, 8, I, 9, 10],     # text, image 1, caption, image 2, caption
                        [I, 7, 8, 9, 10, 11, 12, 13],  # one image at the start (slot 2 empty)
                        [5, 6, I, 7, 8, 9, 10, 11],    # one image, given in slot 2 (slot 1 empty)
                        [5, 6, 7, 8, 9, 10, 11, 12]])  # no image
    has = torch.tensor([[True, True], [True, False], [False, True], [False, False]])
    feats = feats_for(model, 4, 2)
    fusion = model.fusion
    _, media = fusion(feats.flatten(0, 1), has_image=has.flatten(), ids=ids)
    assert media['flamingo_image'].tolist() == [[-1, -1, 0, 0, 0, 1, 1, 1], [0] * 8, [-1, -1, 0, 0, 0, 0, 0, 0], [-1] * 8]
    assert media['flamingo_last'].tolist() == [1, 0, 0, -1]
    lat = media['flamingo_latents']  # the row's present images, packed in order
    assert torch.allclose(lat[2, 0], fusion.resampler(feats[2, 1:, 1:])[0], atol=1e-6)
    assert torch.allclose(lat[0], fusion.resampler(feats[0, :, 1:]), atol=1e-6)
    # the masked attention equals a token-by-token reference
    x = torch.randn(4, 8, 64)
    attn = model.lm.blocks[0].pre[0].attn
    out = attn(x, lat, media['flamingo_image'])
    assert rel_err(out, reference_cross_attention(attn, x, lat, media['flamingo_image'])) < 1e-5
    assert (out[0, :2] == 0).all() and (out[3] == 0).all()  # before the first image: exactly 0

    def block_out(f):
        _, m = fusion(f.flatten(0, 1), has_image=has.flatten(), ids=ids)
        return model.lm.blocks[0].pre[0](x, Ctx(cos=None, sin=None, media=m))
    base = block_out(feats)
    new1, new2 = feats.clone(), feats.clone()
    new1[0, 0] += 1.0  # image 1 of row 0
    new2[0, 1] += 1.0  # image 2 of row 0
    changed1 = (block_out(new1) != base).any(-1)[0].tolist()
    changed2 = (block_out(new2) != base).any(-1)[0].tolist()
    assert changed1 == [False, False, True, True, True, False, False, False]  # only between image 1 and image 2
    assert changed2 == [False, False, False, False, False, True, True, True]  # only from image 2 on
    # through the whole LM the tokens before the first image never see an image
    logits = model(ids, feats=feats, has_image=has)
    assert torch.equal(model(ids, feats=new1, has_image=has)[0, :2], logits[0, :2])
    assert not torch.equal(model(ids, feats=new1, has_image=has)[0, 2:5], logits[0, 2:5])

    class Decoding:  # a KV cache past its prefill: new tokens attend to the row's last image
        pos = 8
    y = model.lm.blocks[0].pre[0](x[:, :3], Ctx(cos=None, sin=None, cache=Decoding(), media=media))
    last = media['flamingo_last'][:, None].expand(-1, 3)
    gate = model.lm.blocks[0].pre[0]
    expect = x[:, :3] + gate.attn_gate.tanh() * reference_cross_attention(attn, x[:, :3], lat, last)
    expect = expect + gate.ff_gate.tanh() * gate.ff(expect)
    assert rel_err(y, expect) < 1e-5


@torch.no_grad()
def test_kv_cache_generation_equals_full_forward_two_images():
    model = open_gates(small_vlm(every=2))
    prompts = [[3, I, 4, 5, 6, I, 7, 8], [3, I, 9, I, 10]]  # two images each; the second row is left-padded
    feats = feats_for(model, 2, 2)
    has = torch.ones(2, 2, dtype=torch.bool)
    ids, mask = data.left_pad(prompts, pad_id=0)
    gen = model.generate(ids, pad_mask=mask, feats=feats, has_image=has, max_new_tokens=6)

    def cached_logits(full, T, f):
        """prefill the prompt full[:, :T], then decode full[:, T:] one token at a time through the KV cache"""
        x, media = model.embed(full[:, :T], f, has[:1])
        cache = KVCache(model.lm.cfg, 1, full.shape[1], x.dtype, x.device)
        steps = [model.lm.logits(model.lm(embeds=x, cache=cache, media=media)[:, -1])]
        for t in range(T, full.shape[1] - 1):
            steps.append(model.lm.logits(model.lm(full[:, t:t + 1], cache=cache, media=media)[:, -1]))
        return torch.cat(steps)  # (T_new, V)
    for b, prompt in enumerate(prompts):
        full, T = torch.tensor([prompt + gen[b].tolist()]), len(prompt)
        logits = model(full, feats=feats[b:b + 1], has_image=has[b:b + 1])[0]  # (T + 6, V)
        assert logits[T - 1:-1].argmax(-1).tolist() == gen[b].tolist()
        assert rel_err(cached_logits(full, T, feats[b:b + 1]), logits[T - 1:-1]) < 1e-5
        # decode steps see the last image: another second image changes them (and the full forward alike)
        other = feats[b:b + 1].clone()
        other[:, 1] = feats_for(model, 1, 1, seed=7)[:, 0]
        changed = cached_logits(full, T, other)
        assert not torch.allclose(changed[1:], logits[T:-1], atol=1e-4)
        assert rel_err(changed, model(full, feats=other, has_image=has[b:b + 1])[0, T - 1:-1]) < 1e-5


@torch.no_grad()
def test_beam_search_through_the_vlm_repeats_media_per_beam():
    """OpenFlamingo evaluates with 3 beams: the media (latents, image index) are repeated for each row's beams,
    so a left-padded batch gives each row's result alone, and one beam is greedy."""
    model = open_gates(small_vlm(every=2))
    prompts = [[3, I, 4, 5, 6, I, 7, 8], [3, I, 9, I, 10]]
    feats = feats_for(model, 2, 2)
    has = torch.ones(2, 2, dtype=torch.bool)
    ids, mask = data.left_pad(prompts, pad_id=0)
    got = model.generate(ids, pad_mask=mask, feats=feats, has_image=has, max_new_tokens=6, num_beams=3)
    for b, prompt in enumerate(prompts):
        alone = model.generate(torch.tensor([prompt]), feats=feats[b:b + 1], has_image=has[b:b + 1],
                               max_new_tokens=6, num_beams=3)
        assert alone.tolist()[0] == got[b].tolist()
    greedy = model.generate(ids, pad_mask=mask, feats=feats, has_image=has, max_new_tokens=6)
    assert model.generate(ids, pad_mask=mask, feats=feats, has_image=has, max_new_tokens=6,
                          num_beams=1).tolist() == greedy.tolist()

# -----------------------------------------------------------------------------
# data: OpenFlamingo's text, labels, several images per sample


def openflamingo_labels(ids, media_id, eoc_id):
    """train_utils.py's MMC4 labels, written out: mask everything before the first <image>, everything
    after each <|endofchunk|> up to the next <image>, and every <image>."""
    labels = list(ids)
    first = ids.index(media_id)
    labels[:first] = [IGNORE_INDEX] * first
    for j, t in enumerate(ids):
        if t == eoc_id:
            k = j + 1
            while k < len(ids) and ids[k] != media_id:
                labels[k] = IGNORE_INDEX
                k += 1
    return [IGNORE_INDEX if t == media_id else lab for t, lab in zip(ids, labels)]


def write_interleaved(root, entries):
    (root / 'inter.json').write_text(json.dumps(entries))
    return root / 'inter.json'


def test_read_interleaved_and_openflamingo_labels(tiny, tmp_path):
    tok = data.Tokenizer(tiny['lm'])
    text = "what is in the image <image> a red circle <|endofchunk|> which of these <image> a blue square"
    path = write_interleaved(tmp_path, [{'id': 'doc', 'images': ['1.png', '2.png'], 'text': text}])
    [s] = data.read_interleaved(path, image_root=tmp_path)
    assert s['images'] == [str(tmp_path / '1.png'), str(tmp_path / '2.png')] and s['image'] == s['images'][0]
    assert s['messages'] == [('user', 'what is in the image<image>'), ('assistant', 'a red circle'),
                             ('user', ' which of these<image>'), ('assistant', 'a blue square')]  # as OpenFlamingo's
    # clean-up: no space before <|endofchunk|> or around <image>; the one after <|endofchunk|> stays
    assert s['answers'] == ['a blue square']
    pieces = data.template_pieces('flamingo', s['messages'])
    assert ''.join(p for p, _ in pieces) == ("what is in the image<image>a red circle<|endofchunk|>"
                                             " which of these<image>a blue square<|endofchunk|>")
    ids, labels = data.tokenize_conversation(tok, pieces, n_image_tokens=1)
    assert tok.eoc_id not in ids and ids.count(tok.eos_id) == 2  # <|endofchunk|> is the eos token
    assert labels == openflamingo_labels(ids, IMAGE_TOKEN, tok.eos_id)
    kept = [t for t in labels if t != IGNORE_INDEX]
    assert tok.decode(kept, skip_special=False) == 'a red circle<|im_end|>a blue square<|im_end|>'
    with pytest.raises(ValueError, match="2 '<image>' in the text but 1 images"):
        data.read_interleaved(write_interleaved(tmp_path, [{'images': ['1.png'], 'text': text}]))
    with pytest.raises(ValueError, match="image 1 runs into the next '<image>'"):
        data.read_interleaved(write_interleaved(tmp_path, [{'images': ['1.png', '2.png'], 'text': '<image>a<image>b'}]))


@pytest.fixture(scope='module')
def pictures(tmp_path_factory):
    root = tmp_path_factory.mktemp('pictures')
    return [shape_image(root / f'{i}.png', c, s) for i, (c, s) in
            enumerate([('red', 'circle'), ('blue', 'square'), ('green', 'circle')])]


@torch.no_grad()
def test_several_images_per_sample_from_data_to_logits(tiny, pictures):
    cfg = dict(init_vision=tiny['clip'], init_lm=tiny['lm'], fusion='flamingo', vision_layer=-1, vision_norm=False,
               vision_feature='patch', flamingo_every=1, lora_r=0, trainable=('fusion.', '.pre.'),
               image_size=0, image_resize='', template='flamingo', system_prompt='default')
    torch.manual_seed(0)
    model = open_gates(build_vlm(cfg)).eval()
    io = data.prepare(cfg, model)
    assert io['n_image_tokens'] == 1
    samples = [
        {'id': 'two', 'image': pictures[0], 'images': pictures[:2], 'answers': ['b'],
         'messages': [('user', '<image>'), ('assistant', 'a red circle'), ('user', '<image>'), ('assistant', 'a blue')]},
        {'id': 'one', 'image': pictures[2], 'answers': ['c'],
         'messages': [('user', '<image>\nwhat is it?'), ('assistant', 'a green circle')]},
        {'id': 'none', 'image': None, 'answers': ['d'], 'messages': [('user', 'is there a shape'), ('assistant', 'no')]}]
    ds = data.ConversationDataset(samples, io['tok'], template='flamingo', n_image_tokens=1, max_len=64)
    b = data.collate([ds[i] for i in range(3)], pad_id=io['tok'].pad_id)
    px = data.image_inputs(model, b['images'], io['image_cfg'])  # pixels (B, M, 3, H, W)
    assert px['pixels'].shape == (3, 2, 3, 32, 32) and b['has_image'].tolist() == [[True, True], [True, False], [False, False]]
    assert torch.equal(px['has_image'], b['has_image'])
    assert b['images'] == [pictures[:2], pictures[2], None] and (px['pixels'][1:, 1] == 0).all()
    assert (b['input_ids'] == IMAGE_TOKEN).sum(1).tolist() == [2, 1, 0]
    direct = model(b['input_ids'], **px)
    cached = data.image_inputs(model, b['images'], io['image_cfg'], cache={})
    assert cached['feats'].shape == (3, 2, 17, 32) and torch.equal(cached['has_image'], b['has_image'])
    assert rel_err(model(b['input_ids'], **cached), direct) < 1e-5
    # the single-image sample gives the same logits in a single-image batch (pixels (1, 3, H, W))
    one = data.collate([ds[1]], pad_id=io['tok'].pad_id)
    one_px = data.image_inputs(model, one['images'], io['image_cfg'])
    assert one_px['pixels'].shape == (1, 3, 32, 32) and one['has_image'].tolist() == [True]
    n = one['input_ids'].shape[1]
    assert rel_err(model(one['input_ids'], pixels=one_px['pixels'])[0], direct[1, :n]) < 1e-5
    # generation through eval.run: two-image few-shot prompt, single-image and text-only prompts
    result = evaluate.run(model, samples, io, task='interleaved', batch_size=3, max_new_tokens=3, progress=False)
    assert result['n'] == 3 and len(result['predictions']) == 3


@torch.no_grad()
def test_input_level_fusion_takes_several_images_per_sample(tiny):
    """The multi-image layout is generic: LLaVA's projector tokens land in each image's own placeholders."""
    cfg = dict(init_vision=tiny['clip'], init_lm=tiny['lm'], fusion='llava', vision_layer=-2, vision_norm=False,
               vision_feature='patch', lora_r=0, trainable=('fusion.',))
    model = build_vlm(cfg).eval()
    feats = feats_for(model, 2, 2)
    ids = torch.tensor([[5] + [I] * 16 + [6] + [I] * 16, [5, 6] + [I] * 16 + [7] * 16])  # 2 images | 1 image
    has = torch.tensor([[True, True], [False, True]])  # row 1's image is in its second slot
    x, _ = model.embed(ids, feats, has)
    proj = model.fusion(feats.flatten(0, 1), has_image=has.flatten(), ids=ids)[0].view(2, 2, 16, -1)
    assert torch.equal(x[0, 1:17], proj[0, 0]) and torch.equal(x[0, 18:34], proj[0, 1])
    assert torch.equal(x[1, 2:18], proj[1, 1])

# -----------------------------------------------------------------------------
# train.py with the recipe


def test_flamingo_coco_config_takes_two_steps_with_a_two_image_sample(tiny, pictures, tmp_path, monkeypatch):
    """config/flamingo_coco.py with tiny stand-ins for ViT-L/14 and LLaMA-7B, on interleaved data (one two-image
    sequence among single-image ones) instead of COCO."""
    entries = [{'id': 'pair', 'images': ['0.png', '1.png'],
                'text': 'two shapes<image>a red circle<|endofchunk|><image>a blue square<|endofchunk|>'},
               {'id': 'a', 'images': ['2.png'], 'text': '<image>a green circle<|endofchunk|>'},
               {'id': 'b', 'images': ['0.png'], 'text': '<image>a red circle<|endofchunk|>'},
               {'id': 'c', 'images': ['1.png'], 'text': '<image>a blue square<|endofchunk|>'}]
    root = tmp_path / 'data'
    root.mkdir()
    for i, p in enumerate(pictures):
        (root / f'{i}.png').write_bytes(open(p, 'rb').read())
    path = write_interleaved(root, entries)
    monkeypatch.setattr(sys, 'argv', [
        'train.py', str(ROOT / 'config' / 'flamingo_coco.py'), f'--init_vision={tiny["clip"]}',
        f'--init_lm={tiny["lm"]}', '--flamingo_every=2', '--dataset=interleaved', f'--data_root={path}',
        f'--out_dir={tmp_path / "out"}', '--max_iters=2', '--batch_size=2', '--dtype=float32', '--eval_iters=1',
        '--eval_limit=2', '--device=cpu', '--log_interval=1'])  # the tiny LM has 2 layers: one block, before layer 1
    out = runpy.run_path(str(ROOT / 'train.py'), run_name='__main__')
    assert out['step'] == 2 and out['fusion'] == 'flamingo' and out['template'] == 'flamingo'
    assert out['n_image_tokens'] == 1 and out['warmup_steps'] == 1875 and out['learning_rate'] == 1e-4
    losses = [r['loss'] for r in map(json.loads, open(tmp_path / 'out' / 'log.jsonl')) if 'loss' in r]
    assert len(losses) == 2 and all(l == l and l > 0 for l in losses)
    # the two steps (2 x 2 samples) saw every sample, the two-image sequence included
    ds = out['train_ds']
    assert {ds.samples[ds.keep[out['sample_index'](i)]]['id'] for i in range(4)} == {'pair', 'a', 'b', 'c'}
    # weight decay 0.1 on exactly the gated block's parameters, as OpenFlamingo; the gates left 0
    model = out['raw_model']
    decay, no_decay = out['optimizer'].param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay['weight_decay'] == 0.1 and no_decay['weight_decay'] == 0.0
    assert sorted(names[id(p)] for p in decay['params']) == sorted(
        n for n, p in model.named_parameters() if '.pre.' in n)
    assert all(names[id(p)].startswith('fusion.') for p in no_decay['params'])
    [blk] = [b.pre[0] for b in model.lm.blocks if len(b.pre)]
    assert blk.attn_gate.item() != 0.0 and blk.ff_gate.item() != 0.0
    result = json.load(open(tmp_path / 'out' / 'eval_test.json'))
    assert result['n'] == 2 and result['task'] == 'interleaved'


def test_openflamingo3b_config_takes_two_steps_with_a_tiny_mpt(tiny, pictures, tmp_path, monkeypatch):
    """config/openflamingo3b_coco.py with tiny stand-ins for ViT-L/14 and MPT-1B (a random 2-layer transformers MPT
    with the tiny byte-level tokenizer): a gated block before every layer, two steps, a beam-3 evaluation."""
    import shutil
    import transformers as T
    lm = tmp_path / 'mpt'
    vocab = json.load(open(f"{tiny['lm']}/config.json"))['vocab_size']
    T.MptForCausalLM(T.MptConfig(d_model=64, n_heads=4, n_layers=2, max_seq_len=256, vocab_size=vocab,
                                 eos_token_id=2, bos_token_id=1)).save_pretrained(lm)
    for f in ('tokenizer.json', 'tokenizer_config.json'):
        shutil.copy(f"{tiny['lm']}/{f}", lm / f)
    root = tmp_path / 'data'
    root.mkdir()
    for i, p in enumerate(pictures):
        (root / f'{i}.png').write_bytes(open(p, 'rb').read())
    entries = [{'id': k, 'images': [f'{i}.png'], 'text': f'<image>a {c}<|endofchunk|>'}
               for k, i, c in (('a', 0, 'red circle'), ('b', 1, 'blue square'), ('c', 2, 'green circle'))]
    monkeypatch.setattr(sys, 'argv', [
        'train.py', str(ROOT / 'config' / 'openflamingo3b_coco.py'), f'--init_vision={tiny["clip"]}',
        f'--init_lm={lm}', '--dataset=interleaved', f'--data_root={write_interleaved(root, entries)}',
        f'--out_dir={tmp_path / "out"}', '--max_iters=2', '--batch_size=2', '--dtype=float32', '--eval_iters=1',
        '--eval_limit=2', '--device=cpu', '--log_interval=1', '--max_new_tokens=4'])
    out = runpy.run_path(str(ROOT / 'train.py'), run_name='__main__')
    assert out['step'] == 2 and out['flamingo_every'] == 1 and out['num_beams'] == 3
    model = out['raw_model']
    assert model.lm.cfg.alibi and all(len(b.pre) == 1 for b in model.lm.blocks)  # a gated block before each layer
    losses = [r['loss'] for r in map(json.loads, open(tmp_path / 'out' / 'log.jsonl')) if 'loss' in r]
    assert len(losses) == 2 and all(l == l and l > 0 for l in losses)
    assert json.load(open(tmp_path / 'out' / 'eval_test.json'))['n'] == 2
