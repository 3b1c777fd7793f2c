"""trickbag.longtail against hand-written references: LDAM, logit adjustment, balanced softmax, DRW, sampling;
the config's rejections, exact accumulation of the new losses, and a tiny imbalanced digits run end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from trickbag.config import ConfigError, load_config
from trickbag.data import BatchLoader
from trickbag.longtail import (
    ClassBalancedSampler,
    DeferredReweighting,
    LongTailLoss,
    PosthocAdjustment,
    balanced_softmax_loss,
    drw_weight,
    ldam_loss,
    ldam_margins,
    log_prior,
    logit_adjusted_loss,
    posthoc_adjust_logits,
    rarest_classes,
    recall_rows,
    sampling_weights,
)
from trickbag.losses import ClassifierLoss

COUNTS = [400, 100, 20, 5]


def batch(n=12, c=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, c, generator=generator, dtype=torch.float64) * 2
    return logits.requires_grad_(), torch.randint(0, c, (n,), generator=generator)


def naive_ce(adjusted_rows, target, weight=None):
    """Weighted mean of -log softmax(row)[y] by a Python loop, F.cross_entropy's weighted-mean convention."""
    total, norm = 0.0, 0.0
    for row, y in zip(adjusted_rows, target.tolist()):
        w = 1.0 if weight is None else float(weight[y])
        total += -w * (row[y] - torch.logsumexp(row, 0))
        norm += w
    return total / norm


# ---------------------------------------------------------------- formulas


def test_ldam_margins_are_max_margin_times_fourth_root_ratio():
    margins = ldam_margins(COUNTS, max_margin=0.5)
    expected = [0.5 * (5 / n) ** 0.25 for n in COUNTS]
    assert margins.tolist() == pytest.approx(expected, rel=1e-6)
    assert margins.max().item() == pytest.approx(0.5) and margins.argmax().item() == 3


@pytest.mark.parametrize("weight", [None, [0.2, 1.0, 2.0, 3.0]])
def test_ldam_loss_equals_a_loop_with_the_target_logit_lowered(weight):
    logits, target = batch()
    margins, scale = ldam_margins(COUNTS, 0.5).double(), 7.0
    rows = []
    for row, y in zip(logits, target.tolist()):
        shifted = row.clone()
        shifted[y] = shifted[y] - margins[y]
        rows.append(scale * shifted)
    expected = naive_ce(rows, target, weight)
    got = ldam_loss(logits, target, margins, scale=scale, weight=weight)
    assert got.item() == pytest.approx(expected.item(), rel=1e-10)
    # one-hot rows (a mixer's soft targets) give the same loss
    one_hot = F.one_hot(target, 4).double()
    assert ldam_loss(logits, one_hot, margins, scale=scale, weight=weight).item() == pytest.approx(got.item())


def test_ldam_with_zero_margin_and_unit_scale_is_cross_entropy():
    logits, target = batch()
    got = ldam_loss(logits, target, torch.zeros(4), scale=1.0)
    assert got.item() == pytest.approx(F.cross_entropy(logits, target).item(), rel=1e-12)


@pytest.mark.parametrize("tau", [0.0, 0.5, 1.0, 2.0])
def test_logit_adjusted_loss_is_cross_entropy_on_logits_plus_tau_log_prior(tau):
    logits, target = batch()
    prior = torch.tensor(COUNTS, dtype=torch.float64) / sum(COUNTS)
    expected = F.cross_entropy(logits + tau * prior.log(), target)
    got = logit_adjusted_loss(logits, target, COUNTS, tau=tau)
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)
    got.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()


def test_balanced_softmax_is_softmax_of_counts_times_exp_logits():
    logits, target = batch()
    n = torch.tensor(COUNTS, dtype=torch.float64)
    expected = []
    for row, y in zip(logits, target.tolist()):
        p = n[y] * row[y].exp() / (n * row.exp()).sum()  # Ren et al. 2020, eq. 4
        expected.append(-p.log())
    got = balanced_softmax_loss(logits, target, COUNTS, reduction="none")
    assert got.tolist() == pytest.approx(torch.stack(expected).tolist(), rel=1e-6)


def test_posthoc_adjustment_subtracts_tau_log_prior_and_favours_rare_classes():
    logits = torch.zeros(1, 4)  # no evidence: the prior decides
    adjusted = posthoc_adjust_logits(logits, COUNTS, tau=1.0)
    assert adjusted[0].tolist() == pytest.approx((-log_prior(COUNTS)).tolist())
    assert adjusted.argmax().item() == 3  # the rarest class
    assert torch.equal(posthoc_adjust_logits(logits, COUNTS, tau=0.0), logits)


