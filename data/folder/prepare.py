"""
Prepare any folder of images as uint8 arrays: train_x.npy (N,S,S,C), train_y.npy, val_x.npy,
val_y.npy, meta.json.

    python data/folder/prepare.py --src=/data/imagenet/train --out_dir=data/in64 --image_size=64
    python data/folder/prepare.py --src=photos --val_src=photos_val --out_dir=data/photos --channels=1

Each subfolder of --src that holds a readable image is a class (sorted names -> labels 0..K-1,
searched recursively); a --src with no such subfolder is one class, "all". Hidden folders (a name
starting with '.': .git, .ipynb_checkpoints) and metadata folders (__MACOSX, @eaDir, __pycache__, ...)
are never read, and hidden files are no images. Images are cropped as in guided-diffusion (ADM):
halve with a box filter while the short side is >= 2*image_size, resize the short side to image_size
(bicubic), take the centre square. Every PIL mode is scaled to 8 bits first, never clipped (16-bit,
float, palette, alpha, CMYK: see to_8bit).
Label maps (segmentation): --mask_src=<folder> holds one label PNG per image under the image's
relative name (cat/001.jpg -> <mask_src>/cat/001.png; --val_mask_src likewise for --val_src), each
one channel (mode L, P or I: the value is the label) and of its image's size as shown. They are
cropped as their images, but resized in one nearest-neighbour step (no label is ever blended), and
written as {train,val}_mask.npy (uint8 N,S,S, the values as stored); meta.json gets mask_classes
(the largest label + 1) and mask_ignore (--mask_ignore, e.g. 255 for VOC's borders: a value no
loss or score counts). A missing, extra, unreadable or mis-sized mask stops the script in one line.
Other flags: --val_fraction=0.05 (held out of --src when no --val_src), --seed=0, --workers=N
(decoding processes). Unreadable or truncated files, anything that is not a regular file (a FIFO, a
broken link, a device) and the folders left out are listed in out_dir/skipped.txt. Arrays are written
to disk as they fill, in a shuffled order (a prefix is a random subset), so ImageNet-sized folders
never need to fit in memory. They get their names once all are complete, meta.json last: an out_dir
holds the old dataset or the new one, never a mix.
"""
import argparse
import functools
import json
import multiprocessing
import os
import stat
import sys

import numpy as np
from PIL import Image, ImageOps

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from common import lock_out_dir, new_memmap, open_new, replacing  # noqa: E402 (the kit's lock and writers)
from dataformat import claim_dataset  # noqa: E402

EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")
# folders that are never classes nor searched, besides hidden ones (any name starting with '.')
METADATA = ("__MACOSX", "@eaDir", "__pycache__", "$RECYCLE.BIN", "System Volume Information",
            "lost+found")
NOT_READ = "hidden or metadata folder, not read"
KINDS = {stat.S_IFDIR: "a folder", stat.S_IFIFO: "a FIFO", stat.S_IFSOCK: "a socket",
         stat.S_IFCHR: "a device", stat.S_IFBLK: "a device"}
ARRAYS = ["train_x", "train_y", "val_x", "val_y"]
MASKS = ["train_mask", "val_mask"]
MASK_MODES = ("1", "L", "P", "I", "I;16", "I;16B", "I;16L", "I;16N")  # one label per pixel


def not_data(name):
    return name.startswith(".") or name in METADATA


def is_image_name(name):
    return name.lower().endswith(EXTENSIONS) and not name.startswith(".")


def find_images(folder, skipped_folders):
    """Sorted paths under folder named like images. Hidden and metadata folders are not searched: each
    one, and each folder that cannot be listed, goes to skipped_folders."""
    def unlisted(e):
        skipped_folders.append(f"{e.filename}{os.sep}\tcannot list the folder ({e.strerror})")
    paths = []
    for root, dirs, files in os.walk(folder, onerror=unlisted):
        for d in [d for d in dirs if not_data(d)]:
            dirs.remove(d)
            skipped_folders.append(f"{os.path.join(root, d)}{os.sep}\t{NOT_READ}")
        paths += [os.path.join(root, f) for f in files if is_image_name(f)]
    return sorted(paths)


