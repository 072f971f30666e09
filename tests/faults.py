"""
Runs a script with faults injected, for tests/test_robustness.py:

    python tests/faults.py train_diffusion.py --max_steps=10 ...

FAULT_SLOW_SAVE=1      every torch.save writes the first half of its bytes, prints 'mid-save' and hangs, so that a
                       test can kill the process in the middle of writing a checkpoint
FAULT_NAN_STEPS=3,4    the network's output is NaN in those training forwards (counted from 0 in this process); of
                       a network that returns a tuple (the autoencoder's xrec, mean, logvar), its first element
FAULT_NAN_WEIGHTS=3    in that training forward the network's first weight is set to NaN, and stays so
FAULT_SLOW_STEPS=0.5   every training forward first sleeps this many seconds, so that a test has time to send a
                       second signal within one step
FAULT_CALL=numpy.save:raise:3
                       the 3rd call of that function raises OSError(ENOSPC), as a full disk does; with 'kill' the
                       process ends there instead (exit 9), as on SIGKILL: no cleanup runs
The script runs in this process (runpy), so it imports the patched torch.save and model.create_model.
"""
import errno
import importlib
import io
import os
import runpy
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import model  # noqa: E402

if os.environ.get('FAULT_SLOW_SAVE'):
    _save = torch.save

    def slow_save(obj, f, *args, **kwargs):
        buf = io.BytesIO()
        _save(obj, buf, *args, **kwargs)
        f.write(buf.getvalue()[:len(buf.getvalue()) // 2])
        f.flush()
        print('mid-save', flush=True)
        time.sleep(600)

    torch.save = slow_save

nan_steps = {int(s) for s in os.environ.get('FAULT_NAN_STEPS', '').split(',') if s}
nan_weights = int(os.environ.get('FAULT_NAN_WEIGHTS', -1))
slow_steps = float(os.environ.get('FAULT_SLOW_STEPS', 0))
_create_model = model.create_model


def create_model(*args, **kwargs):
    net = _create_model(*args, **kwargs)
    calls = []

    def count(module, inputs):  # the EMA copy (eval mode) and evaluations pass through untouched
        if module.training:
            calls.append(None)
            if len(calls) - 1 == nan_weights:
                with torch.no_grad():
                    next(module.parameters()).fill_(float('nan'))
            time.sleep(slow_steps)

    def output(module, inputs, out):
        if module.training and len(calls) - 1 in nan_steps:
            if isinstance(out, tuple):
                return (out[0] * float('nan'), *out[1:])
            return out * float('nan')

    net.register_forward_pre_hook(count)
    net.register_forward_hook(output)
    return net


model.create_model = create_model

if os.environ.get('FAULT_CALL'):
    target, how, at = os.environ['FAULT_CALL'].split(':')
    owner, name = target.rsplit('.', 1)
    owner = importlib.import_module(owner)
    real, calls = getattr(owner, name), []

    def failing(*args, **kwargs):
        calls.append(None)
        if len(calls) == int(at) and how == 'kill':
            os._exit(9)
        if len(calls) == int(at):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(*args, **kwargs)

    setattr(owner, name, failing)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name='__main__')
