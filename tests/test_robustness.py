"""Never lose a run: SIGKILL anywhere then resume, preemption signals, torchrun restarts, non-finite updates,
untrusted checkpoints, and bad input that stops with one clear line and leaves the previous run as it was."""
import csv
import functools
import glob
import os
import pickle
import random
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import zipfile

import numpy as np
import pytest
import torch

import bookkeeping as bk
import warm
import conftest
from conftest import MNIST, REPO, run

# 30 steps of a tiny DiT, a log line per step, a checkpoint every 3, evaluations and sample grids on the way
BASE = ['--arch=DiT-N/4', '--batch_size=16', '--log_interval=1', '--eval_interval=6', '--eval_images=32',
        '--sample_interval=12', '--sample_steps=2', '--ckpt_interval=3', '--warmup_steps=2', '--max_steps=30']
ENV = {**os.environ, 'WANDB_MODE': 'disabled', 'PYTHONUNBUFFERED': '1'}


LAUNCHED = []


@pytest.fixture(autouse=True)
def no_process_left_behind():
    yield
    while LAUNCHED:
        p = LAUNCHED.pop()
        if p.poll() is None:
            for pid in children(p.pid):  # (torchrun's workers have their own process groups)
                os.kill(pid, signal.SIGKILL)
            os.killpg(p.pid, signal.SIGKILL)
            p.communicate()


# Ctrl-C as in a terminal, where a command starts with SIGINT at its default (a suite started in the background of a
# shell script would hand its processes SIGINT ignored, and python then installs no KeyboardInterrupt of its own)
SIGINT_DFL = functools.partial(signal.signal, signal.SIGINT, signal.SIG_DFL)


def launch(out, *args, faults=None, torchrun=False, script='train_diffusion.py', base=BASE, restarts=1, cold=False):
    """Starts a script (through tests/faults.py when `faults` sets FAULT_* variables) with its output piped, in a
    fork of the warm interpreter unless cold (a fresh one, which loads torch) or torchrun. torchrun restarts need TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1: with the store torchrun shares by default, a restarted
    worker can read a peer's address from the failed round and never connect (pytorch/pytorch#167288)."""
    prefix = ['-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', f'--max-restarts={restarts}'] if torchrun \
        else ['tests/faults.py'] if faults else []
    env = {**ENV, 'OMP_NUM_THREADS': conftest.THREADS, **(faults or {}),
           **({'OMP_NUM_THREADS': '1', 'TORCH_DISABLE_SHARE_RDZV_TCP_STORE': '1'} if torchrun else {})}
    argv, popen = [*prefix, script, *base, *args, f'--out_dir={out}'], subprocess.Popen
    if not (torchrun or cold) and warm.Server.address(env):  # (a fork of the warm interpreter: conftest.run)
        popen = functools.partial(warm.Popen, cwd=REPO, env=env)
    else:
        argv = [sys.executable, *argv]
        popen = functools.partial(subprocess.Popen, cwd=REPO, env=env, preexec_fn=SIGINT_DFL)
    LAUNCHED.append(popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True))
    return LAUNCHED[-1]


def read_until(p, pattern):
    """Reads the process's output up to the first line matching `pattern`; returns (match, all lines read)."""
    lines = []
    for line in p.stdout:
        lines.append(line)
        if m := re.search(pattern, line):
            return m, ''.join(lines)
    p.wait()
    raise AssertionError(f"exited {p.returncode} before printing {pattern!r}:\n{''.join(lines)[-3000:]}")


def load(path):
    return torch.load(path, map_location='cpu', weights_only=True)


def assert_same_state(a, b):
    """Model, EMA, target, discriminator, both optimizers' and RNG states identical to the bit."""
    assert a['step'] == b['step'] and a['images_seen'] == b['images_seen']
    assert a.get('best_psnr') == b.get('best_psnr') and a.get('stale_evals') == b.get('stale_evals')
    for key in ('model', 'ema', 'target', 'disc'):
        assert (a.get(key) is None) == (b.get(key) is None), (a['step'], key)
        for name, w in (a.get(key) or {}).items():
            assert torch.equal(w, b[key][name]), (a['step'], key, name)
    for key in ('optimizer', 'd_optimizer'):
        assert (a.get(key) is None) == (b.get(key) is None), (a['step'], key)
        for sa, sb in zip(*[(c.get(key) or {}).get('state', {}).values() for c in (a, b)], strict=True):
            assert all(torch.equal(sa[k], sb[k]) for k in sa), (a['step'], key)
    assert [torch.equal(ra['torch'], rb['torch']) for ra, rb in zip(a['rng'], b['rng'])] == [True] * len(a['rng'])


def curve(out):
    """metrics.csv without its timing columns: every loss, norm and learning rate, step by step."""
    timing = {'ms_per_step', 'img_per_s', 'tflops', 'mfu', 'peak_mem_gib'}
    return [{k: v for k, v in r.items() if k not in timing} for r in csv.DictReader(open(out / 'metrics.csv'))]


def snapshot(out):
    """The bytes of every file in out, a folder's as a dict of its own: what a run that stops must leave as it was."""
    if not os.path.isdir(out):
        return {}
    return {f: snapshot(path) if os.path.isdir(path := os.path.join(out, f)) else open(path, 'rb').read()
            for f in sorted(os.listdir(out))}


def value(args, key):
    """The int value of --key=value in a list of arguments."""
    return int(next(a for a in args if a.startswith(f'--{key}=')).split('=')[1])


def reference_run(script, base, out):
    """The uninterrupted run, keeping every checkpoint (ckpt_<step>.pt) to compare the interrupted ones against."""
    run(script, *base, f'--out_dir={out}', '--keep_last=100')
    kept = [f for f in os.listdir(out) if f.startswith('ckpt_')]
    assert 'ckpt.pt' in os.listdir(out) and len(kept) == value(base, 'max_steps') // value(base, 'ckpt_interval')
    return out


@pytest.fixture(scope='module')
def reference(mnist, tmp_path_factory):
    return reference_run('train_diffusion.py', BASE, tmp_path_factory.mktemp('reference'))


@pytest.fixture(scope='module')
def diffusion_setup(reference):
    return BASE, reference


@pytest.fixture(scope='module')
def distill_setup(mnist, tmp_path_factory):
    """distill_consistency.py's 30 steps (CD with guidance and an EMA target) from a 2-step teacher, and its reference."""
    teacher = tmp_path_factory.mktemp('teacher')
    run('train_diffusion.py', '--arch=DiT-N/4', '--batch_size=8', '--max_steps=2', '--eval_images=16', f'--out_dir={teacher}')
    base = ['--batch_size=8', '--log_interval=1', '--sample_interval=12', '--sample_sigmas=80,6', '--ckpt_interval=3',
            '--max_steps=30', '--num_scales=6', '--cfg_scale=2.0', '--target=ema', f'--teacher={teacher}']
    return base, reference_run('distill_consistency.py', base, tmp_path_factory.mktemp('reference_cd'))


@pytest.fixture(scope='module')
def gan_setup(mnist, tmp_path_factory):
    """train_gan.py's 12 steps (penalties every other step, DiffAugment, the EMA's ramp-up), and its reference."""
    base = ['--arch=GAN-T', '--batch_size=8', '--log_interval=1', '--sample_interval=6', '--ckpt_interval=2',
            '--max_steps=12', '--reg_interval=2', '--augment=color,translation,cutout', '--warmup_steps=2']
    return base, reference_run('train_gan.py', base, tmp_path_factory.mktemp('reference_gan'))


