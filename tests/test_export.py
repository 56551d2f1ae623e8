"""export.py: a train.py checkpoint (tiny stand-ins, LoRA factors made large so that a dropped one shows) as a
peft adapter, a merged HF LM and a llava-hf VLM; each loaded by the reference library gives our logits (float32,
rel. < 1e-5). What a target cannot hold is refused with an error naming it."""
import inspect
import json
import os
import runpy
import shutil
import subprocess
import sys

import pytest
import torch

import eval as evaluate
import export
import peft
from conftest import ROOT, rel_err
from fusion import build_vlm
from model import IMAGE_TOKEN, Decoder

T = pytest.importorskip('transformers')


def _tied_lm(tiny, folder):
    """A SmolLM2-shaped stand-in: the tiny LLaMA with tied embeddings, same tokenizer."""
    torch.manual_seed(1)
    vocab = T.AutoConfig.from_pretrained(tiny['lm']).vocab_size
    T.LlamaForCausalLM(T.LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=256,
                                     tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0)
                       ).save_pretrained(folder)
    for f in ('tokenizer.json', 'tokenizer_config.json'):
        shutil.copy(os.path.join(tiny['lm'], f), folder / f)
    return str(folder)


def _siglip(folder):
    from conftest import _preprocessor
    torch.manual_seed(2)
    T.SiglipVisionModel(T.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, image_size=32, patch_size=8)).save_pretrained(folder)
    _preprocessor(folder, 32, 'siglip')
    return str(folder)


CASES = {  # LLaVA-1.5's reading of CLIP (penultimate layer, patches) + untied LM; DINOv2, every token + tied LM, at
    # 48 px instead of its 32 (the position table is interpolated; the export writes it at 48); SigLIP (no CLS: 'full')
    'clip': dict(vision='clip', vision_layer=-2, vision_feature='patch', lm='lm', image_size=0),
    'dinov2': dict(vision='dinov2', vision_layer=-1, vision_feature='cls_patch', lm='tied', image_size=48),
    'siglip': dict(vision='siglip', vision_layer=-2, vision_feature='patch', lm='lm', image_size=0),
}


@pytest.fixture(scope='module')
def ckpts(tiny, shapes_json, tmp_path_factory):
    """{case: ckpt.pt path}: two train.py steps, then every trained tensor (projector, LoRA) moved by noise."""
    root = tmp_path_factory.mktemp('export')
    lms = dict(lm=tiny['lm'], tied=_tied_lm(tiny, root / 'tied'))
    towers = dict(tiny, siglip=_siglip(root / 'siglip'))
    out = {}
    for name, c in CASES.items():
        args = dict(init_vision=towers[c['vision']], init_lm=lms[c['lm']], dataset='llava', data_root=shapes_json,
                    out_dir=str(root / name), template='qwen2', batch_size=4, max_iters=2, eval_interval=2,
                    eval_iters=1, learning_rate=3e-3, peft='lora', lora_r=4, lora_alpha=8, vision_layer=c['vision_layer'],
                    vision_norm=False, vision_feature=c['vision_feature'], image_size=c['image_size'],
                    final_eval=False, dtype='float32', max_len=128)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(sys, 'argv', ['train.py', *[f'--{k}={v}' for k, v in args.items()]])
            runpy.run_path(str(ROOT / 'train.py'), run_name='__main__')
        path = root / name / 'ckpt.pt'
        ckpt = torch.load(path, weights_only=True)
        g = torch.Generator().manual_seed(0)
        ckpt['model'] = {k: v + 0.2 * torch.randn(v.shape, generator=g) for k, v in ckpt['model'].items()}
        torch.save(ckpt, path)
        out[name] = str(path)
    return out


def ids_batch(vocab, n=2, t=12):
    return torch.randint(3, vocab, (n, t), generator=torch.Generator().manual_seed(3))


def our_lm_logits(model, ids):
    with torch.no_grad():
        return model.lm.logits(model.lm(ids))


