"""``DigitsDataModule``: scikit-learn's 8x8 digits as a LightningDataModule (no download), for tests and demos.

The same data as ``trickbag train recipes/digits.yaml``: the stratified 1,438 / 359 split of
``trickbag.data.load_digits``, normalised by the training set's channel statistics, and random shifts of up to
``crop_padding`` pixels (reflect padding) on training batches. The held-out 359 images serve as both the
validation and the test set, as in the recipe.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from trickbag import data


class DigitsDataModule(pl.LightningDataModule):
    """Digits batches ``(x (N, 1, 8, 8) float32, y (N,) int64)``.

    Args:
        batch_size: per-device training batch.
        crop_padding: random shift of training images by up to this many pixels (0: off).
        split_seed: seed of the stratified train / test split.
        eval_batch_size: batch of validation / test loaders.
    """

    def __init__(
        self, batch_size: int = 64, crop_padding: int = 1, split_seed: int = 0, eval_batch_size: int = 256
    ) -> None:
        super().__init__()
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r} must be an int >= 1")
        if isinstance(crop_padding, bool) or not isinstance(crop_padding, int) or crop_padding < 0:
            raise ValueError(f"crop_padding={crop_padding!r} must be an int >= 0")
        self.batch_size = batch_size
        self.crop_padding = crop_padding
        self.split_seed = split_seed
        self.eval_batch_size = eval_batch_size
        self.num_classes = 10

    def setup(self, stage: str | None = None) -> None:
        train, test = data.load_digits(seed=self.split_seed)
        mean, std = data.channel_stats(train.images)
        mean_t = torch.tensor(mean).view(1, -1, 1, 1)
        std_t = torch.tensor(std).view(1, -1, 1, 1)

        def normalise(images: torch.Tensor) -> torch.Tensor:
            return (images.float() / 255.0 - mean_t) / std_t

        self.train_set = TensorDataset(normalise(train.images), train.labels)
        self.test_set = TensorDataset(normalise(test.images), test.labels)

    def train_dataloader(self) -> DataLoader:
        # drop_last as the recipe: a ragged last batch of a few images would get a full update's LR.
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.test_set, batch_size=self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.test_set, batch_size=self.eval_batch_size)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        x, y = batch
        if self.crop_padding and self.trainer is not None and self.trainer.training:
            # Global torch RNG, seeded by lightning's seed_everything like the DataLoader's shuffling.
            offsets = torch.randint(0, 2 * self.crop_padding + 1, (len(x), 2), device=x.device)
            x = data.random_crop(x, self.crop_padding, offsets)
        return x, y
