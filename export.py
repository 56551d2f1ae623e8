"""
Export a train.py checkpoint to the Hugging Face formats, so that a tuned model leaves the project:

  python export.py --ckpt=out/x/ckpt.pt --to=peft --out=DIR    # the LM's LoRA: PeftModel.from_pretrained(base LM, DIR)
  python export.py --ckpt=out/x/ckpt.pt --to=hf --out=DIR      # the LM, updates merged: AutoModelForCausalLM
  python export.py --ckpt=out/x/ckpt.pt --to=llava --out=DIR   # tower + LLaVA projector + LM: LlavaForConditionalGeneration

The weights go out under HF names by inverting the loaders' key maps (model.lm_key_map, model.vit_key_map,
fusion.build_llava's), so a tensor leaves under the name it would load from. What a target cannot hold (a fusion
module inside the LM, a PEFT method that does not merge, a tower read in a way llava-hf cannot express) is refused
with an error that names it, before anything is written. The tower and the fusion are not part of an LM export;
their trained parameters are listed when they are left behind. Neither transformers nor peft is needed here.
"""

import json
import math
import os
import re
import shutil
import sys

import torch
import torch.nn as nn

import peft
from model import MLP, Attention, Block, Decoder, RMSNorm, ViT, ViTBlock, lm_key_map, read_config, resolve, vit_key_map

# -----------------------------------------------------------------------------
# Our parameters under HF names. A PEFT wrapper (LoRALinear: `base` + its own factors) that is merged counts as the
# layer it wraps: `blocks.0.attn.q.base.weight` is `blocks.0.attn.q.weight`, and its factors are folded in.

PLAIN = (Decoder, Block, Attention, MLP, RMSNorm, ViT, ViTBlock, nn.Linear, nn.Embedding, nn.LayerNorm, nn.Conv2d,
         nn.ModuleList, nn.Dropout, nn.Identity)  # the modules the HF architectures have
SEAMS = ('pre', 'attn_in', 'ffn_side', 'adapters')  # model.py's empty ModuleLists where methods plug in


def _unwrapped(module):
    """{name: wrapper} of the PEFT wrappers inside `module`: the modules that hold a `base` nn.Linear."""
    return {n: m for n, m in module.named_modules() if n and hasattr(m, 'base') and isinstance(m.base, nn.Linear)}


def check_plain(module, where, *, wrappers_ok=False):
    """Refuse any module the HF architecture lacks: a method's class (MMCA's attention, an adapter), a non-empty seam
    (Flamingo's cross-attention, ADEM-VL's side path), a PEFT wrapper that is not merged (unless wrappers_ok)."""
    wraps = _unwrapped(module)
    bad = []
    for n, m in module.named_modules():
        if any(n.startswith(w + '.') for w in wraps):
            continue  # a wrapper's own parts
        if n in wraps:
            if not (wrappers_ok or getattr(m, 'merged', False)):
                bad.append(f"{where}.{n} ({type(m).__name__}, not merged)")
        elif type(m) not in PLAIN:
            bad.append(f"{where}.{n} ({type(m).__name__})")
        elif isinstance(m, nn.ModuleList) and n.split('.')[-1] in SEAMS and len(m):
            bad.append(f"{where}.{n} ({', '.join(sorted({type(x).__name__ for x in m}))} in the {n.split('.')[-1]} seam)")
    if bad:
        raise ValueError(f"{where} holds modules that the Hugging Face architecture has no place for: "
                         + ', '.join(bad[:8]) + (f" ... ({len(bad)} in all)" if len(bad) > 8 else ''))


def plain_state(module):
    """Our parameter names -> tensors, with every merged wrapper's frozen layer under the wrapped layer's name (an
    unmerged one keeps its names, which no HF key map has)."""
    wraps = {n: m for n, m in _unwrapped(module).items() if getattr(m, 'merged', False)}
    out = {}
    for n, p in module.named_parameters():
        owner = next((w for w in wraps if n.startswith(w + '.')), None)
        if owner is None:
            out[n] = p.detach()
        elif n.startswith(owner + '.base.'):
            out[owner + n[len(owner) + 5:]] = p.detach()
    return out


