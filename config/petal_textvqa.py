# PETAL on TextVQA (Zhai et al., arXiv 2312.12458), the official recipe: melonking32/PETAL
# lavis/projects/blip2/train/aurora_mixture/textvqa_instruct_flant5xxl_aurora_mixture.yaml (METHODS.md section 8),
# on InstructBLIP-FlanT5-XL as config/petal_okvqa.py, which gives the backbone, what trains, the baselines as
# one-line variants (the same flags here) and the deviations from the reference code shared by every
# config/petal_*.py.
#
# Hyperparameters from the yaml: init_lr 2e-5, min_lr 1e-6, no warm-up, weight_decay 0.02, 5 epochs, batch 32
# on 1 GPU, 224 px, prompt "Question: {} Short answer:"; evaluation beam 5, max_len 10, min_len 1, on val.
# Scored with the VQA accuracy over the 10 answers (the yaml's task 'gqa' scores exact match against one answer).
#
# Data: TextVQA 0.5.1 in data/textvqa (TextVQA_0.5.1_{train,val}.json), images in data/textvqa/train_images/.
# 34,602 train questions / 32 = 1,082 steps per epoch, 5,408 in 5 epochs; 5,000 val questions.
#   1 x A100-40GB: python train.py config/petal_textvqa.py                        (32 x 1 x 1)

out_dir = 'out/petal_textvqa'
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

dataset = 'textvqa'
data_root = 'data/textvqa'
image_root = 'data/textvqa'
train_split = 'train'
eval_split = 'val'
question_prompt = 'Question: {q} Short answer:'
max_len = 128                # LAVIS max_txt_len 128 (prompt); 32 visual tokens + prompt + answer fit
max_new_tokens = 10          # the yaml's max_len
num_beams = 5

batch_size = 32
global_batch = 32
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
