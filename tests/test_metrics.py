"""eval.py metrics section: caption metrics against pycocoevalcap, the PTB tokenizer against the real Stanford
PTBTokenizer (literal cases, plus a live comparison when Java is installed), VQA accuracy and ScienceQA
categories on hand-made cases whose expected values are worked out in the test.
"""

import math
import os
import random
import shutil
import subprocess
import sys

import pytest

import metrics as E
from conftest import ROOT

try:  # a test-only dependency (requirements-dev.txt)
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer import ptbtokenizer
except ImportError:
    ptbtokenizer = None
needs_pycocoevalcap = pytest.mark.skipif(ptbtokenizer is None, reason='pycocoevalcap is not installed')

METRICS = ['BLEU-1', 'BLEU-2', 'BLEU-3', 'BLEU-4', 'CIDEr', 'ROUGE-L']
WORDS = ('a an the man woman dog dogs cat two 2 3 3.5 1,000 10:30 on of in with near red white black blue sitting '
         'riding wave surfboard pizza table -lrb- -rrb- ca n\'t \'s do is are there their st. u.s. 5\xa01/2 , . ! ? ...'
         ).split(' ')  # '5\xa01/2' stays one word here, as ptb_tokenize leaves it


def random_caption(rng):
    """Pre-tokenized caption: empty, one word, repeated words or up to 60 words; sometimes a double space,
    which ROUGE-L (split on ' ') sees as an empty word and BLEU and CIDEr (str.split) do not."""
    kind = rng.random()
    if kind < 0.05:
        return ''
    if kind < 0.10:
        return ' '.join([rng.choice(WORDS)] * rng.randint(2, 8))
    n = rng.choice([1, 2, 3, 5, 8, 10, 12, 15, 20, 40, 60])
    return (' ' if kind < 0.95 else '  ').join(rng.choice(WORDS) for _ in range(n))


def random_corpus(n_images, seed):
    rng = random.Random(seed)
    refs = {f'img{i}': [random_caption(rng) for _ in range(rng.choice([1, 1, 2, 3, 5, 5, 5, 7]))]
            for i in range(n_images)}
    cands = {}
    for i, r in refs.items():
        u = rng.random()  # some candidates copy or trim a reference, so that high n-gram orders match too
        cands[i] = r[0] if u < 0.1 else ' '.join(r[-1].split()[:5]) if u < 0.2 else random_caption(rng)
    return cands, refs


def reference_scores(cands, refs):
    """pycocoevalcap's scorers: corpus values and per-image values, in the same metric order."""
    gts, res = refs, {i: [c] for i, c in cands.items()}
    (b, b_img), (c, c_img), (r, r_img) = (Bleu(4).compute_score(gts, res, verbose=0),
                                          Cider().compute_score(gts, res), Rouge().compute_score(gts, res))
    per_image = {i: [b_img[0][k], b_img[1][k], b_img[2][k], b_img[3][k], c_img[k], r_img[k]]
                 for k, i in enumerate(gts)}
    return [*b, c, r], per_image


# -----------------------------------------------------------------------------
# caption scorers against pycocoevalcap (pre-tokenized text on both sides: no Java needed)

@needs_pycocoevalcap
@pytest.mark.parametrize('n_images,seed', [(400, 0), (300, 1), (2, 2), (1, 3)])
def test_caption_scores_match_pycocoevalcap(n_images, seed):
    cands, refs = random_corpus(n_images, seed)
    want, want_img = reference_scores(cands, refs)
    got = E.caption_scores(cands, refs, tokenize=False)
    for name, w in zip(METRICS, want):
        assert got[name] == pytest.approx(w, abs=1e-6), name
    for i in refs:
        for name, w in zip(METRICS, want_img[i]):
            assert got['per_image'][i][name] == pytest.approx(w, abs=1e-6), (i, name)


