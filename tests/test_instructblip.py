"""InstructBLIP with an encoder-decoder LM (EVA tower + instruction-aware Q-Former + FlanT5): the whole model built
by fusion.build_vlm from one tiny random InstructBlipForConditionalGeneration folder (save_pretrained) equals
transformers' model: decoder logits, the training loss from our decoder-only sample layout, greedy and beam tokens;
T5 beam search alone vs T5ForConditionalGeneration; the PETAL configs build and take two steps on tiny stand-ins."""
import json
import runpy
import sys

import pytest
import torch

import peft
from conftest import ROOT, randomize, rel_err, shape_image
from fusion import build_vlm
from model import IGNORE_INDEX, IMAGE_TOKEN
from t5 import T5

T = pytest.importorskip('transformers')

TOL = 1e-4  # relative error, float32
Q, IMG_ID, VOCAB = 8, 3, 128  # queries; HF's image_token_index; T5 vocabulary


def instructblip_t5_cfg(vocab=VOCAB):
    vision = T.InstructBlipVisionConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                        num_attention_heads=4, image_size=32, patch_size=8)
    qformer = T.InstructBlipQFormerConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                                          intermediate_size=64, cross_attention_frequency=2, vocab_size=99,
                                          max_position_embeddings=40, encoder_hidden_size=48)
    lm = T.T5Config(vocab_size=vocab, d_model=64, d_kv=16, d_ff=96, num_layers=3, num_decoder_layers=2, num_heads=4,
                    relative_attention_num_buckets=8, relative_attention_max_distance=20,
                    feed_forward_proj='gated-gelu', tie_word_embeddings=False,
                    decoder_start_token_id=0, eos_token_id=1, pad_token_id=0)
    return T.InstructBlipConfig(vision_config=vision.to_dict(), qformer_config=qformer.to_dict(),
                                text_config=lm.to_dict(), num_query_tokens=Q, image_token_index=IMG_ID)


def vlm_cfg(path, **kw):
    return dict(init_vision=str(path), init_lm=str(path), fusion='qformer', peft='', vision_layer=-1,
                vision_norm=False, trainable=(), qformer_init=str(path), qformer_dim=32, qformer_layers=4,
                qformer_heads=4, qformer_queries=Q, **kw)


@pytest.fixture(scope='module')
def pair(tmp_path_factory):
    """(HF InstructBlipForConditionalGeneration with a T5 LM, our VLM built from its folder by build_vlm)."""
    path = tmp_path_factory.mktemp('instructblip_t5')
    torch.manual_seed(0)
    ref = randomize(T.InstructBlipForConditionalGeneration(instructblip_t5_cfg()), std=0.1).eval()
    ref.save_pretrained(path)
    ours = build_vlm(vlm_cfg(path)).eval()
    return ref, ours


def batch(B=3, P=(9, 6, 3), A=(4, 2, 3), seed=0):
    """Rows of [Q image tokens][prompt of P tokens, the last eos] and answers of A tokens (the last eos); the
    instruction for the Q-Former (its vocabulary, right-padded); pixels."""
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(4, VOCAB, (p,), generator=g) for p in P]
    answers = [torch.randint(4, VOCAB, (a,), generator=g) for a in A]
    for t in prompts + answers:
        t[-1] = 1  # eos ends the prompt (T5's tokenizer adds it) and the answer
    q_ids = torch.randint(1, 99, (B, 5), generator=g)
    q_mask = torch.arange(5)[None] < torch.tensor([5, 3, 1])[:B, None]
    px = torch.randn(B, 3, 32, 32, generator=g)
    return prompts, answers, q_ids.masked_fill(~q_mask, 0), q_mask, px


def right_pad(rows, value):
    n = max(len(r) for r in rows)
    return torch.stack([torch.cat([r, torch.full((n - len(r),), value, dtype=r.dtype)]) for r in rows])


def test_instructblip_t5_logits_and_loss_equal_transformers(pair):
    ref, ours = pair
    prompts, answers, q_ids, q_mask, px = batch()
    hf_ids = right_pad([torch.cat([torch.full((Q,), IMG_ID), p]) for p in prompts], 0)  # (B, S) HF's layout
    hf_mask = right_pad([torch.ones(Q + len(p), dtype=torch.long) for p in prompts], 0)
    our_ids = hf_ids.masked_fill(hf_ids == IMG_ID, IMAGE_TOKEN)
    dec = torch.randint(2, VOCAB, (3, 6))
    fi = dict(qformer_ids=q_ids, qformer_mask=q_mask)
    with torch.no_grad():
        want = ref(pixel_values=px, qformer_input_ids=q_ids, qformer_attention_mask=q_mask.long(), input_ids=hf_ids,
                   attention_mask=hf_mask, decoder_input_ids=dec).logits
        got = ours(our_ids, pixels=px, fusion_inputs=fi, pad_mask=hf_mask.bool(), dec_ids=dec)
        assert got.shape == want.shape == (3, 6, VOCAB)
        assert rel_err(got, want) < TOL
        # training: our sample layout [image tokens][prompt][answer][padding], the answer labelled, gives
        # HF's loss with labels = the right-padded answers (T5 shifts them right into the decoder)
        labels_hf = right_pad(answers, IGNORE_INDEX)
        want_loss = ref(pixel_values=px, qformer_input_ids=q_ids, qformer_attention_mask=q_mask.long(),
                        input_ids=hf_ids, attention_mask=hf_mask, labels=labels_hf).loss
        rows = [torch.cat([torch.full((Q,), IMAGE_TOKEN), p, a]) for p, a in zip(prompts, answers)]
        lab = [torch.cat([torch.full((Q + len(p),), IGNORE_INDEX), a]) for p, a in zip(prompts, answers)]
        ids, labels = right_pad(rows, 0), right_pad(lab, IGNORE_INDEX)
        loss = ours(ids, pixels=px, fusion_inputs=fi, labels=labels)
        assert abs(loss.item() - want_loss.item()) / want_loss.item() < TOL
        # the instruction matters: without it the Q-Former's outputs, and the loss, change
        assert abs(ours(ids, pixels=px, labels=labels).item() - loss.item()) > 1e-3
    with pytest.raises(ValueError, match='one answer per sample'):
        two = labels.clone()
        two[0, Q + 1] = 5  # a second labelled run inside the prompt
        ours(ids, pixels=px, fusion_inputs=fi, labels=two)


