"""
Trains a diffusion model (DiT or UNet) on a prepared image dataset: one file, top to bottom.

    python data/mnist/prepare.py && python train_diffusion.py config/mnist_dit.py      # a laptop or one GPU
    python train_diffusion.py config/mnist_ldm.py     # on latents that train_ae.py --mode=encode wrote
    torchrun --standalone --nproc_per_node=8 train_diffusion.py config/dit_b.py        # one node, 8 GPUs
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --rdzv_backend=c10d \
             --rdzv_endpoint=$HEAD_NODE:29500 train_diffusion.py config/dit_b.py        # run on each node

Objective: x_t = alpha_t x0 + sigma_t eps on a DDPM, flow or EDM schedule; the network predicts eps, v, x0 or the
flow velocity; noise levels are drawn uniform, logit-normal or by mode sampling, and the loss is weighted uniform,
by SNR, min-SNR-gamma or EDM's lambda (the schedules, conversions and samplers are model.Diffusion). Every random draw of a step (data indices, flips, timesteps,
noise, label dropout) comes from a generator seeded by (seed, step) and is the same on every rank, each rank
keeping its slice of the global batch: the run is the same for any world size or grad_accum, and a resumed
run draws exactly what the uninterrupted one would have.

Off by default: LightningDiT's block options and cosine loss term, class-balanced draws, control images (extra input
channels, or a ControlNet beside a frozen init_base), and post-hoc EMA snapshots (Karras et al. 2024) for sample.py.

A run survives being killed at any moment: checkpoints are written to a temporary file and renamed over the last
one, and the default init_from='auto' resumes from out_dir when it holds one, so re-running the same command (by
hand, by a scheduler, or by torchrun --max-restarts) continues bit-exactly. SIGTERM or SIGUSR1 (SLURM's warning)
and max_minutes make it finish the step, save and exit 0. An update whose gradient norm is not finite is skipped.
"""
import copy
import csv
import glob
import json
import math
import os
import pickle
import random
import shutil
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

from model import (ARCHS, PREDICTIONS, SAMPLERS, SCHEDULES, AEConfig, Autoencoder, Diffusion, bcast, create_model,
                   phema_gamma)

# -----------------------------------------------------------------------------
# defaults, overridden by config/*.py and --key=value
# I/O
out_dir = 'out'
init_from = 'auto'  # 'auto': 'resume' if out_dir holds ckpt.pt, else 'scratch' (which never overwrites a checkpoint)
keep_last = 0  # also keep the newest keep_last checkpoints as out_dir/ckpt_<step>.pt (hard links: no extra space)
max_minutes = 0.0  # finish the step, save and exit 0 after this much wall time (leave room for a save); 0 = no limit
log_interval = 50  # steps between log lines (the only host syncs of the loop)
eval_interval = 500  # steps between val-loss evaluations
eval_images = 512  # val images in each evaluation, at fixed timesteps and noise
sample_interval = 1000  # steps between EMA sample grids (a grid is also made at the end)
ckpt_interval = 1000  # steps between checkpoints (one is also written at the end)
wandb_log = False
wandb_project = 'diffusion'
wandb_run_name = 'dit'
# data
dataset = 'mnist'  # reads data/<dataset>/ (or a path): images from its prepare.py, or latents from train_ae.py
hflip = False  # random horizontal flips (of latent datasets: the latents of the mirror images, if encoded)
class_cond = True  # condition on the dataset's labels; False trains unconditionally
class_balance = 0.0  # draw image i with weight count(class_i)^-class_balance: 0 = as the data, 1 = classes equally often
control = ''  # condition on the dataset's control images (data/prepare_control.py): 'concat' (extra input channels)
#               or 'controlnet' (DiT: a trainable copy of half the blocks beside the frozen init_base; Zhang et al. 2023)
init_base = ''  # a new run starts from this train_diffusion.py out_dir's EMA weights (new control weights: zeros)
# model and diffusion
arch = 'DiT-N/4'  # 'DiT-{N,Ti,S,B,L,XL}/{1,2,4,8}' or 'UNet-{S,B}' (model.py's presets)
norm = 'layernorm'  # DiT, LightningDiT's options (Yao et al. 2025): 'rmsnorm'
mlp = 'gelu'  # DiT: 'swiglu' (at 2/3 the width: the same parameters)
qk_norm = False  # DiT: RMSNorm on queries and keys
rope = False  # DiT: 2-D rotary position embedding in attention
schedule = 'linear'  # 'linear' or 'cosine' (DDPM, T steps), 'flow' (x_t = (1 - t) x0 + t eps), 'edm' (x0 + sigma eps)
prediction_type = 'eps'  # 'eps', 'v', 'x0' (with EDM's preconditioning on the edm schedule), 'flow' (eps - x0)
num_timesteps = 1000  # T of the DDPM schedules
sigma_data = 0.5  # the data's standard deviation in EDM's preconditioning and weighting
timestep_sampling = 'uniform'  # noise levels u in [0, 1): 'uniform', 'logit_normal', or 'mode' (Esser et al. 2024)
logit_mean = 0.0  # logit_normal: u = sigmoid(logit_mean + logit_std n); on edm, (-1.2, 1.2) is EDM's log-normal sigma
logit_std = 1.0
mode_scale = 1.29  # mode sampling's s (Esser et al. 2024, eq. 20); 0 is uniform
loss_weighting = 'min_snr'  # 'uniform' (the prediction's own MSE), 'snr', 'min_snr', 'edm' (on the x0 error)
min_snr_gamma = 5.0  # min_snr: the weight on the x0 error is min(snr, gamma) (Hang et al. 2023)
class_dropout = 0.1  # probability of the null label, for classifier-free guidance
cosine_loss = 0.0  # weight of LightningDiT's direction term 1 - cos(F_theta, F), per image, added to the loss
# optimization
batch_size = 128  # images per optimizer step, over all ranks and micro-steps
grad_accum = 1  # micro-steps per optimizer step on each rank
max_steps = 1000
lr = 1e-3
min_lr = 1e-4  # the cosine schedule's floor
lr_schedule = 'cosine'  # after warm-up: 'cosine' to min_lr, or 'constant'
lr_decay_steps = 0  # length of the cosine, warm-up included; 0 = max_steps (set it to stop early and resume later)
warmup_steps = 100
weight_decay = 0.0  # AdamW, on weights of 2 or more dimensions only
beta1 = 0.9
beta2 = 0.999
grad_clip = 1.0  # max global gradient norm; 0 = no clipping (the norm is logged either way)
max_nonfinite = 20  # updates with a non-finite gradient norm are skipped; this many in a row stop the run
ema_decay = 0.9999  # per step, with warm-up: min(ema_decay, (1 + step) / (10 + step))
ema_update_every = 1  # steps between EMA updates (each applies the decay of that many steps)
phema_stds = ''  # post-hoc EMA (Karras et al. 2024): the sigma_rel of power-function EMAs to track, e.g. '0.05,0.1'
phema_interval = 1000  # steps between their snapshots in out_dir/phema/; sample.py --ema_std=... combines them
# sample grids during training
sampler = 'ddim'  # 'ddpm', 'ddim', 'euler', 'heun' (model.Diffusion.sample)
sample_steps = 50
cfg_scale = 4.0  # classifier-free guidance scale (1 = none)
shift = 1.0  # flow schedule: the sampling grid's timestep shift (Esser et al. 2024; > 1 spends more steps at high noise)
# system
device = 'cuda' if torch.cuda.is_available() else 'cpu'
dtype = 'bfloat16' if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else 'float32'
compile = torch.cuda.is_available()  # torch.compile the model (gains nothing on CPU but compile time)
activation_checkpointing = False  # recompute each DiT / UNet block in the backward pass to save memory
peak_tflops = 0.0  # per-device peak for MFU; 0 = known GPUs' dense bf16 (float32: TF32) peak, none on CPU
seed = 0
# -----------------------------------------------------------------------------
config_keys = [k for k, v in globals().items() if not k.startswith('_') and isinstance(v, (int, float, bool, str))]
exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())
config = {k: globals()[k] for k in config_keys}
for key, allowed in [('init_from', ('auto', 'scratch', 'resume')), ('arch', ARCHS), ('schedule', SCHEDULES),
                     ('prediction_type', PREDICTIONS), ('timestep_sampling', ('uniform', 'logit_normal', 'mode')),
                     ('loss_weighting', ('uniform', 'snr', 'min_snr', 'edm')), ('sampler', SAMPLERS),
                     ('norm', ('layernorm', 'rmsnorm')), ('mlp', ('gelu', 'swiglu')),
                     ('control', ('', 'concat', 'controlnet')),
                     ('lr_schedule', ('cosine', 'constant')), ('dtype', ('float32', 'bfloat16', 'float16'))]:
    if config[key] not in allowed:
        raise SystemExit(f"error: {key}='{config[key]}' is not one of {', '.join(allowed)}")
