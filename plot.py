"""
Learning curves of a train.py run, as one PNG: training loss (raw and smoothed) with the validation loss,
and the held-out accuracy per question type (val_answers > 0), both against the step.

python plot.py out/easyvqa                  # reads out/easyvqa/log.jsonl, writes out/easyvqa/curves.png
python plot.py LOG.jsonl OUT.png

matplotlib is needed here only (pip install matplotlib); nothing else in the project imports it.
"""

import json
import os
import sys
import warnings


def read_log(log_path):
    """train.py's JSON-lines log as {'train': [records with 'loss'], 'val': [records with 'val_loss']}, in file
    order. A run header with resumed_from=N drops the earlier records past step N: the resumed run logs those
    steps again. Lines that are not JSON objects (a line cut short by a killed run) are skipped with a warning."""
    train, val = [], []
    with open(log_path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                warnings.warn(f"{log_path}:{lineno}: not valid JSON ({e.msg}), line skipped")
                continue
            if not isinstance(rec, dict):
                warnings.warn(f"{log_path}:{lineno}: not a JSON object, line skipped")
                continue
            if 'run' in rec:
                start = (rec['run'] or {}).get('resumed_from') or 0
                train = [r for r in train if r['step'] <= start]
                val = [r for r in val if r['step'] <= start]
            elif 'loss' in rec and 'step' in rec:
                train.append(rec)
            elif 'val_loss' in rec and 'step' in rec:
                val.append(rec)
    return dict(train=train, val=val)


def smooth(values, weight=0.9):
    """Exponential moving average, bias-corrected as TensorBoard's (the first points are not pulled towards 0)."""
    out, avg = [], 0.0
    for t, v in enumerate(values, 1):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight ** t))
    return out


def curves(log_path, out_path, smoothing=0.9, dpi=120):
    """Write the two-panel PNG of log_path to out_path; returns what was plotted, as lists:
    {'step', 'loss', 'loss_smooth', 'val_step', 'val_loss', 'acc': {question type: (steps, accuracy %)}}."""
    try:
        from matplotlib.figure import Figure  # a bare Figure renders with Agg: no display, no pyplot state
    except ImportError:
        raise ImportError("plot.py needs matplotlib, which the project does not install: pip install matplotlib") from None
    log = read_log(log_path)
    if not log['train']:
        raise ValueError(f"{log_path}: no training loss records (records with 'step' and 'loss'); "
                         f"is it a train.py log.jsonl, and has the run reached its first log_interval?")
    data = dict(step=[r['step'] for r in log['train']], loss=[r['loss'] for r in log['train']],
                val_step=[r['step'] for r in log['val']], val_loss=[r['val_loss'] for r in log['val']], acc={})
    data['loss_smooth'] = smooth(data['loss'], weight=smoothing)
    for r in log['val']:  # one line per question type, in order of first appearance; older logs have no val_acc
        for k, a in (r.get('val_acc') or {}).items():
            data['acc'].setdefault(k, ([], []))
            data['acc'][k][0].append(r['step'])
            data['acc'][k][1].append(a)

    fig = Figure(figsize=(12, 4.5), layout='constrained')
    ax_loss, ax_acc = fig.subplots(1, 2)
    raw, = ax_loss.plot(data['step'], data['loss'], alpha=0.3, linewidth=1, label='train (raw)')
    ax_loss.plot(data['step'], data['loss_smooth'], color=raw.get_color(), linewidth=2, label=f'train (EMA {smoothing})')
    if data['val_step']:
        ax_loss.plot(data['val_step'], data['val_loss'], marker='o', linewidth=2, label='val')
    ax_loss.set(xlabel='step', ylabel='loss', title='loss')
    ax_loss.grid(alpha=0.3)
    ax_loss.legend()
    for k, (steps, acc) in data['acc'].items():
        ax_acc.plot(steps, acc, marker='o', linewidth=2 if k == 'all' else 1, label=k)
    if data['acc']:
        ax_acc.legend()
    else:
        ax_acc.text(0.5, 0.5, 'no val_acc in this log\n(train with val_answers > 0)', ha='center', va='center',
                    transform=ax_acc.transAxes)
    ax_acc.set(xlabel='step', ylabel='accuracy %', title='held-out accuracy by question type')
    ax_acc.grid(alpha=0.3)
    fig.suptitle(log_path)
    fig.savefig(out_path, dpi=dpi)
    return data


if __name__ == '__main__':
    args = sys.argv[1:]
    if len(args) == 1 and os.path.isdir(args[0]):
        log_path, out_path = os.path.join(args[0], 'log.jsonl'), os.path.join(args[0], 'curves.png')
    elif len(args) == 2:
        log_path, out_path = args
    else:
        sys.exit(__doc__.strip().split('\n\n')[1])
    curves(log_path, out_path)
    print(f"wrote {out_path}")
