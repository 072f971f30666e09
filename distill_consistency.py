"""
Turns a train_diffusion.py run into a consistency model, which draws an image in one network call or
a few. (MeanFlow, which does so from scratch, is train_meanflow.py.)

    python distill_consistency.py config/mnist_cd.py                   # teacher: out-mnist-dit
    torchrun --standalone --nproc_per_node=8 distill_consistency.py --teacher=out-dit-b \
        --out_dir=out-cd-b

mode='cd', consistency distillation (Song et al. 2023): x0 + sigma_{n+1} z, one Heun step of the
teacher's probability-flow ODE down to sigma_n on a Karras grid of num_scales sigmas, and the
student's output there must match a target network's output at the teacher's point. mode='ect', easy
consistency tuning (Geng et al. 2024): no teacher; the two points share the data's own noise,
x0 + t z and x0 + r z with r / t = 1 - (1 + k sigmoid(-b t)) / q^stage, so the gap shrinks stage by
stage from plain denoising (r = sigma_min) towards consistency.

Both start the student from the teacher's EMA weights, read through one conversion to a denoiser
D(x, sigma) whatever the teacher's schedule and prediction type (diffusion.Diffusion.denoiser), and give
it the boundary condition f(x, sigma_min) = x (diffusion.Diffusion.consistency). The target is an EMA of
the student (target='ema', mu = target_ema) or the student itself without gradient
(target='stopgrad', as iCT); the loss is pseudo-Huber (c = 0.00054 sqrt(dim)) or squared L2,
weighted by 1 / (sigma_{n+1} - sigma_n); noise levels are drawn log-normal as in iCT, or uniformly
over the grid's intervals as in CD.

The rest is train_diffusion.py's: seeded draws per step, DDP, autocast, EMA, clipping, and
(bookkeeping.py) atomic checkpoints with exact resume, preemption and the non-finite guard.
sample.py samples the result: --sigmas=80 (one step) or e.g. --sigmas=80,0.8 (two).
"""
import copy
import math
import os
from contextlib import nullcontext
from dataclasses import asdict

import bookkeeping as bk  # (first: from here on a Ctrl-C is one line, not a traceback)
import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import common
import dataformat
from diffusion import Diffusion, bcast, randn
from model import compile_for_training, create_model

