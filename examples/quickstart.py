"""Branch-tune a timm CNN in your own training loop, merge, export, and reload it with plain timm.

    python examples/quickstart.py            # resnet18, 30 steps at 64 px (about a minute on CPU)
    python examples/quickstart.py --smoke    # a few seconds

The data here are synthetic images (random smooth colour fields) and the objective is a simple
two-view invariance loss, so the example runs anywhere without downloads; put your own images
and SSL loss in their place.
"""
from __future__ import annotations

import argparse

import timm
import torch
import torch.nn.functional as F

import timm_branch


def synthetic_images(batch: int, size: int, gen: torch.Generator) -> torch.Tensor:
    """Random smooth RGB images in [0, 1], shape (batch, 3, size, size)."""
    coarse = torch.rand(batch, 3, 4, 4, generator=gen)
    return F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)


def augment(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A light view: random horizontal flip, brightness jitter and pixel noise."""
    flip = torch.rand(images.shape[0], generator=gen) < 0.5
    views = torch.where(flip[:, None, None, None], images.flip(-1), images)
    brightness = 1 + 0.4 * (torch.rand(images.shape[0], 1, 1, 1, generator=gen) - 0.5)
    return (views * brightness + 0.05 * torch.randn(views.shape, generator=gen)).clamp(0, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18", help="any timm CNN with BatchNorm")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--img-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--shape", default="cross", choices=timm_branch.BRANCH_SHAPES)
    parser.add_argument("--out", default="out/quickstart", help="export folder")
    parser.add_argument("--smoke", action="store_true", help="tiny run for tests")
    args = parser.parse_args()
    if args.smoke:
        args.steps, args.img_size, args.batch_size = 2, 32, 4

    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False, num_classes=0)  # pooled features out

    # 1. Branches on every conv that feeds a BatchNorm; kernels and BatchNorms are frozen.
    timm_branch.add_branches(model, shape=args.shape)
    optimizer = torch.optim.SGD(timm_branch.branch_parameters(model), lr=0.05, momentum=0.9)

    # 2. Train with any loop and loss; here a two-view invariance objective.
    model.train()
    for step in range(args.steps):
        images = synthetic_images(args.batch_size, args.img_size, gen)
        z1, z2 = model(augment(images, gen)), model(augment(images, gen))
        loss = 2 - 2 * F.cosine_similarity(z1, z2, dim=-1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        print(f"step {step + 1}/{args.steps}  loss {loss.item():.4f}")

    # 3. Fold the branches into the kernels: a stock timm model again.
    timm_branch.merge_branches(model)
    model.eval()

    # 4. Export and reload with plain timm.
    out = timm_branch.save_pretrained(model, args.out)
    reloaded = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    probe = synthetic_images(2, args.img_size, gen)
    with torch.no_grad():
        err = (reloaded(probe) - model(probe)).abs().max().item()
    assert err <= 1e-5, f"reloaded model differs by {err}"
    print(f"exported to {out}; plain timm reproduces it (max abs diff {err:.1e})")
    print(f'timm.create_model("local-dir:{out}", pretrained=True)')


if __name__ == "__main__":
    main()
