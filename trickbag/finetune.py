"""Fine-tuning from local weights (trickbag never downloads any).

``save_weights`` / ``read_weights``: a state dict as safetensors with the input normalisation in its metadata
(or a weights-only ``torch.save`` file); ``load_pretrained``: any model's backbone from such a file, the head
replaced for the run's classes; ``BackboneFreezer``: the head alone for the first epochs; ``Renormalized``: a
model trained with other input statistics, fed this run's normalised batches (a distillation teacher).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["save_weights", "read_weights", "load_pretrained", "BackboneFreezer", "Renormalized"]


def save_weights(model: nn.Module, path, *, mean=None, std=None) -> None:
    """Write ``model``'s state dict as safetensors, with the input normalisation (``mean``, ``std``: C floats in
    [0, 1] units) in the file's metadata, where ``read_weights`` finds it."""
    import json

    from safetensors.torch import save_file

    metadata = None
    if mean is not None or std is not None:
        metadata = {"mean": json.dumps([float(v) for v in mean]), "std": json.dumps([float(v) for v in std])}
    tensors = {key: value.detach().cpu().contiguous() for key, value in model.state_dict().items()}
    save_file(tensors, str(path), metadata=metadata)


def read_weights(path) -> tuple[dict[str, torch.Tensor], dict | None]:
    """(state dict, normalisation {"mean", "std"} or None) from a local weights file; never executes code.

    Accepts ``*.safetensors`` (normalisation in its metadata), a weights-only ``torch.save`` file (a state dict,
    or a dict with "state_dict" / "model" and optional "mean" and "std"), or a trickbag checkpoint folder
    (``model.safetensors`` and ``meta.json``, whose mean/std are used).
    """
    import json
    from pathlib import Path

    file = Path(path).expanduser()
    if file.is_dir():
        weights, meta = file / "model.safetensors", file / "meta.json"
        if not weights.is_file():
            raise FileNotFoundError(f"pretrained folder {str(path)!r} has no model.safetensors")
        state, norm = read_weights(weights)
        if meta.is_file():
            stored = json.loads(meta.read_text(encoding="utf-8"))
            if "mean" in stored and "std" in stored:
                norm = {"mean": list(stored["mean"]), "std": list(stored["std"])}
        return state, norm
    if not file.is_file():
        raise FileNotFoundError(f"pretrained weights {str(path)!r} do not exist (nothing is downloaded)")
    if file.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(file), framework="pt") as handle:
            state = {key: handle.get_tensor(key) for key in handle.keys()}
            metadata = handle.metadata() or {}
        norm = None
        if "mean" in metadata and "std" in metadata:
            norm = {"mean": json.loads(metadata["mean"]), "std": json.loads(metadata["std"])}
        return state, norm
    try:
        loaded = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle errors name the class it refused; say what is accepted instead
        raise ValueError(
            f"pretrained weights {str(path)!r} are not a safetensors file nor a weights-only state dict ({error})"
        ) from error
    norm = None
    if isinstance(loaded, dict) and ("state_dict" in loaded or "model" in loaded):
        if "mean" in loaded and "std" in loaded:
            norm = {"mean": [float(v) for v in loaded["mean"]], "std": [float(v) for v in loaded["std"]]}
        loaded = loaded.get("state_dict", loaded.get("model"))
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise ValueError(f"pretrained weights {str(path)!r}: expected a dict of tensors (a state dict)")
    return dict(loaded), norm


