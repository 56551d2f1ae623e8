"""BLIP-2 Q-Former and MiniGPT-4 (fusion.py): parity with transformers' Blip2 on tiny random checkpoints saved
with save_pretrained and loaded through our key map; shapes, cross-attention layers, trainable sets and
parameter counts of the full-size recipes on the meta device; train.py with config/blip2_coco.py and
config/minigpt4_coco.py on tiny stand-ins."""
import copy
import json
import re
import runpy
import sys

import pytest
import torch
import torch.nn as nn

import peft
from conftest import ROOT, randomize, rel_err, shape_image
from fusion import QFormerFusion, blip2_config, build_qformer, load_blip2
from model import IMAGE_TOKEN, VLM, Decoder, LMConfig, ViT, ViTConfig

T = pytest.importorskip('transformers')

TOL = 1e-4  # relative error, float32


def blip2_cfg(vis_dim=48, dim=32, n_layers=4, n_heads=4, n_queries=8, freq=2):
    """A tiny Blip2Config with a LLaMA language model (HF Blip2 takes any causal LM)."""
    vision = T.Blip2VisionConfig(hidden_size=vis_dim, intermediate_size=2 * vis_dim, num_hidden_layers=2,
                                 num_attention_heads=4, image_size=32, patch_size=8)
    qformer = T.Blip2QFormerConfig(hidden_size=dim, num_hidden_layers=n_layers, num_attention_heads=n_heads,
                                   intermediate_size=2 * dim, cross_attention_frequency=freq)
    lm = T.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return T.Blip2Config(vision_config=vision.to_dict(), qformer_config=qformer.to_dict(), text_config=lm.to_dict(),
                         num_query_tokens=n_queries, image_token_index=5)


def save_blip2(path, **kw):
    torch.manual_seed(0)
    ref = randomize(T.Blip2ForConditionalGeneration(blip2_cfg(**kw))).eval()
    ref.save_pretrained(path)
    return ref


@pytest.fixture(scope='module')
def blip2(tmp_path_factory):
    """(HF model, its folder, our fusion loaded from that folder through the key map, projection included)."""
    path = tmp_path_factory.mktemp('blip2')
    ref = save_blip2(path)
    ours = load_blip2(QFormerFusion(lm_dim=64, **blip2_config(path)), path, projection=True).eval()
    return ref, path, ours


def instructblip_cfg(vis_dim=48, dim=32, n_layers=4, n_queries=8, freq=2):
    """A tiny InstructBlipConfig with a T5 language model (InstructBLIP FlanT5's shape)."""
    vision = T.InstructBlipVisionConfig(hidden_size=vis_dim, intermediate_size=2 * vis_dim, num_hidden_layers=2,
                                        num_attention_heads=4, image_size=32, patch_size=8)
    qformer = T.InstructBlipQFormerConfig(hidden_size=dim, num_hidden_layers=n_layers, num_attention_heads=4,
                                          intermediate_size=2 * dim, cross_attention_frequency=freq, vocab_size=99,
                                          max_position_embeddings=40, encoder_hidden_size=vis_dim)
    lm = T.T5Config(vocab_size=128, d_model=64, d_kv=16, d_ff=96, num_layers=2, num_heads=4,
                    feed_forward_proj='gated-gelu', tie_word_embeddings=False)
    return T.InstructBlipConfig(vision_config=vision.to_dict(), qformer_config=qformer.to_dict(),
                                text_config=lm.to_dict(), num_query_tokens=n_queries)


@pytest.fixture(scope='module')
def instructblip(tmp_path_factory):
    """(HF InstructBlipForConditionalGeneration, its folder, our fusion loaded from it, projection included)."""
    path = tmp_path_factory.mktemp('instructblip')
    torch.manual_seed(0)
    ref = randomize(T.InstructBlipForConditionalGeneration(instructblip_cfg())).eval()
    ref.save_pretrained(path)
    ours = load_blip2(QFormerFusion(lm_dim=64, **blip2_config(path)), path, projection=True).eval()
    return ref, path, ours


