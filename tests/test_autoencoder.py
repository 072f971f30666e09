"""train_ae.py, the autoencoder in model.py, the latents data/prepare_latents.py encodes with it, and latent
diffusion on them."""
import csv
import glob
import json
import os
from dataclasses import asdict

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import FROZEN, MNIST, assert_same_steps, run, script_functions
from model import AE_PRESETS, LPIPS, Autoencoder, AEConfig, DINOv2, PatchDiscriminator, ViTConfig, create_model

TINY = ['config/mnist_ae.py', '--batch_size=8', '--log_interval=2', '--eval_interval=2', '--eval_images=16',
        '--ckpt_interval=1000', '--warmup_steps=2', '--disc_start=1', '--adv_start=2']


def load(path):
    return torch.load(path, map_location='cpu', weights_only=True)


@pytest.fixture
def digits(mnist, tmp_path):
    """The first 50 training and 17 val digits of data/mnist as a dataset of their own, quick to encode (odd
    counts: two ranks' shares and the batches in them are uneven)."""
    folder = tmp_path / 'digits'
    folder.mkdir()
    for split, n in (('train', 50), ('val', 17)):
        for kind in 'xy':
            np.save(folder / f'{split}_{kind}.npy', np.load(os.path.join(MNIST, f'{split}_{kind}.npy'))[:n])
    with open(folder / 'meta.json', 'w') as f:
        json.dump({**mnist, 'num_train': 50, 'num_val': 17}, f)
    return folder


def untrained_autoencoder(folder, image_size=28):
    """An out_dir whose best.pt holds an untrained AE-S/f4: enough for prepare_latents.py's checks."""
    folder.mkdir()
    ae = create_model('AE-S/f4', image_size=image_size, in_channels=1)
    torch.save({'model_args': asdict(ae.config), 'ema': ae.state_dict(), 'step': 0, 'kind': 'autoencoder'},
               folder / 'best.pt')
    return folder