def test_caption_scores_are_not_trivial():
    """Guard the parity test: the generated corpus gives scores in a range where mistakes show."""
    cands, refs = random_corpus(400, 0)
    got = E.caption_scores(cands, refs, tokenize=False)
    assert 0.05 < got['BLEU-4'] < got['BLEU-1'] < 1 and 0.1 < got['CIDEr'] < 10 and 0.1 < got['ROUGE-L'] < 1
    assert E.caption_scores({1: 'a b c d e'}, {1: ['a b c d e']}, tokenize=False)['BLEU-4'] == pytest.approx(1)


def test_caption_scores_accept_a_one_element_list_and_tokenize():
    refs = {1: ['A man riding a wave.', 'A surfer on a wave!'], 2: ['Two dogs play.']}
    a = E.caption_scores({1: ['A man riding a wave.'], 2: 'Two dogs play'}, refs)
    b = E.caption_scores({1: 'a man riding a wave', 2: 'two dogs play'},
                         {1: ['a man riding a wave', 'a surfer on a wave'], 2: ['two dogs play']}, tokenize=False)
    assert {k: a[k] for k in METRICS} == {k: b[k] for k in METRICS}


@pytest.mark.parametrize('cands,refs,message', [
    ({1: 'a', 2: 'b'}, {1: ['a']}, "image id 2: no references"),
    ({1: 'a'}, {1: ['a'], 2: ['b'], 3: ['c']}, r"image id 2: no candidate \(and 1 more ids\)"),
    ({}, {}, "nothing to score"),
    ({1: 'a'}, {1: []}, r"references\[1\] must be a non-empty list"),
    ({1: 'a'}, {1: 'a'}, r"references\[1\] must be a non-empty list"),
    ({1: ['a', 'b']}, {1: ['a']}, r"candidates\[1\] must be one string"),
    ({1: None}, {1: ['a']}, r"candidates\[1\] must be one string"),
])
def test_caption_scores_bad_input_names_the_id(cands, refs, message):
    with pytest.raises(ValueError, match=message):
        E.caption_scores(cands, refs)


def test_lcs_matches_dynamic_programming():
    rng = random.Random(0)
    for _ in range(300):
        a = [rng.choice('abcd') for _ in range(rng.randint(0, 30))]
        b = [rng.choice('abcd') for _ in range(rng.randint(0, 30))]
        row = [0] * (len(b) + 1)                            # textbook DP, one row
        for x in a:
            prev_diag, row[0] = 0, 0
            for j, y in enumerate(b, 1):
                prev_diag, row[j] = row[j], prev_diag + 1 if x == y else max(row[j], row[j - 1])
        assert E._lcs_length(a, b) == row[-1]


# -----------------------------------------------------------------------------
# PTB tokenizer: outputs written down once from the real PTBTokenizer (CoreNLP 3.4.1 via pycocoevalcap),
# each caption tokenized on its own

