"""
Every network of the kit, once: the denoisers (DiT, UNet), the autoencoder with its PatchGAN and
LPIPS, and the GAN's generator and discriminator, each with its config, presets and init. The
diffusion math is diffusion.py's; the readers of released weights are pretrained.py's.

DiT: Peebles & Xie 2023, "Scalable Diffusion Models with Transformers" (arXiv:2212.09748).
UNet: Ho et al. 2020 and Dhariwal & Nichol 2021 (ADM).
"""
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# -----------------------------------------------------------------------------
# What the networks share: activation checkpointing, zero init, the timestep embedding, and one
# multi-head attention with 2-D RoPE (DiT's over patches, the UNet's and autoencoder's over pixels)

def run_block(block, *inputs, checkpointing=False):
    """block(*inputs); with checkpointing (and autograd on), only the inputs are kept and the block
    is recomputed in the backward pass: the activations' memory for about a third more compute.
    Double backward (R1) works through it."""
    if checkpointing and torch.is_grad_enabled():
        return checkpoint(block, *inputs, use_reentrant=False)
    return block(*inputs)

def run_sequence(layers, h, checkpointing=False):
    """h through layers in turn, each residual block (ResBlock, GANBlock) checkpointed if asked."""
    for layer in layers:
        residual = isinstance(layer, (ResBlock, GANBlock))
        h = run_block(layer, h, checkpointing=checkpointing and residual)
    return h

@torch.compiler.disable
def run_eager(layer, h):
    """layer(h), never compiled: inside a torch.compile'd network a graph break before and after.
    The autoencoder's last layer runs so, because train_ae.py's adaptive weight takes two gradients
    there (autograd.grad with retain_graph), which a compiled backward refuses when it has donated
    its buffers (as torch 2.11 does on CUDA); eager, they never enter a compiled graph."""
    return layer(h)

def zero_init(*layers):
    """Sets the layers' weights and biases to zero."""
    for layer in layers:
        nn.init.zeros_(layer.weight)
        nn.init.zeros_(layer.bias)

def timestep_embedding(t, dim, max_period=10000):
    """Sinusoidal embedding (B, dim) of (B,) real-valued timesteps, as in the transformer and DDPM
    papers."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device).float() / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

def rope_2d(grid, head_dim, base=10000.0):
    """cos and sin of 2-D rotary embedding angles (Su et al. 2021; Heo et al. 2024), each
    (grid**2, head_dim / 2): the first half of a head's channel pairs rotate with the token's column,
    the second half with its row."""
    freqs = base ** (-torch.arange(head_dim // 4, dtype=torch.float64) / (head_dim // 4))
    pos = torch.arange(grid, dtype=torch.float64)
    rows, cols = torch.meshgrid(pos, pos, indexing='ij')
    angles = torch.cat([cols.reshape(-1, 1) * freqs, rows.reshape(-1, 1) * freqs], dim=1)
    return angles.cos().float(), angles.sin().float()

def apply_rope(x, cos, sin):
    """Rotates each channel pair (2i, 2i + 1) of x (B, heads, N, head_dim) by its angle."""
    x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2).type_as(x)

class Attention(nn.Module):
    """Multi-head self-attention over tokens x (B, N, dim): softmax(q k^T / sqrt(head_dim)) v for
    each head (Vaswani et al. 2017), the heads concatenated and projected. DiT's options: RMSNorm
    with a learned scale on each head's queries and keys (qk_norm), and rope = (cos, sin) of rope_2d
    rotating them. PyTorch's default init here; each network's initialize_weights sets its own."""
    def __init__(self, dim, num_heads, qk_norm=False):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        head_norm = lambda: nn.RMSNorm(dim // num_heads, eps=1e-6) if qk_norm else nn.Identity()
        self.q_norm, self.k_norm = head_norm(), head_norm()

    def forward(self, x, rope=None):
        # q, k, v (B, heads, N, head_dim): the qkv output's channels are (3, heads, head_dim)
        q, k, v = self.qkv(x).unflatten(-1, (3, self.num_heads, -1)).permute(2, 0, 3, 1, 4)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        h = F.scaled_dot_product_attention(q, k, v)  # flash / memory-efficient kernels on CUDA
        return self.proj(h.transpose(1, 2).flatten(2))

# -----------------------------------------------------------------------------
# DiT

@dataclass
class DiTConfig:
    image_size: int = 32  # input height = width (pixels, or latent cells for latent diffusion)
    in_channels: int = 4
    patch_size: int = 2
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_classes: int = 1000  # 0 = unconditional; label num_classes is the classifier-free null label
    # LightningDiT's options (Yao et al. 2025): off, the model is the DiT paper's
    norm: str = 'layernorm'  # 'rmsnorm': the blocks' and the final norm are RMSNorm
    mlp: str = 'gelu'  # 'swiglu': silu(x W1) * x W2, then W3, at 2/3 the width (same parameters)
    qk_norm: bool = False  # RMSNorm on each head's queries and keys, with a learned scale
    rope: bool = False  # 2-D rotary embedding of queries and keys (half the pairs per axis), +pos_embed
    # conditioning on a control image of control_channels channels, the input's size (a condition
    # for every step). 'concat': extra input channels; 'controlnet': a trainable copy of the first
    # half of the blocks reads it, joined to the base blocks through zero-initialised projections
    control: str = ''
    control_channels: int = 0
    # released checkpoints (pretrained.dit): learn_sigma doubles the output channels, the
    # prediction then DiT's variance interpolation v (Nichol & Dhariwal 2021, eq. 15), which the
    # ddpm sampler uses; convention='sit': the weights are SiT's (Ma et al. 2024), which read the
    # linear interpolant's time as s = 1 - t (1: data) and predict the velocity x0 - eps. forward
    # converts, so that the network takes diffusion.Diffusion's 1000 t and gives its eps - x0
    learn_sigma: bool = False
    convention: str = 'kit'
    # MeanFlow (Geng et al. 2025): a second time embedding, of the interval t - r the output averages
    # the velocity over; zero-initialised, so that a flow model loaded into it starts as itself
    interval: bool = False

# name -> (depth, hidden_size, num_heads): S/B/L/XL are the paper's Table 1, Ti and N small for CPUs
DIT_SIZES = {'N': (4, 128, 4), 'Ti': (6, 192, 3), 'S': (12, 384, 6), 'B': (12, 768, 12),
             'L': (24, 1024, 16), 'XL': (28, 1152, 16)}
DIT_PRESETS = {f'DiT-{size}/{p}': dict(depth=depth, hidden_size=width, num_heads=heads, patch_size=p)
               for size, (depth, width, heads) in DIT_SIZES.items() for p in (1, 2, 4, 8)}

def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)

def sincos_pos_embed_2d(dim, grid_size):
    """Fixed 2-D sine-cosine position embedding (MAE), (grid_size**2, dim), half the channels per
    axis."""
    def embed_1d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2))
        angles = np.outer(pos.reshape(-1), omega)
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)
    pos = np.arange(grid_size, dtype=np.float64)
    gw, gh = np.meshgrid(pos, pos)
    emb = np.concatenate([embed_1d(dim // 2, gw), embed_1d(dim // 2, gh)], axis=1)
    return torch.from_numpy(emb).float()

def norm_layer(kind, dim):
    """The pre-norm of a DiT block, without affine parameters (adaLN scales and shifts)."""
    if kind == 'rmsnorm':
        return nn.RMSNorm(dim, eps=1e-6, elementwise_affine=False)
    return nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)

class SwiGLU(nn.Module):
    """silu(x W1) * (x W2), then W3 (Shazeer 2020)."""
    def __init__(self, dim, hidden):
        super().__init__()
        self.w12, self.w3 = nn.Linear(dim, 2 * hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        a, b = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(a) * b)

def mlp_width(config):
    """Hidden width of a block's MLP: mlp_ratio x hidden_size (2/3 of it for SwiGLU's 3 matrices)."""
    return int(config.hidden_size * config.mlp_ratio * (2 / 3 if config.mlp == 'swiglu' else 1))

class DiTBlock(nn.Module):
    """Transformer block with adaLN-Zero conditioning: a shift, scale and gate per branch from cond."""
    def __init__(self, config):
        super().__init__()
        dim, hidden = config.hidden_size, mlp_width(config)
        self.norm1 = norm_layer(config.norm, dim)
        self.attn = Attention(dim, config.num_heads, config.qk_norm)
        self.norm2 = norm_layer(config.norm, dim)
        if config.mlp == 'swiglu':
            self.mlp = SwiGLU(dim, hidden)
        else:
            gelu = nn.GELU(approximate='tanh')
            self.mlp = nn.Sequential(nn.Linear(dim, hidden), gelu, nn.Linear(hidden, dim))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x, cond, rope=None):
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(cond).chunk(6, dim=1)
        x = x + gate1.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift1, scale1), rope)
        x = x + gate2.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift2, scale2))
        return x

class Denoiser(nn.Module):
    """What the denoisers (DiT, UNet) share: the start of a fine-tuning run from a base model."""
    input_layer = ''  # the layer whose input channels a 'concat' control widens

    def load_base(self, weights, base_control=''):
        """Starts from a base model's weights (a state dict of this architecture, trained without
        control, base_control '', or with this network's): the new control weights start where they
        change nothing, a 'concat' control's input channels at zero and a ControlNet's blocks as a
        copy of the base's first ones. ValueError when the weights do not fit."""
        control, weights = self.config.control, dict(weights)
        if control == 'concat' and not base_control:
            w = weights[f'{self.input_layer}.weight']  # (out, in, k, k)
            weights[f'{self.input_layer}.weight'] = torch.cat(
                [w, w.new_zeros(w.shape[0], self.config.control_channels, *w.shape[2:])], dim=1)
        missing, unexpected = self.load_state_dict(weights, strict=False)
        if unexpected or any(not k.startswith('control_') for k in missing):
            raise ValueError(f"missing {missing}, unexpected {unexpected}")
        if control == 'controlnet' and not base_control:
            self.control_blocks.load_state_dict(self.blocks[:len(self.control_blocks)].state_dict())

