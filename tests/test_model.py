"""model.py: the DiT matches the paper's sizes and FLOPs and starts as adaLN-Zero; the UNet's shapes, init and
FLOPs; each network's zero init and its shared attention against the closed form."""
import math

import pytest
import torch
import torch.nn as nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from model import DIT_PRESETS, DiT, DiTBlock, DiTConfig, Discriminator, ResBlock, UNet, UNetConfig, create_model


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


OPTIONS = [{}, dict(norm='rmsnorm', mlp='swiglu', qk_norm=True, rope=True), dict(control='concat', control_channels=2),
           dict(control='controlnet', control_channels=2)]


@pytest.mark.parametrize('options', OPTIONS, ids=['dit', 'lightningdit', 'concat', 'controlnet'])
def test_flop_count_matches_torch_flop_counter(options):
    model = DiT(DiTConfig(image_size=16, in_channels=3, num_classes=10, **DIT_PRESETS['DiT-Ti/2'], **options))
    x, t, y = torch.randn(2, 3, 16, 16), torch.tensor([3.0, 900.0]), torch.tensor([1, 10])
    control = torch.randn(2, 2, 16, 16) if options.get('control') else None
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:  # math SDPA: countable matmuls
        model(x, t, y, control)
    assert counter.get_total_flops() == 2 * model.flops_per_sample()


def test_rope_attends_by_relative_position_and_swiglu_keeps_the_parameter_count():
    """With 2-D RoPE, q_i . k_j depends on the offset between tokens i and j only: moving both by the same (row,
    column) shift leaves it unchanged, and a different offset changes it. SwiGLU at 2/3 the width has the GELU MLP's
    parameters, up to rounding."""
    from model import apply_rope, rope_2d
    grid, d = 6, 16
    cos, sin = rope_2d(grid, d)
    q, k = torch.randn(d, dtype=torch.float64), torch.randn(d, dtype=torch.float64)
    rotated = lambda v, i: apply_rope(v.expand(1, 1, grid * grid, d), cos.double(), sin.double())[0, 0, i]
    score = lambda i, j: (rotated(q, i) @ rotated(k, j)).item()
    at = lambda r, c: r * grid + c  # tokens in raster order
    assert score(at(1, 2), at(3, 1)) == pytest.approx(score(at(2, 4), at(4, 3)), abs=1e-6)  # float32 angles
    assert score(at(0, 0), at(2, 5)) == pytest.approx(score(at(3, 0), at(5, 5)), abs=1e-6)
    assert abs(score(at(1, 2), at(3, 1)) - score(at(1, 2), at(3, 2))) > 1e-3
    sizes = [sum(p.numel() for p in create_model('DiT-B/2', image_size=32, in_channels=4, mlp=m).parameters())
             for m in ('gelu', 'swiglu')]
    assert abs(sizes[1] / sizes[0] - 1) < 1e-3


@pytest.mark.parametrize('control', ['concat', 'controlnet'])
def test_a_control_model_starts_as_its_base(control):
    """Started from a base DiT as train_diffusion.py's init_base does it (zero input weights for the control channels;
    ControlNet: copies of the first half of the blocks, zero projections), the control model's output is the base's
    for any control image, and the control weights get gradients."""
    torch.manual_seed(0)
    base = create_model('DiT-N/4', image_size=8, in_channels=1, num_classes=3)
    for p in base.parameters():  # a trained-looking base: no zero-initialised layers left
        p.data.normal_(0, 0.1)
    model = create_model('DiT-N/4', image_size=8, in_channels=1, num_classes=3, control=control, control_channels=1)
    weights = base.state_dict()
    if control == 'concat':
        weights['x_embedder.weight'] = torch.cat([weights['x_embedder.weight'], torch.zeros(128, 1, 4, 4)], 1)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    assert not unexpected and all(k.startswith('control_') for k in missing) and bool(missing) == (control == 'controlnet')
    if control == 'controlnet':
        model.control_blocks.load_state_dict(model.blocks[:2].state_dict())
        assert len(model.control_blocks) == 2 and len(model.control_out) == 2
    x, t, y, c = torch.randn(4, 1, 8, 8), torch.tensor([1.0, 50, 400, 999]), torch.tensor([0, 1, 2, 3]), torch.randn(4, 1, 8, 8)
    out = model(x, t, y, c)
    assert torch.allclose(out, base(x, t, y), atol=1e-6)
    out.square().sum().backward()
    name = 'x_embedder.weight' if control == 'concat' else 'control_out.0.weight'
    grad = dict(model.named_parameters())[name].grad
    assert grad is not None and grad.abs().sum() > 0
    with pytest.raises(ValueError, match='called without a control image'):
        model(x, t, y)


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


