"""train_diffusion.py and sample.py as a user runs them: learning on real digits, DDP, resume, sampling, logging."""
import csv
import glob
import json
import os
import runpy
import sys

import numpy as np
import pytest
import torch

from common import checksum
from conftest import FROZEN, REPO, assert_same_steps, run, shared

TINY = ['--arch=DiT-N/4', '--batch_size=16', '--log_interval=2', '--eval_interval=3', '--eval_images=32',
        '--sample_interval=1000', '--sample_steps=2', '--ckpt_interval=1000', '--warmup_steps=2']


def load_ckpt(out_dir, name='ckpt.pt'):
    return torch.load(os.path.join(out_dir, name), map_location='cpu', weights_only=True)


@shared(45)
def quickstart_samples(out, quickstart):
    """sample.py on the quickstart's run as the README types it, for 200 conditional digits (20 of each class) and
    their .npz (in the run's folder, as the README's command writes its samples.png)."""
    run('sample.py', f'--out_dir={quickstart}', '--num_samples=200', '--save_npz=True')


@pytest.mark.slow
def test_quickstart_learns_mnist(quickstart, quickstart_samples, mnist_classifier):
    """The README's quickstart, as typed (v-prediction, cosine, min-SNR): samples must show the digit asked for."""
    out = quickstart
    rows = list(csv.DictReader(open(out / 'metrics.csv')))
    train = [float(r['loss']) for r in rows if r['loss']]
    val = [float(r['val_loss_ema']) for r in rows if r['val_loss_ema']]
    assert train[-1] < 0.5 * train[0] and val[-1] < val[0], (train, val)
    assert all(r[f'loss_u{i}'] for r in rows if r['loss'] for i in (0, 9))  # the per-noise-level losses are logged
    samples = np.load(out / 'samples.npz')
    assert samples['arr_0'].shape == (200, 28, 28, 1) and samples['arr_0'].dtype == np.uint8
    assert (samples['arr_1'] == np.arange(200) % 10).all()
    acc = mnist_classifier(samples['arr_0'], samples['arr_1'])
    print(f"class accuracy of 200 conditional samples: {acc:.1%}")
    assert acc >= 0.8
    assert os.path.exists(quickstart / 'samples.png') and glob.glob(str(quickstart / 'samples_*.png'))


