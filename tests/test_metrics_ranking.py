"""Ranking metrics against sklearn.ndcg_score / average_precision_score and a naive per-query loop."""

import math

import numpy as np
import pytest
import sklearn.metrics as skm
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from trickbag.metrics import UndefinedMetricWarning, map_at_k, mrr, ndcg, ranking_from_flat, recall_at_k


def _random(q, d, seed, levels=4, tie_levels=None):
    gen = torch.Generator().manual_seed(seed)
    if tie_levels:
        scores = torch.randint(0, tie_levels, (q, d), generator=gen).double()
    else:
        scores = torch.randn(q, d, generator=gen, dtype=torch.float64)
    relevance = torch.randint(0, levels, (q, d), generator=gen)
    return scores, relevance


def _naive_order(scores, relevant, ties):
    """Per-query order by a Python sort: score descending, then irrelevant first (pessimistic) or last."""
    sign = 1 if ties == "pessimistic" else -1
    return sorted(range(len(scores)), key=lambda i: (-scores[i], sign * relevant[i], i))


def _naive(scores, relevance, k, ties="pessimistic", gain="linear"):
    """Reference MRR, AP@k, recall@k, NDCG (ordered ties) for one query, as plain Python."""
    relevant = [r > 0 for r in relevance]
    order = _naive_order(scores, relevant, ties)
    cut = order[: k or len(order)]
    n_rel = sum(relevant)
    if n_rel == 0:
        return None
    first = next((pos for pos, i in enumerate(cut) if relevant[i]), None)
    rr = 0.0 if first is None else 1 / (first + 1)
    hits, precision_sum = 0, 0.0
    for pos, i in enumerate(cut):
        if relevant[i]:
            hits += 1
            precision_sum += hits / (pos + 1)
    ap = precision_sum / min(k or n_rel, n_rel)
    recall = sum(relevant[i] for i in cut) / n_rel
    g = (lambda r: 2**r - 1) if gain == "exponential" else (lambda r: r)
    gain_order = sorted(range(len(scores)), key=lambda i: (-scores[i], sign_gain(ties) * relevance[i], i))
    dcg = sum(g(relevance[i]) / math.log2(pos + 2) for pos, i in enumerate(gain_order[: k or len(order)]))
    ideal = sorted(relevance, reverse=True)[: k or len(order)]
    idcg = sum(g(r) / math.log2(pos + 2) for pos, r in enumerate(ideal))
    return {"mrr": rr, "map": ap, "recall": recall, "ndcg": dcg / idcg if idcg else None}


def sign_gain(ties):
    return 1 if ties == "pessimistic" else -1


@pytest.mark.parametrize("k", [None, 1, 3, 10])
@pytest.mark.parametrize("tie_levels", [None, 3])
def test_ndcg_linear_equals_sklearn(k, tie_levels):
    scores, relevance = _random(60, 12, seed=k or 0, tie_levels=tie_levels)
    ref = skm.ndcg_score(relevance.numpy(), scores.numpy(), k=k)
    assert ndcg(scores, relevance, k=k, gain="linear", empty="zero") == pytest.approx(ref, abs=1e-12)
    per_query = ndcg(scores, relevance, k=k, gain="linear", empty="zero", reduction="none")
    for row in range(3):
        one = skm.ndcg_score(relevance[row : row + 1].numpy(), scores[row : row + 1].numpy(), k=k)
        assert float(per_query[row]) == pytest.approx(one, abs=1e-12)


@settings(max_examples=30, deadline=None)
@given(
    q=st.integers(1, 8),
    d=st.integers(2, 9),
    seed=st.integers(0, 2**31 - 1),
    k=st.sampled_from([None, 1, 2, 5]),
    tie_levels=st.sampled_from([None, 2, 4]),
)
def test_ndcg_random_equals_sklearn(q, d, seed, k, tie_levels):
    scores, relevance = _random(q, d, seed, tie_levels=tie_levels)
    ref = skm.ndcg_score(relevance.numpy(), scores.numpy(), k=k)
    assert ndcg(scores, relevance, k=k, gain="linear", empty="zero") == pytest.approx(ref, abs=1e-12)


