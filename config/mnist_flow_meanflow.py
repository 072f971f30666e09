# MeanFlow from a flow-matching run of the quickstart (Geng et al. 2025): the model starts as that DiT and learns
# to jump whole intervals, digits in one network call after 1,500 more steps (about 2.5 minutes on a 2-core CPU).
#   python train_diffusion.py config/mnist_dit.py config/recipe_flow.py --out_dir=out-mnist-flow
#   python train_meanflow.py config/mnist_flow_meanflow.py && python sample.py --out_dir=out-mnist-flow-meanflow --steps=1
out_dir = 'out-mnist-flow-meanflow'
init_base = 'out-mnist-flow'
cfg_scale = 4.0  # guidance folded into the target, as the quickstart samples
batch_size = 16
max_steps = 1500
lr = 2e-3
warmup_steps = 200
ema_decay = 0.999
log_interval = 200
sample_interval = 500
ckpt_interval = 500