@pytest.mark.slow
def test_unet_resume_is_bit_exact(mnist, fid_args, tmp_path):
    """6 steps straight == 3 steps, stop, resume to 6: model, EMA, post-hoc EMAs, optimizer state, best.pt and the FID
    during training identical to the bit, for the UNet, whose dropout draws from the global RNG that the checkpoint
    restores (tests/test_robustness.py kills and resumes the DiT). best.pt stays at the lowest EMA val loss when 3 more
    steps at lr=0.1 make it worse, and sample.py --ckpt=best samples it."""
    objective = ['--arch=UNet-S', '--schedule=flow', '--prediction_type=flow', '--timestep_sampling=logit_normal',
                 '--ema_update_every=2', '--batch_size=4', '--eval_images=8', '--phema_stds=0.05,0.1',
                 '--phema_interval=2', '--cfg_scale=1']  # (a UNet step costs 10 of the DiT's: the smallest run)
    fid = [*fid_args, '--fid_interval=3']  # (FID at step 3, where b stops, and 6)
    run('train_diffusion.py', *TINY, *objective, *fid, f'--out_dir={tmp_path / "a"}', '--max_steps=6')
    run('train_diffusion.py', *TINY, *objective, *fid, f'--out_dir={tmp_path / "b"}', '--max_steps=3', '--lr_decay_steps=6')
    with open(tmp_path / 'b' / 'metrics.csv', 'a') as f:  # a row logged after the checkpoint, before a crash
        f.write('5,0.08,9.9' + ',' * 23 + '\n')  # all 26 columns
    p = run('train_diffusion.py', *TINY, *objective, *fid, f'--out_dir={tmp_path / "b"}', '--max_steps=6',
            '--init_from=resume')
    assert 'resuming' in p.stdout
    a, b = load_ckpt(tmp_path / 'a'), load_ckpt(tmp_path / 'b')
    assert a['step'] == b['step'] == 6 and a['images_seen'] == b['images_seen'] == 6 * a['config']['batch_size']
    for key in ('model', 'ema'):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), (key, name)
    for sa, sb in zip(a['optimizer']['state'].values(), b['optimizer']['state'].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert all(torch.equal(pa, pb) for ta, tb in zip(a['phema'], b['phema']) for pa, pb in zip(ta, tb))  # post-hoc EMAs
    for step in (2, 4, 6):  # their snapshots, written before and after the resume
        sa, sb = (torch.load(tmp_path / name / 'phema' / f'phema-{step:07d}.pt', weights_only=True)['ema']
                  for name in ('a', 'b'))
        assert all(torch.equal(pa[k], pb[k]) for pa, pb in zip(sa, sb) for k in pa)
    rows = list(csv.DictReader(open(tmp_path / 'b' / 'metrics.csv')))
    assert [int(r['step']) for r in rows] == [2, 3, 4, 6]  # the row after the checkpoint is gone
    rows_a = list(csv.DictReader(open(tmp_path / 'a' / 'metrics.csv')))
    assert [r['loss'] for r in rows if r['step'] == '6'] == [r['loss'] for r in rows_a if r['step'] == '6']
    fids = [[r['fid'] for r in rs if r['step'] in ('3', '6')] for rs in (rows, rows_a)]  # before and after the resume
    assert fids[0] == fids[1] and len(fids[0]) == 2 and all(fids[0]), fids
    best_a, best_b = (load_ckpt(tmp_path / name, 'best.pt') for name in 'ab')
    assert all(torch.equal(best_a['ema'][k], best_b['ema'][k]) for k in best_a['ema'])
    run('train_diffusion.py', *TINY, *objective, f'--out_dir={tmp_path / "b"}', '--max_steps=9', '--lr=0.1',
        '--lr_schedule=constant')
    rows = [r for r in csv.DictReader(open(tmp_path / 'b' / 'metrics.csv')) if r['val_loss_ema']]
    losses = {int(r['step']): float(r['val_loss_ema']) for r in rows}
    best = load_ckpt(tmp_path / 'b', 'best.pt')
    assert losses[9] > losses[6] and best['step'] == min(losses, key=losses.get) == 6, losses
    assert best['best_val_loss'] == pytest.approx(losses[6], abs=1e-5) and load_ckpt(tmp_path / 'b')['step'] == 9
    p = run('sample.py', f'--out_dir={tmp_path / "b"}', '--ckpt=best', '--num_samples=2', '--steps=2', '--sampler=heun')
    assert f"sampling 2 images from {tmp_path / 'b' / 'best.pt'} (step 6, EMA weights)" in p.stdout, p.stdout
    p = run('sample.py', f'--out_dir={tmp_path / "b"}', '--ckpt=ckpt_0000007', check=False)
    assert p.stderr.strip().endswith("ckpt_0000007.pt not found; " + str(tmp_path / 'b') + " holds best.pt, ckpt.pt: "
                                     "pass --ckpt=<one of them>"), p.stderr


@pytest.mark.slow
def test_two_ranks_match_one(mnist, fid_args, tmp_path):
    """torchrun with 2 gloo ranks of batch B == 1 process with batch 2B == 1 process, 2 micro-steps of B: every logged
    value at every step to float rounding (FROZEN's lr: conftest.py), the FID during training too, each rank sampling
    its share with ddpm's fresh noise, drawn per image. One rank's half of the batch alone, as a rank without the
    all-reduce would train, does not pass."""
    common = [*TINY, '--max_steps=3', '--log_interval=1', '--batch_size=16', '--class_balance=0.5',  # (the same
              *fid_args, '--fid_interval=3', '--sampler=ddpm', *FROZEN]  # weighted draws on every rank)
    one_thread = {'OMP_NUM_THREADS': '1'}  # 2 ranks on 2 cores: no thread count that changes under load
    run('torchrun', '--standalone', '--nproc_per_node=2', 'train_diffusion.py', *common, f'--out_dir={tmp_path / "ddp"}',
        env=one_thread)
    run('train_diffusion.py', *common, f'--out_dir={tmp_path / "one"}', env=one_thread)
    run('train_diffusion.py', *common, f'--out_dir={tmp_path / "accum"}', '--grad_accum=2', env=one_thread)
    for other in ('ddp', 'accum'):
        assert len(load_ckpt(tmp_path / other)['rng']) == (2 if other == 'ddp' else 1)
        assert_same_steps(tmp_path / 'one', tmp_path / other)
    fids = [r['fid'] for r in csv.DictReader(open(tmp_path / 'one' / 'metrics.csv'))]
    assert fids == ['', '', fids[-1]] and float(fids[-1]) > 0
    run('train_diffusion.py', *common, '--batch_size=8', f'--out_dir={tmp_path / "half"}', env=one_thread)
    with pytest.raises(AssertionError):
        assert_same_steps(tmp_path / 'half', tmp_path / 'ddp')


def test_sampling_diverged_weights_stops_with_one_line(mnist, tmp_path):
    """EMA weights that blew up (finite, 1e30 times their size) give non-finite samples: sample.py stops in one line
    naming the checkpoint, and writes no image (black ones would pass for samples)."""
    out = tmp_path / 'run'
    run('train_diffusion.py', *TINY, f'--out_dir={out}', '--max_steps=1')
    ckpt = load_ckpt(out)
    ckpt['ema'] = {k: v * 1e30 if v.is_floating_point() else v for k, v in ckpt['ema'].items()}
    ckpt['checksum'] = checksum({k: v for k, v in ckpt.items() if k != 'checksum'})
    torch.save(ckpt, out / 'ckpt.pt')
    p = run('sample.py', f'--out_dir={out}', '--num_samples=4', '--steps=2', check=False)
    assert p.returncode == 1 and 'Traceback' not in p.stderr, p.stderr[-2000:]
    assert p.stderr.strip().splitlines()[-1].startswith(f"error: {out / 'ckpt.pt'}'s samples are not finite"), p.stderr
    assert not os.path.exists(out / 'samples.png')


@pytest.mark.slow
def test_sampling_is_the_same_on_two_ranks(mnist, tmp_path):
    out = tmp_path / 'run'
    run('train_diffusion.py', *TINY, f'--out_dir={out}', '--max_steps=2')
    run('sample.py', f'--out_dir={out}', '--num_samples=10', '--steps=3', '--batch_size=4', '--save_npz=True',
        '--class_labels=3,7', '--save_png=True')
    one = dict(np.load(out / 'samples.npz'))
    assert (one['arr_1'] == [3, 7] * 5).all() and len(glob.glob(str(out / 'samples' / '*.png'))) == 10
    run('sample.py', f'--out_dir={out}', '--num_samples=3', '--steps=1', '--save_png=True')  # a smaller call after
    assert sorted(os.listdir(out / 'samples')) == ['000000.png', '000001.png', '000002.png']  # its images only
    assert not glob.glob(str(out / 'samples.*-*'))
    run('torchrun', '--standalone', '--nproc_per_node=2', 'sample.py', f'--out_dir={out}', '--num_samples=10',
        '--steps=3', '--batch_size=3', '--save_npz=True', '--class_labels=3,7')
    two = dict(np.load(out / 'samples.npz'))
    assert one['arr_0'].shape == two['arr_0'].shape == (10, 28, 28, 1)
    assert np.abs(one['arr_0'].astype(int) - two['arr_0']).max() <= 1  # float reassociation may flip a rounding
    assert (one['arr_1'] == two['arr_1']).all()
    # a guidance interval and unclipped x0 change the images; a bad sampler or a shift off the flow schedule stop
    run('sample.py', f'--out_dir={out}', '--num_samples=10', '--steps=3', '--save_npz=True', '--class_labels=3,7',
        '--cfg_sigma_min=0.5', '--cfg_sigma_max=20', '--clip_x0=False')
    assert not np.array_equal(np.load(out / 'samples.npz')['arr_0'], one['arr_0'])
    # autoguidance: a model guided by itself samples as unguided; the guide is recorded; a guide of another
    # prediction type, and guide_scale without a guide, stop
    same = [f'--out_dir={out}', '--num_samples=10', '--steps=3', '--save_npz=True', '--class_labels=3,7']
    run('sample.py', *same, '--cfg_scale=1')
    unguided = np.load(out / 'samples.npz')['arr_0']
    run('sample.py', *same, f'--guide={out}', '--guide_scale=3')
    assert np.array_equal(np.load(out / 'samples.npz')['arr_0'], unguided)
    assert json.load(open(out / 'samples.json'))['checkpoint']['guide']['path'] == str(out / 'ckpt.pt')
    run('train_diffusion.py', *TINY, f'--out_dir={tmp_path / "eps"}', '--max_steps=1', '--prediction_type=v')
    for args, message in [(['--sampler=dpm'], "sampler='dpm' is not one of ddpm, ddim, euler, heun"),
                          (['--shift=2'], "shift=2.0 applies to the flow schedule only; this run used 'linear'"),
                          ([f'--guide={tmp_path / "eps"}'], f"guide={tmp_path / 'eps'} is not a model of this one's "
                           "task: its prediction_type='v' (the model's: 'eps')"),
                          (['--guide_scale=3'], "guide_scale is set, but guide='': the guidance is classifier-free")]:
        p = run('sample.py', f'--out_dir={out}', *args, check=False)
        assert p.returncode != 0 and p.stderr.strip().splitlines()[-1].startswith(f'error: {message}'), p.stderr[-1000:]


def test_wandb_offline_run_and_no_import_when_off(mnist, tmp_path, monkeypatch):
    pytest.importorskip('wandb')
    run('train_diffusion.py', *TINY, f'--out_dir={tmp_path / "w"}', '--max_steps=3', '--wandb_log=True',
        env={'WANDB_MODE': 'offline', 'WANDB_SILENT': 'true',
             'WANDB_PROJECT': 'kit-test', 'WANDB_NAME': 'tiny'})
    runs = glob.glob(str(tmp_path / 'w' / 'wandb' / 'offline-run-*' / 'run-*.wandb'))
    assert len(runs) == 1, os.listdir(tmp_path / 'w')
    assert load_ckpt(tmp_path / 'w')['wandb_id'] in runs[0]  # saved, so a resume continues the same run
    records = open(runs[0], 'rb').read()  # protobuf records: the logged keys appear as their UTF-8 names
    for key in ('kimg', 'loss', 'loss_unweighted', 'lr', 'grad_norm', 'ms_per_step', 'img_per_s', 'tflops',
                'val_loss', 'val_loss_ema'):
        assert key.encode() in records, key

    # logging off: wandb is never imported (the script runs in this process to see sys.modules)
    sys.modules.pop('wandb', None)
    monkeypatch.chdir(REPO)
    monkeypatch.setattr(sys, 'argv', ['train_diffusion.py', *TINY, f'--out_dir={tmp_path / "n"}', '--max_steps=1'])
    runpy.run_path(os.path.join(REPO, 'train_diffusion.py'), run_name='__main__')
    assert 'wandb' not in sys.modules


def test_the_other_switches_run(mnist, tmp_path):
    """Unconditional, plain MSE, mode sampling, sparse EMA, DDPM grids, no clipping, constant LR, flips, weight decay..."""
    out = tmp_path / 'u'
    run('train_diffusion.py', *TINY, f'--out_dir={out}', '--max_steps=2', '--class_cond=False', '--schedule=linear',
        '--num_timesteps=500', '--loss_weighting=uniform', '--timestep_sampling=mode', '--mode_scale=1.0',
        '--ema_update_every=2', '--sampler=ddpm', '--grad_clip=0', '--lr_schedule=constant', '--hflip=True',
        '--weight_decay=0.01', '--beta1=0.95', '--beta2=0.99', '--peak_tflops=1.0', '--class_dropout=0.2',
        '--activation_checkpointing=True', '--seed=1')
    row = next(csv.DictReader(open(out / 'metrics.csv')))
    assert float(row['mfu']) == pytest.approx(float(row['tflops']), rel=1e-3)  # a 1 TFLOP/s peak
    assert float(row['loss']) == pytest.approx(float(row['loss_unweighted']), rel=1e-5)  # no weighting
    ckpt = load_ckpt(out)
    assert ckpt['model_args']['num_classes'] == 0 and ckpt['config']['num_timesteps'] == 500
    run('sample.py', f'--out_dir={out}', '--num_samples=4', '--steps=2', '--save_npz=True', '--use_ema=False', '--eta=1.0')
    samples = np.load(out / 'samples.npz')
    assert samples['arr_0'].shape == (4, 28, 28, 1) and 'arr_1' not in samples.files


@pytest.mark.slow
@pytest.mark.parametrize('dtype', ['bfloat16', 'float16'])
def test_mixed_precision_runs(mnist, tmp_path, dtype):
    """Autocast in bf16, and fp16 with its GradScaler (checkpointed), on CPU: finite losses, a resumable run."""
    run('train_diffusion.py', *TINY, f'--out_dir={tmp_path}', '--max_steps=2', f'--dtype={dtype}')
    p = run('train_diffusion.py', *TINY, f'--out_dir={tmp_path}', '--max_steps=3', f'--dtype={dtype}', '--init_from=resume')
    losses = [float(r['loss']) for r in csv.DictReader(open(tmp_path / 'metrics.csv')) if r['loss']]
    assert len(losses) == 2 and all(np.isfinite(losses)), p.stdout
    assert bool(load_ckpt(tmp_path)['scaler']) == (dtype == 'float16')
