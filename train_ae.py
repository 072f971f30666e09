"""
Trains the autoencoder that gives latent diffusion its latents: one file, top to bottom.

    python train_ae.py config/mnist_ae.py                    # out-mnist-ae/: best.pt (best val PSNR), ckpt.pt
    torchrun --standalone --nproc_per_node=8 train_ae.py config/mnist_ae.py        # one node, 8 GPUs
    python data/prepare_latents.py --autoencoder=out-mnist-ae --dataset=mnist     # then its latents

The network is LDM's AutoencoderKL (model.Autoencoder; Rombach et al. 2022). The loss of an image x and
its reconstruction x' = D(z), z ~ q(z|x) = N(mean, exp(logvar)), is
    |x - x'| (or squared, mean over pixels) + ssim_weight (1 - SSIM(x, x')) + lpips_weight LPIPS(x, x')
    + kl_weight KL(q(z|x) || N(0, I)) / pixels + disc_weight * lambda * (-PatchGAN logits of x')
    + cls_weight CE(class head(z), y) + seg_weight CE(segmentation head, label map)
with lambda = ||grad rec|| / ||grad adv|| at the decoder's last layer (Esser et al. 2021, eq. 7), the
discriminator trained with the hinge loss. The KL is divided by the pixel count because the other terms
are means over pixels: kl_weight then means what it means in LDM (1e-6), whose terms are sums. The
discriminator starts training at disc_start and its loss reaches the decoder from adv_start on: one that
starts untrained pushes the decoder in random directions, the quality drop LDM users report when it starts.
The optional heads (model.Autoencoder's; the seed trainer's multi-head loss): a class head on the latent,
a weight-free cousin of VA-VAE's semantic alignment (latents shaped by a semantic objective), and a
segmentation head on the decoder's last features, for a dataset with label maps (data/folder/prepare.py
--mask_src). Validation then also reports their accuracy and per-class IoU.

data/prepare_latents.py then encodes a dataset with best.pt's EMA weights: train_diffusion.py's input.
Resume, preemption and non-finite steps work as in train_diffusion.py (bookkeeping.py): re-run the command.
"""
import copy
import math
import os
import pickle
from contextlib import nullcontext
from dataclasses import asdict

import bookkeeping as bk  # (first: from here on a Ctrl-C is one line, not a traceback)
import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.nn.utils import clip_grad_norm_

import common
import dataformat
from model import (AE_PRESETS, LPIPS, PatchDiscriminator, compile_for_training, count_flops,
                   create_model)

