"""
Diffusion: the noise schedules, prediction types and samplers that train_diffusion.py, sample.py
and distill_consistency.py share (the training loss, its timestep sampling and weighting, is written
out in train_diffusion.py), and the post-hoc EMA's math (Karras et al. 2024).
"""
import math

import numpy as np
import torch

# -----------------------------------------------------------------------------
# Post-hoc EMA (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion Models", sec. 3):
# train_diffusion.py tracks power-function EMAs and saves snapshots of them; sample.py combines the snapshots into
# an EMA of another length. The EMA of exponent gamma at step t averages the weights of steps tau <= t with the
# profile (gamma + 1) tau^gamma / t^(gamma + 1): each step, ema = beta ema + (1 - beta) weights, beta = (1 - 1/t)^(gamma + 1).

def phema_gamma(sigma_rel):
    """The exponent of the power-function EMA of relative standard deviation sigma_rel (the profile's standard
    deviation over its length; EDM2, eq. 3): the largest root of sigma_rel^2 (gamma + 2)^2 (gamma + 3) = gamma + 1."""
    if not 0 < sigma_rel < 0.28:
        raise ValueError(f"sigma_rel={sigma_rel} must be in (0, 0.28): longer averages are not power-function EMAs")
    s2 = sigma_rel ** 2
    return float(max(r.real for r in np.roots([s2, 7 * s2, 16 * s2 - 1, 12 * s2 - 1]) if abs(r.imag) < 1e-9))

def phema_coefficients(snapshots, t, sigma_rel):
    """Coefficients x_i such that sum_i x_i snapshot_i is the EMA of sigma_rel at step t: the profiles' combination
    nearest to its profile in L2 (their inner products have a closed form; EDM2, app. C.3), under sum_i x_i = 1 (an
    average of the weights, as every profile is). snapshots: (t_i, gamma_i) pairs."""
    ts = np.array([s[0] for s in snapshots] + [t], dtype=np.float64) / t  # in units of t: no overflow
    gs = np.array([s[1] for s in snapshots] + [phema_gamma(sigma_rel)], dtype=np.float64)
    ta, tb, ga, gb = ts[:, None], ts[None], gs[:, None], gs[None]
    log_dot = (ga + gb + 1) * np.log(np.minimum(ta, tb)) - (ga + 1) * np.log(ta) - (gb + 1) * np.log(tb)
    dot = (ga + 1) * (gb + 1) / (ga + gb + 1) * np.exp(log_dot)  # <p_a, p_b> = integral of p_a p_b over tau
    n = len(snapshots)  # minimise x'Gx - 2 b'x subject to 1'x = 1: [[G, 1], [1', 0]] [x, lambda] = [b, 1]
    kkt = np.block([[dot[:n, :n], np.ones((n, 1))], [np.ones((1, n)), np.zeros((1, 1))]])
    return np.linalg.lstsq(kkt, np.append(dot[:n, n], 1.0), rcond=None)[0][:n]

def phema_weights(snapshots, t, sigma_rel):
    """The weights of the EMA of sigma_rel at step t: the phema_coefficients combination of snapshots,
    (step, gamma, weights by name) triples of train_diffusion.py's power-function EMAs. Summed in float64,
    returned in float32, by name."""
    x = phema_coefficients([(step, gamma) for step, gamma, _ in snapshots], t, sigma_rel)
    out = {}
    for xi, (_, _, weights) in zip(x, snapshots):
        for name, w in weights.items():
            out[name] = out.get(name, 0) + float(xi) * w.double()
    return {name: w.float() for name, w in out.items()}

# -----------------------------------------------------------------------------
# Diffusion: schedules, prediction types and samplers, shared by train_diffusion.py, sample.py and
# distill_consistency.py. The training loss (timestep sampling, weighting) is written out in
# train_diffusion.py.

SCHEDULES = ('linear', 'cosine', 'flow', 'edm')
PREDICTIONS = ('eps', 'v', 'x0', 'flow')
SAMPLERS = ('ddpm', 'ddim', 'euler', 'heun')

