# LLaVA-1.5 stage 2, visual instruction tuning (haotian-liu/LLaVA scripts/v1_5/finetune.sh): the projector from
# stage 1 (config/llava_stage1.py, init_from its checkpoint) and the whole Vicuna-7B v1.5 train on the 665K
# mixture (llava_v1_5_mix665k.json: LLaVA-Instruct, VQAv2, GQA, OKVQA, OCR-VQA, A-OKVQA, TextCaps, RefCOCO, VG;
# images under data/llava_665k/{coco,gqa,ocr_vqa,textvqa,vg}), vicuna_v1 template, images padded to a square.
#
# global_batch 128 = batch_size x micro-steps x GPUs (finetune.sh: 16 per GPU on 8 GPUs, DeepSpeed ZeRO-3):
#   8 x A100-80GB: torchrun --standalone --nproc_per_node=8 train.py config/llava_stage2.py   (16 x 1 x 8, FSDP2)
# 665K conversations / 128 = 5,197 steps (1 epoch), lr 2e-5, 3% warm-up, cosine, no weight decay. A full
# fine-tune of 7B holds 7B x 16 bytes (bf16 weights for compute, fp32 master weights + AdamW) = 112 GB of state:
# it needs FSDP (fsdp=True shards it 14 GB per GPU on 8) and activation checkpointing (LLaVA's
# gradient_checkpointing), and it checkpoints sharded. It does not fit on one GPU; LLaVA's LoRA variant
# (finetune_lora.sh: peft='lora', lora_r=128, lora_alpha=256, learning_rate=2e-4) does, see config/llava_sqa.py.

out_dir = 'out/llava_stage2'
init_from = 'out/llava_stage1/ckpt.pt'   # the stage-1 projector; the LLM starts from Vicuna
init_vision = 'openai/clip-vit-large-patch14-336'
init_lm = 'lmsys/vicuna-7b-v1.5'
fusion = 'llava'
vision_layer = -2
vision_norm = False
image_resize = 'pad'
template = 'vicuna_v1'
trainable = ('fusion.', 'lm.')  # the projector and the whole LLM (the tower stays frozen)
fsdp = True
grad_checkpoint = True
sharded_checkpoint = True     # no rank gathers the 112 GB of state

dataset = 'llava'
data_root = 'data/llava_665k/llava_v1_5_mix665k.json'
image_root = 'data/llava_665k'
final_eval = False           # one JSON, no held-out split: the validation loss reads its first samples
max_len = 2048

batch_size = 16
global_batch = 128
epochs = 1.0
learning_rate = 2e-5
min_lr = 0.0
warmup_ratio = 0.03
weight_decay = 0.0
dtype = 'bfloat16'
eval_interval = 500