def instruction(B=3, L=7):
    """Right-padded instruction ids in the Q-Former's vocabulary: rows of 7, 4 and 1 real tokens."""
    ids = torch.randint(1, 99, (B, L))
    mask = torch.arange(L)[None] < torch.tensor([L, 4, 1])[:B, None]
    return ids.masked_fill(~mask, 0), mask


def test_instructblip_qformer_parity_with_instruction_tokens(instructblip):
    """The instruction enters beside the queries (word + position embeddings, the text FFN), with its padding
    masked: the query outputs equal InstructBlipQFormerModel's."""
    ref, _, ours = instructblip
    img = torch.randn(3, 17, 48)
    ids, mask = instruction()
    q = ref.query_tokens.expand(3, -1, -1)
    with torch.no_grad():
        want = ref.qformer(input_ids=ids, attention_mask=torch.cat([torch.ones(3, 8, dtype=torch.long), mask.long()], 1),
                           query_embeds=q, encoder_hidden_states=img).last_hidden_state[:, :8]
        got = ours.qformer(img, ids, mask)
        assert rel_err(got, want) < TOL
        alone = ours.qformer(img[1:2], ids[1:2, :4])  # a padded row equals its unpadded self
        assert rel_err(alone, got[1:2]) < TOL
        assert rel_err(ours.qformer(img), got) > 10 * TOL  # the instruction changes the queries' outputs


def test_instructblip_fusion_parity_with_image_features(instructblip):
    """ln_vision -> instruction-aware Q-Former -> projection equals HF's get_image_features."""
    ref, _, ours = instructblip
    px = torch.randn(3, 3, 32, 32)
    ids, mask = instruction()
    with torch.no_grad():
        want = ref.get_image_features(pixel_values=px, qformer_input_ids=ids, qformer_attention_mask=mask.long())
        want = want.pooler_output if hasattr(want, 'pooler_output') else want
        feats = ref.vision_model(pixel_values=px, output_hidden_states=True).hidden_states[-1]
        got, _ = ours(feats, instruction_ids=ids, instruction_mask=mask)
    assert rel_err(got, want) < TOL


def test_instructblip_load_errors(instructblip, tmp_path):
    _, path, _ = instructblip
    with pytest.raises(ValueError, match=r'missing: qformer\.embeddings\.word_embeddings\.weight'):
        from safetensors.torch import load_file, save_file
        sd = load_file(path / 'model.safetensors')
        sd.pop('qformer.embeddings.word_embeddings.weight')
        (tmp_path / 'x').mkdir()
        save_file(sd, tmp_path / 'x' / 'model.safetensors')
        (tmp_path / 'x' / 'config.json').write_text((path / 'config.json').read_text())
        load_blip2(QFormerFusion(lm_dim=64, **blip2_config(tmp_path / 'x')), tmp_path / 'x')
    with pytest.raises(ValueError, match='no text embeddings'):
        QFormerFusion(48, 64, dim=32, n_layers=2, n_heads=4, n_queries=8).qformer(torch.randn(1, 5, 48), torch.ones(1, 2).long())

# -----------------------------------------------------------------------------
# parity with transformers


@pytest.mark.parametrize('freq', [2, 3])
def test_qformer_parity_with_blip2_qformer_model(tmp_path, freq):
    ref = save_blip2(tmp_path, freq=freq)
    ours = load_blip2(QFormerFusion(lm_dim=64, **blip2_config(tmp_path)), tmp_path).eval()
    img = torch.randn(2, 17, 48)  # (B, N, Dv) image features, already through ln_vision
    with torch.no_grad():
        want = ref.qformer(query_embeds=ref.query_tokens.expand(2, -1, -1), encoder_hidden_states=img).last_hidden_state
        got = ours.qformer(img)
    assert got.shape == want.shape == (2, 8, 32)
    assert rel_err(got, want) < TOL
    assert [i for i, l in enumerate(ours.qformer.layers) if l.xattn is not None] == \
        [i for i, l in enumerate(ref.qformer.encoder.layer) if l.has_cross_attention] == list(range(0, 4, freq))
    with torch.no_grad():  # the comparison can fail: one changed weight shows
        ours.qformer.layers[-1].fc2.bias[0] += 0.1
        assert rel_err(ours.qformer(img), want) > 10 * TOL


