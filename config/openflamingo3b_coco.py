# OpenFlamingo-3B (Awadalla et al. 2023; mlfoundations/open_flamingo README and src/factory.py): CLIP ViT-L/14 at
# 224 px (the last layer's 256 patch tokens, no CLS, no final LayerNorm, as config/flamingo_coco.py), a Perceiver
# Resampler (64 latents, depth 6) and a gated cross-attention block before EVERY layer of MPT-1B
# (flamingo_every=1, OpenFlamingo's cross_attn_every_n_layers, the README's value for the 3B model: 24 blocks).
# The LM is anas-awadalla/mpt-1b-redpajama-200b, the copy of mosaicml/mpt-1b-redpajama-200b OpenFlamingo loads:
# MosaicGPT (24 layers, 2048 wide, 16 heads, ALiBi, QK LayerNorm, no biases, tied head; model.py LMConfig.from_mpt),
# with the GPT-NeoX-20B tokenizer; "<|endofchunk|>" is the LM's eos ("<|endoftext|>") here (fusion.py, Flamingo).
# model.py reads safetensors only: if the hub snapshot holds only pytorch_model.bin, write model.safetensors next to
# it once (safetensors.torch.save_file of its state dict) and point init_lm at that folder.
# Task: COCO captions on the Karpathy split, in OpenFlamingo's text format ('flamingo' template):
#   <image>\nProvide a one-sentence caption for the provided image.{caption}<|endofchunk|>
#
# Hyperparameters as config/flamingo_coco.py (open_flamingo/train/train.py and the README run): AdamW lr 1e-4,
# constant after 1875 warm-up steps, weight decay 0.1 on the gated blocks only, clipping 1.0, bf16 autocast.
# Evaluation as OpenFlamingo's captioning eval: beam search with 3 beams, at most 20 new tokens
# (open_flamingo/eval/evaluate.py: num_beams 3, max_generation_length 20).
#
# Data: LAVIS's coco_karpathy_{train,test}.json in data/coco next to COCO's train2014/ and val2014/ folders.
# Batch: 256 image-caption pairs per step = batch_size x micro-steps x GPUs:
#   8 x A100-40GB: torchrun --standalone --nproc_per_node=8 train.py config/openflamingo3b_coco.py   (32 x 1 x 8)
#   1 x A100-80GB: python train.py config/openflamingo3b_coco.py                                      (32 x 8 x 1)
# 113,287 train images / 256 = 442 steps per epoch, 4,420 steps in all. Trained parameters: the resampler and
# 24 gated blocks of width 2048 (OpenFlamingo-3B: 1.05B trainable); frozen bf16 weights ~3.3 GB.

out_dir = 'out/openflamingo3b_coco'
init_vision = 'openai/clip-vit-large-patch14'
init_lm = 'anas-awadalla/mpt-1b-redpajama-200b'
fusion = 'flamingo'
vision_layer = -1
vision_norm = False
flamingo_every = 1
template = 'flamingo'
# trains its default set: the resampler, the <image> embedding, the gated blocks in lm.blocks.*.pre

dataset = 'coco'
data_root = 'data/coco'
train_split = 'train'
eval_split = 'test'
max_len = 128
max_new_tokens = 20                # OpenFlamingo's captioning eval: max_generation_length 20
num_beams = 3                      # and num_beams 3
cache_features_gb = 0.0      # off: 113K images x 257 x 1024 in bf16 is 60 GB

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