class DiT(Denoiser):
    input_layer = 'x_embedder'

    def __init__(self, config):
        super().__init__()
        self.config = config
        dim, p = config.hidden_size, config.patch_size
        if config.image_size % p:
            raise ValueError(f"image_size {config.image_size} is not divisible by patch_size {p}; "
                             f"pick a preset with a patch size that divides it (or pad the images)")
        head_dim, multiple = dim // config.num_heads, 4 if config.rope else 2
        if dim % config.num_heads or head_dim % multiple:
            raise ValueError(f"hidden_size {dim} must split into {config.num_heads} heads of a size "
                             f"divisible by {multiple}")
        for key, allowed in [('norm', ('layernorm', 'rmsnorm')), ('mlp', ('gelu', 'swiglu')),
                             ('control', ('', 'concat', 'controlnet')),
                             ('convention', ('kit', 'sit'))]:
            if getattr(config, key) not in allowed:
                raise ValueError(f"{key}='{getattr(config, key)}' is not one of {allowed}")
        if bool(config.control) != (config.control_channels > 0):
            raise ValueError(f"control='{config.control}' with control_channels="
                             f"{config.control_channels}: set both or neither")
        self.grid = config.image_size // p
        patch_embed = lambda channels: nn.Conv2d(channels, dim, p, stride=p)
        concat = config.control_channels if config.control == 'concat' else 0
        self.x_embedder = patch_embed(config.in_channels + concat)
        pos_embed = sincos_pos_embed_2d(dim, self.grid)[None]
        self.register_buffer('pos_embed', pos_embed, persistent=False)
        if config.rope:
            cos, sin = rope_2d(self.grid, head_dim)
            self.register_buffer('rope_cos', cos, persistent=False)
            self.register_buffer('rope_sin', sin, persistent=False)
        self.t_embedder = nn.Sequential(nn.Linear(256, dim), nn.SiLU(), nn.Linear(dim, dim))
        if config.interval:
            self.h_embedder = nn.Sequential(nn.Linear(256, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.y_embedder = nn.Embedding(config.num_classes + 1, dim)  # last row: the null label
        self.blocks = nn.ModuleList([DiTBlock(config) for _ in range(config.depth)])
        # ControlNet (Zhang et al. 2023) on a DiT as in PixArt-delta (Chen et al. 2024): copies of
        # blocks[:depth // 2] read the control image, each block's output projected onto the base's
        if config.control == 'controlnet':
            half = config.depth // 2
            self.control_embedder = patch_embed(config.control_channels)
            self.control_blocks = nn.ModuleList([DiTBlock(config) for _ in range(half)])
            self.control_out = nn.ModuleList([nn.Linear(dim, dim) for _ in range(half)])
        self.norm_final = norm_layer(config.norm, dim)
        self.adaLN_final = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.out_channels = config.in_channels * (2 if config.learn_sigma else 1)
        self.linear_final = nn.Linear(dim, p ** 2 * self.out_channels)
        # recompute each block in the backward pass: less memory, about a third more compute
        self.activation_checkpointing = False
        self.run_block = run_block  # compile_for_training may compile it
        self.initialize_weights()

    def initialize_weights(self):
        # xavier-uniform linear layers, the patch embedding initialised as one; N(0, 0.02) tables
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.x_embedder.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.bias)
        nn.init.normal_(self.y_embedder.weight, std=0.02)
        for layer in (self.t_embedder[0], self.t_embedder[2]):
            nn.init.normal_(layer.weight, std=0.02)
        if self.config.interval:
            nn.init.normal_(self.h_embedder[0].weight, std=0.02)
            zero_init(self.h_embedder[2])
        # adaLN-Zero: every block's gates are zero, so each residual branch starts as the identity,
        # and the final layer is zero, so the output starts at zero
        zero_init(*[block.adaLN_modulation[-1] for block in self.blocks])
        zero_init(self.adaLN_final[-1], self.linear_final)
        # the control branch starts silent (zero input embedding and output projections), so that the
        # model starts as its base
        if self.config.control == 'controlnet':
            zero_init(self.control_embedder, *self.control_out)

    def forward(self, x, t, y, control=None, features=(), interval=None):
        """x: (B, C, H, W) noisy input; t: (B,) timesteps (any real scale, DDPM uses 0..999);
        y: (B,) int labels; control: (B, control_channels, H, W) when the model has one. features:
        block numbers (1 to depth) whose output tokens (B, N, D) are returned too, as a list after
        the prediction (train_diffusion.py's representation terms read them). interval: (B,) t - r
        on t's scale, for a model with config.interval (MeanFlow's average velocity from r to t)."""
        config, p, g = self.config, self.config.patch_size, self.grid
        if (control is None) != (not config.control):
            raise ValueError(f"this DiT has control='{config.control}' but was called "
                             f"with{'out' if control is None else ''} a control image")
        if (interval is None) == config.interval:
            raise ValueError(f"this DiT has interval={config.interval} but was called "
                             f"with{'out' if interval is None else ''} an interval")
        if config.control == 'concat':
            x = torch.cat([x, control.to(x.dtype)], dim=1)
        # tokens (B, N, D), N = g*g, and the conditioning vector (B, D)
        x = self.x_embedder(x).flatten(2).transpose(1, 2) + self.pos_embed
        if config.convention == 'sit':
            t = 1 - t / 1000
        cond = self.t_embedder(timestep_embedding(t, 256)) + self.y_embedder(y)
        if config.interval:
            cond = cond + self.h_embedder(timestep_embedding(interval, 256))
        rope = (self.rope_cos, self.rope_sin) if config.rope else None
        checkpointing = self.activation_checkpointing
        run = lambda block, h: self.run_block(block, h, cond, rope, checkpointing=checkpointing)
        # the ControlNet's output after each of its blocks, added to the base block of that depth
        residuals = []
        if config.control == 'controlnet':
            h = x + self.control_embedder(control.to(x.dtype)).flatten(2).transpose(1, 2)
            for block, proj in zip(self.control_blocks, self.control_out):
                h = run(block, h)
                residuals.append(proj(h))
        hidden = {}
        for i, block in enumerate(self.blocks):
            x = run(block, x) + (residuals[i] if i < len(residuals) else 0)
            if i + 1 in features:
                hidden[i + 1] = x
        shift, scale = self.adaLN_final(cond).chunk(2, dim=1)
        x = self.linear_final(modulate(self.norm_final(x), shift, scale))  # (B, N, p*p*C)
        # unpatchify
        x = x.view(-1, g, g, p, p, self.out_channels).permute(0, 5, 1, 3, 2, 4)
        x = x.reshape(-1, self.out_channels, g * p, g * p)
        x = -x if config.convention == 'sit' else x
        return (x, [hidden[i] for i in features]) if features else x

    def flops_per_sample(self):
        """Forward FLOPs for one image, a multiply-add counted as 2 (the DiT paper's Gflops count it
        as 1): the matmuls and attention; norms, activations and additions are negligible."""
        config, N, dim = self.config, self.grid ** 2, self.config.hidden_size
        patch = 2 * N * config.patch_size ** 2 * dim  # per channel, in or out
        # per block: qkv, proj and the MLP on every token; q @ k^T and attn @ v; adaLN once
        mlp = (3 if config.mlp == 'swiglu' else 2) * dim * mlp_width(config)
        per_block = 2 * N * (3 * dim * dim + dim * dim + mlp) + 2 * 2 * N * N * dim + 2 * dim * 6 * dim
        # patches and timestep MLPs; final adaLN and linear layer; the ControlNet's blocks, control_out
        embed = patch * (config.in_channels + config.control_channels) + 2 * (256 * dim + dim * dim) * (1 + config.interval)
        final = 2 * dim * 2 * dim + patch * self.out_channels
        controlnet = (config.depth // 2) * (per_block + 2 * N * dim * dim)
        if config.control != 'controlnet':
            controlnet = 0
        return config.depth * per_block + embed + final + controlnet

# -----------------------------------------------------------------------------
# UNet: a compact ADM / DDPM++ style network for pixel-space recipes (Ho et al. 2020; Dhariwal and
# Nichol 2021)

@dataclass
class UNetConfig:
    image_size: int = 32
    in_channels: int = 3
    # level i has channels * channel_mult[i] channels (multiples of 32: GroupNorm(32)); each level but
    # the last is followed by a 2x downsampling
    channels: int = 128
    channel_mult: tuple = (1, 2, 2, 2)
    num_res_blocks: int = 2  # residual blocks per level on the way down (one more on the way up)
    attn_levels: tuple = (1,)  # levels (0: full resolution) with self-attention, as in the middle
    head_channels: int = 64
    dropout: float = 0.1
    num_classes: int = 0  # as DiTConfig: 0 = unconditional, label num_classes is the null label
    # 'concat': a control image of control_channels channels as extra input channels (as DiTConfig)
    control: str = ''
    control_channels: int = 0

# UNet-S: 28-32 px on a CPU; UNet-B: DDPM's CIFAR-10 layout, ~36M
UNET_PRESETS = {
    'UNet-S': dict(channels=64, channel_mult=(1, 2, 2), attn_levels=(1, 2), head_channels=32),
    'UNet-B': dict(channels=128, channel_mult=(1, 2, 2, 2), attn_levels=(1,)),
}

class ResBlock(nn.Module):
    """The UNet's and the autoencoder's residual block: skip(x) + conv(act(norm(conv(act(norm(x))))))
    with act = SiLU, norm = GroupNorm, the second norm scaled and shifted by the time+class embedding
    (ADM's scale-shift norm; none when emb_dim is 0, as in the autoencoder), and skip a 1x1 conv
    where the width changes. With num_heads, self-attention over the pixels follows, added to its
    input. eps: the GroupNorms' (ADM's 1e-5; LDM's autoencoder's 1e-6)."""
    def __init__(self, cin, cout, emb_dim, dropout, num_heads=0, eps=1e-5):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(32, cin, eps), nn.Conv2d(cin, cout, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, 2 * cout) if emb_dim else None
        self.norm2, self.dropout = nn.GroupNorm(32, cout, eps), nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()
        self.norm_attn = nn.GroupNorm(32, cout, eps) if num_heads else None
        self.attn = Attention(cout, num_heads) if num_heads else None

    def forward(self, x, emb=None):
        h = self.norm2(self.conv1(F.silu(self.norm1(x))))
        if self.emb_proj is not None:
            scale, shift = self.emb_proj(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
            h = h * (1 + scale) + shift
        x = self.skip(x) + self.conv2(self.dropout(F.silu(h)))
        if self.attn is not None:
            # the H*W pixels as tokens (B, H*W, C)
            tokens = self.norm_attn(x).flatten(2).transpose(1, 2)
            x = x + self.attn(tokens).transpose(1, 2).reshape(x.shape)
        return x

class UNet(Denoiser):
    input_layer = 'conv_in'

    def __init__(self, config):
        super().__init__()
        self.config = config
        levels, ch, emb_dim = len(config.channel_mult), config.channels, 4 * config.channels
        if config.image_size % 2 ** (levels - 1):
            raise ValueError(f"image_size {config.image_size} is not divisible by 2^{levels - 1}, "
                             f"the UNet's {levels - 1} downsamplings; pick a preset with fewer levels "
                             f"(or pad the images)")
        set_together = bool(config.control) == (config.control_channels > 0)
        if config.control not in ('', 'concat') or not set_together:
            raise ValueError(f"control='{config.control}' with control_channels="
                             f"{config.control_channels}: the UNet takes control='concat' with "
                             f"control_channels > 0, or neither ('controlnet' is the DiT's)")

        def res_block(cin, cout, attn):
            heads = cout // config.head_channels if attn else 0
            return ResBlock(cin, cout, emb_dim, config.dropout, heads)

        self.t_embedder = nn.Sequential(nn.Linear(ch, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.y_embedder = nn.Embedding(config.num_classes + 1, emb_dim)  # last row: the null label
        self.conv_in = nn.Conv2d(config.in_channels + config.control_channels, ch, 3, padding=1)
        self.down, skip_channels, cur = nn.ModuleList(), [ch], ch
        for level, mult in enumerate(config.channel_mult):
            for _ in range(config.num_res_blocks):
                self.down.append(res_block(cur, ch * mult, level in config.attn_levels))
                cur = ch * mult
                skip_channels.append(cur)
            if level + 1 < levels:
                self.down.append(nn.Conv2d(cur, cur, 3, stride=2, padding=1))
                skip_channels.append(cur)
        self.mid = nn.ModuleList([res_block(cur, cur, True), res_block(cur, cur, False)])
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(config.channel_mult))):
            for _ in range(config.num_res_blocks + 1):
                cin = cur + skip_channels.pop()
                self.up.append(res_block(cin, ch * mult, level in config.attn_levels))
                cur = ch * mult
            if level > 0:
                self.up.append(nn.Sequential(nn.Upsample(scale_factor=2, mode='nearest'),
                                             nn.Conv2d(cur, cur, 3, padding=1)))
        self.norm_out = nn.GroupNorm(32, cur)
        self.conv_out = nn.Conv2d(cur, config.in_channels, 3, padding=1)
        self.activation_checkpointing = False
        self._flops = None
        self.initialize_weights()

    def initialize_weights(self):
        # PyTorch's default init, but each residual block's last conv and attention output projection
        # are zero, so that the block starts as its skip path (the identity where the width stays),
        # and the output conv is zero, so that the output starts at zero
        zero = [self.conv_out]
        for block in self.modules():
            if isinstance(block, ResBlock):
                zero += [block.conv2] + ([block.attn.proj] if block.attn is not None else [])
        zero_init(*zero)

    def forward(self, x, t, y, control=None):
        """As DiT.forward: x (B, C, H, W), t (B,) real-valued timesteps, y (B,) int labels,
        control (B, Cc, H, W)."""
        if (control is None) != (not self.config.control):
            raise ValueError(f"this UNet has control='{self.config.control}' but was called with"
                             f"{'out' if control is None else ''} a control image")
        if control is not None:
            x = torch.cat([x, control.to(x.dtype)], dim=1)
        emb = self.t_embedder(timestep_embedding(t, self.config.channels)) + self.y_embedder(y)
        run = lambda block, h: run_block(block, h, emb, checkpointing=self.activation_checkpointing)
        h = self.conv_in(x)
        skips = [h]
        for layer in self.down:
            h = run(layer, h) if isinstance(layer, ResBlock) else layer(h)
            skips.append(h)
        for layer in self.mid:
            h = run(layer, h)
        for layer in self.up:
            if isinstance(layer, ResBlock):
                h = run(layer, torch.cat([h, skips.pop()], dim=1))
            else:
                h = layer(h)
        return self.conv_out(F.silu(self.norm_out(h)))

    def flops_per_sample(self):
        """Forward FLOPs for one image (a multiply-add is 2), counted once by FlopCounterMode."""
        if self._flops is None:
            config, dev = self.config, next(self.parameters()).device
            size = config.image_size
            zeros = lambda channels: torch.zeros(1, channels, size, size, device=dev)
            self._flops = count_flops(self, zeros(config.in_channels), torch.zeros(1, device=dev),
                                      torch.zeros(1, dtype=torch.long, device=dev),
                                      zeros(config.control_channels) if config.control else None)
        return self._flops

def compile_for_training(net):
    """torch.compile of a network for its train step. A DiT with activation checkpointing compiles block
    by block, each block's checkpoint inside its own graph: a block is then recomputed only in its own
    backward, and the memory a step holds is the blocks' inputs plus one block's activations, by
    construction. One graph of all the blocks may schedule every block's recomputation at once
    (pytorch/pytorch#193193): a compiled DiT-XL/2 so kept its peak memory, 91 GiB, with checkpointing
    as without (torch 2.11, H200). Its blocks are alike, so that they share one graph (from torch 2.5,
    which inlines nn modules; on 2.4 blocks past the eighth run eager: the same math, slower).
    Otherwise, and for the other networks, whose blocks differ in shape, the whole network is one
    graph."""
    if isinstance(net, DiT) and net.activation_checkpointing:
        net.run_block = torch.compile(run_block)
        return net
    return torch.compile(net)

def count_flops(net, *inputs):
    """FLOPs of net(*inputs) (a multiply-add is 2) by torch's FlopCounterMode, in eval mode (dropout
    draws nothing)."""
    from torch.utils.flop_counter import FlopCounterMode
    training = net.training
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        net.eval()(*inputs)
    net.train(training)
    return counter.get_total_flops()

# -----------------------------------------------------------------------------
# Autoencoder: the LDM AutoencoderKL family (Rombach et al. 2022, built on Esser et al. 2021's VQGAN),
# which gives latent diffusion its latents; plus the PatchGAN discriminator and the LPIPS distance
# train_ae.py trains it with

@dataclass
class AEConfig:
    image_size: int = 256
    in_channels: int = 3
    # as UNetConfig: level i has channels * channel_mult[i] channels, a 2x downsampling between levels
    channels: int = 128
    channel_mult: tuple = (1, 2, 4, 4)
    num_res_blocks: int = 2  # residual blocks per level in the encoder (one more in the decoder)
    z_channels: int = 4
    mid_attention: bool = True  # single-head self-attention in the middle of the encoder and decoder
    kl: bool = True  # a diagonal-Gaussian posterior (mean, log-variance); False: a plain autoencoder
    dropout: float = 0.0
    num_classes: int = 0  # > 0: a head on the latent predicting the image's class (train_ae.py cls_weight)
    seg_classes: int = 0  # > 0: a head on the decoder's last features predicting a label per pixel

# AE-B/f8 is LDM's kl-f8, the Stable Diffusion VAE (84M; pretrained.sd_vae loads its
# released weights); S is a small one for CPUs.
# f = 2^(levels - 1).
AE_SIZES = {'S': dict(channels=32, num_res_blocks=1), 'B': dict(channels=128, num_res_blocks=2)}
AE_PRESETS = {f'AE-{size}/f{f}': dict(kw, channel_mult=(1, 2, 4, 4, 4)[:levels])
              for size, kw in AE_SIZES.items() for f, levels in ((4, 3), (8, 4), (16, 5))}

class Autoencoder(nn.Module):
    """LDM's AutoencoderKL, layer for layer. Encoder: conv, levels of residual blocks with a stride-2
    convolution between levels (its input padded by one row and column at the bottom and right, as
    LDM's), a middle block (residual, attention, residual), GroupNorm, SiLU and a conv to 2
    z_channels (mean, log-variance) or z_channels, then a 1x1 conv (quant_conv). The decoder: a
    1x1 conv (post_quant_conv), then the mirror image with nearest-neighbour upsampling. Latents
    are (B, z_channels, H / f, W / f); every GroupNorm has eps 1e-6. Optional heads, trained with it
    by train_ae.py and unused by diffusion: a class head on the latent z (linear, on all of it: the
    classes must be linearly separable in the latent) and a segmentation head beside the last layer
    (a 3x3 conv to class logits)."""
    def __init__(self, config):
        super().__init__()
        self.config = config
        widths = [config.channels * m for m in config.channel_mult]
        # f: latents are (z_channels, image_size / f, image_size / f)
        self.factor = 2 ** (len(widths) - 1)
        if config.image_size % self.factor:
            raise ValueError(f"image_size {config.image_size} is not divisible by the downsampling "
                             f"factor {self.factor}; pick a smaller f (or pad the images)")
        # residual blocks without a time embedding, attention with one head; the middle block
        res_block = lambda cin, cout, attn=False: ResBlock(cin, cout, 0, config.dropout, int(attn),
                                                           eps=1e-6)
        mid = lambda width: [res_block(width, width, config.mid_attention), res_block(width, width)]
        out = lambda width, channels: [nn.GroupNorm(32, width, 1e-6), nn.SiLU(),
                                       nn.Conv2d(width, channels, 3, padding=1)]
        z_out = 2 * config.z_channels if config.kl else config.z_channels
        cur = widths[0]
        enc = [nn.Conv2d(config.in_channels, cur, 3, padding=1)]
        for level, width in enumerate(widths):
            for _ in range(config.num_res_blocks):
                enc.append(res_block(cur, width))
                cur = width
            if level + 1 < len(widths):
                enc.append(nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)),
                                         nn.Conv2d(cur, cur, 3, stride=2)))
        enc += [*mid(cur), *out(cur, z_out)]
        dec = [nn.Conv2d(config.z_channels, cur, 3, padding=1), *mid(cur)]
        for level, width in reversed(list(enumerate(widths))):
            for _ in range(config.num_res_blocks + 1):
                dec.append(res_block(cur, width))
                cur = width
            if level > 0:
                dec.append(nn.Sequential(nn.Upsample(scale_factor=2, mode='nearest'),
                                         nn.Conv2d(cur, cur, 3, padding=1)))
        dec += out(cur, config.in_channels)
        self.encoder, self.decoder = nn.Sequential(*enc), nn.Sequential(*dec)
        self.quant_conv = nn.Conv2d(z_out, z_out, 1)
        self.post_quant_conv = nn.Conv2d(config.z_channels, config.z_channels, 1)
        latent_size = config.image_size // self.factor
        self.cls_head = nn.Sequential(nn.Flatten(), nn.Linear(
            config.z_channels * latent_size ** 2, config.num_classes)) if config.num_classes else None
        self.seg_head = nn.Conv2d(cur, config.seg_classes, 3, padding=1) if config.seg_classes else None
        self.activation_checkpointing = False
        self._flops = None
        self.initialize_weights()

    def initialize_weights(self):
        # PyTorch's default init, but each residual block's last conv and attention output projection
        # are zero, so that the block starts as its skip path (the identity where the width stays)
        zero = []
        for block in self.modules():
            if isinstance(block, ResBlock):
                zero += [block.conv2] + ([block.attn.proj] if block.attn is not None else [])
        zero_init(*zero)

    @property
    def last_layer(self):  # where train_ae.py balances the adversarial loss against the others
        return self.decoder[-1]

    def encode(self, x):
        """x (B, C, H, W) in [-1, 1] -> the posterior's mean and log-variance (None for a plain
        autoencoder: the latent and None)."""
        h = self.quant_conv(run_sequence(self.encoder, x, self.activation_checkpointing))
        if not self.config.kl:
            return h, None
        mean, logvar = h.chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, z, features=False):
        """The image of latents z (and, with features, the last layer's input)."""
        h = run_sequence(self.decoder[:-1], self.post_quant_conv(z), self.activation_checkpointing)
        x = run_eager(self.last_layer, h)
        return (x, h) if features else x

    def forward(self, x, eps=None):
        """The reconstruction of x from z = mean + exp(logvar / 2) eps (the mean when eps is None),
        mean, logvar, and the heads' logits ({'cls': (B, num_classes), 'seg': (B, seg_classes, H, W)},
        those the model has)."""
        mean, logvar = self.encode(x)
        z = mean
        if logvar is not None and eps is not None:
            z = mean + (0.5 * logvar).exp() * eps.to(mean.dtype)
        xrec, h = self.decode(z, features=True)
        heads = {}
        if self.cls_head is not None:
            heads['cls'] = self.cls_head(z)
        if self.seg_head is not None:
            heads['seg'] = self.seg_head(h)
        return xrec, mean, logvar, heads

    def flops_per_sample(self):
        """Forward FLOPs of encoding and decoding one image (a multiply-add is 2)."""
        if self._flops is None:
            config, dev = self.config, next(self.parameters()).device
            x = torch.zeros(1, config.in_channels, config.image_size, config.image_size, device=dev)
            self._flops = count_flops(self, x)
        return self._flops