for key in ('batch_size', 'grad_accum', 'max_steps', 'log_interval', 'eval_interval', 'eval_images', 'sample_interval',
            'ckpt_interval', 'sample_steps', 'num_timesteps', 'ema_update_every', 'max_nonfinite', 'phema_interval'):
    if config[key] < 1:
        raise SystemExit(f"error: {key}={config[key]} must be at least 1")
for key, ok, rule in [('lr', lr > 0, 'positive'), ('ema_decay', 0 <= ema_decay < 1, 'in [0, 1)'),
                      ('class_dropout', 0 <= class_dropout < 1, 'in [0, 1)'), ('keep_last', keep_last >= 0, 'at least 0'),
                      ('max_minutes', max_minutes >= 0, 'at least 0 (0 = no limit)'),
                      ('grad_clip', grad_clip >= 0, 'at least 0 (0 = no clipping)'),
                      ('min_snr_gamma', min_snr_gamma > 0, "positive (loss_weighting='uniform' is the unweighted loss)"),
                      ('mode_scale', -1 <= mode_scale <= 2 / (math.pi - 2), 'in [-1, 1.752], where mode sampling is monotone'),
                      ('shift', shift == 1.0 or schedule == 'flow', "1.0 unless schedule='flow', whose grid it shifts"),
                      ('class_balance', 0 <= class_balance <= 1, 'in [0, 1]'),
                      ('cosine_loss', cosine_loss >= 0, 'at least 0 (0 = off)')]:
    if not ok:
        raise SystemExit(f"error: {key}={config[key]} must be {rule}")
dit_options = dict(norm=norm, mlp=mlp, qk_norm=qk_norm, rope=rope)
if not arch.startswith('DiT') and (dit_options != dict(norm='layernorm', mlp='gelu', qk_norm=False, rope=False)
                                   or control == 'controlnet'):
    raise SystemExit(f"error: norm, mlp, qk_norm, rope and control='controlnet' are DiT options, but arch='{arch}'")
if control == 'controlnet' and not init_base:
    raise SystemExit("error: control='controlnet' trains beside a frozen base model; pass init_base=<its out_dir>")
