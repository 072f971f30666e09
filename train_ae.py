"""
Trains the autoencoder that gives latent diffusion its latents, then encodes a dataset into them: one file, top to
bottom.

    python train_ae.py config/mnist_ae.py                         # trains out-mnist-ae (best.pt and ckpt.pt)
    python train_ae.py config/mnist_ae.py --mode=encode           # data/mnist-latents/: train_diffusion.py's input
    torchrun --standalone --nproc_per_node=8 train_ae.py config/mnist_ae.py --mode=encode   # each rank a share

The network is LDM's AutoencoderKL (model.Autoencoder; Rombach et al. 2022). The loss of an image x and its
reconstruction x' = D(z), z ~ q(z|x) = N(mean, exp(logvar)), is
    |x - x'| (or squared, mean over pixels) + ssim_weight (1 - SSIM(x, x')) + lpips_weight LPIPS(x, x')
    + kl_weight KL(q(z|x) || N(0, I)) / pixels + disc_weight * lambda * (-PatchGAN logits of x')
with lambda = ||grad rec|| / ||grad adv|| at the decoder's last layer (Esser et al. 2021, eq. 7), the discriminator
trained with the hinge loss. The KL is divided by the pixel count because the other terms are means over pixels:
kl_weight then means what it means in LDM (1e-6), whose terms are sums. The discriminator starts training at
disc_start and its loss reaches the decoder from adv_start on: a discriminator that starts untrained pushes the
decoder in random directions, the quality drop that LDM users report when it switches on.

Encoding writes the posterior mean of every image (and, with encode_flips, of its mirror image) as float16 to
data/<latents>/{train,val}_x.npy, the labels beside them, the per-channel mean and std in meta.json, and a copy of
the encoder-decoder's weights as autoencoder.pt, which train_diffusion.py and sample.py decode through.

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

from model import AE_PRESETS, LPIPS, AEConfig, Autoencoder, PatchDiscriminator, count_flops, create_model

# -----------------------------------------------------------------------------
# defaults, overridden by config/*.py and --key=value
mode = 'train'  # 'train', or 'encode': write the dataset's latents with out_dir's autoencoder
# I/O
out_dir = 'out-ae'
init_from = 'auto'  # 'auto': 'resume' if out_dir holds ckpt.pt, else 'scratch' (which never overwrites a checkpoint)
keep_last = 0  # also keep the newest keep_last checkpoints as out_dir/ckpt_<step>.pt (hard links: no extra space)
max_minutes = 0.0  # finish the step, save and exit 0 after this much wall time; 0 = no limit
log_interval = 50  # steps between log lines (the only host syncs of the loop)
eval_interval = 500  # steps between validations: PSNR, SSIM, L1, a grid of inputs and reconstructions, best.pt
eval_images = 512  # val images in each validation
patience = 0  # stop when this many validations in a row did not improve on the best EMA PSNR; 0 = never
ckpt_interval = 1000  # steps between checkpoints (one is also written at the end)
wandb_log = False
wandb_project = 'autoencoder'
wandb_run_name = 'ae'
# data
dataset = 'mnist'  # reads data/<dataset>/ (or a path), written by data/<dataset>/prepare.py
hflip = False  # random horizontal flips
# model
arch = 'AE-S/f4'  # 'AE-{S,B}/f{4,8,16}' (model.py's presets; AE-B/f8 is LDM's kl-f8)
z_channels = 4
mid_attention = True
# loss
rec_loss = 'l1'  # 'l1' or 'l2', per pixel
kl_weight = 1e-6  # on KL / pixels; 0 = a plain autoencoder (the encoder outputs z itself)
ssim_weight = 0.0  # on 1 - SSIM: structure and contrast, which L1 alone blurs
lpips_weight = 0.0  # on LPIPS, with the two weight files below (nothing is downloaded)
lpips_vgg = ''  # torchvision's VGG16 weights, e.g. ~/.cache/torch/hub/checkpoints/vgg16-397923af.pth
lpips_lin = ''  # the lpips package's linear heads, lpips/weights/v0.1/vgg.pth
disc_weight = 0.5  # on the adaptive-weighted adversarial loss; 0 = no discriminator
disc_start = 2000  # step at which the discriminator starts training
adv_start = 3000  # step from which its loss reaches the decoder (at least disc_start)
disc_layers = 3  # PatchGAN layers (3: 70-pixel patches; 2 suits 28-32 px images)
disc_channels = 64
# optimization
batch_size = 64  # images per optimizer step, over all ranks and micro-steps
grad_accum = 1  # micro-steps per optimizer step on each rank
max_steps = 10000
lr = 1e-4  # of both networks
min_lr = 1e-5  # the cosine schedule's floor
lr_schedule = 'cosine'  # after warm-up: 'cosine' to min_lr, or 'constant'
warmup_steps = 100
weight_decay = 0.0  # AdamW, on weights of 2 or more dimensions only
beta1 = 0.5  # VQGAN's and LDM's Adam betas, for both networks
beta2 = 0.9
grad_clip = 1.0  # max global gradient norm of each network; 0 = no clipping (the norms are logged either way)
max_nonfinite = 20  # updates with a non-finite gradient norm are skipped; this many in a row stop the run
ema_decay = 0.999  # per step, with warm-up: min(ema_decay, (1 + step) / (10 + step))
# encoding (mode='encode')
latents = ''  # the latent dataset to write, data/<latents>/ (or a path); '' = '<dataset>-latents'
encode_from = 'best'  # 'best' (best.pt) or 'ckpt' (ckpt.pt) in out_dir; its EMA weights encode
encode_flips = False  # also encode each training image's mirror image (for train_diffusion.py's hflip)
# system
device = 'cuda' if torch.cuda.is_available() else 'cpu'
dtype = 'bfloat16' if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else 'float32'
compile = torch.cuda.is_available()  # torch.compile the autoencoder (gains nothing on CPU but compile time)
activation_checkpointing = False  # recompute each residual block in the backward pass to save memory
peak_tflops = 0.0  # per-device peak for MFU; 0 = known GPUs' dense bf16 (float32: TF32) peak, none on CPU
seed = 0
# -----------------------------------------------------------------------------
config_keys = [k for k, v in globals().items() if not k.startswith('_') and isinstance(v, (int, float, bool, str))]
exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())
config = {k: globals()[k] for k in config_keys}
for key, allowed in [('mode', ('train', 'encode')), ('init_from', ('auto', 'scratch', 'resume')), ('arch', AE_PRESETS),
                     ('rec_loss', ('l1', 'l2')), ('lr_schedule', ('cosine', 'constant')), ('encode_from', ('best', 'ckpt')),
                     ('dtype', ('float32', 'bfloat16'))]:  # float16 would need loss scaling, left out: use bfloat16
    if config[key] not in allowed:
        raise SystemExit(f"error: {key}='{config[key]}' is not one of {', '.join(allowed)}")
for key in ('batch_size', 'grad_accum', 'max_steps', 'log_interval', 'eval_interval', 'eval_images', 'ckpt_interval',
            'z_channels', 'disc_layers', 'disc_channels', 'max_nonfinite'):
    if config[key] < 1:
        raise SystemExit(f"error: {key}={config[key]} must be at least 1")
for key, ok, rule in [('lr', lr > 0, 'positive'), ('ema_decay', 0 <= ema_decay < 1, 'in [0, 1)'),
                      ('kl_weight', kl_weight >= 0, 'at least 0 (0 = a plain autoencoder)'),
                      ('ssim_weight', ssim_weight >= 0, 'at least 0'), ('disc_weight', disc_weight >= 0, 'at least 0'),
                      ('lpips_weight', lpips_weight >= 0, 'at least 0'),
                      ('lpips_vgg', not lpips_weight or (lpips_vgg and lpips_lin), 'set, with lpips_lin, when lpips_weight > 0'),
                      ('adv_start', adv_start >= disc_start, f'at least disc_start={disc_start}: the discriminator '
                       f'learns before its loss reaches the decoder'), ('patience', patience >= 0, 'at least 0'),
                      ('keep_last', keep_last >= 0, 'at least 0'), ('max_minutes', max_minutes >= 0, 'at least 0'),
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
ckpt_path, best_path = os.path.join(out_dir, 'ckpt.pt'), os.path.join(out_dir, 'best.pt')
if mode == 'train' and init_from == 'auto':
    init_from = 'resume' if os.path.exists(ckpt_path) else 'scratch'
elif mode == 'train' and init_from == 'scratch' and os.path.exists(ckpt_path):
    raise SystemExit(f"error: {ckpt_path} exists and init_from='scratch' would overwrite it; continue that run with "
                     f"--init_from=auto, or start this one in another --out_dir")
if master and mode == 'train':
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
    data = {s: (np.load(os.path.join(data_dir, f'{s}_x.npy'), mmap_mode='r'),
                np.load(os.path.join(data_dir, f'{s}_y.npy'))) for s in ('train', 'val')}
    H, W, C = meta['image_size'], meta['image_size'], meta['channels']
except (OSError, ValueError, KeyError) as e:
    why = f'{e.strerror}: {e.filename}' if isinstance(e, OSError) else repr(e)
    raise SystemExit(f"error: dataset '{dataset}' is missing or unreadable in {data_dir} ({why}); run {prepare} first")
if 'latent' in meta:
    raise SystemExit(f"error: dataset '{dataset}' holds latents; train_ae.py trains on images")
for split, (x, y) in data.items():
    where = os.path.join(data_dir, split)
    if x.dtype != np.uint8 or x.shape[1:] != (H, W, C) or y.shape != (len(x),):
        raise SystemExit(f"error: {where}_x.npy is {x.dtype} {x.shape} with {y.shape} labels, but meta.json "
                         f"says uint8 (N, {H}, {W}, {C}) and N labels; re-run {prepare}")
    if len(x) == 0:
        raise SystemExit(f"error: {where}_x.npy holds no images; re-run {prepare}")

def load_batch(split, idx, flip=None):
    """Images idx of a split as floats in [-1, 1], NCHW, on the device; on CUDA a pinned, non-blocking copy."""
    x = torch.from_numpy(data[split][0][idx])
    if flip is not None:
        x = torch.where(flip[:, None, None, None], x.flip(2), x)
    if device_type == 'cuda':
        x = x.pin_memory().to(device, non_blocking=True)
    return x.to(device).permute(0, 3, 1, 2).float().div(127.5).sub(1)

def my_slice(micro):
    """This rank's part of the global batch in micro-step `micro`: micro-steps outside, ranks inside."""
    lo = (micro * world_size + rank) * micro_batch
    return slice(lo, lo + micro_batch)

