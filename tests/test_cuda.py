"""The kit on a GPU with each script's CUDA defaults (torch.compile on, bf16 autocast): skipped without CUDA.
Sized for a few minutes on one H100/H200; check_gpu.py runs it, then bench.py, and writes one report.

    python -m pytest tests/test_cuda.py -v

Each train script trains a few dozen steps alone, then resumes under torchrun --nproc_per_node=1 (NCCL) and
goes on, with FID during training every 20 steps (random Inception weights); sample.py samples its checkpoints,
alone and under torchrun. A bf16 run's weights stay near a float32
run's, and activation checkpointing at least halves a DiT-B/2 step's peak memory.
TEST_CUDA_DEVICE=cpu runs the same on the CPU (compile on, float32, the memory test skipped): a dry run of this
file's plumbing, minutes long, not part of the suite."""
import csv
import math
import os

import pytest
import torch

from conftest import run
from model import compile_for_training, create_model

DEVICE = os.environ.get('TEST_CUDA_DEVICE', 'cuda')
pytestmark = pytest.mark.skipif(DEVICE == 'cuda' and not torch.cuda.is_available(), reason='no CUDA device')
# on CUDA nothing is passed: the scripts' own defaults are the ones under test
DEFAULTS = [] if DEVICE == 'cuda' else ['--device=cpu', '--compile=True']
FIRST, TOTAL = 30, 40  # steps alone, then resumed under torchrun
RUNS = {  # each script's smallest config, the intervals cut to fit 40 steps
    'train_diffusion.py': ['config/mnist_dit.py', '--warmup_steps=5', '--eval_interval=20', '--eval_images=64',
                           '--sample_interval=40', '--sample_steps=5'],
    'train_ae.py': ['config/mnist_ae.py', '--warmup_steps=5', '--disc_start=10', '--adv_start=20',
                    '--eval_interval=20', '--eval_images=64'],
    'train_gan.py': ['config/mnist_gan.py', '--reg_interval=4', '--sample_interval=40'],
    'distill_consistency.py': ['config/mnist_cd.py', '--sample_interval=40'],
    'train_meanflow.py': ['config/mnist_meanflow.py', '--warmup_steps=5', '--sample_interval=40'],
}
LOSS = {'train_diffusion.py': 'loss', 'train_ae.py': 'rec', 'train_gan.py': 'd_loss', 'distill_consistency.py': 'loss',
        'train_meanflow.py': 'loss'}


def metrics(out_dir):
    with open(os.path.join(out_dir, 'metrics.csv')) as f:
        return [row for row in csv.DictReader(f) if row.get('ms_per_step')]


def train_resume_sample(script, out_dir, *extra):
    """FIRST steps alone, then on to TOTAL under torchrun; each log line's losses finite; returns the log rows."""
    args = [*RUNS[script], *extra, *DEFAULTS, f'--out_dir={out_dir}', '--log_interval=10', f'--ckpt_interval={FIRST}']
    first = run(script, *args, f'--max_steps={FIRST}')
    assert f'step {FIRST}/{FIRST}' in first.stdout, first.stdout[-2000:]
    resumed = run('torchrun', '--standalone', '--nproc_per_node=1', script, *args, f'--max_steps={TOTAL}')
    assert f'at step {FIRST}' in resumed.stdout and f'step {TOTAL}/{TOTAL}' in resumed.stdout, resumed.stdout[-2000:]
    rows = metrics(out_dir)
    assert [int(r['step']) for r in rows] == list(range(10, TOTAL + 1, 10)), rows
    assert all(math.isfinite(float(r[LOSS[script]])) for r in rows), rows
    if '--fid_interval=20' in extra:  # (at steps 20, 30 the first run's last, and 40 after the resume)
        assert [math.isfinite(float(r['fid'])) if r.get('fid') else None for r in rows] == [None, True, True, True], rows
    return rows


def sample_both_ways(out_dir, *extra):
    """sample.py (its defaults: float32) alone and under torchrun; each writes out_dir/samples.png."""
    grid = out_dir / 'samples.png'
    for launcher in ([], ['torchrun', '--standalone', '--nproc_per_node=1']):
        grid.unlink(missing_ok=True)
        run(*launcher, 'sample.py', f'--out_dir={out_dir}',
            '--num_samples=16', *extra, *(['--device=cpu'] if DEVICE != 'cuda' else []))
        assert grid.stat().st_size > 0


@pytest.fixture(scope='module')
def diffusion_run(mnist, fid_args, tmp_path_factory):
    out = tmp_path_factory.mktemp('cuda') / 'dit'
    return out, train_resume_sample('train_diffusion.py', out, *fid_args, '--fid_interval=20', '--fid_images=64')


def test_train_diffusion_learns_resumes_and_samples(diffusion_run):
    out, rows = diffusion_run
    assert float(rows[-1]['loss']) < 0.8 * float(rows[0]['loss']), rows
    sample_both_ways(out, '--steps=4')