@pytest.mark.parametrize('arch', ['DiT-N/4', 'UNet-S', 'AE-S/f4', 'GAN-T', 'GAN-T D with R1'])
def test_activation_checkpointing_gives_the_same_gradients(arch):
    """Every network's blocks can be recomputed in the backward pass; the gradients are bit-identical, also through
    the discriminator's double backward (the R1 penalty)."""
    torch.manual_seed(0)
    x, t, y = torch.randn(4, 1, 8, 8), torch.tensor([1, 50, 400, 999]), torch.tensor([0, 1, 2, 3])
    if arch.startswith('GAN'):
        model = create_model('GAN-T', image_size=8, in_channels=1, num_classes=4)
        z = torch.randn(4, model.config.z_dim)
        if arch.endswith('R1'):
            model = Discriminator(model.config)
            x.requires_grad_(True)
    else:
        kwargs = dict(dropout=0.0) if arch.startswith('AE') else dict(num_classes=3, dropout=0.0) if 'UNet' in arch \
            else dict(num_classes=3)
        model = create_model(arch, image_size=8, in_channels=1, **kwargs)
    for p in model.parameters():  # leave the zero-initialised outputs so that every branch carries a gradient
        p.data.normal_(0, 0.1)
    loss = {'DiT-N/4': lambda: model(x, t, y).square().sum(), 'UNet-S': lambda: model(x, t, y).square().sum(),
            'AE-S/f4': lambda: model(x)[0].square().sum(), 'GAN-T': lambda: model(z, y).square().sum(),
            'GAN-T D with R1': lambda: torch.autograd.grad(model(x, y).sum(), x, create_graph=True)[0].square().sum()}[arch]
    grads = []
    for on in (False, True):
        model.activation_checkpointing = on
        model.zero_grad()
        loss().backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    assert len(grads[0]) > 0 and all(torch.equal(a, b) for a, b in zip(*grads)) and grads[0][0].abs().sum() > 0


def test_unet_shapes_init_and_conditioning():
    """UNet-B is DDPM's CIFAR-10 layout (35.7M there; ours adds scale-shift norms and the class table): the output has
    the input's shape, starts at zero, and once trained a little depends on the label."""
    model = create_model('UNet-B', image_size=32, in_channels=3, num_classes=10)
    assert 36e6 < sum(p.numel() for p in model.parameters()) < 40e6
    small = create_model('UNet-S', image_size=28, in_channels=1, num_classes=10)
    x, t = torch.randn(3, 1, 28, 28), torch.tensor([0.0, 500.0, 999.0])
    out = small(x, t, torch.tensor([0, 5, 10]))
    assert out.shape == x.shape and torch.equal(out, torch.zeros_like(out))
    for p in small.parameters():
        p.data.normal_(0, 0.05)
    small.eval()
    assert not torch.allclose(small(x, t, torch.tensor([0, 0, 0])), small(x, t, torch.tensor([1, 1, 1])))
    with pytest.raises(ValueError, match='not divisible by 2\\^3'):
        create_model('UNet-B', image_size=28, in_channels=1, num_classes=10)


def test_unet_flops_count_the_convolutions():
    """flops_per_sample counts a multiply-add as 2: a UNet without attention and with one level is conv_in, two
    residual blocks (two 3x3 convs each), three up blocks (3x3 convs and 1x1 skips on concatenated channels), conv_out."""
    c, H = 32, 8
    model = UNet(UNetConfig(image_size=H, in_channels=3, channels=c, channel_mult=(1,), num_res_blocks=2, attn_levels=()))
    conv = lambda cin, cout, k: 2 * cin * cout * k * k * H * H
    expected = conv(3, c, 3) + 2 * 2 * conv(c, c, 3) + 2 * 2 * conv(c, c, 3)  # conv_in, down blocks, middle blocks
    expected += 3 * (conv(2 * c, c, 3) + conv(c, c, 3) + conv(2 * c, c, 1)) + conv(c, 3, 3)  # up blocks, conv_out
    expected += 2 * (c * 4 * c + 4 * c * 4 * c) + 7 * 2 * 4 * c * 2 * c  # time MLP, the 7 blocks' embedding projections
    assert model.flops_per_sample() == expected


