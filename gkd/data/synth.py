"""A procedural mini domain-generalization benchmark: street-like scenes in several appearance domains.

Everything is generated at run time from a seed (nothing is downloaded or shipped), with NumPy
only, vectorised over pixels (about a millisecond per 128×128 scene).

**Label space** (6 classes, Cityscapes-like display colours in ``PALETTE``):
``sky``, ``building``, ``tree``, ``road``, ``grass``, ``car``.

**Layout** (``sample_layout``), drawn the same way in every domain: a horizon at 36–52 % of the
height; sky above, grass below; a road as a perspective trapezoid running from a vanishing point
on the horizon to the bottom edge (with a dashed centre line and edge lines, which are *road*);
2–6 building blocks standing on the horizon (with window grids); 1–5 round trees (crown + trunk)
on the grass and 0–4 car-like boxes (body, cabin, wheels, lights) on the road, sized by their
distance and drawn far to near. Each object also gets a depth (used by fog) and random numbers
(tints, car colours, lit windows).

**Domains** (``DOMAINS``; ``render`` turns a layout into an image with a domain's ``Style``):

* ``source`` — clear day: the reference palette, clouds, mild sensor noise. Labelled (train/val).
* ``night`` — dark, blue cast, strong sensor noise, unlit sky, lit windows and car lights.
* ``fog`` — depth-dependent grey haze (objects fade with distance), low contrast, drizzle speckle.
* ``palette`` — palette swap: every class and part gets an unrelated colour (orange sky, blue
  grass, teal buildings, ...); shapes and textures unchanged.
* ``pool`` — the unlabelled stage-1 pool: each image has its own random style (random class
  colours half of the time, random brightness, colour cast, haze, noise) — a diverse,
  task-agnostic image collection in the part ImageNet plays in the paper. It does not contain
  the target presets themselves, but its random styles overlap with dark and hazy looks, as
  ImageNet holds night and fog photos.

Targets keep the layout statistics (same sampler, other random draws) and change appearance only.
Every image is a pure function of (seed, domain, split, index): ``scene(seed, domain, split, i)``.

``write_benchmark`` writes the labelled splits in the ``folder`` manifest layout
(``images/<split>/<stem>.png`` + ``labels/<split>/<stem>.png``), the manifest YAML, a suite YAML
over the targets (+ one over the source validation split) and the pool as flat PNGs.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator

import numpy as np

CLASSES = ("sky", "building", "tree", "road", "grass", "car")
SKY, BUILDING, TREE, ROAD, GRASS, CAR = range(len(CLASSES))
PALETTE = ((70, 130, 180), (70, 70, 70), (107, 142, 35), (128, 64, 128), (152, 251, 152), (0, 0, 142))
IGNORE_INDEX = 255

# Appearance-only parts of objects (the label stays the object's class).
NONE, WINDOW, TRUNK, MARKING, GLASS, WHEEL, LIGHT = range(7)

MANIFEST_NAME = "gkd_demo"
SOURCE = "source"
TARGETS = ("night", "fog", "palette")  # the shifted domains, in report order
DOMAINS = (SOURCE, *TARGETS, "pool")
DOMAIN_TITLES = {"source": "Source (clear day)", "night": "Night", "fog": "Fog", "palette": "Palette swap",
                 "pool": "Pool (random styles)"}
_DOMAIN_IDS = {name: i for i, name in enumerate(DOMAINS)}
_SPLIT_IDS = {"train": 0, "val": 1, "test": 2, "pool": 3}


# ----------------------------------------------------------------------------------------------
# layout


@dataclass
class Layout:
    """One scene's geometry. All maps are [H, W]."""

    label: np.ndarray  # uint8 class ids
    obj: np.ndarray  # int32 object index into obj_class / obj_rand / obj_depth
    part: np.ndarray  # uint8 appearance part (NONE, WINDOW, ...)
    cell: np.ndarray  # float32 per-window random number in [0, 1) (lit windows), 0 elsewhere
    obj_class: np.ndarray  # [K] class of each object
    obj_rand: np.ndarray  # [K, 3] uniform random numbers per object (tints, colours)
    obj_depth: np.ndarray  # [K] 0 near … 1 far (objects); ground uses depth_map
    depth: np.ndarray  # float32 [H, W] distance proxy per pixel, 0 near … 1 far
    horizon: float


