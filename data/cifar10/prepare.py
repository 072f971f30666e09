"""
Prepare CIFAR-10 from the official binary archive: train_x.npy (50000,32,32,3) uint8, train_y.npy, val_x.npy
(10000,32,32,3, the test batch), val_y.npy, meta.json.

    python data/cifar10/prepare.py                                        # downloads cifar-10-binary.tar.gz (162 MB)
    python data/cifar10/prepare.py --archive=/path/to/cifar-10-binary.tar.gz

Other flags: --out_dir=DIR (default: this folder), --no_verify (skip the md5 check of the archive; only for
hand-made archives such as the tests'). The archive is read in place with tarfile; nothing is extracted to disk.
The arrays and meta.json are written whole or not at all (see save_dataset): a failed or killed run
leaves the dataset that was in out_dir before, or none, never a mix.
"""
import argparse
import hashlib
import http.client
import os
import sys
import shutil
import tarfile
import urllib.request
import zlib

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from common import lock_out_dir, replacing  # noqa: E402 (the kit's lock and writers: whole files)
from dataformat import save_dataset  # noqa: E402

URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
MD5 = "c32a1d4ab5d03f1284b67883e8d87530"  # as listed on https://www.cs.toronto.edu/~kriz/cifar.html
FOLDER = "cifar-10-batches-bin"
TRAIN = [f"data_batch_{i}.bin" for i in range(1, 6)]
VAL = ["test_batch.bin"]



def read_archive(archive):
    """Return {file name: bytes} for the batch files and batches.meta.txt inside cifar-10-batches-bin/."""
    wanted = {f"{FOLDER}/{name}": name for name in TRAIN + VAL + ["batches.meta.txt"]}
    files = {}
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar:
                if member.name in wanted and member.isfile():
                    files[wanted[member.name]] = tar.extractfile(member).read()
            # read on to the end of the gzip stream: only there is its CRC checked (damage found)
            while tar.fileobj.read(1 << 20):
                pass
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:  # zlib: a corrupt deflate stream
        raise SystemExit(f"error: cannot read {archive} ({e}); pass a cifar-10-binary.tar.gz that is whole")
    for name in wanted.values():
        if name not in files:
            raise SystemExit(f"error: {archive} has no {FOLDER}/{name}; pass the official cifar-10-binary.tar.gz "
                             f"(the binary version, not the python one)")
    return files


def records(files, names, num_classes):
    """Each record: 1 label byte, then 1024 red, 1024 green, 1024 blue bytes, each plane a row-major 32x32 image."""
    for name in names:
        if len(files[name]) == 0 or len(files[name]) % 3073 != 0:
            raise SystemExit(f"error: {FOLDER}/{name} has {len(files[name])} bytes, not a multiple of 3073 "
                             f"(1 label + 3072 pixels); the archive is damaged, download it again")
    rec = np.frombuffer(b"".join(files[name] for name in names), np.uint8).reshape(-1, 3073)
    y = rec[:, 0].astype(np.int64)
    if y.max() >= num_classes:
        raise SystemExit(f"error: label {y.max()} in {names} but only {num_classes} class names; "
                         f"the archive is damaged, download it again")
    x = np.ascontiguousarray(rec[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    return x, y


parser = argparse.ArgumentParser(description="Prepare CIFAR-10 (binary version) as uint8 .npy arrays.")
parser.add_argument("--archive", default=None, help="path to cifar-10-binary.tar.gz (default: download it)")
parser.add_argument("--out_dir", default=os.path.dirname(os.path.abspath(__file__)))
parser.add_argument("--no_verify", action="store_true", help="skip the md5 check of the archive")
args = parser.parse_args()
try:
    os.makedirs(args.out_dir, exist_ok=True)
except OSError as e:
    raise SystemExit(f"error: cannot make --out_dir {args.out_dir} ({e.strerror}); pass a path "
                     f"that is not a file nor under one")
lock_out_dir(args.out_dir)  # one writer at a time, as for a run's out_dir

archive = args.archive
if archive is None:
    archive = os.path.join(args.out_dir, "cifar-10-binary.tar.gz")
    if not os.path.exists(archive):
        print(f"downloading {URL} (162 MB) into {args.out_dir}")
        try:
            with urllib.request.urlopen(URL, timeout=60) as r, replacing(archive) as f:
                shutil.copyfileobj(r, f)
        except (OSError, http.client.HTTPException) as e:
            raise SystemExit(f"error: could not download {URL} ({e}); download it elsewhere and pass --archive=PATH")
elif not os.path.lexists(archive):
    raise SystemExit(f"error: --archive {archive} does not exist; pass the path to cifar-10-binary.tar.gz")
# a folder, a FIFO or a broken link is refused before any open (a FIFO would block it)
if not os.path.isfile(archive):
    raise SystemExit(f"error: {archive} is not a regular file; "
                     f"pass the path to cifar-10-binary.tar.gz")
if not args.no_verify:
    with open(archive, "rb") as f:
        got = hashlib.file_digest(f, "md5").hexdigest()
    if got != MD5:
        raise SystemExit(f"error: md5 of {archive} is {got}, expected {MD5}; delete it and download it again "
                         f"(or pass --no_verify for an archive you made yourself)")

files = read_archive(archive)
try:
    lines = files["batches.meta.txt"].decode().splitlines()
except UnicodeDecodeError as e:
    raise SystemExit(f"error: {FOLDER}/batches.meta.txt in {archive} is not text ({e}); "
                     f"the archive is damaged, download it again")
class_names = [line.strip() for line in lines if line.strip()]
train_x, train_y = records(files, TRAIN, len(class_names))
val_x, val_y = records(files, VAL, len(class_names))
checked = "md5 NOT verified (--no_verify)" if args.no_verify else "md5 verified"
meta = {"prepared_by": "data/cifar10/prepare.py",
        "image_size": 32, "channels": 3, "num_classes": len(class_names), "class_names": class_names,
        "source": f"CIFAR-10 binary archive {os.path.abspath(archive)} ({checked})",
        "num_train": len(train_x), "num_val": len(val_x)}
arrays = {"train_x": train_x, "train_y": train_y, "val_x": val_x, "val_y": val_y}
save_dataset(args.out_dir, arrays, meta)
print(f"cifar10: train {train_x.shape} val {val_x.shape} uint8, {len(class_names)} classes -> {args.out_dir}")