@pytest.fixture(scope='module')
def ae_setup(mnist, tmp_path_factory):
    """train_ae.py's 12 steps, the discriminator training from step 5 and reaching the decoder from step 8,
    validations (and best.pt) every 4; and its reference."""
    base = ['--arch=AE-S/f4', '--batch_size=8', '--log_interval=1', '--eval_interval=4', '--eval_images=16',
            '--ckpt_interval=2', '--max_steps=12', '--warmup_steps=2', '--disc_start=5', '--adv_start=8',
            '--disc_layers=2']
    return base, reference_run('train_ae.py', base, tmp_path_factory.mktemp('reference_ae'))


@pytest.fixture(scope='module')
def meanflow_setup(mnist, tmp_path_factory):
    """train_meanflow.py's 12 steps from scratch (guidance folded into the target), and its reference."""
    base = ['--batch_size=8', '--log_interval=1', '--sample_interval=6', '--ckpt_interval=2', '--max_steps=12',
            '--cfg_scale=2', '--warmup_steps=2']
    return base, reference_run('train_meanflow.py', base, tmp_path_factory.mktemp('reference_meanflow'))


# each script's killed run: the fixture of its arguments and reference run, the line printed once it has resumed (or
# started), the number of kills, those of them that come halfway through a checkpoint write, and how many steps
# past its start a run may go before it is killed
KILLED = {'train_diffusion.py': ('diffusion_setup', r'^(resuming .* at step (\d+)|DiT-N/4: )', 10, (2, 5, 8), 8),
          'distill_consistency.py': ('distill_setup', r'^(resuming .* at step (\d+)|teacher )', 10, (2, 5, 8), 8),
          'train_gan.py': ('gan_setup', r'^(resuming .* at step (\d+)|GAN-T: )', 4, (1,), 4),
          'train_ae.py': ('ae_setup', r'^(resuming .* at step (\d+)|AE-S/f4: )', 4, (1,), 4),
          'train_meanflow.py': ('meanflow_setup', r'^(resuming .* at step (\d+)|DiT-N/4: )', 4, (1,), 4)}


@pytest.mark.slow
@pytest.mark.parametrize('script', KILLED)
def test_sigkill_anywhere_then_resume_is_bit_exact(request, tmp_path, script):
    """SIGKILLs at random moments of one run (10 of train_diffusion.py's and distill_consistency.py's, 4 of the
    others'), some of them halfway through writing a checkpoint. After each, ckpt.pt is whole and bit-identical to
    the uninterrupted run's checkpoint of its step, and the lock the killed run left behind does not stop the same
    command from resuming it; the final state (best.pt's too) and the whole loss curve, pieced together from the
    processes, equal the uninterrupted run's (which also shows that a fixed seed gives one loss curve). For each
    script that trains."""
    setup, started, kills, mid_saves, ahead = KILLED[script]
    base, reference = request.getfixturevalue(setup)
    max_steps = value(base, 'max_steps')
    out, rnd, resumed = tmp_path / 'run', random.Random(0), []
    for trial in range(kills):
        mid_save = trial in mid_saves
        p = launch(out, faults={'FAULT_SLOW_SAVE': '1'} if mid_save else None, script=script, base=base)
        m, _ = read_until(p, started)  # (a resume is announced before that line)
        start = int(m[2]) if m[2] else 0
        resumed.append(start)
        if mid_save:
            read_until(p, r'^mid-save')
        else:
            read_until(p, rf'^step {min(start + rnd.randint(2, ahead), max_steps - 1)}/')
            p.stdout.readline() if rnd.random() < 0.5 else None  # a little later, somewhere in the step
        p.kill()
        p.communicate()
        assert p.returncode == -signal.SIGKILL and os.path.exists(out / 'run.lock')  # (no exit handler ran)
        # it died inside a checkpoint write (train_ae.py's may be best.pt's)
        assert glob.glob(str(out / '*.pt.tmp')) or not mid_save
        if os.path.exists(out / 'ckpt.pt'):
            ckpt = load(out / 'ckpt.pt')
            assert_same_state(ckpt, load(reference / f"ckpt_{ckpt['step']:07d}.pt"))
    assert resumed[0] == 0 and max(resumed) >= max_steps * 2 // 5, resumed
    p = run(script, *base, f'--out_dir={out}')
    assert 'resuming' in p.stdout and not os.path.exists(out / 'run.lock')
    assert_same_state(load(out / 'ckpt.pt'), load(reference / 'ckpt.pt'))
    if os.path.exists(reference / 'best.pt'):
        assert_same_state(load(out / 'best.pt'), load(reference / 'best.pt'))
    assert curve(out) == curve(reference)
    print('resumed from steps', resumed)


@pytest.mark.slow
def test_sigterm_sigusr1_and_max_minutes_stop_cleanly(reference, tmp_path):
    """SIGTERM, SIGUSR1, SIGHUP (a closed terminal) and Ctrl-C finish the step, save and exit 0; so does max_minutes.
    Re-running the command resumes, and the run ends bit-identical to the uninterrupted one."""
    out = tmp_path / 'run'
    for sig, at in [(signal.SIGTERM, 5), (signal.SIGUSR1, 11), (signal.SIGHUP, 17), (signal.SIGINT, 23)]:
        p = launch(out)
        read_until(p, rf'^step {at}/')
        p.send_signal(sig)
        rest = p.communicate(timeout=120)[0]
        assert p.returncode == 0, rest
        m = re.search(rf'stopped at step (\d+) of 30 \({sig.name}\); the same command continues the run', rest)
        assert m and load(out / 'ckpt.pt')['step'] == int(m[1]) >= at, rest
        assert ('Ctrl-C: finishing the step, saving and stopping' in rest) == (sig == signal.SIGINT), rest
    p = run('train_diffusion.py', *BASE, f'--out_dir={out}', '--max_minutes=0.001')  # 0.06 s: out after a step
    m = re.search(r'stopped at step (\d+) of 30 \(max_minutes=0.001\)', p.stdout)
    assert m and load(out / 'ckpt.pt')['step'] == int(m[1]) < 30, p.stdout[-2000:]
    run('train_diffusion.py', *BASE, f'--out_dir={out}')
    assert_same_state(load(out / 'ckpt.pt'), load(reference / 'ckpt.pt'))
    assert curve(out) == curve(reference)


def children(pid):
    """The processes whose parent is pid (Linux /proc)."""
    kids = []
    for entry in os.listdir('/proc'):
        try:
            if entry.isdigit() and int(open(f'/proc/{entry}/stat').read().rsplit(')', 1)[1].split()[1]) == pid:
                kids.append(int(entry))
        except OSError:
            pass
    return kids


@pytest.mark.slow
def test_torchrun_restarts_a_killed_worker_and_sigterm_stops_the_group(mnist, tmp_path):
    """Under torchrun --max-restarts=1, SIGKILL one of two workers: torchrun restarts the group, which resumes from
    the last checkpoint by itself. Then SIGTERM to torchrun (what SLURM sends at preemption): it passes the signal to
    the workers, which finish the step, save and exit. Re-running torchrun ends bit-identical to a 2-rank run that
    nothing interrupted."""
    short = ['--max_steps=12']
    run('torchrun', '--standalone', '--nproc_per_node=2', 'train_diffusion.py', *BASE, *short,  # (its ranks forked)
        f'--out_dir={tmp_path / "ref"}', env={'OMP_NUM_THREADS': '1'})
    out = tmp_path / 'run'
    p = launch(out, *short, torchrun=True)
    read_until(p, r'saved .* at step 3$')
    workers = children(p.pid)
    assert len(workers) == 2
    os.kill(workers[1], signal.SIGKILL)
    m, _ = read_until(p, r'^resuming .* at step (\d+)')
    read_until(p, rf'^step {int(m[1]) + 2}/')
    p.send_signal(signal.SIGTERM)
    rest = p.communicate(timeout=120)[0]
    stop = re.search(r'stopped at step (\d+) of 12 \(SIGTERM\)', rest)
    assert stop and load(out / 'ckpt.pt')['step'] == int(stop[1]), rest[-3000:]
    p = launch(out, *short, torchrun=True)
    assert p.wait() == 0
    assert_same_state(load(out / 'ckpt.pt'), load(tmp_path / 'ref' / 'ckpt.pt'))
    assert len(load(out / 'ckpt.pt')['rng']) == 2


