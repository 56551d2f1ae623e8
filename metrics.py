"""
The official metrics of the benchmarks we report, re-implemented without their toolkits: standard library
only (no torch, no Java, no pycocoevalcap, nothing of this project), so the file can be copied out and used
on its own. eval.py scores generated answers through it.

- COCO captions: the PTB tokenizer pycocoevalcap runs, then BLEU-1..4, CIDEr-D and ROUGE-L, all equal to
  pycocoevalcap's scorers (tests/test_metrics.py checks to 1e-6). Entry point: caption_scores().
- VQA accuracy (VQAv2, OK-VQA, A-OKVQA direct answers, TextVQA): answer normalisation and the 10-choose-9
  averaging of the official evaluation. Entry points: vqa_accuracy() per question, vqa_score() per split.
- ScienceQA accuracy overall and by category, as the benchmark's own script. Entry point: scienceqa_accuracy().
- Exact-match accuracy for single-answer sets (easy-VQA). Entry point: exact_match_accuracy().
- ROUGE-1/2/L precision, recall and F1 as Google's rouge-score (PETAL's caption table reports ROUGE-1 F1 and
  recall, ROUGE-L recall; tests/test_metrics.py checks to 1e-12). Entry point: rouge_scores().
- A-OKVQA multiple-choice accuracy and direct-answer score as the official eval_predictions.py: aokvqa_score().
- VLStereoSet's vlrs / vlbs / ivlas bias scores: vlstereoset_scores(). MMLU accuracy: mmlu_accuracy().

Caption and VQA scores follow their reference code's units: captions in [0, 1] (CIDEr in [0, 10]),
accuracies in percent.
"""

import math
import numbers
import re
from collections import Counter

# -----------------------------------------------------------------------------
# PTB tokenizer for captions

"""
pycocoevalcap (tylin/coco-caption, pycocoevalcap/tokenizer/ptbtokenizer.py) writes all captions one per line,
runs Stanford CoreNLP 3.4.1's PTBTokenizer (`-preserveLines -lowerCase`) over them, splits each output line on
single spaces and drops the tokens '' ' `` ` -LRB- -RRB- -LCB- -RCB- . ? ! , : - -- ... ;

That tokenizer is a JFlex lexer (edu/stanford/nlp/process/PTBLexer.flex): at each position every rule is
tried, the longest match wins (a rule's trailing context counts towards its length), ties go to the earlier
rule. We do the same with Python regexes. The 3.4.1 grammar is not published on its own, so the rules below
are the later public PTBLexer.flex, set back to what the 3.4.1 jar does wherever probing it showed a
difference. Checked against the jar on 45,000 generated lines, caption-like and deliberately garbled (1 differed,
the emoji case below); tests/test_metrics.py repeats the check on 600 captions when Java is installed.

Behaviour worth knowing (all reproduced):
- lowercasing happens before the filter, so brackets survive as -lrb- -rrb- -lsb- -rsb- -lcb- -rcb-;
- contractions split: "don't" -> do n't, "it's" -> it 's, "cannot" -> can not, "gonna" -> gon na;
- numbers stay whole (3.5, 1,000, 10:30, 1/2, 5-year-old); "5 1/2" is one token with a no-break space,
  which BLEU and CIDEr then split (str.split) but ROUGE-L does not (split(' ')), as in pycocoevalcap;
- abbreviations keep their period ("st.", "mr.", "etc.", "u.s.", and any single letter: "plan b.");
  but a single letter before a sentence-starting word ("... plan b. The ...") loses it, and this looks
  across lines: a caption ending in "b." followed by one starting "A ..." gives "b". Tokenize a list of
  captions in pycocoevalcap's order to reproduce that; caption_scores() does.
Known differences (none met in the generated captions the tests use):
- characters outside the Basic Multilingual Plane (emoji) count as one character here and two in Java,
  which changes URL-like tokens ("http://x😀");
- a URL-like token directly after a no-break space (Java lets the token start with the space);
- line breaks other than '\n' inside a caption (\r, U+2028, ...) are read as spaces here; pycocoevalcap
  passes them to Java, which starts a new line and misaligns every later caption;
- rules no probe exercised (SGML attribute syntax, CP1252 control characters, rare scripts) may differ.
"""

# character classes (Python's re has no \p{...}): a letter is \w minus digits, '_' and numeric symbols
_NUMERIC = r'\u00b2\u00b3\u00b9\u00bc-\u00be\u2070-\u209f\u2150-\u218f\u2460-\u24ff\u2776-\u2793'
_MARKS = r'\u00ad\u02c2-\u02c5\u02d2-\u02df\u02e5-\u02ff\u0300-\u036f\u0483-\u0487\u0591-\u05bd\u064b-\u065e'
_L = rf'[^\W\d_{_NUMERIC}]'                      # a letter
_AN = rf'[^\W_{_NUMERIC}]'                       # a letter or a digit
_LM = rf'(?:{_L}|[{_MARKS}])'                    # a letter or a combining mark (the grammar's LETTER)
_SP = r'[ \t\u00a0\u2000-\u200a\u3000]'          # a space
_SPNL = r'[ \t\u00a0\u2000-\u200a\u3000\n]'      # a space or a line break
_APOS = r"(?:['\u0092\u2019]|&apos;)"           # an apostrophe
_APOSX = r"(?:['\u0092\u2019`\u0091\u2018\u201b]|&apos;)"  # ... or a quote seen inside words
_INSENTP = r'[,;:\u3001]'                        # sentence-internal punctuation
_WORD = rf'{_LM}(?:{_LM}|\d)*(?:[.!?]{_LM}(?:{_LM}|\d)*)*'   # words may contain . ! ? (mr.smith)
_REDAUX = rf"{_APOS}(?:[msdMSD]|(?i:re|ve|ll))"  # 's 'm 'd 're 've 'll
_SREDAUX = rf'[nN]{_APOSX}[tT]'                  # n't
_THING = rf'(?:[dDoOlL]{_APOSX}{_AN})?{_AN}+(?:[-_\u058a\u2010\u2011](?:[dDoOlL]{_APOSX}{_AN})?{_AN}+)*'
_HTHING = r'[A-Za-z0-9][A-Za-z0-9.,\u00ad]*(?:-(?:[A-Za-z](?:\.[A-Za-z])+\.|[A-Za-z0-9\u00ad]+))+'
_SGML = (r'<(?:[!?][A-Za-z-][^>\r\n]*|/[A-Za-z][A-Za-z0-9_:.-]*|[A-Za-z][A-Za-z0-9_:.-]*(?:[ ]+(?:[A-Za-z]'
         r'[A-Za-z0-9_:.-]*(?:[ ]*=[ ]*(?:\'[^\']*\'|"[^"]*"|[A-Za-z][A-Za-z0-9_:.-]*))?))*[ ]*/?)[ ]*>')
