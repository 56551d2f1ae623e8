"""plot.py: the learning-curve PNG of a train.py log, checked against the log it was drawn from."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip('matplotlib')
from PIL import Image

import plot

ROOT = Path(__file__).resolve().parent.parent


def header(resumed_from=None):
    return {'run': {'started': '2026-12-02 20:30:56', 'git': None, 'resumed_from': resumed_from,
                    'max_steps': 60, 'world': 1, 'config': {}}}


def train_rec(step):  # the keys train.py writes each log_interval
    return dict(step=step, loss=round(3.0 / step ** 0.5 + 0.01 * (step % 3), 6), lr=1e-3, tok_s=100.0,
                samples_s=10.0, time=0.5 * step, grad_norm=0.5, data_s=0.01, mem_gb=1.0)


def val_rec(step, acc=True):  # as validate_and_save writes it; val_acc only with val_answers > 0
    r = dict(step=step, val_loss=2.0 / step ** 0.5)
    if acc:
        r['val_acc'] = {'all': 40.0 + step / 2, 'yes/no': 60.0 + step / 3, 'shape': 30.0 + step, 'colour': 12.5}
    return r


def write_log(path, lines):
    path.write_text(''.join((line if isinstance(line, str) else json.dumps(line)) + '\n' for line in lines))
    return path


def ema_reference(values, w):
    """The bias-corrected EMA in closed form: a w-weighted mean of the values so far."""
    return [sum(w ** (t - i) * values[i] for i in range(t + 1)) / sum(w ** (t - i) for i in range(t + 1))
            for t in range(len(values))]


def test_curves_png_and_data_match_the_log(tmp_path):
    recs = [header()]
    for step in range(10, 61, 10):
        recs.append(train_rec(step))
        if step % 20 == 0:
            recs.append(val_rec(step, acc=step > 20))  # the first evaluation without val_acc, as an older log
    recs.insert(4, '{"step": 30, "loss": 0.5')  # a line cut short by a killed run
    log = write_log(tmp_path / 'log.jsonl', recs)
    with pytest.warns(UserWarning, match=r'log\.jsonl:5: not valid JSON'):
        data = plot.curves(str(log), str(tmp_path / 'c.png'))

    with Image.open(tmp_path / 'c.png') as im:
        im.verify()  # a real PNG, not just a file
    with Image.open(tmp_path / 'c.png') as im:
        assert im.format == 'PNG' and im.size == (12 * 120, round(4.5 * 120))

    train = [r for r in recs if isinstance(r, dict) and 'loss' in r]
    val = [r for r in recs if isinstance(r, dict) and 'val_loss' in r]
    assert data['step'] == [10, 20, 30, 40, 50, 60] and data['loss'] == [r['loss'] for r in train]
    assert data['loss_smooth'] == pytest.approx(ema_reference(data['loss'], 0.9), rel=1e-12)
    assert data['val_step'] == [20, 40, 60] and data['val_loss'] == [r['val_loss'] for r in val]
    assert list(data['acc']) == ['all', 'yes/no', 'shape', 'colour']
    for k, (steps, acc) in data['acc'].items():
        assert steps == [40, 60] and acc == [val[1]['val_acc'][k], val[2]['val_acc'][k]]


def test_resume_replaces_the_steps_past_the_checkpoint(tmp_path):
    # the first run logged to step 40 and was killed; its checkpoint was at 20, so the resumed run logs 30, 40 again
    recs = [header(), train_rec(10), train_rec(20), val_rec(20), train_rec(30), train_rec(40), val_rec(40),
            header(resumed_from=20)]
    again = [dict(train_rec(30), loss=9.0), dict(train_rec(40), loss=8.0), dict(val_rec(40), val_loss=7.0)]
    log = write_log(tmp_path / 'log.jsonl', recs + again)
    data = plot.curves(str(log), str(tmp_path / 'c.png'))
    assert data['step'] == [10, 20, 30, 40] and data['loss'][2:] == [9.0, 8.0]
    assert data['val_step'] == [20, 40] and data['val_loss'][1] == 7.0
    assert data['acc']['all'] == ([20, 40], [val_rec(20)['val_acc']['all'], again[2]['val_acc']['all']])


def test_no_val_acc_and_no_loss(tmp_path):
    log = write_log(tmp_path / 'old.jsonl', [train_rec(10), train_rec(20), val_rec(20, acc=False)])
    data = plot.curves(str(log), str(tmp_path / 'old.png'))
    assert data['acc'] == {} and (tmp_path / 'old.png').stat().st_size > 0

    log = write_log(tmp_path / 'empty.jsonl', [header(), val_rec(20)])
    with pytest.raises(ValueError, match=r'empty\.jsonl: no training loss records'):
        plot.curves(str(log), str(tmp_path / 'empty.png'))
    assert not (tmp_path / 'empty.png').exists()


def test_missing_matplotlib_names_the_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, 'matplotlib.figure', None)  # import matplotlib.figure now raises ImportError
    log = write_log(tmp_path / 'log.jsonl', [train_rec(10)])
    with pytest.raises(ImportError, match='pip install matplotlib'):
        plot.curves(str(log), str(tmp_path / 'c.png'))


def test_cli_run_dir(tmp_path):
    write_log(tmp_path / 'log.jsonl', [header(), train_rec(10), train_rec(20), val_rec(20)])
    r = subprocess.run([sys.executable, str(ROOT / 'plot.py'), str(tmp_path)], capture_output=True, text=True,
                       env={'MPLBACKEND': 'macosx', 'PATH': '/usr/bin:/bin'}, timeout=120)  # a display backend set: still Agg
    assert r.returncode == 0, r.stderr
    with Image.open(tmp_path / 'curves.png') as im:
        assert im.format == 'PNG'
