"""
Trains a MeanFlow model (Geng et al. 2025), which draws an image in one network call, from scratch
or from a flow-matching run of train_diffusion.py: one file, top to bottom.

    python train_meanflow.py config/mnist_meanflow.py                 # from scratch
    python train_meanflow.py config/mnist_flow_meanflow.py            # from out-mnist-flow
    torchrun --standalone --nproc_per_node=8 train_meanflow.py --dataset=cifar10 --out_dir=out-mf

The model learns the average velocity u(z_t, r, t) = (z_t - z_r) / (t - r) of the flow from noise
(t = 1) to data (t = 0), x_t = (1 - t) x0 + t eps: a DiT with a second time embedding, of t - r,
trained to satisfy u = v - (t - r) du/dt, where the total derivative du/dt = v d_z u + d_t u is a
Jacobian-vector product (torch.func.jvp) that makes the target, without gradient. Classifier-free
guidance is folded into the target (cfg_scale), so the guided images come in one call as well. Then
z_0 = z_1 - u(z_1, 0, 1) is an image; sample.py --steps=1 (or 2) draws them.

The rest is train_diffusion.py's: seeded draws per step, DDP, autocast, EMA, clipping, and
(bookkeeping.py) atomic checkpoints with exact resume, preemption and the non-finite guard.
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
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.parallel import DistributedDataParallel as DDP

import common
import dataformat
from diffusion import bcast, meanflow_sample, randn
from model import compile_for_training, create_model, run_block

# -----------------------------------------------------------------------------
# defaults, overridden by config/*.py and --key=value
# I/O
out_dir = 'out-meanflow'
init_from = 'auto'  # 'auto': 'resume' if out_dir holds ckpt.pt, else 'scratch' (never overwrites one)
init_base = ''  # a new run starts from this train_diffusion.py flow run's EMA weights ('': from scratch)
keep_last = 0  # also keep the newest keep_last checkpoints as out_dir/ckpt_<step>.pt (hard links)
max_minutes = 0.0  # finish the step, save and exit 0 after this much wall time; 0 = no limit
log_interval = 50  # steps between log lines (the only host syncs of the loop)
sample_interval = 500  # steps between EMA sample grids (and one at the end)
ckpt_interval = 500  # steps between checkpoints (and one at the end)
fid_interval = 0  # steps between FIDs of the EMA's samples (evaluate.py's), logged as fid; 0 = none
fid_images = 10000  # images per FID, shared by the ranks: the same noise and labels every time
fid_ref = ''  # an ADM reference batch .npz or a prepared dataset ('' = this run's dataset)
fid_inception = ''  # the FID Inception weights, a local file (docs/guide.md, 'Evaluation protocol')
wandb_log = False  # project and run name: $WANDB_PROJECT and $WANDB_NAME, else the run's kind and out_dir
# data and model (a base run's must be the same)
dataset = 'mnist'  # data/<dataset>/ (or a path): images from its prepare.py
hflip = False  # random horizontal flips
class_cond = True  # condition on the dataset's labels; False trains unconditionally
arch = 'DiT-N/4'  # 'DiT-{N,Ti,S,B,L,XL}/{1,2,4,8}' (model.py's presets)
# MeanFlow
class_dropout = 0.1  # labels dropped to the null label (for cfg_scale, the guidance it learns)
cfg_scale = 1.0  # guidance folded into the target: w in eq. 21 (1 = none)
cfg_kappa = 0.0  # cfg_scale > 1: the guided velocity's share of the conditional u (eq. 21)
meanflow_ratio = 0.25  # the share of pairs with r < t; the others are flow matching (r = t)
logit_mean = -0.4  # t and r each logit-normal, then sorted (MeanFlow's)
logit_std = 1.0
adaptive_p = 1.0  # each image's squared error over (its value + adaptive_eps)^p, no gradient
adaptive_eps = 1e-3
sample_steps = 1  # grids and FID in this many even steps
# optimization
batch_size = 128  # images per optimizer step, over all ranks and micro-steps
grad_accum = 1  # micro-steps per optimizer step on each rank
max_steps = 2000
lr = 1e-4
min_lr = 0.0  # the cosine schedule's floor
lr_schedule = 'constant'  # after warm-up: 'constant', or 'cosine' to min_lr
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
compile = torch.cuda.is_available()  # torch.compile the model (on CPU it gains nothing)
activation_checkpointing = False  # recompute the model's blocks in the backward: less memory
peak_tflops = 0.0  # per-device peak for MFU; 0 = known GPUs' dense bf16 (float32: TF32) peak
seed = 0
# -----------------------------------------------------------------------------
config_keys = [k for k, v in globals().items() if not k.startswith('_') and isinstance(v, (int, float, bool, str))]
exec(open(os.path.join(os.path.dirname(bk.__file__), 'configurator.py')).read())  # (the kit's; it also sets overridden)
config = {k: globals()[k] for k in config_keys}
common.check_config(config, choices=[
    ('init_from', ('auto', 'scratch', 'resume')), ('lr_schedule', ('cosine', 'constant')),
    ('dtype', ('float32', 'bfloat16'))],  # (float16 would need loss scaling; bfloat16 needs none)
    counts=['batch_size', 'grad_accum', 'max_steps', 'log_interval', 'sample_interval',
            'ckpt_interval', 'max_nonfinite', 'sample_steps'],
    rules=[('arch', arch.startswith('DiT-'), "a DiT preset (its interval embedding), like 'DiT-N/4'"),
           ('class_dropout', 0 <= class_dropout < 1, 'in [0, 1)'),
           ('meanflow_ratio', 0 <= meanflow_ratio <= 1, 'in [0, 1]'), ('logit_std', logit_std > 0, 'positive'),
           ('adaptive_p', adaptive_p >= 0, 'at least 0 (0: the squared error)'),
           ('adaptive_eps', adaptive_eps > 0, 'positive'),
           ('cfg_scale', cfg_scale == 1 or class_dropout > 0 and class_cond,
            "1 unless class_dropout > 0 and class_cond: guidance needs the unconditional velocity")])
common.check_applied(overridden, config, {  # (every key is applied or refused)
    'cfg_kappa': cfg_scale == 1 and "cfg_scale=1 (no guidance)"})
# -----------------------------------------------------------------------------
# DDP: torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; NCCL on GPUs, gloo on CPUs
device_type = common.check_device(device)
if 'RANK' in os.environ:
    device = f"cuda:{os.environ['LOCAL_RANK']}" if device_type == 'cuda' else device
    dist.init_process_group('nccl' if device_type == 'cuda' else 'gloo')
# the run: out_dir and its lock, resume, sums, the log, checkpoints (bookkeeping.Run)
run = bk.start_run(config, 'meanflow', device,
                   inputs=[('dataset', dataformat.data_path(dataset)), ('init_base', init_base)],
                   fixed=['init_base', 'cfg_scale', 'cfg_kappa'])  # (its time axis and target: a resume keeps them)
# bf16 autocast around the forward passes (float32: none)
ctx = torch.autocast(device_type, dtype=getattr(torch, dtype)) if dtype != 'float32' else nullcontext()

# data: uint8 images (N, H, W, C) memory-mapped from data/<dataset>/
data_dir, meta, data = dataformat.load_dataset(dataset, splits=('train',), classes=class_cond,
                                               script='train_meanflow.py')
train_x, train_y = data['train']
H, W, C = train_x.shape[1:]
null_label = meta['num_classes'] if class_cond else 0

def get_batch(step, micro):
    """This rank's images of micro-step `micro` of the global batch of `step`, in [-1, 1] and NCHW,
    and their labels."""
    g = run.rng(step, 0)
    idx = np.sort(torch.randint(len(train_x), (batch_size,), generator=g).numpy())  # sorted: kinder to mmap
    flip = torch.rand(batch_size, generator=g) < 0.5
    idx, flip = idx[run.slice(micro)], flip[run.slice(micro)]
    x, y = torch.from_numpy(train_x[idx]), torch.from_numpy(train_y[idx])
    if hflip:
        x = torch.where(flip[:, None, None, None], x.flip(2), x)
    y = y.to(device) if class_cond else torch.full_like(y, null_label, device=device)
    return dataformat.to_device(x, device) / 127.5 - 1, y

# -----------------------------------------------------------------------------
# the model (a DiT with an interval embedding; from a flow run: its weights, the interval embedding
# at zero, so that u(z, t, t) is its velocity), its EMA, optimizer, and the resume
base = None
if init_base:  # (read at every start: its model's options are this run's)
    base_path = os.path.join(init_base, 'ckpt.pt')
    base = common.load_checkpoint(base_path, "pass the out_dir of a train_diffusion.py flow run", device,
                                  ['diffusion'])
    ours = dict(arch=arch, dataset=dataset, class_cond=class_cond, hflip=hflip, schedule='flow',
                prediction_type='flow', control='')
    diff = {k: (v, base['config'].get(k, '')) for k, v in ours.items() if base['config'].get(k, '') != v}
    if diff:
        raise SystemExit(f"error: init_base {base_path} is not a flow run of this model and data (this run vs "
                         f"the base: {diff}); start from such a run, or from scratch with init_base=''")
torch.manual_seed(seed)  # the same initial weights on every rank
try:
    model = create_model(arch, **({**base['model_args'], 'interval': True} if base else
                                  dict(image_size=H, in_channels=C, num_classes=null_label, interval=True)))
except ValueError as e:
    raise SystemExit(f"error: {arch} on {dataset}: {e}")
model, model_config = model.to(device), model.config
if base and run.init_from == 'scratch':  # all but the interval embedding, which starts at zero
    missing, unexpected = model.load_state_dict(base['ema'], strict=False)
    assert not unexpected and all(k.startswith('h_embedder.') for k in missing), (missing, unexpected)
del base
time_scale = 1000.0 if init_base else 1.0  # what the time embeddings read: time_scale t (a flow run's 1000 t)
model.activation_checkpointing = activation_checkpointing
ema = copy.deepcopy(model).requires_grad_(False).eval()
params, ema_params = list(model.parameters()), list(ema.parameters())
optimizer = common.adamw(params, lr, (beta1, beta2), weight_decay)
run.resume(model_args=asdict(model_config), model=model, ema=ema, optimizer=optimizer)
raw_model = model
if compile:  # (model.compile_for_training says what runs compiled, and why)
    model = compile_for_training(model)
if run.ddp:
    model = DDP(model, device_ids=[device] if device_type == 'cuda' else None)
# the JVP runs on the raw model eager: never compiled nor checkpointed (a view of it: the same weights);
# the gradients come from the DDP model's own forward, so they are all-reduced
jvp_net = copy.copy(raw_model)
jvp_net.run_block, jvp_net.activation_checkpointing = run_block, False
# FLOPs per image of a step: forward and backward (3 forwards), the JVP (primal and tangent, 2) of
# meanflow_ratio of the images, and under guidance the guided velocity's 2 forwards
flops_per_image = raw_model.flops_per_sample() * (3 + 2 * meanflow_ratio + 2 * (cfg_scale != 1.0))
if run.master:
    print(f"{arch}: {sum(p.numel() for p in params) / 1e6:.2f}M parameters, "
          + (f"from {init_base}" if init_base else "from scratch"))

# -----------------------------------------------------------------------------
# the objective

def draw_times(g):
    """Each image's times (t, r), r <= t, for the global batch: two logit-normal draws, sorted, and
    r = t for all but meanflow_ratio of the images (MeanFlow's sampler)."""
    a, b = torch.sigmoid(logit_mean + logit_std * torch.randn(2, batch_size, generator=g, device=g.device))
    t, r = torch.maximum(a, b), torch.minimum(a, b)
    return t, torch.where(torch.rand(batch_size, generator=g, device=g.device) < meanflow_ratio, r, t)

def average_velocity(net, z, t, r, y):
    """u(z_t, r, t): the network's output, its times on time_scale (MeanFlow's own: t in [0, 1], so
    that du/dt is moderate; a flow run's 1000 t when it starts from one)."""
    return net(z, time_scale * t, y, interval=time_scale * (t - r))

def meanflow_loss(x0, y, eps, t, r):
    """Per image: |u(z_t, r, t) - u_tgt|^2 over the C H W values, u_tgt = v - (t - r) du/dt without
    gradient, du/dt = v d_z u + d_t u, the JVP along (v, 0, 1) (MeanFlow's eq. 8), each image's
    over (its value + adaptive_eps)^adaptive_p, no gradient; and the plain squared error per value.
    v is the velocity eps - x0, or under cfg_scale = w for the images with a label, eq. 21's
    w v + kappa u(z_t, t, t | y) + (1 - w - kappa) u(z_t, t, t | null). The JVP is float32 with the
    math attention (forward-mode AD has no flash or memory-efficient kernels)."""
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
grid_y = torch.arange(64, device=device) % null_label if class_cond else torch.zeros(64, dtype=torch.long, device=device)

@torch.no_grad()
def sample_grid():
    """The EMA's samples of the grid's noise and labels, in sample_steps steps, in [-1, 1]."""
    with ctx:
        return meanflow_sample(ema, grid_z, grid_y, sample_steps, time_scale).clamp(-1, 1)

# FID during training: the network on every rank, the reference's statistics on rank 0
if fid_interval:
    import evaluate
    inception, fid_stats = evaluate.training_setup(fid_inception, fid_ref or data_dir, H, device, run)

def fid():
    """The FID of fid_images EMA samples (rank 0's; None on the others): sample i's noise from a
    generator seeded by (seed, i), so the images do not depend on the world size; its label
    i % classes."""
    def generate(lo, n):
        gens = [run.rng(i, 5, device) for i in range(lo, lo + n)]
        y = torch.arange(lo, lo + n, device=device) % null_label if class_cond else \
            torch.zeros(n, dtype=torch.long, device=device)
        with ctx:
            return meanflow_sample(ema, randn((n, C, H, W), gens, device), y, sample_steps, time_scale).clamp(-1, 1)
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
# training loop. Logged: loss (adaptively weighted) and loss_unweighted, the plain squared error
x0, y = get_batch(run.step, 0)  # the first batch; each later one is fetched while the step runs
for step in range(run.step, max_steps):
    lr_now = get_lr(step)
    for group in optimizer.param_groups:
        group['lr'] = lr_now
    # times, noise and label dropout for the whole global batch
    g = run.rng(step, 1, device)
    t_all, r_all = draw_times(g)
    drop_all = torch.rand(batch_size, generator=g, device=device) < class_dropout
    z_all = torch.randn((batch_size, C, H, W), generator=g, device=device)
    for micro in range(grad_accum):
        sl = run.slice(micro)
        if run.ddp:  # all-reduce the gradients on the last micro-step only
            model.require_backward_grad_sync = micro == grad_accum - 1
        y_in = torch.where(drop_all[sl], null_label, y)
        loss, mse = meanflow_loss(x0, y_in, z_all[sl], t_all[sl], r_all[sl])
        loss = loss.mean()
        run.add(loss=loss, loss_unweighted=mse.mean())
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
    # the EMA with warm-up (a skipped update leaves it alone)
    with torch.no_grad():
        weight = (1 - min(ema_decay, (1 + step) / (10 + step))) * ~bad
        torch._foreach_lerp_(ema_params, params, weight)
    run.end_step(bad, flops_per_image)
    # grids, the log line and checkpoints, each when due
    if run.master and run.due(sample_interval):
        common.save_grid(sample_grid(), run.path(f'samples_{run.step:07d}.png'))
    val = {'fid': fid()} if fid_interval and run.due(fid_interval) else {}
    if run.log_step or val:
        run.log(lr=lr_now, grad_norm=grad_norm, **val)
    if run.due(ckpt_interval) or run.stop:
        run.save(model=raw_model, ema=ema, optimizer=optimizer, model_args=asdict(model_config),
                 meanflow={'cfg_scale': cfg_scale, 'time_scale': time_scale})
    if run.stop:
        break
run.finish()