def get_batch(step, micro):
    """This rank's images of micro-step `micro` of the global batch of `step`, drawn with replacement."""
    g = rng(step, 0)
    idx = np.sort(torch.randint(len(data['train'][0]), (batch_size,), generator=g).numpy())  # sorted: kinder to mmap
    flip = torch.rand(batch_size, generator=g) < 0.5
    return load_batch('train', idx[my_slice(micro)], flip[my_slice(micro)] if hflip else None)

def ssim(a, b):
    """Per-image SSIM (Wang et al. 2004) of images in [-1, 1], on [0, 1]: 11 x 11 Gaussian windows of std 1.5 at
    every position where they fit, averaged over positions and channels. Differentiable: also a loss term."""
    a, b = (a.float() + 1) / 2, (b.float() + 1) / 2
    g = torch.exp(-(torch.arange(11, dtype=torch.float32, device=a.device) - 5) ** 2 / (2 * 1.5 ** 2))
    window = (torch.outer(g, g) / g.sum() ** 2).expand(a.shape[1], 1, 11, 11)
    blur = lambda x: F.conv2d(x, window, groups=a.shape[1])
    mu_a, mu_b = blur(a), blur(b)
    var_a, var_b, cov = blur(a * a) - mu_a ** 2, blur(b * b) - mu_b ** 2, blur(a * b) - mu_a * mu_b
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    s = (2 * mu_a * mu_b + c1) * (2 * cov + c2) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return s.mean(dim=(1, 2, 3))