try:
    phema_sigmas = [float(v) for v in phema_stds.split(',')] if phema_stds else []
    phema_gammas = [phema_gamma(v) for v in phema_sigmas]
except ValueError as e:
    raise SystemExit(f"error: phema_stds='{phema_stds}' must be comma-separated sigma_rel values in (0, 0.28), "
                     f"like 0.05,0.1 ({e})")
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
    if rank == 0 and int(os.environ.get('TORCHELASTIC_MAX_RESTARTS', 0)) and \
            os.environ.get('TORCHELASTIC_USE_AGENT_STORE') == 'True':
        print("warning: with the store torchrun shares by default, a restarted group can fail to reconnect "
              "(pytorch/pytorch#167288); export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 before torchrun")
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
if master:
    try:
        os.makedirs(out_dir, exist_ok=True)
        tempfile.TemporaryFile(dir=out_dir).close()  # better to find out now than at the first checkpoint
    except OSError as e:
        raise SystemExit(f"error: cannot write to out_dir='{out_dir}' ({e.strerror}); pass an --out_dir you can write to")
    print(f"{world_size} rank(s) on {device_type}, {micro_batch} images per micro-step, {grad_accum} micro-step(s), "
          f"{batch_size} per optimizer step")
torch.backends.cuda.matmul.allow_tf32 = True
torch.backends.cudnn.allow_tf32 = True
ptdtype = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}[dtype]
ctx = nullcontext() if dtype == 'float32' else torch.autocast(device_type=device_type, dtype=ptdtype)

def rng(step, stream, dev='cpu'):
    """A generator seeded by (seed, step, stream): the same on every rank, and the same again after a resume."""
    return torch.Generator(dev).manual_seed(int(np.random.SeedSequence([seed, step, stream]).generate_state(1)[0]))

# -----------------------------------------------------------------------------
# data: uint8 arrays (N, H, W, C) memory-mapped from data/<dataset>/
data_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data', dataset)  # (a path stays itself)
prepare = f"python data/{dataset}/prepare.py" if os.path.basename(dataset) == dataset else "its prepare.py"
try:
    meta = json.load(open(os.path.join(data_dir, 'meta.json')))
    data = {s: (np.load(os.path.join(data_dir, f'{s}_x.npy'), mmap_mode='r'),
                np.load(os.path.join(data_dir, f'{s}_y.npy'))) for s in ('train', 'val')}
    H, W, C, K = meta['image_size'], meta['image_size'], meta['channels'], meta['num_classes']
except (OSError, ValueError, KeyError) as e:
    why = f'{e.strerror}: {e.filename}' if isinstance(e, OSError) else repr(e)
    raise SystemExit(f"error: dataset '{dataset}' is missing or unreadable in {data_dir} ({why}); run {prepare} first")
num_classes = K if class_cond else 0
latent = meta.get('latent')  # a latent dataset (train_ae.py --mode=encode): float16 latents, and their decoder
if latent:
    prepare = f"python train_ae.py <its config> --mode=encode --latents={dataset}"
    if hflip and not latent['flips']:
        raise SystemExit(f"error: hflip=True but {data_dir} holds no latents of mirror images; encode them with "
                         f"{prepare} --encode_flips=True, or train with --hflip=False")
    x_flip = np.load(os.path.join(data_dir, 'train_x_flip.npy'), mmap_mode='r') if hflip else None
    latent_mean, latent_std = (torch.tensor(latent[k], device=device).view(1, C, 1, 1) for k in ('mean', 'std'))
for split, (x, y) in data.items():
    where, kind = os.path.join(data_dir, split), 'float16' if latent else 'uint8'
    if x.dtype != kind or x.shape[1:] != (H, W, C) or y.shape != (len(x),) or y.dtype.kind not in 'iu':
        raise SystemExit(f"error: {where}_x.npy is {x.dtype} {x.shape} with {y.dtype} {y.shape} labels, but meta.json "
                         f"says {kind} (N, {H}, {W}, {C}) and N integer labels; re-run {prepare}")
    if len(x) == 0:
        raise SystemExit(f"error: {where}_x.npy holds no images; re-run {prepare}")
    if y.min() < 0 or y.max() >= K:
        raise SystemExit(f"error: {where}_y.npy has labels in [{y.min()}, {y.max()}] but meta.json says {K} classes; "
                         f"re-run {prepare}")
controls, Cc = {}, 0  # control images (N, H, W, Cc) uint8, one per image, written by data/prepare_control.py
if control:
    try:
        controls = {s: np.load(os.path.join(data_dir, f'{s}_control.npy'), mmap_mode='r') for s in data}
        Cc = controls['train'].shape[-1]
    except (OSError, ValueError) as e:
        why = f'{e.strerror}: {e.filename}' if isinstance(e, OSError) else repr(e)
        raise SystemExit(f"error: control='{control}' but {data_dir} holds no readable control images ({why}); "
                         f"run python data/prepare_control.py --dataset={dataset}")
    for split, c in controls.items():
        if c.dtype != np.uint8 or c.shape[:3] != (len(data[split][0]), H, W):
            raise SystemExit(f"error: {os.path.join(data_dir, split)}_control.npy is {c.dtype} {c.shape}, not uint8 "
                             f"({len(data[split][0])}, {H}, {W}, channels); re-run data/prepare_control.py")

def class_weights(labels):
    """Per-image sampling weights count(class)^-class_balance, normalised: class k is drawn with probability
    proportional to count_k^(1 - class_balance)."""
    counts = np.bincount(labels)
    w = counts[labels].astype(np.float64) ** -class_balance
    return torch.from_numpy(w / w.sum())