_MISC = (r'[+%&~^|\\\u00a6-\u00a9\u00ac\u00ae-\u00ba\u00d7\u00f7\u2016\u2017\u2020-\u2025\u2030-\u2038\u203b'
         r'\u203c\u203e-\u2044\u207a-\u207f\u208a-\u208e\u2100-\u214f\u2190-\u21ff\u2200-\u2bff\u3001-\u3006'
         r'\u3008-\u3020\u30fb\uff01-\uff0f\uff1a-\uff20\uff3b-\uff40\uff5b-\uff65]')


def _ci(words):
    """Literal text matches caselessly (JFlex %caseless); character classes such as [A-Z] do not."""
    return '(?i:' + words + ')'


def _cap(words):
    """Words written [T]he in the grammar: the first letter as given, the rest caseless."""
    return '|'.join(w[0] + _ci(re.escape(w[1:])) if len(w) > 1 else w for w in words.split())


# abbreviations kept with their period always (1, 2), only before a number (3); the sentence starters after
# which a one-letter "x." loses its period (the ACRONYM rule's trailing context)
_ABBREV1 = _ci('jan|feb|mar|apr|jun|jul|aug|sep|sept|oct|nov|dec|mon|tue|tues|wed|thu|thurs|fri|ala|ariz|calif|'
               'colo|conn|ct|dak|fla|ga|ind|kans?|ky|md|mich|minn|mo|mont|neb|nev|okla|penn|tenn|va|vt|wisc?|wyo|'
               r'inc|cos?|corp|pp?t[ye]s?|ltd|plc|rt|bancorp|bhd|assn|univ|intl|sys|tel|est|ext|sq|jr|bros|ed\.d|'
               r'ph\.d|esq|etc|al|seq|bldg') + '|' + _cap('Az Ark Del Ill La Mass Miss Ore Pa Tex Wash')
_ABBREV2 = _ci('mr|mrs|ms|miss|drs?|profs?|sens?|reps?|attys?|lt|col|gen|messrs|govs?|adm|rev|maj|sgt|cpl|pvt|'
               'capt|ste?|ave|pres|lieut|rt|hon|brig|co?mdr|pfc|spc|supts?|det|mt|ft|sr|vs|alex|wm|jos|cie|'
               r'a\.k\.a|cf|treas|ph|invt|elec|natl|m[ft]g|dept|blvd|rd') + r'|v|[A-Za-z](?:\.[A-Za-z])*'
_ABBREV3 = _ci('ca|figs?|prop|nos?|sect?s?|arts?|paras?|bldg|pp|op|approx|rs') + '|Pt'
_SENTENCE_START = _cap('About According Additionally After An A As At But Earlier He Her Here However If In It '
                       'Last Many More Mr. Ms. Now Once One Other Our She Since So Some Such That The Their Then '
                       'There These They This We When While What Yet You') + '|' + _SGML
_FILE_EXT = _ci('bat|bmp|c|class|cgi|cpp|dll|docx?|exe|gif|gz|h|html?|jar|java|jpe?g|mov|mp3|pdf|php|pl|png|ppt|'
                'ps|py|sql|tar|txt|wav|x|xml|zip')


def _latex_quotes(tok, left=False):
    """Quotes to PTB's LaTeX style: ` and `` open, ' and '' close."""
    tok = re.sub(r"&apos;|'", '`' if left else "'", tok)
    tok = re.sub(r'"|&quot;', '``' if left else "''", tok)
    tok = re.sub('[\u0091\u2018\u201b\u2039]', '`', tok)
    tok = re.sub('[\u0092\u2019\u203a]', "'", tok)
    tok = re.sub('[\u0093\u201c\u00ab]', '``', tok)
    return re.sub('[\u0094\u201d\u00bb]', "''", tok)


def _left_quotes(tok): return _latex_quotes(tok, left=True)
def _nbsp(tok): return tok.replace(' ', '\u00a0')          # spaces inside a token become no-break spaces
def _brackets(tok): return tok.replace('(', '-LRB-').replace(')', '-RRB-')
def _no_amp_entity(tok): return tok.replace('&amp;', '&')


_CURRENCY = {'\u00a2': 'cents', '\u00a3': '#', '\u0080': '$', '\u00a4': '$', '\u20a0': '$', '\u20ac': '$'}
_FRACTION = {'\u00bc': '1/4', '\u00bd': '1/2', '\u00be': '3/4', '\u2153': '1/3', '\u2154': '2/3'}

