"""
What every script of the kit shares, written once: errors as one line (the excepthook, installed
at import), the config and device checks, the seeded generators, files written whole or not at all
(atomic writers, owned folders, the lock on a folder), the checkpoint format (checksummed, safe
loads) and the sample grids.

Each function takes what it needs as arguments and reads no script's globals; every error is one
line that names the value and the fix (a SystemExit, so no traceback reaches the user).
"""
import atexit
import contextlib
import fcntl
import hashlib
import os
import pickle
import re
import shutil
import socket
import sys
import tempfile
import time
import zlib


def excepthook(kind, error, tb):
    """sys.excepthook from the kit's first import on (the scripts import it before torch): a Ctrl-C
    before a run's own handlers take it, or in a script without them, is one line; so is memory
    the run asked for and could not have (a batch or a count too large for this machine). Every
    other exception keeps its traceback (that is a bug)."""
    text = str(error)
    if issubclass(kind, KeyboardInterrupt):
        print("\nerror: interrupted (Ctrl-C); the kit writes every file whole or not at all, so "
              "none is left half-written", file=sys.stderr)
        sys.exit(130)
    if issubclass(kind, MemoryError) or 'out of memory' in text or "can't allocate memory" in text:
        why = text.splitlines()[0][:160] if text else kind.__name__
        print(f"error: out of memory ({why}); lower batch_size (or grad_accum it), the model's "
              f"size or the count that asked for it", file=sys.stderr)
        sys.exit(1)
    sys.__excepthook__(kind, error, tb)


sys.excepthook = excepthook


import numpy as np  # noqa: E402 (after the hook: a Ctrl-C while torch loads is one line too)
import torch  # noqa: E402
from PIL import Image  # noqa: E402


# -----------------------------------------------------------------------------
# config values


# the keys that several scripts share, checked the same way wherever a script has them:
# (ok(value, config), rule)
COMMON_RULES = {
    'lr': (lambda v, c: v > 0, 'positive'),
    'min_lr': (lambda v, c: 0 <= v <= c['lr'] or c.get('lr_schedule') == 'constant',
               'in [0, lr] (the cosine decays from lr to min_lr)'),
    'warmup_steps': (lambda v, c: v >= 0, 'at least 0'),
    'lr_decay_steps': (lambda v, c: v >= 0, 'at least 0 (0 = max_steps)'),
    'weight_decay': (lambda v, c: v >= 0, 'at least 0'),
    'beta1': (lambda v, c: 0 <= v < 1, 'in [0, 1)'),
    'beta2': (lambda v, c: 0 <= v < 1, 'in [0, 1)'),
    'grad_clip': (lambda v, c: v >= 0, 'at least 0 (0 = no clipping)'),
    'ema_decay': (lambda v, c: 0 <= v < 1, 'in [0, 1)'),
    'keep_last': (lambda v, c: v >= 0, 'at least 0'),
    'max_minutes': (lambda v, c: v >= 0, 'at least 0 (0 = no limit)'),
    'seed': (lambda v, c: 0 <= v < 2**31, 'in [0, 2^31)'),
    'peak_tflops': (lambda v, c: v >= 0, 'at least 0 (0 = the known GPUs\' peak)'),
    'cfg_scale': (lambda v, c: v >= 0, 'at least 0 (1 = no guidance)'),
    'out_dir': (lambda v, c: v.strip() != '' and not v.startswith('~'),
                'a folder (a path starting with ~ is not expanded here: pass it unquoted, or in full)'),
    'dataset': (lambda v, c: v.strip() != '', 'a prepared dataset, like mnist'),
    'fid_interval': (lambda v, c: v >= 0, 'at least 0 (0 = no FID during training)'),
    'fid_images': (lambda v, c: v >= 2, 'at least 2 (a covariance; 10,000 or more to mean something)'),
    'fid_inception': (lambda v, c: not c['fid_interval'] or os.path.isfile(v),
                      "a file with fid_interval on: the FID Inception weights (docs/guide.md, 'Evaluation protocol')"),
}


FID_KEYS = ('fid_images', 'fid_ref', 'fid_inception')  # (apply with fid_interval on)


def check_config(config, choices=(), counts=(), rules=()):
    """Stops at the first bad value: choices are (key, allowed values), counts keys that must be at
    least 1, and rules (key, ok, what it must be); then the COMMON_RULES of the keys the script has."""
    rules = [*rules, *[(k, ok(config[k], config), rule)
                       for k, (ok, rule) in COMMON_RULES.items() if k in config]]
    for key, allowed in choices:
        if config[key] not in allowed:
            raise SystemExit(f"error: {key}={config[key]!r} is not one of "
                             f"{', '.join(map(str, allowed))}")
    for key in counts:
        if config[key] < 1:
            raise SystemExit(f"error: {key}={config[key]} must be at least 1")
    for key, ok, rule in rules:
        if not ok:
            raise SystemExit(f"error: {key}={config[key]!r} must be {rule}")