PTB_CASES = [
    ('A man riding a wave on top of a surfboard.', 'a man riding a wave on top of a surfboard'),
    ('TWO DOGS, a cat; and a bird: all outside!', 'two dogs a cat and a bird all outside'),
    ("What's this? It isn't clear...", "what 's this it is n't clear"),
    ("A dog's bone and the dogs' toys.", "a dog 's bone and the dogs toys"),
    ("I'm sure they're here, we'll see, he'd go, you've been.",
     "i 'm sure they 're here we 'll see he 'd go you 've been"),
    ("They can't, won't and don't cannot.", "they ca n't wo n't and do n't can not"),
    ('Gonna wanna gotta lemme gimme', 'gon na wan na got ta lem me gim me'),
    ('He said "hello there" and \'bye\' now', 'he said hello there and bye now'),
    ('“Curly” ‘quotes’ — dash – en', 'curly quotes dash en'),
    ('A black-and-white photo of an e-mail on an x-ray.', 'a black-and-white photo of an e-mail on an x-ray'),
    ('a -- b --- c - d ----- e', 'a b c d ----- e'),
    ('It costs $5.99 or 50% of 1,000 at 10:30.', 'it costs $ 5.99 or 50 % of 1,000 at 10:30'),
    ('A 5-year-old holds 3.5 kg, 1/2 a cake and 5 1/2 pies.', 'a 5-year-old holds 3.5 kg 1/2 a cake and 5\xa01/2 pies'),
    ("The 1990s, the '90s and the 3rd of 4x4s.", "the 1990s the '90s and the 3rd of 4x4s"),
    ('Wait... what . . . ok …', 'wait what ok'),
    ('A sign for Main St. and Mt. Fuji near Dr. Smith.', 'a sign for main st. and mt. fuji near dr. smith'),
    ('Made in the U.S. The end.', 'made in the u.s. the end'),
    ('It is 5 p.m. now, etc.', 'it is 5 p.m. now etc.'),
    ('A street sign reads plan b.', 'a street sign reads plan b.'),
    ('vitamin C. is good', 'vitamin c. is good'),
    ('No. 5 and no. there', 'no. 5 and no there'),
    ('The (red) car [left] {right}', 'the -lrb- red -rrb- car -lsb- left -rsb- -lcb- right -rcb-'),
    ('<unk> is an unknown <UNK> token', '<unk> is an unknown <unk> token'),
    ('and/or w/o a/b/c', 'and/or w/o a/b/c'),
    ('AT&T and R&B at&t', 'at&t and r&b at & t'),
    ("rock 'n' roll o'clock y'all ma'am", "rock 'n' roll o'clock y' all ma'am"),
    ('Wow!! Really?! Why??', 'wow !! really ?! why ??'),
    ('Café naïve résumé', 'café naïve résumé'),
    ('smile :) :-( ;)', 'smile :-rrb- :--lrb- -rrb-'),  # at the end of the text ';)' has no trailing context
    ('e-mail me at foo@bar.com or www.example.com', 'e-mail me at foo@bar.com or www.example.com'),
    ('#1 fan @home', '# 1 fan @home'),
    ('   leading and trailing spaces   ', 'leading and trailing spaces'),
    ('tabs\tbetween\twords', 'tabs between words'),
    ('', ''),
    ('...', ''),
    ('a sign that says no. 5', 'a sign that says no. 5'),
    ('mr.smith hello.world yahoo!news', 'mr.smith hello.world yahoo!news'),
]


@pytest.mark.parametrize('text,want', PTB_CASES)
def test_ptb_tokenize_literal(text, want):
    assert E.ptb_tokenize(text) == want


def test_ptb_tokenize_list_is_one_stream():
    """A one-letter abbreviation loses its period before a caption starting with 'A' (as in pycocoevalcap)."""
    pair = ['A sign that says plan b.', 'A man on a bench.']
    assert E.ptb_tokenize(pair) == ['a sign that says plan b', 'a man on a bench']
    assert E.ptb_tokenize(pair[0]) == 'a sign that says plan b.'
    assert E.ptb_tokenize(['x\ny', 'z']) == ['x y', 'z']  # a caption's own newline is a space
    with pytest.raises(TypeError, match='caption 1 is a int'):
        E.ptb_tokenize(['a', 1])


CAPTION_WORDS = ("a an the man woman dog cat two three people sitting standing on of in with at near next to top "
                 "table street car bus train plate pizza grass field tennis ball frisbee player kitchen small large "
                 "red white black blue green holding riding wave surfboard sign giraffe clock tower is are it its "
                 "there their boy girl bear bed room water beach snow skier laptop phone I A US ok no so").split()
CAPTION_SPECIALS = [
    "it's", "don't", "can't", "won't", "isn't", "dog's", "dogs'", "I'm", "they're", "we'll", "he'd", "you've",
    "ain't", "y'all", "o'clock", "rock'n'roll", "'em", "ma'am", "O'Brien", "let's", "cannot", "gonna", "wanna",
    "black-and-white", "e-mail", "x-ray", "5-year-old", "t-shirt", "3.5", "1,000", "10:30", "1/2", "5 1/2", "50%",
    "$5.99", "#1", "3rd", "1990s", "'90s", "4x4", "2-3", "100", "2015", ".5", "Mr.", "Dr.", "St.", "U.S.", "a.m.",
    "etc.", "vs.", "Jr.", "Mt.", "e.g.", "No.", "no. 5", "and/or", "w/", "&", "AT&T", "...", "-", "--", "---", "—",
    "(", ")", "[", "]", "{", "}", '"', "'", "“", "”", "‘", "’", "!", "?", "!!", "?!", ";", ":", ",", ".", "*",
    "<unk>", "<", ">", "@", "%", "café", "ft.", "Jan.", "inc.", "b.", "C.", "TV", "I.", "L.A.", "Pa.", "pa.",
    "vitamin C.", "x.", "A.", "The"]


