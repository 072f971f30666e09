"""
Overrides a script's module-level defaults, nanoGPT style. A script runs it with
    exec(open('configurator.py').read())
after it has set its defaults and listed their names in `config_keys`. Then
    python train_diffusion.py config/mnist_dit.py --batch_size=64 --lr=3e-4
executes config/mnist_dit.py in the script's globals (plain Python: it runs with your privileges, so run only
config files you trust), then applies each --key=value, parsed with ast.literal_eval (a string default takes the
text as it is). Every value must keep its default's type (an int is accepted for a float) and a float stays finite
(unless its default is not); an unknown key, in a file or on the command line, stops the run and names the nearest
valid keys. A config file is read in its own encoding (a coding cookie, else UTF-8). --help (or -h) prints the
script's defaults block, each key with its default and comment, and exits.
"""
import builtins
import math
import os
import sys
import traceback
from ast import literal_eval
from difflib import get_close_matches

def _unknown(key):
    near = get_close_matches(key, config_keys, n=3, cutoff=0.5)
    return SystemExit(f"error: unknown config key '{key}'; " + (f"did you mean {' or '.join(near)}?" if near else
                      f"valid keys: {', '.join(sorted(config_keys))}"))

_defaults = {k: globals()[k] for k in config_keys}
if {'--help', '-h'} & set(sys.argv[1:]):  # the script's defaults block (between its first two '# ---' lines) as written
    with open(sys.argv[0], encoding='utf-8') as _f:
        _lines = _f.read().splitlines()
    _marks = [_i for _i, _line in enumerate(_lines) if _line.startswith('# ---')][:2]
    print(f"usage: python {os.path.basename(sys.argv[0])} [config/<file>.py ...] [--key=value ...]; the keys and their defaults:")
    print('\n'.join(_lines[_marks[0] + 1:_marks[1]]))
    raise SystemExit(0)
_cli = set()  # the keys of --key=value arguments
for _arg in sys.argv[1:]:
    if not _arg.startswith('--'):
        try:
            with open(_arg, 'rb') as _f:  # bytes: Python decodes them by the file's coding cookie (or UTF-8)
                _src = _f.read()
        except OSError as e:
            raise SystemExit(f"error: cannot read config file {_arg} ({e.strerror}); pass a path like config/mnist_dit.py")
        print(f"config file {_arg}")
        _before = set(globals())
        try:
            exec(builtins.compile(_src, _arg, 'exec'))  # (a script may have a key named compile)
        except Exception as e:  # the file's own error, located, without a traceback through this file
            _line = e.lineno if isinstance(e, SyntaxError) else next(  # (its innermost line in the file)
                (_f.lineno for _f in reversed(traceback.extract_tb(e.__traceback__)) if _f.filename == _arg), None)
            _what = f"{type(e).__name__}: {e.msg if isinstance(e, SyntaxError) else e}"
            raise SystemExit(f"error: {_arg}{f', line {_line}' if _line else ''}: {_what}; a config file is "
                             f"Python assignments like batch_size = 64")
        for _key in set(globals()) - _before:
            if not _key.startswith('_') and type(globals()[_key]).__name__ != 'module':
                raise _unknown(_key)
    else:
        _key, _eq, _val = _arg[2:].partition('=')
        if not _eq:
            raise SystemExit(f"error: '{_arg}' has no value; write --{_key}=VALUE")
        if _key not in config_keys:
            raise _unknown(_key)
        _cli.add(_key)
        try:
            globals()[_key] = _val if isinstance(_defaults[_key], str) else literal_eval(_val)
        except (ValueError, SyntaxError):
            globals()[_key] = _val
for _key, _default in _defaults.items():
    _new = globals()[_key]
    if isinstance(_default, float) and type(_new) is int:
        globals()[_key] = _new = float(_new)
    if type(_new) is not type(_default):
        _a, _b = type(_new).__name__, type(_default).__name__
        raise SystemExit(f"error: {_key}={_new!r} is {'an' if _a == 'int' else 'a'} {_a}, but {_key} takes "
                         f"{'an' if _b == 'int' else 'a'} {_b} (default {_default!r})")
    if isinstance(_new, float) and not math.isfinite(_new) and math.isfinite(_default):
        raise SystemExit(f"error: {_key}={_new!r} must be a finite number (default {_default!r})")
    if _new != _default:
        print(f"overriding: {_key} = {_new!r}")
# the keys the command line sets to other than their defaults, which a script refuses when it would not apply them
# (common.check_applied; a config file's other settings may sit idle: a flag can switch one off)
overridden = [_k for _k in config_keys if _k in _cli and globals()[_k] != _defaults[_k]]
