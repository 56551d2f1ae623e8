"""
Benchmarks: speed/memory side by side with the reference stack, in one run, quoted as ratios; no assertions.

python bench.py                    # every benchmark
python bench.py caption_metrics    # just the named ones
"""

import random
import sys
import time
import tracemalloc

# -----------------------------------------------------------------------------
# caption metrics: eval.py against pycocoevalcap's scorers


def synthetic_captions(n_images, refs_per_image=5, vocab_size=2000, seed=0):
    """COCO-like pre-tokenized captions: 8-16 words from a Zipf-weighted vocabulary; the candidate reuses
    words of one reference, so that the scores land in a realistic range."""
    rng = random.Random(seed)
    vocab = [f'w{k}' for k in range(vocab_size)]
    weights = [1 / (k + 1) for k in range(vocab_size)]

    def caption():
        return rng.choices(vocab, weights, k=rng.randint(8, 16))

    refs = {i: [caption() for _ in range(refs_per_image)] for i in range(n_images)}
    cands = {i: ' '.join(w if rng.random() < 0.6 else rng.choices(vocab, weights)[0] for w in r[0])
             for i, r in refs.items()}
    return cands, {i: [' '.join(c) for c in r] for i, r in refs.items()}


def bench_caption_metrics(n_images=5000, seed=0, repeats=3):
    """Seconds (best of `repeats`, ours and theirs interleaved) and peak Python memory of BLEU-1..4, CIDEr-D
    and ROUGE-L on the same pre-tokenized captions (one candidate and 5 references per image)."""
    import eval as E
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    cands, refs = synthetic_captions(n_images, seed=seed)
    res = {i: [c] for i, c in cands.items()}
    pairs = [  # (metric, ours, pycocoevalcap's); each returns the corpus score
        ('BLEU-4', lambda: E.bleu(cands, refs)[0][3], lambda: Bleu(4).compute_score(refs, res, verbose=0)[0][3]),
        ('CIDEr-D', lambda: E.cider_d(cands, refs)[0], lambda: Cider().compute_score(refs, res)[0]),
        ('ROUGE-L', lambda: E.rouge_l(cands, refs)[0], lambda: Rouge().compute_score(refs, res)[0]),
    ]
    secs = {(name, who): float('inf') for name, *_ in pairs for who in (0, 1)}
    value = {}
    for _ in range(repeats):
        for name, *fns in pairs:
            for who, fn in enumerate(fns):
                t0 = time.perf_counter()
                value[name, who] = fn()
                secs[name, who] = min(secs[name, who], time.perf_counter() - t0)
    peak = {}
    for name, *fns in pairs:  # a separate pass: tracemalloc slows Python code down
        for who, fn in enumerate(fns):
            tracemalloc.start()
            fn()
            peak[name, who] = tracemalloc.get_traced_memory()[1] / 2**20
            tracemalloc.stop()

    print(f'caption metrics, {n_images} images x (1 candidate + 5 references), best of {repeats}')
    print(f'{"metric":8} {"value":>9} {"|diff|":>8} {"ours s":>8} {"theirs s":>9} {"speed-up":>8} '
          f'{"ours MiB":>9} {"theirs MiB":>10} {"mem ratio":>9}')
    for name, *_ in pairs + [('total',)]:
        names = [p[0] for p in pairs] if name == 'total' else [name]
        ours, theirs = (sum(secs[n, who] for n in names) for who in (0, 1))
        mem_ours, mem_theirs = (max(peak[n, who] for n in names) for who in (0, 1))
        val = '' if name == 'total' else f'{value[name, 0]:9.6f} {abs(value[name, 0] - value[name, 1]):8.1e}'
        print(f'{name:8} {val:>18} {ours:8.3f} {theirs:9.3f} {theirs / ours:7.1f}x '
              f'{mem_ours:9.1f} {mem_theirs:10.1f} {mem_theirs / mem_ours:8.1f}x')


# -----------------------------------------------------------------------------

BENCHMARKS = {
    'caption_metrics': bench_caption_metrics,
}

if __name__ == '__main__':
    for name in sys.argv[1:] or BENCHMARKS:
        if name not in BENCHMARKS:
            sys.exit(f'unknown benchmark {name!r}; choose from: {", ".join(BENCHMARKS)}')
        BENCHMARKS[name]()
