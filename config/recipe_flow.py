# Rectified flow (Liu et al. 2022; SiT; SD3): x_t = (1 - t) x0 + t eps, the network predicts the velocity eps - x0
# with a plain MSE, t drawn logit-normal(0, 1) (Esser et al. 2024), sampled by Euler on a (shiftable) uniform grid.
# At higher resolutions raise shift (SD3 uses 3 at 1024 px) to spend more steps at high noise.
#   python train_diffusion.py config/mnist_dit.py config/recipe_flow.py --out_dir=out-mnist-flow
#   python sample.py --out_dir=out-mnist-flow --sampler=euler --steps=50
schedule = 'flow'
prediction_type = 'flow'
timestep_sampling = 'logit_normal'
logit_mean = 0.0
logit_std = 1.0
loss_weighting = 'uniform'
sampler = 'euler'
sample_steps = 50
shift = 1.0
