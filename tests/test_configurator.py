"""configurator.py's rules, and every config/*.py file against the scripts' defaults."""
import glob
import os
import re
import sys

import pytest

from conftest import REPO, run


def configure(argv, **defaults):
    """Runs configurator.py over `defaults` as a script's globals would be, returns the resulting config."""
    g = dict(defaults, config_keys=list(defaults))
    old = sys.argv
    sys.argv = ['script.py', *argv]
    try:
        exec(open(os.path.join(REPO, 'configurator.py')).read(), g)
    finally:
        sys.argv = old
    return {k: g[k] for k in defaults}


def test_overrides_are_parsed_and_type_checked(tmp_path):
    defaults = dict(lr=1e-3, batch_size=64, compile=False, out_dir='out', arch='DiT-S/2')
    cfg = configure(['--lr=1', '--batch_size=32', '--compile=True', '--out_dir=runs/a=b', '--arch=DiT-B/2'], **defaults)
    assert cfg == dict(lr=1.0, batch_size=32, compile=True, out_dir='runs/a=b', arch='DiT-B/2')
    assert type(cfg['lr']) is float  # an int is accepted for a float, and becomes one
    cfg_file = tmp_path / 'c.py'
    cfg_file.write_text("batch_size = 8\nimport math\nlr = math.sqrt(4e-6)\n")
    assert configure([str(cfg_file), '--batch_size=16'], **defaults)['batch_size'] == 16  # later wins
    assert configure([str(cfg_file)], **defaults)['lr'] == pytest.approx(2e-3)
    for argv, message in [(['--batch_size=1.5'], "batch_size=1.5 is a float, but batch_size takes an int"),
                          (['--compile=1'], "compile=1 is an int, but compile takes a bool"),
                          (['--bach_size=3'], "unknown config key 'bach_size'; did you mean batch_size?"),
                          (['--zzz=3'], "unknown config key 'zzz'; valid keys: arch, batch_size")]:
        with pytest.raises(SystemExit, match=message.replace('?', r'\?')):
            configure(argv, **defaults)
    cfg_file.write_text("batchsize = 8\n")  # a typo in a config file is caught too
    with pytest.raises(SystemExit, match="unknown config key 'batchsize'; did you mean batch_size"):
        configure([str(cfg_file)], **defaults)
    cfg_file.write_text("batch_size = '8'\n")
    with pytest.raises(SystemExit, match="batch_size='8' is a str"):
        configure([str(cfg_file)], **defaults)
    for argv, message in [(['--lr=1e999'], "lr=inf must be a finite number (default 0.001)"),
                          (['--lr=-1e999'], "lr=-inf must be a finite number")]:
        with pytest.raises(SystemExit, match=re.escape(message)):
            configure(argv, **defaults)
    assert configure(['--cap=1e999'], cap=float('inf'))['cap'] == float('inf')  # an infinite default may stay so


def test_config_files_in_any_encoding_or_broken_give_one_line(tmp_path):
    """A coding cookie or a BOM is honoured; bytes that are not the declared encoding, NUL bytes or a folder
    end in one line naming the file."""
    defaults = dict(lr=1e-3, wandb_run_name='run')
    cases = {'latin1.py': b'# -*- coding: latin-1 -*-\nwandb_run_name = "caf\xe9"\n',
             'bom.py': b'\xef\xbb\xbfwandb_run_name = "caf\xc3\xa9"\n'}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        assert configure([str(tmp_path / name)], **defaults)['wandb_run_name'] == 'caf\xe9'
    for data, message in [(b'wandb_run_name = "caf\xe9"\n', r"line 1: SyntaxError: \(unicode error\)"),
                          (b'lr = 1\x00\n', "SyntaxError: source code string cannot contain null bytes")]:
        (tmp_path / 'bad.py').write_bytes(data)
        with pytest.raises(SystemExit, match=f"error: {tmp_path / 'bad.py'}.*{message}"):
            configure([str(tmp_path / 'bad.py')], **defaults)
    with pytest.raises(SystemExit, match=r"cannot read config file .* \(Is a directory\)"):
        configure([str(tmp_path)], **defaults)
    (tmp_path / 'raises.py').write_text("import json\nlr = 1e-3\nbatch = json.loads('{')\n")  # (raised in json)
    with pytest.raises(SystemExit, match=re.escape(f"error: {tmp_path / 'raises.py'}, line 3: JSONDecodeError")):
        configure([str(tmp_path / 'raises.py')], **defaults)


