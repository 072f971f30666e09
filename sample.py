"""
Samples images from a train_diffusion.py, distill_consistency.py or train_gan.py checkpoint (EMA weights by
default); a model of latents is decoded by the autoencoder its latent dataset names.

    python sample.py --out_dir=out-mnist-dit                                  # out-mnist-dit/samples.png
    python sample.py --out_dir=out-mnist-dit --class_labels=3,7 --cfg_scale=2 --save_png=True
    python sample.py --out_dir=out-mnist-flow --sampler=heun --steps=12 --shift=2     # any sampler on any schedule
    torchrun --nproc_per_node=8 sample.py --out_dir=out-dit-b --num_samples=50000 --save_npz=True
    python sample.py --out_dir=out-mnist-cd --sigmas=80,0.8              # a consistency model: 2 network calls
    python sample.py --out_dir=out-mnist-gan --save_npz=True              # a GAN: one generator call, z ~ N(0, I)
    python sample.py --out_dir=out-mnist-dit --ema_std=0.1       # a post-hoc EMA, from a run with phema_stds set
    python sample.py --out_dir=out-mnist-dit --memorization=True    # nearest training images: memorization.png

A control model (train_diffusion.py's control) draws sample i under the control image of val image i, and with its
label unless class_labels says otherwise.

Sample i starts from noise seeded by (seed, i), so (for the deterministic samplers) the images do not depend on batch
size or world size; under torchrun each rank samples its share and rank 0 writes the files. The .npz is the ADM format the standard FID
tools read: arr_0 uint8 (N, H, W, C), arr_1 the class labels when the model is conditional.
"""
import glob
import json
import math
import os
import pickle

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image

from model import GAN_PRESETS, SAMPLERS, AEConfig, Autoencoder, Diffusion, create_model, phema_coefficients

# -----------------------------------------------------------------------------
out_dir = 'out'  # holds ckpt.pt; the samples are written here too
use_ema = True  # the EMA weights (False: the raw weights)
ema_std = 0.0  # > 0: the post-hoc EMA of this sigma_rel, combined from out_dir/phema/ snapshots (Karras et al. 2024)
num_samples = 64
class_labels = 'all'  # 'all' cycles through the classes; or comma-separated labels, e.g. '3' or '1,7'
sampler = 'ddim'  # 'ddpm', 'ddim', 'euler' or 'heun' (model.Diffusion.sample), on any schedule
steps = 50  # sampling steps (heun calls the network about twice per step)
eta = 0.0  # ddim's noise: 0 deterministic, 1 is ddpm
cfg_scale = 4.0  # classifier-free guidance scale (1 = none), on every channel
cfg_sigma_min = 0.0  # guidance only where cfg_sigma_min < sigma/alpha <= cfg_sigma_max (Kynkaanniemi et al. 2024)
cfg_sigma_max = float('inf')
shift = 1.0  # flow schedule: timestep shift of the grid (> 1: more steps at high noise)
clip_x0 = True  # clip the x0 estimate to [-1, 1], the range of pixel data (never for a latent model)
sigmas = ''  # consistency models: comma-separated decreasing sigmas, one network call each; '' = sigma_max, one step
batch_size = 256  # per rank
seed = 0
save_png = False  # also one PNG per sample in out_dir/samples/
save_npz = False  # also out_dir/samples.npz for FID tools
memorization = False  # find each sample's two nearest training images (L2 in pixels); report, write memorization.png
memorization_ratio = 1 / 3  # flag a sample whose nearest is closer than this times its second nearest (Yoon et al. 2023)
device = 'cuda' if torch.cuda.is_available() else 'cpu'
dtype = 'bfloat16' if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else 'float32'
# -----------------------------------------------------------------------------
config_keys = [k for k, v in globals().items() if not k.startswith('_') and isinstance(v, (int, float, bool, str))]
exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())
# -----------------------------------------------------------------------------

def phema_weights(snapshots, t, sigma_rel):
    """The EMA of sigma_rel at step t as the least-squares combination of snapshots, (step, gamma, weights) triples
    of train_diffusion.py's power-function EMAs; float32 weights by name."""
    x = phema_coefficients([(step, gamma) for step, gamma, _ in snapshots], t, sigma_rel)
    out = {}
    for xi, (_, _, weights) in zip(x, snapshots):
        for name, w in weights.items():
            out[name] = out.get(name, 0) + float(xi) * w.double()
    return {name: w.float() for name, w in out.items()}

