"""
Derive a control image for every image of a prepared dataset, for train_diffusion.py's control='concat' or
'controlnet': train_control.npy and val_control.npy, uint8 (N, H, W, channels) beside train_x.npy, and a 'control'
entry in meta.json.

    python data/mnist/prepare.py && python data/prepare_control.py --dataset=mnist --kind=downsample4
    python data/prepare_control.py --dataset=cifar10 --kind=edges

Kinds:
  downsample4  the image averaged over 4 x 4 blocks, shown at full size (nearest): a low-resolution guide, so the
               model super-resolves 4x; same channels as the image
  edges        Sobel gradient magnitude of the grey image, 1 channel, scaled so 255 is the dataset's 99.9th percentile
Works on any dataset a data/<name>/prepare.py wrote (or a path), in chunks, so ImageNet-sized arrays stay on disk.
"""
import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import lock_out_dir, new_memmap, replacing  # noqa: E402 (the kit's lock and writers)

KINDS = ('downsample4', 'edges')


def downsample4(x):
    """(n, H, W, C) uint8 -> the 4 x 4 block means, repeated back to (n, H, W, C), float."""
    n, H, W, C = x.shape
    low = x.reshape(n, H // 4, 4, W // 4, 4, C).astype(np.float32).mean(axis=(2, 4))
    return low.repeat(4, axis=1).repeat(4, axis=2)


def sobel(x):
    """(n, H, W, C) uint8 -> gradient magnitude of the channel mean, (n, H, W, 1) float (edges padded by reflection)."""
    g = np.pad(x.astype(np.float32).mean(axis=3), ((0, 0), (1, 1), (1, 1)), mode='reflect')
    gx = (g[:, :-2, 2:] + 2 * g[:, 1:-1, 2:] + g[:, 2:, 2:]) - (g[:, :-2, :-2] + 2 * g[:, 1:-1, :-2] + g[:, 2:, :-2])
    gy = (g[:, 2:, :-2] + 2 * g[:, 2:, 1:-1] + g[:, 2:, 2:]) - (g[:, :-2, :-2] + 2 * g[:, :-2, 1:-1] + g[:, :-2, 2:])
    return np.sqrt(gx ** 2 + gy ** 2)[..., None]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--dataset', required=True, help='data/<dataset>/ (or a path) as its prepare.py wrote it')
    parser.add_argument('--kind', choices=KINDS, default='downsample4')
    parser.add_argument('--chunk', type=int, default=4096, help='images per chunk')
    args = parser.parse_args()
    data_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), args.dataset)
    try:
        meta = json.load(open(os.path.join(data_dir, 'meta.json')))
        images = {s: np.load(os.path.join(data_dir, f'{s}_x.npy'), mmap_mode='r') for s in ('train', 'val')}
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: no prepared dataset in {data_dir} ({e}); run its prepare.py first")
    lock_out_dir(data_dir)  # one writer at a time, as for a run's out_dir
    if meta.get('latent') or images['train'].dtype != np.uint8:
        raise SystemExit(f"error: {data_dir} holds latents; derive the control of the pixel dataset they came from")
    H = meta['image_size']
    if args.kind == 'downsample4' and H % 4:
        raise SystemExit(f"error: downsample4 needs an image size divisible by 4, and {data_dir} has {H}")
    derive = downsample4 if args.kind == 'downsample4' else sobel
    scale = 1.0
    if args.kind == 'edges':  # one scale for the whole dataset, from a sample of the training images
        sample = images['train'][:: max(1, len(images['train']) // 2000)]
        scale = 255 / max(np.percentile(sobel(sample), 99.9), 1e-6)
    channels = meta['channels'] if args.kind == 'downsample4' else 1
    # both splits to temporary files first; then meta.json without a control entry (train_diffusion.py then
    # refuses the controls), the files renamed, and the entry last: a kill leaves the old controls, none, or the
    # new ones, never a mix of the two
    paths = {split: os.path.join(data_dir, f'{split}_control.npy') for split in images}
    try:
        for split, x in images.items():
            out = new_memmap(paths[split] + '.tmp', np.uint8, (len(x), H, H, channels))
            for lo in range(0, len(x), args.chunk):
                out[lo:lo + args.chunk] = np.clip(np.rint(derive(np.asarray(x[lo:lo + args.chunk])) * scale),
                                                  0, 255)
            out.flush()
            del out
        write_meta(data_dir, {k: v for k, v in meta.items() if k != 'control'})
        for split, path in paths.items():
            os.replace(path + '.tmp', path)  # (np.load reads .npy files by content, not by name)
            print(f"wrote {path}: {len(images[split])} x {H} x {H} x {channels}")
        write_meta(data_dir, {**meta, 'control': {'kind': args.kind, 'channels': channels}})
    except OSError as e:
        raise SystemExit(f"error: writing the control images into {data_dir} failed ({e.strerror}); make room "
                         f"and re-run the same command")
    finally:
        for path in paths.values():
            if os.path.lexists(path + '.tmp') and not os.path.isdir(path + '.tmp'):
                os.remove(path + '.tmp')


def write_meta(data_dir, meta):
    with replacing(os.path.join(data_dir, 'meta.json'), 'w') as f:
        json.dump(meta, f, indent=2)


if __name__ == '__main__':
    main()
