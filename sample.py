"""
Samples images from a train_diffusion.py, distill_consistency.py, train_meanflow.py or train_gan.py
checkpoint (EMA weights by default), or from a released DiT or SiT checkpoint (pretrained); a model
of latents is decoded by the autoencoder its latent dataset names, or by Stable Diffusion's VAE (vae).

    python sample.py --out_dir=out-mnist-dit                            # out-mnist-dit/samples.png
    python sample.py --out_dir=out-mnist-dit --class_labels=3,7 --cfg_scale=2 --save_png=True
    torchrun --nproc_per_node=8 sample.py --out_dir=out-dit-b --num_samples=50000 --save_npz=True
    python sample.py --out_dir=out-mnist-cd --sigmas=80,0.8         # a consistency model: 2 calls
    python sample.py --out_dir=out-mnist-meanflow --steps=1         # a MeanFlow model: 1 call
    python sample.py --out_dir=out-mnist-dit --guide=out-mnist-dit/ckpt_0002000.pt  # autoguidance
    python sample.py --out_dir=out-mnist-gan --save_npz=True        # a GAN: one call, z ~ N(0, I)
    python sample.py --out_dir=out-mnist-dit --ckpt=best            # best.pt: the lowest EMA val loss
    python sample.py --out_dir=out-mnist-dit --ema_std=0.1          # a post-hoc EMA (phema_stds)
    python sample.py --out_dir=out-mnist-dit --memorization=True    # the nearest training images
    # a released checkpoint, sampled as for DiT-XL/2's published FID (SiT-XL/2's the same):
    python sample.py --pretrained=DiT-XL-2-256x256.pt --vae=sd-vae-ft-ema --sampler=ddpm \
        --steps=250 --cfg_scale=1.5 --cfg_channels=3 --num_samples=50000 --save_npz=True
    torchrun --nproc_per_node=8 sample.py --pretrained=DiT-XL-2-256x256.pt --vae=sd-vae-ft-ema \
        --sampler=ddpm --steps=250 --cfg_scale=1.5 --cfg_channels=3 --num_samples=50000 \
        --save_npz=True

Sample i starts from noise seeded by (seed, i), so (for the deterministic samplers) the images do
not depend on batch size or world size; under torchrun each rank samples its share and rank 0 writes
the files. A control model draws sample i under val image i's control image (and label, unless
class_labels says otherwise). The .npz is the ADM format the standard FID tools read: arr_0 uint8
(N, H, W, C), arr_1 the class labels when the model is conditional; samples.json beside it holds
every setting, the checkpoint's checksum, the decoder and the labels: what an FID needs reported.
"""
import glob
import hashlib
import json
import math
import os
import shutil
import sys
import time

import common  # (first: from here on a Ctrl-C is one line, not a traceback)
import numpy as np
import torch
import torch.distributed as dist

import dataformat
from diffusion import SAMPLERS, Diffusion, meanflow_sample, phema_weights
from model import create_model
from pretrained import dit, latent_decoder, or_exit, sd_vae

