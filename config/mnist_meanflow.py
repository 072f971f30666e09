# MeanFlow from scratch on MNIST (Geng et al. 2025): digits in one network call.
#   python train_meanflow.py config/mnist_meanflow.py && python sample.py --out_dir=out-mnist-meanflow --steps=1
out_dir = 'out-mnist-meanflow'
arch = 'DiT-N/4'
dataset = 'mnist'
cfg_scale = 4.0  # guidance folded into the target (the quickstart samples at 4): samples of the digit asked for
batch_size = 16
max_steps = 3300
lr = 2e-3
lr_schedule = 'cosine'
warmup_steps = 200
ema_decay = 0.999
log_interval = 200
sample_interval = 2000
ckpt_interval = 2000
