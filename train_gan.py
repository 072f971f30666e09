"""
Trains a GAN: R3GAN's generator and discriminator (model.Generator, model.Discriminator; Huang et
al. 2024) with the relativistic pairing loss and zero-centred gradient penalties on both real and
fake images. One file, top to bottom.

    python train_gan.py config/mnist_gan.py                           # out-mnist-gan
    torchrun --standalone --nproc_per_node=8 train_gan.py config/cifar10_gan.py
    python sample.py --out_dir=out-mnist-gan                          # images from G's EMA

With D's logits d(x) on real images x and fake images G(z), the losses of the two networks are
(loss='rpgan', Jolicoeur-Martineau 2019; Huang et al. eq. 2)
    L_D = softplus(d(G(z)) - d(x)),    L_G = softplus(d(x) - d(G(z)))
or the classic non-saturating pair (loss='ns', Goodfellow et al. 2014)
    L_D = softplus(-d(x)) + softplus(d(G(z))),    L_G = softplus(-d(G(z)));
D also pays gamma / 2 (R1 + R2) with R1 = ||grad_x d(x)||^2 on real and R2 the same on fake images
(Mescheder et al. 2018; R3GAN's eq. 5 needs both). The penalties run in float32 in their own pass,
every reg_interval steps with their weight multiplied by reg_interval (StyleGAN2's lazy
regularisation; 1 = R3GAN). Real and fake images go through the same differentiable augmentation
(DiffAugment, Zhao et al. 2020) when augment names any. The generator that samples is an EMA of G
whose half-life is counted in images (Karras et al.).

Resume, preemption and non-finite steps work as in train_diffusion.py: re-run the same command
(bookkeeping.py holds all that).
"""
import copy
import math
import os
from contextlib import nullcontext
from dataclasses import asdict

import bookkeeping as bk  # (first: from here on a Ctrl-C is one line, not a traceback)
import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import common
import dataformat
from model import GAN_PRESETS, Discriminator, count_flops, create_model

# -----------------------------------------------------------------------------
# defaults, overridden by config/*.py and --key=value
# I/O
out_dir = 'out-gan'
init_from = 'auto'  # 'auto': 'resume' if out_dir holds ckpt.pt, else 'scratch' (never overwrites one)
keep_last = 0  # also keep the newest keep_last checkpoints as out_dir/ckpt_<step>.pt (hard links)
max_minutes = 0.0  # finish the step, save and exit 0 after this much wall time; 0 = no limit
log_interval = 50  # steps between log lines (the only host syncs of the loop)
sample_interval = 1000  # steps between grids of the EMA generator's images, out_dir/samples_<step>.png
# FID during training (evaluate.py's): the EMA's images, with the same noise and labels every time
fid_interval = 0  # steps between FIDs, logged as fid; 0 = none
fid_images = 10000  # images per FID, shared by the ranks
fid_ref = ''  # an ADM reference batch .npz or a prepared dataset ('' = this run's dataset)
fid_inception = ''  # the FID Inception weights, a local file (docs/guide.md, 'Evaluation protocol')
ckpt_interval = 1000  # steps between checkpoints (one is also written at the end)
wandb_log = False  # project and run name: $WANDB_PROJECT and $WANDB_NAME, else the run's kind and out_dir
# data
dataset = 'mnist'  # reads data/<dataset>/ (or a path), written by data/<dataset>/prepare.py
class_cond = True  # condition both networks on the labels (False: unconditional)
hflip = False  # random horizontal flips of the real images
augment = ''  # DiffAugment's ops on every image D sees, from 'color,translation,cutout'
# model
arch = 'GAN-S'  # 'GAN-{T,S,B}' (model.py's presets; GAN-B is R3GAN's CIFAR-10 network)
# loss
loss = 'rpgan'  # 'rpgan' (relativistic pairing) or 'ns' (non-saturating)
gamma = 0.05  # weight of the R1 and R2 penalties: gamma / 2 (R1 + R2)
reg_interval = 1  # penalties every this many steps, weighted by it (StyleGAN2: 16); 1 = every step
# optimization
batch_size = 64  # images per optimizer step, over all ranks and micro-steps
grad_accum = 1  # micro-steps per optimizer step on each rank
max_steps = 50000
lr = 2e-4  # of both networks
min_lr = 5e-5  # the cosine schedule's floor
lr_schedule = 'cosine'  # after warm-up: 'cosine' to min_lr, or 'constant'
lr_decay_steps = 0  # length of the cosine, warm-up included; 0 = max_steps (set it to stop early)
warmup_steps = 0
beta2 = 0.99  # Adam's, for both networks; beta1 is 0, as in every modern GAN recipe
grad_clip = 0.0  # max global gradient norm of each network; 0 = no clipping (both are logged)
max_nonfinite = 20  # updates with a non-finite gradient norm are skipped; this many in a row stop it
ema_kimg = 10.0  # half-life of the generator's EMA in thousands of images
ema_rampup = 0.05  # the half-life is at most this fraction of the images seen (StyleGAN2-ADA); 0 = none
# system
device = 'cuda' if torch.cuda.is_available() else 'cpu'
dtype = 'bfloat16' if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else 'float32'
compile = torch.cuda.is_available()  # torch.compile both networks (on CPU it gains nothing)
activation_checkpointing = False  # recompute each block of G and D in the backward pass: less memory
peak_tflops = 0.0  # per-device peak for MFU; 0 = known GPUs' dense bf16 (float32: TF32) peak
seed = 0
# -----------------------------------------------------------------------------
config_keys = [k for k, v in globals().items() if not k.startswith('_') and isinstance(v, (int, float, bool, str))]
exec(open(os.path.join(os.path.dirname(bk.__file__), 'configurator.py')).read())  # (the kit's; it also sets overridden)
config = {k: globals()[k] for k in config_keys}
AUGMENTS = ('color', 'translation', 'cutout')
augment_ops = [op for op in augment.split(',') if op]
# dtype: no float16, which would need loss scaling (bfloat16 needs none)
common.check_config(config, choices=[
    ('init_from', ('auto', 'scratch', 'resume')), ('arch', GAN_PRESETS), ('loss', ('rpgan', 'ns')),
    ('lr_schedule', ('cosine', 'constant')), ('dtype', ('float32', 'bfloat16'))],
    counts=['batch_size', 'grad_accum', 'max_steps', 'log_interval', 'sample_interval',
            'ckpt_interval', 'reg_interval', 'max_nonfinite'],
    rules=[('gamma', gamma >= 0, 'at least 0 (0 = no gradient penalties)'),
           ('augment', set(augment_ops) <= set(AUGMENTS), f"comma-separated ops from {', '.join(AUGMENTS)}, or ''"),
           ('ema_kimg', ema_kimg >= 0, 'at least 0 (0 = no EMA)'),
           ('ema_rampup', ema_rampup >= 0, 'at least 0 (0 = none)')])
