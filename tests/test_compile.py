"""torch.compile and activation checkpointing on the CPU: each train script's compiled step (no graph break
but the intended one, no recompilation after the first step), the gradients that a compiled graph cannot give
kept out of it by construction, and the memory that checkpointing saves, compiled and eager. tests/test_cuda.py
runs the scripts on a GPU with the CUDA defaults."""
import os
import re
import subprocess
import sys

import pytest
import torch

from conftest import REPO, run
from model import AEConfig, Autoencoder, compile_for_training, create_model

# the smallest run of each train script: three steps, the first of which compiles; the autoencoder's adaptive
# weight and the GAN's penalties are on in them; the end's evaluation and grid as small as they go (eager)
STEPS = ['--compile=True', '--max_steps=3', '--log_interval=1', '--ckpt_interval=1000', '--init_from=scratch']
COMPILED_RUNS = {
    'train_diffusion.py': ['config/mnist_dit.py', '--batch_size=4', '--eval_interval=1000', '--eval_images=8',
                           '--sample_interval=1000', '--sample_steps=2', '--sra_weight=0.5',
                           '--dispersive_weight=0.5'],  # (block tokens out)
    'train_ae.py': ['config/mnist_ae.py', '--batch_size=4', '--eval_interval=1000', '--eval_images=8',
                    '--disc_start=0', '--adv_start=0', '--cls_weight=0.1'],  # (and the class head, after the graph break)
    'train_gan.py': ['config/mnist_gan.py', '--batch_size=4', '--sample_interval=1000', '--reg_interval=2'],
    # with activation checkpointing: the DiT compiled block by block (model.compile_for_training)
    'distill_consistency.py': ['config/mnist_cd.py', '--batch_size=4', '--sample_interval=1000',
                               '--activation_checkpointing=True'],
    # MeanFlow's JVP runs on an eager view of the model whose blocks are compiled: no graph of it at all
    'train_meanflow.py': ['config/mnist_meanflow.py', '--batch_size=4', '--sample_interval=1000',
                          '--activation_checkpointing=True'],
}


# runs a script with torch.compile's backend 'aot_eager': Dynamo's graphs, guards and graph breaks, and
# AOTAutograd's forward and backward graphs, as on a GPU, without inductor's code generation (a minute a script
# on 2 CPU cores, which tests nothing of Dynamo's)
AOT_EAGER = ("import functools, runpy, sys, torch; "
             "torch.compile = functools.partial(torch.compile, backend='aot_eager'); "
             "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")


@pytest.mark.slow
@pytest.mark.parametrize('script', COMPILED_RUNS)
def test_compiled_step_has_no_graph_break_and_compiles_once(script, mnist, tmp_path):
    """Dynamo's own log (TORCH_LOGS) of a compiled run: every recompilation happens before the first step's log
    line (grad mode, an input that needs grad: the variants of the first step), and the only graph break is the
    autoencoder's eager last layer (model.run_eager)."""
    args = COMPILED_RUNS[script]
    script = script.split()[0]
    if 'config/mnist_cd.py' in args:  # a one-step teacher, uncompiled
        teacher = tmp_path / 'teacher'
        run('train_diffusion.py', 'config/mnist_dit.py', f'--out_dir={teacher}', '--max_steps=1', '--batch_size=4',
            '--eval_images=8', '--sample_steps=1', '--compile=False')
        args = [*args, f'--teacher={teacher}']
    # stdout and stderr in one stream, in the order they were written
    p = subprocess.run([sys.executable, '-c', AOT_EAGER, script, *args, *STEPS, f'--out_dir={tmp_path / "run"}'],
                       cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=900,
                       env={**os.environ, 'WANDB_MODE': 'disabled', 'PYTHONUNBUFFERED': '1',
                            'TORCH_LOGS': 'recompiles,graph_breaks'})
    log = p.stdout
    assert p.returncode == 0, log[-3000:]
    assert 'step 3/3' in log, log[-3000:]
    after_first_step = log[log.index('step 1/3'):]
    assert 'Recompiling' not in after_first_step, after_first_step[-3000:]
    breaks = re.split(r'\[__graph_breaks\] Graph break', log)[1:]
    assert all('run_eager' in b for b in breaks), breaks[0][-3000:]
    assert bool(breaks) == (script == 'train_ae.py')


