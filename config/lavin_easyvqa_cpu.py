# LaVIN (mixture-of-modality adaptation) on the offline easy-VQA job, layered over it:
#   python train.py config/easyvqa_cpu.py config/lavin_easyvqa_cpu.py
# The CLS token of every 2nd of DINOv2-S's 12 blocks (6 visual tokens, without the final norm, as LaVIN reads
# CLIP), the modality token in front of every row, routers before attention in every tower and LM block (so
# the tower runs each step: no feature cache). LM frozen, no LoRA, as in LaVIN; AdamW beta2 0.95, wd 0.02.
out_dir = 'out/lavin_easyvqa'
fusion = 'lavin'
vision_norm = False
peft = ''
weight_decay = 0.02
beta2 = 0.95
