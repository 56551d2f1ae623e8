"""
Train a vision-language model: a vision tower, a fusion method (fusion.py) and a decoder LM with any
PEFT (peft.py), on one CPU or GPU, or many under torchrun (DDP or FSDP2). nanoGPT's shape: the
defaults below are globals, overridden by a config file and --key=value (configurator.py), then one loop.

  python train.py config/easyvqa_cpu.py             # offline default: easy-VQA, DINOv2-S + SmolLM2-135M, CPU
  python train.py config/llava_sqa.py --batch_size=4
  torchrun --standalone --nproc_per_node=8 train.py config/adem_sqa.py
  python train.py config/easyvqa_cpu.py --init_from=resume
"""

import json
import math
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_state_dict, set_optimizer_state_dict,
                                                     set_state_dict)
from tqdm import tqdm

import data
import eval as evaluate
import peft as peft_methods  # `peft` is a config key
from fusion import MODEL_KEYS, arch_keys, build_vlm, method_of
from model import atomic_save, load_checkpoint, remove_stale_temporaries

# -----------------------------------------------------------------------------
# config: LLaVA-1.5-style defaults with the offline weights; config/*.py hold whole recipes (the offline
# default job is config/easyvqa_cpu.py, each method's variant of it config/<method>_easyvqa_cpu.py)
# I/O
out_dir = 'out/easyvqa'
init_from = 'scratch'        # 'scratch': public weights + new fusion / PEFT; 'resume': continue out_dir/ckpt.pt;
                             # or another run's ckpt.pt: start from its trained weights (LLaVA's stage 1 -> stage 2)
overwrite = False            # 'scratch' into an out_dir that holds a ckpt.pt or log.jsonl: refused unless True
eval_interval = 250          # validation loss every this many steps (and a checkpoint)
eval_iters = 10              # batches in a validation-loss estimate
log_interval = 10
always_save_checkpoint = True
final_eval = True            # generate answers for the whole eval split when training ends and score them
eval_limit = 0               # score only the first N samples of the eval split (0 = all)
val_images = 0               # hold this many training images (every question on them) out of training
val_answers = 0              # at each evaluation, answer this many held-out questions (the eval split's without
                             # val_images) and report accuracy per question type in the bar and the log
wandb_log = False
wandb_project = 'vlm'
wandb_run_name = 'run'
# model
init_vision = 'checkpoints/dinov2-small-imgfocus'  # hub id or folder (python convert.py makes this one)
init_lm = 'checkpoints/SmolLM2-135M-Instruct'
fusion = 'llava'             # 'llava' | 'qformer' | 'flamingo' | 'mmca' | 'adem' | 'lavin' (fusion.py)
peft = ''                    # '' | 'lora' | 'ia3' | 'prompt_tuning' | 'llama_adapter' | 'bias_scale' | 'adapters'
                             # | 'clip_adapter' | 'maple' | 'head' | 'petal' (peft.py); several joined by '+'
                             # ('bias_scale+lora': LLaMA-Adapter v2's fine-tuning with its LoRA)
vision_layer = -1            # HF hidden_states index of the tower's output (-2: LLaVA's penultimate layer)
vision_norm = True           # apply the tower's final LayerNorm (DINOv2 last_hidden_state)
vision_feature = 'patch'     # projector input (LLaVA's select_feature): 'patch' (no CLS) | 'cls_patch' | 'cls' (CLS alone)
trainable = ()               # () = what the fusion and PEFT methods train by default; else exactly these name patterns
# Each method's own keys carry its name (build_vlm hands them to it); setting one of a method that is not chosen
# is an error. LoRA (peft = 'lora')
lora_r = 8
lora_alpha = 16
lora_dropout = 0.0
lora_targets = ('q', 'k', 'v', 'o', 'gate', 'up', 'down')  # bare: the decoder blocks' linears; dotted: path patterns
                             # on the VLM ('vision.' every tower linear, 'fusion.', 'lm.blocks.0.attn.q', 'vision.*.q')
lora_rslora = False          # scaling alpha / sqrt(r) instead of alpha / r (rsLoRA)
lora_dora = False            # DoRA: a trained magnitude per output row, W's direction from W + sBA
# IA3 (peft = 'ia3'): learned vectors, ones at init (peft's llama defaults)
ia3_targets = ('k', 'v', 'down')
ia3_feedforward = ('down',)  # those of ia3_targets that scale their input (the others scale their output)
# Prompt tuning (peft = 'prompt_tuning'): virtual tokens before the text
prompt_tuning_tokens = 20
prompt_tuning_init_text = ''  # '' = N(0, 1); else the embeddings of this text's tokens, repeated / cut to the count
# LLaMA-Adapter v1 (peft = 'llama_adapter'): gated prompts in the attention of the top layers
llama_adapter_tokens = 10    # prompt tokens per layer (official adapter_len)
llama_adapter_start = 2      # the first adapted block: all but the first 2 (official: top 30 of LLaMA-7B's 32)
# bias / scale tuning (peft = 'bias_scale'; LLaMA-Adapter v2's fine-tuning: + the LM's norms)
bias_scale_targets = ('q', 'o', 'gate', 'up', 'down')  # wq, wo, w1, w3, w2
# Bottleneck adapters (peft = 'adapters'; VL-Adapter)
adapters_reduction = 8       # bottleneck width = the LM's (tower's) width / this
adapters_vision = False      # also adapters in the tower's blocks (and its LayerNorms train)
# CLIP-Adapter (peft = 'clip_adapter'): residual MLP on every visual token before the fusion
clip_adapter_reduction = 4
clip_adapter_ratio = 0.2     # f' = ratio * MLP(f) + (1 - ratio) * f
# MaPLe (peft = 'maple'): coupled language / vision prompts in the first maple_depth LM and tower layers
maple_n_ctx = 2
maple_depth = 9
# head tuning (peft = 'head'; PETAL's baseline): the first FFN linear of the target's last layer
head_target = 'auto'         # 'auto' (the Q-Former if the fusion has one, else the LM) | 'qformer' | 'lm'
# PETAL (peft = 'petal'): mode approximation on q / k / v, per-layer scale / shift, 6 embedding experts
petal_target = 'auto'        # 'auto' (the Q-Former if the fusion has one, else the LM) | 'qformer' (the paper) | 'lm'
                             # (the LM's attention: our extension)
