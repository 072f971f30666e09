"""
Turns a train_diffusion.py run into a consistency model, which draws an image in one network call (or a few).

    python distill_consistency.py config/mnist_cd.py                                  # teacher: out-mnist-dit
    torchrun --standalone --nproc_per_node=8 distill_consistency.py --teacher=out-dit-b --out_dir=out-cd-b

mode='cd', consistency distillation (Song et al. 2023): x0 + sigma_{n+1} z, one Heun step of the teacher's
probability-flow ODE down to sigma_n on a Karras grid of num_scales sigmas, and the student's output there must
match a target network's output at the teacher's point. mode='ect', easy consistency tuning (Geng et al. 2024): no
teacher; the two points share the data's own noise, x0 + t z and x0 + r z, with r / t = 1 - (1 + k sigmoid(-b t)) / q^stage,
so the gap shrinks stage by stage from plain denoising (r = sigma_min) towards consistency. Both start the student
from the teacher's EMA weights, read through one conversion to a denoiser D(x, sigma) whatever the teacher's schedule
and prediction type (model.Diffusion.denoiser), and give it the boundary condition f(x, sigma_min) = x
(model.Diffusion.consistency). The target is an EMA of the student (target='ema', mu = target_ema) or the student
itself without gradient (target='stopgrad', as iCT); the loss is pseudo-Huber (c = 0.00054 sqrt(d)) or squared L2,
weighted by 1 / (sigma_{n+1} - sigma_n); noise levels are drawn log-normal as in iCT (or uniform over the grid).
The rest is train_diffusion.py's: seeded draws per step, DDP, autocast, EMA, clipping, atomic checkpoints with exact
resume, preemption and the non-finite guard. sample.py samples the result: --sigmas=80 (one step) or e.g. 80,0.8.
"""
import copy
import csv
import glob
import math
import os
import pickle
import random
import signal
import tempfile
import time
from contextlib import nullcontext
from dataclasses import asdict

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from torch.nn.parallel import DistributedDataParallel as DDP

from model import Diffusion, bcast, create_model