def ended(pid):
    """Whether the process is gone or a zombie (ended, not yet reaped by whoever adopted it)."""
    try:
        with open(f'/proc/{pid}/stat') as f:
            return f.read().rsplit(')', 1)[1].split()[0] == 'Z'
    except FileNotFoundError:
        return True


@pytest.mark.slow
def test_workers_do_not_outlive_torchrun(mnist, tmp_path):
    """torchrun killed outright (SIGKILL: the OOM killer, a lost session) cannot pass a signal on; its workers get
    SIGTERM from the kernel as it ends (the parent-death signal), so they finish the step, save and exit at once
    rather than training on without a launcher."""
    out = tmp_path / 'run'
    p = launch(out, '--max_steps=100000', '--eval_interval=100000', '--sample_interval=100000', torchrun=True,
               restarts=0)
    read_until(p, r'saved .* at step 3$')
    workers = children(p.pid)
    os.kill(p.pid, signal.SIGKILL)
    rest = p.communicate(timeout=60)[0]  # (the workers hold the pipe: it ends when they do)
    stop = re.search(r'stopped at step (\d+) of 100000 \(SIGTERM\)', rest)
    assert stop and load(out / 'ckpt.pt')['step'] == int(stop[1]), rest[-3000:]
    assert len(workers) == 2 and all(ended(pid) for pid in workers)


@pytest.mark.slow
def test_a_frozen_rank_ends_the_job_in_bounded_time_naming_it(mnist, tmp_path):
    """A rank that stops answering without dying (SIGSTOP: what a hung machine looks like to its peers) would keep
    the other in a collective forever: its heartbeat stays the same, so the job ends within KIT_RANK_TIMEOUT with
    one line naming it, and the last checkpoint is whole. Rank 0 holds the job's store here
    (TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1), so the watch that never waits on the store is what notices."""
    out = tmp_path / 'run'
    p = launch(out, '--max_steps=100000', '--eval_interval=100000', '--sample_interval=100000', torchrun=True,
               restarts=0, faults={'KIT_RANK_TIMEOUT': '4'})
    read_until(p, r'saved .* at step 6$')
    worker = next(pid for pid in children(p.pid) if 'RANK=0' in open(f'/proc/{pid}/environ').read().split('\0'))
    os.kill(worker, signal.SIGSTOP)
    try:
        m, _ = read_until(p, r'^error: ')
    finally:
        os.kill(worker, signal.SIGKILL)  # (torchrun would, 30 s after its SIGTERM)
    rest = p.communicate(timeout=60)[0]
    assert re.match(r"error: rank 0 stopped answering \(the job's store .* did not answer for 4 s", m.string), m.string
    assert 'error:' not in rest, rest[-3000:]  # (one line)
    assert p.returncode != 0 and load(out / 'ckpt.pt')['step'] >= 6


def faulty_run(out, faults, *args):
    return run('tests/faults.py', 'train_diffusion.py', *BASE, *args, f'--out_dir={out}', env=faults, check=False,
               timeout=300)


def test_a_nonfinite_update_is_skipped_and_counted(mnist, tmp_path):
    """A NaN in the network's output at one step: that update is skipped (weights, EMA and AdamW's moments and step
    count stay as they were), the log counts it, and training goes on. That step's checkpoint is not written (the
    weights that gave the NaN could have diverged): the next one is; and a run whose loss is still not finite at its
    end stops with an error, its last good checkpoint intact."""
    p = faulty_run(tmp_path, {'FAULT_NAN_STEPS': '4'}, '--max_steps=6', '--ckpt_interval=1', '--keep_last=3')
    assert p.returncode == 0 and '1 non-finite update(s) skipped' in p.stdout, p.stderr[-2000:]
    assert (f"the loss was not finite in the last 1 step(s) to step 5, so the weights they started from are not saved "
            f"(as ckpt.pt); {tmp_path / 'ckpt.pt'} (step 4) is intact") in p.stdout
    assert sorted(f for f in os.listdir(tmp_path) if f.startswith('ckpt')) == [  # keep_last=3 rolling copies
        'ckpt.pt', 'ckpt_0000003.pt', 'ckpt_0000004.pt', 'ckpt_0000006.pt']
    before, after = load(tmp_path / 'ckpt_0000004.pt'), load(tmp_path / 'ckpt_0000006.pt')
    # step 6 is the one update after step 4's: AdamW counted one step, and the EMA (decay 6 / 15 at step 6) one lerp
    assert all(s['step'] == 5 and all(v.isfinite().all() for v in s.values())
               for s in after['optimizer']['state'].values())
    assert all(s['step'] == 4 for s in before['optimizer']['state'].values())
    for name, w in before['ema'].items():
        assert torch.allclose(after['ema'][name], torch.lerp(w, after['model'][name], 1 - 6 / 15), rtol=1e-5, atol=1e-7)
    rows = {r['step']: r for r in csv.DictReader(open(tmp_path / 'metrics.csv')) if r['loss']}
    assert [rows[s]['skipped'] for s in '456'] == ['0', '1', '0'] and rows['5']['loss'] == 'nan'
    assert np.isfinite(float(rows['6']['loss']))
    p = faulty_run(tmp_path / 'end', {'FAULT_NAN_STEPS': '4,5'}, '--max_steps=6', '--ckpt_interval=1')
    assert p.returncode == 1 and p.stderr.strip().splitlines()[-1] == (
        f"error: the loss was not finite in the last 2 step(s) to step 6, so the weights they started from are not "
        f"saved; {tmp_path / 'end' / 'ckpt.pt'} (step 4) is intact: {bk.FIX}")
    assert load(tmp_path / 'end' / 'ckpt.pt')['step'] == 4


def test_nonfinite_updates_in_a_row_stop_the_run(mnist, tmp_path):
    """NaN losses from step 5 on: the checkpoints due at steps 5 and 6 are not written, and the third skipped update in
    a row (max_nonfinite=3) stops the run, naming step 4's checkpoint, the last whose weights gave a finite loss."""
    p = faulty_run(tmp_path, {'FAULT_NAN_STEPS': '4,5,6,7,8,9'}, '--ckpt_interval=1', '--max_nonfinite=3')
    assert p.returncode != 0
    assert p.stderr.strip().splitlines()[-1] == (
        f"error: 3 updates in a row had a non-finite gradient norm and were skipped (max_nonfinite=3) by step 7; "
        f"{tmp_path / 'ckpt.pt'} (step 4) is intact: resume it with a lower lr, grad_clip or dtype='float32'")
    ckpt = load(tmp_path / 'ckpt.pt')
    assert ckpt['step'] == 4 and all(w.isfinite().all() for w in ckpt['model'].values())