sample_weights = class_weights(data['train'][1]) if class_balance else None

def load_batch(split, idx, flip=None):
    """Images idx of a split as floats in [-1, 1] (latents: normalised per channel), NCHW, on the device, their
    labels, and their control images in [-1, 1] (None without control); on CUDA pinned, non-blocking copies."""
    x, y = data[split]
    x, y = torch.from_numpy(x[idx]), torch.from_numpy(y[idx])
    c = torch.from_numpy(controls[split][idx]) if control else torch.zeros(0, 0, 0, 0)
    if flip is not None:
        x = torch.where(flip[:, None, None, None], torch.from_numpy(x_flip[idx]) if latent else x.flip(2), x)
        c = torch.where(flip[:, None, None, None], c.flip(2), c) if control else c
    if device_type == 'cuda':
        x, y, c = (v.pin_memory().to(device, non_blocking=True) for v in (x, y, c))
    x, c = (v.to(device).permute(0, 3, 1, 2).float() for v in (x, c))
    return ((x - latent_mean) / latent_std if latent else x.div(127.5).sub(1)), y.to(device), \
        c.div(127.5).sub(1) if control else None

def my_slice(micro):
    """This rank's part of the global batch in micro-step `micro`: micro-steps outside, ranks inside."""
    lo = (micro * world_size + rank) * micro_batch
    return slice(lo, lo + micro_batch)

def draw_indices(g):
    """The global batch's image indices, drawn with replacement: uniformly, or by sample_weights. Every rank draws
    the same batch and keeps its slice, so weighted sampling is exact for any world size."""
    if class_balance:
        return torch.multinomial(sample_weights, batch_size, replacement=True, generator=g)
    return torch.randint(len(data['train'][0]), (batch_size,), generator=g)

def get_batch(step, micro):
    """This rank's images of micro-step `micro` of the global batch of `step`."""
    g = rng(step, 0)
    idx = np.sort(draw_indices(g).numpy())  # sorted: kinder to mmap
    flip = torch.rand(batch_size, generator=g) < 0.5
    return load_batch('train', idx[my_slice(micro)], flip[my_slice(micro)] if hflip else None)

# -----------------------------------------------------------------------------
# model, EMA, optimizer, and the checkpoint to resume from
torch.manual_seed(seed)  # the same initial weights on every rank
try:
    model = create_model(arch, image_size=H, in_channels=C, num_classes=num_classes, control=control,
                         control_channels=Cc, **(dit_options if arch.startswith('DiT') else {})).to(device)
except ValueError as e:
    raise SystemExit(f"error: {arch} on {dataset}: {e}")
model_config = model.config
if init_base and init_from == 'scratch':  # fine-tuning: start from a base model's EMA weights
    base_path = os.path.join(init_base, 'ckpt.pt')
    try:
        base = torch.load(base_path, map_location=device, weights_only=True)
        base_args, base_config, weights = base['model_args'], base['config'], base['ema']
    except Exception as e:
        raise SystemExit(f"error: cannot load init_base {base_path} ({str(e).splitlines()[0][:200]}); pass the out_dir "
                         f"of a train_diffusion.py run")
    diff = {k: (v, base_args.get(k)) for k, v in asdict(model_config).items()
            if k not in ('control', 'control_channels') and base_args.get(k, v) != v}
    diff.update({k: (config[k], base_config[k]) for k in ('schedule', 'prediction_type', 'num_timesteps', 'sigma_data')
                 if config[k] != base_config[k]})
    if diff or base_args.get('control', '') not in ('', control):
        raise SystemExit(f"error: init_base {base_path} is another model (this run vs the base: {diff or 'control'}); "
                         f"train with the base's config")
    if control == 'concat' and not base_args.get('control'):  # the control's input channels start at zero
        name = 'x_embedder.weight' if arch.startswith('DiT') else 'conv_in.weight'
        w = weights[name]  # (out, in, k, k)
        weights[name] = torch.cat([w, w.new_zeros(w.shape[0], Cc, *w.shape[2:])], dim=1)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if unexpected or any(not k.startswith('control_') for k in missing):
        raise SystemExit(f"error: init_base {base_path} does not fit {arch}: missing {missing}, unexpected {unexpected}")
    if control == 'controlnet' and not base_args.get('control'):  # the ControlNet starts as a copy of the first blocks
        model.control_blocks.load_state_dict(model.blocks[:len(model.control_blocks)].state_dict())
    del base, weights
ema = copy.deepcopy(model).requires_grad_(False).eval()
if control == 'controlnet':  # the base model stays frozen
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith('control_'))
model.activation_checkpointing = activation_checkpointing
if device_type == 'cuda' and arch.startswith('UNet'):
    model = model.to(memory_format=torch.channels_last)  # the faster layout for convolutions on tensor cores
diffusion = Diffusion(schedule, prediction_type, num_timesteps, sigma_data)
null_label = model_config.num_classes
trained = [(p, e) for p, e in zip(model.parameters(), ema.parameters()) if p.requires_grad]
params, ema_params = [p for p, _ in trained], [e for _, e in trained]
decay, no_decay = [p for p in params if p.dim() >= 2], [p for p in params if p.dim() < 2]
optimizer = torch.optim.AdamW([{'params': decay, 'weight_decay': weight_decay}, {'params': no_decay, 'weight_decay': 0.0}],
                              lr=lr, betas=(beta1, beta2), fused=True)  # fused: also skips updates on the device
