# DiT-XL/2 on ImageNet 256 x 256 (Peebles & Xie 2023): Stable Diffusion's VAE latents at 32 x 32 x 4 (scaling
# 0.18215), 2 x 2 patches, DDPM eps with the variance learned by the VLB term, the paper's recipe: AdamW at a
# constant 1e-4, no weight decay, batch 256, EMA 0.9999, label dropout 0.1, flips, no clipping. The paper's
# FID-50K: 9.62 unguided, 2.27 at cfg 1.5 after 7M steps (19.5 unguided at 400K, its ablations' length).
# The latents, once (the uint8 images take about 250 GB of disk; the latents 10 GB):
#   python data/folder/prepare.py --src=/path/to/imagenet/train --out_dir=data/imagenet256 --image_size=256
#   torchrun --standalone --nproc_per_node=8 data/prepare_latents.py --vae=sd-vae-ft-ema --dataset=imagenet256 \
#       --flips=True
# Train (1 node of 8 GPUs; the same line on each of several nodes with torchrun's --nnodes/--rdzv flags):
#   torchrun --standalone --nproc_per_node=8 train_diffusion.py config/imagenet256_dit_xl2.py
# Fine-tune the released weights instead: add --init_base=DiT-XL-2-256x256.pt (docs/guide.md, "Released weights").
# FID as the paper samples (docs/guide.md, "Evaluation protocol"):
#   torchrun --standalone --nproc_per_node=8 sample.py --out_dir=out-imagenet256-dit-xl2 --sampler=ddpm \
#       --steps=250 --cfg_scale=1.5 --cfg_channels=3 --num_samples=50000 --save_npz=True
# Differences from DiT's train.py: bf16 autocast on CUDA (DiT trained in fp32/TF32; set dtype='float32' for
# that), the EMA's warm-up over its first steps, and the VLB's t = 0 term left out (train_diffusion.py).
out_dir = 'out-imagenet256-dit-xl2'
dataset = 'imagenet256-latents'
hflip = True  # the latents of the mirror images, encoded by --flips=True
arch = 'DiT-XL/2'
schedule = 'linear'
prediction_type = 'eps'
learn_sigma = True
loss_weighting = 'uniform'
timestep_sampling = 'uniform'
class_dropout = 0.1
batch_size = 256
max_steps = 400_000
lr = 1e-4
lr_schedule = 'constant'
warmup_steps = 0
weight_decay = 0.0
grad_clip = 0.0
ema_decay = 0.9999
log_interval = 100
eval_interval = 5000
sample_interval = 20_000
ckpt_interval = 10_000
sampler = 'ddpm'  # the grids as the paper samples, at its visuals' guidance
sample_steps = 250
cfg_scale = 4.0