def test_train_ae_learns_with_its_adaptive_weight_and_resumes(mnist, tmp_path):
    rows = train_resume_sample('train_ae.py', tmp_path / 'ae')
    assert float(rows[-1]['rec']) < 0.8 * float(rows[0]['rec']), rows
    assert float(rows[-1]['adv_weight']) > 0, rows  # the steps past adv_start took the adaptive weight


def test_train_gan_trains_with_its_penalties_resumes_and_samples(mnist, fid_args, tmp_path):
    out = tmp_path / 'gan'
    rows = train_resume_sample('train_gan.py', out, *fid_args, '--fid_interval=20', '--fid_images=64')
    assert any(r['r1'] not in ('', 'nan') for r in rows), rows
    sample_both_ways(out)


def test_distill_consistency_from_the_diffusion_run_and_samples(diffusion_run, fid_args, tmp_path):
    teacher, _ = diffusion_run
    out = tmp_path / 'cd'
    train_resume_sample('distill_consistency.py', out, f'--teacher={teacher}', *fid_args, '--fid_interval=20',
                        '--fid_images=64')
    sample_both_ways(out)


def test_train_meanflow_trains_resumes_and_samples(mnist, fid_args, tmp_path):
    """MeanFlow from scratch with guidance folded into the target (its JVP on the eager view of the compiled model)."""
    out = tmp_path / 'meanflow'
    train_resume_sample('train_meanflow.py', out, *fid_args, '--fid_interval=20', '--fid_images=64')
    sample_both_ways(out, '--steps=1')


def test_bf16_weights_stay_near_float32(mnist, tmp_path):
    """20 steps of the quickstart's DiT from the same seed and batches, compiled, in bf16 autocast and in
    float32: the two runs' weights differ by at most a fifth of how far the float32 run moved them."""
    weights = {}
    for dtype in ('bfloat16', 'float32'):
        out = tmp_path / dtype
        run('train_diffusion.py', *RUNS['train_diffusion.py'], *DEFAULTS, f'--dtype={dtype}', '--max_steps=20',
            '--eval_interval=1000', '--sample_interval=1000', f'--out_dir={out}', '--init_from=scratch')
        weights[dtype] = torch.load(out / 'ckpt.pt', map_location='cpu', weights_only=True)['model']
    torch.manual_seed(0)  # train_diffusion.py's seed, then its model: the initial weights
    init = create_model('DiT-N/4', image_size=28, in_channels=1, num_classes=10).state_dict()
    flat = lambda state: torch.cat([state[k].float().flatten() for k in sorted(init)])
    w0, w16, w32 = flat(init), flat(weights['bfloat16']), flat(weights['float32'])
    moved, apart = (w32 - w0).norm(), (w16 - w32).norm()
    print(f"bf16 vs float32 after 20 steps: {apart / moved:.3f} of the float32 run's change")
    assert moved > 0 and apart <= 0.2 * moved, (apart, moved)


@pytest.mark.skipif(DEVICE != 'cuda', reason='peak memory is measured on CUDA')
def test_activation_checkpointing_halves_peak_memory_of_a_compiled_dit_step():
    """A compiled bf16 DiT-B/2 step on 32x32x4 latents, batch 64, compiled as the scripts do: the step's peak
    memory (torch.cuda's peak above what the weights and Adam's moments hold before it) with activation
    checkpointing at most half of it without."""
    base = {}
    peaks = {}
    for checkpointing in (False, True):
        torch._dynamo.reset()
        torch.manual_seed(0)
        net = create_model('DiT-B/2', image_size=32, in_channels=4, num_classes=1000).cuda()
        net.activation_checkpointing = checkpointing
        step = compile_for_training(net)  # as the scripts compile it: block by block with checkpointing
        opt = torch.optim.AdamW(net.parameters(), lr=1e-4, fused=True)
        x, t = torch.randn(64, 4, 32, 32, device='cuda'), torch.rand(64, device='cuda') * 999
        y = torch.randint(0, 1000, (64,), device='cuda')
        for i in range(3):  # compile, then two measured steps
            if i == 1:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base[checkpointing] = torch.cuda.memory_allocated()
            with torch.autocast('cuda', dtype=torch.bfloat16):
                loss = (step(x, t, y).float() - x).pow(2).mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        peaks[checkpointing] = (torch.cuda.max_memory_allocated() - base[checkpointing]) / 2**30
        del net, step, opt, loss  # (loss's graph holds the weights)
        torch.cuda.empty_cache()
    print(f"DiT-B/2 step peak memory: {peaks[False]:.2f} GiB, checkpointed {peaks[True]:.2f} GiB, above the "
          f"weights and optimizer's {base[False] / 2**30:.2f} GiB")
    assert peaks[True] <= peaks[False] / 2, peaks