# -----------------------------------------------------------------------------
# defaults, overridden by config/*.py and --key=value
# I/O
out_dir = 'out-ae'
init_from = 'auto'  # 'auto': 'resume' if out_dir holds ckpt.pt, else 'scratch' (never overwrites a checkpoint)
keep_last = 0  # also keep the newest keep_last checkpoints as out_dir/ckpt_<step>.pt (hard links: no extra space)
max_minutes = 0.0  # finish the step, save and exit 0 after this much wall time; 0 = no limit
log_interval = 50  # steps between log lines (the only host syncs of the loop)
eval_interval = 500  # steps between validations: PSNR, SSIM, L1, a grid of reconstructions, best.pt
eval_images = 512  # val images in each validation
patience = 0  # stop when this many validations in a row did not improve on the best EMA PSNR; 0 = never
ckpt_interval = 1000  # steps between checkpoints (one is also written at the end)
wandb_log = False  # project and run name: $WANDB_PROJECT and $WANDB_NAME, else the run's kind and out_dir
# data
dataset = 'mnist'  # data/<dataset>/ (or a path), written by data/<dataset>/prepare.py
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
disc_channels = 64  # of the discriminator's first layer, doubled in each next one up to 8x
cls_weight = 0.0  # on the cross-entropy of a class head on the latent; 0 = no head
seg_weight = 0.0  # on the per-pixel cross-entropy of a segmentation head (needs the dataset's masks)
# optimization
batch_size = 64  # images per optimizer step, over all ranks and micro-steps
grad_accum = 1  # micro-steps per optimizer step on each rank
max_steps = 10000
lr = 1e-4  # of both networks
min_lr = 1e-5  # the cosine schedule's floor
lr_schedule = 'cosine'  # after warm-up: 'cosine' to min_lr, or 'constant'
lr_decay_steps = 0  # length of the cosine, warm-up included; 0 = max_steps (set it to stop early)
warmup_steps = 100
weight_decay = 0.0  # AdamW, on weights of 2 or more dimensions only
beta1 = 0.5  # VQGAN's and LDM's Adam betas, for both networks
beta2 = 0.9
grad_clip = 1.0  # max global gradient norm of each network; 0 = no clipping (the norms are logged either way)
max_nonfinite = 20  # updates with a non-finite gradient norm are skipped; this many in a row stop the run
ema_decay = 0.999  # per step, with warm-up: min(ema_decay, (1 + step) / (10 + step))
# system
device = 'cuda' if torch.cuda.is_available() else 'cpu'
dtype = 'bfloat16' if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else 'float32'
compile = torch.cuda.is_available()  # torch.compile the autoencoder (gains nothing on CPU but compile time)
activation_checkpointing = False  # recompute each residual block in the backward pass to save memory
peak_tflops = 0.0  # per-device peak for MFU; 0 = known GPUs' dense bf16 (float32: TF32) peak, none on CPU
seed = 0
# -----------------------------------------------------------------------------
config_keys = [k for k, v in globals().items() if not k.startswith('_') and isinstance(v, (int, float, bool, str))]
exec(open(os.path.join(os.path.dirname(bk.__file__), 'configurator.py')).read())  # (the kit's; it also sets overridden)
config = {k: globals()[k] for k in config_keys}
# (float16 would need loss scaling, left out: bfloat16 needs none)
common.check_config(config, choices=[
    ('init_from', ('auto', 'scratch', 'resume')), ('arch', AE_PRESETS), ('rec_loss', ('l1', 'l2')),
    ('lr_schedule', ('cosine', 'constant')), ('dtype', ('float32', 'bfloat16'))],
    counts=['batch_size', 'grad_accum', 'max_steps', 'log_interval', 'eval_interval', 'eval_images',
            'ckpt_interval', 'z_channels', 'disc_layers', 'disc_channels', 'max_nonfinite'],
    rules=[('kl_weight', kl_weight >= 0, 'at least 0 (0 = a plain autoencoder)'),
           ('ssim_weight', ssim_weight >= 0, 'at least 0'), ('disc_weight', disc_weight >= 0, 'at least 0'),
           ('lpips_weight', lpips_weight >= 0, 'at least 0'),
           ('cls_weight', cls_weight >= 0, 'at least 0'), ('seg_weight', seg_weight >= 0, 'at least 0'),
           ('lpips_vgg', not lpips_weight or (lpips_vgg and lpips_lin),
            'set, with lpips_lin, when lpips_weight > 0'),
           ('adv_start', adv_start >= disc_start,
            f'at least disc_start={disc_start}: the discriminator learns before its loss reaches the decoder'),
           ('disc_channels', disc_channels % 16 == 0, 'a multiple of 16 (its GroupNorms have 32 groups)'),
           ('patience', patience >= 0, 'at least 0')])
common.check_applied(overridden, config, {})  # (every key is applied or refused)
disc_args = dict(channels=disc_channels, num_layers=disc_layers) if disc_weight > 0 else None
# -----------------------------------------------------------------------------
# DDP: torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; NCCL on GPUs, gloo on CPUs
device_type = common.check_device(device)
if 'RANK' in os.environ:
    device = f"cuda:{os.environ['LOCAL_RANK']}" if device_type == 'cuda' else device
    dist.init_process_group('nccl' if device_type == 'cuda' else 'gloo')
# the run: out_dir and its lock, resume, sums, the log, checkpoints (bookkeeping.Run)
run = bk.start_run(config, 'autoencoder', device, inputs=[('dataset', dataformat.data_path(dataset))])
micro_batch = run.micro_batch  # images per micro-step
# bf16 autocast around the forward passes (float32: none)
ctx = torch.autocast(device_type, dtype=getattr(torch, dtype)) if dtype != 'float32' else nullcontext()

