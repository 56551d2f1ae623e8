"""
Evaluation: run a model over a split (batched generation with the KV cache), parse the answers, score them
with the official metrics (metrics.py) and print a table. train.py calls `run` when training ends;
`python eval.py --ckpt=...` does the same for a checkpoint:
    python eval.py --ckpt=out/easyvqa/ckpt.pt --split=test
    python eval.py --ckpt=out/adem_sqa/ckpt.pt --data_root=data/scienceqa --split=test
"""

import json
import os
import re
import sys
from contextlib import nullcontext

import torch

import data
import peft
from metrics import (aokvqa_score, caption_scores, exact_match_accuracy, mmlu_accuracy, rouge_scores, scienceqa_accuracy,
                     scienceqa_table, vlstereoset_scores, vqa_score)

# -----------------------------------------------------------------------------
# Loading a checkpoint, generating, parsing, scoring


def load_vlm(path, device='cpu', dtype=torch.float32):
    """A train.py checkpoint -> (model in eval mode, data.prepare(...) dict, the checkpoint's config)."""
    from fusion import build_vlm
    from model import load_checkpoint
    ckpt = load_checkpoint(path)
    cfg = ckpt['config']
    model = build_vlm(cfg, dtype=dtype, device=device)
    if ckpt.get('sharded'):  # a full fine-tune's weights, written by every FSDP rank: read them all here
        import torch.distributed.checkpoint as dcp
        weights = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
        dcp.load({'model': weights}, checkpoint_id=os.path.join(os.path.dirname(path), ckpt['sharded']))
    else:
        peft.load_trainable_state_dict(model, ckpt['model'], where=path)
    return model.eval(), data.prepare(cfg, model), cfg


_LETTER = re.compile(r'The answer is \(?([A-Z])\b')


def parse_answer(task, text, sample):
    """Generated text -> what the task's scorer compares. ScienceQA: the option index after 'The answer
    is' (ADEM-VL / LaVIN regex), else a leading capital letter ('B', 'B.'), else -1 (counted wrong;
    LaVIN picks a random option instead, which makes its score non-deterministic)."""
    text = text.strip()
    if task == 'scienceqa':
        m = _LETTER.search(text) or re.match(r'\(?([A-Z])\b', text)
        i = ord(m.group(1)) - ord('A') if m else -1
        return i if 0 <= i < len(sample['choices']) else -1
    if task in ('aokvqa_mc', 'mmlu', 'vlstereoset'):  # the option letter ('B', '(B)', 'B. train'), else a choice's text
        m = _LETTER.search(text) or re.match(r'\(?([A-Z])\b', text)
        i = ord(m.group(1)) - ord('A') if m else -1
        if not 0 <= i < len(sample['choices']):
            i = next((k for k, c in enumerate(sample['choices']) if text.lower().rstrip('.') == c.lower()), -1)
        if task == 'aokvqa_mc':  # eval_predictions.py compares choice strings; None counts wrong
            return sample['choices'][i] if i >= 0 else None
        if task == 'vlstereoset':  # letter -> 0 stereotype / 1 anti-stereotype / 2 unrelated
            return sample['order'][i] if i >= 0 else -1
        return i
    return text


