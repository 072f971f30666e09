"""
Released weights read into the kit's networks: facebookresearch/DiT's and willisma/SiT's DiT-XL/2
(dit) and Stable Diffusion's VAE in diffusers' or LDM's layout (sd_vae), from local files (nothing
is downloaded), with the converters from their layouts to model.py's. A bad file is a ValueError
that says what to do (or_exit turns it into the run's one line).
"""
import json
import math
import os
import pickle
from dataclasses import asdict

import torch

import common
from model import AEConfig, Autoencoder, DINOv2, DIT_SIZES, DiT, DiTConfig, InceptionV3, ViTConfig

# the released checkpoints that sd_vae and dit read: their files
RELEASED = ("Stable Diffusion's VAE: a diffusers folder (config.json with diffusion_pytorch_model."
            "safetensors or .bin) or an LDM .ckpt/.safetensors; DiT's or SiT's .pt")


def read_weights(path):
    """The tensors of a released checkpoint by name, and the config.json of its diffusers folder
    (None for other files). path: a folder holding config.json and diffusion_pytorch_model.
    safetensors or .bin (a diffusers pipeline's vae/ folder too), such a weights file (its
    config.json beside it), a .safetensors file (read with the safetensors package, imported only
    here), or a torch file read weights_only: a state dict, an LDM {'state_dict': ...}, or the
    'ema' weights of a DiT or SiT train.py checkpoint. Raises ValueError with what to do."""
    pipeline = os.path.join(path, 'vae')  # a whole diffusers pipeline: its VAE
    if os.path.isdir(pipeline) and not os.path.exists(os.path.join(path, 'config.json')):
        path = pipeline
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    if os.path.isdir(path):
        names = [n for n in ('diffusion_pytorch_model.safetensors', 'diffusion_pytorch_model.bin')
                 if os.path.exists(os.path.join(path, n))]
        if not names:
            raise ValueError(f"{path} is a folder without diffusion_pytorch_model.safetensors or "
                             f".bin; pass a diffusers model folder, or one file ({RELEASED})")
        path = os.path.join(path, names[0])
    if not os.path.exists(path):
        raise ValueError(f"{path} not found; download it first ({RELEASED})")
    config = None
    if os.path.basename(path).startswith('diffusion_pytorch_model.'):
        try:
            with open(os.path.join(folder, 'config.json')) as f:
                config = json.load(f)
        except FileNotFoundError:
            raise ValueError(f"{folder} has no config.json beside {os.path.basename(path)}: a "
                             f"diffusers model's scaling_factor is there; download it with the "
                             f"weights")
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot read {folder}/config.json ({e}); download it again")
    try:
        if path.endswith('.safetensors'):
            from safetensors.torch import load_file
            weights = load_file(path)
        else:
            import argparse  # DiT's and SiT's train.py save their arguments with the weights
            with torch.serialization.safe_globals([argparse.Namespace]):
                weights = torch.load(path, map_location='cpu', weights_only=True)
    except ImportError:
        raise ValueError(f"{path} is a safetensors file: pip install safetensors to read it")
    except Exception as e:
        why = ('it holds objects other than tensors and plain types'
               if isinstance(e, pickle.UnpicklingError)
               else (str(e).split('. ')[0].splitlines() or [f'{type(e).__name__}, an empty file?'])[0][:200])
        raise ValueError(f"cannot read {path} ({why}); it may be truncated: download it again")
    if isinstance(weights, dict) and 'kind' in weights and 'format' in weights:
        raise ValueError(f"{path} is this kit's {weights['kind']} checkpoint, not a released one; "
                         f"pass its out_dir to the script that reads it")
    for key in ('state_dict', 'ema'):  # LDM's wrapper; DiT's and SiT's train.py checkpoints
        if isinstance(weights, dict) and isinstance(weights.get(key), dict):
            weights = weights[key]
    if not isinstance(weights, dict) or not all(torch.is_tensor(v) for v in weights.values()):
        raise ValueError(f"{path} holds no state dict (a {type(weights).__name__}); pass "
                         f"{RELEASED}")
    return weights, config


def or_exit(read, path, **kwargs):
    """read(path, **kwargs) (dit or sd_vae), a bad file ending the run in one line."""
    try:
        return read(path, **kwargs)
    except ValueError as e:
        raise SystemExit(f"error: {e}")


