"""
Chat with / complete from a language model, or ask a trained VLM about an image, streaming the tokens.

  python sample.py --prompt="What is the capital of France?"            # offline SmolLM2, chat template
  python sample.py                                                       # interactive multi-turn chat
  python sample.py --model=Qwen/Qwen2-0.5B-Instruct --temperature=0.7
  python sample.py --chat=False --prompt="The three primary colours are"  # raw completion
  python sample.py --ckpt=out/easyvqa/ckpt.pt --image=shape.png --prompt="what color is the shape?"
  python sample.py --quantize=int8 --prompt="What is the capital of France?"  # int8 weights: faster CPU decoding
"""
import os
import sys

import torch

import data
from model import Decoder, quantize_int8, resolve

model = 'checkpoints/SmolLM2-135M-Instruct'  # hub id or folder of a language model
ckpt = ''                    # a train.py checkpoint: chat with that VLM instead (its config names the towers)
image = ''                   # image file for a VLM checkpoint
prompt = ''                  # '' = interactive
system = ''                  # '' = the template's default system prompt
template = ''                # '' = the model's own chat template
chat = True                  # False: raw completion of `prompt`, no template
max_new_tokens = 256
temperature = 0.0            # 0 = greedy
top_p = 0.9
seed = 1337
device = 'cpu'
dtype = 'float32'            # CPU decoding is memory-bound: float32 matvecs are faster than bfloat16 ones here
quantize = ''                # 'int8': the decoder's linears and head in int8, weight-only (model.quantize_int8; CPU);
                             # the greedy text may part from float32's after some tokens (bench.py decode measures it)
exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())

torch.manual_seed(seed)
ptdtype = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}[dtype]
if ckpt:
    import eval as evaluate
    import peft
    vlm, io, cfg = evaluate.load_vlm(ckpt, device=device, dtype=ptdtype)
    peft.merge(vlm)  # fold LoRA into the base weights: one matmul per linear while decoding
    tok, chat_template, image_cfg, n_image_tokens = io['tok'], io['template'], io['image_cfg'], io['n_image_tokens']
    image_slot = cfg.get('image_slot', data.IMAGE_PLACEHOLDER + '\n')  # how the checkpoint's prompts open
    system_used = system or io['system']  # the checkpoint's system prompt unless --system is given
    lm = vlm.lm
else:
    vlm, image_cfg, n_image_tokens = None, None, 0
    folder = resolve(model)
    lm = Decoder.from_pretrained(folder, dtype=ptdtype, device=device)
    tok = data.Tokenizer(folder)
    chat_template = data.pick_template(tok, template or None)
    system_used = system or None
if image and not ckpt:
    raise SystemExit("--image needs --ckpt (a trained VLM checkpoint)")
if quantize not in ('', 'int8'):
    raise SystemExit(f"quantize must be '' or 'int8', got {quantize!r}")
if quantize:
    quantize_int8(lm)  # after a VLM's LoRA merge: the merged weights are quantized
stop_ids = data.stop_ids(tok, chat_template)


def stream(ids, images=None, instruction=''):
    """Generate from prompt ids, printing text as it forms; returns the answer text. instruction: the user's text,
    for a fusion that reads it in its own tokenizer (InstructBLIP's Q-Former)."""
    x = torch.tensor([ids], device=device)
    kw = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, stop_ids=stop_ids)
    if vlm is not None:
        fusion_inputs = data.instruction_inputs(io['instruction_tok'], [instruction], device)
        steps = vlm.stream(x, **images, fusion_inputs=fusion_inputs, **kw)
    else:
        steps = lm.stream(x, **kw)
    out, shown = [], ''
    for t in steps:
        if int(t) in stop_ids:
            break
        out.append(int(t))
        text = tok.decode(out)
        if not text.endswith('\ufffd'):  # wait for the rest of a multi-byte character
            print(text[len(shown):], end='', flush=True)
            shown = text
    print()
    return tok.decode(out)


images = data.image_inputs(vlm, [image or None], image_cfg, device=device, dtype=ptdtype) if vlm is not None else None

if not chat:
    if not prompt:
        raise SystemExit("--chat=False needs --prompt")
    print(prompt, end='')
    stream(tok.encode(prompt, bos=tok.add_bos), images, instruction=prompt)
    sys.exit()

messages = []
while True:
    try:
        text = prompt if prompt else input('\n>>> ')
    except (EOFError, KeyboardInterrupt):  # Ctrl-D / Ctrl-C at the prompt ends the session
        print()
        break
    if not messages and image:  # the question as the checkpoint was trained on it: its question_prompt, image_slot
        text = image_slot + cfg.get('question_prompt', '{q}').format(q=text)
    messages.append(('user', text))
    ids = data.encode_prompt(tok, chat_template, messages, n_image_tokens=n_image_tokens, max_len=lm.cfg.max_seq_len,
                             system=system_used)
    messages.append(('assistant', stream(ids, images, instruction=text.replace(data.IMAGE_PLACEHOLDER, '').strip())))
    if prompt:
        break
