"""train.py end to end on tiny stand-in checkpoints (conftest `tiny`): learning, exact resume, atomic
checkpoints, bad input (config keys, NaN losses, a checkpoint from another model, an existing out_dir,
architecture overrides on resume, bad images, empty data, corrupt checkpoints, output in a log file)."""
import json
import os
import runpy
import shutil
import sys

import pytest
import torch

import eval as evaluate
import model as model_py
from conftest import COLORS, ROOT

pytest.importorskip('transformers')  # the tiny checkpoints are written with save_pretrained


def train(monkeypatch, *args):
    """Run train.py in this process with these command-line arguments; returns its globals."""
    monkeypatch.setattr(sys, 'argv', ['train.py', *args])
    return runpy.run_path(str(ROOT / 'train.py'), run_name='__main__')


def base_args(tiny, data, out, **kw):
    args = dict(init_vision=tiny['dinov2'], init_lm=tiny['lm'], dataset='llava', data_root=data, out_dir=str(out),
                template='qwen2', batch_size=4, max_iters=8, eval_interval=4, eval_iters=1, log_interval=1,
                learning_rate=3e-3, warmup_ratio=0.25, peft='lora', lora_r=4, trainable="('fusion.','lora_')",
                final_eval=False, dtype='float32', max_len=128)
    args.update(kw)
    return [f'--{k}={v}' for k, v in args.items() if v is not None]  # None: leave the key at train.py's default


def losses(out):
    return [r['loss'] for r in map(json.loads, open(out / 'log.jsonl')) if 'loss' in r]


def test_overfits_a_handful_of_samples(tiny, shapes_json, tmp_path, monkeypatch):
    # LLaVA's stage 2 with full fine-tuning: the projector and the whole (tiny) LM train
    g = train(monkeypatch, *base_args(tiny, shapes_json, tmp_path, max_iters=100, eval_interval=100, peft='', lora_r=None,
                                      trainable="('fusion.','lm.')", learning_rate=3e-3, warmup_ratio=0.1,
                                      final_eval=True, max_new_tokens=4))
    ls = losses(tmp_path)
    assert len(ls) == 100
    assert max(ls[-5:]) < 0.1 * ls[0], ls  # the loss falls far below its start ...
    result = json.load(open(tmp_path / 'eval_test.json'))
    # ... and it answers from the images: without them the best is ~42% (1 of 3 colours, 1 of 2 shapes)
    assert result['n'] == 12 and result['metrics']['accuracy'] >= 75
    assert g['n_image_tokens'] == 16 and g['feats_cache']  # 4x4 patches, features cached per image


def test_resume_reproduces_the_uninterrupted_run(tiny, shapes_json, tmp_path, monkeypatch):
    full, cut = tmp_path / 'full', tmp_path / 'cut'
    train(monkeypatch, *base_args(tiny, shapes_json, full))
    real_save = model_py.atomic_save

    def save_then_crash(state, path):  # the process dies right after the step-4 checkpoint
        real_save(state, path)
        if state['step'] == 4:
            raise KeyboardInterrupt('simulated crash')
    monkeypatch.setattr(model_py, 'atomic_save', save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        train(monkeypatch, *base_args(tiny, shapes_json, cut))
    monkeypatch.setattr(model_py, 'atomic_save', real_save)
    ckpt = torch.load(cut / 'ckpt.pt', weights_only=True)
    assert ckpt['step'] == 4 and ckpt['data_pos'] == 16
    train(monkeypatch, *base_args(tiny, shapes_json, cut, init_from='resume'))
    assert losses(cut) == losses(full)  # bit-for-bit, steps 1-4 before the crash and 5-8 after
    runs = [r['run'] for r in map(json.loads, open(cut / 'log.jsonl')) if 'run' in r]
    assert [r['resumed_from'] for r in runs] == [None, 4]  # each run opens with a header record
    assert runs[0]['config']['lora_r'] == 4 and 'git' in runs[0]


def test_interrupted_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch):
    path = tmp_path / 'ckpt.pt'
    model_py.atomic_save({'step': 1, 'w': torch.ones(3)}, path)
    real = torch.save

    def dies_midway(obj, f, *a, **kw):
        real(obj, f, *a, **kw)
        with open(f, 'r+b') as fh:  # a half-written file ...
            fh.truncate(10)
        raise OSError('disk full')  # ... and the writer dies
    monkeypatch.setattr(torch, 'save', dies_midway)
    with pytest.raises(OSError, match='disk full'):
        model_py.atomic_save({'step': 2, 'w': torch.zeros(3)}, path)
    monkeypatch.setattr(torch, 'save', real)
    assert torch.load(path, weights_only=True)['step'] == 1
    assert [p.name for p in tmp_path.iterdir()] == ['ckpt.pt']  # no temporary file left behind


