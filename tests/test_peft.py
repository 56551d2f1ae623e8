"""peft.py vs HF peft on tiny random LLaMAs saved in the test (and the converted SmolLM2 when present): logits and
adapter gradients for LoRA (GQA, an unusual shape with tied embeddings, rsLoRA), DoRA, IA3, prompt tuning and
LLaMA-Adapter (= peft's AdaptionPrompt with equal gates); then properties (identity at init, merge, counts) and each
method built from a config through fusion.build_vlm."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from conftest import ROOT, randomize, rel_err
from model import IMAGE_TOKEN, VLM, Decoder, LMConfig, ViT
import peft


def _hf_peft_origin():
    """Where the installed HF peft package is, looked up without the repo (whose peft.py shadows it)."""
    import importlib.machinery
    paths = [p for p in sys.path if p and os.path.abspath(p) != os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]
    spec = importlib.machinery.PathFinder.find_spec('peft', paths)
    return spec.origin if spec else ''

T = pytest.importorskip('transformers')
if not _hf_peft_origin():
    pytest.skip('dev-only reference: pip install peft', allow_module_level=True)

HF_NAMES = {'q': 'q_proj', 'k': 'k_proj', 'v': 'v_proj', 'o': 'o_proj', 'gate': 'gate_proj', 'up': 'up_proj',
            'down': 'down_proj'}
OURS = {v: k for k, v in HF_NAMES.items()}
SMOLLM2 = ROOT / 'checkpoints' / 'SmolLM2-135M-Instruct'

# Our peft.py shadows the `peft` package inside this repo, and HF peft imports itself by absolute name, so the
# reference runs in a subprocess whose sys.path does not hold the repo. One process runs every case (one import
# of transformers + peft): it wraps the saved LlamaForCausalLM with the case's peft config, gives the adapters
# non-trivial values (LoRA B ~ N(0, 0.1), DoRA magnitude and IA3 vectors 1 + noise, the AdaptionPrompt gate a
# value; A, prompts keep peft's own random init), and saves the adapter values, the logits and the gradients of
# the adapters for loss = sum(logits * w) with a fixed random w.
REFERENCE = r"""
import json, sys, torch, transformers, peft
for case in json.load(open(sys.argv[1])):
    torch.manual_seed(0)
    m = transformers.LlamaForCausalLM.from_pretrained(case['folder']).eval()
    kind, kw = case['kind'], case['kw']
    if kind == 'lora':
        cfg = peft.LoraConfig(**kw)
    elif kind == 'ia3':
        cfg = peft.IA3Config(task_type='CAUSAL_LM', **kw)
    elif kind == 'prompt_tuning':
        cfg = peft.PromptTuningConfig(task_type='CAUSAL_LM', **kw)
    else:
        cfg = peft.AdaptionPromptConfig(task_type='CAUSAL_LM', **kw)
    m = peft.get_peft_model(m, cfg)
    named = {n: p for n, p in m.named_parameters() if p.requires_grad}
    with torch.no_grad():
        for n, p in named.items():
            if 'lora_B' in n:
                p.normal_(0, 0.1)
            elif 'lora_magnitude' in n or 'ia3_l' in n:
                p.mul_(1 + 0.2 * torch.randn_like(p))
            elif 'adaption_gate' in n:
                p.fill_(case['gate'])
    inp = torch.load(case['folder'] + '/inputs.pt')
    logits = m(input_ids=inp['idx']).logits[:, case.get('skip', 0):]  # prompt tuning: drop the virtual tokens
    (logits * inp['w']).sum().backward()
    torch.save(dict(values={n: p.detach().clone() for n, p in named.items()},
                    grads={n: p.grad.clone() for n, p in named.items()}, logits=logits.detach(),
                    n_trainable=sum(p.numel() for p in named.values()), version=peft.__version__),
               case['folder'] + '/ref.pt')
