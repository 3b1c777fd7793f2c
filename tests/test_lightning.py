"""trickbag.lightning with Lightning's own CPU Trainer on digits.

References: the LR per update against trickbag's own Scheduler, metrics against scikit-learn on the same
predictions, fake devices (threads) against a one-shot computation, resume against the first run's values.
"""

import math
import subprocess
import sys
import threading

import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("lightning")
pytest.importorskip("sklearn")

import lightning.pytorch as pl  # noqa: E402
from lightning.pytorch.callbacks import Callback  # noqa: E402
from lightning.pytorch.plugins.precision import MixedPrecision  # noqa: E402
from sklearn.metrics import accuracy_score, f1_score, roc_auc_score  # noqa: E402

from trickbag.lightning import (  # noqa: E402
    DigitsDataModule,
    EMAWeights,
    TrickbagModule,
    ZeroInitResidualBN,
    best_checkpoints,
    effective_batch_size,
    loss_sums,
    synced_metrics,
)
from trickbag.metrics import ClassificationMetrics  # noqa: E402
from trickbag.models import BasicBlock, DigitsCNN  # noqa: E402
from trickbag.muon import Muon  # noqa: E402
from trickbag.schedules import Scheduler  # noqa: E402


@pytest.fixture(autouse=True)
def one_thread():
    # 8x8 images: one thread is fastest, and the cores are shared.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def trainer(**options) -> pl.Trainer:
    settings = {
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
    }
    settings.update(options)
    return pl.Trainer(**settings)


class TinyResNet(nn.Module):
    """conv-BN-ReLU stem, one residual BasicBlock (its last_bn is zero-γ'd), pooled to 2x2, linear head."""

    def __init__(self, num_classes: int = 10, width: int = 32) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        )
        self.block = BasicBlock(width, width)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(4 * width, num_classes))

    def forward(self, x):
        return self.head(self.block(self.stem(x)))


class LRTrace(Callback):
    """LR of param group 0 used by each optimizer step Lightning takes."""

    def __init__(self):
        self.lrs = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.lrs.append(optimizer.param_groups[0]["lr"])


def reference_lrs(base_lr, kind, *, steps_per_epoch, epochs, updates, **options):
    """trickbag's own Scheduler on a dummy optimizer: the LR of updates 0 .. updates-1."""
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=base_lr)
    scheduler = Scheduler(optimizer, kind, steps_per_epoch=steps_per_epoch, epochs=epochs, **options)
    lrs = []
    for _ in range(updates):
        lrs.append(optimizer.param_groups[0]["lr"])
        scheduler.step()
    return lrs


# ---------------------------------------------------------------------------------------------------------------
# Optional extra


