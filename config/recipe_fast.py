# Fast: v-prediction on the cosine schedule with min-SNR-5 weights (Salimans & Ho 2022; Hang et al. 2023 measure a
# 3.4x faster convergence from min-SNR), sampled with 25 DDIM steps. Objective only: stack it on a data config.
#   python train_diffusion.py config/mnist_dit.py config/recipe_fast.py
#   python sample.py --out_dir=out-mnist-dit --sampler=ddim --steps=25
schedule = 'cosine'
prediction_type = 'v'
timestep_sampling = 'uniform'
loss_weighting = 'min_snr'
min_snr_gamma = 5.0
sampler = 'ddim'
sample_steps = 25
