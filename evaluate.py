"""
The ADM evaluation suite's five numbers for a .npz of samples, in PyTorch: FID, sFID, Inception Score,
precision and recall, as openai/guided-diffusion's evaluations/evaluator.py defines them, against a
reference batch (ADM's, e.g. VIRTUAL_imagenet256_labeled.npz) or a prepared dataset of the kit.

    python evaluate.py --samples=out-dit/samples.npz --ref=VIRTUAL_imagenet256_labeled.npz \
        --inception=pt_inception-2015-12-05-6726825d.pth
    python evaluate.py --samples=out-mnist-dit/samples.npz --ref=data/mnist --inception=...

The network is TensorFlow's 2015 Inception-v3 graph, the one TTUR's FID and the ADM suite run, ported
to PyTorch (model.InceptionV3, TensorFlow 1's bilinear resize included) and read from a local weights
file (pretrained.inception; nothing is downloaded). Its features: pool_3 (2048) for FID, precision and
recall; the first 7 channels of mixed_6/conv (7 x 17 x 17) for sFID; pool_3 times the classifier's
weights, without its bias, for the Inception Score. The suite's definitions:
- FID and sFID: |mu_1 - mu_2|^2 + tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2)), statistics in float64 (np.cov);
  the trace of the root from symmetric eigendecompositions, which stays right for singular and
  ill-conditioned covariances (frechet_distance).
- Inception Score: exp(E_x KL(p(y|x) || p(y))) over splits of 5,000 samples (10 for 50,000), averaged.
- Precision and recall (Kynkaanniemi et al. 2019): each image's radius is the distance to its 3rd
  nearest neighbour in its own set; precision is the share of samples inside some reference image's
  ball, recall the share of reference images inside some sample's ball. The distances are float16
  where they fit, as the suite's: in float32 the recall of the same features can differ by 0.007.
The reference's statistics are read from its .npz when it holds them (mu, sigma, mu_s, sigma_s), as the
suite does; its images give the precision/recall features either way. --ref=data/<name> computes the
statistics of a prepared dataset's train images once, cached beside them under the weights file's hash.
The protocol (model, step, sampler, steps, guidance, ...) is read from samples.json beside the samples,
printed, and kept with the numbers in one JSON line appended to evaluations.jsonl beside the samples.
"""
import contextlib
import hashlib
import json
import os
import zipfile

import common  # (first: from here on a Ctrl-C is one line, not a traceback)
import numpy as np
import torch
import torch.distributed as dist

import dataformat
from pretrained import inception as load_inception

# -----------------------------------------------------------------------------
samples = ''  # a .npz of uint8 images (N, H, W, C), arr_0, as sample.py and the ADM suite write
ref = ''  # the reference: an ADM reference batch .npz, or a prepared dataset (data/<name> or its name)
inception = ''  # the FID Inception weights (docs/guide.md, 'Evaluation protocol'): a local file
ref_images = 50000  # a prepared dataset's train images in its statistics (the first ones: a random subset)
batch_size = 100
device = 'cuda' if torch.cuda.is_available() else 'cpu'
# -----------------------------------------------------------------------------

def image_batches(images, size):
    """uint8 (N, H, W, C) images, C 1 or 3, as (B, 3, H, W) tensors: grey repeated to RGB."""
    for lo in range(0, len(images), size):
        x = torch.from_numpy(np.array(images[lo:lo + size])).permute(0, 3, 1, 2)  # (a copy: memmaps are read-only)
        yield x.expand(-1, 3, -1, -1)

@contextlib.contextmanager
def full_float32():
    """TF32 off on GPUs while the network runs (cuDNN's default TF32 convolutions move the features
    by 1e-3), then the flags as they were (so compiled train steps see the state they were built in)."""
    flags = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = flags

@torch.no_grad()
def inception_features(net, images, batch_size, device):
    """(pool (N, 2048), spatial (N, 2023), logits (N, 1008)) float32 numpy arrays of uint8 images, in
    full float32 on a GPU too."""
    out = [[], [], []]
    with full_float32():
        for x in image_batches(images, batch_size):
            for parts, feats in zip(out, net(x.to(device))):
                parts.append(feats.float().cpu())
    return tuple(torch.cat(parts).numpy() for parts in out)

def statistics(features):
    """The mean and covariance (np.cov: unbiased) of features (N, D), in float64."""
    features = np.asarray(features, dtype=np.float64)
    return features.mean(0), np.cov(features, rowvar=False)

