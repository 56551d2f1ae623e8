"""LaVIN (fusion.py): the router against LaVIN's Conv1d formulation, identity at init, the modality token
(masked, routing only, correct under left padding and KV-cache decoding), the CLIP-side routing quirk,
the 7B / 13B trainable-parameter counts, and config/lavin_sqa.py in train.py."""
import json
import runpy
import sys

import pytest
import torch
import torch.nn as nn

import data
import eval as evaluate
import model as model_py
import peft
from conftest import ROOT, rel_err, shape_image
from fusion import (LowRankProjector, GroupedLinear, LaVIN, LaVINAttention, LaVINRouter, LaVINTowerRouter, attach_lavin,
                    build_vlm)
from model import Ctx, Decoder, LMConfig, ViT, ViTConfig, VLM

pytest.importorskip('transformers')  # the tiny checkpoints are written with save_pretrained


def config(tiny, **kw):
    cfg = dict(init_vision=tiny['clip'], init_lm=tiny['lm'], fusion='lavin', lavin_temperature=10.0,
               vision_layer=-1, vision_norm=False, vision_feature='patch', lora_r=0, trainable=('fusion.', 'attn_in.'),
               image_size=0, image_resize='squash', image_norm='imagenet', template='base',
               system_prompt='default')
    cfg.update(kw)
    return cfg


def routers(model):
    return [m for m in model.modules() if isinstance(m, (LaVINRouter, LaVINTowerRouter))]


def randomize_routers(model, std=0.3, seed=0):
    """Non-zero B and D (and everything else of the routers): trained-like adapters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for r in routers(model):
            for p in r.parameters():
                p.copy_(std * torch.randn(p.shape, generator=g))
    return model


@pytest.fixture
def lavin(tiny):
    torch.manual_seed(0)
    model = build_vlm(config(tiny)).eval()
    return model, data.prepare(config(tiny), model)


@pytest.fixture(scope='module')
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp('lavin_images')
    return [shape_image(root / f'{c}_{s}.png', c, s) for c, s in (('red', 'circle'), ('blue', 'square'), ('green', 'circle'))]


def pixels(io, paths):
    return torch.stack([data.preprocess_image(data.load_image(p), io['image_cfg']) for p in paths])


def prompt(io, question, image=True, answer=None):
    """LaVIN's layout: "Image: <image>" (or "Image: N/A ") + question [+ answer + EOS]."""
    messages = [('user', ('Image: <image>' if image else 'Image: N/A ') + question)]
    if answer:
        pieces = data.template_pieces('base', messages + [('assistant', answer)], eos=io['tok'].tk.id_to_token(io['tok'].eos_id))
        return data.tokenize_conversation(io['tok'], pieces, io['n_image_tokens'])
    return data.encode_prompt(io['tok'], 'base', messages, io['n_image_tokens'])


# -----------------------------------------------------------------------------
# the router


def official_router(x, r):
    """LaVIN's RepAdapter_Router.forward (lavin/mm_adapter.py) restated with torch's Conv1d(kernel_size=1,
    groups=2) modules holding our router's weights; x[:, 0] routes, whatever the layout: (batch, tokens, dim)
    in LLaMA, (tokens, batch, dim) in CLIP."""
    conv_a = nn.Conv1d(r.A.in_features, r.A.out_features, 1)
    conv_b, conv_d = (nn.Conv1d(r.A.out_features, r.A.in_features, 1, groups=2) for _ in range(2))
    with torch.no_grad():
        conv_a.weight.copy_(r.A.weight[..., None])
        conv_a.bias.copy_(r.A.bias)
        for conv, ours in ((conv_b, r.B), (conv_d, r.D)):
            conv.weight.copy_(torch.cat([p.weight for p in ours.parts])[..., None])  # (out, in/g, 1)
            conv.bias.copy_(torch.cat([p.bias for p in ours.parts]))
    weights = torch.softmax(r.router(x[:, 0]) / r.t, -1)
    x = x.transpose(1, 2)
    x_ = conv_a(x)
    x = conv_b(x_) * r.scale * weights[:, 0, None, None] + conv_d(x_) * r.scale * weights[:, 1, None, None] + x
    return x.transpose(1, 2)


