"""
Times any of the kit's train scripts by running it. bench.py runs the script in this process (runpy)
with its config files and --key=value overrides, for a warm-up and then bench_steps timed steps, one
log line at the end of each, and reads ms/step, img/s, TFLOP/s, MFU and peak memory from the
script's own metrics.csv: they are the training log's numbers because the same code produced them.
Then it measures the matmul ceiling, and times the script's own get_batch alone as a share of a
step.

    python bench.py config/mnist_dit.py                       # train_diffusion.py on data/mnist
    python bench.py --arch=DiT-XL/2 --image_size=32 --channels=4 --num_classes=1000 --batch_size=256
    python bench.py --script=train_gan.py config/mnist_gan.py
    python bench.py --script=train_ae.py config/mnist_ae.py   # the step with the discriminator on
    python bench.py --script=distill_consistency.py config/mnist_cd.py  # reads the config's teacher
    python bench.py --script=distill_consistency.py --teacher_arch=DiT-S/2 \
                    --image_size=32 --channels=4
    python bench.py config/mnist_dit.py --profile=True        # and a profile of 2 training steps
    python bench.py config/mnist_dit.py --sra_weight=0.5      # what a representation term costs a step

With --image_size and --channels (or when the dataset is not prepared) it writes a random uint8
dataset of that shape; distillation with --teacher_arch first trains a one-step teacher of that arch
on it. The warm-up is bench_warmup steps rounded up to a multiple of bench_steps (the log line
before the timed ones falls there). The evaluation, grid and checkpoint of the last step come after
the timed steps, as in training.
"""
import ast
import csv
import os
import runpy
import sys
import time

import numpy as np
import torch

import bookkeeping
import common
from dataformat import data_path

# -----------------------------------------------------------------------------
# bench.py's own keys; every other argument goes to the script
bench = dict(
    script='train_diffusion.py',  # any train script of the kit's kind (or a fork of one): a path
    image_size=0,  # > 0, with channels: a random dataset of this shape (pixels or latent cells)
    channels=0,
    num_classes=-1,  # of the random dataset; -1 = the prepared dataset's (else 10)
    bench_steps=20,  # timed steps
    bench_warmup=5,  # untimed steps first (compile, allocator, cudnn autotune),
    #                  rounded up to bench_steps
    teacher_arch='',  # distill_consistency.py: a random teacher of this arch, not the config's
    bench_dir='out-bench',  # bench.py's data, teacher, run and trace (the folders it made: emptied first)
    profile=False,  # a second, 5-step run, 2 of its steps profiled: a table, bench_dir/bench_trace.json
)
# seen: the keys the config files and overrides set (dataset, teacher, reg_interval)
script_args, seen = [], {}
for arg in sys.argv[1:]:
    key, _, value = arg[2:].partition('=')
    if arg.startswith('--') and key in bench:
        try:
            bench[key] = (value if isinstance(bench[key], str)
                          else type(bench[key])(ast.literal_eval(value)))
        except (ValueError, SyntaxError):
            raise SystemExit(f"error: --{key}={value} is not {type(bench[key]).__name__} "
                             f"(default {bench[key]!r})")
        continue
    script_args.append(arg)
    if arg.startswith('--'):
        seen[key] = value
    else:  # a config file: plain assignments (the script itself reports an unreadable one)
        try:
            exec(open(arg).read(), {}, seen)
        except Exception:
            pass
script = bench['script']
root = os.path.dirname(os.path.abspath(__file__))
script_path = os.path.join(root, script)  # (an absolute path stays as it is)
try:
    # the script's config keys: its module-level assignments
    keys = {t.id for node in ast.parse(open(script_path).read()).body
            if isinstance(node, ast.Assign) for t in node.targets if isinstance(t, ast.Name)}
except (OSError, SyntaxError) as e:
    raise SystemExit(f"error: script='{script}' cannot be read as Python ({e}); pass a train script "
                     f"like train_diffusion.py, or the path of a fork of one")
if 'run' not in keys or 'max_steps' not in keys:
    raise SystemExit(f"error: script='{script}' is not a train script of the kit (it starts no run "
                     f"with bookkeeping.start_run)")
if bench['bench_steps'] < 1 or bench['bench_warmup'] < 1:
    raise SystemExit("error: bench_steps and bench_warmup must be at least 1")
