# SiT-XL/2 on ImageNet 256 x 256 (Ma et al. 2024): config/imagenet256_dit_xl2.py's network, latents, optimizer,
# batch, EMA and label dropout, trained as a velocity model of the linear interpolant x_t = (1 - t) x0 + t eps,
# t uniform. Stacked on the DiT config, it changes the objective only. The paper's FID-50K at 7M steps and cfg
# 1.5: 2.06 with its SDE sampler, 2.15 with its ODE one (17.2 unguided at 400K).
#   torchrun --standalone --nproc_per_node=8 train_diffusion.py config/imagenet256_dit_xl2.py \
#       config/imagenet256_sit_xl2.py
# Fine-tune the released weights instead: add --init_base=SiT-XL-2-256.pt (docs/guide.md, "Released weights").
# FID: SiT's samplers are not in the kit; its closest are the ddpm sampler on the flow schedule (an ancestral
# SDE sampler; SiT's SDE adds noise by another diffusion coefficient) and heun for the ODE (SiT: adaptive dopri5):
#   torchrun --standalone --nproc_per_node=8 sample.py --out_dir=out-imagenet256-sit-xl2 --sampler=ddpm \
#       --steps=250 --cfg_scale=1.5 --cfg_channels=3 --num_samples=50000 --save_npz=True
# The kit's time runs the other way (t = 1 is noise); model.DiTConfig.convention reads SiT's weights.
out_dir = 'out-imagenet256-sit-xl2'
schedule = 'flow'
prediction_type = 'flow'
learn_sigma = False
sampler = 'heun'
sample_steps = 125  # about 250 network calls
