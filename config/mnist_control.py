# ControlNet on the quickstart's DiT: digits that follow a 4x-downsampled guide (7 x 7 block means), 26 s on 2 cores.
#   python data/prepare_control.py --dataset=mnist --kind=downsample4    # after python data/mnist/prepare.py
#   python train_diffusion.py config/mnist_dit.py && python train_diffusion.py config/mnist_control.py
#   python sample.py --out_dir=out-mnist-control       # sample i follows val image i's control, with its label
# The base stays frozen; a trainable copy of its first 2 blocks reads the control and adds to the base's blocks
# through zero-initialised projections, so training starts from the base model's samples. control = 'concat'
# (extra input channels, every weight trained) is the other mode. The objective must be the base's.
out_dir = 'out-mnist-control'
init_base = 'out-mnist-dit'
control = 'controlnet'
dataset = 'mnist'
arch = 'DiT-N/4'
schedule = 'cosine'
prediction_type = 'v'
loss_weighting = 'min_snr'
batch_size = 16
max_steps = 500
lr = 2e-3
warmup_steps = 50
ema_decay = 0.999
log_interval = 100
eval_interval = 500
sample_interval = 500
ckpt_interval = 500
sample_steps = 25