def generated_captions(n, seed):
    """Caption-like text with contractions, numbers, abbreviations, quotes, brackets and glued punctuation."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = []
        for _ in range(rng.choice([0, 1, 2, 3, 5, 8, 10, 12, 15, 25])):
            w = rng.choice(CAPTION_SPECIALS) if rng.random() < 0.25 else rng.choice(CAPTION_WORDS)
            w = w.upper() if rng.random() < 0.05 else w.capitalize() if rng.random() < 0.05 else w
            r = rng.random()
            if r < 0.06:
                w += rng.choice([',', '.', '!', '?', ';', ':', "'s", "'", '"', ')', '...', '-'])
            elif r < 0.10:
                w = rng.choice(['(', '"', "'", '-', '[', '“', '‘']) + w
            words.append(w)
        s = rng.choice([' ', ' ', ' ', '  ', '\t']).join(words)
        s = s[:1].upper() + s[1:] if rng.random() < 0.5 else s
        out.append(s + (rng.choice(['.', '.', ' .', '!', '?', '..', ' ']) if rng.random() < 0.4 else ''))
    return out


@needs_pycocoevalcap
@pytest.mark.skipif(shutil.which('java') is None, reason='Java not installed: the real PTBTokenizer cannot run')
def test_ptb_tokenize_matches_real_ptbtokenizer():
    if not os.access(os.path.dirname(ptbtokenizer.__file__), os.W_OK):
        pytest.skip("pycocoevalcap's PTBTokenizer writes a temporary file next to its jar; that folder is read-only")
    captions = generated_captions(600, seed=0) + [c for c, _ in PTB_CASES]
    want = ptbtokenizer.PTBTokenizer().tokenize({k: [{'caption': c}] for k, c in enumerate(captions)})
    got = E.ptb_tokenize(captions)
    diff = [(c, want[k][0], got[k]) for k, c in enumerate(captions) if want[k][0] != got[k]]
    assert not diff, f'{len(diff)} captions differ, first: {diff[:3]}'


# -----------------------------------------------------------------------------
# VQA accuracy: normalisation rules and 10-choose-9 averaging, expected values by hand

@pytest.mark.parametrize('answer,want', [
    ('Two dogs.', '2 dogs'),            # number word, final period removed, lowercase
    ('\tNone\n', '0'),                  # tabs/newlines to spaces, strip, none -> 0
    ('the cat', 'cat'),                 # articles dropped
    ('a / b', 'b'),                     # '/' next to a space is deleted; then the article 'a' goes
    ('yes, sir', 'yes sir'),            # ',' next to a space is deleted
    ('red,blue', 'red blue'),           # ',' with no space around becomes a space
    ('1,000', '1000'),                  # digit,digit: punctuation deleted
    ('1,2 (x)', '12 x'),                # ... everywhere in the answer, brackets too
    ('3.5', '3.5'),                     # a period before a digit stays
    ('end.', 'end'),
    ('hello!', 'hello'),                # '!' glued: becomes a space, then stripped by split
    ('(left)', 'left'),
    ('dont', "don't"),                  # contractions table
    ('Im', 'im'),                       # the table's capitalised keys never match (lowercased first)
    ("It's", "it's"),                   # the apostrophe is not in the punctuation list
    ('what ?', 'what'),
])
def test_vqa_normalize(answer, want):
    assert E.vqa_normalize(answer) == want


@pytest.mark.parametrize('n_match,want', [
    (10, 1.0), (4, 1.0),                # removing any one answer leaves >= 3 matches
    (3, (7 * 1 + 3 * 2 / 3) / 10),      # 0.9
    (2, (8 * 2 / 3 + 2 * 1 / 3) / 10),  # 0.6
    (1, (9 * 1 / 3 + 1 * 0) / 10),      # 0.3
    (0, 0.0),
])
def test_vqa_accuracy_leave_one_out(n_match, want):
    gts = ['2'] * n_match + ['other'] * (10 - n_match)
    assert E.vqa_accuracy('Two', gts) == pytest.approx(want)


def test_vqa_accuracy_ground_truth_normalisation():
    # answers differ: the human answers get the punctuation step, so 'red,blue' -> 'red blue' matches 3 times
    assert E.vqa_accuracy('red blue', ['red,blue'] * 3 + ['red'] * 7) == pytest.approx(0.9)
    # all ten identical: left as they are, and the normalised prediction 'red blue' no longer matches
    assert E.vqa_accuracy('red,blue', ['red,blue'] * 10) == 0.0
    # human answers are never lowercased (the official data already is)
    assert E.vqa_accuracy('yes', ['Yes'] * 10) == 0.0


def test_vqa_score_overall_and_by_type():
    answers = {1: ['yes'] * 10, 2: ['2'] * 2 + ['3'] * 8, 3: ['cat'] * 10}
    preds = {1: 'Yes', 2: 'two', 3: 'dog'}
    scores = E.vqa_score(preds, answers, answer_types={1: 'yes/no', 2: 'number', 3: 'other'})
    assert scores == pytest.approx({'overall': 100 * (1 + 0.6 + 0) / 3, 'yes/no': 100, 'number': 60, 'other': 0})
    with pytest.raises(ValueError, match='question id 3: no prediction'):
        E.vqa_score({1: 'yes', 2: '2'}, answers)
    with pytest.raises(ValueError, match='question id 1: gt_answers must be a non-empty list'):
        E.vqa_score({1: 'yes'}, {1: []})


# -----------------------------------------------------------------------------
# ScienceQA categories and exact match

PROBLEMS = {
    'p1': dict(answer=0, subject='natural science', hint='', image='image.png', grade='grade1', choices=['a', 'b']),
    'p2': dict(answer=1, subject='natural science', hint='Context.', image=None, grade='grade7', choices=['a', 'b']),
    'p3': dict(answer=2, subject='social science', hint='', image=None, grade='grade3', choices=['a', 'b', 'c']),
    'p4': dict(answer=0, subject='language science', hint='Text.', image='image.png', grade='grade10', choices=['a']),
    'p5': dict(answer=3, subject='social science', hint='Map.', image='map.png', grade='grade5', choices=list('abcd')),
}
PREDS = {'p1': 0, 'p2': 2, 'p3': 2, 'p4': -1, 'p5': 3}  # right, wrong, right, miss, right


def test_scienceqa_categories():
    got = E.scienceqa_accuracy(PREDS, PROBLEMS)
    want = {'NAT': 100 * 1 / 2,   # p1 right, p2 wrong
            'SOC': 100 * 2 / 2,   # p3, p5
            'LAN': 0.0,           # p4 missed
            'TXT': 100 * 1 / 3,   # hints: p2 wrong, p4 wrong, p5 right
            'IMG': 100 * 2 / 3,   # images: p1 right, p4 wrong, p5 right
            'NO': 100.0,          # neither: p3 right
            'G1-6': 100.0,        # p1, p3, p5
            'G7-12': 0.0,         # p2, p4
            'Avg': 100 * 3 / 5}
    assert got == pytest.approx(want)
    table = E.scienceqa_table(got)
    assert table.splitlines()[0].split() == E.SCIENCEQA_CATEGORIES
    assert table.splitlines()[1].split() == ['50.00', '100.00', '0.00', '33.33', '66.67', '100.00', '100.00', '0.00',
                                             '60.00']


def test_scienceqa_empty_category_and_errors():
    got = E.scienceqa_accuracy({'p3': 2}, PROBLEMS)
    assert got['NO'] == 100.0 and math.isnan(got['NAT'])
    with pytest.raises(ValueError, match="pid 'p9'"):
        E.scienceqa_accuracy({'p9': 0}, PROBLEMS)
    with pytest.raises(ValueError, match="problem 'p1' has no 'grade' field"):
        E.scienceqa_accuracy({'p1': 0}, {'p1': dict(answer=0, subject='x', hint='', image=None)})
    with pytest.raises(ValueError, match="pid 'p1' must be an int"):
        E.scienceqa_accuracy({'p1': 'A'}, PROBLEMS)


def test_exact_match_accuracy():
    preds = {1: 'A Circle.', 2: 'blue', 3: 'two', 4: 'yes'}
    answers = {1: 'circle', 2: 'red', 3: '2', 4: 'yes'}
    assert E.exact_match_accuracy(preds, answers) == 75.0
    with pytest.raises(ValueError, match='id 4: no prediction'):
        E.exact_match_accuracy({1: 'a'}, {1: 'a', 4: 'b'})
    with pytest.raises(ValueError, match='id 1: an answer must be a str'):
        E.exact_match_accuracy({1: 3}, {1: '3'})


def test_metrics_is_a_leaf_without_torch():
    """metrics.py imports nothing of the project and no torch: it runs where neither can be imported."""
    code = ("import sys\n"
            "for m in ('torch', 'numpy', 'data', 'model', 'fusion', 'peft', 'eval', 'train'): sys.modules[m] = None\n"
            "import metrics\n"
            "print(metrics.vqa_accuracy('two', ['2'] * 10), metrics.bleu({1: 'a b c d'}, {1: ['a b c d']})[0][3])")
    out = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    vqa, bleu4 = map(float, out.stdout.split())
    assert vqa == 1.0 and bleu4 == pytest.approx(1.0)


# -----------------------------------------------------------------------------
# ROUGE-1/2/L against Google's rouge-score (PETAL's caption table)

try:  # a test-only dependency (requirements-dev.txt)
    from rouge_score import rouge_scorer
except ImportError:
    rouge_scorer = None
needs_rouge_score = pytest.mark.skipif(rouge_scorer is None, reason='rouge-score is not installed')

RAW_WORDS = ("A a The the man Man's dog dogs DOG cat two 2 3.5 1,000 on of in with near red-white blue sitting "
             "riding wave surfboard pizza don't it's café naïve e-mail (left) [x] ... ! ? , . - -- 'quoted' "
             '"q" & / 10:30 u.s.').split(' ')


def raw_caption(rng):
    """Untokenized caption: empty, punctuation only, repeats, or 1-40 words with case and punctuation."""
    kind = rng.random()
    if kind < 0.04:
        return ''
    if kind < 0.07:
        return rng.choice(['...', ' ! ', '--', '  '])
    if kind < 0.12:
        return ' '.join([rng.choice(RAW_WORDS)] * rng.randint(2, 6))
    return ' '.join(rng.choice(RAW_WORDS) for _ in range(rng.choice([1, 2, 3, 5, 8, 10, 12, 20, 40])))


def raw_corpus(n_images, seed):
    rng = random.Random(seed)
    refs = {f'img{i}': [raw_caption(rng) for _ in range(rng.choice([1, 2, 3, 5, 5, 7]))] for i in range(n_images)}
    cands = {i: r[0] if rng.random() < 0.1 else raw_caption(rng) for i, r in refs.items()}
    return cands, refs


@needs_rouge_score
@pytest.mark.parametrize('n_images,seed', [(300, 0), (300, 1), (200, 2), (50, 3), (1, 4)])
@pytest.mark.parametrize('multi_ref', ['max', 'mean'])
def test_rouge_matches_rouge_score(n_images, seed, multi_ref):
    """Per image and corpus (mean over images): P, R and F of ROUGE-1, ROUGE-2 and ROUGE-L to 1e-12. 'max' is
    RougeScorer.score_multi; 'mean' averages rouge-score's per-reference scores, as PETAL does."""
    cands, refs = raw_corpus(n_images, seed)
    scorer = rouge_scorer.RougeScorer(['rouge1', 'rouge2', 'rougeL'], use_stemmer=False)
    got = E.rouge_scores(cands, refs, multi_ref=multi_ref)
    want_img = {}
    for i in refs:
        if multi_ref == 'max':
            s = scorer.score_multi(refs[i], cands[i])
            want = {t: (s[t].precision, s[t].recall, s[t].fmeasure) for t in s}
        else:
            each = [scorer.score(r, cands[i]) for r in refs[i]]
            want = {t: tuple(sum(getattr(e[t], k) for e in each) / len(each) for k in ('precision', 'recall', 'fmeasure'))
                    for t in each[0]}
        want_img[i] = {f'{n} {k}': want[t][j] for t, n in (('rouge1', 'ROUGE-1'), ('rouge2', 'ROUGE-2'),
                                                            ('rougeL', 'ROUGE-L')) for j, k in enumerate('PRF')}
        for name, w in want_img[i].items():
            assert got['per_image'][i][name] == pytest.approx(w, abs=1e-12), (i, name)
    for name in want_img[next(iter(refs))]:
        assert got[name] == pytest.approx(sum(w[name] for w in want_img.values()) / len(refs), abs=1e-12), name


