# Flamingo on the offline easy-VQA job, layered over it:
#   python train.py config/easyvqa_cpu.py config/flamingo_easyvqa_cpu.py
# The Perceiver Resampler turns DINOv2-S's 16 patch tokens into 64 latents; a gated cross-attention block
# (tanh gates at 0) before every 4th of SmolLM2's 30 layers (OpenFlamingo-9B's spacing), the "<image>" slot a
# learned embedding. Trained: resampler, gated blocks, image embedding; LM frozen, no LoRA, as in Flamingo.
# The base job's text format ("Image: <image>\n{q}\n" -> "{answer}\n") instead of <|endofchunk|>: one image
# per sample, so the media mask is simply "text after the image sees it".
out_dir = 'out/flamingo_easyvqa'
fusion = 'flamingo'
flamingo_every = 4
peft = ''
weight_decay = 0.1
