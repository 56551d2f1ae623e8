"""ADEM-VL (fusion.py): multiscale visual prompts, the parameter-free FFN-side cross-attention with its
adaptive drop checked against the equations, zero-init properties, KV-cache decoding, the trainable-parameter
count at LLaMA-7B / CLIP ViT-L/14 shapes, the data hooks of the official ScienceQA protocol (token layout,
base template, evaluation prompts), and config/adem_sqa.py end to end on tiny stand-ins."""
import json
import runpy
import sys

import pytest
import torch
import torch.nn.functional as F

import data
import eval as evaluate
import peft
from conftest import ROOT
from test_fusion_qformer import coco_root  # noqa: F401 (a fixture: the tiny COCO Karpathy split)
from data import IGNORE_INDEX, IMAGE_TOKEN
from fusion import ADEMCrossAttention, ADEMFusion, adaptive_drop, attach_adem, build_vlm, multiscale
from model import Ctx, Decoder, KVCache, LMConfig, VLM, ViT, ViTConfig

pytest.importorskip('transformers')  # the tiny checkpoints are written with save_pretrained


def adem_cfg(tiny, **kw):
    """build_vlm / prepare keys of config/adem_sqa.py, on the tiny stand-ins (4x4 patches: scales 16 + 4)."""
    cfg = dict(init_vision=tiny['clip'], init_lm=tiny['lm'], fusion='adem', vision_layer=-2, vision_norm=True,
               vision_feature='patch', lora_r=0, trainable=('fusion.', '.adapters.'), adem_scales=(16, 4),
               adem_hidden=128, adem_beta=0.01, adem_alpha=0.1, adem_drop_ratio=0.1, adem_adapter_dim=12,
               image_size=0, image_resize='squash', image_norm='imagenet', template='base', system_prompt='default',
               answer_prefix='The answer is')
    cfg.update(kw)
    return cfg


def frozen_lm(tiny):
    return Decoder.from_pretrained(tiny['lm']).eval()

# -----------------------------------------------------------------------------
# shapes


def test_multiscale_token_counts_and_values():
    x = torch.randn(2, 256, 8)  # a 16x16 patch grid, row-major as CLIP emits it
    out = multiscale(x, (256, 64))
    assert out.shape == (2, 320, 8)
    assert torch.equal(out[:, :256], x)  # 256: the grid unchanged
    pooled = x.view(2, 8, 2, 8, 2, 8).mean((2, 4)).reshape(2, 64, 8)  # 64: 2x2 averages, row-major
    torch.testing.assert_close(out[:, 256:], pooled)
    assert multiscale(x, (256, 64, 16, 4, 1)).shape == (2, 341, 8)
    assert multiscale(x, (64,)).shape == (2, 64, 8)
    torch.testing.assert_close(multiscale(x, (1,))[:, 0], x.mean(1))
    assert multiscale(torch.randn(1, 16, 4), (16, 4)).shape == (1, 20, 4)  # the tiny 4x4 grid
    for bad in (60, 1024):
        with pytest.raises(ValueError, match=f'adem_scales entry {bad}'):
            multiscale(x, (256, bad))
    with pytest.raises(ValueError, match='square patch grid'):
        multiscale(torch.randn(1, 255, 8), (64,))


def test_fusion_tokens_and_media():
    f = ADEMFusion(32, 48, scales=(256, 64), hidden=16, beta=0.01)
    assert f.e1.shape == f.e2.shape == (1, 320, 48) and not f.e2.any() and 0.015 < f.e1.std() < 0.025
    assert not f.proj.fc1.bias.any() and not f.proj_cls.fc2.bias.any() and f.n_tokens(257) == 1
    feats, has_image = torch.randn(3, 257, 32), torch.tensor([True, False, True])
    tokens, media = f(feats, has_image=has_image)
    assert tokens.shape == (3, 1, 48)
    torch.testing.assert_close(tokens, f.proj_cls(feats[:, :1]))  # the CLS token, not scaled by beta
    assert media['adem_keys'].shape == media['adem_values'].shape == (3, 320, 48)
    v = 0.01 * f.proj(multiscale(feats[:, 1:], (256, 64)))  # V = beta * indicator * projector(prompts)
    for i in (0, 2):
        torch.testing.assert_close(media['adem_keys'][i], F.silu(v[i] + f.e1[0]))
        torch.testing.assert_close(media['adem_values'][i], v[i] + f.e2[0])
    assert torch.equal(media['adem_keys'][1], F.silu(f.e1[0])) and not media['adem_values'][1].any()  # V = 0
    tokens, media = f(None, ids=torch.zeros(2, 5, dtype=torch.long))  # a batch without any image
    assert tokens is None and media['adem_values'].shape == (2, 320, 48)
    assert torch.equal(media['adem_keys'], F.silu(f.e1).expand(2, -1, -1))