# -----------------------------------------------------------------------------
out_dir = 'out'  # holds ckpt.pt; the samples are written here too
ckpt = 'ckpt'  # which of out_dir's checkpoints: 'ckpt' (the latest), 'best' (train_diffusion.py's lowest EMA
#               val loss) or a copy kept by keep_last, e.g. 'ckpt_0005000'
# a released DiT or SiT .pt file (pretrained.dit), sampled in place of out_dir's ckpt.pt
pretrained = ''
family = ''  # 'DiT' or 'SiT', pretrained's family ('' = from its file name)
# Stable Diffusion's VAE (a diffusers folder or LDM file) decoding the latents: pretrained needs one
vae = ''  # with a kit checkpoint: in place of its latent dataset's autoencoder
use_ema = True  # the EMA weights (False: the raw weights)
ema_std = 0.0  # > 0: the post-hoc EMA of this sigma_rel, from out_dir/phema/ (Karras et al. 2024)
num_samples = 64
class_labels = 'all'  # 'all' cycles through the classes; or comma-separated labels: '3' or '1,7'
sampler = 'ddim'  # 'ddpm', 'ddim', 'euler' or 'heun' (diffusion.Diffusion.sample), on any schedule
steps = 50  # sampling steps (heun calls the network about twice per step; MeanFlow: 1 or 2)
eta = 0.0  # ddim's noise: 0 deterministic, 1 is ddpm
cfg_scale = 4.0  # classifier-free guidance scale (1 = none)
cfg_channels = 0  # guide only the first k channels (0: all; DiT's, SiT's published FIDs guided 3)
# guidance only where cfg_sigma_min < sigma/alpha <= cfg_sigma_max (Kynkaanniemi et al. 2024)
cfg_sigma_min = 0.0
cfg_sigma_max = float('inf')
# autoguidance (Karras et al. 2024): a weaker model of the same data, schedule and prediction type
# (an early ckpt_<step> of the run, or a smaller model's run) in place of the unconditional branch
guide = ''  # its out_dir (ckpt.pt) or checkpoint file; '' = classifier-free guidance
guide_scale = 2.0  # pred_guide + guide_scale (pred - pred_guide); cfg_channels and the interval apply
shift = 1.0  # flow schedule: timestep shift of the grid (> 1: more steps at high noise)
clip_x0 = True  # clip the x0 estimate to [-1, 1], the range of pixels (never for a latent model)
sigmas = ''  # consistency models: decreasing sigmas, a network call each; '' = sigma_max, one call
batch_size = 64  # per rank (EDM's; on a CPU, 256 guided images' activations leave the caches: 14% slower)
seed = 0
save_png = False  # also one PNG per sample in out_dir/samples/
save_npz = False  # also out_dir/samples.npz for FID tools
# each sample's two nearest training images (L2 in pixels): a report, and memorization.png
memorization = False
device = 'cuda' if torch.cuda.is_available() else 'cpu'
dtype = 'float32'  # fp32 sampling unless asked: the published protocols sample in fp32
# -----------------------------------------------------------------------------
config_keys = [k for k, v in globals().items() if not k.startswith('_') and isinstance(v, (int, float, bool, str))]
exec(open(os.path.join(os.path.dirname(common.__file__), 'configurator.py')).read())  # (the kit's; it also sets overridden)
config = {k: globals()[k] for k in config_keys}
common.check_config(config, counts=['num_samples', 'steps', 'batch_size'],
                choices=[('sampler', SAMPLERS), ('dtype', ('float32', 'bfloat16', 'float16'))],
                rules=[('eta', 0 <= eta <= 1, 'in [0, 1] (0: deterministic, 1: ddpm)'),
                       ('ema_std', ema_std >= 0, "at least 0 (0: the checkpoint's EMA)"),
                       ('ckpt', bool(ckpt.strip('.')) and os.path.basename(ckpt) == ckpt,
                        "a checkpoint's name in out_dir: 'ckpt', 'best' or 'ckpt_<step>'"),
                       ('cfg_sigma_max', cfg_sigma_min < cfg_sigma_max, 'above cfg_sigma_min'),
                       ('cfg_channels', cfg_channels >= 0, 'at least 0 (0: every channel)'),
                       ('family', family in ('', 'DiT', 'SiT') and (pretrained or not family),
                        "'DiT' or 'SiT' with pretrained ('': from the file's name)"),
                       # a released checkpoint comes without its training images and EMA snapshots
                       ('memorization', not (pretrained and memorization),
                        'False with pretrained (no training images come with it)'),
                       ('ema_std', not (pretrained and ema_std), '0 with pretrained (no snapshots)'),
                       ('guide', not (pretrained and guide), "'' with pretrained (a guide is a kit run "
                        "of the same data)"),
                       ('vae', vae or not pretrained, "set with pretrained: Stable Diffusion's VAE "
                        "decodes its latents (docs/guide.md, 'Released weights': e.g. "
                        "stabilityai/sd-vae-ft-ema on Hugging Face: config.json and "
                        "diffusion_pytorch_model.safetensors)")])

def nearest_training_images(images, train, chunk=4096):
    """RMS pixel distances ([0, 1] scale) from each uint8 image (N, H, W, C) to its two nearest of
    train (M, H, W, C), read chunk by chunk, and their indices: (N, 2) each, nearest first."""
    x = torch.from_numpy(np.asarray(images)).to(device).flatten(1).float() / 255
    best_d = torch.full((len(x), 2), float('inf'), device=device)
    best_i = torch.zeros((len(x), 2), dtype=torch.long, device=device)
    for lo in range(0, len(train), chunk):
        block = torch.from_numpy(np.array(train[lo:lo + chunk])).to(device).flatten(1).float() / 255
        d = torch.cat([best_d, torch.cdist(x, block) / math.sqrt(x.shape[1])], dim=1)
        block_i = torch.arange(lo, lo + len(block), device=device).expand(len(x), -1)
        i = torch.cat([best_i, block_i], dim=1)
        best_d, j = d.topk(2, dim=1, largest=False)
        best_i = i.gather(1, j)
    return best_d.cpu().numpy(), best_i.cpu().numpy()

