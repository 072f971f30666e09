"""
The prepared-dataset format, read and written: data/<name>/ (or a path) holding meta.json
(image_size, channels, num_classes; a latent dataset's statistics and decoder) and, per split,
{split}_x.npy (uint8 images or float16 latents, N x H x W x C) and {split}_y.npy (integer labels),
with {split}_mask.npy label maps and {split}_control.npy control images where prepared. The
prepare scripts write it (save_dataset, whole or absent), the train scripts, sample.py and
evaluate.py read it (load_dataset, checked before any training step).
"""
import functools
import json
import os

import numpy as np

from common import open_new


def data_path(dataset):
    """data/<dataset>/ beside the scripts, or dataset itself when it is a path."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data', dataset)


def load_dataset(dataset, splits=('train', 'val'), latent_ok=False, script='', classes=False,
                 masks=False):
    """meta.json and the memory-mapped arrays of each split, checked against each other: (data_dir,
    meta, {split: (x, y)}, or (x, y, mask) with masks). Images are uint8 (N, H, W, C) and latents
    (latent_ok) float16; labels are integers in [0, num_classes), and each class has training images
    when they condition a model (classes); label maps are uint8 (N, H, W) below mask_classes or
    mask_ignore."""
    data_dir = data_path(dataset)
    prepare = (f"python data/{dataset}/prepare.py" if os.path.basename(dataset) == dataset
               else "its prepare.py")
    if dataset.rstrip('/').endswith('-latents'):  # prepare_latents.py's default name
        prepare = (f"python data/prepare_latents.py --vae=<Stable Diffusion's VAE> (or "
                   f"--autoencoder=<a train_ae.py out_dir>) --dataset={dataset.rstrip('/')[:-8]}")
    try:
        with open(os.path.join(data_dir, 'meta.json')) as f:
            meta = json.load(f)
        H, C, K = (meta[k] for k in ('image_size', 'channels', 'num_classes'))
        if not all(isinstance(v, int) and v > 0 for v in (H, C, K)):
            raise ValueError(f"image_size, channels and num_classes are {H!r}, {C!r}, {K!r}: "
                             f"positive integers")
        data = {s: (np.load(os.path.join(data_dir, f'{s}_x.npy'), mmap_mode='r'),
                    np.load(os.path.join(data_dir, f'{s}_y.npy'))) for s in splits}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        why = f'{e.strerror}: {e.filename}' if isinstance(e, OSError) else repr(e)
        raise SystemExit(f"error: dataset '{dataset}' is missing or unreadable in {data_dir} "
                         f"({why}); run {prepare} first")
    latent = meta.get('latent')
    if latent:
        if not latent_ok:
            raise SystemExit(f"error: dataset '{dataset}' holds latents; {script} trains on images")
        prepare = (f"python data/prepare_latents.py --vae=<its VAE> (or --autoencoder=<its "
                   f"train_ae.py out_dir>) --dataset={latent.get('dataset', '<the images>')} "
                   f"--latents={dataset}")
    kind = 'float16' if latent else 'uint8'
    for split, (x, y) in data.items():
        where = os.path.join(data_dir, split)
        if (x.dtype != kind or x.shape[1:] != (H, H, C) or y.shape != (len(x),)
                or y.dtype.kind not in 'iu'):
            raise SystemExit(f"error: {where}_x.npy is {x.dtype} {x.shape} with {y.dtype} "
                             f"{y.shape} labels, but meta.json says {kind} (N, {H}, {H}, {C}) "
                             f"and N integer labels; re-run {prepare}")
        if len(x) == 0:
            raise SystemExit(f"error: {where}_x.npy holds no images; re-run {prepare}")
        if y.min() < 0 or y.max() >= K:
            raise SystemExit(f"error: {where}_y.npy has labels in [{y.min()}, {y.max()}] but "
                             f"meta.json says {K} classes; re-run {prepare}")
        seen = np.count_nonzero(np.bincount(y, minlength=K)) if classes else K
        if split == 'train' and seen < K:  # (the model would learn those from nothing)
            raise SystemExit(f"error: meta.json says {K} classes, but {where}_y.npy has images of "
                             f"{seen} of them; re-run {prepare} (or correct num_classes)")
    if masks:
        data = {split: (x, y, load_masks(data_dir, split, meta, len(x), dataset, script))
                for split, (x, y) in data.items()}
    return data_dir, meta, data


def load_masks(data_dir, split, meta, n, dataset, script):
    """The split's label maps (memory-mapped), checked against meta.json and its n images."""
    path = os.path.join(data_dir, f'{split}_mask.npy')
    K, ignore, H = meta.get('mask_classes'), meta.get('mask_ignore'), meta['image_size']
    if not os.path.exists(path) or not isinstance(K, int):
        raise SystemExit(f"error: dataset '{dataset}' has no label maps ({path}, mask_classes in "
                         f"meta.json); {script} needs them: prepare it with data/folder/prepare.py "
                         f"--mask_src=<folder of label PNGs>")
    try:
        mask = np.load(path, mmap_mode='r')
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {path} is unreadable ({e}); re-run data/folder/prepare.py")
    if mask.dtype != np.uint8 or mask.shape != (n, H, H):
        raise SystemExit(f"error: {path} is {mask.dtype} {mask.shape}, but meta.json says uint8 "
                         f"({n}, {H}, {H}); re-run data/folder/prepare.py")
    values = np.unique(np.concatenate([np.unique(mask[i:i + 4096]) for i in range(0, n, 4096)]))
    if any(v >= K and v != ignore for v in values):
        raise SystemExit(f"error: {path} holds labels {values.tolist()}, but meta.json says "
                         f"mask_classes {K} (mask_ignore {ignore}); re-run data/folder/prepare.py")
    return mask


