"""
Trains a GAN: R3GAN's generator and discriminator (model.Generator, model.Discriminator; Huang et al. 2024) with
the relativistic pairing loss and zero-centred gradient penalties on both real and fake images. One file, top to
bottom.

    python train_gan.py config/mnist_gan.py                                   # out-mnist-gan
    torchrun --standalone --nproc_per_node=8 train_gan.py config/cifar10_gan.py
    python sample.py --out_dir=out-mnist-gan                                  # images from G's EMA

With D's logits d(x) on real images x and fake images G(z), the losses of the two networks are (loss='rpgan',
Jolicoeur-Martineau 2019; Huang et al. eq. 2)
    L_D = softplus(d(G(z)) - d(x)),    L_G = softplus(d(x) - d(G(z)))
or the classic non-saturating pair (loss='ns', Goodfellow et al. 2014) L_D = softplus(-d(x)) + softplus(d(G(z))),
L_G = softplus(-d(G(z))); D also pays gamma / 2 (R1 + R2) with R1 = ||grad_x d(x)||^2 on real and R2 the same on
fake images (Mescheder et al. 2018; R3GAN's eq. 5 needs both). The penalties run in float32 in their own pass, every
reg_interval steps with their weight multiplied by reg_interval (StyleGAN2's lazy regularisation; 1 = R3GAN).
Real and fake images go through the same differentiable augmentation (DiffAugment, Zhao et al. 2020) when augment
names any. The generator that samples is an EMA of G whose half-life is counted in images (Karras et al.).

Resume, preemption and non-finite steps work as in train_diffusion.py: re-run the same command.
"""
import copy
import csv
import glob
import json
import math
import os
import pickle
import random
import shutil
import signal
import tempfile
import time
from contextlib import nullcontext
from dataclasses import asdict

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from torch.nn.parallel import DistributedDataParallel as DDP

from model import GAN_PRESETS, Discriminator, count_flops, create_model

# -----------------------------------------------------------------------------
# defaults, overridden by config/*.py and --key=value
# I/O
out_dir = 'out-gan'
init_from = 'auto'  # 'auto': 'resume' if out_dir holds ckpt.pt, else 'scratch' (which never overwrites a checkpoint)
keep_last = 0  # also keep the newest keep_last checkpoints as out_dir/ckpt_<step>.pt (hard links: no extra space)
max_minutes = 0.0  # finish the step, save and exit 0 after this much wall time; 0 = no limit
log_interval = 50  # steps between log lines (the only host syncs of the loop)
sample_interval = 1000  # steps between grids of the EMA generator's images from fixed z, out_dir/samples_<step>.png
ckpt_interval = 1000  # steps between checkpoints (one is also written at the end)
wandb_log = False
wandb_project = 'gan'
wandb_run_name = 'gan'
# data
dataset = 'mnist'  # reads data/<dataset>/ (or a path), written by data/<dataset>/prepare.py
class_cond = True  # condition both networks on the labels (False: unconditional)
hflip = False  # random horizontal flips of the real images
augment = ''  # DiffAugment's ops on every image D sees, comma-separated: 'color', 'translation', 'cutout'; '' = none
# model
arch = 'GAN-S'  # 'GAN-{T,S,B}' (model.py's presets; GAN-B is R3GAN's CIFAR-10 network)
# loss
loss = 'rpgan'  # 'rpgan' (relativistic pairing) or 'ns' (non-saturating)
gamma = 0.05  # weight of the R1 and R2 penalties: gamma / 2 (R1 + R2)
reg_interval = 1  # penalties every this many steps, weighted by it (StyleGAN2 uses 16 for R1); 1 = every step
# optimization
batch_size = 64  # images per optimizer step, over all ranks and micro-steps
grad_accum = 1  # micro-steps per optimizer step on each rank
max_steps = 50000
lr = 2e-4  # of both networks
min_lr = 5e-5  # the cosine schedule's floor
lr_schedule = 'cosine'  # after warm-up: 'cosine' to min_lr, or 'constant'
warmup_steps = 0
beta2 = 0.99  # Adam's, for both networks; beta1 is 0, as in every modern GAN recipe
grad_clip = 0.0  # max global gradient norm of each network; 0 = no clipping (the norms are logged either way)
max_nonfinite = 20  # updates with a non-finite gradient norm are skipped; this many in a row stop the run
ema_kimg = 10.0  # half-life of the generator's EMA in thousands of images
ema_rampup = 0.05  # the half-life is at most this fraction of the images seen so far (StyleGAN2-ADA); 0 = none
# system
device = 'cuda' if torch.cuda.is_available() else 'cpu'
dtype = 'bfloat16' if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else 'float32'
compile = torch.cuda.is_available()  # torch.compile both networks (gains nothing on CPU but compile time)
activation_checkpointing = False  # recompute each residual block of G and D in the backward pass to save memory
peak_tflops = 0.0  # per-device peak for MFU; 0 = known GPUs' dense bf16 (float32: TF32) peak, none on CPU
seed = 0
# -----------------------------------------------------------------------------
config_keys = [k for k, v in globals().items() if not k.startswith('_') and isinstance(v, (int, float, bool, str))]
exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())
config = {k: globals()[k] for k in config_keys}
AUGMENTS = ('color', 'translation', 'cutout')
for key, allowed in [('init_from', ('auto', 'scratch', 'resume')), ('arch', GAN_PRESETS), ('loss', ('rpgan', 'ns')),
                     ('lr_schedule', ('cosine', 'constant')),
                     ('dtype', ('float32', 'bfloat16'))]:  # float16 would need loss scaling, left out: use bfloat16
    if config[key] not in allowed:
        raise SystemExit(f"error: {key}='{config[key]}' is not one of {', '.join(allowed)}")