# -----------------------------------------------------------------------------
# the FFN-side cross-attention and its adaptive drop


@pytest.mark.parametrize('ratio', [0.1, 0.25, 0.5, 0.99])
def test_drop_removes_exactly_floor_ratio_scores(ratio):
    s = torch.randn(2, 7, 320)  # continuous random scores: no ties
    k = int(ratio * 320)
    out = adaptive_drop(s, ratio)
    assert ((out == 0).sum(-1) == k).all()
    lowest = torch.zeros_like(s, dtype=torch.bool).scatter_(-1, s.argsort(-1)[..., :k], True)
    assert torch.equal(out, torch.where(lowest, torch.zeros_like(s), s))  # the k lowest go, the rest is untouched


def test_drop_ratio_zero_and_ties_at_the_threshold():
    s = torch.randn(3, 320)
    assert torch.equal(adaptive_drop(s, 0.0), s)
    assert torch.equal(adaptive_drop(s, 0.003), s)  # floor(0.96) = 0
    row = torch.tensor([[3., 2., 1., 2., 2.]])
    assert adaptive_drop(row, 0.2).tolist() == [[3., 2., 0., 2., 2.]]  # k = 1
    assert adaptive_drop(row, 0.4).tolist() == [[3., 2., 0., 2., 2.]]  # k = 2, but the three 2s tie at the threshold
    assert adaptive_drop(row, 0.8).tolist() == [[3., 0., 0., 0., 0.]]  # k = 4: threshold 3
    with pytest.raises(ValueError, match='adem_drop_ratio'):
        ADEMCrossAttention(drop_ratio=1.0)


@pytest.mark.parametrize('ratio', [0.0, 0.25])
def test_cross_attention_matches_the_equations(ratio):
    B, T, d, n_v = 2, 5, 16, 20
    x, v = torch.randn(B, T, d), torch.randn(B, n_v, d)
    e1, e2 = torch.randn(1, n_v, d), torch.randn(1, n_v, d)
    media = {'adem_keys': F.silu(v + e1), 'adem_values': v + e2}
    out = ADEMCrossAttention(alpha=0.1, drop_ratio=ratio)(x, Ctx(cos=None, sin=None, media=media))
    ref = torch.zeros(B, T, d)
    k = int(ratio * n_v)
    for b in range(B):  # one text token at a time: S_j = SiLU(x) . SiLU(V_j + e1_j), keep ranks >= k, sum S_j (V_j + e2_j)
        for t in range(T):
            s = torch.stack([F.silu(x[b, t]) @ F.silu(v[b, j] + e1[0, j]) for j in range(n_v)])
            rank = s.argsort().argsort()
            ref[b, t] = 0.1 * sum(s[j] * (v[b, j] + e2[0, j]) for j in range(n_v) if rank[j] >= k)
    torch.testing.assert_close(out, ref)
    with pytest.raises(ValueError, match='needs the media of ADEMFusion'):
        ADEMCrossAttention()(x, Ctx(cos=None, sin=None))

# -----------------------------------------------------------------------------
# zero-init properties, KV cache