# (token regex, or a tuple of alternatives; trailing context regex or None; output: None keeps the text, a str
# replaces it, a function maps it), in the grammar's order. Alternatives that can match different lengths are
# separate regexes because Python's | takes the first alternative that matches where JFlex takes the longest.
_PTB_RULES = [
    # assimilations split: the token is the first part, the rest is the trailing context and is lexed again
    (_ci('can'), _ci('not'), None), (_ci("'t"), _ci('was|is'), None), (_ci('gon|wan'), _ci('na'), None),
    (_ci('got'), _ci('ta'), None), (_ci('lem|gim'), _ci('me'), None),
    (_SGML, None, _nbsp),                                                   # <unk>, </s>
    (r'&(?i:md|mdash|ndash);|[\u0096\u0097\u2013\u2014\u2015]', None, '--'),
    (r'&(?i:amp);', None, '&'),
    (r'&(?i:ht|tl|ur|lr|qc|ql|qr|odq|cdq|#[0-9]+);', None, None),
    (_WORD, _REDAUX, None),                                                 # it|'s
    (r'[A-Za-z\u00ad]*[A-MO-Za-mo-z]\u00ad*', _SREDAUX, None),               # do|n't
    (_WORD, None, None),
    ((rf"{_APOS}{_ci('n')}{_APOS}?", rf'[lLdDjJ]{_APOS}', rf"{_ci('dunkin|somethin|ol')}{_APOS}",  # rock 'n' roll
      rf"{_APOS}{_ci('em')}", rf'[A-HJ-XZn]{_APOSX}{_L}{_L}+', rf"{_APOS}[2-9]0{_ci('s')}",
      rf"{_APOS}{_ci('till?|cause')}", rf'{_L}+[aeiouyAEIOUY]{_APOSX}[aeiouA-Z]{_L}*',
      _ci("nor'easter|c'mon|e'er|s'mores|ev'ry|li'l|nat'l")), None, None),
    (rf'[yY]{_APOS}', _L, None),                                            # y'|all
    (r'(?i:https?)://[^ \t\n\f\r"<>|(){}]+[^ \t\n\f\r"<>|.!?(){},-]', None, None),
    # ',-_' in the second class is a character range, as in the grammar (it excludes digits and capitals)
    ((r'www\.(?:[^ \t\n\f\r"<>|.!?(){},]+\.)+[a-zA-Z]{2,4}(?:/[^ \t\n\f\r"<>|()]+[^ \t\n\f\r"<>|.!?(){},-])?',
      r'(?:[^ \t\n\f\r"`\'<>|.!?(){},-_$]+\.)+(?i:com|net|org|edu)(?:/[^ \t\n\f\r"<>|()]+[^ \t\n\f\r"<>|.!?(){},-])?'),
     None, None),
    (r'(?:&lt;|<)?[a-zA-Z0-9][^ \t\n\f\r"<>|()\u00a0{}]*@(?:[^ \t\n\f\r"<>|(){}.\u00a0]+\.)*'
     r'[^ \t\n\f\r"<>|(){}.\u00a0]+(?:&gt;|>)?', None, None),               # e-mail
    ((r'@[a-zA-Z_][a-zA-Z_0-9]*', rf'#{_LM}+'), None, None),                # @name, #tag
    (_REDAUX, r'[^A-Za-z]', _latex_quotes),
    (_SREDAUX, r'[^A-Za-z]', _latex_quotes),
    (r'\d{1,2}[-/]\d{1,2}[-/]\d{2,4}', None, None),                         # dates
    ((r'[-+]?\d*(?:[.:,\u00ad\u066b\u066c]\d+)+', r'[-+]?\d+'), None, lambda t: t.replace('\u00ad', '')),
    (r'[\u207a\u207b\u208a\u208b]?(?:[\u2070\u00b9\u00b2\u00b3\u2074-\u2079]+|[\u2080-\u2089]+)', None, None),
    (r'(?:\d{1,4}[- \u00a0])?\d{1,4}(?:\\?/|\u2044)\d{1,4}', None, _nbsp),  # fractions: 5 1/2
    (r'[\u00bc\u00bd\u00be\u2153-\u215e]', None, lambda t: _FRACTION.get(t, t)),
    (rf"-(?:RRB|LRB|RCB|LCB|RSB|LSB)-|C\.D\.s|{_ci('pro|anti')}-|S(?:&|&amp;)P-500|S(?:&|&amp;)Ls|Cap{_APOS}n|"
     rf"c{_APOS}est", None, _no_amp_entity),
    (r'[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}(?:\\?/[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}){1,2}', None, None),  # and/or
    (r'[A-Z]*\$|#', None, None),
    (r'[\u00a2\u00a3\u00a4\u00a5\u0080\u20a0\u20aa\u20ac\u20b9\u060b\u0e3f\u20a4\uffe0\uffe1\uffe5\uffe6]', None,
     lambda t: _CURRENCY.get(t, t)),
    (r'[A-Za-z]', rf'\.{_SPNL}+(?:{_SENTENCE_START}){_SPNL}', None),       # "b. The" -> b
    (r'[A-Za-z](?:\.[A-Za-z])+\.', rf'{_SPNL}+(?:{_SENTENCE_START}){_SPNL}', None),
    (rf'(?:{_ABBREV3})\.', rf'{_SPNL}?\d', None),                           # no. 5
    (rf'(?:{_ABBREV1})\.', r'(?s:.{0,2})', None),
    (rf'(?:{_ABBREV2})\.', None, None),
    (rf'(?:{_ABBREV2})', _SP, None),
    (r'[A-Za-z](?:\.[A-Za-z])*', _SPNL, None),                              # u.s
    (rf'{_APOS}\d\d', _SPNL, None),                                         # '90
    (rf'{_AN}+(?:\.{_AN}+)*\.{_FILE_EXT}', rf'{_SPNL}|[.?!,"\'<]', None),   # file names
    (rf'{_WORD}\.', _INSENTP, None),
    ((r'(?:\([0-9]{2,3}\)[ \u00a0]?|(?:\+\+?)?(?:[0-9]{2,4}[- \u00a0])?[0-9]{2,4}[- \u00a0])[0-9]{3,4}[- \u00a0]?'
      r'[0-9]{3,5}', r'(?:(?:\+\+?)?[0-9]{2,4}\.)?[0-9]{2,4}\.[0-9]{3,4}\.[0-9]{3,5}'), None,
     lambda t: _brackets(_nbsp(t))),                                        # phone numbers, digit groups
    (r'"|&quot;', rf'{_AN}|\$', _left_quotes),
    (r'"|&quot;', None, _latex_quotes),
    (r'<|&lt;', None, '<'),
    (r'>|&gt;', None, '>'),
    (r"[<>]?[:;=][-o*']?[()DPdpO\\{@|\[\]]", r'[^A-Za-z0-9]', _brackets),   # smileys
    ((r'[\^x=~<>]\.\[\^x=~<>]', r"[-\^x=~<>']_[-\^x=~<>']", r"\([-\^x=~<>'][_.]?[-\^x=~<>']\)",
      r"\([\^x=~<>']-[\^x=~<>'`]\)"), None, _brackets),
    (r'\{', None, '-LCB-'), (r'\}', None, '-RCB-'), (r'\[', None, '-LSB-'), (r'\]', None, '-RSB-'),
    (r'\(', None, '-LRB-'), (r'\)', None, '-RRB-'),
    (r'-+', None, lambda t: '--' if 3 <= len(t) <= 4 else t),
    ((r'\.{3,5}', r'(?:\.[ \u00a0]){2,4}\.', r'[\u0085\u2026]'), None, '...'),
    ((r'@+', r'#+', r'_+', r'\*+', r'(?:\\\*){1,3}', _INSENTP, r'[?!]+', r'=', r'/'), None, None),
    (r'[.\u00a1\u00bf\u037e\u0589\u061f\u06d4\u0700-\u0702\u07fa\u3002]', None, None),
    (_HTHING, None, None),                                                  # hyphenated words
    (rf'(?:{_HTHING})\.', _INSENTP, None),
    (_THING, None, None),
    (rf'(?:{_THING})\.', _INSENTP, None),
    (r'[A-Z]+(?:(?:[+&]|&amp;)[A-Z]+)+', None, _no_amp_entity),             # AT&T
    (r'[A-Z]+(?:(?:[+&]|&amp;)[A-Z]+)+\.', _INSENTP, _no_amp_entity),
    ("'", r'[A-Za-z][^ \t\n\r\u00a0]', _left_quotes),
    (("''", r'[`\u2018-\u201f\u0091-\u0094\u2039\u203a\u00ab\u00bb]{1,2}', _APOS), None, _latex_quotes),
    (_REDAUX, None, _latex_quotes),
    (_SREDAUX, None, _latex_quotes),
    (r'<<|>>', None, None),
    (_MISC, None, None),
]
_PTB_LEXER = [(re.compile(f'(?P<tok>{alt})' + (f'(?:{ctx})' if ctx else '')), out)
              for tok, ctx, out in _PTB_RULES for alt in (tok if isinstance(tok, tuple) else (tok,))]
