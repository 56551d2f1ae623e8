# PETAL's VQA recipe (Zhai et al., arXiv 2312.12458; melonking32/PETAL lavis/projects/blip2/train/aurora_mixture/
# okvqa_instruct_flant5xxl_aurora_mixture.yaml) on an InstructBLIP-Vicuna-like model built from what this
# repository has today: BLIP-2's Q-Former (fusion = 'qformer', 32 queries) between a frozen 1408-wide tower
# and a frozen Vicuna-7B, fine-tuned on OK-VQA. This is the "full fine-tune" row of PETAL's baseline table
# (Vicuna-7B backbone: 188M tunable; PAPERS.md: OK-VQA 27.7): ln_vision, the queries, the Q-Former and the
# projection train, tower and LLM stay frozen. Hyperparameters from the yaml: linear_warmup_cosine_lr with no
# warm-up steps, init_lr 2e-5, min_lr 1e-6, weight_decay 0.02, 5 epochs, batch 16 on 1 GPU (accum 1),
# 224 px, prompt "Question: {} Short answer:"; evaluation max_len 100, min_len 1, 5 beams.
#
# Where this differs from PETAL / InstructBLIP:
# - not InstructBLIP: our Q-Former does not read the instruction (InstructBLIP's instruction-aware Q-Former
#   embeds the question next to the queries), and qformer_init loads BLIP-2 checkpoints only (model_type
#   'blip-2'; the instructblip-* checkpoints are refused), so the Q-Former starts from BLIP-2's;
# - tower: OpenCLIP ViT-g/14 (1408 wide, penultimate layer) instead of EVA ViT-g/14, which model.py lacks:
#   the BLIP-2 Q-Former reads features it was not trained on, and training it adapts it (see minigpt4_coco.py);
# - PETAL's own method (mode approximation, the instruction MoE, METHODS.md section 8) is not in fusion.py /
#   peft.py yet, nor is the InstructBLIP-FlanT5 backbone its yamls use; no PETAL config is given until they exist;
# - 'base' template: the prompt, then the answer and EOS (InstructBLIP's concat of text_input and text_output +
#   eos), the "<image>" tokens first; decoding is greedy (PETAL: 5 beams) and answers are not lemmatized
#   before scoring (the yaml's apply_lemmatizer: True, spaCy); the target is the most frequent of the 10
#   answers (LAVIS samples every answer with its weight);
# - LAVIS's random-resized-crop training transform is replaced by the eval transform (squash to 224).
#
# Baselines of PETAL's table as one-line variants:
#   head tuning (PETAL train.py train_mode 'head': names with '11', 'bert', 'intermediate' = layer 11's first
#   FFN linear; our Q-Former has only the query branch, so the text branch's copy is absent):
#     python train.py config/instructblip_vicuna_okvqa.py --trainable="('fusion.qformer.layers.11.fc1.',)"
#   LoRA r=64, LLaMA-Adapter, MaPLe: not buildable on this branch (peft.py's LoRA wraps only the LLM, PETAL's
#   LoRA baseline sits in the Q-Former; LLaMA-Adapter and MaPLe are not in peft.py).
#
# Data: OK-VQA v1.1 in data/okvqa (OpenEnded_mscoco_{train,val}2014_questions.json,
# mscoco_{train,val}2014_annotations.json), COCO 2014 images in data/coco ({train,val}2014/COCO_..._*.jpg).
# 9,009 train questions / 16 = 564 steps per epoch, 2,816 for 5 epochs; scored on the 5,046 val questions
# with the VQA accuracy (LAVIS's OK-VQA evaluation).
#   1 x A100-80GB: python train.py config/instructblip_vicuna_okvqa.py                  (16 x 1 x 1)
# Memory: frozen bf16 weights 14 GB (LLM) + 2 GB (ViT-g); ~105M trainable (fp32 + AdamW: 1.7 GB).

out_dir = 'out/instructblip_vicuna_okvqa'
init_vision = 'laion/CLIP-ViT-g-14-laion2B-s12B-b42K'
init_lm = 'lmsys/vicuna-7b-v1.5'
fusion = 'qformer'
vision_layer = -2
vision_norm = False
image_size = 224
image_resize = 'squash'
template = 'base'

qformer_init = 'Salesforce/blip2-flan-t5-xxl'   # BLIP-2's Q-Former, queries and ln_vision (InstructBLIP's base)
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