# -----------------------------------------------------------------------------
# data: uint8 images (N, H, W, C), memory-mapped from data/<dataset>/
# (and the label maps (N, H, W) when a segmentation head learns them)
_, meta, data = dataformat.load_dataset(dataset, script='train_ae.py', masks=seg_weight > 0)
H, W, C = meta['image_size'], meta['image_size'], meta['channels']
num_classes = meta['num_classes'] if cls_weight > 0 else 0
seg_classes, ignore = (meta['mask_classes'], meta['mask_ignore']) if seg_weight > 0 else (0, None)
ignore = -100 if ignore is None else ignore  # (cross_entropy's default: no pixel has it)
if cls_weight > 0 and num_classes < 2:
    raise SystemExit(f"error: cls_weight needs a dataset of 2 or more classes; {dataset} has "
                     f"{num_classes} (class subfolders give data/folder/prepare.py its labels)")

def load_batch(split, idx, flip=None):
    """Images idx of a split as floats in [-1, 1], NCHW, their labels and their label maps (int64
    (B, H, W); None without masks), on the device."""
    x = torch.from_numpy(data[split][0][idx])
    m = torch.from_numpy(data[split][2][idx]) if seg_classes else None
    if flip is not None:
        x = torch.where(flip[:, None, None, None], x.flip(2), x)
        m = torch.where(flip[:, None, None], m.flip(2), m) if seg_classes else None
    y, m = (t if t is None else dataformat.to_device(t, device, images=False).long()
            for t in (torch.from_numpy(data[split][1][idx]), m))
    return dataformat.to_device(x, device) / 127.5 - 1, y, m

def get_batch(step, micro):
    """This rank's images of micro-step `micro` of the global batch of `step`, drawn with replacement
    (sorted: kinder to mmap)."""
    g = run.rng(step, 0)
    idx = np.sort(torch.randint(len(data['train'][0]), (batch_size,), generator=g).numpy())
    flip = torch.rand(batch_size, generator=g) < 0.5
    return load_batch('train', idx[run.slice(micro)], flip[run.slice(micro)] if hflip else None)

def ssim(a, b):
    """Per-image SSIM (Wang et al. 2004) of images in [-1, 1], on [0, 1]: 11 x 11 Gaussian windows of std
    1.5 at every position where they fit, averaged over positions and channels. Differentiable: also a loss."""
    a, b = (a.float() + 1) / 2, (b.float() + 1) / 2
    gauss = torch.exp(-(torch.arange(11, dtype=torch.float32, device=a.device) - 5) ** 2 / (2 * 1.5 ** 2))
    window = (torch.outer(gauss, gauss) / gauss.sum() ** 2).expand(a.shape[1], 1, 11, 11)
    blur = lambda x: F.conv2d(x, window, groups=a.shape[1])
    mu_a, mu_b = blur(a), blur(b)
    var_a, var_b, cov = blur(a * a) - mu_a ** 2, blur(b * b) - mu_b ** 2, blur(a * b) - mu_a * mu_b
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    s = (2 * mu_a * mu_b + c1) * (2 * cov + c2) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return s.mean(dim=(1, 2, 3))

# -----------------------------------------------------------------------------
# model, discriminator, EMA, optimizers, and the checkpoint to resume from
torch.manual_seed(seed)  # the same initial weights on every rank
try:
    model = create_model(arch, image_size=H, in_channels=C, z_channels=z_channels,
                         mid_attention=mid_attention, kl=kl_weight > 0, num_classes=num_classes,
                         seg_classes=seg_classes).to(device)
except ValueError as e:
    raise SystemExit(f"error: {arch} on {dataset}: {e}")
model_config = model.config
model.activation_checkpointing = activation_checkpointing
disc = PatchDiscriminator(C, **disc_args).to(device) if disc_args else None
lpips = None
if lpips_weight > 0:
    try:
        lpips = LPIPS().load(lpips_vgg, lpips_lin).to(device)
    except (OSError, ValueError, RuntimeError, pickle.UnpicklingError) as e:
        raise SystemExit(f"error: cannot load the LPIPS weights ({str(e).splitlines()[0][:200]}); set lpips_vgg "
                         f"to torchvision's vgg16-397923af.pth and lpips_lin to the lpips package's "
                         f"weights/v0.1/vgg.pth")
# the faster layout for convolutions on tensor cores (the batches arrive in it: NHWC)
if device_type == 'cuda':
    model, disc, lpips = (net if net is None else net.to(memory_format=torch.channels_last)
                          for net in (model, disc, lpips))
