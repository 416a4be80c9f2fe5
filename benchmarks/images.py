"""Image flows on real digits: test bits/dim of Glow and multi-scale RealNVP, and sample grids.

    python benchmarks/images.py [--data digits|mnist|both] [--minutes 5] [--threads 2]
                                [--device cpu] [--size small|large] [--batch-size 64]
                                [--warmup 0]
                                [--out benchmarks/results]

* ``digits``: scikit-learn's 1,797 8x8 digits (values 0..16), put on the 8-bit scale
  (``round(v * 255 / 16)``: 17 distinct levels) and split 1,500 / 297; a fast configuration.
* ``mnist``: MNIST 28x28 (8-bit) from ``../shared/data/mnist/mnist.npz`` (see its README), the
  standard 60,000 / 10,000 split, 1,000 training images held out for validation.

Each model is trained with ``pf.fit`` on uniformly dequantised images (``dequantize=8``: fresh
noise every batch), batch 64 (``--batch-size``), Adam 1e-3 with cosine decay, for a wall-clock
budget (the step count that fits the budget is measured on the first steps); the best validation
state is kept. Test bits/dim are computed the literature's way on the original 8-bit scale
(:func:`pyroflows.images.bits_per_dim`, ± the standard error over test images). Samples are written
as PNG grids when matplotlib is installed. For orientation on MNIST: MAF 1.89, RealNVP and Glow
about 1.0-1.1 bits/dim with large models trained for days on GPUs; a CPU budget of minutes gets
much less far, but the figure is computed the same way.

``--size large`` trains the GPU configuration (Glow L=2, K=16, 256 channels; RealNVP with 64
channels and 4 residual blocks per coupling), e.g.
``python benchmarks/images.py --data mnist --size large --device cuda --batch-size 128
--warmup 500`` (``pf.fit(warmup=...)``: at the full rate from the first step, a 256-channel
Glow diverges).
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

import pyroflows as pf
from pyroflows.images import bits_per_dim

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def load(name: str, data_dir: Path) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int, int]]:
    """(train, test) uint8 images of shape (N, 1, H, W)."""
    if name == "digits":
        values = pf.datasets.digits()  # (1797, 64), values 0..16
        images = torch.round(values * 255 / 16).to(torch.uint8).view(-1, 1, 8, 8)
        generator = torch.Generator().manual_seed(0)
        order = torch.randperm(len(images), generator=generator)
        return images[order[:1500]], images[order[1500:]], (1, 8, 8)
    train, _ = pf.datasets.mnist("train", data_dir=data_dir, download=False)
    test, _ = pf.datasets.mnist("test", data_dir=data_dir, download=False)
    return train.unsqueeze(1), test.unsqueeze(1), (1, 28, 28)


def models(name: str, shape: tuple[int, int, int], size: str = "small") -> dict[str, pf.Flow]:
    if size == "large":  # the GPU configuration: wider, deeper conditioners
        return {
            "Glow (L=2, K=16, 256 ch)": pf.Glow(shape, levels=2, steps=16, channels=256),
            "RealNVP (2 scales, 64 ch, 4 blocks)": pf.ImageRealNVP(
                shape, scales=2, channels=64, blocks=4
            ),
        }
    if name == "digits":
        return {
            "Glow (L=2, K=4, 32 ch)": pf.Glow(shape, levels=2, steps=4, channels=32),
            "RealNVP (2 scales, 32 ch)": pf.ImageRealNVP(shape, scales=2, channels=32, blocks=2),
        }
    return {
        "Glow (L=2, K=4, 64 ch)": pf.Glow(shape, levels=2, steps=4, channels=64),
        "RealNVP (2 scales, 32 ch)": pf.ImageRealNVP(shape, scales=2, channels=32, blocks=1),
    }


def save_grid(samples: torch.Tensor, path: Path, title: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    n = samples.shape[0]
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(cols, rows))
    for ax, image in zip(axes.flat, samples, strict=False):
        ax.imshow(image[0].clamp(0, 1).cpu().numpy(), cmap="gray", vmin=0, vmax=1)
    for ax in axes.flat:
        ax.axis("off")
    fig.suptitle(title, fontsize=8)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return True


def run(name: str, args) -> None:
    train, test, shape = load(name, Path(args.data_dir))
    if name == "mnist":
        # 1,000 validation images: each validation pass costs training time on a CPU budget.
        valid, train = train[:1000], train[1000:]
    else:
        valid, train = train[:150], train[150:]
    test = test[: args.test_images]
    print(f"\n{name}: train {len(train)}, valid {len(valid)}, test {len(test)}, shape {shape}")
    print(f"{'model':<36}{'params':>10}{'steps':>8}{'minutes':>9}{'test bits/dim':>20}")
    wanted = args.models.split(",")
    for label, flow in models(name, shape, args.size).items():
        if label.split()[0].lower() not in wanted:
            continue
        torch.manual_seed(args.seed)
        flow = flow.to(args.device)
        params = sum(p.numel() for p in flow.parameters())
        # Measure the speed of some steps (after ActNorm's initialisation), then spend the budget.
        fit_kw = {
            "batch_size": args.batch_size,
            "dequantize": 8,
            "device": args.device,
            "progress": False,
            "warmup": args.warmup,
        }
        # Two timed runs, so that each fit's fixed cost (data checks, ActNorm's initialisation
        # pass over 4,096 images) cancels out.
        pf.fit(flow, train, steps=2, valid=None, seed=args.seed, **fit_kw)
        seconds = []
        for n in (10, 30):
            start = time.perf_counter()
            pf.fit(flow, train, steps=n, valid=None, seed=args.seed, scheduler=None, **fit_kw)
            seconds.append(time.perf_counter() - start)
        per_step = max(seconds[1] - seconds[0], 1e-3) / 20
        steps = max(10, int(args.minutes * 60 / per_step * 0.85))
        start = time.perf_counter()
        history = pf.fit(
            flow,
            train,
            steps=steps,
            valid=valid,
            seed=args.seed,
            eval_every=max(1, steps // 5),
            compile=args.compile,
            **fit_kw,
        )
        minutes = (time.perf_counter() - start) / 60
        generator = torch.Generator().manual_seed(args.seed)
        bpd, se = bits_per_dim(flow, test, generator=generator, return_se=True)
        print(f"{label:<36}{params:>10,}{history.steps:>8}{minutes:>9.1f}{bpd:>14.3f} ± {se:.3f}")
        # The flow keeps its best validation state: say which, since a validation mean that one
        # outlying image throws off would keep an early state.
        valid_bpd = [round(v / (math.prod(shape) * math.log(2)) + 8, 3) for v in history.valid_nll]
        print(f"{'':<36}kept step {history.best_step}; validation bits/dim {valid_bpd}")
        with torch.no_grad():
            samples = flow().sample((36,))
        tag = label.split()[0].lower() + ("_large" if args.size == "large" else "")
        path = Path(args.out) / f"{name}_{tag}_samples.png"
        if save_grid(samples, path, f"{label}: {bpd:.2f} bits/dim"):
            print(f"{'':<36}samples: {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", choices=("digits", "mnist", "both"), default="both")
    parser.add_argument("--minutes", type=float, default=5.0, help="training budget per model")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--compile", action="store_true", help="pf.fit(compile=True)")
    parser.add_argument(
        "--size", choices=("small", "large"), default="small", help="large: the GPU models"
    )
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=0, help="steps of linear lr warmup")
    parser.add_argument("--test-images", type=int, default=10000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--models", default="glow,realnvp", help="comma-separated subset")
    parser.add_argument("--data-dir", default=str(SHARED), help="folder holding mnist/mnist.npz")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    print(
        f"torch {torch.__version__}, pyroflows {pf.__version__}, device {args.device}, "
        f"threads {torch.get_num_threads()}, budget {args.minutes} min per model, "
        f"{args.size} models, batch {args.batch_size}, warmup {args.warmup}"
    )
    for name in ("digits", "mnist") if args.data == "both" else (args.data,):
        run(name, args)


if __name__ == "__main__":
    main()