bench_dir = os.path.abspath(bench['bench_dir'])
MARK = '.made-by-bench'  # in each folder bench.py makes: the only ones it removes
for sub in ('data', 'teacher', 'run', 'profile'):
    common.remove_made(os.path.join(bench_dir, sub), MARK)
os.makedirs(bench_dir, exist_ok=True)

def run_script(name, args):
    """Runs a train script in this process, as `python name args...`: its globals after the run."""
    sys.argv = [name, *map(str, args)]
    return runpy.run_path(os.path.join(root, name), run_name='__main__')  # (a path stays one)

# -----------------------------------------------------------------------------
# the data: the prepared dataset or a random one of the asked shape; for distillation, the teacher
dataset = str(seen.get('dataset', 'mnist'))
H, C = bench['image_size'], bench['channels']
if (not H and not os.path.exists(os.path.join(data_path(dataset), 'meta.json'))
        and 'teacher' not in keys):
    raise SystemExit(f"error: no data/{dataset}/meta.json to take the input shape from; pass "
                     f"--image_size and --channels")
if H or C:
    if H < 1 or C < 1:
        raise SystemExit(f"error: image_size={H}, channels={C}: pass both, positive")
    K = bench['num_classes'] if bench['num_classes'] >= 0 else 10
    dataset = os.path.join(bench_dir, 'data')
    common.make_folder(dataset, MARK)
    for split, N in (('train', max(256, K)), ('val', 256)):  # (each class has training images)
        np.save(os.path.join(dataset, f'{split}_x.npy'),
                np.random.randint(0, 256, (N, H, H, C), np.uint8))
        np.save(os.path.join(dataset, f'{split}_y.npy'), np.arange(N) % max(K, 1))
    with open(os.path.join(dataset, 'meta.json'), 'w') as f:
        f.write(f'{{"image_size": {H}, "channels": {C}, "num_classes": {max(K, 1)}}}')
    script_args.append(f'--dataset={dataset}')
if 'teacher' in keys:  # a distillation: its teacher
    teacher = str(seen.get('teacher', 'out-mnist-dit'))
    if bench['teacher_arch']:
        teacher = os.path.join(bench_dir, 'teacher')
        common.make_folder(teacher, MARK)
        run_script('train_diffusion.py', [f'--arch={bench["teacher_arch"]}', f'--dataset={dataset}',
                                          '--max_steps=1', '--batch_size=8', '--eval_images=8',
                                          '--sample_steps=1', f'--out_dir={teacher}'])
    elif not os.path.exists(os.path.join(teacher, 'ckpt.pt')):
        raise SystemExit(f"error: no teacher checkpoint ({teacher}/ckpt.pt); pass the out_dir of a "
                         f"train_diffusion.py run as --teacher, or --teacher_arch=<arch> for a "
                         f"random teacher")
    script_args = ([a for a in script_args if not a.startswith('--dataset=')]
                   + [f'--teacher={teacher}'])