def test_nan_losses_are_skipped_counted_and_bounded(tiny, shapes_json, tmp_path, monkeypatch):
    real = model_py.VLM.forward
    calls = {'n': 0}

    def nan_on_third(self, *a, **kw):
        out = real(self, *a, **kw)
        calls['n'] += 1
        return out * float('nan') if calls['n'] == 3 and kw.get('labels') is not None else out
    monkeypatch.setattr(model_py.VLM, 'forward', nan_on_third)
    g = train(monkeypatch, *base_args(tiny, shapes_json, tmp_path / 'a', eval_interval=100))
    assert g['bad_steps'] == 1 and g['step'] == 8
    assert len(losses(tmp_path / 'a')) == 7  # the skipped step is not logged as a loss
    monkeypatch.setattr(model_py.VLM, 'forward', lambda self, *a, **kw: real(self, *a, **kw) * float('nan'))
    with pytest.raises(SystemExit, match='3 non-finite losses .more than max_bad_steps=2'):
        train(monkeypatch, *base_args(tiny, shapes_json, tmp_path / 'b', max_bad_steps=2, eval_interval=100))
    from tqdm import tqdm
    assert not list(tqdm._instances)  # no progress bar left open to print itself (loss=nan) after pytest's summary


def test_log_file_gets_plain_lines(tiny, shapes_json, tmp_path, monkeypatch, capsys):
    """stdout is not a terminal (here: pytest's capture; a user's `> log`): a plain line every log_interval."""
    train(monkeypatch, *base_args(tiny, shapes_json, tmp_path, max_iters=4, log_interval=2, final_eval=True,
                                  eval_limit=4, max_new_tokens=2))
    out, err = capsys.readouterr()
    assert 'step 2/4: loss' in out and 'step 4/4: loss' in out and 'step 3/4' not in out
    assert '\r' not in out + err and 'it/s' not in err


def test_existing_out_dir_is_not_overwritten(tiny, shapes_json, tmp_path, monkeypatch):
    train(monkeypatch, *base_args(tiny, shapes_json, tmp_path, max_iters=2, eval_interval=2))
    stale = tmp_path / 'ckpt.pt.tmp4999999'  # left by a run killed during a save (no such process)
    stale.write_bytes(b'half a checkpoint')
    live = tmp_path / f'ckpt.pt.tmp{os.getpid()}'  # one being written right now by a live process: kept
    live.write_bytes(b'')
    before = (tmp_path / 'ckpt.pt').read_bytes(), (tmp_path / 'log.jsonl').read_text()
    with pytest.raises(SystemExit, match=r'already holds ckpt.pt and log.jsonl \(step 2\)(?s:.*)--overwrite=True'):
        train(monkeypatch, *base_args(tiny, shapes_json, tmp_path, max_iters=1, eval_interval=1))
    assert ((tmp_path / 'ckpt.pt').read_bytes(), (tmp_path / 'log.jsonl').read_text()) == before  # nothing lost
    assert not stale.exists() and live.exists()
    live.unlink()
    g = train(monkeypatch, *base_args(tiny, shapes_json, tmp_path, max_iters=1, eval_interval=1, overwrite=True))
    assert g['step'] == 1 and torch.load(tmp_path / 'ckpt.pt', weights_only=True)['step'] == 1
    assert [r.get('step') for r in map(json.loads, open(tmp_path / 'log.jsonl'))] == [None, 1, 1]  # a fresh log


