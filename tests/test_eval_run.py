"""eval.py's model-running half on tiny stand-ins: batched KV-cache generation equals one-by-one generation,
each task's scorer is wired to the generated text, and the CLI scores a train.py checkpoint."""
import json
import subprocess
import sys

import pytest
import torch

import data
import eval as evaluate
import metrics
from conftest import ROOT, shape_image
from fusion import build_vlm

pytest.importorskip('transformers')


def config(tiny, **kw):
    cfg = dict(init_vision=tiny['clip'], init_lm=tiny['lm'], fusion='llava', vision_layer=-2, vision_norm=False,
               vision_feature='patch', lora_r=0, trainable=('fusion.',), image_size=0, image_resize='',
               template='qwen2', system_prompt='default')
    cfg.update(kw)
    return cfg


@pytest.fixture(scope='module')
def vlm(tiny):
    torch.manual_seed(0)
    model = build_vlm(config(tiny)).eval()
    with torch.no_grad():  # a projector large enough that the image changes what is generated
        model.fusion.fc2.weight.mul_(30)
    return model, data.prepare(config(tiny), model)


@pytest.fixture(scope='module')
def coco(tmp_path_factory):
    root = tmp_path_factory.mktemp('coco')
    entries = []
    for i, (color, shape) in enumerate([('red', 'circle'), ('blue', 'square'), ('green', 'circle'), ('red', 'square'),
                                        ('blue', 'circle')]):
        shape_image(root / f'{i}.png', color, shape)
        entries.append({'image': f'{i}.png', 'image_id': i, 'caption': [f'a {color} {shape}.', f'the {shape} is {color}']})
    (root / 'coco_karpathy_test.json').write_text(json.dumps(entries))
    return root


def test_batched_generation_equals_one_by_one(vlm, coco):
    model, io = vlm
    samples = data.read_coco_karpathy(coco / 'coco_karpathy_test.json', image_root=coco, prompt='what is it?')
    samples[1]['messages'][0] = ('user', '<image>\nwhat is it? describe the image in detail please')  # ragged lengths
    one = evaluate.run(model, samples, io, task='coco', batch_size=1, max_new_tokens=6, progress=False)
    many = evaluate.run(model, samples, io, task='coco', batch_size=4, max_new_tokens=6, progress=False)
    assert [p['text'] for p in one['predictions']] == [p['text'] for p in many['predictions']]
    assert len({p['text'] for p in one['predictions']}) > 1  # the images matter
    assert set(one['metrics']) == {'BLEU-1', 'BLEU-2', 'BLEU-3', 'BLEU-4', 'CIDEr', 'ROUGE-L'}
    # the metrics are the caption scorers applied to exactly these predictions
    cands = {p['id']: p['pred'] for p in one['predictions']}
    refs = {s['id']: s['answers'] for s in samples}
    assert one['metrics']['CIDEr'] == pytest.approx(100 * metrics.caption_scores(cands, refs)['CIDEr'])


def test_task_parsers_and_scorers():
    sqa = {'id': 'p', 'choices': ['a', 'b', 'c'], 'answer_index': 1, 'subject': 'natural science', 'hint': '',
           'has_image': True, 'grade': 'grade3', 'answers': ['B']}
    assert evaluate.parse_answer('scienceqa', 'The answer is B.', sqa) == 1
    assert evaluate.parse_answer('scienceqa', '(C) because', sqa) == 2
    assert evaluate.parse_answer('scienceqa', 'The answer is D.', sqa) == -1  # not an option: wrong
    assert evaluate.parse_answer('scienceqa', 'no idea', sqa) == -1
    m = evaluate.score('scienceqa', [sqa], [1])
    assert m['Avg'] == m['NAT'] == m['IMG'] == m['G1-6'] == 100
    # the prediction's number word becomes '2'; the human answers are not mapped ('two' stays 'two')
    vqa = {'id': 'q', 'answers': ['two'] * 3 + ['2'] * 2 + ['three'] * 5, 'answer_type': 'number'}
    assert evaluate.score('vqav2', [vqa], ['Two'])['overall'] == pytest.approx(100 * (8 * 2 / 3 + 2 * 1 / 3) / 10)
    vqa['answers'] = ['3'] * 4 + ['4'] * 6  # as in the VQA annotations, whose human answers are already digits
    assert evaluate.score('vqav2', [vqa], ['three'])['overall'] == pytest.approx(100.0)
    assert evaluate.score('easyvqa', [{'id': 'e', 'answers': ['circle']}], [' Circle.'])['accuracy'] == 100
    evqa = [{'id': str(i), 'answers': [a], 'question_type': data.easy_vqa_type(a)}
            for i, a in enumerate(['yes', 'no', 'no', 'circle', 'red', 'teal'])]
    assert evaluate.score('easyvqa', evqa, ['yes', 'yes', 'no', 'circle', 'red', 'gray']) == \
        pytest.approx({'accuracy': 100 * 4 / 6, 'yes/no': 100 * 2 / 3, 'shape': 100.0, 'colour': 50.0})


