# An f=4 autoencoder for MNIST's 28 x 28 digits, 4 x 7 x 7 latents: about 1 minute on a 2-core CPU, then 10 s to encode.
#   python train_ae.py config/mnist_ae.py && python data/prepare_latents.py --autoencoder=out-mnist-ae --dataset=mnist
#   python train_diffusion.py config/mnist_ldm.py                       # latent diffusion on data/mnist-latents
# The discriminator trains from step 200 and reaches the decoder from step 300, once it tells digits apart.
out_dir = 'out-mnist-ae'
dataset = 'mnist'
arch = 'AE-S/f4'
z_channels = 4
kl_weight = 1e-6
batch_size = 16
max_steps = 400
lr = 1e-3
min_lr = 1e-4
warmup_steps = 100
disc_layers = 2  # 5 x 5 logits of 22-pixel patches
disc_start = 200
adv_start = 300
log_interval = 100
eval_interval = 200
ckpt_interval = 200