augment_ops = [op for op in augment.split(',') if op]
if not set(augment_ops) <= set(AUGMENTS):
    raise SystemExit(f"error: augment='{augment}' must be comma-separated ops from {', '.join(AUGMENTS)}, or ''")
for key in ('batch_size', 'grad_accum', 'max_steps', 'log_interval', 'sample_interval', 'ckpt_interval',
            'reg_interval', 'max_nonfinite'):
    if config[key] < 1:
        raise SystemExit(f"error: {key}={config[key]} must be at least 1")
for key, ok, rule in [('lr', lr > 0, 'positive'), ('gamma', gamma >= 0, 'at least 0 (0 = no gradient penalties)'),
                      ('beta2', 0 <= beta2 < 1, 'in [0, 1)'), ('ema_kimg', ema_kimg >= 0, 'at least 0 (0 = no EMA)'),
                      ('ema_rampup', ema_rampup >= 0, 'at least 0 (0 = none)'), ('keep_last', keep_last >= 0, 'at least 0'),
                      ('max_minutes', max_minutes >= 0, 'at least 0'),
                      ('grad_clip', grad_clip >= 0, 'at least 0 (0 = no clipping)')]:
    if not ok:
        raise SystemExit(f"error: {key}={config[key]!r} must be {rule}")
# -----------------------------------------------------------------------------
# distributed setup: torchrun sets RANK, LOCAL_RANK, WORLD_SIZE
t_start = time.time()
if device.startswith('cuda') and not torch.cuda.is_available():
    raise SystemExit(f"error: device='{device}' but CUDA is not available here; pass --device=cpu")
ddp = int(os.environ.get('RANK', -1)) != -1
if ddp:
    rank, local_rank, world_size = int(os.environ['RANK']), int(os.environ['LOCAL_RANK']), int(os.environ['WORLD_SIZE'])
    if device.startswith('cuda'):
        device = f'cuda:{local_rank}'
        torch.cuda.set_device(device)
    dist.init_process_group(backend='nccl' if device.startswith('cuda') else 'gloo')
    stop_group = dist.new_group(backend='gloo')  # for the per-step "stop now?" vote, on the host: no GPU sync
else:
    rank, local_rank, world_size = 0, 0, 1
master = rank == 0
device_type = 'cuda' if device.startswith('cuda') else 'cpu'
if batch_size % (world_size * grad_accum):
    raise SystemExit(f"error: batch_size={batch_size} is not divisible by world_size x grad_accum = "
                     f"{world_size} x {grad_accum}; pick a batch_size that is a multiple of {world_size * grad_accum}")
micro_batch = batch_size // (world_size * grad_accum)
ckpt_path = os.path.join(out_dir, 'ckpt.pt')
if init_from == 'auto':
    init_from = 'resume' if os.path.exists(ckpt_path) else 'scratch'
