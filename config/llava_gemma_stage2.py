# LLaVA-1.5 with Gemma-2B, stage 2 (the reproduction report's ablation; LLaVA-1.5's scripts/v1_5/finetune.sh
# otherwise): the stage-1 projector (config/llava_gemma_stage1.py, init_from its checkpoint) and the whole Gemma-2B-it
# train on the 665K mixture with Gemma's chat template, images padded to a square.
#
# global_batch 128 = batch_size x micro-steps x GPUs (finetune.sh):
#   8 x A100-80GB: torchrun --standalone --nproc_per_node=8 train.py config/llava_gemma_stage2.py   (16 x 1 x 8)
#   1 x A100-80GB: torchrun --standalone --nproc_per_node=1 train.py config/llava_gemma_stage2.py   (16 x 8 x 1)
#   1 x 24 GB GPU: torchrun --standalone --nproc_per_node=1 train.py config/llava_gemma_stage2.py \
#                      --offload=True --batch_size=4                                              (4 x 32 x 1)
# 665K conversations / 128 = 5,197 steps (1 epoch), lr 2e-5, 3% warm-up, cosine. A full fine-tune of 2.5B holds
# 2.5B x 16 bytes = 40 GB of weights, gradients and AdamW state: FSDP2 shards it (8 GPUs: 5 GB each), or on one
# small GPU offload=True keeps it in CPU memory (the report's DeepSpeed ZeRO-3 CPU offload, ~1 day there).

out_dir = 'out/llava_gemma_stage2'
init_from = 'out/llava_gemma_stage1/ckpt.pt'   # the stage-1 projector; the LLM starts from Gemma-2B-it
init_vision = 'openai/clip-vit-large-patch14-336'
init_lm = 'google/gemma-2b-it'
fusion = 'llava'
vision_layer = -2
vision_norm = False
image_resize = 'pad'
template = 'gemma'
trainable = ('fusion.', 'lm.')  # the projector and the whole LLM (the tower stays frozen)
fsdp = True
grad_checkpoint = True
sharded_checkpoint = True

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
