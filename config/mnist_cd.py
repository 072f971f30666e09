# Consistency distillation of the quickstart's model (python train_diffusion.py config/mnist_dit.py first), about
# 1 minute on a 2-core CPU: python distill_consistency.py config/mnist_cd.py
# then python sample.py --out_dir=out-mnist-cd (one network call per image) or --sigmas=80,6 (two)
teacher = 'out-mnist-dit'
out_dir = 'out-mnist-cd'
mode = 'cd'
cfg_scale = 2.0  # the teacher's guided ODE: the student draws the digit asked for without guidance of its own
batch_size = 16
max_steps = 600  # as good as 1,000 from this teacher (90% of one-step samples read right)
lr = 1e-4
ema_decay = 0.999
log_interval = 100
sample_interval = 300
ckpt_interval = 300