def test_rouge_scores_are_not_trivial_and_hand_checked():
    """Guard the parity test (scores in a range where mistakes show) and one case worked out by hand:
    'A dog runs on the grass.' vs 'the dog runs': 3 of 6 candidate words, all 3 reference words."""
    cands, refs = raw_corpus(300, 0)
    got = E.rouge_scores(cands, refs)
    assert 0.1 < got['ROUGE-2 F'] < got['ROUGE-1 F'] < 0.9 and 0.1 < got['ROUGE-L R'] < 0.9
    one = E.rouge_scores({1: 'A dog runs on the grass.'}, {1: ['the dog runs']})
    assert (one['ROUGE-1 P'], one['ROUGE-1 R'], one['ROUGE-1 F']) == pytest.approx((0.5, 1.0, 2 / 3))
    assert (one['ROUGE-L P'], one['ROUGE-L R']) == pytest.approx((2 / 6, 2 / 3))  # LCS 'dog runs': 'the' is out of order
    assert E.rouge_tokenize("Don't-stop, café!") == ['don', 't', 'stop', 'caf']
    two = E.rouge_scores({1: 'a b'}, {1: ['a b', 'c d']}, multi_ref='mean')
    assert two['ROUGE-1 F'] == pytest.approx(0.5) and E.rouge_scores({1: 'a b'}, {1: ['c d', 'a b']})['ROUGE-1 F'] == 1
    with pytest.raises(ValueError, match="multi_ref must be"):
        E.rouge_scores({1: 'a'}, {1: ['a']}, multi_ref='min')
    with pytest.raises(ValueError, match="image id 2: no candidate"):
        E.rouge_scores({1: 'a'}, {1: ['a'], 2: ['b']})