# -----------------------------------------------------------------------------
# encoding: the dataset's latents, for train_diffusion.py (mode='encode'; the rest of the file is training)
if mode == 'encode':
    source = best_path if encode_from == 'best' else ckpt_path
    if not os.path.exists(source):
        raise SystemExit(f"error: {source} not found; train an autoencoder in out_dir='{out_dir}' first "
                         f"(or pass --encode_from=ckpt)")
    ckpt = load_checkpoint(source)
    ae = Autoencoder(AEConfig(**ckpt['model_args']))
    ae.load_state_dict(ckpt['ema'])
    ae.to(device).eval()
    if (ae.config.image_size, ae.config.in_channels) != (H, C):
        raise SystemExit(f"error: {source} encodes {ae.config.image_size} px, {ae.config.in_channels}-channel images; "
                         f"dataset '{dataset}' has {H} px, {C} channels")
    h, zc = H // ae.factor, ae.config.z_channels
    latents = latents or f'{dataset}-latents'
    latent_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data', latents)
    x_path = lambda split, flip: os.path.join(latent_dir, f"{split}_x{'_flip' * flip}.npy")
    jobs = [('train', False), ('val', False)] + [('train', True)] * encode_flips
    if master:
        os.makedirs(latent_dir, exist_ok=True)
        for split, flip in jobs:  # the files, created once; every rank then writes its rows into them
            np.lib.format.open_memmap(x_path(split, flip) + '.tmp', mode='w+', dtype=np.float16,
                                      shape=(len(data[split][0]), h, h, zc))
        print(f"encoding {dataset} with {source} (step {ckpt['step']}, EMA weights) "
              f"into {latent_dir}: {h} x {h} x {zc} latents, f={ae.factor}")
    if ddp:
        dist.barrier()
    t0 = time.time()
    sums = torch.zeros(3, zc, dtype=torch.float64, device=device)  # per channel: count, sum, sum of squares
    for split, flip in jobs:
        out = np.load(x_path(split, flip) + '.tmp', mmap_mode='r+')
        n = len(out)
        share = range(rank * n // world_size, (rank + 1) * n // world_size)  # contiguous: no two ranks touch a row
        for lo in range(share.start, share.stop, micro_batch):
            idx = np.arange(lo, min(lo + micro_batch, share.stop))
            with torch.no_grad(), ctx:
                z = ae.encode(load_batch(split, idx, torch.ones(len(idx), dtype=torch.bool) if flip else None))[0]
            z = z.float().permute(0, 2, 3, 1)
            out[idx] = z.cpu().numpy().astype(np.float16)
            if split == 'train' and not flip:
                z = z.reshape(-1, zc).double()
                sums += torch.stack([torch.full_like(z[0], len(z)), z.sum(0), z.pow(2).sum(0)])
        out.flush()
        del out
    if ddp:
        dist.all_reduce(sums)
        dist.barrier()
    if master:
        mean = sums[1] / sums[0]
        std = (sums[2] / sums[0] - mean ** 2).clamp(min=0).sqrt()
        for split, flip in jobs:
            os.replace(x_path(split, flip) + '.tmp', x_path(split, flip))
        for split in ('train', 'val'):
            np.save(os.path.join(latent_dir, f'{split}_y.npy'), data[split][1])
        torch.save({'model_args': asdict(ae.config), 'weights': ckpt['ema'], 'source': os.path.abspath(source),
                    'step': ckpt['step']}, os.path.join(latent_dir, 'autoencoder.pt'))
        latent_meta = {**meta, 'image_size': h, 'channels': zc,
                       'latent': {'autoencoder': 'autoencoder.pt', 'mean': mean.tolist(), 'std': std.tolist(),
                                  'image_size': H, 'channels': C, 'flips': encode_flips,
                                  'source': f"{dataset} encoded by {os.path.abspath(source)} (step {ckpt['step']}, "
                                            f"EMA weights), the posterior means"}}
        with open(os.path.join(latent_dir, 'meta.json.tmp'), 'w') as fh:
            json.dump(latent_meta, fh, indent=2)
        os.replace(os.path.join(latent_dir, 'meta.json.tmp'), os.path.join(latent_dir, 'meta.json'))
        count, dt = sum(len(data[split][0]) for split, _ in jobs), time.time() - t0
        print(f"encoded {count} images in {dt:.1f} s ({count / dt:.0f} img/s over {world_size} rank(s)); per-channel "
              f"mean {np.round(mean.tolist(), 3).tolist()}, std {np.round(std.tolist(), 3).tolist()}; train with "
              f"--dataset={latents}")
    if ddp:
        dist.barrier()
        dist.destroy_process_group()
    raise SystemExit(0)

# -----------------------------------------------------------------------------
# model, discriminator, EMA, optimizers, and the checkpoint to resume from
torch.manual_seed(seed)  # the same initial weights on every rank
try:
    model = create_model(arch, image_size=H, in_channels=C, z_channels=z_channels, mid_attention=mid_attention,
                         kl=kl_weight > 0).to(device)
except ValueError as e:
    raise SystemExit(f"error: {arch} on {dataset}: {e}")
model_config = model.config
model.activation_checkpointing = activation_checkpointing
disc = PatchDiscriminator(C, disc_channels, disc_layers).to(device) if disc_weight > 0 else None
lpips = None
if lpips_weight > 0:
    try:
        lpips = LPIPS().load(lpips_vgg, lpips_lin).to(device)
    except (OSError, ValueError, RuntimeError, pickle.UnpicklingError) as e:
        raise SystemExit(f"error: cannot load the LPIPS weights ({str(e).splitlines()[0][:200]}); set lpips_vgg to "
                         f"torchvision's vgg16-397923af.pth and lpips_lin to the lpips package's weights/v0.1/vgg.pth")
if device_type == 'cuda':  # the faster layout for convolutions on tensor cores (the batches arrive in it: NHWC)
    model, disc, lpips = (net if net is None else net.to(memory_format=torch.channels_last) for net in (model, disc, lpips))
ema = copy.deepcopy(model).requires_grad_(False).eval()

def make_optimizer(net):
    decay, no_decay = [p for p in net.parameters() if p.dim() >= 2], [p for p in net.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{'params': decay, 'weight_decay': weight_decay}, {'params': no_decay, 'weight_decay': 0.0}],
                             lr=lr, betas=(beta1, beta2), fused=True)  # fused: also skips updates on the device