def test_text_only_sample_leaves_the_frozen_lm_unchanged_at_init(tiny):
    torch.manual_seed(0)
    model = build_vlm(adem_cfg(tiny)).eval()
    lm = frozen_lm(tiny)
    ids = torch.tensor([[5, 17, 23, 42, 8, 99, 3]])
    with torch.no_grad():
        # a batch without images: the fusion still runs (keys SiLU(e1), values e2 = 0)
        assert torch.equal(model(ids, has_image=torch.tensor([False])), lm.logits(lm(ids)))
        # a mixed batch: the text-only row is the frozen LM's, the image row is not
        mixed = torch.tensor([[5, 17, IMAGE_TOKEN, 42, 8, 99, 3], [5, 17, 23, 42, 8, 99, 3]])
        out = model(mixed, pixels=torch.randn(2, 3, 32, 32), has_image=torch.tensor([True, False]))
        plain = lm.logits(lm(mixed.clamp(min=0)))  # the same batch shape, so the same kernels: bitwise comparable
        assert torch.equal(out[1], plain[1])
        assert (out[0, :2] - plain[0, :2]).abs().max() > 0  # V != 0 reaches even the tokens before the CLS slot
        assert len(model.lm.blocks[0].ffn_side) == 1 and not list(model.lm.blocks[0].ffn_side.parameters())
        model.fusion.e2.normal_()  # trained e2: the branch acts on text-only samples too
        assert not torch.equal(model(ids, has_image=torch.tensor([False])), lm.logits(lm(ids)))


def test_clip_adapters_at_init_leave_the_tower_unchanged(tiny):
    vision, px = ViT.from_pretrained(tiny['clip']), torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = [vision(px, layer=-2, norm=True), vision(px, layer=-1, norm=True)]
        attach_adem(vision, frozen_lm(tiny), adapter_dim=12)
        vision.train()  # dropout on, as in training
        assert [len(b.adapters) for b in vision.blocks] == [1, 1]
        assert torch.equal(vision(px, layer=-2, norm=True), ref[0]) and torch.equal(vision(px, layer=-1, norm=True), ref[1])
        vision.eval()
        vision.blocks[0].adapters[0].fc2.weight.normal_()
        assert not torch.equal(vision(px, layer=-2, norm=True), ref[0])


def test_kv_cache_decoding_equals_the_full_forward(tiny):
    torch.manual_seed(0)
    model = build_vlm(adem_cfg(tiny, adem_beta=1.0)).eval()
    with torch.no_grad():  # trained-looking weights, so that the image and e1 / e2 change what comes out
        model.fusion.e2.normal_()
        model.fusion.proj_cls.fc2.weight.mul_(20)
    ids = torch.tensor([[5, 17, IMAGE_TOKEN, 42, 8, 99, 3], [5, 17, 23, 42, 8, 99, 3]])
    px, has_image = torch.randn(2, 3, 32, 32), torch.tensor([True, False])
    new = torch.tensor([[11, 60], [70, 12]])  # two decoding steps
    with torch.no_grad():
        full = model(torch.cat([ids, new], 1), pixels=px, has_image=has_image)  # (B, 9, V)
        x, media = model.embed(ids, model.image_features(px), has_image)
        cache = KVCache(model.lm.cfg, 2, 9, torch.float32, 'cpu')
        steps = [model.lm.logits(model.lm(embeds=x, cache=cache, media=media))]  # prefill
        for j in range(2):
            steps.append(model.lm.logits(model.lm(new[:, j:j + 1], cache=cache, media=media)))
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-5, atol=1e-5)
    # batched, left-padded greedy generation = each prompt alone, greedily through full forwards
    prompts = [ids[0], ids[1, 2:]]  # ragged: 7 and 5 tokens
    batch, mask = data.left_pad([p.tolist() for p in prompts], pad_id=0)
    got = model.generate(batch, pad_mask=mask, pixels=px, has_image=has_image, max_new_tokens=6)
    for i, p in enumerate(prompts):
        cur = p[None]
        for _ in range(6):
            with torch.no_grad():
                logits = model(cur, pixels=px[i:i + 1] if has_image[i] else None, has_image=has_image[i:i + 1])
            cur = torch.cat([cur, logits[:, -1].argmax(-1, keepdim=True)], 1)
        assert got[i].tolist() == cur[0, len(p):].tolist()
    assert got[0].tolist() != got[1].tolist()