def write_png(images, path, ncol=1):
    """uint8 images (N, H, W, C) as one PNG of ncol columns (common.save_grid takes them in [-1, 1])."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
    common.save_grid(x / 127.5 - 1, path, ncol)

device_type = common.check_device(device)
ddp = int(os.environ.get('RANK', -1)) != -1
rank, world_size = 0, 1
if ddp:
    rank, world_size = int(os.environ['RANK']), int(os.environ['WORLD_SIZE'])
    if device_type == 'cuda':
        device = f"cuda:{os.environ['LOCAL_RANK']}"
        torch.cuda.set_device(device)
    dist.init_process_group(backend='nccl' if device_type == 'cuda' else 'gloo')
ptdtype = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}[dtype]
ctx = torch.autocast(device_type=device_type, dtype=ptdtype, enabled=dtype != 'float32')

# the checkpoint; out_dir, where the samples go, is checked writable now rather than after sampling
ckpt_path = pretrained or os.path.join(out_dir, ckpt.removesuffix('.pt') + '.pt')
runs = "pass the out_dir of a train_diffusion.py, distill_consistency.py, train_meanflow.py or train_gan.py run" \
    if not pretrained else "pass a released DiT or SiT .pt file (docs/guide.md, 'Released weights')"
if not os.path.exists(ckpt_path):
    there = sorted(f for f in os.listdir(out_dir) if f.endswith('.pt')) if os.path.isdir(out_dir) else []
    raise SystemExit(f"error: {ckpt_path} not found; "
                     + (f"{out_dir} holds {', '.join(there)}: pass --ckpt=<one of them>" if there else runs))
if rank == 0:
    common.check_writable(out_dir)
if pretrained:  # a released DiT or SiT: its diffusion as it was trained, and no dataset
    model = or_exit(dit, pretrained, family=family or None)
    published, gan, consistency, meanflow = model.objective, False, None, None
    train_config = dict(published, sigma_data=0.5, dataset='')
    checkpoint = {'path': published['source'], 'family': published['family']}
else:
    saved = common.load_checkpoint(ckpt_path, runs, kinds=['diffusion', 'consistency', 'meanflow', 'gan'])
    # a distill_consistency.py run: its teacher's diffusion; a MeanFlow run: no diffusion, its own jumps
    consistency, meanflow = saved.get('consistency'), saved.get('meanflow')
    train_config = saved['teacher_config'] if consistency else saved['config']
    gan = saved['kind'] == 'gan'  # a train_gan.py checkpoint: its generator, z to images
    model = create_model(train_config['arch'], **saved['model_args'])
    common.load_state(model, saved['ema' if use_ema else 'model'], ckpt_path,
                  'ema' if use_ema else 'model')
    checkpoint = {'path': os.path.abspath(ckpt_path), 'step': saved['step'], 'kind': saved['kind'],
                  **({'checksum': saved['checksum']} if 'checksum' in saved else {})}
if ema_std:  # the post-hoc EMA of the trained weights (the others stay the EMA's); never pretrained
    files = sorted(glob.glob(os.path.join(out_dir, 'phema', 'phema-*.pt')))
    try:  # mmap: each snapshot is read as it is summed
        loaded = [torch.load(f, map_location='cpu', weights_only=True, mmap=True) for f in files]
        snaps = [(s['step'], g, w) for s in loaded if s['step'] <= saved['step']
                 for g, w in zip(s['gamma'], s['ema'])]
    except Exception as e:
        raise SystemExit(f"error: cannot read the post-hoc EMA snapshots in {out_dir}/phema/ "
                         f"({str(e).splitlines()[0][:200]}); remove the broken one, or sample with ema_std=0")
    # the snapshots of this run only: another run's, summed in, would give weights of neither
    other = [f for f, s in zip(files, loaded) if s.get('run_id', saved.get('run_id')) != saved.get('run_id')]
    if other:
        raise SystemExit(f"error: {other[0]} is a snapshot of another run than {ckpt_path}; move it (and "
                         f"the other run's) out of {out_dir}/phema/, or sample with ema_std=0")
    if not snaps:
        raise SystemExit(f"error: ema_std={ema_std} but {out_dir}/phema/ holds no snapshots; train "
                         f"with phema_stds set, or sample the checkpoint's EMA with ema_std=0")
    # the profiles are rebuilt at the checkpoint's step: without a snapshot there, the EMA would be wrong
    if max(step for step, _, _ in snaps) != saved['step']:
        fix = ("resume the run to its next snapshot" if ckpt == 'ckpt' else
               f"{os.path.basename(ckpt_path)} was saved between snapshots; pass a kept ckpt_<step>")
        raise SystemExit(f"error: ema_std={ema_std}: the newest snapshot in {out_dir}/phema/ is at step "
                         f"{max(step for step, _, _ in snaps)}, the checkpoint at step {saved['step']}; {fix}, or "
                         f"sample the checkpoint's EMA with ema_std=0")
    try:
        model.load_state_dict(phema_weights(snaps, saved['step'], ema_std), strict=False)
    except (ValueError, RuntimeError) as e:
        raise SystemExit(f"error: ema_std={ema_std}: {str(e).splitlines()[0][:200]}")
model.to(device).eval()
diffusion = None if gan or meanflow else Diffusion(train_config['schedule'], train_config['prediction_type'],
                                       train_config['num_timesteps'], train_config['sigma_data'])
if shift != 1.0 and not meanflow and (gan or diffusion.schedule != 'flow'):
    raise SystemExit(f"error: shift={shift} applies to the flow schedule only; this run used "
                     f"'{'a GAN' if gan else diffusion.schedule}'")
num_classes, size = model.config.num_classes, model.config.image_size
# the noise: G's input for a GAN; else the images' shape (or that of the latents a decoder reads)
z_shape = (model.config.z_dim,) if gan else (model.config.in_channels, size, size)

# the dataset, read (and checked) where needed: a latent dataset's meta.json names the autoencoder
# that decodes the samples, a control model takes the val images' controls and labels, memorization
# the training images; a released checkpoint has none
dataset, control = train_config['dataset'], getattr(model.config, 'control', '')
data_dir, meta, data = dataformat.data_path(dataset), {}, {}
splits = ('val',) * bool(control) + ('train',) * memorization
if dataset and (splits or os.path.exists(os.path.join(data_dir, 'meta.json'))):
    _, meta, data = dataformat.load_dataset(dataset, splits, latent_ok=True)
latent, decoder = meta.get('latent'), None
if vae:  # a diffusion model of Stable Diffusion's latents sees (z - shift_factor) * scaling_factor
    autoencoder = or_exit(sd_vae, vae).to(device)
    latent_mean, latent_std = autoencoder.shift_factor, 1 / autoencoder.scaling_factor
    decoder = dict(vae=os.path.abspath(vae), scaling_factor=autoencoder.scaling_factor,
                   shift_factor=autoencoder.shift_factor)
elif latent:
    ae_path = os.path.join(data_dir, latent['autoencoder'])
    autoencoder = latent_decoder(data_dir, latent, device)
    latent_mean, latent_std = (torch.tensor(latent[k], device=device).view(1, -1, 1, 1)
                               for k in ('mean', 'std'))
    decoder = dict(autoencoder=os.path.abspath(ae_path), mean=latent['mean'], std=latent['std'])
if decoder:
    if autoencoder.config.z_channels != model.config.in_channels:
        raise SystemExit(f"error: {vae or ae_path} decodes {autoencoder.config.z_channels}-channel "
                         f"latents, and this model makes {model.config.in_channels} channels")
    clip_x0 = False  # x0 is a latent: no [-1, 1] to clip to
if control:
    controls = dataformat.load_controls(dataset, data_dir, meta, {'val': data['val']},
                                        'this model follows control images')['val']
if memorization and latent:
    raise SystemExit("error: memorization=True compares pixels, and this model's training images "
                     "are latents; check a pixel model, or compare decoded samples with the images")
# the labels: class_labels cycled, or the classes in turn (a control model: its val images' labels)
try:
    wanted = [int(v) for v in class_labels.split(',')] if num_classes and class_labels != 'all' \
        else []
except ValueError:
    wanted = [-1]
common.check_config(config, rules=[('class_labels', all(0 <= v < num_classes for v in wanted),
                                f"'all' or comma-separated labels in 0..{num_classes - 1}"),
                               ('cfg_channels', cfg_channels <= model.config.in_channels,
                                f"at most the model's {model.config.in_channels} channels")])
labels = np.resize(wanted, num_samples) if wanted else np.arange(num_samples) % max(num_classes, 1)
if control and num_classes and not wanted:
    labels = data['val'][1][np.arange(num_samples) % len(data['val'][1])]
if consistency:
    try:
        cm_sigmas = [float(v) for v in sigmas.split(',')] if sigmas else [consistency['sigma_max']]
    except ValueError:
        cm_sigmas = []
    sigma_min = consistency['sigma_min']
    ok = cm_sigmas and all(a > b for a, b in zip(cm_sigmas, cm_sigmas[1:] + [sigma_min]))
    sigma_max = consistency['sigma_max']
    ok = ok and cm_sigmas[0] <= sigma_max
    common.check_config(config, rules=[('sigmas', ok, f"decreasing sigmas in the trained range "
                                    f"({sigma_min}, {sigma_max}], comma-separated, like 80 or 80,0.8")])
# every sampling key is applied or refused: those that this model's sampling would not read
scale = guide_scale if guide else cfg_scale  # the guidance's: autoguidance's or classifier-free
how_guided = ('cfg_channels', 'cfg_sigma_min', 'cfg_sigma_max')
diffusion_keys = ('sampler', 'steps', 'eta', 'cfg_scale', *how_guided, 'guide', 'guide_scale', 'shift',
                  'clip_x0')
ignored = {k: "a consistency model samples at its --sigmas" for k in diffusion_keys if consistency}
ignored.update({k: "a MeanFlow model jumps along its average velocities, guided as it was trained"
                for k in (*diffusion_keys, 'sigmas') if meanflow and k != 'steps'})
ignored.update({k: "a GAN generator makes an image in one call" for k in (*diffusion_keys, 'sigmas')
                if gan})
if not (gan or consistency or meanflow):
    ignored['sigmas'] = "sigmas are a consistency model's; this diffusion model samples with steps"
    if sampler != 'ddim':
        ignored['eta'] = f"eta is ddim's noise, and the sampler is {sampler}"
    if guide:
        ignored['cfg_scale'] = "guide replaces classifier-free guidance; guide_scale is its scale"
    else:
        ignored['guide_scale'] = "guide='': the guidance is classifier-free, at cfg_scale"
    if not num_classes:
        ignored['class_labels'] = "this model has no classes"
    if not (num_classes or guide):
        ignored.update({k: "this model has no classes to guide; a guide can (autoguidance)"
                        for k in ('cfg_scale', *how_guided)})
    elif scale == 1:
        ignored.update({k: f"guidance is off ({'guide_scale' if guide else 'cfg_scale'}=1)"
                        for k in how_guided})
    if decoder:
        ignored['clip_x0'] = "this model makes latents, never clipped"
if pretrained:
    ignored['ckpt'] = "pretrained is sampled in place of out_dir's checkpoints"
common.check_applied(overridden, config, ignored)
guide_model = None
if guide and not (gan or consistency or meanflow):
    guide_path = os.path.join(guide, 'ckpt.pt') if os.path.isdir(guide) else guide
    why = "pass the out_dir or a checkpoint of a weaker train_diffusion.py run of the same data as guide"
    if not os.path.isfile(guide_path):
        raise SystemExit(f"error: guide={guide}: {guide_path} not found; {why}")
    weaker = common.load_checkpoint(guide_path, why, kinds=['diffusion'])
    guide_model = create_model(weaker['config']['arch'], **weaker['model_args'])
    common.load_state(guide_model, weaker['ema' if use_ema else 'model'], guide_path, 'ema' if use_ema else 'model')
    # the same task: its prediction of the same x_t is combined with the model's
    same_task = ('dataset', 'schedule', 'prediction_type', 'num_timesteps', 'sigma_data')
    shapes = ('image_size', 'in_channels', 'num_classes', 'control')
    ours, theirs = ({**{k: c.get(k) for k in same_task}, **{k: getattr(m.config, k, '') for k in shapes}}
                    for c, m in ((train_config, model), (weaker['config'], guide_model)))
    differs = [f"{k}={theirs[k]!r} (the model's: {ours[k]!r})" for k in ours if theirs[k] != ours[k]]
    if differs:
        raise SystemExit(f"error: guide={guide} is not a model of this one's task: its {', '.join(differs)}; "
                         f"{why}, schedule and prediction type (docs/guide.md, 'Autoguidance')")
    guide_model.to(device).eval()
    checkpoint['guide'] = {'path': os.path.abspath(guide_path), 'step': weaker['step'],
                           **({'checksum': weaker['checksum']} if 'checksum' in weaker else {})}
if not (gan or consistency or meanflow) and sampler in ('ddpm', 'ddim') and diffusion.schedule in ('linear', 'cosine'):
    common.check_config(config, rules=[('steps', steps <= diffusion.num_timesteps,
                                    f"at most the {diffusion.num_timesteps} timesteps the model was "
                                    f"trained on ({sampler} steps through them)")])
how = f"consistency model, {len(cm_sigmas)} step(s) at sigmas {cm_sigmas}" if consistency else \
    f"MeanFlow model, {steps} step(s)" if meanflow else \
    'GAN generator' if gan else f"{sampler} with {steps} steps, " + \
    (f"autoguidance {guide_scale} by {guide_path} (step {weaker['step']})" if guide_model else f"cfg {cfg_scale}") + \
    (f" on {cfg_channels} channels" if cfg_channels else '')
if vae:
    how += (f"; decoded by {vae} with its scaling_factor {autoencoder.scaling_factor} and "
            f"shift_factor {autoencoder.shift_factor}"
            + (", in place of the latent dataset's autoencoder and mean/std" if latent else ''))
if pretrained:  # this run's sampling beside that of the published FID
    protocol = dict(sampler=sampler, steps=steps, cfg_scale=cfg_scale, cfg_channels=cfg_channels)
    differs = ', '.join(f"{k}={v}" for k, v in protocol.items() if v != published[k])
    if differs and rank == 0:
        print(f"note: {published['family']}'s {published['published']}; the kit's nearest: "
              f"{' '.join(f'{k}={published[k]}' for k in protocol)}; this run differs in {differs}")
weights = f"a released {published['family']} checkpoint" if pretrained else \
    f"step {saved['step']}, {'EMA' if use_ema else 'raw'} weights"
print(f"rank {rank}: sampling {num_samples} images from {ckpt_path} ({weights}), {how}")

# a round from index lo: rank r samples lo + r*n ... lo + r*n + n-1, n <= batch_size the same on
# every rank (the last round is smaller); all_gather puts them in order on rank 0
rounds, t_start = [], time.time()
for lo in range(0, num_samples, world_size * batch_size):
    n = min(batch_size, math.ceil((num_samples - lo) / world_size))
    idx = np.arange(lo + rank * n, lo + (rank + 1) * n)
    z = torch.stack([torch.randn(z_shape, generator=torch.Generator().manual_seed(
        int(np.random.SeedSequence([seed, i]).generate_state(1)[0]))) for i in idx]).to(device)
    y = torch.from_numpy(labels[idx % num_samples]).to(device)
    ctrl = None
    if control:  # val image i's control image
        ctrl = dataformat.to_device(torch.from_numpy(controls[idx % len(controls)]), device) / 127.5 - 1
    # ddpm and eta > 0 add fresh noise per step, drawn per round: their images depend on the rounds
    with ctx:
        generator = torch.Generator(device).manual_seed(seed + lo + rank)
        if gan:
            x = model(z, y).clamp(-1, 1)
        elif consistency:
            x = diffusion.consistency_sample(model, z, y, cm_sigmas, sigma_min, generator)
        elif meanflow:
            x = meanflow_sample(model, z, y, steps, meanflow['time_scale'])
        else:
            x = diffusion.sample(model, z, y, sampler, steps, eta, scale,
                                 (cfg_sigma_min, cfg_sigma_max), shift, clip_x0, generator, ctrl,
                                 cfg_channels, guide_model)
        if decoder:
            x = autoencoder.decode(x * latent_std + latent_mean)
    diverged = (~x.isfinite()).any().float()  # (as images they would be black, and pass)
    if ddp:
        dist.all_reduce(diverged, op=dist.ReduceOp.MAX)
    if diverged:
        raise SystemExit(f"error: {ckpt_path}'s samples are not finite (from image {lo} on): its weights "
                         f"diverged; sample an earlier checkpoint (--ckpt=best, or a kept ckpt_<step>)")
    x = ((x.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    x = x.permute(0, 2, 3, 1).contiguous()  # NHWC, the .npz layout
    if ddp:
        parts = [torch.empty_like(x) for _ in range(world_size)]
        dist.all_gather(parts, x)
        x = torch.cat(parts)
    rounds.append(x.cpu())
    if rank == 0:  # (progress, its rate and the time left)
        done, seconds = min(lo + world_size * n, num_samples), time.time() - t_start
        print(f"{done}/{num_samples} | {done / seconds:.1f} img/s | eta "
              f"{(num_samples - done) * seconds / done / 60:.1f} min", flush=True)

if rank == 0:
    images = torch.cat(rounds)[:num_samples].numpy()
    ncol = min(num_classes, 16) if num_classes and class_labels == 'all' else \
        math.ceil(math.sqrt(min(num_samples, 256)))
    write_png(images[:256], os.path.join(out_dir, 'samples.png'), ncol)
    if save_png:  # (a folder of this call's images only, made beside and swapped in whole)
        folder = common.own_folder(os.path.join(out_dir, f'samples.tmp-{os.getpid()}'))
        try:
            for i in range(len(images)):
                write_png(images[i:i + 1], os.path.join(folder, f'{i:06d}.png'))
            common.replace_folder(folder, os.path.join(out_dir, 'samples'))
        finally:  # (a write that failed or was stopped leaves nothing behind)
            shutil.rmtree(folder, ignore_errors=True)
    if save_npz:
        arrays = {'arr_0': images, **({'arr_1': labels.astype(np.int64)} if num_classes else {})}
        common.write_file(os.path.join(out_dir, 'samples.npz'), lambda f: np.savez(f, **arrays))
        # every setting beside the samples (the rounds too: ddpm and eta > 0 draw noise per round)
        if pretrained:  # the released file's sha256, read in chunks
            digest = hashlib.sha256()
            with open(pretrained, 'rb') as f:
                for chunk in iter(lambda: f.read(1 << 24), b''):
                    digest.update(chunk)
            checkpoint.update(bytes=os.path.getsize(pretrained), sha256=digest.hexdigest())
        counts = {str(c): int(n) for c, n in zip(*np.unique(labels, return_counts=True))}
        if num_classes and class_labels == 'all' and not control and num_samples % num_classes == 0:
            counts = f"each of {num_classes} classes {num_samples // num_classes} times"
        record = dict(
            config={k: str(v) if v in (math.inf, -math.inf) else v for k, v in config.items()},
            checkpoint=checkpoint,
            diffusion='GAN' if gan else {'consistency_sigmas': cm_sigmas, 'sigma_min': sigma_min}
            if consistency else {'meanflow_steps': steps, **meanflow} if meanflow else {k: getattr(diffusion, k) for k in
                                 ('schedule', 'prediction_type', 'num_timesteps', 'sigma_data')},
            decoder=decoder, labels=counts if num_classes else 'unconditional',
            images_sha256=common.images_hash(images),  # (evaluate.py reports these settings with these images only)
            world_size=world_size, batch_size=batch_size, torch=torch.__version__, argv=sys.argv)
        common.write_file(os.path.join(out_dir, 'samples.json'),
                      lambda f: f.write(json.dumps(record, indent=2) + '\n'), 'w')
    print(f"wrote {os.path.join(out_dir, 'samples.png')}" + (", samples/*.png" if save_png else "")
          + (", samples.npz, samples.json" if save_npz else ""))
    if memorization:
        train = data['train'][0]
        near_d, near_i = nearest_training_images(images, train)
        # memorized: a training image closer than a third of the second nearest (Yoon et al. 2023)
        flagged = near_d[:, 0] < near_d[:, 1] / 3
        print(f"memorization: {flagged.sum()} of {num_samples} samples ({flagged.mean():.1%}) have "
              f"a training image closer than 1/3 of the second nearest; nearest RMS pixel distance "
              f"(0-1): median {np.median(near_d[:, 0]):.3f}, min {near_d[:, 0].min():.3f}")
        # the most suspicious first: rows of sample | nearest | second nearest
        worst = np.argsort(near_d[:, 0] / near_d[:, 1])[:16]
        trios = np.stack([(images[k], train[near_i[k, 0]], train[near_i[k, 1]]) for k in worst])
        write_png(trios.reshape(-1, *images.shape[1:]), os.path.join(out_dir, 'memorization.png'),
                  ncol=3)
if ddp:
    dist.barrier()  # no rank tears its groups down while another still talks to it
    dist.destroy_process_group()
