"""
Encode a prepared image dataset into the latents of a train_ae.py autoencoder or of Stable Diffusion's VAE
(--vae: pretrained.sd_vae), for latent diffusion: the posterior mean of every image as float16
(N, H/f, W/f, z_channels) in {train,val}_x.npy (with --flips also train_x_flip.npy, the latents of the mirror
images, for train_diffusion.py's hflip, as fast-DiT encodes them), the labels beside them, the scaling in
meta.json's 'latent' entry, and autoencoder.pt, a copy of the weights that train_diffusion.py's sample grids
and sample.py decode through. A diffusion model sees (z - mean) / std per channel: --scaling=stats computes
mean and std from the training latents (the default for a train_ae.py autoencoder); --scaling=vae takes the
VAE's shift_factor and 1 / scaling_factor (0 and 1 / 0.18215 for SD's VAE: the latents DiT and SiT were
trained on, the default with --vae). Decoding undoes exactly the recorded scaling.

    python train_ae.py config/mnist_ae.py          # an autoencoder, out-mnist-ae/best.pt
    python data/prepare_latents.py --autoencoder=out-mnist-ae --dataset=mnist     # data/mnist-latents/
    python train_diffusion.py config/mnist_ldm.py  # latent diffusion on them
    torchrun --standalone --nproc_per_node=8 data/prepare_latents.py --vae=sd-vae-ft-ema --dataset=imagenet256 \
        --flips=True                               # data/imagenet256-latents/: 32 x 32 x 4, as DiT's

Under torchrun each rank encodes a contiguous share of the rows into the same memory-mapped files (float32 unless
--dtype=bfloat16). The latent dataset is written into a new folder beside the target, <latents>.tmp-<pid>, then
renamed into place: a kill leaves the old latent dataset or the new one, never a mix of the two (in the moment
between the two renames, the old one is <latents>.old-<pid>).
"""
import argparse
import json
import os
import re
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict

import numpy as np
import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
import dataformat  # noqa: E402
from model import AEConfig, Autoencoder  # noqa: E402
from pretrained import or_exit, sd_vae  # noqa: E402


# the files of a latent dataset, all that re-encoding replaces
LATENT_FILES = re.compile(r'(train|val)_(x|y|x_flip|control)\.npy|meta\.json|autoencoder\.pt')


def load_vae(path, H, C, dataset):
    """Stable Diffusion's VAE from path (its folder or file), checked against the dataset's images; and a
    stand-in for the checkpoint's entries."""
    if os.path.exists(os.path.join(path, 'best.pt')):
        raise SystemExit(f"error: {path} is a train_ae.py run, not a released VAE; pass it as --autoencoder={path}")
    ae = or_exit(sd_vae, path)
    if C != ae.config.in_channels or H % ae.factor:
        raise SystemExit(f"error: {path} encodes {ae.config.in_channels}-channel images of a size divisible by "
                         f"{ae.factor}, but dataset '{dataset}' has {H} px, {C}-channel ones")
    return ae.requires_grad_(False), {'step': 'released', 'ema': ae.state_dict()}


def read_meta(folder):
    """folder/meta.json, or {} when there is none to read."""
    try:
        with open(os.path.join(folder, 'meta.json')) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def load_autoencoder(source, H, C, dataset):
    """The autoencoder of a train_ae.py checkpoint with its EMA weights, checked against the dataset's
    images; and the checkpoint."""
    if not os.path.exists(source):
        raise SystemExit(f"error: {source} not found; train the autoencoder first (python train_ae.py "
                         f"--out_dir={os.path.dirname(source)}), or pass --weights=ckpt")
    ckpt = common.load_checkpoint(source, "pass the out_dir of a train_ae.py run as --autoencoder",
                              kinds=['autoencoder'])
    try:
        ae = Autoencoder(AEConfig(**ckpt['model_args']))
        ae.load_state_dict(ckpt['ema'])
    except (KeyError, TypeError, RuntimeError) as e:
        why = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        raise SystemExit(f"error: {source} holds no train_ae.py autoencoder ({why}); pass the out_dir of a "
                         f"train_ae.py run as --autoencoder")
    if (ae.config.image_size, ae.config.in_channels) != (H, C):
        size, channels = ae.config.image_size, ae.config.in_channels
        raise SystemExit(f"error: {source} encodes {size} px, {channels}-channel images, but dataset "
                         f"'{dataset}' has {H} px, {C}-channel ones; pass an autoencoder trained on it")
    return ae.eval().requires_grad_(False), ckpt


