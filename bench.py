"""
Times the training step of any of the kit's train scripts on synthetic batches after warm-up (forward, backward,
clipping, the optimizer, EMA), then the data path alone (memory-mapped batch assembly and the host-to-device copy)
as a share of a step.

    python bench.py config/mnist_dit.py                                       # train_diffusion.py, the default
    python bench.py --arch=DiT-XL/2 --image_size=32 --channels=4 --num_classes=1000 --batch_size=256   # latents
    python bench.py --script=train_gan.py config/mnist_gan.py
    python bench.py --script=train_ae.py config/mnist_ae.py                   # the step once the discriminator is on
    python bench.py --script=distill_consistency.py config/mnist_cd.py        # reads the teacher's checkpoint
    python bench.py config/mnist_dit.py --profile=True          # also a torch.profiler table and bench_trace.json

It takes the script's defaults, so its config files and --key=value overrides work here unchanged, and it runs the
script's own losses, FLOP count and device peak from its source (script_code below): what is timed is the script's
step, and the TFLOP/s and MFU are the ones its training log prints. A multiply-add is 2 FLOPs; the matmul ceiling
measured here is printed beside the peak.
"""
import copy
import json
import math
import os
import resource
import sys
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn.functional as F

from model import LPIPS, Diffusion, Discriminator, PatchDiscriminator, bcast, count_flops, create_model

# -----------------------------------------------------------------------------
script = ([a.split('=', 1)[1] for a in sys.argv[1:] if a.startswith('--script=')] or ['train_diffusion.py'])[-1]
if script not in ('train_diffusion.py', 'train_gan.py', 'train_ae.py', 'distill_consistency.py'):
    raise SystemExit(f"error: script='{script}'; bench.py times train_diffusion.py, train_gan.py, train_ae.py or "
                     f"distill_consistency.py")
_script_src = open(os.path.join(os.path.dirname(os.path.abspath(__file__)), script)).read()

def script_code(start, end):
    """Runs the benched script's source from the text `start` up to the text `end` in this module."""
    i = _script_src.index(start)
    exec(_script_src[i:_script_src.index(end, i)], globals())

script_code('# I/O', 'config_keys = ')  # the script's defaults
image_size = 0  # 0 = the dataset's meta.json; else the input size (pixels or latent cells), no data needed
channels = 0  # likewise
num_classes = -1  # -1 = the dataset's meta.json
bench_steps = 20  # timed steps, after bench_warmup (train_gan.py: rounded up to a multiple of reg_interval)
bench_warmup = 5  # untimed steps first (compile, allocator, cudnn autotune)
profile = False  # a torch.profiler table of 3 steps, and out_dir/bench_trace.json for chrome://tracing
# -----------------------------------------------------------------------------
config_keys = [k for k, v in globals().items() if not k.startswith('_') and isinstance(v, (int, float, bool, str))]
exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())
if device.startswith('cuda') and not torch.cuda.is_available():
    raise SystemExit(f"error: device='{device}' but CUDA is not available here; pass --device=cpu")
device_type = 'cuda' if device.startswith('cuda') else 'cpu'
torch.backends.cuda.matmul.allow_tf32 = True
torch.backends.cudnn.allow_tf32 = True
ptdtype = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}[dtype]
ctx = nullcontext() if dtype == 'float32' else torch.autocast(device_type=device_type, dtype=ptdtype)
sync = torch.cuda.synchronize if device_type == 'cuda' else (lambda: None)
ddp, world_size = False, 1  # one process (the scripts' functions read these)
torch.manual_seed(seed)
g = torch.Generator(device).manual_seed(seed)

# the input's shape: the dataset's (or the flags'), or for distillation the teacher's
if script == 'distill_consistency.py':
    try:
        tckpt = torch.load(os.path.join(teacher, 'ckpt.pt'), map_location=device, weights_only=True)
    except OSError as e:
        raise SystemExit(f"error: no teacher checkpoint ({e.strerror}: {teacher}/ckpt.pt); pass the out_dir of a "
                         f"train_diffusion.py run as --teacher")
    tconf, dataset = tckpt['config'], tckpt['config']['dataset']
    H, C, K = (tckpt['model_args'][k] for k in ('image_size', 'in_channels', 'num_classes'))
data_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data', dataset)
meta = json.load(open(os.path.join(data_dir, 'meta.json'))) if os.path.exists(os.path.join(data_dir, 'meta.json')) else {}
if script != 'distill_consistency.py':
    H, C = image_size or meta.get('image_size', 0), channels or meta.get('channels', 0)
    K = num_classes if num_classes >= 0 else meta.get('num_classes', 0) if globals().get('class_cond') else 0
    if not H or not C:
        raise SystemExit(f"error: no data/{dataset}/meta.json to take the input shape from; pass --image_size and --channels")
