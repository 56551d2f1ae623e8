# ADEM-VL on ScienceQA (Hao et al. 2024, arXiv 2410.17779), the official recipe: Hao840/ADEM-VL README's
# ScienceQA command (train.py, engine.py, util/datasets.py) and eval_sqa.py. 4.53M trainable parameters
# (fusion.py's ADEM-VL section); README: 94.01 average test accuracy with LLaMA-7B (paper: 93.85).
#
# Weights: CLIP ViT-L/14 at 224 px, and LLaMA-1 7B, the weights the official code loads (Meta's
# consolidated.00.pth); huggyllama/llama-7b is that checkpoint in Hugging Face format (safetensors +
# tokenizer.json). No chat template: prompt + answer + EOS ('base'). Data: the ScienceQA release
# (problems.json, pid_splits.json, images/) in data/scienceqa, plus its captions.json for evaluation.
#
#   1 x A100-80GB: python train.py config/adem_sqa.py                                  (2 x 16 micro-steps x 1)
#   8 x A100:      torchrun --standalone --nproc_per_node=8 train.py config/adem_sqa.py  (2 x 2 x 8, the README's)
# global_batch 32 = batch_size x micro-steps x GPUs, the micro-steps derived by train.py on any GPU count;
# lr = blr 9e-3 x 32 / 256 = 1.125e-3 stays right because the global batch does. 12,726 train problems / 32 =
# 397 steps per epoch, 7,940 steps in 20 epochs, the first 794 (2 epochs) warming up. A larger batch_size
# (fewer micro-steps) only runs faster where memory allows.
# Memory (estimated from the shapes, not measured): frozen bf16 weights 13.5 GB (LLaMA) + 0.6 GB (CLIP); the
# trained 4.53M in fp32 with AdamW ~70 MB; activations ~8 MB per token, as the backward runs through all 32
# LLaMA layers (the visual prompts enter every FFN) and 23 CLIP blocks (their adapters train). Samples are
# up to 512 tokens: batch_size 2 needs ~16-23 GB; on an 80 GB A100, --batch_size=8 (4 micro-steps, the same
# 32) runs faster in at most ~50 GB.
#
# Argparse defaults of the official train.py differ from the README command this follows: adapter_dim 8 (12
# here), blr 1e-3 (9e-3), weight_decay 0.05 (0.02). The official run keeps the frozen weights in fp16 with a
# GradScaler; bf16 here, as A100s have it: the same speed, no loss scaling or fp16 overflow to manage, at the
# cost of rounding LLaMA's fp16 weights to bf16 (7 mantissa bits instead of 10). --dtype=float16 follows the
# official precision (fp16 frozen weights, fp32 trained ones, GradScaler).
# The loss averages over the labelled tokens of each 32-sample step (the official code averages each
# micro-batch of 2, then the micro-batches).

out_dir = 'out/adem_sqa'
init_vision = 'openai/clip-vit-large-patch14'
init_lm = 'huggyllama/llama-7b'
fusion = 'adem'
vision_layer = -2            # the official tower runs 23 of its 24 blocks ...
vision_norm = True           # ... then ln_post on every token, no projection
image_resize = 'squash'      # Resize((224, 224), bicubic) ...
image_norm = 'imagenet'      # ... with the ImageNet mean / std (util/datasets.py), not CLIP's
template = 'base'            # [BOS] prompt answer [EOS], no chat roles
# trains its default set: projectors, e1, e2 + the CLIP adapters, every official '*adapter*'

adem_scales = (256, 64)      # --down_sample_num 256 64: 16x16 patches + 8x8 pooled = 320 visual prompts
adem_hidden = 128            # --hidden_proj
adem_alpha = 0.1
adem_beta = 0.01
adem_drop_ratio = 0.1
adem_adapter_dim = 12        # --adapter_dim 12 (the argparse default is 8)

dataset = 'scienceqa'
data_root = 'data/scienceqa'
train_split = 'train'
eval_split = 'test'
prompt_format = 'CQM-A'      # training: "Context: ...\nQuestion: ...\nOptions: (A) ... (B) ...\nResponse:"
                             # + "The answer is X." (no captions: the official train.py's --use_caption is off)
eval_prompt_format = 'QCM-A'  # eval_sqa.py: Question before Context ...
eval_captions = 'data/scienceqa/captions.json'  # ... and the image captions in the context ('' = without)
image_slot = 'Image: <image>'  # [BOS] "Image: " [CLS token] prompt ...
no_image_slot = 'Image: N/A '  # ... or [BOS] "Image: N/A" prompt for text-only questions
answer_prefix = 'The answer is'  # evaluation prompts end "...Response:The answer is"; one greedy token is the letter
max_len = 512
max_new_tokens = 1

batch_size = 2
global_batch = 32
epochs = 20.0
learning_rate = 1.125e-3     # blr 9e-3 x 32 / 256
min_lr = 0.0
warmup_ratio = 0.1           # 2 of 20 epochs, linear, then half-cycle cosine per step
weight_decay = 0.02          # not on 1-D parameters (biases): timm's param_groups_weight_decay
beta1 = 0.9
beta2 = 0.95
grad_clip = 0.0              # the official run does not clip
dtype = 'bfloat16'
eval_interval = 400          # about once per epoch: a validation loss and a checkpoint