# -----------------------------------------------------------------------------
# defaults, overridden by config/*.py and --key=value
# I/O
out_dir = 'out-cd'
teacher = 'out-mnist-dit'  # out_dir of a train_diffusion.py run: its EMA weights are the teacher and the student's start
init_from = 'auto'  # 'auto': 'resume' if out_dir holds ckpt.pt, else 'scratch' (which never overwrites a checkpoint)
keep_last = 0  # also keep the newest keep_last checkpoints as out_dir/ckpt_<step>.pt (hard links)
max_minutes = 0.0  # finish the step, save and exit 0 after this much wall time; 0 = no limit
log_interval = 50
sample_interval = 500  # steps between EMA sample grids at sample_sigmas (a grid is also made at the end)
ckpt_interval = 500
wandb_log = False
wandb_project = 'consistency'
wandb_run_name = 'cd'
# consistency
mode = 'cd'  # 'cd' (distillation through the teacher's ODE) or 'ect' (tuning on the data's own noise, no teacher)
num_scales = 18  # cd: N sigmas on the Karras grid (Song et al. 2023: 18 on CIFAR-10, 40 on ImageNet 64)
sigma_min = 0.002  # the boundary f(x, sigma_min) = x, and the grid's ends (EDM's)
sigma_max = 80.0
rho = 7.0  # the grid's curvature
sigma_sampling = 'lognormal'  # 'lognormal' (iCT: P(sigma) ~ N(p_mean, p_std) in log sigma) or 'uniform' over the grid
p_mean = -1.1
p_std = 2.0
target = 'stopgrad'  # 'stopgrad': the student, without gradient (iCT, ECT); 'ema': an EMA of it with target_ema
target_ema = 0.95  # mu of target='ema' (Song et al. 2023)
loss_type = 'pseudo_huber'  # 'pseudo_huber': sqrt(|a - b|^2 + c^2) - c with c = 0.00054 sqrt(d) (iCT); or 'l2'
cfg_scale = 1.0  # cd: classifier-free guidance of the teacher's ODE (1 = none); the student then draws guided images
ect_stages = 8  # ect: stages of the gap's schedule, evenly over max_steps
ect_q = 2.0  # ect: the gap shrinks by q each stage
ect_k = 8.0  # ect: r / t = 1 - (1 + k sigmoid(-b t)) / q^stage
ect_b = 1.0
sample_sigmas = '80'  # grids during training: comma-separated sigmas, one network call each
# optimization
batch_size = 128
grad_accum = 1
max_steps = 2000
lr = 1e-4  # constant after warm-up
warmup_steps = 0
weight_decay = 0.0
beta1 = 0.9
beta2 = 0.999
grad_clip = 1.0
max_nonfinite = 20
ema_decay = 0.999  # the EMA that sample.py uses, with warm-up
# system
device = 'cuda' if torch.cuda.is_available() else 'cpu'
dtype = 'bfloat16' if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else 'float32'
compile = torch.cuda.is_available()  # torch.compile the student (gains nothing on CPU but compile time)
activation_checkpointing = False  # recompute each of the student's blocks in the backward pass to save memory
peak_tflops = 0.0  # per-device peak for MFU; 0 = known GPUs' dense bf16 (float32: TF32) peak, none on CPU
seed = 0
# -----------------------------------------------------------------------------
config_keys = [k for k, v in globals().items() if not k.startswith('_') and isinstance(v, (int, float, bool, str))]
exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())
config = {k: globals()[k] for k in config_keys}
for key, allowed in [('init_from', ('auto', 'scratch', 'resume')), ('mode', ('cd', 'ect')),
                     ('sigma_sampling', ('lognormal', 'uniform')), ('target', ('stopgrad', 'ema')),
                     ('loss_type', ('pseudo_huber', 'l2')), ('dtype', ('float32', 'bfloat16', 'float16'))]:
    if config[key] not in allowed:
        raise SystemExit(f"error: {key}='{config[key]}' is not one of {', '.join(allowed)}")
for key in ('batch_size', 'grad_accum', 'max_steps', 'log_interval', 'sample_interval', 'ckpt_interval', 'ect_stages',
            'max_nonfinite'):
    if config[key] < 1:
        raise SystemExit(f"error: {key}={config[key]} must be at least 1")
try:
    grid_sigmas = [float(s) for s in sample_sigmas.split(',')]
except ValueError:
    grid_sigmas = []
for key, ok, rule in [('num_scales', num_scales >= 2, 'at least 2'), ('lr', lr > 0, 'positive'),
                      ('sigma_min', 0 < sigma_min < sigma_max, 'positive and below sigma_max'),
                      ('ema_decay', 0 <= ema_decay < 1, 'in [0, 1)'), ('target_ema', 0 <= target_ema < 1, 'in [0, 1)'),
                      ('keep_last', keep_last >= 0, 'at least 0'), ('max_minutes', max_minutes >= 0, 'at least 0'),
                      ('ect_q', ect_q > 1, 'above 1'), ('grad_clip', grad_clip >= 0, 'at least 0 (0 = no clipping)'),
                      ('sample_sigmas', grid_sigmas and all(a > b for a, b in zip(grid_sigmas, grid_sigmas[1:]
                       + [sigma_min])), 'decreasing sigmas above sigma_min, comma-separated, like 80 or 80,0.8')]:
    if not ok:
        raise SystemExit(f"error: {key}={config[key]!r} must be {rule}")
# -----------------------------------------------------------------------------
# distributed setup: torchrun sets RANK, LOCAL_RANK, WORLD_SIZE
t_start = time.time()
if device.startswith('cuda') and not torch.cuda.is_available():
    raise SystemExit(f"error: device='{device}' but CUDA is not available here; pass --device=cpu")
