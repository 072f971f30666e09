"""Released weights, with nothing downloaded: pretrained.sd_vae reads Stable Diffusion's VAE in
diffusers' and LDM's layouts and pretrained.dit DiT's and SiT's releases, their names and shapes
checked against tests/released_layouts.json (recorded from the code that wrote those files); data/prepare_latents.py
encodes with such a VAE and sample.py decodes through it, undoing exactly the recorded scaling; sample.py samples a
released file and writes every setting beside the .npz; train_diffusion.py fine-tunes from one; the learned
variance's sampler step and loss match their closed forms; a wrong file ends in one line. The files are written
here in the released layouts, from random weights. (The outputs' equivalence with diffusers', LDM's, DiT's and
SiT's own code is measured outside the repository: docs/reference.md.)"""
import hashlib
import json
import math
import os
import re
from dataclasses import replace

import numpy as np
import pytest
import torch

import common
from conftest import MNIST, run
import pretrained
from diffusion import Diffusion
from model import AE_PRESETS, DIT_PRESETS, AEConfig, Autoencoder, DiT, DiTConfig, create_model
from pretrained import dit_names, sd_vae_names

with open(os.path.join(os.path.dirname(__file__), 'released_layouts.json')) as f:
    LAYOUTS = json.load(f)


def released(net, names, conv_attention=False):
    """net's weights under their names in a released file: names maps a kit module to its name(s) there (several:
    the kit's tensor split along dim 0, as q, k and v); conv_attention: LDM's q, k, v and proj_out are 1x1 convs."""
    out = {}
    for key, value in net.state_dict().items():
        module, leaf = key.rsplit('.', 1)
        theirs = names.get(module, [module])
        for name, part in zip(theirs, value.chunk(len(theirs))):
            if conv_attention and '.attn_1.' in name and part.dim() == 2:
                part = part[:, :, None, None]
            out[f'{name}.{leaf}'] = part.clone()
    return out


def perturbed(net, seed=0):
    """net with every weight moved off its init (zero-initialised layers included), so that every name matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return net.eval()


def released_dit(folder, name='DiT-N-2-8.pt', learn_sigma=True, seed=0):
    """A DiT-N/2 on 8 x 8 x 4 latents, 10 classes, saved as facebookresearch/DiT saves its releases; and the net."""
    torch.manual_seed(seed)
    net = perturbed(create_model('DiT-N/2', image_size=8, in_channels=4, num_classes=10, learn_sigma=learn_sigma), seed)
    state = {**released(net, dit_names(net.config.depth)), 'pos_embed': net.pos_embed.clone()}
    torch.save(state, folder / name)
    return folder / name, net


def diffusers_vae(folder, ae, scaling=0.5, shift=0.1, old_attention=False, safetensors=True):
    """ae in diffusers' layout: folder/config.json and diffusion_pytorch_model.safetensors (or .bin)."""
    from safetensors.torch import save_file
    folder.mkdir(parents=True, exist_ok=True)
    weights = released(ae, sd_vae_names(ae.config, 'diffusers', old_attention))
    if safetensors:
        save_file(weights, folder / 'diffusion_pytorch_model.safetensors')
    else:
        torch.save(weights, folder / 'diffusion_pytorch_model.bin')
    config = {'_class_name': 'AutoencoderKL', 'latent_channels': ae.config.z_channels, 'sample_size': 32,
              'scaling_factor': scaling, 'shift_factor': shift}
    (folder / 'config.json').write_text(json.dumps(config))
    return folder


def small_vae(in_channels=3, seed=0):
    torch.manual_seed(seed)
    return perturbed(create_model('AE-S/f4', image_size=32, in_channels=in_channels), seed)


# -----------------------------------------------------------------------------
# the maps against the released files' names and shapes