def fresh(net):
    """A network as its create_model call builds it, by name: the DiT with ControlNet, UNet-S, AE-S/f4."""
    torch.manual_seed(0)
    if net == 'DiT':
        return create_model('DiT-N/4', image_size=8, in_channels=1, num_classes=3, control='controlnet',
                            control_channels=1)
    if net == 'UNet':
        return create_model('UNet-S', image_size=8, in_channels=1, num_classes=3)
    return create_model('AE-S/f4', image_size=8, in_channels=1)


def zero_initialised(net, model):
    """The layers each network's initialize_weights states as zero."""
    if net == 'DiT':
        return [*(block.adaLN_modulation[-1] for block in model.blocks), model.adaLN_final[-1], model.linear_final,
                model.control_embedder, *model.control_out]
    blocks = [m for m in model.modules() if isinstance(m, ResBlock)]
    layers = [m.conv2 for m in blocks] + [m.attn.proj for m in blocks if m.attn is not None]
    return layers + ([model.conv_out] if net == 'UNet' else [])


@pytest.mark.parametrize('net', ['DiT', 'UNet', 'AE'])
def test_zero_inits_hold_and_each_block_starts_as_its_skip_path(net):
    """The layers initialize_weights zeroes are zero after construction, and no other weight is; so every
    residual block starts as its skip path (a DiT block and a same-width ResBlock: the identity), the DiT's and
    the UNet's outputs start at zero (the DiT's ControlNet silent), and the autoencoder starts as its network
    without the residual branches."""
    model = fresh(net)
    zero = zero_initialised(net, model)
    assert all(torch.count_nonzero(layer.weight) == 0 and torch.count_nonzero(layer.bias) == 0 for layer in zero)
    stated = {id(layer.weight) for layer in zero}
    assert {id(p) for n, p in model.named_parameters() if n.endswith('weight') and not p.any()} == stated
    has_attention = [m for m in model.modules() if isinstance(m, ResBlock) and m.attn is not None]
    assert net == 'DiT' or has_attention  # the attention's zero projection is among those checked

    # every residual block's input and output in one forward pass (the DiT's ControlNet blocks are not
    # zero-initialised: train_diffusion.py copies the base's blocks into them)
    blocks = list(model.blocks) if net == 'DiT' else [m for m in model.modules() if isinstance(m, ResBlock)]
    calls = []
    for m in blocks:
        m.register_forward_hook(lambda m, inputs, out: calls.append((m, inputs[0], out)))
    x, control = torch.randn(2, 1, 8, 8), torch.randn(2, 1, 8, 8)
    t, y = torch.tensor([10.0, 900.0]), torch.tensor([0, 3])
    out = model(x)[0] if net == 'AE' else model(x, t, y, control) if net == 'DiT' else model(x, t, y)
    assert len(calls) == len(blocks)
    for m, h, h_out in calls:
        assert torch.equal(h_out, h if isinstance(m, DiTBlock) else m.skip(h))
    assert any(isinstance(m, DiTBlock) or isinstance(m.skip, nn.Identity) for m, _, _ in calls)  # identities
    if net == 'AE':
        def skip_only(layers, h):
            for layer in layers:
                h = layer.skip(h) if isinstance(layer, ResBlock) else layer(h)
            return h
        mean = model.quant_conv(skip_only(model.encoder, x)).chunk(2, dim=1)[0]
        assert torch.equal(out, skip_only(model.decoder, model.post_quant_conv(mean)))
    else:
        assert torch.equal(out, torch.zeros_like(out))


