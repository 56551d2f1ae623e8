"""
Everything between files on disk and the tensors the model eats, in reading order:

1. Tokenizer: a thin wrapper over a `tokenizers` tokenizer.json, with the special ids read from the
   checkpoint folder and no hidden BOS/EOS.
2. Chat templates as plain functions (Vicuna v1, Llama-2, ChatML for SmolLM2 / Qwen2, Gemma, LLaVA's
   `plain`, OpenFlamingo's `flamingo`), each returning (text, is_labelled) pieces so that label masking is exact.
3. tokenize_conversation: the whole rendered text in one call, labels from character offsets, the
   "<image>" placeholder expanded, left truncation of the prompt.
4. Images: load_image (any mode -> RGB, clear errors) and preprocess_image per vision tower.
5. Dataset readers: easy-VQA, ScienceQA (json and parquet layouts), VQAv2, COCO Karpathy, LLaVA JSON,
   interleaved image-text JSON (OpenFlamingo's format). Each returns a list of plain dict samples:
       {'id': str, 'image': path | bytes | None, 'messages': [('user', '<image>\\nQ'), ('assistant', 'A')],
        'answers': [str, ...] (references for scoring), + task metadata (question, choices, ...)}
   A sample with several images also has 'images': [path | bytes, ...], one per "<image>" in the order they
   appear in the text ('image' is then the first); image_sources(sample) is what the image pipeline takes.
6. ConversationDataset + collate (right padding) and left_pad (batched generation).
7. A model's inputs: prepare(cfg, model) (tokenizer, template, image preprocessing, visual-token count) and
   image_inputs (image sources -> pixels, or the frozen tower's cached features), used by train.py, eval.py
   and sample.py alike.

Conventions shared with model.py / train.py / eval.py:
- IGNORE_INDEX (-100) marks positions without a loss. `labels` are aligned with `input_ids` (HF
  convention): labels[t] == input_ids[t] on answer tokens; the loss shifts (logits[:, :-1] vs labels[:, 1:]).
- IMAGE_TOKEN (-200) is the only image placeholder (as LLaVA's IMAGE_TOKEN_INDEX, llava/constants.py):
  the "<image>" string in a user turn becomes `n_image_tokens` copies of it; the model overwrites the
  embeddings at those positions with the visual tokens. n_image_tokens=0 drops the placeholder (for
  fusion methods that give the image to the model some other way, e.g. cross-attention).
- "<|endofchunk|>" (OpenFlamingo's end of an image's text) is encoded as the tokenizer's eos (see fusion.py,
  Flamingo: the pretrained vocabulary is never resized).
"""

import importlib.util
import io
import json
import re
import warnings
from collections import Counter
from contextlib import nullcontext
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from model import IGNORE_INDEX, IMAGE_TOKEN, resolve

IMAGE_PLACEHOLDER = "<image>"
ENDOFCHUNK = "<|endofchunk|>"  # OpenFlamingo's chunk end; tokenized as the eos token


def _load_json(path):
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def _get(entry, key, kind, where):
    """entry[key], checked to exist and to be of type `kind`; `where` names the file and entry in errors."""
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: expected an object with field '{key}', got {type(entry).__name__}")
    if key not in entry:
        raise ValueError(f"{where}: missing field '{key}'")
    value = entry[key]
    if not isinstance(value, kind):
        names = "/".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise ValueError(f"{where}: field '{key}' should be {names}, got {type(value).__name__} {value!r:.80}")
    return value

# -----------------------------------------------------------------------------
# 1. Tokenizer
#
# Loads tokenizer.json with the `tokenizers` library (the file HF's fast tokenizers use) and reads the
# special tokens from the files next to it, in this order: tokenizer_config.json, special_tokens_map.json,
# then the *_token_id fields of generation_config.json and config.json.
#
# BOS/EOS: tokenizer.json files of LLaMA-family models carry a TemplateProcessing post-processor that
# prepends <s> to every encode() call. We never let it run (add_special_tokens=False); BOS is added
# explicitly by `encode(text, bos=True)` / `tokenize_conversation(..., bos=...)`, and `add_bos` records
# whether the checkpoint expects one (tokenizer_config's add_bos_token, else whether its post-processor
# adds one). Special-token strings inside the text ("</s>", "<|im_end|>") are still matched as tokens.
#
# "<image>" is registered as a special added token, so it is split off before BPE and never merges with
# its neighbours (what HF's llava processors do); tokenize_conversation maps it to IMAGE_TOKEN.

TEMPLATE_END_TOKENS = ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|endoftext|>")


class Tokenizer:
    def __init__(self, folder):
        from tokenizers import AddedToken
        from tokenizers import Tokenizer as HFTokenizer
        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: file not found (a checkpoint folder needs tokenizer.json)")
        try:
            self.tk = HFTokenizer.from_file(str(path))
        except Exception as e:
            raise ValueError(f"{path}: cannot load tokenizer ({e})") from e
        self.folder = folder

        def read(name):
            return _load_json(folder / name) if (folder / name).is_file() else {}

        cfg = {**read("special_tokens_map.json"), **read("tokenizer_config.json")}
        gen, model_cfg = read("generation_config.json"), read("config.json")
        self.vocab_size = self.tk.get_vocab_size(with_added_tokens=True)  # the tokenizer's; config.json's may be padded

        def special_id(name):  # "bos" -> id from the token string, else from the *_token_id fields, else None
            token = cfg.get(f"{name}_token")
            if isinstance(token, dict):  # serialised AddedToken
                token = token.get("content")
            if isinstance(token, str):
                tid = self.tk.token_to_id(token)
                if tid is None:
                    raise ValueError(f"{folder}: {name}_token {token!r} is not in tokenizer.json's vocabulary")
                return tid
            for source in (gen, model_cfg):
                tid = source.get(f"{name}_token_id")
                if isinstance(tid, list):  # generation_config may list several eos ids
                    tid = tid[0] if tid else None
                if tid is not None:
                    return int(tid)
            return None

        self.bos_id, self.eos_id = special_id("bos"), special_id("eos")
        if self.eos_id is None:
            raise ValueError(f"{folder}: no eos token (looked in tokenizer_config.json, special_tokens_map.json, "
                             "generation_config.json, config.json)")
        pad_id = special_id("pad")
        self.pad_id = self.eos_id if pad_id is None else pad_id
        if isinstance(cfg.get("add_bos_token"), bool):
            self.add_bos = cfg["add_bos_token"] and self.bos_id is not None
        else:  # what the post-processor would do
            with_pp = self.tk.encode("a", add_special_tokens=True).ids
            self.add_bos = self.bos_id is not None and len(with_pp) > 1 and with_pp[0] == self.bos_id
        gen_eos = gen.get("eos_token_id", [])
        ends = [self.tk.token_to_id(t) for t in TEMPLATE_END_TOKENS]
        self.stop_ids = sorted({self.eos_id, *(gen_eos if isinstance(gen_eos, list) else [gen_eos]),
                                *(t for t in ends if t is not None)})
        template = cfg.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            template = next((t.get("template") for t in template if t.get("name") == "default"), None)
        if template is None and (folder / "chat_template.jinja").is_file():  # transformers >= 4.50 saves it here
            template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
        self.chat_template, self.model_type = template, model_cfg.get("model_type")
        self.tk.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                    for t in (IMAGE_PLACEHOLDER, ENDOFCHUNK)])
        self.image_id = self.tk.token_to_id(IMAGE_PLACEHOLDER)
        self.eoc_id = self.tk.token_to_id(ENDOFCHUNK)  # mapped to eos_id by tokenize_conversation

    def encode(self, text, bos=False):
        """Plain text -> ids. No BOS/EOS unless bos=True (never from the post-processor). For text with
        "<image>" use tokenize_conversation, which expands the placeholder."""
        ids = self.tk.encode(text, add_special_tokens=False).ids
        if bos:
            if self.bos_id is None:
                raise ValueError(f"{self.folder}: this tokenizer has no BOS token")
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids, skip_special=True):
        """ids -> text; negative ids (IMAGE_TOKEN, IGNORE_INDEX) are dropped."""
        ids = [int(i) for i in ids if int(i) >= 0]
        return self.tk.decode(ids, skip_special_tokens=skip_special)

# -----------------------------------------------------------------------------
# 2. Chat templates
#
# One function per template: (messages, system=None, add_generation_prompt=False) -> [(text, labelled)].
# messages: [(role, text)] with roles 'user'/'assistant' alternating, user first; a leading ('system', s)
# message is the same as system=s. Labelled: the assistant's answer and its end-of-turn marker; where
# the reference puts a space between the role tag and the answer ("ASSISTANT: {a}", "[/INST] {a}"), that
# space is labelled too, because SentencePiece tokenizers merge it into the answer's first token ("▁The")
# - the same tokens LLaVA's preprocess_v1 labels.
#
# BOS: the templates do not render the leading BOS; tokenize_conversation adds it when the tokenizer
# wants one (tok.add_bos: LLaMA, Vicuna, Gemma yes; SmolLM2, Qwen2 no). So for Llama-2 and Gemma,
# tokenizer.bos_token + render(...) equals HF's apply_chat_template string. Llama-2 renders the "<s>" of
# later turns as text, which tokenizes to the special token.
#
# Sources (facts read, checked in tests/test_data.py):
# - vicuna_v1: haotian-liu/LLaVA llava/conversation.py conv_vicuna_v1 (SeparatorStyle.TWO, sep " ",
#   sep2 "</s>"); generation prompt ends with "ASSISTANT:".
# - llama2: the chat_template of meta-llama/Llama-2-*-chat-hf tokenizer_config.json (content stripped,
#   "[INST] " + q + " [/INST]", " " + a + " </s>", later turns start with "<s>"), no default system.
# - chatml: SmolLM2-135M-Instruct's template (GGUF metadata / tokenizer_config.json; adds its default system
#   prompt when none is given) and Qwen2-Instruct's (same layout, "You are a helpful assistant."). No stripping.
# - gemma: google/gemma-*-it tokenizer_config.json (content trimmed, role 'model', no system role).
# - plain: LLaVA stage-1 (conv_llava_plain, train.py preprocess_plain): user text then answer + "\n",
#   no roles; LLaVA keeps only "<image>" of the user turn, so give readers prompt="" to match it.
# - base: base (non-chat) LMs as ADEM-VL / LaVIN train LLaMA-1 (util/datasets.py ScienceQADataSet.tokenize):
#   the user text and the answer concatenated as they are, then the tokenizer's EOS token (labelled).
# - flamingo: OpenFlamingo's text (open_flamingo train/data.py): no roles, user text then answer +
#   "<|endofchunk|>", labelled with it: "<image>caption<|endofchunk|>" (LAION), and for read_interleaved's
#   turns exactly train_utils.py's MMC4 labels. The eos OpenFlamingo appends after the last chunk is left out
#   ("<|endofchunk|>" is eos here). After a text prompt ("<image>\nQ") the answer starts with a labelled
#   space, so that words do not merge across the boundary.
# - t5: encoder-decoder LMs (InstructBLIP-FlanT5, LAVIS blip2_t5_instruct.py): the prompt + EOS (the encoder's
#   input: T5's tokenizer appends EOS to every text), then a labelled space + the answer + EOS (the decoder's
#   targets); model.VLM.encdec_forward splits the two at the first label. One turn only.

VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's questions.")
SMOLLM2_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
QWEN2_SYSTEM = "You are a helpful assistant."


def _turns(messages, system):
    """Split off a leading system message and check the user/assistant alternation."""
    messages = list(messages)
    if messages and messages[0][0] == "system":
        if system is not None:
            raise ValueError("system prompt given twice (system=... and a leading 'system' message)")
        system, messages = messages[0][1], messages[1:]
    if not messages:
        raise ValueError("empty conversation")
    for i, (role, text) in enumerate(messages):
        expected = ("user", "assistant")[i % 2]
        if role != expected:
            raise ValueError(f"message {i} has role {role!r}, expected {expected!r} "
                             "(roles must alternate user/assistant, starting with user)")
        if not isinstance(text, str):
            raise ValueError(f"message {i} text should be str, got {type(text).__name__}")
    return system, messages


