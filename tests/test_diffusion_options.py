"""train_diffusion.py's options beyond the spine, as a user runs them: post-hoc EMA, class-balanced sampling, control
images (concat and ControlNet), LightningDiT's architecture options; and sample.py's memorization check."""
import csv
import glob
import math
import os
import re
import shutil

import numpy as np
import pytest
import torch

from conftest import MNIST, run, script_functions, shared
import dataformat
from diffusion import phema_gamma, phema_weights
from test_train_diffusion import TINY, load_ckpt


@pytest.mark.slow
def test_posthoc_ema_rebuilds_a_profile_it_also_tracked(mnist, tmp_path):
    """Track sigma_rel = 0.05, 0.07 and 0.10 for 100 steps with snapshots every 10, then rebuild 0.07 from the 0.05 and
    0.10 snapshots alone: it must land 10x closer to the tracked 0.07 than the nearer of the other two (measured: 40x)."""
    out = tmp_path / 'run'
    run('train_diffusion.py', *TINY, f'--out_dir={out}', '--max_steps=100', '--log_interval=50', '--eval_interval=100',
        '--lr=2e-3', '--phema_stds=0.05,0.07,0.1', '--phema_interval=10')
    snaps = [torch.load(f, weights_only=True) for f in sorted(glob.glob(str(out / 'phema' / 'phema-*.pt')))]
    assert [s['step'] for s in snaps] == list(range(10, 101, 10)) and snaps[0]['sigma_rel'] == [0.05, 0.07, 0.1]
    gamma = phema_gamma(0.07)
    others = [(s['step'], g, w) for s in snaps for g, w in zip(s['gamma'], s['ema']) if g != gamma]
    tracked = snaps[-1]['ema']  # sigma_rel 0.05, 0.07, 0.10 at step 100
    dist = lambda a, b: math.sqrt(sum((a[k].double() - b[k].double()).square().sum().item() for k in b))
    error = dist(phema_weights(others, 100, 0.07), tracked[1])
    nearest = min(dist(tracked[0], tracked[1]), dist(tracked[2], tracked[1]))
    print(f"rebuilt 0.07 vs tracked: {error:.2e}; nearest other profile: {nearest:.2e}")
    assert error < nearest / 10
    assert phema_gamma(0.10) == pytest.approx(6.94, abs=0.01) and phema_gamma(0.05) == pytest.approx(16.97, abs=0.01)
    run('sample.py', f'--out_dir={out}', '--ema_std=0.07', '--num_samples=4', '--steps=2')  # sample.py takes the length
    p = run('sample.py', f'--out_dir={out}', '--ema_std=0.3', check=False)
    assert p.stderr.strip().splitlines()[-1] == "error: ema_std=0.3: sigma_rel=0.3 must be in (0, 0.28): longer " \
                                                "averages are not power-function EMAs", p.stderr[-1000:]


def test_posthoc_ema_has_a_snapshot_at_every_checkpoint(mnist, tmp_path):
    """A run stopped between phema_interval steps (max_minutes, a signal) still snapshots at its checkpoint's step,
    so sample.py rebuilds the EMA of that step; where the newest snapshot misses it (a snapshot lost), it refuses
    instead of rebuilding a wrong EMA."""
    out = tmp_path / 'run'
    common = [*TINY, f'--out_dir={out}', '--phema_stds=0.05,0.1', '--phema_interval=4']
    run('train_diffusion.py', *common, '--max_steps=30', '--max_minutes=0.0001')  # stops after one step
    step = load_ckpt(out)['step']
    assert step < 4 and os.path.exists(out / 'phema' / f'phema-{step:07d}.pt')
    run('sample.py', f'--out_dir={out}', '--ema_std=0.07', '--num_samples=2', '--steps=2')
    os.remove(out / 'phema' / f'phema-{step:07d}.pt')
    torch.save({'step': 0, 'sigma_rel': [0.05], 'gamma': [phema_gamma(0.05)], 'ema': [{}]},
               out / 'phema' / 'phema-0000000.pt')
    p = run('sample.py', f'--out_dir={out}', '--ema_std=0.07', '--num_samples=2', '--steps=2', check=False)
    assert p.returncode == 1 and p.stderr.strip().splitlines()[-1] == (
        f"error: ema_std=0.07: the newest snapshot in {out}/phema/ is at step 0, the checkpoint at step {step}; "
        f"resume the run to its next snapshot, or sample the checkpoint's EMA with ema_std=0")