optimizer = make_optimizer(model)
d_optimizer = make_optimizer(disc) if disc else None
start_step, saved_step, wandb_id, best_psnr, stale_evals = 0, None, None, -math.inf, 0
if init_from == 'resume':
    if not os.path.exists(ckpt_path):
        raise SystemExit(f"error: init_from='resume' but {ckpt_path} does not exist; use --init_from=scratch")
    ckpt = load_checkpoint(ckpt_path)
    if ckpt['model_args'] != asdict(model_config) or (ckpt['disc'] is None) != (disc is None):
        raise SystemExit(f"error: {ckpt_path} holds another autoencoder or discriminator setting; resume with the "
                         f"config it was trained with, or choose another out_dir")
    model.load_state_dict(ckpt['model'])
    ema.load_state_dict(ckpt['ema'])
    optimizer.load_state_dict(ckpt['optimizer'])
    if disc:
        disc.load_state_dict(ckpt['disc'])
        d_optimizer.load_state_dict(ckpt['d_optimizer'])
    start_step, wandb_id, best_psnr, stale_evals = ckpt['step'], ckpt['wandb_id'], ckpt['best_psnr'], ckpt['stale_evals']
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
        print(f"resuming {ckpt_path} at step {start_step}" + (f"; changed since: {', '.join(changed)}" if changed else ''))
