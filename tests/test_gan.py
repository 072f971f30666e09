"""train_gan.py, the GAN networks in model.py, and sampling GAN checkpoints."""
import csv
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import FROZEN, MNIST, assert_same_steps, run, script_functions
from model import Discriminator, GANBlock, create_model

TINY = ['config/mnist_gan.py', '--batch_size=8', '--log_interval=1', '--sample_interval=1000', '--ckpt_interval=1000',
        '--reg_interval=2', '--augment=color,translation,cutout', '--lr=2e-4', '--warmup_steps=2', '--lr_schedule=constant',
        '--grad_clip=1.0']


def load(path):
    return torch.load(path, map_location='cpu', weights_only=True)


def test_presets_fit_their_sizes_and_every_block_starts_as_the_identity():
    torch.manual_seed(0)
    g = create_model('GAN-T', image_size=28, in_channels=1, num_classes=10)
    d = Discriminator(g.config)
    z, y = torch.randn(6, 64), torch.arange(6)
    x = g(z, y)
    assert x.shape == (6, 1, 28, 28) and 0.1 < x.std() < 3  # no normalisation, yet a sane scale at init
    assert d(x, y).shape == (6,) and not torch.allclose(d(x, y), d(x, (y + 1) % 10))  # the projection sees labels
    blocks = [m for net in (g, d) for m in net.modules() if isinstance(m, GANBlock)]
    assert len(blocks) == 2 * 3 * 2
    for b in blocks:
        h = torch.randn(2, b.conv1.in_channels, 7, 7)
        assert torch.equal(b(h), h)
    big = create_model('GAN-B', image_size=32, in_channels=3)  # R3GAN's CIFAR-10 width, 4 x 4 basis
    assert big.basis.shape == (768, 4, 4) and 20e6 < sum(p.numel() for p in big.parameters()) < 22e6
    with pytest.raises(ValueError, match='image_size 28 is not divisible by 2\\^3'):
        create_model('GAN-S', image_size=28, in_channels=1)


def test_penalty_and_losses_match_their_closed_forms():
    """R1 of a linear D(x) = w.x is ||w||^2, and its gradient in w is 2w (the penalty trains D, so it must be
    differentiable); R2 of D(x) = ||x||^2 is 4||x||^2. RpGAN's two losses differ by exactly the logit gap."""
    w = torch.randn(3, 5, 5, requires_grad=True)
    x, fake = torch.randn(4, 3, 5, 5), torch.randn(4, 3, 5, 5)
    disc = lambda both, y: torch.cat([(both[:4] * w).sum(dim=(1, 2, 3)), both[4:].pow(2).sum(dim=(1, 2, 3))])
    names = ('penalties', 'd_logits', 'diff_augment', 'adversarial_losses')
    penalties, _, _, adversarial_losses = script_functions('train_gan.py', *names, torch=torch, F=F, loss='rpgan',
                                                           disc=disc, augment_ops=[])
    r1, r2 = penalties(x, fake, torch.zeros(4, dtype=torch.long), None, None)
    assert torch.allclose(r1, w.pow(2).sum()) and torch.allclose(r2, 4 * fake.pow(2).sum(dim=(1, 2, 3)).mean())
    grad_w, = torch.autograd.grad(r1, w)
    assert torch.allclose(grad_w, 2 * w)
    real, fake = torch.randn(7), torch.randn(7)
    loss_d, loss_g = adversarial_losses(real, fake)
    assert torch.allclose(loss_d - loss_g, fake - real) and torch.allclose(loss_d, torch.log1p(torch.exp(fake - real)))
    ns = script_functions('train_gan.py', 'adversarial_losses', torch=torch, F=F, loss='ns')[0]
    loss_d, loss_g = ns(torch.zeros(2), torch.zeros(2))
    assert torch.allclose(loss_d, torch.full((2,), 2 * math.log(2))) and torch.allclose(loss_g, torch.full((2,), math.log(2)))


