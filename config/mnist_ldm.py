# Latent diffusion on MNIST: a DiT on config/mnist_ae.py's 4 x 7 x 7 latents, trained by rectified flow
# (config/recipe_flow.py's objective, as SiT and SD3 train latent models).
#   python train_ae.py config/mnist_ae.py && python data/prepare_latents.py --autoencoder=out-mnist-ae --dataset=mnist
#   python train_diffusion.py config/mnist_ldm.py && python sample.py --out_dir=out-mnist-ldm --sampler=euler --steps=25
out_dir = 'out-mnist-ldm'
dataset = 'mnist-latents'
arch = 'DiT-N/1'  # 7 x 7 tokens of one latent cell (4 channels) each: the quickstart's 49 tokens
schedule = 'flow'
prediction_type = 'flow'
timestep_sampling = 'logit_normal'
loss_weighting = 'uniform'
batch_size = 16
max_steps = 1500
lr = 2e-3
warmup_steps = 200
ema_decay = 0.999
log_interval = 200
eval_interval = 1000
sample_interval = 1000
ckpt_interval = 1000
sampler = 'euler'
sample_steps = 25
