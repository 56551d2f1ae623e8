# BLIP-2 stage 2 (Li et al. 2023, "BLIP-2", arXiv 2301.12597) on COCO captions: a Q-Former (32 queries,
# BERT-base sizes, cross-attention to the image in every other layer) between a frozen CLIP ViT-L/14 and a
# frozen Vicuna-7B; ln_vision, the queries, the Q-Former and the projection into the LLM train on the LM
# loss of the captions. Hyperparameters: salesforce/LAVIS lavis/projects/blip2/train/pretrain_stage2.yaml
# (linear_warmup_cosine_lr, init_lr 1e-4, min_lr 1e-5, 2000 warm-up steps, weight_decay 0.05, batch 64 per
# GPU, 10 epochs, amp, 224 px; AdamW betas 0.9 / 0.999, no gradient clipping in LAVIS's runner).
#
# Where this differs from BLIP-2:
# - tower: CLIP ViT-L/14 at 224 px, penultimate layer, all 257 tokens, then ln_vision: LAVIS's clip_L
#   variant (23 of 24 blocks). BLIP-2's best models use EVA ViT-g/14 (39 of 40 blocks), which our ViT
#   does not implement;
# - LLM: Vicuna-7B v1.5 (BLIP-2 used OPT / FlanT5, which our decoder does not implement), 'plain' template:
#   [BOS] <image> "\n" caption prompt, then caption + "\n" (BLIP-2 stage 2: [queries] [BOS] caption "\n");
# - data: the COCO Karpathy train split only, one sample per caption (BLIP-2: 129M image-text pairs);
# - no stage 1: the Q-Former starts from BERT's random init, not from bert-base + ITC / ITM / ITG on 129M
#   images. On a 1408-wide tower (OpenCLIP ViT-g/14), qformer_init = 'Salesforce/blip2-itm-vit-g' starts
#   from BLIP-2's stage-1 Q-Former instead (see fusion.py, load_blip2);
# - LAVIS warms up linearly from 1e-6 and then decays the lr once per epoch; here the warm-up starts at 0
#   and the cosine is per step. LAVIS trains with random-resized crops; we squash to 224 (its eval transform).
#
# Data: LAVIS's coco_karpathy_{train,test}.json in data/coco (image paths relative to it: train2014/, val2014/).
#
# global_batch 512 = batch_size x micro-steps x GPUs (LAVIS's 64 per GPU on 8 GPUs):
#   8 x A100-80GB: torchrun --standalone --nproc_per_node=8 train.py config/blip2_coco.py   (64 x 1 x 8)
#   1 x A100-80GB: python train.py config/blip2_coco.py                                     (64 x 8 x 1)
# ~566k train captions / 512 = ~1,106 steps per epoch, ~11,060 for 10 epochs: LAVIS's 2,000 warm-up steps
# are a warm-up ratio of 0.18. Memory on one GPU: frozen bf16 weights 14 GB (LLM) + 0.6 GB (tower), 104.8M
# trainable parameters (fp32 + AdamW state: 1.7 GB), activations of 64 x ~70 tokens through the 7B LLM.
# Feature cache (host memory, per process): 257 x 1024 bf16 = 0.5 MB per image, 60 GB for COCO's 113K training
# images; the default cache_features_gb = 16 holds ~32K of them, the rest run through the tower each time.

out_dir = 'out/blip2_coco'
init_vision = 'openai/clip-vit-large-patch14'
init_lm = 'lmsys/vicuna-7b-v1.5'
fusion = 'qformer'
vision_layer = -2
vision_norm = False
image_size = 224
image_resize = 'squash'
template = 'plain'

qformer_init = ''
qformer_dim = 768
qformer_layers = 12
qformer_heads = 12
qformer_queries = 32
# trains its default set: ln_vision, queries, Q-Former, projection; tower and LLM frozen

dataset = 'coco'
data_root = 'data/coco'
train_split = 'train'
eval_split = 'test'
max_len = 128
max_new_tokens = 30          # LAVIS caption eval: max_len 30 (with 5 beams; we decode greedily)

batch_size = 64
global_batch = 512
epochs = 10.0
learning_rate = 1e-4
min_lr = 1e-5
warmup_ratio = 0.18          # 2,000 of ~11,060 steps
weight_decay = 0.05
beta1 = 0.9
beta2 = 0.999
grad_clip = 0.0
dtype = 'bfloat16'
eval_interval = 1000