ema = copy.deepcopy(model).requires_grad_(False).eval()
optimizer = common.adamw(model.parameters(), lr, (beta1, beta2), weight_decay)
d_optimizer = common.adamw(disc.parameters(), lr, (beta1, beta2), weight_decay) if disc else None
ckpt = run.resume(model_args=asdict(model_config), disc_args=disc_args, model=model, ema=ema,
                  optimizer=optimizer, disc=disc, d_optimizer=d_optimizer)
# the best EMA PSNR so far (best.pt's), and the validations since it
best_psnr, stale_evals = ckpt.get('best_psnr', -math.inf), ckpt.get('stale_evals', 0)
del ckpt
raw_model, raw_disc = model, disc
if compile:  # (model.compile_for_training says what runs compiled, and why)
    model = compile_for_training(model)
if run.ddp:
    model = DDP(model, device_ids=[device] if device_type == 'cuda' else None)
    disc = DDP(disc, device_ids=[device] if device_type == 'cuda' else None) if disc else None
ddp_nets = [net for net in (model, disc) if run.ddp and net is not None]  # (all-reduce on a step's last micro-step)
no_norm = torch.zeros((), device=device)  # (the discriminator's gradient norm before it trains)
params, ema_params = list(raw_model.parameters()), list(ema.parameters())
d_params = list(raw_disc.parameters()) if disc else []
ae_flops = raw_model.flops_per_sample()
d_flops = count_flops(raw_disc, torch.zeros(1, C, H, W, device=device)) if disc else 0
latent_size = H // raw_model.factor
noise_shape = (batch_size, z_channels, latent_size, latent_size)  # a step's draw of the posterior's noise
if run.master:
    print(f"{arch}: {sum(p.numel() for p in params) / 1e6:.2f}M parameters, {ae_flops / 1e9:.3f} GFLOPs "
          f"forward per image; latents {z_channels} x {latent_size} x {latent_size}"
          + (f"; discriminator {sum(p.numel() for p in d_params) / 1e6:.2f}M" if disc else ''))

def flops_per_image(step):
    """Forward + backward (twice the forward) of the autoencoder, and of the discriminator on real and fake
    images once it trains, plus the decoder loss's pass through it once that is on (forward, and backward to
    the input only: the discriminator is frozen there)."""
    return 3 * ae_flops + 6 * d_flops * (step >= disc_start) + 2 * d_flops * (step >= adv_start)

def adaptive_weight(nll, adv):
    """Esser et al. 2021, eq. 7: ||grad of the reconstruction loss|| / ||grad of the adversarial loss|| at the
    decoder's last layer, so neither swamps the other. The gradients are averaged over ranks: every rank (and
    any world size) uses the weight of the whole micro-step."""
    last_layer = raw_model.last_layer.weight
    g_nll, g_adv = (torch.autograd.grad(l, last_layer, retain_graph=True)[0] for l in (nll, adv))
    if run.ddp:
        grads = torch.stack([g_nll, g_adv])
        dist.all_reduce(grads, op=dist.ReduceOp.AVG)
        g_nll, g_adv = grads
    return (g_nll.norm() / (g_adv.norm() + 1e-4)).clamp(max=1e4).detach()

def adversarial_term(nll, xrec):
    """The decoder's adversarial loss -D(x') through the discriminator (which it leaves alone), and its
    adaptive weight."""
    raw_disc.requires_grad_(False)
    with ctx:
        adv = -raw_disc(xrec).float().mean()
    weight = adaptive_weight(nll, adv)
    raw_disc.requires_grad_(True)
    return adv, weight

def hinge_loss(x, xrec):
    """The discriminator's hinge loss on real images and (detached) reconstructions, and its mean logits."""
    with ctx:
        logits_real, logits_fake = disc(torch.cat([x, xrec.detach()])).float().chunk(2)
    d_loss = 0.5 * (F.relu(1 - logits_real).mean() + F.relu(1 + logits_fake).mean())
    return d_loss, logits_real.mean(), logits_fake.mean()