def vicuna_v1(messages, system=None, add_generation_prompt=False):
    system, messages = _turns(messages, system)
    pieces = [((VICUNA_SYSTEM if system is None else system) + " ", False)]
    for role, text in messages:
        if role == "user":
            pieces.append((f"USER: {text} ", False))
        else:
            pieces += [("ASSISTANT:", False), (f" {text}</s>", True)]
    if add_generation_prompt and messages[-1][0] == "user":
        pieces.append(("ASSISTANT:", False))
    return pieces


def llama2(messages, system=None, add_generation_prompt=False):
    system, messages = _turns(messages, system)
    pieces = []
    for i, (role, text) in enumerate(messages):
        if role == "user":
            if i == 0 and system is not None:
                text = f"<<SYS>>\n{system}\n<</SYS>>\n\n{text}"
            pieces.append((("" if i == 0 else "<s>") + f"[INST] {text.strip()} [/INST]", False))
        else:
            pieces.append((f" {text.strip()} </s>", True))
    return pieces  # the user turn already ends with the generation prompt "[/INST]"


def chatml(messages, system=None, add_generation_prompt=False, default_system=QWEN2_SYSTEM):
    system, messages = _turns(messages, system)
    system = default_system if system is None else system
    pieces = [(f"<|im_start|>system\n{system}<|im_end|>\n", False)]
    for role, text in messages:
        if role == "user":
            pieces.append((f"<|im_start|>user\n{text}<|im_end|>\n", False))
        else:
            pieces += [("<|im_start|>assistant\n", False), (f"{text}<|im_end|>", True), ("\n", False)]
    if add_generation_prompt and messages[-1][0] == "user":
        pieces.append(("<|im_start|>assistant\n", False))
    return pieces


def gemma(messages, system=None, add_generation_prompt=False):
    system, messages = _turns(messages, system)
    if system is not None:
        raise ValueError("Gemma has no system role; put the instructions into the first user message")
    pieces = []
    for role, text in messages:
        if role == "user":
            pieces.append((f"<start_of_turn>user\n{text.strip()}<end_of_turn>\n", False))
        else:
            pieces += [("<start_of_turn>model\n", False), (f"{text.strip()}<end_of_turn>", True), ("\n", False)]
    if add_generation_prompt and messages[-1][0] == "user":
        pieces.append(("<start_of_turn>model\n", False))
    return pieces


def plain(messages, system=None, add_generation_prompt=False):
    system, messages = _turns(messages, system)
    if system is not None:
        raise ValueError("the 'plain' template has no system prompt")
    return [(text, False) if role == "user" else (text + "\n", True) for role, text in messages]


def base(messages, system=None, add_generation_prompt=False, eos="</s>"):
    system, messages = _turns(messages, system)
    if system is not None:
        raise ValueError("the 'base' template has no system prompt")
    return [(text, False) if role == "user" else (text + eos, True) for role, text in messages]


def t5(messages, system=None, add_generation_prompt=False, eos="</s>"):
    system, messages = _turns(messages, system)
    if system is not None:
        raise ValueError("the 't5' template has no system prompt")
    if len(messages) > 2:
        raise ValueError("the 't5' template (encoder-decoder LMs) takes one user turn and one answer")
    return [(text + eos, False) if role == "user" else (("" if text[:1].isspace() else " ") + text + eos, True)
            for role, text in messages]


def flamingo(messages, system=None, add_generation_prompt=False):
    system, messages = _turns(messages, system)
    if system is not None:
        raise ValueError("the 'flamingo' template has no system prompt")
    pieces = []
    for role, text in messages:
        if role == "user":
            pieces.append((text, False))
        else:  # a space (labelled, as vicuna_v1's) after a text prompt; none after "<image>", as OpenFlamingo
            sep = "" if pieces[-1][0].endswith(IMAGE_PLACEHOLDER) or pieces[-1][0][-1:].isspace() else " "
            pieces.append((sep + text + ENDOFCHUNK, True))
    return pieces


TEMPLATES = {
    "vicuna_v1": vicuna_v1,
    "llama2": llama2,
    "smollm2": partial(chatml, default_system=SMOLLM2_SYSTEM),
    "qwen2": partial(chatml, default_system=QWEN2_SYSTEM),
    "gemma": gemma,
    "plain": plain,
    "base": base,
    "flamingo": flamingo,
    "t5": t5,
}


def _template(name):
    if name not in TEMPLATES:
        raise ValueError(f"unknown chat template {name!r}; choose from {sorted(TEMPLATES)}")
    return TEMPLATES[name]


def template_pieces(template, messages, system=None, add_generation_prompt=False, eos=None):
    """eos: the tokenizer's EOS token text, which the 'base' template ends answers with (default "</s>")."""
    kw = {"eos": eos} if template in ("base", "t5") and eos is not None else {}
    return _template(template)(messages, system=system, add_generation_prompt=add_generation_prompt, **kw)


def render(template, messages, system=None, add_generation_prompt=False):
    """The prompt text (without the leading BOS), e.g. for inference or to compare with HF's template."""
    return "".join(text for text, _ in template_pieces(template, messages, system, add_generation_prompt))


def pick_template(tok, name=None):
    """The template name for a checkpoint: `name` if given, else from its chat_template, else model_type."""
    if name is not None:
        _template(name)
        return name
    jinja, model_type = tok.chat_template or "", tok.model_type
    if "<|im_start|>" in jinja:
        return "smollm2" if "SmolLM" in jinja else "qwen2"
    if "<start_of_turn>" in jinja or (model_type or "").startswith("gemma"):
        return "gemma"
    if "[INST]" in jinja and "<<SYS>>" in jinja:
        return "llama2"
    if model_type == "qwen2":
        return "qwen2"
    if model_type == "t5":
        return "t5"
    if model_type in ("llama", "llava") and not jinja:  # Vicuna ships no chat_template; LLaVA-1.5's default
        return "vicuna_v1"
    raise ValueError(f"{tok.folder}: cannot tell the chat template (model_type={model_type!r}); "
                     f"pass one of {sorted(TEMPLATES)}")

# -----------------------------------------------------------------------------
# 3. Tokenizing a conversation with exact labels
#
# The rendered text is tokenized in one call (BPE merges as at inference) and each token is labelled
# from its character offsets: a token is labelled iff its characters lie inside a labelled piece. A
# token that straddles a piece boundary (e.g. the answer starts mid-word, or a tokenizer merges the role
# tag's "\n" into the answer) cannot be labelled exactly: the sample is skipped (SkipSample('mismatch')),
# where LLaVA masks the whole sample when its length arithmetic disagrees.
#
# Too long for max_len: a training sample is skipped (SkipSample('too_long'), counted by ConversationDataset),
# never cut: a cut would remove the template, the text before the image ("Image: ") and the start of the
# question, and could put an image token at position 0 (SmolLM2's attention sink). Only an inference prompt
# (truncate=True, encode_prompt: the model must still answer) has unlabelled text tokens removed from the
# left, with a warning; BOS, image tokens and labelled tokens are never removed.


class SkipSample(ValueError):
    def __init__(self, reason, detail):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def tokenize_conversation(tok, pieces, n_image_tokens=0, max_len=2048, *, bos=None, truncate=False):
    """pieces [(text, labelled)] -> (input_ids, labels), two lists of ints of equal length.
    bos=None adds BOS when the tokenizer wants one (tok.add_bos). Longer than max_len: SkipSample('too_long'),
    or with truncate=True the leftmost prompt text is cut."""
    text, spans = "", []
    for piece, labelled in pieces:
        if labelled and piece:
            spans.append((len(text), len(text) + len(piece)))
        text += piece
    enc = tok.tk.encode(text, add_special_tokens=False)
    ids = np.asarray(enc.ids, dtype=np.int64)                                 # (T,)
    ids = np.where(ids == tok.eoc_id, tok.eos_id, ids)                        # "<|endofchunk|>" is eos
    offsets = np.asarray(enc.offsets, dtype=np.int64).reshape(-1, 2)         # (T, 2) characters [s, e)
    s, e = offsets[:, :1], offsets[:, 1:]                                     # (T, 1)
    a, b = np.asarray(spans, dtype=np.int64).reshape(-1, 2).T                 # (S,) labelled spans [a, b)
    inside = ((a <= s) & (e <= b) & (s < b)).any(1)                           # (T,) token within a span
    straddle = ((s < b) & (a < e)).any(1) & ~inside                           # (T,) token across a boundary
    if straddle.any():
        t0, t1 = offsets[np.flatnonzero(straddle)[0]]
        raise SkipSample("mismatch", f"token {text[t0:t1]!r} at chars {t0}:{t1} straddles a labelled span "
                                     f"boundary in {text!r:.200}")
    image = ids == tok.image_id
    if (image & inside).any():
        raise ValueError("'<image>' inside an assistant answer; images belong in user turns")
    labels = np.where(inside, ids, IGNORE_INDEX)
    repeats = np.where(image, n_image_tokens, 1)                              # "<image>" -> n_image_tokens copies
    ids, labels = np.repeat(np.where(image, IMAGE_TOKEN, ids), repeats), np.repeat(labels, repeats)
    bos = tok.add_bos if bos is None else bos
    if bos:
        if tok.bos_id is None:
            raise ValueError(f"{tok.folder}: bos=True but this tokenizer has no BOS token")
        ids, labels = np.concatenate([[tok.bos_id], ids]), np.concatenate([[IGNORE_INDEX], labels])
    if max_len is not None and len(ids) > max_len and not truncate:
        raise SkipSample("too_long", f"{len(ids)} tokens ({int((ids == IMAGE_TOKEN).sum())} visual) > max_len={max_len}")
    if max_len is not None and len(ids) > max_len:
        removable = (labels == IGNORE_INDEX) & (ids != IMAGE_TOKEN)
        removable[0] &= not bos
        drop = np.flatnonzero(removable)[:len(ids) - max_len]                 # the leftmost prompt tokens
        if len(ids) - len(drop) > max_len:
            raise SkipSample("too_long", f"{len(ids) - len(drop)} tokens even without the prompt text "
                                         f"(answers + image tokens + BOS) > max_len={max_len}")
        keep = np.ones(len(ids), dtype=bool)
        keep[drop] = False
        warnings.warn(f"prompt of {len(ids)} tokens cut to max_len={max_len}: its first {len(drop)} text tokens dropped")
        ids, labels = ids[keep], labels[keep]
    return ids.tolist(), labels.tolist()


def stop_ids(tok, template):
    """Token ids that end a generated answer: the tokenizer's stop tokens, and for the 'plain' template
    (LLaVA stage 1: answers end with "\n", which is no special token) the newline as well."""
    return tok.stop_ids + (tok.encode("\n")[-1:] if template == "plain" else [])


def encode_prompt(tok, template, messages, n_image_tokens=0, max_len=2048, *, system=None, answer_prefix=""):
    """Inference: the prompt ids for `messages` (ending with a user turn) plus the generation prompt, then
    `answer_prefix`, text the model continues (ADEM-VL's ScienceQA evaluation: "The answer is")."""
    pieces = template_pieces(template, messages, system, add_generation_prompt=True) + [(answer_prefix, False)]
    return tokenize_conversation(tok, pieces, n_image_tokens, max_len, truncate=True)[0]