scaler = torch.amp.GradScaler(device_type, enabled=dtype == 'float16')
start_step, saved_step, wandb_id = 0, None, None
if init_from == 'resume':
    if not os.path.exists(ckpt_path):
        raise SystemExit(f"error: init_from='resume' but {ckpt_path} does not exist; use --init_from=scratch")
    try:  # weights_only: tensors and plain types, nothing in the file can run code
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=True)
    except Exception as e:
        why = 'it holds objects other than tensors and plain types' if isinstance(e, pickle.UnpicklingError) else \
            str(e).split('. ')[0][:200]
        raise SystemExit(f"error: cannot load {ckpt_path} ({why}); restore a checkpoint this script wrote (keep_last "
                         f"keeps ckpt_<step>.pt copies), or start in another --out_dir")
    if {**asdict(model_config), **ckpt['model_args']} != asdict(model_config):  # (keys added since: their defaults)
        diff = {k: (v, asdict(model_config)[k]) for k, v in ckpt['model_args'].items() if v != asdict(model_config)[k]}
        raise SystemExit(f"error: {ckpt_path} holds another model shape (checkpoint vs config: {diff}); "
                         f"resume with the config it was trained with, or choose another out_dir")
    model.load_state_dict(ckpt['model'])
    ema.load_state_dict(ckpt['ema'])
    optimizer.load_state_dict(ckpt['optimizer'])
    scaler.load_state_dict(ckpt['scaler'])
    if ckpt['config'].get('phema_stds', '') != phema_stds:
        raise SystemExit(f"error: {ckpt_path} tracks post-hoc EMAs phema_stds='{ckpt['config'].get('phema_stds', '')}'; "
                         f"resume with that value")
    phema = ckpt['phema'] if master and phema_stds else []
    start_step, wandb_id = ckpt['step'], ckpt['wandb_id']
    saved_step = start_step
    changed = [f"{k} {v!r} -> {config[k]!r}" for k, v in ckpt['config'].items() if config.get(k, v) != v]
    rng_state = ckpt['rng'][rank] if len(ckpt['rng']) == world_size else None  # the global RNGs, for what a fork adds
    if rng_state is not None:
        torch.set_rng_state(rng_state['torch'].cpu())
        if device_type == 'cuda':
            torch.cuda.set_rng_state(rng_state['cuda'].cpu())
        np.random.set_state(('MT19937', np.array(rng_state['numpy'][0], dtype=np.uint32), *rng_state['numpy'][1:]))
        random.setstate((rng_state['python'][0], tuple(rng_state['python'][1]), rng_state['python'][2]))
    del ckpt
    if master:
        print(f"resuming {ckpt_path} at step {start_step}" + (f"; changed since: {', '.join(changed)}" if changed else ''))
else:
    torch.manual_seed(seed + rank)
    np.random.seed(seed + rank)
    random.seed(seed + rank)
    phema = [[p.detach().clone() for p in params] for _ in phema_gammas] if master else []  # power-function EMAs
raw_model = model
if compile:
    model = torch.compile(model)
if ddp:
    model = DDP(model, device_ids=[local_rank] if device_type == 'cuda' else None)
flops_per_image = 3 * raw_model.flops_per_sample()  # forward + backward (twice the forward)
if master:
    print(f"{arch}: {sum(p.numel() for p in params) / 1e6:.2f}M parameters, "
          f"{flops_per_image / 3e9:.3f} GFLOPs forward per image")
if peak_tflops == 0 and device_type == 'cuda':  # dense tensor-core peaks: bf16's (SXM unless named), TF32's half
    name = torch.cuda.get_device_name()
    peak_tflops = next((v for k, v in {'H100 PCIe': 756.5, 'H100 NVL': 835.5, 'H100': 989.4, 'H200': 989.4,
                                       'A100': 312.0}.items() if k in name), 0.0) / (2 if dtype == 'float32' else 1)

def get_lr(step):
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if lr_schedule == 'constant':
        return lr
    progress = min(1.0, (step - warmup_steps) / max(1, (lr_decay_steps or max_steps) - warmup_steps))
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))

def sample_u(n, g):
    """n noise levels u in [0, 1) drawn by timestep_sampling; diffusion.t_from_u turns them into schedule times."""
    if timestep_sampling == 'logit_normal':  # Esser et al. 2024, eq. 19
        return torch.sigmoid(logit_mean + logit_std * torch.randn(n, generator=g, device=g.device))
    u = torch.rand(n, generator=g, device=g.device)
    if timestep_sampling == 'mode':  # Esser et al. 2024, eq. 20: mass in the middle, tails kept
        u = 1 - u - mode_scale * (torch.cos(math.pi / 2 * u) ** 2 - 1 + u)
    return u

def loss_weight(alpha, sigma, A, B):
    """Weight of each image's prediction MSE. A weighting is a function lambda(snr) on the x0 error (Kingma & Gao
    2023); a prediction F = A x0 + B eps errs det / sigma times as much as x0 (det = alpha B - sigma A), so its MSE
    gets lambda (sigma / det)^2. For eps, min_snr is min(snr, gamma) / snr and for v min(snr, gamma) / (snr + 1)
    (Hang et al. 2023, eq. 8); edm's lambda = snr + 1 / sigma_data^2 is Karras et al.'s (sigma^2 + sd^2) / (sigma sd)^2,
    uniform on its preconditioned x0 output; 'snr' is the plain eps MSE in any parameterisation."""
    snr = (alpha / sigma) ** 2
    if loss_weighting == 'uniform':
        return torch.ones_like(snr)
    lam = {'snr': snr, 'min_snr': snr.clamp(max=min_snr_gamma), 'edm': snr + sigma_data ** -2}[loss_weighting]
    return lam * (sigma / (alpha * B - sigma * A)) ** 2

