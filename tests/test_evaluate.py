"""evaluate.py: the ADM suite's statistics against closed forms, the Inception network's plumbing, the command and
its bad inputs. (The network against torch-fidelity's and the statistics against the suite's own code were measured
outside the repository: see docs/guide.md's evaluation protocol. FID during training is held equal on two ranks and
after a resume in the train scripts' own tests.)"""
import json
import os

import numpy as np
import pytest
import torch

import common
from conftest import MNIST, run
from evaluate import frechet_distance, inception_features, inception_score, precision_recall, statistics
from model import InceptionV3, resize_bilinear_tf1
from pretrained import inception as load_inception


def eig_fid(mu1, s1, mu2, s2):
    """The Frechet distance with tr((S1 S2)^(1/2)) from the eigenvalues of S1 S2 (real and >= 0 for PSD S1, S2)."""
    root_trace = np.sqrt(np.linalg.eigvals(s1 @ s2).real.clip(min=0)).sum()
    return ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * root_trace


def test_frechet_distance_matches_closed_forms_also_for_singular_covariances():
    """Diagonal covariances: |mu1 - mu2|^2 + sum (sqrt(a) - sqrt(b))^2. Full ones, well-conditioned, singular (the
    covariance of fewer points than dimensions, where the product's square root is ill-posed) and with eigenvalues
    from 1e-12 to 1: the eigenvalues of S1 S2. A singular covariance against itself: 0, not a complex number."""
    rng = np.random.default_rng(0)
    a, b, mu1, mu2 = rng.uniform(0.1, 2, 64), rng.uniform(0.1, 2, 64), rng.normal(size=64), rng.normal(size=64)
    want = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(want, rel=1e-12)
    x, y = rng.normal(size=(500, 64)), rng.normal(size=(400, 64)) @ rng.normal(size=(64, 64)) / 8
    s1, s2 = statistics(x)[1], statistics(y)[1]
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(eig_fid(mu1, s1, mu2, s2), rel=1e-10)
    few1, few2 = statistics(rng.normal(size=(20, 64)))[1], statistics(rng.normal(size=(30, 64)) * 2)[1]  # rank 19, 29
    assert frechet_distance(mu1, few1, mu2, few2) == pytest.approx(eig_fid(mu1, few1, mu2, few2), rel=1e-8)
    assert abs(frechet_distance(mu1, few1, mu1, few1)) < 1e-7 * np.trace(few1)  # (sqrt of rounding noise: 4e-8)
    q = np.linalg.qr(rng.normal(size=(64, 64)))[0]
    graded = (q * np.logspace(-12, 0, 64)) @ q.T
    assert frechet_distance(mu1, graded, mu2, s2) == pytest.approx(eig_fid(mu1, graded, mu2, s2), rel=1e-8)


def test_inception_score_matches_closed_forms():
    """Confident, evenly spread predictions over K classes: IS = K; one prediction for all: 1; any logits:
    exp(mean KL(p(y|x) || p(y))) written out; and the mean over splits of 5,000."""
    k = 7
    confident = np.eye(k)[np.arange(70) % k] * 60.0
    assert inception_score(confident) == pytest.approx(k, rel=1e-6)
    assert inception_score(np.tile(np.random.default_rng(0).normal(size=(1, 10)), (50, 1))) == pytest.approx(1)
    logits = np.random.default_rng(1).normal(size=(300, k)) * 2
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    want = np.exp((p * (np.log(p) - np.log(p.mean(0)))).sum(1).mean())
    assert inception_score(logits) == pytest.approx(want, rel=1e-10)
    split = np.tile(confident, (72, 1))[:5000]  # (5,000 of k classes, evenly but for 2: IS slightly below k)
    assert inception_score(np.concatenate([split, logits])) == pytest.approx(
        (inception_score(split) + want) / 2, rel=1e-10)


def test_precision_recall_on_point_sets_with_known_answers():
    """The reference: a 10 x 10 grid of integer points (exact in float16, where the suite computes distances), so
    each point's ball reaches its 3rd neighbour: radius 1, corners sqrt(2). The samples: copies of the left half of
    the grid and 50 points far away. Precision: the copies, 0.5. Recall: the reference points within reach of a copy,
    the left half and the next column, 0.6. The grid shifted by half a step: 1 and 1; far away: 0 and 0."""
    grid = np.stack(np.meshgrid(np.arange(10.0), np.arange(10.0)), -1).reshape(-1, 2)
    far = np.stack([np.arange(100.0, 150.0), np.zeros(50)], 1)
    assert precision_recall(grid, np.concatenate([grid[grid[:, 0] < 5], far])) == pytest.approx((0.5, 0.6))
    assert precision_recall(grid, grid + [0.5, 0]) == pytest.approx((1.0, 1.0))
    assert precision_recall(grid, grid + 500) == (0.0, 0.0)