def list_folder(src, load, skipped_files, skipped_folders):
    """Return (paths, labels, class_names) for a folder of class subfolders, or of loose images (one
    class). A subfolder is a class once one of its images decodes with load (tried in order: usually
    one decode per class); each subfolder that is not is printed and goes to skipped_folders."""
    try:
        entries = sorted(os.listdir(src))
    except OSError as e:
        raise SystemExit(f"error: cannot list {src} ({e.strerror}); pass a folder you can read")
    per_class = {}
    for name in entries:
        folder = os.path.join(src, name)
        if not os.path.isdir(folder):
            continue
        found = [] if not_data(name) else find_images(folder, skipped_folders)
        if any(load(path)[0] is not None for path in found):  # (no mask read)
            per_class[name] = found
            continue
        why = NOT_READ if not_data(name) else f"no readable image among its {len(found)} image files"
        skipped_folders.append(f"{folder}{os.sep}\tnot a class: {why}")
        print(f"skipped folder {folder}: not a class ({why})")
    loose = [os.path.join(src, f) for f in entries
             if is_image_name(f) and not os.path.isdir(os.path.join(src, f))]
    if not per_class:
        return loose, [0] * len(loose), ["all"]
    # a file beside the class subfolders: an error if it is an image, skipped if it is not
    for path in loose:
        arr, _, reason = load(path)
        if arr is not None:
            raise SystemExit(f"error: {src} has class subfolders and also loose images (e.g. "
                             f"{path}); move the loose images into a class subfolder")
        skipped_files.append(f"{path}\t{reason}")
    class_names = list(per_class)
    paths = [p for d in class_names for p in per_class[d]]
    labels = [i for i, d in enumerate(class_names) for _ in per_class[d]]
    return paths, labels, class_names


def to_8bit(image, mode):
    """image in mode 'L' or 'RGB', its mode's full range mapped to 0..255 (PIL's convert clips).
    16-bit ('I;16', 'I;16B', ...): v / 257, so 65535 -> 255. 'I' within 0..65535 holds 16-bit
    samples (PIL opens 16-bit PGM so, and older PIL 16-bit PNG): v / 257 too. 'F' within 0..1 is
    the float convention: v * 255. Any other 'I' or 'F' image has no fixed range: its own min..max
    -> 0..255 (a constant one -> 0). Alpha (also a palette's or a colour key's transparency) is
    composited on black: x = alpha * colour, the premultiplied colour; grey is taken after it."""
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        v = np.asarray(image, dtype=np.float64)
        if not np.isfinite(v).all():
            raise ValueError(f"mode {image.mode} image holds NaN or inf")
        lo, hi = v.min(), v.max()
        if image.mode.startswith("I;16") or (image.mode == "I" and lo >= 0 and hi <= 65535):
            v = v / 257
        elif image.mode == "F" and lo >= 0 and hi <= 1:
            v = v * 255
        else:
            v = (v - lo) * (255 / (hi - lo)) if hi > lo else np.zeros_like(v)
        return Image.fromarray(np.round(v).astype(np.uint8)).convert(mode)
    if image.mode in ("LA", "La", "PA", "RGBA", "RGBa") or "transparency" in image.info:
        rgba = np.asarray(image.convert("RGBA"), dtype=np.float64)
        rgb = rgba[..., :3] * rgba[..., 3:] / 255
        image = Image.fromarray(np.round(rgb).astype(np.uint8))
    return image.convert(mode)