# what the released checkpoints were trained as (diffusion.Diffusion's arguments), their papers' FID
# and the kit's sampling settings nearest it, read by sample.py
DIT_RELEASES = {'DiT': dict(schedule='linear', prediction_type='eps', num_timesteps=1000,
                        sampler='ddpm', steps=250, cfg_scale=1.5, cfg_channels=3,
                        published='FID-50K 2.27: DDPM with the learned variance, 250 steps, '
                                  'cfg 1.5 on 3 channels'),
            'SiT': dict(schedule='flow', prediction_type='flow', num_timesteps=1000,
                        sampler='ddpm', steps=250, cfg_scale=1.5, cfg_channels=3,
                        published='FID-50K 2.06: its own SDE sampler (not in the kit), 250 '
                                  'steps, cfg 1.5 on 3 channels')}


def released_family(path, family=None):
    """'DiT' or 'SiT': family if given, else the file name's start (as released: DiT-XL-2-256x256.pt,
    SiT-XL-2-256x256.pt); the two layouts are the same, so nothing in the file tells them apart."""
    name = os.path.basename(path).lower()
    family = family or ('SiT' if name.startswith('sit') else 'DiT' if name.startswith('dit') else '')
    if family not in ('DiT', 'SiT'):
        raise ValueError(f"{path}: say whether it is a DiT or a SiT checkpoint (family 'DiT' or "
                         f"'SiT'; the file name starts with neither)")
    return family


def base_convention(init_base):
    """How the network of train_diffusion.py's init_base reads time (model.DiTConfig.convention):
    'sit' for a released SiT file, whose weights read it their own way, else 'kit'."""
    try:
        return 'sit' if os.path.isfile(init_base) and released_family(init_base) == 'SiT' else 'kit'
    except ValueError:
        raise SystemExit(f"error: init_base={init_base} is a file, so a released DiT or SiT "
                         f"checkpoint, but its name starts with neither; name it as released "
                         f"(DiT-XL-2-256x256.pt, SiT-XL-2-256x256.pt)")


def load_base(model, init_base, config, device):
    """Fine-tuning, train_diffusion.py's init_base: model starts from the EMA weights of a
    train_diffusion.py out_dir or of a released DiT-*.pt or SiT-*.pt file (dit), which must be the
    same network (control aside) trained with config's objective; new control weights start where
    they change nothing (model.Denoiser.load_base). Anything else ends the run in one line."""
    path = init_base if os.path.isfile(init_base) else os.path.join(init_base, 'ckpt.pt')
    if os.path.isfile(init_base):
        net = or_exit(dit, path)
        base = {'model_args': asdict(net.config), 'ema': net.state_dict(),
                'config': {**net.objective, 'sigma_data': config['sigma_data']}}
    else:
        base = common.load_checkpoint(path, "pass the out_dir of a train_diffusion.py run", device,
                                      ['diffusion'])
    base_args, base_control = base['model_args'], base['model_args'].get('control', '')
    diff = {k: (v, base_args.get(k)) for k, v in asdict(model.config).items()
            if k not in ('control', 'control_channels') and base_args.get(k, v) != v}
    diff.update({k: (config[k], base['config'][k])
                 for k in ('schedule', 'prediction_type', 'num_timesteps', 'sigma_data')
                 if config[k] != base['config'][k]})
    if diff or base_control not in ('', model.config.control):
        raise SystemExit(f"error: init_base {path} is another model (this run vs the base: "
                         f"{diff or 'control'}); train with the base's config")
    try:
        model.load_base(base['ema'], base_control)
    except ValueError as e:
        raise SystemExit(f"error: init_base {path} does not fit {config['arch']}: {e}")


def latent_decoder(data_dir, latent, device):
    """The autoencoder that encoded a latent dataset (its meta.json's latent entry names it),
    frozen, on device: it decodes the latents of the dataset and of the models trained on it. It
    draws nothing from the global RNG (a resumed run's is restored before)."""
    path = os.path.join(data_dir, latent['autoencoder'])
    ckpt = common.load_checkpoint(path, "re-encode the dataset with data/prepare_latents.py: its "
                                  "autoencoder decodes the samples", device, ['latent decoder'])
    with torch.random.fork_rng(devices=[]):
        autoencoder = Autoencoder(AEConfig(**ckpt['model_args']))
    common.load_state(autoencoder, ckpt['weights'], path, 'weights')
    return autoencoder.to(device).eval().requires_grad_(False)