ddp = int(os.environ.get('RANK', -1)) != -1
if ddp:
    rank, local_rank, world_size = int(os.environ['RANK']), int(os.environ['LOCAL_RANK']), int(os.environ['WORLD_SIZE'])
    if device.startswith('cuda'):
        device = f'cuda:{local_rank}'
        torch.cuda.set_device(device)
    dist.init_process_group(backend='nccl' if device.startswith('cuda') else 'gloo')
    stop_group = dist.new_group(backend='gloo')  # for the per-step "stop now?" vote, on the host: no GPU sync
else:
    rank, local_rank, world_size = 0, 0, 1
master = rank == 0
device_type = 'cuda' if device.startswith('cuda') else 'cpu'
if batch_size % (world_size * grad_accum):
    raise SystemExit(f"error: batch_size={batch_size} is not divisible by world_size x grad_accum = "
                     f"{world_size} x {grad_accum}; pick a batch_size that is a multiple of {world_size * grad_accum}")
micro_batch = batch_size // (world_size * grad_accum)
ckpt_path = os.path.join(out_dir, 'ckpt.pt')
if init_from == 'auto':
    init_from = 'resume' if os.path.exists(ckpt_path) else 'scratch'
elif init_from == 'scratch' and os.path.exists(ckpt_path):
    raise SystemExit(f"error: {ckpt_path} exists and init_from='scratch' would overwrite it; continue that run with "
                     f"--init_from=auto, or start this one in another --out_dir")
torch.backends.cuda.matmul.allow_tf32 = True
torch.backends.cudnn.allow_tf32 = True
ptdtype = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}[dtype]
ctx = nullcontext() if dtype == 'float32' else torch.autocast(device_type=device_type, dtype=ptdtype)

def rng(step, stream, dev='cpu'):
    """A generator seeded by (seed, step, stream): the same on every rank, and the same again after a resume."""
    return torch.Generator(dev).manual_seed(int(np.random.SeedSequence([seed, step, stream]).generate_state(1)[0]))

def load_checkpoint(path, hint):
    try:  # weights_only: tensors and plain types, nothing in the file can run code
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        why = 'it holds objects other than tensors and plain types' if isinstance(e, pickle.UnpicklingError) else \
            str(e).split('. ')[0][:200]
        raise SystemExit(f"error: cannot load {path} ({why}); {hint}")

# -----------------------------------------------------------------------------
# the teacher: a train_diffusion.py checkpoint, its EMA weights
teacher_path = os.path.join(teacher, 'ckpt.pt')
if not os.path.exists(teacher_path):
    raise SystemExit(f"error: teacher='{teacher}' holds no ckpt.pt; pass the out_dir of a train_diffusion.py run")
tckpt = load_checkpoint(teacher_path, "pass the out_dir of a train_diffusion.py run as --teacher")
if 'consistency' in tckpt:
    raise SystemExit(f"error: {teacher_path} is a consistency model; the teacher must be a train_diffusion.py run")
if tckpt['model_args'].get('control'):
    raise SystemExit(f"error: {teacher_path} follows control images, which distillation does not feed it yet; "
                     f"distill its base model")
tconf = tckpt['config']
diffusion = Diffusion(tconf['schedule'], tconf['prediction_type'], tconf['num_timesteps'], tconf['sigma_data'])
teacher_net = create_model(tconf['arch'], **tckpt['model_args']).to(device)
teacher_net.load_state_dict(tckpt['ema'])
teacher_net.requires_grad_(False).eval()
if device_type == 'cuda' and tconf['arch'].startswith('UNet'):  # the faster layout for convolutions on tensor cores
    teacher_net = teacher_net.to(memory_format=torch.channels_last)  # (the student and its target are copies)
null_label = teacher_net.config.num_classes
del tckpt

# data: the teacher's, uint8 arrays (N, H, W, C) memory-mapped from data/<dataset>/
dataset, hflip, class_cond = tconf['dataset'], tconf['hflip'], tconf['class_cond']
data_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data', dataset)
try:
    data = {'train': (np.load(os.path.join(data_dir, 'train_x.npy'), mmap_mode='r'),
                      np.load(os.path.join(data_dir, 'train_y.npy')))}
