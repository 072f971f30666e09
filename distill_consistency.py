"""
Turns a train_diffusion.py run into a consistency model, which draws an image in one network call or
a few; or trains a MeanFlow model, which does so from scratch.

    python distill_consistency.py config/mnist_cd.py                   # teacher: out-mnist-dit
    torchrun --standalone --nproc_per_node=8 distill_consistency.py --teacher=out-dit-b \
        --out_dir=out-cd-b
    python distill_consistency.py config/mnist_meanflow.py             # no teacher
    python distill_consistency.py config/mnist_flow_meanflow.py        # from a flow run: out-mnist-flow

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

mode='meanflow' (Geng et al. 2025) learns the average velocity u(z_t, r, t) = (z_t - z_r) / (t - r)
of the flow from noise (t = 1) to data (t = 0), x_t = (1 - t) x0 + t eps: a DiT with a second time
embedding, of t - r, trained to satisfy u = v - (t - r) du/dt, the total derivative du/dt = v d_z u
+ d_t u a Jacobian-vector product (torch.func.jvp) that makes the target, without gradient. From
scratch (teacher='', the model and data from arch, dataset, class_cond and hflip), or from a flow
run's DiT. Then z_0 = z_1 - u(z_1, 0, 1) is an image in one call.

The rest is train_diffusion.py's: seeded draws per step, DDP, autocast, EMA, clipping, and
(bookkeeping.py) atomic checkpoints with exact resume, preemption and the non-finite guard.
sample.py samples the result: --sigmas=80 (one step) or e.g. --sigmas=80,0.8 (two); a MeanFlow model
--steps=1 or 2.
"""
import copy
import math
import os
from dataclasses import asdict

import bookkeeping as bk  # (first: from here on a Ctrl-C is one line, not a traceback)
import numpy as np
import torch
import torch.distributed as dist
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.parallel import DistributedDataParallel as DDP

from diffusion import Diffusion, bcast, meanflow_sample, randn
from model import compile_for_training, create_model, run_block

# -----------------------------------------------------------------------------
# defaults, overridden by config/*.py and --key=value
# I/O
out_dir = 'out-cd'
teacher = 'out-mnist-dit'  # a train_diffusion.py out_dir: its EMA weights teach, start the student ('': meanflow)
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
wandb_log = False
wandb_project = 'consistency'
wandb_run_name = 'cd'
# consistency
mode = 'cd'  # 'cd' (distillation through the teacher's ODE), 'ect' (the data's noise), or 'meanflow'
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
cfg_scale = 1.0  # guidance (1 = none) of cd's teacher ODE, or folded into meanflow's target: guided images
ect_stages = 8  # ect: stages of the gap's schedule, evenly over max_steps
ect_q = 2.0  # ect: the gap shrinks by q each stage
ect_k = 8.0  # ect: r / t = 1 - (1 + k sigmoid(-b t)) / q^stage
ect_b = 1.0
sample_sigmas = '80'  # grids during training: comma-separated sigmas, one network call each
# meanflow (Geng et al. 2025): average velocities u(z_t, r, t), one step from scratch. teacher='' trains
# from scratch the model these keys say; a teacher (a flow run: schedule and prediction_type 'flow')
# starts it from that run's EMA, with its model and data
arch = 'DiT-N/4'
dataset = 'mnist'
class_cond = True
hflip = False
class_dropout = 0.1  # meanflow: labels dropped to the null label (for cfg_scale, the guidance it learns)
meanflow_ratio = 0.25  # meanflow: the share of pairs with r < t; the others are flow matching (r = t)
logit_mean = -0.4  # meanflow: t and r each logit-normal, then sorted (MeanFlow's)
logit_std = 1.0
adaptive_p = 1.0  # meanflow: each image's squared error over (its value + adaptive_eps)^p, no gradient
adaptive_eps = 1e-3
cfg_kappa = 0.0  # meanflow, cfg_scale > 1: the guided velocity's share of the conditional u (eq. 21)
sample_steps = 1  # meanflow: grids and FID in this many even steps
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
bk.check_config(config, choices=[
    ('init_from', ('auto', 'scratch', 'resume')), ('mode', ('cd', 'ect', 'meanflow')),
    ('sigma_sampling', ('lognormal', 'uniform')), ('target', ('stopgrad', 'ema')),
    ('loss_type', ('pseudo_huber', 'l2')), ('lr_schedule', ('cosine', 'constant')),
    ('dtype', ('float32', 'bfloat16'))],  # (float16 would need loss scaling; bfloat16 needs none)
    counts=['batch_size', 'grad_accum', 'max_steps', 'log_interval', 'sample_interval',
            'ckpt_interval', 'ect_stages', 'max_nonfinite', 'sample_steps'],
    rules=[('num_scales', num_scales >= 2, 'at least 2'),
           ('sigma_min', 0 < sigma_min < sigma_max, 'positive and below sigma_max'),
           ('rho', rho > 0, 'positive'), ('p_std', p_std > 0, 'positive'),
           ('sigma_sampling', mode == 'cd' or sigma_sampling == 'lognormal',
            "'lognormal' under mode='ect', which draws t log-normal"),
           ('target_ema', 0 <= target_ema < 1, 'in [0, 1)'), ('ect_q', ect_q > 1, 'above 1'),
           ('sample_sigmas', grid_ok, 'decreasing sigmas above sigma_min, like 80,0.8'),
           ('teacher', teacher or mode == 'meanflow', "a train_diffusion.py out_dir ('' only with "
            "mode='meanflow', which trains from scratch)"),
           ('class_dropout', 0 <= class_dropout < 1, 'in [0, 1)'),
           ('meanflow_ratio', 0 <= meanflow_ratio <= 1, 'in [0, 1]'), ('logit_std', logit_std > 0, 'positive'),
           ('adaptive_p', adaptive_p >= 0, 'at least 0 (0: the squared error)'),
           ('adaptive_eps', adaptive_eps > 0, 'positive'),
           ('cfg_scale', mode != 'meanflow' or cfg_scale == 1 or class_dropout > 0,
            "1 unless class_dropout > 0: meanflow's guidance needs the unconditional velocity")])
