# BLIP-2's stage-2 recipe on the offline easy-VQA job, layered over it:
#   python train.py config/easyvqa_cpu.py config/blip2_easyvqa_cpu.py
# A small Q-Former trained from scratch together with ln_vision and the projection into the LLM; tower and
# LLM frozen, no LoRA, as in BLIP-2. 256 wide (4 heads), 4 layers (cross-attention to DINOv2-S's 17 x 384
# tokens at 56 px in layers 0 and 2), 32 queries: 32 visual tokens per image in the LLM. BLIP-2's 1e-4 is for
# batch 512+ and a stage-1-pretrained Q-Former; this one starts from random weights, so it gets 5e-4.
out_dir = 'out/blip2_easyvqa'
fusion = 'qformer'
qformer_dim = 256
qformer_layers = 4
qformer_heads = 4
qformer_queries = 32
peft = ''
learning_rate = 5e-4
weight_decay = 0.05