def _uniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(rng.uniform(lo, hi))


def sample_layout(rng: np.random.Generator, size: int = 128) -> Layout:
    """Draw a street-like scene's geometry (see the module docstring).

    Objects are rasterised inside their bounding boxes only, so a scene costs about a millisecond.
    """
    S = size
    yy, xx = np.mgrid[0:S, 0:S].astype(np.float32) + 0.5
    h0 = S * _uniform(rng, 0.36, 0.52)
    below = yy >= h0
    t = np.clip((yy - h0) / (S - h0), 0.0, 1.0)  # 0 at the horizon, 1 at the bottom edge

    label = np.where(below, GRASS, SKY).astype(np.uint8)
    obj = below.astype(np.int32)  # object 0: sky, 1: grass
    part = np.zeros((S, S), np.uint8)
    cell = np.zeros((S, S), np.float32)
    depth = np.where(below, 1.0 - t, 1.0).astype(np.float32)
    classes, rands, depths = [SKY, GRASS], [rng.random(3), rng.random(3)], [1.0, 0.5]

    def window(y0: float, y1: float, x0: float, x1: float) -> tuple[slice, slice] | None:
        """Pixel slices covering [y0, y1) × [x0, x1), clipped to the image; None when empty."""
        r0, r1 = max(0, int(np.floor(y0))), min(S, int(np.ceil(y1)))
        c0, c1 = max(0, int(np.floor(x0))), min(S, int(np.ceil(x1)))
        return (slice(r0, r1), slice(c0, c1)) if r0 < r1 and c0 < c1 else None

    def add(cls: int, win: tuple[slice, slice], mask: np.ndarray, obj_depth: float) -> int:
        k = len(classes)
        classes.append(cls)
        rands.append(rng.random(3))
        depths.append(obj_depth)
        label[win][mask] = cls
        obj[win][mask] = k
        part[win][mask] = NONE
        cell[win][mask] = 0.0
        depth[win][mask] = obj_depth
        return k

    # road: a perspective trapezoid from the vanishing point (vx, h0) to the bottom edge
    vx, bx = S * _uniform(rng, 0.35, 0.65), S * _uniform(rng, 0.3, 0.7)
    half = S * _uniform(rng, 0.22, 0.42)
    centre = vx + (bx - vx) * t
    dist = np.abs(xx - centre)
    road = below & (dist < half * t + 0.5)
    full = (slice(0, S), slice(0, S))
    add(ROAD, full, road, 0.5)
    depth[road] = 1.0 - t[road]
    # dashed centre line and solid edge lines (appearance only: still road)
    z = 1.0 / (t + 0.08)  # ~distance along the road
    dashes = np.mod(z * 0.9 + rng.random(), 1.0) < 0.5
    line_w = np.maximum(0.6, 0.045 * half * t)
    part[road & (dist < line_w) & dashes] = MARKING
    part[road & (dist > half * t - 1.6 * line_w) & (dist < half * t - 0.6 * line_w)] = MARKING

    def road_at(y: float) -> tuple[float, float]:
        tb = min(max((y - h0) / (S - h0), 0.0), 1.0)
        return vx + (bx - vx) * tb, half * tb

    # buildings on the horizon, with window grids
    for _ in range(int(rng.integers(2, 7))):
        w = S * _uniform(rng, 0.08, 0.28)
        x0 = _uniform(rng, -0.1 * S, S)
        top = h0 - S * _uniform(rng, 0.08, 0.38)
        bottom = h0 + S * _uniform(rng, 0.0, 0.03)
        sx, sy = _uniform(rng, 4.0, 8.0), _uniform(rng, 5.0, 9.0)
        win = window(top, bottom, x0, x0 + w)
        if win is None:
            continue
        Y, X = yy[win], xx[win]
        box = (X >= x0) & (X < x0 + w) & (Y >= top) & (Y < bottom)
        if not box.any():
            continue
        k = add(BUILDING, win, box, 0.95)
        fx, fy = (X - x0) / sx, (Y - top) / sy
        mx, my = fx - np.floor(fx), fy - np.floor(fy)
        inner = box & (X > x0 + 1.5) & (X < x0 + w - 1.5) & (Y > top + 1.5) & (Y < bottom - 2.0)
        glass = inner & (mx > 0.3) & (mx < 0.75) & (my > 0.3) & (my < 0.7)
        part[win][glass] = WINDOW
        hashed = np.sin(np.floor(fx) * 12.9898 + np.floor(fy) * 78.233 + k * 3.17) * 43758.5453
        cell[win][glass] = (hashed - np.floor(hashed))[glass]

    # trees (on the grass) and cars (on the road), drawn far to near
    things: list[tuple[float, int]] = []
    for _ in range(int(rng.integers(1, 6))):
        things.append((h0 + (S - h0) * _uniform(rng, 0.0, 0.45), TREE))
    for _ in range(int(rng.integers(0, 5))):
        things.append((h0 + (S - h0) * _uniform(rng, 0.15, 1.0), CAR))
    things.sort(key=lambda item: item[0])
    for yb, cls in things:
        tb = (yb - h0) / (S - h0)
        c, hw = road_at(yb)
        if cls == TREE:
            r = S * _uniform(rng, 0.05, 0.10) * (0.6 + tb)
            for _ in range(6):  # keep trees off the road
                xc = _uniform(rng, 0.0, S)
                if abs(xc - c) > hw + 0.4 * r:
                    break
            else:
                continue
            cy, phase = yb - 1.6 * r, rng.random() * 6.283
            win = window(cy - 1.4 * r, yb, xc - 1.2 * r, xc + 1.2 * r)
            if win is None:
                continue
            Y, X = yy[win], xx[win]
            bumps = 1.0 + 0.12 * np.sin(5.0 * np.arctan2(Y - cy, X - xc) + phase)
            crown = ((X - xc) / r) ** 2 + ((Y - cy) / (1.1 * r)) ** 2 < bumps ** 2
            trunk = (np.abs(X - xc) < max(0.8, 0.15 * r)) & (Y >= cy) & (Y < yb)
            if not (crown | trunk).any():
                continue
            add(TREE, win, crown | trunk, 1.0 - tb)
            part[win][trunk & ~crown] = TRUNK
        else:
            w = S * 0.3 * tb * _uniform(rng, 0.8, 1.2) + 3.0
            x = c + _uniform(rng, -0.75, 0.75) * hw
            win = window(yb - 0.62 * w, yb + 0.02 * w, x - 0.5 * w, x + 0.5 * w)
            if win is None:
                continue
            Y, X = yy[win], xx[win]
            body = (np.abs(X - x) < w / 2) & (Y >= yb - 0.38 * w) & (Y < yb - 0.1 * w)
            cab_top, cab_bot = yb - 0.62 * w, yb - 0.38 * w
            cab_half = 0.34 * w - (cab_bot - Y) * 0.35
            cabin = (np.abs(X - x) < cab_half) & (Y >= cab_top) & (Y < cab_bot)
            wheels = np.zeros_like(body)
            for side in (-1, 1):
                wheels |= (X - (x + side * 0.3 * w)) ** 2 + (Y - (yb - 0.12 * w)) ** 2 < (0.13 * w) ** 2
            if not (body | cabin | wheels).any():
                continue
            add(CAR, win, body | cabin | wheels, 1.0 - tb)
            p = part[win]
            p[cabin & (np.abs(X - x) < cab_half - 0.08 * w) & (Y >= cab_top + 0.06 * w)] = GLASS
            p[wheels & (~body | (Y >= yb - 0.16 * w))] = WHEEL
            p[body & (np.abs(np.abs(X - x) - 0.4 * w) < 0.07 * w) & (np.abs(Y - (yb - 0.28 * w)) < 0.05 * w)] = LIGHT

    return Layout(label=label, obj=obj, part=part, cell=cell, obj_class=np.asarray(classes),
                  obj_rand=np.asarray(rands, np.float32), obj_depth=np.asarray(depths, np.float32), depth=depth,
                  horizon=h0)


