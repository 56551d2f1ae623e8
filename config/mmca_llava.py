# DeepSpeed-VisualChat (Yao et al. 2023, "Multi-Round Multi-Image Interleave Chat via Multi-Modal Causal
# Attention") on LLaVA-Instruct-150K: CLIP ViT-L/14 at 224 px, every token of its last layer (257 = CLS +
# 256 patches, no post-LayerNorm: HF CLIPVisionModel's last_hidden_state), the `vis_proj baseline`
# projection (Linear + LayerNorm), LLaMA-2-7B, multi-modal causal attention in every layer.
#
# Hyperparameters from the official 7B script (microsoft/DeepSpeedExamples applications/DeepSpeed-VisualChat/
# training/training_scripts/run_7b.sh, defaults in training/main.py and utils/ds_utils.py):
#   lr 1e-3, cosine to 0, warm-up 10% of the steps, weight decay 0, AdamW betas (0.9, 0.95), 6 epochs,
#   gradient clipping 1.0, global batch 128, max length 4096 (fp16 there; bf16 here).
# What trains there: the projection and the LM's input word embedding (a separate copy of it, at the same lr,
# because the official tokenizer gains new special tokens), with the tower and the LM frozen; no LoRA
# (--lang_lora_dim defaults to 0). LLaMA-2 unties embedding and head, so 'lm.embed.' is the same set here:
# 4.2M projection + 131.1M embedding = 135.3M trainable. Projection only: trainable = () (the default).
# LoRA on the LM as their --lang_lora_dim: peft = 'lora', lora_r = 8 (say) and trainable = ('fusion.', 'lm.embed.', 'lora_').
# Ablation (plain causal attention, same projection): --mmca_attention=False.
#
# Differences from the official run: its data blend (LLaVA detail + complex reasoning + conversations, Otter
# MIMIC-IT, SparklesDialogue) concatenates several samples into multi-image sequences; here one image per
# sample from LLaVA-Instruct-150K. Its own prompt format ("### Image:", "### Question:", "### Answer:") is
# replaced by the vicuna_v1 template; its extra special tokens are not needed (placeholders are ids -200).
#
# Data: liuhaotian/LLaVA-Instruct-150K llava_instruct_150k.json (157,712 conversations) in data/llava, COCO
# train2017 images in data/coco/train2017.
#
# global_batch 128 = batch_size x micro-steps x GPUs:
#   8 x A100-80GB: torchrun --standalone --nproc_per_node=8 train.py config/mmca_llava.py   (4 x 4 x 8)
#   1 x A100-80GB: python train.py config/mmca_llava.py                                    (4 x 32 x 1)
# 157,712 / 128 = 1,232 steps per epoch, 7,392 steps in all, 739 of warm-up. Memory on one GPU: frozen bf16
# weights 14 GB + 135M trained parameters in fp32 with AdamW 2.2 GB + activations of 4 x ~600 tokens through
# all 32 layers (the gradient reaches the input embeddings), two attention calls per layer.

out_dir = 'out/mmca_llava'
init_vision = 'openai/clip-vit-large-patch14'
init_lm = 'meta-llama/Llama-2-7b-hf'
fusion = 'mmca'
mmca_attention = True
vision_layer = -1
vision_norm = False
vision_feature = 'cls_patch'
template = 'vicuna_v1'

trainable = ('fusion.', 'lm.embed.')

dataset = 'llava'
data_root = 'data/llava/llava_instruct_150k.json'
image_root = 'data/coco/train2017'
max_len = 4096
final_eval = False           # free-form answers: exact match means nothing; use sample.py / eval.py on a VQA task

batch_size = 4
global_batch = 128
epochs = 6.0
learning_rate = 1e-3
min_lr = 0.0
warmup_ratio = 0.1
weight_decay = 0.0
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0
dtype = 'bfloat16'
eval_interval = 500
