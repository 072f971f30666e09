"""model.py: the DiT matches the paper's sizes and FLOPs, starts as adaLN-Zero, and the schedules match their formulas."""
import math

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from model import DIT_PRESETS, DiT, DiTConfig, Diffusion


@pytest.mark.parametrize('name, params_m, gflops', [  # Peebles & Xie 2023, Table 1 and Table 4 (Gflops = 1 per MAC)
    ('DiT-S/2', 33, 6.06), ('DiT-B/2', 130, 23.01), ('DiT-L/2', 458, 80.71), ('DiT-XL/2', 675, 118.64)])
def test_presets_match_the_paper(name, params_m, gflops):
    with torch.device('meta'):  # no memory, no init time: shapes only
        model = DiT(DiTConfig(image_size=32, in_channels=4, num_classes=1000, **DIT_PRESETS[name]))
    n = sum(p.numel() for p in model.parameters())
    print(f"{name}: {n / 1e6:.1f}M parameters (paper {params_m}M), {model.flops_per_sample() / 2e9:.2f} GMACs "
          f"(paper {gflops})")
    assert abs(n / 1e6 - params_m) / params_m < 0.01
    assert abs(model.flops_per_sample() / 2e9 - gflops) / gflops < 0.01


def test_flop_count_matches_torch_flop_counter():
    model = DiT(DiTConfig(image_size=16, in_channels=3, num_classes=10, **DIT_PRESETS['DiT-Ti/2']))
    x, t, y = torch.randn(2, 3, 16, 16), torch.tensor([3.0, 900.0]), torch.tensor([1, 10])
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:  # math SDPA: countable matmuls
        model(x, t, y)
    assert counter.get_total_flops() == 2 * model.flops_per_sample()


def test_adaln_zero_init_and_shapes():
    torch.manual_seed(0)
    model = DiT(DiTConfig(image_size=12, in_channels=2, num_classes=5, **DIT_PRESETS['DiT-N/4']))
    x = torch.randn(3, 2, 12, 12)
    out = model(x, torch.tensor([0, 10, 999]), torch.tensor([0, 4, 5]))  # 5 = the null label
    assert out.shape == x.shape and torch.count_nonzero(out) == 0  # zero-initialised output layer
    for block in model.blocks:  # every residual branch gated shut at init
        assert torch.count_nonzero(block.adaLN_modulation[-1].weight) == 0
    with torch.no_grad():  # the unpatchify is the exact inverse of the patch grid: put a pattern in the output bias
        model.linear_final.bias.copy_(torch.arange(16 * 2, dtype=torch.float))
    out = model(x, torch.tensor([1, 2, 3]), torch.tensor([0, 1, 2]))
    bias = torch.arange(32.0).view(4, 4, 2)  # (p, p, C)
    assert torch.equal(out[0, :, :4, :4], bias.permute(2, 0, 1)) and torch.equal(out[0, :, 8:, 4:8], bias.permute(2, 0, 1))
    with pytest.raises(ValueError, match='not divisible by patch_size 8'):
        DiT(DiTConfig(image_size=28, in_channels=1, num_classes=10, **DIT_PRESETS['DiT-N/8']))


def test_schedules_match_their_formulas():
    T = 1000
    linear = Diffusion('linear', T).alphas_cumprod.double()
    betas = torch.linspace(1e-4, 0.02, T, dtype=torch.float64)
    torch.testing.assert_close(linear, torch.cumprod(1 - betas, 0), rtol=1e-6, atol=0)
    cosine = Diffusion('cosine', T).alphas_cumprod.double()
    f = lambda t: math.cos((t / T + 0.008) / 1.008 * math.pi / 2) ** 2
    for t in (0, 100, 500, 900):  # alpha_bar_t = f(t + 1) / f(0) while the betas are below their 0.999 clip
        assert abs(cosine[t].item() - f(t + 1) / f(0)) < 1e-6
    snr = Diffusion('linear', T).snr(torch.tensor([0, 999]))
    assert snr[0] > 1e3 and snr[1] < 1e-4


def test_ddim_with_the_exact_denoiser_recovers_the_data():
    """If the data is a single point x*, eps(x_t, t) = (x_t - sqrt(a) x*) / sqrt(1 - a) exactly: DDIM must land on x*."""
    diffusion = Diffusion('cosine', 1000)
    target = torch.rand(1, 1, 4, 4) * 1.6 - 0.8

    class Exact(torch.nn.Module):
        config = DiTConfig(num_classes=0)

        def forward(self, x, t, y):
            a = diffusion.alphas_cumprod[t].view(-1, 1, 1, 1)
            return (x - a.sqrt() * target) / (1 - a).sqrt()

    z = torch.randn(8, 1, 4, 4)
    for eta in (0.0, 1.0):
        x = diffusion.ddim_sample(Exact(), z, torch.zeros(8, dtype=torch.long), steps=10, eta=eta)
        torch.testing.assert_close(x, target.expand_as(x), atol=1e-4, rtol=0)


def test_activation_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = DiT(DiTConfig(image_size=8, in_channels=1, num_classes=3, **DIT_PRESETS['DiT-N/4']))
    for p in model.parameters():  # leave adaLN-Zero's zeros so that every branch carries a gradient
        p.data.normal_(0, 0.1)
    x, t, y = torch.randn(4, 1, 8, 8), torch.tensor([1, 50, 400, 999]), torch.tensor([0, 1, 2, 3])
    grads = []
    for on in (False, True):
        model.activation_checkpointing = on
        model.zero_grad()
        model(x, t, y).square().sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*grads)) and grads[0][0].abs().sum() > 0
