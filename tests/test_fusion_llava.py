"""LLaVA-1.5's path (tower penultimate layer -> patch tokens -> 2-layer GELU MLP -> spliced at the image
placeholders) against transformers' LlavaForConditionalGeneration on the same tiny random weights."""
import torch
from conftest import randomize, rel_err

from fusion import LLaVAProjector
from model import IMAGE_TOKEN, VLM, Decoder, ViT


def test_vlm_logits_match_hf_llava(tmp_path):
    import transformers as T
    torch.manual_seed(0)
    vcfg = T.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                              image_size=32, patch_size=8)
    tcfg = T.LlamaConfig(vocab_size=120, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    clip = randomize(T.CLIPVisionModel(vcfg).eval())
    llama = randomize(T.LlamaForCausalLM(tcfg).eval(), std=0.05)
    clip.save_pretrained(tmp_path / 'clip')
    llama.save_pretrained(tmp_path / 'lm')

    image_id = 119
    hf = T.LlavaForConditionalGeneration(T.LlavaConfig(
        vision_config=vcfg, text_config=tcfg, image_token_index=image_id, vision_feature_layer=-2,
        vision_feature_select_strategy='default', projector_hidden_act='gelu')).eval()
    hf.model.vision_tower.load_state_dict(clip.state_dict())
    hf.model.language_model.load_state_dict(llama.model.state_dict())
    hf.lm_head.load_state_dict(llama.lm_head.state_dict())
    randomize(hf.model.multi_modal_projector, std=0.1, seed=1)

    proj = LLaVAProjector(32, 64, select='patch')  # LLaVA-1.5: CLS dropped, 16 patch tokens per image
    p = hf.model.multi_modal_projector
    proj.load_state_dict({'fc1.weight': p.linear_1.weight, 'fc1.bias': p.linear_1.bias,
                          'fc2.weight': p.linear_2.weight, 'fc2.bias': p.linear_2.bias})
    ours = VLM(ViT.from_pretrained(tmp_path / 'clip'), Decoder.from_pretrained(tmp_path / 'lm'), proj,
               vision_layer=-2, vision_norm=False).eval()

    pixels = torch.randn(2, 3, 32, 32)
    text = torch.randint(1, 100, (2, 6))
    hf_ids = torch.cat([text[:, :2], torch.full((2, 16), image_id), text[:, 2:]], 1)  # (2, 22)
    our_ids = torch.where(hf_ids == image_id, IMAGE_TOKEN, hf_ids)
    with torch.no_grad():
        want = hf(input_ids=hf_ids, pixel_values=pixels).logits
        got = ours(our_ids, pixels=pixels)
    assert got.shape == want.shape == (2, 22, 120)
    assert rel_err(got, want) < 1e-4
    # the image changes the text's logits (so the comparison above covers the visual path)
    with torch.no_grad():
        other = ours(our_ids, pixels=pixels.flip(0))
    assert (other[:, -1] - got[:, -1]).abs().max() > 1e-3
    # a llava-hf folder loads whole: tower, LM and (llava_init) projector from the one checkpoint
    from fusion import build_vlm
    hf.save_pretrained(tmp_path / 'llava')
    folder = str(tmp_path / 'llava')
    whole = build_vlm(dict(init_vision=folder, init_lm=folder, fusion='llava', llava_init=folder, vision_layer=-2,
                           vision_norm=False, vision_feature='patch')).eval()
    with torch.no_grad():
        assert rel_err(whole(our_ids, pixels=pixels), want) < 1e-4
    assert torch.equal(whole.fusion.fc2.bias, p.linear_2.bias)