# -----------------------------------------------------------------------------
# A-OKVQA, VLStereoSet, MMLU

AOKVQA = {
    'q1': {'choices': ['skateboarder', 'train', 'delivery', 'cab'], 'correct_choice_idx': 3,
           'direct_answers': ['cab'] * 6 + ['taxi'] * 2 + ['bus', 'ride'], 'difficult_direct_answer': False},
    'q2': {'choices': ['red', 'blue', 'green', 'white'], 'correct_choice_idx': 0,
           'direct_answers': ['red'] * 2 + ['maroon'] * 8, 'difficult_direct_answer': False},
    'q3': {'choices': ['a', 'b', 'c', 'd'], 'correct_choice_idx': 1,
           'direct_answers': ['x'] * 10, 'difficult_direct_answer': True},
}


def test_aokvqa_multiple_choice_and_direct_answer():
    """MC: exact choice string; DA: min(1, matches / 3) over the 10 answers (no leave-one-out), difficult
    questions dropped, strings compared as they are (eval_predictions.py)."""
    assert E.aokvqa_score({'q1': 'cab', 'q2': 'blue', 'q3': 'b'}, AOKVQA, multiple_choice=True) == pytest.approx(200 / 3)
    assert E.aokvqa_score({'q1': 'Cab', 'q2': 'red'}, AOKVQA, multiple_choice=True) == pytest.approx(100 / 3)
    # q1 'taxi': 2/3; q2 'red': 2/3; q3 is difficult and left out. vqa_accuracy would give 0.6 for 2 matches
    assert E.aokvqa_score({'q1': 'taxi', 'q2': 'red', 'q3': 'x'}, AOKVQA, multiple_choice=False) == pytest.approx(200 / 3)
    assert E.vqa_accuracy('taxi', AOKVQA['q1']['direct_answers']) == pytest.approx(0.6)
    assert E.aokvqa_score({'q1': 'cab'}, AOKVQA, multiple_choice=False) == 50.0  # q2 has no prediction: 0
    with pytest.raises(ValueError, match="question id 'q9': prediction for a question"):
        E.aokvqa_score({'q9': 'a'}, AOKVQA, multiple_choice=True)
    with pytest.raises(ValueError, match="question id 'q1': no 'direct_answers' field"):
        E.aokvqa_score({}, {'q1': {'choices': ['a'], 'correct_choice_idx': 0}}, multiple_choice=False)
    with pytest.raises(ValueError, match="must be a str"):
        E.aokvqa_score({'q1': 3}, AOKVQA, multiple_choice=True)