# -----------------------------------------------------------------------------
# trainable parameters at the official shapes


@pytest.mark.parametrize('lm_cfg,expected', [
    (LMConfig(), 4_530_432),  # LLaMA-7B: METHODS.md's ~4.53M
    (LMConfig(dim=5120, n_layers=40, n_heads=40, n_kv_heads=40, ffn_dim=13824), 5_449_984),  # LLaMA-13B: ~5.45M
])
def test_trainable_parameter_count(lm_cfg, expected):
    with torch.device('meta'):
        vision, lm = ViT(ViTConfig()), Decoder(lm_cfg)  # CLIP ViT-L/14 at 224 (24 blocks, width 1024)
        fusion = ADEMFusion(vision.cfg.dim, lm.cfg.dim, scales=(256, 64), hidden=128)
        attach_adem(vision, lm, adapter_dim=12)
        model = VLM(vision, lm, fusion, vision_layer=-2, vision_norm=True)
    n = peft.mark_trainable(model, ('fusion.', '.adapters.'))  # config/adem_sqa.py's `trainable`
    d = lm_cfg.dim
    e = 2 * 320 * d                                           # e1, e2
    proj = 2 * (1024 * 128 + 128 + 128 * d + d)               # proj, proj_cls (7B: 2 x 659,584)
    clip = 24 * 2 * 1024 * 12                                 # 589,824, the never-run 24th block's included
    assert n == e + proj + clip == expected
    names = {k for k, p in model.named_parameters() if p.requires_grad}
    assert len(names) == 2 + 8 + 48 and all(k.startswith('fusion.') or '.adapters.0.fc' in k for k in names)

# -----------------------------------------------------------------------------
# data hooks for the official ScienceQA protocol


def test_base_template_labels_answer_and_eos(tiny):
    tok = data.Tokenizer(tiny['lm'])
    messages = [('user', 'Question: Which is red?\nResponse:'), ('assistant', 'The answer is A.')]
    assert data.render('base', messages) == 'Question: Which is red?\nResponse:The answer is A.</s>'
    pieces = data.template_pieces('base', messages, eos='<|im_end|>')
    ids, labels = data.tokenize_conversation(tok, pieces, max_len=100)
    assert ids[-1] == labels[-1] == tok.eos_id  # EOS labelled, as the official example ends with it
    assert tok.decode([l for l in labels if l != IGNORE_INDEX], skip_special=False) == 'The answer is A.<|im_end|>'
    prompt = data.encode_prompt(tok, 'base', messages[:1], answer_prefix='The answer is')
    assert tok.decode(prompt, skip_special=False) == 'Question: Which is red?\nResponse:The answer is'
    with pytest.raises(ValueError, match='no system prompt'):
        data.render('base', messages, system='x')


def test_restyle_image_slot():
    samples = [{'id': 'a', 'image': 'x.png', 'messages': [('user', '<image>\nQ?'), ('assistant', 'A')]},
               {'id': 'b', 'image': None, 'messages': [('user', 'Q?'), ('assistant', 'A')]},
               {'id': 'c', 'image': 'y.png', 'messages': [('user', '<image>'), ('assistant', 'a caption')]}]
    assert data.restyle_image_slot(samples) is samples  # the defaults change nothing
    out = data.restyle_image_slot(samples, 'Image: <image>', 'Image: N/A ')
    assert [s['messages'][0][1] for s in out] == ['Image: <image>Q?', 'Image: N/A Q?', 'Image: <image>']
    assert samples[0]['messages'][0][1] == '<image>\nQ?'  # the input is not modified
    after = data.restyle_image_slot(samples, '{text}\nImage: <image>\n')  # the image after the question
    assert [s['messages'][0][1] for s in after] == ['Q?\nImage: <image>\n', 'Q?', '\nImage: <image>\n']
    with pytest.raises(ValueError, match='exactly once'):
        data.restyle_image_slot(samples, 'Image: ', '')