"""

LLAMA = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2)
# an unusual shape: head_dim 16 with 4 heads on width 48 (q is 48 -> 64), one KV head, odd FFN, tied embeddings
ODD = dict(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=1, head_dim=16, tie_word_embeddings=True)
ALL = ('q', 'k', 'v', 'o', 'gate', 'up', 'down')
CASES = {  # name: (model config | 'smollm2' | 'tiny', kind, our kwargs, peft kwargs)
    'lora_qv': (LLAMA, 'lora', dict(targets=('q', 'v'), r=4, alpha=8), {}),
    'lora_all_rslora': (LLAMA, 'lora', dict(targets=ALL, r=8, alpha=16, rslora=True), {}),
    'lora_odd_tied': (ODD, 'lora', dict(targets=ALL, r=3, alpha=5), {}),
    'dora': (LLAMA, 'lora', dict(targets=('q', 'k', 'v', 'o', 'down'), r=4, alpha=8, dora=True), {}),
    'dora_odd_rslora': (ODD, 'lora', dict(targets=ALL, r=2, alpha=3, dora=True, rslora=True), {}),
    'ia3': (LLAMA, 'ia3', dict(targets=('k', 'v', 'down'), feedforward=('down',)), {}),
    'ia3_odd': (ODD, 'ia3', dict(targets=('q', 'up', 'down'), feedforward=('up', 'down')), {}),
    'prompt_tuning': (LLAMA, 'prompt_tuning', dict(tokens=5), dict(num_virtual_tokens=5)),
    'prompt_tuning_text': ('tiny', 'prompt_tuning', dict(tokens=8, init_text='what color is the shape'), {}),
    'llama_adapter': ({**LLAMA, 'num_hidden_layers': 4}, 'llama_adapter', dict(tokens=3, start=1),
                      dict(adapter_len=3, adapter_layers=3)),
    'lora_smollm2': ('smollm2', 'lora', dict(targets=ALL, r=4, alpha=8), {}),
}


def peft_kwargs(kind, ours, extra, folder):
    if kind == 'lora':
        return dict(r=ours['r'], lora_alpha=ours['alpha'], target_modules=[HF_NAMES[t] for t in ours['targets']],
                    use_rslora=ours.get('rslora', False), use_dora=ours.get('dora', False))
    if kind == 'ia3':
        return dict(target_modules=[HF_NAMES[t] for t in ours['targets']],
                    feedforward_modules=[HF_NAMES[t] for t in ours['feedforward']])
    if kind == 'prompt_tuning' and ours.get('init_text'):
        return dict(num_virtual_tokens=ours['tokens'], prompt_tuning_init='TEXT',
                    prompt_tuning_init_text=ours['init_text'], tokenizer_name_or_path=folder)
    return extra


@pytest.fixture(scope='module')
def reference(tmp_path_factory, tiny):
    """Run every case's HF peft reference in one subprocess; {case: (folder, inputs, ref)}."""
    root = tmp_path_factory.mktemp('peft_ref')
    jobs, out = [], {}
    for i, (name, (model_cfg, kind, ours, extra)) in enumerate(CASES.items()):
        if model_cfg == 'smollm2':
            if not (SMOLLM2 / 'config.json').is_file():
                continue
            folder = root / name
            folder.mkdir()
            for f in SMOLLM2.iterdir():  # a folder of links: the reference writes its inputs / outputs next to them
                (folder / f.name).symlink_to(f)
        elif model_cfg == 'tiny':
            folder = root / name
            folder.mkdir()
            for f in Path(tiny['lm']).iterdir():
                (folder / f.name).symlink_to(f)
        else:
            folder = root / name
            randomize(T.LlamaForCausalLM(T.LlamaConfig(**model_cfg)), std=0.1, seed=i).save_pretrained(folder)
        vocab = json.loads((folder / 'config.json').read_text())['vocab_size']
        g = torch.Generator().manual_seed(i)
        idx = torch.randint(0, vocab, (2, 9), generator=g)
        inputs = dict(idx=idx, w=torch.randn(2, 9, vocab, generator=g))
        torch.save(inputs, folder / 'inputs.pt')
        jobs.append(dict(folder=str(folder), kind=kind, kw=peft_kwargs(kind, ours, extra, str(folder)), gate=0.3,
                         skip=ours['tokens'] if kind == 'prompt_tuning' else 0))
        out[name] = (folder, inputs)
    (root / 'jobs.json').write_text(json.dumps(jobs))
    env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
    subprocess.run([sys.executable, '-c', REFERENCE, str(root / 'jobs.json')], cwd=root, env=env, check=True,
                   capture_output=True, timeout=600)
    return {name: (folder, inputs, torch.load(folder / 'ref.pt')) for name, (folder, inputs) in out.items()}