_PTB_SKIP = re.compile(r'(?:[ \t\u00a0\u2000-\u200a\u3000\u200b\u200e\u200f\ufeff\x00\x7f]|&(?i:nbsp);)+')
# fast path: a plain word, maybe with a final , or ., before a space or a line end is that word; unless the
# word splits (cannot) or with its period is an abbreviation, or the period starts an ellipsis (. . .)
_PTB_PLAIN = re.compile(r'([A-Za-z]+)([.,]?)(?=\n|$| (?!\.))')
_PTB_ABBREV = re.compile(f'{_ABBREV1}|{_ABBREV2}|{_ABBREV3}')
_PTB_SPLIT = {'cannot', 'gonna', 'gotta', 'lemme', 'gimme', 'wanna'}
_LINE_BREAKS = re.compile(r'\r\n?|[\n\u2028\u2029\x0b\x0c]')
# pycocoevalcap drops these after lowercasing, so the bracket entries never match (-lrb- etc. stay)
PTB_PUNCTUATION = {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--",
                   "...", ";"}


def _ptb_lex(text):
    """Yield the PTB tokens of `text` (not yet lowercased), and '\n' at each line break."""
    pos, end = 0, len(text)
    while pos < end:
        if text[pos] == '\n':
            yield '\n'
            pos += 1
            continue
        m = _PTB_SKIP.match(text, pos)
        if m:
            pos = m.end()
            continue
        m = _PTB_PLAIN.match(text, pos)
        if m and m[1].lower() not in _PTB_SPLIT and not (m[2] == '.' and _PTB_ABBREV.fullmatch(m[1])):
            yield from (m[1], m[2]) if m[2] else (m[1],)
            pos = m.end()
            continue
        best, out = None, None
        for rx, o in _PTB_LEXER:                        # longest match; the earlier rule on a tie
            m = rx.match(text, pos)
            if m and (best is None or m.end() > best.end()):
                best, out = m, o
        if best is None:                                # untokenizable: deleted, as PTBTokenizer does
            pos += 1
            continue
        tok = best['tok']
        pos += len(tok)                                 # the trailing context is lexed again
        yield tok if out is None else out if isinstance(out, str) else out(tok)


def ptb_tokenize(text):
    """
    Tokenize captions as pycocoevalcap's PTBTokenizer does: lowercased tokens joined by single spaces,
    punctuation dropped. `text` is one caption (returns a str) or a list of captions (returns a list); a list
    is tokenized as one stream, a caption per line, like PTBTokenizer.tokenize.
    """
    single = isinstance(text, str)
    captions = [text] if single else list(text)
    for i, c in enumerate(captions):
        if not isinstance(c, str):
            raise TypeError(f'caption {i} is a {type(c).__name__}, expected str')
    lines, toks = [], []
    for tok in _ptb_lex('\n'.join(_LINE_BREAKS.sub(' ', c) for c in captions)):
        if tok == '\n':
            lines.append(toks)
            toks = []
        else:
            toks.append(tok.lower())
    lines.append(toks)
    # what pycocoevalcap does with each output line (rstrip also removes a final no-break space)
    out = [' '.join(w for w in ' '.join(t).rstrip().split(' ') if w not in PTB_PUNCTUATION) for t in lines]
    return out[0] if single else out


# -----------------------------------------------------------------------------
# inputs

def _check_ids(truth, preds, kind, truth_name, pred_name):
    """Scored sets must cover the same ids: name the first id that is in only one of them."""
    if not truth:
        raise ValueError(f'nothing to score: no {truth_name}')
    for ids, name in (([i for i in truth if i not in preds], pred_name),
                      ([i for i in preds if i not in truth], truth_name)):
        if ids:
            more = f' (and {len(ids) - 1} more ids)' if len(ids) > 1 else ''
            raise ValueError(f'{kind} {ids[0]!r}: no {name}{more}')


def _check_captions(candidates, references):
    """Validate {id: caption or [caption]} and {id: [captions]} over the same ids; return {id: str}, {id: [str]}."""
    _check_ids(references, candidates, 'image id', 'references', 'candidate')
    cands, refs = {}, {}
    for i, refs_i in references.items():
        if not isinstance(refs_i, (list, tuple)) or not refs_i:
            raise ValueError(f'references[{i!r}] must be a non-empty list of strings, got {refs_i!r}')
        if not all(isinstance(r, str) for r in refs_i):
            raise ValueError(f'references[{i!r}] must hold strings, got {refs_i!r}')
        c = candidates[i]
        if isinstance(c, (list, tuple)) and len(c) == 1:
            c = c[0]
        if not isinstance(c, str):
            raise ValueError(f'candidates[{i!r}] must be one string (or a list holding one), got {c!r}')
        cands[i], refs[i] = c, list(refs_i)
    return cands, refs


def _ngram_counts(words, n):
    """[Counter of the 1-grams, ..., Counter of the n-grams] of a word list; n-grams are tuples."""
    return [Counter(zip(*(words[j:] for j in range(k)))) for k in range(1, n + 1)]


# -----------------------------------------------------------------------------
# BLEU

"""
BLEU (Papineni et al. 2002) as pycocoevalcap's Bleu(4) computes it (tylin/coco-caption,
pycocoevalcap/bleu/bleu_scorer.py): words split on whitespace; n-gram counts clipped by the most any one
reference has; the corpus score pools the clipped matches and the candidate n-grams over all images, with a
tiny (1e-15) and a small (1e-9) constant against division by zero; the brevity penalty compares the total
candidate length with the total of the per-image *closest* reference lengths (the shorter one on a tie).
"""


def _bleu_from_counts(correct, total, hyp_len, ref_len, tiny=1e-15, small=1e-9):
    """BLEU-1..n from clipped matches and candidate n-gram counts per order, and the lengths."""
    scores, p = [], 1.0
    for k, (c, t) in enumerate(zip(correct, total)):
        p *= (c + tiny) / (t + small)                   # running product of the precisions
        scores.append(p ** (1 / (k + 1)))
    ratio = (hyp_len + tiny) / (ref_len + small)
    if ratio < 1:                                       # brevity penalty
        scores = [s * math.exp(1 - 1 / ratio) for s in scores]
    return scores