class PatchDiscriminator(nn.Module):
    """pix2pix's PatchGAN (Isola et al. 2017) as VQGAN and LDM use it: a map of logits, each judging
    one patch (70 px wide with 3 layers). GroupNorm in place of BatchNorm: no batch statistics, so
    the same for any world size or micro-batch, and no running averages to go stale."""
    def __init__(self, in_channels, channels=64, num_layers=3):
        super().__init__()
        layers, cur = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2)], channels
        for i in range(1, num_layers + 1):
            width = channels * min(2 ** i, 8)
            layers += [nn.Conv2d(cur, width, 4, 2 if i < num_layers else 1, 1, bias=False),
                       nn.GroupNorm(32, width), nn.LeakyReLU(0.2)]
            cur = width
        self.net = nn.Sequential(*layers, nn.Conv2d(cur, 1, 4, 1, 1))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)  # pix2pix's init

    def forward(self, x):
        return self.net(x)

class LPIPS(nn.Module):
    """Zhang et al. 2018's learned perceptual distance on VGG16, from local files only:
    torchvision's VGG16 weights (vgg16-397923af.pth) and the lpips package's linear heads
    (lpips/weights/v0.1/vgg.pth). Images in [-1, 1]."""
    # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 in torchvision's vgg16().features
    taps = (3, 8, 15, 22, 29)

    def __init__(self):
        super().__init__()
        # torchvision's layers at its indices, so that its state dict loads as is; 'M': max-pooling
        layers, cin = [], 3
        for v in (64, 64, 'M', 128, 128, 'M', 256, 256, 256, 'M', 512, 512, 512, 'M', 512, 512, 512):
            if v == 'M':
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(cin, v, 3, padding=1), nn.ReLU()]
                cin = v
        self.features = nn.Sequential(*layers)
        widths = (64, 128, 256, 512, 512)
        self.lins = nn.ModuleList(nn.Conv2d(width, 1, 1, bias=False) for width in widths)
        self.register_buffer('shift', torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1))
        self.register_buffer('scale', torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1))
        self.requires_grad_(False).eval()

    def load(self, vgg_path, lin_path):
        """Loads the two files; raises ValueError naming what does not fit."""
        vgg = torch.load(vgg_path, map_location='cpu', weights_only=True)
        lin = torch.load(lin_path, map_location='cpu', weights_only=True)
        try:
            prefix = 'features.'
            features = {k[len(prefix):]: v for k, v in vgg.items() if k.startswith(prefix)}
            self.features.load_state_dict(features)
            for i, conv in enumerate(self.lins):
                conv.weight.copy_(lin[f'lin{i}.model.1.weight'])
        except (RuntimeError, KeyError) as e:
            raise ValueError(f"{vgg_path} and {lin_path} are not torchvision's VGG16 and LPIPS's vgg "
                             f"heads ({str(e).splitlines()[0][:120]})")
        return self

    def forward(self, a, b):
        """Per-image distance (B,) between image batches a and b (1 or 3 channels)."""
        h = (torch.cat([a, b]).expand(-1, 3, -1, -1) - self.shift) / self.scale
        d = 0
        for i, layer in enumerate(self.features[:self.taps[-1] + 1]):
            h = layer(h)
            if i in self.taps:
                # each position's features at unit length; the head weighs their squared difference
                fa, fb = (h / (h.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)).chunk(2)
                d = d + self.lins[self.taps.index(i)]((fa - fb) ** 2).mean(dim=(1, 2, 3))
        return d

