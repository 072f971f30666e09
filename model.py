"""
Every network of the kit, once, plus the diffusion schedules, prediction types and samplers that
train_diffusion.py, sample.py and distill_consistency.py share.

DiT: Peebles & Xie 2023, "Scalable Diffusion Models with Transformers" (arXiv:2212.09748).
UNet: Ho et al. 2020 and Dhariwal & Nichol 2021 (ADM). Diffusion: see the class's docstring.
"""
import math
import os
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
    # released checkpoints (DiT.from_pretrained): learn_sigma doubles the output channels, the
    # prediction then DiT's variance interpolation v (Nichol & Dhariwal 2021, eq. 15), which the
    # ddpm sampler uses; convention='sit': the weights are SiT's (Ma et al. 2024), which read the
    # linear interpolant's time as s = 1 - t (1: data) and predict the velocity x0 - eps. forward
    # converts, so that the network takes model.Diffusion's 1000 t and gives its eps - x0
    learn_sigma: bool = False
    convention: str = 'kit'

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

def dit_names(depth):
    """{kit module: [its name in facebookresearch/DiT's and willisma/SiT's models.py]} where they
    differ, for a DiT of depth blocks (their pos_embed is the kit's fixed sincos buffer)."""
    names = {'x_embedder': 'x_embedder.proj', 'y_embedder': 'y_embedder.embedding_table',
             'linear_final': 'final_layer.linear', 'adaLN_final.1': 'final_layer.adaLN_modulation.1',
             **{f't_embedder.{i}': f't_embedder.mlp.{i}' for i in (0, 2)},
             **{f'blocks.{b}.mlp.{i}': f'blocks.{b}.mlp.fc{i // 2 + 1}'
                for b in range(depth) for i in (0, 2)}}
    return {kit: [theirs] for kit, theirs in names.items()}

def released_family(path, family=None):
    """'DiT' or 'SiT': family if given, else the file name's start (as released: DiT-XL-2-256x256.pt,
    SiT-XL-2-256x256.pt); the two layouts are the same, so nothing in the file tells them apart."""
    name = os.path.basename(path).lower()
    family = family or ('SiT' if name.startswith('sit') else 'DiT' if name.startswith('dit') else '')
    if family not in ('DiT', 'SiT'):
        raise ValueError(f"{path}: say whether it is a DiT or a SiT checkpoint (family 'DiT' or "
                         f"'SiT'; the file name starts with neither)")
    return family