W = H
x0 = (torch.rand(batch_size, H, W, C, device=device) * 2 - 1).permute(0, 3, 1, 2)  # NHWC in memory, as the scripts'
y = torch.randint(0, max(K, 1), (batch_size,), device=device)

def update(opt, params, scaler=None):
    """The scripts' update: clip, skip a non-finite update on the device (no host sync), step. True if skipped."""
    if scaler:
        scaler.unscale_(opt)
    bad = ~torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float('inf')).isfinite()
    opt.found_inf = bad.float()
    if scaler:
        scaler.step(opt)
        scaler.update()
    else:
        opt.step()
    opt.zero_grad(set_to_none=True)
    return bad

def adamw(params):
    return torch.optim.AdamW([{'params': [p for p in params if p.dim() >= 2], 'weight_decay': weight_decay},
                              {'params': [p for p in params if p.dim() < 2], 'weight_decay': 0.0}],
                             lr=lr, betas=(beta1, beta2), fused=True)

# -----------------------------------------------------------------------------
# each script's networks (with its fast paths), optimizers and step; the losses, FLOP count and device peak run from
# the script's source. As there, `model` ends up compiled and raw_model is the module. One micro-step per step.
scaler = torch.amp.GradScaler(device_type, enabled=dtype == 'float16')
if script == 'train_diffusion.py':
    options = dict(norm=norm, mlp=mlp, qk_norm=qk_norm, rope=rope) if arch.startswith('DiT') else {}
    model = create_model(arch, image_size=H, in_channels=C, num_classes=K, control=control,
                         control_channels=C if control else 0, **options).to(device)
    c = (torch.rand_like(x0) * 2 - 1) if control else None  # control images with the images' channels
    if control == 'controlnet':  # the base model stays frozen
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith('control_'))
    model.activation_checkpointing = activation_checkpointing
    if device_type == 'cuda' and arch.startswith('UNet'):
        model = model.to(memory_format=torch.channels_last)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer, ema_params = adamw(params), [p.detach().clone() for p in params]
    phema = [[p.detach().clone() for p in params] for s in phema_stds.split(',') if s]  # the post-hoc EMAs
    diffusion = Diffusion(schedule, prediction_type, num_timesteps, sigma_data)
    script_code('def sample_u', '@torch.no_grad()')  # its noise levels, loss weights and loss
    flops_per_image = 3 * model.flops_per_sample()

    def train_step(step):
        loss, _ = diffusion_loss(model, x0, y, sample_u(batch_size, g), torch.randn_like(x0), c)
        scaler.scale(loss.mean()).backward()
        bad = update(optimizer, params, scaler)
        with torch.no_grad():
            if (step + 1) % ema_update_every == 0:
                torch._foreach_lerp_(ema_params, params, (1 - ema_decay) * ~bad)
            for tracked in phema:
                torch._foreach_lerp_(tracked, params, 1 / (step + 1))
