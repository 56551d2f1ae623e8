# LaVIN-7B on ScienceQA (Luo et al. 2023, "Cheap and Quick: Efficient Vision-Language Instruction Tuning for
# Large Language Models"), as luogen1996/LaVIN scripts/finetuning_sqa_7b.sh: CLIP ViT-L/14 at 224 px (images
# squashed to 224 x 224, ImageNet mean / std, as LaVIN's util/datasets.py), frozen LLaMA-7B (the base model,
# no chat template: prompt + answer + EOS), Mixture-of-Modality Adaptation: a router adapter before the
# attention of every LLaMA and CLIP block, 6 CLS tokens through a 128-wide projector, a modality token.
# 3,781,296 trainable parameters (fusion.py, tests/test_fusion_lavin.py).
#
# Data: the public ScienceQA release (problems.json, pid_splits.json, images/) in data/scienceqa. Training
# text (QCM-ALE, no captions): "Image: <6 visual tokens> Question: ...\nContext: ...\nOptions: (A) .. (B) ..
# \nResponse:" -> "The answer is B. BECAUSE: {lecture} {solution}" (data.scienceqa_prompt).
# Evaluation as LaVIN's eval.py: sampling at temperature 0.1 with top_p 0.75, up to 64 new tokens, the
# letter after "The answer is"; a reply without one counts wrong (LaVIN picks a random option instead).
#
# global_batch 32 = batch_size x micro-steps x GPUs (LaVIN: 2 GPUs x 4 x accum 4); LaVIN's blr 9e-3 scaled
# by 32 / 256 gives lr 1.125e-3; 2 warm-up epochs of 20, then cosine to 0; AdamW (0.9, 0.95), wd 0.02 (not
# on biases and other 1-D parameters), no gradient clipping.
#   1 x A100-80GB: python train.py config/lavin_sqa.py                                        (8 x 4 x 1)
#   8 x A100:      torchrun --standalone --nproc_per_node=8 train.py config/lavin_sqa.py --batch_size=4
#                                                                                            (4 x 1 x 8)
#   LaVIN's own:   torchrun --standalone --nproc_per_node=2 train.py config/lavin_sqa.py --batch_size=4
#                                                                                            (4 x 4 x 2)
# 12,726 train problems / 32 = 397 steps per epoch, 7,940 steps in all. Memory on one GPU: frozen bf16
# weights ~14 GB; the routers sit in every layer, so activations of the whole LM and tower are kept for
# backward (~2-3 GB per 512-token sample in bf16 with SDPA): batch 8 fits in 80 GB, use batch 4 on 40 GB.
# Note the CLIP-side routing quirk LaVIN has (fusion.py): each image is routed by the first image of its batch.

out_dir = 'out/lavin_sqa'
init_vision = 'openai/clip-vit-large-patch14'
init_lm = 'huggyllama/llama-7b'   # LLaMA-7B (v1) in HF format, LaVIN's base model
fusion = 'lavin'
lavin_temperature = 10.0         # 5.0 in LaVIN's 13B instruction-tuning script
vision_norm = False              # LaVIN reads the CLS tokens without ln_post (the fusion picks the layers)
image_size = 224
image_resize = 'squash'          # Resize((224, 224), bicubic)
image_norm = 'imagenet'
template = 'base'                # no chat template: [BOS] prompt answer [EOS]
image_slot = 'Image: <image>'    # [modality] [BOS] "Image: " [6 visual tokens] prompt ...
no_image_slot = 'Image: N/A '    # ... or [modality] [BOS] "Image: N/A" prompt for text-only questions
# trains its default set: projector + modality embedding, the routers in every LLaMA / CLIP block

dataset = 'scienceqa'
data_root = 'data/scienceqa'
train_split = 'train'
eval_split = 'test'
prompt_format = 'QCM-ALE'
max_len = 512
max_new_tokens = 64
temperature = 0.1
top_p = 0.75

batch_size = 8
global_batch = 32
epochs = 20.0
learning_rate = 1.125e-3         # blr 9e-3 x 32 / 256
min_lr = 0.0
warmup_ratio = 0.1               # 2 of 20 epochs
weight_decay = 0.02
beta1 = 0.9
beta2 = 0.95
grad_clip = 0.0
dtype = 'bfloat16'
eval_interval = 400