def test_fusion_parity_with_blip2_image_features(blip2):
    """ln_vision (HF vision_model.post_layernorm) -> Q-Former -> projection equals HF's get_image_features,
    fed with the tower's last hidden state before post_layernorm."""
    ref, _, ours = blip2
    px = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        vis = ref.vision_model(pixel_values=px, output_hidden_states=True)
        assert rel_err(ref.vision_model.post_layernorm(vis.hidden_states[-1]), vis.last_hidden_state) < 1e-6
        want = ref.get_image_features(pixel_values=px).pooler_output
        got, media = ours(vis.hidden_states[-1])
    assert got.shape == want.shape == (3, 8, 64) and media == {}
    assert rel_err(got, want) < TOL


def test_vlm_logits_match_blip2_for_conditional_generation(blip2, tmp_path):
    """Our VLM (Q-Former tokens spliced at the image placeholders of a frozen LLaMA) equals HF's Blip2 with a
    LLaMA language model, which splices the same tokens at its image_token_index positions."""
    ref, _, fusion = blip2
    ref.language_model.save_pretrained(tmp_path)
    lm = Decoder.from_pretrained(tmp_path)
    vision = ViT(ViTConfig(dim=48, n_layers=1, n_heads=4, mlp_dim=96, image_size=32, patch_size=8))  # unused: feats given
    model = VLM(vision, lm, fusion).eval()
    text = torch.randint(6, 128, (2, 7))
    hf_ids = torch.cat([torch.ones(2, 1, dtype=torch.long), torch.full((2, 8), 5), text], dim=1)  # BOS, 8 images, text
    ids = hf_ids.masked_fill(hf_ids == 5, IMAGE_TOKEN)
    px = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats = ref.vision_model(pixel_values=px, output_hidden_states=True).hidden_states[-1]
        want = ref(pixel_values=px, input_ids=hf_ids).logits
        got = model(ids, feats=feats)
    assert rel_err(got, want) < TOL

def test_gradients_reach_every_fusion_parameter_through_the_frozen_lm(blip2, tmp_path):
    """BLIP-2's stage 2: the LM loss on the text trains ln_vision, the queries, every Q-Former layer (cross-
    attention keys / values included) and the projection, through a frozen LLM that gets no gradient."""
    ref, _, fusion = blip2
    ref.language_model.save_pretrained(tmp_path)
    vision = ViT(ViTConfig(dim=48, n_layers=1, n_heads=4, mlp_dim=96, image_size=32, patch_size=8))
    model = VLM(vision, Decoder.from_pretrained(tmp_path), copy.deepcopy(fusion)).train()
    peft.mark_trainable(model, ('fusion.',))
    ids = torch.cat([torch.ones(2, 1, dtype=torch.long), torch.full((2, 8), IMAGE_TOKEN), torch.randint(6, 128, (2, 5))], 1)
    labels = ids.masked_fill(ids == IMAGE_TOKEN, -100)
    model(ids, feats=torch.randn(2, 17, 48), labels=labels).backward()
    grads = {k: p.grad for k, p in model.named_parameters()}
    assert all(g is not None and g.abs().sum() > 0 for k, g in grads.items() if k.startswith('fusion.'))
    assert all(g is None for k, g in grads.items() if not k.startswith('fusion.'))

# -----------------------------------------------------------------------------
# loading: what fails, and how