except (OSError, ValueError) as e:
    raise SystemExit(f"error: the teacher's dataset '{dataset}' is missing or unreadable in {data_dir} ({e!r}); "
                     f"prepare it as for the teacher's run")
if data['train'][0].dtype == np.float16:  # train_ae.py's latents: the sample grids would need its decoder
    raise SystemExit(f"error: the teacher trained on latents ({data_dir}); distill_consistency.py distils pixel-space "
                     f"teachers only")
N_train, (H, W, C) = len(data['train'][0]), data['train'][0].shape[1:]
if (C, H) != (teacher_net.config.in_channels, teacher_net.config.image_size) or data['train'][0].dtype != np.uint8:
    raise SystemExit(f"error: {data_dir}/train_x.npy is {data['train'][0].dtype} {data['train'][0].shape}, but the "
                     f"teacher takes uint8 (N, {teacher_net.config.image_size}, ..., {teacher_net.config.in_channels})")

def my_slice(micro):
    """This rank's part of the global batch in micro-step `micro`: micro-steps outside, ranks inside."""
    lo = (micro * world_size + rank) * micro_batch
    return slice(lo, lo + micro_batch)

def get_batch(step, micro):
    """This rank's images of micro-step `micro` of the global batch of `step` in [-1, 1], NCHW, and labels."""
    g = rng(step, 0)
    idx = np.sort(torch.randint(N_train, (batch_size,), generator=g).numpy())
    flip = torch.rand(batch_size, generator=g) < 0.5
    idx, flip = idx[my_slice(micro)], flip[my_slice(micro)]
    x, y = torch.from_numpy(data['train'][0][idx]), torch.from_numpy(data['train'][1][idx])
    if hflip:
        x = torch.where(flip[:, None, None, None], x.flip(2), x)
    if device_type == 'cuda':
        x, y = x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    y = y.to(device) if class_cond else torch.full_like(y, null_label, device=device)
    return x.to(device).permute(0, 3, 1, 2).float().div(127.5).sub(1), y

# -----------------------------------------------------------------------------
# the student (the teacher's weights), its EMA for sampling, the target, optimizer, and the checkpoint to resume from
model = copy.deepcopy(teacher_net).requires_grad_(True).train()
model_config = model.config
model.activation_checkpointing = activation_checkpointing
ema = copy.deepcopy(model).requires_grad_(False).eval()
target_net = copy.deepcopy(model).requires_grad_(False) if target == 'ema' else model  # train mode: same dropout
decay, no_decay = [p for p in model.parameters() if p.dim() >= 2], [p for p in model.parameters() if p.dim() < 2]
optimizer = torch.optim.AdamW([{'params': decay, 'weight_decay': weight_decay}, {'params': no_decay, 'weight_decay': 0.0}],
                              lr=lr, betas=(beta1, beta2), fused=True)
scaler = torch.amp.GradScaler(device_type, enabled=dtype == 'float16')
start_step, saved_step, wandb_id = 0, None, None
if init_from == 'resume':
    if not os.path.exists(ckpt_path):
        raise SystemExit(f"error: init_from='resume' but {ckpt_path} does not exist; use --init_from=scratch")
    ckpt = load_checkpoint(ckpt_path, "restore a checkpoint this script wrote, or start in another --out_dir")
    if ckpt.get('model_args') != asdict(model_config):
        raise SystemExit(f"error: {ckpt_path} holds another model than the teacher's {model_config.__class__.__name__}; "
                         f"resume with the teacher it was distilled from, or choose another out_dir")
    model.load_state_dict(ckpt['model'])
    ema.load_state_dict(ckpt['ema'])
    if target == 'ema':
        target_net.load_state_dict(ckpt['target'])
    optimizer.load_state_dict(ckpt['optimizer'])
    scaler.load_state_dict(ckpt['scaler'])
    start_step, saved_step, wandb_id = ckpt['step'], ckpt['step'], ckpt['wandb_id']
    rng_state = ckpt['rng'][rank] if len(ckpt['rng']) == world_size else None
    if rng_state is not None:
        torch.set_rng_state(rng_state['torch'].cpu())
        if device_type == 'cuda':
            torch.cuda.set_rng_state(rng_state['cuda'].cpu())
        np.random.set_state(('MT19937', np.array(rng_state['numpy'][0], dtype=np.uint32), *rng_state['numpy'][1:]))
        random.setstate((rng_state['python'][0], tuple(rng_state['python'][1]), rng_state['python'][2]))
    del ckpt
    if master:
        print(f"resuming {ckpt_path} at step {start_step}")
