"""diffusion.Diffusion and train_diffusion.py's loss math against closed forms, no training: the schedules, the
conversions between prediction types, the loss weightings, the timestep samplers' densities, and every sampler on
every schedule and prediction type with the exact denoiser of Gaussian data."""
import itertools
import math
from types import SimpleNamespace

import pytest
import torch

from conftest import script_functions
from diffusion import PREDICTIONS, SAMPLERS, SCHEDULES, Diffusion

f64 = torch.float64


def test_schedules_match_their_formulas():
    T = 1000
    t = torch.arange(T)
    alpha, sigma = Diffusion('linear').alpha_sigma(t)
    torch.testing.assert_close(alpha ** 2, torch.cumprod(1 - torch.linspace(1e-4, 0.02, T, dtype=f64), 0), rtol=1e-12, atol=0)
    torch.testing.assert_close(alpha ** 2 + sigma ** 2, torch.ones(T, dtype=f64))
    alpha, _ = Diffusion('cosine').alpha_sigma(t)
    f = lambda t: math.cos((t / T + 0.008) / 1.008 * math.pi / 2) ** 2
    for i in (0, 100, 500, 900):  # alpha_bar_t = f(t + 1) / f(0) while the betas are below their 0.999 clip
        assert abs(alpha[i].item() ** 2 - f(i + 1) / f(0)) < 1e-12
    u = torch.tensor([0.1, 0.5, 0.9], dtype=f64)
    assert [c.tolist() for c in Diffusion('flow').alpha_sigma(u)] == [(1 - u).tolist(), u.tolist()]
    assert [c.tolist() for c in Diffusion('edm').alpha_sigma(u)] == [[1.0] * 3, u.tolist()]
    # between integer timesteps, log(sigma / alpha) is linear in t
    a, s = Diffusion('linear').alpha_sigma(torch.tensor([10.0, 10.25, 11.0]))
    lsh = (s / a).log()
    assert abs(lsh[1] - (0.75 * lsh[0] + 0.25 * lsh[2])) < 1e-12