def test_diff_augment_shifts_cuts_and_passes_gradients():
    augment = lambda ops: script_functions('train_gan.py', 'diff_augment', torch=torch, augment_ops=ops)[0]
    x = torch.zeros(2, 1, 28, 28)
    x[:, 0, 10, 12] = 1
    p = torch.full((2, 7), 0.5)
    p[0, 3], p[0, 4] = 0.0, 0.99  # image 0: 3 rows up, 3 columns right (28 // 8 = 3); image 1: not moved
    out = augment(['translation'])(x, p)
    assert out[0, 0, 7, 15] == 1 and out[1, 0, 10, 12] == 1 and out.sum() == 2
    edge = torch.ones(1, 1, 28, 28)
    assert augment(['translation'])(edge, p[:1]).sum() == 28 * 28 - 3 * 28 - 3 * 25  # zeros come in at the edges
    cut = augment(['cutout'])(edge, torch.full((1, 7), 0.5))
    assert cut.sum() == 28 * 28 - 13 * 13 and cut[0, 0, 14, 14] == 0  # a 13 x 13 hole around the centre
    every = augment(['color', 'translation', 'cutout'])
    xg = torch.randn(4, 3, 32, 32, requires_grad=True)
    params = torch.rand(4, 7)
    out = every(xg, params)
    assert out.shape == xg.shape and torch.equal(out, every(xg, params))  # the parameters decide everything
    out.sum().backward()
    assert xg.grad.abs().sum() > 0 and torch.equal(augment([])(xg, params), xg)


def test_resume_is_bit_exact_and_sample_py_reads_the_checkpoint(mnist, tmp_path):
    """6 steps straight == 3, stop, resume to 6, with everything that draws randomness on (augmentation, penalties
    every 2nd step, conditioning): both networks, the EMA, both optimizers and the image count identical to the
    bit; the metrics rows after the checkpoint are dropped. Then sample.py writes the GAN's digits and .npz."""
    run('train_gan.py', *TINY, f'--out_dir={tmp_path / "a"}', '--max_steps=6')
    run('train_gan.py', *TINY, f'--out_dir={tmp_path / "b"}', '--max_steps=3')
    with open(tmp_path / 'b' / 'metrics.csv', 'a') as f:  # a row logged after the checkpoint, before a crash
        f.write('5,0.04,9.9' + ',' * 14 + '\n')
    p = run('train_gan.py', *TINY, f'--out_dir={tmp_path / "b"}', '--max_steps=6')
    assert 'resuming' in p.stdout and 'changed since: max_steps 3 -> 6' in p.stdout
    a, b = load(tmp_path / 'a' / 'ckpt.pt'), load(tmp_path / 'b' / 'ckpt.pt')
    assert a['step'] == b['step'] == 6 and a['images_seen'] == b['images_seen'] == 48
    for key in ('model', 'ema', 'disc'):
        assert all(torch.equal(w, b[key][name]) for name, w in a[key].items()), key
    for key in ('optimizer', 'd_optimizer'):
        for sa, sb in zip(a[key]['state'].values(), b[key]['state'].values()):
            assert all(torch.equal(sa[k], sb[k]) for k in sa), key
    rows = list(csv.DictReader(open(tmp_path / 'b' / 'metrics.csv')))
    assert [r['step'] for r in rows] == ['1', '2', '3', '4', '5', '6']
    assert [float(r['r1']) > 0 if r['r1'] else None for r in rows] == [True, None] * 3  # penalties every 2nd step
    run('sample.py', f'--out_dir={tmp_path / "b"}', '--num_samples=12', '--save_npz=True', '--class_labels=3,7')
    samples = np.load(tmp_path / 'b' / 'samples.npz')
    assert samples['arr_0'].shape == (12, 28, 28, 1) and samples['arr_1'].tolist() == [3, 7] * 6
    assert os.path.exists(tmp_path / 'b' / 'samples.png')


@pytest.mark.slow
def test_two_ranks_match_one_process(mnist, fid_args, tmp_path):
    """torchrun with 2 gloo ranks == 1 process == 1 process with 2 micro-steps: the noise and augmentation of the
    whole batch are drawn once and sliced, and the penalty pass's gradients join the all-reduce of the loss pass.
    Every logged term, both gradient norms and the FID during training (random Inception weights, each rank drawing
    its share) agree at every step to float rounding (FROZEN's lr: conftest.py)."""
    common = [*TINY, '--max_steps=3', '--batch_size=16', '--reg_interval=1', *fid_args, '--fid_interval=3', *FROZEN]
    one_thread = {'OMP_NUM_THREADS': '1'}
    run('torchrun', '--standalone', '--nproc_per_node=2', 'train_gan.py', *common, f'--out_dir={tmp_path / "ddp"}',
        env=one_thread)
    run('train_gan.py', *common, f'--out_dir={tmp_path / "one"}', env=one_thread)
    run('train_gan.py', *common, f'--out_dir={tmp_path / "accum"}', '--grad_accum=2', env=one_thread)
    for other in ('ddp', 'accum'):
        rows = list(csv.DictReader(open(tmp_path / other / 'metrics.csv')))
        assert len(rows) == 3 and [bool(r['fid']) for r in rows] == [False, False, True]
        assert_same_steps(tmp_path / 'one', tmp_path / other)


