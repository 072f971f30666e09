# DiT-S/2 on CIFAR-10 (32 x 32 pixels, 256 tokens), class-conditional; one GPU, or torchrun for more.
#   python data/cifar10/prepare.py && python train_diffusion.py config/cifar10_dit.py
out_dir = 'out-cifar10-dit'
dataset = 'cifar10'
hflip = True
arch = 'DiT-S/2'
schedule = 'cosine'
batch_size = 128
max_steps = 200_000
lr = 3e-4
warmup_steps = 1000
min_lr = 1e-5
ema_decay = 0.9999
log_interval = 100
eval_interval = 2000
sample_interval = 10_000
ckpt_interval = 5000