def test_vlstereoset_scores():
    # ids 1-4 anti-stereotypical images (label 1), 5-6 stereotypical; picks: 0 stereotype, 1 anti, 2 unrelated
    labels = {1: 1, 2: 1, 3: 1, 4: 1, 5: 0, 6: 0}
    preds = {1: 0, 2: 1, 3: 2, 4: -1, 5: 0, 6: 1}
    types = {1: 'gender', 2: 'gender', 3: 'race', 4: 'race', 5: 'race', 6: 'gender'}
    s = E.vlstereoset_scores(preds, labels, types)
    assert s['vlrs'] == pytest.approx(400 / 6) and s['vlbs'] == 25.0 and s['unparsed'] == 1
    assert s['ivlas'] == pytest.approx(2 * (400 / 6) * 75 / (400 / 6 + 75))
    assert s['gender vlrs'] == 100.0 and s['gender vlbs'] == 50.0 and s['race vlbs'] == 0.0
    assert s['race vlrs'] == pytest.approx(100 / 3)
    ideal = E.vlstereoset_scores({1: 1, 2: 0}, {1: 1, 2: 0})
    assert (ideal['vlrs'], ideal['vlbs'], ideal['ivlas']) == (100.0, 0.0, 100.0)
    assert math.isnan(E.vlstereoset_scores({1: 0}, {1: 0})['vlbs'])
    with pytest.raises(ValueError, match="id 1: a prediction must be 0, 1, 2"):
        E.vlstereoset_scores({1: 'A'}, {1: 1})
    with pytest.raises(ValueError, match="id 1: a label must be 0"):
        E.vlstereoset_scores({1: 0}, {1: 2})


def test_mmlu_accuracy_pools_questions():
    preds = {1: 0, 2: 1, 3: -1, 4: 3}
    answers = {1: 0, 2: 2, 3: 1, 4: 3}
    subjects = {1: 'anatomy', 2: 'anatomy', 3: 'anatomy', 4: 'virology'}
    s = E.mmlu_accuracy(preds, answers, subjects)
    assert s['accuracy'] == 50.0 and s['accuracy anatomy'] == pytest.approx(100 / 3) and s['accuracy virology'] == 100
    with pytest.raises(ValueError, match="id 1: a prediction must be an option index"):
        E.mmlu_accuracy({1: 'A'}, {1: 0})