# -----------------------------------------------------------------------------
# Inception-v3 as FID measures with it: the TensorFlow 2015 graph (classify_image_graph_def.pb) that
# TTUR's FID and the ADM evaluation suite run, in PyTorch, with torchvision's names so that the
# converted weights pytorch-fid and torch-fidelity download (pt_inception-2015-12-05-6726825d.pth,
# weights-inception-2015-12-05-6726825d.pth) load as they are. It differs from torchvision's network
# where the graph does: average pools that leave the padding out of their counts, a max pool in the
# last block, 1008 classes, and TensorFlow 1's bilinear resize of the input to 299 x 299.

def resize_bilinear_tf1(x, size):
    """x (B, C, H, W) resized to (size, size) as TensorFlow 1's resize_bilinear (align_corners=False,
    no half-pixel centres): output pixel i reads the input at i * in / out, between its two neighbours
    (the last one repeated at the edge). torch's interpolate has no such mode."""
    def taps(n_in):
        pos = torch.arange(size, dtype=torch.float64, device=x.device) * (n_in / size)
        lo = pos.floor().long().clamp(max=n_in - 1)
        return lo, (lo + 1).clamp(max=n_in - 1), (pos - lo).to(x.dtype)
    (y0, y1, wy), (x0, x1, wx) = taps(x.shape[2]), taps(x.shape[3])
    rows = x[:, :, y0] + (x[:, :, y1] - x[:, :, y0]) * wy[:, None]
    return rows[..., x0] + (rows[..., x1] - rows[..., x0]) * wx