def score(task, samples, preds):
    """{metric: value} for the task; preds[i] answers samples[i]."""
    if task == 'scienceqa':
        problems = {s['id']: dict(answer=s['answer_index'], subject=s['subject'], hint=s['hint'],
                                  image=s['has_image'], grade=s['grade']) for s in samples}
        return scienceqa_accuracy({s['id']: p for s, p in zip(samples, preds)}, problems)
    if task == 'aokvqa_mc':
        return {'MC accuracy': aokvqa_score({s['id']: p for s, p in zip(samples, preds) if p is not None},
                                            {s['id']: s for s in samples}, multiple_choice=True)}
    if task == 'aokvqa_da':  # official: exact strings, no VQA normalisation; difficult_direct_answer left out
        return {'DA score': aokvqa_score({s['id']: p for s, p in zip(samples, preds)}, {s['id']: s for s in samples},
                                         multiple_choice=False)}
    if task == 'mmlu':
        return mmlu_accuracy({s['id']: p for s, p in zip(samples, preds)}, {s['id']: s['answer_index'] for s in samples},
                             {s['id']: s['subject'] for s in samples})
    if task == 'vlstereoset':
        return vlstereoset_scores({s['id']: p for s, p in zip(samples, preds)}, {s['id']: s['label'] for s in samples},
                                  {s['id']: s['bias_type'] for s in samples})
    if task in ('flickr30k', 'textcaps'):  # PETAL's caption table: CIDEr, ROUGE-1 F1 / recall, ROUGE-L recall
        cands, refs = {s['id']: p for s, p in zip(samples, preds)}, {s['id']: s['answers'] for s in samples}
        scores = {k: 100 * v for k, v in caption_scores(cands, refs).items() if k != 'per_image'}
        rouge = rouge_scores(cands, refs, multi_ref='mean')  # PETAL averages over the references
        scores.update({k: 100 * rouge[k] for k in ('ROUGE-1 F', 'ROUGE-1 R', 'ROUGE-L R')})
        return scores
    if task in ('vqav2', 'okvqa', 'textvqa'):
        return vqa_score({s['id']: p for s, p in zip(samples, preds)}, {s['id']: s['answers'] for s in samples},
                         {s['id']: s.get('answer_type') for s in samples} if all(s.get('answer_type') for s in samples) else None)
    if task == 'coco':
        scores = caption_scores({s['id']: p for s, p in zip(samples, preds)}, {s['id']: s['answers'] for s in samples})
        return {k: 100 * v for k, v in scores.items() if k != 'per_image'}
    scores = {'accuracy': exact_match_accuracy({s['id']: p for s, p in zip(samples, preds)},
                                               {s['id']: s['answers'][0] for s in samples})}
    for t in sorted({s['question_type'] for s in samples if s.get('question_type')}):  # easy-VQA: per type too
        of = [(s, p) for s, p in zip(samples, preds) if s.get('question_type') == t]
        scores[t] = exact_match_accuracy({s['id']: p for s, p in of}, {s['id']: s['answers'][0] for s, _ in of})
    return scores


