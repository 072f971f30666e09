# R3GAN's CIFAR-10 network, conditional, on 8 GPUs:
#   python data/cifar10/prepare.py
#   torchrun --standalone --nproc_per_node=8 train_gan.py config/cifar10_gan.py
# (R3GAN also decays gamma with the lr, from 0.05 to 0.005; here it stays at 0.05. Not yet run on GPUs.)
out_dir = 'out-cifar10-gan'
dataset = 'cifar10'
arch = 'GAN-B'
hflip = True
augment = 'color,translation,cutout'
batch_size = 512
max_steps = 100000
lr = 2e-4
min_lr = 5e-5
warmup_steps = 1000
gamma = 0.05
ema_kimg = 500.0
log_interval = 100
sample_interval = 5000
ckpt_interval = 2500
