import json
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault('HF_HUB_OFFLINE', '1')  # tests never download
os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def randomize(model, std=0.2, seed=0):
    """Give every parameter of a freshly built HF model random values (HF's init leaves norms at 1,
    biases and layer scales at constants, which would hide mapping mistakes)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            base = 1.0 if p.dim() == 1 and ('norm' in name or 'lambda' in name) and 'gemma' not in type(model).__name__.lower() else 0.0
            p.copy_(base + std * torch.randn(p.shape, generator=g))
    return model


def rel_err(a, b):
    """max |a - b| / max |b|"""
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


# -----------------------------------------------------------------------------
# tiny stand-in checkpoints and datasets, written once per session (no downloads)

WORDS = ("what color is the shape circle square triangle red green blue yes no is there a in image "
         "Question Context Options Response The answer is A B C N/A which of these").split()


def _tiny_tokenizer(folder):
    """A byte-level BPE (SmolLM2 / Qwen2 shape) with ChatML special tokens, trained on a few sentences."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    corpus = [' '.join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))] * 3
    tk.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=300, show_progress=False, special_tokens=['<|endoftext|>', '<|im_start|>', '<|im_end|>'],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tk.save(str(folder / 'tokenizer.json'))
    (folder / 'tokenizer_config.json').write_text(json.dumps(
        {'bos_token': '<|im_start|>', 'eos_token': '<|im_end|>', 'pad_token': '<|endoftext|>', 'add_bos_token': False}))
    return tk.get_vocab_size()


def _preprocessor(folder, size, tower):
    mean, std = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)) if tower == 'clip' else \
        ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    (folder / 'preprocessor_config.json').write_text(json.dumps(
        {'size': {'shortest_edge': size}, 'crop_size': {'height': size, 'width': size}, 'do_center_crop': True,
         'image_mean': mean, 'image_std': std, 'resample': 3}))


@pytest.fixture(scope='session')
def tiny(tmp_path_factory):
    """Paths of tiny random checkpoints: 'clip' and 'dinov2' towers (32 px, patch 8: 16 patches) and a 2-layer
    LLaMA 'lm' with a byte-level tokenizer; built with transformers' save_pretrained."""
    import transformers as T
    torch.manual_seed(0)  # session fixtures are built before the per-test seed: seed here for the same weights
    root = tmp_path_factory.mktemp('tiny')
    towers = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8)
    T.CLIPVisionModel(T.CLIPVisionConfig(intermediate_size=64, **towers)).save_pretrained(root / 'clip')
    T.Dinov2Model(T.Dinov2Config(**towers)).save_pretrained(root / 'dinov2')
    _preprocessor(root / 'clip', 32, 'clip')
    _preprocessor(root / 'dinov2', 32, 'dinov2')
    (root / 'lm').mkdir()
    vocab = _tiny_tokenizer(root / 'lm')
    T.LlamaForCausalLM(T.LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                     bos_token_id=1, eos_token_id=2, pad_token_id=0)).save_pretrained(root / 'lm')
    return {k: str(root / k) for k in ('clip', 'dinov2', 'lm')}


COLORS = {'red': (220, 30, 30), 'green': (30, 200, 30), 'blue': (30, 30, 220)}


def shape_image(path, color, shape):
    from PIL import Image, ImageDraw
    img = Image.new('RGB', (32, 32), 'white')
    draw = ImageDraw.Draw(img)
    box = (6, 6, 26, 26)
    {'circle': draw.ellipse, 'square': draw.rectangle}[shape](box, fill=COLORS[color])
    img.save(path)
    return str(path)


@pytest.fixture(scope='session')
def shapes_json(tmp_path_factory):
    """A LLaVA-style conversation JSON of 6 images x 2 questions (colour, shape) with one-word answers."""
    root = tmp_path_factory.mktemp('shapes')
    entries = []
    for i, (color, shape) in enumerate([(c, s) for c in COLORS for s in ('circle', 'square')]):
        name = f'{i}.png'
        shape_image(root / name, color, shape)
        for q, a in (('what color is the shape?', color), ('what is the shape?', shape)):
            entries.append({'id': f'{i}-{q[5]}', 'image': name, 'conversations': [
                {'from': 'human', 'value': f'<image>\n{q}'}, {'from': 'gpt', 'value': a}]})
    (root / 'shapes.json').write_text(json.dumps(entries))
    return str(root / 'shapes.json')


@pytest.fixture(scope='session')
def sqa_root(tmp_path_factory):
    """A tiny ScienceQA in the public release layout: problems.json, pid_splits.json, images/{split}/{pid}/."""
    root = tmp_path_factory.mktemp('scienceqa')
    problems, splits = {}, {'train': [], 'val': [], 'test': []}
    for i in range(8):
        split = ('train', 'train', 'train', 'train', 'val', 'val', 'test', 'test')[i]
        pid = str(100 + i)
        with_image = i % 2 == 0
        if with_image:
            (root / 'images' / split / pid).mkdir(parents=True)
            shape_image(root / 'images' / split / pid / 'image.png', 'red', 'circle')
        problems[pid] = {'question': 'Which color is the circle?', 'choices': ['red', 'blue', 'green'][:2 + i % 2],
                         'answer': 0, 'hint': 'A circle.' if i % 3 == 0 else '', 'image': 'image.png' if with_image else None,
                         'task': 'closed choice', 'grade': f'grade{1 + i}', 'subject': 'natural science',
                         'topic': 'colors', 'category': 'c', 'skill': 's', 'lecture': 'Colors are seen.',
                         'solution': 'It is red.', 'split': split}
        splits[split].append(pid)
    (root / 'problems.json').write_text(json.dumps(problems))
    (root / 'pid_splits.json').write_text(json.dumps(splits))
    return str(root)