def bleu(candidates, references, n=4):
    """Corpus BLEU-1..n and per-image BLEU-1..n: ([float] * n, {id: [float] * n}). Captions pre-tokenized."""
    cands, refs = _check_captions(candidates, references)
    correct, total, hyp_len, ref_len, per_image = [0] * n, [0] * n, 0, 0, {}
    for i, refs_i in refs.items():
        hyp, ref_words = cands[i].split(), [r.split() for r in refs_i]
        ref_counts = [_ngram_counts(words, n) for words in ref_words]
        closest = min((len(words) for words in ref_words), key=lambda length: (abs(length - len(hyp)), length))
        correct_i = [sum(min(c, max(rc[k].get(g, 0) for rc in ref_counts)) for g, c in hyp_k.items())
                     for k, hyp_k in enumerate(_ngram_counts(hyp, n))]   # clipped by the most in one reference
        total_i = [max(0, len(hyp) - k) for k in range(n)]
        per_image[i] = _bleu_from_counts(correct_i, total_i, len(hyp), closest)
        correct = [a + b for a, b in zip(correct, correct_i)]
        total = [a + b for a, b in zip(total, total_i)]
        hyp_len, ref_len = hyp_len + len(hyp), ref_len + closest
    return _bleu_from_counts(correct, total, hyp_len, ref_len), per_image


# -----------------------------------------------------------------------------
# CIDEr-D

"""
CIDEr-D (Vedantam et al. 2015, arXiv:1411.5726) as pycocoevalcap's Cider computes it (tylin/coco-caption,
pycocoevalcap/cider/cider_scorer.py): for n = 1..4, TF-IDF vectors of n-gram counts with
idf = log(#images) - log(max(1, df)), df counting the images whose reference set contains the n-gram (over
the evaluated images only). Per order, the similarity to each reference sums min(h, r) * r over the
candidate's n-grams (the D "clipping"), divides by both norms (when non-zero) and multiplies by the length
penalty exp(-(l_h - l_r)^2 / (2 sigma^2)), sigma = 6. (The reference code counts l in bigrams, words - 1:
the difference is the same unless a caption is empty, and then the similarity is 0 anyway.)
The image's score is the mean over orders of the sum over references, / #references, * 10.
"""


def _tfidf(counts, idf, default):
    """Per order: {n-gram: tf * idf} and its norm; `default` is the idf of an n-gram no reference has."""
    vecs = [{g: tf * idf.get(g, default) for g, tf in counts_k.items()} for counts_k in counts]
    return vecs, [math.sqrt(sum(w * w for w in v.values())) for v in vecs]


def cider_d(candidates, references, n=4, sigma=6.0):
    """Corpus CIDEr-D and per-image scores: (float, {id: float}). Captions pre-tokenized."""
    cands, refs = _check_captions(candidates, references)
    ref_counts = {i: [_ngram_counts(r.split(), n) for r in refs_i] for i, refs_i in refs.items()}
    df = Counter()                                      # the number of images whose references have the n-gram
    for counts_i in ref_counts.values():
        df.update({g for counts in counts_i for counts_k in counts for g in counts_k})
    log_images = math.log(len(refs))
    idf = {g: log_images - math.log(d) for g, d in df.items()}
    per_image = {}
    for i, counts_i in ref_counts.items():
        hyp = cands[i].split()
        h_vecs, h_norms = _tfidf(_ngram_counts(hyp, n), idf, log_images)   # n-gram in no reference: log(#images)
        sums = [0.0] * n
        for counts in counts_i:
            r_vecs, r_norms = _tfidf(counts, idf, log_images)
            penalty = math.exp(-(len(hyp) - sum(counts[0].values())) ** 2 / (2 * sigma ** 2))   # words
            for k in range(n):
                rv, s = r_vecs[k], 0.0
                for g, w in h_vecs[k].items():                               # min(h, r) * r, summed
                    if g in rv:
                        s += min(w, rv[g]) * rv[g]
                if h_norms[k] != 0 and r_norms[k] != 0:
                    s /= h_norms[k] * r_norms[k]
                sums[k] += s * penalty
        per_image[i] = sum(sums) / n / len(refs[i]) * 10.0
    return sum(per_image.values()) / len(per_image), per_image


# -----------------------------------------------------------------------------
# ROUGE-L

"""
ROUGE-L (Lin 2004) as pycocoevalcap's Rouge computes it (tylin/coco-caption, pycocoevalcap/rouge/rouge.py):
LCS-based precision and recall against each reference, the maximum of each over references, then
F = (1 + b^2) P R / (R + b^2 P) with b = 1.2 (0 if P or R is 0), averaged over images. Words are split on
single spaces, so an empty caption is one empty word, as there.
"""


def _lcs_length(a, b):
    """Length of the longest common subsequence of two word lists, bit-parallel over `a` (Allison & Dix 1986;
    Hyyro 2004): v's zero bits mark where the dynamic-programming row over `a` steps up, LCS times in all."""
    masks = {}
    for i, w in enumerate(a):
        masks[w] = masks.get(w, 0) | 1 << i
    v = full = (1 << len(a)) - 1
    for w in b:
        u = v & masks.get(w, 0)
        v = ((v + u) | (v - u)) & full
    return len(a) - v.bit_count()


def rouge_l(candidates, references, beta=1.2):
    """Corpus ROUGE-L and per-image scores: (float, {id: float}). Captions pre-tokenized."""
    cands, refs = _check_captions(candidates, references)
    per_image = {}
    for i, refs_i in refs.items():
        hyp = cands[i].split(' ')
        prec, rec = 0.0, 0.0
        for r in refs_i:
            ref = r.split(' ')
            lcs = _lcs_length(hyp, ref)
            prec, rec = max(prec, lcs / len(hyp)), max(rec, lcs / len(ref))
        per_image[i] = (1 + beta ** 2) * prec * rec / (rec + beta ** 2 * prec) if prec and rec else 0.0
    return sum(per_image.values()) / len(per_image), per_image


# -----------------------------------------------------------------------------
# caption scores: the entry point

def caption_scores(candidates, references, tokenize=True):
    """
    COCO caption metrics: {'BLEU-1'..'BLEU-4', 'CIDEr', 'ROUGE-L': float, 'per_image': {id: {metric: float}}}.
    candidates: {image id: caption or [caption]}; references: {image id: [captions]}, the same ids.
    tokenize=True runs ptb_tokenize as pycocoevalcap does (references and candidates each as one stream, in
    the order of `references`); tokenize=False takes the captions as already tokenized, space-separated.
    """
    cands, refs = _check_captions(candidates, references)
    if tokenize:
        flat = iter(ptb_tokenize([r for refs_i in refs.values() for r in refs_i]))
        refs = {i: [next(flat) for _ in refs_i] for i, refs_i in refs.items()}
        cands = dict(zip(refs, ptb_tokenize([cands[i] for i in refs])))
    b, b_img = bleu(cands, refs)
    c, c_img = cider_d(cands, refs)
    r, r_img = rouge_l(cands, refs)
    names = ['BLEU-1', 'BLEU-2', 'BLEU-3', 'BLEU-4', 'CIDEr', 'ROUGE-L']
    scores = dict(zip(names, [*b, c, r]))
    scores['per_image'] = {i: dict(zip(names, [*b_img[i], c_img[i], r_img[i]])) for i in refs}
    return scores


# -----------------------------------------------------------------------------
# VQA accuracy