def test_tf1_resize_and_the_networks_outputs():
    """TensorFlow 1's resize_bilinear (align_corners=False): output pixel i reads input i * in / out, its last
    neighbour repeated at the edge, so 2 -> 4 gives a, (a + b) / 2, b, b; 299 -> 299 is the identity. The network:
    uint8 images of any size in, pool (2048), mixed_6/conv's first 7 channels, channels last (7 x 17 x 17), and
    1008 logits without the bias out; grey images are read as RGB by the command, not here."""
    x = torch.tensor([[1.0, 3.0], [5.0, 7.0]])[None, None]
    assert resize_bilinear_tf1(x, 4)[0, 0].tolist() == [[1, 2, 3, 3], [3, 4, 5, 5], [5, 6, 7, 7], [5, 6, 7, 7]]
    y = torch.rand(1, 3, 299, 299)
    assert torch.equal(resize_bilinear_tf1(y, 299), y)
    torch.manual_seed(0)
    net = InceptionV3()
    torch.nn.init.normal_(net.fc.bias)
    seen = {}
    net.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: seen.update(spatial=o))
    pool, spatial, logits = net(torch.randint(0, 256, (2, 3, 40, 40), dtype=torch.uint8))
    assert pool.shape == (2, 2048) and spatial.shape == (2, 7 * 17 * 17) and logits.shape == (2, 1008)
    assert torch.equal(spatial, seen['spatial'][:, :7].permute(0, 2, 3, 1).flatten(1))
    assert torch.allclose(logits, pool @ net.fc.weight.T)  # (the suite's IS leaves the bias out)


@pytest.mark.slow
def test_the_command_reports_the_five_numbers_with_the_protocol(mnist, weights, tmp_path):
    """16 real training digits as a prepared dataset: their own images score FID and sFID 0, precision and recall 1
    against it, and its statistics are cached beside it under the weights' hash, then read from there. 8 val
    digits with sample.py's samples.json beside them: five finite numbers, printed with the protocol and appended to
    evaluations.jsonl as one JSON line. A samples.json of other images is not reported with them, a dataset
    prepared again is another cache, and a samples.json that cannot be read is one line."""
    data, out = tmp_path / 'data', tmp_path / 'out'
    data.mkdir(), out.mkdir()
    train = np.load(os.path.join(MNIST, 'train_x.npy'))[:16]
    np.save(data / 'train_x.npy', train)
    np.save(data / 'train_y.npy', np.load(os.path.join(MNIST, 'train_y.npy'))[:16])
    (data / 'meta.json').write_text(json.dumps({'image_size': 28, 'channels': 1, 'num_classes': 10}))
    np.savez(out / 'own.npz', arr_0=train)
    args = [f'--ref={data}', f'--inception={weights}', '--batch_size=16']
    p = run('evaluate.py', f'--samples={out / "own.npz"}', *args)
    assert 'cached the reference statistics of 16 images' in p.stdout and len(list(data.glob('fid_ref_16_*.npz'))) == 1
    own = json.loads((out / 'evaluations.jsonl').read_text())
    assert abs(own['fid']) < 1e-3 and abs(own['sfid']) < 1e-3 and own['precision'] == own['recall'] == 1
    val = np.load(os.path.join(MNIST, 'val_x.npy'))[:8]
    np.savez(out / 'samples.npz', arr_0=val)
    record = {'config': {'sampler': 'ddim', 'steps': 25, 'cfg_scale': 4.0}, 'images_sha256': common.images_hash(val),
              'checkpoint': {'path': '/runs/ckpt.pt', 'step': 6000}}
    (out / 'samples.json').write_text(json.dumps(record))
    p = run('evaluate.py', f'--samples={out / "samples.npz"}', *args)
    assert 'cached' not in p.stdout and 'protocol (' in p.stdout and 'sampler ddim, steps 25' in p.stdout
    line = json.loads((out / 'evaluations.jsonl').read_text().splitlines()[-1])
    assert all(np.isfinite(line[k]) for k in ('fid', 'sfid', 'inception_score', 'precision', 'recall'))
    assert line['fid'] > 0 and line['protocol']['step'] == 6000 and line['num_images'] == 8
    # an ADM reference batch (compressed here; sample.py's .npz above are memory-mapped): its statistics are used
    # as given (here the samples' own: FID and sFID 0), its images only for precision and recall (as the dataset's)
    pool, spatial, _ = inception_features(load_inception(str(weights)), np.load(out / 'samples.npz')['arr_0'], 8, 'cpu')
    stats = dict(zip(('mu', 'sigma', 'mu_s', 'sigma_s'), (*statistics(pool), *statistics(spatial))))
    np.savez_compressed(out / 'ref.npz', arr_0=train, **stats)
    run('evaluate.py', f'--samples={out / "samples.npz"}', *args, f'--ref={out / "ref.npz"}')
    adm = json.loads((out / 'evaluations.jsonl').read_text().splitlines()[-1])
    assert abs(adm['fid']) < 1e-3 and abs(adm['sfid']) < 1e-3
    assert (adm['precision'], adm['recall'], adm['inception_score']) == (line['precision'], line['recall'],
                                                                         line['inception_score'])
    # a samples.json of other images (another call's, or copied) is not reported with these numbers; a dataset
    # prepared again (other images) is another cache
    (out / 'samples.json').write_text(json.dumps(dict(record, images_sha256=common.images_hash(val[::-1]))))
    np.save(data / 'train_x.npy', train[::-1])
    p = run('evaluate.py', f'--samples={out / "samples.npz"}', *args)
    assert f"{out / 'samples.json'} describes other images than {out / 'samples.npz'}" in p.stdout
    assert 'protocol (' not in p.stdout and json.loads((out / 'evaluations.jsonl').read_text().splitlines()[-1])[
        'protocol'] == {}
    assert 'cached the reference statistics of 16 images' in p.stdout and len(list(data.glob('fid_ref_16_*.npz'))) == 2
    (out / 'samples.json').write_text('{"config": ')
    p = run('evaluate.py', f'--samples={out / "samples.npz"}', *args, check=False)
    assert p.returncode == 1 and p.stderr.strip().splitlines()[-1].startswith(
        f"error: cannot read {out / 'samples.json'} (")
    assert len((out / 'evaluations.jsonl').read_text().splitlines()) == 4