class ConvBN(nn.Module):
    """conv (no bias), batch norm (eps 1e-3, as the graph's), ReLU: the graph's every conv layer."""
    def __init__(self, cin, cout, kernel, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride, padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=1e-3)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))

def avg_pool_3x3(x):  # the graph's average pools count only the pixels inside the image
    return F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)

class InceptionA(nn.Module):  # 35 x 35: 1x1, 5x5, two 3x3, pool
    def __init__(self, cin, pool_features):
        super().__init__()
        self.branch1x1 = ConvBN(cin, 64, 1)
        self.branch5x5_1, self.branch5x5_2 = ConvBN(cin, 48, 1), ConvBN(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = ConvBN(cin, 64, 1)
        self.branch3x3dbl_2, self.branch3x3dbl_3 = ConvBN(64, 96, 3, padding=1), ConvBN(96, 96, 3, padding=1)
        self.branch_pool = ConvBN(cin, pool_features, 1)

    def forward(self, x):
        return torch.cat([self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          self.branch_pool(avg_pool_3x3(x))], 1)

class InceptionB(nn.Module):  # 35 -> 17
    def __init__(self, cin):
        super().__init__()
        self.branch3x3 = ConvBN(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = ConvBN(cin, 64, 1)
        self.branch3x3dbl_2, self.branch3x3dbl_3 = ConvBN(64, 96, 3, padding=1), ConvBN(96, 96, 3, stride=2)

    def forward(self, x):
        return torch.cat([self.branch3x3(x), self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          F.max_pool2d(x, 3, 2)], 1)

class InceptionC(nn.Module):  # 17 x 17: 1x1, 7x7 factored as 1x7 and 7x1, twice, pool
    def __init__(self, cin, c7):
        super().__init__()
        row, col = dict(kernel=(1, 7), padding=(0, 3)), dict(kernel=(7, 1), padding=(3, 0))
        self.branch1x1 = ConvBN(cin, 192, 1)
        self.branch7x7_1, self.branch7x7_2, self.branch7x7_3 = ConvBN(cin, c7, 1), ConvBN(c7, c7, **row), ConvBN(c7, 192, **col)
        self.branch7x7dbl_1, self.branch7x7dbl_2 = ConvBN(cin, c7, 1), ConvBN(c7, c7, **col)
        self.branch7x7dbl_3, self.branch7x7dbl_4 = ConvBN(c7, c7, **row), ConvBN(c7, c7, **col)
        self.branch7x7dbl_5 = ConvBN(c7, 192, **row)
        self.branch_pool = ConvBN(cin, 192, 1)

    def forward(self, x):
        dbl = x
        for i in range(1, 6):
            dbl = getattr(self, f'branch7x7dbl_{i}')(dbl)
        return torch.cat([self.branch1x1(x), self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))), dbl,
                          self.branch_pool(avg_pool_3x3(x))], 1)