# peft imports itself by absolute name and our peft.py shadows it inside the repo: the reference runs in a
# subprocess without the repo on sys.path (as tests/test_peft.py), once for every adapter (its start-up dominates)
PEFT_REFERENCE = """
import sys, torch, transformers, peft
for lm, adapter in zip(sys.argv[1::2], sys.argv[2::2]):
    m = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(lm), adapter).eval()
    with torch.no_grad():
        torch.save(m(torch.load(adapter + '/ids.pt')).logits, adapter + '/ref_logits.pt')
"""


def test_peft_adapter_loads_onto_the_transformers_lm(ckpts, tmp_path):
    """The untied LM (clip case) and the tied one (dinov2 case); the tower plays no part in an LM adapter."""
    runs = {}
    for case in ('clip', 'dinov2'):
        model, _, cfg = evaluate.load_vlm(ckpts[case])
        out = tmp_path / case
        keys = export.export_peft(model, cfg, str(out))
        assert 'base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight' in keys
        assert len(keys) == 2 * 7 * 2  # A and B of 7 linears in 2 layers
        conf = json.load(open(out / 'adapter_config.json'))
        assert conf['target_modules'] == sorted(['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj'])
        assert (conf['r'], conf['lora_alpha'], conf['use_rslora'], conf['use_dora']) == (4, 8, False, False)
        ids = ids_batch(model.lm.cfg.vocab_size)
        torch.save(ids, out / 'ids.pt')
        base = Decoder.from_pretrained(cfg['init_lm'])
        with torch.no_grad():
            runs[case] = (cfg['init_lm'], out, our_lm_logits(model, ids), base.logits(base(ids)))
    env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
    subprocess.run([sys.executable, '-c', PEFT_REFERENCE, *[str(x) for r in runs.values() for x in r[:2]]],
                   cwd=tmp_path, env=env, check=True)
    for case, (_, out, got, base) in runs.items():
        want = torch.load(out / 'ref_logits.pt')
        assert rel_err(got, want) < 1e-5, case
        assert rel_err(base, want) > 1e-2  # the adapters matter: a dropped one would fail above


@pytest.mark.skipif(not {'rslora', 'dora'} <= set(inspect.signature(peft.apply_lora).parameters),
                    reason='peft.apply_lora has no rslora / dora yet (issue 10, part A)')
def test_peft_adapter_with_rslora_and_dora(tiny, tmp_path):
    """lora_rslora / lora_dora in the checkpoint's config become use_rslora / use_dora, DoRA's magnitude
    lora_magnitude_vector; random factors and magnitudes, so that each part shows in the logits."""
    cfg = dict(init_vision=tiny['clip'], init_lm=tiny['lm'], fusion='llava', peft='lora', vision_layer=-1,
               vision_norm=False, vision_feature='patch', trainable=(), lora_r=4, lora_alpha=8,
               lora_targets=('q', 'v', 'down'), lora_rslora=True, lora_dora=True)
    model = build_vlm(cfg)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if 'lora_B' in n or 'magnitude' in n:
                p.add_(0.3 * torch.randn_like(p))
    out = tmp_path / 'adapter'
    keys = export.export_peft(model, cfg, str(out))
    assert 'base_model.model.model.layers.0.mlp.down_proj.lora_magnitude_vector' in keys
    conf = json.load(open(out / 'adapter_config.json'))
    assert conf['use_rslora'] and conf['use_dora'] and conf['target_modules'] == ['down_proj', 'q_proj', 'v_proj']
    ids = ids_batch(model.lm.cfg.vocab_size)
    torch.save(ids, out / 'ids.pt')
    env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
    subprocess.run([sys.executable, '-c', PEFT_REFERENCE, tiny['lm'], str(out)], cwd=tmp_path, env=env, check=True)
    assert rel_err(our_lm_logits(model, ids), torch.load(out / 'ref_logits.pt')) < 1e-5


@pytest.mark.parametrize('case', CASES)
def test_merged_lm_loads_with_auto_model(ckpts, case, tmp_path):
    model, _, cfg = evaluate.load_vlm(ckpts[case])
    ids = ids_batch(model.lm.cfg.vocab_size)
    want = our_lm_logits(model, ids)  # unmerged: the export's merge is checked too
    export.export_hf(model, cfg, str(tmp_path / 'hf'))
    hf = T.AutoModelForCausalLM.from_pretrained(tmp_path / 'hf').eval()
    with torch.no_grad():
        got = hf(ids).logits
    assert rel_err(got, want) < 1e-5
    assert hf.config.tie_word_embeddings == (case == 'dinov2')
    assert os.path.exists(tmp_path / 'hf' / 'tokenizer.json')