def test_load_errors_name_the_problem(blip2, tiny, tmp_path):
    _, path, _ = blip2
    cfg = dict(init=str(path), dim=32, layers=4, heads=4, queries=8)  # the qformer_* keys, as build_vlm hands them
    assert build_qformer(48, 64, **cfg).n_tokens(257) == 8
    with pytest.raises(ValueError, match=r'cross-attends to 48-wide image features.*the tower \(init_vision\) is 1024 wide'):
        build_qformer(1024, 64, **cfg)
    with pytest.raises(ValueError, match=r'qformer_layers=12 but the checkpoint has 4; qformer_queries=32 .* has 8'):
        build_qformer(48, 64, **{**cfg, 'layers': 12, 'queries': 32})
    with pytest.raises(ValueError, match=r"model_type 'clip_vision_model', expected 'blip-2'"):
        blip2_config(tiny['clip'])
    # a Q-Former built with cross-attention every other layer does not take one with it in every layer
    save_blip2(tmp_path, freq=1)
    with pytest.raises(ValueError, match=r'unexpected: qformer\.encoder\.layer\.1\.crossattention'):
        load_blip2(QFormerFusion(48, 64, dim=32, n_layers=4, n_heads=4, n_queries=8, cross_attention_freq=2), tmp_path)
    # the projection is only read on request, and then must fit
    with pytest.raises(ValueError, match=r'wrong shape.*language_projection\.weight'):
        load_blip2(QFormerFusion(lm_dim=32, **blip2_config(path)), path, projection=True)


def test_dropout_only_while_the_qformer_trains():
    torch.manual_seed(0)
    f = QFormerFusion(16, 24, dim=32, n_layers=2, n_heads=4, n_queries=4, dropout=0.5).train()
    x = torch.randn(2, 5, 16)
    assert not torch.equal(f(x)[0], f(x)[0])  # BLIP-2 stage 2: BERT's dropout while the Q-Former trains
    peft.mark_trainable(f, ('proj.',))  # MiniGPT-4: the Q-Former is frozen and runs as in eval mode
    a, b = f(x)[0], f(x)[0]
    assert torch.equal(a, b) and torch.equal(a, f.eval()(x)[0])

# -----------------------------------------------------------------------------
# the full-size recipes on the meta device: shapes, trainable names, parameter counts


def config(name):
    ns = {}
    exec((ROOT / 'config' / name).read_text(), ns)
    return ns


def meta_vlm(vis_cfg, lm_cfg, cfg):
    with torch.device('meta'):
        fusion = QFormerFusion(vis_cfg.dim, lm_cfg.dim, dim=cfg['qformer_dim'], n_layers=cfg['qformer_layers'],
                               n_heads=cfg['qformer_heads'], n_queries=cfg['qformer_queries'])
        model = VLM(ViT(vis_cfg), Decoder(lm_cfg), fusion)
    n = peft.mark_trainable(model, cfg.get('trainable') or QFormerFusion.trainable)  # the config's, or the default
    return model, n, {k for k, p in model.named_parameters() if p.requires_grad}


def count(m):
    return sum(p.numel() for p in m.parameters())


CLIP_L = ViTConfig(kind='clip', image_size=224, patch_size=14, dim=1024, n_layers=24, n_heads=16, mlp_dim=4096)
VIT_G = ViTConfig(kind='clip', image_size=224, patch_size=14, dim=1408, n_layers=40, n_heads=16, mlp_dim=6144, act='gelu')
LLAMA_7B = LMConfig()  # 4096 wide, 32 layers


def test_shapes_and_cross_attention_layers_at_full_size():
    with torch.device('meta'):
        f = QFormerFusion(1024, 4096)
        out, _ = f(torch.empty(2, 257, 1024))  # CLIP ViT-L/14 at 224 px: 257 tokens
        hf = T.Blip2QFormerModel(T.Blip2QFormerConfig(encoder_hidden_size=1024))
    assert out.shape == (2, 32, 4096) and f.n_tokens(257) == 32 and f.n_tokens(577) == 32
    assert f.qformer.query.shape == (1, 32, 768)
    xattn = [i for i, l in enumerate(f.qformer.layers) if l.xattn is not None]
    assert xattn == [i for i, l in enumerate(hf.encoder.layer) if l.has_cross_attention] == [0, 2, 4, 6, 8, 10]
    assert {int(k.split('.')[2]) for k, _ in f.named_parameters() if '.xattn.' in k} == set(xattn)
    assert f.qformer.layers[0].xattn.k.weight.shape == (768, 1024)  # keys / values read the tower's width