def test_the_maps_give_the_released_files_names_and_shapes():
    """DiT-XL/2 (learned variance: 2C outputs) and the kit's AE-B/f8 (Stable Diffusion's VAE), built on the meta
    device, written under model.py's names, have exactly the released files' keys and shapes: DiT's 256 and 512
    releases (SiT's is the 256 one's layout), and the VAE's in diffusers' layout and in LDM's."""
    with torch.device('meta'):
        dit = DiT(DiTConfig(image_size=32, in_channels=4, num_classes=1000, learn_sigma=True,
                            **DIT_PRESETS['DiT-XL/2']))
        dit512 = DiT(DiTConfig(image_size=64, in_channels=4, num_classes=1000, learn_sigma=True,
                               **DIT_PRESETS['DiT-XL/2']))
        ae = Autoencoder(AEConfig(**{**AE_PRESETS['AE-B/f8'], 'image_size': 256}))
    shapes = lambda weights: {k: list(v.shape) for k, v in weights.items()}
    names = dit_names(28)
    assert shapes({**released(dit, names), 'pos_embed': dit.pos_embed}) == LAYOUTS['DiT-XL-2-256x256.pt']
    assert list(dit512.pos_embed.shape) == LAYOUTS['DiT-XL-2-512x512.pt pos_embed']
    assert shapes(released(ae, sd_vae_names(ae.config, 'diffusers', True))) == LAYOUTS['sd-vae-ft-ema diffusers']
    assert shapes(released(ae, sd_vae_names(ae.config, 'ldm'), conv_attention=True)) == LAYOUTS['sd-vae-ft-ema ldm']
    assert sum(p.numel() for p in ae.parameters()) == 83_653_863  # the SD VAE's count
    assert sum(p.numel() for p in dit.parameters()) + dit.pos_embed.numel() == 675_129_632  # DiT-XL/2's


# -----------------------------------------------------------------------------
# round trips: written in a released layout, read back by pretrained.py, the same network

def ldm_files(tmp_path, ae):
    """ae as LDM's VAE checkpoint ({'state_dict': ...} with its loss's keys beside the VAE's) and as a whole Stable
    Diffusion checkpoint (first_stage_model.* among the UNet's keys) in safetensors."""
    from safetensors.torch import save_file
    weights = released(ae, sd_vae_names(ae.config, 'ldm'), conv_attention=True)
    loss = {'loss.logvar': torch.zeros(()), 'loss.discriminator.main.0.weight': torch.randn(4, 3, 4, 4)}
    torch.save({'state_dict': {**weights, **loss}, 'global_step': 7}, tmp_path / 'vae-ft-ema.ckpt')
    whole = {**{f'first_stage_model.{k}': v for k, v in weights.items()},
             'model.diffusion_model.input_blocks.0.0.weight': torch.randn(8, 4, 3, 3), 'alphas_cumprod': torch.ones(3)}
    save_file(whole, tmp_path / 'sd-v1-5.safetensors')
    return tmp_path / 'vae-ft-ema.ckpt', tmp_path / 'sd-v1-5.safetensors'


@pytest.mark.parametrize('layout', ['diffusers safetensors', 'diffusers bin', 'diffusers old attention names',
                                    'ldm ckpt', 'stable diffusion checkpoint'])
def test_vae_round_trip_in_every_layout(tmp_path, layout):
    """The same weights and the same encoder posterior and decoder output, bit for bit; the scaling from
    config.json (an LDM file has none: 0.18215 and no shift)."""
    ae = small_vae()
    if layout.startswith('diffusers'):
        path = diffusers_vae(tmp_path / 'vae', ae, old_attention='old' in layout, safetensors='bin' not in layout)
        scaling = (0.5, 0.1)
    else:
        path = ldm_files(tmp_path, ae)[layout != 'ldm ckpt']
        scaling = (0.18215, 0.0)
    loaded = pretrained.sd_vae(str(path))
    # the architecture from the shapes (an LDM file records no image size: the convolutions take any)
    assert replace(loaded.config, image_size=32) == ae.config and not loaded.training
    assert (loaded.scaling_factor, loaded.shift_factor) == scaling
    assert all(torch.equal(a, b) for a, b in zip(ae.state_dict().values(), loaded.state_dict().values()))
    x, z = torch.rand(2, 3, 32, 32) * 2 - 1, torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        for a, b in zip(ae.encode(x) + (ae.decode(z),), loaded.encode(x) + (loaded.decode(z),)):
            assert torch.equal(a, b)