def test_resume_refuses_architecture_overrides(tiny, shapes_json, tmp_path, monkeypatch):
    train(monkeypatch, *base_args(tiny, shapes_json, tmp_path, max_iters=1, eval_interval=1))
    for arg, message in (('--fusion=adem', "fusion: checkpoint 'llava', given 'adem'"),
                         ('--lora_r=8', 'lora_r: checkpoint 4, given 8'),
                         (f'--init_lm={tiny["clip"]}', f"init_lm: checkpoint '{tiny['lm']}', given '{tiny['clip']}'")):
        with pytest.raises(SystemExit, match=message):
            train(monkeypatch, *base_args(tiny, shapes_json, tmp_path, max_iters=2, init_from='resume'), arg)
    with pytest.raises(SystemExit, match='lora_r: checkpoint 4, given 0'):  # a value equal to the default counts too
        train(monkeypatch, *base_args(tiny, shapes_json, tmp_path, max_iters=2, init_from='resume', lora_r=0))
    # without the architecture keys at all, the checkpoint's architecture is used
    args = [a for a in base_args(tiny, shapes_json, tmp_path, max_iters=2, init_from='resume')
            if not a.startswith(('--lora_r', '--trainable'))]
    assert train(monkeypatch, *args)['step'] == 2


def test_corrupt_checkpoint_on_resume(tiny, shapes_json, tmp_path, monkeypatch):
    (tmp_path / 'ckpt.pt').write_bytes(os.urandom(1000))
    with pytest.raises(ValueError, match=f"checkpoint {tmp_path / 'ckpt.pt'} is corrupt or not a checkpoint") as e:
        train(monkeypatch, *base_args(tiny, shapes_json, tmp_path, init_from='resume'))
    assert 'weights_only=False' not in str(e.value)


def copy_shapes(shapes_json, folder):
    shutil.copytree(os.path.dirname(shapes_json), folder)
    return folder / 'shapes.json'


def test_bad_images_are_all_named_before_training(tiny, shapes_json, tmp_path, monkeypatch):
    data = copy_shapes(shapes_json, tmp_path / 'd')
    (tmp_path / 'd' / '0.png').write_bytes(b'')                      # zero bytes
    (tmp_path / 'd' / '1.png').write_text('not an image')            # not an image
    (tmp_path / 'd' / '2.png').unlink()                              # missing
    png = (tmp_path / 'd' / '3.png').read_bytes()
    (tmp_path / 'd' / '3.png').write_bytes(png[:16] + b'\0' * 20 + png[36:])  # corrupt header
    with pytest.raises(SystemExit, match='4 of 6 images cannot be read; nothing was trained') as e:
        train(monkeypatch, *base_args(tiny, str(data), tmp_path / 'out'))
    msg = str(e.value)
    assert all(f'{i}.png: ' in msg for i in range(4)) and '4.png' not in msg
    assert 'empty (0 bytes)' in msg and 'missing' in msg
    assert not (tmp_path / 'out' / 'ckpt.pt').exists()