def test_blip2_trainable_set_and_count():
    """BLIP-2's stage 2 (config/blip2_coco.py) on CLIP ViT-L + LLaMA-7B: ln_vision, queries, Q-Former and
    projection train, 104.78M, which is HF's Blip2QFormerModel + query tokens + ln_vision + a Linear(768, 4096)."""
    cfg = config('blip2_coco.py')
    model, n, names = meta_vlm(CLIP_L, LLAMA_7B, cfg)
    assert names == {k for k, _ in model.named_parameters() if k.startswith('fusion.')}
    assert {'fusion.ln_vision.weight', 'fusion.qformer.query', 'fusion.qformer.layers.0.xattn.k.weight',
            'fusion.qformer.layers.11.fc2.weight', 'fusion.proj.weight'} <= names
    with torch.device('meta'):
        hf = count(T.Blip2QFormerModel(T.Blip2QFormerConfig(encoder_hidden_size=1024)))
        proj = count(nn.Linear(768, 4096))
    assert n == hf + 32 * 768 + 2 * 1024 + proj == 104_775_168
    print(f"\nBLIP-2 recipe, CLIP ViT-L/14 + LLaMA-7B: {n / 1e6:.2f}M trainable "
          f"(Q-Former {(hf + 32 * 768) / 1e6:.2f}M, ln_vision 2048, projection {proj / 1e6:.2f}M)")


def test_blip2_original_counts_against_hf():
    """BLIP-2 itself (EVA ViT-g 1408 wide, OPT-2.7B 2560 wide): LAVIS's stage 2 trains ln_vision, the query
    tokens, the Q-Former's query path and opt_proj: 107.13M, HF's qformer + query_tokens + post_layernorm +
    language_projection. Stage 1 also trains the text branch: 186.08M in HF's Blip2ForImageTextRetrieval
    without its vision tower; LAVIS's BertLMHeadModel adds its MLM head (0.62M: transform + LayerNorm + bias, the
    decoder tied to the word embeddings) and the [DEC] token: 186.70M, against the paper's 188M."""
    with torch.device('meta'):
        ours = QFormerFusion(1408, 2560)
        opt = T.OPTConfig(hidden_size=2560, ffn_dim=10240, num_hidden_layers=1, num_attention_heads=32, word_embed_proj_dim=2560)
        hf = T.Blip2ForConditionalGeneration(T.Blip2Config(text_config=opt.to_dict()))
        itm = T.Blip2ForImageTextRetrieval(T.Blip2Config(qformer_config=dict(use_qformer_text_input=True)))
    stage2 = sum(p.numel() for k, p in hf.named_parameters()
                 if k.startswith(('qformer.', 'query_tokens', 'vision_model.post_layernorm.', 'language_projection.')))
    assert count(ours) == stage2 == 107_133_696
    stage1 = sum(p.numel() for k, p in itm.named_parameters()
                 if not k.startswith('vision_model.') or k.startswith('vision_model.post_layernorm.'))
    text = sum(p.numel() for k, p in itm.named_parameters()
               if k.startswith(('embeddings.', 'vision_projection.', 'text_projection.', 'itm_head.'))
               or re.search(r'\.layer\.\d+\.(intermediate|output)\.', k))  # word / position embeddings, text FFN, heads
    assert stage1 == count(ours) - count(ours.proj) + text and 185e6 < stage1 < 188e6
    print(f"\nBLIP-2 (ViT-g, OPT-2.7B): stage 2 trains {stage2 / 1e6:.2f}M; stage-1 Q-Former with its text branch "
          f"{stage1 / 1e6:.2f}M (text branch {text / 1e6:.2f}M)")


def test_minigpt4_trainable_set_and_count():
    """MiniGPT-4 (config/minigpt4_coco.py): only llama_proj, Q-Former output 768 -> LLaMA-7B's 4096."""
    cfg = config('minigpt4_coco.py')
    assert cfg['qformer_init'] and cfg['fusion'] == 'qformer'
    model, n, names = meta_vlm(VIT_G, LLAMA_7B, cfg)
    assert names == {'fusion.proj.weight', 'fusion.proj.bias'}
    assert n == 768 * 4096 + 4096 == 3_149_824
    print(f"\nMiniGPT-4 projection into LLaMA-7B: {n / 1e6:.2f}M trainable")

# -----------------------------------------------------------------------------
# train.py with the recipes' configs and tiny stand-ins