# ----------------------------------------------------------------------------------------------
# appearance


def _c(*rgb: int) -> np.ndarray:
    return np.asarray(rgb, np.float32)


@dataclass
class Style:
    """How a domain looks. Colours are RGB on 0..255."""

    classes: np.ndarray  # [6, 3] base colour per class
    car_colours: np.ndarray  # [k, 3]
    window: np.ndarray
    lit_window: np.ndarray
    trunk: np.ndarray
    marking: np.ndarray
    glass: np.ndarray
    wheel: np.ndarray
    light: np.ndarray
    cloud: np.ndarray
    clouds: float = 0.5  # cloud cover 0..1
    texture: float = 1.0  # texture amplitude
    lit: float = 0.0  # fraction of windows lit
    brightness: float = 1.0
    contrast: float = 1.0
    gamma: float = 1.0
    cast: np.ndarray = field(default_factory=lambda: _c(1, 1, 1))
    haze: float = 0.0  # haze opacity at depth 1
    haze_colour: np.ndarray = field(default_factory=lambda: _c(200, 203, 208))
    noise: float = 3.0  # sensor noise σ (0..255 scale)
    speckle: float = 0.0  # fraction of pixels hit by drizzle / snow specks
    speckle_colour: np.ndarray = field(default_factory=lambda: _c(235, 235, 240))