# -----------------------------------------------------------------------------
# the timed run: a log line at the end of the warm-up and of the timed steps, nothing in between
steps = bench['bench_steps']
# train_gan.py: every reg_interval-th step has the penalty pass; count it at its true rate
if 'reg_interval' in keys:
    reg_interval = int(seen.get('reg_interval', 1))
    steps = -(-steps // reg_interval) * reg_interval
warmup = -(-bench['bench_warmup'] // steps) * steps
never = 10 ** 9
# the work between steps (evaluations, grids, checkpoints) after the timed steps only, and small;
# the autoencoder's discriminator on from the start
intervals = [k for k in ('ckpt_interval', 'sample_interval', 'eval_interval', 'phema_interval')
             if k in keys]
small = {'eval_images': 16, 'sample_steps': 1, 'disc_start': 0, 'adv_start': 0, 'patience': 0}
extra = [f'--{k}={v}' for k, v in small.items() if k in keys]

def timed_run(out_dir, total, log_interval):
    common.make_folder(out_dir, MARK)
    return run_script(script, [*script_args, *[f'--{k}={never}' for k in intervals], *extra,
                               f'--out_dir={out_dir}', '--init_from=scratch', '--keep_last=0',
                               '--max_minutes=0', '--wandb_log=False', f'--max_steps={total}',
                               f'--log_interval={log_interval}'])

out = os.path.join(bench_dir, 'run')
ns = timed_run(out, warmup + steps, steps)
with open(os.path.join(out, 'metrics.csv')) as f:
    row = [r for r in csv.DictReader(f) if r['ms_per_step']][-1]  # the timed steps' line
assert int(row['step']) == warmup + steps, row
ms, img_per_s, tflops, mfu, memory = (
    float(row[k]) for k in ('ms_per_step', 'img_per_s', 'tflops', 'mfu', 'peak_mem_gib'))
batch_size, device = ns['batch_size'], ns['device']
arch = ns['config'].get('arch') or ns['tconf']['arch']  # (a distillation's is its teacher's)
K = ns.get('num_classes', ns.get('null_label', 0))
print(f"{script}: {arch} on {ns['C']} x {ns['H']} x {ns['W']}, {K} classes, batch {batch_size}, "
      f"{ns['dtype']}, compile={ns['compile']}, {device}; "
      f"{tflops / img_per_s * 1e3:.4f} GFLOP per image per step")
peak = (f"{mfu:.1%} of {tflops / mfu:.0f} TFLOP/s" if mfu == mfu and mfu > 0
        else "n/a (pass --peak_tflops)")
cuda = device.startswith('cuda')
where = 'on the GPU' if cuda else 'resident'
print(f"step: {ms:.1f} ms | {img_per_s:.0f} img/s | {tflops:.3f} TFLOP/s | MFU {peak} | "
      f"peak memory {memory:.2f} GiB {where} (the log's line at step {warmup + steps}, after "
      f"{warmup} warm-up steps)")

# the matmul ceiling, measured here: bf16 on GPUs, float32 on CPUs (where bf16 matmuls are emulated
# and slow, and oneDNN's convolutions can outrun the matmul: a step above 100% of it is no error)
sync = torch.cuda.synchronize if cuda else (lambda: None)
n, mm_dtype = (8192, torch.bfloat16) if cuda else (2048, torch.float32)
a = torch.randn(n, n, device=device, dtype=mm_dtype)
b = torch.randn(n, n, device=device, dtype=mm_dtype)
for i in range(13):
    if i == 3:
        sync()
        t0 = time.perf_counter()
    a @ b
sync()
ceiling = 2 * n ** 3 * 10 / (time.perf_counter() - t0) / 1e12
print(f"{str(mm_dtype).split('.')[-1]} matmul ceiling ({n}^3): {ceiling:.3f} TFLOP/s; the step "
      f"reaches {tflops / ceiling:.0%} of it")

# the data path alone: the script's own get_batch (memmap gather, flips, the host-to-device copy)
grad_accum = ns['grad_accum']
sync()
t0 = time.perf_counter()
for step in range(steps):
    ns['get_batch'](step, 0)
sync()
dt_data = (time.perf_counter() - t0) / steps * grad_accum
print(f"data path: {dt_data * 1e3:.2f} ms per step's batches ({grad_accum} x "
      f"{batch_size // grad_accum}) = {dt_data / (ms / 1e3):.1%} of a step (the script's "
      f"get_batch; in training it overlaps the step on CUDA)")

if bench['profile']:
    from torch.profiler import ProfilerActivity, profile, schedule
    trace = os.path.join(bench_dir, 'bench_trace.json')

    def report(prof):
        sort = 'cuda_time_total' if cuda else 'cpu_time_total'
        print(prof.key_averages().table(sort_by=sort, row_limit=15))
        prof.export_chrome_trace(trace)
        print(f"trace of 2 training steps (after a warm-up step and one more): {trace}")

    # every train script's Run votes on stopping once a step, after its update: the profiler's step.
    # Of 5 steps it records the third and fourth, not the last one's log line, grid and checkpoint.
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    prof = profile(activities=activities, schedule=schedule(wait=1, warmup=1, active=2, repeat=1),
                   on_trace_ready=report)
    vote = bookkeeping.StopSignals.vote
    bookkeeping.StopSignals.vote = lambda self: (prof.step(), vote(self))[1]
    with prof:
        timed_run(os.path.join(bench_dir, 'profile'), 5, 5)
    bookkeeping.StopSignals.vote = vote