def encode_rows(ae, images, out, rows, flip, batch_size, device, ctx):
    """Writes the posterior means of images[rows] (mirrored with flip) to out[rows] as float16; returns the
    per-channel count, sum and sum of squares of what it wrote."""
    sums = torch.zeros(3, out.shape[-1], dtype=torch.float64, device=device)
    for lo in range(rows.start, rows.stop, batch_size):
        hi = min(lo + batch_size, rows.stop)
        x = torch.from_numpy(np.array(images[lo:hi]))  # a copy: the memmap is read-only
        x = dataformat.to_device(x.flip(2) if flip else x, device) / 127.5 - 1
        with torch.no_grad(), ctx:
            z = ae.encode(x)[0].float().permute(0, 2, 3, 1)
        out[lo:hi] = z.cpu().numpy().astype(np.float16)
        z = z.reshape(-1, z.shape[-1]).double()
        sums += torch.stack([torch.full_like(z[0], len(z)), z.sum(0), z.pow(2).sum(0)])
    out.flush()
    return sums


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--autoencoder', default='', help="the out_dir of a train_ae.py run")
    parser.add_argument('--vae', default='', help="or Stable Diffusion's VAE: a diffusers folder (config.json, "
                        "diffusion_pytorch_model.safetensors) or an LDM .ckpt/.safetensors")
    parser.add_argument('--scaling', choices=('stats', 'vae'), default='',
                        help="'stats': each channel's mean and std over the training latents (the default "
                        "with --autoencoder); 'vae': the VAE's shift_factor and scaling_factor (with --vae)")
    parser.add_argument('--dataset', required=True, help='data/<dataset>/ (or a path), from its prepare.py')
    parser.add_argument('--latents', default='',
                        help='the latent dataset to write: data/<latents>/ (or a path); <dataset>-latents '
                        'if unset')
    parser.add_argument('--weights', choices=('best', 'ckpt'), default='best',
                        help="best.pt (the best val PSNR) or ckpt.pt (the last step): its EMA weights encode")
    parser.add_argument('--flips', nargs='?', const='True', default='False', choices=('True', 'False'),
                        help="also encode each training image's mirror image, for train_diffusion.py's hflip")
    parser.add_argument('--batch_size', type=int, default=256, help='images per forward pass on each rank')
    parser.add_argument('--dtype', choices=('float32', 'bfloat16'), default='float32',
                        help="float32, as fast-DiT encodes (it is done once); bfloat16 autocast is faster on GPUs")
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    args = parser.parse_args()
    flips = args.flips == 'True'
    if bool(args.autoencoder) == bool(args.vae):
        raise SystemExit("error: pass one of --autoencoder=<a train_ae.py out_dir> and --vae=<Stable Diffusion's "
                         "VAE>")
    scaling = args.scaling or ('vae' if args.vae else 'stats')
    if scaling == 'vae' and not args.vae:
        raise SystemExit("error: --scaling=vae takes a VAE's scaling_factor; a train_ae.py autoencoder has none "
                         "(use --scaling=stats)")
    if args.batch_size < 1:
        raise SystemExit(f"error: --batch_size={args.batch_size} must be at least 1")
    device_type = common.check_device(args.device)

    # the images; where the latents go (never over the images, nor over anything but a latent dataset); the
    # autoencoder: every rank checks alike, before any rank writes
    data_dir, meta, data = dataformat.load_dataset(args.dataset, latent_ok=True)
    H, C = meta['image_size'], meta['channels']
    if meta.get('latent'):
        raise SystemExit(f"error: dataset '{args.dataset}' holds latents already; encode the image dataset "
                         f"they came from, --dataset={meta['latent'].get('dataset', '<images>')}")
    latents = args.latents or args.dataset.rstrip('/') + '-latents'
    target = os.path.abspath(dataformat.data_path(latents))
    if os.path.realpath(target) == os.path.realpath(data_dir):
        raise SystemExit(f"error: --latents={latents} is the image dataset itself ({data_dir}), whose images "
                         f"the latents would replace; pass another --latents, e.g. {args.dataset}-latents")
    if os.path.exists(target) and not read_meta(target).get('latent'):
        raise SystemExit(f"error: {target} exists and is no latent dataset (its meta.json has no 'latent' "
                         f"entry), and writing the latents there would delete it; pass another --latents")
    if int(os.environ.get('RANK', 0)) == 0:  # one writer at a time: a lock beside the folder it replaces
        os.makedirs(os.path.dirname(target), exist_ok=True)
        common.lock_out_dir(target, path=f'{target}.lock', flag='latents')
    # the new latents replace the old folder whole: only when it holds nothing but what the kit writes there
    foreign = sorted(name for name in (os.listdir(target) if os.path.isdir(target) else [])
                     if not LATENT_FILES.fullmatch(name)
                     or os.path.islink(os.path.join(target, name)))
    if foreign:
        raise SystemExit(f"error: {target} holds {foreign[0]}, which is not a file the kit writes there, and "
                         f"re-encoding replaces the folder whole; move it away, or pass another --latents")
    source = args.vae or os.path.join(args.autoencoder, f'{args.weights}.pt')
    ae, ckpt = load_vae(source, H, C, args.dataset) if args.vae else load_autoencoder(source, H, C, args.dataset)
    weights = 'released weights' if args.vae else f"step {ckpt['step']}, EMA weights"
    h, zc = H // ae.factor, ae.config.z_channels

    # distributed setup: torchrun sets RANK, LOCAL_RANK, WORLD_SIZE; each rank encodes a share of every file
    ddp = 'RANK' in os.environ
    rank, world_size = int(os.environ.get('RANK', 0)), int(os.environ.get('WORLD_SIZE', 1))
    device = f"cuda:{os.environ['LOCAL_RANK']}" if ddp and device_type == 'cuda' else args.device
    if ddp:
        if device_type == 'cuda':
            torch.cuda.set_device(device)
        dist.init_process_group(backend='nccl' if device_type == 'cuda' else 'gloo')
    master = rank == 0
    ae.to(device)
    ctx = torch.autocast(device_type, dtype=torch.bfloat16) if args.dtype == 'bfloat16' else nullcontext()

    # the files, created once by rank 0 in a new folder beside the target
    jobs = {(split, flip): f"{split}_x{'_flip' * flip}.npy" for split, flip in
            [('train', False), ('val', False)] + [('train', True)] * flips}
    folder = [f'{target}.tmp-{os.getpid()}']
    if master:
        os.makedirs(folder[0])
        try:
            for (split, flip), name in jobs.items():
                common.new_memmap(os.path.join(folder[0], name), np.float16, (len(data[split][0]), h, h, zc))
        except SystemExit:
            shutil.rmtree(folder[0], ignore_errors=True)
            raise
        print(f"encoding {args.dataset} with {source} ({weights}) into {target}: {h} x {h} x {zc} latents, "
              f"f={ae.factor}, scaling '{scaling}'")
    if ddp:
        dist.broadcast_object_list(folder)
    folder = folder[0]
    try:
        t0 = time.time()
        for (split, flip), name in jobs.items():
            out = np.load(os.path.join(folder, name), mmap_mode='r+')
            # this rank's rows, contiguous: no two ranks touch a row
            rows = range(rank * len(out) // world_size, (rank + 1) * len(out) // world_size)
            sums = encode_rows(ae, data[split][0], out, rows, flip, args.batch_size, device, ctx)
            if split == 'train' and not flip:
                train_sums = sums
            del out
        if ddp:
            dist.all_reduce(train_sums)
            dist.barrier()
        if master:
            mean = train_sums[1] / train_sums[0]
            std = (train_sums[2] / train_sums[0] - mean ** 2).clamp(min=0).sqrt()
            stats = f"per-channel mean {np.round(mean.tolist(), 3).tolist()}, std {np.round(std.tolist(), 3).tolist()}"
            if scaling == 'vae':  # what the VAE's users divide by and subtract: one number each
                mean, std = torch.full_like(mean, ae.shift_factor), torch.full_like(std, 1 / ae.scaling_factor)
            for split in ('train', 'val'):
                np.save(os.path.join(folder, f'{split}_y.npy'), data[split][1])
            source, step = os.path.abspath(source), ckpt['step']
            decoder = {'model_args': asdict(ae.config), 'weights': ckpt['ema'], 'source': source, 'step': step,
                       'kind': 'latent decoder', 'format': common.FORMAT}
            torch.save({**decoder, 'checksum': common.checksum(decoder)}, os.path.join(folder, 'autoencoder.pt'))
            # the image dataset's entries (but 'control': its control images stay behind), the latents' shape,
            # and the 'latent' entry that train_diffusion.py and sample.py read
            latent = {'autoencoder': 'autoencoder.pt', 'mean': mean.tolist(), 'std': std.tolist(),
                      'scaling': scaling, 'image_size': H, 'channels': C, 'flips': flips, 'dataset': args.dataset,
                      'source': f"{args.dataset} encoded by {source} ({weights}): posterior means"}
            entries = {k: v for k, v in meta.items() if k != 'control'}
            with open(os.path.join(folder, 'meta.json'), 'w') as f:
                json.dump({**entries, 'image_size': h, 'channels': zc, 'latent': latent}, f, indent=2)
            # the new dataset in place of the old one
            old = f'{target}.old-{os.getpid()}'
            if os.path.exists(target):
                os.rename(target, old)
            os.rename(folder, target)
            shutil.rmtree(old, ignore_errors=True)
            count, dt = sum(len(data[split][0]) for split, _ in jobs), time.time() - t0
            print(f"encoded {count} images in {dt:.1f} s ({count / dt:.0f} img/s over {world_size} rank(s)); "
                  f"{stats}; train with --dataset={latents}")
    finally:
        # a run that stopped early leaves no half-written folder behind
        if master:
            shutil.rmtree(folder, ignore_errors=True)
    if ddp:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == '__main__':
    main()
