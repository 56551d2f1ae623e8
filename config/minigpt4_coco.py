# MiniGPT-4 (Zhu et al. 2023, arXiv 2304.10592; Vision-CAIR/MiniGPT-4 minigpt4/models/mini_gpt4.py), stage 1
# on COCO captions: BLIP-2's pretrained Q-Former with its 32 queries and ln_vision, all frozen, and one
# trainable Linear (llama_proj) from the Q-Former's 768-wide outputs to the LLM's width (768 -> 4096:
# 3.1M parameters) in front of a frozen Vicuna-7B. Hyperparameters: train_configs/minigpt4_stage1_pretrain.yaml
# (linear_warmup_cosine_lr, init_lr 1e-4, min_lr 8e-5, 5,000 warm-up steps, weight_decay 0.05, 4 epochs x
# 5,000 iterations = 20,000 steps, batch 64 per GPU on 4 A100s = 256, amp, 224 px).
#
# Stage 2 (minigpt4_stage2_finetune.yaml) fine-tunes the same projection on 3,500 curated image descriptions
# (cc_sbu_align): init_lr 3e-5, min_lr 1e-5, 200 warm-up steps, weight_decay 0.05, 5 epochs x 200 iterations,
# batch 12 on 1 A100, max_txt_len 160, prompts "###Human: <Img><ImageHere></Img> {instruction} ###Assistant: ".
# Not set up here: it needs cc_sbu_align converted to LLaVA JSON (dataset='llava') and a run that starts from
# stage 1's projection, which train.py's init_from ('scratch' | 'resume') does not offer.
#
# Where this differs from MiniGPT-4:
# - tower: MiniGPT-4 uses the Q-Former's own EVA ViT-g/14 (39 of 40 blocks, fp16), which our ViT does not
#   implement. The pretrained Q-Former cross-attends to 1408-wide features, so the tower must be 1408 wide:
#   OpenCLIP ViT-g/14 (laion, 40 blocks, 257 tokens at 224 px), penultimate layer. Its features are not EVA's,
#   so the frozen Q-Former reads a tower it was not trained on: expect lower quality than MiniGPT-4; training
#   the Q-Former too (trainable = ('fusion.',), the BLIP-2 recipe) adapts it;
# - Q-Former: Salesforce/blip2-flan-t5-xxl, the Hugging Face conversion of the blip2_pretrained_flant5xxl.pth
#   that MiniGPT-4 loads (only query_tokens, qformer.* and ln_vision = vision_model.post_layernorm are read;
#   the hub id downloads the whole checkpoint, a folder with just those tensors and config.json also works);
# - LLM: Vicuna-7B v1.5 (MiniGPT-4: Vicuna v0 13B, later 7B); stage 1 has no prompt in MiniGPT-4 ([BOS]
#   [queries] caption "\n"); the COCO reader adds a caption instruction after "<image>" ('plain' template);
# - data: COCO Karpathy train, one sample per caption (MiniGPT-4: ~5M LAION / CC / SBU pairs).
#
# global_batch 256 = batch_size x micro-steps x GPUs (MiniGPT-4: 64 x 4 A100s):
#   8 x A100-80GB: torchrun --standalone --nproc_per_node=8 train.py config/minigpt4_coco.py   (32 x 1 x 8)
#   1 x A100-80GB: python train.py config/minigpt4_coco.py --batch_size=64                     (64 x 4 x 1)
# 20,000 steps x 256 = 5.1M samples, ~9 passes over COCO's ~566k captions; 5,000 warm-up steps = 0.25.
# Memory on one GPU: frozen bf16 weights 14 GB (LLM) + 2 GB (ViT-g) + 0.2 GB (Q-Former); 3.1M trainable.
# Gradients reach only the projection: nothing runs backward through the tower or the Q-Former.
# Feature cache (host memory, per process): 257 x 1408 bf16 = 0.7 MB per image, 82 GB for COCO's 113K training
# images; the default cache_features_gb = 16 holds ~23K of them, the rest run through the tower each time.

out_dir = 'out/minigpt4_coco'
init_vision = 'laion/CLIP-ViT-g-14-laion2B-s12B-b42K'
init_lm = 'lmsys/vicuna-7b-v1.5'
fusion = 'qformer'
vision_layer = -2
vision_norm = False
image_size = 224
image_resize = 'squash'
template = 'plain'

qformer_init = 'Salesforce/blip2-flan-t5-xxl'
qformer_dim = 768
qformer_layers = 12
qformer_heads = 12
qformer_queries = 32
trainable = ('fusion.proj.',)  # llama_proj only; ln_vision, queries and Q-Former stay as loaded

dataset = 'coco'
data_root = 'data/coco'
train_split = 'train'
eval_split = 'test'
max_len = 96
max_new_tokens = 30

batch_size = 32
global_batch = 256
max_iters = 20000
learning_rate = 1e-4
min_lr = 8e-5
warmup_ratio = 0.25          # 5,000 of 20,000 steps
weight_decay = 0.05
beta1 = 0.9
beta2 = 0.999
grad_clip = 0.0
dtype = 'bfloat16'
eval_interval = 2000