def test_bad_input_stops_with_one_clear_line(mnist, weights, tmp_path):
    """Samples of the wrong type or count, of another resolution than the reference, or not a .npz, and a missing or
    wrong weights file: one line each, before any image goes through the network."""
    good = tmp_path / 'good.npz'
    np.savez(good, arr_0=np.zeros((8, 28, 28, 1), np.uint8))
    np.savez(tmp_path / 'float.npz', arr_0=np.zeros((8, 28, 28, 3), np.float32))
    np.savez(tmp_path / 'two.npz', arr_0=np.zeros((2, 28, 28, 3), np.uint8))
    np.savez(tmp_path / 'big.npz', arr_0=np.zeros((8, 32, 32, 3), np.uint8))
    torch.save({'x_embedder.proj.weight': torch.zeros(3)}, tmp_path / 'dit.pt')
    (tmp_path / 'text.npz').write_text('not a zip')
    ref = f'--ref={os.path.dirname(MNIST)}/mnist'
    cases = [
        ([f'--samples={tmp_path / "float.npz"}', ref, f'--inception={weights}'], "is float32 (8, 28, 28, 3), not uint8"),
        ([f'--samples={tmp_path / "two.npz"}', ref, f'--inception={weights}'], "holds 2 images; precision and recall"),
        ([f'--samples={tmp_path / "big.npz"}', ref, f'--inception={weights}'], "the samples are 32 x 32, the reference"),
        ([f'--samples={good}', ref, f'--inception={tmp_path / "none.pth"}'], "is not a file; download the FID"),
        ([f'--samples={good}', ref, f'--inception={tmp_path / "dit.pt"}'], "lacks Conv2d_1a_3x3.conv.weight"),
        ([f'--samples={good}', f'--inception={weights}'], "ref='' must be set"),
        ([f'--samples={tmp_path / "text.npz"}', ref, f'--inception={weights}'], "(File is not a zip file); pass a .npz"),
    ]
    for args, says in cases:
        p = run('evaluate.py', *args, check=False)
        lines = p.stderr.strip().splitlines()
        assert p.returncode == 1 and len(lines) == 1 and says in lines[0], (args, p.stderr[-2000:])
    assert not list(tmp_path.glob('*.jsonl'))