def resized(wh, size):
    """The (width, height) center_crop resizes an image of size wh to before it cuts the square."""
    while min(wh) >= 2 * size:
        wh = tuple(x // 2 for x in wh)
    return tuple(round(x * size / min(wh)) for x in wh)


def center_crop(image, size, labels=False):
    # guided-diffusion image_datasets.py center_crop_arr; a label map (labels) goes to the same
    # size in one nearest-neighbour step, so that each pixel keeps a label of the map
    target = resized(image.size, size)
    while not labels and min(image.size) >= 2 * size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    image = image.resize(target, resample=Image.NEAREST if labels else Image.BICUBIC)
    arr = np.asarray(image)
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[top: top + size, left: left + size]


def open_regular(path):
    """path opened for reading when it is a regular file (or a link to one), else OSError."""
    # stat first: a FIFO or device named like an image is never opened (open can block, or rewind)
    kind = stat.S_IFMT(os.stat(path).st_mode)
    if kind == stat.S_IFREG:
        # non-blocking, then fstat: a file swapped for a FIFO since the stat is refused, not awaited
        f = open(os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0)), "rb")
        kind = stat.S_IFMT(os.fstat(f.fileno()).st_mode)
        if kind == stat.S_IFREG:
            return f
        f.close()
    raise OSError(f"not a regular file but {KINDS.get(kind, 'a special file')}")


def load_pair(pair, size, mode):
    """load_image of an (image path, mask path or None) pair."""
    return load_image(pair[0], size, mode, pair[1])


def load_image(path, size, mode, mask=None):
    """Return (uint8 array (S,S,C), label map (S,S) or None, None) or (None, None, reason) for a
    file PIL cannot read in full. A mask path that does not fit raises MaskError."""
    try:
        with open_regular(path) as f, Image.open(f) as image:
            image.load()  # decodes now, so a truncated file raises here
            # a camera's photo as it is shown: its EXIF orientation applied
            image = ImageOps.exif_transpose(image)
            shown = image.size
            arr = center_crop(to_8bit(image, mode), size)
    except Exception as e:
        return None, None, f"{type(e).__name__}: {e}"
    return arr.reshape(size, size, -1), mask and load_mask(mask, shown, path, size), None


class MaskError(Exception):
    pass


def load_mask(path, shown, image_path, size):
    """The label map at path as uint8 (S,S), cropped as its image of size shown (w, h) was."""
    try:
        with open_regular(path) as f, Image.open(f) as mask:
            mask.load()
            mask = ImageOps.exif_transpose(mask)
    except Exception as e:
        raise MaskError(f"mask {path} is unreadable ({type(e).__name__}: {e})")
    if mask.mode not in MASK_MODES:
        raise MaskError(f"mask {path} is {mask.mode}, not one label per pixel; save label maps as "
                        f"one-channel PNGs (mode L or P: the value is the label)")
    if mask.size != shown:
        raise MaskError(f"mask {path} is {mask.size[0]} x {mask.size[1]}, its image {image_path} "
                        f"{shown[0]} x {shown[1]}; each mask must be its image's size")
    labels = center_crop(mask, size, labels=True).astype(np.int64)
    if labels.min() < 0 or labels.max() > 255:
        raise MaskError(f"mask {path} holds labels in [{labels.min()}, {labels.max()}]; labels "
                        f"must be 0..255 (they are stored as uint8)")
    return labels.astype(np.uint8)


def mask_paths(images, src, mask_src, flag):
    """The label PNG of each image path under src: mask_src/<its relative name>.png. Stops in one
    line when one is missing, two images share one, or mask_src holds a PNG of no image."""
    masks = [os.path.join(mask_src, os.path.splitext(os.path.relpath(p, src))[0] + ".png")
             for p in images]
    missing = [(p, m) for p, m in zip(images, masks) if not os.path.isfile(m)]
    if missing:
        raise SystemExit(f"error: {len(missing)} of the {len(images)} images have no mask in "
                         f"{flag}, e.g. {missing[0][0]} none at {missing[0][1]}; each image needs "
                         f"a label PNG under its relative name")
    if len(set(masks)) < len(masks):
        twice = next(m for m in masks if masks.count(m) > 1)
        raise SystemExit(f"error: two images share the mask {twice} (their names differ only by "
                         f"extension); rename one")
    extra = sorted(set(p for p in find_images(mask_src, []) if p.lower().endswith(".png"))
                   - set(masks))
    if extra:
        raise SystemExit(f"error: {flag} holds {len(extra)} label PNGs of no image in the "
                         f"images' folder, e.g. {extra[0]}; masks must have their images' relative "
                         f"names (or remove the extra ones)")
    return masks


