"""
Trains a diffusion model (DiT or UNet) on a prepared image dataset: one file, top to bottom.

    python data/mnist/prepare.py && python train_diffusion.py config/mnist_dit.py  # laptop, 1 GPU
    python train_diffusion.py config/mnist_ldm.py          # on latents from data/prepare_latents.py
    torchrun --standalone --nproc_per_node=8 train_diffusion.py config/dit_b.py    # 1 node, 8 GPUs
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --rdzv_backend=c10d \
             --rdzv_endpoint=$HEAD_NODE:29500 train_diffusion.py config/dit_b.py   # on each node

Objective: x_t = alpha_t x0 + sigma_t eps on a DDPM, flow or EDM schedule; the network predicts eps,
v, x0 or the flow velocity; noise levels are drawn uniform, logit-normal or by mode sampling, and
the loss is weighted uniform, by SNR, min-SNR-gamma or EDM's lambda (the schedules, conversions and
samplers are diffusion.Diffusion). Every random draw of a step (data indices, flips, timesteps, noise,
label dropout) comes from a generator seeded by (seed, step) and is the same on every rank, each
rank keeping its slice of the global batch: the run is the same for any world size or grad_accum,
and a resumed run draws exactly what the uninterrupted one would have.

Off by default: LightningDiT's block options and cosine loss term, class-balanced draws, control
images (extra input channels, or a ControlNet beside a frozen init_base), post-hoc EMA snapshots
(Karras et al. 2024), and representation terms on a block's tokens: REPA (a frozen DINOv2), SRA (the
EMA) and the dispersive loss (over each micro-batch: the one term that changes with the world size).

A run survives being killed at any moment: re-running the same command resumes it bit-exactly;
SIGTERM, SIGUSR1 and max_minutes make it save and exit 0; a non-finite update is skipped
(bookkeeping.py holds all that).
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
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import common
import dataformat
from diffusion import PREDICTIONS, SAMPLERS, SCHEDULES, Diffusion, bcast, phema_gamma, randn
from model import ARCHS, Projectors, compile_for_training, create_model
from pretrained import base_convention, dinov2, latent_decoder, load_base, or_exit

# -----------------------------------------------------------------------------
# defaults, overridden by config/*.py and --key=value
# I/O
out_dir = 'out'
init_from = 'auto'  # 'auto': 'resume' if out_dir holds ckpt.pt, else 'scratch'
#                     (never overwrites a checkpoint)
keep_last = 0  # also keep the newest keep_last checkpoints as out_dir/ckpt_<step>.pt
#                (hard links: no extra space)
max_minutes = 0.0  # finish the step, save and exit 0 after this much wall time; 0 = no limit
log_interval = 50  # steps between log lines (the only host syncs of the loop)
eval_interval = 500  # steps between val-loss evaluations (best.pt: the lowest EMA val loss so far)
eval_images = 512  # val images in each evaluation, at fixed timesteps and noise
sample_interval = 1000  # steps between EMA sample grids (a grid is also made at the end)
ckpt_interval = 1000  # steps between checkpoints (one is also written at the end)
wandb_log = False  # project and run name: $WANDB_PROJECT and $WANDB_NAME, else the run's kind and out_dir
# data
dataset = 'mnist'  # data/<dataset>/ (or a path): images from its prepare.py, or latents
hflip = False  # random horizontal flips (of latents: the latents of the mirror images, if encoded)
class_cond = True  # condition on the dataset's labels; False trains unconditionally
class_balance = 0.0  # draw image i with weight count(class_i)^-class_balance: 0 = as the data,
#                      1 = equal classes
control = ''  # condition on the dataset's control images (data/prepare_control.py): 'concat'
#               (extra input channels) or 'controlnet' (DiT: a trainable copy of half the blocks
#               beside the frozen init_base)
init_base = ''  # a new run starts from this train_diffusion.py out_dir's EMA weights (new
#                 control weights: zeros), or from a released DiT-*.pt or SiT-*.pt file
#                 (pretrained.dit; its objective and time convention with it)
# model and diffusion
arch = 'DiT-N/4'  # 'DiT-{N,Ti,S,B,L,XL}/{1,2,4,8}' or 'UNet-{S,B}' (model.py's presets)
norm = 'layernorm'  # DiT, LightningDiT's options (Yao et al. 2025): 'rmsnorm'
mlp = 'gelu'  # DiT: 'swiglu' (at 2/3 the width: the same parameters)
qk_norm = False  # DiT: RMSNorm on queries and keys
rope = False  # DiT: 2-D rotary position embedding in attention
learn_sigma = False  # DiT: also predict the variance, learned by the VLB term (Nichol & Dhariwal
#                      2021; DiT's recipe); DDPM schedules only; the ddpm sampler draws with it
schedule = 'linear'  # 'linear', 'cosine' (DDPM, T steps), 'flow' (x_t = (1 - t) x0 + t eps), 'edm'
prediction_type = 'eps'  # 'eps', 'v', 'x0' (on edm: with EDM's preconditioning), 'flow' (eps - x0)
num_timesteps = 1000  # T of the DDPM schedules
sigma_data = 0.5  # the data's standard deviation in EDM's preconditioning and weighting
timestep_sampling = 'uniform'  # noise levels u in [0, 1): 'uniform', 'logit_normal' or 'mode'
#                                (Esser et al.)
logit_mean = 0.0  # logit_normal: u = sigmoid(logit_mean + logit_std n); on edm (-1.2, 1.2)
#                   is EDM's sigma
logit_std = 1.0
mode_scale = 1.29  # mode sampling's s (Esser et al. 2024, eq. 20); 0 is uniform
loss_weighting = 'min_snr'  # 'uniform' (the prediction's own MSE), 'snr', 'min_snr', 'edm'
#                             (on the x0 error)
min_snr_gamma = 5.0  # min_snr: the weight on the x0 error is min(snr, gamma) (Hang et al. 2023)
class_dropout = 0.1  # probability of the null label, for classifier-free guidance
cosine_loss = 0.0  # weight of LightningDiT's direction term 1 - cos(F_theta, F), per image
# representation terms (DiT), each off at weight 0 and on one block's output tokens (block 1 to
# depth; a depth of 0 is the default given). REPA and SRA align an MLP projection of the tokens to a
# target's, 1 - cos per token; the MLPs are trained with the model and saved for resume only
repa_weight = 0.0  # REPA (Yu et al. 2025; 0.5): to a frozen encoder's patch features of the images
repa_depth = 0  # 0: depth // 3 (the paper's 8 of SiT-XL's 28 blocks)
repa_encoder = ''  # its weights, a local file: dinov2_vitb14_pretrain.pth (or any DINOv2 ViT)
sra_weight = 0.0  # SRA (Jiang et al. 2025; 0.5): to the EMA's tokens of a deeper block, less noisy
sra_depth = 0  # 0: depth // 3
sra_teacher_depth = 0  # the EMA's block; 0: 2 * depth // 3
sra_max_gap = 0.2  # the EMA sees noise level u - sra_max_gap * U(0, 1), at least 0
dispersive_weight = 0.0  # dispersive loss (Wang & He 2025): spreads the tokens over the batch,
#                          log mean_ij exp(-|z_i - z_j|^2 / (size tau)), over each micro-batch
dispersive_tau = 0.5
dispersive_depth = 0  # 0: depth // 3
# optimization
batch_size = 128  # images per optimizer step, over all ranks and micro-steps
grad_accum = 1  # micro-steps per optimizer step on each rank
max_steps = 1000
lr = 1e-3
min_lr = 1e-4  # the cosine schedule's floor
lr_schedule = 'cosine'  # after warm-up: 'cosine' to min_lr, or 'constant'
lr_decay_steps = 0  # length of the cosine, warm-up included; 0 = max_steps
#                     (set it to stop early and resume)
warmup_steps = 100
weight_decay = 0.0  # AdamW, on weights of 2 or more dimensions only
beta1 = 0.9
beta2 = 0.999
grad_clip = 1.0  # max global gradient norm; 0 = no clipping (the norm is logged either way)
max_nonfinite = 20  # a non-finite grad norm skips the update; this many in a row stop the run
ema_decay = 0.9999  # per step, with warm-up: min(ema_decay, (1 + step) / (10 + step))
ema_update_every = 1  # steps between EMA updates (each applies the decay of that many steps)
phema_stds = ''  # post-hoc EMA (Karras et al. 2024): sigma_rel of power-function EMAs to track,
#                  e.g. '0.05,0.1'
phema_interval = 1000  # steps between their snapshots in out_dir/phema/ (and at every checkpoint)
# sample grids during training
sampler = 'ddim'  # 'ddpm', 'ddim', 'euler', 'heun' (diffusion.Diffusion.sample)
sample_steps = 50
cfg_scale = 4.0  # classifier-free guidance scale (1 = none)
# FID during training (evaluate.py's): the EMA's samples, drawn with the grid's sampler settings above
fid_interval = 0  # steps between FIDs, logged as fid; 0 = none
fid_images = 10000  # samples per FID, shared by the ranks: the same noise and labels every time
fid_ref = ''  # an ADM reference batch .npz or a prepared dataset ('' = this run's dataset)
fid_inception = ''  # the FID Inception weights, a local file (docs/guide.md, 'Evaluation protocol')
shift = 1.0  # flow schedule: the sampling grid's timestep shift (Esser et al. 2024;
#              > 1: more high-noise steps)
# system
device = 'cuda' if torch.cuda.is_available() else 'cpu'
dtype = 'bfloat16' if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else 'float32'
compile = torch.cuda.is_available()  # torch.compile the model (on CPU it only costs compile time)
activation_checkpointing = False  # recompute each DiT/UNet block in the backward pass: less memory
peak_tflops = 0.0  # per-device peak for MFU; 0 = known GPUs' dense bf16 (float32: TF32) peak,
#                    none on CPU
seed = 0
# -----------------------------------------------------------------------------
config_keys = [k for k, v in globals().items() if not k.startswith('_') and isinstance(v, (int, float, bool, str))]
exec(open(os.path.join(os.path.dirname(bk.__file__), 'configurator.py')).read())  # (the kit's; it also sets overridden)
config = {k: globals()[k] for k in config_keys}
terms = [k for k in ('repa', 'sra', 'dispersive') if config[f'{k}_weight']]  # (the representation terms on)
plain_dit = dict(norm='layernorm', mlp='gelu', qk_norm=False, rope=False, learn_sigma=False)
dit_options = {**{k: config[k] for k in plain_dit}, 'convention': base_convention(init_base)}  # (model.DiTConfig)
dit_only = ([f'{k}={config[k]!r}' for k, v in plain_dit.items() if config[k] != v] + [f'{k}_weight' for k in terms]
            + ["control='controlnet'"] * (control == 'controlnet')
            + ['a SiT init_base'] * (dit_options['convention'] == 'sit'))
common.check_config(config, choices=[
    ('init_from', ('auto', 'scratch', 'resume')), ('arch', ARCHS), ('schedule', SCHEDULES),
    ('prediction_type', PREDICTIONS), ('timestep_sampling', ('uniform', 'logit_normal', 'mode')),
    ('loss_weighting', ('uniform', 'snr', 'min_snr', 'edm')), ('sampler', SAMPLERS),
    ('norm', ('layernorm', 'rmsnorm')), ('mlp', ('gelu', 'swiglu')),
    ('control', ('', 'concat', 'controlnet')), ('lr_schedule', ('cosine', 'constant')),
    ('dtype', ('float32', 'bfloat16', 'float16'))],
    counts=['batch_size', 'grad_accum', 'max_steps', 'log_interval', 'eval_interval', 'eval_images',
            'sample_interval', 'ckpt_interval', 'sample_steps', 'num_timesteps', 'ema_update_every',
            'max_nonfinite', 'phema_interval'],
    rules=[('arch', arch.startswith('DiT') or not dit_only,
            f"a DiT preset: {', '.join(dit_only)} {'are DiT options' if dit_only[1:] else 'is a DiT option'}"),
           ('init_base', init_base or control != 'controlnet', "a base run's out_dir: a ControlNet trains beside it"),
           ('class_dropout', 0 <= class_dropout < 1, 'in [0, 1)'),
           ('min_snr_gamma', min_snr_gamma > 0,
            "positive (loss_weighting='uniform' is the unweighted loss)"),
           ('mode_scale', -1 <= mode_scale <= 2 / (math.pi - 2),
            'in [-1, 1.752], where mode sampling is monotone'),
           ('shift', shift == 1.0 or schedule == 'flow',
            "1.0 unless schedule='flow', whose grid it shifts"),
           ('shift', shift > 0, 'positive'), ('logit_std', logit_std > 0, 'positive'),
           ('sigma_data', sigma_data > 0, 'positive'),
           ('class_balance', 0 <= class_balance <= 1, 'in [0, 1]'),
           ('cosine_loss', cosine_loss >= 0, 'at least 0 (0 = off)'),
           *[(k, config[k] >= 0, 'at least 0 (0 = off)')
             for k in ('repa_weight', 'sra_weight', 'dispersive_weight')],
           *[(k, config[k] >= 0, 'at least 0 (0: the default block)')
             for k in ('repa_depth', 'sra_depth', 'sra_teacher_depth', 'dispersive_depth')],
           ('repa_encoder', not repa_weight or os.path.isfile(repa_encoder),
            "a local file of the encoder's weights (docs/guide.md, 'Representation terms')"),
           ('sra_max_gap', 0 <= sra_max_gap <= 1, 'in [0, 1]'),
           ('dispersive_tau', dispersive_tau > 0, 'positive'),
           ('learn_sigma', not learn_sigma or schedule in ('linear', 'cosine'),
            "False unless schedule is 'linear' or 'cosine' (the VLB's steps are DDPM's)")])
common.check_applied(overridden, config, {  # (every key is applied or refused)
    'num_timesteps': schedule in ('flow', 'edm') and f"schedule='{schedule}' is continuous in time",
    'sigma_data': 'edm' not in (schedule, loss_weighting) and "only edm's schedule and weighting read it",
    'logit_mean': timestep_sampling != 'logit_normal' and f"timestep_sampling='{timestep_sampling}'",
    'logit_std': timestep_sampling != 'logit_normal' and f"timestep_sampling='{timestep_sampling}'",
    'mode_scale': timestep_sampling != 'mode' and f"timestep_sampling='{timestep_sampling}'",
    'min_snr_gamma': loss_weighting != 'min_snr' and f"loss_weighting='{loss_weighting}'",
    **{k: not config[f"{k.split('_')[0]}_weight"] and f"{k.split('_')[0]}_weight=0"
       for k in ('repa_depth', 'repa_encoder', 'sra_depth', 'sra_teacher_depth', 'sra_max_gap',
                 'dispersive_tau', 'dispersive_depth')}})
try:
    phema_sigmas = [float(v) for v in phema_stds.split(',')] if phema_stds else []
    phema_gammas = [phema_gamma(v) for v in phema_sigmas]
except ValueError as e:
    raise SystemExit(f"error: phema_stds='{phema_stds}' must be comma-separated sigma_rel values "
                     f"in (0, 0.28), like 0.05,0.1 ({e})")
# -----------------------------------------------------------------------------
# DDP: torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; NCCL on GPUs, gloo on CPUs
device_type = common.check_device(device)
if 'RANK' in os.environ:
    device = f"cuda:{os.environ['LOCAL_RANK']}" if device_type == 'cuda' else device
    dist.init_process_group('nccl' if device_type == 'cuda' else 'gloo')
# the run: out_dir and its lock, resume, sums, the log, checkpoints (bookkeeping.Run)
run = bk.start_run(config, 'diffusion', device,
                   inputs=[('dataset', dataformat.data_path(dataset)), ('init_base', init_base)],
                   fixed=['init_base', 'phema_stds', 'schedule', 'prediction_type', 'num_timesteps', 'sigma_data',
                          'class_cond', 'control'])  # (what the run is: a resume keeps it)
micro_batch = run.micro_batch  # images per micro-step
# bf16 autocast around the forward passes (float32: none)
ctx = torch.autocast(device_type, dtype=getattr(torch, dtype)) if dtype != 'float32' else nullcontext()

# -----------------------------------------------------------------------------
# data: uint8 images or float16 latents (N, H, W, C), memory-mapped from data/<dataset>/
data_dir, meta, data = dataformat.load_dataset(dataset, latent_ok=True, classes=class_cond)
H, W, C, K = meta['image_size'], meta['image_size'], meta['channels'], meta['num_classes']
num_classes = K if class_cond else 0
latent = meta.get('latent')  # a latent dataset: float16 latents, their statistics and their decoder
if latent:
    x_flip = dataformat.mirrored_latents(data_dir, meta, 'hflip=True') if hflip else None
    latent_mean, latent_std = (torch.tensor(latent[k], device=device).view(1, C, 1, 1)
                               for k in ('mean', 'std'))
# control images (N, H, W, C_ctrl) uint8, one per image, from data/prepare_control.py
controls = dataformat.load_controls(dataset, data_dir, meta, data, f"control='{control}'") if control else {}
C_ctrl = controls['train'].shape[-1] if control else 0

sample_weights = torch.from_numpy(dataformat.class_weights(data['train'][1], class_balance)) if class_balance else None

def load_batch(split, idx, flip=None):
    """Images idx of a split as floats in [-1, 1] (latents: normalised per channel), NCHW, on the
    device, their labels, and their control images in [-1, 1] (None without control)."""
    x, y = (torch.from_numpy(a[idx]) for a in data[split])
    ctrl = torch.from_numpy(controls[split][idx]) if control else None
    if flip is not None:
        mirrored = torch.from_numpy(x_flip[idx]) if latent else x.flip(2)
        x = torch.where(flip[:, None, None, None], mirrored, x)
        ctrl = torch.where(flip[:, None, None, None], ctrl.flip(2), ctrl) if control else None
    x, y = dataformat.to_device(x, device), y.to(device)
    x = (x - latent_mean) / latent_std if latent else x / 127.5 - 1
    return x, y, dataformat.to_device(ctrl, device) / 127.5 - 1 if control else None

def draw_indices(g):
    """The global batch's image indices, drawn with replacement: uniformly, or by sample_weights.
    Every rank draws the same batch and keeps its slice, so weighted sampling is exact for any world
    size."""
    if class_balance:
        return torch.multinomial(sample_weights, batch_size, replacement=True, generator=g)
    return torch.randint(len(data['train'][0]), (batch_size,), generator=g)

def get_batch(step, micro):
    """This rank's images of micro-step `micro` of the global batch of `step` (load_batch's), and
    with REPA its encoder's images."""
    g = run.rng(step, 0)
    idx = np.sort(draw_indices(g).numpy())  # sorted: kinder to mmap
    flip = torch.rand(batch_size, generator=g) < 0.5
    idx, flip = idx[run.slice(micro)], flip[run.slice(micro)] if hflip else None
    x, y, ctrl = load_batch('train', idx, flip)
    return x, y, ctrl, encoder_images(x, idx, flip) if repa_weight else None