common.check_applied(overridden, config, {})  # (every key is applied or refused)
# -----------------------------------------------------------------------------
# DDP: torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; NCCL on GPUs, gloo on CPUs
device_type = common.check_device(device)
if 'RANK' in os.environ:
    device = f"cuda:{os.environ['LOCAL_RANK']}" if device_type == 'cuda' else device
    dist.init_process_group('nccl' if device_type == 'cuda' else 'gloo')
# the run: out_dir and its lock, resume, sums, the log, checkpoints (bookkeeping.Run)
run = bk.start_run(config, 'gan', device, inputs=[('dataset', dataformat.data_path(dataset))], fixed=['loss'])
# bf16 autocast around the forward passes (float32: none)
ctx = torch.autocast(device_type, dtype=getattr(torch, dtype)) if dtype != 'float32' else nullcontext()

# -----------------------------------------------------------------------------
# data: uint8 images (N, H, W, C), memory-mapped from data/<dataset>/
data_dir, meta, data = dataformat.load_dataset(dataset, splits=('train',), script='train_gan.py',
                                     classes=class_cond)
train_x, train_y = data['train']
H, W, C = meta['image_size'], meta['image_size'], meta['channels']
num_classes = meta['num_classes'] if class_cond else 0

def get_batch(step, micro):
    """This rank's real images (floats in [-1, 1], NCHW, on the device) and labels of micro-step
    `micro` of the global batch of `step`, drawn with replacement (sorted: kinder to mmap)."""
    g = run.rng(step, 0)
    idx = np.sort(torch.randint(len(train_x), (batch_size,), generator=g).numpy())
    flip = torch.rand(batch_size, generator=g) < 0.5
    idx, flip = idx[run.slice(micro)], flip[run.slice(micro)]
    x = torch.from_numpy(train_x[idx])
    if hflip:
        x = torch.where(flip[:, None, None, None], x.flip(2), x)
    y = torch.from_numpy(train_y[idx]).long()
    return dataformat.to_device(x, device) / 127.5 - 1, y.to(device)

