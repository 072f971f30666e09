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
import time
from contextlib import nullcontext
from dataclasses import asdict

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import bookkeeping as bk
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
ckpt_interval = 1000  # steps between checkpoints (one is also written at the end)
wandb_log = False
wandb_project = 'gan'
wandb_run_name = 'gan'
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
exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())
config = {k: globals()[k] for k in config_keys}
AUGMENTS = ('color', 'translation', 'cutout')
augment_ops = [op for op in augment.split(',') if op]
# dtype: no float16, which would need loss scaling (bfloat16 needs none)
bk.check_config(config, choices=[
    ('init_from', ('auto', 'scratch', 'resume')), ('arch', GAN_PRESETS), ('loss', ('rpgan', 'ns')),
    ('lr_schedule', ('cosine', 'constant')), ('dtype', ('float32', 'bfloat16'))],
    counts=['batch_size', 'grad_accum', 'max_steps', 'log_interval', 'sample_interval',
            'ckpt_interval', 'reg_interval', 'max_nonfinite'],
    rules=[('gamma', gamma >= 0, 'at least 0 (0 = no gradient penalties)'),
           ('augment', set(augment_ops) <= set(AUGMENTS), f"comma-separated ops from {', '.join(AUGMENTS)}, or ''"),
           ('ema_kimg', ema_kimg >= 0, 'at least 0 (0 = no EMA)'),
           ('ema_rampup', ema_rampup >= 0, 'at least 0 (0 = none)')])
# -----------------------------------------------------------------------------
# distributed setup: torchrun sets RANK, LOCAL_RANK, WORLD_SIZE
t_start = time.time()
device_type = bk.check_device(device)
ddp = int(os.environ.get('RANK', -1)) != -1
rank, local_rank, world_size = 0, 0, 1
if ddp:
    rank, local_rank, world_size = (int(os.environ[k]) for k in ('RANK', 'LOCAL_RANK', 'WORLD_SIZE'))
    if device_type == 'cuda':
        device = f'cuda:{local_rank}'
        torch.cuda.set_device(device)
    dist.init_process_group(backend='nccl' if device_type == 'cuda' else 'gloo')
    if rank == 0 and int(os.environ.get('TORCHELASTIC_MAX_RESTARTS', 0)) and \
            os.environ.get('TORCHELASTIC_USE_AGENT_STORE') == 'True':
        print("warning: with the store torchrun shares by default, a restarted group can fail to "
              "reconnect (pytorch/pytorch#167288); export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 "
              "before torchrun")
master = rank == 0
if batch_size % (world_size * grad_accum):
    raise SystemExit(f"error: batch_size={batch_size} is not divisible by world_size x grad_accum "
                     f"= {world_size} x {grad_accum}; pick a batch_size that is a multiple of "
                     f"{world_size * grad_accum}")
micro_batch = batch_size // (world_size * grad_accum)
run = bk.RunDir(out_dir, init_from, keep_last, master, world_size, device_type, kind='gan',
               inputs=[('dataset', bk.data_path(dataset))])
if master:
    print(f"{world_size} rank(s) on {device_type}, {micro_batch} images per micro-step, "
          f"{grad_accum} micro-step(s), {batch_size} per optimizer step")
torch.backends.cuda.matmul.allow_tf32 = True
torch.backends.cudnn.allow_tf32 = True
ctx = nullcontext() if dtype == 'float32' else \
    torch.autocast(device_type=device_type, dtype=torch.bfloat16)

def rng(step, stream, dev='cpu'):
    return bk.seeded(seed, step, stream, dev)

# -----------------------------------------------------------------------------
# data: uint8 images (N, H, W, C), memory-mapped from data/<dataset>/
_, meta, data = bk.load_dataset(dataset, splits=('train',), script='train_gan.py')
train_x, train_y = data['train']
H, W, C = meta['image_size'], meta['image_size'], meta['channels']
num_classes = meta['num_classes'] if class_cond else 0

def my_slice(micro):
    """This rank's part of the global batch in micro-step `micro` (micro-steps outside, ranks
    inside)."""
    lo = (micro * world_size + rank) * micro_batch
    return slice(lo, lo + micro_batch)

def get_batch(step, micro):
    """This rank's real images (floats in [-1, 1], NCHW, on the device) and labels of micro-step
    `micro` of the global batch of `step`, drawn with replacement (sorted: kinder to mmap)."""
    g = rng(step, 0)
    idx = np.sort(torch.randint(len(train_x), (batch_size,), generator=g).numpy())
    flip = torch.rand(batch_size, generator=g) < 0.5
    idx, flip = idx[my_slice(micro)], flip[my_slice(micro)]
    x = torch.from_numpy(train_x[idx])
    if hflip:
        x = torch.where(flip[:, None, None, None], x.flip(2), x)
    y = torch.from_numpy(train_y[idx]).long()
    return bk.to_device(x, device) / 127.5 - 1, y.to(device)

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