@pytest.mark.parametrize('case', CASES)
def test_llava_folder_loads_with_llava_for_conditional_generation(ckpts, case, tmp_path):
    model, io, cfg = evaluate.load_vlm(ckpts[case])
    n_img, V = io['n_image_tokens'], model.lm.cfg.vocab_size
    text = ids_batch(V - 1, t=8)  # never the last id, which the SigLIP case uses for the image
    ours_ids = torch.cat([text[:, :3], torch.full((2, n_img), IMAGE_TOKEN), text[:, 3:]], 1)
    side = io['image_cfg']['crop_size']
    assert side == (CASES[case]['image_size'] or 32)
    pixels = torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = model(ours_ids, pixels=pixels)
        other = model(ours_ids, pixels=pixels.flip(0))
    assert rel_err(other, want) > 1e-3  # the image reaches the text's logits
    image_id = V - 1 if case == 'siglip' else -1  # SigLIP's case: an id of the vocabulary the text never uses
    keys = export.export_llava(model, cfg, str(tmp_path / 'llava'), image_size=side, image_token_id=image_id)
    assert 'model.multi_modal_projector.linear_2.bias' in keys and 'lm_head.weight' in keys
    config = json.load(open(tmp_path / 'llava' / 'config.json'))
    image_id = V if image_id < 0 else image_id
    assert config['image_token_index'] == image_id and config['image_seq_length'] == n_img
    assert config['text_config']['vocab_size'] == max(V, image_id + 1)
    assert config['vision_feature_select_strategy'] == ('default' if case == 'clip' else 'full')
    hf = T.LlavaForConditionalGeneration.from_pretrained(tmp_path / 'llava').eval()
    with torch.no_grad():
        got = hf(input_ids=torch.where(ours_ids == IMAGE_TOKEN, image_id, ours_ids), pixel_values=pixels).logits
    assert rel_err(got[..., :V], want) < 1e-5
    from tokenizers import Tokenizer
    tk = Tokenizer.from_file(str(tmp_path / 'llava' / 'tokenizer.json'))
    if image_id == V:
        assert got[..., V].abs().max() == 0  # the image token's new row: a zero logit
        assert tk.token_to_id('<image>') == V
    else:
        assert got.shape[-1] == V and tk.token_to_id('<image>') is None


def test_merged_mpt_refuses_peft_and_fuses_wqkv_for_hf(tiny, tmp_path):
    """MPT's one Wqkv: LoRA on our q, k, v merges and is concatenated back; a peft adapter cannot hold it."""
    T.MptForCausalLM(T.MptConfig(d_model=64, n_heads=4, n_layers=2, expansion_ratio=4, max_seq_len=64, vocab_size=128,
                                 attn_config={'alibi': True, 'alibi_bias_max': 8})).save_pretrained(tmp_path / 'mpt')
    cfg = dict(init_vision=tiny['clip'], init_lm=str(tmp_path / 'mpt'), fusion='llava', peft='lora', vision_layer=-1,
               vision_norm=False, vision_feature='patch', trainable=(), lora_r=2, lora_alpha=4,
               lora_targets=('q', 'k', 'v', 'down'))
    model = build_vlm(cfg)
    with pytest.raises(ValueError, match='fuses q, k, v into one HF Wqkv'):
        export.export_peft(model, cfg, str(tmp_path / 'peft'))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if 'lora_B' in n:
                p.normal_(0, 0.3)
    ids = ids_batch(128)
    want = our_lm_logits(model, ids)
    export.export_hf(model, cfg, str(tmp_path / 'hf'))
    with torch.no_grad():
        got = T.AutoModelForCausalLM.from_pretrained(tmp_path / 'hf').eval()(ids).logits
        base = T.AutoModelForCausalLM.from_pretrained(tmp_path / 'mpt').eval()(ids).logits
    assert rel_err(got, want) < 1e-5 and rel_err(base, want) > 1e-2