@pytest.mark.parametrize('script', ['train_diffusion.py', 'train_ae.py', 'train_gan.py', 'distill_consistency.py',
                                    'train_meanflow.py', 'sample.py', 'evaluate.py'])
def test_help_prints_each_key_with_its_default_and_comment(script):
    """--help (or -h) prints the script's defaults block as written (grouped, commented), and nothing runs."""
    p = run(script, '--help')
    block = open(os.path.join(REPO, script)).read().split('# ---')[1].split('\n', 1)[1].rsplit('\n', 1)[0]
    assert p.stdout.startswith(f"usage: python {script} ") and block.strip() in p.stdout
    keys = (set(script_defaults(script)) if script != 'evaluate.py' else  # (its command's keys, listed in the command)
            set(re.search(r"config_keys = (\[.*?\])", open(os.path.join(REPO, script)).read())[1][2:-2].split("', '")))
    assert keys and keys <= set(re.findall(r'^(\w+) = ', p.stdout, re.M))
    assert run(script, '-h').stdout == p.stdout


def script_defaults(script):
    """The module-level defaults of a script: its source up to the line that lists config_keys, executed."""
    src = open(os.path.join(REPO, script)).read()
    g = {'__file__': os.path.join(REPO, script)}
    exec(src[:src.index('config_keys = ')], g)
    return {k: v for k, v in g.items() if not k.startswith('_') and isinstance(v, (int, float, bool, str))}


@pytest.mark.parametrize('path', sorted(glob.glob(os.path.join(REPO, 'config', '*.py'))))
def test_config_files_set_only_known_keys_of_the_right_type(path):
    """A run config names its own out_dir; a recipe (objective only) stacks on one and changes only objective keys;
    a distillation config (*_cd.py) is distill_consistency.py's and names its teacher, a *_meanflow.py one is
    train_meanflow.py's; *_ae.py is train_ae.py's, *_gan.py train_gan.py's."""
    if os.path.basename(path).endswith('_ae.py'):
        cfg = configure([path], **script_defaults('train_ae.py'))
        assert cfg['arch'].startswith('AE-') and cfg['out_dir'] != 'out-ae'
    elif os.path.basename(path).endswith('_gan.py'):
        cfg = configure([path], **script_defaults('train_gan.py'))
        assert cfg['arch'].startswith('GAN-') and cfg['out_dir'] != 'out-gan'
    elif os.path.basename(path).endswith('_cd.py'):
        cfg = configure([path], **script_defaults('distill_consistency.py'))
        assert cfg['teacher'] and cfg['out_dir'] != 'out-cd'
    elif os.path.basename(path).endswith('_meanflow.py'):
        cfg = configure([path], **script_defaults('train_meanflow.py'))
        assert cfg['arch'].startswith('DiT-') and cfg['out_dir'] != 'out-meanflow'
    elif os.path.basename(path).startswith('recipe_'):
        base = configure([os.path.join(REPO, 'config', 'mnist_dit.py')], **script_defaults('train_diffusion.py'))
        cfg = configure([os.path.join(REPO, 'config', 'mnist_dit.py'), path], **script_defaults('train_diffusion.py'))
        changed = {k for k in cfg if cfg[k] != base[k]}
        assert changed <= {'schedule', 'prediction_type', 'sigma_data', 'timestep_sampling', 'logit_mean',
                                       'logit_std', 'loss_weighting', 'min_snr_gamma', 'sampler', 'sample_steps', 'shift'}
    else:
        cfg = configure([path], **script_defaults('train_diffusion.py'))
        assert cfg['arch'] and cfg['out_dir'] != 'out'