@pytest.mark.parametrize('old_names', [False, True], ids=['to_q', 'query'])
def test_the_vae_attention_reads_q_k_v_and_the_output_projection_by_their_names(tmp_path, old_names):
    """The middle attention of a diffusers-layout file, its weights set by name, is what diffusers computes from
    them: x + to_out(softmax(q k^T / sqrt(C)) v) over the pixels, q = to_q(group_norm(x)), and so on (a swap of q
    and k, or of the output projection, would pass the round trip but not this)."""
    ae = small_vae()
    folder = diffusers_vae(tmp_path / 'vae', ae, old_attention=old_names)
    from safetensors.torch import load_file, save_file
    weights = load_file(folder / 'diffusion_pytorch_model.safetensors')
    prefix = 'encoder.mid_block.attentions.0.'
    names = ['query', 'key', 'value', 'proj_attn'] if old_names else ['to_q', 'to_k', 'to_v', 'to_out.0']
    g = torch.Generator().manual_seed(1)
    for name in names + ['group_norm']:
        for leaf in ('weight', 'bias'):
            weights[prefix + f'{name}.{leaf}'] = torch.randn(weights[prefix + f'{name}.{leaf}'].shape, generator=g)
    save_file(weights, folder / 'diffusion_pytorch_model.safetensors')
    block = next(m for m in pretrained.sd_vae(str(folder)).encoder if getattr(m, 'attn', None))
    x = torch.randn(2, 128, 3, 5)
    w = {name: (weights[prefix + f'{name}.weight'], weights[prefix + f'{name}.bias']) for name in names}
    h = torch.nn.functional.group_norm(x, 32, *(weights[prefix + f'group_norm.{leaf}'] for leaf in ('weight', 'bias')),
                                       eps=1e-6).flatten(2).transpose(1, 2)
    q, k, v = (h @ w[n][0].T + w[n][1] for n in names[:3])
    want = (torch.softmax(q @ k.transpose(1, 2) / math.sqrt(128), -1) @ v) @ w[names[3]][0].T + w[names[3]][1]
    with torch.no_grad():
        got = block.attn(block.norm_attn(x).flatten(2).transpose(1, 2))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_dit_and_sit_round_trip_and_sits_time_convention(tmp_path):
    """A DiT release reads back as the same network (2C outputs: learned variance) recording DDPM eps; the same file
    named as SiT's reads as a velocity model of the linear interpolant: SiT's network f(x, s, y), s = 1 - t (1:
    data), predicts x0 - eps, so the kit's net(x, 1000 t, y) is -f(x, 1 - t, y), its variance half dropped."""
    path, net = released_dit(tmp_path)
    dit = pretrained.dit(str(path))
    assert dit.config == net.config and dit.objective['schedule'] == 'linear' and dit.objective['family'] == 'DiT'
    x, y = torch.randn(3, 4, 8, 8), torch.tensor([0, 9, 10])  # 10: the null label
    t = torch.tensor([0.0, 400.0, 999.0])
    with torch.no_grad():
        assert torch.equal(dit(x, t, y), net(x, t, y))
        os.link(path, tmp_path / 'SiT-N-2-8.pt')
        sit = pretrained.dit(str(tmp_path / 'SiT-N-2-8.pt'))
        assert sit.objective['schedule'] == 'flow' and sit.objective['prediction_type'] == 'flow'
        assert not sit.config.learn_sigma and sit.config.convention == 'sit'
        s = torch.tensor([0.1, 0.5, 0.97])  # SiT's time
        torch.testing.assert_close(sit(x, 1000 * (1 - s), y), -net(x, s, y)[:, :4], rtol=1e-5, atol=1e-6)


# -----------------------------------------------------------------------------
# wrong files: a ValueError naming the file and what to do (one line in the scripts)