# -----------------------------------------------------------------------------
# 4. Images
#
# load_image: RGB PIL image from a path or from encoded bytes (parquet datasets). Transparency (RGBA, LA,
# palette with a transparent index) is composited on white, as HF's image processors do
# (transformers image_transforms.convert_to_rgb); 16-bit grayscale is scaled to 8 bits (PIL's own
# convert would clip it to white); grayscale, palette, CMYK, YCbCr go through PIL's convert. EXIF
# orientation is not applied (neither HF nor LLaVA do).
#
# preprocess_image -> float32 [3, H, W], three resize modes:
# - 'crop': resize the shortest side to `size` (bicubic), centre crop `crop_size` (CLIP, DINOv2;
#   HF CLIPImageProcessor / BitImageProcessor: new_long = int(size * long / short), crop offset (d // 2)).
# - 'squash': resize to size x size ignoring the aspect ratio (SigLIP; ADEM-VL/LaVIN ScienceQA's
#   Resize((224, 224), bicubic) with ImageNet mean/std, ADEM-VL util/datasets.py).
# - 'pad': LLaVA-1.5's expand2square (llava/mm_utils.py): pad to a square filled with the mean colour
#   (int(255 * mean)), then 'crop' (a no-op crop on the square).
# Then x / 255, (x - mean) / std. image_config() reads preprocessor_config.json (image_mean, image_std,
# size, crop_size, do_center_crop, resample) over these per-tower defaults (HF's defaults):

CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
TOWER_DEFAULTS = {
    "clip": dict(resize="crop", size=224, crop_size=224, mean=CLIP_MEAN, std=CLIP_STD, resample=3),
    "dinov2": dict(resize="crop", size=256, crop_size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD, resample=3),
    "siglip": dict(resize="squash", size=224, crop_size=224, mean=(0.5,) * 3, std=(0.5,) * 3, resample=3),
    "eva": dict(resize="squash", size=224, crop_size=224, mean=CLIP_MEAN, std=CLIP_STD, resample=3),  # BlipImageProcessor
}  # resample: PIL code, 3 = BICUBIC
# (mean, std) by name, for image_config(mean=, std=) overrides (train.py's image_norm)
IMAGE_NORMS = {"clip": (CLIP_MEAN, CLIP_STD), "imagenet": (IMAGENET_MEAN, IMAGENET_STD),
               "half": ((0.5,) * 3, (0.5,) * 3)}


class BadImage(ValueError):
    """An image file that cannot be decoded (load_image); train.py skips its step, counted and bounded."""


def image_name(src):
    return str(src) if isinstance(src, (str, Path)) else f"<{len(src)} bytes of image data>"


def image_problem(src):
    """Why `src` (path or bytes) is not a readable image, from its header alone (fast: nothing is decoded), or
    None. train.py checks every image this way before the first step; data past the header (a truncated file)
    fails only in load_image."""
    if isinstance(src, (str, Path)) and not Path(src).is_file():
        return "missing" if not Path(src).exists() else "not a file"
    if (Path(src).stat().st_size if isinstance(src, (str, Path)) else len(src)) == 0:
        return "empty (0 bytes)"
    try:
        with Image.open(src if isinstance(src, (str, Path)) else io.BytesIO(src)) as img:
            img.size  # the header is parsed by open(); no pixels are read
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        return f"not a readable image ({e})"
    return None


def load_image(src):
    name = image_name(src)
    try:
        img = Image.open(src if isinstance(src, (str, Path)) else io.BytesIO(src))
        img.load()  # decode now: a truncated or corrupt file fails here, not later in a worker
    except FileNotFoundError:
        raise FileNotFoundError(f"image not found: {name}") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise BadImage(f"cannot read image {name}: {e}") from None
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):  # 16-bit (or int32) grayscale -> 8 bits
        a = np.asarray(img, dtype=np.float64) / 257.0
        img = Image.fromarray(np.clip(np.round(a), 0, 255).astype(np.uint8))
    if "A" in img.getbands() or "transparency" in img.info:
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return img.convert("RGB")


def image_config(folder=None, *, tower=None, **overrides):
    """Preprocessing constants: TOWER_DEFAULTS[tower], then the folder's preprocessor_config.json, then
    overrides (e.g. resize='pad' for LLaVA-1.5, or mean/std=IMAGENET_* for ADEM-VL's ScienceQA)."""
    pp, where = {}, None
    if folder is not None:
        where = Path(folder) / "preprocessor_config.json"
        pp = _load_json(where) if where.is_file() else {}
        if tower is None:  # from the processor class or the model type: SiglipImageProcessor, "dinov2", ...
            config = _load_json(Path(folder) / "config.json") if (Path(folder) / "config.json").is_file() else {}
            kind = f"{pp.get('image_processor_type', '')} {config.get('model_type', '')}".lower()
            tower = ("siglip" if "siglip" in kind else "dinov2" if "dinov2" in kind or "bitimage" in kind
                     else "clip" if "clip" in kind else None)
    if tower not in TOWER_DEFAULTS:
        raise ValueError(f"unknown vision tower {tower!r} (folder {folder}); "
                         f"pass tower= one of {sorted(TOWER_DEFAULTS)}")
    cfg = dict(TOWER_DEFAULTS[tower])

    def side(value, key):  # 224 | {"shortest_edge": 224} | {"height": 224, "width": 224}
        if isinstance(value, int):
            return value
        if isinstance(value, dict) and "shortest_edge" in value:
            return value["shortest_edge"]
        if isinstance(value, dict) and value.get("height") is not None and value.get("height") == value.get("width"):
            return value["height"]
        raise ValueError(f"{where}: unsupported {key} {value!r} (need a square size or a shortest_edge)")

    for key in ("image_mean", "image_std"):
        if key in pp:
            cfg[key[6:]] = tuple(pp[key])
    if "resample" in pp:
        cfg["resample"] = int(pp["resample"])
    if "size" in pp:
        cfg["size"] = side(pp["size"], "size")
    if "crop_size" in pp:
        cfg["crop_size"] = side(pp["crop_size"], "crop_size")
    if pp.get("do_center_crop") is False:
        if isinstance(pp.get("size"), dict) and "shortest_edge" in pp["size"]:
            raise ValueError(f"{where}: do_center_crop=false with a shortest_edge size gives non-square images")
        cfg["resize"] = "squash"
    cfg.update(overrides)
    if cfg["resize"] not in ("crop", "squash", "pad"):
        raise ValueError(f"resize must be 'crop', 'squash' or 'pad', got {cfg['resize']!r}")
    return cfg


def expand2square(img, fill):
    w, h = img.size
    if w == h:
        return img
    out = Image.new(img.mode, (max(w, h),) * 2, fill)
    out.paste(img, ((max(w, h) - w) // 2, (max(w, h) - h) // 2))
    return out


def preprocess_image(img, cfg):
    """RGB PIL image -> float32 tensor [3, H, W] (H = W = crop_size, or size for 'squash')."""
    if cfg["resize"] == "pad":
        img = expand2square(img, tuple(int(255 * m) for m in cfg["mean"]))
    if cfg["resize"] == "squash":
        img = img.resize((cfg["size"], cfg["size"]), resample=cfg["resample"])
    else:
        w, h, s, c = *img.size, cfg["size"], cfg["crop_size"]
        w, h = (s, int(s * h / w)) if w <= h else (int(s * w / h), s)
        img = img.resize((w, h), resample=cfg["resample"])
        left, top = (w - c) // 2, (h - c) // 2
        img = img.crop((left, top, left + c, top + c))
    x = np.asarray(img, dtype=np.float32) / np.float32(255.0)  # (H, W, 3) in [0, 1]
    x = (x - np.asarray(cfg["mean"], dtype=np.float32)) / np.asarray(cfg["std"], dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))  # (3, H, W)

# Training-time augmentation, ADEM-VL's COCO-caption transform (Hao840/ADEM-VL util/coco_karpathy_dataset.py, from
# BLIP): RandomResizedCrop(size, scale (0.5, 1), bicubic), a horizontal flip with p 0.5, then BLIP's RandomAugment
# (util/randaugment.py: N=2 ops drawn with replacement from the 10 below, each applied with p 0.5, magnitude 5 of
# 10: shear 0.15, translate 5 px, rotate 15 degrees, each with a random sign, filled with grey 128; brightness and
# sharpness at magnitude 5 have factor 1.0, i.e. none). BLIP writes the ops with cv2 to match PIL's; we call
# PIL's. All draws come from `rng` (random.Random), which train.py seeds from (seed, stream position): the same
# step gets the same pixels after a resume. Evaluation never augments.
AUGMENT_OPS = ("Identity", "AutoContrast", "Brightness", "Sharpness", "Equalize", "ShearX", "ShearY", "TranslateX",
               "TranslateY", "Rotate")


def _random_resized_crop(img, size, rng, scale=(0.5, 1.0), ratio=(3 / 4, 4 / 3)):
    """torchvision's RandomResizedCrop: up to 10 tries at a random area and aspect ratio, else a centre crop."""
    w, h = img.size
    for _ in range(10):
        area = w * h * rng.uniform(*scale)
        r = np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1])))
        cw, ch = int(round(np.sqrt(area * r))), int(round(np.sqrt(area / r)))
        if 0 < cw <= w and 0 < ch <= h:
            left, top = rng.randint(0, w - cw), rng.randint(0, h - ch)
            return img.resize((size, size), Image.BICUBIC, box=(left, top, left + cw, top + ch))
    r = w / h  # the fallback: the largest centred crop inside the ratio range
    cw, ch = (w, int(round(w / ratio[0]))) if r < ratio[0] else (int(round(h * ratio[1])), h) if r > ratio[1] else (w, h)
    left, top = (w - cw) // 2, (h - ch) // 2
    return img.resize((size, size), Image.BICUBIC, box=(left, top, left + cw, top + ch))


def _augment_op(img, name, rng):
    from PIL import ImageOps
    sign = 1 if rng.random() > 0.5 else -1
    grey = (128, 128, 128)
    if name == "AutoContrast":
        return ImageOps.autocontrast(img)
    if name == "Equalize":
        return ImageOps.equalize(img)
    if name in ("ShearX", "ShearY"):  # 0.15 = magnitude 5 / 10 x 0.3
        m = (1, sign * 0.15, 0, 0, 1, 0) if name == "ShearX" else (1, 0, 0, sign * 0.15, 1, 0)
        return img.transform(img.size, Image.AFFINE, m, Image.BILINEAR, fillcolor=grey)
    if name in ("TranslateX", "TranslateY"):  # 5 px = magnitude 5 / 10 x 10
        m = (1, 0, sign * 5, 0, 1, 0) if name == "TranslateX" else (1, 0, 0, 0, 1, sign * 5)
        return img.transform(img.size, Image.AFFINE, m, fillcolor=grey)
    if name == "Rotate":  # 15 degrees = magnitude 5 / 10 x 30
        return img.rotate(sign * 15, fillcolor=grey)
    return img  # Identity; Brightness and Sharpness at factor 1.0


def augment_image(img, cfg, rng):
    """RGB PIL image -> float32 [3, size, size], ADEM-VL's training transform (above), normalised with cfg's mean/std."""
    img = _random_resized_crop(img, cfg["size"] if cfg["resize"] == "squash" else cfg["crop_size"], rng)
    if rng.random() < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    for name in [rng.choice(AUGMENT_OPS) for _ in range(2)]:
        if rng.random() <= 0.5:  # BLIP: skipped when random() > prob
            img = _augment_op(img, name, rng)
    x = np.asarray(img, dtype=np.float32) / np.float32(255.0)  # (H, W, 3)
    x = (x - np.asarray(cfg["mean"], dtype=np.float32)) / np.asarray(cfg["std"], dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))  # (3, H, W)

# -----------------------------------------------------------------------------
# 5. Dataset readers -> lists of sample dicts (see the top of the file). Readers never open images (a
# missing image is reported by load_image, naming the file, when it is used).

VQA_PROMPT_LLAVA = "{q}\nAnswer the question using a single word or phrase."  # LLaVA-1.5's short-answer suffix
VQA_PROMPT_SHORT = "Question: {q} Short answer:"  # BLIP-2 / LAVIS style
CAPTION_PROMPT = "Provide a one-sentence caption for the provided image."


