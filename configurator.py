"""
Poor man's configurator, after nanoGPT. A script defines its defaults as globals, then runs
    exec(open('configurator.py').read())
and each command-line argument is either a config file (python that assigns some of those globals)
or --key=value. Values are parsed with ast.literal_eval (falling back to a plain string) and must
have the type of the default (an int is accepted where a float is expected). An unknown key is an
error that lists the nearest known keys (or the new name, for a key in the script's `_renamed`). Example:
    python train.py config/llava_sqa.py --batch_size=4 --lora_targets="('q','v')"
"""
import builtins as _builtins  # the script may have a `compile` key (train.py's)
import sys as _sys
from ast import literal_eval as _literal_eval
from difflib import get_close_matches as _close

_given = {}  # key -> its default, for every key a config file or --key=value sets (train.py's resume check)


def _set_config(_key, _val, _where):
    _known = [k for k, v in globals().items() if not k.startswith('_') and isinstance(v, (int, float, bool, str, tuple))]
    if _key not in _known and _key in globals().get('_renamed', {}):  # a key the script renamed
        raise SystemExit(f"{_where}: config key {_key!r} is now {globals()['_renamed'][_key]}")
    if _key not in _known:
        _near = _close(_key, _known, n=3, cutoff=0.6)
        raise SystemExit(f"{_where}: unknown config key {_key!r}" + (f"; did you mean {' or '.join(_near)}?" if _near else ''))
    _old = globals()[_key]
    _default = _given.setdefault(_key, _old)  # the first time a key is set, its value is still the script's default
    if isinstance(_old, float) and type(_val) is int:
        _val = float(_val)
    if isinstance(_old, tuple) and isinstance(_val, list):
        _val = tuple(_val)
    if type(_val) is not type(_old):
        raise SystemExit(f"{_where}: config key {_key!r} expects {type(_old).__name__} (default {_default!r}"
                         + (f", set to {_old!r} before" if _old != _default else '') + f"), got {type(_val).__name__} {_val!r}")
    globals()[_key] = _val


for _arg in _sys.argv[1:]:
    if not _arg.startswith('--'):
        try:
            _src = open(_arg).read()
        except OSError as _e:
            raise SystemExit(f"config file {_arg}: {_e.strerror}")
        _ns = {}
        exec(_builtins.compile(_src, _arg, 'exec'), _ns)
        for _k, _v in _ns.items():
            if not _k.startswith('_') and not callable(_v) and type(_v).__name__ != 'module':
                _set_config(_k, _v, _arg)
        print(f"config: {_arg}")
    else:
        if '=' not in _arg:
            raise SystemExit(f"{_arg}: expected --key=value")
        _k, _v = _arg[2:].split('=', 1)
        try:
            _v = _literal_eval(_v)
        except (SyntaxError, ValueError):
            pass  # a bare string, e.g. --init_lm=checkpoints/SmolLM2-135M-Instruct
        _set_config(_k, _v, _arg)
        print(f"config: {_k} = {_v!r}")
