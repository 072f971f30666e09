"""
Every network of the kit, once, plus the diffusion schedule and sampler that train_diffusion.py and sample.py share.

DiT: Peebles & Xie 2023, "Scalable Diffusion Models with Transformers" (arXiv:2212.09748).
DDPM: Ho et al. 2020; cosine schedule: Nichol & Dhariwal 2021; DDIM: Song et al. 2021.
"""
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# -----------------------------------------------------------------------------
# DiT

@dataclass
class DiTConfig:
    image_size: int = 32   # input height = width (pixels, or latent cells for latent diffusion)
    in_channels: int = 4
    patch_size: int = 2
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_classes: int = 1000  # 0 = unconditional; label num_classes is the null label for classifier-free guidance

# name -> (depth, hidden_size, num_heads). S/B/L/XL are the paper's Table 1; Ti and N are small ones for CPUs.
DIT_SIZES = {'N': (4, 128, 4), 'Ti': (6, 192, 3), 'S': (12, 384, 6), 'B': (12, 768, 12), 'L': (24, 1024, 16),
             'XL': (28, 1152, 16)}
DIT_PRESETS = {f'DiT-{s}/{p}': dict(depth=d, hidden_size=h, num_heads=n, patch_size=p)
               for s, (d, h, n) in DIT_SIZES.items() for p in (2, 4, 8)}

def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)

