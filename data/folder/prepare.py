"""
Prepare any folder of images as uint8 arrays: train_x.npy (N,S,S,C), train_y.npy, val_x.npy, val_y.npy, meta.json.

    python data/folder/prepare.py --src=/data/imagenet/train --out_dir=data/imagenet64 --image_size=64
    python data/folder/prepare.py --src=photos --val_src=photos_val --out_dir=data/photos --channels=1

Each subfolder of --src that holds images is a class (sorted names -> labels 0..K-1, searched recursively); a --src
with no such subfolders is one class, "all". Images are cropped as in guided-diffusion (ADM): halve with a box filter
while the short side is >= 2*image_size, resize the short side to image_size (bicubic), take the centre square.
Other flags: --val_fraction=0.05 (held out of --src when no --val_src), --seed=0, --workers=N (decoding processes).
Unreadable or truncated files are skipped and listed in out_dir/skipped.txt. Arrays are written to disk as they fill,
in a shuffled order (a prefix is a random subset), so ImageNet-sized folders never need to fit in memory.
"""
import argparse
import functools
import json
import multiprocessing
import os

import numpy as np
from PIL import Image

EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")


def find_images(folder):
    return sorted(os.path.join(root, f) for root, _, files in os.walk(folder) for f in files
                  if f.lower().endswith(EXTENSIONS))


def list_folder(src):
    """Return (paths, labels, class_names) for a folder of class subfolders, or of loose images (one class)."""
    subdirs = sorted(d for d in os.listdir(src) if os.path.isdir(os.path.join(src, d)))
    per_class = {d: find_images(os.path.join(src, d)) for d in subdirs}
    class_names = [d for d in subdirs if per_class[d]]
    loose = [os.path.join(src, f) for f in sorted(os.listdir(src)) if f.lower().endswith(EXTENSIONS)]
    if not class_names:
        return loose, [0] * len(loose), ["all"]
    if loose:
        raise SystemExit(f"error: {src} has class subfolders and also loose images (e.g. {loose[0]}); "
                         f"move the loose images into a class subfolder")
    paths = [p for d in class_names for p in per_class[d]]
    labels = [i for i, d in enumerate(class_names) for _ in per_class[d]]
    return paths, labels, class_names


def center_crop(image, size):
    # guided-diffusion image_datasets.py center_crop_arr
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    arr = np.asarray(image)
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[top: top + size, left: left + size]


def load_image(path, size, mode):
    """Return (uint8 array (S,S,C), None) or (None, reason) for a file PIL cannot read in full."""
    try:
        with Image.open(path) as image:
            image.load()  # decodes now, so a truncated file raises here
            arr = center_crop(image.convert(mode), size)
        return arr.reshape(size, size, -1), None
    except Exception as e:
        return None, f"{type(e).__name__}: {e}"


def write_split(name, split, args, pool, skipped):
    """Decode the (path, label) pairs in order into out_dir/{name}_x.npy.tmp through a memmap; return images kept."""
    tmp_x, tmp_y = [os.path.join(args.out_dir, f"{name}_{k}.npy.tmp") for k in "xy"]
    shape = (args.image_size, args.image_size, args.channels)
    x = np.lib.format.open_memmap(tmp_x, mode="w+", dtype=np.uint8, shape=(len(split),) + shape)
    load = functools.partial(load_image, size=args.image_size, mode="L" if args.channels == 1 else "RGB")
    y = []
    for i, (arr, reason) in enumerate(pool.imap(load, [p for p, _ in split], chunksize=16)):
        if arr is None:
            skipped.append(f"{split[i][0]}\t{reason}")
            continue
        x[len(y)] = arr
        y.append(split[i][1])
        if (i + 1) % 10000 == 0:
            print(f"{name}: {i + 1}/{len(split)} files read")
    x.flush()
    if len(y) < len(split):  # drop the unused tail: copy into an array of the right length, in chunks
        tmp_kept = os.path.join(args.out_dir, f"{name}_x_kept.npy.tmp")
        kept = np.lib.format.open_memmap(tmp_kept, mode="w+", dtype=np.uint8, shape=(len(y),) + shape)
        for start in range(0, len(y), 4096):
            end = min(start + 4096, len(y))
            kept[start: end] = x[start: end]
        kept.flush()
        del kept, x  # close both maps before the rename (Windows needs it)
        os.replace(tmp_kept, tmp_x)
    with open(tmp_y, "wb") as f:
        np.save(f, np.array(y, dtype=np.int64))
    return len(y)