def diff_augment(x, draws):
    """DiffAugment (Zhao et al. 2020) with per-image draws (B, 7) uniform in [0, 1): brightness,
    saturation and contrast ('color'), a shift of up to 1/8 of the size in each direction
    ('translation', zeros shifted in), a zeroed square of half the size ('cutout').
    Differentiable in x: G learns through it."""
    if not augment_ops:
        return x
    u = draws.to(x.dtype)[:, :, None, None, None].unbind(1)
    B, _, h, w = x.shape
    if 'color' in augment_ops:
        x = x + u[0] - 0.5
        mean = x.mean(dim=1, keepdim=True)
        x = (x - mean) * 2 * u[1] + mean
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = (x - mean) * (u[2] + 0.5) + mean
    rows = torch.arange(h, device=x.device).view(1, h, 1)
    cols = torch.arange(w, device=x.device).view(1, 1, w)
    if 'translation' in augment_ops:
        # integer shifts in [-h/8, h/8] and [-w/8, w/8]; a pixel whose source lies outside becomes 0
        dy = (u[3].view(B, 1, 1) * (2 * (h // 8) + 1)).long() - h // 8
        dx = (u[4].view(B, 1, 1) * (2 * (w // 8) + 1)).long() - w // 8
        src_r, src_c = rows - dy, cols - dx
        inside = ((src_r >= 0) & (src_r < h) & (src_c >= 0) & (src_c < w)).unsqueeze(1)
        flat = (src_r.clamp(0, h - 1) * w + src_c.clamp(0, w - 1)).view(B, 1, h * w)
        x = x.flatten(2).gather(2, flat.expand(-1, x.shape[1], -1)).view_as(x) * inside
    if 'cutout' in augment_ops:
        # a square of half the size zeroed around a centre (cy, cx) anywhere in the image
        cy = (u[5].view(B, 1, 1) * (h + h % 2)).long()
        cx = (u[6].view(B, 1, 1) * (w + w % 2)).long()
        x = x * ~(((rows - cy).abs() < h // 4) & ((cols - cx).abs() < w // 4)).unsqueeze(1)
    return x

def d_logits(net, x_real, x_fake, y, aug_real, aug_fake):
    """D's logits (net: one of its handles) of the real and the fake images, augmented by the
    draws aug_real and aug_fake, in one forward."""
    both = torch.cat([diff_augment(x_real, aug_real), diff_augment(x_fake, aug_fake)])
    return net(both, torch.cat([y, y])).float().chunk(2)

def penalties(x, fake, y, aug_real, aug_fake):
    """R1 and R2: the squared norm of the gradient of D's logit at each real (and fake) image,
    averaged; differentiable (create_graph) so that D learns from them. Eager (`disc`): a compiled
    graph has no double backward. Each logit depends on its own image only, so real and fake share
    one forward and one gradient."""
    x_real, x_fake = x.detach().requires_grad_(True), fake.detach().requires_grad_(True)
    logits = torch.cat(d_logits(disc, x_real, x_fake, y, aug_real, aug_fake))
    grads = torch.autograd.grad(logits.sum(), [x_real, x_fake], create_graph=True)
    return [g.pow(2).flatten(1).sum(1).mean() for g in grads]

def adversarial_losses(logits_real, logits_fake):
    """Per-pair losses (D's, G's) of loss='rpgan' or 'ns' (see the docstring at the top)."""
    if loss == 'rpgan':
        return F.softplus(logits_fake - logits_real), F.softplus(logits_real - logits_fake)
    return F.softplus(-logits_real) + F.softplus(logits_fake), F.softplus(-logits_fake)

# -----------------------------------------------------------------------------
# generator, discriminator, EMA, optimizers, and the checkpoint to resume from
torch.manual_seed(seed)  # the same initial weights on every rank
try:
    model = create_model(arch, image_size=H, in_channels=C, num_classes=num_classes).to(device)
    disc = Discriminator(model.config).to(device)
except ValueError as e:
    raise SystemExit(f"error: {arch} on {dataset}: {e}")
model_config = model.config
model.activation_checkpointing = disc.activation_checkpointing = activation_checkpointing
# on CUDA the faster layout for convolutions on tensor cores (the batches arrive in it: NHWC)
if device_type == 'cuda':
    model = model.to(memory_format=torch.channels_last)
    disc = disc.to(memory_format=torch.channels_last)
ema = copy.deepcopy(model).requires_grad_(False).eval()
# fused: setting found_inf skips a non-finite update on the device
optimizer = torch.optim.Adam(model.parameters(), lr=lr, betas=(0.0, beta2), fused=True)
d_optimizer = torch.optim.Adam(disc.parameters(), lr=lr, betas=(0.0, beta2), fused=True)
run.resume(model=model, ema=ema, disc=disc, optimizer=optimizer, d_optimizer=d_optimizer,
           model_args=asdict(model_config))
g_flops = count_flops(model, torch.zeros(1, model_config.z_dim, device=device),
                      torch.zeros(1, dtype=torch.long, device=device))
d_flops = count_flops(disc, torch.zeros(1, C, H, W, device=device),
                      torch.zeros(1, dtype=torch.long, device=device))
params, ema_params, d_params = (list(net.parameters()) for net in (model, ema, disc))
# a handle per role. G: `model` trains (compiled, under DDP), `ema` samples. D: `disc` holds the
# weights and computes the penalties, eagerly (a compiled graph has no double backward); `d_for_g`
# (compiled) is D in G's loss; `d_train` (DDP over d_for_g) is D in its own loss, whose backward
# all-reduces the gradients of both D passes. D's weights require grad in every call, never
# toggled: a compiled graph is specialised on requires_grad, and one traced with D frozen, met
# again with D training, returns logits without a graph (torch 2.11 on CUDA). G's backward then
# takes gradients for G's weights alone (inputs=).
raw_model = model
d_for_g = torch.compile(disc) if compile else disc
model = torch.compile(model) if compile else model
d_train = d_for_g
if run.ddp:
    model = DDP(model, device_ids=[device] if device_type == 'cuda' else None)
    d_train = DDP(d_for_g, device_ids=[device] if device_type == 'cuda' else None)
if run.master:
    g_size, d_size = (sum(p.numel() for p in group) / 1e6 for group in (params, d_params))
    print(f"{arch}: G {g_size:.2f}M, D {d_size:.2f}M parameters, {d_flops / 1e9:.3f} GFLOPs "
          f"forward per image in D; " + (f"{num_classes} classes" if num_classes else 'unconditional'))

# FLOPs per real image of a step: D on a real and a fake (forward + backward, 3x the forward) after
# G's forward; G forward + backward through D's forward and its backward to the input (2x; 3x when
# compiled, as a compiled backward also computes D's weight gradients, left unused; and D's forward
# on the real, for rpgan); the penalty pass on a real and a fake (forward 1, backward to the input
# 1, and the backward of that 4: 6 forwards each, as torch's FlopCounterMode counts them) once every
# reg_interval steps
flops_per_image = (4 * g_flops + (8 + compile + (loss == 'rpgan') + 12 * (gamma > 0) / reg_interval)
                   * d_flops)

def update(opt, opt_params):
    """Clips the gradients (grad_clip), then steps, skipping a non-finite update on the device
    (fused Adam reads found_inf; no host sync): the gradients are all-reduced, so every rank
    agrees. The gradient norm, and whether the update was skipped."""
    grad_norm = torch.nn.utils.clip_grad_norm_(opt_params, grad_clip or float('inf'))
    bad = ~grad_norm.isfinite()
    opt.found_inf = bad.float()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return grad_norm, bad

def ema_beta(images_seen):
    """G's EMA decay per step: a half-life of ema_kimg thousand images, at most ema_rampup of the
    images seen so far (StyleGAN2-ADA)."""
    ema_nimg = ema_kimg * 1000
    if ema_rampup:
        ema_nimg = min(ema_nimg, images_seen * ema_rampup)
    return 0.5 ** (batch_size / ema_nimg) if ema_nimg > 0 else 0.0

# the sample grids: a column per class (conditional), the same z in every grid
grid_cols = min(num_classes, 10) if num_classes else 8
grid_z = torch.randn((8 * grid_cols, model_config.z_dim), generator=run.rng(0, 99)).to(device)
grid_y = (torch.arange(8 * grid_cols) % max(num_classes, 1)).to(device)

@torch.no_grad()
def sample_grid():
    """The EMA generator's images of the grid's z and labels, in [-1, 1]."""
    with ctx:
        return ema(grid_z, grid_y).float().clamp(-1, 1)

# FID during training: the network on every rank, the reference's statistics on rank 0
if fid_interval:
    import evaluate
    inception, fid_stats = evaluate.training_setup(fid_inception, fid_ref or data_dir, H, device, run)

def fid():
    """The FID of fid_images EMA generator images (rank 0's; None on the others): image i from z
    seeded by (seed, i), whatever the world size, and label i % classes."""
    def generate(lo, n):
        z = torch.stack([torch.randn(model_config.z_dim, generator=run.rng(i, 5, device), device=device)
                         for i in range(lo, lo + n)])
        with ctx:
            return ema(z, torch.arange(lo, lo + n, device=device) % max(num_classes, 1)).float().clamp(-1, 1)
    return evaluate.training_fid(generate, fid_images, run.micro_batch, inception, fid_stats, run)

def get_lr(step):
    """The learning rate of a step: a linear warm-up over warmup_steps, then constant, or a cosine
    from lr down to min_lr at lr_decay_steps (warm-up included; 0 = max_steps) that stays there."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if lr_schedule == 'constant':
        return lr
    progress = min(1.0, (step - warmup_steps) / max(1, (lr_decay_steps or max_steps) - warmup_steps))
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))

# -----------------------------------------------------------------------------
# training loop: a D step (on regularisation steps the penalty pass, then the loss pass), then a G
# step against the updated D (alternating, as in Goodfellow et al. and StyleGAN2-ADA)
batches = [get_batch(run.step, micro) for micro in range(grad_accum)]  # the first step's reals
draws = ('penalty_real', 'penalty_fake', 'd_real', 'd_fake', 'g_real', 'g_fake')  # augmentations
for step in range(run.step, max_steps):
    lr_now = get_lr(step)
    for group in optimizer.param_groups + d_optimizer.param_groups:
        group['lr'] = lr_now
    regularize = gamma > 0 and step % reg_interval == 0
    # the global batch's noise and augmentation draws, sliced per rank: any world size, one run
    z_d, z_g = torch.randn((2, batch_size, model_config.z_dim), generator=run.rng(step, 1, device), device=device)
    aug = dict(zip(draws, torch.rand((6, batch_size, 7), generator=run.rng(step, 2, device),
                                     device=device)))
    # D: on regularisation steps the penalties (float32) at G's fakes and the reals, then its loss
    for micro, (x, y) in enumerate(batches):
        sl = run.slice(micro)
        with torch.no_grad(), ctx:
            fake = model(z_d[sl], y).float()
        if regularize:
            r1, r2 = penalties(x, fake, y, aug['penalty_real'][sl], aug['penalty_fake'][sl])
            (reg_interval * gamma / 2 * (r1 + r2) / grad_accum).backward()
            run.add(r1=r1, r2=r2)
        if run.ddp:  # all-reduce the gradients on the last micro-step only
            d_train.require_backward_grad_sync = micro == grad_accum - 1
        with ctx:
            logits_real, logits_fake = d_logits(d_train, x, fake, y, aug['d_real'][sl],
                                                aug['d_fake'][sl])
        d_loss = adversarial_losses(logits_real, logits_fake)[0].mean()
        (d_loss / grad_accum).backward()
        run.add(d_loss=d_loss, logits_real=logits_real.mean(), logits_fake=logits_fake.mean())
    d_grad_norm, d_bad = update(d_optimizer, d_params)
    # G: through the updated D (no gradient to D's weights: inputs=params; none for real logits)
    for micro, (x, y) in enumerate(batches):
        sl = run.slice(micro)
        if run.ddp:
            model.require_backward_grad_sync = micro == grad_accum - 1
        with ctx:
            fake = model(z_g[sl], y).float()
            logits_fake = d_for_g(diff_augment(fake, aug['g_fake'][sl]), y).float()
            with torch.no_grad():
                logits_real = (d_for_g(diff_augment(x, aug['g_real'][sl]), y).float()
                               if loss == 'rpgan' else torch.zeros_like(logits_fake))
        g_loss = adversarial_losses(logits_real, logits_fake)[1].mean()
        (g_loss / grad_accum).backward(inputs=params)
        run.add(g_loss=g_loss)
    if step + 1 < max_steps:  # the next step's real images, gathered while this step's kernels run
        batches = [get_batch(step + 1, micro) for micro in range(grad_accum)]
    g_grad_norm, g_bad = update(optimizer, params)
    with torch.no_grad():  # G's EMA (ema_beta); a skipped update leaves it alone
        beta = ema_beta(run.images_seen + batch_size)
        torch._foreach_lerp_(ema_params, params, (1 - beta) * ~g_bad)
    run.end_step(d_bad | g_bad, flops_per_image)  # either update skipped: the step's sums drop
    # grids, the log line and checkpoints, each when due
    if run.master and run.due(sample_interval):
        common.save_grid(sample_grid(), run.path(f'samples_{run.step:07d}.png'), grid_cols)
    val = {'fid': fid()} if fid_interval and run.due(fid_interval) else {}
    if run.log_step or val:
        run.log(lr=lr_now, d_grad_norm=d_grad_norm, g_grad_norm=g_grad_norm, **val)
    if run.due(ckpt_interval) or run.stop:
        run.save(model=raw_model, ema=ema, disc=disc, optimizer=optimizer,
                 d_optimizer=d_optimizer, model_args=asdict(model_config))
    if run.stop:
        break
run.finish()