# -----------------------------------------------------------------------------
# defaults, overridden by config/*.py and --key=value
# I/O
out_dir = 'out-cd'
teacher = 'out-mnist-dit'  # a train_diffusion.py out_dir: its EMA weights teach and start the student
# 'auto': 'resume' if out_dir holds ckpt.pt, else 'scratch' (which never overwrites a checkpoint)
init_from = 'auto'
keep_last = 0  # also keep the newest keep_last checkpoints as out_dir/ckpt_<step>.pt (hard links)
max_minutes = 0.0  # finish the step, save and exit 0 after this much wall time; 0 = no limit
log_interval = 50  # steps between log lines (the only host syncs of the loop)
sample_interval = 500  # steps between EMA sample grids at sample_sigmas (and one at the end)
# FID during training (evaluate.py's): the EMA's images, with the same noise and labels every time
fid_interval = 0  # steps between FIDs, logged as fid; 0 = none
fid_images = 10000  # images per FID, shared by the ranks
fid_ref = ''  # an ADM reference batch .npz or a prepared dataset ('' = this run's dataset)
fid_inception = ''  # the FID Inception weights, a local file (docs/guide.md, 'Evaluation protocol')
ckpt_interval = 500  # steps between checkpoints (and one at the end)
wandb_log = False  # project and run name: $WANDB_PROJECT and $WANDB_NAME, else the run's kind and out_dir
# consistency
mode = 'cd'  # 'cd' (distillation through the teacher's ODE) or 'ect' (the data's noise)
num_scales = 18  # cd: N sigmas on the grid (Song et al. 2023: 18 on CIFAR-10, 40 on ImageNet 64)
sigma_min = 0.002  # the boundary f(x, sigma_min) = x, and the grid's low end (EDM's)
sigma_max = 80.0  # cd: the grid's high end; ect: the largest t drawn
rho = 7.0  # cd: the grid is evenly spaced in sigma^(1/rho) (Karras et al. 2022, eq. 5)
# cd: 'lognormal' (iCT: log sigma ~ N(p_mean, p_std^2)) or 'uniform' over the grid's intervals (CD)
sigma_sampling = 'lognormal'
p_mean = -1.1  # the log-normal of sigma (cd) and of t (ect), iCT's
p_std = 2.0
target = 'stopgrad'  # 'stopgrad': the student without gradient (iCT, ECT); 'ema': an EMA of it
target_ema = 0.95  # mu of target='ema' (Song et al. 2023)
# 'pseudo_huber': sqrt(|a - b|^2 + c^2) - c, c = 0.00054 sqrt(dim) (iCT); or 'l2', the mean square
loss_type = 'pseudo_huber'
cfg_scale = 1.0  # guidance (1 = none) of cd's teacher ODE
ect_stages = 8  # ect: stages of the gap's schedule, evenly over max_steps
ect_q = 2.0  # ect: the gap shrinks by q each stage
ect_k = 8.0  # ect: r / t = 1 - (1 + k sigmoid(-b t)) / q^stage
ect_b = 1.0
sample_sigmas = '80'  # grids during training: comma-separated sigmas, one network call each
# optimization
batch_size = 128  # images per optimizer step, over all ranks and micro-steps
grad_accum = 1  # micro-steps per optimizer step on each rank
max_steps = 2000
lr = 1e-4
min_lr = 0.0  # the cosine schedule's floor
lr_schedule = 'constant'  # after warm-up: 'constant' (consistency training's), or 'cosine' to min_lr
lr_decay_steps = 0  # length of the cosine, warm-up included; 0 = max_steps (set it to stop early)
warmup_steps = 0
weight_decay = 0.0  # AdamW, on weights of 2 or more dimensions only
beta1 = 0.9
beta2 = 0.999
grad_clip = 1.0  # max global gradient norm; 0 = no clipping (the norm is logged either way)
max_nonfinite = 20  # updates with a non-finite gradient norm are skipped; this many in a row stop
ema_decay = 0.999  # the EMA sample.py uses, with warm-up: min(ema_decay, (1 + step) / (10 + step))
# system
device = 'cuda' if torch.cuda.is_available() else 'cpu'
dtype = 'bfloat16' if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else 'float32'
compile = torch.cuda.is_available()  # torch.compile the student (on CPU it gains nothing)
activation_checkpointing = False  # recompute the student's blocks in the backward: less memory
peak_tflops = 0.0  # per-device peak for MFU; 0 = known GPUs' dense bf16 (float32: TF32) peak
seed = 0
# -----------------------------------------------------------------------------
config_keys = [k for k, v in globals().items() if not k.startswith('_') and isinstance(v, (int, float, bool, str))]
exec(open(os.path.join(os.path.dirname(bk.__file__), 'configurator.py')).read())  # (the kit's; it also sets overridden)
config = {k: globals()[k] for k in config_keys}
try:
    grid_sigmas = [float(s) for s in sample_sigmas.split(',')]
except ValueError:
    grid_sigmas = []
grid_ok = grid_sigmas and all(a > b for a, b in zip(grid_sigmas, grid_sigmas[1:] + [sigma_min]))
common.check_config(config, choices=[
    ('init_from', ('auto', 'scratch', 'resume')), ('mode', ('cd', 'ect')),
    ('sigma_sampling', ('lognormal', 'uniform')), ('target', ('stopgrad', 'ema')),
    ('loss_type', ('pseudo_huber', 'l2')), ('lr_schedule', ('cosine', 'constant')),
    ('dtype', ('float32', 'bfloat16'))],  # (float16 would need loss scaling; bfloat16 needs none)
    counts=['batch_size', 'grad_accum', 'max_steps', 'log_interval', 'sample_interval',
            'ckpt_interval', 'ect_stages', 'max_nonfinite'],
    rules=[('num_scales', num_scales >= 2, 'at least 2'),
           ('sigma_min', 0 < sigma_min < sigma_max, 'positive and below sigma_max'),
           ('rho', rho > 0, 'positive'), ('p_std', p_std > 0, 'positive'),
           ('sigma_sampling', mode == 'cd' or sigma_sampling == 'lognormal',
            "'lognormal' under mode='ect', which draws t log-normal"),
           ('target_ema', 0 <= target_ema < 1, 'in [0, 1)'), ('ect_q', ect_q > 1, 'above 1'),
           ('sample_sigmas', grid_ok, 'decreasing sigmas above sigma_min, like 80,0.8'),
           ('teacher', teacher, "a train_diffusion.py out_dir (MeanFlow from scratch: train_meanflow.py)")])