elif init_from == 'scratch' and os.path.exists(ckpt_path):
    raise SystemExit(f"error: {ckpt_path} exists and init_from='scratch' would overwrite it; continue that run with "
                     f"--init_from=auto, or start this one in another --out_dir")
if master:
    try:
        os.makedirs(out_dir, exist_ok=True)
        tempfile.TemporaryFile(dir=out_dir).close()  # better to find out now than at the first checkpoint
    except OSError as e:
        raise SystemExit(f"error: cannot write to out_dir='{out_dir}' ({e.strerror}); pass an --out_dir you can write to")
    print(f"{world_size} rank(s) on {device_type}, {micro_batch} images per micro-step, {grad_accum} micro-step(s), "
          f"{batch_size} per optimizer step")
torch.backends.cuda.matmul.allow_tf32 = True
torch.backends.cudnn.allow_tf32 = True
ctx = nullcontext() if dtype == 'float32' else torch.autocast(device_type=device_type, dtype=torch.bfloat16)

def rng(step, stream, dev='cpu'):
    """A generator seeded by (seed, step, stream): the same on every rank, and the same again after a resume."""
    return torch.Generator(dev).manual_seed(int(np.random.SeedSequence([seed, step, stream]).generate_state(1)[0]))

def load_checkpoint(path):
    try:  # weights_only: tensors and plain types, nothing in the file can run code
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        why = 'it holds objects other than tensors and plain types' if isinstance(e, pickle.UnpicklingError) else \
            str(e).split('. ')[0][:200]
        raise SystemExit(f"error: cannot load {path} ({why}); restore a checkpoint this script wrote (keep_last "
                         f"keeps ckpt_<step>.pt copies), or start in another --out_dir")

# -----------------------------------------------------------------------------
# data: uint8 arrays (N, H, W, C) memory-mapped from data/<dataset>/
data_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data', dataset)  # (a path stays itself)
prepare = f"python data/{dataset}/prepare.py" if os.path.basename(dataset) == dataset else "its prepare.py"
try:
    meta = json.load(open(os.path.join(data_dir, 'meta.json')))
    train_x, train_y = np.load(os.path.join(data_dir, 'train_x.npy'), mmap_mode='r'), np.load(os.path.join(data_dir, 'train_y.npy'))
    H, W, C = meta['image_size'], meta['image_size'], meta['channels']
    num_classes = meta['num_classes'] if class_cond else 0
except (OSError, ValueError, KeyError) as e:
    why = f'{e.strerror}: {e.filename}' if isinstance(e, OSError) else repr(e)
    raise SystemExit(f"error: dataset '{dataset}' is missing or unreadable in {data_dir} ({why}); run {prepare} first")
if 'latent' in meta:
    raise SystemExit(f"error: dataset '{dataset}' holds latents; train_gan.py trains on images")
if train_x.dtype != np.uint8 or train_x.shape[1:] != (H, W, C) or train_y.shape != (len(train_x),) or not len(train_x):
    raise SystemExit(f"error: {data_dir}/train_x.npy is {train_x.dtype} {train_x.shape} with {train_y.shape} labels, but "
                     f"meta.json says uint8 (N > 0, {H}, {W}, {C}) and N labels; re-run {prepare}")

def my_slice(micro):
    """This rank's part of the global batch in micro-step `micro`: micro-steps outside, ranks inside."""
    lo = (micro * world_size + rank) * micro_batch
    return slice(lo, lo + micro_batch)

def get_batch(step, micro):
    """This rank's real images (floats in [-1, 1], NCHW, on the device) and labels of micro-step `micro` of the
    global batch of `step`, drawn with replacement."""
    g = rng(step, 0)
    idx = np.sort(torch.randint(len(train_x), (batch_size,), generator=g).numpy())[my_slice(micro)]  # sorted: mmap
    flip = (torch.rand(batch_size, generator=g) < 0.5)[my_slice(micro)]
    x = torch.from_numpy(train_x[idx])
    if hflip:
        x = torch.where(flip[:, None, None, None], x.flip(2), x)
    y = torch.from_numpy(train_y[idx].astype(np.int64))
    if device_type == 'cuda':
        x, y = x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device).permute(0, 3, 1, 2).float().div(127.5).sub(1), y.to(device)