else:
    torch.manual_seed(seed + rank)
    np.random.seed(seed + rank)
    random.seed(seed + rank)
raw_model, raw_disc = model, disc
if compile:
    model = torch.compile(model)
if ddp:
    model = DDP(model, device_ids=[local_rank] if device_type == 'cuda' else None)
    disc = DDP(disc, device_ids=[local_rank] if device_type == 'cuda' else None) if disc else None
params, ema_params = list(raw_model.parameters()), list(ema.parameters())
d_params = list(raw_disc.parameters()) if disc else []
ae_flops = raw_model.flops_per_sample()
d_flops = count_flops(raw_disc, torch.zeros(1, C, H, W, device=device)) if disc else 0
latent_size = H // raw_model.factor
if master:
    print(f"{arch}: {sum(p.numel() for p in params) / 1e6:.2f}M parameters, {ae_flops / 1e9:.3f} GFLOPs forward per "
          f"image; latents {z_channels} x {latent_size} x {latent_size}"
          + (f"; discriminator {sum(p.numel() for p in d_params) / 1e6:.2f}M" if disc else ''))

if peak_tflops == 0 and device_type == 'cuda':  # dense tensor-core peaks: bf16's (SXM unless named), TF32's half
    name = torch.cuda.get_device_name()
    peak_tflops = next((v for k, v in {'H100 PCIe': 756.5, 'H100 NVL': 835.5, 'H100': 989.4, 'H200': 989.4,
                                       'A100': 312.0}.items() if k in name), 0.0) / (2 if dtype == 'float32' else 1)

def flops_per_image(step):
    """Forward + backward (twice the forward) of the autoencoder, and of the discriminator on real and fake images
    once it trains, plus the decoder loss's pass through it once that is on (forward, and backward to the input only:
    the discriminator is frozen there)."""
    return 3 * ae_flops + 6 * d_flops * (step >= disc_start) + 2 * d_flops * (step >= adv_start)

def get_lr(step):
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if lr_schedule == 'constant':
        return lr
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))

def adaptive_weight(nll, adv):
    """Esser et al. 2021, eq. 7: ||grad of the reconstruction loss|| / ||grad of the adversarial loss|| at the
    decoder's last layer, so neither swamps the other. The gradients are averaged over ranks: every rank (and any
    world size) uses the weight of the whole micro-step."""
    last = raw_model.last_layer.weight
    g_nll, g_adv = (torch.autograd.grad(l, last, retain_graph=True)[0] for l in (nll, adv))
    if ddp:
        g = torch.stack([g_nll, g_adv])
        dist.all_reduce(g, op=dist.ReduceOp.AVG)
        g_nll, g_adv = g
    return (g_nll.norm() / (g_adv.norm() + 1e-4)).clamp(max=1e4).detach()