def test_importing_trickbag_does_not_import_lightning():
    code = (
        "import sys\n"
        "import trickbag, trickbag.losses, trickbag.optim, trickbag.schedules, trickbag.mixing, trickbag.metrics\n"
        "import trickbag.train, trickbag.run, trickbag.cli, trickbag.data, trickbag.ema, trickbag.init\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning'))\n"
        "assert not bad, bad\n"
        # Without Lightning installed, trickbag still imports and trickbag.lightning says what to install.
        "for name in [m for m in sys.modules if m.startswith('trickbag')]: del sys.modules[name]\n"
        "sys.modules['lightning'] = None\n"
        "import trickbag.losses\n"
        "try:\n"
        "    import trickbag.lightning\n"
        "except ImportError as error:\n"
        "    assert \"pip install 'trickbag[lightning]'\" in str(error), error\n"
        "else:\n"
        "    raise AssertionError('trickbag.lightning imported without lightning')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


# ---------------------------------------------------------------------------------------------------------------
# Small parts


def test_effective_batch_size_and_its_errors():
    assert effective_batch_size(64, 4, 2) == 512
    for bad in ({"batch_size": 0}, {"devices": 1.5}, {"accumulate_grad_batches": True}):
        args = {"batch_size": 64, "devices": 1, "accumulate_grad_batches": 1, **bad}
        with pytest.raises(ValueError, match=next(iter(bad))):
            effective_batch_size(**args)


def test_loss_sums_give_the_weighted_dataset_mean():
    torch.manual_seed(0)
    weight = torch.tensor([1.0, 3.0, 0.5])
    module = TrickbagModule(nn.Linear(4, 3), 3, class_weights=weight.tolist())
    logits, target = torch.randn(7, 3), torch.tensor([0, 1, 2, 2, 1, 0, 1])
    total, denominator = [torch.zeros((), dtype=torch.float64) for _ in range(2)]
    for rows in (slice(0, 3), slice(3, 7)):  # two batches of different sizes
        batch_total, batch_weight = loss_sums(module.criterion, logits[rows], target[rows])
        total, denominator = total + batch_total, denominator + batch_weight
    expected = F.cross_entropy(logits.double(), target, weight=weight.double())
    torch.testing.assert_close(total / denominator, expected, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(denominator, weight[target].sum().double())


def test_argument_errors():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        TrickbagModule("resnet", 10)
    with pytest.raises(ValueError, match="decay"):
        EMAWeights(decay=1.0)
    with pytest.raises(ValueError, match="mode"):
        best_checkpoints("ckpt", mode="maximum")
    with pytest.raises(ValueError, match="mixup_alpha"):
        TrickbagModule(nn.Linear(4, 3), 3, mixup_alpha=-1.0)


class FakeDevices:
    """``all_gather`` across ``world_size`` threads, with Lightning's (W, ...) result."""

    def __init__(self, world_size):
        self.world_size, self.slots = world_size, [None] * world_size
        self.barrier = threading.Barrier(world_size)

    def all_gather_for(self, rank):
        def all_gather(tensor):
            self.slots[rank] = tensor
            self.barrier.wait()
            stacked = torch.stack(list(self.slots))
            self.barrier.wait()
            return stacked

        return all_gather


def test_synced_metrics_over_devices_equal_one_shot_metrics():
    torch.manual_seed(1)
    num_classes, sizes = 4, (9, 0, 14)  # uneven, and one device without samples
    probabilities = torch.randn(sum(sizes), num_classes).softmax(1)
    target = torch.randint(0, num_classes, (sum(sizes),))
    losses = torch.rand(sum(sizes), dtype=torch.float64)
    devices, results, starts = FakeDevices(len(sizes)), [None] * len(sizes), [0, 9, 9]

    def run(rank):
        rows = slice(starts[rank], starts[rank] + sizes[rank])
        metrics = ClassificationMetrics(num_classes, top_k=(1, 2), zero_division=0.0)
        if sizes[rank]:
            metrics.update(probabilities[rows], target[rows])
        totals = torch.stack([losses[rows].sum(), torch.tensor(float(sizes[rank]), dtype=torch.float64)])
        results[rank] = synced_metrics(metrics, totals, devices.all_gather_for(rank), len(sizes))

    threads = [threading.Thread(target=run, args=(rank,)) for rank in range(len(sizes))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    predicted = probabilities.argmax(1)
    for totals, merged in results:  # every device ends with the same, exact numbers
        values = merged.compute()
        assert values["accuracy"] == pytest.approx(accuracy_score(target, predicted))
        assert values["macro_f1"] == pytest.approx(
            f1_score(target, predicted, average="macro", zero_division=0)
        )
        assert values["auroc"] == pytest.approx(roc_auc_score(target, probabilities, multi_class="ovr"))
        top2 = (probabilities.topk(2, 1).indices == target[:, None]).any(1).double().mean()
        assert values["top2_accuracy"] == pytest.approx(float(top2))
        assert float(totals[0] / totals[1]) == pytest.approx(float(losses.mean()))


# ---------------------------------------------------------------------------------------------------------------
# Fits with Lightning's Trainer


class Probe(Callback):
    """Records what the tricks did: γ at the start, EMA weights in validation, validation values."""

    def __init__(self, ema: EMAWeights):
        self.ema_callback, self.gamma_at_start, self.validated_with_ema = ema, None, []

    def on_train_start(self, trainer, pl_module):
        self.gamma_at_start = pl_module.model.block.last_bn.weight.detach().clone()

    def on_validation_epoch_start(self, trainer, pl_module):
        ema = self.ema_callback.ema.module.state_dict()
        current = pl_module.model.state_dict()
        self.validated_with_ema.append(all(torch.equal(current[key], ema[key]) for key in ema))


def test_fit_with_every_option_on(tmp_path):
    pl.seed_everything(0, verbose=False)
    weights = [1.0, 1.2, 0.8, 1.0, 1.0, 1.1, 0.9, 1.0, 1.0, 1.0]
    module = TrickbagModule(
        TinyResNet(),
        10,
        loss="focal",
        label_smoothing=0.1,
        class_weights=weights,
        mixup_alpha=0.4,
        cutmix_alpha=1.0,
        fmix_alpha=1.0,
        mix_mode="sample",
        mix_prob=0.5,
        lr=0.4,
        nesterov=True,
        weight_decay=5e-4,
        schedule="cosine",
        warmup_epochs=1,
        top_k=[1, 3],
    )
    assert bool((module.model.block.last_bn.weight == 1).all())
    ema = EMAWeights(decay=0.8)
    probe = Probe(ema)
    checkpoints = best_checkpoints(tmp_path, metric="val_macro_f1")
    fit = trainer(
        max_epochs=3,
        limit_train_batches=16,
        accumulate_grad_batches=2,
        precision="bf16-mixed",
        enable_checkpointing=True,
        callbacks=[ZeroInitResidualBN(), ema, probe, *checkpoints],
    )
    data = DigitsDataModule(batch_size=32)
    fit.fit(module, data)

    assert bool((probe.gamma_at_start == 0).all())  # zero-γ before the first update
    assert not bool((module.model.block.last_bn.weight == 0).all())  # and trained since
    assert probe.validated_with_ema == [True, True, True]
    assert module.real_updates == module.scheduler.last_step == fit.global_step == 24
    optimizer = fit.optimizers[0]
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 5e-4 and all(p.ndim > 1 for p in decay["params"])
    assert no_decay["weight_decay"] == 0.0 and all(p.ndim == 1 for p in no_decay["params"])
    assert module.scheduler.base_lrs == [pytest.approx(0.4 * 32 * 2 / 256)] * 2
    assert {path.name.split("-")[0] for path in tmp_path.iterdir()} == {
        "best_loss",
        "best_metric",
        "last.ckpt",
    }

    # The logged validation values are the EMA model's, exactly as scikit-learn computes them.
    ema_model = ema.ema.module.float().eval()
    x, y = data.test_set.tensors
    with torch.no_grad():
        logits = ema_model(x)
    predicted = logits.argmax(1)
    metrics = fit.callback_metrics
    assert float(metrics["val_accuracy"]) == pytest.approx(accuracy_score(y, predicted), abs=0.02)
    assert float(metrics["val_macro_f1"]) == pytest.approx(f1_score(y, predicted, average="macro"), abs=0.02)
    assert float(metrics["val_accuracy"]) > 0.5  # it learns, in 24 updates
    assert "val_top3_accuracy" in metrics and "val_auroc" in metrics
    tested = fit.test(module, data, verbose=False)[0]
    assert tested["test_accuracy"] == pytest.approx(float(metrics["val_accuracy"]))


def test_muon_trains_the_hidden_convs_and_follows_the_schedule():
    pl.seed_everything(0, verbose=False)
    module = TrickbagModule(TinyResNet(), 10, optimizer="muon", lr=0.4, nesterov=True, muon_lr=0.05,
                            schedule="cosine", warmup_epochs=1)  # fmt: skip
    fit = trainer(max_epochs=2, limit_train_batches=8)
    data = DigitsDataModule(batch_size=32)
    fit.fit(module, data)
    optimizer = fit.optimizers[0]
    assert isinstance(optimizer, Muon)
    (muon_group,) = [group for group in optimizer.param_groups if group["muon"]]
    block = module.model.block
    assert {id(p) for p in muon_group["params"]} == {id(block.conv1.weight), id(block.conv2.weight)}
    # each group follows trickbag's schedule from its own base LR (the SGD groups' scaled lr, Muon's muon_lr)
    assert module.scheduler.base_lrs == [pytest.approx(0.4 * 32 / 256)] * 2 + [pytest.approx(0.05)]
    assert module.real_updates == module.scheduler.last_step == 16
    assert float(fit.callback_metrics["val_accuracy"]) > 0.5


def test_lr_per_update_equals_trickbag_scheduler_under_accumulation():
    pl.seed_everything(0, verbose=False)
    module = TrickbagModule(DigitsCNN(10), 10, lr=0.4, schedule="cosine", warmup_epochs=1)
    trace = LRTrace()
    # 5 micro-batches of 64, accumulate 2: updates after batches 2, 4 and the short group 5 -> 3 per epoch.
    fit = trainer(max_epochs=3, limit_train_batches=5, limit_val_batches=1, accumulate_grad_batches=2,
                  callbacks=[trace])  # fmt: skip
    fit.fit(module, DigitsDataModule(batch_size=64))
    base_lr = 0.4 * 64 * 2 / 256  # linear scaling by batch x accumulation
    expected = reference_lrs(base_lr, "cosine", steps_per_epoch=3, epochs=3, updates=9, warmup_epochs=1)
    assert trace.lrs == pytest.approx(expected, rel=1e-12)
    assert module.scheduler.last_step == 9


def test_fp16_skipped_updates_do_not_advance_the_schedule():
    class SkipSome(TrickbagModule):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            return loss * math.inf if batch_idx in (1, 3) else loss  # inf gradients: the scaler skips

    pl.seed_everything(0, verbose=False)
    module = SkipSome(DigitsCNN(10), 10, lr=0.4, schedule="linear")
    trace = LRTrace()
    # Lightning turns precision="16-mixed" on CPU into bf16; a CPU GradScaler keeps true fp16 scaling.
    precision = MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu"))
    fit = trainer(max_epochs=1, limit_train_batches=6, limit_val_batches=1, plugins=[precision],
                  callbacks=[trace])  # fmt: skip
    fit.fit(module, DigitsDataModule(batch_size=64))
    assert fit.global_step == 6  # Lightning counts the skipped steps too
    assert module.real_updates == module.scheduler.last_step == 4
    lrs = reference_lrs(0.1, "linear", steps_per_epoch=6, epochs=1, updates=5)
    # Batches 1 and 3 were skipped, so batches 2 and 4 reuse the LR of the update that did not happen.
    assert trace.lrs == pytest.approx([lrs[0], lrs[1], lrs[1], lrs[2], lrs[2], lrs[3]], rel=1e-12)


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_precisions_train(precision):
    pl.seed_everything(0, verbose=False)
    module = TrickbagModule(DigitsCNN(10), 10, lr=0.4, cutmix_alpha=1.0, label_smoothing=0.1)
    fit = trainer(max_epochs=1, limit_train_batches=3, limit_val_batches=1, precision=precision)
    fit.fit(module, DigitsDataModule(batch_size=64))
    assert module.real_updates == 3
    assert math.isfinite(float(fit.callback_metrics["val_loss"]))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fp16_mixed_on_gpu():
    pl.seed_everything(0, verbose=False)
    module = TrickbagModule(DigitsCNN(10), 10, lr=0.4, mixup_alpha=0.2)
    fit = trainer(
        accelerator="gpu", max_epochs=2, limit_train_batches=4, limit_val_batches=2, precision="16-mixed"
    )
    fit.fit(module, DigitsDataModule(batch_size=64))
    assert module.real_updates == module.scheduler.last_step <= fit.global_step == 8
    assert math.isfinite(float(fit.callback_metrics["val_loss"]))


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints and resume


class SpoilValidation(Callback):
    """From epoch ``start`` on, validate a network whose head is zeroed: every value gets worse."""

    def __init__(self, start):
        self.start = start

    def on_validation_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch >= self.start:
            head = pl_module.model.head[-1]  # EMA swapped in before: the raw weights come back after
            head.weight.data.zero_()
            head.bias.data.zero_()


class ResumeProbe(Callback):
    def __init__(self, checkpoints, ema):
        self.checkpoints, self.ema, self.seen = checkpoints, ema, None

    def on_train_start(self, trainer, pl_module):
        self.seen = {
            "best": [(c.best_model_score.item(), c.best_model_path) for c in self.checkpoints],
            "scheduler": pl_module.scheduler.state_dict(),
            "real_updates": pl_module.real_updates,
            "mixer": pl_module.mix.state_dict()["generator_state"].clone(),
            "ema": {key: value.clone() for key, value in self.ema.ema.module.state_dict().items()},
            "ema_updates": self.ema.ema.updates,
        }


def resume_parts(tmp_path):
    module = TrickbagModule(DigitsCNN(10), 10, lr=0.4, mixup_alpha=0.4, warmup_epochs=1)
    checkpoints = best_checkpoints(tmp_path)
    ema = EMAWeights(decay=0.9)
    return module, checkpoints, ema


def test_resume_restores_best_so_far_schedule_mixer_and_ema(tmp_path):
    assert DigitsCNN(10).head[-1].out_features == 10  # SpoilValidation zeroes this layer
    pl.seed_everything(0, verbose=False)
    data = DigitsDataModule(batch_size=64)
    module, checkpoints, ema = resume_parts(tmp_path)
    first = trainer(
        max_epochs=2, limit_train_batches=4, enable_checkpointing=True, callbacks=[ema, *checkpoints]
    )
    first.fit(module, data)
    best = [(c.best_model_score.item(), c.best_model_path) for c in checkpoints]
    saved = {
        "scheduler": module.scheduler.state_dict(),
        "real_updates": module.real_updates,
        "mixer": module.mix.state_dict()["generator_state"].clone(),
        "ema": {key: value.clone() for key, value in ema.ema.module.state_dict().items()},
        "ema_updates": ema.ema.updates,
    }
    assert saved["real_updates"] == 8 and all(path for _, path in best)

    module, checkpoints, ema = resume_parts(tmp_path)  # fresh objects, as after a crash
    probe = ResumeProbe(checkpoints, ema)
    second = trainer(max_epochs=3, limit_train_batches=4, enable_checkpointing=True,
                     callbacks=[ema, SpoilValidation(start=2), probe, *checkpoints])  # fmt: skip
    second.fit(module, data, ckpt_path=str(tmp_path / "last.ckpt"))

    seen = probe.seen
    assert seen["best"] == best
    assert seen["scheduler"] == saved["scheduler"] and seen["real_updates"] == 8
    assert torch.equal(seen["mixer"], saved["mixer"])
    assert all(torch.equal(seen["ema"][key], saved["ema"][key]) for key in saved["ema"])
    assert seen["ema_updates"] == saved["ema_updates"] == 8
    # Epoch 3 validated a spoiled network: the best checkpoints are still those of the first run.
    assert float(second.callback_metrics["val_accuracy"]) < 0.2
    assert [(c.best_model_score.item(), c.best_model_path) for c in checkpoints] == best
    assert module.scheduler.last_step == 12


# ---------------------------------------------------------------------------------------------------------------
# LightningCLI


def test_lightning_cli_builds_and_fits(monkeypatch):
    pytest.importorskip("jsonargparse")
    monkeypatch.setattr(sys, "argv", ["lightning-digits"])  # pytest's own arguments are not for the CLI
    from lightning.pytorch.cli import LightningCLI

    args = [
        "--model.model.class_path=trickbag.models.DigitsCNN",
        "--model.model.init_args.num_classes=10",
        "--model.num_classes=10",
        "--model.label_smoothing=0.1",
        "--model.cutmix_alpha=1.0",
        "--model.schedule=step",
        "--model.schedule_options={step_size: 1, gamma: 0.5}",
        "--data.batch_size=32",
        "--trainer.max_epochs=2",
        "--trainer.limit_train_batches=2",
        "--trainer.limit_val_batches=1",
        "--trainer.num_sanity_val_steps=0",
        "--trainer.accelerator=cpu",
        "--trainer.logger=false",
        "--trainer.enable_checkpointing=false",
        "--trainer.enable_progress_bar=false",
    ]
    cli = LightningCLI(TrickbagModule, DigitsDataModule, run=False, args=args, save_config_callback=None)
    assert isinstance(cli.model.model, DigitsCNN) and cli.model.hparams.label_smoothing == 0.1
    trace = LRTrace()
    cli.trainer.callbacks.append(trace)
    cli.trainer.fit(cli.model, cli.datamodule)
    base = 0.1 * 32 / 256
    assert trace.lrs == pytest.approx([base, base, base / 2, base / 2])
