# PETAL on Flickr30K captions (Zhai et al., arXiv 2312.12458), the official recipe: melonking32/PETAL
# lavis/projects/blip2/train/aurora_mixture/caption_flickr_instruct_flant5xxl_aurora_mixture.yaml (METHODS.md
# section 8), on InstructBLIP-FlanT5-XL as config/petal_okvqa.py, which gives the backbone, what trains, the
# baselines as one-line variants (the same flags here) and the deviations from the reference code shared by every
# config/petal_*.py.
#
# Hyperparameters from the yaml: init_lr 1e-5, min_lr 0, 1,000 warm-up steps from 1e-8, weight_decay 0.05,
# 5 epochs, batch 32 on 1 GPU (amp), 224 px, prompt "a photo of" (encoder: [query outputs] "a photo of" </s>;
# decoder targets: " caption" </s>); evaluation beam 5, max_len 50, min_len 6, on the Karpathy test split, scored with
# CIDEr and PETAL's ROUGE-1 F1 / recall and ROUGE-L recall (eval.py). Training images: LAVIS's
# blip2_image_train is RandomResizedCrop(224, scale 0.5-1) + horizontal flip, without BLIP's RandomAugment, which
# image_augment would add: left off, the images are squashed to 224 as in evaluation.
#
# Data: Karpathy's dataset_flickr30k.json in data/flickr30k, images in data/flickr30k/flickr30k-images/.
# 29,000 train images x 5 captions = 145,000 samples / 32 = 4,532 steps per epoch, 22,657 in 5 epochs; 1,000
# test images.
#   1 x A100-40GB: python train.py config/petal_flickr30k.py                       (32 x 1 x 1)

out_dir = 'out/petal_flickr30k'
init_vision = 'Salesforce/instructblip-flan-t5-xl'
init_lm = 'Salesforce/instructblip-flan-t5-xl'
fusion = 'qformer'
vision_layer = -1            # HF's InstructBLIP tower holds the 39 blocks LAVIS uses; its last = LAVIS's output
vision_norm = False          # the tower's post_layernorm is the fusion's ln_vision
image_size = 224
image_resize = 'squash'
image_augment = False        # LAVIS blip2_image_train: RandomResizedCrop + flip only (see above)
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

dataset = 'flickr30k'
data_root = 'data/flickr30k'
image_root = 'data/flickr30k/flickr30k-images'
train_split = 'train'
eval_split = 'test'
caption_prompt = 'a photo of'   # the caption continues it (data.caption_target)
max_len = 128                # LAVIS max_txt_len 128 (prompt); 32 visual tokens + prompt + answer fit
max_new_tokens = 50          # the yaml's max_len (its min_len 6 is not enforced)
num_beams = 5

batch_size = 32
global_batch = 32
epochs = 5.0
learning_rate = 1e-5
min_lr = 0.0
warmup_iters = 1000          # the yaml's warmup_steps (from warmup_lr 1e-8; here from 0)
weight_decay = 0.05
beta1 = 0.9
beta2 = 0.999
grad_clip = 0.0
dtype = 'bfloat16'
eval_interval = 500