def reference_attention(attn, x, grid=None):
    """softmax(q k^T / sqrt(d)) v for each head, written out from attn's weights, token by token and head by head:
    x (B, N, dim). qk_norm: q / rms(q) times the learned scale; grid: 2-D RoPE, the channel pair (2j, 2j + 1) of a
    head as the complex number z_j, times exp(i theta_j), theta_j = column * 10000^(-j / (d/4)) for j < d/4, row *
    10000^(-(j - d/4) / (d/4)) after."""
    heads, dim = attn.num_heads, x.shape[-1]
    d = dim // heads
    rms = lambda v, w: v / (v.pow(2).mean(-1, keepdim=True) + 1e-6).sqrt() * w
    if grid:
        n = torch.arange(grid * grid, dtype=torch.float64)
        freqs = 10000.0 ** (-torch.arange(d // 4, dtype=torch.float64) / (d // 4))
        theta = torch.cat([(n % grid)[:, None] * freqs, (n // grid)[:, None] * freqs], dim=1)  # (N, d/2)
        turn = torch.polar(torch.ones_like(theta), theta)

    def rotate(v):
        z = torch.view_as_complex(v.double().reshape(-1, d // 2, 2).contiguous())
        return torch.view_as_real(z * turn).reshape(-1, d).to(x.dtype)

    out = torch.empty_like(x)
    for b in range(len(x)):
        qkv = x[b] @ attn.qkv.weight.T + attn.qkv.bias
        q_all, k_all, v_all = qkv.split(dim, dim=-1)
        for h in range(heads):
            q, k, v = (m[:, h * d:(h + 1) * d] for m in (q_all, k_all, v_all))
            if isinstance(attn.q_norm, nn.RMSNorm):
                q, k = rms(q, attn.q_norm.weight), rms(k, attn.k_norm.weight)
            if grid:
                q, k = rotate(q), rotate(k)
            out[b, :, h * d:(h + 1) * d] = torch.softmax(q @ k.T / math.sqrt(d), dim=-1) @ v
        out[b] = out[b] @ attn.proj.weight.T + attn.proj.bias
    return out


@pytest.mark.parametrize('options', [{}, dict(qk_norm=True), dict(rope=True), dict(qk_norm=True, rope=True)],
                         ids=['plain', 'qk_norm', 'rope', 'qk_norm+rope'])
def test_dit_attention_is_the_closed_form(options):
    """A DiT block's attention, as the block calls it (with the model's RoPE tables), is softmax(q k^T / sqrt(d)) v
    per head written out."""
    torch.manual_seed(0)
    model = create_model('DiT-N/4', image_size=16, in_channels=1, num_classes=3, **options).double()
    for p in model.parameters():  # the learned q/k scales too, away from 1
        p.data.normal_(0, 0.2)
    rope = (model.rope_cos, model.rope_sin) if options.get('rope') else None
    x = torch.randn(2, model.grid ** 2, 128, dtype=torch.float64)
    with torch.no_grad():
        got = model.blocks[1].attn(x, rope)
        want = reference_attention(model.blocks[1].attn, x, model.grid if rope else None)
    # RoPE rotates in float32, as it does in training
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 if rope else 1e-10)


@pytest.mark.parametrize('net', ['UNet', 'AE'])
def test_image_attention_is_the_closed_form_over_pixels(net):
    """A ResBlock's attention (the UNet's middle block: 4 heads; the autoencoder's: one) takes the H*W pixels in
    raster order as tokens: with the residual branch silent (its zero init), the block is s + attention(norm(s)),
    s = skip(x), the attention written out and its output put back pixel by pixel."""
    model = fresh(net).double()
    block = model.mid[0] if net == 'UNet' else next(m for m in model.encoder if isinstance(m, ResBlock) and m.attn)
    assert block.attn.num_heads == (4 if net == 'UNet' else 1)
    for layer in (block.attn.qkv, block.attn.proj, block.norm_attn):
        for p in layer.parameters():
            p.data.normal_(0, 0.2)
    C = block.conv2.out_channels
    x = torch.randn(2, block.conv1.in_channels, 4, 2, dtype=torch.float64)  # not square: rows and columns differ
    emb = torch.randn(2, 4 * model.config.channels, dtype=torch.float64) if net == 'UNet' else None
    with torch.no_grad():
        s = block.skip(x)
        tokens = block.norm_attn(s).permute(0, 2, 3, 1).reshape(2, 8, C)  # token n = pixel (n // 2, n % 2)
        want = s + reference_attention(block.attn, tokens).reshape(2, 4, 2, C).permute(0, 3, 1, 2)
        torch.testing.assert_close(block(x, emb), want, rtol=1e-10, atol=1e-10)
