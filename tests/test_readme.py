"""The README's library example must run as written (given a model and a batch)."""

import re
from pathlib import Path

import torch
from torch import nn

README = Path(__file__).resolve().parents[1] / "README.md"


class ResidualBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.first = nn.Conv2d(3, 3, 1)  # an input layer, so the block's conv is a hidden one (for Muon)
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.last_bn = nn.BatchNorm2d(3)

    def forward(self, x):
        x = self.first(x)
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
    import trickbag.init

    zeroed = []
    original = trickbag.init.zero_init_residual_bn

    def spy(module):  # the example trains the model afterwards, so look right after the call
        result = original(module)
        zeroed.append(bool(torch.all(model[0].last_bn.weight == 0)))
        return result

    trickbag.init.zero_init_residual_bn = spy
    try:
        exec(compile(blocks[0], str(README), "exec"), namespace)
    finally:
        trickbag.init.zero_init_residual_bn = original
    assert torch.isfinite(namespace["loss"])
    assert namespace["soft_target"].shape == (6, 10)
    assert abs(namespace["lr"] - 0.1) < 1e-12
    assert zeroed == [True]  # zero_init_residual_bn reached the block
    assert namespace["tta"].shape == (6, 3) and torch.allclose(namespace["tta"].exp().sum(1), torch.ones(6))
    assert (
        namespace["state"].epoch == 2 and namespace["state"].updates == 4
    )  # accumulate=2: 2 updates an epoch


def test_readme_library_example_builds_no_pydantic_config():
    """The library parts stand alone: the example runs without trickbag.config (or pydantic) ever imported."""
    import subprocess
    import sys

    code = (
        "import re, sys, torch\n"
        "from torch import nn\n"
        "sys.path.insert(0, 'tests')\n"
        "from test_readme import README, ResidualBlock\n"
        "block = re.findall(r'```python\\n(.*?)```', README.read_text(encoding='utf-8'), flags=re.S)[0]\n"
        "model = nn.Sequential(ResidualBlock(), nn.Flatten(), nn.Linear(3 * 8 * 8, 3))\n"
        "namespace = dict(model=model, logits=torch.randn(6, 3), target=torch.tensor([0, 1, 2, 2, 1, 0]),\n"
        "                 x=torch.rand(6, 3, 8, 8), train_labels=torch.tensor([0] * 50 + [1] * 5 + [2] * 2))\n"
        "exec(compile(block, 'README.md', 'exec'), namespace)\n"
        "assert namespace['state'].updates == 4, namespace['state'].updates\n"
        "print('MODULES', sorted(m for m in sys.modules if m == 'pydantic' or m.startswith('trickbag.config')))\n"
    )
    root = README.parent
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "MODULES []"