def encoder_images(x, idx, flip):
    """REPA's encoder input in [-1, 1], NCHW: the batch x itself, or of a latent dataset the images
    its latents x encode (train images idx of that dataset, mirrored where flip, as the latents)."""
    if not latent:
        return x
    images = torch.from_numpy(pixels[idx])
    if flip is not None:
        images = torch.where(flip[:, None, None, None], images.flip(2), images)
    return dataformat.to_device(images, device) / 127.5 - 1

# -----------------------------------------------------------------------------
# model, EMA, optimizer, and the checkpoint to resume from
torch.manual_seed(seed)  # the same initial weights on every rank
try:
    model = create_model(arch, image_size=H, in_channels=C, num_classes=num_classes,
                         control=control, control_channels=C_ctrl,
                         **(dit_options if arch.startswith('DiT') else {})).to(device)
except ValueError as e:
    raise SystemExit(f"error: {arch} on {dataset}: {e}")
model_config = model.config
if init_base and run.init_from == 'scratch':  # fine-tuning: from a base model's EMA weights
    load_base(model, init_base, config, device)
ema = copy.deepcopy(model).requires_grad_(False).eval()
if control == 'controlnet':  # the base model stays frozen
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith('control_'))
model.activation_checkpointing = activation_checkpointing
# channels_last: the faster layout for convolutions on tensor cores
if device_type == 'cuda' and arch.startswith('UNet'):
    model = model.to(memory_format=torch.channels_last)
