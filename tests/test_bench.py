"""bench.py runs the real train scripts and prints the numbers of their own training log."""
import csv
import os
import re

import pytest

from conftest import run


def bench_line(stdout):
    """The figures of bench.py's 'step:' line: ms/step, img/s, TFLOP/s, MFU (or None), peak GiB."""
    line = next(l for l in stdout.splitlines() if l.startswith('step: '))
    m = re.match(r'step: ([\d.]+) ms \| (\d+) img/s \| ([\d.]+) TFLOP/s \| MFU (?:([\d.]+)%|n/a).*peak memory '
                 r'([\d.]+) GiB', line)
    assert m, line
    ms, img, tflops, mfu, mem = m.groups()
    return float(ms), float(img), float(tflops), mfu and float(mfu) / 100, float(mem)


def timed_row(bench_dir):
    """The run's last log line with timings: the one bench.py reports."""
    rows = [r for r in csv.DictReader(open(bench_dir / 'run' / 'metrics.csv')) if r['ms_per_step']]
    return rows[-1]


def assert_bench_is_the_log(stdout, row):
    ms, img, tflops, mfu, mem = bench_line(stdout)
    assert ms == pytest.approx(float(row['ms_per_step']), abs=0.05)
    assert img == pytest.approx(float(row['img_per_s']), abs=0.5)
    assert tflops == pytest.approx(float(row['tflops']), abs=5e-4)
    assert mem == pytest.approx(float(row['peak_mem_gib']), abs=5e-3)
    if mfu is not None:
        assert mfu == pytest.approx(float(row['mfu']), abs=5e-4)
    gflop = float(re.search(r'; ([\d.]+) GFLOP per image per step', stdout).group(1))
    assert gflop == pytest.approx(float(row['tflops']) / float(row['img_per_s']) * 1e3, rel=1e-3, abs=1e-4)


@pytest.mark.slow
def test_bench_prints_the_logs_step_the_ceiling_and_data_path(mnist, tmp_path):
    p = run('bench.py', 'config/mnist_dit.py', '--bench_steps=2', '--bench_warmup=1', '--peak_tflops=1.0',
            '--activation_checkpointing=True', '--profile=True', f'--bench_dir={tmp_path}')
    assert 'train_diffusion.py: DiT-N/4 on 1 x 28 x 28, 10 classes, batch 16' in p.stdout
    row = timed_row(tmp_path)
    assert row['step'] == '4'  # 1 warm-up step rounded up to 2, then the 2 timed ones
    assert_bench_is_the_log(p.stdout, row)
    assert float(row['mfu']) == pytest.approx(float(row['tflops']), rel=1e-3)  # against the 1 TFLOP/s peak
    assert 'matmul ceiling' in p.stdout and 'data path: ' in p.stdout and '% of a step' in p.stdout
    assert os.path.getsize(tmp_path / 'bench_trace.json') > 0


def test_bench_writes_a_dataset_of_the_asked_shape(tmp_path):
    p = run('bench.py', '--dataset=none', '--arch=DiT-N/2', '--image_size=8', '--channels=4', '--num_classes=1000',
            '--batch_size=4', '--bench_steps=1', '--bench_warmup=1', f'--bench_dir={tmp_path}')
    assert 'DiT-N/2 on 4 x 8 x 8, 1000 classes' in p.stdout
    assert_bench_is_the_log(p.stdout, timed_row(tmp_path))
    for bad, message in [('--script=train.py', "error: script='train.py' cannot be read as Python"),
                         ('--teacher=nowhere', 'error: no teacher checkpoint')]:
        p = run('bench.py', '--script=distill_consistency.py', bad, f'--bench_dir={tmp_path}', check=False)
        assert p.returncode != 0 and p.stderr.strip().splitlines()[-1].startswith(message), p.stderr[-500:]


@pytest.mark.parametrize('script', ['train_diffusion.py', 'train_gan.py', 'train_ae.py', 'distill_consistency.py'])
def test_bench_reports_each_scripts_own_log(script, mnist, tmp_path):
    """For every train script, bench.py's figures are the script's log line of the timed steps, with every costed
    term of the step on: the penalty pass every other step, the discriminator and its adaptive weight (from step 0,
    as bench.py sets them), guidance in the (random) teacher's Heun step."""
    args = {'train_diffusion.py': ['config/mnist_dit.py', '--loss_weighting=edm', '--cosine_loss=0.5',
                                   '--rope=True'],
            'train_gan.py': ['config/mnist_gan.py', '--reg_interval=2', '--augment=color,translation'],
            'train_ae.py': ['config/mnist_ae.py'],
            'distill_consistency.py': ['config/mnist_cd.py', '--teacher_arch=DiT-N/4', '--cfg_scale=2.0',
                                       '--num_scales=6']}[script]
    p = run('bench.py', f'--script={script}', *args, '--batch_size=8', '--peak_tflops=1.0',
            '--activation_checkpointing=True', '--bench_steps=1', '--bench_warmup=1', f'--bench_dir={tmp_path}')
    row = timed_row(tmp_path)
    assert_bench_is_the_log(p.stdout, row)
    # the GAN times a whole reg_interval (one penalty pass in 2 steps); the AE's timed step trains the discriminator
    assert row['step'] == ('4' if script == 'train_gan.py' else '2')
    if script == 'train_ae.py':
        assert row['d_loss'] and float(row['adv_weight']) > 0