def wrong_files(tmp_path):
    """name -> (the file, the reader of pretrained.py given it, the words the error must hold)."""
    vae = diffusers_vae(tmp_path / 'vae', small_vae())
    dit_path, _ = released_dit(tmp_path)
    files = {}
    (tmp_path / 'noconfig').mkdir()
    os.link(vae / 'diffusion_pytorch_model.safetensors', tmp_path / 'noconfig' / 'diffusion_pytorch_model.safetensors')
    data = (vae / 'diffusion_pytorch_model.safetensors').read_bytes()
    (tmp_path / 'cut').mkdir()
    (tmp_path / 'cut' / 'diffusion_pytorch_model.safetensors').write_bytes(data[:len(data) // 2])
    (tmp_path / 'cut' / 'config.json').write_text((vae / 'config.json').read_text())
    (tmp_path / 'DiT-cut.pt').write_bytes(dit_path.read_bytes()[:5000])
    (tmp_path / 'empty').mkdir()
    torch.save({'kind': 'diffusion', 'format': 1, 'model': {}}, tmp_path / 'DiT-kit.pt')
    state = torch.load(dit_path, weights_only=True)
    torch.save({**state, 'pos_embed': state['pos_embed'] + 0.1}, tmp_path / 'DiT-learned-pos.pt')
    torch.save({k: v for k, v in state.items() if k != 'blocks.1.attn.qkv.weight'}, tmp_path / 'DiT-missing.pt')
    torch.save({**state, 'blocks.0.attn.q_norm.weight': torch.ones(32)}, tmp_path / 'DiT-extra.pt')
    os.link(dit_path, tmp_path / 'model.pt')
    torch.save(released(small_vae(), sd_vae_names(small_vae().config, 'ldm'), True), tmp_path / 'DiT-vae.pt')
    files.update({
        'a DiT as the VAE': (dit_path, pretrained.sd_vae, 'holds no Stable Diffusion VAE'),
        'no config.json': (tmp_path / 'noconfig', pretrained.sd_vae, 'has no config.json beside'),
        'truncated safetensors': (tmp_path / 'cut', pretrained.sd_vae, 'it may be truncated: download it again'),
        'a folder without weights': (tmp_path / 'empty', pretrained.sd_vae, 'without diffusion_pytorch_model'),
        'missing': (tmp_path / 'nothing', pretrained.sd_vae, 'not found; download it first'),
        'truncated torch file': (tmp_path / 'DiT-cut.pt', pretrained.dit, 'it may be truncated: download it again'),
        "the kit's own checkpoint": (tmp_path / 'DiT-kit.pt', pretrained.dit, "this kit's diffusion checkpoint, not a released"),
        'a VAE as the DiT': (tmp_path / 'DiT-vae.pt', pretrained.dit, 'holds no DiT or SiT models.py state dict'),
        'no family in the name': (tmp_path / 'model.pt', pretrained.dit, 'say whether it is a DiT or a SiT checkpoint'),
        'a learned position embedding': (tmp_path / 'DiT-learned-pos.pt', pretrained.dit, "not DiT's fixed sine-cosine"),
        'a weight missing': (tmp_path / 'DiT-missing.pt', pretrained.dit, 'lacks blocks.1.attn.qkv.weight'),
        'another architecture': (tmp_path / 'DiT-extra.pt', pretrained.dit, 'has no place for, such as blocks.0.attn.q_norm'),
    })
    return files


WRONG = ['a DiT as the VAE', 'no config.json', 'truncated safetensors', 'a folder without weights', 'missing',
         'truncated torch file', "the kit's own checkpoint", 'a VAE as the DiT', 'no family in the name',
         'a learned position embedding', 'a weight missing', 'another architecture']


def test_a_wrong_file_is_refused_naming_it(tmp_path):
    files = wrong_files(tmp_path)
    assert sorted(files) == sorted(WRONG)
    for case, (path, read, words) in files.items():
        with pytest.raises(ValueError) as e:
            read(str(path))
        assert words in str(e.value) and str(path) in str(e.value), (case, str(e.value))


def test_the_scripts_end_a_wrong_file_in_one_line(tmp_path):
    """sample.py, data/prepare_latents.py and train_diffusion.py: exit 1, the loader's line, no traceback, nothing
    written."""
    files = wrong_files(tmp_path)
    vae = tmp_path / 'vae'
    out = tmp_path / 'out'
    cases = [
        (['sample.py', f'--pretrained={files["truncated torch file"][0]}', f'--vae={vae}', f'--out_dir={out}'],
         'it may be truncated'),
        (['sample.py', f'--pretrained={files["a VAE as the DiT"][0]}', f'--vae={vae}', f'--out_dir={out}'],
         'holds no DiT or SiT'),
        (['sample.py', f'--pretrained={tmp_path / "DiT-N-2-8.pt"}', f'--vae={tmp_path / "noconfig"}',
          f'--out_dir={out}'], 'has no config.json beside'),
        (['data/prepare_latents.py', f'--vae={tmp_path / "cut"}', '--dataset=mnist', f'--latents={tmp_path / "l"}'],
         'it may be truncated'),
        (['train_diffusion.py', 'config/mnist_dit.py', f'--init_base={files["no family in the name"][0]}',
          f'--out_dir={out}'], "name it as released"),
    ]
    for args, words in cases:
        p = run(*args, check=False)
        assert p.returncode == 1 and words in p.stderr.strip().splitlines()[-1], (args, p.stderr[-1500:])
        assert 'Traceback' not in p.stderr
    assert not (tmp_path / 'l').exists() and not os.listdir(out)  # sample.py made out_dir, wrote nothing


# -----------------------------------------------------------------------------
# the latent path: a VAE in diffusers' layout encodes, train_diffusion.py trains, sample.py decodes

@pytest.fixture
def padded_digits(mnist, tmp_path):
    """40 training and 8 val MNIST digits padded to 32 px, as an image dataset."""
    folder = tmp_path / 'digits32'
    folder.mkdir()
    for split, n in (('train', 40), ('val', 8)):
        x = np.load(os.path.join(MNIST, f'{split}_x.npy'))[:n]
        np.save(folder / f'{split}_x.npy', np.pad(x, ((0, 0), (2, 2), (2, 2), (0, 0))))
        np.save(folder / f'{split}_y.npy', np.load(os.path.join(MNIST, f'{split}_y.npy'))[:n])
    (folder / 'meta.json').write_text(json.dumps({**mnist, 'image_size': 32, 'num_train': 40, 'num_val': 8}))
    return folder


def sample_like_sample_py(net, diffusion, num_samples, C, H, steps, cfg_scale, **kw):
    """What sample.py's ddim computes for samples 0..num_samples-1 at seed 0: its noise, labels and call."""
    z = torch.stack([torch.randn((C, H, H), generator=torch.Generator().manual_seed(
        int(np.random.SeedSequence([0, i]).generate_state(1)[0]))) for i in range(num_samples)])
    y = torch.arange(num_samples) % net.config.num_classes
    with torch.no_grad():
        return diffusion.sample(net, z, y, 'ddim', steps, cfg_scale=cfg_scale, **kw)


def to_uint8(x):
    return ((x.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def test_latents_of_a_diffusers_vae_train_and_decode_through_its_scaling(padded_digits, tmp_path):
    """prepare_latents.py --vae writes the posterior means and their mirror images' (float16), the VAE's scaling as
    the latents' mean and std (shift, 1 / scaling_factor), and a decoder holding the VAE's weights; --scaling=stats
    the channels' own statistics. A DiT trained on them is sampled by sample.py, which decodes x * std + mean
    through that decoder, and --vae decodes the same with the VAE's own scaling."""
    ae = small_vae(in_channels=1)
    vae = diffusers_vae(tmp_path / 'vae', ae, scaling=0.5, shift=0.1)
    latents = tmp_path / 'latents'
    print(run('data/prepare_latents.py', f'--vae={vae}', f'--dataset={padded_digits}', f'--latents={latents}',
              '--flips', '--device=cpu').stdout)
    meta = json.loads((latents / 'meta.json').read_text())
    assert meta['latent']['mean'] == [0.1] * 4 and meta['latent']['std'] == [2.0] * 4
    assert meta['latent']['scaling'] == 'vae' and (meta['image_size'], meta['channels']) == (8, 4)
    images = torch.from_numpy(np.load(padded_digits / 'train_x.npy')).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        for name, x in (('train_x', images), ('train_x_flip', images.flip(3))):
            want = ae.encode(x)[0].permute(0, 2, 3, 1).numpy().astype(np.float16)
            np.testing.assert_array_equal(np.load(latents / f'{name}.npy'), want)
    decoder = torch.load(latents / 'autoencoder.pt', weights_only=True)
    assert all(torch.equal(decoder['weights'][k], v) for k, v in ae.state_dict().items())
    stats = tmp_path / 'stats'
    run('data/prepare_latents.py', f'--vae={vae}', f'--dataset={padded_digits}', f'--latents={stats}', '--scaling=stats',
        '--device=cpu')
    z = np.load(stats / 'train_x.npy').astype(np.float64).reshape(-1, 4)
    np.testing.assert_allclose(json.loads((stats / 'meta.json').read_text())['latent']['mean'], z.mean(0), atol=1e-3)
    (stats / 'my-run').mkdir()  # a user's folder among the latents: re-encoding, which replaces the folder, refuses
    p = run('data/prepare_latents.py', f'--vae={vae}', f'--dataset={padded_digits}', f'--latents={stats}',
            '--device=cpu', check=False)
    assert p.returncode == 1 and p.stderr.strip().splitlines()[-1].startswith(
        f"error: {stats} holds my-run, which is not a file the kit writes there") and (stats / 'my-run').is_dir()

    out = tmp_path / 'out'
    run('train_diffusion.py', 'config/mnist_dit.py', f'--dataset={latents}', '--arch=DiT-N/2', '--max_steps=3',
        '--batch_size=8', '--eval_interval=3', '--eval_images=8', '--sample_interval=3', '--sample_steps=2',
        f'--out_dir={out}', '--compile=False', '--device=cpu', '--hflip=True')
    ckpt = torch.load(out / 'ckpt.pt', weights_only=True)
    net = create_model('DiT-N/2', **ckpt['model_args'])
    net.load_state_dict(ckpt['ema'])
    c = ckpt['config']
    x = sample_like_sample_py(net.eval(), Diffusion(c['schedule'], c['prediction_type'], c['num_timesteps']), 10, 4, 8,
                              2, 4.0)
    with torch.no_grad():
        want = to_uint8(ae.decode(x * 2.0 + 0.1))
    for extra in ([], [f'--vae={vae}']):
        run('sample.py', f'--out_dir={out}', '--num_samples=10', '--steps=2', '--save_npz=True', '--device=cpu', *extra)
        np.testing.assert_array_equal(np.load(out / 'samples.npz')['arr_0'], want)
    assert json.loads((out / 'samples.json').read_text())['decoder']['scaling_factor'] == 0.5


def test_sample_py_on_released_dit_and_sit_files_writes_every_setting(tmp_path):
    """sample.py --pretrained samples a DiT release (ddpm with its learned variance, guidance on 3 channels) and a
    SiT one (the flow schedule) through --vae; samples.json beside samples.npz holds the settings, the file's
    sha256, the diffusion it was trained as, the decoder and the labels (class-balanced: every class equally
    often). The deterministic sampler's images are those of the objective the file records."""
    dit_path, _ = released_dit(tmp_path)
    os.link(dit_path, tmp_path / 'SiT-N-2-8.pt')
    ae = small_vae()
    vae = diffusers_vae(tmp_path / 'vae', ae, scaling=0.25, shift=0.0)
    out = tmp_path / 'out'
    p = run('sample.py', f'--pretrained={dit_path}', f'--vae={vae}', f'--out_dir={out}', '--num_samples=20',
            '--sampler=ddpm', '--steps=3', '--cfg_scale=1.5', '--cfg_channels=3', '--save_npz=True', '--device=cpu')
    assert "note: DiT's FID-50K 2.27" in p.stdout and 'steps=3' in p.stdout.split('differs in')[1].splitlines()[0]
    assert re.search(r'^20/20 \| \d+\.\d img/s \| eta 0\.0 min$', p.stdout, re.M), p.stdout  # (progress, rate, time left)
    record = json.loads((out / 'samples.json').read_text())
    assert record['checkpoint']['sha256'] == hashlib.sha256(dit_path.read_bytes()).hexdigest()
    assert record['diffusion'] == {'schedule': 'linear', 'prediction_type': 'eps', 'num_timesteps': 1000,
                                   'sigma_data': 0.5}
    assert record['labels'] == 'each of 10 classes 2 times' and record['config']['cfg_channels'] == 3
    assert record['decoder']['scaling_factor'] == 0.25 and record['world_size'] == 1
    npz = np.load(out / 'samples.npz')
    assert record['images_sha256'] == common.images_hash(npz['arr_0'])  # (what evaluate.py checks)
    assert npz['arr_0'].shape == (20, 32, 32, 3) and np.array_equal(npz['arr_1'], np.arange(20) % 10)

    sit_path = tmp_path / 'SiT-N-2-8.pt'
    run('sample.py', f'--pretrained={sit_path}', f'--vae={vae}', f'--out_dir={out}', '--num_samples=4', '--steps=3',
        '--cfg_scale=1.5', '--save_npz=True', '--device=cpu')
    sit = pretrained.dit(str(sit_path))
    x = sample_like_sample_py(sit, Diffusion('flow', 'flow'), 4, 4, 8, 3, 1.5)
    with torch.no_grad():
        np.testing.assert_array_equal(np.load(out / 'samples.npz')['arr_0'], to_uint8(ae.decode(x * 4.0)))
    assert json.loads((out / 'samples.json').read_text())['diffusion']['schedule'] == 'flow'


def test_train_diffusion_fine_tunes_from_a_released_file(padded_digits, tmp_path):
    """init_base=<a DiT release> starts from its weights (learned variance, trained by the VLB term) and a SiT one
    in its time convention; a run that is not the file's model stops in one line."""
    dit_path, net = released_dit(tmp_path)
    os.link(dit_path, tmp_path / 'SiT-N-2-8.pt')
    vae = diffusers_vae(tmp_path / 'vae', small_vae(in_channels=1))
    latents = tmp_path / 'latents'
    run('data/prepare_latents.py', f'--vae={vae}', f'--dataset={padded_digits}', f'--latents={latents}',
        '--device=cpu')
    common = ['train_diffusion.py', 'config/mnist_dit.py', f'--dataset={latents}', '--arch=DiT-N/2',
              '--max_steps=1', '--batch_size=8', '--eval_images=8', '--sample_steps=2', '--compile=False',
              '--device=cpu', '--lr=1e-12', '--min_lr=0', '--warmup_steps=0', '--grad_clip=0']
    for family, extra in (('DiT', ['--learn_sigma=True', '--schedule=linear', '--prediction_type=eps',
                                   '--loss_weighting=uniform']),
                          ('SiT', ['--schedule=flow', '--prediction_type=flow'])):
        out = tmp_path / f'out-{family}'
        run(*common, f'--init_base={tmp_path / f"{family}-N-2-8.pt"}', f'--out_dir={out}', *extra)
        ckpt = torch.load(out / 'ckpt.pt', weights_only=True)
        base = pretrained.dit(str(tmp_path / f'{family}-N-2-8.pt')).state_dict()
        assert ckpt['model_args']['convention'] == family.lower().replace('dit', 'kit')
        assert ckpt['model_args']['learn_sigma'] == (family == 'DiT')
        assert max((ckpt['model'][k] - v).abs().max().item() for k, v in base.items()) < 1e-6
    p = run(*common, f'--init_base={dit_path}', f'--out_dir={tmp_path / "wrong"}', check=False)
    assert p.returncode == 1 and 'is another model' in p.stderr.strip().splitlines()[-1]
    assert "'learn_sigma': (False, True)" in p.stderr


# -----------------------------------------------------------------------------
# the learned variance: the loss term and the sampler step against their closed forms

def test_variance_loss_is_the_kl_to_the_posterior_in_closed_form():
    """Diffusion.variance_kl, train_diffusion.py's variance term, with DDPM's linear betas written out: the KL in bits per dimension from
    q(x_{t-1} | x_t, x0) = N(mu_q, beta~) to the model's N(mu_q + c1 (x0_pred - x0), beta^f beta~^(1 - f)); zero
    where the model is the posterior; t = 0 left out."""
    diffusion = Diffusion('linear', 'eps', 1000)
    variance_loss = diffusion.variance_kl
    betas = np.linspace(1e-4, 0.02, 1000)
    abar = np.cumprod(1 - betas)
    t = torch.tensor([0.0, 1.0, 37.0, 500.0, 999.0], dtype=torch.float64)
    x0, xt = torch.randn(5, 2, 4, 4), torch.randn(5, 2, 4, 4)
    d = torch.randn(5, 2, 4, 4) * 0.1
    for v_value in (-1.0, 0.3, 1.0):
        v = torch.full_like(x0, v_value)
        got = variance_loss(x0, xt, t, x0 + d, v)
        want = []
        for i, ti in enumerate(t.long().tolist()):
            if ti == 0:
                want.append(0.0)
                continue
            beta, var_q = betas[ti], betas[ti] * (1 - abar[ti - 1]) / (1 - abar[ti])
            c1 = math.sqrt(abar[ti - 1]) * betas[ti] / (1 - abar[ti])
            f = (v_value + 1) / 2
            var_p = math.exp(f * math.log(beta) + (1 - f) * math.log(var_q))
            kl = 0.5 * (math.log(var_p / var_q) - 1 + var_q / var_p + c1 ** 2 * d[i].double().pow(2) / var_p)
            want.append(kl.mean().item() / math.log(2))
        torch.testing.assert_close(got.double(), torch.tensor(want, dtype=torch.float64), rtol=2e-4, atol=1e-7)
    assert variance_loss(x0, xt, t, x0, torch.full_like(x0, -1.0)).abs().max() < 1e-6  # the posterior itself


def test_ddpm_draws_with_the_learned_variance_and_dits_guidance_on_three_channels():
    """A learn_sigma network's ddpm step draws its noise with std exp((f log beta + (1 - f) log beta~) / 2), f = (v
    + 1) / 2, around the posterior mean: v = -1 is the fixed-variance sampler; on a 2-step grid the first step's
    noise is sqrt(beta) or sqrt(beta~) times the generator's first draw. cfg_channels=3 guides the first 3 channels
    of the prediction and takes the 4th and v from the conditional pass, as DiT's forward_with_cfg does."""
    diffusion = Diffusion('linear', 'eps', 1000)

    def make(v_value):
        def net(x, t, y):
            eps = torch.zeros_like(x) + 0.01 * (y.view(-1, 1, 1, 1) + 1)
            return eps if v_value is None else torch.cat([eps, torch.full_like(x, v_value)], dim=1)
        net.config = type('Config', (), {'num_classes': 3})
        return net

    z, y = torch.randn(2, 4, 4, 4), torch.tensor([0, 2])
    draw = lambda net: diffusion.sample(net, z, y, 'ddpm', 2, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(draw(make(-1.0)), draw(make(None)), rtol=1e-5, atol=1e-6)
    # the grid t = 999 -> 0: the last step adds no noise, x0 = x / alpha_0 at t = 0
    abar0, abar999 = diffusion.alpha_sigma(torch.tensor([0.0, 999.0]))[0].pow(2).tolist()
    beta = 1 - abar999 / abar0
    beta_tilde = beta * (1 - abar0) / (1 - abar999)
    noise = torch.randn(z.shape, generator=torch.Generator().manual_seed(5))
    diff = draw(make(1.0)) - draw(make(-1.0))
    torch.testing.assert_close(diff, (math.sqrt(beta) - math.sqrt(beta_tilde)) * noise / math.sqrt(abar0),
                               rtol=1e-4, atol=1e-4)

    def guided_net(x, t, y):  # conditional and unconditional passes differ on every channel, v included
        k = (y != 3).float().view(-1, 1, 1, 1) * torch.arange(1.0, 9.0).view(1, 8, 1, 1)
        return x.repeat(1, 2, 1, 1) * 0.1 + k
    guided_net.config = type('Config', (), {'num_classes': 3})
    x, t = torch.randn(2, 4, 2, 2), torch.tensor(500.0, dtype=torch.float64)
    x0, eps, v = diffusion.denoise(guided_net, x, t, y, cfg_scale=1.5, cfg_channels=3)
    c, u = guided_net(x, None, y), guided_net(x, None, torch.full_like(y, 3))
    want = torch.cat([u[:, :3] + 1.5 * (c[:, :3] - u[:, :3]), c[:, 3:4]], dim=1)
    torch.testing.assert_close(eps, want)
    torch.testing.assert_close(v, c[:, 4:])