def test_llava_refuses_what_llava_hf_cannot_express(tiny, tmp_path):
    base = dict(init_vision=tiny['dinov2'], init_lm=tiny['lm'], fusion='llava', peft='', vision_layer=-1,
                vision_norm=False, vision_feature='patch', trainable=())
    for change, message in ((dict(vision_norm=True), "vision_norm=True"),
                            (dict(vision_feature='cls'), "vision_feature='cls'"),
                            (dict(fusion='adem'), "fusion='adem'")):
        cfg = {**base, **change}
        with pytest.raises(ValueError, match=r"--to=llava: llava-hf cannot express .*" + message.replace('(', r'\(')):
            export.export_llava(build_vlm(cfg), cfg, str(tmp_path / 'x'), image_size=32)
    assert not (tmp_path / 'x').exists()  # refused before anything is written


def test_lm_exports_refuse_fusion_modules_in_the_lm(tiny, tmp_path):
    """Flamingo's cross-attention sits in the LM's `pre` seam, MMCA swaps the attention class: neither is a plain
    HF LM; an LM without LoRA has no adapter to export."""
    base = dict(init_vision=tiny['clip'], init_lm=tiny['lm'], peft='lora', vision_layer=-1, vision_norm=False,
                vision_feature='patch', trainable=(), lora_r=2, lora_alpha=2, lora_targets=('q',))
    for fusion, message in (('flamingo', r"lm.blocks.0.pre \(GatedCrossAttentionBlock in the pre seam\)"),
                            ('mmca', r"lm.blocks.0.attn \(MMCAAttention\)")):
        cfg = {**base, 'fusion': fusion}
        with pytest.raises(ValueError, match=message):
            export.export_hf(build_vlm(cfg), cfg, str(tmp_path / 'hf'))
        with pytest.raises(ValueError, match=message):
            export.export_peft(build_vlm(cfg), cfg, str(tmp_path / 'peft'))
    cfg = {**base, 'fusion': 'llava', 'peft': ''}
    with pytest.raises(ValueError, match="no LoRA in its LM"):
        export.export_peft(build_vlm(cfg), cfg, str(tmp_path / 'peft'))
    cfg = {**base, 'fusion': 'llava', 'trainable': ('fusion.', 'lora_', 'lm.norm.')}
    with pytest.raises(ValueError, match=r"trains 1 tensors besides LoRA \(e.g. lm.norm.weight\)(?s:.*)--to=hf"):
        export.export_peft(build_vlm(cfg), cfg, str(tmp_path / 'peft'))
    assert not (tmp_path / 'hf').exists() and not (tmp_path / 'peft').exists()


def test_cli(ckpts, tmp_path, capsys):
    export.main([f'--ckpt={ckpts["clip"]}', '--to=peft', f'--out={tmp_path / "a"}'])
    out = capsys.readouterr().out
    assert 'wrote' in out and 'not exported (not part of the LM): 4 trained tensors of vision and fusion' in out
    assert sorted(os.listdir(tmp_path / 'a')) == ['adapter_config.json', 'adapter_model.safetensors']
    export.main([f'--ckpt={ckpts["dinov2"]}', '--to=llava', f'--out={tmp_path / "c"}', '--dtype=bfloat16'])
    config = json.load(open(tmp_path / 'c' / 'config.json'))  # the run's 48 px images, from its config
    assert config['vision_config']['image_size'] == 48 and config['image_seq_length'] == 37
    from safetensors import safe_open
    with safe_open(str(tmp_path / 'c' / 'model.safetensors'), 'pt') as f:
        assert f.get_tensor('model.vision_tower.embeddings.position_embeddings').shape == (1, 37, 32)
        assert f.get_tensor('lm_head.weight').dtype == torch.bfloat16
    with pytest.raises(SystemExit, match="--to must be 'peft', 'hf' or 'llava'"):
        export.main([f'--ckpt={ckpts["clip"]}', '--to=gguf', f'--out={tmp_path / "b"}'])
