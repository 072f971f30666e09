"""bench.py runs any train config and prints the numbers the training log prints."""
import os

from conftest import run


def test_bench_prints_step_flops_and_data_path(mnist, tmp_path):
    p = run('bench.py', 'config/mnist_dit.py', '--bench_steps=2', '--bench_warmup=1', '--peak_tflops=1.0',
            '--activation_checkpointing=True', '--profile=True', f'--out_dir={tmp_path}')
    lines = p.stdout
    assert 'DiT-N/4 on 1 x 28 x 28, 10 classes, batch 16' in lines
    step = next(l for l in lines.splitlines() if l.startswith('step: '))
    tflops = float(step.split('|')[2].split()[0])
    assert f"MFU {tflops / 1.0:.1%}" in step  # the achieved rate against the given 1 TFLOP/s peak
    assert 'matmul ceiling' in lines and 'data path: ' in lines and '% of a step' in lines
    assert os.path.getsize(tmp_path / 'bench_trace.json') > 0


def test_bench_runs_without_data_given_a_shape():
    p = run('bench.py', '--dataset=none', '--arch=DiT-N/2', '--image_size=8', '--channels=4', '--num_classes=1000',
            '--batch_size=4', '--bench_steps=1', '--bench_warmup=1')
    assert 'DiT-N/2 on 4 x 8 x 8, 1000 classes' in p.stdout and 'data path: not timed' in p.stdout