def test_a_nonfinite_update_is_skipped_and_counted(mnist, tmp_path):
    """NaN fakes at step 2 (G's 3rd and 4th training forwards: the D pass's fakes and G's pass): both networks skip
    that update (their Adams count one step less), the log counts it, the step's checkpoint is not written, the run
    goes on and ends finite. (With the non-saturating loss.) With max_nonfinite=1 that one skipped update stops the
    run with one line that names the checkpoint to go back to."""
    def faulty(*args):
        return run('tests/faults.py', 'train_gan.py', *TINY, '--max_steps=4', '--ckpt_interval=1', '--loss=ns', *args,
                   env={'FAULT_NAN_STEPS': '2,3'}, check=False, timeout=300)
    p = faulty('--keep_last=4', f'--out_dir={tmp_path}')
    assert p.returncode == 0 and '1 non-finite update(s) skipped' in p.stdout, p.stderr[-2000:]
    assert sorted(f for f in os.listdir(tmp_path) if f.startswith('ckpt_')) == [
        'ckpt_0000001.pt', 'ckpt_0000003.pt', 'ckpt_0000004.pt']
    before, after = load(tmp_path / 'ckpt_0000001.pt'), load(tmp_path / 'ckpt_0000003.pt')
    for key in ('optimizer', 'd_optimizer'):  # step 3 is the one update after step 1's
        assert [s['step'] for s in before[key]['state'].values()] == [1] * len(before[key]['state'])
        assert [s['step'] for s in after[key]['state'].values()] == [2] * len(after[key]['state'])
    rows = list(csv.DictReader(open(tmp_path / 'metrics.csv')))
    assert [r['skipped'] for r in rows] == ['0', '1', '0', '0'] and rows[1]['d_loss'] == 'nan'
    assert all(w.isfinite().all() for w in load(tmp_path / 'ckpt.pt')['model'].values())
    p = faulty('--max_nonfinite=1', f'--out_dir={tmp_path / "stop"}')
    assert p.returncode == 1 and p.stderr.strip().splitlines()[-1] == (
        f"error: 1 updates in a row had a non-finite gradient norm and were skipped (max_nonfinite=1) by step 2; "
        f"{tmp_path / 'stop' / 'ckpt.pt'} (step 1) is intact: resume it with a lower lr, grad_clip or "
        f"dtype='float32'"), p.stderr[-2000:]


def test_ema_half_life_ramps_up_and_the_other_switches_run(mnist, tmp_path):
    """G's EMA after step 2 is beta ema_1 + (1 - beta) G_2 with beta = 0.5^(B / n) for a half-life of n images:
    with the default ema_rampup=0.05, n = 2 B 0.05 = 0.8 images (0.05 of those seen: beta = 2^-10); with
    ema_rampup=0, n = ema_kimg 1000 = 2,000 (beta = 0.997). The second run also trains in bfloat16 with beta2=0.9
    (both Adams take it) and seed=1 (other initial weights: they differ by far more than two Adam steps)."""
    B, ema_kimg = 8, 2.0  # TINY's batch size and config/mnist_gan.py's ema_kimg
    ramped, flat = tmp_path / 'ramped', tmp_path / 'flat'
    run('train_gan.py', *TINY, f'--out_dir={ramped}', '--max_steps=2', '--ckpt_interval=1', '--keep_last=2')
    run('train_gan.py', *TINY, f'--out_dir={flat}', '--max_steps=2', '--ckpt_interval=1', '--keep_last=2',
        '--ema_rampup=0', '--dtype=bfloat16', '--beta2=0.9', '--seed=1')
    half_lives = {ramped: 2 * B * 0.05, flat: ema_kimg * 1000}
    for out, n in half_lives.items():
        one, two = load(out / 'ckpt_0000001.pt'), load(out / 'ckpt_0000002.pt')
        miss = {}  # the largest error of the EMA predicted with each half-life
        for other, m in half_lives.items():
            beta = 0.5 ** (B / m)
            miss[other] = max((w.double() - beta * one['ema'][k].double() - (1 - beta) * two['model'][k].double())
                              .abs().max().item() for k, w in two['ema'].items())
        assert miss[out] < 1e-6 and min(miss.values()) == miss[out] and max(miss.values()) > 1e-5, (out, miss)
    a, b = load(ramped / 'ckpt.pt'), load(flat / 'ckpt.pt')
    assert [tuple(b[key]['param_groups'][0]['betas']) for key in ('optimizer', 'd_optimizer')] == [(0.0, 0.9)] * 2
    rows = list(csv.DictReader(open(flat / 'metrics.csv')))
    assert len(rows) == 2 and all(np.isfinite(float(r[k])) for r in rows for k in ('d_loss', 'g_loss'))
    assert (a['model']['basis'] - b['model']['basis']).abs().max() > 0.01