meanflow = mode == 'meanflow'
bk.check_applied(overridden, config, {  # (every key is applied or refused)
    **{k: mode != 'cd' and f"mode='{mode}' (no teacher's grid)" for k in ('num_scales', 'rho')},
    'cfg_scale': mode == 'ect' and "mode='ect' (no teacher's ODE)",
    **{k: mode != 'ect' and f"mode='{mode}'" for k in ('ect_stages', 'ect_q', 'ect_k', 'ect_b')},
    'target_ema': target != 'ema' and f"target='{target}'",
    **{k: meanflow and "mode='meanflow' (times t and r, its own target and loss)"
       for k in ('sigma_min', 'sigma_max', 'sigma_sampling', 'target', 'loss_type', 'sample_sigmas')},
    **{k: (meanflow and "mode='meanflow' (times t and r, its own target and loss)")
       or (mode == 'cd' and sigma_sampling == 'uniform' and "sigma_sampling='uniform'") for k in ('p_mean', 'p_std')},
    **{k: not meanflow and f"mode='{mode}'" for k in ('class_dropout', 'meanflow_ratio', 'logit_mean',
                                                      'logit_std', 'adaptive_p', 'adaptive_eps', 'sample_steps')},
    'cfg_kappa': (not meanflow and f"mode='{mode}'") or (cfg_scale == 1 and "cfg_scale=1 (no guidance)"),
    **{k: (not meanflow or teacher) and f"teacher='{teacher}' gives them" for k in ('arch', 'dataset', 'class_cond',
                                                                                   'hflip')}})
# -----------------------------------------------------------------------------
# DDP: torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; NCCL on GPUs, gloo on CPUs
device_type = bk.check_device(device)
if 'RANK' in os.environ:
    device = f"cuda:{os.environ['LOCAL_RANK']}" if device_type == 'cuda' else device
    dist.init_process_group('nccl' if device_type == 'cuda' else 'gloo')
# the run: out_dir and its lock, resume, sums, the log, checkpoints (bookkeeping.Run)
run = bk.start_run(config, 'consistency', device,
                   inputs=[('teacher', teacher)] if teacher else [('dataset', bk.data_path(dataset))])
ctx = run.ctx  # bf16 autocast (or none)