def head_losses(heads, y, m):
    """The class head's cross-entropy and the segmentation head's per pixel (over the pixels that are
    not ignore: 0 in a batch of none), those the model has."""
    losses = {}
    if 'cls' in heads:
        losses['cls_loss'] = F.cross_entropy(heads['cls'].float(), y)
    if 'seg' in heads:
        ce = F.cross_entropy(heads['seg'].float(), m, ignore_index=ignore, reduction='sum')
        losses['seg_loss'] = ce / (m != ignore).sum().clamp(min=1)
    return losses

def reconstruction_losses(x, xrec, mean, logvar):
    """The reconstruction term (rec_loss, plus the SSIM and LPIPS terms when weighted), its plain rec_loss
    part, and the KL of the posterior N(mean, exp(logvar)) from N(0, I) per pixel, averaged over images (0
    without one)."""
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

def iou(confusion):
    """Per-class IoU of a confusion matrix (rows: labels, columns: predictions): |both| / |either|,
    NaN for a class neither the labels nor the predictions hold."""
    both = confusion.diagonal()
    return both / (confusion.sum(0) + confusion.sum(1) - both)

@torch.no_grad()
def evaluate(net, suffix=''):
    """val_psnr, val_ssim and val_l1 (+ suffix): the mean PSNR (dB, on [0, 1]), SSIM and L1 (on [-1, 1]) of the
    reconstructions of the first eval_images val images, from the posterior means, clipped to [-1, 1];
    with the heads also val_cls_acc, the class head's top-1 accuracy, and val_miou, the mean over classes
    of the segmentation head's IoU, pixels pooled over the images (each class's IoU, as val_iou_<k>, for
    metrics.csv only). Rank r takes every world_size-th micro-batch."""
    n = min(eval_images, len(data['val'][0]))
    total = torch.zeros(4, device=device)
    confusion = torch.zeros(seg_classes, seg_classes, dtype=torch.long, device=device)
    net.eval()
    for lo in range(run.rank * micro_batch, n, run.world_size * micro_batch):
        x, y, m = load_batch('val', np.arange(lo, min(lo + micro_batch, n)))
        with ctx:
            xrec, _, _, heads = net(x)
        xrec = xrec.float().clamp(-1, 1)
        mse = ((xrec - x) / 2).pow(2).mean(dim=(1, 2, 3))
        correct = (heads['cls'].argmax(1) == y).sum() if 'cls' in heads else torch.zeros((), device=device)
        total += torch.stack([(-10 * mse.clamp(min=1e-10).log10()).sum(), ssim(xrec, x).sum(),
                              (xrec - x).abs().mean(dim=(1, 2, 3)).sum(), correct.float()])
        if 'seg' in heads:
            counted = m != ignore
            pairs = m[counted] * seg_classes + heads['seg'].argmax(1)[counted]
            confusion += torch.bincount(pairs, minlength=seg_classes ** 2).view(seg_classes, seg_classes)
    net.train(net is raw_model)  # the EMA stays in eval mode
    if run.ddp:
        dist.all_reduce(total)
        if seg_classes:
            dist.all_reduce(confusion)
    names = ('psnr', 'ssim', 'l1', 'cls_acc')[:3 + bool(num_classes)]
    val = {f'val_{k}{suffix}': v for k, v in zip(names, (total / n).tolist())}
    quiet = {}
    if seg_classes:
        per_class = iou(confusion.double())
        val[f'val_miou{suffix}'] = per_class.nanmean().item()
        quiet = {f'val_iou_{k}{suffix}': v for k, v in enumerate(per_class.tolist())}
    return val, quiet

def save(path=None):
    """ckpt.pt (or path): the networks, optimizers and best PSNR so far (Run.save adds the counters)."""
    run.save(path, model=raw_model, ema=ema, optimizer=optimizer, disc=raw_disc, d_optimizer=d_optimizer,
             model_args=asdict(model_config), disc_args=disc_args, best_psnr=best_psnr,
             stale_evals=stale_evals)