BAD_INPUT = [
    ('negative gamma', ['--gamma=-1'], "gamma=-1.0 must be at least 0 (0 = no gradient penalties)"),
    ('unknown loss', ['--loss=wgan'], "loss='wgan' is not one of rpgan, ns"),
    ('unknown augmentation', ['--augment=translation,flip'],
     "augment='translation,flip' must be comma-separated ops from color, translation, cutout, or ''"),
    ('preset too deep', ['--arch=GAN-S'], "error: GAN-S on mnist: image_size 28 is not divisible by 2^3"),
    ('no data', ['--dataset=nonexistent'], "dataset 'nonexistent' is missing or unreadable"),
]


@pytest.mark.parametrize('case, args, message', BAD_INPUT, ids=[c[0] for c in BAD_INPUT])
def test_bad_input_stops_with_one_clear_line(mnist, tmp_path, case, args, message):
    p = run('train_gan.py', 'config/mnist_gan.py', f'--out_dir={tmp_path / "out"}', *args, check=False)
    assert p.returncode == 1 and message in p.stderr.strip().splitlines()[-1], p.stderr[-2000:]
    assert 'Traceback' not in p.stderr and not os.path.exists(tmp_path / 'out' / 'ckpt.pt')


def test_max_minutes_stops_and_resuming_another_network_is_refused(mnist, tmp_path):
    p = run('train_gan.py', *TINY, f'--out_dir={tmp_path}', '--max_steps=50', '--max_minutes=1e-6')
    assert 'stopped at step 1 of 50 (max_minutes=1e-06)' in p.stdout and load(tmp_path / 'ckpt.pt')['step'] == 1
    p = run('train_gan.py', *TINY, f'--out_dir={tmp_path}', '--max_steps=2', '--class_cond=False', check=False)
    assert p.returncode == 1 and "holds another model_args (checkpoint vs config: {'num_classes': (10, 0)})" in \
        p.stderr.strip().splitlines()[-1], p.stderr[-2000:]
    # a discriminator of another shape (the same generator) is refused too
    ckpt = load(tmp_path / 'ckpt.pt')
    ckpt['disc']['head.weight'] = ckpt['disc']['head.weight'][:, :-1]
    torch.save(ckpt, tmp_path / 'ckpt.pt')  # (its checksum no longer matches: refused as corrupt first)
    p = run('train_gan.py', *TINY, f'--out_dir={tmp_path}', '--max_steps=2', check=False)
    assert p.returncode == 1 and 'ckpt.pt is corrupt: its contents do not match the checksum' in p.stderr
    del ckpt['checksum']  # a checkpoint without one (edited by hand) is read as it is
    torch.save(ckpt, tmp_path / 'ckpt.pt')
    p = run('train_gan.py', *TINY, f'--out_dir={tmp_path}', '--max_steps=2', check=False)
    assert p.returncode == 1 and "ckpt.pt's disc does not fit this run (size mismatch for head.weight" in \
        p.stderr.strip().splitlines()[-1] and 'Traceback' not in p.stderr, p.stderr[-2000:]


@pytest.mark.slow
def test_conditional_gan_learns_mnist(gan_run, mnist_classifier):
    """config/mnist_gan.py as typed (trained in the background: conftest.SHARED): the EMA generator's samples show the
    digit asked for (the spine's bar, 80% of 200) without collapsing to one image per class (the mean distance
    between two samples of a class is at least a third of that between two real digits of it), and no update was
    non-finite."""
    rows = list(csv.DictReader(open(gan_run / 'metrics.csv')))
    assert all(r['skipped'] == '0' and np.isfinite(float(r['d_loss'])) for r in rows)
    samples = np.load(gan_run / 'samples.npz')
    accuracy = mnist_classifier(samples['arr_0'], samples['arr_1'])
    x, y = samples['arr_0'].reshape(200, -1) / 255.0, samples['arr_1']
    real_x, real_y = np.load(os.path.join(MNIST, 'train_x.npy'))[:1000].reshape(1000, -1) / 255.0, \
        np.load(os.path.join(MNIST, 'train_y.npy'))[:1000]
    spread = lambda a: np.mean([np.linalg.norm(p - q) for i, p in enumerate(a) for q in a[i + 1:]])
    diversity = np.mean([spread(x[y == c]) / spread(real_x[real_y == c][:20]) for c in range(10)])
    print(f"conditional GAN: {accuracy:.1%} of 200 samples read as their class; within-class spread {diversity:.2f} "
          f"of the real digits'")
    assert accuracy >= 0.8 and diversity >= 1 / 3
