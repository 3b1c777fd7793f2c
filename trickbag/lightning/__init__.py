"""trickbag's tricks for Lightning users (optional extra: ``pip install 'trickbag[lightning]'``).

``TrickbagModule`` wraps any ``nn.Module`` classifier (loss, batch mixing, no-decay groups, linear LR scaling,
trickbag's schedule stepped per real update, exact synced metrics); the callbacks hold the tricks that only
touch state (zero-γ, EMA weights for evaluation, best-by-loss and best-by-metric checkpoints).

    model = TrickbagModule(DigitsCNN(10), 10, label_smoothing=0.1, cutmix_alpha=1.0, lr=0.4, nesterov=True)
    trainer = L.Trainer(max_epochs=15, callbacks=[EMAWeights(0.99), *best_checkpoints("ckpt")])

Importing ``trickbag`` never imports this package, so Lightning stays optional.
"""

try:
    import lightning.pytorch  # noqa: F401
except ImportError as error:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "trickbag.lightning needs Lightning >= 2.0: pip install 'trickbag[lightning]'"
    ) from error

from trickbag.lightning.callbacks import EMAWeights, ZeroInitResidualBN, best_checkpoints
from trickbag.lightning.data import DigitsDataModule
from trickbag.lightning.module import TrickbagModule, effective_batch_size
from trickbag.lightning.sync import gather_cat, gather_sum, loss_sums, synced_metrics

__all__ = [
    "TrickbagModule",
    "EMAWeights",
    "ZeroInitResidualBN",
    "best_checkpoints",
    "DigitsDataModule",
    "effective_batch_size",
    "loss_sums",
    "gather_sum",
    "gather_cat",
    "synced_metrics",
]
