# High quality: v-prediction, cosine schedule, min-SNR-5, noise levels drawn logit-normal (Esser et al. 2024 find it
# the best sampling for eps and v as well as flow), and Heun's second-order sampler at 50 steps (99 network calls).
#   python train_diffusion.py config/mnist_dit.py config/recipe_quality.py
#   python sample.py --out_dir=out-mnist-dit --sampler=heun --steps=50
schedule = 'cosine'
prediction_type = 'v'
timestep_sampling = 'logit_normal'
logit_mean = 0.0
logit_std = 1.0
loss_weighting = 'min_snr'
min_snr_gamma = 5.0
sampler = 'heun'
sample_steps = 50