diffusion = Diffusion(schedule, prediction_type, num_timesteps, sigma_data)
null_label = model_config.num_classes
# the representation terms: the block each reads (a depth of 0: the default), REPA's frozen encoder,
# and REPA's and SRA's projectors, an MLP each from the block's tokens to the target's width, three
# layers as REPA's (2048 wide, at most 4x the model's); trained with the model and saved for resume
blocks, encoder, projectors = {}, None, None
if terms:
    depth = model_config.depth
    blocks = {k: config[f'{k}_depth'] or max(1, depth // 3) for k in terms}
    if sra_weight:
        blocks['sra_teacher'] = sra_teacher_depth or max(1, 2 * depth // 3)
    too_deep = [f'{k}_depth={d}' for k, d in blocks.items() if d > depth]
    if too_deep:
        raise SystemExit(f"error: {', '.join(too_deep)}, but {arch} has {depth} blocks")
if repa_weight:
    # the encoder sees images: of a latent dataset, the ones it encodes (as REPA's code reads ImageNet's)
    pixels = dataformat.encoded_images(data_dir, meta, data, 'repa_weight: its encoder') if latent else None
    if (latent['channels'] if latent else C) not in (1, 3):
        raise SystemExit(f"error: repa_weight: its encoder sees gray or RGB images, but {dataset}'s have "
                         f"{latent['channels'] if latent else C} channels")
    encoder = or_exit(dinov2, repa_encoder).to(device)
    encoder_size = model.grid * encoder.config.patch_size  # (its tokens: the DiT's grid)
    imagenet_mean, imagenet_std = (torch.tensor(v, device=device).view(1, 3, 1, 1)
                                   for v in ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)))

if repa_weight or sra_weight:  # (model.Projectors: REPA's MLPs)
    widths = {k: encoder.config.dim if k == 'repa' else model_config.hidden_size for k in terms if k != 'dispersive'}
    projectors = Projectors(model_config.hidden_size, widths).to(device)
trained = [(p, p_ema) for p, p_ema in zip(model.parameters(), ema.parameters()) if p.requires_grad]
params, ema_params = [p for p, _ in trained], [p_ema for _, p_ema in trained]
all_params = params + (list(projectors.parameters()) if projectors else [])
optimizer = common.adamw(all_params, lr, (beta1, beta2), weight_decay)
scaler = torch.amp.GradScaler(device_type, enabled=dtype == 'float16')
ckpt = run.resume(model=model, ema=ema, projector=projectors, optimizer=optimizer, scaler=scaler,
                  model_args=asdict(model_config))
best_val_loss = ckpt.get('best_val_loss', math.inf)  # best.pt's (the EMA's val loss)
# the power-function EMAs (rank 0's), of the trained weights
phema = ((ckpt.get('phema') or [[p.detach().clone() for p in params] for _ in phema_gammas])
         if run.master else [])
del ckpt
trained_names = [name for name, p in model.named_parameters() if p.requires_grad]

def phema_snapshot():
    """The power-function EMAs of the trained weights by name, as sample.py --ema_std reads them."""
    return dict(sigma_rel=phema_sigmas, gamma=phema_gammas,
                ema=[dict(zip(trained_names, (w.cpu() for w in tracked))) for tracked in phema])
raw_model = model
if compile:  # (model.compile_for_training says what runs compiled, and why)
    model = compile_for_training(model)
proj = projectors
if run.ddp:
    model = DDP(model, device_ids=[device] if device_type == 'cuda' else None)
    proj = projectors and DDP(projectors, device_ids=[device] if device_type == 'cuda' else None)
ddp_nets = [net for net in (model, proj) if run.ddp and net is not None]  # (all-reduce on a step's last micro-step)
flops_per_image = 3 * raw_model.flops_per_sample()  # forward + backward (twice the forward)
if run.master:
    print(f"{arch}: {sum(p.numel() for p in params) / 1e6:.2f}M parameters, "
          f"{flops_per_image / 3e9:.3f} GFLOPs forward per image")

# -----------------------------------------------------------------------------
# the objective

def sample_u(n, g):
    """n noise levels u in [0, 1) drawn by timestep_sampling; diffusion.t_from_u turns them into
    times."""
    if timestep_sampling == 'logit_normal':  # Esser et al. 2024, eq. 19
        return torch.sigmoid(logit_mean + logit_std * torch.randn(n, generator=g, device=g.device))
    u = torch.rand(n, generator=g, device=g.device)
    if timestep_sampling == 'mode':  # Esser et al. 2024, eq. 20: mass in the middle, tails kept
        u = 1 - u - mode_scale * (torch.cos(math.pi / 2 * u) ** 2 - 1 + u)
    return u

def loss_weight(alpha, sigma, A, B):
    """Weight of each image's prediction MSE. A weighting is a function lambda(snr) on the x0 error
    (Kingma & Gao 2023); a prediction F = A x0 + B eps errs det / sigma times as much as x0
    (det = alpha B - sigma A), so its MSE gets lambda (sigma / det)^2. For eps, min_snr is
    min(snr, gamma) / snr and for v min(snr, gamma) / (snr + 1) (Hang et al. 2023, eq. 8); edm's
    lambda = snr + 1 / sigma_data^2 is Karras et al.'s (sigma^2 + sd^2) / (sigma sd)^2, uniform on
    its preconditioned x0 output; 'snr' is the plain eps MSE in any parameterisation."""
    snr = (alpha / sigma) ** 2
    if loss_weighting == 'uniform':
        return torch.ones_like(snr)
    lam = {'snr': snr, 'min_snr': snr.clamp(max=min_snr_gamma),
           'edm': snr + sigma_data ** -2}[loss_weighting]
    return lam * (sigma / (alpha * B - sigma * A)) ** 2

def diffusion_loss(net, x0, y, u, eps, ctrl=None, regularize=False, gap=None, images=None):
    """Per-image loss || F_theta(x_t) - F ||^2 at noise levels u (ctrl: the control images),
    weighted, plus cosine_loss (1 - cos(F_theta, F)); the unweighted MSE; and with regularize (the
    train step) the representation terms of the batch, {term: value} (gap: SRA's U(0, 1) draws;
    images: REPA's encoder's)."""
    t = diffusion.t_from_u(u)
    alpha, sigma, A, B = diffusion.coefficients(t)  # float64
    xt = bcast(alpha, x0) * x0 + bcast(sigma, x0) * eps
    # eps, v = alpha eps - sigma x0, x0 (EDM: preconditioned), or eps - x0
    target = bcast(A, x0) * x0 + bcast(B, x0) * eps
    features = tuple(blocks[k] for k in terms) if regularize else ()
    with ctx:
        pred = net(*diffusion.net_inputs(xt, t), y, ctrl, **({'features': features} if features else {}))
    pred, tokens = pred if features else (pred, [])
    pred = pred.float()
    if learn_sigma:  # the prediction, then the variance channels v
        pred, v = pred.chunk(2, dim=1)
    mse = (pred - target).pow(2).mean(dim=(1, 2, 3))
    loss = loss_weight(alpha, sigma, A, B).float() * mse
    if learn_sigma:
        loss = loss + diffusion.variance_kl(x0, xt, t, diffusion.x0_eps(pred.detach(), xt, t)[0], v)
    if cosine_loss:  # LightningDiT's velocity direction term, over each whole image
        loss = loss + cosine_loss * (1 - F.cosine_similarity(pred.flatten(1), target.flatten(1)))
    return loss, mse, representation_terms(dict(zip(terms, tokens)), x0, u, eps, y, ctrl, gap, images) if features else {}

def representation_terms(tokens, x0, u, eps, y, ctrl, gap, images):
    """The representation terms of a micro-batch from the model's tokens at each term's block: REPA's
    and SRA's 1 - cos per token between the projected tokens and the target (which gets no
    gradient), and the dispersive loss over the micro-batch (Wang & He's InfoNCE-L2 form)."""
    out, targets = {}, {}
    with torch.no_grad(), ctx:
        if repa_weight:  # the images at the encoder's patch size times the DiT's token grid
            rgb = F.interpolate(((images + 1) / 2).expand(-1, 3, -1, -1), size=encoder_size, mode='bicubic')
            targets['repa'] = encoder((rgb - imagenet_mean) / imagenet_std)
        if sra_weight:  # the EMA at a lower noise level, with the same noise, labels and control
            t_teacher = diffusion.t_from_u((u - sra_max_gap * gap).clamp(min=0))
            alpha, sigma = diffusion.alpha_sigma(t_teacher)
            x_teacher = bcast(alpha, x0) * x0 + bcast(sigma, x0) * eps
            _, (targets['sra'],) = ema(*diffusion.net_inputs(x_teacher, t_teacher), y, ctrl,
                                       features=(blocks['sra_teacher'],))
    if targets:
        with ctx:
            projected = proj({k: tokens[k] for k in targets})
        for k, target in targets.items():
            out[k] = (1 - F.cosine_similarity(projected[k].float(), target.float(), dim=-1)).mean()
    if dispersive_weight:  # squared distances between the images' tokens, per channel
        z = tokens['dispersive'].float().flatten(1)
        sq = z.pow(2).sum(1)
        dist = (sq[:, None] + sq[None] - 2 * z @ z.T).clamp(min=0) / z.shape[1]
        out['dispersive'] = torch.logsumexp(-dist.flatten() / dispersive_tau, 0) - math.log(dist.numel())
    return out

@torch.no_grad()
def estimate_val_loss(net, suffix=''):
    """val_loss and val_loss_unweighted (+ suffix): the mean loss and MSE over the first
    eval_images val images at noise levels u spread evenly over (0, 1) and fixed noise, low variance
    and comparable across runs. Rank r takes every world_size-th micro-batch."""
    n = min(eval_images, len(data['val'][0]))
    u_all = (torch.arange(n, device=device) + 0.5) / n
    eps_all = torch.randn((n, C, H, W), generator=run.rng(0, 2, device), device=device)
    total = torch.zeros(2, device=device)
    net.eval()  # no dropout
    for lo in range(run.rank * micro_batch, n, run.world_size * micro_batch):
        idx = np.arange(lo, min(lo + micro_batch, n))
        x0, y, ctrl = load_batch('val', idx)
        y = y if class_cond else torch.full_like(y, null_label)
        loss, mse, _ = diffusion_loss(net, x0, y, u_all[idx], eps_all[idx], ctrl)
        total += torch.stack([loss.sum(), mse.sum()])
    net.train(net is raw_model)  # the EMA stays in eval mode
    if run.ddp:
        dist.all_reduce(total)
    return dict(zip(['val_loss' + suffix, 'val_loss_unweighted' + suffix], (total / n).tolist()))

# -----------------------------------------------------------------------------
# the sample grids: fixed noise and labels, the same picture of progress at every sample_interval;
# 64 images on a GPU, the first 16 on a CPU (where 64 of sample_steps guided steps take minutes)
n_grid = 64 if device_type == 'cuda' else 16
grid_z = torch.randn((64, C, H, W), generator=run.rng(0, 3, device), device=device)[:n_grid]
grid_y = torch.arange(n_grid, device=device) % num_classes if num_classes else \
    torch.full((n_grid,), null_label, device=device)
grid_ctrl = None
if control:  # a control model's grid follows the first val images' controls (and labels)
    _, val_y, grid_ctrl = load_batch('val', np.arange(n_grid) % len(data['val'][0]))
    grid_y = val_y if num_classes else grid_y
# the grids' latents are decoded by the autoencoder that encoded the dataset
if latent and (run.master or fid_interval):  # (with FID every rank decodes its share)
    autoencoder = latent_decoder(data_dir, latent, device)

def to_pixels(x):
    """Samples as images in [-1, 1]: latents are un-normalised and decoded."""
    return autoencoder.decode(x * latent_std + latent_mean).clamp(-1, 1) if latent else x

def noise_level_sums(u, mse, num_bins=10):
    """The unweighted loss summed and the images counted in each of num_bins bins of noise level
    u in [i/num_bins, (i+1)/num_bins): the running sums behind the log's loss_u<i>."""
    bins = (u * num_bins).long().clamp(max=num_bins - 1)
    return dict(bin_mse=mse.new_zeros(num_bins).index_add_(0, bins, mse.detach()),
                bin_count=mse.new_zeros(num_bins).index_add_(0, bins, torch.ones_like(mse)))

def noise_level_losses(averages):
    """loss_u<i>, the mean unweighted loss at noise levels in bin i, from a log step's averages
    (None where a bin drew no image; nan where every update was skipped)."""
    bins = zip(averages.get('bin_mse', ()), averages.get('bin_count', ()))
    return {f'loss_u{i}': total / n if n else None for i, (total, n) in enumerate(bins)}

def generate(z, y, ctrl, generator):
    """The EMA's samples of noise z, labels y and control images ctrl (or None) with the grid's
    sampler settings, as images in [-1, 1] (pixels: x0 clipped to [-1, 1] on the way)."""
    with ctx:
        return to_pixels(diffusion.sample(ema, z, y, sampler, sample_steps, cfg_scale=cfg_scale, shift=shift,
                                          clip_x0=not latent, generator=generator, control=ctrl))

def sample_grid():
    return generate(grid_z, grid_y, grid_ctrl, run.rng(0, 4, device))  # (the same noise every time)

# FID during training (evaluate.py's): the network on every rank, the reference's statistics on rank 0
if fid_interval:
    import evaluate
    # (a latent dataset's reference is the image dataset it encodes, at its image size)
    inception, fid_stats = evaluate.training_setup(
        fid_inception, fid_ref or (latent.get('dataset', '') if latent else data_dir),
        latent['image_size'] if latent else H, device, run)

def fid():
    """The FID of fid_images EMA samples with the grid's sampler settings (rank 0's; None on the
    others). Sample i's noise, fresh noise included, comes from a generator seeded by (seed, i), so
    the images do not depend on the world size; its label is i % classes, or with control val image
    i's control and label (cycling)."""
    def images(lo, n):
        idx = np.arange(lo, lo + n)
        gens = [run.rng(i, 5, device) for i in idx]
        y, ctrl = torch.from_numpy(idx % max(num_classes, 1)).to(device), None
        if control:
            _, y, ctrl = load_batch('val', idx % len(data['val'][0]))
        y = y if num_classes else torch.full((n,), null_label, device=device)
        return generate(randn((n, C, H, W), gens, device), y, ctrl, gens)
    return evaluate.training_fid(images, fid_images, micro_batch, inception, fid_stats, run)

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
# training loop. Logged: loss_unweighted, the prediction's plain MSE (comparable across loss
# weightings and cosine_loss), and loss_u<i> (noise_level_losses). A non-finite loss makes the
# gradient norm so too, and the gradients are all-reduced: every rank skips the same updates
# (float16: the scaler sets found_inf itself, from the same gradients)
x0, y, ctrl, images = get_batch(run.step, 0)  # the first batch; each later one is fetched while a step runs
for step in range(run.step, max_steps):
    lr_now = get_lr(step)
    for group in optimizer.param_groups:
        group['lr'] = lr_now
    # noise levels, noise and label dropout for the whole global batch
    g = run.rng(step, 1, device)
    u_all = sample_u(batch_size, g)
    eps_all = torch.randn((batch_size, C, H, W), generator=g, device=device)
    drop_all = torch.rand(batch_size, generator=g, device=device) < (class_dropout if class_cond else 1.0)
    gap_all = torch.rand(batch_size, generator=g, device=device) if sra_weight else None
    for micro in range(grad_accum):
        sl = run.slice(micro)
        y_in = torch.where(drop_all[sl], null_label, y)
        for net in ddp_nets:  # all-reduce the gradients on the last micro-step only
            net.require_backward_grad_sync = micro == grad_accum - 1
        loss, mse, reg = diffusion_loss(model, x0, y_in, u_all[sl], eps_all[sl], ctrl, regularize=True,
                                        gap=gap_all[sl] if sra_weight else None, images=images)
        loss = loss.mean() + sum(config[f'{k}_weight'] * value for k, value in reg.items())
        run.add(loss=loss, loss_unweighted=mse.mean(), **reg, **noise_level_sums(u_all[sl], mse))
        if micro + 1 < grad_accum or step + 1 < max_steps:  # the next batch, fetched while this step runs
            x0, y, ctrl, images = (get_batch(step, micro + 1) if micro + 1 < grad_accum
                                   else get_batch(step + 1, 0))
        scaler.scale(loss / grad_accum).backward()
    # clip, then skip a non-finite update on the device (fused AdamW reads found_inf: no host sync)
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(all_params, grad_clip if grad_clip > 0 else float('inf'))
    bad = ~grad_norm.isfinite()
    optimizer.found_inf = bad.float()
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    # the EMA with warm-up (a skipped update leaves it alone); the post-hoc EMAs (rank 0's)
    with torch.no_grad():
        if (step + 1) % ema_update_every == 0:
            weight = (1 - min(ema_decay, (1 + step) / (10 + step)) ** ema_update_every) * ~bad
            torch._foreach_lerp_(ema_params, params, weight)
        for gamma, tracked in zip(phema_gammas, phema):
            torch._foreach_lerp_(tracked, params, 1 - (1 - 1 / (step + 1)) ** (gamma + 1))
    run.end_step(bad, flops_per_image)
    # evaluations, the log line, checkpoints and grids, each when due
    val = {**estimate_val_loss(raw_model), **estimate_val_loss(ema, '_ema')} if run.due(eval_interval) else {}
    if fid_interval and run.due(fid_interval):
        val['fid'] = fid()
    if run.log_step or val:
        run.log(lr=lr_now, grad_norm=grad_norm, **val, quiet=noise_level_losses(run.averages))
    if 'val_loss_ema' in val and val['val_loss_ema'] < best_val_loss:  # the weights to sample: sample.py --ckpt=best
        best_val_loss = val['val_loss_ema']
        run.save(run.path('best.pt'), model=raw_model, ema=ema, model_args=asdict(model_config),
                 best_val_loss=best_val_loss)
    checkpoint = run.due(ckpt_interval) or run.stop
    if run.master and phema and (run.due(phema_interval) or checkpoint):
        run.snapshot(f'phema/phema-{run.step:07d}.pt', **phema_snapshot())
    if checkpoint:
        run.save(model=raw_model, ema=ema, optimizer=optimizer, scaler=scaler, projector=projectors,
                 model_args=asdict(model_config), phema=phema, best_val_loss=best_val_loss)
    if run.master and run.due(sample_interval) and not run.stop:  # (after the checkpoint: a grid can take long)
        common.save_grid(sample_grid(), run.path(f'samples_{run.step:07d}.png'))
    if run.stop:
        break
run.finish()