def test_posthoc_hook_changes_eval_logits_only_and_no_state_dict_key():
    model = nn.Linear(3, 4)
    keys = list(model.state_dict())
    x = torch.randn(5, 3)
    raw = model(x)
    PosthocAdjustment(COUNTS, tau=0.5).attach(model)
    assert list(model.state_dict()) == keys
    assert torch.equal(model.train()(x), raw)
    expected = raw - 0.5 * log_prior(COUNTS)
    assert torch.allclose(model.eval()(x), expected)


# ---------------------------------------------------------------- the training loss and DRW


def reference_longtail_loss(kind, logits, target, weight=None):
    if kind == "ldam":
        return ldam_loss(logits, target, ldam_margins(COUNTS, 0.5), scale=5.0, weight=weight)
    tau = 1.0 if kind == "balanced_softmax" else 0.7
    return logit_adjusted_loss(logits, target, COUNTS, tau=tau, weight=weight)


@pytest.mark.parametrize("kind", ["ldam", "logit_adjusted", "balanced_softmax"])
@pytest.mark.parametrize("weight", [None, [0.5, 1.0, 2.0, 4.0]])
def test_longtail_loss_mean_and_exact_sums_over_any_split(kind, weight):
    loss = LongTailLoss(kind, class_counts=COUNTS, tau=0.7, scale=5.0, weight=weight)
    logits, target = batch(n=13)
    target[4] = -100  # ignored: no loss, no weight
    keep = target != -100
    expected = reference_longtail_loss(kind, logits[keep], target[keep], weight)
    assert loss(logits, target).item() == pytest.approx(expected.item(), rel=1e-6)
    numerators, denominators = zip(
        *(loss.sums(logits[s], target[s]) for s in (slice(0, 5), slice(5, 6), slice(6, 13)))
    )
    assert (sum(numerators) / sum(denominators)).item() == pytest.approx(expected.item(), rel=1e-6)


def test_longtail_loss_label_smoothing_matches_smoothed_cross_entropy():
    logits, target = batch()
    loss = LongTailLoss("logit_adjusted", class_counts=COUNTS, tau=1.0, label_smoothing=0.1)
    adjusted = logits + log_prior(COUNTS).double()
    assert loss(logits, target).item() == pytest.approx(
        F.cross_entropy(adjusted, target, label_smoothing=0.1).item(), rel=1e-6
    )


def test_drw_switches_the_weights_on_at_its_epoch():
    weight = torch.tensor([0.5, 1.0, 2.0, 4.0])
    assert drw_weight(2, 3, weight) is None and drw_weight(3, 3, weight) is weight
    drw = DeferredReweighting(ClassifierLoss("ce", num_classes=4), weight, start_epoch=3)
    logits, target = batch()
    for epoch in range(5):
        drw.set_epoch(epoch)
        expected = F.cross_entropy(logits, target, weight=weight.double() if epoch >= 3 else None)
        assert drw(logits, target).item() == pytest.approx(expected.item(), rel=1e-6), epoch
    # LDAM-DRW: the weights land inside the LDAM loss
    drw = DeferredReweighting(LongTailLoss("ldam", class_counts=COUNTS, scale=5.0), weight, start_epoch=1)
    drw.set_epoch(1)
    assert drw(logits, target).item() == pytest.approx(
        reference_longtail_loss("ldam", logits, target, weight).item()
    )
    with pytest.raises(TypeError, match="weight"):
        DeferredReweighting(nn.Identity(), weight, 1)


def test_fit_calls_set_epoch_of_the_loss_every_epoch():
    from trickbag.precision import Precision
    from trickbag.train import FitOptions, Loaders, Parts, fit

    class Recording(ClassifierLoss):
        def set_epoch(self, epoch):
            self.seen = [*getattr(self, "seen", []), epoch]

    model = nn.Linear(4, 3)
    data = [(torch.randn(6, 4), torch.randint(0, 3, (6,))) for _ in range(2)]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    scheduler.observe = lambda value: None
    loss = Recording("ce", num_classes=3)
    parts = Parts(loss_fn=loss, optimizer=optimizer, scheduler=scheduler, precision=Precision("fp32", "cpu"))
    fit(model, Loaders(data), parts, FitOptions(epochs=3))
    assert loss.seen == [0, 1, 2]


# ---------------------------------------------------------------- sampling


def test_sampling_weights_formulas():
    labels = torch.tensor([0] * 8 + [1] * 2)
    assert sampling_weights(labels, "inverse").tolist() == [1 / 8] * 8 + [1 / 2] * 2
    assert sampling_weights(labels, "sqrt").tolist() == pytest.approx([8**-0.5] * 8 + [2**-0.5] * 2)
    # repeat factor max(1, sqrt(t / f_c)), t = 1/C = 0.5: f = 0.8 -> 1, f = 0.2 -> sqrt(2.5)
    assert sampling_weights(labels, "repeat_factor").tolist() == pytest.approx(
        [1.0] * 8 + [math.sqrt(2.5)] * 2
    )
    with pytest.raises(ValueError, match="mode"):
        sampling_weights(labels, "balanced")


