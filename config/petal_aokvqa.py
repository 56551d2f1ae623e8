# PETAL on A-OKVQA (Zhai et al., arXiv 2312.12458), the official recipe: melonking32/PETAL
# lavis/projects/blip2/train/aurora_mixture/aokvqa_instruct_flant5xxl_aurora_mixture.yaml (METHODS.md section 8),
# on InstructBLIP-FlanT5-XL as config/petal_okvqa.py, which gives the backbone, what trains, the baselines as
# one-line variants (the same flags here) and the deviations from the reference code shared by every
# config/petal_*.py.
#
# Hyperparameters from the yaml: init_lr 2e-5, min_lr 1e-6, no warm-up, weight_decay 0.02, 5 epochs, batch 16
# on 1 GPU, 224 px; evaluation beam 5, max_len 100, min_len 1. Direct answers (task aok_vqa): the training prompt
# "Question: {} Short answer:" (PETAL's AOKVQA_Instruct_Dataset), the target one direct answer (PETAL: the first
# distinct one; here the most frequent), scored with A-OKVQA's DA score on val.
# Deviation of its own: PETAL's eval dataset feeds the bare question (the yaml sets no prompt); here the training
# prompt is used for both. --dataset=aokvqa_mc scores multiple choice instead.
#
# Data: aokvqa_v1p0_{train,val}.json in data/aokvqa, COCO 2017 images in data/coco ({train,val}2017/).
# 17,056 train questions / 16 = 1,066 steps per epoch, 5,330 in 5 epochs; 1,145 val questions.
#   1 x A100-40GB: python train.py config/petal_aokvqa.py                         (16 x 1 x 1)

out_dir = 'out/petal_aokvqa'
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

dataset = 'aokvqa_da'
data_root = 'data/aokvqa'
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