def nodes_reaching(root, param):
    """The autograd nodes from root's grad_fn through which a gradient reaches param: the nodes that
    torch.autograd.grad(root, param) runs."""
    memo = {}

    def reaches(node):
        if node is None:
            return False
        if node not in memo:
            memo[node] = getattr(node, 'variable', None) is param
            memo[node] = any([reaches(child) for child, _ in node.next_functions]) or memo[node]
        return memo[node]

    reaches(root.grad_fn)
    return [node for node, hit in memo.items() if hit]


@pytest.mark.slow
def test_adaptive_weight_takes_its_gradients_outside_the_compiled_graph():
    """train_ae.py's adaptive weight runs autograd.grad(..., retain_graph=True) at the decoder's last layer twice.
    A compiled backward that donated its buffers refuses that (on CUDA), so no node on those gradients' path may
    be a compiled graph's: the last layer runs eager, behind a graph break (model.run_eager). Without it the path
    runs through CompiledFunctionBackward."""
    torch.manual_seed(0)
    config = AEConfig(image_size=8, in_channels=1, channels=32, channel_mult=(1, 1), num_res_blocks=1)
    ae = Autoencoder(config)
    compiled = torch.compile(ae, backend='aot_eager')  # AOTAutograd's graphs, without code generation
    x = torch.randn(2, 1, 8, 8)
    xrec, mean, logvar, _ = compiled(x, torch.randn(2, 4, 4, 4))
    nll, adv = (xrec - x).abs().mean(), -xrec.mean()
    weight = ae.last_layer.weight
    for loss in (nll, adv):
        path = nodes_reaching(loss, weight)
        assert path and not [n.name() for n in path if 'Compiled' in n.name()], [n.name() for n in path]
    # the whole step still reaches the compiled part, which holds every other weight
    assert any('Compiled' in n.name() for n in nodes_reaching(nll, ae.encoder[0].weight))
    g_nll, g_adv = (torch.autograd.grad(loss, weight, retain_graph=True)[0] for loss in (nll, adv))
    (nll + adv).backward()
    assert torch.allclose(weight.grad, g_nll + g_adv, atol=1e-6)


def saved_bytes(net, *inputs):
    """Bytes of the tensors autograd keeps for the backward of net(*inputs) (each storage once, the weights not
    counted): what a training step holds between its forward and backward."""
    storages = {}

    def pack(tensor):
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = net(*inputs)
    out.float().pow(2).mean().backward()
    weights = {t.untyped_storage().data_ptr() for t in [*net.parameters(), *net.buffers()]}
    return sum(size for ptr, size in storages.items() if ptr not in weights)


@pytest.mark.slow
def test_activation_checkpointing_keeps_the_block_inputs_only_compiled_or_not():
    """A DiT step's saved tensors with activation checkpointing, eager and compiled as the scripts compile it
    (model.compile_for_training: block by block): at most the blocks' inputs plus one block's activations (the block
    being recomputed), against every block's activations without it. The compiled run without checkpointing must
    save about what eager does, or the measure would be blind."""
    torch.manual_seed(0)
    net = create_model('DiT-N/2', image_size=8, in_channels=4, num_classes=10)
    x, t, y = torch.randn(16, 4, 8, 8), torch.rand(16) * 999, torch.randint(0, 10, (16,))
    tokens = net.x_embedder(x).flatten(2).transpose(1, 2).detach()
    cond = torch.randn(len(x), net.config.hidden_size)  # a block's second input, (B, D)
    block_inputs = len(net.blocks) * (tokens.nbytes + cond.nbytes)
    one_block = saved_bytes(net.blocks[0], tokens.requires_grad_(), cond.requires_grad_())
    one_block -= tokens.nbytes + cond.nbytes
    measured = {}
    for compiled in (False, True):
        for checkpointing in (False, True):
            net.activation_checkpointing = checkpointing
            torch._dynamo.reset()
            step = compile_for_training(net) if compiled else net
            step(x, t, y).sum().backward()  # compile outside the measure
            measured[compiled, checkpointing] = saved_bytes(step, x, t, y)
            net.zero_grad(set_to_none=True)
    print({k: f'{v / 1e6:.2f} MB' for k, v in measured.items()},
          f'limit {(block_inputs + one_block) / 1e6:.2f} MB')
    for compiled in (False, True):
        assert measured[compiled, True] <= block_inputs + one_block, measured
        assert measured[compiled, False] >= len(net.blocks) * one_block / 2, measured
        assert measured[compiled, False] / measured[compiled, True] > 4, measured