def load_pretrained(model: nn.Module, path, *, head: list[str] | None = None) -> dict:
    """Load local pretrained weights into ``model``, keeping its own (new) classifier head where shapes differ.

    Every parameter and buffer must be in the file with its shape, except the head's (``head``; None: the last
    Linear's, ``trickbag.optim.head_parameter_names``), which are kept as initialised when the file's differ
    (another number of classes) or are missing. Anything else missing or unexpected is a ValueError listing the
    keys: a half-loaded backbone would train silently worse.

    Returns:
        {"loaded": [keys], "new_head": [keys kept as initialised], "normalization": {"mean", "std"} or None}.
    """
    from trickbag.optim import head_parameter_names

    state, norm = read_weights(path)
    own = model.state_dict()
    head_keys = set(head_parameter_names(model) if head is None else head)
    new_head = sorted(k for k in head_keys if k not in state or state[k].shape != own[k].shape)
    missing = sorted(k for k in own if k not in state and k not in head_keys)
    unexpected = sorted(k for k in state if k not in own)
    wrong = sorted(k for k in own if k in state and k not in head_keys and state[k].shape != own[k].shape)
    # A head that the file lacks under this name may be stored under another (e.g. "fc." vs "head."):
    # its keys are then unexpected; name both so the user can rename them.
    if missing or unexpected or wrong:
        shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in wrong]
        raise ValueError(
            f"pretrained weights {str(path)!r} do not fit {type(model).__name__}: missing keys {missing[:20]}, "
            f"unexpected keys {unexpected[:20]}, other shapes {shapes[:20]} (head, replaced: {new_head}); "
            "is it the same architecture and model.options?"
        )
    loadable = {k: v for k, v in state.items() if k not in new_head}
    model.load_state_dict({**own, **loadable})
    return {"loaded": sorted(loadable), "new_head": new_head, "normalization": norm}


class BackboneFreezer:
    """Trains only the head for the first ``epochs`` epochs: ``set_epoch(e)`` freezes the other parameters
    (``requires_grad=False``, so they get no gradient and the optimizer skips them: no decay, no momentum) while
    ``e < epochs`` and unfreezes them after. Call it at each epoch start, after the optimizer was built with every
    parameter. BatchNorm statistics of the backbone still adapt to the new data while frozen.

    ``optimizer``: on unfreezing, SGD parameters that never stepped get a zero momentum buffer, which is what
    their first step would create (with dampening 0); torch's fused SGD cannot step a mix of parameters with and
    without one.
    """

    def __init__(self, model: nn.Module, epochs: int, head: list[str] | None = None, optimizer=None) -> None:
        from trickbag.optim import head_parameter_names

        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
            raise ValueError(f"epochs must be an int >= 0, got {epochs!r}")
        names = set(head_parameter_names(model) if head is None else head)
        if epochs and not names:
            raise ValueError("freeze_backbone_epochs needs a classifier head (a last nn.Linear); none found")
        self.epochs, self.optimizer = epochs, optimizer
        self.backbone = [p for name, p in model.named_parameters() if name not in names and p.requires_grad]

    def set_epoch(self, epoch: int) -> None:
        frozen = epoch < self.epochs
        for parameter in self.backbone:
            parameter.requires_grad_(not frozen)
        if not frozen and isinstance(self.optimizer, torch.optim.SGD):
            for group in self.optimizer.param_groups:
                if group["momentum"] == 0 or group["dampening"] != 0:
                    continue
                started = any("momentum_buffer" in self.optimizer.state.get(p, {}) for p in group["params"])
                for parameter in group["params"] if started else ():
                    state = self.optimizer.state[parameter]
                    if state.get("momentum_buffer") is None:
                        state["momentum_buffer"] = torch.zeros_like(parameter)


class Renormalized(nn.Module):
    """``model`` fed inputs normalised with (``mean``, ``std``) re-normalised to its own (``own_mean``, ``own_std``)
    first: a distillation teacher trained with other statistics than the student's data sees what it expects.
    (N, C, H, W) -> model's output."""

    def __init__(self, model: nn.Module, mean, std, own_mean, own_std) -> None:
        super().__init__()
        self.model = model
        mean, std, own_mean, own_std = (torch.tensor(v, dtype=torch.float32).view(1, -1, 1, 1)
                                        for v in (mean, std, own_mean, own_std))  # fmt: skip
        # x_own = (x * std + mean - own_mean) / own_std, folded into one multiply-add.
        self.register_buffer("scale", std / own_std, persistent=False)
        self.register_buffer("shift", (mean - own_mean) / own_std, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x * self.scale + self.shift)
