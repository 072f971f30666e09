"""distill_consistency.py: the denoiser conversion and the consistency parameterisation against closed forms, its
noise-level draws, the teacher's Heun step, exact resume, and one-step digits from the quickstart's model."""
import math
from contextlib import nullcontext
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import run, script_functions
from model import PREDICTIONS, SCHEDULES, Diffusion, bcast

f64 = torch.float64
TARGET = torch.rand(1, 2, 4, 4, generator=torch.Generator().manual_seed(0), dtype=f64) * 1.6 - 0.8


def single_point_model(diffusion):
    """The exact network for data that is one point, TARGET, in any schedule and prediction type (its output is the
    target F = A x0 + B eps with x0 = TARGET)."""
    def net(x_in, c_noise, y):
        t = {'flow': c_noise.double() / 1000, 'edm': (c_noise.double() / 250).exp()}.get(diffusion.schedule, c_noise.double())
        x = x_in * (bcast((t ** 2 + diffusion.sigma_data ** 2).sqrt(), x_in) if diffusion.schedule == 'edm' else 1)
        alpha, sigma, A, B = (bcast(c, x) for c in diffusion.coefficients(t))
        return A * TARGET + B * (x - alpha * TARGET) / sigma
    net.config = SimpleNamespace(num_classes=0)
    return net


@pytest.mark.parametrize('schedule', SCHEDULES)
def test_t_from_sigma_inverts_the_schedule(schedule):
    d = Diffusion(schedule)
    s = torch.logspace(math.log10(0.02), math.log10(80), 50, dtype=f64)  # linear: sigma / alpha >= 0.01
    alpha, sigma = d.alpha_sigma(d.t_from_sigma(s))
    torch.testing.assert_close(sigma / alpha, s, rtol=1e-9, atol=0)


