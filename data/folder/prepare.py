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
from bookkeeping import claim_dataset, lock_out_dir, new_memmap, open_new, replacing  # noqa: E402 (the kit's lock and writers)

EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")
# folders that are never classes nor searched, besides hidden ones (any name starting with '.')
METADATA = ("__MACOSX", "@eaDir", "__pycache__", "$RECYCLE.BIN", "System Volume Information",
            "lost+found")
NOT_READ = "hidden or metadata folder, not read"
KINDS = {stat.S_IFDIR: "a folder", stat.S_IFIFO: "a FIFO", stat.S_IFSOCK: "a socket",
         stat.S_IFCHR: "a device", stat.S_IFBLK: "a device"}
ARRAYS = ["train_x", "train_y", "val_x", "val_y"]


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
        if any(load(path)[0] is not None for path in found):
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
        arr, reason = load(path)
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


def center_crop(image, size):
    # guided-diffusion image_datasets.py center_crop_arr
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
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


def load_image(path, size, mode):
    """Return (uint8 array (S,S,C), None) or (None, reason) for a file PIL cannot read in full."""
    try:
        with open_regular(path) as f, Image.open(f) as image:
            image.load()  # decodes now, so a truncated file raises here
            # a camera's photo as it is shown: its EXIF orientation applied
            arr = center_crop(to_8bit(ImageOps.exif_transpose(image), mode), size)
        return arr.reshape(size, size, -1), None
    except Exception as e:
        return None, f"{type(e).__name__}: {e}"


def write_split(name, split, args, pool, load, skipped_files):
    """Decode the (path, label) pairs in order into out_dir/{name}_x.npy.tmp through a memmap, and
    their labels into {name}_y.npy.tmp; return the number of images kept."""
    tmp_x, tmp_y = [os.path.join(args.out_dir, f"{name}_{k}.npy.tmp") for k in "xy"]
    shape = (args.image_size, args.image_size, args.channels)
    x = new_memmap(tmp_x, np.uint8, (len(split),) + shape)
    y = []
    for i, (arr, reason) in enumerate(pool.imap(load, [p for p, _ in split], chunksize=16)):
        if arr is None:
            skipped_files.append(f"{split[i][0]}\t{reason}")
            continue
        x[len(y)] = arr
        y.append(split[i][1])
        if (i + 1) % 10000 == 0:
            print(f"{name}: {i + 1}/{len(split)} files read")
    x.flush()
    # drop the unused tail: copy into an array of the right length, in chunks
    if len(y) < len(split):
        tmp_kept = os.path.join(args.out_dir, f"{name}_x_kept.npy.tmp")
        kept = new_memmap(tmp_kept, np.uint8, (len(y),) + shape)
        for start in range(0, len(y), 4096):
            end = min(start + 4096, len(y))
            kept[start: end] = x[start: end]
        kept.flush()
        del kept, x  # close both maps before the rename (Windows needs it)
        os.replace(tmp_kept, tmp_x)
    with open_new(tmp_y) as f:
        np.save(f, np.array(y, dtype=np.int64))
    return len(y)


def commit(out_dir, meta):
    """Give the finished {name}.npy.tmp arrays their names, then meta.json. The old meta.json goes
    first: a kill between the renames leaves no dataset (a loader says to re-run the prepare script),
    never a meta.json over a mix of old and new arrays."""
    meta_json = os.path.join(out_dir, "meta.json")
    with open_new(meta_json + ".tmp", "w") as f:
        json.dump(meta, f, indent=2)
    tmps = [os.path.join(out_dir, name + ".npy.tmp") for name in ARRAYS] + [meta_json + ".tmp"]
    for path in tmps:  # on disk before any rename, as a checkpoint is
        fd = os.open(path, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    if os.path.lexists(meta_json):
        os.remove(meta_json)
    for name in ARRAYS:
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
    args = parser.parse_args()
    for flag, folder in [("--src", args.src), ("--val_src", args.val_src)]:
        if folder is not None and not os.path.isdir(folder):
            raise SystemExit(f"error: {flag} {folder} is not a folder; pass a folder of images")
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
    skipped_files, skipped_folders = [], []
    rng = np.random.default_rng(args.seed)
    paths, labels, class_names = list_folder(args.src, load, skipped_files, skipped_folders)
    if not paths:
        found = f" (skipped {len(skipped_folders)} folders, see above)" if skipped_folders else ""
        raise SystemExit(f"error: no readable images ({' '.join(EXTENSIONS)}) in --src {args.src}"
                         f"{found}; pass a folder of images")
    train = [(paths[i], labels[i]) for i in rng.permutation(len(paths))]
    if args.val_src:
        val_paths, val_labels, val_classes = list_folder(args.val_src, load, skipped_files,
                                                         skipped_folders)
        if not val_paths or val_classes != class_names:
            raise SystemExit(f"error: --val_src {args.val_src} has {len(val_paths)} images in classes "
                             f"{val_classes}, --src has classes {class_names}; lay out both folders "
                             f"the same way")
        val = [(val_paths[i], val_labels[i]) for i in rng.permutation(len(val_paths))]
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
    claim_dataset(args.out_dir, [f"{n}.npy" for n in ARRAYS] + ["meta.json", "skipped.txt"])
    # decode into .tmp files beside the old dataset: it stays readable until the new one is complete
    try:
        with multiprocessing.Pool(args.workers) as pool:
            counts = {"train": write_split("train", train, args, pool, load, skipped_files),
                      "val": write_split("val", val, args, pool, load, skipped_files)}
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
        meta = {"image_size": args.image_size, "channels": args.channels,
                "num_classes": len(class_names), "class_names": class_names, "source": source,
                "num_train": counts["train"], "num_val": counts["val"]}
        commit(args.out_dir, meta)
    except OSError as e:
        raise SystemExit(f"error: writing {e.filename or args.out_dir} failed ({e.strerror or e}); "
                         f"make room or pass another --out_dir")
    finally:  # remove what a failure left behind; the old dataset, if any, is as it was
        leftovers = [f"{n}.npy.tmp" for n in ARRAYS + ["train_x_kept", "val_x_kept"]]
        for name in leftovers + ["meta.json.tmp", "skipped.txt.tmp"]:
            path = os.path.join(args.out_dir, name)
            if os.path.lexists(path) and not os.path.isdir(path):  # (a folder is open_new's line)
                os.remove(path)
    s, c = args.image_size, args.channels
    print(f"folder: train ({counts['train']}, {s}, {s}, {c}) val ({counts['val']}, {s}, {s}, {c}) "
          f"uint8, {len(class_names)} classes -> {args.out_dir}")


if __name__ == "__main__":
    main()