# -----------------------------------------------------------------------------
# the teacher: a train_diffusion.py checkpoint, its EMA weights (meanflow: the start, if any)
if teacher:
    teacher_path = os.path.join(teacher, 'ckpt.pt')
    if not os.path.exists(teacher_path):
        raise SystemExit(f"error: teacher='{teacher}' holds no ckpt.pt; pass the out_dir of a "
                         f"train_diffusion.py run")
    tckpt = bk.load_checkpoint(teacher_path, "pass a train_diffusion.py run's out_dir as --teacher",
                               device, kinds=['diffusion'])
    if tckpt['model_args'].get('control'):
        raise SystemExit(f"error: {teacher_path} follows control images, which distillation does not "
                         f"feed it yet; distill its base model")
    tconf = tckpt['config']
    if meanflow and (tconf['schedule'], tconf['prediction_type'], tconf['arch'][:3]) != ('flow', 'flow', 'DiT'):
        raise SystemExit(f"error: mode='meanflow' starts from a DiT's flow velocity (schedule and prediction_type "
                         f"'flow'), but {teacher_path} is a {tconf['arch']} of schedule='{tconf['schedule']}', "
                         f"prediction_type='{tconf['prediction_type']}'; start from such a run, or from "
                         f"scratch with teacher=''")
    teacher_net = create_model(tconf['arch'], **tckpt['model_args']).to(device)
    teacher_net.load_state_dict(tckpt['ema'])
    teacher_net.requires_grad_(False).eval()
    # the faster layout for convolutions on tensor cores (the student and its target are copies)
    if device_type == 'cuda' and tconf['arch'].startswith('UNet'):
        teacher_net = teacher_net.to(memory_format=torch.channels_last)
    del tckpt
else:  # meanflow from scratch: the flow interpolant's (x_t = (1 - t) x0 + t eps, velocity eps - x0)
    tconf = dict(arch=arch, schedule='flow', prediction_type='flow', num_timesteps=1000, sigma_data=0.5,
                 dataset=dataset, hflip=hflip, class_cond=class_cond)
    teacher_net = None
diffusion = Diffusion(tconf['schedule'], tconf['prediction_type'], tconf['num_timesteps'],
                      tconf['sigma_data'])

# data: the teacher's, uint8 images (N, H, W, C) memory-mapped from data/<dataset>/
dataset, hflip, class_cond = tconf['dataset'], tconf['hflip'], tconf['class_cond']
if meanflow and cfg_scale != 1.0 and not class_cond:
    raise SystemExit(f"error: cfg_scale={cfg_scale} guides by the labels, but the model is unconditional "
                     f"(class_cond=False); train with cfg_scale=1")
data_dir, meta, data = bk.load_dataset(dataset, splits=('train',), latent_ok=True,
                                      classes=class_cond and not teacher)  # (a teacher has learnt its classes)
if meta.get('latent'):
    raise SystemExit(f"error: {f'the teacher {teacher_path} trained' if teacher else 'meanflow would train'} on "
                     f"the latents of {data_dir}; distill_consistency.py trains on pixels only")
train_x, train_y = data['train']
H, W, C = train_x.shape[1:]
null_label = teacher_net.config.num_classes if teacher else meta['num_classes'] * class_cond
if teacher and (C, H) != (teacher_net.config.in_channels, teacher_net.config.image_size):
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
    return bk.to_device(x, device) / 127.5 - 1, y

# -----------------------------------------------------------------------------
# the student (the teacher's weights; meanflow's: the teacher's with an interval embedding, or new),
# its EMA for sampling, the target, optimizer, and the resume
if meanflow:
    if not tconf['arch'].startswith('DiT'):
        raise SystemExit(f"error: mode='meanflow' trains a DiT (its interval embedding), not arch='{arch}'")
    torch.manual_seed(seed)  # the same initial weights on every rank
    try:
        model = create_model(tconf['arch'], **({**asdict(teacher_net.config), 'interval': True} if teacher else
                                               dict(image_size=H, in_channels=C, num_classes=null_label,
                                                    interval=True))).to(device)
    except ValueError as e:
        raise SystemExit(f"error: arch='{tconf['arch']}' on {H} x {H} x {C} images: {e}")
    if teacher:  # all but the interval embedding, which starts at zero: u(z, t, t) = the teacher's v
        missing, unexpected = model.load_state_dict(teacher_net.state_dict(), strict=False)
        assert not unexpected and all(k.startswith('h_embedder.') for k in missing), (missing, unexpected)
    teacher_net = None
    model.train()
else:
    model = copy.deepcopy(teacher_net).requires_grad_(True).train()
