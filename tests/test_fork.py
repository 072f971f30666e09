"""A fork in one file: train_diffusion.py copied to train_mine.py outside the repository, its loss changed, trains,
checkpoints, resumes bit-exactly and is timed by bench.py, with no edit anywhere else."""
import csv
import math
import os

import pytest
import torch

from conftest import REPO, run, script_functions

SHORT = ['config/mnist_dit.py', '--batch_size=16', '--log_interval=1', '--eval_interval=3', '--eval_images=16',
         '--sample_interval=1000', '--sample_steps=2', '--ckpt_interval=3', '--warmup_steps=2']


@pytest.mark.slow
def test_a_fork_of_train_diffusion_trains_resumes_and_is_benchmarked(mnist, tmp_path):
    src = open(os.path.join(REPO, 'train_diffusion.py')).read()
    mse = "    mse = (pred - target).pow(2).mean(dim=(1, 2, 3))\n"
    assert src.count(mse) == 1
    mine = tmp_path / 'fork' / 'train_mine.py'
    mine.parent.mkdir()
    mine.write_text(src.replace(mse, "    mse = (pred - target).abs().mean(dim=(1, 2, 3))  # the fork's loss: L1\n"))
    env = {'PYTHONPATH': REPO}  # the kit's modules, which the fork imports from where it lives
    whole, split = tmp_path / 'whole', tmp_path / 'split'
    run(mine, *SHORT, '--max_steps=6', f'--out_dir={whole}', env=env)
    run(mine, *SHORT, '--max_steps=3', f'--out_dir={split}', env=env)
    p = run(mine, *SHORT, '--max_steps=6', f'--out_dir={split}', env=env)
    assert 'resuming' in p.stdout and 'at step 3' in p.stdout, p.stdout[-2000:]
    a, b = (torch.load(d / 'ckpt.pt', weights_only=True) for d in (whole, split))
    assert a['script'] == 'train_mine.py' and a['kind'] == 'diffusion' and a['step'] == b['step'] == 6
    for key in ('model', 'ema'):
        assert all(torch.equal(w, b[key][name]) for name, w in a[key].items()), key
    rows = [[r['loss'] for r in csv.DictReader(open(d / 'metrics.csv')) if r['loss']] for d in (whole, split)]
    assert rows[0] == rows[1] and len(rows[0]) == 6
    # the fork's own loss ran: from the same weights and draws, step 1's unweighted loss is the mean |error| where
    # train_diffusion.py's is the mean squared error, and mean |e| <= sqrt(mean e^2) (Cauchy-Schwarz)
    plain = tmp_path / 'plain'
    run('train_diffusion.py', *SHORT, '--max_steps=1', f'--out_dir={plain}')
    l1, l2 = (float(next(csv.DictReader(open(d / 'metrics.csv')))['loss_unweighted']) for d in (whole, plain))
    assert l1 < l2 ** 0.5 and l1 != l2
    p = run('bench.py', f'--script={mine}', 'config/mnist_dit.py', '--bench_steps=2', '--bench_warmup=1',
            f'--bench_dir={tmp_path / "bench"}', env=env)
    assert 'train_mine.py: DiT-N/4 on 1 x 28 x 28' in p.stdout and 'step: ' in p.stdout, p.stdout[-2000:]



@pytest.mark.parametrize('script', ['train_diffusion.py', 'train_ae.py', 'train_gan.py', 'distill_consistency.py'])
def test_each_script_writes_the_lr_schedule_inline(script):
    """Each train script's own get_lr (written in it, where a fork changes it): a linear warm-up, then a cosine from lr
    to min_lr at lr_decay_steps (0: max_steps) that stays there, or constant."""
    keys = dict(lr=1.0, min_lr=0.1, warmup_steps=2, lr_decay_steps=6, max_steps=8, lr_schedule='cosine', math=math)
    (get_lr,) = script_functions(script, 'get_lr', **keys)
    lrs = [get_lr(s) for s in range(8)]
    assert lrs[:3] == [0.5, 1.0, 1.0] and lrs[4] == pytest.approx(0.55) and lrs[6:] == [0.1, 0.1]
    (get_lr,) = script_functions(script, 'get_lr', **{**keys, 'lr_decay_steps': 0, 'max_steps': 6})
    assert [get_lr(s) for s in range(8)] == lrs
    (get_lr,) = script_functions(script, 'get_lr', **{**keys, 'lr_schedule': 'constant'})
    assert [get_lr(s) for s in range(4)] == [0.5, 1.0, 1.0, 1.0]