def gradient_penalty(logits, x):
    """||d logits_i / d x_i||^2 per image, differentiable (create_graph) so that D learns from it:
    R1 on real x, R2 on fake x. logits (B,) come from x (B, ...), which requires grad; each logit
    depends on its own image only."""
    grad, = torch.autograd.grad(logits.sum(), x, create_graph=True)
    return grad.float().pow(2).flatten(1).sum(1)

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
start_step, images_seen, wandb_id, ckpt = 0, 0, None, {}
if run.init_from == 'resume':
    ckpt = run.resume(device)
    bk.check_same('network', ckpt['model_args'], asdict(model_config), run.ckpt_path)
    for net, key in ((model, 'model'), (ema, 'ema'), (disc, 'disc')):
        bk.load_state(net, ckpt[key], run.ckpt_path, key)
    for opt, key in ((optimizer, 'optimizer'), (d_optimizer, 'd_optimizer')):
        bk.load_optimizer(opt, ckpt[key], run.ckpt_path, key)
    start_step, images_seen, wandb_id = ckpt['step'], ckpt['images_seen'], ckpt['wandb_id']
    changed = bk.changed_keys(ckpt['config'], config)
    if master:
        print(f"resuming {run.ckpt_path} at step {start_step} "
              f"({images_seen / 1e3:.1f} kimg)"
              + (f"; changed since: {', '.join(changed)}" if changed else ''))
bk.restore_rng(ckpt.get('rng'), seed, rank, world_size, device_type)
del ckpt
g_flops = count_flops(model, torch.zeros(1, model_config.z_dim, device=device),
                      torch.zeros(1, dtype=torch.long, device=device))
d_flops = count_flops(disc, torch.zeros(1, C, H, W, device=device),
                      torch.zeros(1, dtype=torch.long, device=device))
# raw_disc computes the penalties (eager: a compiled graph has no double backward), g_disc (compiled)
# G's loss, and disc (DDP over g_disc) D's loss, whose backward all-reduces the gradients of both D
# passes. D's weights require grad in every call, never toggled: a compiled graph is specialised on
# requires_grad, and one traced with D frozen, met again with D training, returns logits without a
# graph (torch 2.11 on CUDA). G's backward then takes gradients for G's weights alone (inputs=).
raw_model, raw_disc = model, disc
if compile:
    model, disc = torch.compile(model), torch.compile(disc)
g_disc = disc
if ddp:
    model = DDP(model, device_ids=[local_rank] if device_type == 'cuda' else None)
    disc = DDP(disc, device_ids=[local_rank] if device_type == 'cuda' else None)
params, ema_params = list(raw_model.parameters()), list(ema.parameters())
d_params = list(raw_disc.parameters())
if master:
    g_size, d_size = (sum(p.numel() for p in group) / 1e6 for group in (params, d_params))
    print(f"{arch}: G {g_size:.2f}M, D {d_size:.2f}M parameters, {d_flops / 1e9:.3f} GFLOPs forward "
          f"per image in D; " + (f"{num_classes} classes" if num_classes else 'unconditional'))

# FLOPs per real image of a step: D on a real and a fake (forward + backward, 3x the forward) after
# G's forward; G forward + backward through D's forward and its backward to the input (2x; 3x when
# compiled, as a compiled backward also computes D's weight gradients, left unused; and D's forward
# on the real, for rpgan); the penalty pass on a real and a fake (forward 1, backward to the input 1,
# and the backward of that 4: 6 forwards each, as torch's FlopCounterMode counts them) once every
# reg_interval steps
flops_per_image = 4 * g_flops + (8 + compile + (loss == 'rpgan') + 12 * (gamma > 0) / reg_interval) \
    * d_flops
peak_tflops = peak_tflops or bk.device_peak_tflops(device_type, dtype)

def get_lr(step):
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if lr_schedule == 'constant':
        return lr
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))

# the sample grids: a column per class (conditional), the same z in every grid
grid_cols = min(num_classes, 10) if num_classes else 8
grid_z = torch.randn((8 * grid_cols, model_config.z_dim), generator=rng(0, 99)).to(device)
grid_y = (torch.arange(8 * grid_cols) % max(num_classes, 1)).to(device)