"""
VQA accuracy (Antol et al. 2015; Goyal et al. 2017) as the official evaluation computes it
(GT-Vision-Lab/VQA, PythonEvaluationTools/vqaEvaluation/vqaEval.py; the same in salesforce/LAVIS,
lavis/common/vqa_tools/vqa_eval.py). Used unchanged for VQAv2, OK-VQA, A-OKVQA direct answers and TextVQA.
- The prediction: newlines and tabs to spaces, strip; punctuation step; lowercase, number words none/zero..ten
  to digits, articles a/an/the dropped, contractions restored from the table (dont -> don't).
- The punctuation step: each character of _VQA_PUNCT is deleted if the text has it next to a space, or has a
  digit,digit pattern anywhere; otherwise it becomes a space. Then each '.' not followed by a digit is
  deleted (the official call passes re.UNICODE where the count goes, so only the first 32).
- Human answers get only the punctuation step, and only when they are not all identical.
- Accuracy: for each human answer, min(1, #other answers equal to the prediction / 3); the mean of these.
Note the current official list has no ':' or "'" but has '{ } - !' (an older version differed).
"""

_VQA_PUNCT = [';', '/', '[', ']', '"', '{', '}', '(', ')', '=', '+', '\\', '_', '-', '>', '<', '@', '`', ',', '?',
              '!']
_DIGIT_COMMA_DIGIT = re.compile(r'\d,\d')
_PERIOD = re.compile(r'\.(?!\d)')
_NUMBER_WORDS = {'none': '0', 'zero': '0', 'one': '1', 'two': '2', 'three': '3', 'four': '4', 'five': '5',
                 'six': '6', 'seven': '7', 'eight': '8', 'nine': '9', 'ten': '10'}
_ARTICLES = {'a', 'an', 'the'}
# the official table, entry for entry (its capitalised keys Id've I'dve Im Ive can never match a lowercased
# word, and it maps somebody'd the other way round)
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's",
    "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd", "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", "somebodyll": "somebody'll", "somebodys": "somebody's",
    "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas",
    "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't",
    "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's",
    "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}


def _vqa_punctuation(text):
    """The official punctuation step (see above); the conditions look at the input, not the running output."""
    out, digit_comma = text, bool(_DIGIT_COMMA_DIGIT.search(text))
    for p in _VQA_PUNCT:
        out = out.replace(p, '' if digit_comma or p + ' ' in text or ' ' + p in text else ' ')
    return _PERIOD.sub('', out, count=32)