petal_rank = 64              # R: U (d -> R), V (R -> d), core C (R x R x R)
petal_dropout = 0.1          # on U x
petal_experts = 6
petal_expert_rank = 64
petal_batch_context = True   # the released code's cross-attention quirk (query 0 += 0.1 x the batch mean)
petal_ib = False             # + PETAL's information-bottleneck term (the authors' unreleased variant; peft.py)
# LLaVA-1.5 (fusion = 'llava')
llava_init = ''               # a llava-hf checkpoint (hub id / folder) whose projector loads ('' = a new one)
llava_standardize = False     # shift / scale each tower channel to mean 0, std 1 over the training images (then trained)
# DS-VisualChat (fusion = 'mmca')
mmca_attention = True        # False keeps its projection but uses plain causal attention
# Flamingo (fusion = 'flamingo')
flamingo_every = 1           # a gated cross-attention block before every n-th LM layer (OpenFlamingo-9B: 4)
# BLIP-2 Q-Former (fusion = 'qformer'; config/blip2_coco.py, config/minigpt4_coco.py)
qformer_init = ''            # '' = a new Q-Former; or a HF Blip2 checkpoint (hub id / folder) whose queries,
                             # Q-Former and ln_vision are loaded (its sizes must equal the four below)
qformer_dim = 768            # Q-Former width, layers, heads, queries (BLIP-2's: BERT-base, 32 queries)
qformer_layers = 12
qformer_heads = 12
qformer_queries = 32
# ADEM-VL (fusion = 'adem'; fusion.py, config/adem_sqa.py)
adem_scales = (256, 64)      # visual prompt tokens per scale: the patch grid as is (16x16) + avg-pooled to 8x8
adem_hidden = 128            # width of the low-rank projectors (official --hidden_proj)
adem_beta = 0.01             # scale of the projected visual prompts V
adem_alpha = 0.1             # scale of the FFN-side cross-attention output
adem_drop_ratio = 0.1        # fraction of each text token's lowest visual scores set to 0
adem_adapter_dim = 12        # bottleneck of the adapters in every vision-tower block (0 = none)
# LaVIN (fusion = 'lavin'; config/lavin_sqa.py)
lavin_temperature = 10.0     # softmax temperature of the modality routers (10; 5 in LaVIN's 13B script)
# data
dataset = 'easyvqa'          # 'easyvqa' | 'scienceqa' | 'vqav2' | 'coco' | 'llava' (conversation JSON)
                             # | 'interleaved' (image-text sequences, OpenFlamingo's format: data.read_interleaved)
data_root = ''               # dataset folder (or JSON file for 'llava', 'interleaved'); easy-VQA comes from its package
image_root = ''              # image folder when it is not under data_root
train_split = 'train'
eval_split = 'test'
image_size = 0               # 0 = the tower's preprocessor_config; else resize / crop to this size
image_resize = ''            # '' = the tower's way; 'crop' | 'squash' | 'pad' (LLaVA-1.5: pad to square with the mean colour)
image_norm = ''              # '' = the tower's mean / std; 'imagenet' | 'clip' | 'half' (data.IMAGE_NORMS)
image_augment = False        # training images through ADEM-VL's / BLIP's augmentation (data.augment_image), seeded
                             # by the stream position; evaluation never augments; the feature cache is then off
template = ''                # chat template name; '' = the LM's own (data.pick_template)
system_prompt = 'default'    # 'default' = the template's own; anything else verbatim ('' = an empty one)
question_prompt = '{q}\nAnswer the question using a single word or phrase.'  # VQA-style user turn (LLaVA-1.5)
caption_prompt = ''           # captioning user turn (COCO, Flickr30K, TextCaps; '' = data.CAPTION_PROMPT; PETAL: 'a photo of')
prompt_format = 'CQM-A'      # ScienceQA prompt layout (data.scienceqa_prompt)
eval_prompt_format = ''      # ScienceQA layout of evaluation prompts ('' = prompt_format; ADEM-VL: 'QCM-A')
eval_captions = ''           # ScienceQA captions.json whose captions join the context of evaluation prompts ('' = none)
image_slot = '<image>\n'     # how an image opens the first user turn; '<image>' is where its tokens go
no_image_slot = ''           # what opens a text-only sample's first user turn (ADEM-VL / LaVIN: 'Image: N/A ')
answer_prefix = ''           # text after the generation prompt of evaluation prompts (ADEM-VL: 'The answer is')
max_len = 512
max_new_tokens = 10
temperature = 0.0            # final evaluation: 0 = greedy, else sampling with nucleus top_p
top_p = 1.0
num_beams = 1                # final evaluation: > 1 = beam search (model.py; PETAL 5, OpenFlamingo 3), greedy otherwise
# optimization
batch_size = 16              # per process and micro-step: what fits in memory
global_batch = 0             # samples per optimizer step over all processes (0 = batch_size x processes); the
                             # micro-steps follow: grad_accum = global_batch / (batch_size x processes)
balance = False              # draw every question_type equally often (easy-VQA: yes/no is 74% of the questions)
epochs = 1.0
max_iters = 0                # > 0 overrides epochs
learning_rate = 1e-3
fusion_lr = 0.0              # > 0: the fusion's own learning rate (LLaVA's mm_projector_lr); 0 = learning_rate
min_lr = 0.0
warmup_ratio = 0.03          # linear warm-up over this fraction of the steps, then cosine to min_lr
warmup_iters = 0             # > 0: warm-up over this many steps instead of warmup_ratio
weight_decay = 0.0           # AdamW; never on 1-D parameters (norms, biases, gates) unless a fusion names what decays
beta1 = 0.9
beta2 = 0.999
grad_clip = 1.0              # 0 = off
max_bad_steps = 10           # non-finite losses tolerated (each skips its step) before stopping; the same
                             # bound for steps skipped because an image failed to decode
# system
device = 'auto'              # 'auto' | 'cpu' | 'cuda' | 'cuda:1' ...
dtype = 'auto'               # 'float32' | 'bfloat16' | 'float16' | 'auto' (bf16 on GPUs that have it, else fp32);
                             # frozen weights are stored in it, trained ones in fp32
fsdp = False                 # under torchrun: FSDP2 (fully_shard per block) instead of DDP
offload = False              # FSDP2 with the sharded parameters, gradients and optimizer state in CPU memory (the
                             # PyTorch counterpart of DeepSpeed ZeRO-3 offload: big models on small GPUs, slower)
