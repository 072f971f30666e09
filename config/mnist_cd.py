# Consistency distillation of the quickstart's model (python train_diffusion.py config/mnist_dit.py first), about
# 2 minutes on a 2-core CPU: python distill_consistency.py config/mnist_cd.py
# then python sample.py --out_dir=out-mnist-cd (one network call per image) or --sigmas=80,6 (two)
teacher = 'out-mnist-dit'
out_dir = 'out-mnist-cd'
mode = 'cd'
cfg_scale = 2.0  # the teacher's guided ODE: the student draws the digit asked for without guidance of its own
batch_size = 16
max_steps = 1000
lr = 1e-4
ema_decay = 0.999
log_interval = 100
sample_interval = 500
ckpt_interval = 500