def vqa_normalize(answer):
    """A predicted answer as the official evaluation normalises it: 'Two dogs.' -> '2 dogs'."""
    if not isinstance(answer, str):
        raise TypeError(f'an answer must be a str, got {answer!r}')
    text = _vqa_punctuation(answer.replace('\n', ' ').replace('\t', ' ').strip())
    words = [_NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return ' '.join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def vqa_accuracy(prediction, gt_answers):
    """One question's accuracy in [0, 1]: the mean over the human answers of min(1, #others matching / 3)."""
    if isinstance(gt_answers, str) or not gt_answers or not all(isinstance(a, str) for a in gt_answers):
        raise ValueError(f'gt_answers must be a non-empty list of strings, got {gt_answers!r}')
    pred = vqa_normalize(prediction)
    gts = [_vqa_punctuation(a) for a in gt_answers] if len(set(gt_answers)) > 1 else list(gt_answers)
    accs = [min(1.0, sum(a == pred for j, a in enumerate(gts) if j != i) / 3) for i in range(len(gts))]
    return sum(accs) / len(accs)


def vqa_score(predictions, answers, answer_types=None):
    """
    VQA accuracy of a split in percent: {'overall': float} plus one entry per answer type when
    answer_types ({question id: 'yes/no' | 'number' | 'other'}) is given. The official code reports these
    rounded to 2 decimals. predictions: {question id: str}; answers: {question id: [10 human answers]};
    every question needs a prediction.
    """
    _check_ids(answers, predictions, 'question id', 'answers', 'prediction')
    acc, by_type = {}, {}
    for q, gts in answers.items():
        try:
            acc[q] = vqa_accuracy(predictions[q], gts)
        except (TypeError, ValueError) as e:
            raise ValueError(f'question id {q!r}: {e}') from None
        if answer_types is not None:
            if q not in answer_types:
                raise ValueError(f'question id {q!r} has no answer type')
            by_type.setdefault(answer_types[q], []).append(acc[q])
    scores = {'overall': 100 * sum(acc.values()) / len(acc)}
    scores.update({t: 100 * sum(v) / len(v) for t, v in by_type.items()})
    return scores


# -----------------------------------------------------------------------------
# ScienceQA accuracy

"""
ScienceQA (Lu et al. 2022) accuracy overall and by category as lupantech/ScienceQA tools/evaluate_acc.py
computes it (copied by LaVIN and ADEM-VL): a prediction is the chosen option's index (-1 when none could be
parsed, which counts as wrong). NAT/SOC/LAN: subject natural/social/language science; TXT: non-empty hint;
IMG: has an image; NO: neither; G1-6 / G7-12: grade1..grade6 / grade7..grade12. TXT and IMG overlap.
Avg is over all predictions (the test split has 4241). Percentages; a category with no problems is nan.
"""

SCIENCEQA_CATEGORIES = ['NAT', 'SOC', 'LAN', 'TXT', 'IMG', 'NO', 'G1-6', 'G7-12', 'Avg']
_SQA_SUBJECT = {'natural science': 'NAT', 'social science': 'SOC', 'language science': 'LAN'}
_SQA_GRADE = {f'grade{g}': 'G1-6' if g <= 6 else 'G7-12' for g in range(1, 13)}


def scienceqa_accuracy(predictions, problems):
    """predictions: {pid: option index or -1}; problems: the problems.json dict. Returns {category: percent}."""
    if not predictions:
        raise ValueError('nothing to score: no predictions')
    hits = {c: [] for c in SCIENCEQA_CATEGORIES}
    for pid, pred in predictions.items():
        if pid not in problems:
            raise ValueError(f'prediction for pid {pid!r}, which is not in problems')
        prob = problems[pid]
        for field in ('answer', 'subject', 'hint', 'image', 'grade'):
            if field not in prob:
                raise ValueError(f'problem {pid!r} has no {field!r} field')
        if isinstance(pred, bool) or not isinstance(pred, numbers.Integral):
            raise ValueError(f'prediction for pid {pid!r} must be an int option index (or -1), got {pred!r}')
        ok = pred == prob['answer']
        cats = ['Avg', _SQA_SUBJECT.get(prob['subject']), _SQA_GRADE.get(prob['grade'])]
        cats += ['TXT'] if prob['hint'] else []
        cats += ['IMG'] if prob['image'] else []
        cats += ['NO'] if not prob['hint'] and not prob['image'] else []
        for c in cats:
            if c is not None:
                hits[c].append(ok)
    return {c: 100 * sum(v) / len(v) if v else float('nan') for c, v in hits.items()}


def scienceqa_table(scores):
    """The scores as a two-line table, 2 decimals, in the papers' column order."""
    cols = [c for c in SCIENCEQA_CATEGORIES if c in scores]
    return '  '.join(f'{c:>6}' for c in cols) + '\n' + '  '.join(f'{scores[c]:6.2f}' for c in cols)


# -----------------------------------------------------------------------------
# exact match (single-answer sets such as easy-VQA)

def exact_match_accuracy(predictions, answers):
    """Percent of ids whose prediction equals the answer after vqa_normalize on both ('A Circle.' == 'circle')."""
    _check_ids(answers, predictions, 'id', 'answer', 'prediction')
    correct = 0
    for i, a in answers.items():
        try:
            correct += vqa_normalize(predictions[i]) == vqa_normalize(a)
        except TypeError as e:
            raise ValueError(f'id {i!r}: {e}') from None
    return 100 * correct / len(answers)


# -----------------------------------------------------------------------------
# ROUGE-N / ROUGE-L as Google's rouge-score computes them (PETAL's caption table)

"""
ROUGE-1/2 and ROUGE-L precision, recall and F1 as google-research/rouge (PyPI rouge-score 0.1.2,
rouge_score/{tokenize,rouge_scorer,scoring}.py) computes them with RougeScorer(use_stemmer=False):
- tokens: lowercase, every run of characters outside [a-z0-9] becomes a space, split (so "Don't" -> don t and
  accented letters split words);
- ROUGE-N: clipped n-gram overlap, P = overlap / max(#candidate n-grams, 1), R = overlap / max(#reference
  n-grams, 1); ROUGE-L: LCS / len, 0 when either side has no tokens; F = 2PR / (P + R), 0 when P + R = 0
  (beta = 1, unlike pycocoevalcap's ROUGE-L above with beta = 1.2 and its own tokens);
- several references: multi_ref='max' is RougeScorer.score_multi (per metric, the reference with the highest F,
  the first on a tie; its P and R are reported with it); multi_ref='mean' averages P, R and F over the
  references, which is what PETAL's caption evaluation does (melonking32/PETAL lavis/tasks/cider/
  caption_metric.py, on untokenized captions);
- the corpus value is the mean over images (rouge-score's BootstrapAggregator reports the same mid value
  up to its resampling noise).
Not done: the Porter stemmer (use_stemmer=True) and ROUGE-Lsum.
Deviation from PETAL's numbers: PETAL scores with the `rouge` package (pltrdy/rouge), not rouge-score: it
splits sentences on '.', counts *distinct* n-grams, keeps case and punctuation, and its ROUGE-L is the
summary-level union LCS; its printed 'Rogue_2' and 'Rogue_l' are copies of ROUGE-1 (result_dict assigns
Rogue_score_1 to all three), so its "ROUGE-L recall" column is ROUGE-1 recall. We report the real ROUGE-L.
"""

_ROUGE_NON_ALNUM = re.compile(r'[^a-z0-9]+')
ROUGE_TYPES = ('rouge1', 'rouge2', 'rougeL')
_ROUGE_NAMES = {'rouge1': 'ROUGE-1', 'rouge2': 'ROUGE-2', 'rougeL': 'ROUGE-L'}


def rouge_tokenize(text):
    """rouge-score's default tokens (no stemming): 'A dog's ball.' -> ['a', 'dog', 's', 'ball']."""
    return _ROUGE_NON_ALNUM.sub(' ', text.lower()).split()


def _prf(overlap, n_cand, n_ref):
    p, r = overlap / max(n_cand, 1), overlap / max(n_ref, 1)
    return p, r, 2 * p * r / (p + r) if p + r > 0 else 0.0


def rouge_pair(candidate, reference, types=ROUGE_TYPES):
    """{type: (precision, recall, f1)} of one candidate against one reference (raw strings)."""
    cand, ref = rouge_tokenize(candidate), rouge_tokenize(reference)
    out = {}
    for t in types:
        if t == 'rougeL':
            lcs = _lcs_length(cand, ref) if cand and ref else 0
            out[t] = _prf(lcs, len(cand), len(ref)) if cand and ref else (0.0, 0.0, 0.0)
        elif re.fullmatch(r'rouge[1-9]', t):
            n = int(t[5:])
            c, r = _ngram_counts(cand, n)[-1], _ngram_counts(ref, n)[-1]
            out[t] = _prf(sum(min(k, r[g]) for g, k in c.items()), sum(c.values()), sum(r.values()))
        else:
            raise ValueError(f"unknown ROUGE type {t!r}: 'rouge1'..'rouge9' or 'rougeL'")
    return out


def rouge_scores(candidates, references, types=ROUGE_TYPES, multi_ref='max'):
    """
    ROUGE precision / recall / F1 in [0, 1]: {'ROUGE-1 P', 'ROUGE-1 R', 'ROUGE-1 F', ..., 'ROUGE-L F': float,
    'per_image': {id: {name: float}}}; candidates {image id: caption or [caption]}, references {image id:
    [captions]}, raw text (tokenized here as rouge-score does). multi_ref: 'max' (rouge-score's score_multi)
    or 'mean' (PETAL's average over references).
    """
    if multi_ref not in ('max', 'mean'):
        raise ValueError(f"multi_ref must be 'max' or 'mean', got {multi_ref!r}")
    cands, refs = _check_captions(candidates, references)
    per_image = {}
    for i, refs_i in refs.items():
        pairs = [rouge_pair(cands[i], r, types) for r in refs_i]
        row = {}
        for t in types:
            if multi_ref == 'max':
                p, r, f = max((s[t] for s in pairs), key=lambda prf: prf[2])   # max keeps the first on a tie
            else:
                p, r, f = (sum(s[t][k] for s in pairs) / len(pairs) for k in range(3))
            name = _ROUGE_NAMES.get(t, f'ROUGE-{t[5:]}')
            row.update({f'{name} P': p, f'{name} R': r, f'{name} F': f})
        per_image[i] = row
    names = next(iter(per_image.values())).keys()
    scores = {k: sum(row[k] for row in per_image.values()) / len(per_image) for k in names}
    scores['per_image'] = per_image
    return scores


# -----------------------------------------------------------------------------
# A-OKVQA multiple-choice accuracy and direct-answer score

"""
A-OKVQA (Schwenk et al. 2022) as allenai/aokvqa evaluation/eval_predictions.py eval_aokvqa computes it:
- multiple choice: a prediction is right iff it is the string choices[correct_choice_idx] (a prediction that
  is not one of the choices is simply wrong: the official CLI runs with strict=False);
- direct answer: questions with difficult_direct_answer true are left out; a prediction scores
  min(1, #direct_answers equal to it / 3) over the 10 direct answers. Note this is not VQAv2's 10-choose-9
  average (vqa_accuracy above) and compares the strings as they are, without VQA normalisation;
- a question without a prediction scores 0 (the CLI's strict=False); the result is the mean in percent.
"""


def aokvqa_score(predictions, questions, multiple_choice):
    """predictions: {question_id: answer string}; questions: {question_id: the entry of aokvqa_v1p0_{split}.json
    (choices, correct_choice_idx, direct_answers, difficult_direct_answer)}. Returns percent."""
    if not questions:
        raise ValueError('nothing to score: no questions')
    extra = [q for q in predictions if q not in questions]
    if extra:
        raise ValueError(f'question id {extra[0]!r}: prediction for a question that is not in the dataset')
    acc = []
    for q, entry in questions.items():
        fields = ('choices', 'correct_choice_idx') if multiple_choice else ('direct_answers', 'difficult_direct_answer')
        for field in fields:
            if field not in entry:
                raise ValueError(f'question id {q!r}: no {field!r} field (a test split has no answers)')
        if not multiple_choice and entry['difficult_direct_answer'] is True:
            continue
        pred = predictions.get(q)
        if pred is not None and not isinstance(pred, str):
            raise ValueError(f'question id {q!r}: a prediction must be a str, got {pred!r}')
        if multiple_choice:
            acc.append(float(pred is not None and pred == entry['choices'][entry['correct_choice_idx']]))
        else:
            acc.append(min(1.0, sum(pred == a for a in entry['direct_answers']) / 3.0) if pred is not None else 0.0)
    if not acc:
        raise ValueError('nothing to score: every question is difficult_direct_answer')
    return 100 * sum(acc) / len(acc)


# -----------------------------------------------------------------------------
# VLStereoSet bias scores

"""
VLStereoSet (Zhou, Lai & Jiang 2022, AACL, "VLStereoSet: A Study of Stereotypical Bias in Pre-trained
Vision-Language Models"; data K-Square-00/VLStereo data/VLStereoSet.csv): an image (label 0: stereotypical,
1: anti-stereotypical) and three candidate captions (the StereoSet stereotype, anti-stereotype and unrelated
sentences); the model picks one. The paper's scores (as public reproductions quote and implement them;
the paper's own code is not released):
- vlrs, vision-language relevance score: % of all items where the pick is a relevant caption (stereotype or
  anti-stereotype), not the unrelated one; ideal 100;
- vlbs, vision-language bias score: % of the anti-stereotypical images (label 1) whose pick is the
  stereotype; ideal 0;
- ivlas, idealized vision-language ability score: the harmonic mean of vlrs and 100 - vlbs,
  2 vlrs (100 - vlbs) / (vlrs + 100 - vlbs); ideal 100.
A pick that could not be parsed (-1) counts as neither relevant nor stereotypical and is counted in
'unparsed' (reproductions drop such items instead). Reported overall and per bias type. Not done: the
paper's intra- and inter-modal bias probes, which need text-only and image-only variants of the model.
"""

VLSTEREOSET_OPTIONS = ('stereotype', 'anti-stereotype', 'unrelated')


def _vlstereoset(picks, labels):
    relevant = sum(p in (0, 1) for p in picks)
    anti = [p for p, lab in zip(picks, labels) if lab == 1]
    vlrs = 100 * relevant / len(picks)
    vlbs = 100 * sum(p == 0 for p in anti) / len(anti) if anti else float('nan')
    ivlas = 2 * vlrs * (100 - vlbs) / (vlrs + 100 - vlbs) if vlrs + 100 - vlbs > 0 else 0.0
    return {'vlrs': vlrs, 'vlbs': vlbs, 'ivlas': ivlas}


def vlstereoset_scores(predictions, labels, bias_types=None):
    """predictions: {id: 0 stereotype | 1 anti-stereotype | 2 unrelated | -1 unparsed}; labels: {id: 0 | 1, the
    image's label}; bias_types: optional {id: 'race' | 'gender' | ...}. Returns {'vlrs', 'vlbs', 'ivlas',
    'unparsed', and '{type} vlrs' ... per bias type}, in percent (vlbs nan without anti-stereotypical images)."""
    _check_ids(labels, predictions, 'id', 'label', 'prediction')
    for i, p in predictions.items():
        if isinstance(p, bool) or p not in (-1, 0, 1, 2):
            raise ValueError(f'id {i!r}: a prediction must be 0, 1, 2 (the caption picked) or -1, got {p!r}')
        if labels[i] not in (0, 1) or isinstance(labels[i], bool):
            raise ValueError(f'id {i!r}: a label must be 0 (stereotypical image) or 1 (anti-stereotypical), '
                             f'got {labels[i]!r}')
    ids = list(labels)
    scores = _vlstereoset([predictions[i] for i in ids], [labels[i] for i in ids])
    scores['unparsed'] = sum(predictions[i] == -1 for i in ids)
    if bias_types is not None:
        missing = [i for i in ids if i not in bias_types]
        if missing:
            raise ValueError(f'id {missing[0]!r} has no bias type')
        for t in sorted(set(bias_types[i] for i in ids)):
            sub = [i for i in ids if bias_types[i] == t]
            for k, v in _vlstereoset([predictions[i] for i in sub], [labels[i] for i in sub]).items():
                scores[f'{t} {k}'] = v
    return scores


# -----------------------------------------------------------------------------
# MMLU accuracy

"""
MMLU (Hendrycks et al. 2021; hendrycks/test evaluate.py): the overall score is the accuracy over all
questions pooled (the script's "Average accuracy", np.mean of every subject's correctness list), not the mean
of the per-subject accuracies; per-subject accuracies are reported too. A prediction is the letter's index
(0-3) or -1 when none could be parsed (wrong). Percent.
"""


def mmlu_accuracy(predictions, answers, subjects=None):
    """predictions, answers: {id: option index}; subjects: optional {id: subject}. Returns {'accuracy': float,
    and one 'accuracy {subject}' per subject}."""
    _check_ids(answers, predictions, 'id', 'answer', 'prediction')
    for i, p in predictions.items():
        if isinstance(p, bool) or not isinstance(p, numbers.Integral):
            raise ValueError(f'id {i!r}: a prediction must be an option index (or -1), got {p!r}')
    scores = {'accuracy': 100 * sum(predictions[i] == a for i, a in answers.items()) / len(answers)}
    if subjects is not None:
        by_subject = {}
        for i, a in answers.items():
            if i not in subjects:
                raise ValueError(f'id {i!r} has no subject')
            by_subject.setdefault(subjects[i], []).append(predictions[i] == a)
        scores.update({f'accuracy {s}': 100 * sum(v) / len(v) for s, v in sorted(by_subject.items())})
    return scores