def our_name(hf):
    """peft's parameter name -> ours on a bare Decoder (the VLM's prompts for prompt tuning), and how the value maps."""
    if hf.startswith('prompt_encoder.'):
        return 'prompts.prompt_tuning.embedding.weight'
    parts = hf.split('.')
    i = int(parts[parts.index('layers') + 1])
    if parts[-1] in ('adaption_prompt', 'adaption_gate'):
        return f"blocks.{i}.attn.llama_adapter_{parts[-1].split('_')[1]}"
    proj = next(p for p in parts if p in OURS)
    where = f"blocks.{i}.{'attn' if OURS[proj] in 'qkvo' else 'ffn'}.{OURS[proj]}"
    tail = parts[parts.index(proj) + 1]
    return where + {'lora_A': '.lora_A.weight', 'lora_B': '.lora_B.weight', 'lora_magnitude_vector': '.lora_magnitude',
                    'ia3_l': '.ia3_l'}[tail]


def build_ours(name, folder, tiny):
    """Our model for a case, its adapters applied as the case says; (model, forward(idx) -> logits)."""
    _, kind, kw, _ = CASES[name]
    lm = Decoder.from_pretrained(folder)
    if kind == 'prompt_tuning':  # through the VLM (its `prompts` seam); a text-only batch never calls the fusion
        model = VLM(ViT.from_pretrained(tiny['clip']), lm, nn.Identity()).eval()
        tok = None
        if kw.get('init_text'):
            import data
            t = data.Tokenizer(folder)
            tok = lambda s: t.encode(s, bos=t.add_bos)  # noqa: E731
        peft.apply_prompt_tuning(model, tokenizer=tok, **kw)
        return model, lambda idx: model(idx)
    getattr(peft, f'apply_{kind}')(lm, **kw)
    return lm, lambda idx: lm.logits(lm(idx))


def set_like_peft(model, ref):
    """Copy peft's adapter values into ours (shapes mapped); returns {our name: (peft name, value map)}."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for hf, v in ref['values'].items():
            p = params[our_name(hf)]
            if 'adaption_gate' in hf:  # one gate per layer (no tanh) = our per-head gates, all atanh(gate)
                p.fill_(math.atanh(float(v)))
            else:
                p.copy_(v.reshape(p.shape))


@pytest.mark.parametrize('name', list(CASES))
def test_matches_peft(reference, tiny, name):
    """Logits and the gradients of every adapter parameter equal peft's, rel. < 1e-5 (float32)."""
    if name not in reference:
        pytest.skip(f'{SMOLLM2} not converted (python convert.py)')
    folder, inputs, ref = reference[name]
    kind = CASES[name][1]
    model, run = build_ours(name, folder, tiny)
    idx, w = inputs['idx'], inputs['w']
    plain = Decoder.from_pretrained(folder)
    with torch.no_grad():
        base = plain.logits(plain(idx))  # the model without adapters
    patterns = {'lora': ('lora_',), 'ia3': ('ia3_',), 'prompt_tuning': ('prompt_tuning.',),
                'llama_adapter': ('llama_adapter_',)}[kind]
    n = peft.mark_trainable(model, patterns)
    if kind == 'llama_adapter':  # the same count, but a gate per head (4) where peft has one per layer (3 layers)
        n -= 3 * (4 - 1)
    assert n == ref['n_trainable']
    set_like_peft(model, ref)
    logits = run(idx)
    assert rel_err(logits, base) > 1e-3           # the adapters change the output ...
    assert rel_err(logits, ref['logits']) < 1e-5  # ... exactly as peft's do
    (logits * w).sum().backward()
    params = dict(model.named_parameters())
    for hf, g in ref['grads'].items():
        ours = params[our_name(hf)].grad
        if 'adaption_gate' in hf:  # d/dg_h of tanh(g_h) summed over the heads = (1 - tanh^2) x d/d(peft's gate)
            e = float(ref['values'][hf])
            assert abs(float(ours.sum()) - (1 - e * e) * float(g)) < 1e-5 * max(1.0, abs(float(g)))
        else:
            assert g.abs().max() > 0 and rel_err(ours.reshape(g.shape), g) < 1e-5, hf


