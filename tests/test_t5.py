"""T5 / FlanT5 (t5.py) vs transformers' T5ForConditionalGeneration on tiny random checkpoints: encoder states,
decoder logits with a padded encoder input, cached decoding = full forward, greedy tokens = generate()."""
import pytest
import torch

from conftest import randomize, rel_err
from t5 import T5

T = pytest.importorskip('transformers')

TOL = 1e-4


def save_t5(tmp_path, flan=True):
    """flan: T5 v1.1 / FlanT5 (gated-gelu, untied head); else T5 v1.0 (relu, tied head scaled by d^-0.5)."""
    cfg = T.T5Config(vocab_size=128, d_model=64, d_kv=16, d_ff=96, num_layers=3, num_decoder_layers=2, num_heads=4,
                     relative_attention_num_buckets=8, relative_attention_max_distance=20,
                     feed_forward_proj='gated-gelu' if flan else 'relu', tie_word_embeddings=not flan,
                     decoder_start_token_id=0, eos_token_id=1, pad_token_id=0)
    ref = randomize(T.T5ForConditionalGeneration(cfg), std=0.1).eval()
    ref.save_pretrained(tmp_path)
    return ref, T5.from_pretrained(tmp_path)


def padded(B=2, S=30):
    ids = torch.randint(2, 128, (B, S))
    mask = torch.ones(B, S, dtype=torch.bool)
    mask[1, 18:] = False  # right padding, as T5 tokenizers pad; 30 > max_distance: the logarithmic buckets
    return ids.masked_fill(~mask, 0), mask


@pytest.mark.parametrize('flan', [True, False])
def test_t5_encoder_and_decoder_logits_parity(tmp_path, flan):
    ref, ours = save_t5(tmp_path, flan)
    ids, mask = padded()
    dec = torch.randint(2, 128, (2, 25))
    with torch.no_grad():
        enc = ours.encode(ids, mask)
        want = ref(input_ids=ids, attention_mask=mask.long(), decoder_input_ids=dec)
        assert rel_err(enc[0], want.encoder_last_hidden_state[0]) < TOL
        assert rel_err(enc[1, :18], want.encoder_last_hidden_state[1, :18]) < TOL
        assert rel_err(ours.decode(dec, enc, mask), want.logits) < TOL


def test_t5_cached_decoding_and_greedy_generation_match(tmp_path):
    ref, ours = save_t5(tmp_path)
    ids, mask = padded()
    dec = torch.randint(2, 128, (2, 9))
    with torch.no_grad():
        enc = ours.encode(ids, mask)
        full = ours.decode(dec, enc, mask)
        cache = ours.new_cache()
        steps = [ours.decode(dec[:, :3], enc, mask, cache)] + [ours.decode(dec[:, t:t + 1], enc, mask, cache)
                                                               for t in range(3, 9)]
    assert rel_err(torch.cat(steps, 1), full) < TOL
    want = ref.generate(input_ids=ids, attention_mask=mask.long(), max_new_tokens=12, do_sample=False,
                        eos_token_id=None)[:, 1:]  # drop decoder_start
    got = ours.generate(ids, mask, max_new_tokens=12, stop_ids=[])
    assert got.tolist() == want.tolist()
