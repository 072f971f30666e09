# A conditional GAN on the MNIST subset, on a CPU in about 70 s:  python train_gan.py config/mnist_gan.py
# (unconditional: --class_cond=False --max_steps=3000; DiffAugment for small datasets: --augment=translation,cutout)
out_dir = 'out-mnist-gan'
dataset = 'mnist'
arch = 'GAN-T'
batch_size = 16
max_steps = 800
lr = 5e-4
lr_schedule = 'constant'
gamma = 1.0  # [-1, 1] digits on a black background: a stronger penalty than R3GAN's CIFAR-10 0.05
reg_interval = 16  # StyleGAN2's lazy regularisation: the double backward is most of a CPU step
ema_kimg = 2.0
log_interval = 100
sample_interval = 400
ckpt_interval = 800
