# EDM (Karras et al. 2022, table 1): x_t = x0 + sigma eps, the preconditioned denoiser (x0 prediction with c_skip,
# c_out, c_in, c_noise), log-normal sigma with P_mean = -1.2, P_std = 1.2 (a logit-normal u = sigma / (1 + sigma)),
# the weight lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2, and Heun's sampler with 18 steps.
#   python train_diffusion.py config/mnist_dit.py config/recipe_edm.py --out_dir=out-mnist-edm
#   python sample.py --out_dir=out-mnist-edm --sampler=heun --steps=18
schedule = 'edm'
prediction_type = 'x0'
sigma_data = 0.5
timestep_sampling = 'logit_normal'
logit_mean = -1.2
logit_std = 1.2
loss_weighting = 'edm'
sampler = 'heun'
sample_steps = 18