def diffusion_loss(net, x0, y, u, eps, c=None):
    """Per-image loss || F_theta(x_t) - F ||^2 at noise levels u (c: the control images), weighted, plus
    cosine_loss (1 - cos(F_theta, F)), and unweighted."""
    t = diffusion.t_from_u(u)
    alpha, sigma, A, B = diffusion.coefficients(t)  # float64
    xt = bcast(alpha, x0) * x0 + bcast(sigma, x0) * eps
    target = bcast(A, x0) * x0 + bcast(B, x0) * eps  # eps, v = alpha eps - sigma x0, x0 (EDM: preconditioned), eps - x0
    with ctx:
        pred = net(*diffusion.net_inputs(xt, t), y, c).float()
    mse = (pred - target).pow(2).mean(dim=(1, 2, 3))
    loss = loss_weight(alpha, sigma, A, B).float() * mse
    if cosine_loss:  # LightningDiT's velocity direction term, over each whole image
        loss = loss + cosine_loss * (1 - torch.nn.functional.cosine_similarity(pred.flatten(1), target.flatten(1)))
    return loss, mse

@torch.no_grad()
def estimate_val_loss(net):
    """Mean loss over the first eval_images val images at noise levels u spread evenly over (0, 1) and fixed noise:
    low variance and comparable across runs. Rank r takes every world_size-th image; the sums are all-reduced."""
    n = min(eval_images, len(data['val'][0]))
    u_all = (torch.arange(n, device=device) + 0.5) / n
    eps_all = torch.randn((n, C, H, W), generator=rng(0, 2, device), device=device)
    total = torch.zeros(2, device=device)
    net.eval()  # no dropout
    for lo in range(rank * micro_batch, n, world_size * micro_batch):
        idx = np.arange(lo, min(lo + micro_batch, n))
        x0, y, c = load_batch('val', idx)
        y = y if class_cond else torch.full_like(y, null_label)
        total += torch.stack([l.sum() for l in diffusion_loss(net, x0, y, u_all[idx], eps_all[idx], c)])
    net.train(net is raw_model)  # the EMA stays in eval mode
    if ddp:
        dist.all_reduce(total)
    return (total / n).tolist()

