# LLaVA-1.5 on ScienceQA (Liu et al. 2023, "Improved Baselines with Visual Instruction Tuning"):
# CLIP ViT-L/14 at 336 px, penultimate layer, 576 patch tokens (no CLS), mlp2x_gelu projector,
# Vicuna-7B v1.5 with the vicuna_v1 template, images padded to a square with the CLIP mean colour.
# Training follows LLaVA's stage-2 LoRA script (scripts/v1_5/finetune_lora.sh: r 128, alpha 256,
# lr 2e-4, every LLM linear, cosine with 3% warm-up, bf16) on the ScienceQA train split, for the 12
# epochs of LLaVA's own ScienceQA fine-tune (scripts/finetune_sqa.sh). The projector starts from
# scratch here (no stage-1 captions), so it trains at the LoRA lr; LLaVA's script gives it 2e-5.
#
# Data: the public ScienceQA release (problems.json, pid_splits.json, images/) in data/scienceqa.
#
# global_batch 128 = batch_size x micro-steps x GPUs, as LLaVA-1.5 stage 2:
#   8 x A100-80GB: torchrun --standalone --nproc_per_node=8 train.py config/llava_sqa.py   (16 x 1 x 8)
#   1 x A100-80GB: python train.py config/llava_sqa.py                                     (16 x 8 x 1)
# 12,726 train problems / 128 = 99 steps per epoch, 1,188 steps in all. Memory on one GPU: frozen
# bf16 weights 14 GB + LoRA (320M params, fp32 + AdamW) 5 GB + activations of 16 x ~800 tokens.
# Full fine-tuning instead (LLaVA's 2e-5 recipe): trainable = ('fusion.', 'lm.'), peft = '',
# learning_rate = 2e-5, with --fsdp=True on 8 GPUs (7B x 16 bytes of weights + AdamW state).

out_dir = 'out/llava_sqa'
init_vision = 'openai/clip-vit-large-patch14-336'
init_lm = 'lmsys/vicuna-7b-v1.5'
fusion = 'llava'
vision_layer = -2
vision_norm = False
image_resize = 'pad'
template = 'vicuna_v1'

peft = 'lora'                 # trains the projector and the LoRA layers
lora_r = 128
lora_alpha = 256
lora_dropout = 0.05

dataset = 'scienceqa'
data_root = 'data/scienceqa'
train_split = 'train'
eval_split = 'test'
prompt_format = 'CQM-A'      # "Context: ...\nQuestion: ...\nOptions: (A) ... \nResponse:" -> "The answer is X."
max_len = 2048
max_new_tokens = 8

batch_size = 16
global_batch = 128
epochs = 12.0
learning_rate = 2e-4
min_lr = 0.0
warmup_ratio = 0.03
weight_decay = 0.0
grad_clip = 1.0
dtype = 'bfloat16'
eval_interval = 200