def diff_augment(x, params):
    """DiffAugment (Zhao et al. 2020) with per-image parameters params (B, 7) uniform in [0, 1): brightness,
    saturation and contrast ('color'), a shift of up to 1/8 of the size in each direction ('translation', zeros
    shifted in), a zeroed square of half the size ('cutout'). Differentiable in x: G learns through it."""
    if not augment_ops:
        return x
    p = params.to(x.dtype)[:, :, None, None, None].unbind(1)
    B, _, h, w = x.shape
    if 'color' in augment_ops:
        x = x + p[0] - 0.5
        mean = x.mean(dim=1, keepdim=True)
        x = (x - mean) * 2 * p[1] + mean
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = (x - mean) * (p[2] + 0.5) + mean
    rows, cols = torch.arange(h, device=x.device).view(1, h, 1), torch.arange(w, device=x.device).view(1, 1, w)
    if 'translation' in augment_ops:
        dy = (p[3].view(B, 1, 1) * (2 * (h // 8) + 1)).long() - h // 8  # integers in [-h/8, h/8]
        dx = (p[4].view(B, 1, 1) * (2 * (w // 8) + 1)).long() - w // 8
        src_r, src_c = rows - dy, cols - dx
        inside = ((src_r >= 0) & (src_r < h) & (src_c >= 0) & (src_c < w)).unsqueeze(1)
        flat = (src_r.clamp(0, h - 1) * w + src_c.clamp(0, w - 1)).view(B, 1, h * w).expand(-1, x.shape[1], -1)
        x = x.flatten(2).gather(2, flat).view_as(x) * inside
    if 'cutout' in augment_ops:
        cy, cx = (p[5].view(B, 1, 1) * (h + h % 2)).long(), (p[6].view(B, 1, 1) * (w + w % 2)).long()  # the centre
        x = x * ~(((rows - cy).abs() < h // 4) & ((cols - cx).abs() < w // 4)).unsqueeze(1)
    return x

def gradient_penalty(logits, x):
    """||d logits_i / d x_i||^2 per image, differentiable (create_graph) so that D learns from it: R1 on real x,
    R2 on fake x. logits (B,) come from x (B, ...), which requires grad; each logit depends on its own image only."""
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
if device_type == 'cuda':  # the faster layout for convolutions on tensor cores (the batches arrive in it: NHWC)
    model, disc = model.to(memory_format=torch.channels_last), disc.to(memory_format=torch.channels_last)
ema = copy.deepcopy(model).requires_grad_(False).eval()
optimizer = torch.optim.Adam(model.parameters(), lr=lr, betas=(0.0, beta2), fused=True)  # fused: skips on the device
d_optimizer = torch.optim.Adam(disc.parameters(), lr=lr, betas=(0.0, beta2), fused=True)
start_step, saved_step, wandb_id = 0, None, None
if init_from == 'resume':
    if not os.path.exists(ckpt_path):
        raise SystemExit(f"error: init_from='resume' but {ckpt_path} does not exist; use --init_from=scratch")
    ckpt = load_checkpoint(ckpt_path)
    if ckpt['model_args'] != asdict(model_config):
        raise SystemExit(f"error: {ckpt_path} holds another network ({ckpt['config']['arch']}, "
                         f"{ckpt['model_args']['num_classes']} classes); resume with the config it was trained with, "
                         f"or choose another out_dir")
    for net, key in ((model, 'model'), (ema, 'ema'), (disc, 'disc'), (optimizer, 'optimizer'), (d_optimizer, 'd_optimizer')):
        net.load_state_dict(ckpt[key])
    start_step, wandb_id = ckpt['step'], ckpt['wandb_id']
    saved_step = start_step
    changed = [f"{k} {v!r} -> {config[k]!r}" for k, v in ckpt['config'].items() if config.get(k, v) != v]
    rng_state = ckpt['rng'][rank] if len(ckpt['rng']) == world_size else None  # the global RNGs, for what a fork adds
    if rng_state is not None:
        torch.set_rng_state(rng_state['torch'].cpu())
        if device_type == 'cuda':
            torch.cuda.set_rng_state(rng_state['cuda'].cpu())
        np.random.set_state(('MT19937', np.array(rng_state['numpy'][0], dtype=np.uint32), *rng_state['numpy'][1:]))
        random.setstate((rng_state['python'][0], tuple(rng_state['python'][1]), rng_state['python'][2]))
    del ckpt
    if master:
        print(f"resuming {ckpt_path} at step {start_step} ({start_step * batch_size / 1e3:.1f} kimg)"
              + (f"; changed since: {', '.join(changed)}" if changed else ''))
else:
    torch.manual_seed(seed + rank)
    np.random.seed(seed + rank)
    random.seed(seed + rank)
g_flops = count_flops(model, torch.zeros(1, model_config.z_dim, device=device), torch.zeros(1, dtype=torch.long, device=device))
d_flops = count_flops(disc, torch.zeros(1, C, H, W, device=device), torch.zeros(1, dtype=torch.long, device=device))
# raw_disc computes the penalties (torch.compile has no double backward), frozen_disc (compiled) G's loss, and disc
# (DDP over frozen_disc) D's loss, whose backward all-reduces the gradients of both D passes
raw_model, raw_disc = model, disc
if compile:
    model, disc = torch.compile(model), torch.compile(disc)
frozen_disc = disc
if ddp:
    model = DDP(model, device_ids=[local_rank] if device_type == 'cuda' else None)
    disc = DDP(disc, device_ids=[local_rank] if device_type == 'cuda' else None)
params, ema_params, d_params = list(raw_model.parameters()), list(ema.parameters()), list(raw_disc.parameters())
if master:
    print(f"{arch}: G {sum(p.numel() for p in params) / 1e6:.2f}M, D {sum(p.numel() for p in d_params) / 1e6:.2f}M "
          f"parameters, {d_flops / 1e9:.3f} GFLOPs forward per image in D; "
          + (f"{num_classes} classes" if num_classes else 'unconditional'))

# FLOPs per real image of a step: D on a real and a fake (forward + backward, 3x the forward) after G's forward; G
# forward + backward through D's forward and its backward to the input only (D is frozen: 2x the forward; and D's
# forward on the real, for rpgan); the penalty pass on a real and a fake (forward 1, backward to the input 1, and
# the backward of that 4: 6 forwards each, as torch's FlopCounterMode counts them) once every reg_interval steps
flops_per_image = 4 * g_flops + (8 + (loss == 'rpgan') + 12 * (gamma > 0) / reg_interval) * d_flops
if peak_tflops == 0 and device_type == 'cuda':  # dense tensor-core peaks: bf16's (SXM unless named), TF32's half
    name = torch.cuda.get_device_name()
    peak_tflops = next((v for k, v in {'H100 PCIe': 756.5, 'H100 NVL': 835.5, 'H100': 989.4, 'H200': 989.4,
                                       'A100': 312.0}.items() if k in name), 0.0) / (2 if dtype == 'float32' else 1)

def get_lr(step):
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if lr_schedule == 'constant':
        return lr
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))

def save_grid(x, path, ncol):
    """Images in [-1, 1], (B, C, H, W), to one PNG grid."""
    x = ((x.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).cpu()
    x = torch.cat([x, x.new_zeros((-len(x) % ncol, *x.shape[1:]))])
    B, c, h, w = x.shape
    grid = x.view(B // ncol, ncol, c, h, w).permute(0, 3, 1, 4, 2).reshape(B // ncol * h, ncol * w, c)
    Image.fromarray(grid.squeeze(-1).numpy()).save(path)

def rng_state():
    return {'torch': torch.get_rng_state(), 'cuda': torch.cuda.get_rng_state() if device_type == 'cuda' else None,
            'numpy': [np.random.get_state()[1].tolist(), *np.random.get_state()[2:]], 'python': random.getstate()}

def last_good():
    return f"{ckpt_path} (step {saved_step}) is intact" if saved_step else f"no checkpoint was written to {out_dir}"

def save_checkpoint(step):
    """All ranks gather their RNG states; the master writes ckpt.pt atomically: a temporary file, flushed to disk,
    then renamed over the previous one, which stays whole until that moment. Non-finite weights are never saved."""
    global saved_step
    if not torch.stack([p.isfinite().all() for p in params + ema_params + d_params]).all():  # the same on every rank
        raise SystemExit(f"error: the weights are not finite at step {step}, so they are not saved; {last_good()}: "
                         f"resume it with a lower lr, a larger gamma or dtype='float32'")
    states = [None] * world_size
    if ddp:
        dist.all_gather_object(states, rng_state())
    else:
        states = [rng_state()]
    if master:
        ckpt = {'model': raw_model.state_dict(), 'ema': ema.state_dict(), 'disc': raw_disc.state_dict(),
                'optimizer': optimizer.state_dict(), 'd_optimizer': d_optimizer.state_dict(),
                'model_args': asdict(model_config), 'step': step, 'images_seen': step * batch_size, 'config': config,
                'rng': states, 'wandb_id': wandb_id}
        try:
            with open(ckpt_path + '.tmp', 'wb') as f:
                torch.save(ckpt, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(ckpt_path + '.tmp', ckpt_path)
        except (OSError, RuntimeError) as e:  # a full disk surfaces from torch.save as a RuntimeError
            os.remove(ckpt_path + '.tmp')
            why, free = e.strerror if isinstance(e, OSError) else 'torch.save could not write it', shutil.disk_usage(out_dir).free
            raise SystemExit(f"error: writing {ckpt_path} failed at step {step} ({why}; {free / 2**30:.1f} GiB free); "
                             f"{last_good()}: make room and re-run the same command")
        if keep_last:
            kept = os.path.join(out_dir, f'ckpt_{step:07d}.pt')
            if not os.path.exists(kept):
                os.link(ckpt_path, kept)  # a second name for the same file
            for old in sorted(glob.glob(os.path.join(out_dir, 'ckpt_[0-9]*.pt')))[:-keep_last]:
                os.remove(old)
        print(f"saved {ckpt_path} at step {step}")
    saved_step = step

grid_cols = min(num_classes, 10) if num_classes else 8
grid_z = torch.randn((8 * grid_cols, model_config.z_dim), generator=rng(0, 99)).to(device)  # the same in every grid
grid_y = (torch.arange(8 * grid_cols) % max(num_classes, 1)).to(device)  # a column per class

# -----------------------------------------------------------------------------
# logging: stdout, out_dir/metrics.csv, and wandb
terms = ['d_loss', 'g_loss', 'r1', 'r2', 'logits_real', 'logits_fake']
fields = ['step', 'kimg', *terms, 'lr', 'd_grad_norm', 'g_grad_norm', 'skipped', 'ms_per_step', 'img_per_s', 'tflops',
          'mfu']
metrics_path = os.path.join(out_dir, 'metrics.csv')
if master:
    rows = list(csv.DictReader(open(metrics_path))) if init_from == 'resume' and os.path.exists(metrics_path) else []
    with open(metrics_path + '.tmp', 'w', newline='') as f:  # on resume, drop the rows logged after the checkpoint
        csv.DictWriter(f, fields).writeheader()  # (and a row cut short by a crash)
        csv.DictWriter(f, fields).writerows(r for r in rows if None not in r.values() and int(r['step']) <= start_step)
    os.replace(metrics_path + '.tmp', metrics_path)
    if wandb_log:
        import wandb
        wandb_run = wandb.init(project=wandb_project, name=wandb_run_name, config=config, dir=out_dir,
                               id=wandb_id, resume='allow')
        wandb_id = wandb_run.id

def log(row):
    row = {k: round(v, 6) if isinstance(v, float) else v for k, v in row.items()}
    with open(metrics_path, 'a', newline='') as f:
        csv.DictWriter(f, fields).writerow(row)
    if wandb_log:
        wandb.log(row, step=row['step'])

# -----------------------------------------------------------------------------
# training loop: a D step (on regularisation steps the penalty pass, then the loss pass), then a G step against the
# updated D (alternating, as in Goodfellow et al. and StyleGAN2-ADA)
stop_signal = 0

def request_stop(signum, frame):  # SIGTERM (a scheduler, torchrun) or SIGUSR1 (SLURM's --signal warning)
    global stop_signal
    stop_signal = signum  # the loop finishes its step, saves and exits

for sig in (signal.SIGTERM, signal.SIGUSR1):
    signal.signal(sig, request_stop)
if master and start_step >= max_steps:
    print(f"{ckpt_path} is at step {start_step} of max_steps={max_steps}: nothing to do (raise max_steps to go on)")
batches = [get_batch(start_step, micro) for micro in range(grad_accum)]  # later ones are fetched during a step
sums = torch.zeros(len(terms) + 1, device=device)  # the loss terms (+ penalty passes) summed since the last log line
skipped, streak, worst_streak = (torch.zeros((), device=device) for _ in range(3))  # non-finite updates skipped
t_log, steps_since_log = time.time(), 0
for step in range(start_step, max_steps):
    for opt in (optimizer, d_optimizer):
        for group in opt.param_groups:
            group['lr'] = get_lr(step)
    regularize = gamma > 0 and step % reg_interval == 0
    # the whole global batch's noise and augmentation, sliced per rank and micro-step: any world size, the same run
    z_d, z_g = torch.randn((2, batch_size, model_config.z_dim), generator=rng(step, 1, device), device=device)
    aug = torch.rand((3, 2, batch_size, 7), generator=rng(step, 2, device), device=device)  # (pass, real/fake, image)
    step_sums = torch.zeros(len(terms) + 1, device=device)  # + the number of penalty passes
    # D: on regularisation steps the penalties, in float32, at G's fakes (no gradient to G) and at the real images;
    # then the adversarial loss at the same images
    for micro, (x, y) in enumerate(batches):
        s = my_slice(micro)
        with torch.no_grad(), ctx:
            fake = model(z_d[s], y).float()
        if regularize:
            x_real, x_fake = x.detach().requires_grad_(True), fake.requires_grad_(True)
            logits = raw_disc(torch.cat([diff_augment(x_real, aug[0, 0, s]), diff_augment(x_fake, aug[0, 1, s])]),
                              torch.cat([y, y]))
            r1 = gradient_penalty(logits[:len(x)], x_real).mean()  # (each logit depends on its own image only,
            r2 = gradient_penalty(logits[len(x):], x_fake).mean()  # so the two halves can share one forward)
            (reg_interval * gamma / 2 * (r1 + r2) / grad_accum).backward()  # accumulates here; all-reduced below
            step_sums[[2, 3, 6]] += torch.stack([r1.detach(), r2.detach(), torch.ones_like(r1)]) / grad_accum
        if ddp:  # all-reduce the gradients on the last micro-step only
            disc.require_backward_grad_sync = micro == grad_accum - 1
        with ctx:
            logits_real, logits_fake = disc(torch.cat([diff_augment(x, aug[1, 0, s]), diff_augment(fake.detach(), aug[1, 1, s])]),
                                            torch.cat([y, y])).float().chunk(2)
        d_loss = adversarial_losses(logits_real, logits_fake)[0].mean()
        (d_loss / grad_accum).backward()
        step_sums[[0, 4, 5]] += torch.stack([d_loss, logits_real.mean(), logits_fake.mean()]).detach() / grad_accum
    d_grad_norm = torch.nn.utils.clip_grad_norm_(d_params, grad_clip if grad_clip > 0 else float('inf'))
    d_bad = ~d_grad_norm.isfinite()  # all-reduced gradients: the same on every rank
    d_optimizer.found_inf = d_bad.float()  # fused Adam then skips the update on the device, with no host sync
    d_optimizer.step()
    d_optimizer.zero_grad(set_to_none=True)
    # G: through the updated D, whose weights stay as they are (frozen, and outside DDP, which then waits for no
    # gradients of them)
    raw_disc.requires_grad_(False)
    for micro, (x, y) in enumerate(batches):
        s = my_slice(micro)
        if ddp:
            model.require_backward_grad_sync = micro == grad_accum - 1
        with ctx:
            logits_fake = frozen_disc(diff_augment(model(z_g[s], y).float(), aug[2, 1, s]), y).float()
            logits_real = frozen_disc(diff_augment(x, aug[2, 0, s]), y).float() if loss == 'rpgan' else torch.zeros_like(logits_fake)
        g_loss = adversarial_losses(logits_real, logits_fake)[1].mean()
        (g_loss / grad_accum).backward()
        step_sums[1] += g_loss.detach() / grad_accum
    raw_disc.requires_grad_(True)
    if step + 1 < max_steps:  # the next step's real images, gathered while this step's kernels run
        batches = [get_batch(step + 1, micro) for micro in range(grad_accum)]
    g_grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float('inf'))
    g_bad = ~g_grad_norm.isfinite()
    optimizer.found_inf = g_bad.float()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():  # EMA by half-life in images, ramped up; a skipped update leaves it alone too
        ema_nimg = min(ema_kimg * 1000, (step + 1) * batch_size * ema_rampup) if ema_rampup else ema_kimg * 1000
        beta = 0.5 ** (batch_size / ema_nimg) if ema_nimg > 0 else 0.0
        torch._foreach_lerp_(ema_params, params, (1 - beta) * ~g_bad)
    bad = d_bad | g_bad  # a step with either update skipped: its losses are not averaged into the log
    sums += torch.where(bad, 0, step_sums)
    skipped += bad
    streak = (streak + 1) * bad
    worst_streak = torch.maximum(worst_streak, streak)
    steps_since_log += 1

    last = step + 1 == max_steps
    stop = torch.tensor([stop_signal, max_minutes > 0 and time.time() - t_start > 60 * max_minutes])
    if ddp:  # every rank stops at the same step: a vote on the host, over gloo, that does not wait for the GPU
        dist.all_reduce(stop, op=dist.ReduceOp.MAX, group=stop_group)
    stop = signal.Signals(int(stop[0])).name if stop[0] else f'max_minutes={max_minutes}' if stop[1] else None
    log_step = (step + 1) % log_interval == 0 or last or stop
    if log_step:
        if ddp:
            dist.all_reduce(sums, op=dist.ReduceOp.AVG)
        n_skipped = int(skipped.item())  # the host sync
        avg = (sums[:-1] / (steps_since_log - n_skipped)).tolist()  # nan if every step was skipped
        avg[2:4] = (sums[2:4] / sums[-1]).tolist() if sums[-1] else [None, None]  # per penalty pass (if any)
        avg = dict(zip(terms, avg))
        dt = (time.time() - t_log) / steps_since_log
        row = dict(step=step + 1, kimg=(step + 1) * batch_size / 1e3, **avg, lr=get_lr(step),
                   d_grad_norm=d_grad_norm.item(), g_grad_norm=g_grad_norm.item(), skipped=n_skipped,
                   ms_per_step=dt * 1e3, img_per_s=batch_size / dt)
        row['tflops'] = flops_per_image * row['img_per_s'] / 1e12
        row['mfu'] = row['tflops'] / (peak_tflops * world_size) if peak_tflops else float('nan')
        if master:
            print(f"step {row['step']}/{max_steps} | {row['kimg']:.1f} kimg | d_loss {avg['d_loss']:.4f} | g_loss "
                  f"{avg['g_loss']:.4f} | " + (f"r1 {avg['r1']:.3g} r2 {avg['r2']:.3g} | " if avg['r1'] is not None else '') + f"logits {avg['logits_real']:.2f} / "
                  f"{avg['logits_fake']:.2f} | lr {row['lr']:.2e} | grad norm D {row['d_grad_norm']:.3f} G "
                  f"{row['g_grad_norm']:.3f} | {dt * 1e3:.0f} ms/step | {row['img_per_s']:.0f} img/s | "
                  f"{row['tflops']:.2f} TFLOP/s | mfu {format(row['mfu'], '.1%') if peak_tflops else 'n/a'} | "
                  f"eta {dt * (max_steps - step - 1) / 60:.1f} min"
                  + (f" | {n_skipped} non-finite update(s) skipped" if n_skipped else ''))
            log(row)
        if worst_streak.item() >= max_nonfinite:
            raise SystemExit(f"error: {int(worst_streak.item())} updates in a row had a non-finite gradient norm and were "
                             f"skipped (max_nonfinite={max_nonfinite}) by step {step + 1}; {last_good()}: resume it with "
                             f"a lower lr, a larger gamma or dtype='float32'")
        for t in (sums, skipped, worst_streak):
            t.zero_()
        steps_since_log = 0
    if master and ((step + 1) % sample_interval == 0 or last):
        with torch.no_grad(), ctx:  # a column per class (conditional), the same z in every grid
            save_grid(ema(grid_z, grid_y).float().clamp(-1, 1), os.path.join(out_dir, f'samples_{step + 1:07d}.png'),
                      grid_cols)
    if (step + 1) % ckpt_interval == 0 or last or stop:
        save_checkpoint(step + 1)
    if stop and not last:
        if master:
            print(f"stopped at step {step + 1} of {max_steps} ({stop}); the same command continues the run")
        break
    if log_step:
        t_log = time.time()  # the grid and checkpoint of a log step do not count as step time

if master and wandb_log:
    wandb.finish()
if ddp:
    dist.barrier()  # no rank tears its groups down while another still talks to it
    dist.destroy_process_group()