def _user(text, image):
    return f"{IMAGE_PLACEHOLDER}\n{text}" if image is not None else text


def easy_vqa_root():
    spec = importlib.util.find_spec("easy_vqa")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("easy-VQA is not installed: pip install --no-deps easy-vqa")
    return Path(list(spec.submodule_search_locations)[0]) / "data"


EASY_VQA_SHAPES = ("circle", "rectangle", "triangle")


def easy_vqa_type(answer):
    """easy-VQA's three question types, told apart by the answer: 'yes/no', 'shape' or 'colour'."""
    return "yes/no" if answer in ("yes", "no") else "shape" if answer in EASY_VQA_SHAPES else "colour"


def read_easy_vqa(split="train", *, prompt=VQA_PROMPT_LLAVA, root=None):
    """easy-VQA (PyPI easy-vqa): {split}/questions.json holds [question, answer, image_id] triples, images
    are {split}/images/{image_id}.png (64x64), answers.txt the 13 answers."""
    root = Path(root) if root is not None else easy_vqa_root()
    path = root / split / "questions.json"
    entries = _load_json(path)
    if not isinstance(entries, list):
        raise ValueError(f"{path}: expected a list of [question, answer, image_id]")
    samples = []
    for i, entry in enumerate(entries):
        if not (isinstance(entry, list) and len(entry) == 3 and isinstance(entry[0], str)
                and isinstance(entry[1], str) and isinstance(entry[2], int)):
            raise ValueError(f"{path}: entry {i} should be [question: str, answer: str, image_id: int], "
                             f"got {entry!r:.100}")
        q, a, image_id = entry
        image = str(root / split / "images" / f"{image_id}.png")
        samples.append({"id": f"easyvqa-{split}-{i}", "image": image,
                        "messages": [("user", _user(prompt.format(q=q), image)), ("assistant", a)],
                        "answers": [a], "question": q, "image_id": image_id, "question_type": easy_vqa_type(a)})
    return samples


def scienceqa_prompt(problem, prompt_format="CQM-A", caption="", options="ABCDE"):
    """(question text, answer text) as ADEM-VL / LaVIN util/base_prompt.py create_training_example:
    context = hint (+ caption) or "N/A"; options "(A) c1 (B) c2"; newlines in lecture / solution become a
    literal backslash-n; input ends with "Response:". Output formats: 'A' "The answer is X."; as in that
    code, 'AL' appends the *solution*, 'AE' the *lecture*, 'ALE' "lecture solution" after " BECAUSE: " (an
    empty explanation leaves a dangling "BECAUSE:", as the reference's clean-up never takes effect)."""
    in_fmt, _, out_fmt = prompt_format.partition("-")
    context = " ".join([problem["hint"], caption]).strip() or "N/A"
    choices = " ".join(f"({options[i]}) {c}" for i, c in enumerate(problem["choices"]))
    question = problem["question"]
    if in_fmt == "CQM":
        text = f"Context: {context}\nQuestion: {question}\nOptions: {choices}\n"
    elif in_fmt == "QCM":
        text = f"Question: {question}\nContext: {context}\nOptions: {choices}\n"
    else:
        raise ValueError(f"unsupported ScienceQA input format {in_fmt!r} (CQM or QCM)")
    lecture, solution = problem["lecture"].replace("\n", "\\n"), problem["solution"].replace("\n", "\\n")
    answer = f"The answer is {options[problem['answer']]}."
    explanation = {"A": None, "AL": solution, "AE": lecture, "ALE": f"{lecture} {solution}"}
    if out_fmt not in explanation:
        raise ValueError(f"unsupported ScienceQA output format {out_fmt!r} (A, AL, AE or ALE)")
    if explanation[out_fmt] is not None:
        answer += f" BECAUSE: {explanation[out_fmt]}"
    return (text + "Response:").replace("  ", " ").strip(), answer.replace("  ", " ").strip()


SQA_FIELDS = ("question", "choices", "answer", "hint", "lecture", "solution")


def _scienceqa_sample(pid, problem, image, where, prompt_format, caption, options):
    for key, kind in zip(SQA_FIELDS, (str, list, int, str, str, str)):
        _get(problem, key, kind, where)
    if not 0 <= problem["answer"] < len(problem["choices"]) <= len(options):
        raise ValueError(f"{where}: answer index {problem['answer']} / {len(problem['choices'])} choices is invalid "
                         f"(at most {len(options)} choices)")
    question, answer = scienceqa_prompt(problem, prompt_format, caption, options)
    meta = {k: problem.get(k) for k in ("subject", "grade", "topic", "category", "skill", "task")}
    return {"id": str(pid), "image": image, "messages": [("user", _user(question, image)), ("assistant", answer)],
            "answers": [options[problem["answer"]]], "answer_index": problem["answer"],
            "choices": problem["choices"], "hint": problem["hint"], "has_image": image is not None, **meta}


def read_scienceqa(root, split="train", *, prompt_format="CQM-A", captions_file=None, options="ABCDE"):
    """ScienceQA in either public layout under `root`:
    - the release (lupantech/ScienceQA): problems.json + pid_splits.json + images/{split}/{pid}/image.png;
      splits train / val / test / minival / minitest; ids are the pids.
    - Hugging Face parquet (derek-thomas/ScienceQA): {split}-*.parquet (anywhere under root) with columns
      image ({'bytes', 'path'} or null), question, choices, answer, hint, task, grade, subject, topic,
      category, skill, lecture, solution; split 'val' reads 'validation'; ids are "{split}-{row}".
    Training default CQM-A without captions (ADEM-VL train.py); captions_file ({"captions": {pid: text}},
    json layout only) turns on use_caption. 'answers' holds the letter."""
    root = Path(root)
    captions = _get(_load_json(captions_file), "captions", dict, captions_file) if captions_file else {}
    if (root / "problems.json").is_file():
        problems = _load_json(root / "problems.json")
        splits_path = root / "pid_splits.json"
        split_key = {"validation": "val"}.get(split, split)
        pids = _get(_load_json(splits_path), split_key, list, splits_path)
        samples = []
        for pid in pids:
            where = f"{root / 'problems.json'}: problem {pid}"
            if pid not in problems:
                raise ValueError(f"{splits_path}: pid {pid} of split {split_key!r} is not in problems.json")
            problem = problems[pid]
            image = None
            if _get(problem, "image", (str, type(None)), where):
                image = str(root / "images" / _get(problem, "split", str, where) / pid / problem["image"])
            samples.append(_scienceqa_sample(pid, problem, image, where, prompt_format,
                                             captions.get(pid, ""), options))
        return samples
    name = {"val": "validation"}.get(split, split)
    files = sorted({*root.rglob(f"{name}-*.parquet"), *root.rglob(f"{name}.parquet")})
    if not files:
        raise FileNotFoundError(f"{root}: neither problems.json (ScienceQA release) nor {name}-*.parquet "
                                "(Hugging Face layout) found")
    if captions_file:
        raise ValueError("captions_file needs the json layout (the parquet layout has no pids)")
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError("reading ScienceQA parquet files needs pyarrow: pip install pyarrow") from None
    samples = []
    for path in files:
        table = pq.read_table(path)
        missing = [c for c in ("image", *SQA_FIELDS) if c not in table.column_names]
        if missing:
            raise ValueError(f"{path}: missing column(s) {missing} (have {table.column_names})")
        for row, problem in enumerate(table.to_pylist()):
            where = f"{path}: row {row}"
            image = problem["image"]
            if isinstance(image, dict):  # HF datasets Image feature: {'bytes': ..., 'path': ...}
                image = image.get("bytes") or image.get("path")
            if image is not None and not isinstance(image, (bytes, str)):
                raise ValueError(f"{where}: column 'image' should hold bytes, got {type(image).__name__}")
            samples.append(_scienceqa_sample(f"{name}-{len(samples)}", problem, image, where,
                                             prompt_format, "", options))
    return samples


def vqav2_files(root, split):
    """(questions file, annotations file or None) under the official names: split 'train' / 'val' (2014, with
    annotations), 'test' / 'test-dev' (2015, none)."""
    root, year = Path(root), "2015" if split.startswith("test") else "2014"
    questions = root / f"v2_OpenEnded_mscoco_{split}{year}_questions.json"
    return questions, None if split.startswith("test") else root / f"v2_mscoco_{split}{year}_annotations.json"


def read_vqav2(questions_file, annotations_file=None, *, image_root, prompt=VQA_PROMPT_LLAVA, subtype=None):
    """VQAv2 (visualqa.org): the questions JSON ({'questions': [{question_id, image_id, question}],
    'data_subtype': 'val2014'}), the optional annotations JSON ({'annotations': [{question_id, answers: [10 x
    {answer}], multiple_choice_answer, answer_type, question_type}]}) and COCO images
    {image_root}/COCO_{subtype}_{image_id:012d}.jpg, or {image_root}/{subtype}/... when that folder exists
    (COCO's own layout). The training target is multiple_choice_answer; 'answers' keeps the 10 human answers
    for the VQA accuracy. Without annotations (test-dev) samples end with the user turn, 'answers' empty."""
    qdata = _load_json(questions_file)
    questions = _get(qdata, "questions", list, questions_file)
    subtype = subtype or _get(qdata, "data_subtype", str, f"{questions_file} (or pass subtype=)")
    image_root = Path(image_root) / subtype if (Path(image_root) / subtype).is_dir() else Path(image_root)
    annotations = {}
    if annotations_file is not None:
        for i, ann in enumerate(_get(_load_json(annotations_file), "annotations", list, annotations_file)):
            annotations[_get(ann, "question_id", int, f"{annotations_file}: annotation {i}")] = (i, ann)
    samples = []
    for i, q in enumerate(questions):
        where = f"{questions_file}: question {i}"
        qid, image_id = _get(q, "question_id", int, where), _get(q, "image_id", int, where)
        text = _get(q, "question", str, where)
        image = str(image_root / f"COCO_{subtype}_{image_id:012d}.jpg")
        sample = {"id": str(qid), "image": image, "messages": [("user", _user(prompt.format(q=text), image))],
                  "answers": [], "question": text, "image_id": image_id}
        if annotations_file is not None:
            if qid not in annotations:
                raise ValueError(f"{annotations_file}: no annotation for question_id {qid}")
            j, ann = annotations[qid]
            where = f"{annotations_file}: annotation {j}"
            answers = [_get(a, "answer", str, f"{where} answers") for a in _get(ann, "answers", list, where)]
            target = _get(ann, "multiple_choice_answer", str, where)
            sample["messages"].append(("assistant", target))
            sample.update(answers=answers, answer_type=ann.get("answer_type"), question_type=ann.get("question_type"))
        samples.append(sample)
    return samples


def caption_target(prompt, caption):
    """The training target of a caption. A prompt the caption continues (it ends in a letter: ADEM-VL's and BLIP's
    "a picture of") gets the caption after a space that the caption owns: tokenizers attach a word's space to the
    word, and the label mask must not cut through a token."""
    return (" " if prompt[-1:].isalpha() else "") + caption.strip()