# -----------------------------------------------------------------------------
# logging: stdout, out_dir/metrics.csv, and wandb
terms = ['d_loss', 'g_loss', 'r1', 'r2', 'logits_real', 'logits_fake']
fields = ['step', 'kimg', *terms, 'lr', 'd_grad_norm', 'g_grad_norm', 'skipped', *bk.SPEED_FIELDS]
if master:
    wandb_run = bk.start_wandb(wandb_project, wandb_run_name, config, out_dir, wandb_id) \
        if wandb_log else None
    wandb_id = wandb_run.id if wandb_log else None
    metrics = bk.Metrics(os.path.join(out_dir, 'metrics.csv'), fields, start_step, wandb_run)

# -----------------------------------------------------------------------------
# training loop: a D step (on regularisation steps the penalty pass, then the loss pass), then a G
# step against the updated D (alternating, as in Goodfellow et al. and StyleGAN2-ADA)
fix = "a lower lr, a larger gamma or dtype='float32'"
stopper = bk.StopSignals(max_minutes, t_start, ddp)
skips = bk.SkipCounter(device)
if master and start_step >= max_steps:
    print(f"{run.ckpt_path} is at step {start_step} of max_steps={max_steps}: nothing to do "
          f"(raise max_steps to go on)")
# the first step's real images (each later step's are fetched while the one before runs), and the
# loss terms (+ the number of penalty passes) summed over the steps since the last log line
batches = [get_batch(start_step, micro) for micro in range(grad_accum)]
sums = torch.zeros(len(terms) + 1, device=device)
t_log, steps_since_log = time.time(), 0
for step in range(start_step, max_steps):
    for opt in (optimizer, d_optimizer):
        for group in opt.param_groups:
            group['lr'] = get_lr(step)
    regularize = gamma > 0 and step % reg_interval == 0
    # the whole global batch's noise and augmentation (pass, real/fake, image), sliced per rank and
    # micro-step: any world size trains the same run
    g = rng(step, 1, device)
    z_d, z_g = torch.randn((2, batch_size, model_config.z_dim), generator=g, device=device)
    aug = torch.rand((3, 2, batch_size, 7), generator=rng(step, 2, device), device=device)
    step_sums = torch.zeros(len(terms) + 1, device=device)  # + the number of penalty passes
    # D: on regularisation steps the penalties, in float32, at G's fakes (no gradient to G) and at
    # the real images; then the adversarial loss at the same images
    for micro, (x, y) in enumerate(batches):
        sl = my_slice(micro)
        with torch.no_grad(), ctx:
            fake = model(z_d[sl], y).float()
        if regularize:
            # each logit depends on its own image only, so real and fake share one forward; the
            # penalty's gradients accumulate here and are all-reduced with the loss pass's
            x_real, x_fake = x.detach().requires_grad_(True), fake.requires_grad_(True)
            both = torch.cat([diff_augment(x_real, aug[0, 0, sl]), diff_augment(x_fake, aug[0, 1, sl])])
            logits = raw_disc(both, torch.cat([y, y]))
            r1 = gradient_penalty(logits[:len(x)], x_real).mean()
            r2 = gradient_penalty(logits[len(x):], x_fake).mean()
            (reg_interval * gamma / 2 * (r1 + r2) / grad_accum).backward()
            passes = torch.ones_like(r1)
            step_sums[[2, 3, 6]] += torch.stack([r1.detach(), r2.detach(), passes]) / grad_accum
        if ddp:  # all-reduce the gradients on the last micro-step only
            disc.require_backward_grad_sync = micro == grad_accum - 1
        with ctx:
            both = torch.cat([diff_augment(x, aug[1, 0, sl]),
                              diff_augment(fake.detach(), aug[1, 1, sl])])
            logits_real, logits_fake = disc(both, torch.cat([y, y])).float().chunk(2)
        d_loss = adversarial_losses(logits_real, logits_fake)[0].mean()
        (d_loss / grad_accum).backward()
        terms_d = torch.stack([d_loss, logits_real.mean(), logits_fake.mean()]).detach()
        step_sums[[0, 4, 5]] += terms_d / grad_accum
    # clip, then skip a non-finite update on the device (fused Adam reads found_inf; no host sync);
    # the gradients are all-reduced, so every rank agrees
    max_norm = grad_clip if grad_clip > 0 else float('inf')
    d_grad_norm = torch.nn.utils.clip_grad_norm_(d_params, max_norm)
    d_bad = ~d_grad_norm.isfinite()
    d_optimizer.found_inf = d_bad.float()
    d_optimizer.step()
    d_optimizer.zero_grad(set_to_none=True)
    # G: through the updated D, outside DDP; D's weights get no gradient (inputs=params), and the
    # real logits, constants to G, none at all
    for micro, (x, y) in enumerate(batches):
        sl = my_slice(micro)
        if ddp:
            model.require_backward_grad_sync = micro == grad_accum - 1
        with ctx:
            fake = model(z_g[sl], y).float()
            logits_fake = g_disc(diff_augment(fake, aug[2, 1, sl]), y).float()
            with torch.no_grad():
                logits_real = (g_disc(diff_augment(x, aug[2, 0, sl]), y).float() if loss == 'rpgan'
                               else torch.zeros_like(logits_fake))
        g_loss = adversarial_losses(logits_real, logits_fake)[1].mean()
        (g_loss / grad_accum).backward(inputs=params)
        step_sums[1] += g_loss.detach() / grad_accum
    if step + 1 < max_steps:  # the next step's real images, gathered while this step's kernels run
        batches = [get_batch(step + 1, micro) for micro in range(grad_accum)]
    g_grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    g_bad = ~g_grad_norm.isfinite()
    optimizer.found_inf = g_bad.float()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    # G's EMA: a half-life of ema_kimg thousand images, at most ema_rampup of the images seen so far;
    # a skipped update leaves it alone too
    with torch.no_grad():
        ema_nimg = ema_kimg * 1000
        if ema_rampup:
            ema_nimg = min(ema_nimg, (images_seen + batch_size) * ema_rampup)
        beta = 0.5 ** (batch_size / ema_nimg) if ema_nimg > 0 else 0.0
        torch._foreach_lerp_(ema_params, params, (1 - beta) * ~g_bad)
    # a step with either update skipped: its losses are not averaged into the log
    bad = d_bad | g_bad
    sums += torch.where(bad, 0, step_sums)
    skips.add(bad)
    steps_since_log += 1
    images_seen += batch_size  # (kept true when a resumed run changes batch_size)

    last = step + 1 == max_steps
    stop = stopper.vote()
    log_step = (step + 1) % log_interval == 0 or last or stop
    if log_step:
        if ddp:
            dist.all_reduce(sums, op=dist.ReduceOp.AVG)
        n_skipped = skips.read(max_nonfinite, step + 1, run.last_good(), fix)  # the host sync
        # per step (nan if every step was skipped); the penalties per penalty pass (if any)
        avg = (sums[:-1] / (steps_since_log - n_skipped)).tolist()
        avg[2:4] = (sums[2:4] / sums[-1]).tolist() if sums[-1] else [None, None]
        avg = dict(zip(terms, avg))
        dt = (time.time() - t_log) / steps_since_log
        row = dict(step=step + 1, kimg=images_seen / 1e3, **avg, lr=get_lr(step),
                   d_grad_norm=d_grad_norm.item(), g_grad_norm=g_grad_norm.item(), skipped=n_skipped,
                   **bk.speed(dt, batch_size, flops_per_image, peak_tflops, world_size, device_type))
        if master:
            penalties = f"r1 {avg['r1']:.3g} r2 {avg['r2']:.3g} | " if avg['r1'] is not None else ''
            print(f"step {step + 1}/{max_steps} | {row['kimg']:.1f} kimg | d_loss {avg['d_loss']:.4f} "
                  f"| g_loss {avg['g_loss']:.4f} | {penalties}logits {avg['logits_real']:.2f} / "
                  f"{avg['logits_fake']:.2f} | lr {row['lr']:.2e} | grad norm D "
                  f"{row['d_grad_norm']:.3f} G {row['g_grad_norm']:.3f} | "
                  + bk.speed_text(row, max_steps - step - 1)
                  + (f" | {n_skipped} non-finite update(s) skipped" if n_skipped else ''))
            metrics.log(row)
        sums.zero_()
        steps_since_log = 0
    if master and ((step + 1) % sample_interval == 0 or last):
        with torch.no_grad(), ctx:
            samples = ema(grid_z, grid_y).float().clamp(-1, 1)
        bk.save_grid(samples, os.path.join(out_dir, f'samples_{step + 1:07d}.png'), grid_cols)
    if (step + 1) % ckpt_interval == 0 or last or stop:
        state = {'model': raw_model.state_dict(), 'ema': ema.state_dict(), 'disc': raw_disc.state_dict(),
                 'optimizer': optimizer.state_dict(), 'd_optimizer': d_optimizer.state_dict(),
                 'model_args': asdict(model_config), 'images_seen': images_seen,
                 'config': config, 'wandb_id': wandb_id}
        run.save(step + 1, state, params + ema_params + d_params, f"resume it with {fix}")
    if stop and not last:
        if master:
            print(f"stopped at step {step + 1} of {max_steps} ({stop}); the same command continues "
                  f"the run")
        break
    if log_step:
        t_log = time.time()  # the grid and checkpoint of a log step do not count as step time

if master and wandb_log:
    wandb_run.finish()
if ddp:
    dist.barrier()  # no rank tears its groups down while another still talks to it
    dist.destroy_process_group()