def test_prompt_text_init_like_peft(reference, tiny):
    """TEXT init: the embeddings of the text's tokens (repeated to N), as peft's PromptEmbedding."""
    folder, _, ref = reference['prompt_tuning_text']
    model, _ = build_ours('prompt_tuning_text', folder, tiny)
    ours = model.prompts['prompt_tuning'].embedding.weight
    theirs = ref['values']['prompt_encoder.default.embedding.weight']
    assert ours.shape == theirs.shape and torch.equal(ours, theirs)


def test_lora_init_like_peft():
    """A: kaiming-uniform(a=sqrt(5)) bound 1/sqrt(in); B: zeros; scaling alpha / r (rsLoRA alpha / sqrt(r))."""
    m = peft.LoRALinear(torch.nn.Linear(64, 32), r=4, alpha=16)
    assert m.lora_A.weight.abs().max() <= 1 / 64 ** 0.5 and m.lora_A.weight.std() > 0.5 / 64 ** 0.5 / 3 ** 0.5
    assert torch.equal(m.lora_B.weight, torch.zeros(32, 4)) and m.scaling == 4.0
    assert peft.LoRALinear(torch.nn.Linear(64, 32), r=4, alpha=16, rslora=True).scaling == 8.0
    d = peft.LoRALinear(torch.nn.Linear(64, 32), r=4, alpha=16, dora=True)  # magnitude = row norms of W
    assert torch.allclose(d.lora_magnitude, d.base.weight.norm(dim=1))

# -----------------------------------------------------------------------------
# properties on our own models


@pytest.fixture
def lm(tmp_path):
    cfg = T.LlamaConfig(**{**LLAMA, 'num_hidden_layers': 3})
    randomize(T.LlamaForCausalLM(cfg), std=0.1).save_pretrained(tmp_path)
    return Decoder.from_pretrained(tmp_path)


ZERO_INIT = {  # every method that starts as the base model, with its arguments
    'lora': dict(targets=ALL, r=4, alpha=8),
    'dora': dict(targets=ALL, r=4, alpha=8, dora=True),
    'ia3': dict(targets=('q', 'k', 'v', 'up', 'down'), feedforward=('down',)),
    'llama_adapter': dict(tokens=4, start=1),
    'bias_scale': dict(),
}


def apply(lm, method):
    return getattr(peft, f"apply_{'lora' if method == 'dora' else method}")(lm, **ZERO_INIT[method])


@pytest.mark.parametrize('method', list(ZERO_INIT))
def test_zero_init_is_the_base_model(lm, method):
    idx = torch.randint(0, 96, (2, 9))
    with torch.no_grad():
        base = lm.logits(lm(idx))
        added = apply(lm, method)
        assert added and torch.equal(lm.logits(lm(idx)), base)  # bit for bit