def test_nonfinite_weights_are_never_saved(mnist, tmp_path):
    """Weights that turn NaN (here by a fault, in step 5) stop the run at the next checkpoint without writing it."""
    p = faulty_run(tmp_path, {'FAULT_NAN_WEIGHTS': '4'}, '--ckpt_interval=2')
    assert p.returncode != 0
    assert p.stderr.strip().splitlines()[-1] == (
        f"error: the weights are not finite at step 6, so they are not saved; {tmp_path / 'ckpt.pt'} (step 4) is "
        f"intact: resume it with a lower lr, grad_clip or dtype='float32'")
    assert load(tmp_path / 'ckpt.pt')['step'] == 4 and not os.path.exists(tmp_path / 'ckpt.pt.tmp')


class Payload:
    def __reduce__(self):  # unpickling this would run: touch <marker>
        return os.system, (f'touch {Payload.marker}',)


def test_a_crafted_checkpoint_is_refused_without_running_it(mnist, tmp_path):
    """Checkpoints are loaded with weights_only=True: a pickle that would run a shell command is refused unrun,
    by train_diffusion.py (resuming) and by sample.py."""
    Payload.marker = tmp_path / 'pwned'
    out = tmp_path / 'out'
    os.makedirs(out)
    torch.save({'model': Payload(), 'step': 1}, out / 'ckpt.pt')
    with open(out / 'ckpt.pt', 'rb') as f:
        assert b'system' in f.read()  # the payload is in the file
    for script in ('train_diffusion.py', 'sample.py'):
        p = run(script, *(BASE if script == 'train_diffusion.py' else []), f'--out_dir={out}', check=False)
        last = p.stderr.strip().splitlines()[-1]
        assert p.returncode != 0 and last.startswith(f"error: cannot load {out / 'ckpt.pt'} (it holds objects other "
                                                     f"than tensors and plain types)"), p.stderr[-2000:]
        assert not os.path.exists(Payload.marker)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(out / 'ckpt.pt', weights_only=True)


# ---------------------------------------------------------------------------------------------------------------------
# bad input: each case stops with one line naming the fix, exits non-zero, and leaves out_dir as it was

@pytest.fixture(scope='module')
def prior(mnist, tmp_path_factory):
    """A finished 2-step run: the out_dir every bad-input case is pointed at, which must come out unchanged."""
    out = tmp_path_factory.mktemp('prior')
    run('train_diffusion.py', *BASE, '--max_steps=2', f'--out_dir={out}')
    return out


def config_file(text):
    def setup(tmp, out):
        (tmp / 'c.py').write_text(text)
        return [str(tmp / 'c.py')]
    return setup