@pytest.mark.parametrize('schedule', SCHEDULES)
def test_conversions_round_trip_and_match_the_closed_forms(schedule):
    torch.manual_seed(0)
    x0, eps = torch.randn(6, 3, 4, 4, dtype=f64), torch.randn(6, 3, 4, 4, dtype=f64)
    t = Diffusion(schedule).t_from_u(torch.tensor([0.001, 0.1, 0.3, 0.5, 0.8, 0.999], dtype=f64))
    alpha, sigma = (c.view(-1, 1, 1, 1) for c in Diffusion(schedule).alpha_sigma(t))
    xt = alpha * x0 + sigma * eps
    sd = 0.5
    c_skip, c_out = sd ** 2 / (sigma ** 2 + sd ** 2), sigma * sd / (sigma ** 2 + sd ** 2).sqrt()
    closed = {'eps': eps, 'v': alpha * eps - sigma * x0, 'flow': eps - x0,  # Salimans & Ho 2022; rectified flow
              'x0': (x0 - c_skip * xt) / c_out if schedule == 'edm' else x0}  # EDM's F (Karras et al. 2022, eq. 7)
    outputs = {}
    for p in PREDICTIONS:
        _, _, A, B = Diffusion(schedule, p).coefficients(t)
        outputs[p] = A.view(-1, 1, 1, 1) * x0 + B.view(-1, 1, 1, 1) * eps
        torch.testing.assert_close(outputs[p], closed[p], rtol=1e-10, atol=1e-10)
    for p, q in itertools.product(PREDICTIONS, PREDICTIONS):  # F_p -> (x0, eps) -> F_q
        x0_p, eps_p = Diffusion(schedule, p).x0_eps(outputs[p], xt, t)
        torch.testing.assert_close(x0_p, x0, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(eps_p, eps, rtol=1e-9, atol=1e-9)
        _, _, A, B = Diffusion(schedule, q).coefficients(t)
        torch.testing.assert_close(A.view(-1, 1, 1, 1) * x0_p + B.view(-1, 1, 1, 1) * eps_p, outputs[q], rtol=1e-9, atol=1e-9)


def weight_fn(loss_weighting, gamma=5.0, sigma_data=0.5):
    return script_functions('train_diffusion.py', 'loss_weight', torch=torch, loss_weighting=loss_weighting,
                            min_snr_gamma=gamma, sigma_data=sigma_data)[0]


@pytest.mark.parametrize('schedule,prediction,weighting,closed_form', [
    ('linear', 'eps', 'min_snr', lambda snr, s: snr.clamp(max=5) / snr),  # Hang et al. 2023, eq. 8
    ('cosine', 'v', 'min_snr', lambda snr, s: snr.clamp(max=5) / (snr + 1)),  # their form for v
    ('linear', 'x0', 'min_snr', lambda snr, s: snr.clamp(max=5)),
    ('flow', 'flow', 'min_snr', lambda snr, s: snr.clamp(max=5) * s ** 2),  # ||u err|| = ||x0 err|| / t
    ('cosine', 'eps', 'snr', lambda snr, s: torch.ones_like(snr)),  # the plain eps MSE
    ('linear', 'v', 'snr', lambda snr, s: snr / (snr + 1)),
    ('flow', 'v', 'uniform', lambda snr, s: torch.ones_like(snr)),
    ('edm', 'x0', 'edm', lambda snr, s: torch.ones_like(snr)),  # lambda = 1 / c_out^2: uniform on F
    ('edm', 'eps', 'edm', lambda snr, s: (s ** 2 + 0.25) / 0.25),  # lambda(sigma) sigma^2
])
def test_loss_weightings_match_their_closed_forms(schedule, prediction, weighting, closed_form):
    diffusion = Diffusion(schedule, prediction)
    t = diffusion.t_from_u(torch.tensor([0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99], dtype=f64))
    alpha, sigma, A, B = diffusion.coefficients(t)
    weight = weight_fn(weighting)(alpha, sigma, A, B)
    torch.testing.assert_close(weight, closed_form((alpha / sigma) ** 2, sigma), rtol=1e-9, atol=0)


def ks_statistic(samples, cdf):
    x = samples.double().sort().values
    n = len(x)
    F = cdf(x)
    return max((torch.arange(1, n + 1) / n - F).max().item(), (F - torch.arange(n) / n).max().item())


def mode_cdf(s):
    """P(u <= x) for u = f(v), v ~ U(0, 1), f(v) = 1 - v - s (cos^2(pi v / 2) - 1 + v) decreasing: 1 - f^-1(x)."""
    f = lambda v: 1 - v - s * (torch.cos(math.pi / 2 * v) ** 2 - 1 + v)
    def cdf(x):
        lo, hi = torch.zeros_like(x), torch.ones_like(x)
        for _ in range(60):  # bisection for f(v) = x
            mid = (lo + hi) / 2
            lo, hi = torch.where(f(mid) > x, mid, lo), torch.where(f(mid) > x, hi, mid)
        return 1 - (lo + hi) / 2
    return cdf


@pytest.mark.parametrize('sampling,params,cdf', [
    ('uniform', {}, lambda x: x),
    ('logit_normal', dict(logit_mean=0.0, logit_std=1.0), lambda x: 0.5 * (1 + torch.erf(torch.logit(x) / math.sqrt(2)))),
    ('logit_normal', dict(logit_mean=-1.2, logit_std=1.2),
     lambda x: 0.5 * (1 + torch.erf((torch.logit(x) + 1.2) / (1.2 * math.sqrt(2))))),
    ('mode', dict(mode_scale=1.29), mode_cdf(1.29)),
    ('mode', dict(mode_scale=-0.5), mode_cdf(-0.5)),
])
def test_timestep_samplers_match_their_densities(sampling, params, cdf):
    """Kolmogorov-Smirnov at a fixed seed: 20,000 draws of train_diffusion.py's sample_u against the density's CDF.
    The 0.1% critical value is 1.95 / sqrt(n) = 0.0138; the other samplers' draws must fail it."""
    namespace = dict(torch=torch, math=math, timestep_sampling=sampling, logit_mean=0.0, logit_std=1.0, mode_scale=1.29)
    sample_u = script_functions('train_diffusion.py', 'sample_u', **{**namespace, **params})[0]
    u = sample_u(20000, torch.Generator().manual_seed(0))
    assert u.min() >= 0 and u.max() <= 1
    critical = 1.95 / math.sqrt(len(u))
    assert ks_statistic(u, cdf) < critical
    other = script_functions('train_diffusion.py', 'sample_u', **{**namespace, 'timestep_sampling':
                             'uniform' if sampling != 'uniform' else 'logit_normal'})[0]
    assert ks_statistic(other(20000, torch.Generator().manual_seed(0)), cdf) > critical
    if sampling == 'logit_normal':  # on edm, a logit-normal u is a log-normal sigma: ln sigma ~ N(mean, std)
        log_sigma = Diffusion('edm').t_from_u(u.double()).log()
        assert abs(log_sigma.mean() - params['logit_mean']) < 0.03 and abs(log_sigma.std() - params['logit_std']) < 0.03


class GaussianDenoiser:
    """The exact network for data x0 ~ N(mu, Sigma): E[x0 | x_t] = mu + alpha Sigma (alpha^2 Sigma + sigma^2 I)^-1
    (x_t - alpha mu), returned as the prediction type's output F = A x0 + B eps."""
    config = SimpleNamespace(num_classes=0)

    def __init__(self, diffusion, mu, Sigma):
        self.diffusion, self.mu, self.Sigma = diffusion, mu, Sigma

    def __call__(self, x_in, c_noise, y):
        d, schedule = self.diffusion, self.diffusion.schedule
        t = {'flow': c_noise.double() / 1000, 'edm': (c_noise.double() / 250).exp()}.get(schedule, c_noise.double())
        x = x_in.flatten(1) * ((t[:, None] ** 2 + d.sigma_data ** 2).sqrt() if schedule == 'edm' else 1)
        alpha, sigma, A, B = (c[0].item() for c in d.coefficients(t[:1]))
        eye = torch.eye(len(self.mu), dtype=f64)
        x0 = self.mu + (x - alpha * self.mu) @ (alpha * self.Sigma @ torch.linalg.inv(alpha ** 2 * self.Sigma + sigma ** 2 * eye)).T
        return (A * x0 + B * (x - alpha * x0) / sigma).view(x_in.shape)


STEPS = {'ddpm': 200, 'ddim': 100, 'euler': 100, 'heun': 60}
TOLERANCE = {'ddpm': 0.04, 'ddim': 0.03, 'euler': 0.03, 'heun': 0.01}  # max abs error of the covariance entries


@pytest.mark.parametrize('schedule,prediction,sampler', list(itertools.product(SCHEDULES, PREDICTIONS, SAMPLERS)))
def test_samplers_reproduce_gaussian_data(schedule, prediction, sampler):
    """Plugged in as the model, the exact denoiser of 8-dimensional Gaussian data (variances 0.03 to 0.5, correlated,
    mean -0.5 to 0.5) must give back that mean within 0.01 and covariance within TOLERANCE at STEPS steps. The noise
    is whitened to exactly zero mean and identity covariance, so the deterministic samplers' errors are their own
    discretisation's (which halves with twice the steps for Euler, quarters for Heun). Float64: eps prediction at
    the flow schedule's t = 1 - 1e-5 divides by alpha = 1e-5."""
    g = torch.Generator().manual_seed(0)
    L = torch.randn(8, 8, dtype=f64, generator=g) * 0.3
    Sigma = L @ L.T + 0.05 * torch.eye(8, dtype=f64)
    Sigma = Sigma / Sigma.diagonal().max() * 0.5
    mu = torch.linspace(-0.5, 0.5, 8, dtype=f64)
    z = torch.randn(10000, 8, dtype=f64, generator=g)
    z = z - z.mean(0)
    z = z @ torch.linalg.inv(torch.linalg.cholesky(torch.cov(z.T))).T
    diffusion = Diffusion(schedule, prediction)
    x = diffusion.sample(GaussianDenoiser(diffusion, mu, Sigma), z.view(-1, 2, 2, 2), torch.zeros(len(z), dtype=torch.long),
                         sampler, STEPS[sampler], generator=torch.Generator().manual_seed(1)).flatten(1)
    mean_err, cov_err = (x.mean(0) - mu).abs().max().item(), (torch.cov(x.T) - Sigma).abs().max().item()
    assert mean_err < 0.01 and cov_err < TOLERANCE[sampler], (mean_err, cov_err)


@pytest.mark.parametrize('schedule,sampler', list(itertools.product(SCHEDULES, SAMPLERS)))
def test_samplers_land_on_a_single_data_point(schedule, sampler):
    """Data that is one point x*: the exact x0 estimate is x* at every step, so every sampler ends on x* in 10 steps."""
    target = torch.rand(1, 2, 4, 4, generator=torch.Generator().manual_seed(0)) * 1.6 - 0.8
    diffusion = Diffusion(schedule, 'v')

    def exact(x_in, c_noise, y):
        t = {'flow': c_noise.double() / 1000, 'edm': (c_noise.double() / 250).exp()}.get(schedule, c_noise.double())
        x = x_in * ((t.view(-1, 1, 1, 1) ** 2 + 0.25).sqrt().float() if schedule == 'edm' else 1)
        alpha, sigma, A, B = (c.view(-1, 1, 1, 1).float() for c in diffusion.coefficients(t))
        return A * target + B * (x - alpha * target) / sigma
    exact.config = SimpleNamespace(num_classes=0)
    z = torch.randn(8, 2, 4, 4, generator=torch.Generator().manual_seed(1))
    x = diffusion.sample(exact, z, torch.zeros(8, dtype=torch.long), sampler, 10, eta=1.0, clip_x0=True,
                         generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(x, target.expand_as(x), atol=1e-4, rtol=0)


def test_guidance_acts_on_every_channel_within_its_interval():
    """F_u + s (F_c - F_u) on all 4 channels (DiT's sampler guides only the first 3); outside cfg_interval, no guidance."""
    diffusion = Diffusion('cosine', 'eps')

    def model(x, t, y):  # the conditional output differs from the unconditional one on every channel
        return x * 0.1 + (y != 3).float().view(-1, 1, 1, 1) * torch.arange(1, 5.0).view(1, 4, 1, 1)
    model.config = SimpleNamespace(num_classes=3)
    x, y, t = torch.randn(2, 4, 2, 2), torch.tensor([0, 1]), torch.tensor(500.0, dtype=f64)
    x0_guided, eps_guided, _ = diffusion.denoise(model, x, t, y, cfg_scale=3.0)
    F_c, F_u = model(x, None, y), model(x, None, torch.full_like(y, 3))
    x0_want, eps_want = diffusion.x0_eps(F_u + 3 * (F_c - F_u), x, t.view(1))
    torch.testing.assert_close(eps_guided, x0_want * 0 + eps_want)
    torch.testing.assert_close(x0_guided, x0_want)
    assert (eps_guided - F_c).abs().amax(dim=(0, 2, 3)).min() > 1  # every channel moved by guidance
    z = torch.randn(2, 4, 2, 2)
    run = lambda **kw: diffusion.sample(model, z, y, 'euler', 6, **kw)
    assert torch.equal(run(cfg_scale=3.0, cfg_interval=(1e6, 1e7)), run(cfg_scale=1.0))
    assert not torch.equal(run(cfg_scale=3.0, cfg_interval=(0.5, 5.0)), run(cfg_scale=1.0))
    assert not torch.equal(run(cfg_scale=3.0, cfg_interval=(0.5, 5.0)), run(cfg_scale=3.0))


def test_autoguidance_takes_the_weaker_model_at_the_same_labels():
    """Autoguidance (Karras et al. 2024): F_g + s (F - F_g), F_g the guide's at the same labels, in place of the null
    label's; within the guidance interval only; guided by itself a model samples as unguided, to the bit."""
    diffusion = Diffusion('flow', 'v')

    def model(x, t, y):
        return x * 0.1 + y.float().view(-1, 1, 1, 1) * torch.arange(1, 5.0).view(1, 4, 1, 1)

    def guide(x, t, y):  # weaker: blurrier, and it must see the labels (a null label would read 3)
        assert (y != 3).all()
        return x * 0.3 + 0.5 * y.float().view(-1, 1, 1, 1)
    model.config = SimpleNamespace(num_classes=3)
    x, y, t = torch.randn(2, 4, 2, 2), torch.tensor([0, 2]), torch.tensor(0.6, dtype=f64)
    x0_guided, eps_guided, _ = diffusion.denoise(model, x, t, y, cfg_scale=2.5, guide=guide)
    x_in, c_noise = diffusion.net_inputs(x, t.expand(2))
    F, F_g = model(x_in, c_noise, y), guide(x_in, c_noise, y)
    x0_want, eps_want = diffusion.x0_eps(F_g + 2.5 * (F - F_g), x, t.view(1))
    torch.testing.assert_close(x0_guided, x0_want)
    torch.testing.assert_close(eps_guided, eps_want)
    z = torch.randn(2, 4, 2, 2)
    run = lambda **kw: diffusion.sample(model, z, y, 'heun', 5, **kw)
    assert torch.equal(run(cfg_scale=2.5, guide=model), run(cfg_scale=1.0))
    assert torch.equal(run(cfg_scale=2.5, guide=guide, cfg_interval=(1e6, 1e7)), run(cfg_scale=1.0))
    assert not torch.equal(run(cfg_scale=2.5, guide=guide), run(cfg_scale=1.0))