def timestep_embedding(t, dim, max_period=10000):
    """Sinusoidal embedding of (B,) real-valued timesteps, as in the transformer and DDPM papers: (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

def sincos_pos_embed_2d(dim, grid_size):
    """Fixed 2-D sine-cosine position embedding (MAE), (grid_size**2, dim): half the channels for each axis."""
    def embed_1d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2))
        out = np.outer(pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)
    gw, gh = np.meshgrid(np.arange(grid_size, dtype=np.float64), np.arange(grid_size, dtype=np.float64))
    emb = np.concatenate([embed_1d(dim // 2, gw), embed_1d(dim // 2, gh)], axis=1)
    return torch.from_numpy(emb).float()

class Attention(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v)  # flash / memory-efficient kernels on CUDA
        return self.proj(x.transpose(1, 2).reshape(B, N, C))

class DiTBlock(nn.Module):
    """Transformer block with adaLN-Zero conditioning: shift, scale and a zero-initialised gate per branch."""
    def __init__(self, dim, num_heads, mlp_ratio):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, int(dim * mlp_ratio)), nn.GELU(approximate='tanh'),
                                 nn.Linear(int(dim * mlp_ratio), dim))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x, c):
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate1.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift1, scale1))
        x = x + gate2.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift2, scale2))
        return x

class DiT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = c = config
        if c.image_size % c.patch_size:
            raise ValueError(f"image_size {c.image_size} is not divisible by patch_size {c.patch_size}; "
                             f"pick a preset with a patch size that divides it (or pad the images)")
        if c.hidden_size % c.num_heads or (c.hidden_size // c.num_heads) % 2:
            raise ValueError(f"hidden_size {c.hidden_size} must split into {c.num_heads} heads of even size")
        self.grid = c.image_size // c.patch_size
        self.x_embedder = nn.Conv2d(c.in_channels, c.hidden_size, c.patch_size, stride=c.patch_size)
        self.register_buffer('pos_embed', sincos_pos_embed_2d(c.hidden_size, self.grid)[None], persistent=False)
        self.t_embedder = nn.Sequential(nn.Linear(256, c.hidden_size), nn.SiLU(), nn.Linear(c.hidden_size, c.hidden_size))
        self.y_embedder = nn.Embedding(c.num_classes + 1, c.hidden_size)  # last row: the null label
        self.blocks = nn.ModuleList([DiTBlock(c.hidden_size, c.num_heads, c.mlp_ratio) for _ in range(c.depth)])
        self.norm_final = nn.LayerNorm(c.hidden_size, elementwise_affine=False, eps=1e-6)
        self.adaLN_final = nn.Sequential(nn.SiLU(), nn.Linear(c.hidden_size, 2 * c.hidden_size))
        self.linear_final = nn.Linear(c.hidden_size, c.patch_size ** 2 * c.in_channels)
        self.activation_checkpointing = False  # recompute each block in the backward pass: less memory, ~1/3 more compute
        self.initialize_weights()

    def initialize_weights(self):
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.x_embedder.weight  # initialise the patch embedding like a linear layer
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.bias)
        nn.init.normal_(self.y_embedder.weight, std=0.02)
        for layer in (self.t_embedder[0], self.t_embedder[2]):
            nn.init.normal_(layer.weight, std=0.02)
        for block in self.blocks:  # adaLN-Zero: every residual branch starts as the identity
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for layer in (self.adaLN_final[-1], self.linear_final):  # the output starts at zero
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x, t, y):
        """x: (B, C, H, W) noisy input; t: (B,) timesteps (any real scale, DDPM uses 0..999); y: (B,) int labels."""
        c, p, g = self.config, self.config.patch_size, self.grid
        x = self.x_embedder(x).flatten(2).transpose(1, 2) + self.pos_embed  # (B, N, D), N = g*g tokens
        cond = self.t_embedder(timestep_embedding(t, 256)) + self.y_embedder(y)
        for block in self.blocks:
            x = checkpoint(block, x, cond, use_reentrant=False) if self.activation_checkpointing else block(x, cond)
        shift, scale = self.adaLN_final(cond).chunk(2, dim=1)
        x = self.linear_final(modulate(self.norm_final(x), shift, scale))  # (B, N, p*p*C)
        x = x.view(-1, g, g, p, p, c.in_channels).permute(0, 5, 1, 3, 2, 4)  # unpatchify
        return x.reshape(-1, c.in_channels, g * p, g * p)

    def flops_per_sample(self):
        """Forward FLOPs for one image, a multiply-add counted as 2 (the DiT paper's Gflops count it as 1).
        Counts the matmuls and attention; norms, activations and embeddings' additions are negligible."""
        c, N, D = self.config, self.grid ** 2, self.config.hidden_size
        hidden = int(D * c.mlp_ratio)
        per_block = 2 * N * (3 * D * D + D * D + 2 * D * hidden)  # qkv, proj, mlp
        per_block += 2 * 2 * N * N * D  # q @ k^T and attn @ v
        per_block += 2 * D * 6 * D  # adaLN modulation (once per image)
        embed = 2 * N * c.in_channels * c.patch_size ** 2 * D + 2 * (256 * D + D * D)  # patches, timestep MLP
        final = 2 * D * 2 * D + 2 * N * D * c.patch_size ** 2 * c.in_channels
        return c.depth * per_block + embed + final

# -----------------------------------------------------------------------------
# Diffusion: the DDPM noise schedule and its samplers. The training loss is written out in train_diffusion.py.

class Diffusion:
    """Discrete-time Gaussian diffusion, x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps, t = 0..T-1.
    schedule 'linear': DDPM betas 1e-4..0.02 scaled to T (Ho et al. 2020); 'cosine': Nichol & Dhariwal 2021, eq. 17."""
    def __init__(self, schedule='linear', num_timesteps=1000):
        T = num_timesteps
        if schedule == 'linear':
            betas = np.linspace(1e-4 * 1000 / T, 0.02 * 1000 / T, T, dtype=np.float64)
        elif schedule == 'cosine':
            f = lambda t: np.cos((t / T + 0.008) / 1.008 * np.pi / 2) ** 2
            betas = np.clip(1 - f(np.arange(1, T + 1)) / f(np.arange(T)), 0, 0.999)
        else:
            raise ValueError(f"unknown schedule '{schedule}'; use 'linear' or 'cosine'")
        self.num_timesteps = T
        self.alphas_cumprod = torch.tensor(np.cumprod(1 - betas), dtype=torch.float32)  # alpha_bar_t

    def snr(self, t):
        """Signal-to-noise ratio alpha_bar / (1 - alpha_bar) at integer timesteps t."""
        a = self.alphas_cumprod.to(t.device)[t]
        return a / (1 - a)

    @torch.no_grad()
    def ddim_sample(self, model, z, y, steps=50, cfg_scale=1.0, eta=0.0, generator=None):
        """DDIM (Song et al. 2021, eq. 12) from noise z over `steps` evenly spaced timesteps; eta=1 is DDPM-like.
        With cfg_scale != 1, classifier-free guidance eps_u + s (eps_c - eps_u) on every output channel."""
        alpha_bar = self.alphas_cumprod.to(z.device)
        ts = torch.linspace(self.num_timesteps - 1, 0, steps, device=z.device).round().long()
        null = torch.full_like(y, model.config.num_classes)
        x = z
        for i, t in enumerate(ts):
            a = alpha_bar[t]
            a_prev = alpha_bar[ts[i + 1]] if i + 1 < steps else torch.ones((), device=z.device)
            tt = t.expand(x.shape[0])
            if cfg_scale == 1.0:
                eps = model(x, tt, y)
            else:
                eps_c, eps_u = model(torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([y, null])).chunk(2)
                eps = eps_u + cfg_scale * (eps_c - eps_u)
            x0 = ((x - (1 - a).sqrt() * eps) / a.sqrt()).clamp(-1, 1)
            eps = (x - a.sqrt() * x0) / (1 - a).sqrt()  # the noise consistent with the clipped x0
            sigma = eta * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)).sqrt()
            x = a_prev.sqrt() * x0 + (1 - a_prev - sigma ** 2).sqrt() * eps
            if eta > 0 and i + 1 < steps:
                x = x + sigma * torch.randn(x.shape, generator=generator, device=x.device)
        return x