def frechet_distance(mu1, sigma1, mu2, sigma2):
    """|mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^(1/2)) in float64. With
    sigma1 = R R^T from its eigendecomposition, sigma1 sigma2 has the nonzero eigenvalues of
    R^T sigma2 R: symmetric, positive semi-definite, its eigenvalues found by eigh even when sigma1
    or sigma2 is singular (fewer images than dimensions), where scipy's sqrtm of the product can
    fail or return a complex or wrong root (LightningDiT#97's FID of 20.65 for 5.14). R keeps the
    eigenvalues above sigma1's largest x D x float64's epsilon, the rest being rounding (most of
    them with fewer images than dimensions: then R^T sigma2 R is as small as the image count)."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    w, v = np.linalg.eigh(sigma1)
    keep = w > w.max() * len(w) * np.finfo(np.float64).eps
    root = v[:, keep] * np.sqrt(w[keep])
    inner = root.T @ sigma2 @ root
    tr_covmean = np.sqrt(np.linalg.eigvalsh((inner + inner.T) / 2).clip(min=0)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)

def inception_score(logits, split_size=5000):
    """The mean over splits of split_size of exp(mean over x of KL(p(y|x) || p(y))), p(y) the split's
    mean prediction, p(y|x) the softmax of the logits (in float64)."""
    logits = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    scores = []
    for part in logits.split(split_size):
        log_p = part.log_softmax(1)
        log_marginal = log_p.exp().mean(0).log()
        scores.append((log_p.exp() * (log_p - log_marginal)).sum(1).mean().exp().item())
    return float(np.mean(scores))

def squared_distances(a, b):
    """Pairwise squared Euclidean distances (len(a), len(b)) as the suite computes them: in float16
    (|a|^2 - 2 a.b + |b|^2, clamped at 0), in float32 where float16 overflows; returned as float32."""
    def pairwise(a, b):
        return ((a * a).sum(1)[:, None] - 2 * a @ b.T + (b * b).sum(1)[None]).clamp(min=0)
    d = pairwise(a.half(), b.half())
    return (d if d.isfinite().all() else pairwise(a.float(), b.float())).float()

def manifold_radii(features, k=3, block=4096):
    """Each feature's squared distance to its k-th nearest neighbour in the set (itself excluded)."""
    radii = []
    for lo in range(0, len(features), block):
        d = squared_distances(features[lo:lo + block], features)
        radii.append(d.kthvalue(k + 1, dim=1).values)  # (the smallest is its own, 0)
    return torch.cat(radii)

def precision_recall(ref_features, sample_features, k=3, device='cpu', block=4096):
    """(precision, recall) of the samples against the reference, by k-nearest-neighbour balls."""
    ref_f, sam_f = (torch.as_tensor(np.asarray(f), dtype=torch.float32, device=device)
                    for f in (ref_features, sample_features))
    ref_r, sam_r = manifold_radii(ref_f, k, block), manifold_radii(sam_f, k, block)
    def covered(points, centres, radii):  # the share of points inside some centre's ball
        inside = torch.zeros(len(points), dtype=torch.bool, device=points.device)
        for lo in range(0, len(points), block):
            inside[lo:lo + block] = (squared_distances(points[lo:lo + block], centres) <= radii).any(1)
        return inside.float().mean().item()
    return covered(sam_f, ref_f, ref_r), covered(ref_f, sam_f, sam_r)

def protocol_of(record):
    """What an FID needs reported, from sample.py's samples.json: the model and step, the sampler, its
    steps, the guidance (scale, channels, interval), the precision, the images and their classes."""
    config, ckpt = record.get('config', {}), record.get('checkpoint', {})
    keys = ('sampler', 'steps', 'eta', 'cfg_scale', 'cfg_channels', 'cfg_sigma_min', 'cfg_sigma_max', 'sigmas',
            'use_ema', 'ema_std', 'dtype', 'num_samples', 'seed')
    return dict(model=ckpt.get('path'), step=ckpt.get('step'), **{k: config.get(k) for k in keys},
                labels=record.get('labels'), diffusion=record.get('diffusion'), decoder=record.get('decoder'))

def file_hash(path):
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            digest.update(chunk)
    return digest.hexdigest()[:16]

def check_images(images, what, fix):
    """Stops in one line unless images are uint8 (N, H, W, 1 or 3) with N >= 4 (precision and recall
    look at each image's 3 nearest neighbours)."""
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise SystemExit(f"error: {what} is {images.dtype} {images.shape}, not uint8 images (N, H, W, 1 or 3) "
                         f"in 0..255; {fix}")
    if len(images) < 4:
        raise SystemExit(f"error: {what} holds {len(images)} images; precision and recall need at least 4 "
                         f"(FID needs thousands to mean anything: 50,000 is the standard); {fix}")