else:
    torch.manual_seed(seed + rank)
    np.random.seed(seed + rank)
    random.seed(seed + rank)
if master:
    try:
        os.makedirs(out_dir, exist_ok=True)
        tempfile.TemporaryFile(dir=out_dir).close()
    except OSError as e:
        raise SystemExit(f"error: cannot write to out_dir='{out_dir}' ({e.strerror}); pass an --out_dir you can write to")
    print(f"{world_size} rank(s) on {device_type}, {micro_batch} images per micro-step, {batch_size} per step; "
          f"teacher {teacher_path}: {tconf['arch']}, {tconf['schedule']} schedule, {tconf['prediction_type']} prediction")
raw_model = model
if compile:
    model = torch.compile(model)
if ddp:
    model = DDP(model, device_ids=[local_rank] if device_type == 'cuda' else None)
params, ema_params = list(raw_model.parameters()), list(ema.parameters())
target_params = list(target_net.parameters())
# FLOPs per image of a step: the student's forward and backward (3 forwards), the target's forward, and for 'cd' the
# teacher's Heun step (2 evaluations, each on a doubled batch under guidance)
flops_per_image = 4 * raw_model.flops_per_sample() + (mode == 'cd') * 2 * (1 + (cfg_scale != 1.0)) * \
    teacher_net.flops_per_sample()
if peak_tflops == 0 and device_type == 'cuda':  # dense tensor-core peaks: bf16's (SXM unless named), TF32's half
    name = torch.cuda.get_device_name()
    peak_tflops = next((v for k, v in {'H100 PCIe': 756.5, 'H100 NVL': 835.5, 'H100': 989.4, 'H200': 989.4,
                                       'A100': 312.0}.items() if k in name), 0.0) / (2 if dtype == 'float32' else 1)

# -----------------------------------------------------------------------------
# the consistency objective
ramp = torch.linspace(0, 1, num_scales, dtype=torch.float64)
sigmas = ((sigma_min ** (1 / rho) + ramp * (sigma_max ** (1 / rho) - sigma_min ** (1 / rho))) ** rho).to(device)
if sigma_sampling == 'lognormal':  # iCT: the mass of N(p_mean, p_std) in log sigma that falls in each interval
    cdf = torch.special.erf((sigmas.log() - p_mean) / (math.sqrt(2) * p_std))
    p_interval = cdf[1:] - cdf[:-1]
else:
    p_interval = torch.ones(num_scales - 1, dtype=torch.float64, device=device)
huber_c = 0.00054 * math.sqrt(C * H * W)