def test_presets_downsample_by_f_and_kl_f8_has_ldms_size():
    """AE-B/f8 is LDM's kl-f8, the Stable Diffusion VAE: its 83,653,863 parameters (tests/test_pretrained.py
    checks their names and shapes against the released files')."""
    assert sum(p.numel() for p in create_model('AE-B/f8', image_size=32).parameters()) == 83_653_863
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    for f in (4, 8, 16):
        ae = create_model(f'AE-S/f{f}', image_size=32, z_channels=3)
        mean, logvar = ae.encode(x)
        assert mean.shape == logvar.shape == (2, 3, 32 // f, 32 // f)
        assert ae.decode(mean).shape == x.shape
        xrec, m, _, _ = ae(x, torch.zeros_like(mean))  # zero noise: z is the mean
        assert torch.allclose(xrec, ae.decode(mean), atol=1e-6)
    plain = create_model('AE-S/f4', image_size=32, kl=False)
    assert plain.encode(x)[1] is None and plain.encode(x)[0].shape == (2, 4, 8, 8)
    with pytest.raises(ValueError, match='not divisible by the downsampling factor 16'):
        create_model('AE-S/f16', image_size=28)
    assert set(AE_PRESETS) == {f'AE-{s}/f{f}' for s in 'SB' for f in (4, 8, 16)}


def test_ssim_matches_its_closed_forms():
    """SSIM(x, x) = 1; constant images a, b: (2ab + c1) / (a^2 + b^2 + c1); an 11 x 11 image (one window): the
    Gaussian-weighted means, variances and covariance of the formula, computed here in float64."""
    ssim, = script_functions('train_ae.py', 'ssim', torch=torch, F=F)
    torch.manual_seed(0)
    x = torch.rand(3, 2, 20, 20) * 2 - 1
    assert torch.allclose(ssim(x, x), torch.ones(3), atol=1e-5)
    a, b = 0.02, 0.05  # on [0, 1]; dark, so that c1 matters (0.700 with it, 0.690 without)
    got = ssim(torch.full((1, 1, 16, 16), 2 * a - 1), torch.full((1, 1, 16, 16), 2 * b - 1))
    assert torch.allclose(got, torch.tensor([(2 * a * b + 1e-4) / (a * a + b * b + 1e-4)]), atol=1e-5)
    u, v = torch.rand(2, 1, 1, 11, 11, dtype=torch.float64)
    g = torch.exp(-(torch.arange(11) - 5.0) ** 2 / 4.5).double()
    w = torch.outer(g, g) / g.sum() ** 2
    mu, mv = (w * u).sum(), (w * v).sum()
    var_u, var_v, cov = (w * u * u).sum() - mu ** 2, (w * v * v).sum() - mv ** 2, (w * u * v).sum() - mu * mv
    want = (2 * mu * mv + 1e-4) * (2 * cov + 9e-4) / ((mu ** 2 + mv ** 2 + 1e-4) * (var_u + var_v + 9e-4))
    assert abs(ssim(u.float() * 2 - 1, v.float() * 2 - 1).item() - want.item()) < 1e-5


def test_lpips_reads_the_two_local_weight_files(tmp_path):
    """LPIPS loads torchvision's VGG16 key layout and the lpips package's heads (files made here with random
    weights: nothing is downloaded); the distance is 0 for equal images, symmetric, and positive otherwise."""
    torch.manual_seed(0)
    ref = LPIPS()
    vgg = {f'features.{k}': torch.randn_like(v) * 0.05 for k, v in ref.features.state_dict().items()}
    vgg['classifier.0.weight'] = torch.zeros(2, 2)  # torchvision's file has the classifier too: ignored
    torch.save(vgg, tmp_path / 'vgg16.pth')
    torch.save({f'lin{i}.model.1.weight': torch.rand(1, c, 1, 1) for i, c in enumerate((64, 128, 256, 512, 512))},
               tmp_path / 'vgg.pth')
    lpips = LPIPS().load(tmp_path / 'vgg16.pth', tmp_path / 'vgg.pth')
    assert torch.equal(lpips.features[28].weight, vgg['features.28.weight'])
    x, y = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.equal(lpips(x, x), torch.zeros(2))
    assert torch.allclose(lpips(x, y), lpips(y, x)) and (lpips(x, y) > 0).all()
    assert lpips(x[:, :1], y[:, :1]).shape == (2,)  # grey images are repeated to three channels
    torch.save({'features.0.weight': torch.zeros(3)}, tmp_path / 'wrong.pth')
    with pytest.raises(ValueError, match="not torchvision's VGG16"):
        LPIPS().load(tmp_path / 'wrong.pth', tmp_path / 'vgg.pth')


@pytest.mark.slow
def test_the_other_switches_run(digits, tmp_path):
    """A plain autoencoder (kl_weight=0) without middle attention, trained on L2 + SSIM + LPIPS (weight files made
    here) with flips, gradient accumulation and keep_last; the SSIM and LPIPS terms add to the logged loss; then
    encoded from ckpt.pt."""
    lpips = LPIPS()
    torch.save({f'features.{k}': torch.randn_like(v) * 0.05 for k, v in lpips.features.state_dict().items()},
               tmp_path / 'vgg16.pth')
    torch.save({f'lin{i}.model.1.weight': torch.rand(1, c, 1, 1) for i, c in enumerate((64, 128, 256, 512, 512))},
               tmp_path / 'vgg.pth')
    out = tmp_path / 'out'
    run('train_ae.py', *TINY, f'--out_dir={out}', '--max_steps=4', '--kl_weight=0', '--mid_attention=False',
        '--rec_loss=l2', '--ssim_weight=0.5', '--lpips_weight=0.5', f'--lpips_vgg={tmp_path / "vgg16.pth"}',
        f'--lpips_lin={tmp_path / "vgg.pth"}', '--hflip=True', '--grad_accum=2', '--keep_last=2', '--ckpt_interval=1',
        '--disc_weight=0')
    ckpt = load(out / 'ckpt.pt')
    assert not ckpt['model_args']['kl'] and not ckpt['model_args']['mid_attention']
    assert sorted(f for f in os.listdir(out) if f.startswith('ckpt_')) == ['ckpt_0000003.pt', 'ckpt_0000004.pt']
    rows = [r for r in csv.DictReader(open(out / 'metrics.csv')) if r['loss']]
    assert all(float(r['loss']) > float(r['rec']) and float(r['kl']) == 0 for r in rows)
    run('data/prepare_latents.py', f'--autoencoder={out}', f'--dataset={digits}', '--weights=ckpt',
        f'--latents={tmp_path / "latents"}')
    assert np.load(tmp_path / 'latents' / 'val_x.npy').shape == (17, 7, 7, 4)
    assert load(tmp_path / 'latents' / 'autoencoder.pt')['step'] == 4  # ckpt.pt's


@pytest.mark.slow
def test_resume_is_bit_exact_across_the_discriminator_switching_on(mnist, tmp_path):
    """6 steps straight == 1 step, stop, resume to 6, with the discriminator training from step 1 and reaching the
    decoder from step 2: autoencoder, EMA, discriminator and both optimizers identical to the bit; best.pt tracked."""
    run('train_ae.py', *TINY, f'--out_dir={tmp_path / "a"}', '--max_steps=6')
    run('train_ae.py', *TINY, f'--out_dir={tmp_path / "b"}', '--max_steps=6', '--max_minutes=0.001')
    assert load(tmp_path / 'b' / 'ckpt.pt')['step'] == 1
    p = run('train_ae.py', *TINY, f'--out_dir={tmp_path / "b"}', '--max_steps=6')
    assert 'changed since: max_minutes 0.001 -> 0.0' in p.stdout and 'adv' in p.stdout and 'd_loss' in p.stdout
    a, b = load(tmp_path / 'a' / 'ckpt.pt'), load(tmp_path / 'b' / 'ckpt.pt')
    assert a['step'] == b['step'] == 6
    for key in ('model', 'ema', 'disc'):
        assert all(torch.equal(w, b[key][name]) for name, w in a[key].items()), key
    for key in ('optimizer', 'd_optimizer'):
        for sa, sb in zip(a[key]['state'].values(), b[key]['state'].values()):
            assert all(torch.equal(sa[k], sb[k]) for k in sa), key
    assert a['best_psnr'] == b['best_psnr'] == load(tmp_path / 'b' / 'best.pt')['best_psnr'] > 5
    rows = [r for r in csv.DictReader(open(tmp_path / 'b' / 'metrics.csv')) if r['val_psnr_ema']]
    assert [r['step'] for r in rows] == ['2', '4', '6']
    assert os.path.exists(tmp_path / 'b' / 'recon_0000006.png')


@pytest.mark.slow
def test_two_ranks_match_one_process(digits, tmp_path):
    """torchrun with 2 gloo ranks == 1 process, with the discriminator and both heads on: every logged value at every
    step (the adaptive weight is computed from the gradients of the whole micro-step, averaged over ranks), both
    gradient norms and the validation (the heads' accuracy and IoU too: sums over ranks), to float rounding (FROZEN's
    lr: conftest.py). One rank's half of the batch alone, as a rank without the all-reduce would train, does not
    pass."""
    for split in ('train', 'val'):  # label maps: the digits' ink
        np.save(digits / f'{split}_mask.npy', (np.load(digits / f'{split}_x.npy')[..., 0] > 127).astype(np.uint8))
    meta = json.loads((digits / 'meta.json').read_text())
    (digits / 'meta.json').write_text(json.dumps({**meta, 'mask_classes': 2, 'mask_ignore': None}))
    common = [*TINY, '--max_steps=4', '--log_interval=1', '--disc_start=0', '--adv_start=1', f'--dataset={digits}',
              '--cls_weight=0.1', '--seg_weight=1', *FROZEN]
    one_thread = {'OMP_NUM_THREADS': '1'}
    run('torchrun', '--standalone', '--nproc_per_node=2', 'train_ae.py', *common, f'--out_dir={tmp_path / "ddp"}',
        env=one_thread)
    run('train_ae.py', *common, f'--out_dir={tmp_path / "one"}', env=one_thread)
    a = list(csv.DictReader(open(tmp_path / 'one' / 'metrics.csv')))
    assert len(a) == 4 and float(a[-2]['adv_weight']) > 0  # (a validation shares its step's row)
    assert a[-1]['val_miou_ema'] and a[-1]['val_iou_1_ema'] and a[-1]['val_cls_acc'] and a[-1]['seg_loss']
    assert_same_steps(tmp_path / 'one', tmp_path / 'ddp')
    run('train_ae.py', *common, '--batch_size=4', f'--out_dir={tmp_path / "half"}', env=one_thread)
    with pytest.raises(AssertionError):
        assert_same_steps(tmp_path / 'half', tmp_path / 'ddp')


def test_early_stopping_keeps_the_best_and_stays_stopped(mnist, tmp_path):
    """With an lr too small to change a float32 weight, the validation PSNR repeats exactly: the first validation is
    the best, two more without improvement stop the run (patience=2), and re-running does nothing."""
    args = [*TINY, f'--out_dir={tmp_path}', '--max_steps=20', '--eval_interval=1', '--patience=2', '--lr=1e-30',
            '--lr_schedule=constant', '--disc_weight=0']
    p = run('train_ae.py', *args)
    assert 'stopped early at step 3: 2 validations without a better PSNR' in p.stdout
    assert load(tmp_path / 'ckpt.pt')['step'] == 3 and load(tmp_path / 'best.pt')['step'] == 1
    before = open(tmp_path / 'ckpt.pt', 'rb').read()
    p = run('train_ae.py', *args)
    assert 'stopped early at step 3' in p.stdout and 'nothing to do' in p.stdout
    assert open(tmp_path / 'ckpt.pt', 'rb').read() == before


def test_seed_optimizer_clipping_ema_and_discriminator_keys_take_effect(mnist, tmp_path):
    """One step with the gradient norm clipped to 1e-12 (far below Adam's eps: the step moves nothing) leaves
    seed 1's initial weights, the 2-D ones decayed by lr * weight_decay; both optimizers keep the betas;
    ema_decay=0 makes the EMA the weights; disc_channels sizes the discriminator. A resume with another
    discriminator, or none, is refused with one line that names the difference; one with other betas applies
    them."""
    out = tmp_path / 'out'
    args = [*TINY, f'--out_dir={out}', '--seed=1', '--grad_clip=1e-12', '--weight_decay=0.1', '--beta1=0.8',
            '--beta2=0.95', '--ema_decay=0', '--disc_channels=32']
    run('train_ae.py', *args, '--max_steps=1')
    ckpt = load(out / 'ckpt.pt')
    torch.manual_seed(1)
    init = create_model('AE-S/f4', image_size=28, in_channels=1).state_dict()
    torch.manual_seed(0)
    seed0 = create_model('AE-S/f4', image_size=28, in_channels=1).state_dict()
    decay = 1 - 1e-3 / 2 * 0.1  # config/mnist_ae.py's lr at the first of TINY's 2 warm-up steps
    for name, w in ckpt['model'].items():
        want = init[name] * decay if w.dim() >= 2 else init[name]
        assert torch.allclose(w, want, rtol=0, atol=1e-7), name
        assert torch.equal(ckpt['ema'][name], w), name
    assert not torch.allclose(ckpt['model']['encoder.0.weight'], init['encoder.0.weight'], rtol=0, atol=1e-6)
    assert not torch.allclose(ckpt['model']['encoder.0.weight'], seed0['encoder.0.weight'], atol=1e-3)
    for key in ('optimizer', 'd_optimizer'):
        groups = ckpt[key]['param_groups']
        assert [(g['betas'], g['weight_decay']) for g in groups] == [((0.8, 0.95), 0.1), ((0.8, 0.95), 0)]
    small, default = (sum(p.numel() for p in PatchDiscriminator(1, n, 2).parameters()) for n in (32, 64))
    assert sum(w.numel() for w in ckpt['disc'].values()) == small < default
    for change, diff in [('--disc_channels=64', "{'channels': (32, 64)}"),
                         ('--disc_weight=0', "({'channels': 32, 'num_layers': 2}, None)")]:
        p = run('train_ae.py', *args, '--max_steps=2', change, check=False)
        assert p.returncode == 1 and p.stderr.strip().splitlines()[-1] == (
            f"error: {out / 'ckpt.pt'} holds another disc_args (checkpoint vs config: {diff}); resume with the "
            f"config it was trained with, or choose another out_dir")
    assert load(out / 'ckpt.pt')['step'] == 1
    p = run('train_ae.py', *args, '--max_steps=2', '--beta1=0.7')  # a resume applies this run's betas
    assert 'changed since: max_steps 1 -> 2, beta1 0.8 -> 0.7' in p.stdout
    assert all(g['betas'] == (0.7, 0.95) for key in ('optimizer', 'd_optimizer')
               for g in load(out / 'ckpt.pt')[key]['param_groups'])


def test_nonfinite_updates_are_skipped_and_max_nonfinite_in_a_row_stop_the_run(mnist, tmp_path):
    """The first weight turns NaN in training forward 2 (tests/faults.py): from then on each update is skipped
    and counted (the weight stays NaN), and the second in a row (max_nonfinite=2) stops the run before a
    checkpoint of NaN weights, the last one intact."""
    p = run('tests/faults.py', 'train_ae.py', *TINY, f'--out_dir={tmp_path}', '--max_steps=8', '--log_interval=1',
            '--ckpt_interval=2', '--max_nonfinite=2', '--disc_weight=0', env={'FAULT_NAN_WEIGHTS': '2'},
            check=False)
    assert p.returncode == 1 and p.stderr.strip().splitlines()[-1] == (
        f"error: 2 updates in a row had a non-finite gradient norm and were skipped (max_nonfinite=2) by step 4; "
        f"{tmp_path / 'ckpt.pt'} (step 2) is intact: resume it with a lower lr, grad_clip or dtype='float32'")
    rows = [r for r in csv.DictReader(open(tmp_path / 'metrics.csv')) if r['loss']]
    assert [(r['step'], r['skipped'], r['loss'] == 'nan') for r in rows] == [('1', '0', False), ('2', '0', False),
                                                                            ('3', '1', True)]
    ckpt = load(tmp_path / 'ckpt.pt')
    assert ckpt['step'] == 2 and all(w.isfinite().all() for w in ckpt['model'].values())


def test_wandb_offline_run(mnist, tmp_path):
    pytest.importorskip('wandb')
    run('train_ae.py', *TINY, f'--out_dir={tmp_path}', '--max_steps=2', '--disc_weight=0', '--wandb_log=True',
        env={'WANDB_MODE': 'offline', 'WANDB_SILENT': 'true',
             'WANDB_PROJECT': 'kit-test-ae', 'WANDB_NAME': 'tiny-ae'})
    runs = glob.glob(str(tmp_path / 'wandb' / 'offline-run-*' / 'run-*.wandb'))
    assert len(runs) == 1 and load(tmp_path / 'ckpt.pt')['wandb_id'] in runs[0]
    records = open(runs[0], 'rb').read()  # protobuf records: names appear as their UTF-8 bytes
    for name in ('kit-test-ae', 'tiny-ae', 'rec', 'val_psnr_ema', 'peak_mem_gib'):
        assert name.encode() in records, name


@pytest.mark.slow
def test_prepare_latents_on_two_ranks_then_train_and_sample_latent_diffusion(digits, weights, tmp_path):
    """data/prepare_latents.py under torchrun (each rank its rows of one file) == one process; the flip file holds
    the latents of the mirror images; train_diffusion.py trains on the latents, its FID during training decodes them
    and compares with the image dataset they encode, and sample.py decodes them through autoencoder.pt; without
    flips, hflip=True is refused with the command that encodes them."""
    out = tmp_path / 'ae'
    run('train_ae.py', *TINY, f'--out_dir={out}', '--max_steps=2', '--disc_weight=0')
    one, two = tmp_path / 'lat1', tmp_path / 'lat2'
    common = [f'--autoencoder={out}', f'--dataset={digits}', '--batch_size=16']
    run('data/prepare_latents.py', *common, f'--latents={one}', '--flips')
    run('torchrun', '--standalone', '--nproc_per_node=2', 'data/prepare_latents.py', *common, f'--latents={two}',
        env={'OMP_NUM_THREADS': '1'})
    meta1, meta2 = (json.load(open(d / 'meta.json')) for d in (one, two))
    assert meta1['image_size'] == 7 and meta1['channels'] == 4 and meta1['num_train'] == 50
    assert meta1['latent']['flips'] and not meta2['latent']['flips'] and meta1['latent']['dataset'] == str(digits)
    assert (meta1['latent']['image_size'], meta1['latent']['channels']) == (28, 1)
    for split in ('train', 'val'):
        z1, z2 = np.load(one / f'{split}_x.npy'), np.load(two / f'{split}_x.npy')
        assert z1.dtype == np.float16 and z1.shape == (meta1[f'num_{split}'], 7, 7, 4)
        # float16, of sums in other orders
        assert np.abs(z1.astype(np.float32) - z2.astype(np.float32)).max() < 2e-3
        assert np.array_equal(np.load(one / f'{split}_y.npy'), np.load(digits / f'{split}_y.npy'))
    assert np.allclose(meta1['latent']['mean'], meta2['latent']['mean'], atol=1e-5)
    assert np.allclose(meta1['latent']['std'], meta2['latent']['std'], atol=1e-5)
    z = np.load(one / 'train_x.npy').astype(np.float64).reshape(-1, 4)
    assert np.allclose(meta1['latent']['mean'], z.mean(0), atol=1e-3)
    assert np.allclose(meta1['latent']['std'], z.std(0), atol=1e-3)
    saved = load(one / 'autoencoder.pt')
    assert saved['step'] == load(out / 'best.pt')['step'] and saved['source'] == str(out / 'best.pt')
    ae = Autoencoder(AEConfig(**saved['model_args']))
    ae.load_state_dict(saved['weights'])
    x = torch.from_numpy(np.load(digits / 'train_x.npy')[:4]).permute(0, 3, 1, 2) / 127.5 - 1
    with torch.no_grad():
        flipped = ae.encode(x.flip(3))[0].permute(0, 2, 3, 1).numpy()
    assert np.abs(np.load(one / 'train_x_flip.npy')[:4] - flipped).max() < 2e-2  # float16 of values ~ 3

    dit = ['--arch=DiT-N/1', '--batch_size=8', '--max_steps=2', '--eval_interval=2', '--eval_images=16',
           '--sample_interval=2', '--sample_steps=2', '--warmup_steps=1']
    torch.manual_seed(0)  # REPA's encoder (a random stand-in) sees the digits the latents encode
    torch.save(DINOv2(ViTConfig(patch_size=4, dim=32, depth=1, pos_grid=7)).state_dict(), tmp_path / 'encoder.pth')
    run('train_diffusion.py', *dit, f'--dataset={one}', '--hflip=True', f'--out_dir={tmp_path / "ldm"}',
        '--fid_interval=2', '--fid_images=8', f'--fid_inception={weights}', '--repa_weight=0.5',
        f'--repa_encoder={tmp_path / "encoder.pth"}')
    assert float(list(csv.DictReader(open(tmp_path / 'ldm' / 'metrics.csv')))[0]['repa']) > 0
    assert os.path.exists(tmp_path / 'ldm' / 'samples_0000002.png')  # a grid decoded to pixels
    assert np.isfinite(float(list(csv.DictReader(open(tmp_path / 'ldm' / 'metrics.csv')))[-1]['fid']))
    assert len(list(digits.glob('fid_ref_50_*.npz'))) == 1  # (the pixels' statistics, cached beside them)
    run('sample.py', f'--out_dir={tmp_path / "ldm"}', '--num_samples=3', '--steps=2', '--save_npz=True')
    images = np.load(tmp_path / 'ldm' / 'samples.npz')['arr_0']
    assert images.shape == (3, 28, 28, 1) and images.dtype == np.uint8
    p = run('train_diffusion.py', *dit, f'--dataset={two}', '--hflip=True', f'--out_dir={tmp_path / "x"}',
            check=False)
    last = p.stderr.strip().splitlines()[-1]
    assert p.returncode == 1 and 'holds no latents of mirror images' in last and 'data/prepare_latents.py' in last
    meta2['latent']['dataset'] = MNIST  # latents that claim to encode other images: REPA's encoder would see others
    json.dump(meta2, open(two / 'meta.json', 'w'))
    p = run('train_diffusion.py', *dit, f'--dataset={two}', '--repa_weight=0.5', f'--repa_encoder={tmp_path / "encoder.pth"}',
            f'--out_dir={tmp_path / "y"}', check=False)
    last = p.stderr.strip().splitlines()[-1]
    assert p.returncode == 1 and "encoder sees the images" in last and 'are others' in last, p.stderr
    assert not (tmp_path / 'y' / 'ckpt.pt').exists()


def test_prepare_latents_replaces_a_latent_dataset_whole(digits, tmp_path):
    """Encoding again into a latent dataset replaces all of it (here the flip file goes, as the new one has
    none), by way of a new folder renamed into place: nothing of it is left beside the target."""
    ae = untrained_autoencoder(tmp_path / 'ae')
    target = tmp_path / 'latents'
    run('data/prepare_latents.py', f'--autoencoder={ae}', f'--dataset={digits}', f'--latents={target}', '--flips')
    first = np.load(target / 'train_x.npy')
    assert os.path.exists(target / 'train_x_flip.npy')
    run('data/prepare_latents.py', f'--autoencoder={ae}', f'--dataset={digits}', f'--latents={target}',
        '--flips=False')
    assert sorted(os.listdir(target)) == ['autoencoder.pt', 'meta.json', 'train_x.npy', 'train_y.npy', 'val_x.npy',
                                          'val_y.npy']
    assert not json.load(open(target / 'meta.json'))['latent']['flips']
    assert np.array_equal(np.load(target / 'train_x.npy'), first)
    assert sorted(os.listdir(tmp_path)) == ['ae', 'digits', 'latents']


BAD_INPUT = [
    ('adv before disc', ['--disc_start=100', '--adv_start=50'], "adv_start=50 must be at least disc_start=100"),
    ('lpips without files', ['--lpips_weight=0.1'], "lpips_vgg='' must be set, with lpips_lin, when lpips_weight > 0"),
    ('lpips wrong files', ['--lpips_weight=0.1', '--lpips_vgg=/nonexistent/vgg16.pth', '--lpips_lin=/nonexistent/vgg.pth'],
     "cannot load the LPIPS weights"),
    ('float16', ['--dtype=float16'], "dtype='float16' is not one of float32, bfloat16"),
    ('f too large', ['--arch=AE-S/f16'], "error: AE-S/f16 on mnist: image_size 28 is not divisible by the downsampling"),
    ('resume without a checkpoint', ['--init_from=resume'], "does not exist; use --init_from=scratch"),
    ('segmentation without masks', ['--seg_weight=1'], "has no label maps"),
]


@pytest.mark.parametrize('case, args, message', BAD_INPUT, ids=[c[0] for c in BAD_INPUT])
def test_bad_input_stops_with_one_clear_line(mnist, tmp_path, case, args, message):
    p = run('train_ae.py', 'config/mnist_ae.py', f'--out_dir={tmp_path / "out"}', *args, check=False)
    assert p.returncode == 1 and message in p.stderr.strip().splitlines()[-1], p.stderr[-2000:]
    assert 'Traceback' not in p.stderr and not os.path.exists(tmp_path / 'out' / 'ckpt.pt')


PREPARE_BAD_INPUT = [
    ('no run', ['--autoencoder={empty}'], "best.pt not found; train the autoencoder first (python train_ae.py "
                                          "--out_dir="),
    ('latents are the images', ['--latents=mnist'], "--latents=mnist is the image dataset itself"),
    ('latents over other files', ['--latents={other}'], "exists and is no latent dataset"),
    ('another image size', ['--autoencoder={ae32}'],
     "encodes 32 px, 1-channel images, but dataset 'mnist' has 28 px"),
    ('not an autoencoder', ['--autoencoder={dit}'], "best.pt is a diffusion checkpoint, which train_diffusion.py "
                                                    "writes; this needs a"),
    ('no autoencoder in it', ['--autoencoder={odd}'], "holds no train_ae.py autoencoder (TypeError"),
    ('latents as images', ['--dataset={latent}'], "holds latents already; encode the image dataset they came from, "
                                                  "--dataset=mnist"),
]


@pytest.mark.parametrize('case, args, message', PREPARE_BAD_INPUT, ids=[c[0] for c in PREPARE_BAD_INPUT])
def test_prepare_latents_bad_input_stops_with_one_clear_line(mnist, tmp_path, case, args, message):
    """Refused before anything is written: the images (and any other folder) stay as they were."""
    folders = dict(empty=tmp_path / 'empty', other=tmp_path / 'other', latent=tmp_path / 'latent',
                   ae=untrained_autoencoder(tmp_path / 'ae'), ae32=untrained_autoencoder(tmp_path / 'ae32', 32),
                   dit=tmp_path / 'dit', odd=tmp_path / 'odd')
    for name in ('empty', 'other', 'latent', 'dit', 'odd'):
        folders[name].mkdir()
    (folders['other'] / 'keep.txt').write_text('mine')
    for name, kind in (('dit', 'diffusion'), ('odd', 'autoencoder')):
        torch.save({'model_args': {'arch': 'DiT-N/4'}, 'ema': {}, 'step': 0, 'kind': kind},
                   folders[name] / 'best.pt')
    for split in ('train', 'val'):
        np.save(folders['latent'] / f'{split}_x.npy', np.zeros((2, 7, 7, 4), np.float16))
        np.save(folders['latent'] / f'{split}_y.npy', np.zeros(2, np.int64))
    with open(folders['latent'] / 'meta.json', 'w') as f:
        json.dump({'image_size': 7, 'channels': 4, 'num_classes': 10, 'latent': {'dataset': 'mnist'}}, f)
    images = {name: open(os.path.join(MNIST, name), 'rb').read() for name in ('meta.json', 'train_x.npy')}
    before = sorted(os.listdir(tmp_path)), sorted(os.listdir(os.path.dirname(MNIST)))
    args = [f'--autoencoder={folders["ae"]}', '--dataset=mnist', f'--latents={tmp_path / "latents"}',
            *(a.format(**folders) for a in args)]
    p = run('data/prepare_latents.py', *args, check=False)
    assert p.returncode == 1 and message in p.stderr.strip().splitlines()[-1], p.stderr[-2000:]
    assert 'Traceback' not in p.stderr
    assert (sorted(os.listdir(tmp_path)), sorted(os.listdir(os.path.dirname(MNIST)))) == before
    assert all(open(os.path.join(MNIST, name), 'rb').read() == data for name, data in images.items())
    assert (folders['other'] / 'keep.txt').read_text() == 'mine'


@pytest.mark.slow
def test_autoencoder_and_latent_diffusion_learn_mnist(latent_run, mnist_classifier):
    """config/mnist_ae.py as typed reaches 24 dB PSNR on the val digits (its EMA weights, the ones that encode);
    data/prepare_latents.py encodes MNIST with them, and config/mnist_ldm.py, rectified flow on those latents,
    then draws samples that decode to the digit asked for: the spine's bar, 80% of 200 (the runs: conftest.SHARED,
    in the background). (This is also the suite's rectified-flow learning test.)"""
    ae, ldm = latent_run / 'ae', latent_run / 'ldm'
    rows = [r for r in csv.DictReader(open(ae / 'metrics.csv')) if r['val_psnr_ema']]
    best = load(ae / 'best.pt')['best_psnr']
    assert best == pytest.approx(max(float(r['val_psnr_ema']) for r in rows), abs=1e-5) and best >= 24
    samples = np.load(ldm / 'samples.npz')
    accuracy = mnist_classifier(samples['arr_0'], samples['arr_1'])
    print(f"latent DiT: {accuracy:.1%} of 200 samples read as their class")
    assert accuracy >= 0.8


def test_heads_losses_and_metrics_match_closed_forms():
    """The class head's loss is the mean of -log softmax at each label; the segmentation head's, the same over the
    pixels that are not the ignore value (0, not NaN, when none is left); per-class IoU is |both| / |either| of a
    confusion matrix, NaN for a class neither holds."""
    head_losses, iou = script_functions('train_ae.py', 'head_losses', 'iou', torch=torch, F=F, ignore=255)
    e = np.exp
    cls = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]])
    seg = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-1.0, 0.0]])[None, :, None, :]  # (1, 3 classes, 1, 2 pixels)
    got = head_losses({'cls': cls, 'seg': seg}, torch.tensor([0, 1]), torch.tensor([[[2, 255]]]))
    want_cls = -(np.log(e(2) / (e(2) + 1 + e(-1))) + np.log(e(0.5) / (2 * e(0.5) + e(3)))) / 2
    assert abs(got['cls_loss'].item() - want_cls) < 1e-6
    assert abs(got['seg_loss'].item() + np.log(e(-1) / (e(1) + 1 + e(-1)))) < 1e-6  # pixel 0 only: label 2
    assert head_losses({'seg': seg}, None, torch.tensor([[[255, 255]]]))['seg_loss'].item() == 0
    assert head_losses({}, None, None) == {}
    per_class = iou(torch.tensor([[3.0, 1, 0], [2, 4, 0], [0, 0, 0]]))
    assert per_class[:2].tolist() == pytest.approx([3 / 6, 4 / 7]) and per_class[2].isnan()


