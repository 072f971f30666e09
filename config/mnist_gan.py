# A conditional GAN on the MNIST subset, on a CPU in minutes:  python train_gan.py config/mnist_gan.py
out_dir = 'out-mnist-gan'
dataset = 'mnist'
arch = 'GAN-T'
batch_size = 32
max_steps = 500
gamma = 1.0
reg_interval = 1
lr = 2e-4
min_lr = 2e-4
ema_kimg = 2.0
log_interval = 50
sample_interval = 250
ckpt_interval = 500