def sample_sigmas(step, g):
    """Each image's pair of noise levels (hi, lo), hi > lo >= sigma_min, for the global batch of `step`."""
    if mode == 'cd':
        n = torch.multinomial(p_interval.float(), batch_size, replacement=True, generator=g)
        return sigmas[n + 1], sigmas[n]
    t = (p_mean + p_std * torch.randn(batch_size, generator=g, device=g.device, dtype=torch.float64)).exp()
    t = t.clamp(2 * sigma_min, sigma_max)
    gap = (1 + ect_k * torch.sigmoid(-ect_b * t)) / ect_q ** (step * ect_stages // max_steps)
    return t, (t * (1 - gap)).clamp(min=sigma_min)

def teacher_denoiser(x, s, y):
    """The teacher's D(x, s), guided by cfg_scale: D_u + cfg_scale (D_c - D_u)."""
    with ctx:
        if cfg_scale == 1.0:
            return diffusion.denoiser(teacher_net, x, s, y).float()
        D_c, D_u = diffusion.denoiser(teacher_net, torch.cat([x, x]), torch.cat([s, s]),
                                      torch.cat([y, torch.full_like(y, null_label)])).float().chunk(2)
    return D_u + cfg_scale * (D_c - D_u)

@torch.no_grad()
def teacher_heun_step(x, hi, lo, y):
    """One Heun step of the teacher's probability-flow ODE dx/ds = (x - D(x, s)) / s from s = hi to s = lo."""
    d = (x - teacher_denoiser(x, hi, y)) / bcast(hi, x)
    x_euler = x + bcast(lo - hi, x) * d
    d_lo = (x_euler - teacher_denoiser(x_euler, lo, y)) / bcast(lo, x)
    return x + bcast(lo - hi, x) * (d + d_lo) / 2

def consistency_loss(x0, y, z, hi, lo):
    """Per image: d(f(x0 + hi z, hi), f_target(x_lo, lo)) / (hi - lo)."""
    x_hi = x0 + bcast(hi, x0) * z
    x_lo = teacher_heun_step(x_hi, hi, lo, y) if mode == 'cd' else x0 + bcast(lo, x0) * z
    with torch.random.fork_rng(devices=[device] if device_type == 'cuda' else []):  # the target redraws the
        with ctx:                                                                # student's dropout masks
            pred = diffusion.consistency(model, x_hi, hi, y, sigma_min).float()
    with torch.no_grad(), ctx:
        tgt = diffusion.consistency(target_net, x_lo, lo, y, sigma_min).float()
    sq = (pred - tgt).pow(2).flatten(1).sum(1)
    dist_ = (sq + huber_c ** 2).sqrt() - huber_c if loss_type == 'pseudo_huber' else sq / x0[0].numel()
    return dist_ / (hi - lo).float()

def save_grid(x, path, ncol=8):
    x = ((x.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).cpu()
    x = torch.cat([x, x.new_zeros((-len(x) % ncol, *x.shape[1:]))])
    B, c, h, w = x.shape
    Image.fromarray(x.view(B // ncol, ncol, c, h, w).permute(0, 3, 1, 4, 2).reshape(B // ncol * h, ncol * w, c)
                    .squeeze(-1).numpy()).save(path)

def rng_state():
    return {'torch': torch.get_rng_state(), 'cuda': torch.cuda.get_rng_state() if device_type == 'cuda' else None,
            'numpy': [np.random.get_state()[1].tolist(), *np.random.get_state()[2:]], 'python': random.getstate()}

def last_good():
    return f"{ckpt_path} (step {saved_step}) is intact" if saved_step else f"no checkpoint was written to {out_dir}"

def save_checkpoint(step):
    """As train_diffusion.py: RNG states of every rank, finite weights only, written atomically by the master."""
    global saved_step
    if not torch.stack([p.isfinite().all() for p in params + ema_params]).all():
        raise SystemExit(f"error: the weights are not finite at step {step}, so they are not saved; {last_good()}: "
                         f"resume it with a lower lr or grad_clip")
    states = [None] * world_size
    if ddp:
        dist.all_gather_object(states, rng_state())
    else:
        states = [rng_state()]
    if master:
        ckpt = {'model': raw_model.state_dict(), 'ema': ema.state_dict(), 'optimizer': optimizer.state_dict(),
                'scaler': scaler.state_dict(), 'model_args': asdict(model_config), 'step': step,
                'images_seen': step * batch_size, 'config': config, 'rng': states, 'wandb_id': wandb_id,
                'teacher_config': tconf, 'consistency': {'sigma_min': sigma_min, 'sigma_max': sigma_max}}
        if target == 'ema':
            ckpt['target'] = target_net.state_dict()
        try:
            with open(ckpt_path + '.tmp', 'wb') as f:
                torch.save(ckpt, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(ckpt_path + '.tmp', ckpt_path)
        except (OSError, RuntimeError) as e:
            os.remove(ckpt_path + '.tmp')
            why = e.strerror if isinstance(e, OSError) else 'torch.save could not write it'
            raise SystemExit(f"error: writing {ckpt_path} failed at step {step} ({why}); {last_good()}: make room "
                             f"and re-run the same command")
        if keep_last:
            kept = os.path.join(out_dir, f'ckpt_{step:07d}.pt')
            if not os.path.exists(kept):
                os.link(ckpt_path, kept)
            for old in sorted(glob.glob(os.path.join(out_dir, 'ckpt_[0-9]*.pt')))[:-keep_last]:
                os.remove(old)
        print(f"saved {ckpt_path} at step {step}")
    saved_step = step

grid_z = torch.randn((64, C, H, W), generator=rng(0, 3, device), device=device)
grid_y = torch.arange(64, device=device) % null_label if class_cond and null_label else torch.full((64,), null_label, device=device)

# -----------------------------------------------------------------------------
# logging: stdout, out_dir/metrics.csv, and wandb
fields = ['step', 'kimg', 'loss', 'lr', 'grad_norm', 'skipped', 'ms_per_step', 'img_per_s', 'tflops', 'mfu', 'ect_stage']
metrics_path = os.path.join(out_dir, 'metrics.csv')
if master:
    rows = list(csv.DictReader(open(metrics_path))) if init_from == 'resume' and os.path.exists(metrics_path) else []
    with open(metrics_path + '.tmp', 'w', newline='') as f:
        csv.DictWriter(f, fields).writeheader()
        csv.DictWriter(f, fields).writerows(r for r in rows if None not in r.values() and int(r['step']) <= start_step)
    os.replace(metrics_path + '.tmp', metrics_path)
    if wandb_log:
        import wandb
        wandb_run = wandb.init(project=wandb_project, name=wandb_run_name, config=config, dir=out_dir,
                               id=wandb_id, resume='allow')
        wandb_id = wandb_run.id

def log(row):
    row = {k: round(v, 6) if isinstance(v, float) else v for k, v in row.items()}
    with open(metrics_path, 'a', newline='') as f:
        csv.DictWriter(f, fields).writerow(row)
    if wandb_log:
        wandb.log(row, step=row['step'])

# -----------------------------------------------------------------------------
# training loop
stop_signal = 0

def request_stop(signum, frame):  # SIGTERM (a scheduler, torchrun) or SIGUSR1 (SLURM's --signal warning)
    global stop_signal
    stop_signal = signum

for sig in (signal.SIGTERM, signal.SIGUSR1):
    signal.signal(sig, request_stop)
x0, y = get_batch(start_step, 0)  # the first batch; each later one is fetched while the current step runs
loss_sum = torch.zeros((), device=device)
skipped, streak, worst_streak = (torch.zeros((), device=device) for _ in range(3))
t_log, steps_since_log = time.time(), 0
for step in range(start_step, max_steps):
    for group in optimizer.param_groups:
        group['lr'] = lr * min(1.0, (step + 1) / max(1, warmup_steps))
    g = rng(step, 1, device)  # noise levels and noise for the whole global batch
    hi_all, lo_all = sample_sigmas(step, g)
    z_all = torch.randn((batch_size, C, H, W), generator=g, device=device)
    step_loss = torch.zeros((), device=device)
    for micro in range(grad_accum):
        sl = my_slice(micro)
        if ddp:
            model.require_backward_grad_sync = micro == grad_accum - 1
        loss = consistency_loss(x0, y, z_all[sl], hi_all[sl], lo_all[sl]).mean() / grad_accum
        if micro + 1 < grad_accum or step + 1 < max_steps:  # fetch the next batch while this step runs
            x0, y = get_batch(step, micro + 1) if micro + 1 < grad_accum else get_batch(step + 1, 0)
        scaler.scale(loss).backward()
        step_loss += loss.detach()
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float('inf'))
    bad = ~grad_norm.isfinite()
    optimizer.found_inf = bad.float()  # fused AdamW skips a non-finite update on the device
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():
        torch._foreach_lerp_(ema_params, params, (1 - min(ema_decay, (1 + step) / (10 + step))) * ~bad)
        if target == 'ema':
            torch._foreach_lerp_(target_params, params, (1 - target_ema) * ~bad)
    loss_sum += torch.where(bad, 0, step_loss)
    skipped += bad
    streak = (streak + 1) * bad
    worst_streak = torch.maximum(worst_streak, streak)
    steps_since_log += 1

    last = step + 1 == max_steps
    stop = torch.tensor([stop_signal, max_minutes > 0 and time.time() - t_start > 60 * max_minutes])
    if ddp:
        dist.all_reduce(stop, op=dist.ReduceOp.MAX, group=stop_group)
    stop = signal.Signals(int(stop[0])).name if stop[0] else f'max_minutes={max_minutes}' if stop[1] else None
    log_step = (step + 1) % log_interval == 0 or last or stop
    if log_step:
        if ddp:
            dist.all_reduce(loss_sum, op=dist.ReduceOp.AVG)
        n_skipped = int(skipped.item())
        loss_avg = (loss_sum / (steps_since_log - n_skipped)).item()
        dt = (time.time() - t_log) / steps_since_log
        row = dict(step=step + 1, kimg=(step + 1) * batch_size / 1e3, loss=loss_avg, lr=optimizer.param_groups[0]['lr'],
                   grad_norm=grad_norm.item(), skipped=n_skipped, ms_per_step=dt * 1e3, img_per_s=batch_size / dt,
                   ect_stage=step * ect_stages // max_steps if mode == 'ect' else '')
        row['tflops'] = flops_per_image * row['img_per_s'] / 1e12
        row['mfu'] = row['tflops'] / (peak_tflops * world_size) if peak_tflops else float('nan')
        if master:
            print(f"step {step + 1}/{max_steps} | loss {loss_avg:.4f} | grad norm {row['grad_norm']:.3f} | "
                  f"{dt * 1e3:.0f} ms/step | {row['img_per_s']:.0f} img/s | {row['tflops']:.2f} TFLOP/s | "
                  f"mfu {format(row['mfu'], '.1%') if peak_tflops else 'n/a'}" + (f" | ect stage {row['ect_stage']}"
                  if mode == 'ect' else '') + (f" | {n_skipped} non-finite update(s) skipped" if n_skipped else ''))
            log(row)
        if worst_streak.item() >= max_nonfinite:
            raise SystemExit(f"error: {int(worst_streak.item())} updates in a row had a non-finite gradient norm and were "
                             f"skipped (max_nonfinite={max_nonfinite}) by step {step + 1}; {last_good()}: resume it with "
                             f"a lower lr or grad_clip")
        for t in (loss_sum, skipped, worst_streak):
            t.zero_()
        steps_since_log = 0
    if master and ((step + 1) % sample_interval == 0 or last):
        with ctx:
            x = diffusion.consistency_sample(ema, grid_z, grid_y, grid_sigmas, sigma_min, generator=rng(0, 4, device))
        save_grid(x.clamp(-1, 1), os.path.join(out_dir, f'samples_{step + 1:07d}.png'))
    if (step + 1) % ckpt_interval == 0 or last or stop:
        save_checkpoint(step + 1)
    if stop and not last:
        if master:
            print(f"stopped at step {step + 1} of {max_steps} ({stop}); the same command continues the run")
        break
    if log_step:
        t_log = time.time()

if master and wandb_log:
    wandb.finish()
if ddp:
    dist.barrier()  # no rank tears its groups down while another still talks to it
    dist.destroy_process_group()