def dataset(x=np.zeros((16, 8, 8, 1), np.uint8), y=np.arange(16) % 4, meta='{"image_size": 8, "channels": 1, '
            '"num_classes": 4}', truncate=None):
    """A small dataset in the prepared format with one thing wrong, passed by path."""
    def setup(tmp, out):
        d = tmp / 'data'
        os.makedirs(d)
        for split in ('train', 'val'):
            np.save(d / f'{split}_x.npy', x)
            np.save(d / f'{split}_y.npy', y)
        (d / 'meta.json').write_text(meta)
        if truncate:
            os.truncate(d / truncate, os.path.getsize(d / truncate) // 2)
        return [f'--dataset={d}']
    return setup


def corrupt_checkpoint(tmp, out):
    os.truncate(out / 'ckpt.pt', 1000)
    return []


def out_dir_under_a_file(tmp, out):
    (tmp / 'file').write_text('')
    return [f'--out_dir={tmp / "file" / "out"}']


def empty_out_dir(tmp, out):
    shutil.rmtree(out)
    return ['--init_from=resume']


BAD_INPUT = [  # (case, args or setup(tmp, out) -> args, what the one line says); README's table lists them
    ('mistyped key', ['--bacth_size=16'], "unknown config key 'bacth_size'; did you mean batch_size?"),
    ('mistyped key in a config file', config_file('batchsize = 8\n'), "unknown config key 'batchsize'; did you mean batch_size"),
    ('wrong value type', ['--batch_size=sixteen'], "batch_size='sixteen' is a str, but batch_size takes an int"),
    ('key without a value', ['--lr'], "'--lr' has no value; write --lr=VALUE"),
    ('missing config file', ['config/no_such_config.py'], "cannot read config file config/no_such_config.py"),
    ('config file syntax', config_file('batch_size = = 3\n'), "c.py, line 1: SyntaxError: invalid syntax; a config file is Python assignments"),
    ('config file error', config_file('lr = 1e-3 * batchsize\n'), "c.py, line 1: NameError: name 'batchsize' is not defined"),
    ('unknown choice', ['--prediction_type=score'], "prediction_type='score' is not one of eps, v, x0, flow"),
    ('unknown arch', ['--arch=DiT-Q/2'], "arch='DiT-Q/2' is not one of"),
    ('count out of range', ['--batch_size=0'], "batch_size=0 must be at least 1"),
    ('rate out of range', ['--ema_decay=1.0'], "ema_decay=1.0 must be in [0, 1)"),
    ('shift off the flow schedule', ['--schedule=cosine', '--shift=3'], "shift=3.0 must be 1.0 unless schedule='flow'"),
    ('min-SNR gamma', ['--min_snr_gamma=0'], "min_snr_gamma=0.0 must be positive"),
    ('dataset not prepared', ['--dataset=no_such_data'], "run python data/no_such_data/prepare.py first"),
    ('truncated data file', dataset(truncate='train_x.npy'), "is missing or unreadable in"),
    ('corrupt meta.json', dataset(meta='{"image_size": 8,'), "is missing or unreadable in"),
    ('float images', dataset(x=np.zeros((16, 8, 8, 1), np.float32)), "train_x.npy is float32 (16, 8, 8, 1) with int64 (16,) labels, but meta.json says uint8 (N, 8, 8, 1)"),
    ('images without a channel axis', dataset(x=np.zeros((16, 8, 8), np.uint8)), "train_x.npy is uint8 (16, 8, 8) with"),
    ('fewer labels than images', dataset(y=np.zeros(15, np.int64)), "with int64 (15,) labels, but meta.json says uint8 (N, 8, 8, 1) and N integer labels"),
    ('float labels', dataset(y=np.zeros(16, np.float32)), "with float32 (16,) labels"),
    ('labels out of range', dataset(y=np.arange(16)), "train_y.npy has labels in [0, 15] but meta.json says 4 classes"),
    ('no images', dataset(x=np.zeros((0, 8, 8, 1), np.uint8), y=np.zeros(0, np.int64)), "train_x.npy holds no images"),
    ('image size vs patch size', ['--arch=DiT-N/8'], "image_size 28 is not divisible by patch_size 8"),
    ('DiT option on a UNet', ['--arch=UNet-S', '--rope=True'], "arch='UNet-S' must be a DiT preset: rope=True is a DiT option"),
    ('ControlNet without a base', ['--control=controlnet'], "init_base='' must be a base run's out_dir: a ControlNet trains beside it"),
    ('no control images', ['--control=concat'], "holds no readable control images (meta.json has no control entry: "),
    ('class balance out of range', ['--class_balance=2'], "class_balance=2.0 must be in [0, 1]"),
    ('post-hoc EMA too long', ['--phema_stds=0.05,0.5'], "phema_stds='0.05,0.5' must be comma-separated sigma_rel values in (0, 0.28)"),
    ('post-hoc EMAs changed', ['--phema_stds=0.1'], "is a run of phema_stds='', which a resume keeps; pass that value, or another out_dir"),
    ('what the run is, changed on resume', ['--schedule=flow'], "schedule='flow', but "),
    ('image size vs UNet depth', ['--arch=UNet-B'], "image_size 28 is not divisible by 2^3, the UNet's 3 downsamplings"),
    ('CUDA without a GPU', ['--device=cuda'], "CUDA is not available here; pass --device=cpu"),
    ('batch vs micro-steps', ['--grad_accum=3'], "batch_size=16 is not divisible by world_size x grad_accum = 1 x 3"),
    ('batch vs world size', ['torchrun', '--batch_size=15'], "batch_size=15 is not divisible by world_size x grad_accum = 2 x 1"),
    ('resume without a checkpoint', empty_out_dir, "does not exist; use --init_from=scratch"),
    ('scratch over a run', ['--init_from=scratch'], "exists and init_from='scratch' would overwrite it; continue that run with --init_from=auto"),
    ('resume another model shape', ['--arch=DiT-Ti/4'], "holds another model_args (checkpoint vs config: {'hidden_size': (128, 192)"),
    ('corrupt checkpoint', corrupt_checkpoint, "ckpt.pt (PytorchStreamReader failed reading zip archive"),
    ('unwritable out_dir', out_dir_under_a_file, "(Not a directory); pass an --out_dir you can write to"),
    ('disk full during a save', ['full disk', '--max_steps=4'], "ckpt.pt failed at step 3 (torch.save could not write it; "),
    ('a key the run would not apply', ['--schedule=flow', '--num_timesteps=500'], "num_timesteps is set, but schedule='flow' is continuous in time, so it would do nothing; drop --num_timesteps"),
    ('classes without images', dataset(y=np.arange(16) % 2), "meta.json says 4 classes, but"),
    ('FID without its weights', ['--fid_interval=10'], "fid_inception='' must be a file with fid_interval on"),
    ('REPA without its encoder', ['--repa_weight=0.5'], "repa_encoder='' must be a local file of the encoder's weights"),
    ('a representation term on a UNet', ['--arch=UNet-S', '--dispersive_weight=0.5'], "arch='UNet-S' must be a DiT preset: dispersive_weight is a DiT option"),
    ('a block deeper than the model', ['--sra_weight=0.5', '--sra_teacher_depth=9'], "sra_teacher_depth=9, but DiT-N/4 has 4 blocks"),
    ('a projected term added on resume', ['--sra_weight=0.5'], "ckpt.pt holds no projector; resume with the config it was trained with"),
]


@pytest.mark.parametrize('case, args, message', BAD_INPUT, ids=[c[0] for c in BAD_INPUT])
def test_bad_input_stops_with_one_clear_line(prior, tmp_path, case, args, message):
    if case == 'CUDA without a GPU' and torch.cuda.is_available():
        pytest.skip('this machine has CUDA')
    out = tmp_path / 'out'
    shutil.copytree(prior, out)
    args = args(tmp_path, out) if callable(args) else list(args)
    before = snapshot(out)
    cmd, limit = ['train_diffusion.py', *BASE, f'--out_dir={out}'], None
    if args[:1] == ['torchrun']:
        cmd, args = ['torchrun', '--standalone', '--nproc_per_node=2', *cmd], args[1:]
    if args[:1] == ['full disk']:  # a file size limit: the checkpoint write fails as it would on a full disk
        args, limit = args[1:], 2**20
    p = run(*cmd, *args, check=False, file_size_limit=limit)
    assert p.returncode != 0
    last = p.stderr.strip().splitlines()[-1]
    if cmd[0] == 'torchrun':  # each rank prints the line, then torchrun its own report (and traceback)
        last = [line for line in p.stderr.splitlines() if line.startswith('error: ')][-1]
    assert last.startswith('error: ') and message in last, p.stderr[-2000:]
    assert 'Traceback' not in p.stderr or cmd[0] == 'torchrun'
    after = snapshot(out)
    if case == 'disk full during a save':  # it trained a step and logged it; the checkpoint is as it was
        assert after.pop('metrics.csv') != before.pop('metrics.csv')
    assert after == before  # nothing lost, nothing half-written left behind


# ---------------------------------------------------------------------------------------------------------------------
# what bookkeeping.py guarantees every script, by class of input: each case feeds one script (parametrized over the
# scripts it applies to) and checks the one line, the exit, and that the out_dir and the inputs are as they were

# each script's smallest run: a log line per step; evaluations, grids and a checkpoint at the end
TINY = {'train_diffusion.py': ['--arch=DiT-N/4', '--batch_size=8', '--log_interval=1', '--eval_images=16',
                               '--sample_steps=2', '--warmup_steps=2'],
        'train_gan.py': ['--arch=GAN-T', '--batch_size=8', '--log_interval=1', '--reg_interval=2'],
        'train_ae.py': ['--arch=AE-S/f4', '--batch_size=8', '--log_interval=1', '--eval_images=16',
                        '--warmup_steps=2', '--disc_weight=0'],
        'distill_consistency.py': ['--batch_size=8', '--log_interval=1', '--num_scales=6', '--sample_sigmas=80,6']}


@pytest.fixture(scope='module')
def runs(mnist, tmp_path_factory):
    """runs(script): a finished 2-step run of the script, a checkpoint at each step and both kept (made when first
    asked for). The cases copy these, or give them to other scripts; they are never changed."""
    made = {}

    def get(script):
        if script not in made:
            out = tmp_path_factory.mktemp(script[:-3])
            run(script, *tiny(script, get), '--max_steps=2', '--ckpt_interval=1', '--keep_last=2', f'--out_dir={out}')
            made[script] = out
        return made[script]
    return get


def tiny(script, runs):
    """TINY's arguments; distill_consistency.py's teacher is the 2-step train_diffusion.py run."""
    teacher = [f"--teacher={runs('train_diffusion.py')}"] if script == 'distill_consistency.py' else []
    return [*TINY[script], *teacher]


def lone_checkpoint(run_dir, folder):
    """A folder holding only a copy of run_dir's ckpt.pt."""
    os.makedirs(folder)
    shutil.copy(run_dir / 'ckpt.pt', folder / 'ckpt.pt')
    return folder


def assert_one_line(p, message):
    """A non-zero exit, no traceback, and a last stderr line 'error: ...' that holds message."""
    assert p.returncode != 0 and 'Traceback' not in p.stderr, p.stderr[-3000:]
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith('error: ') and message in last, p.stderr[-3000:]
    return last


# 1. a checkpoint knows what it is: given to a script that reads another kind, it is refused, named
KINDS = [  # (script, the run whose checkpoint it is given, given how, what the line says it is)
    ('train_diffusion.py', 'train_gan.py', 'resume', 'a gan checkpoint, which train_gan.py writes; this needs a '
     'diffusion checkpoint (train_diffusion.py)'),
    ('distill_consistency.py', 'train_ae.py', 'teacher', 'an autoencoder checkpoint, which train_ae.py writes; this '
     'needs a diffusion checkpoint (train_diffusion.py)'),
    ('sample.py', 'train_ae.py', 'out_dir', 'an autoencoder checkpoint, which train_ae.py writes; this needs a '
     'diffusion checkpoint (train_diffusion.py)'),
    ('train_gan.py', 'train_diffusion.py', 'resume', 'a diffusion checkpoint, which train_diffusion.py writes; this '
     'needs a gan checkpoint (train_gan.py)'),
]


@pytest.mark.parametrize('script, other, how, what', KINDS, ids=[f'{c[1]} to {c[0]} ({c[2]})' for c in KINDS])
def test_a_checkpoint_of_another_script_is_refused_by_name(runs, tmp_path, script, other, how, what):
    """Another script's checkpoint, to resume, as a teacher or to sample: the line says what it is, which script
    wrote it and what this one needs, before anything is written."""
    given = lone_checkpoint(runs(other), tmp_path / 'given')
    out = given if how in ('resume', 'out_dir') else tmp_path / 'out'
    args = TINY.get(script, ['--num_samples=8', '--steps=2']) + ([f'--teacher={given}'] if how == 'teacher' else [])
    before = snapshot(given)
    p = run(script, *args, f'--out_dir={out}', check=False)
    assert_one_line(p, f"error: {given / 'ckpt.pt'} is {what}")
    assert snapshot(given) == before
    assert out == given or snapshot(out) == {}  # (a new out_dir: left empty)


# 2. one writer per out_dir; a killed run's lock blocks nothing (test_sigkill_anywhere_then_resume_is_bit_exact)
@pytest.mark.slow
@pytest.mark.parametrize('script', ['train_diffusion.py', 'train_gan.py'])
def test_a_second_run_on_a_busy_out_dir_stops_at_once(runs, tmp_path, script):
    """While a run holds its out_dir (here stopped by SIGSTOP after its first log line, so that it holds it for as
    long as the test needs), a second run of the same command stops at once, naming the holder, and changes
    nothing; the first then goes on and finishes, and leaves no lock behind."""
    out, args = tmp_path / 'run', [*tiny(script, runs), '--max_steps=6']
    first = launch(out, script=script, base=args)
    read_until(first, r'^step 1/')
    first.send_signal(signal.SIGSTOP)
    before = snapshot(out)
    p = run(script, *args, f'--out_dir={out}', check=False)
    last = assert_one_line(p, f"error: out_dir='{out}' is in use by pid {first.pid} on {socket.gethostname()} since ")
    assert last.endswith('; wait for that run to end (or stop it), or pass another --out_dir')
    assert snapshot(out) == before
    first.send_signal(signal.SIGCONT)
    rest = first.communicate(timeout=300)[0]
    assert first.returncode == 0 and f"saved {out / 'ckpt.pt'} at step 6" in rest, rest[-3000:]
    assert load(out / 'ckpt.pt')['step'] == 6 and not os.path.exists(out / 'run.lock')


# 3. no script writes into its inputs
def small_dataset(folder):
    os.makedirs(folder)
    for split in ('train', 'val'):
        np.save(folder / f'{split}_x.npy', np.zeros((16, 8, 8, 1), np.uint8))
        np.save(folder / f'{split}_y.npy', np.arange(16) % 4)
    (folder / 'meta.json').write_text('{"image_size": 8, "channels": 1, "num_classes": 4}')
    return folder


INPUTS = [('distill_consistency.py', 'teacher'), ('train_diffusion.py', 'init_base'),
          ('train_diffusion.py', 'dataset')]


@pytest.mark.parametrize('script, what', INPUTS, ids=[f'{s} into its {w}' for s, w in INPUTS])
def test_no_script_writes_into_its_inputs(runs, tmp_path, script, what):
    """An out_dir that is (however spelled: a symlink, a path through ..) a folder the run reads is refused before
    anything is written there."""
    if what == 'dataset':
        folder = small_dataset(tmp_path / 'data')
        args, out = [f'--dataset={folder}'], f'{folder}/../data'
    else:
        folder = lone_checkpoint(runs('train_diffusion.py'), tmp_path / what)
        args, out = [f'--{what}={folder}'], tmp_path / 'link'
        os.symlink(folder, out)
    before = snapshot(folder)
    p = run(script, *TINY[script], *args, f'--out_dir={out}', check=False)
    assert_one_line(p, f"error: out_dir='{out}' is the {what}'s folder, which this run reads; pass another --out_dir")
    assert snapshot(folder) == before


# 4. a resumed run does what its command says
@pytest.mark.parametrize('script', ['train_diffusion.py', 'train_gan.py', 'train_ae.py', 'distill_consistency.py'])
def test_a_resumed_run_takes_its_new_optimizer_values_and_counts_images_true(runs, tmp_path, script):
    """Resumed with another beta2, weight decay (train_gan.py's Adam has none) and batch size: the optimizers' moments
    and step counts are the checkpoint's and their hyperparameters the command's, and images_seen (and the kimg
    column) count each step's batch as it was."""
    out = tmp_path / 'out'
    shutil.copytree(runs(script), out)
    decay = [] if script == 'train_gan.py' else ['--weight_decay=0.05']
    p = run(script, *tiny(script, runs), '--max_steps=4', '--beta2=0.95', *decay, '--batch_size=16', f'--out_dir={out}')
    assert 'resuming' in p.stdout and 'batch_size 8 -> 16' in p.stdout
    ckpt = load(out / 'ckpt.pt')
    for key in ('optimizer', 'd_optimizer'):
        if ckpt.get(key):
            groups, states = ckpt[key]['param_groups'], ckpt[key]['state'].values()
            assert [g['betas'][1] for g in groups] == [0.95] * len(groups) and states, key
            assert all(float(s['step']) == 4 for s in states), key  # restored, not started again
            if decay:  # on the weights of 2 or more dimensions only
                assert [g['weight_decay'] for g in groups] == [0.05, 0.0], key
    assert ckpt['images_seen'] == 2 * 8 + 2 * 16
    kimg = [float(r['kimg']) for r in csv.DictReader(open(out / 'metrics.csv')) if r['kimg']]
    assert kimg == [0.008, 0.016, 0.032, 0.048]


# 5. integrity: what torch.load does not check, the checksum does
def flip_bytes(path):
    """Overwrites 4 bytes in the middle of the largest tensor's data in a torch.save zip, as a failing disk could."""
    with zipfile.ZipFile(path) as z:
        entry = max((i for i in z.infolist() if '/data/' in i.filename), key=lambda i: i.file_size)
    with open(path, 'r+b') as f:
        f.seek(entry.header_offset)
        name_len, extra_len = struct.unpack('<26xHH', f.read(30))  # the entry's local header
        f.seek(entry.header_offset + 30 + name_len + extra_len + entry.file_size // 2)
        data = f.read(4)
        f.seek(-4, os.SEEK_CUR)
        f.write(bytes(b ^ 0xFF for b in data))


@pytest.mark.parametrize('script', ['train_diffusion.py', 'distill_consistency.py --teacher'])
def test_a_checkpoint_changed_on_disk_is_refused_as_corrupt(runs, tmp_path, script):
    """4 bytes of a weight tensor changed in ckpt.pt: a resume, sample.py and a distillation's teacher refuse it
    before using it."""
    script, teacher = script.split()[0], script.endswith('--teacher')
    source = 'train_diffusion.py' if script == 'sample.py' or teacher else script
    folder = lone_checkpoint(runs(source), tmp_path / 'run')
    flip_bytes(folder / 'ckpt.pt')
    args = ['--num_samples=8', '--steps=2'] if script == 'sample.py' else \
        [*TINY[script], f'--teacher={folder}'] if teacher else tiny(script, runs)
    out = tmp_path / 'out' if teacher else folder
    before = snapshot(folder)
    p = run(script, *args, f'--out_dir={out}', check=False)
    assert_one_line(p, f"error: {folder / 'ckpt.pt'} is corrupt: its contents do not match the checksum written with "
                       f"them; ")
    assert snapshot(folder) == before


# 6. stopping: Ctrl-C twice, at once; before the handlers, one line (once: as SIGTERM, above)
@pytest.mark.slow
@pytest.mark.parametrize('script', ['train_diffusion.py'])  # one StopSignals, in bookkeeping.py
def test_ctrl_c_twice_stops_at_once_and_before_the_handlers_is_one_line(runs, tmp_path, script):
    """A Ctrl-C before the run's handlers (here while torch loads) is one line. A second Ctrl-C within the step after
    the first (each step slowed to 0.5 s by a fault) exits at once, non-zero, without saving: ckpt.pt stays as it
    was and no half-written file is left."""
    out, args = tmp_path / 'run', [*tiny(script, runs), '--max_steps=50', '--ckpt_interval=2']
    p = launch(out, script=script, base=args, cold=True)  # (a fresh interpreter, which loads torch)
    time.sleep(0.5)
    p.send_signal(signal.SIGINT)
    rest = p.communicate(timeout=60)[0]
    assert p.returncode == 130 and 'Traceback' not in rest and rest.strip().splitlines()[-1].startswith(
        "error: interrupted (Ctrl-C); the kit writes every file whole or not at all"), rest[-3000:]
    p = launch(out, script=script, base=args, faults={'FAULT_SLOW_STEPS': '0.5'})
    read_until(p, r'^saved .* at step 2$')
    saved = open(out / 'ckpt.pt', 'rb').read()
    read_until(p, r'^step 3/')
    p.send_signal(signal.SIGINT)
    read_until(p, r'^Ctrl-C: ')
    p.send_signal(signal.SIGINT)
    rest = p.communicate(timeout=60)[0]
    assert p.returncode == 1 and 'Traceback' not in rest and rest.strip().splitlines()[-1] == (
        "error: interrupted twice: stopped at once, without saving; the last checkpoint stays as it was"), rest[-3000:]
    assert open(out / 'ckpt.pt', 'rb').read() == saved and not glob.glob(str(out / '*.tmp'))


# 7. full disks and unwritable files at writes other than the checkpoint
GRIDS = {'train_diffusion.py': 'samples_0000003.png', 'train_gan.py': 'samples_0000003.png',
         'train_ae.py': 'recon_0000003.png', 'distill_consistency.py': 'samples_0000003.png', 'sample.py': 'samples.png'}


@pytest.mark.parametrize('script', GRIDS)
def test_a_sample_grid_that_cannot_be_written_stops_with_one_line(runs, tmp_path, script):
    """The grid's file is a folder: one line, and the out_dir as it was, no half-written file left (each run writes
    its grid before its log row and its checkpoint; train_diffusion.py's grid, which can take long, comes after
    them: its checkpoint of that step is saved, the rest as it was)."""
    out = tmp_path / 'out'
    if script == 'sample.py':
        lone_checkpoint(runs('train_gan.py'), out)
        args = ['--num_samples=8']
    else:
        shutil.copytree(runs(script), out)
        args = [*tiny(script, runs), '--max_steps=3', '--ckpt_interval=1', '--keep_last=2']
    os.makedirs(out / GRIDS[script])
    before = snapshot(out)
    p = run(script, *args, f'--out_dir={out}', check=False)
    assert_one_line(p, f"error: writing {out / GRIDS[script]} failed (Is a directory; ")
    after = snapshot(out)
    if script == 'train_diffusion.py':
        assert load(out / 'ckpt.pt')['step'] == 3
        before, after = ({f: v for f, v in files.items() if not f.startswith(('ckpt', 'best.pt', 'metrics.csv'))}
                         for files in (before, after))
    assert after == before


@pytest.mark.parametrize('script, resumed', [('train_diffusion.py', True), ('train_gan.py', False),
                                             ('train_ae.py', True), ('distill_consistency.py', False)])
def test_a_metrics_file_that_cannot_be_written_stops_with_one_line(runs, tmp_path, script, resumed):
    """metrics.csv is a folder, in a new run's out_dir or in one it resumes: one line, the out_dir as it was."""
    out = tmp_path / 'out'
    if resumed:
        shutil.copytree(runs(script), out)
        os.remove(out / 'metrics.csv')
    os.makedirs(out / 'metrics.csv')
    before = snapshot(out)
    p = run(script, *tiny(script, runs), '--max_steps=3', f'--out_dir={out}', check=False)
    last = assert_one_line(p, f"{out / 'metrics.csv'} ")
    assert ('cannot read' if resumed else 'failed') in last and '(Is a directory' in last
    assert snapshot(out) == before


def test_a_full_disk_at_a_sample_grid_stops_with_one_line(runs, tmp_path):
    """A file size limit, as a full disk, 1,000 bytes above metrics.csv's size and below a sample grid's (some 3 KiB):
    of a resumed run's writes, metrics.csv stays below it and the grid is the first to reach it, before the
    checkpoint (train_gan.py's; train_diffusion.py draws its grid after its checkpoint). One line names it; the
    checkpoints are as they were."""
    out = tmp_path / 'out'
    shutil.copytree(runs('train_gan.py'), out)
    limit = os.path.getsize(out / 'metrics.csv') + 1000
    assert limit < os.path.getsize(out / 'samples_0000002.png')
    before = snapshot(out)
    p = run('train_gan.py', *TINY['train_gan.py'], '--max_steps=3', '--ckpt_interval=1', '--keep_last=2',
            f'--out_dir={out}', check=False, file_size_limit=limit)
    assert_one_line(p, f"error: writing {out / 'samples_0000003.png'} failed (File too large; ")
    assert snapshot(out) == before  # (the step's row comes after its grid)


def test_a_full_disk_at_a_log_row_stops_with_one_line(runs, tmp_path):
    """A file size limit just above metrics.csv's header: the first row, written with it, is the first write to reach
    it. One line, and nothing left behind."""
    header = open(runs('train_gan.py') / 'metrics.csv').readline()
    out = tmp_path / 'out'
    p = run('train_gan.py', *TINY['train_gan.py'], '--max_steps=3', f'--out_dir={out}', check=False,
            file_size_limit=len(header) + 8)
    assert_one_line(p, f"error: writing {out / 'metrics.csv'} failed at step 1 (File too large); make room and re-run "
                       f"the same command")
    assert os.listdir(out) == []


# 8. keep_last and init_from='auto'
@pytest.mark.parametrize('script', ['train_diffusion.py'])  # one RunDir, in bookkeeping.py
def test_kept_checkpoints_without_ckpt_pt_are_not_started_over(runs, tmp_path, script):
    """An out_dir with kept copies ckpt_<step>.pt but no ckpt.pt: init_from='auto' stops, rather than start a new run
    over the old one's metrics."""
    out = tmp_path / 'out'
    shutil.copytree(runs(script), out)
    os.remove(out / 'ckpt.pt')
    before = snapshot(out)
    p = run(script, *tiny(script, runs), '--max_steps=3', f'--out_dir={out}', check=False)
    assert_one_line(p, f"error: {out} holds kept checkpoints (ckpt_0000002.pt the newest) but no ckpt.pt; copy the "
                       f"one to go on from to ckpt.pt, or start in another --out_dir")
    assert snapshot(out) == before


@pytest.mark.parametrize('script', ['train_diffusion.py'])
def test_a_ckpt_pt_older_than_a_kept_copy_is_not_resumed(runs, tmp_path, script):
    """An old kept copy copied over ckpt.pt: resuming it would mix two histories in one out_dir, so the run stops,
    naming the newer copy."""
    out = tmp_path / 'out'
    shutil.copytree(runs(script), out)
    os.remove(out / 'ckpt.pt')  # (not written through: with keep_last, ckpt.pt is a second name of a kept copy)
    shutil.copy(out / 'ckpt_0000001.pt', out / 'ckpt.pt')
    before = snapshot(out)
    p = run(script, *tiny(script, runs), '--max_steps=3', f'--out_dir={out}', check=False)
    assert_one_line(p, f"error: {out} keeps ckpt_0000002.pt, newer than ckpt.pt (step 1): another history of this "
                       f"run; move the newer copies away to go on from ckpt.pt")
    assert snapshot(out) == before


# 9. the kit removes, prunes and writes through only what it made
def test_foreign_files_and_links_in_out_dir_are_left_as_they_are(mnist, tmp_path):
    """A user's ckpt_5.pt and ckpt_20_before_lr_change.pt beside a run, and links planted at the temporary names the
    run writes (ckpt.pt.tmp, metrics.csv.tmp): keep_last prunes only its own copies, the resume reads past the user's
    files, and no link's target is written; a link planted as run.lock is refused in one line. What a killed run
    was writing (samples_0000012.png.tmp) is removed, and nothing else of a .tmp name."""
    out, outside = tmp_path / 'out', tmp_path / 'precious.txt'
    out.mkdir()
    outside.write_text('mine')
    foreign = {'ckpt_5.pt': 'a user file', 'ckpt_20_before_lr_change.pt': 'a backup', 'notes.tmp': 'a user file',
               'samples_12.png.tmp': 'not the kit\'s name'}
    (out / 'samples_0000012.png.tmp').write_bytes(b'half a grid')
    for name, text in foreign.items():
        (out / name).write_text(text)
    for name in ('ckpt.pt.tmp', 'metrics.csv.tmp'):
        os.symlink(outside, out / name)
    args = [*BASE, '--ckpt_interval=1', '--keep_last=2', '--eval_interval=1000', '--sample_interval=1000']
    run('train_diffusion.py', *args, '--max_steps=4', f'--out_dir={out}')
    p = run('train_diffusion.py', *args, '--max_steps=5', f'--out_dir={out}')
    assert 'resuming' in p.stdout and outside.read_text() == 'mine'
    assert all((out / name).read_text() == text for name, text in foreign.items())
    assert sorted(f for f in os.listdir(out) if f.endswith('.tmp')) == ['notes.tmp', 'samples_12.png.tmp']
    assert sorted(f for f in os.listdir(out) if f.startswith('ckpt_0')) == ['ckpt_0000004.pt', 'ckpt_0000005.pt']
    lock = tmp_path / 'locked'
    lock.mkdir()
    os.symlink(outside, lock / 'run.lock')
    p = run('train_diffusion.py', *args, '--max_steps=1', f'--out_dir={lock}', check=False)
    assert_one_line(p, f"error: {lock / 'run.lock'} is not a lock this kit made")
    assert outside.read_text() == 'mine' and os.listdir(lock) == ['run.lock']
    folder = tmp_path / 'folder' / 'ckpt_0000001.pt'  # a folder where keep_last keeps a copy
    folder.mkdir(parents=True)
    p = run('train_diffusion.py', *args, '--max_steps=1', f'--out_dir={folder.parent}', check=False)
    assert_one_line(p, f"error: keeping {folder} failed (a folder is there); {folder.parent / 'ckpt.pt'} is saved at step 1")
    assert folder.is_dir() and load(folder.parent / 'ckpt.pt')['step'] == 1


@pytest.mark.slow
def test_bench_removes_only_the_folders_it_made(tmp_path):
    """bench.py empties its own folders on every run, and refuses, in one line, one it did not make: a user's data/
    in --bench_dir=. is not deleted."""
    args = ['bench.py', '--dataset=none', '--arch=DiT-N/2', '--image_size=8', '--channels=4', '--batch_size=4',
            '--bench_steps=1', '--bench_warmup=1', f'--bench_dir={tmp_path}']
    run(*args)
    run(*args)  # (its own folders, replaced)
    shutil.rmtree(tmp_path / 'data')
    (tmp_path / 'data').mkdir()
    (tmp_path / 'data' / 'mine.npy').write_text('a dataset')
    p = run(*args, check=False)
    assert_one_line(p, f"error: {tmp_path / 'data'} is not a folder this kit made")
    assert (tmp_path / 'data' / 'mine.npy').read_text() == 'a dataset'


# 10. a resumed run notices that an input it reads changed
@pytest.mark.slow
def test_a_changed_input_or_another_runs_snapshots_are_refused(mnist, tmp_path):
    """A dataset prepared again under a run (one bit of one pixel), a teacher trained further under its student: the
    resume stops in one line naming the input. init_base given to a run that resumes is refused rather than recorded and never applied,
    and sample.py sums no post-hoc EMA snapshot of another run into this one's."""
    data = tmp_path / 'digits'
    shutil.copytree(MNIST, data, ignore=shutil.ignore_patterns('*.whl', '*.gz', 'raw', 'run.lock'))
    args = [*BASE, '--max_steps=2', '--eval_interval=2', '--sample_interval=1000', '--phema_stds=0.05',
            '--phema_interval=1']
    a, b = tmp_path / 'a', tmp_path / 'b'
    for out in (a, b):
        run('train_diffusion.py', *args, f'--dataset={data}', f'--out_dir={out}')
    p = run('train_diffusion.py', *args, '--max_steps=3', f'--dataset={data}', f'--out_dir={b}',
            f'--init_base={a}', check=False)
    assert_one_line(p, f"error: init_base='{a}', but {b / 'ckpt.pt'} (step 2) is a run of init_base='', which a "
                       f"resume keeps; pass that value, or another out_dir")
    x = np.load(data / 'train_x.npy')
    x[len(x) // 2, 14, 14] ^= 1  # one bit of one pixel in the middle of the file, its size and shape the same
    np.save(data / 'train_x.npy', x)
    p = run('train_diffusion.py', *args, '--max_steps=3', f'--dataset={data}', f'--out_dir={a}', check=False)
    assert_one_line(p, f"error: the dataset {data} changed since {a / 'ckpt.pt'} was written")
    shutil.copy(b / 'phema' / 'phema-0000002.pt', a / 'phema' / 'phema-0000002.pt')
    p = run('sample.py', f'--out_dir={a}', '--ema_std=0.06', '--num_samples=4', check=False)
    assert_one_line(p, f"error: {a / 'phema' / 'phema-0000002.pt'} is a snapshot of another run than")
    student = tmp_path / 'student'
    distill = ['--batch_size=8', '--log_interval=1', f'--teacher={b}', f'--out_dir={student}']
    run('distill_consistency.py', *distill, '--max_steps=1')
    run('train_diffusion.py', *args, '--max_steps=3', f'--out_dir={b}')  # the teacher, trained further
    p = run('distill_consistency.py', *distill, '--max_steps=2', check=False)
    assert_one_line(p, f"error: the teacher {b} changed since {student / 'ckpt.pt'} was written")


def test_a_stray_rank_and_an_unexpanded_home_are_refused(mnist, tmp_path):
    """RANK in the environment without torchrun's other variables, and an out_dir of ~ (a literal folder named ~ in
    the working directory otherwise): one line each, nothing made."""
    p = run('train_diffusion.py', *BASE, '--max_steps=1', f'--out_dir={tmp_path / "out"}', env={'RANK': '0'},
            check=False)
    assert_one_line(p, "error: RANK=0 is set but not LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT: launch with "
                       "torchrun, or unset RANK")
    p = run('train_diffusion.py', *BASE, '--max_steps=1', '--out_dir=~/runs/a', check=False)
    assert_one_line(p, "error: out_dir='~/runs/a' must be a folder (a path starting with ~ is not expanded here")
    assert not os.path.exists(os.path.join(REPO, '~')) and not os.path.exists(tmp_path / 'out')