def check_applied(overridden, config, ignored):
    """Stops at the first key the command line set to other than its default (the configurator's
    overridden) that this run would not apply: ignored maps a key to why not (falsy: it applies),
    for the alternatives a choice leaves idle (a key of another schedule, weighting, sampler or
    mode); the keys the scripts share are judged here. (A component switched off, disc_weight=0
    say, leaves its keys as set: a config file's settings stay while one flag turns it off.)"""
    constant = config.get('lr_schedule') == 'constant' and "lr_schedule='constant' (no cosine)"
    no_fid = not config.get('fid_interval') and "fid_interval=0 (no FID during training)"
    ignored = {'min_lr': constant, 'lr_decay_steps': constant, **{k: no_fid for k in FID_KEYS}, **ignored}
    for key in overridden:
        if ignored.get(key):
            raise SystemExit(f"error: {key} is set, but {ignored[key]}, so it would do nothing; "
                             f"drop --{key}")


def check_device(device):
    """'cuda' or 'cpu', the device's type; one line for a device that is not one or not here, and
    for a launch that sets RANK without the other variables torchrun sets with it."""
    unset = [k for k in ('LOCAL_RANK', 'WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT')
             if 'RANK' in os.environ and k not in os.environ]
    if unset:
        raise SystemExit(f"error: RANK={os.environ['RANK']} is set but not {', '.join(unset)}: launch "
                         f"with torchrun, or unset RANK")
    try:
        torch.device(device)
    except RuntimeError:
        raise SystemExit(f"error: device={device!r} is not a device; "
                         f"pass cpu, cuda or cuda:<index>")
    if device.startswith('cuda') and not torch.cuda.is_available():
        raise SystemExit(f"error: device='{device}' but CUDA is not available here; "
                         f"pass --device=cpu")
    return 'cuda' if device.startswith('cuda') else 'cpu'


def seeded(seed, step, stream, device='cpu'):
    """A generator seeded by (seed, step, stream): the same on every rank, and the same again
    after a resume."""
    state = np.random.SeedSequence([seed, step, stream]).generate_state(1)[0]
    return torch.Generator(device).manual_seed(int(state))


# -----------------------------------------------------------------------------
# checkpoints: the format every script reads and writes


# the kit's kinds of checkpoint and the scripts that write them (a checkpoint also names its script,
# so a fork's kind needs no entry here); the format of what Run.save writes
KINDS = {'diffusion': 'train_diffusion.py', 'consistency': 'distill_consistency.py',
         'meanflow': 'train_meanflow.py', 'gan': 'train_gan.py', 'autoencoder': 'train_ae.py',
         'latent decoder': 'data/prepare_latents.py'}


FORMAT = 1