def test_scienceqa_train_and_eval_prompts(sqa_root, tmp_path):
    (tmp_path / 'captions.json').write_text(json.dumps({'captions': {'100': 'a red circle', '106': 'a red disk'}}))
    cfg = dict(dataset='scienceqa', data_root=sqa_root, image_root='', prompt_format='CQM-A',
               eval_prompt_format='QCM-A', eval_captions=str(tmp_path / 'captions.json'),
               image_slot='Image: <image>', no_image_slot='Image: N/A ')
    train = data.read_split(cfg, 'train')[:2]  # CQM-A, no captions
    assert [m[0][1] for m in (s['messages'] for s in train)] == [
        'Image: <image>Context: A circle.\nQuestion: Which color is the circle?\nOptions: (A) red (B) blue\nResponse:',
        'Image: N/A Context: N/A\nQuestion: Which color is the circle?\nOptions: (A) red (B) blue (C) green\nResponse:']
    assert train[0]['messages'][1] == ('assistant', 'The answer is A.')
    test = data.read_split(cfg, 'test', evaluation=True)  # QCM-A with captions
    assert test[0]['messages'][0][1] == ('Image: <image>Question: Which color is the circle?\nContext: A circle. a red '
                                         'disk\nOptions: (A) red (B) blue\nResponse:')
    assert test[1]['messages'][0][1].startswith('Image: N/A Question: Which color is the circle?\nContext: N/A\n')
    assert data.read_split({**cfg, 'eval_prompt_format': '', 'eval_captions': ''}, 'test', evaluation=True)[0][
        'messages'][0][1].startswith('Image: <image>Context: A circle.\nQuestion:')


def test_token_layout_matches_the_official_code(sqa_root, tmp_path):
    """With a LLaMA-style tokenizer.json (legacy: "▁" prepended by the normalizer, as huggyllama/llama-7b's),
    our one-call tokenization of the restyled text gives the token sequence ADEM-VL builds from separate
    SentencePiece calls: [BOS] enc("Image: ") [CLS] enc(prompt + answer) [EOS], or [BOS] enc("Image: N/A")
    enc(prompt + answer) [EOS]; labels on the answer and EOS; evaluation: ... enc(prompt + "The answer is")."""
    from test_data import build_llama
    tok = data.Tokenizer(build_llama(tmp_path / 'llama', legacy=True))

    def enc(text):  # one official tokenizer.encode(text, bos=False, eos=False) call: its own leading "▁"
        return tok.tk.encode(text, add_special_tokens=False).ids
    cfg = dict(dataset='scienceqa', data_root=sqa_root, image_root='', prompt_format='CQM-A',
               image_slot='Image: <image>', no_image_slot='Image: N/A ')
    ds = data.ConversationDataset(data.read_split(cfg, 'train'), tok, template='base', n_image_tokens=1,
                                  max_len=512)
    for sample, i in zip(ds.samples, range(len(ds))):
        prompt, answer = data.scienceqa_prompt(data._load_json(f'{sqa_root}/problems.json')[sample['id']])
        item = ds[i]
        slot = enc('Image: ') + [IMAGE_TOKEN] if sample['image'] else enc('Image: N/A')
        assert item['input_ids'].tolist() == [tok.bos_id] + slot + enc(prompt + answer) + [tok.eos_id]
        n_answer = len(enc(prompt + answer)) - len(enc(prompt)) + 1
        labels = item['labels'].tolist()
        assert labels[:-n_answer] == [IGNORE_INDEX] * (len(labels) - n_answer)
        assert labels[-n_answer:] == item['input_ids'].tolist()[-n_answer:]
        ids = data.encode_prompt(tok, 'base', sample['messages'][:1], 1, answer_prefix='The answer is')
        assert ids == [tok.bos_id] + slot + enc(prompt + 'The answer is')


