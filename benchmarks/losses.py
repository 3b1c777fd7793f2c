"""Focal loss forward+backward vs F.cross_entropy and vs a naive one-hot focal loss, in one run.

Time: minimum over repeats of forward+backward (the minimum, because the machine may be shared).
Memory: on CPU, bytes of the distinct tensors autograd saves for backward plus the output (deterministic,
via saved_tensors_hooks); on CUDA, torch.cuda.max_memory_allocated above the inputs.

    .venv/bin/python benchmarks/losses.py [--quick] [--device cuda] [--repeats 20] [--threads 1]
"""

import argparse
import time

import torch
import torch.nn.functional as F

from trickbag.losses import focal_loss

GAMMA = 2.0
TARGETS = {"time vs CE": 1.3, "memory vs CE": 1.1, "naive time / ours": 2.0}


def naive_focal(logits, target, gamma=GAMMA):
    """Textbook version: full softmax, (N, C) one-hot, pow on every entry."""
    log_p = torch.log_softmax(logits.float(), dim=1)
    one_hot = F.one_hot(target, logits.shape[1]).float()
    return -(one_hot * (1 - log_p.exp()) ** gamma * log_p).sum(1).mean()


def ours(logits, target):
    return focal_loss(logits, target, gamma=GAMMA)


def cross_entropy(logits, target):
    return F.cross_entropy(logits, target)


def saved_bytes(fn, logits, target):
    """Bytes of the distinct storages autograd keeps for backward, plus the output."""
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = fn(logits, target)
    return sum(storages.values()) + out.numel() * out.element_size()


def cuda_peak_bytes(fn, logits, target):
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn(logits, target).backward()
    torch.cuda.synchronize()
    logits.grad = None
    return torch.cuda.max_memory_allocated() - base


def best_times(fns, logits, target, repeats, device):
    """Min fwd+bwd seconds per function; the functions take turns so background load hits all alike."""

    def step(fn):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn(logits, target).backward()
        if device == "cuda":
            torch.cuda.synchronize()
        logits.grad = None
        return time.perf_counter() - start

    for fn in fns.values():
        for _ in range(3):
            step(fn)
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(step(fn))
    return {name: min(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small sizes, few repeats (smoke test)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = [(256, 100), (4096, 10)] if args.quick else [(4096, 1000), (65536, 10)]
    repeats = 3 if args.quick else args.repeats
    generator = torch.Generator().manual_seed(0)
    print(
        f"device={args.device} torch={torch.__version__} threads={torch.get_num_threads()} gamma={GAMMA} "
        f"repeats={repeats} (min taken)"
    )
    print(
        f"{'N':>6} {'C':>5} {'CE ms':>8} {'ours ms':>8} {'naive ms':>9} {'t ours/CE':>9} "
        f"{'naive/ours':>10} {'mem ours/CE':>11} {'mem naive/CE':>12}"
    )
    verdicts = []
    for n, c in shapes:
        logits = torch.randn(n, c, generator=generator).to(args.device).requires_grad_()
        target = torch.randint(0, c, (n,), generator=generator).to(args.device)
        fns = {"ce": cross_entropy, "ours": ours, "naive": naive_focal}
        times = best_times(fns, logits, target, repeats, args.device)
        memory_of = cuda_peak_bytes if args.device == "cuda" else saved_bytes
        memory = {name: memory_of(fn, logits, target) for name, fn in fns.items()}
        ratios = {
            "time vs CE": times["ours"] / times["ce"],
            "memory vs CE": memory["ours"] / memory["ce"],
            "naive time / ours": times["naive"] / times["ours"],
        }
        print(
            f"{n:>6} {c:>5} {times['ce'] * 1e3:>8.2f} {times['ours'] * 1e3:>8.2f} {times['naive'] * 1e3:>9.2f} "
            f"{ratios['time vs CE']:>9.2f} {ratios['naive time / ours']:>10.2f} "
            f"{ratios['memory vs CE']:>11.2f} {memory['naive'] / memory['ce']:>12.2f}"
        )
        for name, limit in TARGETS.items():
            ok = ratios[name] >= limit if name.startswith("naive") else ratios[name] <= limit
            sign = ">=" if name.startswith("naive") else "<="
            verdicts.append(
                f"  N={n} C={c} {name}: {ratios[name]:.2f} (target {sign} {limit}) {'PASS' if ok else 'MISS'}"
            )
    print("\n".join(verdicts))
    if args.quick:
        print("--quick: sizes too small for the targets (per-call overhead dominates); smoke test only")


if __name__ == "__main__":
    main()
