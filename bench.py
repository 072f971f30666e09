"""
Times the training step of train_diffusion.py (forward, backward, clipping, AdamW, EMA) on synthetic batches after
warm-up, then the data path alone (memory-mapped batch assembly and the host-to-device copy) as a share of a step.

    python bench.py config/mnist_dit.py
    python bench.py --arch=DiT-XL/2 --image_size=32 --channels=4 --num_classes=1000 --batch_size=256   # latents
    python bench.py config/mnist_dit.py --profile=True          # also a torch.profiler table and bench_trace.json

It takes train_diffusion.py's defaults, so its config files and --key=value overrides work here unchanged. The
FLOP count is the training log's: 3 x the model's forward FLOPs (a multiply-add is 2 FLOPs), against the device
peak (peak_tflops, or looked up for known GPUs); the matmul ceiling measured here is printed beside it.
"""
import json
import os
import resource
import time
from contextlib import nullcontext

import numpy as np
import torch

from model import Diffusion, bcast, create_model

# -----------------------------------------------------------------------------
_src = open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'train_diffusion.py')).read()
exec(_src[_src.index('# I/O'):_src.index('config_keys = ')])  # train_diffusion.py's defaults
image_size = 0  # 0 = the dataset's meta.json; else the input size (pixels or latent cells), no data needed
channels = 0  # likewise
num_classes = -1  # -1 = the dataset's meta.json
bench_steps = 20  # timed steps, after bench_warmup
bench_warmup = 5  # untimed steps first (compile, allocator, cudnn autotune)
profile = False  # a torch.profiler table of 3 steps, and out_dir/bench_trace.json for chrome://tracing
# -----------------------------------------------------------------------------
config_keys = [k for k, v in globals().items() if not k.startswith('_') and isinstance(v, (int, float, bool, str))]
exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())
if device.startswith('cuda') and not torch.cuda.is_available():
    raise SystemExit(f"error: device='{device}' but CUDA is not available here; pass --device=cpu")
device_type = 'cuda' if device.startswith('cuda') else 'cpu'
torch.backends.cuda.matmul.allow_tf32 = True
torch.backends.cudnn.allow_tf32 = True
ptdtype = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}[dtype]
ctx = nullcontext() if dtype == 'float32' else torch.autocast(device_type=device_type, dtype=ptdtype)
sync = torch.cuda.synchronize if device_type == 'cuda' else (lambda: None)
torch.manual_seed(seed)

data_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data', dataset)
meta = {}
if os.path.exists(os.path.join(data_dir, 'meta.json')):
    meta = json.load(open(os.path.join(data_dir, 'meta.json')))
H = image_size or meta.get('image_size', 0)
C = channels or meta.get('channels', 0)
K = num_classes if num_classes >= 0 else (meta.get('num_classes', 0) if class_cond else 0)
if not H or not C:
    raise SystemExit(f"error: no data/{dataset}/meta.json to take the input shape from; pass --image_size and --channels")

options = dict(norm=norm, mlp=mlp, qk_norm=qk_norm, rope=rope) if arch.startswith('DiT') else {}  # LightningDiT's
model = create_model(arch, image_size=H, in_channels=C, num_classes=K, **options).to(device)
ema = create_model(arch, **vars(model.config)).to(device).requires_grad_(False)
model.activation_checkpointing = activation_checkpointing
if device_type == 'cuda' and arch.startswith('UNet'):
    model = model.to(memory_format=torch.channels_last)
params, ema_params = list(model.parameters()), list(ema.parameters())
optimizer = torch.optim.AdamW([{'params': [p for p in params if p.dim() >= 2], 'weight_decay': weight_decay},
                               {'params': [p for p in params if p.dim() < 2], 'weight_decay': 0.0}],
                              lr=lr, betas=(beta1, beta2), fused=True)
scaler = torch.amp.GradScaler(device_type, enabled=dtype == 'float16')
diffusion = Diffusion(schedule, prediction_type, num_timesteps, sigma_data)
net = torch.compile(model) if compile else model
x0 = torch.randn(batch_size, C, H, H, device=device).clamp(-1, 1)
y = torch.randint(0, K + 1, (batch_size,), device=device)

