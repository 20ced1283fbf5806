"""Procedural identities: body shape and per-face albedo (skin, hair, face marks, clothes with patterns).

An identity is fixed by its index alone (``make_identity(i)``), so the list is the same for every data seed:
indices ``0..num_train-1`` are training people, the next ``num_val`` are held out for validation. Colours are
painted per face on the rest (T-pose) template, so patterns stick to the body as it moves:

- head: skin; hair on the top and back (short / long / bald); two dark eye dots and a mouth on the +z side;
- torso: shirt in one of solid / horizontal stripes / vertical stripes / checks, trousers below the belt line;
- arms: sleeves (short or long) in the shirt colour, skin below; hands skin;
- legs: trousers or shorts; feet: shoes. A little per-face value noise gives the cloth some texture.
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass

import numpy as np

from isa4d.body.smpl import PART_NAMES, load_model_data, part_ids

P = {n: i for i, n in enumerate(PART_NAMES)}
PATTERNS = ("solid", "hstripes", "vstripes", "checks")
HAIR_STYLES = ("short", "long", "bald")
IDENTITY_SEED = 20240611  # identities never depend on the data seed
GOLDEN = 0.6180339887498949

SKIN_TONES = np.array([
    [255, 224, 196], [241, 194, 160], [224, 172, 130], [198, 134, 96], [170, 110, 72],
    [141, 85, 54], [110, 66, 42], [84, 50, 32],
]) / 255.0
HAIR_COLOURS = np.array([
    [20, 16, 14], [60, 38, 24], [110, 70, 40], [200, 160, 90], [150, 60, 25], [170, 170, 170],
    [230, 230, 220], [40, 60, 160], [180, 40, 120],
]) / 255.0
PANTS_COLOURS = np.array([
    [40, 60, 110], [25, 25, 30], [190, 170, 120], [110, 110, 115], [80, 90, 50], [110, 30, 40],
    [230, 230, 225], [60, 40, 30],
]) / 255.0


@dataclass(frozen=True)
class Identity:
    index: int
    betas: np.ndarray  # (10,)
    skin: np.ndarray  # (3,) albedo in [0, 1]
    hair: np.ndarray
    shirt: np.ndarray
    shirt2: np.ndarray  # second colour of the pattern
    pants: np.ndarray
    shoes: np.ndarray
    pattern: str
    stripe_width: float  # metres
    hair_style: str
    long_sleeves: bool
    long_pants: bool


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v))


def make_identity(index: int) -> Identity:
    """The identity with this index (deterministic, independent of any data seed)."""
    rng = np.random.default_rng([IDENTITY_SEED, index])
    betas = np.zeros(10)
    betas[:5] = np.clip(rng.normal(0.0, 1.0, 5), -2.0, 2.0)
    hue = (index * GOLDEN + rng.uniform(-0.05, 0.05)) % 1.0  # consecutive identities get far-apart hues
    shirt = _hsv(hue, rng.uniform(0.55, 0.95), rng.uniform(0.5, 0.95))
    shirt2 = _hsv(hue + rng.uniform(0.25, 0.75), rng.uniform(0.0, 0.8), rng.uniform(0.2, 1.0))
    shoes = _hsv(rng.uniform(), rng.uniform(0, 0.8), rng.choice([0.15, 0.5, 0.9]))
    return Identity(
        index=index, betas=betas, skin=SKIN_TONES[(3 * index + rng.integers(2)) % len(SKIN_TONES)],
        hair=HAIR_COLOURS[rng.integers(len(HAIR_COLOURS))], shirt=shirt, shirt2=shirt2,
        pants=PANTS_COLOURS[(3 * index + rng.integers(2)) % len(PANTS_COLOURS)], shoes=shoes,
        pattern=str(rng.choice(PATTERNS)), stripe_width=float(rng.uniform(0.04, 0.08)),
        hair_style=str(rng.choice(HAIR_STYLES, p=[0.5, 0.35, 0.15])), long_sleeves=bool(rng.uniform() < 0.5),
        long_pants=bool(rng.uniform() < 0.7),
    )


def identity_split(num_train: int, num_val: int) -> dict[str, list[int]]:
    """Identity indices per split: training people first, then the held-out ones."""
    return {"train": list(range(num_train)), "val": list(range(num_train, num_train + num_val))}


class BodyPainter:
    """Per-face albedo of the rest template for any identity; built once per process from the body files."""

    def __init__(self, body_dir, gender: str = "neutral"):
        data = load_model_data(body_dir, gender)
        v = np.asarray(data["v_template"], dtype=np.float64)
        self.faces = np.asarray(data["f"], dtype=np.int64)
        self.face_part = part_ids(body_dir, gender)[self.faces[:, 0]]  # the renderer's rule: first vertex
        self.centroid = v[self.faces].mean(1)  # (F, 3)
        self._regions(v, part_ids(body_dir, gender))

    def _regions(self, v: np.ndarray, vpart: np.ndarray) -> None:
        """Boolean face masks of the head's hair, eyes and mouth, the belt line, sleeve and shorts cut-offs."""
        c, fp = self.centroid, self.face_part
        head_v = v[vpart == P["head"]]
        top, front = head_v[:, 1].max(), head_v[:, 2].max()
        centre_z = 0.5 * (head_v[:, 2].max() + head_v[:, 2].min())
        head = fp == P["head"]
        self.hair = {
            "short": head & ((c[:, 1] > top - 0.06) | ((c[:, 2] < centre_z - 0.02) & (c[:, 1] > top - 0.14))),
            "long": head & ((c[:, 1] > top - 0.05) | ((c[:, 2] < centre_z + 0.01) & (c[:, 1] > top - 0.24))),
            "bald": np.zeros(len(c), bool),
        }
        eyes = np.array([[x, top - 0.085, front] for x in (0.034, -0.034)])
        dist = np.linalg.norm(c[:, None, :2] - eyes[None, :, :2], axis=-1).min(1)
        self.eyes = head & (dist < 0.017) & (c[:, 2] > centre_z + 0.04)
        mouth = np.array([0.0, top - 0.16])
        near_mouth = (np.abs(c[:, 0] - mouth[0]) < 0.026) & (np.abs(c[:, 1] - mouth[1]) < 0.011)
        self.mouth = head & near_mouth & (c[:, 2] > centre_z + 0.04)
        torso_v = v[vpart == P["torso"]]
        self.belt_y = torso_v[:, 1].min() + 0.17
        self.torso_r = 0.5 * (torso_v[:, 0].max() - torso_v[:, 0].min())

    def face_colors(self, ident: Identity) -> np.ndarray:
        """(F, 3) float32 albedo in [0, 1]."""
        c, fp = self.centroid, self.face_part
        col = np.tile(ident.skin, (len(c), 1))
        torso = fp == P["torso"]
        # shirt pattern on the torso, in rest-pose coordinates
        w = ident.stripe_width
        band_y = np.floor(c[:, 1] / w).astype(int) % 2 == 1
        band_a = np.floor(np.arctan2(c[:, 0], c[:, 2]) * self.torso_r / w).astype(int) % 2 == 1
        second = {"solid": np.zeros(len(c), bool), "hstripes": band_y, "vstripes": band_a,
                  "checks": band_y ^ band_a}[ident.pattern]
        col[torso] = np.where(second[torso, None], ident.shirt2, ident.shirt)
        col[torso & (c[:, 1] < self.belt_y)] = ident.pants
        for side in ("left", "right"):
            upper, lower = fp == P[f"{side}_upper_arm"], fp == P[f"{side}_lower_arm"]
            sleeve = upper if ident.long_sleeves else upper & (np.abs(c[:, 0]) < 0.32)
            col[sleeve | (lower if ident.long_sleeves else False)] = ident.shirt
            col[fp == P[f"{side}_upper_leg"]] = ident.pants
            shorts = (fp == P[f"{side}_upper_leg"]) & (c[:, 1] < -0.55) & (not ident.long_pants)
            col[shorts] = ident.skin
            if ident.long_pants:
                col[fp == P[f"{side}_lower_leg"]] = ident.pants
            col[fp == P[f"{side}_foot"]] = ident.shoes
        col[self.hair[ident.hair_style]] = ident.hair
        col[self.eyes] = (0.05, 0.05, 0.08)
        col[self.mouth] = (0.55, 0.12, 0.14)
        noise = np.random.default_rng([IDENTITY_SEED, ident.index, 1]).uniform(0.93, 1.0, (len(c), 1))
        return np.clip(col * noise, 0.0, 1.0).astype(np.float32)