def to_hf(state, key_map, where):
    """Invert a loader's key map (HF -> ours; a tuple: one fused HF tensor split on load, concatenated back)."""
    ours = {o for v in key_map.values() for o in (v if isinstance(v, tuple) else (v,))}
    extra = sorted(set(state) - ours)
    if extra:
        raise ValueError(f"{where}: {len(extra)} parameters have no Hugging Face name (a method the HF model cannot "
                         f"hold?): {', '.join(extra[:8])}")
    return {hf: torch.cat([state[o] for o in v]) if isinstance(v, tuple) else state[v] for hf, v in key_map.items()}


def lm_config(cfg):
    """The LM's HF config.json (a VLM folder's text_config), as the checkpoint's init_lm has it."""
    d = read_config(resolve(cfg['init_lm']))
    if 'text_config' in d and d.get('model_type') not in ('llama', 'mistral', 'qwen2', 'gemma', 'mpt'):
        d = dict(d['text_config'])
    if d.get('model_type') == 'mosaic_gpt':
        raise ValueError(f"init_lm {cfg['init_lm']}: MosaicGPT (MPT-1B's layout, QK LayerNorm) has no transformers "
                         f"architecture to export to")
    return d


def lm_hf_state(lm):
    """The LM's merged weights under HF names (lm_key_map inverted)."""
    check_plain(lm, 'lm')
    return to_hf(plain_state(lm), lm_key_map(lm.cfg), 'lm')


def left_behind(model, parts):
    names = [n for n, p in model.named_parameters() if p.requires_grad and n.split('.')[0] in parts]
    if names:
        print(f"not exported (not part of the LM): {len(names)} trained tensors of {' and '.join(parts)}, "
              f"e.g. {names[0]}")


def save(tensors, folder, name, dtype):
    from safetensors.torch import save_file
    save_file({k: v.to(dtype).contiguous() for k, v in tensors.items()}, os.path.join(folder, name),
              metadata={'format': 'pt'})


def copy_tokenizer(src, out):
    for f in ('tokenizer.json', 'tokenizer_config.json', 'special_tokens_map.json', 'tokenizer.model',
              'vocab.json', 'merges.txt', 'generation_config.json'):
        if os.path.exists(os.path.join(src, f)):
            shutil.copy(os.path.join(src, f), os.path.join(out, f))


def write_json(d, folder, name):
    with open(os.path.join(folder, name), 'w') as f:
        json.dump(d, f, indent=2)

# -----------------------------------------------------------------------------
# --to=peft: the LM's LoRA as a peft adapter folder (peft's save_pretrained layout: adapter_config.json +
# adapter_model.safetensors, keys base_model.model.<HF module>.lora_A.weight / lora_B.weight / lora_magnitude_vector).
# Reference: huggingface/peft src/peft/tuners/lora/config.py (the fields), utils/save_and_load.py (the key names).


def lora_modules(module):
    return {n: m for n, m in module.named_modules() if hasattr(m, 'lora_A') and hasattr(m, 'lora_B')}


def magnitude(m):
    """DoRA's magnitude vector (out,) of a LoRA module, or None: its own parameter whose name says 'magnitude'."""
    hits = [p for n, p in m.named_parameters() if 'magnitude' in n and not n.startswith('base.')]
    return hits[0] if hits else None