@settings(max_examples=40, deadline=None)
@given(
    d=st.integers(1, 9),
    seed=st.integers(0, 2**31 - 1),
    k=st.sampled_from([None, 1, 2, 5]),
    ties=st.sampled_from(["pessimistic", "optimistic"]),
    tie_levels=st.sampled_from([None, 2]),
)
def test_binary_metrics_equal_naive_loop(d, seed, k, ties, tie_levels):
    scores, relevance = _random(6, d, seed, levels=3, tie_levels=tie_levels)
    refs = [_naive(s.tolist(), r.tolist(), k, ties, "exponential") for s, r in zip(scores, relevance)]
    kwargs = {"k": k, "ties": ties, "reduction": "none"}
    ours = {
        "mrr": mrr(scores, relevance, **kwargs),
        "map": map_at_k(scores, relevance, **kwargs),
        "recall": recall_at_k(scores, relevance, **{**kwargs, "k": k or d}),
        "ndcg": ndcg(scores, relevance, gain="exponential", k=k, reduction="none"),
    }
    for row, ref in enumerate(refs):
        for name, values in ours.items():
            if ref is None or (name == "ndcg" and ref["ndcg"] is None):
                assert math.isnan(values[row]), name
            elif name == "ndcg" and tie_levels is not None:
                continue  # ties are averaged for NDCG; checked against sklearn elsewhere
            elif name == "recall" and k is None:
                assert values[row] == 1.0
            else:
                assert float(values[row]) == pytest.approx(ref[name], abs=1e-12), name


@pytest.mark.parametrize("k", [None, 4])
def test_exponential_gain_equals_sklearn_on_transformed_relevance(k):
    scores, relevance = _random(50, 10, seed=11, tie_levels=3)
    ref = skm.ndcg_score((2.0 ** relevance.numpy()) - 1, scores.numpy(), k=k)
    assert ndcg(scores, relevance, k=k, empty="zero") == pytest.approx(ref, abs=1e-12)


def test_map_equals_sklearn_average_precision_without_ties():
    scores, relevance = _random(40, 15, seed=3, levels=2)
    refs = [
        skm.average_precision_score(r.numpy() > 0, s.numpy())
        for s, r in zip(scores, relevance)
        if bool((r > 0).any())
    ]
    assert map_at_k(scores, relevance) == pytest.approx(np.mean(refs), abs=1e-12)


def test_constant_scores_pessimistic_vs_optimistic():
    scores = torch.zeros(1, 4)
    relevance = torch.tensor([[0, 1, 0, 0]])
    assert mrr(scores, relevance) == 0.25  # three irrelevant items tie ahead
    assert mrr(scores, relevance, ties="optimistic") == 1.0
    assert recall_at_k(scores, relevance, k=3) == 0.0
    assert map_at_k(scores, relevance, ties="optimistic") == 1.0
    # sklearn-style average: the relevant gain is spread evenly over all four positions
    expected = (1 / 4) * sum(1 / math.log2(i + 2) for i in range(4))
    assert ndcg(scores, relevance, gain="linear") == pytest.approx(expected)


def test_bool_relevance_and_k_beyond_d():
    scores = torch.tensor([[0.3, 0.2, 0.1]])
    relevance = torch.tensor([[False, True, False]])
    assert mrr(scores, relevance) == 0.5
    assert map_at_k(scores, relevance, k=10) == 0.5
    assert recall_at_k(scores, relevance, k=10) == 1.0
    assert ndcg(scores, relevance, k=10) == pytest.approx(1 / math.log2(3))


