"""A starting model that already knows the first task: supervised training on its classes.

The CPU study in docs/REPRODUCTION.md cannot train an SSL representation far beyond a random
network, so there is little for a later task to make it forget. This script gives a continual run
a representation that is worth keeping, cheaply: a timm model trained with labels (cross-entropy,
SGD, flip + crop) on the training images of the first task's classes only, exported with
``save_pretrained`` for ``--pretrained local-dir:OUT``. Which classes form the first task follows
the protocol (``seed 5, randperm(100).chunk(num_tasks)``, as ``timm_branch.data`` splits them).

    python scripts/supervised_start.py --data runs/cifar100/data/cifar100-100-30-seed0.npz --out runs/sup-start
"""
from __future__ import annotations

import argparse
import time

import timm
import torch
import torch.nn.functional as F

from timm_branch import save_pretrained
from timm_branch.data import NORMALIZATIONS, EvalTransform, build_scenario, load_source
from timm_branch.evaluate import extract_features, knn_predict, per_task_accuracy


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data", required=True, help="CIFAR-100 .npz (the protocol's subset)")
    parser.add_argument("--out", required=True, help="folder for the exported model")
    parser.add_argument("--model", default="test_resnet")
    parser.add_argument("--num-tasks", type=int, default=2, help="the protocol's task count: task 0's classes are trained")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    source = load_source(f"cifar100:{args.data}", 32)
    scenario = build_scenario("class", source, args.num_tasks, 5)
    task = scenario.tasks[0]
    images, labels = source.train.images[task.train], source.train.labels[task.train]
    classes = torch.tensor(sorted(task.classes))
    targets = torch.searchsorted(classes, labels)  # 0..C-1 within the task
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in NORMALIZATIONS["imagenet"])
    model = timm.create_model(args.model, pretrained=False, num_classes=len(classes))
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
    steps = args.epochs * (len(images) // args.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, args.lr, total_steps=steps)
    gen = torch.Generator().manual_seed(args.seed)
    started = time.perf_counter()
    model.train()
    for epoch in range(args.epochs):
        order = torch.randperm(len(images), generator=gen)
        correct = 0
        for s in range(len(images) // args.batch_size):
            rows = order[s * args.batch_size:(s + 1) * args.batch_size]
            x = images[rows].float() / 255
            flip = torch.rand(len(x), generator=gen) < 0.5
            x[flip] = x[flip].flip(-1)
            dx, dy = (int(v) for v in torch.randint(-4, 5, (2,), generator=gen))
            x = torch.roll(F.pad(x, (4, 4, 4, 4)), (dy, dx), (-2, -1))[..., 4:-4, 4:-4]
            logits = model((x - mean) / std)
            loss = F.cross_entropy(logits, targets[rows])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            correct += int((logits.argmax(1) == targets[rows]).sum())
        print(f"epoch {epoch + 1}/{args.epochs}: loss {loss.item():.3f}, train top-1 {correct / (s + 1) / args.batch_size:.3f}",
              flush=True)
    model.reset_classifier(0)
    save_pretrained(model.eval(), args.out)
    print(f"{len(classes)} classes, {len(images)} images, {time.perf_counter() - started:.0f} s -> {args.out}")
    # The start as the continual run evaluates it: kNN (k 20, temperature 0.07) over all classes.
    transform = EvalTransform(32)
    train_f = extract_features(model, source.train.images, transform)
    test_f = extract_features(model, source.test.images, transform)
    predictions = knn_predict(train_f, source.train.labels, test_f, source.num_classes).argmax(1)
    per_task = per_task_accuracy(predictions, source.test.labels, task_classes=[t.classes for t in scenario.tasks])
    print("start kNN top-1 per task (%): " + ", ".join(f"{100 * a:.2f}" for a in per_task))


if __name__ == "__main__":
    main()
