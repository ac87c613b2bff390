"""Train the tiny models shipped with the package (seeded, CPU, minutes each).

    python benchmarks/train_tiny.py                      # every family × task
    python benchmarks/train_tiny.py --family mamba --task markers

Each model learns to predict the label token at the last position (cross-entropy there only), on fresh
batches from the task generator; it stops at the target held-out accuracy or the step budget, and
writes ``implicit_hooks/faithfulness/weights/<family>__<task>.{safetensors,json}`` with its accuracy on
the fixed held-out set (seed 10_000, 512 samples).
"""

from __future__ import annotations

import argparse
import time

import torch

from implicit_hooks.faithfulness import models, tasks

TASK_OPTIONS = {
    "markers": dict(length=32, n_markers=3),
    "recall": dict(pairs=4),
    "patches": dict(grid=(6, 6)),
}
HELD_OUT_SEED, HELD_OUT_N = 10_000, 512


def held_out(task: str) -> tasks.Batch:
    return tasks.TASKS[task](HELD_OUT_N, seed=HELD_OUT_SEED, **TASK_OPTIONS[task])


@torch.no_grad()
def accuracy(model, batch: tasks.Batch) -> float:
    logits = model(batch.ids).logits[:, -1]
    return float((logits.argmax(-1) == batch.label).float().mean())


def train(
    family: str, task: str, *, steps: int, batch_size: int, lr: float, target: float, seed: int
) -> dict:
    model = models.build(family, tasks.VOCAB, seed=seed).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    test = held_out(task)
    start, acc, step = time.time(), 0.0, 0
    for step in range(1, steps + 1):
        batch = tasks.TASKS[task](batch_size, seed=seed * 1_000_003 + step, **TASK_OPTIONS[task])
        logits = model(batch.ids, use_cache=False).logits[:, -1]
        loss = torch.nn.functional.cross_entropy(logits, batch.label)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps:
            model.eval()
            acc = accuracy(model, test)
            model.train()
            print(
                f"{family}/{task} step {step} loss {loss.item():.3f} held-out accuracy {acc:.3f}", flush=True
            )
            if acc >= target:
                break
    model.eval()
    info = {
        "task": task,
        "task_options": TASK_OPTIONS[task],
        "steps": step,
        "seed": seed,
        "held_out_seed": HELD_OUT_SEED,
        "held_out_n": HELD_OUT_N,
        "held_out_accuracy": accuracy(model, test),
        "train_seconds": round(time.time() - start, 1),
    }
    models.save(model, family, task, info)
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", nargs="+", default=sorted(models.FAMILIES))
    parser.add_argument("--task", nargs="+", default=sorted(tasks.TASKS))
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--target", type=float, default=0.98)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    for family in args.family:
        for task in args.task:
            info = train(
                family,
                task,
                steps=args.steps,
                batch_size=args.batch_size,
                lr=args.lr,
                target=args.target,
                seed=args.seed,
            )
            print(family, task, info, flush=True)


if __name__ == "__main__":
    main()