def test_negative_scores_are_not_irrelevant():
    scores = torch.tensor([[-5.0, -1.0, -3.0]])
    relevance = torch.tensor([[1, 0, 0]])
    assert mrr(scores, relevance) == pytest.approx(1 / 3)
    assert map_at_k(scores, relevance) == pytest.approx(1 / 3)


def test_mask_equals_unpadded_rows_and_flat_roundtrip():
    gen = torch.Generator().manual_seed(9)
    lengths = [1, 5, 3, 7, 2]
    query_id = torch.cat([torch.full((n,), 10 * q) for q, n in enumerate(lengths)])
    perm = torch.randperm(query_id.numel(), generator=gen)
    query_id = query_id[perm]
    score = torch.randn(query_id.numel(), generator=gen)
    relevance = torch.randint(0, 3, (query_id.numel(),), generator=gen)
    scores, rel, mask = ranking_from_flat(query_id, score, relevance)
    assert scores.shape == (5, 7) and mask.sum(1).tolist() == lengths and rel.dtype == relevance.dtype
    for fn in (mrr, map_at_k, ndcg):
        padded = fn(scores, rel, mask=mask, k=3, reduction="none")
        for q in range(5):
            rows = query_id == 10 * q
            one = fn(score[rows][None], relevance[rows][None], k=3, reduction="none")
            torch.testing.assert_close(padded[q : q + 1], one, equal_nan=True)
    # padding with a higher score than real items must not leak in
    poisoned = torch.where(mask, scores, torch.full_like(scores, 1e9))
    torch.testing.assert_close(
        ndcg(poisoned, rel, mask=mask, reduction="none"),
        ndcg(scores, rel, mask=mask, reduction="none"),
        equal_nan=True,
    )


def test_empty_policy():
    scores = torch.tensor([[0.3, 0.1], [0.2, 0.4]])
    relevance = torch.tensor([[0, 0], [1, 0]])
    assert mrr(scores, relevance) == 0.5
    assert mrr(scores, relevance, empty="zero") == 0.25
    assert math.isnan(mrr(scores, relevance, reduction="none")[0])
    with pytest.warns(UndefinedMetricWarning, match="no query has a relevant item"):
        assert math.isnan(ndcg(scores, torch.zeros_like(relevance)))
    with pytest.warns(UndefinedMetricWarning):
        assert math.isnan(map_at_k(torch.zeros(0, 3), torch.zeros(0, 3)))
    with pytest.warns(UndefinedMetricWarning):
        assert math.isnan(mrr(torch.zeros(2, 0), torch.zeros(2, 0)))


def test_float16_scores_and_n1():
    scores, relevance = _random(20, 6, seed=4)
    half = scores.half()
    ref = skm.ndcg_score(relevance.numpy(), half.double().numpy(), k=3)
    assert ndcg(half, relevance, k=3, gain="linear", empty="zero") == pytest.approx(ref, abs=1e-12)
    assert ndcg(torch.tensor([[0.5]]), torch.tensor([[2]])) == 1.0
    assert mrr(torch.tensor([[0.5]]), torch.tensor([[1]])) == 1.0