DAY = Style(
    classes=np.stack([_c(120, 170, 225), _c(150, 120, 100), _c(60, 120, 45), _c(90, 90, 95), _c(100, 160, 70),
                      _c(0, 0, 0)]),
    car_colours=np.stack([_c(200, 30, 30), _c(30, 60, 170), _c(220, 220, 225), _c(40, 40, 45), _c(230, 190, 40),
                          _c(120, 130, 140)]),
    window=_c(60, 80, 110), lit_window=_c(255, 215, 130), trunk=_c(90, 60, 35), marking=_c(235, 235, 220),
    glass=_c(50, 70, 95), wheel=_c(20, 20, 22), light=_c(210, 60, 40), cloud=_c(240, 242, 245),
)

STYLES: dict[str, Style] = {
    "source": DAY,
    "night": replace(
        DAY,
        classes=np.stack([_c(12, 16, 40), _c(45, 38, 40), _c(14, 30, 16), _c(35, 35, 42), _c(20, 38, 22),
                          _c(0, 0, 0)]),
        car_colours=DAY.car_colours * 0.3, window=_c(25, 28, 40), trunk=_c(25, 18, 12),
        marking=_c(120, 120, 110), glass=_c(20, 25, 35), light=_c(255, 245, 210), cloud=_c(30, 32, 50),
        clouds=0.2, lit=0.45, gamma=1.15, cast=_c(0.85, 0.9, 1.15), noise=9.0,
    ),
    "fog": replace(DAY, clouds=0.0, haze=0.8, contrast=0.7, noise=4.0, speckle=0.01, texture=0.7),
    "palette": replace(
        DAY,
        classes=np.stack([_c(240, 150, 80), _c(60, 150, 135), _c(175, 60, 160), _c(200, 185, 95), _c(70, 95, 205),
                          _c(0, 0, 0)]),
        car_colours=np.stack([_c(120, 230, 120), _c(250, 120, 200), _c(90, 220, 230), _c(255, 255, 150),
                              _c(160, 100, 230)]),
        window=_c(230, 240, 170), lit_window=_c(255, 255, 255), trunk=_c(240, 240, 240), marking=_c(40, 20, 60),
        glass=_c(250, 200, 80), wheel=_c(235, 235, 240), light=_c(20, 230, 255), cloud=_c(255, 220, 200),
    ),
}


def random_style(rng: np.random.Generator) -> Style:
    """A random style for the unlabelled pool: random colours, lighting, cast, haze and noise."""
    style = DAY
    if rng.random() < 0.5:  # random class and part colours
        colours = rng.uniform(20, 240, (6, 3)).astype(np.float32)
        parts = rng.uniform(10, 250, (8, 3)).astype(np.float32)
        style = replace(style, classes=colours, car_colours=rng.uniform(20, 240, (5, 3)).astype(np.float32),
                        window=parts[0], trunk=parts[1], marking=parts[2], glass=parts[3], wheel=parts[4],
                        light=parts[5], cloud=parts[6], lit_window=parts[7])
    else:  # the day palette, hue-jittered per class
        jitter = rng.uniform(0.75, 1.25, (6, 3)).astype(np.float32)
        style = replace(style, classes=np.clip(style.classes * jitter, 0, 255))
    dark = rng.random() < 0.3
    return replace(
        style,
        clouds=float(rng.uniform(0, 1)), texture=float(rng.uniform(0.5, 1.5)),
        lit=float(rng.uniform(0.2, 0.6)) if dark else 0.0,
        brightness=float(rng.uniform(0.25, 0.5)) if dark else float(rng.uniform(0.7, 1.2)),
        contrast=float(rng.uniform(0.6, 1.3)), gamma=float(rng.uniform(0.8, 1.25)),
        cast=rng.uniform(0.75, 1.25, 3).astype(np.float32),
        haze=float(rng.uniform(0.2, 0.8)) if rng.random() < 0.3 else 0.0,
        haze_colour=rng.uniform(120, 230, 3).astype(np.float32),
        noise=float(rng.uniform(0, 10)), speckle=float(rng.uniform(0, 0.01)) if rng.random() < 0.2 else 0.0,
    )