def nearest_training_images(images, train, chunk=4096):
    """RMS pixel distances ([0, 1] scale) from each of images (N, H, W, C) uint8 to its two nearest images of train
    (M, H, W, C) uint8, read chunk by chunk, and their indices: (N, 2) each, nearest first."""
    x = torch.from_numpy(np.asarray(images)).to(device).flatten(1).float() / 255
    best_d = torch.full((len(x), 2), float('inf'), device=device)
    best_i = torch.zeros((len(x), 2), dtype=torch.long, device=device)
    for lo in range(0, len(train), chunk):
        block = torch.from_numpy(np.array(train[lo:lo + chunk])).to(device).flatten(1).float() / 255
        d = torch.cat([best_d, torch.cdist(x, block) / math.sqrt(x.shape[1])], dim=1)
        i = torch.cat([best_i, torch.arange(lo, lo + len(block), device=device).expand(len(x), -1)], dim=1)
        best_d, j = d.topk(2, dim=1, largest=False)
        best_i = i.gather(1, j)
    return best_d.cpu().numpy(), best_i.cpu().numpy()

if device.startswith('cuda') and not torch.cuda.is_available():
    raise SystemExit(f"error: device='{device}' but CUDA is not available here; pass --device=cpu")
ddp = int(os.environ.get('RANK', -1)) != -1
if ddp:
    rank, world_size = int(os.environ['RANK']), int(os.environ['WORLD_SIZE'])
    if device.startswith('cuda'):
        device = f"cuda:{os.environ['LOCAL_RANK']}"
        torch.cuda.set_device(device)
    dist.init_process_group(backend='nccl' if device.startswith('cuda') else 'gloo')
else:
    rank, world_size = 0, 1
device_type = 'cuda' if device.startswith('cuda') else 'cpu'
if sampler not in SAMPLERS:
    raise SystemExit(f"error: sampler='{sampler}' is not one of {', '.join(SAMPLERS)}")
ptdtype = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}[dtype]
ctx = torch.autocast(device_type=device_type, dtype=ptdtype, enabled=dtype != 'float32')

ckpt_path = os.path.join(out_dir, 'ckpt.pt')
if not os.path.exists(ckpt_path):
    raise SystemExit(f"error: {ckpt_path} not found; pass the out_dir of a train_diffusion.py run")
try:  # weights_only: tensors and plain types, nothing in the file can run code
    ckpt = torch.load(ckpt_path, map_location='cpu', weights_only=True)
except Exception as e:
    why = 'it holds objects other than tensors and plain types' if isinstance(e, pickle.UnpicklingError) else \
        str(e).split('. ')[0][:200]
    raise SystemExit(f"error: cannot load {ckpt_path} ({why}); pass the out_dir of a train_diffusion.py run")
consistency = ckpt.get('consistency')  # a distill_consistency.py checkpoint: its teacher's diffusion
train_config = ckpt['teacher_config'] if consistency else ckpt['config']
gan = train_config['arch'] in GAN_PRESETS  # a train_gan.py checkpoint: its generator, one call from z to images
model = create_model(train_config['arch'], **ckpt['model_args'])
model.load_state_dict(ckpt['ema' if use_ema else 'model'])
if ema_std:
    files = sorted(glob.glob(os.path.join(out_dir, 'phema', 'phema-*.pt')))
    snaps = [torch.load(f, map_location='cpu', weights_only=True, mmap=True) for f in files]  # mmap: read as summed
    snaps = [(s['step'], g, w) for s in snaps if s['step'] <= ckpt['step'] for g, w in zip(s['gamma'], s['ema'])]
    if not snaps:
        raise SystemExit(f"error: ema_std={ema_std} but {out_dir}/phema/ holds no snapshots; train with "
                         f"phema_stds set (train_diffusion.py), or sample the checkpoint's EMA with ema_std=0")
    try:
        model.load_state_dict(phema_weights(snaps, ckpt['step'], ema_std), strict=False)  # the rest: the EMA
    except ValueError as e:
        raise SystemExit(f"error: ema_std={ema_std}: {e}")
