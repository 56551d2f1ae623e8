# ADEM-VL on COCO captions (Hao et al. 2024, arXiv 2410.17779), the official recipe: Hao840/ADEM-VL README's
# "COCO caption" command (train.py --dataset coco_caption, util/coco_karpathy_dataset.py) and eval_caption.py.
# Published: BLEU-4 38.5, CIDEr 133.2 (paper, LLaMA-7B, 5.5M trained); the README's checkpoint: BLEU-4 38.5,
# CIDEr 130.1. Never run at full size here.
#
# Weights: CLIP ViT-L/14 at 224 px and LLaMA-1 7B (huggyllama/llama-7b), as config/adem_sqa.py. Data: LAVIS's
# Karpathy split files (coco_karpathy_train.json, one entry per caption, 566,747; coco_karpathy_val.json, 5,000
# images) in data/coco, images under data/coco (train2014/, val2014/). The official evaluation scores the
# Karpathy *val* split (eval_caption.py: coco_karpathy_caption_eval's default split and coco_caption_eval(...,
# split='val')), so eval_split = 'val' here; --eval_split=test scores the test split.
#
# Sequence: [BOS] "Image: " [CLS] "a picture of" " caption" [EOS] (insert_image_embeds; the training prompt is
# "a picture of ", the evaluation prompt "a picture of", and the caption after "picture of" is the prediction:
# here the generated continuation). Training images: RandomResizedCrop(224, scale 0.5-1) + flip + BLIP's
# RandomAugment(2, 5) (image_augment); evaluation: Resize((224, 224), bicubic); CLIP's mean / std for both.
# Greedy decoding, at most 20 new tokens.
#
# global_batch 32 = batch_size x micro-steps x GPUs (the README: 2 x accum 2 x 8 GPUs):
#   8 x A100:      torchrun --standalone --nproc_per_node=8 train.py config/adem_coco.py   (2 x 2 x 8)
#   1 x A100-80GB: python train.py config/adem_coco.py --batch_size=8                      (8 x 4 x 1)
# lr = blr 9e-3 x 32 / 256 = 1.125e-3; 566,747 / 32 = 17,710 steps per epoch, 88,552 in 5 epochs, the first
# 0.1 epoch (1,771 steps, warmup_ratio 0.02) warming up. The augmented images change every step, so the tower
# runs on every step (no feature cache); its adapters train anyway.
#
# Deviations from the reference code: captions are not lower-cased and stripped of punctuation (its pre_caption)
# nor cut to 30 tokens (its max_words truncates the whole sequence, EOS included); a caption longer than max_len
# is skipped and counted. Augmentation ops use PIL where BLIP re-implements them with cv2 to match PIL.

out_dir = 'out/adem_coco'
init_vision = 'openai/clip-vit-large-patch14'
init_lm = 'huggyllama/llama-7b'
fusion = 'adem'
vision_layer = -2
vision_norm = True
image_resize = 'squash'      # evaluation: Resize((224, 224), bicubic)
image_norm = 'clip'          # CLIP's mean / std (the ScienceQA recipe uses ImageNet's)
image_augment = True
template = 'base'

adem_scales = (256, 64)
adem_hidden = 128
adem_alpha = 0.1
adem_beta = 0.01
adem_drop_ratio = 0.1
adem_adapter_dim = 12

dataset = 'coco'
data_root = 'data/coco'
train_split = 'train'
eval_split = 'val'
caption_prompt = 'a picture of'
image_slot = 'Image: <image>'
max_len = 96
max_new_tokens = 20

batch_size = 2
global_batch = 32
epochs = 5.0
learning_rate = 1.125e-3     # blr 9e-3 x 32 / 256
min_lr = 0.0
warmup_ratio = 0.02          # 0.1 of 5 epochs
weight_decay = 0.02
beta1 = 0.9
beta2 = 0.95
grad_clip = 0.0
dtype = 'bfloat16'
eval_interval = 2000