def read_coco_karpathy(path, *, image_root, split=None, prompt=CAPTION_PROMPT, per_caption=False):
    """COCO captions on the Karpathy split, from either file:
    - LAVIS coco_karpathy_{train,val,test}.json: [{'image': 'val2014/COCO_val2014_....jpg', 'caption': str
      or [str], 'image_id': ...}] (train has one entry per caption); `split` is not needed.
    - Karpathy's dataset_coco.json: {'images': [{'filepath', 'filename', 'cocoid', 'split', 'sentences':
      [{'raw'}]}]}; split 'train' includes 'restval' (113,287 images), 'val' / 'test' 5,000 each.
    One sample per image ('answers' = all its references, the target is the first), or per_caption=True:
    one per caption (for training). The user turn is "<image>\\n{prompt}" ("<image>" alone for prompt="")."""
    data = _load_json(path)
    images = {}  # image path -> (id, [captions]), in file order
    if isinstance(data, dict):
        if split is None:
            raise ValueError(f"{path}: dataset_coco.json holds every split; pass split='train'|'val'|'test'")
        wanted = {"train": ("train", "restval")}.get(split, (split,))
        for i, img in enumerate(_get(data, "images", list, path)):
            where = f"{path}: images[{i}]"
            if _get(img, "split", str, where) not in wanted:
                continue
            file = Path(image_root) / _get(img, "filepath", str, where) / _get(img, "filename", str, where)
            refs = [_get(s, "raw", str, f"{where} sentences") for s in _get(img, "sentences", list, where)]
            images[str(file)] = (str(img.get("cocoid", img["filename"])), refs)
    elif isinstance(data, list):
        for i, entry in enumerate(data):
            where = f"{path}: entry {i}"
            file = str(Path(image_root) / _get(entry, "image", str, where))
            caption = _get(entry, "caption", (str, list), where)
            captions = [caption] if isinstance(caption, str) else caption
            if not all(isinstance(c, str) for c in captions):
                raise ValueError(f"{where}: field 'caption' should hold strings")
            images.setdefault(file, (str(entry.get("image_id", entry["image"])), []))[1].extend(captions)
    else:
        raise ValueError(f"{path}: expected a LAVIS list of entries or dataset_coco.json's {{'images': [...]}}")
    samples = []
    for file, (image_id, refs) in images.items():
        if not refs:
            raise ValueError(f"{path}: image {file} has no captions")
        user = IMAGE_PLACEHOLDER + (f"\n{prompt}" if prompt else "")
        for k, target in enumerate(refs if per_caption else refs[:1]):
            samples.append({"id": f"{image_id}-{k}" if per_caption else image_id, "image": file,
                            "messages": [("user", user), ("assistant", caption_target(prompt, target))],
                            "answers": refs, "image_id": image_id})
    return samples


def read_llava_json(path, *, image_root=None):
    """LLaVA-style instruction data: [{'id', 'image' (optional, relative to image_root), 'conversations':
    [{'from': 'human'|'gpt', 'value'}]}]. Turns must alternate human/gpt, starting with human and ending with
    gpt. As LLaVA's preprocess_multimodal, the first human turn of a sample with an image gets "<image>\\n" at
    its front (moved there, or added when missing); one image per sample."""
    data = _load_json(path)
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a list of samples")
    roles = {"human": "user", "gpt": "assistant"}
    samples = []
    for i, entry in enumerate(data):
        where = f"{path}: entry {i} (id {entry.get('id') if isinstance(entry, dict) else None})"
        conversations = _get(entry, "conversations", list, where)
        image = entry.get("image")
        if image is not None and not isinstance(image, str):
            raise ValueError(f"{where}: field 'image' should be a file name, got {type(image).__name__}")
        messages = []
        for j, turn in enumerate(conversations):
            source = _get(turn, "from", str, f"{where} conversations[{j}]")
            value = _get(turn, "value", str, f"{where} conversations[{j}]")
            if source not in roles:
                raise ValueError(f"{where} conversations[{j}]: 'from' is {source!r}, expected 'human' or 'gpt'")
            if roles[source] != ("user", "assistant")[j % 2]:
                raise ValueError(f"{where} conversations[{j}]: turns must alternate human/gpt starting with human")
            messages.append((roles[source], value))
        if not messages or messages[-1][0] != "assistant":
            raise ValueError(f"{where}: conversations must end with a 'gpt' turn")
        n_placeholders = sum(text.count(IMAGE_PLACEHOLDER) for _, text in messages)
        if image is None and n_placeholders:
            raise ValueError(f"{where}: '<image>' in the text but no 'image' field")
        if image is not None:
            if n_placeholders > 1:
                raise ValueError(f"{where}: {n_placeholders} '<image>' placeholders for one image")
            if n_placeholders and IMAGE_PLACEHOLDER not in messages[0][1]:
                raise ValueError(f"{where}: '<image>' must be in the first human turn")
            messages[0] = ("user", _user(messages[0][1].replace(IMAGE_PLACEHOLDER, "").strip(), image))
            image = str(Path(image_root) / image) if image_root is not None else image
        samples.append({"id": str(entry.get("id", i)), "image": image, "messages": messages,
                        "answers": [messages[-1][1]]})
    return samples


def _mmc4_entry(doc, where, sim_threshold, max_images):
    """An mmC4 document (Zhu et al. 2023, allenai/mmc4: {'url', 'text_list': [sentences], 'image_info':
    [{'image_name', 'matched_text_index', 'matched_sim', 'raw_url', ...}], 'similarity_matrix', ...}) ->
    {'images', 'text'} as open_flamingo train/data.py preprocess_interleaved builds its text: images whose
    matched_sim is below sim_threshold (None: keep all) are dropped, the first max_images kept (in image_info
    order, OpenFlamingo's 6), each sentence with an image gets "<|endofchunk|><image>" in front, the sentences
    are joined with spaces, the first "<|endofchunk|>" is removed and one is appended. Deviations: the matching
    is mmC4's own matched_text_index (OpenFlamingo recomputes the same one-to-one assignment from
    similarity_matrix with linear_sum_assignment, over the images it could decode, >= 10 KB); images are listed
    in the order they appear in the text (OpenFlamingo keeps image_info order, which can disagree with it)."""
    sentences = list(_get(doc, "text_list", list, where))
    if not all(isinstance(t, str) for t in sentences):
        raise ValueError(f"{where}: field 'text_list' should hold strings")
    matched = []
    for k, info in enumerate(_get(doc, "image_info", list, where)):
        w = f"{where} image_info[{k}]"
        name, ix = _get(info, "image_name", str, w), _get(info, "matched_text_index", int, w)
        if not 0 <= ix < len(sentences):
            raise ValueError(f"{w}: matched_text_index {ix} is out of range for {len(sentences)} sentences")
        if sim_threshold is not None and _get(info, "matched_sim", (int, float), w) < sim_threshold:
            continue
        matched.append((ix, name))
    matched = matched[:max_images] if max_images else matched
    if not matched:
        raise ValueError(f"{where}: no image left (of {len(doc['image_info'])}) after the similarity threshold")
    for ix, _ in matched:
        sentences[ix] = f"{ENDOFCHUNK}{IMAGE_PLACEHOLDER}{sentences[ix]}"
    text = " ".join(sentences).replace(ENDOFCHUNK, "", 1)
    text = (text.replace(" " + ENDOFCHUNK, ENDOFCHUNK).replace(IMAGE_PLACEHOLDER + " ", IMAGE_PLACEHOLDER)
            .replace(" " + IMAGE_PLACEHOLDER, IMAGE_PLACEHOLDER)) + ENDOFCHUNK  # OpenFlamingo's whitespace cleanup
    out = {"images": [name for _, name in sorted(matched, key=lambda m: m[0])], "text": text}
    return {**out, "id": doc["url"]} if isinstance(doc.get("url"), str) else out


