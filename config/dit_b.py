# DiT-B/4 on ImageNet at 64 x 64 pixels (256 tokens per image, the token count of the paper's B/2 on 32 x 32 latents),
# with the paper's recipe: AdamW at a constant 1e-4, batch 256, EMA 0.9999, label dropout 0.1.
#   python data/folder/prepare.py --src=/path/to/imagenet/train --out_dir=data/imagenet64 --image_size=64
#   torchrun --standalone --nproc_per_node=8 train_diffusion.py config/dit_b.py
out_dir = 'out-dit-b'
dataset = 'imagenet64'
hflip = True
arch = 'DiT-B/4'
batch_size = 256
max_steps = 400_000
lr = 1e-4
lr_schedule = 'constant'
warmup_steps = 0
ema_decay = 0.9999
log_interval = 100
eval_interval = 5000
sample_interval = 10_000
ckpt_interval = 5000
