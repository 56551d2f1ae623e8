# PETAL on OK-VQA (Zhai et al., arXiv 2312.12458), the official recipe: melonking32/PETAL
# lavis/projects/blip2/train/aurora_mixture/okvqa_instruct_flant5xxl_aurora_mixture.yaml (METHODS.md section 8).
# Backbone: InstructBLIP-FlanT5 (EVA ViT-g/14, 39 blocks, frozen; the instruction-aware Q-Former with 32 queries;
# FlanT5, frozen), all three from one checkpoint (init_vision = init_lm = qformer_init: its language_projection
# loads too). PETAL's yamls use FlanT5-XXL (set init_vision, init_lm and qformer_init to
# Salesforce/instructblip-flan-t5-xxl); this recipe names the XL checkpoint, which fits one 40 GB GPU. What trains
# is PETAL's own set (peft.py's PETAL section: mode approximation in the Q-Former, the scale/shift residuals and the
# experts, ~1.40M);
# the Q-Former, the queries and the projection stay frozen (PETAL train.py train_mode 'adapter').
#
# Hyperparameters from the yaml: linear_warmup_cosine_lr without warm-up, init_lr 2e-5, min_lr 1e-6, weight_decay
# 0.02, 5 epochs, batch 16 on 1 GPU (accum 1), 224 px, prompt "Question: {} Short answer:"; evaluation beam 5,
# max_len 100, min_len 1. Sequence: Q-Former [32 queries] + the prompt in its BERT tokens ([CLS] ... [SEP], the
# checkpoint's qformer_tokenizer); T5 encoder [32 query outputs] "Question: ... Short answer:" </s>; decoder
# targets " answer" </s> ('t5' template; model.VLM.encdec_forward), as LAVIS blip2_t5_instruct_petal_moe.py.
#
# Baselines of PETAL's table as one-line variants (petal_rank / petal_dropout below are PETAL's official values;
# train.py refuses them with another peft unless they equal its defaults: then add --petal_rank=<its default>):
#   head tuning (train_mode 'head': layer 11's first FFN linear, query and text branches):
#     python train.py config/petal_okvqa.py --peft=head
#   full Q-Former fine-tune (ln_vision, queries, Q-Former, projection): --peft='' (the qformer fusion's own set)
#   LoRA r64 in the Q-Former (LAVIS's lora_blip2 baseline; the table gives only the rank), on its self- and
#   cross-attention q / v through peft.py's path patterns:
#     --peft=lora --lora_r=64 --lora_alpha=64 --trainable="('lora_',)" \
#       --lora_targets="('fusion.qformer.layers.*attn.q','fusion.qformer.layers.*attn.v')"   (attn and xattn)
#   prompt tuning (soft prompts into the T5 encoder, beside the Q-Former's own set): --peft=prompt_tuning
#   LLaMA-Adapter, MaPLe (and IA3, bias / scale, bottleneck adapters) act on a decoder-only LM's blocks: on FlanT5
#   they stop with an error saying so (peft.DECODER_ONLY); run them with config/instructblip_vicuna_okvqa.py.
#
# Deviations from the reference code (for the whole InstructBLIP-FlanT5 family of configs, config/petal_*.py):
# - Generation has no min_len (min_len 1 here is a no-op; the caption recipes' 6 is not enforced); answers are
#   not lemmatized before scoring (the yaml's apply_lemmatizer, spaCy); the target is the most frequent of the 10
#   answers (LAVIS samples every answer with its weight).
# - The cosine schedule decays per step, LAVIS's per epoch. Training images get BLIP's RandomResizedCrop +
#   RandomAugment (image_augment, LAVIS blip_image_train); evaluation squashes to 224 (blip_image_eval).
# - The frozen FlanT5 runs without dropout (LAVIS leaves its T5 in train mode: dropout 0.1) and with the GELU its
#   config names (text_config dense_act_fn; LAVIS sets exact 'gelu', HF's default for gated-gelu is the tanh one).
#
# Data: OK-VQA v1.1 in data/okvqa (OpenEnded_mscoco_{train,val}2014_questions.json,
# mscoco_{train,val}2014_annotations.json), COCO 2014 images in data/coco ({train,val}2014/COCO_..._*.jpg).
# 9,009 train questions / 16 = 564 steps per epoch, 2,816 in 5 epochs; scored on the 5,046 val questions with
# the VQA accuracy (the yaml's valid split 'test' is OK-VQA's val).
#   1 x A100-40GB: python train.py config/petal_okvqa.py                          (16 x 1 x 1)
# Memory (arithmetic): frozen bf16 weights 2.0 GB (ViT-g) + 0.4 GB (Q-Former) + 5.7 GB (FlanT5-XL); PETAL's
# ~1.4M trained parameters in fp32 + AdamW: < 0.1 GB.

out_dir = 'out/petal_okvqa'
init_vision = 'Salesforce/instructblip-flan-t5-xl'
init_lm = 'Salesforce/instructblip-flan-t5-xl'
fusion = 'qformer'
vision_layer = -1            # HF's InstructBLIP tower holds the 39 blocks LAVIS uses; its last = LAVIS's output
vision_norm = False          # the tower's post_layernorm is the fusion's ln_vision
image_size = 224
image_resize = 'squash'
image_augment = True
template = 't5'
image_slot = '<image>'       # [query outputs] then the prompt, as LAVIS concatenates them

qformer_init = 'Salesforce/instructblip-flan-t5-xl'
qformer_dim = 768
qformer_layers = 12
qformer_heads = 12
qformer_queries = 32

peft = 'petal'
petal_rank = 64              # R, the mode-approximation rank
petal_dropout = 0.1          # on U x; petal_target: PETAL's default (the Q-Former)

dataset = 'okvqa'
data_root = 'data/okvqa'
image_root = 'data/coco'
train_split = 'train'
eval_split = 'val'
question_prompt = 'Question: {q} Short answer:'
max_len = 128                # LAVIS max_txt_len 128 (prompt); 32 visual tokens + prompt + answer fit
max_new_tokens = 100         # the yaml's max_len (generation stops at EOS)
num_beams = 5

batch_size = 16
global_batch = 16
epochs = 5.0
learning_rate = 2e-5
min_lr = 1e-6
warmup_ratio = 0.0           # the yaml sets no warm-up steps
weight_decay = 0.02
beta1 = 0.9
beta2 = 0.999
grad_clip = 0.0
dtype = 'bfloat16'
eval_interval = 500