def value_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Smooth random field in about [-1, 1]: a (cells+1)² lattice, smoothstep-interpolated to size²."""
    lattice = rng.uniform(-1.0, 1.0, (cells + 1, cells + 1)).astype(np.float32)
    pos = (np.arange(size, dtype=np.float32) + 0.5) * cells / size
    i0 = np.minimum(pos.astype(np.int64), cells - 1)
    f = pos - i0
    f = f * f * (3 - 2 * f)  # smoothstep
    rows = lattice[:, i0] * (1 - f) + lattice[:, i0 + 1] * f  # [cells+1, size]: along x
    return rows[i0] * (1 - f)[:, None] + rows[i0 + 1] * f[:, None]  # [size, size]: along y


def render(layout: Layout, style: Style, rng: np.random.Generator) -> np.ndarray:
    """A layout in a style → RGB uint8 [H, W, 3]."""
    S = layout.label.shape[0]
    label, obj, part = layout.label, layout.obj, layout.part
    tex = style.texture
    sky, tree = label == SKY, label == TREE

    # colour per object (class colour; cars pick a body colour), then per-pixel brightness factors
    colours = style.classes[layout.obj_class].copy()  # [K, 3]
    cars = layout.obj_class == CAR
    k = len(style.car_colours)
    colours[cars] = style.car_colours[np.minimum((layout.obj_rand[cars, 1] * k).astype(np.int64), k - 1)]
    tint = np.where(np.isin(layout.obj_class, (BUILDING, TREE)), 1.0 + 0.3 * tex * (layout.obj_rand[:, 0] - 0.5), 1.0)
    mult = tint[obj].astype(np.float32)
    rows = (np.arange(S, dtype=np.float32)[:, None] + 0.5) / S
    grad = 1.12 - 0.3 * rows / max(layout.horizon / S, 1e-3)
    mult = np.where(sky, grad, mult)
    mult = np.where(tree, mult * (1.0 + 0.35 * tex * value_noise(rng, S, max(2, S // 6))), mult)
    grain = rng.standard_normal((S, S), dtype=np.float32)
    mult = np.where(label == GRASS, mult * (1.0 + 0.12 * tex * (grain + value_noise(rng, S, max(2, S // 4)))), mult)
    mult = np.where(label == ROAD, mult * (1.0 + 0.06 * tex * grain), mult)
    mult = np.where(label == BUILDING, mult * (1.0 + 0.05 * tex * value_noise(rng, S, max(2, S // 3))), mult)
    img = colours[obj] * mult[..., None]  # [H, W, 3]

    # clouds over the sky
    cover = np.clip((value_noise(rng, S, 4) + 0.5 * value_noise(rng, S, 9)) * 1.2 + (style.clouds - 0.6) * 1.5, 0, 1)
    a = np.where(sky, cover * style.clouds, 0.0)[..., None]
    img = img * (1 - a) + style.cloud * a

    # parts: windows (some lit), trunks, road markings, car glass, wheels, lights
    table = np.stack([np.zeros(3, np.float32), style.window, style.trunk, style.marking, style.glass, style.wheel,
                      style.light, style.lit_window])
    codes = np.where((part == WINDOW) & (layout.cell < style.lit), 7, part)
    img = np.where((part != NONE)[..., None], table[codes], img)

    # global conditions: lighting, contrast, gamma, cast, depth haze, noise, speckle
    img = img * style.brightness
    if style.contrast != 1.0:
        mean = img.mean(axis=(0, 1), keepdims=True)
        img = (img - mean) * style.contrast + mean
    img = np.clip(img, 0, 255)
    if style.gamma != 1.0:  # through a 256-entry table (pow per pixel is slow)
        lut = (255.0 * (np.arange(256, dtype=np.float32) / 255.0) ** style.gamma).astype(np.float32)
        img = lut[(img + 0.5).astype(np.uint8)]
    img = img * style.cast
    if style.haze > 0:
        patchy = 1.0 + 0.15 * value_noise(rng, S, 3)
        alpha = np.clip(style.haze * layout.depth ** 0.7 * patchy, 0, 0.97)[..., None]
        img = img * (1 - alpha) + style.haze_colour * alpha
    if style.noise > 0:
        img = img + style.noise * rng.standard_normal(img.shape, dtype=np.float32)
    if style.speckle > 0:
        img[rng.random((S, S)) < style.speckle] = style.speckle_colour
    return np.clip(img + 0.5, 0, 255).astype(np.uint8)


def scene_rng(seed: int, domain: str, split: str, index: int) -> np.random.Generator:
    """The random stream of one image: a pure function of (seed, domain, split, index)."""
    return np.random.default_rng([int(seed), _DOMAIN_IDS[domain], _SPLIT_IDS[split], int(index)])


def scene(seed: int, domain: str, split: str, index: int, size: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """(image uint8 [H,W,3], label uint8 [H,W]) of one scene of `domain`."""
    rng = scene_rng(seed, domain, split, index)
    layout = sample_layout(rng, size)
    style = random_style(rng) if domain == "pool" else STYLES[domain]
    return render(layout, style, rng), layout.label


def generate(domain: str, n: int, seed: int = 0, split: str = "train", size: int = 128,
             start: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """n scenes of `domain` as arrays: images uint8 [n,H,W,3], labels uint8 [n,H,W]."""
    images = np.empty((n, size, size, 3), np.uint8)
    labels = np.empty((n, size, size), np.uint8)
    for i in range(n):
        images[i], labels[i] = scene(seed, domain, split, start + i, size)
    return images, labels


# ----------------------------------------------------------------------------------------------
# the benchmark on disk


@dataclass(frozen=True)
class BenchmarkSizes:
    """How many images each split holds, and their side in pixels."""

    size: int = 128
    train: int = 400  # labelled source images (stage 2 images, stage 3 labels)
    val: int = 80  # labelled source images for the reference column
    target: int = 100  # labelled images per target domain
    pool: int = 1200  # unlabelled stage-1 images


@dataclass
class Benchmark:
    """Paths of a written benchmark."""

    root: Path  # dataset root (the folder manifest's root)
    manifest: Path  # folder manifest YAML
    suite: Path  # suite YAML: the target domains
    source_suite: Path  # suite YAML: the source validation split (reference)
    pool_dir: Path  # flat folder of unlabelled pool PNGs
    splits: dict[str, int]  # split name → image count
    sizes: BenchmarkSizes
    seed: int

    def image_files(self, split: str) -> list[Path]:
        return sorted((self.root / "images" / split).glob("*.png"))


def split_domain(split: str) -> tuple[str, str]:
    """Manifest split → (domain, generator split): train/val are the source, targets are 'test'."""
    if split in ("train", "val"):
        return SOURCE, split
    if split in TARGETS:
        return split, "test"
    raise KeyError(f"unknown split {split!r}")


def manifest_yaml() -> str:
    lines = [
        "# Generated by gkd.data.synth (the `gkd demo` benchmark; see its docstring).",
        f"name: {MANIFEST_NAME}",
        "type: folder",
        "description: procedural street scenes; source = clear day (train/val), targets = night, fog, palette swap",
        f"default_root: {MANIFEST_NAME}",
        "image_suffix: .png",
        "label_suffix: .png",
        "splits:",
        *[f"  {s}: {{images: images/{s}, labels: labels/{s}}}" for s in ("train", "val", *TARGETS)],
        "label_encoding: ids",
        f"classes: [{', '.join(CLASSES)}]",
        f"palette: [{', '.join(str(list(c)) for c in PALETTE)}]",
        "ignore_values: []",
        "unlisted: error",
        f"ignore_index: {IGNORE_INDEX}",
        "test_resize: null",
    ]
    return "\n".join(lines) + "\n"


# The benchmark's two suites (shipped as configs/suites/<name>.yaml, naming the manifest gkd_demo):
# name → (splits, description).
TARGET_SUITE, SOURCE_SUITE = "gkd_demo", "gkd_demo_source"
SUITES = {
    TARGET_SUITE: (TARGETS, "Procedural street scenes: clear day → night, fog, palette swap (unseen domains)"),
    SOURCE_SUITE: (("val",), "Procedural street scenes: the source domain's validation split (reference)"),
}


def suite_yaml(manifest: str | Path, name: str) -> str:
    """Suite `name` of SUITES over `manifest` (its name, or the path of a written one)."""
    splits, description = SUITES[name]
    lines = ["# Generated by gkd.data.synth.suite_yaml (the `gkd demo` benchmark).",
             f"name: {name}", f"description: {json.dumps(description)}", "source: clear day (train)",
             "mode: whole", "targets:"]
    for split in splits:
        title = DOMAIN_TITLES[split_domain(split)[0]] if split in TARGETS else "Source val"
        lines += [f"  - name: {json.dumps(title)}",
                  f"    manifest: {json.dumps(str(manifest))}", f"    split: {split}", "    resize: null"]
    return "\n".join(lines) + "\n"


def _save_png(path: Path, array: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray(array).save(path, compress_level=1)


def _write_items(args: tuple[str, int, int, list[tuple[str, int]]]) -> int:
    """Worker: generate and save (split, index) items; returns how many were written."""
    root, seed, size, items = args
    root = Path(root)
    for split, i in items:
        if split == "pool":
            image, _ = scene(seed, "pool", "pool", i, size)
            _save_png(root / "pool" / f"pool_{i:05d}.png", image)
            continue
        domain, gen_split = split_domain(split)
        image, label = scene(seed, domain, gen_split, i, size)
        _save_png(root / "images" / split / f"{split}_{i:05d}.png", image)
        _save_png(root / "labels" / split / f"{split}_{i:05d}.png", label)
    return len(items)


def write_benchmark(out_dir: str | Path, seed: int = 0, sizes: BenchmarkSizes = BenchmarkSizes(),
                    progress: bool = False, workers: int | None = None) -> Benchmark:
    """Generate and write the whole benchmark under `out_dir` (see the module docstring).

    `workers` processes share the images (default: up to 2); the output does not depend on it.
    """
    root = Path(out_dir)
    counts = {"train": sizes.train, "val": sizes.val, **{t: sizes.target for t in TARGETS}}
    for split in counts:
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "labels" / split).mkdir(parents=True, exist_ok=True)
    pool_dir = root / "pool"
    pool_dir.mkdir(parents=True, exist_ok=True)
    items = [(split, i) for split, n in counts.items() for i in range(n)] + [("pool", i) for i in range(sizes.pool)]
    chunks = [(str(root), seed, sizes.size, items[j:j + 50]) for j in range(0, len(items), 50)]
    workers = min(2, os.cpu_count() or 1) if workers is None else workers
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(items), desc="data", unit="img")
    if workers > 1 and len(chunks) > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as ex:
            for n in ex.map(_write_items, chunks):
                if bar is not None:
                    bar.update(n)
    else:
        for chunk in chunks:
            n = _write_items(chunk)
            if bar is not None:
                bar.update(n)
    if bar is not None:
        bar.close()
    manifest = root / f"{MANIFEST_NAME}.yaml"
    manifest.write_text(manifest_yaml())
    suite, source_suite = root / "suite_targets.yaml", root / "suite_source.yaml"
    for path, name in ((suite, TARGET_SUITE), (source_suite, SOURCE_SUITE)):
        path.write_text(suite_yaml(manifest, name))
    return Benchmark(root=root, manifest=manifest, suite=suite, source_suite=source_suite, pool_dir=pool_dir,
                     splits={**counts, "pool": sizes.pool}, sizes=sizes, seed=seed)


def iter_split(root: str | Path, split: str) -> Iterator[tuple[Path, Path]]:
    """(image, label) paths of a written split, in order."""
    root = Path(root)
    for image in sorted((root / "images" / split).glob("*.png")):
        yield image, root / "labels" / split / image.name