def export_peft(model, cfg, out, *, dtype=torch.float32):
    """Write `model.lm`'s LoRA factors as a peft adapter of the HF LM that cfg['init_lm'] names. rsLoRA from the
    checkpoint's config (lora_rslora: False when the checkpoint predates it, and every layer's scaling must agree);
    DoRA when the layers have a magnitude vector (and the config's lora_dora says so). Refused: LoRA outside the
    LM, LM parameters that train besides LoRA (a peft adapter holds only the factors: --to=hf), another PEFT
    wrapper or a fusion module inside the LM, a fused-qkv (MPT) layout."""
    lm, lcfg = model.lm, model.lm.cfg
    if lcfg.layout != 'llama':
        raise ValueError(f"--to=peft: a {lcfg.layout} LM fuses q, k, v into one HF Wqkv; LoRA on our separate q, k, v "
                         f"is not one peft LoRA on Wqkv (use --to=hf)")
    check_plain(lm, 'lm', wrappers_ok=True)
    outside = sorted(n for n in lora_modules(model) if not n.startswith('lm.'))
    if outside:
        raise ValueError(f"--to=peft: LoRA on {', '.join(outside[:4])} is not in the LM; a peft adapter of the LM "
                         f"cannot hold it (--to=llava merges a LLaVA tower's)")
    loras = lora_modules(lm)
    if not loras:
        raise ValueError("--to=peft: the checkpoint has no LoRA in its LM (peft does not include 'lora')")
    foreign = sorted(f"lm.{n} ({type(m).__name__})" for n, m in _unwrapped(lm).items() if n not in loras)
    if foreign:
        raise ValueError(f"--to=peft: {', '.join(foreign[:4])} is not LoRA; a peft LoRA adapter cannot hold it")
    others = [n for n, p in lm.named_parameters()
              if p.requires_grad and not re.search(r'(^|\.)(lora_A|lora_B)\.|magnitude', n)]
    if others:
        raise ValueError(f"--to=peft: the LM trains {len(others)} tensors besides LoRA (e.g. lm.{others[0]}); a peft "
                         f"adapter holds only the LoRA factors: export the merged LM with --to=hf")
    r, alpha = cfg.get('lora_r', 8), cfg.get('lora_alpha', 8)
    rslora, dora = bool(cfg.get('lora_rslora', False)), any(magnitude(m) is not None for m in loras.values())
    if dora != bool(cfg.get('lora_dora', False)):
        raise ValueError(f"--to=peft: the checkpoint's lora_dora={cfg.get('lora_dora', False)} but its LoRA layers "
                         f"{'have' if dora else 'lack'} a magnitude vector")
    hf_of = {ours.rsplit('.', 1)[0]: hf.rsplit('.', 1)[0] for hf, ours in lm_key_map(lcfg).items()
             if hf.endswith('.weight')}  # our module -> HF module
    tensors, names = {}, []
    for n, m in sorted(loras.items()):
        scaling = alpha / (math.sqrt(r) if rslora else r)
        if m.lora_A.weight.shape[0] != r or not math.isclose(m.scaling, scaling, rel_tol=1e-6):
            raise ValueError(f"--to=peft: lm.{n} has rank {m.lora_A.weight.shape[0]} and scaling {m.scaling}, not the "
                             f"config's lora_r={r}, lora_alpha={alpha}{' (rsLoRA)' if rslora else ''}")
        hf = hf_of[n]
        names.append(hf)
        key = f'base_model.model.{hf}'
        tensors[f'{key}.lora_A.weight'] = m.lora_A.weight.detach()
        tensors[f'{key}.lora_B.weight'] = m.lora_B.weight.detach()
        if dora:
            tensors[f'{key}.lora_magnitude_vector'] = magnitude(m).detach()
    # peft matches target_modules by name suffix: the suffixes when they hit exactly our layers, else the names
    suffixes = sorted({h.rsplit('.', 1)[-1] for h in names})
    hit = {h for h in hf_of.values() if h.rsplit('.', 1)[-1] in suffixes}
    targets = suffixes if hit == set(names) else '|'.join(re.escape(h) for h in sorted(names))
    drop = next((m.drop.p for m in loras.values() if isinstance(getattr(m, 'drop', None), nn.Dropout)), 0.0)
    os.makedirs(out, exist_ok=True)
    write_json(dict(peft_type='LORA', task_type='CAUSAL_LM', base_model_name_or_path=cfg['init_lm'], r=r,
                    lora_alpha=alpha, lora_dropout=drop, target_modules=targets, use_rslora=rslora, use_dora=dora,
                    bias='none', fan_in_fan_out=False, init_lora_weights=True, modules_to_save=None,
                    inference_mode=True), out, 'adapter_config.json')
    save(tensors, out, 'adapter_model.safetensors', dtype)
    return sorted(tensors)

# -----------------------------------------------------------------------------
# --to=hf: the LM with every update merged (peft.merge), as the HF folder it was loaded from: its config.json,
# model.safetensors under lm_key_map's names, its tokenizer files.


