"""bench.py runs any train config and prints the numbers the training log prints."""
import csv
import os
import re

import pytest

from conftest import run


def test_bench_prints_step_flops_and_data_path(mnist, tmp_path):
    p = run('bench.py', 'config/mnist_dit.py', '--bench_steps=2', '--bench_warmup=1', '--peak_tflops=1.0',
            '--activation_checkpointing=True', '--profile=True', f'--out_dir={tmp_path / "new"}')
    lines = p.stdout
    assert 'DiT-N/4 on 1 x 28 x 28, 10 classes, batch 16' in lines
    step = next(l for l in lines.splitlines() if l.startswith('step: '))
    tflops = float(step.split('|')[2].split()[0])
    assert f"MFU {tflops / 1.0:.1%}" in step  # the achieved rate against the given 1 TFLOP/s peak
    assert 'matmul ceiling' in lines and 'data path: ' in lines and '% of a step' in lines
    assert os.path.getsize(tmp_path / 'new' / 'bench_trace.json') > 0  # out_dir is made


def test_bench_runs_without_data_given_a_shape():
    p = run('bench.py', '--dataset=none', '--arch=DiT-N/2', '--image_size=8', '--channels=4', '--num_classes=1000',
            '--batch_size=4', '--bench_steps=1', '--bench_warmup=1')
    assert 'DiT-N/2 on 4 x 8 x 8, 1000 classes' in p.stdout and 'data path: not timed' in p.stdout
    for bad, message in [('--script=train.py', "error: script='train.py'; bench.py times train_diffusion.py"),
                         ('--teacher=nowhere', 'error: no teacher checkpoint')]:
        p = run('bench.py', '--script=distill_consistency.py', bad, check=False)  # the last --script counts
        assert p.returncode != 0 and p.stderr.strip().splitlines()[-1].startswith(message), p.stderr[-500:]


@pytest.mark.parametrize('script', ['train_diffusion.py', 'train_gan.py', 'train_ae.py', 'distill_consistency.py'])
def test_bench_counts_the_flops_the_training_log_counts(script, mnist, tmp_path):
    """For every train script, bench.py's FLOPs per image and MFU are the training log's: the log's TFLOP/s over its
    img/s, and its MFU against the same peak. The configs switch every costed term on: the penalty pass every other
    step, the discriminator and the adaptive weight from the start, guidance in the teacher's Heun step."""
    args = {'train_diffusion.py': ['config/mnist_dit.py', '--loss_weighting=edm', '--cosine_loss=0.5', '--rope=True',
                                   '--eval_images=16', '--sample_steps=2'],
            'train_gan.py': ['config/mnist_gan.py', '--reg_interval=2', '--augment=color,translation'],
            'train_ae.py': ['config/mnist_ae.py', '--disc_start=0', '--adv_start=0', '--eval_images=16'],
            'distill_consistency.py': ['config/mnist_cd.py', f'--teacher={tmp_path / "teacher"}', '--cfg_scale=2.0',
                                       '--num_scales=6']}[script]
    if script == 'distill_consistency.py':
        run('train_diffusion.py', '--arch=DiT-N/4', '--batch_size=8', '--max_steps=1', '--eval_images=16',
            '--sample_steps=2', f'--out_dir={tmp_path / "teacher"}')
    common = [*args, '--batch_size=8', '--peak_tflops=1.0', '--activation_checkpointing=True']
    bench = run('bench.py', f'--script={script}', *common, '--bench_steps=2', '--bench_warmup=1').stdout
    gflop = float(re.search(r'; ([\d.]+) GFLOP per image per step', bench).group(1))
    step = next(line for line in bench.splitlines() if line.startswith('step: '))
    assert f"MFU {float(step.split('|')[2].split()[0]):.1%}" in step  # its TFLOP/s against the 1 TFLOP/s peak
    run(script, *common, '--max_steps=2', '--log_interval=1', f'--out_dir={tmp_path / "run"}')
    row = next(csv.DictReader(open(tmp_path / 'run' / 'metrics.csv')))
    assert float(row['tflops']) / float(row['img_per_s']) * 1e3 == pytest.approx(gflop, rel=1e-3)
    assert float(row['mfu']) == pytest.approx(float(row['tflops']), rel=1e-3)