model_config = model.config
time_scale = 1000.0 if teacher else 1.0  # meanflow: what the time embeddings read, time_scale t
model.activation_checkpointing = activation_checkpointing
ema = copy.deepcopy(model).requires_grad_(False).eval()
# target='ema': a copy of its own; 'stopgrad': the student itself (in train mode: the same dropout)
target_net = copy.deepcopy(model).requires_grad_(False) if target == 'ema' else model
params, ema_params = list(model.parameters()), list(ema.parameters())
target_params = list(target_net.parameters())
optimizer = bk.adamw(params, lr, (beta1, beta2), weight_decay)
# the teacher's diffusion says how the student's output reads as a denoiser
keys = ('arch', 'schedule', 'prediction_type', 'num_timesteps', 'sigma_data')
ckpt = run.resume(model_args=asdict(model_config), teacher_config={k: tconf[k] for k in keys},
                  model=model, ema=ema, optimizer=optimizer)
if ckpt and target == 'ema':  # (a run that switches to target='ema' starts it from the student)
    bk.load_state(target_net, ckpt.get('target') or ckpt['model'], run.ckpt_path, 'target')
del ckpt
if run.master:
    print(f"teacher {teacher_path}: {tconf['arch']}, {tconf['schedule']} schedule, "
          f"{tconf['prediction_type']} prediction" if teacher else
          f"meanflow from scratch: {tconf['arch']} on {dataset}")
raw_model = model
if compile:  # (model.compile_for_training says what runs compiled, and why)
    model = compile_for_training(model)
if run.ddp:
    model = DDP(model, device_ids=[device] if device_type == 'cuda' else None)
# meanflow's JVP runs on the raw model eager: never compiled nor checkpointed (a view of it: the same
# weights); the gradients come from the DDP model's own forward, so they are all-reduced
jvp_net = copy.copy(raw_model)
jvp_net.run_block, jvp_net.activation_checkpointing = run_block, False
# FLOPs per image of a step: the student's forward and backward (3 forwards), the target's forward,
# and for 'cd' the teacher's Heun step (2 evaluations, each on a doubled batch under guidance);
# meanflow: the JVP (primal and tangent, 2) of meanflow_ratio of the images, the guided velocity's 2 forwards
teacher_calls = (mode == 'cd') * 2 * (1 + (cfg_scale != 1.0))
flops_per_image = raw_model.flops_per_sample() * (3 + 2 * meanflow_ratio + 2 * (cfg_scale != 1.0) if meanflow
                                                  else 4 + teacher_calls)

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

def draw_times(g):
    """meanflow: each image's times (t, r), r <= t, for the global batch: two logit-normal draws,
    sorted, and r = t for all but meanflow_ratio of the images (MeanFlow's sampler)."""
    a, b = torch.sigmoid(logit_mean + logit_std * torch.randn(2, batch_size, generator=g, device=g.device))
    t, r = torch.maximum(a, b), torch.minimum(a, b)
    return t, torch.where(torch.rand(batch_size, generator=g, device=g.device) < meanflow_ratio, r, t)

def average_velocity(net, z, t, r, y):
    """u(z_t, r, t): a meanflow network's output, its times on time_scale (MeanFlow's own: t in [0, 1],
    so that du/dt is moderate; a flow teacher's 1000 t when it starts from one)."""
    return net(z, time_scale * t, y, interval=time_scale * (t - r))