def load_controls(dataset, data_dir, meta, data, asker):
    """The control images of data's splits, memory-mapped: {split: uint8 (N, H, W, channels)}, one per
    image (data/prepare_control.py's), checked against the split's images. meta.json names them: a dataset
    prepared again since has none until prepare_control.py runs again. asker: what needs them."""
    try:
        if not isinstance(meta.get('control'), dict):
            raise OSError(2, 'meta.json has no control entry', os.path.join(data_dir, 'meta.json'))
        controls = {s: np.load(os.path.join(data_dir, f'{s}_control.npy'), mmap_mode='r') for s in data}
    except (OSError, ValueError) as e:
        why = f'{e.strerror}: {e.filename}' if isinstance(e, OSError) else repr(e)
        raise SystemExit(f"error: {asker} but {data_dir} holds no readable control images ({why}); run "
                         f"python data/prepare_control.py --dataset={dataset}")
    H = meta['image_size']
    for split, ctrl in controls.items():
        if ctrl.dtype != np.uint8 or ctrl.shape[:3] != (len(data[split][0]), H, H):
            raise SystemExit(f"error: {os.path.join(data_dir, split)}_control.npy is {ctrl.dtype} {ctrl.shape}, "
                             f"not uint8 ({len(data[split][0])}, {H}, {H}, channels); re-run "
                             f"data/prepare_control.py")
    return controls


def mirrored_latents(data_dir, meta, asker):
    """The latents of the train images' mirror images (data/prepare_latents.py --flips=True),
    memory-mapped. asker: what needs them."""
    if not meta['latent']['flips']:
        raise SystemExit(f"error: {asker} but {data_dir} holds no latents of mirror images; encode them "
                         f"with data/prepare_latents.py --flips=True, or train with --hflip=False")
    return np.load(os.path.join(data_dir, 'train_x_flip.npy'), mmap_mode='r')


def encoded_images(data_dir, meta, data, asker):
    """The train images (uint8, memory-mapped) of the dataset whose latents data_dir holds, checked to be
    those the latents encode (their size, channels and labels). asker: what needs them."""
    latent = meta['latent']
    try:
        image_dir, image_meta, images = load_dataset(latent['dataset'], splits=('train',))
    except SystemExit as e:
        raise SystemExit(f"{e} ({asker} sees the images {data_dir} encodes)")
    pixels, labels = images['train']
    if ((image_meta['image_size'], image_meta['channels']) != (latent['image_size'], latent['channels'])
            or not np.array_equal(labels, data['train'][1])):
        raise SystemExit(f"error: {asker} sees the images {data_dir} encodes, but {image_dir}'s are others "
                         f"({len(pixels)} train images and labels; the latents: {len(data['train'][1])}); "
                         f"encode it again with data/prepare_latents.py")
    return pixels


