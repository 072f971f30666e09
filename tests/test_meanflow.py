"""train_meanflow.py (Geng et al. 2025): its target against the closed form of Gaussian data's
average velocity, the JVP against finite differences, two ranks against one process, exact resume, and sample.py's
one and two steps."""
from contextlib import nullcontext

import numpy as np
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from conftest import FROZEN, assert_same_steps, run, script_functions
from diffusion import bcast
from model import DiT, DiTConfig

f64 = torch.float64
MU, S = torch.tensor([0.5, -0.3, 0.0, 0.8], dtype=f64), torch.tensor([0.2, 0.7, 1.0, 0.05], dtype=f64)


def gaussian(t):
    """The flow interpolant x_t = (1 - t) x0 + t eps of data x0 ~ N(MU, diag S^2): its mean and standard deviation,
    and their time derivatives, per coordinate (shaped (B, 4, 1, 1))."""
    t = t.view(-1, 1, 1, 1)
    mu, s = MU.view(1, 4, 1, 1), S.view(1, 4, 1, 1)
    m, sd = (1 - t) * mu, ((1 - t) ** 2 * s ** 2 + t ** 2).sqrt()
    return m, sd, -mu, (t - (1 - t) * s ** 2) / sd


def exact_velocity(z, t):
    """The marginal velocity E[eps - x0 | x_t = z]: the probability-flow ODE of Gaussian data moves z along
    m_t + sd_t w for a fixed w."""
    m, sd, dm, dsd = gaussian(t)
    return dm + dsd * (z - m) / sd


def exact_average_velocity(z, r, t):
    """u(z, r, t) = (z_t - z_r) / (t - r) along that ODE: z_r = m_r + sd_r / sd_t (z - m_t), r < t."""
    (m_t, sd_t, _, _), (m_r, sd_r, _, _) = gaussian(t), gaussian(r)
    return (z - m_r - sd_r / sd_t * (z - m_t)) / bcast(t - r, z)


def exact_net(z, t, y, interval):
    """The exact average velocity as a meanflow network from scratch sees its inputs (time_scale 1): at r = t the
    velocity (the quotient is 0 / 0 there)."""
    return torch.where((interval == 0).view(-1, 1, 1, 1), exact_velocity(z, t), exact_average_velocity(z, t - interval, t))


def script_loss(net, **namespace):
    loss, _ = script_functions('train_meanflow.py', 'meanflow_loss', 'average_velocity', torch=torch, bcast=bcast,
                               ctx=nullcontext(), sdpa_kernel=sdpa_kernel, SDPBackend=SDPBackend, jvp_net=net, time_scale=1.0,
                               model=net, raw_model=net, **{**dict(cfg_scale=1.0, adaptive_eps=1e-3, adaptive_p=1.0),
                                                            **namespace})
    return loss


def test_meanflow_target_is_exact_on_gaussian_data():
    """For Gaussian data the average velocity is known in closed form; it satisfies MeanFlow's identity
    u = v - (t - r) du/dt (the total derivative along the flow, by torch.func.jvp) to float64 rounding, and the
    script's loss is zero at it where the image's velocity is the marginal one (x0 = z - t v, eps = z + (1 - t) v
    give x_t = z and eps - x0 = v), the images with r = t (their target v, no JVP) among them; the instantaneous
    velocity in its place is not."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(8, 4, 2, 2, dtype=f64, generator=g)
    t = torch.tensor([0.3, 0.5, 0.7, 0.9, 0.95, 0.6, 0.4, 0.8], dtype=f64)
    r = torch.tensor([0.0, 0.2, 0.65, 0.1, 0.5, 0.59, 0.4, 0.8], dtype=f64)
    v, n = exact_velocity(z, t), 6  # the first n with r < t
    u, dudt = torch.func.jvp(exact_average_velocity, (z[:n], r[:n], t[:n]),
                             (v[:n], torch.zeros_like(r[:n]), torch.ones_like(t[:n])))
    torch.testing.assert_close(u, v[:n] - bcast(t[:n] - r[:n], u) * dudt, rtol=0, atol=1e-10)
    torch.testing.assert_close(exact_average_velocity(z, t - 1e-7, t), v, rtol=0, atol=1e-6)  # u(z, t, t) = v
    x0, eps = z - bcast(t, z) * v, z + bcast(1 - t, z) * v
    _, mse = script_loss(exact_net)(x0, torch.zeros(8, dtype=torch.long), eps, t, r)
    assert mse.max() < 1e-12, mse
    instantaneous = lambda z, t, y, interval: exact_velocity(z, t)
    _, mse = script_loss(instantaneous)(x0, torch.zeros(8, dtype=torch.long), eps, t, r)
    assert mse[:n].min() > 1e-4 and mse[n:].max() < 1e-12, mse


def test_jvp_through_the_dit_matches_finite_differences():
    """torch.func.jvp through a DiT with an interval embedding (the math attention, as the script runs it) equals
    the central difference of the network along (v, 0, 1), to float32's precision of a difference."""
    torch.manual_seed(0)
    net = DiT(DiTConfig(image_size=8, in_channels=2, patch_size=2, hidden_size=32, depth=2, num_heads=2,
                        num_classes=3, interval=True))
    with torch.no_grad():  # off the zero init: every path moves the output
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    (average_velocity,) = script_functions('train_meanflow.py', 'average_velocity', time_scale=1.0)
    g = torch.Generator().manual_seed(1)
    z, v = torch.randn(3, 2, 8, 8, generator=g), torch.randn(3, 2, 8, 8, generator=g)
    t, r, y = torch.tensor([0.4, 0.8, 0.5]), torch.tensor([0.1, 0.8, 0.2]), torch.tensor([0, 2, 3])
    f = lambda z, t, r: average_velocity(net, z, t, r, y)
    # each part on its own scale, with a step that float32 resolves
    for name, (dz, dt, h) in {'v d_z u': (v, 0, 1e-3), 'd_t u': (0 * v, 1, 1e-3)}.items():
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
            _, jvp = torch.func.jvp(f, (z, t, r), (dz, torch.full_like(t, dt), torch.zeros_like(r)))
            numeric = (f(z + h * dz, t + h * dt, r) - f(z - h * dz, t - h * dt, r)) / (2 * h)
        scale = jvp.abs().max().item()
        torch.testing.assert_close(jvp, numeric, rtol=0, atol=3e-3 * scale, msg=name)
        assert scale > 0.1, name