def train_step():
    """train_diffusion.py's step on one batch: its objective with min-SNR weights, clip, AdamW, EMA, skip guard."""
    t = diffusion.t_from_u(torch.rand(batch_size, device=device))
    eps = torch.randn_like(x0)
    alpha, sigma, A, B = diffusion.coefficients(t)
    with ctx:
        pred = net(*diffusion.net_inputs(bcast(alpha, x0) * x0 + bcast(sigma, x0) * eps, t), y)
    weight = ((alpha / sigma) ** 2).clamp(max=min_snr_gamma) * (sigma / (alpha * B - sigma * A)) ** 2
    loss = (weight.float() * (pred.float() - bcast(A, x0) * x0 - bcast(B, x0) * eps).pow(2).mean(dim=(1, 2, 3))).mean()
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    bad = ~torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float('inf')).isfinite()
    optimizer.found_inf = bad.float()  # the non-finite guard: the update is skipped on the device
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():
        torch._foreach_lerp_(ema_params, params, (1 - ema_decay) * ~bad)

print(f"{arch} on {C} x {H} x {H}, {K} classes, batch {batch_size}, {dtype}, compile={compile}, {device}")
for _ in range(bench_warmup):
    train_step()
sync()
t0 = time.perf_counter()
for _ in range(bench_steps):
    train_step()
sync()
dt = (time.perf_counter() - t0) / bench_steps
flops_per_step = 3 * model.flops_per_sample() * batch_size
if peak_tflops == 0 and device_type == 'cuda':  # bf16 dense tensor-core peaks, as train_diffusion.py
    peak_tflops = next((v for k, v in {'H100': 989.4, 'H200': 989.4, 'A100': 312.0}.items()
                        if k in torch.cuda.get_device_name()), 0.0)
tflops = flops_per_step / dt / 1e12
mfu = f"{tflops / peak_tflops:.1%} of {peak_tflops:.0f} TFLOP/s" if peak_tflops else "n/a (pass --peak_tflops)"
memory = (f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB on the GPU" if device_type == 'cuda' else
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB resident")
print(f"step: {dt * 1e3:.1f} ms | {batch_size / dt:.0f} img/s | {tflops:.3f} TFLOP/s | MFU {mfu} | peak memory {memory}")

# the matmul ceiling, measured here: bf16 on GPUs, float32 on CPUs (where bf16 matmuls are emulated and slow)
n, mm_dtype = (8192, torch.bfloat16) if device_type == 'cuda' else (2048, torch.float32)
a, b = torch.randn(n, n, device=device, dtype=mm_dtype), torch.randn(n, n, device=device, dtype=mm_dtype)
for _ in range(3):
    a @ b
sync()
t0 = time.perf_counter()
for _ in range(10):
    a @ b
sync()
ceiling = 2 * n ** 3 * 10 / (time.perf_counter() - t0) / 1e12
print(f"{str(mm_dtype).split('.')[-1]} matmul ceiling ({n}^3): {ceiling:.3f} TFLOP/s; the step reaches "
      f"{tflops / ceiling:.0%} of it")

# the data path alone: what train_diffusion.py does per batch, memmap gather to device floats
if os.path.exists(os.path.join(data_dir, 'train_x.npy')):
    train_x = np.load(os.path.join(data_dir, 'train_x.npy'), mmap_mode='r')
    train_y = np.load(os.path.join(data_dir, 'train_y.npy'))
    g = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    for _ in range(bench_steps):
        idx = np.sort(torch.randint(len(train_x), (batch_size,), generator=g).numpy())
        xb, yb = torch.from_numpy(train_x[idx]), torch.from_numpy(train_y[idx])
        if device_type == 'cuda':
            xb, yb = xb.pin_memory().to(device, non_blocking=True), yb.pin_memory().to(device, non_blocking=True)
        xb = xb.to(device).permute(0, 3, 1, 2).float().div(127.5).sub(1)
    sync()
    dt_data = (time.perf_counter() - t0) / bench_steps
    print(f"data path: {dt_data * 1e3:.2f} ms per batch of {batch_size} = {dt_data / dt:.1%} of a step "
          f"(in training it overlaps the step on CUDA)")
else:
    print(f"data path: not timed, no data/{dataset}/train_x.npy")

if profile:
    from torch.profiler import ProfilerActivity, profile as torch_profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device_type == 'cuda' else [])
    with torch_profile(activities=activities) as prof:
        for _ in range(3):
            train_step()
        sync()
    print(prof.key_averages().table(sort_by=f"{'cuda' if device_type == 'cuda' else 'cpu'}_time_total", row_limit=15))
    os.makedirs(out_dir, exist_ok=True)
    prof.export_chrome_trace(os.path.join(out_dir, 'bench_trace.json'))
    print(f"wrote {os.path.join(out_dir, 'bench_trace.json')}")