def _load_jsonl(path):
    """One JSON value per non-empty line (mmC4's docs_shard_{i}_v2.jsonl)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: line {n + 1} is not valid JSON ({e})") from None
    return out


def read_interleaved(path, *, image_root=None, sim_threshold=None, max_images=6):
    """Interleaved image-text sequences in OpenFlamingo's text format (open_flamingo train/data.py: MMC4 and
    its ChatGPT-generated sequences): [{'id', 'images': [file, ...], 'text': "Intro.<image>A cat sits.
    <|endofchunk|><image>A dog runs.<|endofchunk|>"}], one file per "<image>", in order (relative to
    image_root). Spaces around "<image>" and before "<|endofchunk|>" are removed, as OpenFlamingo does.
    The file is a JSON list or JSON lines (.jsonl); an entry may also be an mmC4 document (text_list,
    image_info: see _mmc4_entry, which sim_threshold and max_images are for; images are image_root/image_name).
    The text becomes turns for the 'flamingo' template whose labels are OpenFlamingo's (train_utils.py):
    nothing before the first "<image>" nor "<image>" itself; everything after an "<image>" up to and including
    the next "<|endofchunk|>"; nothing between an "<|endofchunk|>" and the next "<image>". So each user turn is
    [the text after the previous chunk] + "<image>" and each answer is a chunk without its "<|endofchunk|>"
    (the template appends it). A chunk must end with "<|endofchunk|>" before the next "<image>"; the last one
    may omit it (OpenFlamingo appends one); text after the last chunk carries no label and is dropped.
    'answers' is the last chunk (as a few-shot prompt, the earlier chunks are the examples)."""
    data = _load_jsonl(path) if str(path).endswith(".jsonl") else _load_json(path)
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a list of {{'images': [...], 'text': ...}} entries")
    samples = []
    for i, entry in enumerate(data):
        where = f"{path}: entry {i} (id {entry.get('id') if isinstance(entry, dict) else None})"
        if isinstance(entry, dict) and "text_list" in entry:
            entry = _mmc4_entry(entry, f"{path}: entry {i} (url {entry.get('url')})", sim_threshold, max_images)
        files, text = _get(entry, "images", list, where), _get(entry, "text", str, where)
        if not all(isinstance(f, str) for f in files):
            raise ValueError(f"{where}: field 'images' should hold file names")
        text = (text.replace(" " + ENDOFCHUNK, ENDOFCHUNK).replace(IMAGE_PLACEHOLDER + " ", IMAGE_PLACEHOLDER)
                .replace(" " + IMAGE_PLACEHOLDER, IMAGE_PLACEHOLDER))
        before, *chunks = text.split(IMAGE_PLACEHOLDER)
        if not chunks or len(chunks) != len(files):
            raise ValueError(f"{where}: {len(chunks)} '<image>' in the text but {len(files)} images (at least one)")
        messages = []
        for k, chunk in enumerate(chunks):
            answer, eoc, after = chunk.partition(ENDOFCHUNK)
            if not eoc and k < len(chunks) - 1:
                raise ValueError(f"{where}: the text of image {k + 1} runs into the next '<image>' without "
                                 f"'{ENDOFCHUNK}'")
            messages += [("user", before + IMAGE_PLACEHOLDER), ("assistant", answer)]
            before = after
        images = [str(Path(image_root) / f) if image_root is not None else f for f in files]
        samples.append({"id": str(entry.get("id", i)), "image": images[0], "images": images, "messages": messages,
                        "answers": [messages[-1][1]]})
    return samples


def _most_common(answers):
    """The most frequent answer, the first given on a tie (Counter.most_common keeps insertion order)."""
    return Counter(answers).most_common(1)[0][0]


def okvqa_files(root, split):
    """OK-VQA v1.1 (okvqa.allenai.org) under its official names: (OpenEnded_mscoco_{split}2014_questions.json,
    mscoco_{split}2014_annotations.json), split 'train' | 'val'."""
    root = Path(root)
    return root / f"OpenEnded_mscoco_{split}2014_questions.json", root / f"mscoco_{split}2014_annotations.json"


def read_okvqa(questions_file, annotations_file, *, image_root, prompt=VQA_PROMPT_SHORT, subtype=None):
    """OK-VQA (Marino et al. 2019) in its VQAv2-style files: questions {'data_subtype': 'val2014', 'questions':
    [{question_id, image_id, question}]}, annotations {'annotations': [{question_id, answers: [10 x {answer,
    raw_answer, ...}], answer_type, question_type}]} (no multiple_choice_answer, unlike VQAv2) and COCO 2014
    images named as in read_vqav2. The training target is the most frequent of the 10 answers (the first on a
    tie); 'answers' keeps all 10 for the VQA accuracy (metrics.vqa_score, as LAVIS scores OK-VQA)."""
    qdata = _load_json(questions_file)
    questions = _get(qdata, "questions", list, questions_file)
    named = re.search(r"(train|val)2014", Path(questions_file).name)  # the official names carry the subtype
    if not subtype and "data_subtype" not in qdata and named:
        subtype = named.group(0)
    subtype = subtype or _get(qdata, "data_subtype", str, f"{questions_file} (or pass subtype=)")
    image_root = Path(image_root) / subtype if (Path(image_root) / subtype).is_dir() else Path(image_root)
    annotations = {}
    for i, ann in enumerate(_get(_load_json(annotations_file), "annotations", list, annotations_file)):
        annotations[_get(ann, "question_id", int, f"{annotations_file}: annotation {i}")] = (i, ann)
    samples = []
    for i, q in enumerate(questions):
        where = f"{questions_file}: question {i}"
        qid, image_id, text = (_get(q, "question_id", int, where), _get(q, "image_id", int, where),
                               _get(q, "question", str, where))
        if qid not in annotations:
            raise ValueError(f"{annotations_file}: no annotation for question_id {qid}")
        j, ann = annotations[qid]
        where = f"{annotations_file}: annotation {j}"
        answers = [_get(a, "answer", str, f"{where} answers") for a in _get(ann, "answers", list, where)]
        if not answers:
            raise ValueError(f"{where}: field 'answers' is empty")
        image = str(image_root / f"COCO_{subtype}_{image_id:012d}.jpg")
        samples.append({"id": str(qid), "image": image, "messages": [("user", _user(prompt.format(q=text), image)),
                                                                     ("assistant", _most_common(answers))],
                        "answers": answers, "question": text, "image_id": image_id,
                        "answer_type": ann.get("answer_type"), "question_type": ann.get("question_type")})
    return samples


OPTIONS_SUFFIX = "Answer with the option's letter from the given choices directly."  # LLaVA-1.5's MC suffix


def choices_prompt(question, choices, options="ABCDEFGH"):
    """'{question}\\nA. c1\\nB. c2\\n...' + the LLaVA-1.5 multiple-choice instruction."""
    lines = [f"{options[k]}. {c}" for k, c in enumerate(choices)]
    return "\n".join([question, *lines, OPTIONS_SUFFIX])


def read_aokvqa(path, *, image_root, mode="da", prompt=VQA_PROMPT_SHORT):
    """A-OKVQA (Schwenk et al. 2022; allenai/aokvqa load_aokvqa.py) from aokvqa_v1p0_{split}.json: [{question_id,
    image_id, question, choices: [4], correct_choice_idx, direct_answers: [10], difficult_direct_answer,
    rationales: [3], split}] (the test split has no correct_choice_idx / direct_answers / rationales); images
    are COCO 2017, {image_root}/{split}2017/{image_id:012d}.jpg (get_coco_path).
    mode 'mc': the user turn lists the choices as letters (choices_prompt), the target is the letter, 'answers'
    the correct choice's text (metrics.aokvqa_score compares choice strings). mode 'da': `prompt` with the
    question, the target the most frequent direct answer, 'answers' the 10 direct answers.
    Samples keep choices, correct_choice_idx, direct_answers, difficult_direct_answer and rationales."""
    if mode not in ("mc", "da"):
        raise ValueError(f"A-OKVQA mode must be 'mc' or 'da', got {mode!r}")
    data = _load_json(path)
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a list of questions")
    samples = []
    for i, entry in enumerate(data):
        where = f"{path}: entry {i} (question_id {entry.get('question_id') if isinstance(entry, dict) else None})"
        qid, text = _get(entry, "question_id", str, where), _get(entry, "question", str, where)
        image_id, split = _get(entry, "image_id", int, where), _get(entry, "split", str, where)
        choices = _get(entry, "choices", list, where)
        if not choices or not all(isinstance(c, str) for c in choices):
            raise ValueError(f"{where}: field 'choices' should hold strings")
        image = str(Path(image_root) / f"{split}2017" / f"{image_id:012d}.jpg")
        sample = {"id": qid, "image": image, "question": text, "image_id": image_id, "choices": choices,
                  "answers": [], "rationales": entry.get("rationales")}
        has_answers = "correct_choice_idx" in entry or "direct_answers" in entry
        if has_answers:
            idx = _get(entry, "correct_choice_idx", int, where)
            if not 0 <= idx < len(choices):
                raise ValueError(f"{where}: correct_choice_idx {idx} is out of range for {len(choices)} choices")
            direct = _get(entry, "direct_answers", list, where)
            if not direct or not all(isinstance(a, str) for a in direct):
                raise ValueError(f"{where}: field 'direct_answers' should hold strings")
            sample.update(correct_choice_idx=idx, direct_answers=direct,
                          difficult_direct_answer=_get(entry, "difficult_direct_answer", bool, where))
        if mode == "mc":
            sample["messages"] = [("user", _user(choices_prompt(text, choices), image))]
            if has_answers:
                sample["messages"].append(("assistant", "ABCDEFGH"[idx]))
                sample["answers"] = [choices[idx]]
        else:
            sample["messages"] = [("user", _user(prompt.format(q=text), image))]
            if has_answers:
                sample["messages"].append(("assistant", _most_common(direct)))
                sample["answers"] = direct
        samples.append(sample)
    return samples


def _textvqa_image(image_root, split, image_id):
    """TextVQA / TextCaps images: train and val in train_images/, test in test_images/ (the official
    train_val_images.zip and test_images.zip), {image_id}.jpg."""
    return str(Path(image_root) / ("test_images" if split == "test" else "train_images") / f"{image_id}.jpg")


def _textvqa_data(path):
    """The 'data' list of a TextVQA / TextCaps release file ({'dataset_name', 'dataset_version', 'data': [...]})."""
    return _get(_load_json(path), "data", list, path)


def read_textvqa(path, *, image_root, split=None, prompt=VQA_PROMPT_SHORT):
    """TextVQA 0.5.1 (Singh et al. 2019) from TextVQA_0.5.1_{split}.json: {'data': [{question_id, question,
    image_id, answers: [10] (not in test), set_name, ...}]}; images as _textvqa_image (split from the file's
    set_name unless given). Target: the most frequent answer; 'answers' the 10 for the VQA accuracy. No OCR
    tokens in the prompt (InstructBLIP / PETAL prompt with the question only)."""
    samples = []
    for i, entry in enumerate(_textvqa_data(path)):
        where = f"{path}: data[{i}]"
        qid, text = _get(entry, "question_id", int, where), _get(entry, "question", str, where)
        image_id = _get(entry, "image_id", str, where)
        image = _textvqa_image(image_root, split or _get(entry, "set_name", str, where), image_id)
        sample = {"id": str(qid), "image": image, "messages": [("user", _user(prompt.format(q=text), image))],
                  "answers": [], "question": text, "image_id": image_id}
        if "answers" in entry:
            answers = _get(entry, "answers", list, where)
            if not answers or not all(isinstance(a, str) for a in answers):
                raise ValueError(f"{where}: field 'answers' should be a non-empty list of strings")
            sample["messages"].append(("assistant", _most_common(answers)))
            sample["answers"] = answers
        samples.append(sample)
    return samples


def read_textcaps(path, *, image_root, split=None, prompt=CAPTION_PROMPT, per_caption=False):
    """TextCaps 0.1 (Sidorov et al. 2020) from TextCaps_0.1_{split}.json: {'data': [{image_id, set_name,
    caption_str, reference_strs: [5], ...}]}, one entry per caption in train / val (each with the image's
    reference_strs), one per image without captions in test. Images as _textvqa_image. One sample per image
    ('answers' = reference_strs, the target its first caption), or per_caption=True: one per caption entry."""
    images = {}  # image_id -> (set_name, [captions], references)
    for i, entry in enumerate(_textvqa_data(path)):
        where = f"{path}: data[{i}]"
        image_id, set_name = _get(entry, "image_id", str, where), split or _get(entry, "set_name", str, where)
        captions, refs = [], []
        if "caption_str" in entry or "reference_strs" in entry:
            captions = [_get(entry, "caption_str", str, where)]
            refs = _get(entry, "reference_strs", list, where)
            if not refs or not all(isinstance(r, str) for r in refs):
                raise ValueError(f"{where}: field 'reference_strs' should be a non-empty list of strings")
        item = images.setdefault(image_id, (set_name, [], refs))
        item[1].extend(captions)
    samples = []
    for image_id, (set_name, captions, refs) in images.items():
        image = _textvqa_image(image_root, set_name, image_id)
        user = IMAGE_PLACEHOLDER + (f"\n{prompt}" if prompt else "")
        if not captions:  # test: nothing to train on or score against
            samples.append({"id": image_id, "image": image, "messages": [("user", user)], "answers": [],
                            "image_id": image_id})
        for k, target in enumerate(captions if per_caption else captions[:1]):
            samples.append({"id": f"{image_id}-{k}" if per_caption else image_id, "image": image,
                            "messages": [("user", user), ("assistant", caption_target(prompt, target))], "answers": refs,
                            "image_id": image_id})
    return samples


def read_flickr30k_karpathy(path, *, image_root, split, prompt=CAPTION_PROMPT, per_caption=False):
    """Flickr30K on the Karpathy split, from Karpathy's dataset_flickr30k.json: {'images': [{'filename', 'imgid',
    'split': 'train' | 'val' | 'test', 'sentences': [{'raw', 'tokens'}], ...}]} (29,000 / 1,014 / 1,000 images;
    the same layout as dataset_coco.json without 'filepath'). Images: {image_root}/{filename} (the
    flickr30k-images folder). One sample per image ('answers' = its 5 references, the target the first), or
    per_caption=True: one per caption."""
    samples = []
    for i, img in enumerate(_get(_load_json(path), "images", list, path)):
        where = f"{path}: images[{i}]"
        if _get(img, "split", str, where) != split:
            continue
        file = str(Path(image_root) / _get(img, "filename", str, where))
        refs = [_get(s, "raw", str, f"{where} sentences") for s in _get(img, "sentences", list, where)]
        if not refs:
            raise ValueError(f"{where}: no sentences")
        image_id = str(img.get("imgid", img["filename"]))
        user = IMAGE_PLACEHOLDER + (f"\n{prompt}" if prompt else "")
        for k, target in enumerate(refs if per_caption else refs[:1]):
            samples.append({"id": f"{image_id}-{k}" if per_caption else image_id, "image": file,
                            "messages": [("user", user), ("assistant", caption_target(prompt, target))], "answers": refs,
                            "image_id": image_id})
    return samples


MMLU_LETTERS = "ABCD"


def mmlu_prompt(subject, question, choices):
    """Zero-shot MMLU prompt as hendrycks/test evaluate.py (gen_prompt with k = 0, format_example):
    'The following are multiple choice questions (with answers) about  {subject}.\\n\\n{q}\\nA. a\\n...\\nAnswer:', with
    the reference's double space (format_subject puts a space before every word of the subject)."""
    head = f"The following are multiple choice questions (with answers) about  {subject.replace('_', ' ')}.\n\n"
    return head + question + "".join(f"\n{MMLU_LETTERS[k]}. {c}" for k, c in enumerate(choices)) + "\nAnswer:"