common.check_applied(overridden, config, {  # (every key is applied or refused)
    **{k: mode != 'cd' and f"mode='{mode}' (no teacher's grid)" for k in ('num_scales', 'rho')},
    'cfg_scale': mode == 'ect' and "mode='ect' (no teacher's ODE)",
    **{k: mode != 'ect' and f"mode='{mode}'" for k in ('ect_stages', 'ect_q', 'ect_k', 'ect_b')},
    'target_ema': target != 'ema' and f"target='{target}'",
    **{k: mode == 'cd' and sigma_sampling == 'uniform' and "sigma_sampling='uniform'" for k in ('p_mean', 'p_std')}})
# -----------------------------------------------------------------------------
# DDP: torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; NCCL on GPUs, gloo on CPUs
device_type = common.check_device(device)
if 'RANK' in os.environ:
    device = f"cuda:{os.environ['LOCAL_RANK']}" if device_type == 'cuda' else device
    dist.init_process_group('nccl' if device_type == 'cuda' else 'gloo')
# the run: out_dir and its lock, resume, sums, the log, checkpoints (bookkeeping.Run)
run = bk.start_run(config, 'consistency', device, inputs=[('teacher', teacher)],
                   fixed=['mode', 'sigma_min', 'cfg_scale'])  # (what the student learns: a resume keeps it)
# bf16 autocast around the forward passes (float32: none)
ctx = torch.autocast(device_type, dtype=getattr(torch, dtype)) if dtype != 'float32' else nullcontext()

# -----------------------------------------------------------------------------
# the teacher: a train_diffusion.py checkpoint, its EMA weights
teacher_path = os.path.join(teacher, 'ckpt.pt')
if not os.path.exists(teacher_path):
    raise SystemExit(f"error: teacher='{teacher}' holds no ckpt.pt; pass the out_dir of a "
                     f"train_diffusion.py run")
tckpt = common.load_checkpoint(teacher_path, "pass a train_diffusion.py run's out_dir as --teacher",
                               device, kinds=['diffusion'])
if tckpt['model_args'].get('control'):
    raise SystemExit(f"error: {teacher_path} follows control images, which distillation does not "
                     f"feed it yet; distill its base model")
tconf = tckpt['config']
teacher_net = create_model(tconf['arch'], **tckpt['model_args']).to(device)
teacher_net.load_state_dict(tckpt['ema'])
teacher_net.requires_grad_(False).eval()
# the faster layout for convolutions on tensor cores (the student and its target are copies)
if device_type == 'cuda' and tconf['arch'].startswith('UNet'):
    teacher_net = teacher_net.to(memory_format=torch.channels_last)
del tckpt
diffusion = Diffusion(tconf['schedule'], tconf['prediction_type'], tconf['num_timesteps'],
                      tconf['sigma_data'])

# data: the teacher's, uint8 images (N, H, W, C) memory-mapped from data/<dataset>/
dataset, hflip, class_cond = tconf['dataset'], tconf['hflip'], tconf['class_cond']
data_dir, meta, data = dataformat.load_dataset(dataset, splits=('train',), latent_ok=True)
if meta.get('latent'):
    raise SystemExit(f"error: the teacher {teacher_path} trained on the latents of {data_dir}; "
                     f"distill_consistency.py trains on pixels only")
