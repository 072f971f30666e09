"""
Checks a GPU machine end to end in one command: tests/test_cuda.py (every script with its CUDA defaults,
compile and bf16, alone and under torchrun, resumed and sampled), then bench.py for DiT-B/2 and DiT-XL/2
on 32 x 32 x 4 latents at batch 256 (XL/2 once more with activation checkpointing). Prints one report and
writes it to out-gpu-check/report.md; exits 1 if any check failed.

    python check_gpu.py        # sized for under 8 minutes on one H100 or H200 (not yet timed on one)
"""
import os
import re
import subprocess
import sys
import time
import xml.etree.ElementTree as ET

import torch

root = os.path.dirname(os.path.abspath(__file__))
if not torch.cuda.is_available():
    raise SystemExit("error: no CUDA device: check_gpu.py checks a GPU machine (tests/test_cuda.py "
                     "is skipped without one)")
out_dir = os.path.join(root, 'out-gpu-check')
os.makedirs(out_dir, exist_ok=True)
lines = [f"# GPU check, {time.strftime('%Y-%m-%d %H:%M')}", '',
         f"{torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}", '']
t_start = time.time()

def run(args, log_name):
    """Runs `python args...` from the repository root; its output goes to out_dir/log_name."""
    t0 = time.time()
    p = subprocess.run([sys.executable, *args], cwd=root, capture_output=True, text=True)
    with open(os.path.join(out_dir, log_name), 'w') as f:
        f.write(p.stdout + p.stderr)
    return p, time.time() - t0

# -----------------------------------------------------------------------------
# the tests: one line per test, and the numbers they print
junit = os.path.join(out_dir, 'test_cuda.xml')
if os.path.exists(junit):
    os.remove(junit)  # a run that dies before writing it reports no stale results
p, seconds = run(['-m', 'pytest', 'tests/test_cuda.py', '-v', '-s', f'--junitxml={junit}'],
                 'test_cuda.log')
lines += [f"## tests/test_cuda.py: {'passed' if p.returncode == 0 else 'FAILED'} in {seconds:.0f} s", '',
          '| test | result | s |', '|---|---|---|']
failed = p.returncode != 0
if os.path.exists(junit):
    for case in ET.parse(junit).iter('testcase'):
        outcome = next((c.tag for c in case if c.tag in ('failure', 'error', 'skipped')), 'passed')
        lines.append(f"| {case.get('name')} | {outcome} | {float(case.get('time', 0)):.0f} |")
else:
    lines.append(f"| (no report: see {out_dir}/test_cuda.log) | FAILED | |")
# (pytest -s prints them after the test's name, on its line)
lines += [''] + [f"- {m}" for m in re.findall(r'(bf16 vs float32.*|DiT-B/2 step peak memory.*)',
                                              p.stdout)]

# -----------------------------------------------------------------------------
# the benchmarks: bench.py's step line for each
lines += ['', '## bench.py, 32 x 32 x 4 latents, 1000 classes, batch 256, bf16, compile', '',
          '| arch | ms/step | img/s | MFU | peak memory |', '|---|---|---|---|---|']
for name, extra in (('DiT-B/2', []), ('DiT-XL/2', []),
                    ('DiT-XL/2, activation checkpointing', ['--activation_checkpointing=True'])):
    arch = name.split(',')[0]
    log_name = f"bench_{arch.replace('/', '')}{'_ac' if extra else ''}.log"
    p, seconds = run(['bench.py', f'--arch={arch}', '--image_size=32', '--channels=4',
                      '--num_classes=1000', '--batch_size=256', '--bench_steps=10', '--bench_warmup=10',
                      f"--bench_dir={os.path.join(out_dir, 'bench')}", *extra], log_name)
    m = re.search(r'step: ([\d.]+) ms \| (\d+) img/s \| [\d.]+ TFLOP/s \| MFU (\S+) .*peak memory '
                  r'([\d.]+) GiB', p.stdout)
    if p.returncode or not m:
        failed = True
        lines.append(f"| {name} | FAILED (see {out_dir}/{log_name}) | | | |")
    else:
        lines.append(f"| {name} | {m[1]} | {m[2]} | {m[3]} | {m[4]} GiB |")

lines += ['', f"{'FAILED' if failed else 'all passed'}; {time.time() - t_start:.0f} s in all; logs in "
          f"{out_dir}/"]
report = '\n'.join(lines) + '\n'
with open(os.path.join(out_dir, 'report.md'), 'w') as f:
    f.write(report)
print(report)
sys.exit(1 if failed else 0)