def test_image_failing_to_decode_skips_its_step(tiny, shapes_json, tmp_path, monkeypatch, capsys):
    """A truncated file passes the header check; the steps that touch it are skipped, counted and bounded."""
    data = copy_shapes(shapes_json, tmp_path / 'd')
    png = (tmp_path / 'd' / '0.png').read_bytes()
    (tmp_path / 'd' / '0.png').write_bytes(png[:len(png) // 2])
    g = train(monkeypatch, *base_args(tiny, str(data), tmp_path / 'a'))
    assert g['step'] == 8 and 1 <= g['bad_image_steps'] < 8
    assert torch.load(tmp_path / 'a' / 'ckpt.pt', weights_only=True)['bad_image_steps'] == g['bad_image_steps']
    assert '0.png' in capsys.readouterr().out
    with pytest.raises(SystemExit, match='1 steps with undecodable images .more than max_bad_steps=0'):
        train(monkeypatch, *base_args(tiny, str(data), tmp_path / 'b', max_bad_steps=0))


def test_no_samples_left(tiny, shapes_json, tmp_path, monkeypatch):
    (tmp_path / 'empty.json').write_text('[]')
    with pytest.raises(SystemExit, match='no training samples left: the llava train split in .*empty.json has no samples'):
        train(monkeypatch, *base_args(tiny, str(tmp_path / 'empty.json'), tmp_path / 'a'))
    with pytest.raises(SystemExit, match=r'no training samples left: all 12 skipped \(too_long: 12\); '
                                         r'max_len 12 < 16 visual tokens \+ prompt'), \
            pytest.warns(UserWarning, match='skipped 12 of 12'):
        train(monkeypatch, *base_args(tiny, shapes_json, tmp_path / 'b', max_len=12))


def test_type_error_names_the_default(tmp_path, monkeypatch):
    (tmp_path / 'cfg.py').write_text('batch_size = 8\n')
    with pytest.raises(SystemExit, match=r"'batch_size' expects int \(default 16, set to 8 before\), got float 2.5"):
        train(monkeypatch, str(tmp_path / 'cfg.py'), '--batch_size=2.5')


@pytest.mark.parametrize('arg,message', [
    ('--learning_rat=0.1', "unknown config key 'learning_rat'; did you mean learning_rate"),
    ('--batch_size=2.5', "config key 'batch_size' expects int"),
    ('--lora_targets=q', "config key 'lora_targets' expects tuple"),
    ('no_such_config.py', 'config file no_such_config.py: No such file'),
])
def test_bad_config(monkeypatch, arg, message):
    with pytest.raises(SystemExit, match=message):
        train(monkeypatch, arg)


def test_checkpoint_from_a_different_model(tiny, shapes_json, tmp_path, monkeypatch):
    train(monkeypatch, *base_args(tiny, shapes_json, tmp_path, max_iters=1, eval_interval=1))
    ckpt = torch.load(tmp_path / 'ckpt.pt', weights_only=True)
    ckpt['config']['init_vision'] = tiny['clip']  # same width, but a CLIP tower: the projector still fits ...
    ckpt['config']['lora_r'] = 8                  # ... while the LoRA shapes do not
    torch.save(ckpt, tmp_path / 'other.pt')
    with pytest.raises(ValueError, match=r'does not match this model(?s:.*)wrong shape: lm\.blocks\.0\.attn\.q\.lora_A'):
        evaluate.load_vlm(str(tmp_path / 'other.pt'))


def test_llava_sqa_config_takes_two_steps(tiny, sqa_root, tmp_path, monkeypatch):
    """The LLaVA-1.5 ScienceQA recipe builds and trains with tiny local stand-ins for CLIP-L/336 and Vicuna-7B."""
    g = train(monkeypatch, str(ROOT / 'config' / 'llava_sqa.py'), f'--init_vision={tiny["clip"]}',
              f'--init_lm={tiny["lm"]}', f'--data_root={sqa_root}', f'--out_dir={tmp_path}', '--max_iters=2',
              '--batch_size=2', '--global_batch=2', '--template=qwen2', '--dtype=float32', '--eval_iters=1',
              '--eval_limit=2', '--device=cpu', '--log_interval=1')
    assert g['step'] == 2 and g['fusion'] == 'llava' and g['vision_layer'] == -2
    assert len(losses(tmp_path)) == 2 and all(l == l for l in losses(tmp_path))
    result = json.load(open(tmp_path / 'eval_test.json'))
    assert result['task'] == 'scienceqa' and result['n'] == 2


class OnlyArchKeys(dict):
    """A config that fails on any key outside fusion.arch_keys (the keys a resumed run restores)."""

    def __getitem__(self, k):
        from fusion import arch_keys
        assert k in arch_keys(dict(self)), f"build_vlm reads {k!r}, which is not in fusion.arch_keys"
        return super().__getitem__(k)

    def get(self, k, default=None):
        return self[k] if k in self else default


@pytest.mark.parametrize('fusion', ['llava', 'qformer', 'flamingo', 'mmca', 'adem', 'lavin'])
def test_build_vlm_reads_only_arch_keys(tiny, fusion):
    """Every fusion builds from arch_keys alone, so resuming restores the whole architecture."""
    from fusion import FUSIONS, arch_keys, build_vlm
    assert fusion in FUSIONS
    cfg = OnlyArchKeys(
        init_vision=tiny['clip'], init_lm=tiny['lm'], fusion=fusion, vision_layer=-1, vision_norm=False,
        vision_feature='patch', peft='lora', lora_r=2, lora_alpha=4, lora_dropout=0.0, lora_targets=('q', 'v'),
        trainable=(), qformer_init='', qformer_dim=32, qformer_layers=2, qformer_heads=4,
        qformer_queries=4, flamingo_every=1, mmca_attention=True, adem_scales=(16, 4), adem_hidden=8,
        adem_beta=0.01, adem_alpha=0.1, adem_drop_ratio=0.1, adem_adapter_dim=4, lavin_temperature=10.0)
    assert set(arch_keys(cfg)) == {k for k in cfg if not k.startswith(tuple(f + '_' for f in FUSIONS if f != fusion))}
    model = build_vlm(cfg)
    assert any(p.requires_grad for p in model.fusion.parameters())


class _Stop(Exception):
    pass


def _no_process_group(**kw):
    raise _Stop


@pytest.mark.parametrize('world,batch,accum', [(1, 2, 16), (2, 2, 8), (8, 2, 2), (8, 4, 1)])
def test_global_batch_sets_the_micro_steps(monkeypatch, capsys, world, batch, accum):
    """config/adem_sqa.py's 32 samples per step on 1, 2 and 8 processes, the same command on each: simulated ranks
    (the arithmetic runs before the process group starts, which the test stops)."""
    for k, v in dict(WORLD_SIZE=world, RANK=0, LOCAL_RANK=0).items():
        monkeypatch.setenv(k, str(v))
    monkeypatch.setattr(torch.distributed, 'init_process_group', _no_process_group)
    with pytest.raises(_Stop):
        train(monkeypatch, str(ROOT / 'config' / 'adem_sqa.py'), f'--batch_size={batch}')
    assert f"batch: 32 samples per step = {batch} per process x {accum} micro-steps x {world} processes" in \
        capsys.readouterr().out


def test_global_batch_that_does_not_divide(monkeypatch):
    for k, v in dict(WORLD_SIZE=8, RANK=0, LOCAL_RANK=0).items():
        monkeypatch.setenv(k, str(v))
    with pytest.raises(SystemExit, match=r"global_batch=32 is not a multiple of batch_size=3 x 8 processes: set "
                                         r"batch_size to one of \[1, 2, 4\]"):
        train(monkeypatch, str(ROOT / 'config' / 'adem_sqa.py'), '--batch_size=3')
    with pytest.raises(SystemExit, match='make global_batch a multiple of 8'):
        train(monkeypatch, '--global_batch=12', '--batch_size=1')
    with pytest.raises(SystemExit, match=r"'grad_accum' is now global_batch"):
        train(monkeypatch, '--grad_accum=2')


def test_activation_checkpointing_gives_the_same_gradients(tiny):
    """grad_checkpoint recomputes every decoder and tower block in the backward: ADEM-VL (adapters in the tower,
    so the backward runs through it) + LoRA with dropout (the recomputed masks must be the same ones)."""
    from fusion import build_vlm
    cfg = dict(init_vision=tiny['clip'], init_lm=tiny['lm'], fusion='adem', peft='lora', vision_layer=-1,
               vision_norm=True, trainable=(), adem_scales=(16, 4), adem_adapter_dim=4, lora_r=2, lora_dropout=0.1)
    ids = torch.cat([torch.randint(3, 100, (2, 3)), torch.full((2, 1), -200), torch.randint(3, 100, (2, 6))], 1)
    labels, pixels = ids.masked_fill(ids < 0, -100), torch.randn(2, 3, 32, 32)
    grads = []
    for recompute in (False, True):
        torch.manual_seed(0)
        model = build_vlm(cfg).train()
        model.lm.grad_checkpoint = model.vision.grad_checkpoint = recompute
        torch.manual_seed(1)  # the same dropout draws in both runs
        model(ids, pixels=pixels, labels=labels).backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and any('vision.' in n for n in grads[0])
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-6, atol=1e-8, msg=n)


def test_grad_checkpoint_key_trains_the_same(tiny, shapes_json, tmp_path, monkeypatch):
    train(monkeypatch, *base_args(tiny, shapes_json, tmp_path / 'a', max_iters=3, eval_interval=3))
    g = train(monkeypatch, *base_args(tiny, shapes_json, tmp_path / 'b', max_iters=3, eval_interval=3,
                                      grad_checkpoint=True))
    assert g['model'].lm.grad_checkpoint and g['model'].vision.grad_checkpoint
    assert losses(tmp_path / 'b') == pytest.approx(losses(tmp_path / 'a'), rel=1e-6)


def test_images_decode_in_the_prefetch_thread(tiny, shapes_json, tmp_path, monkeypatch):
    """The next step's images are decoded and preprocessed in a thread while a step trains (no feature cache:
    every step needs pixels); the losses are those of the run that decodes in the main thread."""
    import threading
    import data
    train(monkeypatch, *base_args(tiny, shapes_json, tmp_path / 'a', max_iters=4, cache_features_gb=0.0))
    where, load = [], data.load_image

    def recording(src):
        where.append(threading.current_thread() is threading.main_thread())
        return load(src)
    monkeypatch.setattr(data, 'load_image', recording)
    train(monkeypatch, *base_args(tiny, shapes_json, tmp_path / 'b', max_iters=4, cache_features_gb=0.0))
    assert where.count(False) >= 8 and losses(tmp_path / 'b') == losses(tmp_path / 'a')


def test_llava_stage2_starts_from_stage1(tiny, shapes_json, tmp_path, monkeypatch):
    """config/llava_stage1.py (projector only) then config/llava_stage2.py from its checkpoint (init_from), with
    tiny stand-ins: at learning rate 0, stage 2 ends with exactly stage 1's projector while the LM trains too."""
    tiny_args = [f'--init_vision={tiny["clip"]}', f'--init_lm={tiny["lm"]}', f'--data_root={shapes_json}',
                 '--image_root=', '--batch_size=2', '--global_batch=2', '--dtype=float32', '--eval_iters=1',
                 '--max_len=128', '--log_interval=1']
    g1 = train(monkeypatch, str(ROOT / 'config' / 'llava_stage1.py'), *tiny_args, f'--out_dir={tmp_path / "s1"}',
               '--max_iters=2')
    assert {n for n, p in g1['model'].named_parameters() if p.requires_grad} == \
        {n for n, _ in g1['model'].named_parameters() if n.startswith('fusion.')}
    stage1 = torch.load(tmp_path / 's1' / 'ckpt.pt', weights_only=True)['model']
    g2 = train(monkeypatch, str(ROOT / 'config' / 'llava_stage2.py'), *tiny_args, f'--out_dir={tmp_path / "s2"}',
               f'--init_from={tmp_path / "s1" / "ckpt.pt"}', '--max_iters=1', '--learning_rate=0.0', '--fsdp=False',
               '--template=qwen2')
    params = dict(g2['model'].named_parameters())
    assert params['lm.blocks.0.attn.q.weight'].requires_grad and set(stage1) < set(params)
    assert all(torch.equal(params[k].detach(), v) for k, v in stage1.items())
    with pytest.raises(SystemExit, match="init_from must be 'scratch', 'resume' or a train.py checkpoint file"):
        train(monkeypatch, str(ROOT / 'config' / 'llava_stage2.py'), *tiny_args, f'--out_dir={tmp_path / "s3"}',
              f'--init_from={tmp_path / "nothing.pt"}')


def test_llava_gemma_stages_build_and_step(tiny, shapes_json, tmp_path, monkeypatch):
    """config/llava_gemma_stage1.py then stage 2 from its checkpoint, on a tiny Gemma (GeGLU, (1 + w) norms,
    scaled and tied embeddings) and a tiny CLIP: each builds and takes two steps."""
    import shutil
    import transformers as T
    gemma = tmp_path / 'gemma'
    shutil.copytree(tiny['lm'], gemma, ignore=shutil.ignore_patterns('*.safetensors', 'config.json'))
    vocab = json.load(open(f"{tiny['lm']}/config.json"))['vocab_size']
    T.GemmaForCausalLM(T.GemmaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=1, head_dim=16,
                                     max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
                                     pad_token_id=0)).save_pretrained(gemma)
    common = [f'--init_vision={tiny["clip"]}', f'--init_lm={gemma}', f'--data_root={shapes_json}', '--image_root=',
              '--batch_size=2', '--global_batch=2', '--dtype=float32', '--eval_iters=1', '--max_len=128',
              '--max_iters=2', '--log_interval=1']
    train(monkeypatch, str(ROOT / 'config' / 'llava_gemma_stage1.py'), *common, f'--out_dir={tmp_path / "s1"}')
    g = train(monkeypatch, str(ROOT / 'config' / 'llava_gemma_stage2.py'), *common, f'--out_dir={tmp_path / "s2"}',
              f'--init_from={tmp_path / "s1" / "ckpt.pt"}', '--fsdp=False', '--sharded_checkpoint=False',
              '--template=qwen2')
    assert g['model'].lm.cfg.norm_plus_one and g['model'].lm.cfg.embed_scale and g['step'] == 2
    assert len(losses(tmp_path / 's1')) == len(losses(tmp_path / 's2')) == 2
    assert all(l == l for l in losses(tmp_path / 's2'))