def perturb(model):
    """Random values for every PEFT parameter (what training would do), so that merging has something to fold."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            if any(s in n for s in ('lora_', 'ia3_', 'bias_scale_', 'llama_adapter_')):
                p.add_(0.1 * torch.randn_like(p))


@pytest.mark.parametrize('method', ['lora', 'dora', 'ia3', 'bias_scale'])
def test_merge_equals_unmerged(lm, method):
    apply(lm, method)
    if method == 'lora':
        peft.apply_bias_scale(lm, targets=('q', 'up'))  # merged together with LoRA's (wrappers stack)
    perturb(lm)
    idx = torch.randint(0, 96, (2, 9))
    with torch.no_grad():
        unmerged = lm.logits(lm(idx))
        peft.merge(lm)
        merged = lm.logits(lm(idx))
        peft.merge(lm)  # idempotent
        twice = lm.logits(lm(idx))
        assert rel_err(merged, unmerged) < 1e-5 and torch.equal(merged, twice)
        for m in lm.modules():
            if isinstance(m, peft.LinearWrapper):
                assert m.merged
                m.unmerge()
        assert rel_err(lm.logits(lm(idx)), unmerged) < 1e-5


def test_llama_adapter_7b_count():
    """LLaMA-7B on the meta device: 10 prompt tokens x 4096 in each of the top 30 layers + 32 per-head gates each =
    30 x (40,960 + 32) = 1,229,760 trained parameters, the official alpaca_finetuning_v1 count (README: 1.2M)."""
    with torch.device('meta'):
        m = Decoder(LMConfig())  # LMConfig's defaults are LLaMA-7B's
    added = peft.apply_llama_adapter(m)  # defaults: tokens 10, start 2 (the top 30 of 32)
    assert set(added) == {f'blocks.{i}.attn' for i in range(2, 32)}
    assert peft.mark_trainable(m, ('llama_adapter_',)) == 1_229_760


def test_llama_adapter_equations(lm):
    """One adapted attention by hand: y = softmax(q K_t^T / sqrt(d_h) + causal) V_t + tanh(g) softmax(q K_p^T) V_p,
    the prompt keys / values from the frozen k / v without RoPE, per-head gates (GQA: 4 query heads, 2 KV)."""
    peft.apply_llama_adapter(lm, tokens=3, start=2)
    attn = lm.blocks[2].attn
    with torch.no_grad():
        attn.llama_adapter_gate.copy_(torch.tensor([0.5, -1.0, 2.0, 0.1]).view(1, 4, 1, 1))
    B, Tn, hd = 2, 5, 16
    q, k, v = torch.randn(B, 4, Tn, hd), torch.randn(B, 2, Tn, hd), torch.randn(B, 2, Tn, hd)
    from model import Ctx
    y = attn.attend(q, k, v, Ctx(cos=None, sin=None))
    rep = lambda t: t.repeat_interleave(2, dim=1)  # noqa: E731  (B, 2, ., hd) -> (B, 4, ., hd)
    causal = torch.ones(Tn, Tn, dtype=torch.bool).tril()
    s = (q @ rep(k).transpose(-1, -2) / hd ** 0.5).masked_fill(~causal, float('-inf'))
    P = attn.llama_adapter_prompt.detach()
    kp = attn.k(P).view(3, 2, hd).transpose(0, 1)[None]  # (1, 2, 3, hd)
    vp = attn.v(P).view(3, 2, hd).transpose(0, 1)[None]
    sp = q @ rep(kp).transpose(-1, -2) / hd ** 0.5  # (B, 4, T, 3)
    want = s.softmax(-1) @ rep(v) + attn.llama_adapter_gate.tanh() * (sp.softmax(-1) @ rep(vp))
    assert rel_err(y, want) < 1e-5


def test_lora_targets_by_path(lm):
    """A bare name is the decoder's own linear in every block; a dotted one a path pattern; errors name the key."""
    assert sorted(peft.apply_lora(lm, targets=('blocks.1.ffn.', 'blocks.*.attn.q'))) == [
        'blocks.0.attn.q', 'blocks.1.attn.q', 'blocks.1.ffn.down', 'blocks.1.ffn.gate', 'blocks.1.ffn.up',
        'blocks.2.attn.q']
    assert sorted(peft.apply_lora(lm, targets=('v',))) == ['blocks.0.attn.v', 'blocks.1.attn.v', 'blocks.2.attn.v']
    stacked = peft.apply_lora(lm, targets=('q', 'o'))  # a second LoRA wraps the first (wrappers stack)
    assert len(stacked) == 6 and isinstance(stacked['blocks.0.attn.q'].base, peft.LoRALinear)
    with pytest.raises(ValueError, match='lora_dora=True on a layer another PEFT method already wraps'):
        peft.apply_lora(lm, targets=('q',), dora=True)
    with pytest.raises(ValueError, match=r"lora_targets: 'blocks\.9\.' matches no nn\.Linear"):
        peft.apply_lora(lm, targets=('q', 'blocks.9.'))
    with pytest.raises(ValueError, match=r"lora_targets=\('nope',\) match no nn\.Linear"):
        peft.apply_lora(lm, targets=('nope',))
    with pytest.raises(ValueError, match='lora_r must be a positive int'):
        peft.apply_lora(lm, targets=('q',), r=0)
    with pytest.raises(ValueError, match="ia3_feedforward=.*must be a subset of the targets"):
        peft.apply_ia3(lm, targets=('k', 'v'), feedforward=('down',))
    with pytest.raises(ValueError, match=r'llama_adapter_start must be in \[0, 2\]'):
        peft.apply_llama_adapter(lm, start=3)


