# LLaVA-1.5 with Gemma-2B, stage 1 (the reproduction report's ablation: Vicuna-7B swapped for Gemma-2B, the same
# two stages; LLaVA-1.5's scripts/v1_5/pretrain.sh otherwise): only the mlp2x_gelu projector (1024 -> 2048 -> 2048,
# 6.3M) trains on the 558K LAION / CC / SBU captions, between a frozen CLIP ViT-L/14-336 (penultimate layer, 576
# patch tokens) and a frozen Gemma-2B-it, with the 'plain' template. Stage 2 is config/llava_gemma_stage2.py.
#
# global_batch 256 = batch_size x micro-steps x GPUs (pretrain.sh):
#   8 x A100-80GB: torchrun --standalone --nproc_per_node=8 train.py config/llava_gemma_stage1.py   (32 x 1 x 8)
#   1 x A100-80GB: python train.py config/llava_gemma_stage1.py                                     (32 x 8 x 1)
#   1 x 24 GB GPU: python train.py config/llava_gemma_stage1.py --batch_size=8 --grad_checkpoint=True (8 x 32 x 1)
# 558,128 captions / 256 = 2,180 steps (1 epoch), lr 1e-3, 3% warm-up, cosine. Memory (arithmetic from the
# shapes): frozen bf16 weights 5.0 GB (Gemma-2B, 2.5B with its 256K-row embedding) + 0.6 GB (CLIP).

out_dir = 'out/llava_gemma_stage1'
init_vision = 'openai/clip-vit-large-patch14-336'
init_lm = 'google/gemma-2b-it'
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