class InceptionD(nn.Module):  # 17 -> 8
    def __init__(self, cin):
        super().__init__()
        self.branch3x3_1, self.branch3x3_2 = ConvBN(cin, 192, 1), ConvBN(192, 320, 3, stride=2)
        self.branch7x7x3_1 = ConvBN(cin, 192, 1)
        self.branch7x7x3_2 = ConvBN(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = ConvBN(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = ConvBN(192, 192, 3, stride=2)

    def forward(self, x):
        b7 = x
        for i in range(1, 5):
            b7 = getattr(self, f'branch7x7x3_{i}')(b7)
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, 3, 2)], 1)

class InceptionE(nn.Module):  # 8 x 8: 1x1, 3x3 split into 1x3 and 3x1, the same after a 3x3, pool
    def __init__(self, cin, max_pool=False):
        super().__init__()
        self.max_pool = max_pool  # the graph's last block pools by max (pytorch-fid's FIDInceptionE_2)
        self.branch1x1 = ConvBN(cin, 320, 1)
        self.branch3x3_1 = ConvBN(cin, 384, 1)
        self.branch3x3_2a, self.branch3x3_2b = ConvBN(384, 384, (1, 3), padding=(0, 1)), ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1, self.branch3x3dbl_2 = ConvBN(cin, 448, 1), ConvBN(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = ConvBN(cin, 192, 1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pool = F.max_pool2d(x, 3, 1, 1) if self.max_pool else avg_pool_3x3(x)
        return torch.cat([self.branch1x1(x), self.branch3x3_2a(b3), self.branch3x3_2b(b3),
                          self.branch3x3dbl_3a(dbl), self.branch3x3dbl_3b(dbl), self.branch_pool(pool)], 1)

class InceptionV3(nn.Module):
    """The FID network. forward(uint8-valued images (B, 3, H, W), any size) returns the ADM suite's
    three outputs: pool (B, 2048), the graph's pool_3, for FID, precision and recall; spatial
    (B, 7 * 17 * 17), the first 7 channels of mixed_6/conv (here Mixed_6d.branch1x1), for sFID; and
    logits (B, 1008), pool times the classifier's weights without its bias, as the suite's Inception
    Score takes them."""
    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = ConvBN(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = ConvBN(32, 32, 3)
        self.Conv2d_2b_3x3 = ConvBN(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = ConvBN(80, 192, 3)
        self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = InceptionA(192, 32), InceptionA(256, 64), InceptionA(288, 64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b, self.Mixed_6c = InceptionC(768, 128), InceptionC(768, 160)
        self.Mixed_6d, self.Mixed_6e = InceptionC(768, 160), InceptionC(768, 192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b, self.Mixed_7c = InceptionE(1280), InceptionE(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008)
        self.requires_grad_(False).eval()

    def forward(self, x):
        x = (resize_bilinear_tf1(x.float(), 299) - 128) / 128
        x = F.max_pool2d(self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x))), 3, 2)
        x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), 3, 2)
        x = self.Mixed_6c(self.Mixed_6b(self.Mixed_6a(self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x))))))
        spatial = self.Mixed_6d.branch1x1(x)[:, :7]
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(self.Mixed_6e(self.Mixed_6d(x)))))
        pool = x.mean(dim=(2, 3))
        # (channels last before flattening, as the suite reshapes the graph's NHWC tensor)
        return pool, spatial.permute(0, 2, 3, 1).flatten(1), pool @ self.fc.weight.T