def export_hf(model, cfg, out, *, dtype=torch.float32):
    """Merge `model` (in place) and write its LM; returns the HF names written."""
    d = lm_config(cfg)
    peft.merge(model)
    state = lm_hf_state(model.lm)
    os.makedirs(out, exist_ok=True)
    write_json({**d, 'torch_dtype': str(dtype).split('.')[-1]}, out, 'config.json')
    save(state, out, 'model.safetensors', dtype)
    copy_tokenizer(resolve(cfg['init_lm']), out)
    return sorted(state)

# -----------------------------------------------------------------------------
# --to=llava: tower + projector + LM as a llava-hf folder (transformers models/llava: LlavaForConditionalGeneration,
# which takes the tower's hidden_states[vision_feature_layer], drops the CLS token for 'default' or keeps every token
# for 'full', and runs linear_1 -> act -> linear_2). What llava-hf cannot express is refused: another fusion,
# vision_norm=True (it never applies the tower's final LayerNorm), vision_feature='cls', an EVA tower. The image
# token is a new vocabulary row (zero embedding and head row: its logit is 0) unless image_token_id names an id
# the text never uses; the tokenizer learns '<image>' when its size is the LM's vocabulary.

LLAVA_TOWERS = {'clip': ('clip_vision_model', 'vision_model.'), 'siglip': ('siglip_vision_model', 'vision_model.'),
                'dinov2': ('dinov2', '')}  # our kind -> llava-hf's vision_config model_type, key prefix in the tower


def llava_problems(model, cfg):
    """What keeps this VLM out of llava-hf; [] when it fits."""
    why = []
    if cfg['fusion'] != 'llava':
        why.append(f"fusion={cfg['fusion']!r} (llava-hf holds the LLaVA projector only)")
    if model.vision.cfg.kind not in LLAVA_TOWERS:
        why.append(f"a {model.vision.cfg.kind} tower (llava-hf export covers {', '.join(LLAVA_TOWERS)})")
    if cfg['vision_norm']:
        why.append("vision_norm=True (llava-hf reads hidden_states, before the tower's final LayerNorm)")
    if cfg['fusion'] == 'llava' and model.fusion.select == 'cls':
        why.append("vision_feature='cls' (llava-hf selects 'default' = patches or 'full' = every token)")
    if model.lm.cfg.layout != 'llama':
        why.append(f"a {model.lm.cfg.layout} LM (llava export covers the LLaMA family)")
    return why


def export_llava(model, cfg, out, *, image_size, image_token_id=-1, dtype=torch.float32):
    """Merge `model` (in place) and write it; returns the HF names written. image_size: the side the checkpoint's
    images had (the position table is written at that size, as our tower interpolated it: llava-hf interpolates
    nothing)."""
    why = llava_problems(model, cfg)
    if why:
        raise ValueError("--to=llava: llava-hf cannot express " + '; '.join(why))
    d_text = lm_config(cfg)
    d_vis = read_config(resolve(cfg['init_vision']))
    kind = model.vision.cfg.kind
    vis_type, vis_prefix = LLAVA_TOWERS[kind]
    if 'vision_config' in d_vis and d_vis.get('model_type') != vis_type:
        d_vis = dict(d_vis['vision_config'])
    d_vis.update(model_type=vis_type, image_size=image_size, **({'vision_use_head': False} if kind == 'siglip' else {}))
    peft.merge(model)
    check_plain(model.vision, 'vision')
    lm = lm_hf_state(model.lm)
    vision = plain_state(model.vision)
    g = image_size // model.vision.cfg.patch_size
    vision['pos'] = model.vision.pos_embed(g, g).detach()  # at the images' size: what our tower computed
    vision = to_hf(vision, vit_key_map(model.vision.cfg), 'vision')
    if kind in ('clip', 'siglip'):  # nn.Embedding / (D,) parameters in HF, (1, N, D) / (1, 1, D) here
        vision['embeddings.position_embedding.weight'] = vision['embeddings.position_embedding.weight'][0]
    if kind == 'clip':
        vision['embeddings.class_embedding'] = vision['embeddings.class_embedding'].flatten()
    if kind == 'dinov2':  # HF's masked-image-modelling token: unused by llava-hf, written so that nothing is missing
        vision['embeddings.mask_token'] = torch.zeros(1, model.vision.cfg.dim)
    V = model.lm.cfg.vocab_size
    embed = lm['model.embed_tokens.weight']
    head = lm.pop('lm_head.weight', embed)
    if image_token_id < 0:  # a new row: the embedding is overwritten at every image position, the head row gives 0
        image_token_id, V = V, V + 1
        embed, head = (torch.cat([t, t.new_zeros(1, t.shape[1])]) for t in (embed, head))
    elif image_token_id >= V:
        raise ValueError(f"image_token_id={image_token_id} is outside the LM's vocabulary of {V}")
    lm['model.embed_tokens.weight'] = embed
    state = {f'model.vision_tower.{vis_prefix}{k}': v for k, v in vision.items()}
    state.update({f'model.language_model.{k[len("model."):]}': v for k, v in lm.items()})
    state['lm_head.weight'] = head  # written also when tied: both names hold the same values
    proj = {f'multi_modal_projector.linear_{i}.{w}': f'fc{i}.{w}' for i in (1, 2) for w in ('weight', 'bias')}
    state.update({f'model.{k}': v for k, v in to_hf(plain_state(model.fusion), proj, 'fusion').items()})
    n_tokens = model.fusion.n_tokens(model.vision.n_tokens(image_size))
    d_text['vocab_size'] = V
    config = dict(architectures=['LlavaForConditionalGeneration'], model_type='llava', vision_config=d_vis,
                  text_config=d_text, image_token_index=image_token_id, image_seq_length=n_tokens,
                  projector_hidden_act='gelu', multimodal_projector_bias=True, vision_feature_layer=cfg['vision_layer'],
                  vision_feature_select_strategy='default' if model.fusion.select == 'patch' else 'full',
                  tie_word_embeddings=bool(model.lm.cfg.tie_embeddings), torch_dtype=str(dtype).split('.')[-1])
    os.makedirs(out, exist_ok=True)
    write_json(config, out, 'config.json')
    save(state, out, 'model.safetensors', dtype)
    copy_tokenizer(resolve(cfg['init_lm']), out)
    add_image_token(out, image_token_id)
    return sorted(state)