def write_split(name, split, args, pool, load, skipped_files, label_counts):
    """Decode the (path, label, mask path or None) triples in order into
    out_dir/{name}_x.npy.tmp through a memmap, their labels into {name}_y.npy.tmp and their label
    maps, if any, into {name}_mask.npy.tmp (counting each value in label_counts); return the number
    of images kept."""
    tmp = {k: os.path.join(args.out_dir, f"{name}_{k}.npy.tmp") for k in ("x", "y", "mask")}
    s = args.image_size
    shapes = {"x": (s, s, args.channels), "mask": (s, s)} if args.mask_src else {"x": (s, s, args.channels)}
    maps = {k: new_memmap(tmp[k], np.uint8, (len(split),) + shape) for k, shape in shapes.items()}
    y = []
    pairs = [(p, m) for p, _, m in split]
    try:
        for i, (arr, mask, reason) in enumerate(pool.imap(load, pairs, chunksize=16)):
            if arr is None:
                skipped_files.append(f"{split[i][0]}\t{reason}")
                continue
            maps["x"][len(y)] = arr
            if mask is not None:
                maps["mask"][len(y)] = mask
                label_counts += np.bincount(mask.ravel(), minlength=256)
            y.append(split[i][1])
            if (i + 1) % 10000 == 0:
                print(f"{name}: {i + 1}/{len(split)} files read")
    except MaskError as e:
        raise SystemExit(f"error: {e}")
    for k, shape in shapes.items():
        arr = maps.pop(k)
        arr.flush()
        if len(y) == len(split):
            continue
        # drop the unused tail: copy into an array of the right length, in chunks
        tmp_kept = os.path.join(args.out_dir, f"{name}_{k}_kept.npy.tmp")
        kept = new_memmap(tmp_kept, np.uint8, (len(y),) + shape)
        for start in range(0, len(y), 4096):
            end = min(start + 4096, len(y))
            kept[start: end] = arr[start: end]
        kept.flush()
        del kept, arr  # close both maps before the rename (Windows needs it)
        os.replace(tmp_kept, tmp[k])
    with open_new(tmp["y"]) as f:
        np.save(f, np.array(y, dtype=np.int64))
    return len(y)