elif script == 'train_gan.py':
    model = create_model(arch, image_size=H, in_channels=C, num_classes=K).to(device)
    model_config, disc = model.config, Discriminator(model.config).to(device)
    model.activation_checkpointing = disc.activation_checkpointing = activation_checkpointing
    if device_type == 'cuda':
        model, disc = model.to(memory_format=torch.channels_last), disc.to(memory_format=torch.channels_last)
    params, d_params = list(model.parameters()), list(disc.parameters())
    optimizer = torch.optim.Adam(params, lr=lr, betas=(0.0, beta2), fused=True)
    d_optimizer = torch.optim.Adam(d_params, lr=lr, betas=(0.0, beta2), fused=True)
    ema_params = [p.detach().clone() for p in params]
    augment_ops = [op for op in augment.split(',') if op]
    script_code('def diff_augment', '# ------')  # its augmentation, penalties and losses
    script_code('g_flops = ', '# raw_disc computes')
    script_code('# FLOPs per real image', 'if peak_tflops')
    raw_disc = disc  # the penalty pass (double backward) runs uncompiled, as in the script
    if compile:
        disc = torch.compile(disc)
    bench_steps = -(-bench_steps // reg_interval) * reg_interval  # every reg_interval-th step has the penalty pass

    def train_step(step):
        z_d, z_g = torch.randn((2, batch_size, model_config.z_dim), generator=g, device=device)
        aug = torch.rand((3, 2, batch_size, 7), generator=g, device=device)
        with torch.no_grad(), ctx:
            fake = model(z_d, y).float()
        if gamma > 0 and step % reg_interval == 0:
            x_real, x_fake = x0.detach().requires_grad_(True), fake.requires_grad_(True)
            logits = raw_disc(torch.cat([diff_augment(x_real, aug[0, 0]), diff_augment(x_fake, aug[0, 1])]),
                              torch.cat([y, y]))
            r1, r2 = (gradient_penalty(l, x).mean() for l, x in zip(logits.chunk(2), (x_real, x_fake)))
            (reg_interval * gamma / 2 * (r1 + r2)).backward()
        with ctx:
            logits_real, logits_fake = disc(torch.cat([diff_augment(x0, aug[1, 0]), diff_augment(fake.detach(), aug[1, 1])]),
                                            torch.cat([y, y])).float().chunk(2)
        adversarial_losses(logits_real, logits_fake)[0].mean().backward()
        update(d_optimizer, d_params)
        raw_disc.requires_grad_(False)
        with ctx:
            logits_fake = disc(diff_augment(model(z_g, y).float(), aug[2, 1]), y).float()
            logits_real = disc(diff_augment(x0, aug[2, 0]), y).float() if loss == 'rpgan' else torch.zeros_like(logits_fake)
        adversarial_losses(logits_real, logits_fake)[1].mean().backward()
        raw_disc.requires_grad_(True)
        bad = update(optimizer, params)
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, params, (1 - 0.5 ** (batch_size / max(1.0, ema_kimg * 1000))) * ~bad)
elif script == 'train_ae.py':
    model = create_model(arch, image_size=H, in_channels=C, z_channels=z_channels, mid_attention=mid_attention,
                         kl=kl_weight > 0).to(device)
    disc = PatchDiscriminator(C, disc_channels, disc_layers).to(device) if disc_weight > 0 else None
    lpips = LPIPS().to(device) if lpips_weight > 0 else None  # untrained weights: the same work as the real ones
    model.activation_checkpointing = activation_checkpointing
    if device_type == 'cuda':
        model, disc, lpips = (n if n is None else n.to(memory_format=torch.channels_last) for n in (model, disc, lpips))
    raw_model, raw_disc = model, disc
    params, d_params = list(model.parameters()), list(disc.parameters()) if disc else []
    optimizer, d_optimizer = adamw(params), adamw(d_params) if disc else None
    ema_params = [p.detach().clone() for p in params]
    script_code('def ssim', '# ------')
    script_code('ae_flops = ', 'if master:')
    script_code('def flops_per_image', '@torch.no_grad()')  # its FLOP count, adaptive weight and reconstruction losses
    flops_per_image = flops_per_image(max(disc_start, adv_start) if disc else 0)  # the steady state: every term on

    def train_step(step):
        with ctx:
            xrec, mean, logvar = model(x0, torch.randn((batch_size, z_channels, latent_size, latent_size), device=device))
        xrec = xrec.float()
        nll, _, kl = reconstruction_losses(x0, xrec, mean, logvar)
        loss = nll + kl_weight * kl
        if disc:
            raw_disc.requires_grad_(False)
            with ctx:
                adv = -raw_disc(xrec).float().mean()
            loss = loss + disc_weight * adaptive_weight(nll, adv) * adv
            raw_disc.requires_grad_(True)
        loss.backward()
        if disc:
            with ctx:
                logits_real, logits_fake = disc(torch.cat([x0, xrec.detach()])).float().chunk(2)
            (0.5 * (F.relu(1 - logits_real).mean() + F.relu(1 + logits_fake).mean())).backward()
        bad = update(optimizer, params) | (update(d_optimizer, d_params) if disc else False)
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, params, (1 - ema_decay) * ~bad)
else:  # distill_consistency.py: a student and target as copies of the teacher
    arch, null_label = tconf['arch'], K
    diffusion = Diffusion(tconf['schedule'], tconf['prediction_type'], tconf['num_timesteps'], tconf['sigma_data'])
    teacher_net = create_model(arch, **tckpt['model_args']).to(device)
    teacher_net.load_state_dict(tckpt['ema'])
    teacher_net.requires_grad_(False).eval()
    if device_type == 'cuda' and arch.startswith('UNet'):
        teacher_net = teacher_net.to(memory_format=torch.channels_last)
    model = copy.deepcopy(teacher_net).requires_grad_(True).train()
    model.activation_checkpointing = activation_checkpointing
    target_net = copy.deepcopy(model).requires_grad_(False) if target == 'ema' else model
    params, target_params = list(model.parameters()), list(target_net.parameters())
    optimizer, ema_params, raw_model = adamw(params), [p.detach().clone() for p in params], model
    script_code('# the consistency objective', 'def save_grid')  # its noise levels, teacher step and loss
    script_code('# FLOPs per image of a step', 'if peak_tflops')

    def train_step(step):
        hi, lo = sample_sigmas(step, g)
        scaler.scale(consistency_loss(x0, y, torch.randn_like(x0), hi, lo).mean()).backward()
        bad = update(optimizer, params, scaler)
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, params, (1 - ema_decay) * ~bad)
            if target == 'ema':
                torch._foreach_lerp_(target_params, params, (1 - target_ema) * ~bad)
