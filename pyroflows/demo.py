"""A short end-to-end example: fit a neural spline flow to a ring of Gaussians.

Run it with ``python -m pyroflows.demo``. It draws data from a 2-D mixture of eight Gaussians on
a circle (whose density is known exactly), fits :class:`pyroflows.NSF` (spline coupling layers
with LU-linear mixing) by maximum likelihood with Adam, and reports the held-out negative
log-likelihood next to the entropy of the true density, so the remaining gap is the KL
divergence KL(p || q).
"""

from __future__ import annotations

import argparse
import math
import time

import pyro.distributions as dist
import torch

from .flows import NSF


def ring_of_gaussians(
    n: int, modes: int = 8, radius: float = 2.0, std: float = 0.2
) -> tuple[torch.Tensor, dist.Distribution]:
    """Samples ``(n, 2)`` from an equal mixture of Gaussians on a circle, and that mixture."""
    angles = torch.arange(modes) * (2 * math.pi / modes)
    centres = radius * torch.stack([angles.cos(), angles.sin()], -1)
    mixture = dist.MixtureSameFamily(
        dist.Categorical(logits=torch.zeros(modes)),
        dist.Normal(centres, std).to_event(1),
    )
    return mixture.sample((n,)), mixture


def main(argv: list[str] | None = None) -> float:
    """Run the demo; returns the final KL(p || q) estimate in nats."""
    parser = argparse.ArgumentParser(prog="python -m pyroflows.demo", description=__doc__)
    parser.add_argument("--steps", type=int, default=1500, help="Adam steps (default 1500)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    train, truth = ring_of_gaussians(20_000)
    test, _ = ring_of_gaussians(5_000)
    entropy = -truth.log_prob(test).mean().item()

    flow = NSF(dim=2, layers=4, hidden=(64, 64))

    def nll(x: torch.Tensor) -> torch.Tensor:
        # Call the flow for a fresh distribution each time: nothing cached outlives a step.
        return -flow().log_prob(x).mean()

    with torch.no_grad():
        nll(train[:2048])  # the ActNorm layers initialise from a first, large batch of data
    optimizer = torch.optim.Adam(flow.parameters(), lr=args.lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, args.steps)
    print(f"pyroflows demo: NSF on a ring of 8 Gaussians, true entropy {entropy:.3f} nats")
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        batch = train[torch.randint(len(train), (args.batch_size,))]
        loss = nll(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        if step % max(args.steps // 5, 1) == 0 or step == args.steps:
            with torch.no_grad():
                test_nll = nll(test).item()
            print(
                f"step {step:5d}  train NLL {loss.item():.3f}  test NLL {test_nll:.3f}  "
                f"KL(p||q) {test_nll - entropy:.3f}  ({time.perf_counter() - start:.1f}s)"
            )
    with torch.no_grad():
        kl = nll(test).item() - entropy
        samples = flow().sample((2_000,))
    radius = samples.norm(dim=-1)
    print(
        f"done: KL(p||q) = {kl:.3f} nats; samples have mean radius {radius.mean():.2f} "
        f"(true 2.00) and std {radius.std():.2f}"
    )
    return kl


if __name__ == "__main__":
    main()
