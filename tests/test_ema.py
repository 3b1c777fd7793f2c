import copy
import io

import pytest
import torch
from torch import nn

from trickbag.ema import UPDATES_KEY, ModelEMA, ema_update, warmup_decay, warmup_length


class Whitened(nn.Module):
    """A frozen stem set from data (the whitening case), BatchNorm buffers and a trainable head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Linear(4, 4, bias=False)
        self.stem.requires_grad_(False)
        self.norm = nn.BatchNorm1d(4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.norm(self.stem(x)))


def make_model(seed=0):
    torch.manual_seed(seed)
    return Whitened()


def train_steps(model, count, seed=1):
    """``count`` SGD updates on random data; yields the weights after each update."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(count):
        x = torch.randn(8, 4, generator=generator)
        loss = model(x).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        yield {name: p.detach().clone() for name, p in model.named_parameters()}


def test_ema_update_matches_formula():
    ema, value = [torch.tensor([1.0, 2.0])], [torch.tensor([3.0, 6.0])]
    ema_update(ema, value, 0.9)
    torch.testing.assert_close(ema[0], torch.tensor([1.2, 2.4]))  # 0.9 * 1 + 0.1 * 3, 0.9 * 2 + 0.1 * 6
    ema_update([], [], 0.5)  # nothing to average is fine
    with pytest.raises(ValueError, match="decay=1.0 must be in"):
        ema_update(ema, value, 1.0)


@pytest.mark.parametrize("warmup", [True, False])
def test_matches_a_hand_written_loop(warmup):
    model = make_model()
    initial = {name: p.detach().clone() for name, p in model.named_parameters()}
    averaged = ModelEMA(model, 0.9, warmup=warmup)
    expected = dict(initial)
    for n, weights in enumerate(train_steps(model, 12)):
        decay = min(0.9, (1 + n) / (10 + n)) if warmup else 0.9  # TensorFlow's num_updates rule
        assert averaged.current_decay == pytest.approx(decay)
        averaged.update(model)
        for name in ("head.weight", "head.bias", "norm.weight", "norm.bias"):
            expected[name] = decay * expected[name] + (1 - decay) * weights[name]
    assert averaged.updates == 12
    for name, p in averaged.module.named_parameters():
        torch.testing.assert_close(p, expected[name], rtol=1e-6, atol=1e-7)
    # the warm-up matters: after 12 updates the two variants hold different weights
    other = ModelEMA(make_model(), 0.9, warmup=not warmup)
    for _ in train_steps(other_model := make_model(), 12):
        other.update(other_model)
    assert not torch.allclose(other.module.head.weight, averaged.module.head.weight)


def test_first_update_keeps_only_a_tenth_of_the_initial_weights():
    model = make_model()
    averaged = ModelEMA(model, 0.999)
    start = model.head.weight.detach().clone()
    with torch.no_grad():
        model.head.weight.add_(1.0)
    averaged.update(model)
    torch.testing.assert_close(averaged.module.head.weight, start + 0.9)  # d = 1/10 at n = 0


def test_frozen_parameter_and_buffers_are_copied_not_averaged():
    model = make_model()
    averaged = ModelEMA(model, 0.5, warmup=False)
    with torch.no_grad():
        # The whitening case: a frozen stem set from data after the EMA was built.
        model.stem.weight.copy_(torch.eye(4) * 3.0)
        model.norm.running_mean.fill_(2.0)
        model.norm.num_batches_tracked.fill_(7)
        model.head.weight.add_(2.0)
    before = averaged.module.head.weight.clone()
    averaged.update(model)
    assert torch.equal(averaged.module.stem.weight, torch.eye(4) * 3.0)  # not (random + 3 I) / 2
    assert torch.equal(averaged.module.norm.running_mean, torch.full((4,), 2.0))
    assert averaged.module.norm.num_batches_tracked.item() == 7
    torch.testing.assert_close(averaged.module.head.weight, (before + model.head.weight) / 2)  # averaged