def dit(path, family=None):
    """A released checkpoint of facebookresearch/DiT (DiT-XL-2-256x256.pt, -512x512.pt: a DDPM
    eps model with learned variance) or willisma/SiT (SiT-XL-2-256x256.pt: the same network as
    a velocity model of the linear interpolant), or the EMA weights of either repository's
    train.py checkpoint, from a local file. family 'DiT' or 'SiT' (the two layouts are the same;
    None: from the file's name). The architecture is read from the shapes. SiT's unused
    variance channels are dropped. Eval mode, with .objective: DIT_RELEASES[family]."""
    family = released_family(path, family)
    weights, _ = read_weights(path)
    if 'x_embedder.proj.weight' not in weights or 'pos_embed' not in weights:
        raise ValueError(f"{path} holds no DiT or SiT models.py state dict (no "
                         f"x_embedder.proj.weight, pos_embed); pass a DiT or SiT release")
    require(weights, ['final_layer.linear.weight', 'blocks.0.mlp.fc1.weight',  # shapes read
                      'y_embedder.embedding_table.weight'], path)
    dim, C, p, _ = weights['x_embedder.proj.weight'].shape
    out = weights['final_layer.linear.weight'].shape[0] // p ** 2
    depth = 1 + max(int(k.split('.')[1]) for k in weights if k.startswith('blocks.'))
    # the heads are in no shape: DIT_SIZES' for its widths (DiT's S to XL: 64 wide), else 64 wide
    heads = {width: h for _, width, h in DIT_SIZES.values()}
    config = DiTConfig(
        image_size=math.isqrt(weights['pos_embed'].shape[1]) * p, in_channels=C, patch_size=p,
        hidden_size=dim, depth=depth, num_heads=heads.get(dim, dim // 64),
        mlp_ratio=weights['blocks.0.mlp.fc1.weight'].shape[0] / dim,
        num_classes=weights['y_embedder.embedding_table.weight'].shape[0] - 1,
        learn_sigma=family == 'DiT' and out == 2 * C,
        convention='sit' if family == 'SiT' else 'kit')
    net = DiT(config)
    if not torch.allclose(weights['pos_embed'][0].float(), net.pos_embed[0], atol=1e-5):
        raise ValueError(f"{path}'s pos_embed is not DiT's fixed sine-cosine embedding")
    if out == 2 * C and not config.learn_sigma:  # SiT's variance channels: its forward drops them
        for leaf in ('weight', 'bias'):
            w = weights[f'final_layer.linear.{leaf}']  # rows: (patch position, half, channel)
            kept = w.view(p * p, 2, C, -1)[:, 0]
            weights[f'final_layer.linear.{leaf}'] = kept.reshape(-1, *w.shape[1:])
    weights.pop('pos_embed')
    load_renamed(net, weights, dit_names(depth), path)
    net.objective = dict(DIT_RELEASES[family], family=family, source=os.path.abspath(path))
    return net.eval()


def sd_vae(path, scaling_factor=None):
    """Stable Diffusion's VAE (sd-vae-ft-ema, -ft-mse, SDXL's: any AutoencoderKL of LDM's
    layout) from a local file or folder, in either layout it is released in: diffusers'
    AutoencoderKL (a folder with config.json and diffusion_pytorch_model.safetensors or .bin) or
    CompVis/LDM's checkpoint (.ckpt or .safetensors of the VAE, or a whole Stable Diffusion
    checkpoint's first_stage_model.*). Eval mode, with .scaling_factor and .shift_factor: a
    diffusion model sees (z - shift_factor) * scaling_factor (config.json's; for an LDM file
    scaling_factor, default 0.18215, and 0)."""
    weights, config_json = read_weights(path)
    if any(k.startswith('first_stage_model.') for k in weights):  # a whole SD checkpoint
        weights = {k[18:]: v for k, v in weights.items() if k.startswith('first_stage_model.')}
    weights = {k: v for k, v in weights.items()  # not LDM's loss (discriminator and LPIPS)
               if k.split('.')[0] in ('encoder', 'decoder', 'quant_conv', 'post_quant_conv')}
    layout = ('diffusers' if 'encoder.down_blocks.0.resnets.0.conv1.weight' in weights else
              'ldm' if 'encoder.down.0.block.0.conv1.weight' in weights else None)
    if layout is None:
        raise ValueError(f"{path} holds no Stable Diffusion VAE (no encoder.down_blocks.* of "
                         f"diffusers' layout, nor LDM's encoder.down.*); pass its diffusers "
                         f"folder or its LDM .ckpt or .safetensors")
    require(weights, ['encoder.conv_in.weight', 'encoder.conv_out.weight',  # shapes read
                      'decoder.conv_in.weight'], path)
    if layout == 'diffusers' and config_json is None:
        raise ValueError(f"{path} is in diffusers' layout: pass its folder, with the config.json "
                         f"that holds its scaling_factor")
    # the architecture, from the shapes: widths, blocks per level, latent channels
    down, block = ('down_blocks', 'resnets') if layout == 'diffusers' else ('down', 'block')
    levels = len({k.split('.')[2] for k in weights if k.startswith(f'encoder.{down}.')})
    widths = [weights[f'encoder.{down}.{i}.{block}.0.conv1.weight'].shape[0]
              for i in range(levels)]
    conv_in, z_in = weights['encoder.conv_in.weight'], weights['decoder.conv_in.weight']
    config = AEConfig(
        image_size=(config_json or {}).get('sample_size', 256), in_channels=conv_in.shape[1],
        channels=widths[0], channel_mult=tuple(w // widths[0] for w in widths),
        num_res_blocks=len({k.split('.')[4] for k in weights
                            if k.startswith(f'encoder.{down}.0.{block}.')}),
        z_channels=z_in.shape[1],
        mid_attention=any('attn_1' in k or 'attentions' in k for k in weights),
        kl=weights['encoder.conv_out.weight'].shape[0] == 2 * z_in.shape[1])
    ae = Autoencoder(config)
    # a config without quant convolutions (use_quant_conv: false) has them as the identity
    for name, conv in (('quant_conv', ae.quant_conv), ('post_quant_conv', ae.post_quant_conv)):
        if f'{name}.weight' not in weights:
            eye = torch.eye(conv.out_channels)[:, :, None, None]
            weights.update({f'{name}.weight': eye, f'{name}.bias': torch.zeros(len(eye))})
    load_renamed(ae, weights, sd_vae_names(config, layout, 'encoder.mid_block.attentions.0.'
                                           'query.weight' in weights), path)
    cfg = config_json or {}
    ae.scaling_factor = float(cfg.get('scaling_factor', scaling_factor or 0.18215))
    ae.shift_factor = float(cfg.get('shift_factor') or 0.0)
    return ae.eval()


def inception(path):
    """model.InceptionV3 with the FID weights of TensorFlow's 2015 graph as pytorch-fid
    (pt_inception-2015-12-05-6726825d.pth) or torch-fidelity (weights-inception-2015-12-05-6726825d.pth)
    converted them: both in torchvision's names, which the network keeps."""
    weights, _ = read_weights(path)
    net = InceptionV3()
    load_renamed(net, weights, {}, path)
    return net


def dinov2(path):
    """model.DINOv2 with a released DINOv2 ViT's weights (dinov2_vits14_pretrain.pth,
    dinov2_vitb14_pretrain.pth, dinov2_vitl14_pretrain.pth, the files torch.hub caches: its names
    are the network's), or with any ViT saved in that layout (its size read from the shapes: REPA's
    stand-in encoders); frozen, in eval mode."""
    weights, _ = read_weights(path)
    require(weights, ['patch_embed.proj.weight', 'pos_embed'], path, ' (a DINOv2 ViT has it)')
    dim, _, p, _ = weights['patch_embed.proj.weight'].shape
    depth = len({k.split('.')[1] for k in weights if k.startswith('blocks.')})
    pos_grid = math.isqrt(weights['pos_embed'].shape[1] - 1)
    if any(k.startswith('register_tokens') or '.w12.' in k or k.startswith('blocks.0.0.') for k in weights):
        raise ValueError(f"{path} is a DINOv2 with register tokens, SwiGLU blocks (ViT-g) or chunked "
                         f"blocks; use dinov2_vitb14_pretrain.pth (or vits14, vitl14)")
    net = DINOv2(ViTConfig(patch_size=p, dim=dim, depth=depth, pos_grid=pos_grid))
    load_renamed(net, weights, {}, path)
    return net


def dit_names(depth):
    """{kit module: [its name in facebookresearch/DiT's and willisma/SiT's models.py]} where they
    differ, for a DiT of depth blocks (their pos_embed is the kit's fixed sincos buffer)."""
    names = {'x_embedder': 'x_embedder.proj', 'y_embedder': 'y_embedder.embedding_table',
             'linear_final': 'final_layer.linear', 'adaLN_final.1': 'final_layer.adaLN_modulation.1',
             **{f't_embedder.{i}': f't_embedder.mlp.{i}' for i in (0, 2)},
             **{f'blocks.{b}.mlp.{i}': f'blocks.{b}.mlp.fc{i // 2 + 1}'
                for b in range(depth) for i in (0, 2)}}
    return {kit: [theirs] for kit, theirs in names.items()}


def sd_vae_names(config, layout, old_attention=False):
    """{kit module: the names it has in Stable Diffusion's VAE files} for an Autoencoder of config:
    layout 'diffusers' (AutoencoderKL; old_attention: the query/key/value/proj_attn names of files
    saved before diffusers 0.14, as the sd-vae-ft-* releases are) or 'ldm' (CompVis). The
    attention's q, k and v are the kit's one qkv layer, in that order."""
    d, L, n = layout == 'diffusers', len(config.channel_mult), config.num_res_blocks
    mid = ['mid_block.resnets.0', 'mid_block.resnets.1'] if d else ['mid.block_1', 'mid.block_2']
    out = ['conv_norm_out' if d else 'norm_out', None, 'conv_out']
    enc, dec = ['conv_in'], ['conv_in', *mid]
    for level in range(L):  # a diffusers decoder numbers its levels from the bottom
        enc += [f'down_blocks.{level}.resnets.{j}' if d else f'down.{level}.block.{j}'
                for j in range(n)]
        up = L - 1 - level
        dec += [f'up_blocks.{level}.resnets.{j}' if d else f'up.{up}.block.{j}' for j in range(n + 1)]
        if level + 1 < L:
            enc.append(f'down_blocks.{level}.downsamplers.0.conv' if d else f'down.{level}.downsample.conv')
            dec.append(f'up_blocks.{level}.upsamplers.0.conv' if d else f'up.{up}.upsample.conv')
    names = {'quant_conv': ['quant_conv'], 'post_quant_conv': ['post_quant_conv']}
    qkv = (['query', 'key', 'value'] if old_attention else ['to_q', 'to_k', 'to_v']) if d else ['q', 'k', 'v']
    attn = {'norm_attn': ['group_norm' if d else 'norm'], 'attn.qkv': qkv,
            'attn.proj': [('proj_attn' if old_attention else 'to_out.0') if d else 'proj_out']}
    for part, layers in (('encoder', enc + mid + out), ('decoder', dec + out)):
        for i, name in enumerate(layers):
            if name is None:
                continue
            if 'sample' in name:  # the kit's (padding or upsampling, conv)
                names[f'{part}.{i}.1'] = [f'{part}.{name}']
            elif 'resnets' in name or 'block' in name:  # a ResBlock, and the attention it holds
                for sub in ('norm1', 'conv1', 'norm2', 'conv2'):
                    names[f'{part}.{i}.{sub}'] = [f'{part}.{name}.{sub}']
                names[f'{part}.{i}.skip'] = [f'{part}.{name}.{"conv" if d else "nin"}_shortcut']
                if name in ('mid_block.resnets.0', 'mid.block_1'):
                    prefix = f'{part}.mid_block.attentions.0' if d else f'{part}.mid.attn_1'
                    for kit, theirs in attn.items():
                        names[f'{part}.{i}.{kit}'] = [f'{prefix}.{t}' for t in theirs]
            else:
                names[f'{part}.{i}'] = [f'{part}.{name}']
    return names

def require(weights, keys, path, what=''):
    """ValueError naming the first of keys that weights (a released file's, from path) lacks."""
    missing = [k for k in keys if k not in weights]
    if missing:
        raise ValueError(f"{path} lacks {missing[0]}{what}; it is damaged, or another model")

def load_renamed(net, weights, names, path):
    """Loads weights into net, where names maps each module of net to its name(s) in weights (two
    or more: concatenated, e.g. q, k, v), each reshaped to the kit's (a 1x1 conv as a linear
    layer); every weight of net and every entry of weights used once, or ValueError."""
    state, used = {}, set()
    for key, want in net.state_dict().items():
        module, _, leaf = key.rpartition('.')  # (module '': a parameter of net itself)
        if leaf == 'num_batches_tracked':  # (a batch norm's counter: no weight, never read in eval)
            state[key] = want
            used.add(key)
            continue
        theirs = [f'{name}.{leaf}'.lstrip('.') for name in names.get(module, [module])]
        require(weights, theirs, path, f" (for this model's {key})")
        parts = [weights[k].float().reshape(-1, *want.shape[1:]) for k in theirs]
        value = torch.cat(parts) if len(parts) > 1 else parts[0]
        if value.shape != want.shape:
            raise ValueError(f"{path}'s {theirs[0]} has shape {tuple(weights[theirs[0]].shape)} "
                             f"where this model has {tuple(want.shape)}")
        state[key] = value
        used.update(theirs)
    unused = sorted(set(weights) - used)
    if unused:
        raise ValueError(f"{path} holds {len(unused)} weights this model has no place for, such as "
                         f"{unused[0]}; it is another architecture")
    net.load_state_dict(state)