def test_grouped_linear_is_a_grouped_kernel_size_1_conv():
    g = GroupedLinear(8, 6, groups=2)
    for p in g.parameters():
        nn.init.normal_(p)
    conv = nn.Conv1d(8, 6, 1, groups=2)
    with torch.no_grad():
        conv.weight.copy_(torch.cat([p.weight for p in g.parts])[..., None])
        conv.bias.copy_(torch.cat([p.bias for p in g.parts]))
    x = torch.randn(3, 5, 8)
    assert torch.allclose(g(x), conv(x.transpose(1, 2)).transpose(1, 2), atol=1e-6)
    assert sum(p.numel() for p in g.parameters()) == sum(p.numel() for p in conv.parameters()) == 8 * 6 // 2 + 6
    with pytest.raises(ValueError, match='not divisible'):
        GroupedLinear(7, 6)


def test_routers_match_lavins_conv_formulation():
    torch.manual_seed(0)
    lm_r, tower_r = LaVINRouter(16, layer=0).eval(), LaVINTowerRouter(16).eval()
    randomize_routers(nn.ModuleList([lm_r, tower_r]))
    # LLaMA side: (batch, tokens, dim); routed by each row's token 0
    a = torch.randn(3, 7, 16)
    ctx = Ctx(cos=None, sin=None)
    assert rel_err(lm_r(a, ctx), official_router(a, lm_r)) < 1e-6
    assert ctx.media['lavin_route_0'].shape == (3, 2)
    # CLIP side: the code's x[:, 0] on (tokens, batch, dim) is the batch's first image at every position
    a = torch.randn(3, 7, 16)  # (images, tokens, dim), our layout
    want = official_router(a.transpose(0, 1), tower_r).transpose(0, 1)
    assert rel_err(tower_r(a), want) < 1e-6
    # ... so image 1's output depends on image 0 and not on itself only
    alone = tower_r(a[1:2])
    assert rel_err(tower_r(a)[1], alone[0]) > 1e-3
    swapped = a.clone()
    swapped[0] = torch.randn(7, 16)
    assert not torch.allclose(tower_r(swapped)[1], tower_r(a)[1])


def test_router_init():
    r = LaVINRouter(64, layer=3)
    assert r.A.weight.shape == (8, 64) and not r.A.weight.eq(0).all() and r.A.bias.eq(0).all()
    assert all(p.eq(0).all() for p in (*r.B.parameters(), *r.D.parameters()))
    assert [p.weight.shape for p in r.B.parts] == [(32, 4), (32, 4)]  # block-diagonal: 2 x (d/2 x 4)
    assert r.t == 10.0 and r.scale == 1.0 and r.drop.p == 0.1
    x = torch.randn(2, 5, 64)
    assert torch.equal(r.train()(x, Ctx(cos=None, sin=None)), x)  # the identity, even with dropout on
    p = LowRankProjector(32, 128, 64)
    assert p.fc1.bias.eq(0).all() and p.fc2.bias.eq(0).all() and p.fc1.weight.std() > 0

# -----------------------------------------------------------------------------
# the model


def test_shapes_and_placement(lavin, images):
    model, io = lavin
    assert io['n_image_tokens'] == 2 and model.fusion.layers == [1, 2]  # the tiny tower has 2 blocks
    assert LaVIN(ViTConfig(), 4096).layers == [4, 8, 12, 16, 20, 24]  # CLIP ViT-L/14: every 4th block
    assert LaVIN(ViTConfig(n_layers=12), 4096).layers == [2, 4, 6, 8, 10, 12]
    with pytest.raises(ValueError, match='CLS'):
        LaVIN(ViTConfig(kind='siglip', cls_token=False), 64)
    assert all(len(b.attn_in) == 1 and isinstance(b.attn_in[0], LaVINTowerRouter) for b in model.vision.blocks)
    assert all(len(b.attn_in) == 1 and isinstance(b.attn, LaVINAttention) for b in model.lm.blocks)
    assert all(len(b.pre) == 0 and len(b.ffn_side) == 0 for b in model.lm.blocks)
    assert all(len(b.adapters) == 0 for b in model.vision.blocks)
    px = pixels(io, images[:2])
    feats = model.image_features(px)
    assert feats.shape == (2, 2, 32)  # (B, n_visual, Dv)
    with torch.no_grad():  # the CLS token after block 1 and block 2, no final norm
        hs = model.vision.hidden_states(px)
    assert torch.allclose(feats, torch.stack([hs[1][:, 0], hs[2][:, 0]], 1))
    tokens, media = model.fusion(feats, has_image=torch.tensor([True, True]))
    assert tokens.shape == (2, 2, 64) and media == {}
    assert model.fusion.prefix(torch.tensor([True, False])).shape == (2, 1, 64)
    ids = torch.tensor([prompt(io, 'what is it?')] * 2)
    assert (ids == data.IMAGE_TOKEN).sum(1).tolist() == [2, 2]
    x, _ = model.embed(ids, feats, torch.tensor([True, True]))
    assert x.shape == (2, 1 + ids.shape[1], 64)  # the modality token in front
    assert torch.equal(x[:, 0], model.fusion.modality.weight[[1, 1]])
    slot = (ids[0] == data.IMAGE_TOKEN).nonzero()[:, 0] + 1
    assert torch.allclose(x[:, slot], tokens)
    logits = model(ids, feats=feats, has_image=torch.tensor([True, True]))
    assert logits.shape == (2, ids.shape[1], model.lm.cfg.vocab_size)  # aligned with ids, not with the prefix