def npz_array(path, key):
    """The array key of the .npz at path: memory-mapped where it is stored uncompressed (np.savez, as
    sample.py and the ADM suite write them), so that 50,000 images of 512 x 512 (39 GB) are read
    batch by batch; read whole where it is compressed."""
    with zipfile.ZipFile(path) as z:
        info = z.getinfo(key + '.npy')
        if info.compress_type != zipfile.ZIP_STORED:
            with z.open(info) as f:
                return np.lib.format.read_array(f)
    with open(path, 'rb') as f:  # the member's data follow its local header (30 bytes, name, extra)
        f.seek(info.header_offset)
        local = f.read(30)
        f.seek(info.header_offset + 30 + int.from_bytes(local[26:28], 'little') + int.from_bytes(local[28:30], 'little'))
        version = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(f)
        if dtype.hasobject:
            raise ValueError(f"{key} holds Python objects")
        return np.memmap(path, dtype, 'r', offset=f.tell(), shape=shape, order='F' if fortran else 'C')

def read_npz(path, what, fix):
    """{key: array} of the .npz at path (npz_array's), or one line."""
    try:
        with zipfile.ZipFile(path) as z:
            keys = [name[:-4] for name in z.namelist() if name.endswith('.npy')]
        return {k: npz_array(path, k) for k in keys}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise SystemExit(f"error: cannot read {what} {path} ({str(e).splitlines()[0][:200]}); {fix}")

def load_network(path, key, device):
    """The Inception network from the weights file at path (key: the setting that names it), or one line."""
    if not os.path.isfile(path):
        raise SystemExit(f"error: {key}='{path}' is not a file; download the FID Inception weights "
                         f"(docs/guide.md, 'Evaluation protocol') and pass their path")
    try:
        with torch.random.fork_rng(devices=[]):  # (its init draws nothing from the RNG a resumed run restored)
            return load_inception(path).to(device)
    except ValueError as e:
        raise SystemExit(f"error: {e}; {key} must be the FID Inception weights (docs/guide.md, 'Evaluation protocol')")

def reference(ref, size, net, weights, batch_size, device, ref_images):
    """The reference's {'pool': features for precision and recall, 'mu', 'sigma', 'mu_s', 'sigma_s'}:
    from an ADM reference batch (its statistics when it holds them), or from a prepared dataset's train
    images, cached beside them by the hashes of the weights file and of those images (a dataset prepared
    again is another cache). Its images must be size x size (first, before any network runs)."""
    fix = "pass an ADM reference batch (.npz) or a prepared dataset (data/<name>)"
    if ref.endswith('.npz'):
        npz = read_npz(ref, 'the reference', fix)
        if 'arr_0' not in npz:
            raise SystemExit(f"error: {ref} holds no arr_0 (its images); {fix}")
        images, cache = npz['arr_0'], None
        check_images(images, ref, fix)
    else:
        dataset = os.path.abspath(ref) if os.path.isdir(ref) else ref  # (a path, or a name under data/)
        data_dir, meta, data = dataformat.load_dataset(dataset, splits=('train',), script='evaluate.py')
        images = data['train'][0][:ref_images]
        check_images(images, f"{data_dir}/train_x.npy", fix)
        cache = os.path.join(data_dir, f'fid_ref_{len(images)}_{weights}_{common.images_hash(images)}.npz')
    if images.shape[1:3] != (size, size):
        raise SystemExit(f"error: the samples are {size} x {size}, the reference {ref} "
                         f"{images.shape[1]} x {images.shape[2]}; FID compares images of one resolution: pass a "
                         f"reference of the samples' size")
    if cache and os.path.exists(cache):
        return read_npz(cache, 'the cached reference statistics', f"remove {cache}")
    pool, spatial, _ = inception_features(net, images, batch_size, device)
    stats = dict(zip(('mu', 'sigma'), statistics(pool)), **dict(zip(('mu_s', 'sigma_s'), statistics(spatial))))
    if cache is None:
        stats.update({k: npz[k] for k in ('mu', 'sigma', 'mu_s', 'sigma_s') if k in npz})  # the suite's
        return dict(stats, pool=pool)
    stats['pool'] = pool[:10000]  # (the suite's reference batches hold 10,000 images)
    common.write_file(cache, lambda f: np.savez(f, **stats))
    print(f"cached the reference statistics of {len(images)} images in {cache}")
    return stats

def training_setup(inception_path, ref, size, device, run):
    """FID during training's network (every rank's) and reference statistics (rank 0's, None on the
    others) for size x size images."""
    net = load_network(inception_path, 'fid_inception', device)
    stats = reference(ref, size, net, file_hash(inception_path), 100, device, 50000) if run.master else None
    return net, stats