def test_trainable_state_roundtrip_and_mismatch(lm):
    peft.apply_lora(lm, targets=('q', 'v'), r=4, alpha=8)
    peft.mark_trainable(lm, ('lora_',))
    sd = {k: torch.randn_like(v) for k, v in peft.trainable_state_dict(lm).items()}
    assert all('lora_' in k for k in sd) and len(sd) == 12
    peft.load_trainable_state_dict(lm, sd)
    assert all(torch.equal(v, dict(lm.named_parameters())[k]) for k, v in sd.items())
    bad = dict(sd)
    bad['blocks.0.attn.q.lora_A.weight'] = torch.zeros(5, 64)
    with pytest.raises(ValueError, match=r'wrong shape: blocks\.0\.attn\.q\.lora_A\.weight'):
        peft.load_trainable_state_dict(lm, bad, where='ckpt.pt')
    with pytest.raises(ValueError, match='not in the model: fusion.fc1.weight'):
        peft.load_trainable_state_dict(lm, {**sd, 'fusion.fc1.weight': torch.zeros(1)})
    with pytest.raises(ValueError, match='trainable patterns'):
        peft.mark_trainable(lm, ('nothing_matches',))

# -----------------------------------------------------------------------------
# each method from a config, through fusion.build_vlm, and one optimizer step


def vlm_cfg(tiny, **kw):
    return {**dict(init_vision=tiny['clip'], init_lm=tiny['lm'], fusion='llava', vision_layer=-1, vision_norm=True,
                   vision_feature='patch', trainable=()), **kw}


def batch(model, n_img=1):
    """Two rows: n visual-token placeholders + text; pixels; labels on the text."""
    from fusion import build_vlm  # noqa: F401  (the model is already built)
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats = model.image_features(pixels)
        ids0 = torch.full((2, 1), IMAGE_TOKEN)
        tokens, _ = model.fusion(feats, has_image=torch.ones(2, dtype=torch.bool), ids=ids0)
    n = tokens.shape[1] if tokens is not None else 1
    text = torch.randint(3, 200, (2, 6))
    ids = torch.cat([torch.full((2, n), IMAGE_TOKEN), text], 1)
    labels = torch.cat([torch.full((2, n), -100), text], 1)
    return ids, pixels, labels


METHOD_CFG = {  # peft config of each method, and the patterns it declares
    'lora': (dict(peft='lora', lora_r=2, lora_alpha=4, lora_targets=('q', 'v', 'vision.blocks.*.q', 'fusion.'),
                  lora_dora=True), ('lora_',)),
    'ia3': (dict(peft='ia3'), ('ia3_',)),
    'prompt_tuning': (dict(peft='prompt_tuning', prompt_tuning_tokens=3, prompt_tuning_init_text='red circle'),
                      ('prompt_tuning.',)),
    'llama_adapter': (dict(peft='llama_adapter', llama_adapter_tokens=2, llama_adapter_start=1), ('llama_adapter_',)),
    'bias_scale': (dict(peft='bias_scale'), ('bias_scale_', 'attn_norm.', 'ffn_norm.', 'lm.norm.')),
}


@pytest.mark.parametrize('method', list(METHOD_CFG))
def test_build_and_step_changes_only_declared(tiny, method):
    from fusion import build_vlm
    extra, patterns = METHOD_CFG[method]
    model = build_vlm(vlm_cfg(tiny, **extra))
    declared = ('fusion.',) + patterns  # the LLaVA projector's and the method's
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters() if any(s in n for s in declared)}
    own = {n for n in trainable if any(s in n for s in patterns)}
    assert own
    if method == 'lora':  # the tower's q, the projector's fc1 / fc2 and the LM's q, v carry LoRA
        assert any(n.startswith('vision.') for n in own) and any(n.startswith('fusion.fc1.lora_') for n in own)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids, pixels, labels = batch(model)
    loss = model(ids, pixels=pixels, labels=labels)
    loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if n in own)  # every own parameter is reached
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= trainable and changed & own


