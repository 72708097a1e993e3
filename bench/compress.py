"""Deep Compression of LeNet-300-100 on real MNIST digits: compression ratio and accuracy.

Usage: ``python bench/compress.py [--seeds 0 1 2] [--root DIR] [--out DIR]``. For each seed it runs
the pipeline preset ``experiment=deep_compression_lenet300_100`` (dense → pruned 92% →
weight-shared at 6 bits, every stage encoded by :mod:`kdexp.compress`) under ``nice -n 10`` on
``../shared/data/mnist5k`` (4,000 training images, 500 of them held out for validation; 1,000
test images), reads each stage's test accuracy and
compressed size back from the pipeline's summary, and prints mean ± std over the seeds of the
compression ratio (dense fp32 bytes / compressed bytes) and of the accuracy against the dense stage.
It also stores the final model with each entropy coder forced, to show what each one buys.

Goal: at least 30x at no more than 0.3 points below dense. Published (Han, Mao & Dally 2016, full
MNIST, 60,000 training images): 40x, top-1 error 1.64% → 1.58%.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import subprocess
import sys
from pathlib import Path

import torch

from kdexp.checkpoint import read_state_dict
from kdexp.compress import compressed_size, layout_report

ROOT = Path(__file__).resolve().parents[1]
PUBLISHED = {"ratio": 40.0, "error_dense": 1.64, "error_compressed": 1.58}
GOAL = {"ratio": 30.0, "drop": 0.3}


def _data_root() -> Path:
    for candidate in (ROOT.parent / "shared/data/mnist5k", ROOT.parents[1] / "shared/data/mnist5k",
                      Path("/work/shared/data/mnist5k")):  # fmt: skip
        if candidate.is_dir():
            return candidate
    sys.exit("bench/compress.py: no mnist5k folder (../shared/data/mnist5k); give --root")


def _run(seed: int, root: Path, out: Path) -> dict[str, dict[str, str]]:
    """Run (or reuse) the pipeline for ``seed``; its summary rows by stage."""
    folder = out / f"seed{seed}"
    command = ["nice", "-n", "10", sys.executable, "-m", "kdexp",
               "experiment=deep_compression_lenet300_100", f"dataset.root={root}", f"seed={seed}",
               "dataset.val_size=500",  # of mnist5k's 4,000 training images (the preset: 5,000)
               f"tracking.uri=sqlite:///{out.resolve() / 'mlflow.db'}",
               f"hydra.run.dir={folder.resolve()}"]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"seed {seed} failed:\n{done.stderr[-3000:]}")
    with (folder / "pipeline_summary.csv").open() as handle:
        return {row["stage"]: row for row in csv.DictReader(handle)}


def _mean_std(values: list[float]) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.2f} ± {spread:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--root", type=Path, default=None, help="the mnist5k folder")
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench_compress")
    args = parser.parse_args()
    root = args.root or _data_root()
    print(f"torch {torch.__version__}, data {root}, seeds {args.seeds}")
    rows = []
    for seed in args.seeds:
        stages = _run(seed, root, args.out)
        dense, final = stages["dense"], stages["shared"]
        rows.append(
            {
                "seed": seed,
                "dense_acc": float(dense["test/acc1"]),
                "pruned_acc": float(stages["pruned"]["test/acc1"]),
                "acc": float(final["test/acc1"]),
                "dense_bytes": float(dense["compressed (bytes)"]),
                "pruned_ratio": float(stages["pruned"]["compression ratio"]),
                "bytes": float(final["compressed (bytes)"]),
                "ratio": float(final["compression ratio"]),
                "sparsity": float(final["sparsity"]),
            }
        )
        r = rows[-1]
        print(
            f"seed {seed}: dense {r['dense_acc']:.2f}%  pruned {r['pruned_acc']:.2f}% "
            f"({r['pruned_ratio']:.1f}x)  shared {r['acc']:.2f}% ({r['ratio']:.1f}x, "
            f"{r['bytes']:.0f} B, sparsity {r['sparsity']:.4f})"
        )
    drops = [r["acc"] - r["dense_acc"] for r in rows]
    ratios = [r["ratio"] for r in rows]
    print("\nLeNet-300-100, mnist5k, mean ± std over seeds")
    print(f"  dense test/acc1        {_mean_std([r['dense_acc'] for r in rows])} %")
    print(f"  pruned test/acc1       {_mean_std([r['pruned_acc'] for r in rows])} %  "
          f"({_mean_std([r['pruned_ratio'] for r in rows])}x)")  # fmt: skip
    print(f"  compressed test/acc1   {_mean_std([r['acc'] for r in rows])} %")
    print(f"  accuracy vs dense      {_mean_std(drops)} points  (goal >= -{GOAL['drop']})")
    print(f"  compression ratio      {_mean_std(ratios)} x  (goal >= {GOAL['ratio']:.0f}x)")
    print(f"  compressed bytes       {_mean_std([r['bytes'] for r in rows])}")
    print(
        f"  published (full MNIST): {PUBLISHED['ratio']:.0f}x, top-1 error "
        f"{PUBLISHED['error_dense']}% -> {PUBLISHED['error_compressed']}% "
        f"({PUBLISHED['error_dense'] - PUBLISHED['error_compressed']:+.2f} points)"
    )
    met = statistics.fmean(ratios) >= GOAL["ratio"] and statistics.fmean(drops) >= -GOAL["drop"]
    print(f"  goal {'met' if met else 'NOT met'}")

    # What each entropy coder gives on the first seed's final model.
    final_pt = args.out / f"seed{args.seeds[0]}" / "shared" / "checkpoints" / "final.pt"
    state = read_state_dict(final_pt, "final", quantized=True)
    dense_bytes = 4 * sum(v.numel() for k, v in state.items() if k.endswith(("indices", "bias")))
    print(f"\ncoders on seed {args.seeds[0]}'s final model (dense fp32: {dense_bytes} B):")
    for codec in ("raw", "huffman", "zlib", "lzma", None):
        size = compressed_size(state, codec)
        print(f"  {codec or 'best per stream':16} {size:8d} B  {dense_bytes / size:5.1f}x")
    total, report = layout_report(state)
    print("  per tensor (best per stream):")
    for row in report:
        print(
            f"    {row['entry']:18} {row['numel']:7d} {row['layout']:8} "
            f"index {row['index_bits'] or '-'!s:>2} bits, value {row['value_bits']:2d} bits: "
            f"{row['position_bytes']:6d} + {row['value_bytes']:6d} B  {'/'.join(row['coders'])}"
        )
    print(f"  file {total} B")


if __name__ == "__main__":
    main()