def test_prepare_image_norm_and_answer_prefix(tiny):
    model = build_vlm(adem_cfg(tiny))
    io = data.prepare(adem_cfg(tiny), model)
    assert (io['image_cfg']['mean'], io['image_cfg']['std']) == data.IMAGE_NORMS['imagenet']
    assert io['image_cfg']['resize'] == 'squash' and io['image_cfg']['size'] == 32
    assert io['answer_prefix'] == 'The answer is' and io['n_image_tokens'] == 1 and io['template'] == 'base'
    assert data.prepare(adem_cfg(tiny, image_norm=''), model)['image_cfg']['mean'] == data.CLIP_MEAN
    with pytest.raises(ValueError, match='image_norm must be'):
        data.prepare(adem_cfg(tiny, image_norm='inet'), model)

# -----------------------------------------------------------------------------
# config/adem_sqa.py end to end


def test_adem_sqa_config_trains_and_evaluates(tiny, sqa_root, tmp_path, monkeypatch):
    """The official recipe with tiny stand-ins for CLIP ViT-L/14 and LLaMA-7B: two optimizer steps on the tiny
    ScienceQA, then two test questions in the evaluation format (QCM-A, captions, "The answer is", 1 token)."""
    (tmp_path / 'captions.json').write_text(json.dumps({'captions': {'106': 'a red disk'}}))
    prompts, real = [], data.encode_prompt

    def spy(tok, *a, **kw):
        ids = real(tok, *a, **kw)
        prompts.append((ids, tok.decode(ids, skip_special=False)))
        return ids
    monkeypatch.setattr(data, 'encode_prompt', spy)
    monkeypatch.setattr(sys, 'argv', [
        'train.py', str(ROOT / 'config' / 'adem_sqa.py'), f'--init_vision={tiny["clip"]}', f'--init_lm={tiny["lm"]}',
        f'--data_root={sqa_root}', f'--eval_captions={tmp_path / "captions.json"}', f'--out_dir={tmp_path / "out"}',
        '--adem_scales=(16, 4)', '--max_iters=2', '--batch_size=2', '--global_batch=2', '--dtype=float32',
        '--eval_iters=1', '--eval_limit=2', '--device=cpu', '--log_interval=1'])
    g = runpy.run_path(str(ROOT / 'train.py'), run_name='__main__')
    assert g['step'] == 2 and g['fusion'] == 'adem' and g['template'] == 'base' and g['n_image_tokens'] == 1
    losses = [r['loss'] for r in map(json.loads, open(tmp_path / 'out' / 'log.jsonl')) if 'loss' in r]
    assert len(losses) == 2 and all(l == l and l > 0 for l in losses)
    model = g['raw_model']
    trained = {k for k, p in model.named_parameters() if p.requires_grad}
    assert trained == {k for k, _ in model.named_parameters() if k.startswith('fusion.') or '.adapters.' in k}
    assert g['n_train'] == 2 * 20 * 64 + 2 * (32 * 128 + 128 + 128 * 64 + 64) + 2 * 2 * 32 * 12
    assert all(p.dtype == torch.float32 for k, p in model.named_parameters() if k in trained)
    assert model.vision.blocks[0].adapters[0].fc2.weight.any()  # the adapter of the block that runs trained ...
    assert not model.vision.blocks[1].adapters[0].fc2.weight.any()  # ... the last block's never runs (layer -2)
    assert model.fusion.e2.any()
    result = json.load(open(tmp_path / 'out' / 'eval_test.json'))
    assert result['task'] == 'scienceqa' and result['n'] == 2 and 'Avg' in result['metrics']
    (ids_img, text_img), (ids_txt, text_txt) = sorted(prompts, key=lambda p: -p[0].count(IMAGE_TOKEN))
    assert ids_img.count(IMAGE_TOKEN) == 1 and IMAGE_TOKEN not in ids_txt
    assert text_img == ('Image: Question: Which color is the circle?\nContext: A circle. a red disk\n'
                        'Options: (A) red (B) blue\nResponse:The answer is')  # the CLS slot is not text
    assert text_txt == ('Image: N/A Question: Which color is the circle?\nContext: N/A\n'
                        'Options: (A) red (B) blue (C) green\nResponse:The answer is')
    assert all(len(g['tok'].tk.encode(p['text'], add_special_tokens=False).ids) <= 1 for p in result['predictions'])