train_x, train_y = data['train']
H, W, C = train_x.shape[1:]
null_label = teacher_net.config.num_classes
if (C, H) != (teacher_net.config.in_channels, teacher_net.config.image_size):
    raise SystemExit(f"error: {data_dir} holds {H} x {W} x {C} images, but the teacher takes "
                     f"{teacher_net.config.image_size} x {teacher_net.config.image_size} x "
                     f"{teacher_net.config.in_channels}; prepare the dataset as for the teacher's "
                     f"run")

def get_batch(step, micro):
    """This rank's images of micro-step `micro` of the global batch of `step`, in [-1, 1] and NCHW,
    and their labels."""
    g = run.rng(step, 0)
    # sorted: kinder to mmap
    idx = np.sort(torch.randint(len(train_x), (batch_size,), generator=g).numpy())
    flip = torch.rand(batch_size, generator=g) < 0.5
    idx, flip = idx[run.slice(micro)], flip[run.slice(micro)]
    x, y = torch.from_numpy(train_x[idx]), torch.from_numpy(train_y[idx])
    if hflip:
        x = torch.where(flip[:, None, None, None], x.flip(2), x)
    y = y.to(device) if class_cond else torch.full_like(y, null_label, device=device)
    return dataformat.to_device(x, device) / 127.5 - 1, y

# -----------------------------------------------------------------------------
# the student (the teacher's weights), its EMA for sampling, the target, optimizer, and the resume
model = copy.deepcopy(teacher_net).requires_grad_(True).train()
model_config = model.config
model.activation_checkpointing = activation_checkpointing
ema = copy.deepcopy(model).requires_grad_(False).eval()
# target='ema': a copy of its own; 'stopgrad': the student itself (in train mode: the same dropout)
target_net = copy.deepcopy(model).requires_grad_(False) if target == 'ema' else model
params, ema_params = list(model.parameters()), list(ema.parameters())
target_params = list(target_net.parameters())
optimizer = common.adamw(params, lr, (beta1, beta2), weight_decay)
# the teacher's diffusion says how the student's output reads as a denoiser
keys = ('arch', 'schedule', 'prediction_type', 'num_timesteps', 'sigma_data')
ckpt = run.resume(model_args=asdict(model_config), teacher_config={k: tconf[k] for k in keys},
                  model=model, ema=ema, optimizer=optimizer)
if ckpt and target == 'ema':  # (a run that switches to target='ema' starts it from the student)
    common.load_state(target_net, ckpt.get('target') or ckpt['model'], run.ckpt_path, 'target')
del ckpt
if run.master:
    print(f"teacher {teacher_path}: {tconf['arch']}, {tconf['schedule']} schedule, "
          f"{tconf['prediction_type']} prediction")
raw_model = model
if compile:  # (model.compile_for_training says what runs compiled, and why)
    model = compile_for_training(model)
if run.ddp:
    model = DDP(model, device_ids=[device] if device_type == 'cuda' else None)
# FLOPs per image of a step: the student's forward and backward (3 forwards), the target's forward,
# and for 'cd' the teacher's Heun step (2 evaluations, each on a doubled batch under guidance)
teacher_calls = (mode == 'cd') * 2 * (1 + (cfg_scale != 1.0))
flops_per_image = raw_model.flops_per_sample() * (4 + teacher_calls)

# -----------------------------------------------------------------------------
# the consistency objective

def karras_grid():
    """cd: num_scales sigmas from sigma_min to sigma_max, evenly spaced in sigma^(1/rho) (Karras et
    al. 2022, eq. 5), and the probability of drawing each interval (sigma_n, sigma_{n+1}): the mass
    that iCT's log-normal N(p_mean, p_std^2) of log sigma puts on it (Song & Dhariwal 2023), or the
    same for all ('uniform', CD)."""
    ramp = torch.linspace(0, 1, num_scales, dtype=torch.float64)
    root_min, root_max = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (root_min + ramp * (root_max - root_min)) ** rho
    if sigma_sampling == 'uniform':
        return sigmas, torch.ones(num_scales - 1, dtype=torch.float64)
    cdf = torch.special.erf((sigmas.log() - p_mean) / (math.sqrt(2) * p_std))
    return sigmas, cdf[1:] - cdf[:-1]
