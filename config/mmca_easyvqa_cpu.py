# DeepSpeed-VisualChat's multi-modal causal attention on the offline easy-VQA job, layered over it:
#   python train.py config/easyvqa_cpu.py config/mmca_easyvqa_cpu.py
# The CLS + 16 patch tokens of DINOv2-S at 56 px through DS-VisualChat's projection (Linear + LayerNorm);
# image tokens attend to image tokens, text tokens get two separately normalised softmaxes (image keys, text
# keys). With the base job's LoRA on the LM (DS-VisualChat trains the projection, optionally LoRA / the LM).
out_dir = 'out/mmca_easyvqa'
fusion = 'mmca'
vision_feature = 'cls_patch'