sharded_checkpoint = False   # every rank writes its own shards (torch.distributed.checkpoint) and none gathers the
                             # model: for full fine-tunes under FSDP (7B: ~84 GB of weights + AdamW state)
grad_checkpoint = False      # activation checkpointing of every decoder and tower block: the same gradients, less
                             # memory, ~1.3x the compute (LLaVA's gradient_checkpointing; full fine-tunes)
cache_features_gb = 16.0      # the frozen tower's features once per image, kept in host memory up to this
                             # many GB per process (0 = off); images past the bound run through the tower each time
threads = 0                  # torch CPU threads (0 = torch's default)
# speed (bench.py train measures each against the plain run; tests/test_speed.py checks that each computes the same)
compile = False              # torch.compile every decoder and tower block (the first steps pay the compilation)
pack = False                 # padding-free packing: each micro-batch's samples end to end in one row, attention and
                             # positions kept inside each sample (data.pack); fusions that only splice input tokens
quantize = ''                # '' | 'nf4': the LM's frozen linears in 4-bit NF4 (QLoRA with peft='lora'; needs
                             # torchao; one process); trained weights and the rest stay as they are
tf32 = True                  # CUDA: float32 matmuls on TF32 tensor cores (Ampere and newer); bf16 runs are unaffected
peak_tflops = 0.0            # the accelerator's peak for the MFU in the log (0: 989 on an H100 / H200, 312 on other
                             # GPUs (A100 bf16); on a CPU no MFU unless given: FLOPs are counted from the shapes)
seed = 1337
config_keys = [k for k, v in globals().items() if not k.startswith('_') and isinstance(v, (int, float, bool, str, tuple))]
defaults = {k: globals()[k] for k in config_keys}
_renamed = {'cross_attn_every_n_layers': 'flamingo_every', 'router_temperature': 'lavin_temperature',  # configurator
            'cache_features': 'cache_features_gb (0 = off)',
            'grad_accum': 'global_batch (grad_accum follows from global_batch / (batch_size x processes))'}
exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())
config = {k: globals()[k] for k in config_keys}
chosen = (fusion, *peft_methods.names(config))
for k, v in config.items():  # e.g. lora_r=16 with peft='' would silently train without LoRA
    if method_of(k) not in (None, *chosen) and v != defaults[k]:
        raise SystemExit(f"config key {k}={v!r} belongs to {method_of(k)!r}, which this run does not use "
                         f"(fusion={fusion!r}, peft={peft!r})")
# -----------------------------------------------------------------------------
# processes, devices, precision