@pytest.mark.slow
def test_class_and_segmentation_heads_learn_digits_from_a_prepared_folder(mnist, tmp_path):
    """200 MNIST digits as PNGs in class folders, each with its label map (ink 1, paper 0, the top row 255 and
    ignored), through data/folder/prepare.py --mask_src; train_ae.py with both heads then finds the val digits' ink
    (mIoU) and reads their class well above chance (10%), logs both, and each class's IoU in metrics.csv."""
    src, masks, data = tmp_path / 'src', tmp_path / 'masks', tmp_path / 'data'
    x, y = np.load(os.path.join(MNIST, 'train_x.npy'))[:200, ..., 0], np.load(os.path.join(MNIST, 'train_y.npy'))[:200]
    for i, (image, label) in enumerate(zip(x, y)):
        for folder in (src / str(label), masks / str(label)):
            folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(src / str(label) / f'{i}.png')
        ink = (image > 127).astype(np.uint8)
        ink[0] = 255
        Image.fromarray(ink).save(masks / str(label) / f'{i}.png')
    run('data/folder/prepare.py', f'--src={src}', f'--mask_src={masks}', '--mask_ignore=255', f'--out_dir={data}',
        '--image_size=28', '--channels=1', '--val_fraction=0.2', '--workers=1')
    run('train_ae.py', 'config/mnist_ae.py', f'--dataset={data}', f'--out_dir={tmp_path / "ae"}', '--disc_weight=0',
        '--batch_size=8', '--cls_weight=0.1', '--seg_weight=1', '--max_steps=150', '--eval_interval=150', '--log_interval=50',
        '--eval_images=40', '--ema_decay=0.9')
    rows = list(csv.DictReader(open(tmp_path / 'ae' / 'metrics.csv')))
    val = rows[-1]
    print({k: v for k, v in val.items() if k.startswith('val_')})
    assert float(val['val_miou']) >= 0.8 and float(val['val_miou_ema']) >= 0.8
    assert float(val['val_cls_acc']) >= 0.6 and float(val['val_cls_acc_ema']) >= 0.6
    assert float(rows[0]['seg_loss']) > float(val['seg_loss']) and float(rows[0]['cls_loss']) > float(val['cls_loss'])
    assert {f'val_iou_{k}_ema' for k in (0, 1)} <= set(val) and 'val_iou_2_ema' not in val