def reconstruction_losses(x, xrec, mean, logvar):
    """The reconstruction term (rec_loss, plus the SSIM and LPIPS terms when weighted), its plain rec_loss part, and
    the KL of the posterior N(mean, exp(logvar)) from N(0, I) per pixel, averaged over images (0 without one)."""
    nll = ((xrec - x).abs() if rec_loss == 'l1' else (xrec - x).pow(2)).mean(dim=(1, 2, 3))
    rec = nll.detach().mean()
    if ssim_weight:
        nll = nll + ssim_weight * (1 - ssim(xrec, x))
    if lpips:
        with ctx:
            nll = nll + lpips_weight * lpips(xrec, x).float()
    kl = 0.5 * (mean.float() ** 2 + logvar.float().exp() - 1 - logvar.float()).sum() / x.numel() \
        if logvar is not None else torch.zeros((), device=device)
    return nll.mean(), rec, kl

@torch.no_grad()
def evaluate(net):
    """Mean PSNR (dB, on [0, 1]), SSIM and L1 (on [-1, 1]) of the reconstructions of the first eval_images val
    images, from the posterior means, clipped to [-1, 1]. Rank r takes every world_size-th micro-batch."""
    n = min(eval_images, len(data['val'][0]))
    total = torch.zeros(3, device=device)
    net.eval()
    for lo in range(rank * micro_batch, n, world_size * micro_batch):
        x = load_batch('val', np.arange(lo, min(lo + micro_batch, n)))
        with ctx:
            xrec = net(x)[0].float().clamp(-1, 1)
        mse = ((xrec - x) / 2).pow(2).mean(dim=(1, 2, 3))
        total += torch.stack([(-10 * mse.clamp(min=1e-10).log10()).sum(), ssim(xrec, x).sum(),
                              (xrec - x).abs().mean(dim=(1, 2, 3)).sum()])
    net.train(net is raw_model)  # the EMA stays in eval mode
    if ddp:
        dist.all_reduce(total)
    return (total / n).tolist()

def save_grid(x, path, ncol=8):
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