@pytest.mark.parametrize('schedule', SCHEDULES)
@pytest.mark.parametrize('prediction', PREDICTIONS)
def test_denoiser_is_exact_for_every_schedule_and_prediction(schedule, prediction):
    """D(x0 + s z, s) = x0 for the exact single-point network: the variance-exploding view of every teacher (to the
    float32 precision of the time the network is given, which eps prediction amplifies by sigma / alpha)."""
    d = Diffusion(schedule, prediction)
    s = torch.logspace(math.log10(0.02), math.log10(80), 8, dtype=f64)
    x = TARGET + bcast(s, TARGET) * torch.randn(8, 2, 4, 4, dtype=f64, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(d.denoiser(single_point_model(d), x, s, None), TARGET.expand_as(x), rtol=0, atol=2e-5)


def test_consistency_parameterisation():
    """f(x, sigma_min) = x exactly (the boundary condition), f = D as sigma_min -> 0, and the closed form of c_skip and
    c_out (Song et al. 2023) with F read as EDM's preconditioned output."""
    d = Diffusion('cosine', 'v')
    net = single_point_model(d)
    x = torch.randn(5, 2, 4, 4, dtype=f64, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(d.consistency(net, x, torch.full((5,), 0.002, dtype=f64), None, 0.002), x, rtol=0, atol=0)
    s = torch.tensor([0.01, 0.1, 1.0, 10.0, 80.0], dtype=f64)
    D = d.denoiser(net, x, s, None)
    torch.testing.assert_close(d.consistency(net, x, s, None, 1e-12), D, rtol=0, atol=1e-9)
    sd, smin = 0.5, 0.002
    c_skip, c_out = sd ** 2 / ((s - smin) ** 2 + sd ** 2), sd * (s - smin) / (s ** 2 + sd ** 2).sqrt()
    F = (D - bcast(sd ** 2 / (s ** 2 + sd ** 2), x) * x) / bcast(sd * s / (s ** 2 + sd ** 2).sqrt(), x)
    torch.testing.assert_close(d.consistency(net, x, s, None, smin), bcast(c_skip, x) * x + bcast(c_out, x) * F)


def test_consistency_sampling_and_the_teachers_heun_step_on_one_point():
    """With one data point the ODE is linear in sigma, x(s) = x0 + s / hi (x_hi - x0): the script's Heun step is exact,
    and with f = D (sigma_min -> 0) the consistency sampler lands on the point in one step or several."""
    d = Diffusion('linear', 'v')
    net = single_point_model(d)
    heun, = script_functions('distill_consistency.py', 'teacher_heun_step', torch=torch, bcast=bcast,
                             teacher_denoiser=lambda x, s, y: d.denoiser(net, x, s, y))
    hi, lo = torch.tensor([80.0, 5.0, 0.3], dtype=f64), torch.tensor([40.0, 0.2, 0.002], dtype=f64)
    x_hi = TARGET + bcast(hi, TARGET) * torch.randn(3, 2, 4, 4, dtype=f64, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(heun(x_hi, hi, lo, None), TARGET + bcast(lo / hi, TARGET) * (x_hi - TARGET), rtol=0, atol=1e-6)
    z = torch.randn(6, 2, 4, 4, dtype=f64, generator=torch.Generator().manual_seed(4))
    for sigmas in ([80.0], [80.0, 0.8], [80.0, 5.0, 0.5, 0.05]):  # sigma_min -> 0: f is the exact denoiser
        x = d.consistency_sample(net, z, None, sigmas, 1e-9, torch.Generator().manual_seed(5))
        torch.testing.assert_close(x, TARGET.expand_as(x), rtol=0, atol=1e-6)


def draws(mode, step=0, **kw):
    ramp = torch.linspace(0, 1, 18, dtype=f64)
    sigmas = (0.002 ** (1 / 7) + ramp * (80 ** (1 / 7) - 0.002 ** (1 / 7))) ** 7
    cdf = torch.special.erf((sigmas.log() + 1.1) / (math.sqrt(2) * 2.0))
    ns = dict(torch=torch, math=math, mode=mode, batch_size=20000, sigmas=sigmas, p_interval=cdf[1:] - cdf[:-1],
              p_mean=-1.1, p_std=2.0, sigma_min=0.002, sigma_max=80.0, ect_k=8.0, ect_b=1.0, ect_q=2.0, ect_stages=8,
              max_steps=800, **kw)
    sample_sigmas, = script_functions('distill_consistency.py', 'sample_sigmas', **ns)
    return (*sample_sigmas(step, torch.Generator().manual_seed(0)), ns)


def test_noise_level_draws():
    """cd: adjacent grid points, each interval drawn with the mass a log-normal N(-1.1, 2.0) puts on it (iCT), to
    within sampling error (20,000 draws); ect: t log-normal, r / t = 1 - (1 + 8 sigmoid(-t)) / 2^stage, r >= sigma_min."""
    hi, lo, ns = draws('cd')
    n = torch.searchsorted(ns['sigmas'], lo)
    assert torch.equal(ns['sigmas'][n + 1], hi)
    freq = torch.bincount(n, minlength=17).double() / len(n)
    p = ns['p_interval'] / ns['p_interval'].sum()
    assert (freq - p).abs().max() < 4 * (p * (1 - p) / len(n)).sqrt().max(), (freq, p)
    for stage in (0, 3, 7):
        t, r, _ = draws('ect', step=stage * 100)
        want = (t * (1 - (1 + 8 * torch.sigmoid(-t)) / 2 ** stage)).clamp(min=0.002)
        torch.testing.assert_close(r, want)
        assert (r >= 0.002).all() and (r < t).all()
    assert (draws('ect', step=0)[1] == 0.002).all()  # stage 0: plain denoising, the diffusion model's own task


def test_student_and_target_draw_the_same_dropout_masks():
    """With dropout, the target's forward redraws the student's masks: a student that is its own target (stopgrad) at
    the same input has loss exactly 0, where independent masks would give a large one."""
    net = torch.nn.Dropout(0.5).train()
    namespace = dict(torch=torch, math=math, bcast=bcast, mode='ect', model=net, target_net=net, sigma_min=0.002,
                     loss_type='pseudo_huber', huber_c=0.00054 * 16, device='cpu', device_type='cpu', ctx=nullcontext(),
                     diffusion=SimpleNamespace(consistency=lambda net, x, s, y, sigma_min: net(x)))
    loss, = script_functions('distill_consistency.py', 'consistency_loss', **namespace)
    x0, z, hi, lo = torch.ones(4, 1, 16, 16), torch.zeros(4, 1, 16, 16), torch.full((4,), 2.0), torch.full((4,), 1.0)
    assert torch.equal(loss(x0, None, z, hi, lo), torch.zeros(4))  # x_hi = x_lo = x0: only the masks could differ
    assert (net(x0) - net(x0)).abs().sum() > 0  # (dropout does draw new masks each call)


TINY_TEACHER = ['--arch=DiT-N/4', '--batch_size=8', '--max_steps=2', '--eval_images=16', '--sample_steps=2']
TINY = ['--batch_size=8', '--log_interval=1', '--sample_interval=4', '--ckpt_interval=1000', '--num_scales=6']


@pytest.mark.parametrize('mode', [['--mode=cd', '--cfg_scale=2.0', '--target=ema'], ['--mode=ect']], ids=['cd', 'ect'])
def test_resume_is_bit_exact(mnist, tmp_path, mode):
    """6 steps straight == 3, stop, resume to 6: student, EMA, target and optimizer identical to the bit; then sample.py
    draws from the result in one step and in two."""
    run('train_diffusion.py', *TINY_TEACHER, f'--out_dir={tmp_path / "teacher"}')
    common = [*TINY, *mode, f'--teacher={tmp_path / "teacher"}', '--max_steps=6']
    run('distill_consistency.py', *common, f'--out_dir={tmp_path / "a"}')
    run('distill_consistency.py', *common, f'--out_dir={tmp_path / "b"}', '--max_minutes=0.001')  # stops after a step
    p = run('distill_consistency.py', *common, f'--out_dir={tmp_path / "b"}')
    assert 'resuming' in p.stdout
    a, b = (torch.load(tmp_path / d / 'ckpt.pt', weights_only=True) for d in 'ab')
    assert a['step'] == b['step'] == 6
    for key in ('model', 'ema', *(['target'] if 'ema' in str(mode) else [])):
        assert all(torch.equal(w, b[key][name]) for name, w in a[key].items()), key
    for sa, sb in zip(a['optimizer']['state'].values(), b['optimizer']['state'].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    for sigmas in ('', '80,0.8'):
        run('sample.py', f'--out_dir={tmp_path / "b"}', '--num_samples=4', '--save_npz=True', f'--sigmas={sigmas}')
        assert np.load(tmp_path / 'b' / 'samples.npz')['arr_0'].shape == (4, 28, 28, 1)
    for script, args, message in [
            ('sample.py', ['--sigmas=0.8,80'], "sigmas='0.8,80' must be decreasing sigmas above sigma_min=0.002"),
            ('distill_consistency.py', [f'--teacher={tmp_path / "b"}', f'--out_dir={tmp_path / "c"}'],
             "is a consistency model; the teacher must be a train_diffusion.py run"),
            ('distill_consistency.py', [f'--teacher={tmp_path / "none"}'], "holds no ckpt.pt; pass the out_dir of")]:
        p = run(script, f'--out_dir={tmp_path / "b"}', *args, check=False)
        assert p.returncode != 0 and message in p.stderr.strip().splitlines()[-1], p.stderr[-2000:]


def test_two_ranks_match_one_process(mnist, tmp_path):
    """torchrun with 2 gloo ranks of batch B == 1 process of batch 2B, for the distillation too (to float rounding)."""
    run('train_diffusion.py', *TINY_TEACHER, f'--out_dir={tmp_path / "teacher"}')
    common = [*TINY, '--cfg_scale=2.0', f'--teacher={tmp_path / "teacher"}', '--max_steps=3']
    one_thread = {'OMP_NUM_THREADS': '1'}
    run('torchrun', '--standalone', '--nproc_per_node=2', 'distill_consistency.py', *common,
        f'--out_dir={tmp_path / "ddp"}', env=one_thread)
    run('distill_consistency.py', *common, f'--out_dir={tmp_path / "one"}', env=one_thread)
    ddp, one = (torch.load(tmp_path / d / 'ckpt.pt', weights_only=True) for d in ('ddp', 'one'))
    assert len(ddp['rng']) == 2
    for name, w in one['model'].items():
        torch.testing.assert_close(ddp['model'][name], w, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.slow
def test_one_and_two_step_digits_from_the_quickstart(quickstart, mnist_classifier, tmp_path):
    """config/mnist_cd.py distils the quickstart's model (600 steps of 16, 1 minute): 500 conditional samples drawn in
    one network call each must show the digit asked for at least 70% of the time (88% measured), and two calls
    (sigmas 80, 6) as often, to within two standard errors of 500 samples (90% measured)."""
    out = tmp_path / 'out-mnist-cd'
    print(run('distill_consistency.py', 'config/mnist_cd.py', f'--teacher={quickstart}', f'--out_dir={out}').stdout[-800:])
    acc = {}
    for sigmas in ('80', '80,6'):
        run('sample.py', f'--out_dir={out}', '--num_samples=500', '--save_npz=True', f'--sigmas={sigmas}')
        samples = np.load(out / 'samples.npz')
        acc[sigmas] = mnist_classifier(samples['arr_0'], samples['arr_1'])
    print('class accuracy by sampling sigmas:', acc)
    se = math.sqrt(acc['80'] * (1 - acc['80']) / 500)
    assert acc['80'] >= 0.7 and acc['80,6'] >= acc['80'] - 2 * se, acc