def meanflow_loss(x0, y, eps, t, r):
    """Per image: |u(z_t, r, t) - u_tgt|^2 over the C H W values, u_tgt = v - (t - r) du/dt without
    gradient, du/dt = v d_z u + d_t u, the JVP along (v, 0, 1) (MeanFlow's eq. 8), each image's
    over (its value + adaptive_eps)^adaptive_p, no gradient. v is the velocity eps - x0, or under
    cfg_scale = w for the images with a label, eq. 21's w v + kappa u(z_t, t, t | y) + (1 - w -
    kappa) u(z_t, t, t | null). The JVP is float32 with the math attention (forward-mode AD has no
    flash or memory-efficient kernels)."""
    z = bcast(1 - t, x0) * x0 + bcast(t, x0) * eps
    v = eps - x0
    if cfg_scale != 1.0:
        with torch.no_grad(), ctx:
            u_c, u_u = average_velocity(raw_model, torch.cat([z, z]), torch.cat([t, t]), torch.cat([t, t]),
                                        torch.cat([y, torch.full_like(y, null_label)])).float().chunk(2)
        guided = cfg_scale * v + cfg_kappa * u_c + (1 - cfg_scale - cfg_kappa) * u_u
        v = torch.where((y != null_label).view(-1, 1, 1, 1), guided, v)
    # the JVP only for the images with r < t: the others' target is v itself, (t - r) du/dt = 0 (their
    # indices cost a host sync, in a pass that runs eager anyway; the JVP costs meanflow_ratio of the batch's)
    i = (t > r).nonzero().squeeze(1)
    target = v.clone()
    if len(i):
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
            _, dudt = torch.func.jvp(lambda z, t, r: average_velocity(jvp_net, z, t, r, y[i]), (z[i], t[i], r[i]),
                                     (v[i], torch.ones_like(t[i]), torch.zeros_like(r[i])))
        target[i] = v[i] - bcast(t[i] - r[i], dudt) * dudt.float()
    with ctx:
        u = average_velocity(model, z, t, r, y).float()
    sq = (u - target).pow(2).flatten(1).sum(1)
    return sq / (sq.detach() + adaptive_eps) ** adaptive_p, sq.detach() / x0[0].numel()

# the sample grids: fixed noise and labels, the same picture of progress at every sample_interval
grid_z = torch.randn((64, C, H, W), generator=run.rng(0, 3, device), device=device)
grid_y = torch.arange(64, device=device) % null_label if class_cond and null_label else \
    torch.full((64,), null_label, device=device)

@torch.no_grad()
def sample_grid():
    """The EMA's samples of the grid's noise and labels at sample_sigmas, in [-1, 1]."""
    with ctx:
        x = (meanflow_sample(ema, grid_z, grid_y, sample_steps, time_scale) if meanflow else
             diffusion.consistency_sample(ema, grid_z, grid_y, grid_sigmas, sigma_min,
                                          generator=run.rng(0, 4, device)))
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
            x = (meanflow_sample(ema, z, y, sample_steps, time_scale) if meanflow else
                 diffusion.consistency_sample(ema, z, y, grid_sigmas, sigma_min, generator=gens))
        return x.clamp(-1, 1)
    return evaluate.training_fid(generate, fid_images, run.micro_batch, inception, fid_stats, run)

# -----------------------------------------------------------------------------
# training loop
x0, y = get_batch(run.step, 0)  # the first batch; each later one is fetched while the step runs
for step in range(run.step, max_steps):
    lr_now = bk.cosine_lr(step, lr, min_lr, warmup_steps, lr_decay_steps or max_steps, lr_schedule)
    for group in optimizer.param_groups:
        group['lr'] = lr_now
    # noise levels and noise for the whole global batch
    g = run.rng(step, 1, device)
    if meanflow:  # times, and label dropout
        t_all, r_all = draw_times(g)
        drop_all = torch.rand(batch_size, generator=g, device=device) < class_dropout
    else:
        hi_all, lo_all = draw_sigmas(step, g)
    z_all = torch.randn((batch_size, C, H, W), generator=g, device=device)
    for micro in range(grad_accum):
        sl = run.slice(micro)
        if run.ddp:  # all-reduce the gradients on the last micro-step only
            model.require_backward_grad_sync = micro == grad_accum - 1
        if meanflow:
            y_in = torch.where(drop_all[sl], null_label, y)
            loss, mse = meanflow_loss(x0, y_in, z_all[sl], t_all[sl], r_all[sl])
            loss = loss.mean()
            run.add(loss=loss, loss_unweighted=mse.mean())
        else:
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
        bk.save_grid(sample_grid(), run.path(f'samples_{run.step:07d}.png'))
    val = {'fid': fid()} if fid_interval and run.due(fid_interval) else {}
    if run.log_step or val:
        run.log(lr=lr_now, grad_norm=grad_norm,
                ect_stage=step * ect_stages // max_steps if mode == 'ect' else None, **val)
    if run.due(ckpt_interval) or run.stop:
        run.save(model=raw_model, ema=ema, optimizer=optimizer,
                 model_args=asdict(model_config), teacher_config=tconf,
                 consistency=None if meanflow else {'sigma_min': sigma_min, 'sigma_max': sigma_max},
                 meanflow={'cfg_scale': cfg_scale, 'time_scale': time_scale} if meanflow else None,
                 target=target_net if target == 'ema' else None)
    if run.stop:
        break
run.finish()