# the same val images in every grid of reconstructions, a multiple of its columns
grid_cols = min(8, len(data['val'][0]))
grid_x = load_batch('val', np.arange(min(32, len(data['val'][0])) // grid_cols * grid_cols))[0]

@torch.no_grad()
def reconstruction_grid():
    """Rows of the grid's val images, each followed by their EMA reconstructions."""
    with ctx:
        grid_rec = ema(grid_x)[0].float().clamp(-1, 1)
    return torch.stack([imgs.unflatten(0, (-1, grid_cols)) for imgs in (grid_x, grid_rec)], dim=1).flatten(0, 2)

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
# training loop
if patience and stale_evals >= patience:
    if run.master:
        print(f"{run.ckpt_path} stopped early at step {run.step}: {stale_evals} validations without a "
              f"better PSNR than {best_psnr:.2f} dB (best.pt); nothing to do (raise patience to go on)")
    max_steps = run.step
x, y, m = get_batch(run.step, 0)  # the first batch; each later one is fetched while the current step runs
for step in range(run.step, max_steps):
    train_disc, adv_on = disc is not None and step >= disc_start, disc is not None and step >= adv_start
    lr_now = get_lr(step)
    for group in optimizer.param_groups + (d_optimizer.param_groups if disc else []):
        group['lr'] = lr_now
    eps_all = torch.randn(noise_shape, generator=run.rng(step, 1, device), device=device)
    for micro in range(grad_accum):
        for net in ddp_nets:  # all-reduce the gradients on the last micro-step only
            net.require_backward_grad_sync = micro == grad_accum - 1
        with ctx:
            xrec, mean, logvar, heads = model(x, eps_all[run.slice(micro)])
        xrec = xrec.float()
        nll, rec, kl = reconstruction_losses(x, xrec, mean, logvar)
        loss = nll + kl_weight * kl
        heads = head_losses(heads, y, m)  # ({} without heads)
        loss = loss + cls_weight * heads.get('cls_loss', 0) + seg_weight * heads.get('seg_loss', 0)
        if adv_on:
            adv, weight = adversarial_term(nll, xrec)
            loss = loss + disc_weight * weight * adv
            run.add(adv=adv, adv_weight=weight)
        (loss / grad_accum).backward()
        run.add(loss=loss, rec=rec, kl=kl, **heads)
        if train_disc:
            d_loss, logits_real, logits_fake = hinge_loss(x, xrec)
            (d_loss / grad_accum).backward()
            run.add(d_loss=d_loss, logits_real=logits_real, logits_fake=logits_fake)
        if micro + 1 < grad_accum or step + 1 < max_steps:  # fetch the next batch while this step runs
            x, y, m = get_batch(step, micro + 1) if micro + 1 < grad_accum else get_batch(step + 1, 0)
    grad_norm = clip_grad_norm_(params, grad_clip or float('inf'))
    d_grad_norm = clip_grad_norm_(d_params, grad_clip or float('inf')) if train_disc else no_norm
    bad = ~(grad_norm.isfinite() & d_grad_norm.isfinite())  # skipped by fused AdamW: no host sync
    for opt in (optimizer, d_optimizer) if train_disc else (optimizer,):
        opt.found_inf = bad.float()
        opt.step()
        opt.zero_grad(set_to_none=True)
    with torch.no_grad():  # the EMA with warm-up (a skipped update leaves it alone)
        torch._foreach_lerp_(ema_params, params, (1 - min(ema_decay, (1 + step) / (10 + step))) * ~bad)
    run.end_step(bad, flops_per_image(step))
    val, quiet, improved, early_stop = {}, {}, False, False  # validation (best.pt, early stopping) when due
    if run.due(eval_interval):
        (val, _), (val_ema, quiet) = evaluate(raw_model), evaluate(ema, '_ema')
        val.update(val_ema)
        improved = val['val_psnr_ema'] > best_psnr
        best_psnr, stale_evals = (val['val_psnr_ema'], 0) if improved else (best_psnr, stale_evals + 1)
        early_stop = patience > 0 and stale_evals >= patience
        if run.master:
            common.save_grid(reconstruction_grid(), run.path(f'recon_{run.step:07d}.png'), grid_cols)
    if run.log_step or val:
        run.log(lr=lr_now, grad_norm=grad_norm, d_grad_norm=d_grad_norm if train_disc else None, **val,
                quiet=quiet)
    if improved:
        save(run.path('best.pt'))
    if run.due(ckpt_interval) or run.stop or early_stop:
        save()
    if early_stop and not run.last and run.master:
        print(f"stopped early at step {run.step}: {stale_evals} validations without a better PSNR than "
              f"{best_psnr:.2f} dB; best.pt holds the best")
    if run.stop or early_stop:
        break
run.finish()
