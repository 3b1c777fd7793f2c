"""trickbag.metrics vs torchmetrics (and sklearn for values), measured in the same run.

Ranking: NDCG / MRR / MAP on Q queries x D candidates (default 10,000 x 100) at k=10 and k=None, ours on the
dense (Q, D) matrix vs torchmetrics' Retrieval* on the flat (Q*D,) form with ``indexes``; NDCG values are
checked against ``sklearn.metrics.ndcg_score`` (our gain="linear", empty="zero" is its definition).
Classification: streaming macro-F1 and exact macro AUROC over N samples x C classes (default 1M x 10) fed in
batches, ours (ClassificationMetrics) vs torchmetrics MulticlassF1Score / MulticlassAUROC(thresholds=None).

Times are the minimum over repeats (the machine may be shared). Needs torchmetrics (dev extra).

    .venv/bin/python benchmarks/metrics.py [--quick] [--repeats 3] [--device cuda]
"""

import argparse
import time
import warnings

import numpy as np
import torch

from trickbag.metrics import ClassificationMetrics, map_at_k, mrr, ndcg


def best_time(fn, repeats, device):
    best, result = float("inf"), None
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best, result


def bench_ranking(queries, candidates, repeats, device):
    import sklearn.metrics as skm
    from torchmetrics.retrieval import RetrievalMAP, RetrievalMRR, RetrievalNormalizedDCG

    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(queries, candidates, generator=gen).to(device)
    relevance = torch.randint(0, 4, (queries, candidates), generator=gen).to(device)
    indexes = torch.arange(queries, device=device).repeat_interleave(candidates)
    # torchmetrics' AP/MRR zero the relevance of every item scored <= 0, so it gets sigmoid(scores): same order
    flat_scores, flat_rel = scores.flatten().sigmoid(), relevance.flatten()
    rows = []
    for k in (10, None):
        ours_fns = {
            "NDCG": lambda k=k: ndcg(scores, relevance, k=k, gain="linear", empty="zero"),
            "MRR": lambda k=k: mrr(scores, relevance, k=k, empty="zero"),
            "MAP": lambda k=k: map_at_k(scores, relevance, k=k, empty="zero"),
        }
        theirs = {
            "NDCG": (RetrievalNormalizedDCG(top_k=k, empty_target_action="neg"), flat_rel),
            "MRR": (RetrievalMRR(top_k=k, empty_target_action="neg"), flat_rel > 0),
            "MAP": (RetrievalMAP(top_k=k, empty_target_action="neg"), flat_rel > 0),
        }
        for name, fn in ours_fns.items():
            ours_time, ours_value = best_time(fn, repeats, device)
            metric, target = theirs[name]
            metric = metric.to(device)
            tm_time, tm_value = best_time(
                lambda m=metric, t=target: m(flat_scores, t, indexes=indexes), repeats, device
            )
            check = ""
            if name == "NDCG":
                ref = skm.ndcg_score(relevance.cpu().numpy(), scores.cpu().double().numpy(), k=k)
                check = f"|ours-sklearn|={abs(ours_value - ref):.1e}"
            rows.append((f"{name}@{k or 'all'}", ours_time, tm_time, ours_value, float(tm_value), check))
    print(f"\nranking: {queries} queries x {candidates} candidates, device={device}")
    print(f"{'metric':<10}{'ours s':>10}{'tm s':>10}{'tm/ours':>9}  {'ours':>9}{'tm':>9}  check")
    for name, ours_time, tm_time, ours_value, tm_value, check in rows:
        print(
            f"{name:<10}{ours_time:>10.4f}{tm_time:>10.4f}{tm_time / ours_time:>8.1f}x  "
            f"{ours_value:>9.5f}{tm_value:>9.5f}  {check}"
        )


def bench_classification(samples, classes, batch, repeats, device):
    import sklearn.metrics as skm
    from torchmetrics.classification import MulticlassAUROC, MulticlassF1Score

    gen = torch.Generator().manual_seed(1)
    target = torch.randint(0, classes, (samples,), generator=gen)
    logits = torch.randn(samples, classes, generator=gen) + 1.5 * torch.eye(classes)[target]  # a weak model
    probs = logits.softmax(1).to(device)
    target = target.to(device)
    starts = range(0, samples, batch)

    def ours(with_auc):
        metrics = ClassificationMetrics(classes, with_auc=with_auc)
        for s in starts:
            metrics.update(probs[s : s + batch], target[s : s + batch])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return metrics.compute()

    def theirs(metric):
        metric = metric.to(device)
        for s in starts:
            metric.update(probs[s : s + batch], target[s : s + batch])
        return float(metric.compute())

    rows = [
        (
            "macro F1",
            lambda: ours(False)["macro_f1"],
            lambda: theirs(MulticlassF1Score(classes, average="macro")),
        ),
        (
            "macro AUROC (exact)",
            lambda: ours(True)["auroc"],
            lambda: theirs(MulticlassAUROC(classes, thresholds=None)),
        ),
    ]
    print(f"\nclassification: {samples} samples x {classes} classes in batches of {batch}, device={device}")
    print(
        f"{'metric':<22}{'ours s':>9}{'tm s':>9}{'tm/ours':>9}{'ours M/s':>10}  {'ours':>9}{'tm':>9}  check"
    )
    y, p = target.cpu().numpy(), probs.cpu().double().numpy()
    references = {
        "macro F1": lambda: skm.f1_score(y, p.argmax(1), average="macro"),
        "macro AUROC (exact)": lambda: skm.roc_auc_score(y, p / p.sum(1, keepdims=True), multi_class="ovr"),
    }
    for name, ours_fn, tm_fn in rows:
        ours_time, ours_value = best_time(ours_fn, repeats, device)
        tm_time, tm_value = best_time(tm_fn, repeats, device)
        reference = references[name]()
        print(
            f"{name:<22}{ours_time:>9.3f}{tm_time:>9.3f}{tm_time / ours_time:>8.1f}x{samples / ours_time / 1e6:>10.2f}"
            f"  {ours_value:>9.6f}{tm_value:>9.6f}  |ours-sklearn|={abs(ours_value - reference):.1e}"
            f" |tm-sklearn|={abs(tm_value - reference):.1e}"
        )


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small sizes, one repeat (smoke test)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (1 is steadier on a loaded CPU)"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    repeats = 1 if args.quick else args.repeats
    print(f"torch {torch.__version__}, numpy {np.__version__}, threads {torch.get_num_threads()}")
    if args.quick:
        bench_ranking(500, 50, repeats, device)
        bench_classification(20_000, 10, 4096, repeats, device)
    else:
        bench_ranking(10_000, 100, repeats, device)
        bench_classification(1_000_000, 10, 10_000, repeats, device)


if __name__ == "__main__":
    main()
