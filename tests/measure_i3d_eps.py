"""How far I3D's BatchNorm epsilon (the PyTorch conversion's 1e-5, TF's 1e-3) moves the features and FVD,
on random weights calibrated as in test_i3d.py (the README's numbers): python tests/measure_i3d_eps.py"""
import os
import sys
import time

sys.path[:0] = [os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.path.dirname(os.path.abspath(__file__))]
import numpy as np  # noqa: E402
import torch  # noqa: E402

import i3d  # noqa: E402
import metrics  # noqa: E402
import shapes  # noqa: E402
from test_i3d import random_state_dict  # noqa: E402

model = i3d.I3D()
model.load_state_dict(random_state_dict())
model.eval()
a = np.stack([shapes.sample(i, 0, 16, 64)[0] for i in range(24)])
b = np.stack([shapes.sample(i, 1, 16, 64)[0] for i in range(24)])
noisy = np.clip(a + np.random.default_rng(0).normal(0, 20, a.shape), 0, 255).astype(np.uint8)
start = time.perf_counter()
i3d.features(model, a[:1])
print(f"one 16x224x224 forward: {1000 * (time.perf_counter() - start):.0f} ms")
res = {}
for eps in (1e-5, 1e-3):
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm3d):
            m.eps = eps
    res[eps] = [i3d.features(model, x) for x in (a, b, noisy)]
(fa, fb, fn), (ga, gb, gn) = res[1e-5], res[1e-3]
rel = np.linalg.norm(ga - fa) / np.linalg.norm(fa)
print(f"features rel L2 eps 1e-3 vs 1e-5: {rel:.3f}")
for name, (x, y, xx, yy) in {"seed 0 vs seed 1": (fa, fb, ga, gb), "clean vs noisy": (fa, fn, ga, gn)}.items():
    print(f"FVD {name}: eps 1e-5 {metrics.frechet_distance(x, y):.2f}, eps 1e-3 {metrics.frechet_distance(xx, yy):.2f}")