def main():  # a function, so that worker processes started by spawn/forkserver do not rerun it
    parser = argparse.ArgumentParser(description="Prepare a folder of images as uint8 .npy arrays.")
    parser.add_argument("--src", required=True, help="folder of images, or of class subfolders of images")
    parser.add_argument("--out_dir", required=True)
    parser.add_argument("--image_size", type=int, default=64)
    parser.add_argument("--val_fraction", type=float, default=None, help="default 0.05; not with --val_src")
    parser.add_argument("--val_src", default=None, help="a second folder laid out like --src, used as the val split")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--channels", type=int, choices=[1, 3], default=3, help="1 converts to grayscale")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="processes that decode images")
    args = parser.parse_args()
    for flag, folder in [("--src", args.src), ("--val_src", args.val_src)]:
        if folder is not None and not os.path.isdir(folder):
            raise SystemExit(f"error: {flag} {folder} is not a folder; pass a folder of images")
    if args.val_src and args.val_fraction is not None:
        raise SystemExit("error: --val_fraction and --val_src both given; pass one of them")
    if args.image_size < 1 or args.workers < 1:
        raise SystemExit(f"error: --image_size {args.image_size} and --workers {args.workers} must be >= 1")

    rng = np.random.default_rng(args.seed)
    paths, labels, class_names = list_folder(args.src)
    if not paths:
        raise SystemExit(f"error: no images ({' '.join(EXTENSIONS)}) in --src {args.src}; pass a folder of images")
    train = [(paths[i], labels[i]) for i in rng.permutation(len(paths))]
    if args.val_src:
        val_paths, val_labels, val_classes = list_folder(args.val_src)
        if not val_paths or val_classes != class_names:
            raise SystemExit(f"error: --val_src {args.val_src} has {len(val_paths)} images in classes {val_classes}, "
                             f"--src has classes {class_names}; lay out both folders the same way")
        val = [(val_paths[i], val_labels[i]) for i in rng.permutation(len(val_paths))]
    else:
        fraction = 0.05 if args.val_fraction is None else args.val_fraction
        if not 0 <= fraction < 1:
            raise SystemExit(f"error: --val_fraction {fraction} is not in [0, 1); pass e.g. --val_fraction=0.05")
        n_val = max(1, round(fraction * len(paths))) if fraction > 0 else 0
        if n_val >= len(paths):
            raise SystemExit(f"error: --val_fraction {fraction} leaves no training images out of {len(paths)}; "
                             f"pass --val_fraction=0 or add images")
        val, train = train[:n_val], train[n_val:]

    os.makedirs(args.out_dir, exist_ok=True)
    skipped = []
    with multiprocessing.Pool(args.workers) as pool:
        counts = {"train": write_split("train", train, args, pool, skipped),
                  "val": write_split("val", val, args, pool, skipped)}
    skipped_txt = os.path.join(args.out_dir, "skipped.txt")
    if skipped:
        with open(skipped_txt + ".tmp", "w") as f:
            f.write("\n".join(skipped) + "\n")
        os.replace(skipped_txt + ".tmp", skipped_txt)
        print(f"skipped {len(skipped)} of {len(train) + len(val)} files (unreadable or truncated); see {skipped_txt}")
    elif os.path.exists(skipped_txt):
        os.remove(skipped_txt)  # a stale list from an earlier run
    for name, split in [("train", train), ("val", val)]:
        if split and counts[name] == 0:
            raise SystemExit(f"error: none of the {len(split)} {name} images could be read; see {skipped_txt}")

    for name in ["train_x", "train_y", "val_x", "val_y"]:  # all arrays are complete: give them their final names
        os.replace(os.path.join(args.out_dir, name + ".npy.tmp"), os.path.join(args.out_dir, name + ".npy"))
    source = f"image folder {os.path.abspath(args.src)}" + (f", val from {os.path.abspath(args.val_src)}"
                                                              if args.val_src else "")
    meta = {"image_size": args.image_size, "channels": args.channels, "num_classes": len(class_names),
            "class_names": class_names, "source": source, "num_train": counts["train"], "num_val": counts["val"]}
    with open(os.path.join(args.out_dir, "meta.json.tmp"), "w") as f:
        json.dump(meta, f, indent=2)
    os.replace(os.path.join(args.out_dir, "meta.json.tmp"), os.path.join(args.out_dir, "meta.json"))
    s, c = args.image_size, args.channels
    print(f"folder: train ({counts['train']}, {s}, {s}, {c}) val ({counts['val']}, {s}, {s}, {c}) uint8, "
          f"{len(class_names)} classes -> {args.out_dir}")


if __name__ == "__main__":
    main()