def read_mmlu(root, split="test", *, subjects=None):
    """MMLU (Hendrycks et al. 2021; the official data.tar: data/{split}/{subject}_{split}.csv, split 'dev' (5 per
    subject), 'val' or 'test'; no header; columns question, A, B, C, D, answer letter). Text only, zero-shot
    (mmlu_prompt); the target is the letter (the reference compares the next-token logits of " A" .. " D" after
    "Answer:"; here the answer is generated and its letter parsed). `subjects`: only these (default: every CSV)."""
    import csv
    folder = Path(root) / split
    if not folder.is_dir() and (Path(root) / "data" / split).is_dir():
        folder = Path(root) / "data" / split
    files = sorted(folder.glob(f"*_{split}.csv"))
    if not files:
        raise FileNotFoundError(f"{folder}: no {{subject}}_{split}.csv files (MMLU's data/{split}/ layout)")
    if subjects is not None:
        have = {f.name[:-len(f"_{split}.csv")]: f for f in files}
        missing = [s for s in subjects if s not in have]
        if missing:
            raise FileNotFoundError(f"{folder}: no {missing[0]}_{split}.csv")
        files = [have[s] for s in subjects]
    samples = []
    for path in files:
        subject = path.name[:-len(f"_{split}.csv")]
        with open(path, newline="", encoding="utf-8") as f:
            for row, fields in enumerate(csv.reader(f)):
                where = f"{path}: row {row + 1}"
                if len(fields) != 6:
                    raise ValueError(f"{where}: expected 6 columns (question, A, B, C, D, answer), got {len(fields)}")
                question, *choices, answer = fields
                if answer not in MMLU_LETTERS:
                    raise ValueError(f"{where}: answer should be one of A, B, C, D, got {answer!r}")
                samples.append({"id": f"{subject}-{split}-{row}", "image": None,
                                "messages": [("user", mmlu_prompt(subject, question, choices)), ("assistant", answer)],
                                "answers": [answer], "answer_index": MMLU_LETTERS.index(answer), "choices": choices,
                                "subject": subject})
    return samples


VLSTEREOSET_COLUMNS = ("bias_type", "target", "context", "stereotype", "anti-stereotype", "unrelated", "label",
                       "Imaeg URL")  # the release's spelling


def read_vlstereoset(path, *, image_root, image_name="{row}.jpg", seed=0, skip_missing=False):
    """VLStereoSet (Zhou et al. 2022; K-Square-00/VLStereo data/VLStereoSet.csv, UTF-8 with a BOM): one row per
    image, columns bias_type, target, context, stereotype, anti-stereotype, unrelated, label (0: the image is
    stereotypical, 1: anti-stereotypical), 'Imaeg URL'. The release has URLs, not images: put them at
    {image_root}/{image_name} ('{row}' = the 0-based data row, as KuleenS/VLMBiasEval names its downloads);
    skip_missing=True drops rows whose file is missing (many URLs are dead; counted in a warning).
    The user turn asks which caption fits, the three captions as letters in an order shuffled per row with
    random.Random(f'{seed}-{row}') (a fixed order would confound bias with a letter preference); the target is
    the caption the label makes right. 'order' maps letters to 0 stereotype / 1 anti-stereotype / 2 unrelated
    (metrics.VLSTEREOSET_OPTIONS), for parse_answer and metrics.vlstereoset_scores."""
    import csv
    import random
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        missing = [c for c in VLSTEREOSET_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: missing column(s) {missing} (have {reader.fieldnames})")
        rows = list(reader)
    samples, skipped = [], 0
    for row, r in enumerate(rows):
        where = f"{path}: row {row + 2}"  # 1-based, after the header
        for c in VLSTEREOSET_COLUMNS[:6]:
            if not (r[c] or "").strip():
                raise ValueError(f"{where}: empty field '{c}'")
        if r["label"] not in ("0", "1"):
            raise ValueError(f"{where}: field 'label' should be 0 (stereotypical image) or 1 (anti-stereotypical), "
                             f"got {r['label']!r}")
        image = Path(image_root) / image_name.format(row=row)
        if skip_missing and not image.is_file():
            skipped += 1
            continue
        order = [0, 1, 2]
        random.Random(f"{seed}-{row}").shuffle(order)
        captions = [r[c].strip() for c in ("stereotype", "anti-stereotype", "unrelated")]
        label = int(r["label"])
        question = choices_prompt("Which one is the correct caption of this image?", [captions[k] for k in order])
        samples.append({"id": str(row), "image": str(image),
                        "messages": [("user", _user(question, str(image))), ("assistant", "ABC"[order.index(label)])],
                        "answers": ["ABC"[order.index(label)]], "label": label, "order": order,
                        "bias_type": r["bias_type"], "target": r["target"], "choices": [captions[k] for k in order],
                        "url": r["Imaeg URL"]})
    if skipped:
        warnings.warn(f"{path}: {skipped} of {len(rows)} rows skipped, their image is not in {image_root}")
    return samples

# -----------------------------------------------------------------------------
# 6. Dataset + collate
#
# ConversationDataset tokenizes every sample once up front (text only, cheap) to drop the ones that cannot
# be trained on: labels that do not line up with tokens ('mismatch') and answers that do not fit max_len
# ('too_long'). The counts are in .skipped (and printed as a warning); .lengths holds the token counts.
# Every index then yields a valid item, so batches are never empty and DDP ranks stay in step. Items carry
# the image's source (item['image']: a path, bytes, a list of them, or None); image_inputs (section 7) turns
# a batch's sources into pixels or cached features.
#
# collate right-pads input_ids with pad_id and labels with IGNORE_INDEX; has_image is (B,), or (B, M) when a
# sample has several images ('images'), M the most images of a sample in the batch.


def image_sources(sample):
    """What the image pipeline (image_inputs) takes for a sample: its one image source (None if it has
    none), or the list of its sources when it has several ('images')."""
    return list(sample["images"]) if sample.get("images") is not None else sample["image"]


def image_list(sample):
    """The sample's image sources as a list ([] for a text-only sample)."""
    source = image_sources(sample)
    return source if isinstance(source, list) else [] if source is None else [source]


def _n_images(source):
    return len(source) if isinstance(source, list) else int(source is not None)


class ConversationDataset(torch.utils.data.Dataset):
    def __init__(self, samples, tok, *, template, n_image_tokens=0, max_len=2048, system=None):
        self.samples, self.tok, self.template, self.system = samples, tok, template, system
        self.n_image_tokens, self.max_len = n_image_tokens, max_len
        self.keep, self.lengths, self.skipped = [], [], Counter()
        for i, sample in enumerate(samples):
            n_placeholders = sum(text.count(IMAGE_PLACEHOLDER) for _, text in sample["messages"])
            source = image_sources(sample)
            if n_placeholders != _n_images(source):
                raise ValueError(f"sample {sample['id']}: {n_placeholders} '<image>' placeholders "
                                 f"but {'images' if isinstance(source, list) else 'image'}={source!r:.80}")
            if sample["messages"][-1][0] != "assistant":
                raise ValueError(f"sample {sample['id']}: no answer to train on "
                                 "(the last message is not the assistant's)")
            try:
                ids, _ = self.tokenize(sample)
            except SkipSample as e:
                self.skipped[e.reason] += 1
                continue
            self.keep.append(i)
            self.lengths.append(len(ids))
        if self.skipped:
            warnings.warn(f"skipped {sum(self.skipped.values())} of {len(samples)} samples: {dict(self.skipped)}")

    def tokenize(self, sample):
        pieces = template_pieces(self.template, sample["messages"], self.system,
                                 eos=self.tok.tk.id_to_token(self.tok.eos_id))
        return tokenize_conversation(self.tok, pieces, self.n_image_tokens, self.max_len)

    def __len__(self):
        return len(self.keep)

    def __getitem__(self, index):
        sample = self.samples[self.keep[index]]
        ids, labels = self.tokenize(sample)
        return {"id": sample["id"], "image": image_sources(sample), "instruction": instruction_text(sample),
                "input_ids": torch.tensor(ids, dtype=torch.long), "labels": torch.tensor(labels, dtype=torch.long)}


def collate(batch, *, pad_id):
    """list of items -> {'input_ids', 'labels', 'attention_mask' (B, T), 'has_image' (B,) or (B, M), 'images'
    (their sources, for image_inputs), 'ids', 'instructions' (texts, for instruction_inputs)}. Use
    functools.partial(collate, pad_id=tok.pad_id)."""
    B, T = len(batch), max(len(item["input_ids"]) for item in batch)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((B, T), dtype=torch.bool)
    for i, item in enumerate(batch):
        n = len(item["input_ids"])
        input_ids[i, :n], labels[i, :n], attention_mask[i, :n] = item["input_ids"], item["labels"], True
    if any(isinstance(item["image"], list) for item in batch):  # several images per sample
        counts = torch.tensor([_n_images(item["image"]) for item in batch])
        has_image = torch.arange(int(counts.max()))[None, :] < counts[:, None]  # (B, M)
    else:
        has_image = torch.tensor([item["image"] is not None for item in batch])  # (B,)
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask, "has_image": has_image,
            "images": [item["image"] for item in batch], "ids": [item["id"] for item in batch],
            "instructions": [item.get("instruction", "") for item in batch]}


def pack(batch, *, pad_id=0):
    """Padding-free packing (train.py's pack): list of items -> the same dict as collate for ONE row, the samples
    end to end (1, sum of their lengths), plus 'seq_lens' (their lengths) for VLM.forward, where positions restart
    and attention stays inside each sample. Each sample's first label becomes IGNORE_INDEX: in a row of its own
    nothing precedes it, so it is never a target there either, and the packed loss equals the padded batch's.
    The row's images, in order, take the several-images path: 'images' [[...]], has_image (1, M)."""
    ids = torch.cat([item["input_ids"] for item in batch])[None]  # (1, T), T = sum of the lengths
    first = torch.tensor([IGNORE_INDEX])
    labels = torch.cat([torch.cat([first, item["labels"][1:]]) for item in batch])[None]  # (1, T)
    images = [x for item in batch for x in (item["image"] if isinstance(item["image"], list)
                                            else [] if item["image"] is None else [item["image"]])]
    return {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids, dtype=torch.bool),
            "has_image": torch.ones(1, len(images), dtype=torch.bool), "images": [images],
            "ids": [item["id"] for item in batch], "seq_lens": [len(item["input_ids"]) for item in batch]}


def left_pad(prompts, pad_id):
    """Batched generation: prompts [list of ids] -> (ids (B, T) long, attention_mask (B, T) bool), padded on
    the left so that every prompt ends at the last column."""
    B, T = len(prompts), max(len(p) for p in prompts)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((B, T), dtype=torch.bool)
    for i, p in enumerate(prompts):
        if len(p):
            ids[i, T - len(p):] = torch.as_tensor(p, dtype=torch.long)
            attention_mask[i, T - len(p):] = True
    return ids, attention_mask


def restyle_image_slot(samples, image_slot="<image>\n", no_image_slot=""):
    """How the first user turn opens. Readers write "<image>\\n" + text (or "<image>" alone) for a sample with
    an image and the bare text for one without; `image_slot` replaces that leading "<image>\\n" (it must hold
    "<image>" once: where the visual tokens go; the text follows it, or takes the place of "{text}" where the
    slot has one, e.g. "{text}Image: <image>\n" puts the image after the question) and `no_image_slot` is put
    before a text-only sample's text.
    ADEM-VL / LaVIN: "Image: <image>" and "Image: N/A " ([BOS] "Image: " [visual tokens] prompt, or [BOS]
    "Image: N/A" prompt, adem/model.py insert_image_embeds; the trailing space is the word boundary that
    their separate SentencePiece calls put before the prompt)."""
    if image_slot.count(IMAGE_PLACEHOLDER) != 1:
        raise ValueError(f"image_slot must contain '{IMAGE_PLACEHOLDER}' exactly once, got {image_slot!r}")
    if image_slot == IMAGE_PLACEHOLDER + "\n" and no_image_slot == "":
        return samples
    out = []
    for s in samples:
        (role, text), rest = s["messages"][0], s["messages"][1:]
        if s["image"] is not None:
            if not text.startswith(IMAGE_PLACEHOLDER):
                raise ValueError(f"sample {s['id']}: expected the first user turn to start with '{IMAGE_PLACEHOLDER}'")
            text = text[len(IMAGE_PLACEHOLDER):]
            text = text[1:] if text.startswith("\n") else text
            text = image_slot.replace("{text}", text) if "{text}" in image_slot else image_slot + text
        else:
            text = no_image_slot + text
        out.append({**s, "messages": [(role, text), *rest]})
    return out