model.to(device).eval()
diffusion = None if gan else Diffusion(train_config['schedule'], train_config['prediction_type'],
                                       train_config['num_timesteps'], train_config['sigma_data'])
if shift != 1.0 and (gan or diffusion.schedule != 'flow'):
    raise SystemExit(f"error: shift={shift} applies to the flow schedule only; this run used "
                     f"'{'a GAN' if gan else diffusion.schedule}'")
num_classes, size, channels = model.config.num_classes, model.config.image_size, model.config.in_channels
# the noise: G's input for a GAN; else the images' shape (a latent model's images are its latents decoded)
z_shape = (model.config.z_dim,) if gan else (channels, size, size)
data_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data', train_config['dataset'])
try:  # a model of latents: decode them with the autoencoder that the latent dataset's meta.json names
    latent = json.load(open(os.path.join(data_dir, 'meta.json'))).get('latent')
except (OSError, ValueError):
    latent = None
if latent:
    try:
        ae_ckpt = torch.load(os.path.join(data_dir, latent['autoencoder']), map_location='cpu', weights_only=True)
        autoencoder = Autoencoder(AEConfig(**ae_ckpt['model_args']))
        autoencoder.load_state_dict(ae_ckpt['weights'])
    except (OSError, RuntimeError, KeyError, pickle.UnpicklingError) as e:
        raise SystemExit(f"error: cannot load the autoencoder of latent dataset {data_dir} "
                         f"({str(e).splitlines()[0][:200]}); it decodes this model's samples")
    autoencoder.to(device).eval()
    latent_mean, latent_std = (torch.tensor(latent[k], device=device).view(1, -1, 1, 1) for k in ('mean', 'std'))
    size, channels, clip_x0 = latent['image_size'], latent['channels'], False  # x0 is a latent: no [-1, 1] to clip to
controls = None
if getattr(model.config, 'control', ''):  # the val images' control images (and labels) of a control model
    try:
        controls = np.load(os.path.join(data_dir, 'val_control.npy'), mmap_mode='r')
        val_labels = np.load(os.path.join(data_dir, 'val_y.npy'))
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: this model follows control images, and {data_dir} has none ({e}); run "
                         f"python data/prepare_control.py --dataset={train_config['dataset']}")
if memorization and latent:
    raise SystemExit("error: memorization=True compares pixels, and this model's training images are latents; check "
                     "the samples of a pixel model, or compare decoded samples with the source images yourself")
if class_labels == 'all' or not num_classes:
    labels = np.arange(num_samples) % num_classes if num_classes else np.full(num_samples, 0)
    if controls is not None and num_classes:
        labels = val_labels[np.arange(num_samples) % len(val_labels)]
else:
    try:
        wanted = [int(c) for c in class_labels.split(',')]
    except ValueError:
        wanted = [-1]
    if not all(0 <= c < num_classes for c in wanted):
        raise SystemExit(f"error: class_labels='{class_labels}' must be 'all' or comma-separated labels in "
                         f"0..{num_classes - 1}")
    labels = np.resize(wanted, num_samples)
if consistency:
    try:
        cm_sigmas = [float(v) for v in sigmas.split(',')] if sigmas else [consistency['sigma_max']]
    except ValueError:
        cm_sigmas = []
    if not cm_sigmas or not all(a > b for a, b in zip(cm_sigmas, cm_sigmas[1:] + [consistency['sigma_min']])):
        raise SystemExit(f"error: sigmas='{sigmas}' must be decreasing sigmas above sigma_min={consistency['sigma_min']}, "
                         f"comma-separated, like 80 or 80,0.8")
how = f"consistency model, {len(cm_sigmas)} step(s) at sigmas {cm_sigmas}" if consistency else \
    'GAN generator' if gan else f"{sampler} with {steps} steps, cfg {cfg_scale}"
print(f"rank {rank}: sampling {num_samples} images from {ckpt_path} (step {ckpt['step']}, "
      f"{'EMA' if use_ema else 'raw'} weights), {how}")