@pytest.mark.parametrize("mode", ["inverse", "sqrt", "repeat_factor"])
def test_sampler_class_frequencies_over_many_epochs(mode):
    counts = torch.tensor([300, 60, 12])
    labels = torch.repeat_interleave(torch.arange(3), counts)
    sampler = ClassBalancedSampler(labels, mode, seed=3)
    drawn = torch.cat([labels[sampler.indices(epoch)] for epoch in range(60)])
    mass = {"inverse": torch.ones(3), "sqrt": counts.double().sqrt()}.get(mode)
    if mass is None:
        factor = (1 / 3 / (counts.double() / counts.sum())).sqrt().clamp_min(1.0)
        mass = counts * factor
    expected = (mass / mass.sum()).tolist()
    observed = (torch.bincount(drawn, minlength=3).double() / len(drawn)).tolist()
    assert observed == pytest.approx(expected, abs=0.01)  # 22,320 draws: standard error < 0.004


def test_sampler_order_is_a_function_of_seed_and_epoch_and_resumes_exactly():
    labels = torch.repeat_interleave(torch.arange(3), torch.tensor([50, 10, 3]))
    images = torch.arange(63, dtype=torch.uint8).view(63, 1, 1, 1).expand(63, 1, 2, 2).contiguous()

    def loader():
        sampler = ClassBalancedSampler(labels, "inverse", seed=5, start_epoch=2)
        return BatchLoader(images, labels, batch_size=8, shuffle=True, seed=5, sampler=sampler, flip=True)

    straight = loader()
    epochs = [[y.tolist() for _, y in straight] for _ in range(4)]
    resumed = loader()
    resumed.load_state_dict({"seed": 5, "epoch": 2})
    assert [[y.tolist() for _, y in resumed] for _ in range(2)] == epochs[2:]
    assert len(straight) == 63 // 8 + 1
    # before start_epoch: a permutation of all images; from it: draws with replacement
    sampler = ClassBalancedSampler(labels, "inverse", seed=5, start_epoch=2)
    assert sorted(sampler.indices(1).tolist()) == list(range(63))
    assert not torch.equal(sampler.indices(2), sampler.indices(3))
    assert torch.equal(sampler.indices(2), ClassBalancedSampler(labels, "inverse", seed=5).indices(2))