@torch.inference_mode()
def run(model, samples, io, *, task, features=None, batch_size=32, max_new_tokens=10, autocast=nullcontext(),
        rank=0, world=1, device='cpu', dtype=torch.float32, progress=True, temperature=0.0, top_p=1.0,
        num_beams=1):
    """Generate an answer for every sample's prompt (its messages minus the final answer, then
    io['answer_prefix'], which the generated text continues and is not part of), batched with left padding
    and sorted by length, score them, and return {'task', 'n', 'metrics', 'predictions'}.
    Under DDP each rank generates a strided share; rank 0 gathers and scores (others get None). Under FSDP every
    block's forward is a collective, so the shares are padded to one length (repeats, discarded) and decoding
    goes on until every rank's rows are done: all ranks run the same forward passes.
    features(images) -> dict(pixels, feats, has_image): the caller's (cached) image pipeline.
    temperature 0 decodes greedily; > 0 samples (top_p: nucleus), e.g. LaVIN's 0.1 / 0.75; num_beams > 1: beam
    search (PETAL 5, OpenFlamingo 3)."""
    from tqdm import tqdm
    tok = io['tok']
    features = features or (lambda images: data.image_inputs(model, images, io['image_cfg'], device=device, dtype=dtype))
    mine = list(range(rank, len(samples), world))
    real = set(mine)  # the prompts this rank answers; the others are padding
    sharded = hasattr(model, 'unshard')  # FSDP2
    if sharded:  # every rank the same number of prompts, so the same number of batches
        mine += [mine[-1] if mine else 0] * (-(-len(samples) // world) - len(mine))
    prompts = {i: data.encode_prompt(tok, io['template'], samples[i]['messages'][:-1], io['n_image_tokens'],
                                     model.lm.cfg.max_seq_len - max_new_tokens, system=io['system'],
                                     answer_prefix=io.get('answer_prefix', '')) for i in set(mine)}
    mine.sort(key=lambda i: len(prompts[i]))
    all_done = None
    if sharded and world > 1:
        def all_done(done):  # stop decoding only when every rank's rows are done
            flag = done.all().float()
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
            return bool(flag.item())
    stop_ids = data.stop_ids(tok, io['template'])
    texts = {}
    was_training = model.training
    model.eval()
    if sharded:
        model.unshard()  # gather the root's parameters for the calls outside forward()
    tty = sys.stdout.isatty() and sys.stderr.isatty()  # in a log file: a plain line per tenth instead of a bar
    starts = range(0, len(mine), batch_size)
    for n, k in enumerate(tqdm(starts, disable=not progress or rank != 0 or not tty, desc=f'eval {task}',
                               dynamic_ncols=True)):
        if progress and rank == 0 and not tty and n % max(1, len(starts) // 10) == 0:
            print(f"eval {task}: {k}/{len(mine)} prompts", flush=True)
        idx = mine[k:k + batch_size]
        ids, mask = data.left_pad([prompts[i] for i in idx], tok.pad_id)
        with autocast:
            out = model.generate(ids.to(device), pad_mask=mask.to(device), max_new_tokens=max_new_tokens,
                                 stop_ids=stop_ids, temperature=temperature, top_p=top_p, num_beams=num_beams,
                                 all_done=all_done, **features([data.image_sources(samples[i]) for i in idx]),
                                 fusion_inputs=data.instruction_inputs(io.get('instruction_tok'),
                                                                       [data.instruction_text(samples[i]) for i in idx],
                                                                       device))
        for i, row in zip(idx, out.tolist()):
            if i not in real:
                continue
            cut = next((j for j, t in enumerate(row) if t in stop_ids), len(row))
            text = tok.decode(row[:cut])
            texts[i] = text.split('\n')[0] if io['template'] == 'plain' else text  # a merged newline token
    model.train(was_training)
    if sharded:
        model.reshard()
    if world > 1:
        gathered = [None] * world
        torch.distributed.all_gather_object(gathered, texts)
        texts = {k: v for g in gathered for k, v in g.items()}
    if rank != 0:
        return None
    preds = [parse_answer(task, texts[i], samples[i]) for i in range(len(samples))]
    return dict(task=task, n=len(samples), metrics=score(task, samples, preds),
                predictions=[dict(id=s['id'], text=texts[i], pred=p, answers=s['answers'])
                             for i, (s, p) in enumerate(zip(samples, preds))])


def print_table(result):
    m = result['metrics']
    if result['task'] == 'scienceqa':
        print(scienceqa_table(m))
    else:
        print(' | '.join(f'{k} {v:.2f}' for k, v in m.items()) + f"  ({result['n']} samples, {result['task']})")


# -----------------------------------------------------------------------------
# CLI: score a train.py checkpoint on a split


def main(argv):
    c = configure(dict(
        ckpt='out/easyvqa/ckpt.pt',
        split='',                # '' = the checkpoint's eval_split
        data_root='',            # '' = the checkpoint's
        limit=0,                 # score only the first N samples (0 = all)
        batch_size=32,
        max_new_tokens=0,        # 0 = the checkpoint's
        device='cpu',
        dtype='float32',
        out='',                  # result JSON ('' = next to the checkpoint)
    ), argv)
    ptdtype = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}[c['dtype']]
    model, io, cfg = load_vlm(c['ckpt'], device=c['device'], dtype=ptdtype)
    cfg.update(data_root=c['data_root'] or cfg['data_root'])
    split = c['split'] or cfg['eval_split']
    samples = data.read_split(cfg, split, evaluation=True)
    samples = samples[:c['limit']] if c['limit'] else samples
    autocast = nullcontext() if c['dtype'] == 'float32' else torch.autocast(c['device'].split(':')[0], dtype=ptdtype)
    feats_cache = {}  # one cache for the whole run: each test image (~2.4 questions) meets the tower once
    result = run(model, samples, io, task=cfg['dataset'], batch_size=c['batch_size'], autocast=autocast,
                 device=c['device'], dtype=ptdtype, max_new_tokens=c['max_new_tokens'] or cfg['max_new_tokens'],
                 temperature=cfg.get('temperature', 0.0), top_p=cfg.get('top_p', 1.0), num_beams=cfg.get('num_beams', 1),
                 features=lambda images: data.image_inputs(model, images, io['image_cfg'], cache=feats_cache, device=c['device'],
                                                           dtype=ptdtype, autocast=autocast))
    print_table(result)
    path = c['out'] or os.path.join(os.path.dirname(c['ckpt']), f"eval_{split}.json")
    with open(path, 'w') as f:
        json.dump(result, f, indent=1)
    print(f"wrote {path}")


def configure(defaults, argv):
    """`defaults` overridden by argv with configurator.py's rules (config files, --key=value, type checks,
    unknown keys rejected)."""
    scope, old = dict(defaults), sys.argv
    sys.argv = [old[0], *argv]
    try:
        exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read(), scope)
    finally:
        sys.argv = old
    return {k: scope[k] for k in defaults}


if __name__ == '__main__':
    main(sys.argv[1:])
