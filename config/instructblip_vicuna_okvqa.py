# PETAL's VQA recipe (Zhai et al., arXiv 2312.12458; melonking32/PETAL lavis/projects/blip2/train/aurora_mixture/
# okvqa_instruct_flant5xxl_aurora_mixture.yaml) on InstructBLIP-Vicuna-7B (Dai et al. 2023; LAVIS
# blip2_vicuna_instruct.py): EVA ViT-g/14 (39 blocks, frozen), the instruction-aware Q-Former (32 queries; it reads
# the question in its own BERT tokenizer) and Vicuna-7B (frozen), all from Salesforce/instructblip-vicuna-7b. This
# is the "full fine-tune" row of PETAL's baseline table (Vicuna-7B backbone: 188M tunable; PAPERS.md: OK-VQA
# 27.7): ln_vision, the queries, the Q-Former (its text embeddings and text FFN included) and the projection
# train, tower and LLM stay frozen. Hyperparameters from the yaml: linear_warmup_cosine_lr with no warm-up steps,
# init_lr 2e-5, min_lr 1e-6, weight_decay 0.02, 5 epochs, batch 16 on 1 GPU (accum 1), 224 px, prompt
# "Question: {} Short answer:"; evaluation max_len 100, min_len 1, 5 beams. PETAL itself on FlanT5:
# config/petal_okvqa.py (and its A-OKVQA / TextVQA / Flickr30K / TextCaps siblings).
#
# Where this differs from PETAL / InstructBLIP:
# - PETAL's yamls use FlanT5-XXL; this is the Vicuna variant of the same recipe;
# - 'base' template: the prompt, then the answer and EOS (LAVIS's concat of text_input and text_output + eos),
#   the "<image>" tokens right after BOS ([BOS][queries] prompt; LAVIS: [queries][BOS] prompt); answers are not
#   lemmatized before scoring (the yaml's apply_lemmatizer: True, spaCy); generation has no min_len; the target
#   is the most frequent of the 10 answers (LAVIS samples every answer with its weight);
# - LAVIS's random-resized-crop training transform is replaced by the eval transform (squash to 224).
#
# Baselines of PETAL's table as one-line variants:
#   head tuning (PETAL train.py train_mode 'head': names with '11', 'bert', 'intermediate' = layer 11's first
#   FFN linears, query and text branches):
#     python train.py config/instructblip_vicuna_okvqa.py \
#       --trainable="('fusion.qformer.layers.11.fc1.','fusion.qformer.layers.11.text_fc1.')"
#   PETAL, LoRA r=64, head tuning (--peft=head), LLaMA-Adapter, MaPLe: see config/petal_okvqa.py (the same flags
#   apply here; LLaMA-Adapter and MaPLe act on Vicuna, a decoder-only LM).
#
# Data: OK-VQA v1.1 in data/okvqa (OpenEnded_mscoco_{train,val}2014_questions.json,
# mscoco_{train,val}2014_annotations.json), COCO 2014 images in data/coco ({train,val}2014/COCO_..._*.jpg).
# 9,009 train questions / 16 = 564 steps per epoch, 2,816 for 5 epochs; scored on the 5,046 val questions
# with the VQA accuracy (LAVIS's OK-VQA evaluation).
#   1 x A100-80GB: python train.py config/instructblip_vicuna_okvqa.py                  (16 x 1 x 1)
# Memory (arithmetic): frozen bf16 weights 13.5 GB (LLM) + 2 GB (ViT-g); ~188M trainable (fp32 + AdamW: 3 GB).

out_dir = 'out/instructblip_vicuna_okvqa'
init_vision = 'Salesforce/instructblip-vicuna-7b'
init_lm = 'Salesforce/instructblip-vicuna-7b'
fusion = 'qformer'
vision_layer = -1            # HF's InstructBLIP tower holds the 39 blocks LAVIS uses
vision_norm = False          # its post_layernorm is the fusion's ln_vision
image_size = 224
image_resize = 'squash'
template = 'base'
image_slot = '<image>'       # the query outputs, then the prompt

qformer_init = 'Salesforce/instructblip-vicuna-7b'  # with its language_projection into Vicuna (= init_lm)
qformer_dim = 768
qformer_layers = 12
qformer_heads = 12
qformer_queries = 32
# trains its default set: ln_vision, queries, Q-Former, projection; tower and LLM frozen

dataset = 'okvqa'
data_root = 'data/okvqa'
image_root = 'data/coco'
train_split = 'train'
eval_split = 'val'
question_prompt = 'Question: {q} Short answer:'
max_len = 128
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
