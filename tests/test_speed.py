"""The speed paths compute what the plain paths compute: packed rows = padded batches, compiled blocks = eager
ones, QLoRA's NF4 base = its dequantised weight, int8 weight-only linears = their dequantised weight."""
import pytest
import torch
import torch.nn as nn

import data
from fusion import build_vlm
from model import IMAGE_TOKEN, Int8Linear, NF4Linear, quantize_int8, quantize_linears
from peft import LoRALinear


def tiny_llava(tiny, **kw):
    cfg = dict(init_vision=tiny['dinov2'], init_lm=tiny['lm'], fusion='llava', peft='lora', lora_r=4, lora_alpha=8,
               lora_dropout=0.0, lora_targets=('q', 'k', 'v', 'o', 'gate', 'up', 'down'), vision_layer=-1,
               vision_norm=True, vision_feature='patch', **kw)
    model = build_vlm(cfg)
    with torch.no_grad():  # LoRA's B starts at zero: give it values, so that its gradients and outputs count
        for n, p in model.named_parameters():
            if 'lora_B' in n:
                p.normal_(0, 0.05)
    return model


def items(n_image_tokens, lengths=(9, 3, 14), images=(True, False, True)):
    """Dataset items of different lengths: image placeholders, random text, labels on a random tail."""
    out = []
    for i, (n, img) in enumerate(zip(lengths, images)):
        ids = torch.cat([torch.full((n_image_tokens,), IMAGE_TOKEN) if img else torch.zeros(0, dtype=torch.long),
                         torch.randint(3, 200, (n,))])
        labels = torch.where(torch.arange(len(ids)) >= len(ids) - n // 2 - 1, ids, data.IGNORE_INDEX)
        out.append({'id': str(i), 'image': f'img{i}' if img else None, 'input_ids': ids, 'labels': labels})
    return out


def test_packed_equals_unpacked_loss_and_gradients(tiny):
    model = tiny_llava(tiny)
    n_img = model.fusion.n_tokens(model.vision.n_tokens(32))
    batch = items(n_img)
    pixels = {f'img{i}': torch.randn(3, 32, 32) for i in range(3)}
    lora = [p for n, p in model.named_parameters() if p.requires_grad]

    def loss_and_grads(b, packed):
        imgs = b['images'][0] if packed else b['images']
        px = torch.stack([pixels[x] if x is not None else torch.zeros(3, 32, 32) for x in imgs])
        px = px[None] if packed else px  # packed: (1, M, 3, H, W), the row's images in order
        n = (b['labels'][:, 1:] != data.IGNORE_INDEX).sum()
        loss = model(b['input_ids'], pixels=px, has_image=b['has_image'], labels=b['labels'], n_norm=n,
                     seq_lens=b.get('seq_lens'))
        grads = torch.autograd.grad(loss, lora)
        return loss, grads, n

    padded = data.collate(batch, pad_id=0)
    packed = data.pack(batch, pad_id=0)
    assert packed['input_ids'].shape == (1, sum(len(x['input_ids']) for x in batch))  # no padding at all
    assert padded['input_ids'].numel() > packed['input_ids'].numel()
    loss_a, grads_a, n_a = loss_and_grads(padded, packed=False)
    loss_b, grads_b, n_b = loss_and_grads(packed, packed=True)
    assert n_a == n_b
    assert torch.allclose(loss_a, loss_b, rtol=1e-5, atol=1e-6), (loss_a, loss_b)
    for ga, gb in zip(grads_a, grads_b):
        assert torch.allclose(ga, gb, rtol=1e-4, atol=1e-6)
    # the boundaries matter: the same row without seq_lens (one long causal sample) gives another loss
    with torch.no_grad():
        px = torch.stack([pixels['img0'], pixels['img2']])[None]
        whole = model(packed['input_ids'], pixels=px, has_image=packed['has_image'], labels=packed['labels'], n_norm=n_b)
    assert abs(whole.item() - loss_b.item()) > 1e-4


def test_packing_errors(tiny):
    model = tiny_llava(tiny)
    with pytest.raises(ValueError, match='one row'):
        model.lm(torch.zeros(2, 6, dtype=torch.long), seq_lens=(3, 3))
    with pytest.raises(ValueError, match='one row'):
        model.lm(torch.zeros(1, 6, dtype=torch.long), seq_lens=(3, 2))


def test_compiled_blocks_equal_eager_loss(tiny):
    model = tiny_llava(tiny)
    ids = torch.cat([torch.full((2, 16), IMAGE_TOKEN), torch.randint(3, 200, (2, 7))], 1)
    labels = torch.where(torch.arange(23) > 18, ids, data.IGNORE_INDEX)
    pixels = torch.randn(2, 3, 32, 32)
    eager = model(ids, pixels=pixels, labels=labels)
    g_eager = torch.autograd.grad(eager, [p for p in model.parameters() if p.requires_grad])
    for blk in model.lm.blocks:
        blk.compile()
    compiled = model(ids, pixels=pixels, labels=labels)
    g_compiled = torch.autograd.grad(compiled, [p for p in model.parameters() if p.requires_grad])
    assert torch.allclose(eager, compiled, rtol=1e-5), (eager, compiled)
    for a, b in zip(g_eager, g_compiled):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)
    # packed rows of other lengths through the same compiled blocks: each = its eager loss; past the first two (the
    # graphs after packed_attention's graph break meet a second length and turn dynamic), new lengths compile nothing
    # (they reach the attention as a tensor, whose values compiled code does not guard on)
    import torch._dynamo.utils as dyn
    graphs = []
    for lengths in ((9, 3, 14), (5, 11, 2), (1, 20, 7)):
        b = data.pack(items(16, lengths), pad_id=0)
        args = dict(pixels=torch.randn(1, 2, 3, 32, 32), has_image=b['has_image'], labels=b['labels'],
                    seq_lens=b['seq_lens'])
        got = model(b['input_ids'], **args)
        graphs.append(dyn.counters['stats']['unique_graphs'])
        with torch.compiler.set_stance('force_eager'):
            want = model(b['input_ids'], **args)
        assert torch.allclose(got, want, rtol=1e-5), (got, want)
    assert graphs[2] == graphs[1] > 0  # the third packing compiled nothing new


