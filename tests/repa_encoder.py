"""
REPA's test encoder, a stand-in for DINOv2: a 2-block ViT in DINOv2's layout, trained for 8 epochs to classify
data/mnist's training digits, fed as train_diffusion.py feeds its encoder (three equal channels, ImageNet's
normalisation). A script, so that the tests run it in a process of its own (beside them, in the background).

    python tests/repa_encoder.py OUT.pth
"""
import os
import sys

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model import DINOv2, ViTConfig  # noqa: E402

MNIST = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'data', 'mnist')
torch.manual_seed(0)
x = torch.from_numpy(np.load(os.path.join(MNIST, 'train_x.npy'))).permute(0, 3, 1, 2).float() / 255
y = torch.from_numpy(np.load(os.path.join(MNIST, 'train_y.npy')))
vit, head = DINOv2(ViTConfig(patch_size=4, dim=64, depth=2, pos_grid=7)).train().requires_grad_(), nn.Linear(64, 10)
mean, std = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
opt = torch.optim.Adam([*vit.parameters(), *head.parameters()], lr=2e-3)
for epoch in range(8):
    for idx in torch.randperm(len(x)).split(64):
        loss = F.cross_entropy(head(vit((x[idx].expand(-1, 3, -1, -1) - mean) / std).mean(1)), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
torch.save(vit.state_dict(), sys.argv[1])