# a round from index lo: rank r samples lo + r*n ... lo + r*n + n-1, n <= batch_size the same on every rank (the last
# round is smaller); all_gather puts them in order on rank 0
images = []
for lo in range(0, num_samples, world_size * batch_size):
    n = min(batch_size, math.ceil((num_samples - lo) / world_size))
    idx = np.arange(lo + rank * n, lo + (rank + 1) * n)
    z = torch.stack([torch.randn(z_shape, generator=torch.Generator().manual_seed(
        int(np.random.SeedSequence([seed, i]).generate_state(1)[0]))) for i in idx]).to(device)
    y = torch.from_numpy(labels[idx % num_samples]).to(device)
    c = None if controls is None else \
        torch.from_numpy(controls[idx % len(controls)]).to(device).permute(0, 3, 1, 2).float().div(127.5).sub(1)
    with ctx:  # ddpm and eta > 0 add fresh noise per step, drawn per batch: then the images depend on the batch layout
        generator = torch.Generator(device).manual_seed(seed + lo + rank)
        if gan:
            x = model(z, y).clamp(-1, 1)
        elif consistency:
            x = diffusion.consistency_sample(model, z, y, cm_sigmas, consistency['sigma_min'], generator)
        else:
            x = diffusion.sample(model, z, y, sampler, steps, eta, cfg_scale, (cfg_sigma_min, cfg_sigma_max), shift,
                                 clip_x0, generator, c)
        if latent:
            x = autoencoder.decode(x * latent_std + latent_mean)
    x = ((x.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()
    if ddp:
        parts = [torch.empty_like(x) for _ in range(world_size)]
        dist.all_gather(parts, x)
        x = torch.cat(parts)
    images.append(x.cpu())
    if rank == 0:
        print(f"{min(lo + world_size * n, num_samples)}/{num_samples}")

if rank == 0:
    images = torch.cat(images)[:num_samples].numpy()
    ncol = min(num_classes, 16) if num_classes and class_labels == 'all' else math.ceil(math.sqrt(min(num_samples, 256)))
    grid = images[:256]
    grid = np.concatenate([grid, np.zeros((-len(grid) % ncol, *grid.shape[1:]), np.uint8)])
    grid = grid.reshape(-1, ncol, size, size, channels).transpose(0, 2, 1, 3, 4).reshape(-1, ncol * size, channels)
    Image.fromarray(grid.squeeze(-1)).save(os.path.join(out_dir, 'samples.png'))
    if save_png:
        os.makedirs(os.path.join(out_dir, 'samples'), exist_ok=True)
        for i, img in enumerate(images):
            Image.fromarray(img.squeeze(-1)).save(os.path.join(out_dir, 'samples', f'{i:06d}.png'))
    if save_npz:
        arrays = {'arr_0': images, 'arr_1': labels.astype(np.int64)} if num_classes else {'arr_0': images}
        np.savez(os.path.join(out_dir, 'samples.npz'), **arrays)
    print(f"wrote {os.path.join(out_dir, 'samples.png')}" + (", samples/*.png" if save_png else "")
          + (", samples.npz" if save_npz else ""))
    if memorization:
        train = np.load(os.path.join(data_dir, 'train_x.npy'), mmap_mode='r')
        d, i = nearest_training_images(images, train)
        flagged = d[:, 0] < memorization_ratio * d[:, 1]
        print(f"memorization: {flagged.sum()} of {num_samples} samples ({flagged.mean():.1%}) have a training image "
              f"closer than {memorization_ratio:.2f} x the second nearest; nearest distance (RMS per pixel, 0-1) median "
              f"{np.median(d[:, 0]):.3f}, min {d[:, 0].min():.3f}")
        worst = np.argsort(d[:, 0] / d[:, 1])[:16]  # the most suspicious first: rows of sample | nearest | 2nd nearest
        rows = [np.concatenate([images[k], train[i[k, 0]], train[i[k, 1]]], axis=1) for k in worst]
        Image.fromarray(np.concatenate(rows).squeeze(-1)).save(os.path.join(out_dir, 'memorization.png'))
if ddp:
    dist.barrier()  # no rank tears its groups down while another still talks to it
    dist.destroy_process_group()