def images_hash(images):
    """The images' identity: sha256 of their shape and bytes (read in chunks: a memory-mapped array
    stays on disk), 16 hex digits. sample.py records it in samples.json; the reference's cache is
    named by it."""
    digest = hashlib.sha256(str(images.shape).encode())
    rows = max(1, (64 << 20) // max(1, images[:1].nbytes))
    for lo in range(0, len(images), rows):
        digest.update(images[lo:lo + rows].tobytes())
    return digest.hexdigest()[:16]


def checksum(state):
    """CRC-32 of a nested state's keys, plain values and tensor bytes, in order: what torch.load
    does not check."""
    crc = 0

    def walk(v):
        nonlocal crc
        if isinstance(v, torch.Tensor):
            crc = zlib.crc32(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy(), crc)
        elif isinstance(v, dict):
            for k, x in v.items():
                crc = zlib.crc32(repr(k).encode(), crc)
                walk(x)
        elif isinstance(v, (list, tuple)):
            for x in v:
                walk(x)
        else:
            crc = zlib.crc32(repr(v).encode(), crc)
    walk(state)
    return crc


def load_checkpoint(path, fix, device='cpu', kinds=None):
    """A checkpoint as tensors and plain types (weights_only: nothing in the file can run code),
    its checksum verified before any weight is used, and (given kinds) refused when another script
    wrote it."""
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        why = ('it holds objects other than tensors and plain types'
               if isinstance(e, pickle.UnpicklingError)
               else (str(e).split('. ')[0].splitlines() or [f'{type(e).__name__}, an empty file?'])[0][:200])
        raise SystemExit(f"error: cannot load {path} ({why}); {fix}")
    if not isinstance(ckpt, dict):
        raise SystemExit(f"error: {path} holds a {type(ckpt).__name__}, not a checkpoint of this "
                         f"kit; {fix}")
    if ('checksum' in ckpt
            and checksum({k: v for k, v in ckpt.items() if k != 'checksum'}) != ckpt['checksum']):
        raise SystemExit(f"error: {path} is corrupt: its contents do not match the checksum "
                         f"written with them; {fix}")
    kind = ckpt.get('kind')
    if kinds and kind not in kinds:
        writer = ckpt.get('script') or KINDS.get(kind)
        what = (f"{'an' if kind[0] in 'aeiou' else 'a'} {kind} checkpoint, "
                f"which {writer} writes" if writer
                else "not a checkpoint of this kit's scripts (it records no kind)")
        wanted = ' or '.join(f"{'an' if k[0] in 'aeiou' else 'a'} {k} checkpoint"
                             + (f" ({KINDS[k]})" if k in KINDS else '') for k in kinds)
        raise SystemExit(f"error: {path} is {what}; this needs {wanted}")
    if ckpt.get('format', FORMAT) > FORMAT:
        raise SystemExit(f"error: {path} has format {ckpt['format']}, newer than this kit's "
                         f"{FORMAT}; update the kit")
    return ckpt


def load_state(net, state, path, key):
    """net.load_state_dict(state), with a mismatch as one line."""
    try:
        net.load_state_dict(state)
    except (RuntimeError, ValueError, KeyError) as e:
        raise SystemExit(f"error: {path}'s {key} does not fit this run "
                         f"({str(e).splitlines()[-1].strip()[:200]}); "
                         f"resume with the config it was trained with, or choose another out_dir")


# -----------------------------------------------------------------------------
# files written whole, the folders the kit owns, the lock on a folder


def open_new(path, mode='wb'):
    """path opened for writing as a new file. What is there already, a file or a link, is removed
    first, never written through (a planted link's target stays as it was); a folder there is one
    line."""
    if os.path.isdir(path) and not os.path.islink(path):
        raise SystemExit(f"error: {path} is a folder where this kit writes a file; it is left as it "
                         f"is: move it away and re-run the same command")
    if os.path.lexists(path):
        os.unlink(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    return os.fdopen(fd, mode, **({} if 'b' in mode else {'newline': ''}))


@contextlib.contextmanager
def replacing(path, mode='wb'):
    """A new file to fill in a with block (path + '.tmp', made by open_new), on disk and renamed
    over path when the block ends, removed when it fails (an error, a Ctrl-C): path is the old file
    or the new one at every moment, and nothing half-written is left. (Not fsynced: a checkpoint's
    writer does that itself; 50,000 sample PNGs need not wait for the disk each.)"""
    tmp = path + '.tmp'
    f = open_new(tmp, mode)
    try:
        with f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def write_file(path, write, mode='wb'):
    """Writes a file whole or not at all: write(f) fills a temporary file, renamed over path at the
    end; a full disk or an unwritable folder is one line, and no half-written file is left."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        with replacing(path, mode) as f:
            write(f)
    except (OSError, RuntimeError) as e:  # (a full disk surfaces from torch.save as a RuntimeError)
        why = e.strerror if isinstance(e, OSError) else 'the write failed'
        free = shutil.disk_usage(folder).free / 2**30 if os.path.isdir(folder) else 0.0
        raise SystemExit(f"error: writing {path} failed ({why}; {free:.1f} GiB free); make "
                         f"room (or pass a folder you can write to) and re-run the same command")


def new_memmap(path, dtype, shape):
    """A new .npy file at path (made by open_new) mapped for writing, its space taken on disk now: a
    full disk is one line here, not a SIGBUS at some later write into the map."""
    try:
        open_new(path).close()
        array = np.lib.format.open_memmap(path, mode='w+', dtype=dtype, shape=tuple(shape))
        if hasattr(os, 'posix_fallocate'):  # (Linux; elsewhere the map's pages come as written)
            with open(path, 'r+b') as f:
                os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)
        return array
    except OSError as e:
        with contextlib.suppress(OSError):
            os.remove(path)
        folder = os.path.dirname(os.path.abspath(path))
        raise SystemExit(f"error: writing {path} failed ({e.strerror}; "
                         f"{shutil.disk_usage(folder).free / 2**30:.1f} GiB free); make room (or "
                         f"pass a folder you can write to) and re-run the same command")


def own_folder(path):
    """path as a folder the kit writes files into (phema/, samples/): made if need be; a link there
    (the files would land in its target) or a file is one line, and left as it is."""
    if os.path.islink(path) or os.path.lexists(path) and not os.path.isdir(path):
        raise SystemExit(f"error: {path} is a {'link' if os.path.islink(path) else 'file'} where "
                         f"this kit makes a folder; it is left as it is: move it away and re-run "
                         f"the same command")
    os.makedirs(path, exist_ok=True)
    return path


def replace_folder(new, path):
    """The folder new in place of the folder path (made if absent), swapped in whole: never the old
    one's files mixed with the new. A link or a file at path is one line, and left as it is."""
    own_folder(path)  # (checks what is there)
    old = f'{path}.old-{os.getpid()}'
    os.rename(path, old)
    os.rename(new, path)
    shutil.rmtree(old)


def make_folder(path, marker):
    """A new folder at path with the empty file marker in it: what remove_made may remove later."""
    os.makedirs(path)
    open_new(os.path.join(path, marker)).close()


def remove_made(path, marker):
    """Removes the folder path if this kit made it (make_folder's marker is in it), never following
    a link; anything else there stops the run with one line and is left as it is."""
    if not os.path.lexists(path):
        return
    if (os.path.islink(path) or not os.path.isdir(path)
            or not os.path.isfile(os.path.join(path, marker))):
        raise SystemExit(f"error: {path} is not a folder this kit made (no {marker} in it), so it is "
                         f"not removed; move it away, or pass another folder")
    shutil.rmtree(path)


def check_writable(out_dir):
    """Makes out_dir if need be, and stops now when nothing can be written there (a run, or
    sample.py, finds out before its work rather than at its first file)."""
    try:
        os.makedirs(out_dir, exist_ok=True)
        tempfile.TemporaryFile(dir=out_dir).close()
    except OSError as e:
        raise SystemExit(f"error: cannot write to out_dir='{out_dir}' ({e.strerror}); "
                         f"pass an --out_dir you can write to")


_LOCKS = {}  # out_dir (real path) -> the open lock file this process holds


LOCK_TEXT = re.compile(r'pid \d+ on .+ since [\d: -]+')  # what a lock says of its holder


def lock_out_dir(out_dir, path=None, flag='out_dir'):
    """Takes out_dir/run.lock (or the lock file path, for a folder that is replaced whole) for this
    process: an flock, which the kernel drops when the process dies, so a killed run leaves no block
    behind; a second run on the same out_dir (passed as --flag) stops at once, naming the holder."""
    path = path or os.path.join(out_dir, 'run.lock')
    key = os.path.realpath(path)
    if key in _LOCKS:  # this process holds it already (a script run again in-process)
        return
    while True:
        try:  # never through a link: a planted run.lock -> somefile would have it truncated
            f = os.fdopen(os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644), 'r+')
        except OSError as e:
            raise SystemExit(f"error: {path} is not a lock this kit made ({e.strerror}: a link or a "
                             f"folder); it is left as it is: remove it and re-run the same command")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = f.read().strip() or 'another process'
            f.close()
            raise SystemExit(f"error: {flag}='{out_dir}' is in use by {holder}; wait for that run "
                             f"to end (or stop it), or pass another --{flag}")
        if os.path.exists(path) and os.stat(path).st_ino == os.fstat(f.fileno()).st_ino:
            break  # (else the holder removed the file as we opened it: lock the new one)
        f.close()
    f.seek(0)
    held = f.read()
    if held and not LOCK_TEXT.fullmatch(held):  # (empty, or a killed holder's: the kit's own)
        f.close()
        raise SystemExit(f"error: {path} is not a lock this kit made (a file of other text); it is "
                         f"left as it is: move it away and re-run the same command")
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()} "
            f"since {time.strftime('%Y-%m-%d %H:%M:%S')}")
    f.flush()
    _LOCKS[key] = f

    def release():
        if os.path.exists(path) and os.stat(path).st_ino == os.fstat(f.fileno()).st_ino:
            os.remove(path)
        f.close()
    atexit.register(release)


# -----------------------------------------------------------------------------
# sample grids and the optimizer


def save_grid(x, path, ncol=8):
    """Images in [-1, 1], (B, C, H, W), to one PNG grid of ncol columns (the last row padded with
    black)."""
    x = ((x.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).cpu()
    x = torch.cat([x, x.new_zeros((-len(x) % ncol, *x.shape[1:]))])
    B, C, H, W = x.shape
    grid = (x.view(B // ncol, ncol, C, H, W).permute(0, 3, 1, 4, 2)
            .reshape(B // ncol * H, ncol * W, C))
    write_file(path, lambda f: Image.fromarray(grid.squeeze(-1).numpy()).save(f, format='PNG'))


def adamw(params, lr, betas, weight_decay):
    """AdamW with weight decay on the weights of 2 or more dimensions only; fused, so that setting
    optimizer.found_inf skips a non-finite update on the device, with no host sync."""
    params = list(params)
    groups = [{'params': [p for p in params if p.dim() >= 2], 'weight_decay': weight_decay},
              {'params': [p for p in params if p.dim() < 2], 'weight_decay': 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=True)