@torch.no_grad()
def training_fid(generate, num_images, batch, net, ref_stats, run):
    """FID during training: the FID of num_images generated images against ref_stats on rank 0 (None
    on the others). generate(lo, n) returns images lo .. lo + n - 1 in [-1, 1], (n, C, H, W), each
    drawn from its own index's noise and label; rank r generates every world_size-th batch. The
    images are rounded to uint8 values, as a saved PNG holds them, and rank 0 gathers the pool
    features."""
    feats = []
    for lo in range(run.rank * batch, num_images, run.world_size * batch):
        x = generate(lo, min(batch, num_images - lo))
        images = ((x.float() + 1) * 127.5).round().clamp(0, 255).expand(-1, 3, -1, -1)
        with full_float32():
            feats.append(net(images)[0].float().cpu())
    feats = torch.cat(feats) if feats else torch.zeros(0, 2048)
    if run.ddp:
        gathered = [None] * run.world_size
        dist.all_gather_object(gathered, feats)
        feats = torch.cat(gathered)
    if not run.master:
        return None
    mu, sigma = statistics(feats.numpy())
    return frechet_distance(mu, sigma, ref_stats['mu'], ref_stats['sigma'])

if __name__ == '__main__':  # the command; the functions above serve FID during training too
    config_keys = ['samples', 'ref', 'inception', 'ref_images', 'batch_size', 'device']
    exec(open(os.path.join(os.path.dirname(common.__file__), 'configurator.py')).read())  # (the kit's)
    config = {k: globals()[k] for k in config_keys}
    common.check_config(config, counts=['ref_images', 'batch_size'],
                    rules=[(k, bool(config[k]), f"set: --{k}=<path>") for k in ('samples', 'ref', 'inception')])
    common.check_device(device)
    fix = "pass a .npz that sample.py wrote (--save_npz=True)"
    images = read_npz(samples, 'the samples', fix).get('arr_0')
    if images is None:
        raise SystemExit(f"error: {samples} holds no arr_0 (the images); {fix}")
    check_images(images, samples, fix)
    net = load_network(inception, '--inception', device)
    weights = file_hash(inception)
    if images.shape[1] != images.shape[2]:
        raise SystemExit(f"error: the samples are {images.shape[1]} x {images.shape[2]}; {fix}")
    ref_stats = reference(ref, images.shape[1], net, weights, batch_size, device, ref_images)
    protocol_path, protocol = os.path.join(os.path.dirname(samples), 'samples.json'), {}
    if os.path.exists(protocol_path):  # the settings sample.py wrote beside these images, and only these
        try:
            with open(protocol_path) as f:
                record = json.load(f)
        except (OSError, ValueError) as e:
            raise SystemExit(f"error: cannot read {protocol_path} ({getattr(e, 'strerror', None) or e}); move it "
                             f"away (the numbers are then reported without sampling settings) or write it again "
                             f"with sample.py")
        if isinstance(record, dict) and record.get('images_sha256') == common.images_hash(images):
            protocol = protocol_of(record)
        else:
            print(f"{protocol_path} describes other images than {samples} (its images_sha256 differs): not used")
    pool, spatial, logits = inception_features(net, images, batch_size, device)
    mu, sigma = statistics(pool)
    mu_s, sigma_s = statistics(spatial)
    precision, recall = precision_recall(ref_stats['pool'], pool, device=device)
    result = dict(fid=frechet_distance(mu, sigma, ref_stats['mu'], ref_stats['sigma']),
                  sfid=frechet_distance(mu_s, sigma_s, ref_stats['mu_s'], ref_stats['sigma_s']),
                  inception_score=inception_score(logits), precision=precision, recall=recall,
                  num_images=len(images))
    for k, v in result.items():
        print(f"{k:>16}: {v:.4f}" if isinstance(v, float) else f"{k:>16}: {v}")
    if protocol:
        print(f"protocol ({protocol_path}): " + ", ".join(f"{k} {v}" for k, v in protocol.items()))
    else:
        print(f"no samples.json of these images beside {samples}: report the sampling settings with these numbers")
    line = dict(result, samples=os.path.abspath(samples), ref=os.path.abspath(ref), inception=weights,
                protocol=protocol)
    log = os.path.join(os.path.dirname(samples) or '.', 'evaluations.jsonl')  # (one line more, written whole)
    earlier = open(log).read() if os.path.isfile(log) else ''
    common.write_file(log, lambda f: f.write(earlier + ('\n' if earlier and not earlier.endswith('\n') else '')
                                             + json.dumps(line) + '\n'), 'w')