class Diffusion:
    """Gaussian diffusion x_t = alpha_t x0 + sigma_t eps, the network's output pred read as one
    prediction type.

    schedule  time t                  alpha_t, sigma_t
    linear    0..T-1, the DDPM index  sqrt(abar_t), sqrt(1 - abar_t), betas 1e-4..0.02 (Ho 2020)
    cosine    0..T-1                  abar from Nichol & Dhariwal 2021, eq. 17
    flow      (0, 1)                  1 - t, t: the linear interpolant (rectified flow, SiT, SD3)
    edm       sigma in [0.002, 80]    1, sigma; the network sees x / sqrt(sigma^2 + sigma_data^2)
                                      (Karras et al. 2022)
    Between integers the DDPM schedules interpolate log(sigma / alpha), so ODE samplers may use any
    noise level.

    prediction  the network's target pred = A x0 + B eps
    eps         eps                    (Ho et al. 2020)
    v           alpha eps - sigma x0   (Salimans & Ho 2022)
    x0          x0; under the edm schedule EDM's preconditioned output (x0 - c_skip x_t) / c_out
                (Karras et al. 2022, eq. 7)
    flow        eps - x0, the velocity of the flow schedule (Liu et al. 2022; Lipman et al. 2022)
    Since x_t = alpha x0 + sigma eps, every pred gives back x0 = (B x_t - sigma pred) / det and
    eps = (alpha pred - A x_t) / det, det = alpha B - sigma A: one formula for every conversion, and
    the prediction's error is det / sigma times the x0 error.
    """
    sigma_min, sigma_max, rho = 0.002, 80.0, 7.0  # EDM's range and its sampling grid's curvature
    t_eps = 1e-5  # flow stays in (t_eps, 1 - t_eps), where every prediction type is invertible

    def __init__(self, schedule='linear', prediction_type='eps', num_timesteps=1000, sigma_data=0.5):
        if schedule not in SCHEDULES or prediction_type not in PREDICTIONS:
            raise ValueError(f"schedule '{schedule}' / prediction_type '{prediction_type}': use one "
                             f"of {SCHEDULES} / {PREDICTIONS}")
        self.schedule, self.prediction_type = schedule, prediction_type
        self.num_timesteps, self.sigma_data = num_timesteps, sigma_data
        T = num_timesteps
        if schedule == 'linear':
            betas = np.linspace(1e-4 * 1000 / T, 0.02 * 1000 / T, T, dtype=np.float64)
        elif schedule == 'cosine':
            f = lambda t: np.cos((t / T + 0.008) / 1.008 * np.pi / 2) ** 2
            betas = np.clip(1 - f(np.arange(1, T + 1)) / f(np.arange(T)), 0, 0.999)
        if schedule in ('linear', 'cosine'):
            # log(sigma / alpha) at the integer times, increasing in t
            alpha_bar = np.cumprod(1 - betas)
            self.log_sigma_hat = torch.from_numpy(0.5 * np.log((1 - alpha_bar) / alpha_bar))

    def t_from_u(self, u):
        """Noise levels u in [0, 1), as the training's timestep sampling draws them, to the
        schedule's time. For edm u = sigma / (1 + sigma), the flow time of the same signal-to-noise
        ratio: a logit-normal u is a log-normal sigma."""
        if self.schedule in ('linear', 'cosine'):
            return (u * self.num_timesteps).floor().clamp(max=self.num_timesteps - 1)
        if self.schedule == 'flow':
            return u.clamp(self.t_eps, 1 - self.t_eps)
        return (u / (1 - u)).clamp(self.sigma_min, self.sigma_max)

    def alpha_sigma(self, t):
        """alpha_t, sigma_t in float64, shaped like t."""
        t = t.double()
        if self.schedule == 'flow':
            return 1 - t, t
        if self.schedule == 'edm':
            return torch.ones_like(t), t
        if self.log_sigma_hat.device != t.device:  # moved once, not copied at every call
            self.log_sigma_hat = self.log_sigma_hat.to(t.device)
        table = self.log_sigma_hat
        i = t.floor().long().clamp(0, len(table) - 2)
        w = t - i
        log_sigma_hat = table[i] * (1 - w) + table[i + 1] * w
        alpha = torch.exp(log_sigma_hat * 2).add(1).rsqrt()
        return alpha, alpha * log_sigma_hat.exp()

    def t_from_sigma(self, s):
        """The time at which sigma_t / alpha_t = s, float64: alpha_sigma's inverse in the
        variance-exploding view."""
        s = s.double()
        if self.schedule == 'edm':
            return s
        if self.schedule == 'flow':
            return s / (1 + s)
        table = self.log_sigma_hat.to(s.device)
        log_s = s.log().clamp(table[0], table[-1])
        i = torch.searchsorted(table, log_s).clamp(1, len(table) - 1)
        return i - 1 + (log_s - table[i - 1]) / (table[i] - table[i - 1])

    def denoiser(self, model, x, s, y):
        """D(x, s): the network's x0 estimate for x = x0 + s eps, the variance-exploding view of x_t
        = alpha x0 + sigma eps with s = sigma / alpha (Karras et al. 2022), whatever the schedule
        and prediction type: one conversion, with gradients, per-image s of shape (B,)."""
        t = self.t_from_sigma(s)
        xt = bcast(self.alpha_sigma(t)[0], x) * x
        pred = model(*self.net_inputs(xt, t), y).to(x.dtype)
        return self.x0_eps(pred, xt, t)[0]

    def consistency(self, model, x, s, y, sigma_min):
        """A consistency model's f(x, s) = c_skip x + c_out pred with f(x, sigma_min) = x (Song et
        al. 2023, eq. 8; c_skip = sd^2 / ((s - sigma_min)^2 + sd^2), c_out = sd (s - sigma_min) /
        sqrt(s^2 + sd^2)), where pred is the network read as EDM's preconditioned output, pred = (D
        - c_skip' x) / c_out' (c_skip' = sd^2 / (s^2 + sd^2), c_out' = sd s / sqrt(s^2 + sd^2)):
        then c_out / c_out' = (s - sigma_min) / s, and a diffusion network's f is its own denoiser D
        wherever s >> sigma_min, the start distillation needs."""
        sd2 = self.sigma_data ** 2
        c_skip = sd2 / ((s - sigma_min) ** 2 + sd2)
        denoised = self.denoiser(model, x, s, y)
        c_out_pred = bcast((s - sigma_min) / s, x) * (denoised - bcast(sd2 / (s ** 2 + sd2), x) * x)
        return bcast(c_skip, x) * x + c_out_pred

    @torch.no_grad()
    def consistency_sample(self, model, z, y, sigmas, sigma_min, generator=None):
        """Images from a consistency model in len(sigmas) network calls (Song et al. 2023, alg. 1):
        x0 = f(sigmas[0] z), then for each next s, x0 = f(x0 + sqrt(s^2 - sigma_min^2) fresh noise,
        s). generator: the fresh noise's, or a list of one per image (randn)."""
        per_image = lambda s: torch.full((len(z),), float(s), device=z.device)
        x0 = self.consistency(model, sigmas[0] * z, per_image(sigmas[0]), y, sigma_min)
        for s in sigmas[1:]:
            noise = randn(z.shape, generator, z.device, z.dtype)
            x = x0 + math.sqrt(s ** 2 - sigma_min ** 2) * noise
            x0 = self.consistency(model, x, per_image(s), y, sigma_min)
        return x0

    def coefficients(self, t):
        """(alpha, sigma, A, B) at times t, float64: x_t = alpha x0 + sigma eps and the target
        pred = A x0 + B eps."""
        alpha, sigma = self.alpha_sigma(t)
        one, zero = torch.ones_like(alpha), torch.zeros_like(alpha)
        if self.prediction_type == 'eps':
            return alpha, sigma, zero, one
        if self.prediction_type == 'v':
            return alpha, sigma, -sigma, alpha
        if self.prediction_type == 'flow':
            return alpha, sigma, -one, one
        # edm: pred = (x0 - c_skip x_t) / c_out with c_skip = sd^2 / s^2, c_out = sigma sd / s
        if self.schedule == 'edm':
            s = (sigma ** 2 + self.sigma_data ** 2).sqrt()
            return alpha, sigma, sigma / (self.sigma_data * s), -self.sigma_data / s
        return alpha, sigma, one, zero

    def net_inputs(self, x, t):
        """What the network sees for x_t at times t: c_in x_t and c_noise (the noise level on the
        DDPM index's scale, which the sinusoidal time embedding is made for: t, 1000 t, or EDM's
        ln(sigma) / 4 times 1000)."""
        if self.schedule in ('linear', 'cosine'):
            return x, t.float()
        if self.schedule == 'flow':
            return x, 1000 * t.float()
        c_in = (t.double() ** 2 + self.sigma_data ** 2).rsqrt()
        return x * bcast(c_in, x), 250 * t.double().log().float()

    def x0_eps(self, pred, x, t):
        """The x0 and eps that the network's output pred implies for x_t = x."""
        alpha, sigma, A, B = self.coefficients(t)
        det = alpha * B - sigma * A
        x0 = bcast(B / det, x) * x - bcast(sigma / det, x) * pred
        eps = bcast(alpha / det, x) * pred - bcast(A / det, x) * x
        return x0, eps

    def variance_kl(self, x0, xt, t, x0_pred, v):
        """DiT's variance term of a learn_sigma network, per image: the KL from the posterior
        q(x_s | x_t, x0), s = t - 1, to the model's Gaussian of the same form around x0_pred (no
        gradient: only v learns here) with variance exp(f log beta_t + (1 - f) log beta~_t),
        f = (v + 1) / 2, in bits per dimension (Nichol & Dhariwal 2021, eqs. 10-16); DDPM schedules.
        At t = 0 the term (a decoder likelihood) is left out."""
        t1 = t.clamp(min=1)  # t = 0's finite stand-in, masked out below
        (alpha, sigma), (alpha_s, sigma_s) = self.alpha_sigma(t1), self.alpha_sigma(t1 - 1)
        beta = 1 - (alpha / alpha_s) ** 2
        log_var_q = (beta * sigma_s ** 2 / sigma ** 2).log()
        # the posterior mean is c1 x0 + c2 x_t: the two means differ by c1 (x0 - x0_pred)
        c1 = alpha_s * beta / sigma ** 2
        f = (v + 1) / 2
        log_var_p = f * bcast(beta.log(), v) + (1 - f) * bcast(log_var_q, v)
        log_var_q = bcast(log_var_q, v)
        kl = 0.5 * (log_var_p - log_var_q - 1 + (log_var_q - log_var_p).exp()
                    + (bcast(c1, v) * (x0 - x0_pred)) ** 2 * (-log_var_p).exp())
        return kl.mean(dim=(1, 2, 3)) / math.log(2) * (t > 0)

    @torch.no_grad()
    def denoise(self, model, x, t, y, cfg_scale=1.0, clip_x0=False, control=None, cfg_channels=0,
                guide=None):
        """x0 and eps estimates at one time t (a 0-d tensor) for every image of x, and the learned
        variance interpolation v of a learn_sigma network (None otherwise). Guidance pred_u +
        cfg_scale (pred_c - pred_u) acts on the prediction's channels (its first cfg_channels only,
        if set: DiT's and SiT's released numbers guided 3 of 4): classifier-free, pred_u the
        model's at the null label model.config.num_classes, or autoguidance (Karras et al. 2024),
        pred_u a weaker model's, guide, at the same labels; v is the model's own; every call sees
        the control image."""
        x_in, c_noise = self.net_inputs(x, t.expand(len(x)))
        # models without a control image take (x, t, y)
        control_args = () if control is None else (control,)
        if cfg_scale == 1.0:
            pred = model(x_in, c_noise, y, *control_args)
        else:
            if guide is not None:
                pred, pred_u = (net(x_in, c_noise, y, *control_args) for net in (model, guide))
            else:  # one batch of both halves
                null = torch.full_like(y, model.config.num_classes)
                twice = lambda v: torch.cat([v, v])
                pred, pred_u = model(twice(x_in), twice(c_noise), torch.cat([y, null]),
                                     *(twice(v) for v in control_args)).chunk(2)
            k = cfg_channels or x.shape[1]
            pred = torch.cat([pred_u[:, :k] + cfg_scale * (pred[:, :k] - pred_u[:, :k]),
                              pred[:, k:]], dim=1)
        v = None
        if pred.shape[1] == 2 * x.shape[1]:  # learn_sigma: the prediction, then v
            pred, v = pred.chunk(2, dim=1)
        x0, eps = self.x0_eps(pred.to(x.dtype), x, t.view(1))
        # pixel data lives in [-1, 1]; eps follows the clipped x0
        if clip_x0:
            alpha, sigma = self.alpha_sigma(t)
            x0 = x0.clamp(-1, 1)
            eps = (x - alpha.item() * x0) / sigma.item()
        return x0, eps, v

    def grid(self, sampler, steps, shift=1.0):
        """The sampler's times, noisiest first: t (steps,) where the network is called, and alpha,
        sigma (steps + 1,) whose last entry is the clean end (1, 0). DDPM/DDIM on a DDPM schedule:
        evenly spaced integer timesteps (DDIM); Euler/Heun on a DDPM schedule, and every sampler on
        edm: Karras et al.'s sigma/alpha spacing (rho = 7); every sampler on flow: evenly spaced t,
        shifted by t' = shift t / (1 + (shift - 1) t) (Esser et al. 2024)."""
        f64 = torch.float64
        if self.schedule == 'flow':
            t = torch.linspace(1, 0, steps + 1, dtype=f64)[:-1]
            t = (shift * t / (1 + (shift - 1) * t)).clamp(self.t_eps, 1 - self.t_eps)
        elif self.schedule != 'edm' and sampler in ('ddpm', 'ddim'):
            t = torch.linspace(self.num_timesteps - 1, 0, steps, dtype=f64).round()
        else:
            if self.schedule == 'edm':
                lo, hi = self.sigma_min, self.sigma_max
            else:
                lo, hi = self.log_sigma_hat[[0, -1]].exp().tolist()
            # the cosine schedule's last step is at sigma/alpha ~ 6e3: no use starting there
            hi = min(hi, self.sigma_max)
            ramp = torch.linspace(0, 1, steps, dtype=f64)  # [0] for one step
            inv_rho = 1 / self.rho
            sigma_hat = (hi ** inv_rho + ramp * (lo ** inv_rho - hi ** inv_rho)) ** self.rho
            t = self.t_from_sigma(sigma_hat)
        alpha, sigma = self.alpha_sigma(t)
        return t, torch.cat([alpha, alpha.new_ones(1)]), torch.cat([sigma, sigma.new_zeros(1)])

    @torch.no_grad()
    def sample(self, model, z, y, sampler='ddim', steps=50, eta=0.0, cfg_scale=1.0,
               cfg_interval=(0.0, float('inf')), shift=1.0, clip_x0=False, generator=None, control=None,
               cfg_channels=0, guide=None):
        """Images from noise z (B, C, H, W) with labels y. cfg_interval: guidance (classifier-free,
        or by the weaker model guide: denoise) only where lo < sigma/alpha <= hi (Kynkaanniemi et
        al. 2024). ddpm is DDIM with eta = 1 (the posterior q(x_s
        | x_t, x0) sampled; Ho et al. 2020), ddim takes eta (Song et al. 2021, eq. 12); euler and
        heun integrate the probability-flow ODE (Karras et al. 2022, alg. 1) in the coordinates
        where it is straightest: (x / alpha, sigma / alpha), or (x, t) for flow. DDIM with eta = 0
        is Euler in either, so they share one step and differ by their grids. A learn_sigma network's
        ddpm steps draw their noise with its learned variance exp(f log beta + (1 - f) log
        beta_tilde), f = (v + 1) / 2 (Nichol & Dhariwal 2021, eq. 15), beta of the step taken.
        generator: the fresh noise's, or a list of one per image (randn)."""
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler '{sampler}'; use one of {SAMPLERS}")
        t, alpha, sigma = (v.to(z.device) for v in self.grid(sampler, steps, shift))
        # the ODE's state is x / scale, its time b = sigma / scale; a = alpha / scale
        scale = torch.ones_like(alpha) if self.schedule == 'flow' else alpha
        a, b = alpha / scale, sigma / scale
        eta = 1.0 if sampler == 'ddpm' else eta

        def denoise(x, i):
            guided = cfg_interval[0] < sigma[i] / alpha[i] <= cfg_interval[1]
            return self.denoise(model, x, t[i], y, cfg_scale if guided else 1.0, clip_x0, control,
                                cfg_channels, guide)

        # x = sigma z + alpha x0, the last ~0: alpha[0] is 1e-5 (flow), < 0.01 (DDPM), sigma / 80
        # (edm)
        x = sigma[0].item() * z
        for i in range(steps):
            x0, eps, v = denoise(x, i)
            if sampler in ('ddpm', 'ddim'):
                # the posterior's variance; eta times its standard deviation is the fresh noise's
                var = ((sigma[i] ** 2 - (alpha[i] / alpha[i + 1] * sigma[i + 1]) ** 2)
                       * sigma[i + 1] ** 2 / sigma[i] ** 2)
                std = eta * var.clamp(min=0).sqrt()
                x_next = alpha[i + 1] * x0 + (sigma[i + 1] ** 2 - std ** 2).clamp(min=0).sqrt() * eps
                if std > 0 and v is not None and sampler == 'ddpm':
                    f, log_beta = (v.double() + 1) / 2, (1 - (alpha[i] / alpha[i + 1]) ** 2).log()
                    std = (0.5 * (f * log_beta + (1 - f) * var.log())).exp().to(x.dtype)
                if std.any():
                    noise = randn(x.shape, generator, x.device, x.dtype)
                    x_next = x_next + std * noise
            else:
                x_next = alpha[i + 1] * x0 + sigma[i + 1] * eps  # Euler
                # Heun: the average of the ODE's slopes at both ends
                if sampler == 'heun' and sigma[i + 1] > 0:
                    x0_2, eps_2, _ = denoise(x_next, i + 1)
                    x_next = scale[i + 1] * (x / scale[i] + (a[i + 1] - a[i]) * (x0 + x0_2) / 2
                                             + (b[i + 1] - b[i]) * (eps + eps_2) / 2)
            x = x_next.to(z.dtype)
        return x