def test_identity_at_init(lavin, tiny, images):
    """B = D = 0: every adapted LM block gives the unadapted block's output on the same input embeddings
    (the modality token in front changes nothing), and the tower's features are unchanged."""
    model, io = lavin
    plain_lm, plain_vit = Decoder.from_pretrained(tiny['lm']), ViT.from_pretrained(tiny['clip'])
    ids = torch.tensor([prompt(io, 'Question: which color is the circle?', image=False)])
    T = ids.shape[1]
    outs = {'ours': [], 'plain': []}
    hooks = [b.register_forward_hook(lambda m, i, o, k=k: outs[k].append(o))
             for k, lm in (('ours', model.lm), ('plain', plain_lm)) for b in lm.blocks]
    with torch.no_grad():
        x = model.lm.embed_tokens(ids)
        model.lm(embeds=torch.cat([model.fusion.prefix(torch.tensor([False])), x], 1))
        plain_lm(embeds=x, pos=torch.arange(1, T + 1)[None])  # the text sits at positions 1.. after the modality token
    for h in hooks:
        h.remove()
    assert len(outs['ours']) == len(outs['plain']) == 2
    for ours, plain in zip(outs['ours'], outs['plain']):
        assert rel_err(ours[:, 1:], plain) < 1e-5
    # the tower: identical features (exactly: the routers add 0)
    px = pixels(io, images)
    with torch.no_grad():
        want = torch.stack([h[:, 0] for h in plain_vit.hidden_states(px)[1:]], 1)
        assert torch.equal(model.image_features(px), want)


def test_attention_never_reads_the_modality_token():
    """Hand-made: a query after column 0 gets the same output whatever key / value 0 holds; query 0 sees it.
    Also at a decode step (one query, keys from the cache)."""
    torch.manual_seed(0)
    attn = LaVINAttention(LMConfig(dim=16, n_heads=2, n_kv_heads=1, head_dim=8), 0)
    q, k, v = torch.randn(2, 2, 5, 8), torch.randn(2, 1, 5, 8), torch.randn(2, 1, 5, 8)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 0], v2[:, :, 0] = 100.0, -100.0
    ctx = Ctx(cos=None, sin=None)
    a, b = attn.attend(q, k, v, ctx), attn.attend(q, k2, v2, ctx)
    assert torch.allclose(a[:, :, 1:], b[:, :, 1:], atol=1e-6) and not torch.allclose(a[:, :, 0], b[:, :, 0])
    # column 1 (the first real token) sees only itself
    assert torch.allclose(a[:, :, 1], v[:, :, 1].expand(2, 2, 8), atol=1e-6)
    # a decode step: the query is column 4, the cache holds columns 0..4
    a, b = attn.attend(q[:, :, 4:], k, v, ctx), attn.attend(q[:, :, 4:], k2, v2, ctx)
    assert torch.allclose(a, b, atol=1e-6)
    # with a padding mask (left-padded rows) the modality key stays hidden too
    mask = torch.ones(2, 1, 5, 5, dtype=torch.bool).tril()
    a, b = attn.attend(q, k, v, Ctx(cos=None, sin=None, mask=mask)), attn.attend(q, k2, v2, Ctx(cos=None, sin=None, mask=mask))
    assert torch.allclose(a[:, :, 1:], b[:, :, 1:], atol=1e-6)