DATASET_MARK = '.prepared-by-kit'  # in each folder a prepare script writes a dataset into


def claim_dataset(out_dir, names, by):
    """Before the prepare script `by` writes the files names into out_dir: stops, in one line, when
    one of them is there already and out_dir is no dataset this kit prepared (its DATASET_MARK, or a
    meta.json of the kit's), as a user's own train_x.npy is never overwritten, or is a dataset
    another prepare script made (latents, another source: removed on purpose, not written over);
    else marks it."""
    there = [n for n in names if os.path.lexists(os.path.join(out_dir, n))]
    try:
        with open(os.path.join(out_dir, 'meta.json')) as f:
            meta = json.load(f)
        ours = all(isinstance(meta.get(k), int) for k in ('image_size', 'channels', 'num_classes'))
    except (OSError, ValueError, AttributeError):
        meta, ours = {}, False
    theirs = 'data/prepare_latents.py' if meta.get('latent') else meta.get('prepared_by')
    if ours and theirs and theirs != by:
        raise SystemExit(f"error: {out_dir} holds a dataset that {theirs} prepared; {by} does not "
                         f"write over a dataset of another kind: remove that one first, or pass "
                         f"another --out_dir")
    mark = os.path.join(out_dir, DATASET_MARK)
    if there and not (ours or os.path.isfile(mark) and not os.path.islink(mark)):
        raise SystemExit(f"error: {out_dir} holds {there[0]} but is no dataset this kit prepared "
                         f"(no {DATASET_MARK}, no meta.json of the kit's), so it is not "
                         f"overwritten; move it away, or pass another --out_dir")
    if not os.path.isfile(mark) or os.path.islink(mark):
        open_new(mark).close()


def save_dataset(out_dir, arrays, meta):
    """The arrays as out_dir/{name}.npy and meta.json, whole or absent. Every file goes to a .tmp
    name first; then the old meta.json is removed, the arrays get their names and meta.json comes
    last, so a kill leaves the old dataset, none (a loader says to re-run) or the new one."""
    files = {f"{name}.npy": functools.partial(np.save, arr=arr) for name, arr in arrays.items()}
    files["meta.json"] = lambda f: f.write(json.dumps(meta, indent=2).encode())
    claim_dataset(out_dir, list(files), meta['prepared_by'])
    paths = [os.path.join(out_dir, name) for name in files]
    try:
        for path, write in zip(paths, files.values()):
            with open_new(path + ".tmp") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
        if os.path.lexists(paths[-1]):
            os.remove(paths[-1])
        for path in paths:
            os.replace(path + ".tmp", path)
    except OSError as e:
        raise SystemExit(f"error: writing {e.filename or out_dir} failed ({e.strerror or e}); "
                         f"make room or pass another --out_dir")
    finally:  # remove what a failure left behind
        for path in paths:
            if os.path.lexists(path + ".tmp") and not os.path.isdir(path + ".tmp"):
                os.remove(path + ".tmp")


def class_weights(labels, power):
    """Per-image sampling weights count(class)^-power, normalised (float64): class k is drawn with
    probability proportional to count_k^(1 - power); 0 is as the data, 1 equal classes."""
    counts = np.bincount(labels)
    per_image = counts[labels].astype(np.float64) ** -power
    return per_image / per_image.sum()


def to_device(x, device, images=True):
    """A (B, H, W, C) uint8 or float16 CPU tensor as float32 NCHW on the device (a view of NHWC
    memory: the channels_last layout), or any other tensor as it is (images=False: labels, label
    maps); on CUDA a pinned, non-blocking copy."""
    if device.startswith('cuda'):
        x = x.pin_memory().to(device, non_blocking=True)
    return x.to(device).permute(0, 3, 1, 2).float() if images else x.to(device)