def test_unfrozen_parameter_is_averaged_from_then_on():
    model = make_model()
    averaged = ModelEMA(model, 0.5, warmup=False)
    model.stem.requires_grad_(True)  # unfreezing a backbone during training
    before = averaged.module.stem.weight.clone()
    with torch.no_grad():
        model.stem.weight.add_(4.0)
    averaged.update(model)
    torch.testing.assert_close(averaged.module.stem.weight, before + 2.0)
    assert not averaged.module.stem.weight.requires_grad  # the copy stays frozen


def test_module_is_a_frozen_eval_copy():
    model = make_model()
    averaged = ModelEMA(model, 0.9)
    assert averaged.module is not model and not averaged.module.training
    assert all(not p.requires_grad for p in averaged.module.parameters())
    assert model.training and model.head.weight.requires_grad  # the model itself untouched


def test_state_round_trip_continues_the_same_average():
    straight_model, resumed_model = make_model(), make_model()
    straight = ModelEMA(straight_model, 0.95)
    first = ModelEMA(resumed_model, 0.95)
    for _ in train_steps(straight_model, 6):
        straight.update(straight_model)
    replay = train_steps(resumed_model, 6)
    for _ in range(3):
        next(replay)
        first.update(resumed_model)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    assert state[UPDATES_KEY].item() == 3 and set(state) == {*resumed_model.state_dict(), UPDATES_KEY}

    resumed = ModelEMA(resumed_model, 0.95)  # built from the already-trained model, as after a restart
    resumed.load_state_dict(state)
    assert resumed.updates == 3
    for _ in replay:
        resumed.update(resumed_model)
    for key, value in straight.module.state_dict().items():
        assert torch.equal(resumed.module.state_dict()[key], value), key


def test_state_dict_is_a_copy():
    averaged = ModelEMA(make_model(), 0.9)
    state = averaged.state_dict()
    state["head.weight"].add_(1.0)
    assert not torch.equal(state["head.weight"], averaged.module.head.weight)


def test_old_state_without_update_count_loads_with_warmup_over():
    model = make_model()
    old_state = {
        key: value + 1 for key, value in copy.deepcopy(model).state_dict().items()
    }  # bare module state
    averaged = ModelEMA(model, 0.99)
    averaged.load_state_dict(old_state)
    torch.testing.assert_close(averaged.module.head.weight, model.head.weight + 1)
    assert averaged.current_decay == 0.99
    assert warmup_decay(0.99, averaged.updates - 1) < 0.99  # the smallest such count


@pytest.mark.parametrize("decay", [0.1, 0.5, 0.9, 0.99, 0.999, 0.9999])
def test_warmup_length_is_where_the_ramp_reaches_decay(decay):
    n = warmup_length(decay)
    assert warmup_decay(decay, n) == decay
    assert n == 0 or warmup_decay(decay, n - 1) < decay
    assert [warmup_decay(decay, k) for k in range(3)] == [min(decay, (1 + k) / (10 + k)) for k in range(3)]


def test_invalid_arguments():
    model = make_model()
    for decay in (0.0, 1.0, -0.5, 1.5, float("nan"), True, "0.9"):
        with pytest.raises(ValueError, match="decay=.* must be in"):
            ModelEMA(model, decay)
    with pytest.raises(TypeError, match="warmup must be True or False"):
        ModelEMA(model, 0.9, warmup="yes")
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        ModelEMA([torch.zeros(1)], 0.9)
    averaged = ModelEMA(model, 0.9)
    with pytest.raises(ValueError, match="pass the model the ModelEMA was built from"):
        averaged.update(nn.Linear(4, 3))
    state = averaged.state_dict()
    with pytest.raises(ValueError, match="'ema_updates' must be >= 0, got -1"):
        averaged.load_state_dict({**state, UPDATES_KEY: torch.tensor(-1)})
    with pytest.raises(ValueError, match="'ema_updates' must be a one-element integer tensor"):
        averaged.load_state_dict({**state, UPDATES_KEY: torch.tensor(2.5)})
    with pytest.raises(RuntimeError, match="Missing key"):
        averaged.load_state_dict({UPDATES_KEY: torch.tensor(0)})
    assert averaged.updates == 0  # nothing half-loaded
    clash = nn.Linear(2, 2)
    clash.register_buffer(UPDATES_KEY, torch.zeros(()))
    with pytest.raises(ValueError, match="own state key 'ema_updates'"):
        ModelEMA(clash, 0.9)