# the global batch fixes the optimisation (and the learning rate a recipe derives from it) on any number of
# processes; the micro-steps per optimizer step follow from it
world = int(os.environ.get('WORLD_SIZE', 1))
global_batch = global_batch or batch_size * world
grad_accum, rest = divmod(global_batch, batch_size * world)
if rest or not grad_accum:
    fits = [b for b in range(1, global_batch // world + 1) if global_batch % (b * world) == 0]
    raise SystemExit(f"global_batch={global_batch} is not a multiple of batch_size={batch_size} x {world} processes: "
                     + (f"set batch_size to one of {fits}" if fits else f"make global_batch a multiple of {world}")
                     + " (or change global_batch)")
if int(os.environ.get('RANK', 0)) == 0:
    print(f"batch: {global_batch} samples per step = {batch_size} per process x {grad_accum} micro-steps x {world} processes")

ddp = int(os.environ.get('RANK', -1)) != -1
if ddp:
    rank, local_rank, world = int(os.environ['RANK']), int(os.environ['LOCAL_RANK']), int(os.environ['WORLD_SIZE'])
    if device == 'auto':
        device = f'cuda:{local_rank}' if torch.cuda.is_available() else 'cpu'
    dist.init_process_group(backend='nccl' if device.startswith('cuda') else 'gloo')
    if device.startswith('cuda'):
        torch.cuda.set_device(device)
else:
    rank, local_rank, world = 0, 0, 1
    device = ('cuda' if torch.cuda.is_available() else 'cpu') if device == 'auto' else device
master = rank == 0
if threads:
    torch.set_num_threads(threads)
device_type = 'cuda' if device.startswith('cuda') else 'cpu'
if dtype == 'auto':  # CPUs without AVX-512 bf16 (like CI's) run bfloat16 matmuls slower than float32
    dtype = 'bfloat16' if device_type == 'cuda' and torch.cuda.is_bf16_supported() else 'float32'
config['dtype'] = dtype
ptdtype = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}[dtype]
if dtype == 'float16' and device_type == 'cpu':
    raise SystemExit("dtype='float16' on CPU runs at ~1 GFLOP/s; use 'bfloat16' or 'float32'")
autocast = nullcontext() if dtype == 'float32' else torch.autocast(device_type, dtype=ptdtype)
if device_type == 'cuda' and tf32:  # float32 matmuls and convolutions (e.g. a float32 run's) on TF32 tensor cores
    torch.backends.cuda.matmul.fp32_precision = torch.backends.cudnn.conv.fp32_precision = 'tf32'
if pack and fusion not in ('llava', 'qformer'):
    raise SystemExit(f"pack=True needs a fusion that only splices input tokens ('llava', 'qformer'); fusion={fusion!r} "
                     f"puts media or a prefix into the decoder")
if quantize not in ('', 'nf4'):
    raise SystemExit(f"quantize must be '' or 'nf4' (QLoRA), got {quantize!r}")
if quantize and ddp:
    raise SystemExit("quantize='nf4' runs in one process (DDP / FSDP would have to broadcast and shard NF4 tensors)")
torch.manual_seed(seed)  # the same on every rank while the new modules are initialised (FSDP does not broadcast)
if master:
    os.makedirs(out_dir, exist_ok=True)


def print0(*a):
    if master:
        tqdm.write(' '.join(str(x) for x in a))


# a progress bar on a terminal; in a log file (stdout or stderr not a terminal) plain lines every log_interval
tty = sys.stdout.isatty() and sys.stderr.isatty()
ckpt_file = os.path.join(out_dir, 'ckpt.pt')
if master:
    for name in remove_stale_temporaries(ckpt_file):
        print0(f"removed {os.path.join(out_dir, name)}: a checkpoint write that was killed midway")
# a new run never replaces an old one unasked: every rank checks, so that all of them stop
there = [f for f in ('ckpt.pt', 'log.jsonl') if os.path.exists(os.path.join(out_dir, f))]
if init_from != 'resume' and there:
    if not overwrite:
        try:
            what = f" (step {load_checkpoint(ckpt_file)['step']})" if 'ckpt.pt' in there else ''
        except ValueError:
            what = ' (unreadable)'
        raise SystemExit(f"{out_dir} already holds {' and '.join(there)}{what} from an earlier run; "
                         f"continue it with --init_from=resume, choose another out_dir, or pass --overwrite=True")
    if master and 'log.jsonl' in there:
        os.remove(os.path.join(out_dir, 'log.jsonl'))  # the new run's log starts empty; ckpt.pt is replaced at the first save
        print0(f"overwrite=True: the earlier run's {out_dir}/log.jsonl is deleted, its ckpt.pt replaced at the first save")

# -----------------------------------------------------------------------------
# model: public weights (frozen, stored in the compute dtype) + fusion / PEFT (trained, float32)


def check_resume_config(saved, given):
    """The architecture comes from the checkpoint: a model key or a method's key (fusion.arch_keys) that a config
    file or --key=value set (`given`, from configurator.py) to another value than the checkpoint's is an error."""
    bad = [f"{k}: checkpoint {saved.get(k, defaults[k])!r}, given {globals()[k]!r}" for k in given
           if (k in MODEL_KEYS or method_of(k)) and saved.get(k, defaults[k]) != globals()[k]]
    if bad:
        raise SystemExit(f"init_from='resume': {ckpt_path} was trained with another architecture than this config "
                         f"asks for:\n  " + '\n  '.join(bad) + "\ndrop these overrides, or train into a new out_dir")


ckpt = None
if init_from == 'resume':
    ckpt_path = ckpt_file
    if not os.path.exists(ckpt_path):
        raise SystemExit(f"init_from='resume' but {ckpt_path} does not exist")
    ckpt = load_checkpoint(ckpt_path)
    check_resume_config(ckpt['config'], _given)
    for k in arch_keys(ckpt['config']):  # the architecture comes from the checkpoint
        config[k] = globals()[k] = ckpt['config'][k]
elif init_from != 'scratch' and not os.path.isfile(init_from):
    raise SystemExit(f"init_from must be 'scratch', 'resume' or a train.py checkpoint file; {init_from!r} is none")
if offload and not fsdp:
    raise SystemExit("offload=True needs fsdp=True under torchrun (one GPU: torchrun --nproc_per_node=1 train.py ...)")
# offload: built in CPU memory, where FSDP2 keeps the shards (a 7B full fine-tune's fp32 master weights alone
# would not fit on a small GPU before sharding)
model = build_vlm(config, dtype=ptdtype, device='cpu' if offload else device)
model.lm.grad_checkpoint = model.vision.grad_checkpoint = grad_checkpoint
if quantize:  # QLoRA: LoRA (and whatever else trains) on top of NF4 base weights
    import model as model_lib
    print0(f"quantize: {model_lib.quantize_linears(model.lm, quantize)} frozen linears of the LM in {quantize}")
for p in model.parameters():
    if p.requires_grad:
        p.data = p.data.float()  # master weights of what trains stay in float32
if ckpt is not None and not ckpt.get('sharded'):
    peft_methods.load_trainable_state_dict(model, ckpt['model'], where=ckpt_path)
if init_from not in ('scratch', 'resume'):  # the earlier stage's trained weights; what it did not train stays new
    peft_methods.load_trainable_state_dict(model, load_checkpoint(init_from)['model'], where=init_from, partial=True)
torch.manual_seed(seed + rank)  # from here on (dropout), each rank draws its own numbers
n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
print0(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, {n_train / 1e6:.3f}M trainable")

io = data.prepare(config, model)
if pack and io['instruction_tok'] is not None:  # one packed row cannot carry each sample's own instruction
    raise SystemExit("pack=True cannot feed InstructBLIP's Q-Former one instruction per sample; set pack=False")
tok, chat, n_image_tokens = io['tok'], io['template'], io['n_image_tokens']

# -----------------------------------------------------------------------------
# data


def dataset_for(samples):
    return data.ConversationDataset(samples, tok, template=chat, n_image_tokens=n_image_tokens, max_len=max_len,
                                    system=io['system'])


train_samples = data.read_split(config, train_split)
eval_samples = data.read_split(config, eval_split, evaluation=True)
val_samples = eval_samples  # what val_answers scores: held-out training images when val_images > 0
if val_images:  # the last val_images distinct images and every question on them leave the training set
    held = set(list(dict.fromkeys(x for s in train_samples for x in data.image_list(s)))[-val_images:])
    is_held = [bool(set(data.image_list(s)) & held) for s in train_samples]
    val_samples = [s for s, h in zip(train_samples, is_held) if h]
    train_samples = [s for s, h in zip(train_samples, is_held) if not h]
    val_samples = [val_samples[i] for i in torch.randperm(len(val_samples), generator=torch.Generator().manual_seed(seed))]
# every distinct image, checked up front from its header (no decoding): all bad files at once, before any step
sources = list(dict.fromkeys(x for s in train_samples + eval_samples for x in data.image_list(s)))  # first-seen order
bad = [(x, why) for x in tqdm(sources, desc='checking images', disable=not (tty and master) or len(sources) < 2000)
       if (why := data.image_problem(x))]
if bad:
    names = [f"{data.image_name(x)}: {why}" for x, why in bad[:20]]
    raise SystemExit(f"{len(bad)} of {len(sources)} images cannot be read; nothing was trained:\n  " + '\n  '.join(names)
                     + (f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else '')
                     + "\nreplace them, or remove the samples that use them")
train_ds, eval_ds = dataset_for(train_samples), dataset_for(eval_samples)


def skips(ds):
    return f" (skipped {sum(ds.skipped.values())}: {', '.join(f'{k} {v}' for k, v in ds.skipped.items())})" if ds.skipped else ''


for ds, name, n in ((train_ds, train_split, len(train_samples)), (eval_ds, eval_split, len(eval_samples))):
    if len(ds) == 0:  # nothing to train on or to validate with: say why instead of dividing by zero later
        why = f"all {n} skipped ({', '.join(f'{k}: {v}' for k, v in ds.skipped.items())})" if n else \
            f"the {dataset} {name} split{f' in {data_root}' if data_root else ''} has no samples"
        hint = f"; max_len {max_len} < {n_image_tokens} visual tokens + prompt" if 'too_long' in ds.skipped else ''
        raise SystemExit(f"no {'training' if ds is train_ds else 'evaluation'} samples left: {why}{hint}")
print0(f"data: {len(train_ds)} train{skips(train_ds)} / {len(eval_ds)} eval samples{skips(eval_ds)}; "
       f"{n_image_tokens} visual tokens per image")
# the frozen tower's features, once per image, when no tower parameter trains (not under FSDP, whose
# sharded tower runs inside the model's forward)
feats_cache = data.FeatureCache(cache_features_gb * 2 ** 30) if cache_features_gb > 0 and not fsdp and \
    not image_augment and not any(p.requires_grad for p in model.vision.parameters()) else None


def image_inputs(images, loaded=None):
    return data.image_inputs(raw_model, images, io['image_cfg'], cache=feats_cache, device=device, dtype=ptdtype,
                             autocast=autocast, always=ddp and fsdp, loaded=loaded)


def image_args(b):
    return {k: b[k] for k in ('pixels', 'feats', 'has_image', 'fusion_inputs', 'seq_lens')}


def host_batch(ds, indices, positions=None):
    """The CPU side of a batch: collated tokens and the decoded, preprocessed images the cache lacks; a training
    batch (its stream positions given) augmented when image_augment is on, each sample seeded by its position."""
    b = (data.pack if pack else data.collate)([ds[i] for i in indices], pad_id=tok.pad_id)
    seeds = [seed * 1_000_000_007 + g for g in positions] if image_augment and positions is not None else None
    return b, data.load_pixels(b['images'], io['image_cfg'], cache=feats_cache, seeds=seeds)


def to_device(b, loaded):
    lens = b.get('seq_lens') or b['attention_mask'].sum(1).tolist()  # the real (not padding) tokens of each sample
    return dict(ids=b['input_ids'].to(device), labels=b['labels'].to(device), **image_inputs(b['images'], loaded),
                fusion_inputs=data.instruction_inputs(io['instruction_tok'], b['instructions'], device)  # InstructBLIP
                if 'instructions' in b else {},  # a packed row (pack=True) has none: refused with an instruction Q-Former
                seq_lens=b.get('seq_lens'), lens=lens)


def get_batch(ds, indices):
    return to_device(*host_batch(ds, indices))


# The sample stream is a pure function of (seed, step): epoch e visits a seeded permutation, and optimizer
# step s consumes the next batch_size x grad_accum x world samples (rank r takes its slice of each
# micro-batch). Resuming at step s therefore continues with exactly the data the run would have seen.
per_step = batch_size * grad_accum * world
steps_per_epoch = max(1, len(train_ds) // per_step)
max_steps = max_iters if max_iters > 0 else max(1, int(epochs * steps_per_epoch))
warmup_steps = warmup_iters if warmup_iters > 0 else int(warmup_ratio * max_steps)

_perms = {}


# balance: each 'epoch' of the stream instead draws len(train_ds) samples with replacement, weighted so that every
# question_type comes up equally often (easy-VQA's yes/no, 74% of its questions, would otherwise drown the rest).
types = [train_samples[j].get('question_type') for j in train_ds.keep] if balance else []
if balance and None in types:
    raise SystemExit(f"balance=True needs a question_type on every {dataset} sample; "
                     f"sample {train_samples[train_ds.keep[types.index(None)]]['id']} has none")
type_weight = {t: 1.0 / types.count(t) for t in set(types)}


def sample_index(g):
    """Train-set index of the g-th sample of the stream."""
    epoch, i = divmod(g, len(train_ds))
    if epoch not in _perms:
        _perms.clear()
        gen = torch.Generator().manual_seed(seed + epoch)
        _perms[epoch] = torch.multinomial(torch.tensor([type_weight[t] for t in types]), len(train_ds), replacement=True,
                                          generator=gen).tolist() if balance else \
            torch.randperm(len(train_ds), generator=gen).tolist()
    return _perms[epoch][i]


def host_step(step):
    base = step * grad_accum * batch_size * world
    positions = [[base + (m * world + rank) * batch_size + j for j in range(batch_size)] for m in range(grad_accum)]
    return [host_batch(train_ds, [sample_index(g) for g in pos], pos) for pos in positions]


# The CPU side of the next step (tokens, image decoding and preprocessing) runs in a thread while this step
# trains, so the accelerator does not wait on PIL; what a step gets is still a function of the step alone.
_prefetch, _ahead = ThreadPoolExecutor(max_workers=1), {}


def step_batches(step):
    work = _ahead.pop(step, None) or _prefetch.submit(host_step, step)
    if step + 1 < max_steps:
        _ahead[step + 1] = _prefetch.submit(host_step, step + 1)
    return [to_device(b, loaded) for b, loaded in work.result()]  # a decoding error surfaces here, at its step

# -----------------------------------------------------------------------------
# distributed wrapping, optimizer, schedule


raw_model = model
if compile:  # each block its own graph: the loop, the fusion's splice and the loss stay eager
    for blk in list(model.lm.blocks) + list(model.vision.blocks):
        blk.compile()
if ddp and fsdp:
    # FSDP2: every transformer block is a unit; the root holds the rest (embeddings, fusion, norms).
    # Trainable and frozen parameters may share a unit: FSDP2 shards per parameter.
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard
    kw = dict(mp_policy=MixedPrecisionPolicy(param_dtype=ptdtype, reduce_dtype=torch.float32),
              offload_policy=CPUOffloadPolicy(pin_memory=device_type == 'cuda') if offload else OffloadPolicy())
    for blk in list(model.lm.blocks) + list(model.vision.blocks):
        fully_shard(blk, **kw)
    fully_shard(model, **kw)
elif ddp:
    from torch.nn.parallel import DistributedDataParallel as DDP
    # find_unused_parameters: a trainable parameter may get no gradient in a step (a projector in a micro-batch
    # without images, e.g. ScienceQA's text-only questions; ADEM-VL's adapter in the last tower block, which a
    # penultimate-layer tower never runs): without it the gradient all-reduce goes out of step
    model = DDP(model, device_ids=[local_rank] if device_type == 'cuda' else None, find_unused_parameters=True)

named = [(n, p) for n, p in raw_model.named_parameters() if p.requires_grad]
params = [p for _, p in named]
# weight decay on every trainable matrix, or exactly on the parameters whose names contain one of the
# fusion's `decay_patterns` (Flamingo: its gated cross-attention blocks, gates and norms too, as OpenFlamingo)
patterns = getattr(raw_model.fusion, 'decay_patterns', None)
decays = {n: any(s in n for s in patterns) if patterns is not None else p.dim() >= 2 for n, p in named}
# one fused kernel over all parameters on CUDA; on a CPU (or offloaded) the foreach kernels, one call per op over
# the hundreds of small LoRA tensors instead of a Python loop over them (PyTorch picks foreach by itself on CUDA only)
fused = device_type == 'cuda' and not offload
if fusion_lr > 0 and learning_rate <= 0:
    raise SystemExit(f"fusion_lr={fusion_lr} follows the schedule as fusion_lr / learning_rate: learning_rate must be "
                     f"> 0, not {learning_rate}")
# fusion_lr: the fusion's parameters in groups of their own, at fusion_lr / learning_rate times the schedule's lr
own_lr = {n: fusion_lr > 0 and n.startswith('fusion.') for n, _ in named}
groups = [{'params': [p for n, p in named if decays[n] == d and own_lr[n] == o], 'weight_decay': weight_decay if d else 0.0,
           'lr_scale': fusion_lr / learning_rate if o else 1.0} for d in (True, False)
          for o in ((False, True) if fusion_lr > 0 else (False,))]
optimizer = torch.optim.AdamW([g for g in groups if g['params']], lr=learning_rate, betas=(beta1, beta2), fused=fused,
                              foreach=not fused)
scaler = torch.amp.GradScaler(device_type, enabled=dtype == 'float16')


def get_lr(step):
    """Linear warm-up, then half-cycle cosine to min_lr (per step)."""
    if step < warmup_steps:
        return learning_rate * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return min_lr + 0.5 * (learning_rate - min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


step, bad_steps, bad_image_steps, best_val = 0, 0, 0, float('inf')
last_acc = None  # the latest val_answers accuracies, shown in the bar
resumed_from = None
if ckpt is not None and ckpt.get('sharded'):  # every rank reads its shards (any world size: DCP reshards)
    msd, osd = get_state_dict(model, optimizer, options=StateDictOptions(ignore_frozen_params=True))
    dcp.load({'model': msd, 'optimizer': osd}, checkpoint_id=os.path.join(out_dir, ckpt['sharded']))
    set_state_dict(model, optimizer, model_state_dict=msd, optim_state_dict=osd,  # frozen weights: from their files
                   options=StateDictOptions(ignore_frozen_params=True, strict=False))
    msd = osd = None
elif ckpt is not None:
    set_optimizer_state_dict(model, optimizer, optim_state_dict=ckpt['optimizer'],  # not strict: a parameter that
                             options=StateDictOptions(full_state_dict=ddp, strict=False))  # never got a gradient has no state
if ckpt is not None:
    scaler.load_state_dict(ckpt['scaler'])
    step, bad_steps, best_val = ckpt['step'], ckpt['bad_steps'], ckpt['best_val']
    bad_image_steps, resumed_from = ckpt.get('bad_image_steps', 0), step
    torch.set_rng_state(ckpt['rng']['cpu'])
    if device_type == 'cuda' and ckpt['rng'].get('cuda') is not None:
        torch.cuda.set_rng_state(ckpt['rng']['cuda'])
    print0(f"resumed from {ckpt_path} at step {step}")
    ckpt = None  # free memory

# llava_standardize on a new projector: the frozen tower runs once over every training image, up front (into the
# feature cache when it is on), and each channel's mean and std there set the projector's input shift and scale
if llava_standardize and resumed_from is None and init_from == 'scratch':
    train_images = list(dict.fromkeys(x for j in train_ds.keep for x in data.image_list(train_samples[j])))
    total, total_sq, n = 0.0, 0.0, 0
    for k in tqdm(range(0, len(train_images), 256), desc='tower features', disable=not (tty and master)):
        x = image_inputs(train_images[k:k + 256])
        with torch.no_grad():  # no feature cache (e.g. FSDP): the tower runs here on pixels
            f = x['feats'] if x['feats'] is not None else raw_model.image_features(x['pixels'])
        f = raw_model.fusion.selected(f.float()).flatten(0, -2)  # (B, n, Dv) -> (B*n, Dv)
        total, total_sq, n = total + f.sum(0), total_sq + f.square().sum(0), n + len(f)
    mean = total / n
    std = (total_sq / n - mean.square()).clamp_min(1e-12).sqrt()
    with torch.no_grad():
        raw_model.fusion.in_shift.copy_(-mean)
        raw_model.fusion.in_scale.copy_(1 / (std + 1e-6))
    print0(f"llava_standardize: {len(train_images)} training images; channel std {std.min():.3g} to {std.max():.3g}")

# -----------------------------------------------------------------------------
# helpers: validation loss, checkpoint


def images_ok(make):
    """make() (a step's or a validation batch's inputs), or None when an image failed to decode on any rank
    (past a header that the up-front check passed, e.g. a truncated file): the caller skips that work."""
    try:
        out = make()
    except (data.BadImage, FileNotFoundError) as e:
        out = None
        tqdm.write(f"step {step}{f' (rank {rank})' if world > 1 else ''}: {e}")  # every rank names its file
    ok = torch.tensor(float(out is not None), device=device)
    if ddp:  # every rank skips together, or the collectives go out of step
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return out if ok.item() else None


@torch.no_grad()
def val_loss():
    model.eval()
    losses = []
    for k in range(eval_iters):
        idx = [(k * batch_size * world + rank * batch_size + j) % len(eval_ds) for j in range(batch_size)]
        b = images_ok(lambda: get_batch(eval_ds, idx))
        if b is None:
            continue  # a validation batch with an undecodable image is left out of the estimate
        with autocast:
            losses.append(model(b['ids'], labels=b['labels'], **image_args(b)).float())
    model.train()
    loss = torch.stack(losses).mean() if losses else torch.tensor(float('nan'), device=device)
    if ddp:
        dist.all_reduce(loss, op=dist.ReduceOp.AVG)
    return loss.item()


def save_checkpoint():
    """Trainable weights + optimizer + step + RNG + config, gathered to rank 0 (names without DDP / FSDP
    wrappers, so any setup can resume it), written to a temporary file and renamed: an interrupted write
    leaves the previous checkpoint intact. A sharded checkpoint (sharded_checkpoint) writes the weights and the
    optimizer into ckpt_sharded/step_N/ from every rank, and ckpt.pt, which names that folder, is renamed
    into place only after it: the step's shards are complete before anything points at them."""
    shards = None
    if sharded_checkpoint:
        msd, osd = get_state_dict(model, optimizer, options=StateDictOptions(ignore_frozen_params=True))
        shards = f'ckpt_sharded/step_{step:07d}'
        dcp.save({'model': msd, 'optimizer': osd}, checkpoint_id=os.path.join(out_dir, shards))
        msd = osd = None
    else:
        msd, osd = get_state_dict(model, optimizer, options=StateDictOptions(
            full_state_dict=True, cpu_offload=True, ignore_frozen_params=True))
    if not master:
        return
    state = dict(model=msd, optimizer=osd, sharded=shards, scaler=scaler.state_dict(), step=step, bad_steps=bad_steps,
                 bad_image_steps=bad_image_steps, best_val=best_val, data_pos=step * per_step, config=config,
                 rng={'cpu': torch.get_rng_state(), 'cuda': torch.cuda.get_rng_state() if device_type == 'cuda' else None})
    atomic_save(state, ckpt_file)
    for old in os.listdir(os.path.join(out_dir, 'ckpt_sharded')) if shards else ():  # the steps nothing points at
        if f'ckpt_sharded/{old}' != shards:
            shutil.rmtree(os.path.join(out_dir, 'ckpt_sharded', old))

# -----------------------------------------------------------------------------
# the loop


log_path = os.path.join(out_dir, 'log.jsonl')
if wandb_log and master:
    import wandb
    wandb.init(project=wandb_project, name=wandb_run_name, config=config)
print0(f"training: {max_steps} steps of {per_step} samples ({epochs if max_iters == 0 else max_steps / steps_per_epoch:.2f} epochs), "
       f"{device}, {dtype}, world {world}")


def git_commit():
    try:
        return subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=os.path.dirname(os.path.abspath(__file__)),
                              capture_output=True, text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


if master:  # a header record per run: a reader can tell runs apart and where a resume starts
    with open(log_path, 'a') as f:
        f.write(json.dumps(dict(run=dict(started=time.strftime('%Y-%m-%d %H:%M:%S'), git=git_commit(),
                                         resumed_from=resumed_from, max_steps=max_steps, world=world, config=config))) + '\n')


def val_accuracy():
    """Accuracy % of greedy answers to the first val_answers held-out questions, overall and per question_type."""
    if not val_answers:
        return None
    r = evaluate.run(raw_model, val_samples[:val_answers], io, task=dataset, features=image_inputs,
                     batch_size=batch_size * 4, max_new_tokens=max_new_tokens, autocast=autocast, rank=rank,
                     world=world, device=device, dtype=ptdtype, progress=False)
    return None if r is None else {('all' if k == 'accuracy' else k): v for k, v in r['metrics'].items()}


def validate_and_save():
    global best_val, last_acc
    if step % eval_interval == 0 or step == max_steps:
        v = val_loss()
        last_acc = val_accuracy() or last_acc
        print0(f"step {step}: val loss {v:.4f}" + (''.join(f", {k} {a:.1f}%" for k, a in last_acc.items()) if last_acc else ''))
        if master:
            with open(log_path, 'a') as f:
                f.write(json.dumps(dict(step=step, val_loss=v, **({'val_acc': last_acc} if last_acc else {}))) + '\n')
        best_val = min(best_val, v)
        if always_save_checkpoint or v <= best_val:
            save_checkpoint()


# -----------------------------------------------------------------------------
# what a step reports: real tokens / s, model FLOPs utilisation (FLOPs counted from the shapes, as PaLM's
# appendix B: 2 per multiply-add, attention over each sample's own length without the causal saving; frozen
# weights get no weight gradient), peak memory, gradient norm, and how long the step waited for its data


def linear_shapes(module):
    """(in x out, trains) of every linear layer under module (nn.Linear, Int8Linear, NF4Linear; LoRA's A and B)."""
    return [(m.in_features * m.out_features, any(p.requires_grad for p in m.parameters(recurse=False)))
            for part in (module if isinstance(module, list) else [module])  # T5's blocks: a list (encoder + decoder)
            for m in part.modules() if hasattr(m, 'in_features') and hasattr(m, 'out_features')]


lm_shapes, lm_cfg = linear_shapes(raw_model.lm.blocks), raw_model.lm.cfg
lm_macs, lm_train_macs = sum(n for n, _ in lm_shapes), sum(n for n, t in lm_shapes if t)
tower_macs = sum(n for n, _ in linear_shapes(raw_model.vision.blocks))
fusion_macs = sum(n for n, _ in linear_shapes(raw_model.fusion))
peak_flops = 1e12 * (peak_tflops or (0.0 if device_type == 'cpu' else 989.0 if any(
    g in torch.cuda.get_device_name(device) for g in ('H100', 'H200')) else 312.0))


def step_flops(batches):
    """FLOPs of one optimizer step on this process: decoder forward 2 x MACs x tokens + attention, backward twice
    that plus the weight gradients of what trains; the head on labelled tokens only; tower (when it ran: no cached
    features) and fusion counted forward only and forward + backward."""
    f = 0.0
    for b in batches:
        lens = b['lens']
        n_tok = sum(lens)
        attn = sum(4 * n * n for n in lens) * lm_cfg.n_layers * lm_cfg.n_heads * lm_cfg.head_dim  # QK^T and AV
        f += 3 * (2 * lm_macs * n_tok + attn) + 2 * lm_train_macs * n_tok
        f += 2 * 2 * lm_cfg.dim * lm_cfg.vocab_size * int((b['labels'][:, 1:] != data.IGNORE_INDEX).sum())
        n_img = int(b['has_image'].sum()) if b['has_image'] is not None else 0
        f += 6 * fusion_macs * n_img * n_image_tokens
        if b['pixels'] is not None:
            f += 2 * tower_macs * n_img * raw_model.vision.n_tokens(b['pixels'].shape[-1])
    return f


def peak_memory_gb():
    if device_type == 'cuda':
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # peak resident set (Linux: KiB)


model.train()
bar = tqdm(total=max_steps, initial=step, dynamic_ncols=True) if tty and master else None
t0, tokens_seen, flops_done = time.time(), 0, 0.0
while step < max_steps:
    lr = get_lr(step)
    for group in optimizer.param_groups:
        group['lr'] = lr * group.get('lr_scale', 1.0)
    t_data = time.time()
    batches = images_ok(lambda: step_batches(step))
    data_s = time.time() - t_data  # the prefetch thread's work this step waited for, plus the copy to the device
    if batches is None:  # skip the step (the stream stays a function of the step), count it, give up past the bound
        bad_image_steps += 1
        print0(f"step {step}: an image failed to decode, step skipped ({bad_image_steps}/{max_bad_steps})")
        if bad_image_steps > max_bad_steps:
            raise SystemExit(f"stopping: {bad_image_steps} steps with undecodable images (more than "
                             f"max_bad_steps={max_bad_steps}); the files are named above")
        step += 1
        if bar is not None:
            bar.update(1)
        validate_and_save()
        continue
    # normalise by the labelled tokens of the whole step (all micro-batches, all ranks), so that
    # accumulation and data parallelism give the same gradient as one big batch
    n_tok = torch.tensor(float(sum(int((b['labels'][:, 1:] != data.IGNORE_INDEX).sum()) for b in batches)), device=device)
    if ddp:
        dist.all_reduce(n_tok)
    total = torch.zeros((), device=device)
    for m, b in enumerate(batches):
        last = m == grad_accum - 1
        if ddp and not fsdp:
            model.require_backward_grad_sync = last  # set before the forward (nanoGPT, build-nanogpt #30)
        if ddp and fsdp:
            model.set_requires_gradient_sync(last)
        with autocast:
            loss = model(b['ids'], labels=b['labels'], n_norm=n_tok.clamp(min=1), **image_args(b)) * world  # ranks are averaged
        scaler.scale(loss).backward()
        total += loss.detach() / world
        tokens_seen += sum(b['lens']) * world
    flops_done += step_flops(batches) * world
    finite = torch.isfinite(total).float()
    if ddp:
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    if finite.item() == 0:  # skip the update, count it, and give up after max_bad_steps
        bad_steps += 1
        optimizer.zero_grad(set_to_none=True)
        print0(f"step {step}: non-finite loss, update skipped ({bad_steps}/{max_bad_steps})")
        if bad_steps > max_bad_steps:
            raise SystemExit(f"stopping: {bad_steps} non-finite losses (more than max_bad_steps={max_bad_steps}); "
                             f"try dtype='bfloat16' or 'float32', or a lower learning_rate")
    else:
        scaler.unscale_(optimizer)  # the norm is reported in any case; max_norm inf leaves every gradient as it is
        grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float('inf'))
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
    step += 1
    if ddp:
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
    if master:
        dt = time.time() - t0
        rec = dict(step=step, loss=round(total.item(), 6), lr=lr, tok_s=round(tokens_seen / dt, 1),
                   samples_s=round((step - (resumed_from or 0)) * per_step / dt, 2), time=round(dt, 2),
                   grad_norm=round(grad_norm.item(), 4) if finite.item() else None, data_s=round(data_s, 3),
                   mem_gb=round(peak_memory_gb(), 3))
        if peak_flops:  # over the whole run so far, the first steps' compilation included
            rec['mfu'] = round(flops_done / dt / (peak_flops * world), 4)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{lr:.2e}", samples_s=f"{rec['samples_s']:.1f}",
                            **{k: f"{a:.0f}%" for k, a in (last_acc or {}).items()},  # val_answers, per type
                            gnorm=f"{rec['grad_norm'] or float('nan'):.3f}", data=f"{data_s:.2f}s",
                            mem=f"{rec['mem_gb']:.1f}G", **({'mfu': f"{rec['mfu']:.1%}"} if 'mfu' in rec else {}))
        elif step % log_interval == 0 or step == max_steps:
            print0(f"step {step}/{max_steps}: loss {rec['loss']:.4f}, lr {lr:.2e}, {rec['samples_s']:.1f} samples/s, "
                   f"{rec['tok_s']:.0f} tok/s, "
                   f"grad norm {rec['grad_norm'] or float('nan'):.3f}, data wait {data_s:.2f} s, peak memory "
                   f"{rec['mem_gb']:.2f} GiB" + (f", MFU {rec['mfu']:.1%}" if 'mfu' in rec else '') + f", {dt:.1f} s")
        if finite.item() and (step % log_interval == 0 or step == max_steps):
            with open(log_path, 'a') as f:
                f.write(json.dumps(rec) + '\n')
            if wandb_log:
                wandb.log(rec)
    validate_and_save()
_prefetch.shutdown()
if bar is not None:
    bar.close()
if master and val_answers:  # the picture of the run: loss and per-type accuracy (plot.py; needs matplotlib)
    try:
        import plot
        plot.curves(log_path, os.path.join(out_dir, 'curves.png'))
        print0(f"wrote {os.path.join(out_dir, 'curves.png')}")
    except ImportError as e:
        print0(f"no curves.png: {e}")

# -----------------------------------------------------------------------------
# final evaluation: generate for the eval split and score it

if final_eval:
    samples = eval_samples[:eval_limit] if eval_limit else eval_samples
    result = evaluate.run(raw_model, samples, io, task=dataset, features=image_inputs, batch_size=batch_size * 4,
                          max_new_tokens=max_new_tokens, autocast=autocast, rank=rank, world=world, device=device,
                          dtype=ptdtype, temperature=temperature, top_p=top_p, num_beams=num_beams)
    if master:
        evaluate.print_table(result)
        with open(os.path.join(out_dir, f'eval_{eval_split}.json'), 'w') as f:
            json.dump(result, f, indent=1)
if ddp:
    dist.barrier()  # every rank's work is done and written
    if wandb_log and master:
        wandb.finish()
    sys.stdout.flush()
    sys.stderr.flush()
    # End without the interpreter's teardown: a finished FSDP run aborted there now and then ("terminate called
    # without an active exception", SIGABRT; likely the process group's gloo threads), destroy_process_group or not.
    os._exit(0)