@pytest.fixture(scope='module')
def coco_root(tmp_path_factory):
    """A tiny COCO Karpathy split in LAVIS's layout: coco_karpathy_{train,test}.json (one entry per caption)."""
    root = tmp_path_factory.mktemp('coco')
    pairs = [(c, s) for c in ('red', 'green', 'blue') for s in ('circle', 'square')]
    for i, (color, shape) in enumerate(pairs):
        shape_image(root / f'{i}.png', color, shape)
    train = [{'image': f'{i}.png', 'caption': cap, 'image_id': str(i)} for i, (c, s) in enumerate(pairs)
             for cap in (f'a {c} {s}', f'the {s} is {c}')]
    (root / 'coco_karpathy_train.json').write_text(json.dumps(train))
    (root / 'coco_karpathy_test.json').write_text(json.dumps(
        [{'image': f'{i}.png', 'caption': [f'a {c} {s}'], 'image_id': str(i)} for i, (c, s) in enumerate(pairs)]))
    return str(root)


def train(monkeypatch, *args):
    monkeypatch.setattr(sys, 'argv', ['train.py', *args])
    return runpy.run_path(str(ROOT / 'train.py'), run_name='__main__')


SMALL = ['--qformer_dim=32', '--qformer_layers=2', '--qformer_heads=4', '--qformer_queries=8']


def tiny_args(tiny, coco_root, out):
    return [f'--init_vision={tiny["clip"]}', f'--init_lm={tiny["lm"]}', f'--data_root={coco_root}', f'--out_dir={out}',
            '--image_size=32', '--max_iters=2', '--batch_size=2', '--global_batch=2', '--template=qwen2',
            '--dtype=float32', '--eval_iters=1', '--eval_limit=2', '--device=cpu', '--log_interval=1']


def losses(out):
    return [r['loss'] for r in map(json.loads, open(out / 'log.jsonl')) if 'loss' in r]


def test_blip2_coco_config_takes_two_steps(tiny, coco_root, tmp_path, monkeypatch):
    g = train(monkeypatch, str(ROOT / 'config' / 'blip2_coco.py'), *tiny_args(tiny, coco_root, tmp_path), *SMALL)
    assert g['step'] == 2 and g['fusion'] == 'qformer' and g['n_image_tokens'] == 8
    assert len(g['train_ds']) == 12  # one sample per caption
    ls = losses(tmp_path)
    assert len(ls) == 2 and all(l == l for l in ls)
    ckpt = torch.load(tmp_path / 'ckpt.pt', weights_only=True)
    assert ckpt['model'].keys() == {k for k, _ in g['raw_model'].named_parameters() if k.startswith('fusion.')}
    result = json.load(open(tmp_path / 'eval_test.json'))
    assert result['task'] == 'coco' and result['n'] == 2


def test_minigpt4_coco_config_takes_two_steps(tiny, coco_root, tmp_path, monkeypatch):
    """MiniGPT-4 on a tiny Blip2 checkpoint as wide as the tiny CLIP tower: the loaded Q-Former, queries and
    ln_vision stay exactly as loaded, only the projection trains."""
    blip = tmp_path / 'blip2'
    save_blip2(blip, vis_dim=32, n_layers=2, n_queries=8)
    out = tmp_path / 'out'
    g = train(monkeypatch, str(ROOT / 'config' / 'minigpt4_coco.py'), *tiny_args(tiny, coco_root, out), *SMALL,
              f'--qformer_init={blip}', '--final_eval=False',
              '--max_len=128')  # the tiny byte-level tokenizer's ChatML prompts exceed the recipe's 96 (too_long skips)
    assert g['step'] == 2 and g['n_image_tokens'] == 8 and len(losses(out)) == 2
    fusion = g['raw_model'].fusion
    ckpt = torch.load(out / 'ckpt.pt', weights_only=True)
    assert ckpt['model'].keys() == {'fusion.proj.weight', 'fusion.proj.bias'}
    assert len(ckpt['optimizer']['state']) == 2  # AdamW holds (and stepped) the projection's two tensors only
    loaded = load_blip2(QFormerFusion(lm_dim=64, **blip2_config(blip)), blip)
    frozen = {k: v for k, v in loaded.state_dict().items() if not k.startswith('proj.')}
    assert all(torch.equal(fusion.state_dict()[k], v) for k, v in frozen.items()) and len(frozen) == 2 + 1 + 2 + 2 * 16 + 10