@pytest.mark.parametrize('fusion', ['llava', 'qformer', 'flamingo', 'mmca', 'adem', 'lavin'])
def test_prompt_tuning_with_every_fusion(tiny, fusion):
    """The virtual tokens go after the fusion's prefix and before the text; the fusion's media line up with them
    (Flamingo's image index, MMCA's token types); logits stay aligned with the ids; gradients reach the prompts."""
    from fusion import build_vlm
    kw = dict(qformer=dict(qformer_dim=32, qformer_layers=1, qformer_heads=2, qformer_queries=4),
              adem=dict(adem_scales=(16, 4), adem_adapter_dim=4)).get(fusion, {})
    model = build_vlm(vlm_cfg(tiny, peft='prompt_tuning', prompt_tuning_tokens=3, **{**kw, 'fusion': fusion}))
    ids, pixels, labels = batch(model)
    logits = model(ids, pixels=pixels)
    assert logits.shape[:2] == ids.shape
    model(ids, pixels=pixels, labels=labels).backward()
    assert model.prompts['prompt_tuning'].embedding.weight.grad.abs().sum() > 0


def test_prompt_tuning_generation(tiny):
    """Greedy decoding with the prompts through the KV cache: a left-padded row gives the same tokens as alone, and
    the first token is the argmax of the full forward."""
    from fusion import build_vlm
    model = build_vlm(vlm_cfg(tiny, peft='prompt_tuning', prompt_tuning_tokens=3))
    ids, pixels, _ = batch(model)
    short = ids[1:, :-2]
    padded = torch.cat([torch.cat([torch.zeros(1, 2, dtype=torch.long), short], 1), ids[:1]], 0)
    pad_mask = torch.ones_like(padded, dtype=torch.bool)
    pad_mask[0, :2] = False
    both = model.generate(padded, pad_mask=pad_mask, pixels=pixels.flip(0), max_new_tokens=4)
    alone = model.generate(short, pixels=pixels[1:], max_new_tokens=4)
    assert torch.equal(both[0], alone[0])
    with torch.no_grad():
        assert int(both[1, 0]) == int(model(ids[:1], pixels=pixels[:1])[0, -1].argmax())


def test_wrong_key_errors(tiny):
    from fusion import build_vlm
    with pytest.raises(ValueError, match=r"lora_targets: 'vision\.nothing\.' matches no nn\.Linear"):
        build_vlm(vlm_cfg(tiny, peft='lora', lora_targets=('q', 'vision.nothing.')))
    with pytest.raises(ValueError, match=r"lora_targets: 'lm\.head' matches no nn\.Linear"):  # logits read its weight
        build_vlm(vlm_cfg(tiny, peft='lora', lora_targets=('lm.head',)))
    with pytest.raises(ValueError, match="unknown peft method 'adapterz'"):
        build_vlm(vlm_cfg(tiny, peft='adapterz'))


@pytest.mark.parametrize('method', list(METHOD_CFG))
def test_bf16_frozen_fp32_trained(tiny, method):
    """As train.py runs dtype='bfloat16': frozen weights in bfloat16, the trained ones in float32, under autocast;
    the loss is finite and every own parameter gets a float32 gradient."""
    from fusion import build_vlm
    extra, patterns = METHOD_CFG[method]
    model = build_vlm(vlm_cfg(tiny, **extra), dtype=torch.bfloat16)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        ids, pixels, labels = batch(model)
        loss = model(ids, pixels=pixels.bfloat16(), labels=labels)
    loss.backward()
    own = [p for n, p in model.named_parameters() if p.requires_grad and any(s in n for s in patterns)]
    assert torch.isfinite(loss) and own and all(p.grad is not None and p.grad.dtype == torch.float32 for p in own)