def commit(out_dir, meta, arrays):
    """Give the finished {name}.npy.tmp arrays their names, then meta.json. The old meta.json goes
    first: a kill between the renames leaves no dataset (a loader says to re-run the prepare script),
    never a meta.json over a mix of old and new arrays (nor an old dataset's masks)."""
    meta_json = os.path.join(out_dir, "meta.json")
    with open_new(meta_json + ".tmp", "w") as f:
        json.dump(meta, f, indent=2)
    tmps = [os.path.join(out_dir, name + ".npy.tmp") for name in arrays] + [meta_json + ".tmp"]
    for path in tmps:  # on disk before any rename, as a checkpoint is
        fd = os.open(path, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    if os.path.lexists(meta_json):
        os.remove(meta_json)
    for name in set(MASKS) - set(arrays):  # an earlier dataset's masks
        if os.path.lexists(os.path.join(out_dir, name + ".npy")):
            os.remove(os.path.join(out_dir, name + ".npy"))
    for name in arrays:
        os.replace(os.path.join(out_dir, name + ".npy.tmp"), os.path.join(out_dir, name + ".npy"))
    os.replace(meta_json + ".tmp", meta_json)


def main():  # a function, so that worker processes started by spawn/forkserver do not rerun it
    parser = argparse.ArgumentParser(description="Prepare a folder of images as uint8 .npy arrays.")
    parser.add_argument("--src", required=True,
                        help="folder of images, or of class subfolders of images")
    parser.add_argument("--out_dir", required=True)
    parser.add_argument("--image_size", type=int, default=64)
    parser.add_argument("--val_fraction", type=float, default=None,
                        help="default 0.05; not with --val_src")
    parser.add_argument("--val_src", default=None,
                        help="a second folder laid out like --src, used as the val split")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--channels", type=int, choices=[1, 3], default=3,
                        help="1 converts to grayscale")
    parser.add_argument("--workers", type=int, default=os.cpu_count(),
                        help="processes that decode images")
    parser.add_argument("--mask_src", default=None,
                        help="a folder of label PNGs under the images' relative names")
    parser.add_argument("--val_mask_src", default=None, help="--val_src's label PNGs")
    parser.add_argument("--mask_ignore", type=int, default=None,
                        help="a label value that is no class (e.g. 255: VOC's borders)")
    args = parser.parse_args()
    for flag, folder in [("--src", args.src), ("--val_src", args.val_src),
                         ("--mask_src", args.mask_src), ("--val_mask_src", args.val_mask_src)]:
        if folder is not None and not os.path.isdir(folder):
            raise SystemExit(f"error: {flag} {folder} is not a folder; pass a folder of images")
    if bool(args.val_mask_src) != bool(args.mask_src and args.val_src):
        raise SystemExit("error: --val_mask_src goes with --mask_src and --val_src (the val images' "
                         "label PNGs); pass all three, or leave it out")
    if args.mask_ignore is not None and not (args.mask_src and 0 <= args.mask_ignore <= 255):
        raise SystemExit(f"error: --mask_ignore {args.mask_ignore} must be a label value 0..255, "
                         f"with --mask_src")
    if args.val_src and args.val_fraction is not None:
        raise SystemExit("error: --val_fraction and --val_src both given; pass one of them")
    if args.image_size < 1:
        raise SystemExit(f"error: --image_size {args.image_size} must be >= 1; "
                         f"pass e.g. --image_size=64")
    if args.workers < 1:
        raise SystemExit(f"error: --workers {args.workers} must be >= 1; pass e.g. --workers=4")
    fraction = 0.05 if args.val_fraction is None else args.val_fraction
    if not 0 <= fraction < 1:
        raise SystemExit(f"error: --val_fraction {fraction} is not in [0, 1); "
                         f"pass e.g. --val_fraction=0.05")

    # list the classes and their images; the folders and files left out go to skipped.txt
    mode = "L" if args.channels == 1 else "RGB"
    load = functools.partial(load_image, size=args.image_size, mode=mode)
    decode = functools.partial(load_pair, size=args.image_size, mode=mode)
    skipped_files, skipped_folders = [], []
    rng = np.random.default_rng(args.seed)
    paths, labels, class_names = list_folder(args.src, load, skipped_files, skipped_folders)
    if not paths:
        found = f" (skipped {len(skipped_folders)} folders, see above)" if skipped_folders else ""
        raise SystemExit(f"error: no readable images ({' '.join(EXTENSIONS)}) in --src {args.src}"
                         f"{found}; pass a folder of images")
    masks = mask_paths(paths, args.src, args.mask_src, "--mask_src") if args.mask_src else [None] * len(paths)
    train = [(paths[i], labels[i], masks[i]) for i in rng.permutation(len(paths))]
    if args.val_src:
        val_paths, val_labels, val_classes = list_folder(args.val_src, load, skipped_files,
                                                         skipped_folders)
        if not val_paths or val_classes != class_names:
            raise SystemExit(f"error: --val_src {args.val_src} has {len(val_paths)} images in classes "
                             f"{val_classes}, --src has classes {class_names}; lay out both folders "
                             f"the same way")
        val_masks = (mask_paths(val_paths, args.val_src, args.val_mask_src, "--val_mask_src")
                     if args.val_mask_src else [None] * len(val_paths))
        val = [(val_paths[i], val_labels[i], val_masks[i]) for i in rng.permutation(len(val_paths))]
    else:
        n_val = max(1, round(fraction * len(paths))) if fraction > 0 else 0
        if n_val >= len(paths):
            raise SystemExit(f"error: --val_fraction {fraction} leaves no training images out of "
                             f"{len(paths)}; pass --val_fraction=0 or add images")
        val, train = train[:n_val], train[n_val:]
    n_files = len(train) + len(val) + len(skipped_files)

    try:
        os.makedirs(args.out_dir, exist_ok=True)
    except OSError as e:
        raise SystemExit(f"error: cannot make --out_dir {args.out_dir} ({e.strerror}); pass a path "
                         f"that is not a file nor under one")
    lock_out_dir(args.out_dir)  # one writer at a time, as for a run's out_dir
    arrays = ARRAYS + (MASKS if args.mask_src else [])
    claim_dataset(args.out_dir, [f"{n}.npy" for n in ARRAYS + MASKS] + ["meta.json", "skipped.txt"],
                  "data/folder/prepare.py")
    label_counts = np.zeros(256, dtype=np.int64)  # pixels of each mask value
    # decode into .tmp files beside the old dataset: it stays readable until the new one is complete
    try:
        with multiprocessing.Pool(args.workers) as pool:
            counts = {name: write_split(name, split, args, pool, decode, skipped_files, label_counts)
                      for name, split in [("train", train), ("val", val)]}
        skipped_txt = os.path.join(args.out_dir, "skipped.txt")
        if skipped_files or skipped_folders:
            with replacing(skipped_txt, "w") as f:
                f.write("\n".join(skipped_folders + skipped_files) + "\n")
        elif os.path.exists(skipped_txt):
            os.remove(skipped_txt)  # a stale list from an earlier run
        if skipped_files:
            print(f"skipped {len(skipped_files)} of {n_files} files (unreadable, truncated or not a "
                  f"regular file); see {skipped_txt}")
        if skipped_folders:
            print(f"skipped {len(skipped_folders)} folders (hidden, metadata or no readable image); "
                  f"see {skipped_txt}")
        for name, split in [("train", train), ("val", val)]:
            if split and counts[name] == 0:
                raise SystemExit(f"error: none of the {len(split)} {name} images could be read; "
                                 f"see {skipped_txt}")
        source = f"image folder {os.path.abspath(args.src)}"
        if args.val_src:
            source += f", val from {os.path.abspath(args.val_src)}"
        meta = {"prepared_by": "data/folder/prepare.py", "image_size": args.image_size, "channels": args.channels,
                "num_classes": len(class_names), "class_names": class_names, "source": source,
                "num_train": counts["train"], "num_val": counts["val"]}
        if args.mask_src:
            found = [v for v in np.flatnonzero(label_counts) if v != args.mask_ignore]
            if not found:
                raise SystemExit(f"error: every mask pixel is --mask_ignore {args.mask_ignore}; "
                                 f"there is no label to learn")
            meta.update(mask_classes=int(found[-1]) + 1, mask_ignore=args.mask_ignore)
            print(f"masks: labels {', '.join(map(str, found))} (mask_classes {found[-1] + 1})"
                  + (f", {args.mask_ignore} ignored" if args.mask_ignore is not None else ""))
        commit(args.out_dir, meta, arrays)
    except OSError as e:
        raise SystemExit(f"error: writing {e.filename or args.out_dir} failed ({e.strerror or e}); "
                         f"make room or pass another --out_dir")
    finally:  # remove what a failure left behind; the old dataset, if any, is as it was
        leftovers = [f"{n}.npy.tmp" for n in ARRAYS + MASKS + [f"{s}_{k}_kept" for s in ("train", "val")
                                                                for k in ("x", "mask")]]
        for name in leftovers + ["meta.json.tmp", "skipped.txt.tmp"]:
            path = os.path.join(args.out_dir, name)
            if os.path.lexists(path) and not os.path.isdir(path):  # (a folder is open_new's line)
                os.remove(path)
    s, c = args.image_size, args.channels
    print(f"folder: train ({counts['train']}, {s}, {s}, {c}) val ({counts['val']}, {s}, {s}, {c}) "
          f"uint8, {len(class_names)} classes -> {args.out_dir}")


if __name__ == "__main__":
    main()