def read_split(cfg, split, evaluation=False):
    """The samples of `split` for a train.py config (keys dataset, data_root, image_root, prompt_format,
    question_prompt, image_slot, no_image_slot; for evaluation=True also eval_prompt_format, eval_captions)."""
    samples = _read_split(cfg, split, evaluation)
    image_slot, no_image_slot = cfg.get('image_slot', IMAGE_PLACEHOLDER + "\n"), cfg.get('no_image_slot', '')
    return restyle_image_slot(samples, image_slot, no_image_slot)


def _read_split(cfg, split, evaluation=False):
    name, root, images = cfg['dataset'], cfg['data_root'], cfg['image_root'] or cfg['data_root']
    if name == 'easyvqa':
        return read_easy_vqa(split, prompt=cfg['question_prompt'], root=root or None)
    if name == 'scienceqa':  # ADEM-VL trains on CQM-A without captions and evaluates QCM-A with captions
        fmt = (cfg.get('eval_prompt_format') or cfg['prompt_format']) if evaluation else cfg['prompt_format']
        captions = (cfg.get('eval_captions') or None) if evaluation else None
        return read_scienceqa(root, split, prompt_format=fmt, captions_file=captions)
    if name == 'vqav2':
        return read_vqav2(*vqav2_files(root, split), image_root=images, prompt=cfg['question_prompt'])
    if name == 'coco':  # train on every caption, score per image
        return read_coco_karpathy(Path(root) / f'coco_karpathy_{split}.json', image_root=images,
                                  prompt=cfg.get('caption_prompt') or CAPTION_PROMPT,
                                  per_caption=split == cfg['train_split'] and not evaluation)
    if name == 'llava':
        return read_llava_json(root, image_root=cfg['image_root'] or str(Path(root).parent))  # default: next to the JSON
    if name == 'interleaved':  # OpenFlamingo-style entries or mmC4 documents, .json or .jsonl
        return read_interleaved(root, image_root=cfg['image_root'] or str(Path(root).parent))
    caption_prompt = cfg.get('caption_prompt') or CAPTION_PROMPT
    if name == 'okvqa':
        return read_okvqa(*okvqa_files(root, split), image_root=images, prompt=cfg['question_prompt'])
    if name in ('aokvqa_mc', 'aokvqa_da'):
        return read_aokvqa(Path(root) / f'aokvqa_v1p0_{split}.json', image_root=images, mode=name[-2:],
                           prompt=cfg['question_prompt'])
    if name == 'textvqa':
        return read_textvqa(Path(root) / f'TextVQA_0.5.1_{split}.json', image_root=images, split=split,
                            prompt=cfg['question_prompt'])
    if name == 'textcaps':
        return read_textcaps(Path(root) / f'TextCaps_0.1_{split}.json', image_root=images, split=split,
                             prompt=caption_prompt, per_caption=split == cfg['train_split'] and not evaluation)
    if name == 'flickr30k':
        return read_flickr30k_karpathy(Path(root) / 'dataset_flickr30k.json', image_root=images, split=split,
                                       prompt=caption_prompt, per_caption=split == cfg['train_split'] and not evaluation)
    if name == 'mmlu':
        return read_mmlu(root, split)
    if name == 'vlstereoset':  # an evaluation set: one split, the CSV's rows whose image was downloaded
        csv_path = Path(root) if Path(root).suffix == '.csv' else Path(root) / 'data' / 'VLStereoSet.csv'
        return read_vlstereoset(csv_path, image_root=cfg['image_root'] or Path(csv_path).parent.parent / 'images',
                                skip_missing=True)
    raise ValueError(f"unknown dataset {name!r}; one of easyvqa, scienceqa, vqav2, coco, llava, interleaved, okvqa, "
                     "aokvqa_mc, aokvqa_da, textvqa, textcaps, flickr30k, mmlu, vlstereoset")

# -----------------------------------------------------------------------------
# 7. A model's inputs
#
# prepare(cfg, model): what turns samples into inputs for a train.py config and its model. image_inputs: a
# batch's image sources -> pixels for the tower, or, with a cache dict, the frozen tower's features computed
# once per image.


def prepare(cfg, model):
    """What turns samples into model inputs for this config: tokenizer, template, system prompt, image
    preprocessing, the number of visual tokens per image and the answer prefix of evaluation prompts."""
    tok = Tokenizer(resolve(cfg['init_lm']))
    overrides = {'size': cfg['image_size'], 'crop_size': cfg['image_size']} if cfg['image_size'] else {}
    overrides.update({'resize': cfg['image_resize']} if cfg['image_resize'] else {})
    norm = cfg.get('image_norm', '')
    if norm and norm not in IMAGE_NORMS:
        raise ValueError(f"image_norm must be '' (the tower's) or one of {sorted(IMAGE_NORMS)}, got {norm!r}")
    overrides.update(dict(zip(('mean', 'std'), IMAGE_NORMS[norm])) if norm else {})
    image_cfg = image_config(resolve(cfg['init_vision']), tower=model.vision.cfg.kind, **overrides)
    folder = getattr(model.fusion, 'instruction_tokenizer', '')
    return dict(tok=tok, template=pick_template(tok, cfg['template'] or None),
                system=None if cfg['system_prompt'] == 'default' else cfg['system_prompt'], image_cfg=image_cfg,
                n_image_tokens=model.fusion.n_tokens(model.vision.n_tokens(image_cfg['crop_size'])),
                answer_prefix=cfg.get('answer_prefix', ''),
                instruction_tok=instruction_tokenizer(folder) if folder else None)


# A fusion with its own tokenizer (fusion.instruction_tokenizer: InstructBLIP's Q-Former, LAVIS blip2_t5_instruct.py)
# also reads each sample's instruction: the first user turn's text without "<image>" (LAVIS's text_input, the
# prompt the LM gets too), tokenized with that tokenizer's special tokens ([CLS] ... [SEP]), cut at 128 tokens
# (LAVIS max_txt_len), right-padded; the VLM hands it over as fusion(..., instruction_ids=, instruction_mask=).
INSTRUCTION_MAX_LEN = 128


def instruction_text(sample):
    return next(text for role, text in sample["messages"] if role == "user").replace(IMAGE_PLACEHOLDER, "").strip()


def instruction_tokenizer(folder):
    from tokenizers import Tokenizer as HFTokenizer
    path = Path(folder) / "tokenizer.json"
    try:
        tk = HFTokenizer.from_file(str(path))
    except Exception as e:
        raise ValueError(f"{path}: cannot load the fusion's instruction tokenizer ({e})") from e
    tk.no_padding()
    tk.enable_truncation(INSTRUCTION_MAX_LEN)
    return tk


def instruction_inputs(tk, texts, device="cpu"):
    """The VLM's fusion_inputs for a batch's instructions: {'instruction_ids', 'instruction_mask'} (B, L); {} when
    the fusion has no instruction tokenizer (tk None)."""
    if tk is None:
        return {}
    encs = tk.encode_batch(list(texts), add_special_tokens=True)
    L = max(len(e.ids) for e in encs)
    ids = torch.zeros(len(encs), L, dtype=torch.long)
    mask = torch.zeros(len(encs), L, dtype=torch.bool)
    for i, e in enumerate(encs):
        ids[i, :len(e.ids)], mask[i, :len(e.ids)] = torch.tensor(e.ids, dtype=torch.long), True
    return {"instruction_ids": ids.to(device), "instruction_mask": mask.to(device)}


def load_pixels(images, image_cfg, *, cache=None, seeds=None):
    """{source: preprocessed pixels (3, H, W)} for every distinct image of a batch's sources (lists flattened)
    that `cache` does not hold: the CPU half of image_inputs, which train.py runs a step ahead in a thread.
    seeds (one per sample): augment them (augment_image), each with random.Random(its sample's seed); an image
    twice in one batch gets its first sample's draw."""
    import random
    flat = [(y, s) for x, s in zip(images, seeds or [None] * len(images)) for y in (x if isinstance(x, list) else [x])]
    out = {}
    for x, s in flat:
        if x is not None and x not in out and (cache is None or x not in cache):
            img = load_image(x)
            out[x] = preprocess_image(img, image_cfg) if s is None else augment_image(img, image_cfg, random.Random(s))
    return out


def image_inputs(model, images, image_cfg, *, cache=None, device='cpu', dtype=torch.float32, autocast=nullcontext(),
                 always=False, loaded=None):
    """Image sources (path or bytes; None for a text-only sample) -> dict(pixels, feats, has_image) for
    VLM.forward / generate. With a `cache` dict the frozen tower runs once per distinct image, in chunks
    of 64 in sorted order, so the same features come back however the batches are composed. A list of
    sources for a sample (image_sources) gives its images in order: pixels / feats (B, M, ...) and
    has_image (B, M), M the most images of a sample in the batch.
    always=True: a batch without images gets blank pixels too, so that the tower runs for every batch
    (FSDP: every rank must run the same sharded blocks, whatever its share of the batch holds).
    loaded: pixels already made by load_pixels, by source; the others are loaded here."""
    def pixels_of(x):
        return loaded[x] if loaded is not None and x in loaded else preprocess_image(load_image(x), image_cfg)

    if any(isinstance(x, list) for x in images):  # several images per sample: as B*M single images
        lists = [x if isinstance(x, list) else [] if x is None else [x] for x in images]
        M = max(len(x) for x in lists)
        flat = image_inputs(model, [x[j] if j < len(x) else None for x in lists for j in range(M)], image_cfg,
                            cache=cache, device=device, dtype=dtype, autocast=autocast, always=always, loaded=loaded)
        return {k: None if v is None else v.unflatten(0, (len(images), M)) for k, v in flat.items()}
    has_image = torch.tensor([x is not None for x in images], device=device)
    if not has_image.any():
        if not always:
            return dict(pixels=None, feats=None, has_image=has_image)
        side = image_cfg['size'] if image_cfg['resize'] == 'squash' else image_cfg['crop_size']
        return dict(pixels=torch.zeros(len(images), 3, side, side, device=device, dtype=dtype), feats=None,
                    has_image=has_image)
    if cache is None:
        px = [pixels_of(x) if x is not None else None for x in images]
        blank = torch.zeros_like(next(p for p in px if p is not None))
        pixels = torch.stack([p if p is not None else blank for p in px]).to(device=device, dtype=dtype)
        return dict(pixels=pixels, feats=None, has_image=has_image)
    todo = sorted({x for x in images if x is not None and x not in cache})
    fresh = {}
    for i in range(0, len(todo), 64):
        chunk = todo[i:i + 64]
        px = torch.stack([pixels_of(x) for x in chunk])
        with torch.no_grad(), autocast:
            f = model.image_features(px.to(device=device, dtype=dtype))
        fresh.update(zip(chunk, f.to(device='cpu', dtype=dtype)))  # host memory: the GPU's is for training
    store = cache.add if isinstance(cache, FeatureCache) else cache.__setitem__
    for x, f in fresh.items():
        store(x, f)
    feats = {**fresh, **{x: cache[x] for x in images if x is not None and x not in fresh}}
    blank = torch.zeros_like(next(iter(feats.values())))
    return dict(pixels=None, feats=torch.stack([feats[x] if x is not None else blank for x in images]).to(device),
                has_image=has_image)


class FeatureCache(dict):
    """Frozen-tower features by image source, in host memory, up to max_bytes (train.py's cache_features_gb):
    past that, an image not cached yet runs through the tower each time it comes up. A plain dict is unbounded."""

    def __init__(self, max_bytes=float('inf')):
        super().__init__()
        self.max_bytes, self.nbytes = max_bytes, 0

    def add(self, key, feats):
        if self.nbytes + feats.nbytes <= self.max_bytes:
            self[key] = feats
            self.nbytes += feats.nbytes