@pytest.mark.parametrize('class_balance', [0.0, 0.5, 1.0])
def test_class_balanced_sampling_hits_its_target_frequencies(class_balance):
    """dataformat.class_weights and train_diffusion.py's draws: on classes of 2000, 800, 300, 100 and 40 images,
    class k is drawn with probability proportional to count_k^(1 - class_balance): the data's frequencies at 0, uniform at 1 (51,200 draws: within 5 standard
    errors)."""
    counts = np.array([2000, 800, 300, 100, 40])
    y = np.repeat(np.arange(5), counts)
    weights = torch.from_numpy(dataformat.class_weights(y, class_balance)) if class_balance else None
    (draw_indices,) = script_functions('train_diffusion.py', 'draw_indices', torch=torch, class_balance=class_balance,
                                       batch_size=512, data={'train': (y, y)}, sample_weights=weights)
    g = torch.Generator().manual_seed(0)
    drawn = y[torch.cat([draw_indices(g) for _ in range(100)]).numpy()]
    freq = np.bincount(drawn, minlength=5) / len(drawn)
    target = counts ** (1 - class_balance) / (counts ** (1 - class_balance)).sum()
    print(f"class_balance={class_balance}: drawn {np.round(freq, 4)}, target {np.round(target, 4)}")
    assert np.abs(freq - target).max() < 5 * math.sqrt(0.25 / len(drawn))


@pytest.mark.slow
def test_memorization_check_flags_a_planted_copy(quickstart, tmp_path):
    """The quickstart's samples have no training image much closer than the next one; a training digit planted among
    them (with noise of +-8 levels) is flagged and found."""
    out = tmp_path / 'q'
    out.mkdir()
    shutil.copy(quickstart / 'ckpt.pt', out / 'ckpt.pt')
    p = run('sample.py', f'--out_dir={out}', '--num_samples=100', '--steps=25', '--save_npz=True', '--memorization=True')
    flagged = int(re.search(r'memorization: (\d+) of 100 samples', p.stdout).group(1))
    print(p.stdout.strip().splitlines()[-1])
    assert flagged <= 2 and os.path.exists(out / 'memorization.png')
    (nearest,) = script_functions('sample.py', 'nearest_training_images', torch=torch, np=np, math=math, device='cpu')
    train = np.load(os.path.join(MNIST, 'train_x.npy'), mmap_mode='r')
    images = np.load(out / 'samples.npz')['arr_0'].copy()
    noise = np.random.default_rng(0).integers(-8, 9, train[1234].shape)
    images[7] = np.clip(train[1234].astype(int) + noise, 0, 255)
    d, i = nearest(images, train, chunk=1000)  # chunks: the running top 2 across them
    full = torch.cdist(torch.from_numpy(images).flatten(1).double(), torch.from_numpy(np.array(train)).flatten(1).double())
    assert np.allclose(d, full.topk(2, largest=False).values.numpy() / 255 / 28, atol=1e-5)  # RMS over 784 pixels
    ratio = d[:, 0] / d[:, 1]
    assert i[7, 0] == 1234 and ratio[7] < 1 / 3 and (np.delete(ratio, 7) < 1 / 3).sum() <= flagged


@shared(2)
def control_data(data):
    """A copy of data/mnist with data/prepare_control.py's 4x-downsampled digits (after trying its edges)."""
    for name in ('train_x.npy', 'train_y.npy', 'val_x.npy', 'val_y.npy', 'meta.json'):
        shutil.copy(os.path.join(MNIST, name), data / name)
    run('data/prepare_control.py', f'--dataset={data}', '--kind=edges')
    edges, x = np.load(data / 'val_control.npy')[..., 0], np.load(data / 'val_x.npy')[..., 0]
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1)), mode='reflect')
    blank = np.all([padded[:, i:i + 28, j:j + 28] == 0 for i in range(3) for j in range(3)], axis=0)
    assert edges.shape == (500, 28, 28) and edges[blank].max() == 0 and edges[~blank].mean() > 50  # zero where flat
    run('data/prepare_control.py', f'--dataset={data}', '--kind=downsample4', '--chunk=1000')


def downsampled_error(images, controls):
    """Mean squared error ([0, 1] scale) between the 4x4 block means of images and of their control images."""
    pool = lambda a: a.astype(np.float64).reshape(len(a), 7, 4, 7, 4, -1).mean(axis=(2, 4)) / 255
    return ((pool(images) - pool(controls)) ** 2).mean()


@pytest.mark.slow
def test_unet_takes_a_control_image_by_concat(control_data, tmp_path):
    """control='concat' on the UNet, from scratch and from a UNet base (its first conv widened with zeros), then
    sample.py, which feeds each sample its val image's control; the cosine loss term rides along."""
    data = control_data
    unet = ['--arch=UNet-S', f'--dataset={data}', '--batch_size=4', '--eval_images=8', '--cosine_loss=0.5',
            '--cfg_scale=1']
    run('train_diffusion.py', *TINY, *unet, '--max_steps=2', f'--out_dir={tmp_path / "base"}')
    for name, extra in (('scratch', []), ('tuned', [f'--init_base={tmp_path / "base"}'])):
        run('train_diffusion.py', *TINY, *unet, '--control=concat', '--max_steps=2', f'--out_dir={tmp_path / name}', *extra)
        assert load_ckpt(tmp_path / name)['model']['conv_in.weight'].shape[1] == 2  # the digit and its control
    run('sample.py', f'--out_dir={tmp_path / "tuned"}', '--num_samples=3', '--steps=2', '--save_npz=True')
    assert (np.load(tmp_path / 'tuned' / 'samples.npz')['arr_1'] == np.load(data / 'val_y.npy')[:3]).all()


