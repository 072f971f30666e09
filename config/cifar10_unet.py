# DDPM's CIFAR-10 recipe (Ho et al. 2020): its 36M-parameter UNet (dropout 0.1, attention at 16 x 16), the linear
# schedule, eps prediction with the plain eps MSE ('snr' weighting), lr 2e-4, batch 128, 800k steps; here
# class-conditional. One GPU, or torchrun for more.
#   python data/cifar10/prepare.py && python train_diffusion.py config/cifar10_unet.py
out_dir = 'out-cifar10-unet'
dataset = 'cifar10'
hflip = True
arch = 'UNet-B'
schedule = 'linear'
prediction_type = 'eps'
loss_weighting = 'snr'
batch_size = 128
max_steps = 800_000
lr = 2e-4
lr_schedule = 'constant'
warmup_steps = 5000
ema_decay = 0.9999
log_interval = 100
eval_interval = 5000
sample_interval = 20_000
ckpt_interval = 10_000
