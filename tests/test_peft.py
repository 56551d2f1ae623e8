"""peft.py vs HF peft on a tiny random LLaMA saved in the test."""
import os
import subprocess
import sys

import pytest
import torch

from conftest import randomize, rel_err
from model import Decoder
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

# Our peft.py shadows the `peft` package inside this repo, and HF peft imports itself by absolute name, so the
# reference runs in a subprocess whose sys.path does not hold the repo: it wraps the saved tiny LLaMA with HF
# peft LoRA, gives lora_B random values (A keeps peft's own init), and saves the adapters, the logits and the
# trainable-parameter count.
REFERENCE = """
import sys, torch, transformers, peft
folder, r, alpha, targets = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4].split(',')
torch.manual_seed(0)
m = transformers.LlamaForCausalLM.from_pretrained(folder).eval()
m = peft.get_peft_model(m, peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets))
lora = {}
for name, mod in m.named_modules():
    if hasattr(mod, 'lora_A') and 'default' in getattr(mod, 'lora_A', {}):
        with torch.no_grad():
            mod.lora_B['default'].weight.normal_(0, 0.1)
        lora[name] = (mod.lora_A['default'].weight.clone(), mod.lora_B['default'].weight.clone())
idx = torch.load(folder + '/idx.pt')
with torch.no_grad():
    logits = m(idx).logits
n = sum(p.numel() for p in m.parameters() if p.requires_grad)
torch.save(dict(lora=lora, logits=logits, n_trainable=n, version=peft.__version__), folder + '/ref.pt')
"""


def hf_peft_reference(folder, idx, targets, r, alpha):
    torch.save(idx, folder / 'idx.pt')
    env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
    subprocess.run([sys.executable, '-c', REFERENCE, str(folder), str(r), str(alpha),
                    ','.join(HF_NAMES[t] for t in targets)], cwd=folder, env=env, check=True)
    return torch.load(folder / 'ref.pt')


@pytest.fixture
def pair(tmp_path):
    cfg = T.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2)
    ref = randomize(T.LlamaForCausalLM(cfg), std=0.1).eval()
    ref.save_pretrained(tmp_path)
    return tmp_path, Decoder.from_pretrained(tmp_path)


@pytest.mark.parametrize('targets,r,alpha', [(('q', 'v'), 4, 8), (('q', 'k', 'v', 'o', 'gate', 'up', 'down'), 8, 16)])
def test_lora_matches_peft(pair, targets, r, alpha):
    folder, ours = pair
    idx = torch.randint(0, 96, (2, 9))
    with torch.no_grad():
        base = ours.logits(ours(idx))
    ref = hf_peft_reference(folder, idx, targets, r, alpha)
    n = peft.apply_lora(ours, targets=targets, r=r, alpha=alpha)
    assert n == 2 * len(targets) == len(ref['lora'])
    with torch.no_grad():  # B = 0 at init: the wrapped model is the base model
        assert torch.equal(ours.logits(ours(idx)), base)
    for name, (A, B) in ref['lora'].items():  # base_model.model.model.layers.{i}.{self_attn|mlp}.{q_proj|...}
        i, hf = int(name.split('.')[4]), name.split('.')[-1]
        short = {v: k for k, v in HF_NAMES.items()}[hf]
        m = ours.get_submodule(f"blocks.{i}.{'attn' if short in 'qkvo' else 'ffn'}.{short}")
        assert m.lora_A.weight.shape == A.shape and m.lora_B.weight.shape == B.shape
        with torch.no_grad():
            m.lora_A.weight.copy_(A)
            m.lora_B.weight.copy_(B)
    with torch.no_grad():
        a = ours.logits(ours(idx))
    assert rel_err(a, base) > 1e-3              # the adapters now change the output ...
    assert rel_err(a, ref['logits']) < 1e-5     # ... exactly as peft's do
    peft.mark_trainable(ours, ('lora_',))
    assert sum(p.numel() for p in ours.parameters() if p.requires_grad) == ref['n_trainable']


def test_lora_init_like_peft():
    """A: kaiming-uniform(a=sqrt(5)) bound 1/sqrt(in); B: zeros; scaling alpha / r."""
    m = peft.LoRALinear(torch.nn.Linear(64, 32), r=4, alpha=16)
    assert m.lora_A.weight.abs().max() <= 1 / 64 ** 0.5 and m.lora_A.weight.std() > 0.5 / 64 ** 0.5 / 3 ** 0.5
    assert torch.equal(m.lora_B.weight, torch.zeros(32, 4)) and m.scaling == 4.0


def test_lora_merge(pair):
    _, ours = pair
    peft.apply_lora(ours, targets=('q', 'v', 'down'), r=4, alpha=8)
    for m in ours.modules():
        if isinstance(m, peft.LoRALinear):
            torch.nn.init.normal_(m.lora_B.weight, std=0.1)
    idx = torch.randint(0, 96, (2, 9))
    with torch.no_grad():
        unmerged = ours.logits(ours(idx))
        peft.merge(ours)
        merged = ours.logits(ours(idx))
        peft.merge(ours)  # idempotent
        twice = ours.logits(ours(idx))
    assert rel_err(merged, unmerged) < 1e-5
    assert torch.equal(merged, twice)
    for m in ours.modules():
        if isinstance(m, peft.LoRALinear):
            m.unmerge()
    with torch.no_grad():
        assert rel_err(ours.logits(ours(idx)), unmerged) < 1e-5


def test_trainable_state_roundtrip_and_mismatch(pair):
    _, ours = pair
    peft.apply_lora(ours, targets=('q', 'v'), r=4, alpha=8)
    peft.mark_trainable(ours, ('lora_',))
    sd = {k: torch.randn_like(v) for k, v in peft.trainable_state_dict(ours).items()}
    assert all('lora_' in k for k in sd) and len(sd) == 8
    peft.load_trainable_state_dict(ours, sd)
    assert all(torch.equal(v, dict(ours.named_parameters())[k]) for k, v in sd.items())
    bad = dict(sd)
    bad['blocks.0.attn.q.lora_A.weight'] = torch.zeros(5, 64)
    with pytest.raises(ValueError, match=r'wrong shape: blocks\.0\.attn\.q\.lora_A\.weight'):
        peft.load_trainable_state_dict(ours, bad, where='ckpt.pt')
    with pytest.raises(ValueError, match='not in the model: fusion.fc1.weight'):
        peft.load_trainable_state_dict(ours, {**sd, 'fusion.fc1.weight': torch.zeros(1)})
    with pytest.raises(ValueError, match='trainable patterns'):
        peft.mark_trainable(ours, ('nothing_matches',))