raw_model = model
if compile:
    model = torch.compile(model)
script_code('if peak_tflops == 0', '\n\n')  # the script's device peak

# -----------------------------------------------------------------------------
print(f"{script}: {arch} on {C} x {H} x {W}, {K} classes, batch {batch_size}, {dtype}, compile={compile}, {device}; "
      f"{flops_per_image / 1e9:.4f} GFLOP per image per step")
for step in range(bench_warmup):
    train_step(step)
sync()
t0 = time.perf_counter()
for step in range(bench_warmup, bench_warmup + bench_steps):
    train_step(step)
sync()
dt = (time.perf_counter() - t0) / bench_steps
tflops = flops_per_image * batch_size / dt / 1e12
mfu = f"{tflops / peak_tflops:.1%} of {peak_tflops:.0f} TFLOP/s" if peak_tflops else "n/a (pass --peak_tflops)"
memory = (f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB on the GPU" if device_type == 'cuda' else
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB resident")
print(f"step: {dt * 1e3:.1f} ms | {batch_size / dt:.0f} img/s | {tflops:.3f} TFLOP/s | MFU {mfu} | peak memory {memory}")

# the matmul ceiling, measured here: bf16 on GPUs, float32 on CPUs (where bf16 matmuls are emulated and slow, and
# oneDNN's convolutions can outrun the matmul: a step above 100% of it is no error)
n, mm_dtype = (8192, torch.bfloat16) if device_type == 'cuda' else (2048, torch.float32)
a, b = torch.randn(n, n, device=device, dtype=mm_dtype), torch.randn(n, n, device=device, dtype=mm_dtype)
for _ in range(3):
    a @ b
sync()
t0 = time.perf_counter()
for _ in range(10):
    a @ b
sync()
ceiling = 2 * n ** 3 * 10 / (time.perf_counter() - t0) / 1e12
print(f"{str(mm_dtype).split('.')[-1]} matmul ceiling ({n}^3): {ceiling:.3f} TFLOP/s; the step reaches "
      f"{tflops / ceiling:.0%} of it")

# the data path alone: what the scripts do per batch, memmap gather to device floats
if os.path.exists(os.path.join(data_dir, 'train_x.npy')):
    train_x = np.load(os.path.join(data_dir, 'train_x.npy'), mmap_mode='r')
    train_y = np.load(os.path.join(data_dir, 'train_y.npy'))
    gen = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    for _ in range(bench_steps):
        idx = np.sort(torch.randint(len(train_x), (batch_size,), generator=gen).numpy())
        xb, yb = torch.from_numpy(train_x[idx]), torch.from_numpy(train_y[idx])
        if device_type == 'cuda':
            xb, yb = xb.pin_memory().to(device, non_blocking=True), yb.pin_memory().to(device, non_blocking=True)
        xb = xb.to(device).permute(0, 3, 1, 2).float().div(127.5).sub(1)
    sync()
    dt_data = (time.perf_counter() - t0) / bench_steps
    print(f"data path: {dt_data * 1e3:.2f} ms per batch of {batch_size} = {dt_data / dt:.1%} of a step "
          f"(in training it overlaps the step on CUDA)")
else:
    print(f"data path: not timed, no data/{dataset}/train_x.npy")

if profile:
    from torch.profiler import ProfilerActivity, profile as torch_profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device_type == 'cuda' else [])
    with torch_profile(activities=activities) as prof:
        for step in range(3):
            train_step(step)
        sync()
    print(prof.key_averages().table(sort_by=f"{'cuda' if device_type == 'cuda' else 'cpu'}_time_total", row_limit=15))
    os.makedirs(out_dir, exist_ok=True)
    prof.export_chrome_trace(os.path.join(out_dir, 'bench_trace.json'))
    print(f"trace: {os.path.join(out_dir, 'bench_trace.json')}")