class DiT(nn.Module):
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
        # adaLN-Zero: every block's gates are zero, so each residual branch starts as the identity,
        # and the final layer is zero, so the output starts at zero
        zero_init(*[block.adaLN_modulation[-1] for block in self.blocks])
        zero_init(self.adaLN_final[-1], self.linear_final)
        # the control branch starts silent (zero input embedding and output projections), so that the
        # model starts as its base
        if self.config.control == 'controlnet':
            zero_init(self.control_embedder, *self.control_out)

    def forward(self, x, t, y, control=None):
        """x: (B, C, H, W) noisy input; t: (B,) timesteps (any real scale, DDPM uses 0..999);
        y: (B,) int labels; control: (B, control_channels, H, W) when the model has one."""
        config, p, g = self.config, self.config.patch_size, self.grid
        if (control is None) != (not config.control):
            raise ValueError(f"this DiT has control='{config.control}' but was called "
                             f"with{'out' if control is None else ''} a control image")
        if config.control == 'concat':
            x = torch.cat([x, control.to(x.dtype)], dim=1)
        # tokens (B, N, D), N = g*g, and the conditioning vector (B, D)
        x = self.x_embedder(x).flatten(2).transpose(1, 2) + self.pos_embed
        if config.convention == 'sit':
            t = 1 - t / 1000
        cond = self.t_embedder(timestep_embedding(t, 256)) + self.y_embedder(y)
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
        for i, block in enumerate(self.blocks):
            x = run(block, x) + (residuals[i] if i < len(residuals) else 0)
        shift, scale = self.adaLN_final(cond).chunk(2, dim=1)
        x = self.linear_final(modulate(self.norm_final(x), shift, scale))  # (B, N, p*p*C)
        # unpatchify
        x = x.view(-1, g, g, p, p, self.out_channels).permute(0, 5, 1, 3, 2, 4)
        x = x.reshape(-1, self.out_channels, g * p, g * p)
        return -x if config.convention == 'sit' else x

    # what the released checkpoints were trained as (model.Diffusion's arguments), their papers' FID
    # and the kit's sampling settings nearest it, read by sample.py
    RELEASED = {'DiT': dict(schedule='linear', prediction_type='eps', num_timesteps=1000,
                            sampler='ddpm', steps=250, cfg_scale=1.5, cfg_channels=3,
                            published='FID-50K 2.27: DDPM with the learned variance, 250 steps, '
                                      'cfg 1.5 on 3 channels'),
                'SiT': dict(schedule='flow', prediction_type='flow', num_timesteps=1000,
                            sampler='ddpm', steps=250, cfg_scale=1.5, cfg_channels=3,
                            published='FID-50K 2.06: its own SDE sampler (not in the kit), 250 '
                                      'steps, cfg 1.5 on 3 channels')}

    @classmethod
    def from_pretrained(cls, path, family=None):
        """A released checkpoint of facebookresearch/DiT (DiT-XL-2-256x256.pt, -512x512.pt: a DDPM
        eps model with learned variance) or willisma/SiT (SiT-XL-2-256x256.pt: the same network as
        a velocity model of the linear interpolant), or the EMA weights of either repository's
        train.py checkpoint, from a local file. family 'DiT' or 'SiT' (the two layouts are the same;
        None: from the file's name). The architecture is read from the shapes. SiT's unused
        variance channels are dropped. Eval mode, with .objective: RELEASED[family]."""
        import bookkeeping as bk
        family = released_family(path, family)
        weights, _ = bk.read_weights(path)
        if 'x_embedder.proj.weight' not in weights or 'pos_embed' not in weights:
            raise ValueError(f"{path} holds no DiT or SiT models.py state dict (no "
                             f"x_embedder.proj.weight, pos_embed); pass a DiT or SiT release")
        require(weights, ['final_layer.linear.weight', 'blocks.0.mlp.fc1.weight',  # shapes read
                          'y_embedder.embedding_table.weight'], path)
        dim, C, p, _ = weights['x_embedder.proj.weight'].shape
        out = weights['final_layer.linear.weight'].shape[0] // p ** 2
        depth = 1 + max(int(k.split('.')[1]) for k in weights if k.startswith('blocks.'))
        # the heads are in no shape: DIT_SIZES' for its widths (DiT's S to XL: 64 wide), else 64 wide
        heads = {width: h for _, width, h in DIT_SIZES.values()}
        config = DiTConfig(
            image_size=math.isqrt(weights['pos_embed'].shape[1]) * p, in_channels=C, patch_size=p,
            hidden_size=dim, depth=depth, num_heads=heads.get(dim, dim // 64),
            mlp_ratio=weights['blocks.0.mlp.fc1.weight'].shape[0] / dim,
            num_classes=weights['y_embedder.embedding_table.weight'].shape[0] - 1,
            learn_sigma=family == 'DiT' and out == 2 * C,
            convention='sit' if family == 'SiT' else 'kit')
        net = cls(config)
        if not torch.allclose(weights['pos_embed'][0].float(), net.pos_embed[0], atol=1e-5):
            raise ValueError(f"{path}'s pos_embed is not DiT's fixed sine-cosine embedding")
        if out == 2 * C and not config.learn_sigma:  # SiT's variance channels: its forward drops them
            for leaf in ('weight', 'bias'):
                w = weights[f'final_layer.linear.{leaf}']  # rows: (patch position, half, channel)
                kept = w.view(p * p, 2, C, -1)[:, 0]
                weights[f'final_layer.linear.{leaf}'] = kept.reshape(-1, *w.shape[1:])
        weights.pop('pos_embed')
        load_renamed(net, weights, dit_names(depth), path)
        net.objective = dict(cls.RELEASED[family], family=family, source=os.path.abspath(path))
        return net.eval()

    def flops_per_sample(self):
        """Forward FLOPs for one image, a multiply-add counted as 2 (the DiT paper's Gflops count it
        as 1): the matmuls and attention; norms, activations and additions are negligible."""
        config, N, dim = self.config, self.grid ** 2, self.config.hidden_size
        patch = 2 * N * config.patch_size ** 2 * dim  # per channel, in or out
        # per block: qkv, proj and the MLP on every token; q @ k^T and attn @ v; adaLN once
        mlp = (3 if config.mlp == 'swiglu' else 2) * dim * mlp_width(config)
        per_block = 2 * N * (3 * dim * dim + dim * dim + mlp) + 2 * 2 * N * N * dim + 2 * dim * 6 * dim
        # patches and timestep MLP; final adaLN and linear layer; the ControlNet's blocks, control_out
        embed = patch * (config.in_channels + config.control_channels) + 2 * (256 * dim + dim * dim)
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

class UNet(nn.Module):
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

# AE-B/f8 is LDM's kl-f8, the Stable Diffusion VAE (84M; Autoencoder.from_pretrained loads its
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
    are (B, z_channels, H / f, W / f); every GroupNorm has eps 1e-6."""
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

    @classmethod
    def from_pretrained(cls, path, scaling_factor=None):
        """Stable Diffusion's VAE (sd-vae-ft-ema, -ft-mse, SDXL's: any AutoencoderKL of LDM's
        layout) from a local file or folder, in either layout it is released in: diffusers'
        AutoencoderKL (a folder with config.json and diffusion_pytorch_model.safetensors or .bin) or
        CompVis/LDM's checkpoint (.ckpt or .safetensors of the VAE, or a whole Stable Diffusion
        checkpoint's first_stage_model.*). Eval mode, with .scaling_factor and .shift_factor: a
        diffusion model sees (z - shift_factor) * scaling_factor (config.json's; for an LDM file
        scaling_factor, default 0.18215, and 0)."""
        import bookkeeping as bk
        weights, config_json = bk.read_weights(path)
        if any(k.startswith('first_stage_model.') for k in weights):  # a whole SD checkpoint
            weights = {k[18:]: v for k, v in weights.items() if k.startswith('first_stage_model.')}
        weights = {k: v for k, v in weights.items()  # not LDM's loss (discriminator and LPIPS)
                   if k.split('.')[0] in ('encoder', 'decoder', 'quant_conv', 'post_quant_conv')}
        layout = ('diffusers' if 'encoder.down_blocks.0.resnets.0.conv1.weight' in weights else
                  'ldm' if 'encoder.down.0.block.0.conv1.weight' in weights else None)
        if layout is None:
            raise ValueError(f"{path} holds no Stable Diffusion VAE (no encoder.down_blocks.* of "
                             f"diffusers' layout, nor LDM's encoder.down.*); pass its diffusers "
                             f"folder or its LDM .ckpt or .safetensors")
        require(weights, ['encoder.conv_in.weight', 'encoder.conv_out.weight',  # shapes read
                          'decoder.conv_in.weight'], path)
        if layout == 'diffusers' and config_json is None:
            raise ValueError(f"{path} is in diffusers' layout: pass its folder, with the config.json "
                             f"that holds its scaling_factor")
        # the architecture, from the shapes: widths, blocks per level, latent channels
        down, block = ('down_blocks', 'resnets') if layout == 'diffusers' else ('down', 'block')
        levels = len({k.split('.')[2] for k in weights if k.startswith(f'encoder.{down}.')})
        widths = [weights[f'encoder.{down}.{i}.{block}.0.conv1.weight'].shape[0]
                  for i in range(levels)]
        conv_in, z_in = weights['encoder.conv_in.weight'], weights['decoder.conv_in.weight']
        config = AEConfig(
            image_size=(config_json or {}).get('sample_size', 256), in_channels=conv_in.shape[1],
            channels=widths[0], channel_mult=tuple(w // widths[0] for w in widths),
            num_res_blocks=len({k.split('.')[4] for k in weights
                                if k.startswith(f'encoder.{down}.0.{block}.')}),
            z_channels=z_in.shape[1],
            mid_attention=any('attn_1' in k or 'attentions' in k for k in weights),
            kl=weights['encoder.conv_out.weight'].shape[0] == 2 * z_in.shape[1])
        ae = cls(config)
        # a config without quant convolutions (use_quant_conv: false) has them as the identity
        for name, conv in (('quant_conv', ae.quant_conv), ('post_quant_conv', ae.post_quant_conv)):
            if f'{name}.weight' not in weights:
                eye = torch.eye(conv.out_channels)[:, :, None, None]
                weights.update({f'{name}.weight': eye, f'{name}.bias': torch.zeros(len(eye))})
        load_renamed(ae, weights, sd_vae_names(config, layout, 'encoder.mid_block.attentions.0.'
                                               'query.weight' in weights), path)
        cfg = config_json or {}
        ae.scaling_factor = float(cfg.get('scaling_factor', scaling_factor or 0.18215))
        ae.shift_factor = float(cfg.get('shift_factor') or 0.0)
        return ae.eval()

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

    def decode(self, z):
        h = run_sequence(self.decoder[:-1], self.post_quant_conv(z), self.activation_checkpointing)
        return run_eager(self.last_layer, h)

    def forward(self, x, eps=None):
        """The reconstruction of x from z = mean + exp(logvar / 2) eps (the mean when eps is None),
        mean, logvar."""
        mean, logvar = self.encode(x)
        z = mean
        if logvar is not None and eps is not None:
            z = mean + (0.5 * logvar).exp() * eps.to(mean.dtype)
        return self.decode(z), mean, logvar

    def flops_per_sample(self):
        """Forward FLOPs of encoding and decoding one image (a multiply-add is 2)."""
        if self._flops is None:
            config, dev = self.config, next(self.parameters()).device
            x = torch.zeros(1, config.in_channels, config.image_size, config.image_size, device=dev)
            self._flops = count_flops(self, x)
        return self._flops

def sd_vae_names(config, layout, old_attention=False):
    """{kit module: the names it has in Stable Diffusion's VAE files} for an Autoencoder of config:
    layout 'diffusers' (AutoencoderKL; old_attention: the query/key/value/proj_attn names of files
    saved before diffusers 0.14, as the sd-vae-ft-* releases are) or 'ldm' (CompVis). The
    attention's q, k and v are the kit's one qkv layer, in that order."""
    d, L, n = layout == 'diffusers', len(config.channel_mult), config.num_res_blocks
    mid = ['mid_block.resnets.0', 'mid_block.resnets.1'] if d else ['mid.block_1', 'mid.block_2']
    out = ['conv_norm_out' if d else 'norm_out', None, 'conv_out']
    enc, dec = ['conv_in'], ['conv_in', *mid]
    for level in range(L):  # a diffusers decoder numbers its levels from the bottom
        enc += [f'down_blocks.{level}.resnets.{j}' if d else f'down.{level}.block.{j}'
                for j in range(n)]
        up = L - 1 - level
        dec += [f'up_blocks.{level}.resnets.{j}' if d else f'up.{up}.block.{j}' for j in range(n + 1)]
        if level + 1 < L:
            enc.append(f'down_blocks.{level}.downsamplers.0.conv' if d else f'down.{level}.downsample.conv')
            dec.append(f'up_blocks.{level}.upsamplers.0.conv' if d else f'up.{up}.upsample.conv')
    names = {'quant_conv': ['quant_conv'], 'post_quant_conv': ['post_quant_conv']}
    qkv = (['query', 'key', 'value'] if old_attention else ['to_q', 'to_k', 'to_v']) if d else ['q', 'k', 'v']
    attn = {'norm_attn': ['group_norm' if d else 'norm'], 'attn.qkv': qkv,
            'attn.proj': [('proj_attn' if old_attention else 'to_out.0') if d else 'proj_out']}
    for part, layers in (('encoder', enc + mid + out), ('decoder', dec + out)):
        for i, name in enumerate(layers):
            if name is None:
                continue
            if 'sample' in name:  # the kit's (padding or upsampling, conv)
                names[f'{part}.{i}.1'] = [f'{part}.{name}']
            elif 'resnets' in name or 'block' in name:  # a ResBlock, and the attention it holds
                for sub in ('norm1', 'conv1', 'norm2', 'conv2'):
                    names[f'{part}.{i}.{sub}'] = [f'{part}.{name}.{sub}']
                names[f'{part}.{i}.skip'] = [f'{part}.{name}.{"conv" if d else "nin"}_shortcut']
                if name in ('mid_block.resnets.0', 'mid.block_1'):
                    prefix = f'{part}.mid_block.attentions.0' if d else f'{part}.mid.attn_1'
                    for kit, theirs in attn.items():
                        names[f'{part}.{i}.{kit}'] = [f'{prefix}.{t}' for t in theirs]
            else:
                names[f'{part}.{i}'] = [f'{part}.{name}']
    return names

def require(weights, keys, path, what=''):
    """ValueError naming the first of keys that weights (a released file's, from path) lacks."""
    missing = [k for k in keys if k not in weights]
    if missing:
        raise ValueError(f"{path} lacks {missing[0]}{what}; it is damaged, or another model")

def load_renamed(net, weights, names, path):
    """Loads weights into net, where names maps each module of net to its name(s) in weights (two
    or more: concatenated, e.g. q, k, v), each reshaped to the kit's (a 1x1 conv as a linear
    layer); every weight of net and every entry of weights used once, or ValueError."""
    state, used = {}, set()
    for key, want in net.state_dict().items():
        module, leaf = key.rsplit('.', 1)
        theirs = [f'{name}.{leaf}' for name in names.get(module, [module])]
        require(weights, theirs, path, f" (for this model's {key})")
        parts = [weights[k].float().reshape(-1, *want.shape[1:]) for k in theirs]
        value = torch.cat(parts) if len(parts) > 1 else parts[0]
        if value.shape != want.shape:
            raise ValueError(f"{path}'s {theirs[0]} has shape {tuple(weights[theirs[0]].shape)} "
                             f"where this model has {tuple(want.shape)}")
        state[key] = value
        used.update(theirs)
    unused = sorted(set(weights) - used)
    if unused:
        raise ValueError(f"{path} holds {len(unused)} weights this model has no place for, such as "
                         f"{unused[0]}; it is another architecture")
    net.load_state_dict(state)

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
        s)."""
        per_image = lambda s: torch.full((len(z),), float(s), device=z.device)
        x0 = self.consistency(model, sigmas[0] * z, per_image(sigmas[0]), y, sigma_min)
        for s in sigmas[1:]:
            noise = torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)
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

    @torch.no_grad()
    def denoise(self, model, x, t, y, cfg_scale=1.0, clip_x0=False, control=None, cfg_channels=0):
        """x0 and eps estimates at one time t (a 0-d tensor) for every image of x, and the learned
        variance interpolation v of a learn_sigma network (None otherwise). Classifier-free guidance
        pred_u + cfg_scale (pred_c - pred_u) acts on the prediction's channels (its first
        cfg_channels only, if set: DiT's and SiT's released numbers guided 3 of 4), null label =
        model.config.num_classes; v is the conditional one's; both halves see the control image."""
        x_in, c_noise = self.net_inputs(x, t.expand(len(x)))
        # models without a control image take (x, t, y)
        control_args = () if control is None else (control,)
        if cfg_scale == 1.0:
            pred = model(x_in, c_noise, y, *control_args)
        else:
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
               cfg_channels=0):
        """Images from noise z (B, C, H, W) with labels y. cfg_interval: guidance only where lo <
        sigma/alpha <= hi (Kynkaanniemi et al. 2024). ddpm is DDIM with eta = 1 (the posterior q(x_s
        | x_t, x0) sampled; Ho et al. 2020), ddim takes eta (Song et al. 2021, eq. 12); euler and
        heun integrate the probability-flow ODE (Karras et al. 2022, alg. 1) in the coordinates
        where it is straightest: (x / alpha, sigma / alpha), or (x, t) for flow. DDIM with eta = 0
        is Euler in either, so they share one step and differ by their grids. A learn_sigma network's
        ddpm steps draw their noise with its learned variance exp(f log beta + (1 - f) log
        beta_tilde), f = (v + 1) / 2 (Nichol & Dhariwal 2021, eq. 15), beta of the step taken."""
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
                                cfg_channels)

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
                    noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
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

def bcast(coef, x):
    """Per-image coefficients coef, shape (B,) or (1,), as x's dtype, broadcastable against x (B,
    ...)."""
    return coef.to(x.dtype).view(-1, *[1] * (x.dim() - 1))