def save_grid(x, path, ncol=8):
    """Images in [-1, 1], (B, C, H, W), to one PNG grid."""
    x = ((x.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).cpu()
    x = torch.cat([x, x.new_zeros((-len(x) % ncol, *x.shape[1:]))])
    B, c, h, w = x.shape
    grid = x.view(B // ncol, ncol, c, h, w).permute(0, 3, 1, 4, 2).reshape(B // ncol * h, ncol * w, c)
    Image.fromarray(grid.squeeze(-1).numpy()).save(path)

def rng_state():
    return {'torch': torch.get_rng_state(), 'cuda': torch.cuda.get_rng_state() if device_type == 'cuda' else None,
            'numpy': [np.random.get_state()[1].tolist(), *np.random.get_state()[2:]], 'python': random.getstate()}

def last_good():
    return f"{ckpt_path} (step {saved_step}) is intact" if saved_step else f"no checkpoint was written to {out_dir}"

def save_checkpoint(step):
    """All ranks gather their RNG states; the master writes out_dir/ckpt.pt atomically: a temporary file, flushed to
    disk, then renamed over the previous checkpoint, which stays whole until that moment. Non-finite weights are
    never saved."""
    global saved_step
    if not torch.stack([p.isfinite().all() for p in params + ema_params]).all():  # the same on every rank
        raise SystemExit(f"error: the weights are not finite at step {step}, so they are not saved; {last_good()}: "
                         f"resume it with a lower lr, grad_clip or dtype='float32'")
    states = [None] * world_size
    if ddp:
        dist.all_gather_object(states, rng_state())
    else:
        states = [rng_state()]
    if master:
        ckpt = {'model': raw_model.state_dict(), 'ema': ema.state_dict(), 'optimizer': optimizer.state_dict(),
                'scaler': scaler.state_dict(), 'model_args': asdict(model_config), 'step': step,
                'images_seen': step * batch_size, 'config': config, 'rng': states, 'wandb_id': wandb_id, 'phema': phema}
        try:
            with open(ckpt_path + '.tmp', 'wb') as f:
                torch.save(ckpt, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(ckpt_path + '.tmp', ckpt_path)
        except (OSError, RuntimeError) as e:  # a full disk surfaces from torch.save as a RuntimeError
            os.remove(ckpt_path + '.tmp')
            why, free = e.strerror if isinstance(e, OSError) else 'torch.save could not write it', shutil.disk_usage(out_dir).free
            raise SystemExit(f"error: writing {ckpt_path} failed at step {step} ({why}; {free / 2**30:.1f} GiB free); "
                             f"{last_good()}: make room and re-run the same command")
        if keep_last:
            kept = os.path.join(out_dir, f'ckpt_{step:07d}.pt')
            if not os.path.exists(kept):
                os.link(ckpt_path, kept)  # a second name for the same file
            for old in sorted(glob.glob(os.path.join(out_dir, 'ckpt_[0-9]*.pt')))[:-keep_last]:
                os.remove(old)
        print(f"saved {ckpt_path} at step {step}")
    saved_step = step

def save_phema(step):
    """The power-function EMAs at this step to out_dir/phema/phema-<step>.pt, atomically: the trained weights only
    (sample.py takes the others from ckpt.pt and combines the snapshots into the EMA it is asked for)."""
    path = os.path.join(out_dir, 'phema', f'phema-{step:07d}.pt')
    os.makedirs(os.path.dirname(path), exist_ok=True)
    names = [name for name, p in raw_model.named_parameters() if p.requires_grad]  # the order of params
    torch.save({'step': step, 'sigma_rel': phema_sigmas, 'gamma': phema_gammas,
                'ema': [dict(zip(names, (w.cpu() for w in tracked))) for tracked in phema]}, path + '.tmp')
    os.replace(path + '.tmp', path)

# fixed noise and labels for the sample grids: the same picture of progress at every sample_interval
grid_z = torch.randn((64, C, H, W), generator=rng(0, 3, device), device=device)
if latent and master:  # the grids' latents are decoded by the autoencoder that encoded the dataset
    try:
        ae_ckpt = torch.load(os.path.join(data_dir, latent['autoencoder']), map_location=device, weights_only=True)
        autoencoder = Autoencoder(AEConfig(**ae_ckpt['model_args'])).to(device).eval().requires_grad_(False)
        autoencoder.load_state_dict(ae_ckpt['weights'])
    except (OSError, RuntimeError, KeyError, pickle.UnpicklingError) as e:
        raise SystemExit(f"error: cannot load the autoencoder of latent dataset {data_dir} "
                         f"({str(e).splitlines()[0][:200]}); re-run {prepare}")

def to_pixels(x):
    """Samples as images in [-1, 1]: latents are un-normalised and decoded."""
    return autoencoder.decode(x * latent_std + latent_mean).clamp(-1, 1) if latent else x
grid_y = torch.arange(64, device=device) % num_classes if num_classes else torch.full((64,), null_label, device=device)
grid_c = None
if control:  # a control model's grid follows the first 64 val images' controls (and labels)
    _, val_y, grid_c = load_batch('val', np.arange(64) % len(data['val'][0]))
    grid_y = val_y if num_classes else grid_y

# -----------------------------------------------------------------------------
# logging: stdout, out_dir/metrics.csv, and wandb (val_loss_unweighted: the prediction's plain MSE, comparable
# across loss weightings and cosine_loss)
num_bins = 10  # loss_u<i>: the unweighted loss at noise levels u in [i / 10, (i + 1) / 10), where the model struggles
fields = ['step', 'kimg', 'loss', 'loss_unweighted', 'lr', 'grad_norm', 'skipped', 'ms_per_step', 'img_per_s', 'tflops',
          'mfu', 'val_loss', 'val_loss_ema', 'val_loss_unweighted', 'val_loss_unweighted_ema',
          *[f'loss_u{i}' for i in range(num_bins)]]
metrics_path = os.path.join(out_dir, 'metrics.csv')
if master:
    rows = list(csv.DictReader(open(metrics_path))) if init_from == 'resume' and os.path.exists(metrics_path) else []
    with open(metrics_path + '.tmp', 'w', newline='') as f:  # on resume, drop the rows logged after the checkpoint
        csv.DictWriter(f, fields).writeheader()  # (and a row cut short by a crash)
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
    stop_signal = signum  # the loop finishes its step, saves and exits

for sig in (signal.SIGTERM, signal.SIGUSR1):
    signal.signal(sig, request_stop)
if master and start_step >= max_steps:
    print(f"{ckpt_path} is at step {start_step} of max_steps={max_steps}: nothing to do (raise max_steps to go on)")
x0, y, c = get_batch(start_step, 0)  # the first batch; each later one is fetched while the current step runs
loss_sum = torch.zeros(2, device=device)  # loss, unweighted loss, summed over the steps since the last log line
bin_sums = torch.zeros(2, num_bins, device=device)  # per noise-level bin: loss sum, count
bin_losses = []  # as of the last log line
skipped, streak, worst_streak = (torch.zeros((), device=device) for _ in range(3))  # non-finite updates skipped
t_log, steps_since_log = time.time(), 0
for step in range(start_step, max_steps):
    for group in optimizer.param_groups:
        group['lr'] = get_lr(step)
    g = rng(step, 1, device)  # noise levels, noise and label dropout for the whole global batch
    u_all = sample_u(batch_size, g)
    eps_all = torch.randn((batch_size, C, H, W), generator=g, device=device)
    drop_all = torch.rand(batch_size, generator=g, device=device) < (class_dropout if class_cond else 1.0)
    step_sums, step_bins = torch.zeros(2, device=device), torch.zeros(2, num_bins, device=device)
    for micro in range(grad_accum):
        sl = my_slice(micro)
        y_in = torch.where(drop_all[sl], null_label, y)
        if ddp:  # all-reduce the gradients on the last micro-step only
            model.require_backward_grad_sync = micro == grad_accum - 1
        loss, mse = diffusion_loss(model, x0, y_in, u_all[sl], eps_all[sl], c)
        bins = (u_all[sl] * num_bins).long().clamp(max=num_bins - 1)
        step_bins.index_add_(1, bins, torch.stack([mse.detach(), torch.ones_like(mse)]))
        loss = loss.mean() / grad_accum
        if micro + 1 < grad_accum or step + 1 < max_steps:  # fetch the next batch while this step runs
            x0, y, c = get_batch(step, micro + 1) if micro + 1 < grad_accum else get_batch(step + 1, 0)
        scaler.scale(loss).backward()
        step_sums += torch.stack([loss.detach(), mse.detach().mean() / grad_accum])
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float('inf'))
    bad = ~grad_norm.isfinite()  # a non-finite loss makes it so too; all-reduced gradients: the same on every rank
    optimizer.found_inf = bad.float()  # fused AdamW then skips the update on the device, with no host sync
    scaler.step(optimizer)  # (float16: the scaler sets found_inf itself, from the same gradients)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    if (step + 1) % ema_update_every == 0:
        with torch.no_grad():  # EMA with warm-up; a skipped update leaves it alone too
            weight = (1 - min(ema_decay, (1 + step) / (10 + step)) ** ema_update_every) * ~bad
            torch._foreach_lerp_(ema_params, params, weight)
    with torch.no_grad():  # the post-hoc EMAs (rank 0's), every step t = step + 1: beta_t = (1 - 1/t)^(gamma + 1)
        for gamma, tracked in zip(phema_gammas, phema):
            torch._foreach_lerp_(tracked, params, 1 - (1 - 1 / (step + 1)) ** (gamma + 1))
    loss_sum += torch.where(bad, 0, step_sums)
    bin_sums += torch.where(bad, 0, step_bins)
    skipped += bad
    streak = (streak + 1) * bad
    worst_streak = torch.maximum(worst_streak, streak)
    steps_since_log += 1

    last = step + 1 == max_steps
    stop = torch.tensor([stop_signal, max_minutes > 0 and time.time() - t_start > 60 * max_minutes])
    if ddp:  # every rank stops at the same step: a vote on the host, over gloo, that does not wait for the GPU
        dist.all_reduce(stop, op=dist.ReduceOp.MAX, group=stop_group)
    stop = signal.Signals(int(stop[0])).name if stop[0] else f'max_minutes={max_minutes}' if stop[1] else None
    log_step = (step + 1) % log_interval == 0 or last or stop
    if log_step:
        if ddp:
            dist.all_reduce(loss_sum, op=dist.ReduceOp.AVG)
            dist.all_reduce(bin_sums)
        n_skipped = int(skipped.item())  # the host sync
        loss_avg, mse_avg = (loss_sum / (steps_since_log - n_skipped)).tolist()  # nan if every step was skipped
        bin_losses = (bin_sums[0] / bin_sums[1]).tolist()  # nan where a bin drew no image
        dt = (time.time() - t_log) / steps_since_log
        row = dict(step=step + 1, kimg=(step + 1) * batch_size / 1e3, loss=loss_avg, loss_unweighted=mse_avg,
                   lr=get_lr(step), grad_norm=grad_norm.item(), skipped=n_skipped, ms_per_step=dt * 1e3,
                   img_per_s=batch_size / dt)
        row['tflops'] = flops_per_image * row['img_per_s'] / 1e12
        row['mfu'] = row['tflops'] / (peak_tflops * world_size) if peak_tflops else float('nan')
        row.update({f'loss_u{i}': v for i, v in enumerate(bin_losses) if v == v})
        if master:
            print(f"step {row['step']}/{max_steps} | {row['kimg']:.1f} kimg | loss {loss_avg:.4f} (unweighted "
                  f"{mse_avg:.4f}) | lr {row['lr']:.2e} | grad norm {row['grad_norm']:.3f} | {dt * 1e3:.0f} ms/step | "
                  f"{row['img_per_s']:.0f} img/s | {row['tflops']:.2f} TFLOP/s | "
                  f"mfu {format(row['mfu'], '.1%') if peak_tflops else 'n/a'} | eta {dt * (max_steps - step - 1) / 60:.1f} min"
                  + (f" | {n_skipped} non-finite update(s) skipped" if n_skipped else ''))
            log(row)
        if worst_streak.item() >= max_nonfinite:
            raise SystemExit(f"error: {int(worst_streak.item())} updates in a row had a non-finite gradient norm and were "
                             f"skipped (max_nonfinite={max_nonfinite}) by step {step + 1}; {last_good()}: resume it with "
                             f"a lower lr, grad_clip or dtype='float32'")
        for t in (loss_sum, bin_sums, skipped, worst_streak):
            t.zero_()
        steps_since_log = 0
    if (step + 1) % eval_interval == 0 or last:
        (val_loss, val_mse), (val_loss_ema, val_mse_ema) = estimate_val_loss(raw_model), estimate_val_loss(ema)
        if master:
            print(f"step {step + 1}: val loss {val_loss:.4f}, EMA {val_loss_ema:.4f} (unweighted {val_mse:.4f}, EMA "
                  f"{val_mse_ema:.4f}); train loss by noise level u "
                  f"(low to high, last log): {' '.join(f'{v:.3g}' for v in bin_losses)}")
            log(dict(step=step + 1, val_loss=val_loss, val_loss_ema=val_loss_ema, val_loss_unweighted=val_mse,
                     val_loss_unweighted_ema=val_mse_ema))
    if master and ((step + 1) % sample_interval == 0 or last):
        with ctx:
            x = diffusion.sample(ema, grid_z, grid_y, sampler, sample_steps, cfg_scale=cfg_scale, shift=shift,
                                 clip_x0=not latent, generator=rng(0, 4, device), control=grid_c)  # pixels: x0 in [-1, 1]
            x = to_pixels(x)
        save_grid(x, os.path.join(out_dir, f'samples_{step + 1:07d}.png'))
    if master and phema and ((step + 1) % phema_interval == 0 or last):
        save_phema(step + 1)
    if (step + 1) % ckpt_interval == 0 or last or stop:
        save_checkpoint(step + 1)
    if stop and not last:
        if master:
            print(f"stopped at step {step + 1} of {max_steps} ({stop}); the same command continues the run")
        break
    if log_step:
        t_log = time.time()  # the evaluation, sample grid and checkpoint of a log step do not count as step time

if master and wandb_log:
    wandb.finish()
if ddp:
    dist.barrier()  # no rank tears its groups down while another still talks to it
    dist.destroy_process_group()
