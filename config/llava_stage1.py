# LLaVA-1.5 stage 1, feature alignment (Liu et al. 2023; haotian-liu/LLaVA scripts/v1_5/pretrain.sh): only the
# mlp2x_gelu projector trains, on the 558K LAION / CC / SBU captions (blip_laion_cc_sbu_558k.json + its images),
# between a frozen CLIP ViT-L/14-336 (penultimate layer, 576 patch tokens) and a frozen Vicuna-7B v1.5, with the
# 'plain' template (the image, then the caption; no system prompt, no roles). Stage 2 is config/llava_stage2.py,
# which starts from this run's checkpoint (init_from).
#
# global_batch 256 = batch_size x micro-steps x GPUs (pretrain.sh: 32 per GPU on 8 GPUs):
#   8 x A100-80GB: torchrun --standalone --nproc_per_node=8 train.py config/llava_stage1.py   (32 x 1 x 8)
#   1 x A100-80GB: python train.py config/llava_stage1.py                                     (32 x 8 x 1)
# 558,128 captions / 256 = 2,180 steps (1 epoch), lr 1e-3 with 3% warm-up then cosine, no weight decay. Memory
# on one GPU: frozen bf16 weights 13.5 GB (Vicuna) + 0.6 GB (CLIP); 21M trainable; activations of 32 x ~620
# tokens through the frozen LLM (the backward still runs through it to reach the projector's input side).
# Feature cache: 577 x 1024 bf16 = 1.2 MB per image, 660 GB for 558K images: the default 16 GB holds 1.4%.

out_dir = 'out/llava_stage1'
init_vision = 'openai/clip-vit-large-patch14-336'
init_lm = 'lmsys/vicuna-7b-v1.5'
fusion = 'llava'             # trains its default set: the projector alone
vision_layer = -2
vision_norm = False
template = 'plain'

dataset = 'llava'
data_root = 'data/llava_pretrain/blip_laion_cc_sbu_558k.json'
image_root = 'data/llava_pretrain/images'
final_eval = False           # one JSON, no held-out split: the validation loss reads its first samples
max_len = 2048

batch_size = 32
global_batch = 256
epochs = 1.0
learning_rate = 1e-3
min_lr = 0.0
warmup_ratio = 0.03
weight_decay = 0.0
dtype = 'bfloat16'
eval_interval = 500