TINY = ['--batch_size=8', '--log_interval=1', '--sample_interval=1000',
        '--ckpt_interval=1000', '--lr=1e-3']


@pytest.mark.slow
def test_meanflow_two_ranks_resume_and_sampling(mnist, tmp_path):
    """With guidance folded into the target (cfg_scale=2): torchrun with 2 gloo ranks == 1 process (the DDP model's
    own forward carries the gradient, so it is all-reduced; the JVP's target has none); 3 steps, a stop and 3 more
    == 6 to the bit; sample.py draws in one step and in two. A base run of another objective stops in one line; a
    flow run starts the model as itself (u(z, t, t) = its v)."""
    common = [*TINY, '--cfg_scale=2', '--max_steps=3']
    one_thread = {'OMP_NUM_THREADS': '1'}
    run('torchrun', '--standalone', '--nproc_per_node=2', 'train_meanflow.py', *common, *FROZEN,
        f'--out_dir={tmp_path / "ddp"}', env=one_thread)
    run('train_meanflow.py', *common, *FROZEN, f'--out_dir={tmp_path / "frozen"}', env=one_thread)
    assert_same_steps(tmp_path / 'frozen', tmp_path / 'ddp')  # (FROZEN's lr: conftest.py)
    six = [*TINY, '--cfg_scale=2', '--max_steps=6']
    run('train_meanflow.py', *common, f'--out_dir={tmp_path / "one"}')
    run('train_meanflow.py', *six, f'--out_dir={tmp_path / "one"}')
    run('train_meanflow.py', *six, f'--out_dir={tmp_path / "straight"}')
    a, b = (torch.load(tmp_path / d / 'ckpt.pt', weights_only=True) for d in ('one', 'straight'))
    for key in ('model', 'ema'):
        assert all(torch.equal(w, b[key][name]) for name, w in a[key].items()), key
    for steps in (1, 2):
        run('sample.py', f'--out_dir={tmp_path / "one"}', '--num_samples=4', f'--steps={steps}', '--save_npz=True')
        assert np.load(tmp_path / 'one' / 'samples.npz')['arr_0'].shape == (4, 28, 28, 1)
    p = run('sample.py', f'--out_dir={tmp_path / "one"}', '--cfg_scale=2', check=False)
    assert p.returncode == 1 and 'guided as it was trained' in p.stderr.strip().splitlines()[-1]

    teachers = {}
    for name, args in (('eps', []), ('flow', ['--schedule=flow', '--prediction_type=flow'])):
        teachers[name] = tmp_path / f'teacher_{name}'
        run('train_diffusion.py', '--arch=DiT-N/4', '--batch_size=8', '--max_steps=2', '--eval_images=16',
            '--sample_steps=2', *args, f'--out_dir={teachers[name]}')
    p = run('train_meanflow.py', *TINY, f'--init_base={teachers["eps"]}', f'--out_dir={tmp_path / "x"}', check=False)
    assert p.returncode == 1 and "is not a flow run of this model and data (this run vs the base: {'schedule': " \
        "('flow', 'linear'), 'prediction_type': ('flow', 'eps')})" in p.stderr.strip().splitlines()[-1], p.stderr
    run('train_meanflow.py', *TINY, f'--init_base={teachers["flow"]}', '--max_steps=1', '--lr=1e-12',
        f'--out_dir={tmp_path / "from_flow"}')
    student = DiT(DiTConfig(**torch.load(tmp_path / 'from_flow' / 'ckpt.pt', weights_only=True)['model_args']))
    student.load_state_dict(torch.load(tmp_path / 'from_flow' / 'ckpt.pt', weights_only=True)['model'])
    teacher = DiT(DiTConfig(**torch.load(teachers['flow'] / 'ckpt.pt', weights_only=True)['model_args']))
    teacher.load_state_dict(torch.load(teachers['flow'] / 'ckpt.pt', weights_only=True)['ema'])
    z, T, y = torch.randn(2, 1, 28, 28), torch.tensor([300.0, 800.0]), torch.tensor([1, 10])
    with torch.no_grad():
        torch.testing.assert_close(student(z, T, y, interval=torch.zeros(2)), teacher(z, T, y))