def easy_vqa_folder(root, n_images=12):
    """easy-VQA's layout ({split}/questions.json of [question, answer, image_id], {split}/images/{id}.png) with its
    skew: per image 3 yes/no questions, 1 shape and 1 colour question."""
    from conftest import shape_image
    shapes = {'circle': 'circle', 'square': 'rectangle'}
    for split in ('train', 'test'):
        (root / split / 'images').mkdir(parents=True)
        entries = []
        for i in range(n_images):
            color, shape = list(COLORS)[i % 3], list(shapes)[i // 3 % 2]
            shape_image(root / split / 'images' / f'{i}.png', color, shape)
            entries += [[f'is there a {color} shape?', 'yes', i], ['is there a teal shape?', 'no', i],
                        [f'is this a {shapes[shape]}?', 'yes', i], ['what shape is this?', shapes[shape], i],
                        ['what color is the shape?', color, i]]
        (root / split / 'questions.json').write_text(json.dumps(entries))
    return str(root)



def test_balance_holdout_fusion_lr_and_standardize(tiny, tmp_path, monkeypatch):
    """The issue-12 levers on an easy-VQA-layout folder: balance=True draws the three question types equally often
    (yes/no is 60% of these questions); val_images holds whole images out of training and val_answers scores them
    per type into the log; fusion_lr gives the projector its own learning rate; llava_standardize sets the
    projector's input shift / scale to the training images' channel mean / std, computed here independently."""
    import data
    root = easy_vqa_folder(tmp_path / 'evqa')
    g = train(monkeypatch, *base_args(tiny, root, tmp_path / 'out', dataset='easyvqa', template='plain',
                                      max_iters=4, eval_interval=2, balance=True, val_images=3, val_answers=10,
                                      fusion_lr=1e-2, learning_rate=1e-3, llava_standardize=True, max_new_tokens=2))
    held = {s['image'] for s in g['val_samples']}
    assert len(held) == 3 and not held & {s['image'] for s in g['train_samples']}
    assert len(g['train_samples']) == 9 * 5 and len(g['val_samples']) == 3 * 5
    types = [g['train_samples'][g['train_ds'].keep[g['sample_index'](i)]]['question_type'] for i in range(6000)]
    for t in ('yes/no', 'shape', 'colour'):
        assert abs(types.count(t) / 6000 - 1 / 3) < 0.03, (t, types.count(t))
    lrs = {any(p is q for q in g['raw_model'].fusion.parameters()): grp['lr'] for grp in g['optimizer'].param_groups
           for p in grp['params'][:1]}
    assert lrs[True] == pytest.approx(10 * lrs[False])
    log = [json.loads(line) for line in open(tmp_path / 'out' / 'log.jsonl')]
    acc = [r['val_acc'] for r in log if 'val_acc' in r]
    assert len(acc) == 2 and set(acc[0]) == {'all', 'yes/no', 'shape', 'colour'}
    assert (tmp_path / 'out' / 'curves.png').stat().st_size > 0  # plot.py's picture of the run
    # the reference: the tower's CLS features of the 9 training images, mean and std per channel
    vlm, io = g['raw_model'], g['io']
    feats = data.image_inputs(vlm, sorted({s['image'] for s in g['train_samples']}), io['image_cfg'])['pixels']
    with torch.no_grad():
        f = vlm.fusion.selected(vlm.image_features(feats)).flatten(0, -2)
    ckpt = torch.load(tmp_path / 'out' / 'ckpt.pt', weights_only=False)  # step 2: already trained, so from step 0:
    fresh = train(monkeypatch, *base_args(tiny, root, tmp_path / 'zero', dataset='easyvqa', template='plain',
                                          max_iters=1, eval_interval=100, val_images=3, llava_standardize=True,
                                          learning_rate=1e-12, warmup_ratio=0.0))
    fu = fresh['raw_model'].fusion
    assert torch.allclose(-fu.in_shift, f.mean(0), atol=1e-4)
    assert torch.allclose(1 / fu.in_scale, f.std(0, unbiased=False) + 1e-6, rtol=1e-3)
    assert 'fusion.in_shift' in ckpt['model']