def save_checkpoint(step, path):
    """All ranks gather their RNG states; the master writes path atomically: a temporary file, flushed to disk, then
    renamed over the previous one, which stays whole until that moment. Non-finite weights are never saved."""
    global saved_step
    if not torch.stack([p.isfinite().all() for p in params + ema_params + d_params]).all():  # the same on every rank
        raise SystemExit(f"error: the weights are not finite at step {step}, so they are not saved; {last_good()}: "
                         f"resume it with a lower lr, grad_clip or dtype='float32'")
    states = [None] * world_size
    if ddp:
        dist.all_gather_object(states, rng_state())
    else:
        states = [rng_state()]
    if master:
        ckpt = {'model': raw_model.state_dict(), 'ema': ema.state_dict(), 'optimizer': optimizer.state_dict(),
                'disc': raw_disc.state_dict() if disc else None, 'd_optimizer': d_optimizer.state_dict() if disc else None,
                'model_args': asdict(model_config), 'step': step, 'images_seen': step * batch_size, 'config': config,
                'rng': states, 'wandb_id': wandb_id, 'best_psnr': best_psnr, 'stale_evals': stale_evals}
        try:
            with open(path + '.tmp', 'wb') as f:
                torch.save(ckpt, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(path + '.tmp', path)
        except (OSError, RuntimeError) as e:  # a full disk surfaces from torch.save as a RuntimeError
            os.remove(path + '.tmp')
            why, free = e.strerror if isinstance(e, OSError) else 'torch.save could not write it', shutil.disk_usage(out_dir).free
            raise SystemExit(f"error: writing {path} failed at step {step} ({why}; {free / 2**30:.1f} GiB free); "
                             f"{last_good()}: make room and re-run the same command")
        if keep_last and path == ckpt_path:
            kept = os.path.join(out_dir, f'ckpt_{step:07d}.pt')
            if not os.path.exists(kept):
                os.link(ckpt_path, kept)  # a second name for the same file
            for old in sorted(glob.glob(os.path.join(out_dir, 'ckpt_[0-9]*.pt')))[:-keep_last]:
                os.remove(old)
        print(f"saved {path} at step {step}")
    if path == ckpt_path:
        saved_step = step

grid_cols = min(8, len(data['val'][0]))
grid_x = load_batch('val', np.arange(min(32, len(data['val'][0])) // grid_cols * grid_cols))  # the same in every grid

# -----------------------------------------------------------------------------
# logging: stdout, out_dir/metrics.csv, and wandb
terms = ['loss', 'rec', 'kl', 'adv', 'adv_weight', 'd_loss', 'logits_real', 'logits_fake']
fields = ['step', 'kimg', *terms, 'lr', 'grad_norm', 'd_grad_norm', 'skipped', 'ms_per_step', 'img_per_s', 'tflops',
          'mfu', 'val_psnr', 'val_ssim', 'val_l1', 'val_psnr_ema', 'val_ssim_ema', 'val_l1_ema']
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
# training loop
stop_signal = 0

def request_stop(signum, frame):  # SIGTERM (a scheduler, torchrun) or SIGUSR1 (SLURM's --signal warning)
    global stop_signal
    stop_signal = signum  # the loop finishes its step, saves and exits

for sig in (signal.SIGTERM, signal.SIGUSR1):
    signal.signal(sig, request_stop)
if master and start_step >= max_steps:
    print(f"{ckpt_path} is at step {start_step} of max_steps={max_steps}: nothing to do (raise max_steps to go on)")
if patience and stale_evals >= patience:
    if master:
        print(f"{ckpt_path} stopped early at step {start_step}: {stale_evals} validations without a better PSNR than "
              f"{best_psnr:.2f} dB (best.pt); nothing to do (raise patience to go on)")
    start_step = max_steps
x = get_batch(start_step, 0)  # the first batch; each later one is fetched while the current step runs
sums = torch.zeros(len(terms), device=device)  # the loss terms, summed over the steps since the last log line
skipped, streak, worst_streak = (torch.zeros((), device=device) for _ in range(3))  # non-finite updates skipped
t_log, steps_since_log = time.time(), 0
for step in range(start_step, max_steps):
    for opt in (optimizer, d_optimizer) if disc else (optimizer,):
        for group in opt.param_groups:
            group['lr'] = get_lr(step)
    train_disc, adv_on = disc is not None and step >= disc_start, disc is not None and step >= adv_start
    eps_all = torch.randn((batch_size, z_channels, latent_size, latent_size), generator=rng(step, 1, device),
                          device=device)  # the posterior samples' noise, for the whole global batch
    step_sums = torch.zeros(len(terms), device=device)
    for micro in range(grad_accum):
        if ddp:  # all-reduce the gradients on the last micro-step only
            model.require_backward_grad_sync = micro == grad_accum - 1
            if disc:
                disc.require_backward_grad_sync = micro == grad_accum - 1
        with ctx:
            xrec, mean, logvar = model(x, eps_all[my_slice(micro)])
        xrec = xrec.float()
        nll, rec, kl = reconstruction_losses(x, xrec, mean, logvar)
        loss = nll + kl_weight * kl
        adv, weight = torch.zeros((), device=device), torch.zeros((), device=device)
        if adv_on:
            raw_disc.requires_grad_(False)  # the decoder's loss passes through the discriminator, leaving it alone
            with ctx:
                adv = -raw_disc(xrec).float().mean()
            weight = adaptive_weight(nll, adv)
            loss = loss + disc_weight * weight * adv
            raw_disc.requires_grad_(True)
        (loss / grad_accum).backward()
        d_terms = torch.zeros(3, device=device)
        if train_disc:  # the hinge loss on real images and on the reconstructions of this step
            with ctx:
                logits_real, logits_fake = disc(torch.cat([x, xrec.detach()])).float().chunk(2)
            d_loss = 0.5 * (F.relu(1 - logits_real).mean() + F.relu(1 + logits_fake).mean())
            (d_loss / grad_accum).backward()
            d_terms = torch.stack([d_loss, logits_real.mean(), logits_fake.mean()]).detach()
        step_sums += torch.cat([torch.stack([loss, rec, kl, adv, weight]).detach(), d_terms]) / grad_accum
        if micro + 1 < grad_accum or step + 1 < max_steps:  # fetch the next batch while this step runs
            x = get_batch(step, micro + 1) if micro + 1 < grad_accum else get_batch(step + 1, 0)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float('inf'))
    d_grad_norm = torch.nn.utils.clip_grad_norm_(d_params, grad_clip if grad_clip > 0 else float('inf')) \
        if train_disc else torch.zeros((), device=device)
    bad = ~(grad_norm.isfinite() & d_grad_norm.isfinite())  # all-reduced gradients: the same on every rank
    for opt in (optimizer, d_optimizer if train_disc else None):
        if opt:
            opt.found_inf = bad.float()  # fused AdamW then skips the update on the device, with no host sync
            opt.step()
            opt.zero_grad(set_to_none=True)
    with torch.no_grad():  # EMA with warm-up; a skipped update leaves it alone too
        torch._foreach_lerp_(ema_params, params, (1 - min(ema_decay, (1 + step) / (10 + step))) * ~bad)
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
        avg = dict(zip(terms, (sums / (steps_since_log - n_skipped)).tolist()))  # nan if every step was skipped
        dt = (time.time() - t_log) / steps_since_log
        row = dict(step=step + 1, kimg=(step + 1) * batch_size / 1e3, **avg, lr=get_lr(step),
                   grad_norm=grad_norm.item(), d_grad_norm=d_grad_norm.item(), skipped=n_skipped,
                   ms_per_step=dt * 1e3, img_per_s=batch_size / dt)
        row['tflops'] = flops_per_image(step) * row['img_per_s'] / 1e12
        row['mfu'] = row['tflops'] / (peak_tflops * world_size) if peak_tflops else float('nan')
        if master:
            print(f"step {row['step']}/{max_steps} | {row['kimg']:.1f} kimg | loss {avg['loss']:.4f} (rec {avg['rec']:.4f}, "
                  f"kl {avg['kl']:.3g}" + (f", adv {avg['adv']:.3f} x {avg['adv_weight']:.3g}" if adv_on else '') + ")"
                  + (f" | d_loss {avg['d_loss']:.3f} (logits {avg['logits_real']:.2f} / {avg['logits_fake']:.2f})"
                     if train_disc else '') + f" | lr {row['lr']:.2e} | grad norm {row['grad_norm']:.3f} | "
                  f"{dt * 1e3:.0f} ms/step | {row['img_per_s']:.0f} img/s | {row['tflops']:.2f} TFLOP/s | "
                  f"mfu {format(row['mfu'], '.1%') if peak_tflops else 'n/a'} | eta {dt * (max_steps - step - 1) / 60:.1f} min"
                  + (f" | {n_skipped} non-finite update(s) skipped" if n_skipped else ''))
            log(row)
        if worst_streak.item() >= max_nonfinite:
            raise SystemExit(f"error: {int(worst_streak.item())} updates in a row had a non-finite gradient norm and were "
                             f"skipped (max_nonfinite={max_nonfinite}) by step {step + 1}; {last_good()}: resume it with "
                             f"a lower lr, grad_clip or dtype='float32'")
        for t in (sums, skipped, worst_streak):
            t.zero_()
        steps_since_log = 0
    early_stop = False
    if (step + 1) % eval_interval == 0 or last:
        psnr, ssim_val, l1 = evaluate(raw_model)
        psnr_ema, ssim_ema, l1_ema = evaluate(ema)
        improved = psnr_ema > best_psnr
        best_psnr, stale_evals = (psnr_ema, 0) if improved else (best_psnr, stale_evals + 1)
        early_stop = patience > 0 and stale_evals >= patience
        if master:
            print(f"step {step + 1}: val PSNR {psnr:.2f} dB, SSIM {ssim_val:.4f}, L1 {l1:.4f}; EMA {psnr_ema:.2f} dB, "
                  f"SSIM {ssim_ema:.4f}, L1 {l1_ema:.4f}" + (' (best)' if improved else f' (best {best_psnr:.2f} dB)'))
            log(dict(step=step + 1, val_psnr=psnr, val_ssim=ssim_val, val_l1=l1, val_psnr_ema=psnr_ema,
                     val_ssim_ema=ssim_ema, val_l1_ema=l1_ema))
            with torch.no_grad(), ctx:  # rows of inputs, each followed by their EMA reconstructions
                xrec = ema(grid_x)[0].float().clamp(-1, 1)
            pairs = torch.stack([x.view(-1, grid_cols, *x.shape[1:]) for x in (grid_x, xrec)], dim=1)
            save_grid(pairs.flatten(0, 2), os.path.join(out_dir, f'recon_{step + 1:07d}.png'), grid_cols)
        if improved:
            save_checkpoint(step + 1, best_path)
    if (step + 1) % ckpt_interval == 0 or last or stop or early_stop:
        save_checkpoint(step + 1, ckpt_path)
    if early_stop and not last:
        if master:
            print(f"stopped early at step {step + 1}: {stale_evals} validations without a better PSNR than "
                  f"{best_psnr:.2f} dB; best.pt holds the best")
        break
    if stop and not last:
        if master:
            print(f"stopped at step {step + 1} of {max_steps} ({stop}); the same command continues the run")
        break
    if log_step:
        t_log = time.time()  # the validation and checkpoint of a log step do not count as step time

if master and wandb_log:
    wandb.finish()
if ddp:
    dist.barrier()  # no rank tears its groups down while another still talks to it
    dist.destroy_process_group()