def test_modality_token_only_routes(lavin, images):
    """With trained-like routers: changing the modality embedding changes the routing weights and nothing
    else - with the routing projection zeroed (w = 0.5 / 0.5 whatever the token) the logits do not move."""
    model, io = lavin
    randomize_routers(model)
    ids = torch.tensor([prompt(io, 'what is it?')])
    feats, has = model.image_features(pixels(io, images[:1])), torch.tensor([True])

    def run():
        with torch.no_grad():
            x, media = model.embed(ids, feats, has)
            return model.lm.logits(model.lm(embeds=x, media=media))[:, 1:], media
    before, m1 = run()
    with torch.no_grad():
        model.fusion.modality.weight.mul_(-3.0)
    after, m2 = run()
    assert rel_err(after, before) > 1e-3  # the token matters ... through the routing weights
    assert not torch.allclose(m1['lavin_route_0'], m2['lavin_route_0'])
    with torch.no_grad():
        for blk in model.lm.blocks:
            blk.attn_in[0].router.weight.zero_()
            blk.attn_in[0].router.bias.zero_()
    before, m1 = run()
    with torch.no_grad():
        model.fusion.modality.weight.normal_(std=5.0)
    after, m2 = run()
    assert torch.equal(m1['lavin_route_1'], torch.full((1, 2), 0.5))
    assert rel_err(after, before) < 1e-6  # ... and in no other way: no token attends to it


def record_logits(monkeypatch):
    """Capture the (B, V) logits Decoder.stream samples from at every step."""
    seen, real = [], model_py.sample
    monkeypatch.setattr(model_py, 'sample', lambda logits, *a, **kw: (seen.append(logits), real(logits, *a, **kw))[1])
    return seen


def test_left_padded_rows_equal_rows_alone(lavin, images, monkeypatch):
    """Routing from the modality token survives left padding: in a batch of ragged prompts (one with an
    image, one without, one long), every row's logits at every decode step equal that row generated alone.
    The visual features are computed per image alone, so that only the LM side is compared (the CLIP side
    routes by the batch's first image by design)."""
    model, io = lavin
    randomize_routers(model)
    qs = [('what is it?', images[0]), ('which color is the circle in the picture here?', None),
          ('Question: is there a red square in the image? Context: N/A', images[1])]
    prompts = [prompt(io, q, image=img is not None) for q, img in qs]
    assert len({len(p) for p in prompts}) == 3
    feats = torch.stack([model.image_features(pixels(io, [img]))[0] if img else torch.zeros(2, 32) for _, img in qs])
    has = torch.tensor([img is not None for _, img in qs])
    ids, mask = data.left_pad(prompts, io['tok'].pad_id)
    seen = record_logits(monkeypatch)
    batch = model.generate(ids, pad_mask=mask, feats=feats, has_image=has, max_new_tokens=5)
    together = torch.stack(seen, 1)  # (B, steps, V)
    for i, p in enumerate(prompts):
        seen.clear()
        alone = model.generate(torch.tensor([p]), feats=feats[i:i + 1], has_image=has[i:i + 1], max_new_tokens=5)
        assert alone.tolist()[0] == batch.tolist()[i]
        assert rel_err(together[i], torch.stack(seen, 1)[0]) < 1e-4


def test_kv_cache_generation_equals_full_forward(lavin, images, monkeypatch):
    model, io = lavin
    randomize_routers(model)
    ids = torch.tensor([prompt(io, 'what is it?')] * 2)
    px = pixels(io, images[:2])
    seen = record_logits(monkeypatch)
    new = model.generate(ids, pixels=px, has_image=torch.tensor([True, True]), max_new_tokens=6)
    with torch.no_grad():
        full = model(torch.cat([ids, new[:, :-1]], 1), pixels=px, has_image=torch.tensor([True, True]))
    T = ids.shape[1]
    assert rel_err(torch.stack(seen, 1), full[:, T - 1:]) < 1e-4
    assert torch.equal(full[:, T - 1:].argmax(-1), new)