def test_adem_sqa_on_two_processes_matches_one(tiny, sqa_root, tmp_path):
    """DDP and FSDP2 under torchrun (2 CPU ranks): the tiny ScienceQA mixes image and text-only questions, so a
    rank may get no image (the projectors then get no gradient, and under FSDP the tower must still run on every
    rank), and the last tower block's adapter never gets one; the losses and trained weights equal one process."""
    from test_distributed import losses as logged, run
    argv = [str(ROOT / 'config' / 'adem_sqa.py'), f'--init_vision={tiny["clip"]}', f'--init_lm={tiny["lm"]}',
            f'--data_root={sqa_root}', '--eval_captions=', '--adem_scales=(16, 4)', '--max_iters=3', '--dtype=float32',
            '--eval_iters=1', '--device=cpu', '--log_interval=1', '--threads=1', '--final_eval=False']
    run([*argv, f'--out_dir={tmp_path / "one"}', '--batch_size=2', '--global_batch=4'])
    one = torch.load(tmp_path / 'one' / 'ckpt.pt', weights_only=True)['model']
    for fsdp in (False, True):
        out = tmp_path / f'fsdp{fsdp}'
        run([*argv, f'--out_dir={out}', '--batch_size=1', '--global_batch=4', f'--fsdp={fsdp}'], nproc=2)
        assert logged(out) == pytest.approx(logged(tmp_path / 'one'), rel=1e-5, abs=1e-6)
        two = torch.load(out / 'ckpt.pt', weights_only=True)['model']
        assert sorted(two) == sorted(one)
        for k in one:  # the tower adapters' dropout draws differ between 1 and 2 processes (seed + rank) ...
            if '.adapters.' not in k:  # ... which reaches the fusion's weights only slightly
                torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=1e-5)
        assert two['vision.blocks.0.adapters.0.fc2.weight'].any()  # trained, same on every rank (one checkpoint)
        assert not two['vision.blocks.1.adapters.0.fc2.weight'].any()  # the never-run block: no gradient, no error


def test_adem_coco_config_trains_with_augmentation_and_resumes_exactly(tiny, coco_root, tmp_path, monkeypatch):
    """config/adem_coco.py with tiny stand-ins: augmented training images (no feature cache), the official
    sequence [BOS] "Image: " [CLS] "a picture of" " caption" [EOS], captions scored at the end; a run cut after
    2 steps and resumed gives the uninterrupted losses (the augmentation is seeded by the stream position;
    constant learning rate so that the shorter run has the same schedule)."""
    def run(out, *extra):
        monkeypatch.setattr(sys, 'argv', [
            'train.py', str(ROOT / 'config' / 'adem_coco.py'), f'--init_vision={tiny["clip"]}',
            f'--init_lm={tiny["lm"]}', f'--data_root={coco_root}', f'--out_dir={out}', '--eval_split=test',
            '--adem_scales=(16, 4)', '--batch_size=2', '--global_batch=2', '--dtype=float32', '--eval_iters=1',
            '--eval_limit=2', '--max_new_tokens=4', '--log_interval=1', '--eval_interval=2', '--warmup_ratio=0.0',
            '--min_lr=1.125e-3', *extra])
        return runpy.run_path(str(ROOT / 'train.py'), run_name='__main__')

    def logged(out):
        return [r['loss'] for r in map(json.loads, open(out / 'log.jsonl')) if 'loss' in r]
    g = run(tmp_path / 'whole', '--max_iters=4')
    assert g['feats_cache'] is None and g['image_augment']
    text = g['tok'].decode([t for t in g['train_ds'][0]['input_ids'].tolist() if t >= 0], skip_special=False)
    assert text.startswith('Image: ') and ('a picture of a ' in text or 'a picture of the ' in text), text
    assert json.load(open(tmp_path / 'whole' / 'eval_test.json'))['task'] == 'coco'
    run(tmp_path / 'cut', '--max_iters=2', '--final_eval=False')
    run(tmp_path / 'cut', '--max_iters=4', '--init_from=resume', '--final_eval=False')
    assert logged(tmp_path / 'cut') == pytest.approx(logged(tmp_path / 'whole'), rel=1e-6)