@shared(130)
def control_runs(out, quickstart, control_data):
    """From the quickstart's DiT, 200 steps of concat and of ControlNet training on the 4x-downsampled digits, and 100
    samples of each and of the base model (of the val images' labels, 25 steps)."""
    labels = np.load(control_data / 'val_y.npy')[:100]
    (out / 'base').mkdir()
    shutil.copy(quickstart / 'ckpt.pt', out / 'base' / 'ckpt.pt')
    run('sample.py', f'--out_dir={out / "base"}', '--num_samples=100', '--steps=25', '--save_npz=True',
        f'--class_labels={",".join(map(str, labels))}')
    for control in ('concat', 'controlnet'):
        run('train_diffusion.py', 'config/mnist_dit.py', f'--dataset={control_data}', f'--init_base={quickstart}',
            f'--control={control}', '--max_steps=200', '--warmup_steps=50', '--eval_interval=200',
            f'--out_dir={out / control}')
        run('sample.py', f'--out_dir={out / control}', '--num_samples=100', '--steps=25', '--save_npz=True')


@pytest.mark.slow
def test_control_models_follow_their_control(control_runs, quickstart, control_data, mnist_classifier):
    """From the quickstart's DiT, 200 steps of concat and of ControlNet training on 4x-downsampled digits: samples drawn
    under a val digit's control must match it (4x4 block means) at least 10x better than the base model's samples of
    the same labels (measured on 200: 27x and 41x), still show their label (95.5% and 96.0%), and ControlNet must
    leave the base weights as they were."""
    controls, labels = np.load(control_data / 'val_control.npy')[:100], np.load(control_data / 'val_y.npy')[:100]
    base_error = downsampled_error(np.load(control_runs / 'base' / 'samples.npz')['arr_0'], controls)
    for control in ('concat', 'controlnet'):
        samples = np.load(control_runs / control / 'samples.npz')
        assert (samples['arr_1'] == labels).all()  # a control model's samples take their val image's label
        error = downsampled_error(samples['arr_0'], controls)
        accuracy = mnist_classifier(samples['arr_0'], labels)
        print(f"{control}: downsampled error {error:.4f} vs the base model's {base_error:.4f}; class accuracy {accuracy:.1%}")
        assert error < base_error / 10 and accuracy >= 0.8
    trained, start = load_ckpt(control_runs / 'controlnet')['ema'], load_ckpt(quickstart)['ema']
    assert all(torch.equal(trained[k], w) for k, w in start.items())  # the base stayed frozen
    assert any(not torch.equal(w, torch.zeros_like(w)) for k, w in trained.items() if k.startswith('control_out'))


@shared(100)
def lightning_run(out):
    """The quickstart's first 1,000 steps (its seed, batches and learning rates) with LightningDiT's options."""
    return run('train_diffusion.py', 'config/mnist_dit.py', '--norm=rmsnorm', '--mlp=swiglu', '--qk_norm=True',
               '--rope=True', '--cosine_loss=1.0', '--max_steps=1000', '--lr_decay_steps=6000', '--sample_interval=8000',
               f'--out_dir={out}').stdout[-800:]


@pytest.mark.slow
def test_lightningdit_options_learn_faster(lightning_run, quickstart):
    """LightningDiT's options together (RMSNorm, SwiGLU, QK-norm, 2-D RoPE, the cosine loss term) learn MNIST faster
    than the plain DiT: after the quickstart's first 1,000 steps (its seed, batches and learning rates), the EMA's
    unweighted val loss on the real val digits is at least 10% below the quickstart's at that step (15.4% and 18.7%
    below at seeds 0 and 1). At 3,000 steps their samples read 96.6% right against the plain DiT's 76.8%
    (docs/guide.md)."""
    out = lightning_run
    val = [next(r for r in csv.DictReader(open(d / 'metrics.csv')) if r['step'] == '1000' and r['val_loss_ema'])
           for d in (quickstart, out)]
    plain, options = (float(r['val_loss_unweighted_ema']) for r in val)
    print(f"unweighted EMA val loss at step 1000: plain {plain:.4f}, all options {options:.4f}")
    assert options <= 0.9 * plain
    run('sample.py', f'--out_dir={out}', '--num_samples=4', '--steps=2')  # sample.py rebuilds the same model
    assert load_ckpt(out)['model_args']['rope'] is True
