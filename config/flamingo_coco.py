# Flamingo (Alayrac et al. 2022) as OpenFlamingo builds its 9B model from LLaMA-7B (Awadalla et al. 2023;
# mlfoundations/open_flamingo): CLIP ViT-L/14 at 224 px (the last layer's 256 patch tokens, no CLS, without
# the final LayerNorm, as open_clip's output_tokens gave them then), a Perceiver Resampler (64 latents, depth
# 6) and a gated cross-attention block before every 4th LLaMA-7B layer (flamingo_every 4: 8
# blocks, OpenFlamingo-9B's value for LLaMA-7B and for MPT-7B). 1.18B parameters train (fusion.py, Flamingo).
# Task: COCO captions on the Karpathy split, in OpenFlamingo's text format ('flamingo' template):
#   <image>\nProvide a one-sentence caption for the provided image.{caption}<|endofchunk|>
# with "<|endofchunk|>" = LLaMA's eos, labels on the caption and eoc only.
#
# Hyperparameters from open_flamingo/train/train.py and the README's run command: AdamW lr 1e-4 held
# constant after a linear warm-up (lr_scheduler 'constant'; min_lr = learning_rate gives it here), 1875
# warm-up steps (the README run; train.py's default is 5000), weight decay 0.1 on the gated cross-attention
# blocks only (fusion.Flamingo.decay_patterns), gradient clipping 1.0, bf16 autocast ("amp_bf16"). The
# warm-up was set for OpenFlamingo's pretraining run of hundreds of thousands of steps; on COCO alone it spans
# 4 of the 10 epochs below.
#
# Data: LAVIS's coco_karpathy_{train,test}.json in data/coco next to COCO's train2014/ and val2014/ folders.
# Batch: 256 image-caption pairs per step = batch_size x micro-steps x GPUs, OpenFlamingo's README run
# (64 LAION pairs per GPU x 4 GPUs):
#   8 x A100-80GB: torchrun --standalone --nproc_per_node=8 train.py config/flamingo_coco.py   (32 x 1 x 8)
#   1 x A100-80GB: python train.py config/flamingo_coco.py                                     (32 x 8 x 1)
# 113,287 train images / 256 = 442 steps per epoch, 4,420 steps in all. Memory on one GPU: frozen bf16
# weights 14 GB + 1.18B trained parameters in fp32 with AdamW (16 bytes each) 19 GB + activations of 32 x
# ~50 tokens and 32 images. The tower's features are not cached: 113K images x 257 x 1024 in bf16 is 60 GB.
# LLaMA-2 works the same way: init_lm = 'meta-llama/Llama-2-7b-hf'.

out_dir = 'out/flamingo_coco'
init_vision = 'openai/clip-vit-large-patch14'
init_lm = 'huggyllama/llama-7b'
fusion = 'flamingo'
vision_layer = -1
vision_norm = False
flamingo_every = 4
template = 'flamingo'
# trains its default set: the resampler, the <image> embedding, the gated blocks in lm.blocks.*.pre

dataset = 'coco'
data_root = 'data/coco'
train_split = 'train'
eval_split = 'test'
max_len = 128
max_new_tokens = 20                # OpenFlamingo's captioning eval: max_generation_length 20
cache_features_gb = 0.0      # off: see above

batch_size = 32
global_batch = 256
epochs = 10.0
learning_rate = 1e-4
min_lr = 1e-4                      # constant after the warm-up
warmup_iters = 1875
weight_decay = 0.1
grad_clip = 1.0
dtype = 'bfloat16'
eval_interval = 500
