"""The README's library example must run as written (given a model and a batch)."""

import re
from pathlib import Path

import torch
from torch import nn

README = Path(__file__).resolve().parents[1] / "README.md"


class ResidualBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.last_bn = nn.BatchNorm2d(3)

    def forward(self, x):
        return x + self.last_bn(self.conv(x))


def test_readme_library_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)
    assert blocks, "README has no python example"
    model = nn.Sequential(ResidualBlock(), nn.Flatten(), nn.Linear(3 * 8 * 8, 3))
    namespace = {
        "model": model,
        "logits": torch.randn(6, 3),
        "target": torch.tensor([0, 1, 2, 2, 1, 0]),
        "x": torch.rand(6, 3, 8, 8),
        "train_labels": torch.tensor([0] * 50 + [1] * 5 + [2] * 2),
    }
    exec(compile(blocks[0], str(README), "exec"), namespace)
    assert torch.isfinite(namespace["loss"])
    assert namespace["soft_target"].shape == (6, 10)
    assert abs(namespace["lr"] - 0.1) < 1e-12
    assert torch.all(model[0].last_bn.weight == 0)  # zero_init_residual_bn reached the block