@torch.no_grad()
def meanflow_sample(model, z, y, steps, time_scale=1.0):
    """MeanFlow's sampler (Geng et al. 2025): from noise z at t = 1 to t = 0 in steps even jumps
    z_r = z_t - (t - r) u(z_t, r, t) of a model of average velocities (a DiT with an interval
    embedding, its times read as time_scale t); one step is z - u(z, 0, 1)."""
    t = torch.linspace(1, 0, steps + 1, device=z.device)
    x = z
    for hi, lo in zip(t[:-1], t[1:]):
        t_hi, gap = hi.expand(len(z)), (hi - lo).expand(len(z))
        x = x - (hi - lo) * model(x, time_scale * t_hi, y, interval=time_scale * gap).to(x.dtype)
    return x

def randn(shape, generator, device, dtype=torch.float32):
    """Standard normal noise of shape (B, ...) from a generator, or from a list of B generators, one
    per image: then an image's noise does not depend on the batch it is drawn in (FID during
    training, the same images for any world size)."""
    if isinstance(generator, (list, tuple)):
        return torch.stack([torch.randn(shape[1:], generator=g, device=device, dtype=dtype) for g in generator])
    return torch.randn(shape, generator=generator, device=device, dtype=dtype)


def bcast(coef, x):
    """Per-image coefficients coef, shape (B,) or (1,), as x's dtype, broadcastable against x (B,
    ...)."""
    return coef.to(x.dtype).view(-1, *[1] * (x.dim() - 1))