@pytest.fixture(scope='module')
def okvqa_root(tmp_path_factory):
    """A tiny OK-VQA in its official layout (VQAv2-style questions / annotations without multiple_choice_answer)
    and COCO 2014 image names."""
    root = tmp_path_factory.mktemp('okvqa')
    (root / 'train2014').mkdir()
    pairs = [(c, s) for c in ('red', 'green', 'blue') for s in ('circle', 'square')]
    for split in ('train', 'val'):
        qs, anns = [], []
        for i, (color, shape) in enumerate(pairs):
            if split == 'train':
                shape_image(root / 'train2014' / f'COCO_train2014_{i:012d}.jpg', color, shape)
            qid = 10 * i + (split == 'val')
            qs.append({'image_id': i, 'question': 'What color is the shape?', 'question_id': qid})
            anns.append({'image_id': i, 'question_id': qid, 'answer_type': 'other', 'question_type': 'what',
                         'confidence': 3, 'answers': [{'answer_id': k + 1, 'raw_answer': color, 'answer': color,
                                                       'answer_confidence': 'yes'} for k in range(10)]})
        (root / f'OpenEnded_mscoco_{split}2014_questions.json').write_text(
            json.dumps({'data_subtype': 'train2014', 'questions': qs}))  # both splits use the train images here
        (root / f'mscoco_{split}2014_annotations.json').write_text(json.dumps({'annotations': anns}))
    return str(root)


def test_instructblip_vicuna_okvqa_config_and_head_tuning_take_two_steps(tiny, okvqa_root, tmp_path, monkeypatch):
    """config/instructblip_vicuna_okvqa.py (PETAL's VQA recipe, the full fine-tune baseline) on tiny stand-ins
    and a tiny Blip2 checkpoint (a BLIP-2 Q-Former also loads into the recipe; tests/test_instructblip.py builds
    the whole InstructBLIP-Vicuna), then its head-tuning variant: only the last Q-Former layer's fc1 trains."""
    blip = tmp_path / 'blip2'
    save_blip2(blip, vis_dim=32, n_layers=2, n_queries=8)
    args = [str(ROOT / 'config' / 'instructblip_vicuna_okvqa.py'), *tiny_args(tiny, okvqa_root, tmp_path / 'full'),
            *SMALL, f'--qformer_init={blip}', f'--image_root={okvqa_root}', '--template=base']
    g = train(monkeypatch, *args)
    assert g['step'] == 2 and g['dataset'] == 'okvqa' and g['weight_decay'] == 0.02 and g['learning_rate'] == 2e-5
    assert len(g['train_ds']) == 6 and len(losses(tmp_path / 'full')) == 2
    assert g['train_ds'].samples[0]['messages'][0][1] == '<image>Question: What color is the shape? Short answer:'
    result = json.load(open(tmp_path / 'full' / 'eval_val.json'))
    assert result['task'] == 'okvqa' and result['n'] == 2 and 'overall' in result['metrics']
    ckpt = torch.load(tmp_path / 'full' / 'ckpt.pt', weights_only=True)
    assert ckpt['model'].keys() == {k for k, _ in g['raw_model'].named_parameters() if k.startswith('fusion.')}
    args[2:] = [*tiny_args(tiny, okvqa_root, tmp_path / 'head'), *SMALL, f'--qformer_init={blip}',
                f'--image_root={okvqa_root}', '--template=base', "--trainable=('fusion.qformer.layers.1.fc1.',)",
                '--final_eval=False']
    g = train(monkeypatch, *args)
    assert g['step'] == 2
    ckpt = torch.load(tmp_path / 'head' / 'ckpt.pt', weights_only=True)
    assert ckpt['model'].keys() == {'fusion.qformer.layers.1.fc1.weight', 'fusion.qformer.layers.1.fc1.bias'}
