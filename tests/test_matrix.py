"""Any fusion x any PEFT: every pair of fusion.FUSIONS x peft.METHODS (a method added to either joins by itself)
trains three steps through train.py on tiny stand-ins. For each pair: the gradients reach exactly the parameters
its methods declare trainable, each of them nonzero at least once; the loss falls; a run resumed from its step-2
checkpoint reproduces the uninterrupted run's step 3 (loss and trained weights, bit for bit). The pairs that make
no sense are listed in INVALID with the error they must give.

Speed (~66 pairs once every PEFT method is in): every step sees the same 12 samples (batch 12 = the whole set,
so that three steps show the loss fall), one uninterrupted run keeps a copy of its step-2 checkpoint, and the
resumed run takes one step from it: two short train.py runs per pair, in this process."""
import json
import runpy
import shutil
import sys

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

import fusion
import model as model_py
import peft
from conftest import ROOT

pytest.importorskip('transformers')  # the tiny checkpoints are written with save_pretrained

# each method's keys for the tiny stand-ins (32 px tower, patch 8: 16 patches; 64-wide, 2-layer LM); none = its defaults
FUSION_KEYS = {
    'qformer': dict(qformer_dim=32, qformer_layers=2, qformer_heads=4, qformer_queries=4),
    'adem': dict(adem_scales=(16, 4), adem_hidden=8, adem_adapter_dim=4),
}
PEFT_KEYS = {  # small settings for the 2-layer tiny LM
    'lora': dict(lora_r=2, lora_alpha=4),
    'prompt_tuning': dict(prompt_tuning_tokens=4),
    'llama_adapter': dict(llama_adapter_tokens=4, llama_adapter_start=1),
    'maple': dict(maple_depth=2),
    'petal': dict(petal_rank=4, petal_expert_rank=4),
}
# (fusion, peft) -> regex of the error a pair that makes no sense gives (head tuning / PETAL of a Q-Former in a fusion
# without one: only with an explicit head_target / petal_target='qformer', tested in tests/test_peft_adapters.py)
INVALID = {('lavin', 'maple'): "LaVIN reads the tower its own way"}
# (fusion, peft) -> {name pattern: why it may get no gradient in three steps}; checked to be exactly these
NO_GRAD = {}

PAIRS = [(f, p) for f in fusion.FUSIONS for p in peft.METHODS]


def args(tiny, data, out, f, p, **kw):
    a = dict(init_vision=tiny['clip'], init_lm=tiny['lm'], dataset='llava', data_root=data, out_dir=str(out),
             template='qwen2', fusion=f, peft=p, vision_layer=-1, vision_norm=False, vision_feature='patch',
             batch_size=12, max_iters=3, eval_interval=2, eval_iters=1, log_interval=1, learning_rate=3e-3,
             warmup_iters=1, final_eval=False, dtype='float32', max_len=128,
             **FUSION_KEYS.get(f, {}), **PEFT_KEYS.get(p, {}))
    a.update(kw)
    return ['train.py', *[f'--{k}={v}' for k, v in a.items()]]


def train(monkeypatch, argv):
    monkeypatch.setattr(sys, 'argv', argv)
    return runpy.run_path(str(ROOT / 'train.py'), run_name='__main__')


def losses(out):
    return [r['loss'] for r in map(json.loads, open(out / 'log.jsonl')) if 'loss' in r]


def declared(model, cfg):
    """Parameter names the pair's methods train by default: the fusion's patterns and peft.apply's."""
    patterns = list(model.fusion.trainable)  # as the PEFT methods left it (head / PETAL on a Q-Former narrow it)
    patterns += [s for m in peft.names(cfg) for s in PATTERNS[m]]
    return {n for n, _ in model.named_parameters() if any(s in n for s in patterns)}


PATTERNS = {}  # peft method -> its default patterns, as peft.apply returned them (recorded in the run)


@pytest.mark.parametrize('f,p', PAIRS, ids=[f'{f}-{p}' for f, p in PAIRS])
def test_pair_trains_and_resumes(tiny, shapes_json, tmp_path, monkeypatch, f, p):
    if (f, p) in INVALID:
        with pytest.raises((ValueError, SystemExit), match=INVALID[f, p]):
            train(monkeypatch, args(tiny, shapes_json, tmp_path, f, p))
        return
    real_apply, real_save = peft.apply, model_py.atomic_save

    def apply(model, cfg):  # what each method says it trains
        out = real_apply(model, cfg)
        PATTERNS.update(out)
        return out

    def save(state, path):  # the uninterrupted run keeps its step-2 checkpoint for the resumed one
        real_save(state, path)
        if state['step'] == 2:
            (tmp_path / 'cut').mkdir(exist_ok=True)
            shutil.copy(path, tmp_path / 'cut' / 'ckpt.pt')
    monkeypatch.setattr(peft, 'apply', apply)
    monkeypatch.setattr(model_py, 'atomic_save', save)
    got_grad, steps = set(), []

    def record(optimizer, *_):  # before every update: which parameters have a nonzero gradient
        steps.append(1)
        got_grad.update(id(q) for g in optimizer.param_groups for q in g['params']
                        if q.grad is not None and q.grad.abs().sum() > 0)
    hook = register_optimizer_step_pre_hook(record)
    try:
        g = train(monkeypatch, args(tiny, shapes_json, tmp_path / 'full', f, p))
    finally:
        hook.remove()
    model = g['raw_model']
    names = {id(q): n for n, q in model.named_parameters()}
    want = declared(model, g['config'])
    trainable = {n for n, q in model.named_parameters() if q.requires_grad}
    assert trainable == want, (f, p, sorted(trainable ^ want)[:5])
    assert want, (f, p)
    reached = {names[i] for i in got_grad}
    assert reached <= want  # no gradient outside the declared set (frozen ones cannot get one)
    silent = want - reached
    allowed = {n for n in silent if any(s in n for s in NO_GRAD.get((f, p), {}))}
    assert silent == allowed, (f, p, 'no gradient in 3 steps:', sorted(silent)[:5])
    assert len(steps) == 3
    ls = losses(tmp_path / 'full')
    assert len(ls) == 3 and ls[-1] < ls[0], (f, p, ls)
    # resume at step 2: the same step 3
    monkeypatch.setattr(model_py, 'atomic_save', real_save)
    train(monkeypatch, args(tiny, shapes_json, tmp_path / 'cut', f, p, init_from='resume'))
    assert losses(tmp_path / 'cut') == ls[2:]
    full, cut = (torch.load(tmp_path / d / 'ckpt.pt', weights_only=True) for d in ('full', 'cut'))
    assert full['step'] == cut['step'] == 3
    assert full['model'].keys() == cut['model'].keys()
    assert all(torch.equal(full['model'][k], cut['model'][k]) for k in full['model']), (f, p)


def test_lists_name_real_pairs():
    """INVALID and NO_GRAD entries must name existing pairs (a renamed method leaves none behind)."""
    assert set(INVALID) | set(NO_GRAD) <= set(PAIRS)
    assert not set(INVALID) & set(NO_GRAD)