def test_instructblip_t5_loss_gradients_reach_the_qformer(pair):
    _, ours = pair
    prompts, answers, q_ids, q_mask, px = batch()
    rows = [torch.cat([torch.full((Q,), IMAGE_TOKEN), p, a]) for p, a in zip(prompts, answers)]
    lab = [torch.cat([torch.full((Q + len(p),), IGNORE_INDEX), a]) for p, a in zip(prompts, answers)]
    ours.zero_grad()
    ours(right_pad(rows, 0), pixels=px, labels=right_pad(lab, IGNORE_INDEX),
         fusion_inputs=dict(qformer_ids=q_ids, qformer_mask=q_mask)).backward()
    trained = [n for n, p in ours.named_parameters() if p.requires_grad]
    assert trained and all(n.startswith('fusion.') for n in trained)  # the Q-Former recipe: tower and T5 frozen
    assert all(ours.get_parameter(n).grad is not None for n in trained if 'qformer.word' not in n)
    assert all(p.grad is None for n, p in ours.named_parameters() if n.startswith(('lm.', 'vision.')))


@pytest.mark.parametrize('num_beams,length_penalty', [(1, 1.0), (3, 1.0), (3, 0.6)])
def test_instructblip_t5_generation_equals_transformers(pair, num_beams, length_penalty):
    """Greedy and beam tokens = InstructBlipForConditionalGeneration.generate, on a left-padded batch."""
    ref, ours = pair
    prompts, _, q_ids, q_mask, px = batch()
    S = max(len(p) for p in prompts) + Q
    hf_ids = torch.stack([torch.cat([torch.zeros(S - Q - len(p), dtype=torch.long), torch.full((Q,), IMG_ID), p])
                          for p in prompts])  # left-padded, as eval.py pads prompts
    mask = hf_ids != 0
    want = ref.generate(pixel_values=px, qformer_input_ids=q_ids, qformer_attention_mask=q_mask.long(),
                        input_ids=hf_ids, attention_mask=mask.long(), max_new_tokens=7, do_sample=False,
                        num_beams=num_beams, length_penalty=length_penalty, eos_token_id=None if num_beams == 1 else 1)
    want = want[:, 1:]  # drop decoder_start
    got = ours.generate(hf_ids.masked_fill(hf_ids == IMG_ID, IMAGE_TOKEN), pad_mask=mask, pixels=px,
                        fusion_inputs=dict(qformer_ids=q_ids, qformer_mask=q_mask), max_new_tokens=7,
                        num_beams=num_beams, length_penalty=length_penalty, stop_ids=[] if num_beams == 1 else [1])

    def cut(row):  # up to and with the first eos (HF pads finished rows with pad, we with the stop token)
        return row[:row.index(1) + 1] if 1 in row else row
    assert [cut(r) for r in got.tolist()] == [cut(r) for r in want.tolist()]


@pytest.mark.parametrize('early_stopping', [False, True])
def test_t5_beam_search_equals_transformers(tmp_path, early_stopping):
    cfg = T.T5Config(vocab_size=24, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                     relative_attention_num_buckets=8, relative_attention_max_distance=20,
                     feed_forward_proj='gated-gelu', tie_word_embeddings=False, decoder_start_token_id=0,
                     eos_token_id=1, pad_token_id=0)
    ref = randomize(T.T5ForConditionalGeneration(cfg), std=0.3).eval()
    ref.save_pretrained(tmp_path)
    ours = T5.from_pretrained(tmp_path)
    ids = torch.randint(2, 24, (3, 11))
    mask = torch.ones(3, 11, dtype=torch.bool)
    mask[1, 7:] = mask[2, 3:] = False
    ids = ids.masked_fill(~mask, 0)
    for K, lp in ((2, 1.0), (4, 0.5)):
        want = ref.generate(input_ids=ids, attention_mask=mask.long(), num_beams=K, length_penalty=lp,
                            early_stopping=early_stopping, max_new_tokens=9, do_sample=False)[:, 1:]
        got = ours.generate(ids, mask, num_beams=K, length_penalty=lp, early_stopping=early_stopping,
                            max_new_tokens=9)

        def cut(row):
            return row[:row.index(1) + 1] if 1 in row else row
        assert [cut(r) for r in got.tolist()] == [cut(r) for r in want.tolist()], (K, lp)