def test_eval_cli_on_a_checkpoint(tiny, shapes_json, tmp_path):
    p = subprocess.run([sys.executable, 'train.py', f'--init_vision={tiny["dinov2"]}', f'--init_lm={tiny["lm"]}',
                        '--dataset=llava', f'--data_root={shapes_json}', f'--out_dir={tmp_path}', '--template=qwen2',
                        '--max_iters=2', '--batch_size=4', '--eval_iters=1', '--final_eval=False', '--dtype=float32'],
                       cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]
    p = subprocess.run([sys.executable, 'eval.py', f'--ckpt={tmp_path / "ckpt.pt"}', '--limit=5', '--batch_size=2'],
                       cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]
    result = json.load(open(tmp_path / 'eval_test.json'))
    assert result['n'] == 5 and result['task'] == 'llava' and 'accuracy' in result['metrics']
    assert 'accuracy' in p.stdout


def test_sample_cli_ends_cleanly_on_ctrl_d(tiny):
    """Interactive sample.py: one turn, then end of input (Ctrl-D) ends the session without a traceback."""
    p = subprocess.run([sys.executable, 'sample.py', f'--model={tiny["lm"]}', '--template=qwen2', '--max_new_tokens=2'],
                       input='what color is the shape?\n', cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and 'Traceback' not in p.stderr, p.stderr[-2000:]
    assert p.stdout.count('>>> ') == 2  # the question, then the prompt that got the end of input


def test_generate_equals_full_forward_greedy(tmp_path):
    """generate (KV cache, LM head at the last position only, left-padded batch) gives exactly the tokens of a
    naive loop that reruns the whole unpadded prompt and takes the argmax of the full logits' last row."""
    import transformers as T
    from conftest import randomize
    from fusion import LLaVAProjector
    from model import IMAGE_TOKEN, VLM, Decoder, ViT
    torch.manual_seed(0)
    vcfg = T.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=32, patch_size=8)
    tcfg = T.LlamaConfig(vocab_size=120, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    randomize(T.CLIPVisionModel(vcfg).eval()).save_pretrained(tmp_path / 'clip')
    randomize(T.LlamaForCausalLM(tcfg).eval(), std=0.3).save_pretrained(tmp_path / 'lm')
    proj = randomize(LLaVAProjector(32, 64, select='patch'), std=0.3, seed=1)
    model = VLM(ViT.from_pretrained(tmp_path / 'clip'), Decoder.from_pretrained(tmp_path / 'lm'), proj,
                vision_layer=-2, vision_norm=False).eval()
    pixels = torch.randn(2, 3, 32, 32)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(1, 100, (n,), generator=g) for n in (3, 8)]  # ragged: row 0 is left-padded
    prompts = [torch.cat([p[:2], torch.full((16,), IMAGE_TOKEN), p[2:]]) for p in prompts]
    ids, mask = data.left_pad([p.tolist() for p in prompts], 0)
    stop = 7
    with torch.no_grad():
        fast = model.generate(ids, pad_mask=mask, pixels=pixels, max_new_tokens=6, stop_ids=[stop])
        for b, p in enumerate(prompts):
            seq, want = p[None], []
            for _ in range(fast.shape[1]):
                tok = int(model(seq, pixels=pixels[b:b + 1])[0, -1].argmax()) if not want or want[-1] != stop else stop
                want.append(tok)
                seq = torch.cat([seq, torch.tensor([[tok]])], 1)
            assert fast[b].tolist() == want
    assert fast[0].tolist() != fast[1].tolist()  # the rows differ, so the padded row was not a copy
