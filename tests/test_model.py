"""Backbones vs transformers on tiny random checkpoints saved in the test (no downloads)."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import randomize, rel_err
from model import ViT, Decoder, KVCache

T = pytest.importorskip('transformers')

TOL = 1e-4  # relative error, float32

# -----------------------------------------------------------------------------
# vision towers


def vit_cases():
    small = dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=32, patch_size=8)
    return {
        'clip': (T.CLIPVisionModel, T.CLIPVisionConfig(intermediate_size=128, **small)),
        'clip_full': (T.CLIPModel, T.CLIPConfig(vision_config=T.CLIPVisionConfig(intermediate_size=128, **small).to_dict(),
                                                 text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                                  num_attention_heads=2, vocab_size=99))),
        'dinov2': (T.Dinov2Model, T.Dinov2Config(mlp_ratio=3, **small)),
        'siglip': (T.SiglipVisionModel, T.SiglipVisionConfig(intermediate_size=128, **small)),
        'eva_blip2': (T.Blip2VisionModel, T.Blip2VisionConfig(intermediate_size=128, **small)),
        'eva_instructblip': (T.InstructBlipVisionModel, T.InstructBlipVisionConfig(intermediate_size=128, **small)),
    }


@pytest.mark.parametrize('name', ['clip', 'clip_full', 'dinov2', 'siglip', 'eva_blip2', 'eva_instructblip'])
@pytest.mark.parametrize('size', [32, 48])  # 48: a second image size through position interpolation
def test_vit_parity(tmp_path, name, size):
    cls, cfg = vit_cases()[name]
    ref = randomize(cls(cfg)).eval()
    ref.save_pretrained(tmp_path)
    ours = ViT.from_pretrained(tmp_path)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        vis = ref.vision_model if name == 'clip_full' else ref
        kw = {} if name == 'dinov2' else {'interpolate_pos_encoding': size != 32}
        out = vis(pixel_values=x, output_hidden_states=True, **kw)
        hs = ours.hidden_states(x)
    assert len(hs) == len(out.hidden_states) == 4
    for a, b in zip(hs, out.hidden_states):
        assert rel_err(a, b) < TOL
    with torch.no_grad():
        if name.startswith('clip'):  # CLIP: last_hidden_state has no final norm; the pooled CLS has
            assert rel_err(ours(x), out.last_hidden_state) < TOL
            assert rel_err(ours(x, norm=True)[:, 0], out.pooler_output) < TOL
        else:
            assert rel_err(ours(x, norm=True), out.last_hidden_state) < TOL
        assert rel_err(ours(x, layer=-2), out.hidden_states[-2]) < TOL  # LLaVA's select_layer


# -----------------------------------------------------------------------------
# language models

def lm_cases():
    base = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64, rope_theta=500.0)
    return {
        'llama': (T.LlamaForCausalLM, T.LlamaConfig(**base)),
        'smollm2': (T.LlamaForCausalLM, T.LlamaConfig(**{**base, 'tie_word_embeddings': True})),
        'mistral': (T.MistralForCausalLM, T.MistralConfig(**{**base, 'sliding_window': 5})),
        'qwen2': (T.Qwen2ForCausalLM, T.Qwen2Config(**{**base, 'num_key_value_heads': 1})),
        'gemma': (T.GemmaForCausalLM, T.GemmaConfig(**{**base, 'head_dim': 24, 'num_key_value_heads': 1})),
    }


def save_lm(tmp_path, name, **kw):
    cls, cfg = lm_cases()[name]
    ref = randomize(cls(cfg), std=0.1).eval()
    ref.save_pretrained(tmp_path, **kw)
    return ref, Decoder.from_pretrained(tmp_path)


@pytest.mark.parametrize('name', ['llama', 'smollm2', 'mistral', 'qwen2', 'gemma'])
def test_lm_logits_parity(tmp_path, name):
    ref, ours = save_lm(tmp_path, name)
    assert ours.cfg.tie_embeddings == (name in ('smollm2', 'gemma'))
    idx = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        a = ours.logits(ours(idx))
        b = ref(idx).logits
    assert rel_err(a, b) < TOL


def test_sharded_checkpoint(tmp_path):
    ref, ours = save_lm(tmp_path, 'llama', max_shard_size='30KB')
    assert (tmp_path / 'model.safetensors.index.json').exists()
    idx = torch.randint(0, 128, (1, 7))
    with torch.no_grad():
        assert rel_err(ours.logits(ours(idx)), ref(idx).logits) < TOL


@pytest.mark.parametrize('name', ['llama', 'mistral'])
def test_kv_cache_matches_full_forward(tmp_path, name):
    _, ours = save_lm(tmp_path, name)
    idx = torch.randint(0, 128, (2, 11))
    with torch.no_grad():
        full = ours.logits(ours(idx))
        cache = KVCache(ours.cfg, 2, 11, torch.float32, 'cpu')
        steps = [ours.logits(ours(idx[:, :4], cache=cache))]  # prefill 4, then one token at a time
        steps += [ours.logits(ours(idx[:, t:t + 1], cache=cache)) for t in range(4, 11)]
    assert rel_err(torch.cat(steps, 1), full) < TOL


@pytest.mark.parametrize('name', ['llama', 'smollm2', 'qwen2', 'gemma', 'mistral'])
def test_greedy_generate_matches_hf(tmp_path, name):
    ref, ours = save_lm(tmp_path, name)
    idx = torch.randint(3, 128, (1, 6))
    want = ref.generate(idx, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)[:, 6:]
    got = ours.generate(idx, max_new_tokens=12)
    assert got.tolist() == want.tolist()


def test_greedy_generate_left_padded_batch(tmp_path):
    ref, ours = save_lm(tmp_path, 'llama')
    lens = [7, 4, 2]
    rows = [torch.randint(3, 128, (n,)) for n in lens]
    ids = torch.zeros(3, 7, dtype=torch.long)
    mask = torch.zeros(3, 7, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, 7 - len(r):], mask[i, 7 - len(r):] = r, 1
    want = ref.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, eos_token_id=None,
                        pad_token_id=0)[:, 7:]
    got = ours.generate(ids, pad_mask=mask.bool(), max_new_tokens=10)
    assert got.tolist() == want.tolist()
    # and each padded row equals the same prompt run alone
    for i, r in enumerate(rows):
        assert ours.generate(r[None], max_new_tokens=10).tolist()[0] == got[i].tolist()


def test_generate_stops_and_samples(tmp_path):
    _, ours = save_lm(tmp_path, 'llama')
    idx = torch.randint(3, 128, (2, 5))
    greedy = ours.generate(idx, max_new_tokens=8)
    stop = int(greedy[0, 2])
    cut = ours.generate(idx, max_new_tokens=8, stop_ids=[stop])
    assert cut[0, 2] == stop and cut.shape[1] <= 8
    assert cut[0, :3].tolist() == greedy[0, :3].tolist()
    g = torch.Generator().manual_seed(0)
    s1 = ours.generate(idx, max_new_tokens=6, temperature=1.0, top_p=0.9, generator=g)
    g = torch.Generator().manual_seed(0)
    s2 = ours.generate(idx, max_new_tokens=6, temperature=1.0, top_p=0.9, generator=g)
    assert s1.tolist() == s2.tolist()
    # top_p -> 0 keeps only the most likely token: sampling equals greedy
    assert ours.generate(idx, max_new_tokens=6, temperature=1.0, top_p=1e-6).tolist() == greedy[:, :6].tolist()


def test_prompt_longer_than_context(tmp_path):
    _, ours = save_lm(tmp_path, 'llama')
    with pytest.raises(ValueError, match='context length 64'):
        ours.generate(torch.zeros(1, 60, dtype=torch.long), max_new_tokens=10)


# -----------------------------------------------------------------------------
# loading errors

def rewrite(folder, fn):
    sd = load_file(folder / 'model.safetensors')
    fn(sd)
    save_file(sd, folder / 'model.safetensors', metadata={'format': 'pt'})


def test_missing_key(tmp_path):
    save_lm(tmp_path, 'llama')
    rewrite(tmp_path, lambda sd: sd.pop('model.layers.1.mlp.up_proj.weight'))
    with pytest.raises(ValueError, match=r'1 missing: model\.layers\.1\.mlp\.up_proj\.weight'):
        Decoder.from_pretrained(tmp_path)


def test_unexpected_key(tmp_path):
    save_lm(tmp_path, 'llama')
    rewrite(tmp_path, lambda sd: sd.update({'model.layers.0.self_attn.extra.weight': torch.zeros(2)}))
    with pytest.raises(ValueError, match=r'unexpected: model\.layers\.0\.self_attn\.extra\.weight'):
        Decoder.from_pretrained(tmp_path)


def test_wrong_shape(tmp_path):
    save_lm(tmp_path, 'llama')
    rewrite(tmp_path, lambda sd: sd.update({'model.norm.weight': torch.zeros(65)}))
    with pytest.raises(ValueError, match=r'wrong shape: model\.norm\.weight: checkpoint \(65,\) vs model \(64,\)') as e:
        Decoder.from_pretrained(tmp_path)
    assert 'model.safetensors' in str(e.value)


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match='does not exist'):
        Decoder.from_pretrained(tmp_path / 'nope')
    (tmp_path / 'x').mkdir()
    with pytest.raises(FileNotFoundError, match='config.json'):
        Decoder.from_pretrained(tmp_path / 'x')
    save_lm(tmp_path / 'y', 'llama')
    (tmp_path / 'y' / 'model.safetensors').unlink()
    with pytest.raises(FileNotFoundError, match='no safetensors weights'):
        Decoder.from_pretrained(tmp_path / 'y')


def test_unknown_model_type(tmp_path):
    save_lm(tmp_path, 'llama')
    cfg = json.loads((tmp_path / 'config.json').read_text())
    cfg['model_type'] = 'gpt2'
    (tmp_path / 'config.json').write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"unknown language model_type 'gpt2'; supported: llama"):
        Decoder.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"unknown vision model_type 'gpt2'"):
        ViT.from_pretrained(tmp_path)


def test_wrong_tower(tmp_path):
    """A vision checkpoint given to the decoder names the problem instead of loading garbage."""
    cls, cfg = vit_cases()['dinov2']
    cls(cfg).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / 'config.json').read_text())
    cfg.update(model_type='llama', vocab_size=8, hidden_size=64, intermediate_size=8, num_hidden_layers=1,
               num_attention_heads=4)
    (tmp_path / 'config.json').write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match='(?s)missing: .*unexpected: embeddings'):
        Decoder.from_pretrained(tmp_path)


def test_local_looking_path_is_not_tried_on_the_hub(tmp_path, monkeypatch):
    """train.py before convert.py, or from another folder: the default 'checkpoints/...' says what to run."""
    import huggingface_hub
    import model as model_py

    def no_hub(*a, **kw):
        raise AssertionError('tried the hub')
    monkeypatch.setattr(huggingface_hub, 'snapshot_download', no_hub)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r'checkpoints/dinov2-small-imgfocus does not exist(?s:.*)python convert\.py'):
        model_py.resolve('checkpoints/dinov2-small-imgfocus')
    (tmp_path / 'weights').mkdir()  # a first part that is a local folder: a path, not 'org/name'
    with pytest.raises(FileNotFoundError, match='weights/lm does not exist'):
        model_py.resolve('weights/lm')


@pytest.mark.parametrize('content', [b'', b'\x8f\x13 random bytes' * 50, 'truncated', 'not_a_ckpt'])
def test_corrupt_checkpoint_names_the_file(tmp_path, content):
    import model as model_py
    path = tmp_path / 'ckpt.pt'
    if content == 'truncated':
        torch.save({'model': {'w': torch.ones(100)}, 'config': {}}, path)
        path.write_bytes(path.read_bytes()[:200])
    elif content == 'not_a_ckpt':
        torch.save({'w': torch.ones(3)}, path)  # a plain state dict, not train.py's checkpoint
    else:
        path.write_bytes(content)
    with pytest.raises(ValueError, match=f"checkpoint {path} is (corrupt or )?not a checkpoint of this project") as e:
        model_py.load_checkpoint(path)
    assert 'weights_only=False' not in str(e.value) and e.value.__cause__ is None  # never a hint to unpickle it


# -----------------------------------------------------------------------------
# beam search vs transformers' generate(num_beams=...)

def left_pad(rows, width):
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):], mask[i, width - len(r):] = r, 1
    return ids, mask


@pytest.mark.parametrize('beams,penalty,early', [(3, 1.0, False), (5, 1.0, False), (3, 0.0, True), (4, 2.0, 'never'),
                                                 (3, -1.0, False)])
def test_beam_search_matches_hf(tmp_path, beams, penalty, early):
    """Batched, left-padded, with a stop token that some hypotheses reach (the 2nd greedy token of row 0). Two
    candidates whose scores lie within float32 noise (~1e-6) may rank either way in either implementation: these
    prompts have none."""
    ref, ours = save_lm(tmp_path, 'llama')
    torch.manual_seed(1)
    ids, mask = left_pad([torch.randint(3, 128, (n,)) for n in (6, 3, 5)], 6)
    eos = int(ours.generate(ids, pad_mask=mask.bool(), max_new_tokens=3)[0, 1])
    want = ref.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, num_beams=beams,
                        length_penalty=penalty, early_stopping=early, eos_token_id=eos, pad_token_id=eos)[:, 6:]
    got = ours.generate(ids, pad_mask=mask.bool(), max_new_tokens=12, num_beams=beams, length_penalty=penalty,
                        early_stopping=early, stop_ids=[eos])
    assert got.tolist() == want.tolist()
    assert (got == eos).any() or penalty > 1  # a best hypothesis stopped (length_penalty 2 favours long ones)


@pytest.mark.parametrize('name', ['smollm2', 'gemma'])
def test_beam_search_no_stop_matches_hf(tmp_path, name):
    ref, ours = save_lm(tmp_path, name)
    idx = torch.randint(3, 128, (2, 5))
    want = ref.generate(idx, max_new_tokens=9, do_sample=False, num_beams=3, eos_token_id=None, pad_token_id=0)[:, 5:]
    got = ours.generate(idx, max_new_tokens=9, num_beams=3)
    assert got.tolist() == want.tolist()
    # one row alone gives its batched result
    assert ours.generate(idx[1:], max_new_tokens=9, num_beams=3).tolist() == got[1:].tolist()


# -----------------------------------------------------------------------------
# MPT (OpenFlamingo-3B's LM): ALiBi, LayerNorm without bias, no RoPE, tied head

def save_mpt(tmp_path, n_heads=4, d_model=64, **attn):
    cfg = T.MptConfig(d_model=d_model, n_heads=n_heads, n_layers=3, expansion_ratio=4, max_seq_len=64, vocab_size=128,
                      attn_config={'alibi': True, 'alibi_bias_max': 8, **attn})
    ref = randomize(T.MptForCausalLM(cfg), std=0.1).eval()
    ref.save_pretrained(tmp_path)
    return ref, Decoder.from_pretrained(tmp_path)


@pytest.mark.parametrize('n_heads,attn', [(4, {}), (6, {}), (4, {'clip_qkv': 0.3, 'softmax_scale': 0.2})])
def test_mpt_logits_parity(tmp_path, n_heads, attn):
    """6 heads: ALiBi slopes for a head count that is not a power of two."""
    ref, ours = save_mpt(tmp_path, n_heads, 48 if n_heads == 6 else 64, **attn)
    assert ours.cfg.alibi and ours.cfg.tie_embeddings and not ours.cfg.gated_mlp and ours.cfg.norm == 'layernorm'
    idx = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        assert rel_err(ours.logits(ours(idx)), ref(idx).logits) < TOL


def test_mpt_greedy_and_beam_generation_match_hf(tmp_path):
    ref, ours = save_mpt(tmp_path)
    ids, mask = left_pad([torch.randint(3, 128, (n,)) for n in (7, 4)], 7)
    kw = dict(attention_mask=mask, do_sample=False, eos_token_id=None, pad_token_id=0)
    want = ref.generate(ids, max_new_tokens=10, **kw)[:, 7:]
    assert ours.generate(ids, pad_mask=mask.bool(), max_new_tokens=10).tolist() == want.tolist()
    want = ref.generate(ids, max_new_tokens=8, num_beams=3, **kw)[:, 7:]
    assert ours.generate(ids, pad_mask=mask.bool(), max_new_tokens=8, num_beams=3).tolist() == want.tolist()
    with torch.no_grad():  # the KV cache equals the full forward
        full = ours.logits(ours(ids[:1]))
        cache = KVCache(ours.cfg, 1, 7, torch.float32, 'cpu')
        steps = [ours.logits(ours(ids[:1, :3], cache=cache))] + [ours.logits(ours(ids[:1, t:t + 1], cache=cache))
                                                                  for t in range(3, 7)]
    assert rel_err(torch.cat(steps, 1), full) < TOL


class QKLayerNorm(torch.nn.Module):
    """MosaicGPT's attn_qk_ln on top of HF's fused Wqkv: LayerNorm (no bias) on the q and k thirds."""

    def __init__(self, wqkv, d):
        super().__init__()
        self.wqkv = wqkv
        self.q_ln, self.k_ln = (torch.nn.LayerNorm(d, bias=False) for _ in range(2))
        with torch.no_grad():
            self.q_ln.weight.normal_(1.0, 0.2)
            self.k_ln.weight.normal_(1.0, 0.2)

    def forward(self, x):
        q, k, v = self.wqkv(x).chunk(3, dim=-1)
        return torch.cat([self.q_ln(q), self.k_ln(k), v], dim=-1)


def test_mosaic_gpt_checkpoint_with_qk_layernorm(tmp_path):
    """mosaicml/mpt-1b-redpajama-200b's layout (MosaicGPT names, attn_* keys at the top of config.json, QK
    LayerNorm) against HF's MPT with the QK LayerNorm added around its Wqkv."""
    ref, _ = save_mpt(tmp_path / 'hf')
    for blk in ref.transformer.blocks:
        blk.attn.Wqkv = QKLayerNorm(blk.attn.Wqkv, 64)
    names = {'norm_1': 'ln_1', 'norm_2': 'ln_2', 'ffn.up_proj': 'mlp.mlp_up', 'ffn.down_proj': 'mlp.mlp_down',
             'norm_f': 'ln_f', 'Wqkv.wqkv': 'Wqkv', 'Wqkv.q_ln': 'q_ln', 'Wqkv.k_ln': 'k_ln'}
    sd = {}
    for k, v in ref.state_dict().items():
        if k == 'lm_head.weight':
            continue
        for a, b in names.items():
            k = k.replace(a, b)
        sd[k] = v.contiguous()
    (tmp_path / 'mos').mkdir()
    save_file(sd, tmp_path / 'mos' / 'model.safetensors', metadata={'format': 'pt'})
    (tmp_path / 'mos' / 'config.json').write_text(json.dumps(dict(
        model_type='mosaic_gpt', d_model=64, n_heads=4, n_layers=3, mlp_ratio=4, max_seq_len=64, vocab_size=128,
        alibi=True, alibi_bias_max=8, attn_qk_ln=True, attn_clip_qkv=None, no_bias=True, softmax_scale=None)))
    ours = Decoder.from_pretrained(tmp_path / 'mos')
    assert ours.cfg.qk_norm and ours.cfg.layout == 'mosaic_gpt'
    idx = torch.randint(0, 128, (2, 10))
    with torch.no_grad():
        assert rel_err(ours.logits(ours(idx)), ref(idx).logits) < TOL
    sd.pop('transformer.blocks.1.attn.Wqkv.weight')
    sd['transformer.blocks.0.attn.Wqkv.weight'] = torch.zeros(190, 64)
    save_file(sd, tmp_path / 'mos' / 'model.safetensors', metadata={'format': 'pt'})
    with pytest.raises(ValueError, match=r'(?s)1 missing: transformer\.blocks\.1\.attn\.Wqkv\.weight.*wrong shape: '
                                         r'transformer\.blocks\.0\.attn\.Wqkv\.weight: checkpoint \(190, 64\) vs model \(192, 64\)'):
        Decoder.from_pretrained(tmp_path / 'mos')


def test_eva_tower_from_a_whole_instructblip_checkpoint(tmp_path):
    """The tower inside a full InstructBlipForConditionalGeneration save (vision_model.* beside qformer.*,
    query_tokens, language_projection.* and a T5 language_model.*): the vision keys load, the others are skipped."""
    cfg = T.InstructBlipConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8),
        qformer_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                            encoder_hidden_size=32, vocab_size=99, max_position_embeddings=64),
        text_config=T.T5Config(vocab_size=99, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4).to_dict(),
        num_query_tokens=4)
    ref = randomize(T.InstructBlipForConditionalGeneration(cfg)).eval()
    ref.save_pretrained(tmp_path)
    ours = ViT.from_pretrained(tmp_path)
    assert ours.cfg.kind == 'eva' and ours.cfg.n_layers == 2
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert rel_err(ours(x, norm=True), ref.vision_model(pixel_values=x).last_hidden_state) < TOL