# -----------------------------------------------------------------------------
# DINOv2's ViT (Oquab et al. 2024), the frozen encoder REPA aligns a DiT's tokens to: the network of
# facebookresearch/dinov2's vision_transformer.py with torch.hub's settings (LayerScale, no register
# tokens, the position embedding interpolated bicubically by a scale factor offset by 0.1), in its
# parameter names, so that a released file (dinov2_vitb14_pretrain.pth) loads as it is

@dataclass
class ViTConfig:
    patch_size: int = 14
    dim: int = 768  # ViT-S/14 384, B/14 768, L/14 1024 (g/14's SwiGLU blocks are not here)
    depth: int = 12
    pos_grid: int = 37  # the position embedding's grid (518 / 14), interpolated to the input's

    @property
    def num_heads(self):  # (every DINOv2 has heads of 64 channels; a smaller stand-in one head)
        return max(1, self.dim // 64)

class LayerScale(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * self.gamma

class ViTMLP(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))

class ViTBlock(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.attn, self.mlp = Attention(dim, num_heads), ViTMLP(dim)
        self.ls1, self.ls2 = LayerScale(dim), LayerScale(dim)

    def forward(self, x):
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))

class DINOv2(nn.Module):
    """forward(images (B, 3, H, W) normalised with ImageNet's mean and std, H and W multiples of
    the patch size) returns the final norm's patch tokens (B, H / p * W / p, dim), dinov2's
    x_norm_patchtokens. Frozen: no gradients, eval mode."""
    def __init__(self, config):
        super().__init__()
        self.config, dim, p = config, config.dim, config.patch_size
        self.patch_embed = nn.ModuleDict({'proj': nn.Conv2d(3, dim, p, stride=p)})
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + config.pos_grid ** 2, dim))
        self.mask_token = nn.Parameter(torch.zeros(1, dim))  # (its masked pretraining's; unused)
        self.blocks = nn.ModuleList([ViTBlock(dim, config.num_heads) for _ in range(config.depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.requires_grad_(False).eval()

    def position_embedding(self, h, w):
        """The class token's and an h x w grid's position embeddings, (1, 1 + h * w, dim)."""
        g, pos = self.config.pos_grid, self.pos_embed
        if (h, w) == (g, g):
            return pos
        grid = pos[:, 1:].float().reshape(1, g, g, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, scale_factor=((h + 0.1) / g, (w + 0.1) / g), mode='bicubic')
        return torch.cat([pos[:, :1].float(), grid.flatten(2).transpose(1, 2)], dim=1)

    def forward(self, x):
        p = self.config.patch_size
        if x.shape[-2] % p or x.shape[-1] % p:
            raise ValueError(f"images of {tuple(x.shape[-2:])} pixels do not split into {p} x {p} patches")
        tokens = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls_token.expand(len(x), -1, -1).to(tokens.dtype), tokens], dim=1)
        x = tokens + self.position_embedding(x.shape[-2] // p, x.shape[-1] // p).to(tokens.dtype)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)[:, 1:]

class Projectors(nn.ModuleDict):
    """REPA's and SRA's projectors from a DiT block's tokens (dim wide) to each target's width, called
    together (one module for DDP): {term: tokens} -> {term: projected}. Each is REPA's MLP: three
    layers, 2048 wide (at most 4 dim)."""
    def __init__(self, dim, widths):
        hidden = min(2048, 4 * dim)
        super().__init__({k: nn.Sequential(nn.Linear(dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                           nn.Linear(hidden, width)) for k, width in widths.items()})

    def forward(self, tokens):
        return {k: self[k](h) for k, h in tokens.items()}

# -----------------------------------------------------------------------------
# GAN: R3GAN's generator and discriminator (Huang et al. 2024, "The GAN is dead; long live the
# GAN!"): ResNeXt-style residual blocks with no normalisation, kept stable at initialisation by
# fix-up-style scaling (Zhang et al. 2019)

@dataclass
class GANConfig:
    image_size: int = 32
    in_channels: int = 3
    # G's stage widths from its basis up, each stage at twice the resolution of the one before; D
    # mirrors them. The basis is image_size / 2^(stages - 1) pixels wide (4 for 32 px, 4 stages)
    widths: tuple = (256, 256, 256, 256)
    blocks: int = 2  # residual blocks per stage
    expansion: int = 2  # a block's hidden width / its stage's width
    # channels per group of a block's grouped 3x3 convolution (cardinality = hidden / this)
    group_channels: int = 16
    z_dim: int = 64
    num_classes: int = 0  # 0 = unconditional
    # class embedding: concatenated to z in G, projected onto D's features (Miyato & Koyama 2018)
    embed_dim: int = 64

# GAN-B is R3GAN's CIFAR-10 network; GAN-T (3 stages: a 7x7 basis for 28 px) trains on a CPU in minutes
GAN_PRESETS = {'GAN-T': dict(widths=(64, 32, 32), group_channels=8),
               'GAN-S': dict(widths=(256,) * 4), 'GAN-B': dict(widths=(768,) * 4)}

def msr_init(layer, gain=1.0):
    """He et al.'s fan-in initialisation: weights N(0, gain^2 / fan_in), biases zero."""
    nn.init.normal_(layer.weight, 0.0, gain / math.sqrt(layer.weight[0].numel()))
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)
    return layer

class GANBlock(nn.Module):
    """x + conv1x1(act(grouped conv3x3(act(conv1x1(x))))), act = leaky ReLU(0.2). Fix-up init: the
    first two convs He-initialised and scaled by L^(-1/4) (L blocks in the network, 3 convs per
    branch: L^(-1/(2*3-2))), the last one zero, so every block starts as the identity and no
    normalisation is needed."""
    def __init__(self, width, config, num_blocks):
        super().__init__()
        hidden, groups = width * config.expansion, config.group_channels
        if hidden % groups:
            raise ValueError(f"a block's hidden width {hidden} is not a multiple of "
                             f"group_channels={groups}")
        gain = math.sqrt(2 / (1 + 0.2 ** 2)) * num_blocks ** -0.25
        self.conv1 = msr_init(nn.Conv2d(width, hidden, 1), gain)
        self.conv2 = msr_init(nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden // groups), gain)
        self.conv3 = msr_init(nn.Conv2d(hidden, width, 1, bias=False), 0.0)

    def forward(self, x):
        h = F.leaky_relu(self.conv1(x), 0.2)
        return x + self.conv3(F.leaky_relu(self.conv2(h), 0.2))

class Resample(nn.Module):
    """R3GAN's transition between stages: bilinear 2x upsampling or 2x2 average pooling, with a 1x1
    convolution where the width changes (on the narrower side)."""
    def __init__(self, cin, cout, up):
        super().__init__()
        self.up = up
        self.conv = msr_init(nn.Conv2d(cin, cout, 1, bias=False)) if cin != cout else nn.Identity()

    def forward(self, x):
        if self.up:
            return F.interpolate(self.conv(x), scale_factor=2, mode='bilinear', align_corners=False)
        return self.conv(F.avg_pool2d(x, 2))

def gan_stages(config):
    """The basis width (pixels) of a GANConfig and its number of residual blocks; raises ValueError
    on a size that does not halve down to a whole basis."""
    stages = len(config.widths)
    if config.image_size % 2 ** (stages - 1):
        raise ValueError(f"image_size {config.image_size} is not divisible by 2^{stages - 1}, the "
                         f"{stages - 1} resolution doublings of widths={config.widths}; pick a preset "
                         f"with fewer stages (or pad the images)")
    return config.image_size // 2 ** (stages - 1), stages * config.blocks

class Generator(nn.Module):
    """z (and a class) -> a learned constant basis (width, b, b) scaled per channel by a linear map
    of them, stages of residual blocks with bilinear upsampling between, a 1x1 conv to pixels."""
    def __init__(self, config):
        super().__init__()
        self.config = config
        b, num_blocks = gan_stages(config)
        embed_dim = config.embed_dim if config.num_classes else 0
        self.embed = nn.Embedding(config.num_classes, embed_dim) if config.num_classes else None
        self.z_proj = msr_init(nn.Linear(config.z_dim + embed_dim, config.widths[0]))
        self.basis = nn.Parameter(torch.randn(config.widths[0], b, b))
        layers, cur = [], config.widths[0]
        for i, width in enumerate(config.widths):
            layers += [Resample(cur, width, up=True)] if i else []
            layers += [GANBlock(width, config, num_blocks) for _ in range(config.blocks)]
            cur = width
        self.net = nn.Sequential(*layers)
        self.to_pixels = msr_init(nn.Conv2d(cur, config.in_channels, 1))
        self.activation_checkpointing = False

    def forward(self, z, y=None):
        """z (B, z_dim), y (B,) int labels (ignored when unconditional) -> images (B, C, H, W),
        about [-1, 1]."""
        if self.embed is not None:
            z = torch.cat([z, self.embed(y)], dim=1)
        h = self.basis * self.z_proj(z)[:, :, None, None]
        return self.to_pixels(run_sequence(self.net, h, self.activation_checkpointing))

class Discriminator(nn.Module):
    """The generator mirrored: a 1x1 convolution from pixels, stages of residual blocks with 2x2
    average pooling between, a depthwise b x b convolution that removes the basis's spatial extent,
    a linear head: one logit per image (projected onto the class embedding when conditional)."""
    def __init__(self, config):
        super().__init__()
        self.config = config
        b, num_blocks = gan_stages(config)
        widths = config.widths[::-1]
        self.from_pixels = msr_init(nn.Conv2d(config.in_channels, widths[0], 1))
        layers = []
        for i, width in enumerate(widths):
            layers += [GANBlock(width, config, num_blocks) for _ in range(config.blocks)]
            layers += [Resample(width, widths[i + 1], up=False)] if i + 1 < len(widths) else []
        self.net = nn.Sequential(*layers)
        self.basis = msr_init(nn.Conv2d(widths[-1], widths[-1], b, groups=widths[-1]))
        self.head = msr_init(nn.Linear(widths[-1], config.embed_dim if config.num_classes else 1))
        self.embed = nn.Embedding(config.num_classes, config.embed_dim) if config.num_classes else None
        self.activation_checkpointing = False

    def forward(self, x, y=None):
        """x (B, C, H, W), y (B,) int labels (ignored when unconditional) -> logits (B,)."""
        h = run_sequence(self.net, self.from_pixels(x), self.activation_checkpointing)
        h = self.head(self.basis(h).flatten(1))
        if self.embed is None:
            return h.squeeze(1)
        return (h * self.embed(y)).sum(1) / math.sqrt(h.shape[1])

def create_model(arch, **kwargs):
    """A network by preset name: create_model('DiT-B/4', image_size=32, in_channels=4,
    num_classes=1000)."""
    if arch in DIT_PRESETS:
        return DiT(DiTConfig(**{**DIT_PRESETS[arch], **kwargs}))
    if arch in UNET_PRESETS:
        return UNet(UNetConfig(**{**UNET_PRESETS[arch], **kwargs}))
    if arch in AE_PRESETS:
        return Autoencoder(AEConfig(**{**AE_PRESETS[arch], **kwargs}))
    if arch in GAN_PRESETS:  # the generator; Discriminator(model.config) is its partner
        return Generator(GANConfig(**{**GAN_PRESETS[arch], **kwargs}))
    raise ValueError(f"unknown arch '{arch}'; use one of "
                     f"{', '.join([*DIT_PRESETS, *UNET_PRESETS, *AE_PRESETS, *GAN_PRESETS])}")

ARCHS = (*DIT_PRESETS, *UNET_PRESETS)  # the denoisers
