"""train.py under torchrun on 2 CPU processes (gloo): DDP and FSDP2 give the same losses and trained weights
as one process with the same global batch, and their checkpoints resume in a single process."""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT

pytest.importorskip('transformers')


def args(tiny, data, out, **kw):
    a = dict(init_vision=tiny['dinov2'], init_lm=tiny['lm'], dataset='llava', data_root=data, out_dir=str(out),
             template='qwen2', max_iters=4, eval_interval=4, eval_iters=1, log_interval=1, learning_rate=3e-3,
             warmup_ratio=0.25, peft='lora', lora_r=4, trainable="('fusion.','lora_')", final_eval=False, dtype='float32',
             max_len=128, threads=1, global_batch=8)
    a.update(kw)
    return [f'--{k}={v}' for k, v in a.items() if v is not None]  # None: leave the key at train.py's default


def run(argv, nproc=1):
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    cmd = [sys.executable, 'train.py', *argv] if nproc == 1 else \
        [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}', 'train.py', *argv]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]


def losses(out):
    return [r['loss'] for r in map(json.loads, open(out / 'log.jsonl')) if 'loss' in r]


@pytest.fixture(scope='module')
def single(tiny, shapes_json, tmp_path_factory):
    out = tmp_path_factory.mktemp('single')
    run(args(tiny, shapes_json, out, batch_size=4))
    return out


@pytest.mark.parametrize('fsdp', [False, True], ids=['ddp', 'fsdp'])
def test_two_processes_match_one(tiny, shapes_json, single, tmp_path, fsdp):
    run(args(tiny, shapes_json, tmp_path, batch_size=2, fsdp=fsdp), nproc=2)  # 2 ranks x 2 = the same 4 samples
    assert losses(tmp_path) == pytest.approx(losses(single), rel=1e-5, abs=1e-6)
    a = torch.load(single / 'ckpt.pt', weights_only=True)
    b = torch.load(tmp_path / 'ckpt.pt', weights_only=True)
    assert sorted(a['model']) == sorted(b['model']) and all('lora_' in k or 'fusion.' in k for k in b['model'])
    for k in a['model']:
        torch.testing.assert_close(b['model'][k], a['model'][k], rtol=1e-4, atol=1e-6)
    assert sorted(a['optimizer']['state']) == sorted(b['optimizer']['state'])  # keyed by parameter name
    # the distributed checkpoint resumes in one process
    run(args(tiny, shapes_json, tmp_path, batch_size=4, max_iters=5, init_from='resume'))
    assert len(losses(tmp_path)) == 5


def test_fsdp_final_evaluation_completes_and_scores_like_one_process(tiny, shapes_json, tmp_path):
    """Every FSDP block forward is a collective: 9 eval prompts on 2 ranks (5 and 4, 2 and 1 batches of 4) and
    rows that stop at different steps must not leave a rank waiting. The 2-process answers equal eval.py's on
    the same checkpoint in one process."""
    run(args(tiny, shapes_json, tmp_path, batch_size=1, global_batch=2, fsdp=True, final_eval=True, eval_limit=9,
             max_new_tokens=6), nproc=2)
    two = json.load(open(tmp_path / 'eval_test.json'))
    p = subprocess.run([sys.executable, 'eval.py', f'--ckpt={tmp_path / "ckpt.pt"}', '--limit=9', '--batch_size=4',
                        '--max_new_tokens=6', f'--out={tmp_path / "one.json"}'], cwd=ROOT, capture_output=True,
                       text=True, timeout=600, env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert p.returncode == 0, p.stderr[-3000:]
    one = json.load(open(tmp_path / 'one.json'))
    assert two['n'] == one['n'] == 9 and two['metrics'] == one['metrics']
    assert [r['text'] for r in two['predictions']] == [r['text'] for r in one['predictions']]


def test_sharded_checkpoint_of_a_full_fine_tune_resumes_exactly(tiny, shapes_json, tmp_path):
    """A full fine-tune under FSDP (the whole LM trains) with sharded_checkpoint: every rank writes its shards, ckpt.pt
    holds none of the weights, and resuming gives the uninterrupted run's losses (constant learning rate, so that
    the shorter first run has the same schedule). eval.py reads the shards back in one process."""
    full = dict(peft='', lora_r=None, trainable="('fusion.','lm.')", fsdp=True, sharded_checkpoint=True, batch_size=2,
                global_batch=4, warmup_ratio=0.0, min_lr=3e-3, eval_interval=3)
    run(args(tiny, shapes_json, tmp_path / 'whole', max_iters=6, **full), nproc=2)
    run(args(tiny, shapes_json, tmp_path / 'cut', max_iters=3, **full), nproc=2)
    ckpt = torch.load(tmp_path / 'cut' / 'ckpt.pt', weights_only=True)
    assert ckpt['model'] is None and ckpt['optimizer'] is None and ckpt['sharded'] == 'ckpt_sharded/step_0000003'
    assert sorted(p.name for p in (tmp_path / 'cut' / ckpt['sharded']).glob('*.distcp')) == ['__0_0.distcp', '__1_0.distcp']
    run(args(tiny, shapes_json, tmp_path / 'cut', max_iters=6, init_from='resume', **full), nproc=2)
    assert losses(tmp_path / 'cut') == pytest.approx(losses(tmp_path / 'whole'), rel=1e-6, abs=1e-7)
    assert [p.name for p in (tmp_path / 'cut' / 'ckpt_sharded').iterdir()] == ['step_0000006']  # older steps go
    p = subprocess.run([sys.executable, 'eval.py', f'--ckpt={tmp_path / "cut" / "ckpt.pt"}', '--limit=2'], cwd=ROOT,
                       capture_output=True, text=True, timeout=600, env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert p.returncode == 0 and '2 samples' in p.stdout, p.stderr[-3000:]


def test_fsdp_cpu_offload_matches_plain_fsdp(tiny, shapes_json, tmp_path):
    """offload=True keeps the sharded parameters, gradients and AdamW state in CPU memory (FSDP2's
    CPUOffloadPolicy): a full fine-tune on 2 processes logs the losses of the same run without it."""
    full = dict(peft='', lora_r=None, trainable="('fusion.','lm.')", fsdp=True, batch_size=2, global_batch=4)
    run(args(tiny, shapes_json, tmp_path / 'plain', **full), nproc=2)
    run(args(tiny, shapes_json, tmp_path / 'offload', offload=True, **full), nproc=2)
    assert losses(tmp_path / 'offload') == pytest.approx(losses(tmp_path / 'plain'), rel=1e-6, abs=1e-7)