sigmas, p_interval = (v.to(device) for v in karras_grid())
if mode == 'cd' and not (sigmas.isfinite().all() and p_interval.sum() > 1e-12):
    raise SystemExit(f"error: rho={rho}, p_mean={p_mean}, p_std={p_std} put no noise level on the grid from "
                     f"sigma_min={sigma_min} to sigma_max={sigma_max}; use a log-normal centred inside it "
                     f"(iCT: p_mean=-1.1, p_std=2.0) and rho near 7")

def draw_sigmas(step, g):
    """Each image's pair of noise levels (hi, lo), hi > lo >= sigma_min, for the global batch of
    `step`. cd: two adjacent points of the grid; ect: t log-normal, r from the gap's schedule at the
    step's stage."""
    if mode == 'cd':
        n = torch.multinomial(p_interval.float(), batch_size, replacement=True, generator=g)
        return sigmas[n + 1], sigmas[n]
    normal = torch.randn(batch_size, generator=g, device=g.device, dtype=torch.float64)
    t = (p_mean + p_std * normal).exp()
    t = t.clamp(2 * sigma_min, sigma_max)
    gap = (1 + ect_k * torch.sigmoid(-ect_b * t)) / ect_q ** (step * ect_stages // max_steps)
    return t, (t * (1 - gap)).clamp(min=sigma_min)

def teacher_denoiser(x, s, y):
    """The teacher's D(x, s), guided by cfg_scale: D_u + cfg_scale (D_c - D_u)."""
    with ctx:
        if cfg_scale == 1.0:
            return diffusion.denoiser(teacher_net, x, s, y).float()
        y_both = torch.cat([y, torch.full_like(y, null_label)])
        D_c, D_u = diffusion.denoiser(teacher_net, torch.cat([x, x]), torch.cat([s, s]),
                                      y_both).float().chunk(2)
    return D_u + cfg_scale * (D_c - D_u)

@torch.no_grad()
def teacher_heun_step(x, hi, lo, y):
    """One Heun step of the teacher's probability-flow ODE dx/ds = (x - D(x, s)) / s, from s = hi to
    s = lo."""
    d = (x - teacher_denoiser(x, hi, y)) / bcast(hi, x)
    x_euler = x + bcast(lo - hi, x) * d
    d_lo = (x_euler - teacher_denoiser(x_euler, lo, y)) / bcast(lo, x)
    return x + bcast(lo - hi, x) * (d + d_lo) / 2

def consistency_loss(x0, y, z, hi, lo):
    """Per image: the distance between f(x0 + hi z, hi) and f_target(x_lo, lo), over hi - lo (iCT's
    weighting). The distance over the dim = C H W values: pseudo-Huber with c = 0.00054 sqrt(dim)
    (iCT), or the mean square."""
    x_hi = x0 + bcast(hi, x0) * z
    x_lo = teacher_heun_step(x_hi, hi, lo, y) if mode == 'cd' else x0 + bcast(lo, x0) * z
    # fork_rng gives the RNG back after the student's forward: the target's draws the same dropout
    # masks
    with torch.random.fork_rng(devices=[device] if device_type == 'cuda' else []), ctx:
        pred = diffusion.consistency(model, x_hi, hi, y, sigma_min).float()
    with torch.no_grad(), ctx:
        tgt = diffusion.consistency(target_net, x_lo, lo, y, sigma_min).float()
    sq, dim = (pred - tgt).pow(2).flatten(1).sum(1), x0[0].numel()
    if loss_type == 'l2':
        return sq / dim / (hi - lo).float()
    huber_c = 0.00054 * math.sqrt(dim)
    return ((sq + huber_c ** 2).sqrt() - huber_c) / (hi - lo).float()

# the sample grids: fixed noise and labels, the same picture of progress at every sample_interval
grid_z = torch.randn((64, C, H, W), generator=run.rng(0, 3, device), device=device)
grid_y = torch.arange(64, device=device) % null_label if class_cond and null_label else \
    torch.full((64,), null_label, device=device)

@torch.no_grad()
def sample_grid():
    """The EMA's samples of the grid's noise and labels at sample_sigmas, in [-1, 1]."""
    with ctx:
        x = diffusion.consistency_sample(ema, grid_z, grid_y, grid_sigmas, sigma_min,
                                         generator=run.rng(0, 4, device))
    return x.clamp(-1, 1)

# FID during training: the network on every rank, the reference's statistics on rank 0
if fid_interval:
    import evaluate
    inception, fid_stats = evaluate.training_setup(fid_inception, fid_ref or data_dir, H, device, run)

def fid():
    """The FID of fid_images EMA samples at sample_sigmas (rank 0's; None on the others): sample i's
    noise, fresh noise included, from a generator seeded by (seed, i), so the images do not depend on
    the world size; its label i % classes."""
    def generate(lo, n):
        gens = [run.rng(i, 5, device) for i in range(lo, lo + n)]
        y = torch.arange(lo, lo + n, device=device) % null_label if class_cond and null_label else \
            torch.full((n,), null_label, device=device)
        with ctx:
            z = randn((n, C, H, W), gens, device)
            x = diffusion.consistency_sample(ema, z, y, grid_sigmas, sigma_min, generator=gens)
        return x.clamp(-1, 1)
    return evaluate.training_fid(generate, fid_images, run.micro_batch, inception, fid_stats, run)

def get_lr(step):
    """The learning rate of a step: a linear warm-up over warmup_steps, then constant, or a cosine
    from lr down to min_lr at lr_decay_steps (warm-up included; 0 = max_steps) that stays there."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if lr_schedule == 'constant':
        return lr
    progress = min(1.0, (step - warmup_steps) / max(1, (lr_decay_steps or max_steps) - warmup_steps))
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))

# -----------------------------------------------------------------------------
# training loop
x0, y = get_batch(run.step, 0)  # the first batch; each later one is fetched while the step runs
for step in range(run.step, max_steps):
    lr_now = get_lr(step)
    for group in optimizer.param_groups:
        group['lr'] = lr_now
    # noise levels and noise for the whole global batch
    g = run.rng(step, 1, device)
    hi_all, lo_all = draw_sigmas(step, g)
    z_all = torch.randn((batch_size, C, H, W), generator=g, device=device)
    for micro in range(grad_accum):
        sl = run.slice(micro)
        if run.ddp:  # all-reduce the gradients on the last micro-step only
            model.require_backward_grad_sync = micro == grad_accum - 1
        loss = consistency_loss(x0, y, z_all[sl], hi_all[sl], lo_all[sl]).mean()
        run.add(loss=loss)
        # fetch the next batch while this step runs
        if micro + 1 < grad_accum or step + 1 < max_steps:
            x0, y = get_batch(step, micro + 1) if micro + 1 < grad_accum else get_batch(step + 1, 0)
        (loss / grad_accum).backward()
    # clip, then skip a non-finite update on the device (fused AdamW reads found_inf; no host sync)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip or float('inf'))
    bad = ~grad_norm.isfinite()
    optimizer.found_inf = bad.float()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    # the EMA with warm-up, and target='ema''s with mu = target_ema (a skipped update leaves both
    # alone)
    with torch.no_grad():
        weight = (1 - min(ema_decay, (1 + step) / (10 + step))) * ~bad
        torch._foreach_lerp_(ema_params, params, weight)
        if target == 'ema':
            torch._foreach_lerp_(target_params, params, (1 - target_ema) * ~bad)
    run.end_step(bad, flops_per_image)
    # grids, the log line and checkpoints, each when due
    if run.master and run.due(sample_interval):
        common.save_grid(sample_grid(), run.path(f'samples_{run.step:07d}.png'))
    val = {'fid': fid()} if fid_interval and run.due(fid_interval) else {}
    if run.log_step or val:
        run.log(lr=lr_now, grad_norm=grad_norm,
                ect_stage=step * ect_stages // max_steps if mode == 'ect' else None, **val)
    if run.due(ckpt_interval) or run.stop:
        run.save(model=raw_model, ema=ema, optimizer=optimizer,
                 model_args=asdict(model_config), teacher_config=tconf,
                 consistency={'sigma_min': sigma_min, 'sigma_max': sigma_max},
                 target=target_net if target == 'ema' else None)
    if run.stop:
        break
run.finish()