def test_trainable_parameters_7b_and_13b():
    """CLIP ViT-L/14 + LLaMA-7B shapes on the meta device: METHODS.md's 3.78M, exactly 3,781,296 =
    32 x 81,930 (LLaMA routers) + 24 x 20,490 (CLIP routers) + 659,584 (projector) + 8,192 (modality
    embedding). 13B (d 5120, 40 layers): 5,390,080, LaVIN's README says 5.4M."""
    for lm_cfg, per_router, proj, total in (
            (LMConfig(), 81_930, 659_584, 3_781_296),
            (LMConfig(dim=5120, n_layers=40, n_heads=40, n_kv_heads=40, ffn_dim=13824), 102_410, 791_680, 5_390_080)):
        with torch.device('meta'):
            vision, lm = ViT(ViTConfig()), Decoder(lm_cfg)
            model = VLM(vision, lm, attach_lavin(vision, lm))
        n = peft.mark_trainable(model, ('fusion.', 'attn_in.'))
        d, L = lm_cfg.dim, lm_cfg.n_layers
        assert sum(p.numel() for p in lm.blocks[0].attn_in.parameters()) == per_router == (d * 8 + 8) + 2 * (8 // 2 * d + d) + (d * 2 + 2)
        assert sum(p.numel() for p in vision.blocks[0].attn_in.parameters()) == 20_490
        assert sum(p.numel() for p in model.fusion.proj.parameters()) == proj
        assert model.fusion.modality.weight.numel() == 2 * d
        assert n == L * per_router + 24 * 20_490 + proj + 2 * d == total
        # exactly what LaVIN trains (its 'adapter' names): no LM / tower weight
        names = [k for k, p in model.named_parameters() if p.requires_grad]
        assert all('.attn_in.0.' in k or k.startswith('fusion.') for k in names)
        assert len(names) == (L + 24) * 12 + 5  # per router: A, 2 + 2 blocks of B and D, W_r (weight, bias)

# -----------------------------------------------------------------------------
# data and the recipe


def test_lavin_sqa_config_takes_two_steps(tiny, sqa_root, tmp_path, monkeypatch):
    """The recipe builds and trains with tiny stand-ins for CLIP ViT-L/14 and LLaMA-7B: the routers move off
    zero, only LaVIN's parameters are saved, and the final ScienceQA evaluation runs (sampling as LaVIN)."""
    monkeypatch.setattr(sys, 'argv', [
        'train.py', str(ROOT / 'config' / 'lavin_sqa.py'), f'--init_vision={tiny["clip"]}', f'--init_lm={tiny["lm"]}',
        f'--data_root={sqa_root}', f'--out_dir={tmp_path}', '--max_iters=2', '--batch_size=2', '--global_batch=2',
        '--dtype=float32', '--eval_iters=1', '--eval_limit=2', '--device=cpu', '--log_interval=1',
        '--max_new_tokens=8'])
    g = runpy.run_path(str(ROOT / 'train.py'), run_name='__main__')
    assert g['step'] == 2 and g['fusion'] == 'lavin' and g['template'] == 'base'
    assert g['learning_rate'] == 1.125e-3 and g['temperature'] == 0.1 and g['prompt_format'] == 'QCM-ALE'
    assert g['io']['image_cfg']['mean'] == data.IMAGENET_MEAN and g['io']['image_cfg']['resize'] == 'squash'
    assert g['feats_cache'] is None  # the tower's routers train
    losses = [r['loss'] for r in map(json.loads, open(tmp_path / 'log.jsonl')) if 'loss' in r]
    assert len(losses) == 2 and all(l == l for l in losses)
    ckpt = torch.load(tmp_path / 'ckpt.pt', weights_only=True)
    assert ckpt['model'] and all(k.startswith('fusion.') or '.attn_in.0.' in k for k in ckpt['model'])
    assert ckpt['model']['lm.blocks.0.attn_in.0.B.parts.0.weight'].abs().sum() > 0  # trained off its zero init
    assert ckpt['model']['vision.blocks.1.attn_in.0.D.parts.1.weight'].abs().sum() > 0
    result = json.load(open(tmp_path / 'eval_test.json'))
    assert result['task'] == 'scienceqa' and result['n'] == 2
    model, io, cfg = evaluate.load_vlm(str(tmp_path / 'ckpt.pt'))  # and the checkpoint loads back
    assert isinstance(model.fusion, LaVIN) and cfg['lavin_temperature'] == 10.0
    assert torch.equal(model.lm.blocks[0].attn_in[0].B.parts[0].weight, ckpt['model']['lm.blocks.0.attn_in.0.B.parts.0.weight'])


def test_ddp_with_a_text_only_micro_batch(tiny, sqa_root, tmp_path):
    """Two processes (gloo), one sample each: some steps give one rank a text-only question, which leaves the
    projector and the tower's routers without gradients there. DDP must still all-reduce in step (train.py's
    find_unused_parameters; without it gloo fails with a collective size mismatch)."""
    import os
    import subprocess
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', 'train.py',
           str(ROOT / 'config' / 'lavin_sqa.py'), f'--init_vision={tiny["clip"]}', f'--init_lm={tiny["lm"]}',
           f'--data_root={sqa_root}', f'--out_dir={tmp_path}', '--max_iters=4', '--batch_size=1', '--global_batch=2',
           '--dtype=float32', '--eval_iters=1', '--final_eval=False', '--device=cpu', '--threads=1', '--log_interval=1']
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    losses = [r['loss'] for r in map(json.loads, open(tmp_path / 'log.jsonl')) if 'loss' in r]
    assert len(losses) == 4 and all(l == l for l in losses)
