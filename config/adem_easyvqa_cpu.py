# ADEM-VL on the offline easy-VQA job, layered over it:
#   python train.py config/easyvqa_cpu.py config/adem_easyvqa_cpu.py
# DINOv2-S at 56 px gives a 4x4 patch grid: the multiscale prompts are the 16 patches + the grid avg-pooled
# to 2x2 (the official 256 + 64 at CLIP-L/224), the CLS token fills the "Image: " slot, and bottleneck
# adapters (dim 12) go into every tower block, so the tower runs each step (no feature cache). LM frozen,
# no LoRA, as in ADEM-VL. Optimizer as the official run (AdamW beta2 0.95, wd 0.02); the learning rate is
# the base job's, not the official blr x batch / 256 (2.8e-4 at batch 8), which is made for 20 epochs.
out_dir = 'out/adem_easyvqa'
fusion = 'adem'
adem_scales = (16, 4)
adem_adapter_dim = 12
peft = ''                     # ADEM-VL alone; it trains what it declares (fusion.ADEMFusion.trainable)
weight_decay = 0.02
beta2 = 0.95