def test_validation():
    s, r = torch.rand(2, 3), torch.ones(2, 3)
    with pytest.raises(ValueError, match="scores must be \\(Q, D\\)"):
        ndcg(torch.rand(3), torch.ones(3))
    with pytest.raises(ValueError, match="scores shape \\(2, 3\\) != relevance shape \\(2, 2\\)"):
        mrr(s, torch.ones(2, 2))
    with pytest.raises(TypeError, match="scores must be float"):
        mrr(torch.ones(2, 3, dtype=torch.long), r)
    with pytest.raises(ValueError, match="scores contain nan"):
        mrr(torch.full((2, 3), float("nan")), r)
    with pytest.raises(ValueError, match="relevance contains nan"):
        ndcg(s, torch.full((2, 3), float("nan")))
    with pytest.raises(ValueError, match="relevance must be real and >= 0"):
        ndcg(s, -r)
    with pytest.raises(ValueError, match="mask must be a bool tensor of shape \\(2, 3\\)"):
        ndcg(s, r, mask=torch.ones(2, 3))
    with pytest.raises(ValueError, match="k=0 must be None or an int >= 1"):
        map_at_k(s, r, k=0)
    with pytest.raises(ValueError, match="empty='drop' not in"):
        map_at_k(s, r, empty="drop")
    with pytest.raises(ValueError, match="reduction='sum' not in"):
        map_at_k(s, r, reduction="sum")
    with pytest.raises(ValueError, match="gain='log' not in"):
        ndcg(s, r, gain="log")
    with pytest.raises(ValueError, match="ties='pessimistic' not in"):
        ndcg(s, r, ties="pessimistic")
    with pytest.raises(ValueError, match="ties='average' not in"):
        mrr(s, r, ties="average")
    with pytest.raises(ValueError, match="recall_at_k needs k"):
        recall_at_k(s, r, k=None)
    with pytest.raises(TypeError, match="relevance must be a torch.Tensor"):
        ndcg(s, [[1, 0, 0]])
    with pytest.raises(ValueError, match="same length"):
        ranking_from_flat(torch.tensor([0, 0]), torch.rand(3), torch.ones(3))
    with pytest.raises(TypeError, match="query_id must hold integer ids"):
        ranking_from_flat(torch.tensor([0.0]), torch.rand(1), torch.ones(1))
    with pytest.raises(ValueError, match="score must be a \\(N,\\) tensor"):
        ranking_from_flat(torch.tensor([0]), torch.rand(1, 1), torch.ones(1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_packed_float_keys_equal_float64_ranks(dtype):
    """Two code paths (float bit patterns vs. dense ranks for float64) rank identically, -0.0 == 0.0 included."""
    values = torch.tensor([-math.inf, -2.5, -1.0, -0.0, 0.0, 0.5, 1.0, 3.0, math.inf])
    gen = torch.Generator().manual_seed(12)
    scores = values[torch.randint(0, len(values), (40, 9), generator=gen)]
    relevance = torch.randint(0, 3, (40, 9), generator=gen)
    mask = torch.rand(40, 9, generator=gen) > 0.2
    for fn, kwargs in [
        (ndcg, {"k": 3}),
        (ndcg, {}),
        (mrr, {"ties": "optimistic"}),
        (mrr, {}),
        (map_at_k, {"k": 4}),
        (recall_at_k, {"k": 2, "ties": "optimistic"}),
    ]:
        ours = fn(scores.to(dtype), relevance, mask=mask, reduction="none", **kwargs)
        ref = fn(scores.double(), relevance, mask=mask, reduction="none", **kwargs)
        torch.testing.assert_close(ours, ref, equal_nan=True, rtol=0, atol=1e-12)
    # the two zeros tie: the relevant item (index 0) is last among its tie block under pessimism
    zeros = torch.tensor([[0.0, -0.0, 0.0]])
    assert mrr(zeros, torch.tensor([[1, 0, 0]])) == pytest.approx(1 / 3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_equals_cpu():
    scores, relevance = _random(300, 20, seed=13, tie_levels=5)
    mask = torch.rand(300, 20, generator=torch.Generator().manual_seed(0)) > 0.1
    for dtype in (torch.float32, torch.float64):
        for fn, kwargs in [(ndcg, {"k": 5}), (mrr, {}), (map_at_k, {"k": 5}), (recall_at_k, {"k": 3})]:
            cpu = fn(scores.to(dtype), relevance, mask=mask, reduction="none", **kwargs)
            gpu = fn(scores.to(dtype).cuda(), relevance.cuda(), mask=mask.cuda(), reduction="none", **kwargs)
            torch.testing.assert_close(gpu.cpu(), cpu, equal_nan=True)