def add_image_token(out, image_token_id):
    """'<image>' in the copied tokenizer.json as an added special token, when its next id is the image token's."""
    path = os.path.join(out, 'tokenizer.json')
    if not os.path.exists(path):
        return
    from tokenizers import AddedToken, Tokenizer
    tk = Tokenizer.from_file(path)
    if tk.token_to_id('<image>') is None and tk.get_vocab_size(with_added_tokens=True) == image_token_id:
        tk.add_special_tokens([AddedToken('<image>', special=True, normalized=False)])
        tk.save(path)
    if tk.token_to_id('<image>') != image_token_id:
        print(f"note: the tokenizer has no '<image>' at id {image_token_id}; put that id at the image positions")

# -----------------------------------------------------------------------------
# CLI


def main(argv):
    import eval as evaluate
    c = evaluate.configure(dict(
        ckpt='out/easyvqa/ckpt.pt',
        to='',                   # 'peft' | 'hf' | 'llava'
        out='',                  # output folder (created)
        dtype='float32',         # of the written tensors: 'float32' | 'bfloat16' | 'float16'
        image_token_id=-1,       # llava: -1 = a new vocabulary row; else an id the text never uses
    ), argv)
    if c['to'] not in ('peft', 'hf', 'llava') or not c['out']:
        raise SystemExit(f"--to must be 'peft', 'hf' or 'llava' (got {c['to']!r}) and --out a folder (got {c['out']!r})")
    dtype = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}[c['dtype']]
    model, io, cfg = evaluate.load_vlm(c['ckpt'])
    try:
        if c['to'] == 'peft':
            written = export_peft(model, cfg, c['out'], dtype=dtype)
            left_behind(model, ('vision', 'fusion'))
        elif c['to'] == 'hf':
            written = export_hf(model, cfg, c['out'], dtype=dtype)
            left_behind(model, ('vision', 'fusion'))
        else:
            ic = io['image_cfg']
            written = export_llava(model, cfg, c['out'], image_size=ic['size'] if ic['resize'] == 'squash'
                                   else ic['crop_size'], image_token_id=c['image_token_id'], dtype=dtype)
    except ValueError as e:
        raise SystemExit(f"{c['ckpt']}: {e}")
    print(f"wrote {c['out']} ({len(written)} tensors)")


if __name__ == '__main__':
    main(sys.argv[1:])