def test_qlora_equals_its_dequantized_reference():
    pytest.importorskip('torchao')
    torch.manual_seed(0)
    base = nn.Linear(128, 192, bias=False).requires_grad_(False)
    ref = LoRALinear(base, r=4, alpha=8)
    nn.init.normal_(ref.lora_B.weight, std=0.1)
    q = LoRALinear(nn.Linear(128, 192, bias=False), r=4, alpha=8)
    q.load_state_dict(ref.state_dict())
    q.base.requires_grad_(False)
    assert quantize_linears(q, 'nf4') == 1 and isinstance(q.base, NF4Linear)
    w = q.base.dequantized()
    assert 0 < (w - base.weight).abs().max() < 0.2 * base.weight.abs().max()  # 16 levels: close, not equal
    ref.base.weight.data.copy_(w)  # the reference: the same LoRA on the dequantised weight, in float32
    x = torch.randn(5, 7, 128, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    y_ref, y_q = ref(x), q(x2)
    assert torch.allclose(y_ref, y_q, atol=1e-5)
    g = torch.randn_like(y_ref)
    y_ref.backward(g)
    y_q.backward(g)
    assert torch.allclose(x.grad, x2.grad, atol=1e-5)
    for name in ('lora_A', 'lora_B'):
        assert torch.allclose(getattr(ref, name).weight.grad, getattr(q, name).weight.grad, atol=1e-5)
    assert q.base.weight.grad is None and not q.base.weight.requires_grad
    nbytes = sum(t.numel() * t.element_size() for t in (q.base.weight.quantized_data, q.base.weight.quantized_scalers))
    assert nbytes < base.weight.numel() * 4 / 7  # ~4.1 bits per weight against 32


def test_int8_linear_and_decoder(tiny):
    torch.manual_seed(0)
    lin = nn.Linear(64, 96)
    q = Int8Linear(lin)
    x = torch.randn(3, 5, 64)
    want = x @ q.dequantized().t() + lin.bias
    assert ((q(x) - want).abs().max() / want.abs().max()) < 1e-2  # bfloat16 activations
    assert (q.dequantized() - lin.weight).abs().max() <= 1.01 * lin.weight.abs().max() / 127  # half a step (+ bf16 scale)
    from model import Decoder
    lm = Decoder.from_pretrained(tiny['lm'])
    ids = torch.randint(3, 200, (2, 9))
    with torch.no_grad():
        want = lm.logits(lm(ids))
        quantize_int8(lm)
        got = lm.logits(lm(ids))
    assert sum(isinstance(m, Int8Linear) for m in lm.modules()) == 7 * 2 + 1  # every block linear and the head
    assert ((got - want).abs().max() / want.abs().max()) < 0.05
    assert lm.generate(ids, max_new_tokens=4).shape == (2, 4)


def test_train_py_packed_run_logs_the_padded_losses(tiny, shapes_json, tmp_path, monkeypatch):
    import json
    from test_train import base_args, losses, train
    logs = {}
    for name, kw in (('padded', {}), ('packed', dict(pack=True)), ('nf4', dict(quantize='nf4'))):
        if name == 'nf4':
            pytest.importorskip('torchao')
        out = tmp_path / name
        train(monkeypatch, *base_args(tiny, shapes_json, out, max_iters=3, eval_interval=3, **kw))
        logs[name] = [r for r in map(json.loads, open(out / 'log.jsonl')) if 'loss' in r]
    a, b = [r['loss'] for r in logs['padded']], [r['loss'] for r in logs['packed']]
    assert len(a) == 3 and max(abs(x - y) for x, y in zip(a, b)) < 1e-5, (a, b)
    assert all(abs(x - y) < 0.05 * x for x, y in zip(a, [r['loss'] for r in logs['nf4']]))  # 4-bit base: close
    rec = logs['packed'][-1]
    assert rec['grad_norm'] > 0 and rec['data_s'] >= 0 and rec['mem_gb'] > 0 and rec['tok_s'] > 0
    assert logs['packed'][-1]['tok_s'] > 0 and 'mfu' not in rec  # no MFU on a CPU unless peak_tflops is given
    with pytest.raises(SystemExit, match='pack=True needs a fusion'):
        train(monkeypatch, *base_args(tiny, shapes_json, tmp_path / 'x', pack=True, fusion='adem', peft='',
                                      lora_r=None, trainable=None))


def test_sample_cli_int8(tiny):
    import subprocess
    import sys
    from conftest import ROOT
    run = [sys.executable, 'sample.py', f'--model={tiny["lm"]}', '--template=qwen2', '--max_new_tokens=3', '--prompt=red']
    p = subprocess.run(run + ['--quantize=int8'], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and 'Traceback' not in p.stderr, p.stderr[-2000:]
    p = subprocess.run(run + ['--quantize=int4'], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode != 0 and "quantize must be '' or 'int8'" in p.stderr