# ---------------------------------------------------------------- config


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["loss.kind=logit_adjusted", "loss.class_weights=effective_number"], "already re-balances the loss"),
        (["loss.kind=balanced_softmax", "data.sampling=inverse"], "would correct twice"),
        (["data.sampling=sqrt", "loss.class_weights=inverse_frequency"], "re-balances twice"),
        (["loss.kind=ldam", "loss.focal_gamma=1.0"], "focal loss does not combine"),
        (["loss.drw_epoch=2"], "defers nothing"),
        (["epochs=5", "loss.drw_epoch=5", "loss.class_weights=effective_number"], "never reached"),
        (["eval.logit_adjust_tau=1", "loss.kind=logit_adjusted"], "already re-balances"),
        (["eval.logit_adjust_tau=1", "data.sampling=inverse"], "already re-balances"),
        (["data.sampling=balanced"], "data.sampling='balanced' not in"),
        (["data.sampling=sqrt", "data.in_memory=false"], "needs the in-memory loader"),
        (
            ["data.sampling=inverse", "data.random_resized_crop=true", "data.image_size=32"],
            "in-memory loader",
        ),
        (["loss.kind=ldm"], "loss.kind='ldm' not in"),
        (["loss.tau=0"], "loss.tau=0"),
    ],
)
def test_config_rejects_combinations_that_make_no_sense(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_config_accepts_the_combinations_that_do():
    from trickbag.parts import loss_from_config, sampler_from_config

    cfg = load_config(None, ["loss.kind=ldam", "loss.class_weights=effective_number", "loss.drw_epoch=3"])
    loss = loss_from_config(cfg, 4, torch.ones(4), class_counts=COUNTS)
    assert isinstance(loss, DeferredReweighting) and isinstance(loss.loss, LongTailLoss)
    cfg = load_config(None, ["data.sampling=sqrt", "loss.drw_epoch=3", "loss.label_smoothing=0.1"])
    assert sampler_from_config(cfg, torch.tensor([0, 0, 1])).start_epoch == 3
    cfg = load_config(None, ["loss.kind=logit_adjusted", "loss.tau=1.5", "mixing.mixup_alpha=0.2"])
    assert loss_from_config(cfg, 4, class_counts=COUNTS).tau == 1.5
    with pytest.raises(ValueError, match="class_counts"):
        loss_from_config(cfg, 4)


# ---------------------------------------------------------------- reporting


def test_rarest_classes_and_recall_rows_mark_the_smallest_counts():
    assert rarest_classes([500, 20, 300, 5, 80]) == [3]  # ceil(0.2 * 5) = 1
    assert rarest_classes([500, 20, 300, 5, 80, 7]) == [3, 5]
    assert rarest_classes([10, 10, 10]) == []  # balanced: nothing is rare
    per_class = [{"class": name, "support": 30, "recall": r} for name, r in (("a", 0.9), ("b", 0.25))]
    assert recall_rows(per_class, [90, 9]) == [("a", "90", "0.900", ""), ("b", "9", "0.250", "rare")]


def test_inspect_predictions_of_imbalanced_labels_lead_with_macro_f1_and_mark_the_rarest(tmp_path, capsys):
    from trickbag.cli import main

    rows = ["path,label,predicted"]
    rows += [f"a{i}.png,cat,cat" for i in range(40)] + [f"b{i}.png,dog,cat" for i in range(10)]
    rows += [f"c{i}.png,owl,{'owl' if i < 3 else 'cat'}" for i in range(4)]
    path = tmp_path / "predictions.csv"
    path.write_text("\n".join(rows) + "\n")
    capsys.readouterr()
    assert main(["inspect", str(path)]) == 0
    printed = capsys.readouterr().out
    owl = next(line for line in printed.splitlines() if "owl" in line and "│" in line)
    assert "rare" in owl and "0.750" in owl  # recall 3/4, the rarest label
    assert "rare" not in next(line for line in printed.splitlines() if "dog" in line and "│" in line)
    assert printed.index("│ macro_f1") < printed.index("│ accuracy ")


# ---------------------------------------------------------------- end to end


def imbalanced_digits(root: Path, counts=(120, 60, 25, 10)) -> None:
    """Digits 0-3 as 8x8 PNGs, long-tailed in train, balanced in test."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    for split, per_class in (("train", counts), ("test", (30,) * len(counts))):
        for label, count in enumerate(per_class):
            folder = root / split / str(label)
            folder.mkdir(parents=True)
            picked = (digits.target == label).nonzero()[0]
            picked = picked[:count] if split == "train" else picked[-count:]
            for index in picked:
                pixels = (digits.images[index] * 255 / 16).astype("uint8")
                Image.fromarray(pixels).save(folder / f"{index}.png")


def test_ldam_drw_and_posthoc_runs_end_to_end_on_imbalanced_digits(tmp_path, capsys):
    from trickbag.cli import main

    imbalanced_digits(tmp_path / "data")
    common = ["data.kind=image_folder", f"data.root={tmp_path / 'data'}", "data.val_fraction=0.2", "epochs=3",
              "batch_size=32", "threads=1", "model.options={width: 8}", "data.num_workers=0",
              f"data.cache_dir={tmp_path / 'cache'}"]  # fmt: skip
    runs = {
        "ldam_drw": [
            "loss.kind=ldam",
            "loss.ldam_scale=5",
            "loss.class_weights=effective_number",
            "loss.drw_epoch=1",
        ],  # fmt: skip
        "posthoc": ["eval.logit_adjust_tau=1.0", "data.sampling=none"],
        "sampled": ["data.sampling=sqrt", "loss.drw_epoch=1"],
    }
    for name, overrides in runs.items():
        out = tmp_path / name
        assert main(["train", "digits", *common, f"output_dir={out}", *overrides, "--quiet"]) == 0
        (run_dir,) = [p for p in out.iterdir() if p.is_dir()]
        results = json.loads((run_dir / "results.json").read_text())
        assert results["best_metric"] == "macro_f1"  # imbalanced labels: advice picks macro-F1
        last = results["checkpoints"]["last"]
        assert [row["support"] for row in last["test_per_class"]] == [30] * 4
        meta = json.loads((run_dir / "last" / "meta.json").read_text())
        assert meta["class_counts"] == [96, 48, 20, 8]  # train after the stratified 20% val split
        assert results["class_counts"] == [96, 48, 20, 8]
        # the summary leads with macro-F1 and shows per-class recall, the rarest class marked
        summary = capsys.readouterr().out
        assert "per-class test recall" in summary and "rare" in summary
        # `trickbag eval` rebuilds the same loss (margins, DRW epoch) and the same post-hoc logits
        assert main(["eval", str(run_dir / "last")]) == 0
        printed = capsys.readouterr().out
        assert f"{last['test']['loss']:.4f}" in printed and f"{last['test']['macro_f1']:.4f}" in printed, name
        assert printed.index("│ macro_f1") < printed.index("│ loss") < printed.index("│ accuracy ")
        assert "rare" in printed
    assert main(["report", str(run_dir)]) == 0
    assert "per-class recall" in (run_dir / "report.html").read_text() or (run_dir / "report.png").is_file()
