"""Deterministic synthetic aerial images with oriented boxes, written as a DOTA-format dataset.

The generator stands in for real DOTA images in tests and demos: it needs no download, is fully
reproducible (``np.random.default_rng(seed)`` is the only source of randomness) and draws everything
with OpenCV.

A scene is built in layers:

1. *Land*: low-frequency colour fields mixing vegetation, soil and concrete, crop-field patches and
   fine texture; optionally a *water* body (coast or lake) with a sandy/concrete shore.
2. *Infrastructure*: straight roads with edge lines and dashed lane marks (bridges over water),
   parking lots with painted stalls, tank-farm pads with bund walls and airport aprons.
3. *Objects* (the five :data:`SYNTHETIC_CLASSES`), each with its own shape, colours and size range:
   rows of parked cars, rows of storage tanks, parked planes, vehicles driving on roads, ships on
   the water and a few scattered ones. Orientations are uniform over the full circle. A candidate is
   rejected when more than 10% of its box is already taken by another object (occupancy mask) or
   when it sits on the wrong terrain (ships on water, everything else on land).
4. *Clutter*: unlabelled buildings and trees that fill the remaining free space.
5. Cast shadows (one sun direction per image), ship wakes, a slight optical blur, uneven
   illumination and sensor grain.

Geometry follows :mod:`mutdet.boxes`: an object with centre ``(cx, cy)``, size ``w`` (along its
heading) x ``h`` and angle ``theta`` (radians, clockwise on screen since image y points down) has the
corners ``ctr -/+ w/2 u -/+ h/2 v`` with ``u = (cos theta, sin theta)``, ``v = (-sin theta,
cos theta)``, in the order that is top-left, top-right, bottom-right, bottom-left for ``theta = 0``.
Sizes are in pixels for a ground sampling distance of :data:`GSD` metres; a smaller ``size`` crops
the world rather than shrinking the objects, so object counts scale with the image area.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from mutdet.io.atomic import write_bytes, write_text
from mutdet.io.dota import format_dota_line

__all__ = ["SYNTHETIC_CLASSES", "GSD", "SyntheticImage", "render_image", "write_dota_dataset"]

SYNTHETIC_CLASSES = ("plane", "ship", "storage-tank", "small-vehicle", "large-vehicle")
GSD = 0.5
"""Ground sampling distance (metres per pixel) that the object sizes correspond to."""

_REFERENCE_SIZE = 1500  # object counts below are per 1500 x 1500 image
_MIN_SIZE = 128
_MAX_OVERLAP = 0.10  # max fraction of a new box that may already be occupied
_MIN_TERRAIN = 0.98  # min fraction of a new box that must lie on an allowed terrain
_DIFFICULT_SIDE = 4.5  # boxes with a shorter side below this (px) are difficult
_SHIFT = 4  # fixed-point bits for sub-pixel OpenCV drawing
_AA = cv2.LINE_AA

# Terrain labels of the per-pixel terrain map. Sites are parking lots, aprons and tank-farm pads;
# nothing is placed on the shore band between land and water.
_LAND, _WATER, _ROAD, _SITE, _SHORE = 0, 1, 2, 3, 4
_MIN_CONTRAST = 50  # min mean abs BGR difference between a vehicle's paint and the ground under it

Colour = tuple[float, float, float]  # BGR

_CAR_COLOURS: tuple[tuple[Colour, float], ...] = (  # (BGR, weight)
    ((228, 228, 226), 0.30),  # white
    ((38, 38, 40), 0.20),  # black
    ((172, 170, 168), 0.18),  # silver
    ((110, 110, 112), 0.10),  # grey
    ((45, 45, 165), 0.08),  # red
    ((140, 75, 35), 0.07),  # blue
    ((60, 100, 60), 0.03),  # dark green
    ((60, 170, 200), 0.04),  # beige / yellow
)
_LIVERY_COLOURS: tuple[Colour, ...] = ((40, 40, 170), (130, 60, 20), (30, 140, 220), (60, 60, 60), (120, 120, 40))
_CONTAINER_COLOURS: tuple[Colour, ...] = ((50, 60, 160), (140, 90, 40), (60, 140, 60), (40, 140, 200), (170, 170, 170))
_ROOF_COLOURS: tuple[Colour, ...] = ((150, 150, 150), (70, 90, 150), (175, 190, 200), (95, 95, 100))


@dataclass(frozen=True)
class SyntheticImage:
    """One rendered image and its DOTA-style annotation.

    Attributes:
        image: ``(H, W, 3)`` uint8, BGR (OpenCV channel order).
        polygons: ``(N, 8)`` float64, ``x1 y1 ... x4 y4`` pixel corners of each object's oriented box.
        classes: ``N`` class names from :data:`SYNTHETIC_CLASSES`.
        difficult: ``(N,)`` int8, 1 for very small objects, else 0.
    """

    image: np.ndarray
    polygons: np.ndarray
    classes: tuple[str, ...]
    difficult: np.ndarray


@dataclass(frozen=True)
class _Shape:
    """An object drawn in its own frame: x along its heading, y to its right (image y points down).

    Attributes:
        parts: ``(polygon, colour)`` pairs drawn in order; polygons are ``(k, 2)`` float local coords.
        height: length of its cast shadow in pixels (0: none).
        elevated: the shadow is a displaced copy of the shape (wings above the ground) instead of its
            footprint swept along the sun direction (a solid standing on the ground).
        wake: ``(polygon, strength)`` pairs brightening the water behind it, ``(k, 2)`` local coords,
            drawn in order (later ones overwrite earlier ones).
    """

    parts: tuple[tuple[np.ndarray, Colour], ...]
    height: float = 0.0
    elevated: bool = False
    wake: tuple[tuple[np.ndarray, float], ...] = ()


@dataclass
class _Scene:
    """Mutable state while one image is composed."""

    rng: np.random.Generator
    size: int
    image: np.ndarray  # (S, S, 3) uint8 background, drawn on in place
    terrain: np.ndarray  # (S, S) uint8 terrain labels
    sun: np.ndarray  # (2,) unit vector along which shadows fall
    occupied: np.ndarray = field(init=False)  # (S, S) uint8, 1 under accepted boxes
    parts: list[tuple[np.ndarray, Colour]] = field(default_factory=list)  # global polygons to draw
    shadows: list[np.ndarray] = field(default_factory=list)  # global shadow polygons
    wakes: list[tuple[np.ndarray, float]] = field(default_factory=list)  # global wake polygons, strengths
    boxes: list[np.ndarray] = field(default_factory=list)  # (8,) polygon per labelled object
    classes: list[str] = field(default_factory=list)
    difficult: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.occupied = np.zeros((self.size, self.size), np.uint8)

    @property
    def area_scale(self) -> float:
        return (self.size / _REFERENCE_SIZE) ** 2

    def count(self, mean_per_reference_image: float) -> int:
        """A Poisson count whose mean scales with the image area."""
        return int(self.rng.poisson(mean_per_reference_image * self.area_scale))

    def random_point(self, margin: float = 0.0) -> np.ndarray:
        return self.rng.uniform(margin, self.size - margin, 2)

    def background_at(self, xy: np.ndarray) -> np.ndarray:
        """``(3,)`` float mean BGR of the current image around ``xy``."""
        x, y = np.clip(np.round(xy).astype(int), 2, self.size - 3)
        return self.image[y - 2 : y + 3, x - 2 : x + 3].reshape(-1, 3).mean(axis=0)

    def add(self, shape: _Shape, centre: np.ndarray, theta: float, label: str | None,
            allowed: tuple[int, ...]) -> bool:
        """Place ``shape`` with its box centred on ``centre`` at angle ``theta`` if the spot is free.

        The box must lie inside the image, overlap earlier boxes by at most ``_MAX_OVERLAP`` of its
        area and lie on the ``allowed`` terrain labels. ``label=None`` adds unlabelled clutter, which
        may not overlap anything at all. Returns whether the shape was accepted.
        """
        pts = np.concatenate([p for p, _ in shape.parts])
        lo, hi = pts.min(axis=0), pts.max(axis=0)
        w, h = hi - lo
        mid = (lo + hi) / 2
        box = _box_corners(centre, w, h, theta)
        if box.min() < 1 or box.max() > self.size - 2:
            return False
        mask, (x0, y0) = _raster(box)
        inside = mask.astype(bool)
        if not inside.any():
            return False
        occ = self.occupied[y0 : y0 + mask.shape[0], x0 : x0 + mask.shape[1]]
        taken = occ[inside].mean()
        if taken > (_MAX_OVERLAP if label is not None else 0.0):
            return False
        ok = np.zeros(256, bool)
        ok[list(allowed)] = True
        terrain = self.terrain[y0 : y0 + mask.shape[0], x0 : x0 + mask.shape[1]]
        if ok[terrain[inside]].mean() < _MIN_TERRAIN:
            return False
        occ[inside] = 1

        c, s = math.cos(theta), math.sin(theta)
        rot = np.array([[c, s], [-s, c]])  # row vectors: p_global = p_local @ rot + centre

        def to_global(p: np.ndarray) -> np.ndarray:
            return (p - mid) @ rot + centre

        parts = [(to_global(p), colour) for p, colour in shape.parts]
        self.parts.extend(parts)
        if shape.height > 0:
            offset = self.sun * shape.height
            if shape.elevated:
                self.shadows.extend(p + offset for p, _ in parts)
            else:
                self.shadows.extend(_sweep(p, offset) for p, _ in parts)
        self.wakes.extend((to_global(p), strength) for p, strength in shape.wake)
        if label is not None:
            self.boxes.append(box.reshape(8))
            self.classes.append(label)
            self.difficult.append(int(min(w, h) < _DIFFICULT_SIDE))
        return True

    def add_site(self, width: float, height: float, theta: float, tries: int = 30) -> np.ndarray | None:
        """Find a free land rectangle ``width x height`` at angle ``theta``; returns its corners.

        Returns ``(4, 2)`` float corners (marked as site terrain) or ``None`` when nothing fits.
        """
        margin = 0.5 * math.hypot(width, height) + 2
        if 2 * margin >= self.size:
            return None
        for _ in range(tries):
            corners = _box_corners(self.random_point(margin), width, height, theta)
            mask, (x0, y0) = _raster(corners)
            inside = mask.astype(bool)
            terrain = self.terrain[y0 : y0 + mask.shape[0], x0 : x0 + mask.shape[1]]
            if (terrain[inside] == _LAND).mean() >= 0.995:
                terrain[inside] = _SITE
                return corners
        return None


def render_image(seed: int, size: int = 1500, zoom: float = 1.0) -> SyntheticImage:
    """Render one synthetic aerial image of ``size x size`` pixels; identical for identical inputs.

    ``zoom > 1`` renders a world of ``round(size / zoom)`` pixels and resizes it to ``size`` (bilinear):
    every object is ``zoom`` times larger in pixels (an image at ``GSD / zoom`` metres per pixel with
    the detail of ``GSD``), and an image holds ``zoom**2`` times fewer objects. Difficult flags are
    those of the world render.

    Returns:
        A :class:`SyntheticImage` with a ``(size, size, 3)`` uint8 BGR image and ``N`` objects.
    """
    if not zoom >= 1.0:
        raise ValueError(f"zoom must be >= 1, got {zoom}")
    if zoom != 1.0:
        world = round(size / zoom)
        sample = render_image(seed, world)
        image = cv2.resize(sample.image, (size, size), interpolation=cv2.INTER_LINEAR)
        # OpenCV draws and resizes in pixel-centre coordinates: x -> (x + 0.5) * scale - 0.5
        polygons = (sample.polygons + 0.5) * (size / world) - 0.5
        return SyntheticImage(image=image, polygons=polygons, classes=sample.classes,
                              difficult=sample.difficult)
    if size < _MIN_SIZE:
        raise ValueError(f"size must be at least {_MIN_SIZE}, got {size}")
    rng = np.random.default_rng(seed)
    sun_angle = rng.uniform(0, 2 * math.pi)
    image, terrain = _land_and_water(rng, size)
    scene = _Scene(rng, size, image, terrain, np.array([math.cos(sun_angle), math.sin(sun_angle)]))

    roads = _draw_roads(scene)
    if rng.random() < 0.55:
        _airport_apron(scene)
    if rng.random() < 0.45:
        _tank_farm(scene)
    for _ in range(scene.count(1.1)):
        _parking_lot(scene)
    for road in roads:
        _road_traffic(scene, *road)
    _ships(scene)
    _scattered(scene)
    _clutter(scene)

    _render_items(scene)
    return SyntheticImage(
        image=_camera(rng, scene.image),
        polygons=np.array(scene.boxes, np.float64).reshape(-1, 8),
        classes=tuple(scene.classes),
        difficult=np.array(scene.difficult, np.int8),
    )


def write_dota_dataset(root: str | Path, num_train: int = 8, num_test: int = 4, size: int = 1500,
                       seed: int = 0, num_unlabelled: int = 0, zoom: float = 1.0) -> dict:
    """Write a synthetic dataset in DOTA layout under ``root``.

    Files: ``images/<id>.png``, ``labelTxt/<id>.txt`` (header lines ``imagesource:`` and ``gsd:``,
    then ``x1 y1 ... x4 y4 class difficult`` per object), ``train.txt`` and ``test.txt`` (one id per
    line). Ids are ``synthetic_0000``, ``synthetic_0001``, ...; image ``i`` is rendered with seed
    ``seed * 100003 + i``; the first ``num_train`` ids form the train split, the next ``num_test`` the
    test split. ``num_unlabelled`` further images (the ids that follow) go to ``unlabelled/images/``
    and ``unlabelled.txt`` **without labels**, laid out like DOTA's test split (images only): a
    pre-training pool larger than the labelled data, as in the paper's regime. ``zoom``: see
    :func:`render_image` (the ``gsd:`` header says ``GSD / zoom``). Each file is written atomically.

    Returns:
        ``{"images": int, "objects": int, "per_class": {class: int}, "train": [ids], "test": [ids],
        "unlabelled": [ids]}`` (``objects`` and ``per_class`` count the labelled images only).
    """
    if num_train < 0 or num_test < 0 or num_unlabelled < 0:
        raise ValueError("num_train, num_test and num_unlabelled must be non-negative")
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "labelTxt").mkdir(parents=True, exist_ok=True)
    ids = [f"synthetic_{i:04d}" for i in range(num_train + num_test + num_unlabelled)]
    labelled = num_train + num_test
    if num_unlabelled:
        (root / "unlabelled" / "images").mkdir(parents=True, exist_ok=True)
    per_class = dict.fromkeys(SYNTHETIC_CLASSES, 0)
    for i, image_id in enumerate(ids):
        sample = render_image(seed * 100003 + i, size, zoom)
        ok, png = cv2.imencode(".png", sample.image, [cv2.IMWRITE_PNG_COMPRESSION, 1])
        if not ok:
            raise RuntimeError(f"PNG encoding failed for {image_id}")
        if i >= labelled:  # unlabelled: the image only
            write_bytes(root / "unlabelled" / "images" / f"{image_id}.png", png.tobytes())
            continue
        write_bytes(root / "images" / f"{image_id}.png", png.tobytes())
        lines = ["imagesource:mutdet-synthetic", f"gsd:{GSD / zoom:g}"]
        for poly, cls, diff in zip(sample.polygons, sample.classes, sample.difficult):
            lines.append(format_dota_line(poly, cls, int(diff)))
            per_class[cls] += 1
        write_text(root / "labelTxt" / f"{image_id}.txt", "\n".join(lines) + "\n")
    train, test, unlabelled = ids[:num_train], ids[num_train:labelled], ids[labelled:]
    write_text(root / "train.txt", "".join(f"{i}\n" for i in train))
    write_text(root / "test.txt", "".join(f"{i}\n" for i in test))
    if num_unlabelled:
        write_text(root / "unlabelled.txt", "".join(f"{i}\n" for i in unlabelled))
    return {"images": len(ids), "objects": sum(per_class.values()), "per_class": per_class,
            "train": train, "test": test, "unlabelled": unlabelled}


# --------------------------------------------------------------------------------------------------
# Geometry and drawing helpers


def _box_corners(centre: np.ndarray, w: float, h: float, theta: float) -> np.ndarray:
    """``(4, 2)`` corners of an oriented box, in :mod:`mutdet.boxes` order."""
    u = np.array([math.cos(theta), math.sin(theta)]) * (w / 2)
    v = np.array([-math.sin(theta), math.cos(theta)]) * (h / 2)
    return np.stack([centre - u - v, centre + u - v, centre + u + v, centre - u + v])


def _raster(poly: np.ndarray) -> tuple[np.ndarray, tuple[int, int]]:
    """Rasterise a ``(k, 2)`` polygon into a tight uint8 mask; returns it and its ``(x0, y0)`` offset."""
    x0, y0 = np.floor(poly.min(axis=0)).astype(int)
    x1, y1 = np.ceil(poly.max(axis=0)).astype(int) + 1
    mask = np.zeros((y1 - y0, x1 - x0), np.uint8)
    cv2.fillPoly(mask, [_fixed(poly - (x0, y0))], 1, cv2.LINE_8, _SHIFT)
    return mask, (int(x0), int(y0))


def _fixed(poly: np.ndarray) -> np.ndarray:
    """Polygon in OpenCV fixed-point int32 coordinates (for ``shift=_SHIFT``)."""
    return np.round(poly * (1 << _SHIFT)).astype(np.int32)


def _line(img: np.ndarray, p: np.ndarray, q: np.ndarray, colour, thickness: int,
          line_type: int = _AA) -> None:
    """Draw a segment between the ``(2,)`` float points ``p`` and ``q`` with sub-pixel precision."""
    (px, py), (qx, qy) = _fixed(np.stack([p, q])).tolist()
    cv2.line(img, (px, py), (qx, qy), colour, thickness, line_type, _SHIFT)


def _sweep(poly: np.ndarray, offset: np.ndarray) -> np.ndarray:
    """Convex hull ``(k, 2)`` of a polygon and its copy moved by ``offset``: a prism's shadow."""
    both = np.concatenate([poly, poly + offset]).astype(np.float32)
    return cv2.convexHull(both).reshape(-1, 2).astype(np.float64)


def _rotate(vec: np.ndarray, theta: float) -> np.ndarray:
    """``(2,)`` vector turned by ``theta`` (clockwise on screen)."""
    c, s = math.cos(theta), math.sin(theta)
    return np.array([c * vec[0] - s * vec[1], s * vec[0] + c * vec[1]])


def _axes(corners: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors along the first and the last edge of a ``(4, 2)`` rectangle."""
    u, v = corners[1] - corners[0], corners[3] - corners[0]
    return u / np.linalg.norm(u), v / np.linalg.norm(v)


def _rect(x0: float, x1: float, y0: float, y1: float) -> np.ndarray:
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], np.float64)


def _circle(r: float, cx: float = 0.0, cy: float = 0.0) -> np.ndarray:
    """Regular polygon with a vertex count divisible by 4, so its extent is exactly ``+-r``."""
    n = 4 * max(6, math.ceil(r))
    a = np.linspace(0, 2 * math.pi, n, endpoint=False)
    return np.stack([cx + r * np.cos(a), cy + r * np.sin(a)], axis=1)


def _chamfered(length: float, width: float, cut: float) -> np.ndarray:
    """Centred ``length x width`` rectangle with its corners cut by ``cut``."""
    x, y = length / 2, width / 2
    return np.array([[-x + cut, -y], [x - cut, -y], [x, -y + cut], [x, y - cut],
                     [x - cut, y], [-x + cut, y], [-x, y - cut], [-x, -y + cut]], np.float64)


def _jitter(rng: np.random.Generator, colour, amount: float) -> Colour:
    """``colour`` with a random brightness shift (std ``amount``) and a slight random tint."""
    shift = rng.normal(0, amount) + rng.normal(0, 0.2 * amount, 3)
    return tuple(float(v) for v in np.clip(np.asarray(colour, np.float64) + shift, 0, 255))


def _scale(colour: Colour, factor: float) -> Colour:
    return tuple(float(min(255.0, v * factor)) for v in colour)


def _smooth_noise(rng: np.random.Generator, size: int, cell: float) -> np.ndarray:
    """``(size, size)`` float32 smooth noise with features of about ``cell`` px, ~unit std."""
    n = max(2, math.ceil(size / cell)) + 1
    noise = cv2.resize(rng.standard_normal((n, n)).astype(np.float32), (size, size),
                       interpolation=cv2.INTER_CUBIC)
    return noise / (noise.std() + 1e-6)


# --------------------------------------------------------------------------------------------------
# Background layers


def _land_and_water(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """``(size, size, 3)`` uint8 BGR land (and maybe water) and its ``(size, size)`` terrain map."""
    vegetation = np.array(_jitter(rng, (62, 108, 82), 10), np.float32)
    soil = np.array(_jitter(rng, (112, 140, 162), 12), np.float32)
    concrete = np.array(_jitter(rng, (150, 152, 150), 10), np.float32)
    green = 1 / (1 + np.exp(-2.0 * (0.75 * _smooth_noise(rng, size, 420) + 0.25 * _smooth_noise(rng, size, 110)
                                     + rng.uniform(-0.8, 0.8))))
    urban = 1 / (1 + np.exp(-2.5 * (_smooth_noise(rng, size, 500) + rng.uniform(-1.5, 0.0))))
    img = np.empty((size, size, 3), np.float32)
    img[:] = soil
    _blend(img, green, vegetation)
    _blend(img, urban, concrete)

    # Crop fields: rotated rectangles with their own tint.
    tint = np.zeros((size, size, 3), np.float32)
    n_fields = int(rng.poisson(7 * (size / _REFERENCE_SIZE) ** 2))
    for _ in range(n_fields):
        corners = _box_corners(rng.uniform(0, size, 2), *rng.uniform(120, 420, 2), rng.uniform(0, math.pi))
        delta = rng.normal(0, 12) + rng.normal(0, 3, 3)
        cv2.fillPoly(tint, [_fixed(corners)], delta.tolist(), cv2.LINE_8, _SHIFT)
    img += cv2.GaussianBlur(tint, (0, 0), 2.0)
    texture = 1 + 0.07 * _smooth_noise(rng, size, 5) + 0.05 * _smooth_noise(rng, size, 30)
    img *= texture[..., None]

    terrain = np.zeros((size, size), np.uint8)
    if rng.random() < 0.6:
        angle = rng.uniform(0, 2 * math.pi)
        ramp = np.arange(size, dtype=np.float32) / size - 0.5
        slope = ramp[None, :] * math.cos(angle) + ramp[:, None] * math.sin(angle)
        depth = _smooth_noise(rng, size, 450) + 3.0 * slope
        water = depth > np.quantile(depth[::8, ::8], 1 - rng.uniform(0.15, 0.4))
        water_u8 = water.astype(np.uint8)
        shore_px = int(rng.integers(3, 9))
        shore = cv2.dilate(water_u8, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * shore_px + 1,) * 2))
        shore_colour = np.array(_jitter(rng, (150, 170, 180), 12), np.float32)
        _blend(img, cv2.GaussianBlur(shore.astype(np.float32), (0, 0), 1.2), shore_colour)
        water_colour = np.array(_jitter(rng, (88, 84, 52), 12), np.float32)
        shade = 1 + 0.06 * _smooth_noise(rng, size, 220) + 0.02 * _smooth_noise(rng, size, 3)
        _blend(img, cv2.GaussianBlur(water.astype(np.float32), (0, 0), 1.0), water_colour * shade[..., None])
        terrain[water] = _WATER
        terrain[(shore > 0) & ~water] = _SHORE
    np.clip(img, 0, 255, out=img)
    return img.astype(np.uint8), terrain


def _blend(img: np.ndarray, alpha: np.ndarray, target: np.ndarray) -> None:
    """``img += alpha * (target - img)`` in place; ``img`` ``(S, S, 3)``, ``alpha`` ``(S, S)``, float32."""
    diff = target - img
    diff *= alpha[..., None]
    img += diff


def _draw_roads(scene: _Scene) -> list[tuple[np.ndarray, float, float]]:
    """Draw straight roads across the image; returns ``(point, angle, width)`` per road."""
    rng, size = scene.rng, scene.size
    roads = []
    for _ in range(1 + int(rng.poisson(1.2 * size / _REFERENCE_SIZE))):
        point, angle = scene.random_point(0.1 * size), rng.uniform(0, math.pi)
        width = float(rng.uniform(18, 28))  # two lanes wide enough for the large vehicles
        d = np.array([math.cos(angle), math.sin(angle)])
        n = np.array([-d[1], d[0]])
        a, b = point - 2 * size * d, point + 2 * size * d
        asphalt = _jitter(rng, (96, 98, 100), 10)
        _line(scene.image, a, b, asphalt, round(width))
        _line(scene.terrain, a, b, _ROAD, round(width), cv2.LINE_8)
        for side in (-1, 1):
            off = side * (width / 2 - 2) * n
            _line(scene.image, a + off, b + off, _scale(asphalt, 1.6), 1)
        mark = (215, 215, 215) if rng.random() < 0.7 else (70, 190, 225)
        dash, gap = rng.uniform(6, 10), rng.uniform(8, 14)
        for s in np.arange(-2 * size, 2 * size, dash + gap):
            p, q = point + s * d, point + (s + dash) * d
            if min(p.min(), q.min()) > -dash and max(p.max(), q.max()) < size + dash:
                _line(scene.image, p, q, mark, 1)
        roads.append((point, angle, width))
    return roads


def _draw_pad(scene: _Scene, corners: np.ndarray, colour: Colour, border: Colour | None) -> None:
    cv2.fillPoly(scene.image, [_fixed(corners)], colour, _AA, _SHIFT)
    if border is not None:
        cv2.polylines(scene.image, [_fixed(corners)], True, border, 2, _AA, _SHIFT)


# --------------------------------------------------------------------------------------------------
# Object shapes (local frame: x forward, y to the right; centred later on their bounding box)


def _pick_colour(rng: np.random.Generator, background: np.ndarray,
                 palette: tuple[tuple[Colour, float], ...]) -> Colour:
    """A jittered palette colour that stands out from the ``(3,)`` BGR ``background`` if possible."""
    colours = np.array([c for c, _ in palette])
    weights = np.array([w for _, w in palette])
    contrast = np.abs(colours - background).mean(axis=1) >= _MIN_CONTRAST
    if contrast.any():
        weights = weights * contrast
    colour = colours[rng.choice(len(colours), p=weights / weights.sum())]
    return _jitter(rng, colour, 8)


def _small_vehicle(rng: np.random.Generator, background: np.ndarray) -> _Shape:
    length = rng.uniform(8, 14)
    width = float(np.clip(length * rng.uniform(0.4, 0.52), 4, 7))
    body = _pick_colour(rng, background, _CAR_COLOURS)
    glass = (95, 95, 100) if sum(body) < 200 else (45, 42, 40)
    x, y = length / 2, width / 2
    return _Shape(parts=(
        (_chamfered(length, width, min(1.2, width / 4)), body),
        (np.array([[0.30 * x, -0.85 * y], [0.55 * x, -0.75 * y], [0.55 * x, 0.75 * y], [0.30 * x, 0.85 * y]]), glass),
        (_rect(-0.72 * x, -0.55 * x, -0.75 * y, 0.75 * y), glass),
    ), height=1.2)


def _large_vehicle(rng: np.random.Generator, background: np.ndarray) -> _Shape:
    length, width = rng.uniform(20, 35), rng.uniform(7, 10)
    x, y = length / 2, width / 2
    if rng.random() < 0.7:  # truck: cab + trailer
        cab_len = rng.uniform(0.14, 0.2) * length
        cab = _pick_colour(rng, background, _CAR_COLOURS)
        trailer = _pick_colour(rng, background, (((225, 225, 225), 0.5), *((c, 0.1) for c in _CONTAINER_COLOURS)))
        parts = [
            (_chamfered(cab_len, 0.9 * width, 0.8) + (x - cab_len / 2, 0), cab),
            (_rect(x - 0.35 * cab_len, x - 0.15 * cab_len, -0.4 * y, 0.4 * y), (45, 42, 40)),
            (_rect(-x, x - cab_len - 1.2, -y, y), trailer),
        ]
        parts += [(_rect(r - 0.4, r + 0.4, -y, y), _scale(trailer, 0.85))
                  for r in np.linspace(-x + 2.5, x - cab_len - 3.5, int(rng.integers(0, 5)))]
    else:  # bus: one body with roof units
        roof = _pick_colour(rng, background, _CAR_COLOURS)
        parts = [(_chamfered(length, width, 1.5), roof),
                 (_rect(x - 3.5, x - 1.5, -0.8 * y, 0.8 * y), (45, 42, 40))]
        parts += [(_rect(c - 1.5, c + 1.5, -0.45 * y, 0.45 * y), _scale(roof, 0.75))
                  for c in rng.uniform(-0.6 * x, 0.4 * x, int(rng.integers(1, 4)))]
    return _Shape(parts=tuple(parts), height=2.5)


def _plane(rng: np.random.Generator, length: float) -> _Shape:
    span = length * rng.uniform(0.85, 1.12)
    half = span / 2
    fus = length * rng.uniform(0.09, 0.12)
    x = length / 2
    sweep = math.tan(math.radians(rng.uniform(20, 35)))
    body = _jitter(rng, (236, 236, 236), 8)
    wing = _scale(body, 0.9)
    livery = _LIVERY_COLOURS[int(rng.integers(len(_LIVERY_COLOURS)))] if rng.random() < 0.6 else body

    lead_root, chord_root, chord_tip = 0.22 * x, 0.42 * x, 0.12 * x
    lead_tip = lead_root - half * sweep
    wings = np.array([[lead_root, 0], [lead_tip, -half], [lead_tip - chord_tip, -half], [lead_root - chord_root, 0],
                      [lead_tip - chord_tip, half], [lead_tip, half]])
    tail_half = 0.32 * half
    tail_lead = -0.62 * x
    tail_tip = max(tail_lead - tail_half * sweep, -0.9 * x)
    tail = np.array([[tail_lead, 0], [tail_tip, -tail_half], [tail_tip - 0.1 * x, -tail_half], [-0.98 * x, 0],
                     [tail_tip - 0.1 * x, tail_half], [tail_tip, tail_half]])
    f = fus / 2
    fuselage = np.array([[x, 0], [0.92 * x, -0.6 * f], [0.8 * x, -f], [-0.75 * x, -f], [-x, -0.3 * f],
                         [-x, 0.3 * f], [-0.75 * x, f], [0.8 * x, f], [0.92 * x, 0.6 * f]])
    parts = [(wings, wing), (tail, wing), (fuselage, body),
             (_rect(-x, -0.62 * x, -0.25 * f, 0.25 * f), livery),
             (_rect(0.82 * x, 0.88 * x, -0.7 * f, 0.7 * f), (50, 45, 45))]
    engine_len, engine_w = 0.2 * x, max(1.5, 0.7 * fus)
    stations = (0.35,) if length < 65 else (0.3, 0.6)
    for frac in stations:
        ey = frac * half
        ex = lead_root - ey * sweep + 0.5 * engine_len
        for side in (-1, 1):
            parts.append((_rect(ex - engine_len, ex, side * ey - engine_w / 2, side * ey + engine_w / 2),
                          _scale(body, 0.7)))
    return _Shape(parts=tuple(parts), height=0.07 * length, elevated=True)


def _ship(rng: np.random.Generator, background: np.ndarray) -> _Shape:
    length = float(rng.uniform(30, 120) if rng.random() < 0.6 else rng.uniform(30, 55))
    width = length / rng.uniform(3, 6)
    x, y = length / 2, width / 2
    bow = rng.uniform(0.18, 0.3) * length
    s = np.linspace(0, 1, 6)
    bow_side = np.stack([x - bow * (1 - s), y * (1 - s**2)], axis=1)[:-1]  # from the shoulder to the tip
    hull = np.concatenate([[[-x, -0.8 * y], [-0.95 * x, -y]], bow_side * (1, -1), [[x, 0]],
                           bow_side[::-1], [[-0.95 * x, y], [-x, 0.8 * y]]])
    parts: list[tuple[np.ndarray, Colour]] = []
    if length > 60:  # cargo ship: dark hull, containers, bridge at the stern
        hull_colour = _jitter(rng, ((40, 40, 120), (50, 45, 40), (110, 70, 30))[int(rng.integers(3))], 8)
        parts += [(hull, hull_colour), (hull * (0.96, 0.8), _jitter(rng, (95, 110, 100), 8))]
        step = rng.uniform(5, 8)
        for r in np.arange(-0.25 * x, x - bow - 2 - step, step):
            colour = _jitter(rng, _CONTAINER_COLOURS[int(rng.integers(len(_CONTAINER_COLOURS)))], 10)
            parts.append((_rect(r + 0.5, r + step - 0.5, -0.7 * y, 0.7 * y), colour))
        parts.append((_rect(-0.82 * x, -0.55 * x, -0.85 * y, 0.85 * y), (232, 232, 232)))
    else:  # boat: white hull, coloured cabin
        parts += [(hull, _jitter(rng, (228, 228, 228), 10)),
                  (hull * (0.9, 0.7), _jitter(rng, (205, 205, 200), 10)),
                  (_rect(-0.45 * x, 0.15 * x, -0.55 * y, 0.55 * y), _jitter(rng, (140, 100, 70), 15))]
    wake: tuple[tuple[np.ndarray, float], ...] = ()
    if rng.random() < 0.4:  # under way: a widening trail, brightest near the stern
        trail = rng.uniform(0.5, 1.2) * length
        wake = tuple((np.array([[-x, -0.7 * y], [-x, 0.7 * y], [-x - f * trail, (0.7 + 0.8 * f) * y],
                                [-x - f * trail, -(0.7 + 0.8 * f) * y]]), 1.3 - f) for f in (1.0, 0.6, 0.3))
    return _Shape(parts=tuple(parts), height=0.04 * length, wake=wake)


def _storage_tank(rng: np.random.Generator, diameter: float, sun_local: np.ndarray) -> _Shape:
    r = diameter / 2
    rim = max(1.0, 0.07 * r)
    if rng.random() < 0.6:  # fixed roof: bright dome with a dark rim, shaded away from the sun
        roof = _jitter(rng, (218, 220, 222), 10)
        parts = [(_circle(r), _scale(roof, 0.55)), (_circle(r - rim), _scale(roof, 0.85)),
                 (_circle(r - 2 * rim, *(-0.12 * r * sun_local)), roof),
                 (_circle(max(1.0, 0.08 * r)), _scale(roof, 0.7))]
    else:  # floating roof: light wall, darker roof with the wall's shadow on the sun side
        wall = _jitter(rng, (200, 205, 205), 10)
        inner = r - rim
        roof = _jitter(rng, (140, 145, 140), 10)
        offset = 0.18 * inner
        parts = [(_circle(r), wall), (_circle(inner), _scale(roof, 0.45)),
                 (_circle(inner - offset, *(offset * sun_local)), roof)]
    return _Shape(parts=tuple(parts), height=0.3 * diameter)


# --------------------------------------------------------------------------------------------------
# Scene layouts


def _airport_apron(scene: _Scene) -> None:
    """A concrete apron with a row of parked planes and a few taxiing ones."""
    rng = scene.rng
    length = rng.uniform(44, 80)
    pitch = 1.2 * 1.12 * length
    cols = int(min(rng.integers(2, 8), (0.7 * scene.size) // pitch))
    if cols < 1:
        return
    angle = rng.uniform(0, 2 * math.pi)
    depth = 2.6 * length
    corners = scene.add_site(cols * pitch + 20, depth, angle)
    if corners is None:
        return
    _draw_pad(scene, corners, _jitter(rng, (150, 152, 150), 8), None)
    centre = corners.mean(axis=0)
    u, v = _axes(corners)
    heading = angle - math.pi / 2  # noses towards the terminal side of the apron
    for c in range(cols):
        pos = centre + ((c + 0.5) * pitch - cols * pitch / 2) * u - 0.6 * length * v
        scene.add(_plane(rng, length * rng.uniform(0.92, 1.0)), pos, heading, "plane", (_SITE,))
    for _ in range(int(rng.integers(0, 3))):
        pos = centre + rng.uniform(-0.45, 0.45) * cols * pitch * u + rng.uniform(0.3, 1.0) * length * v
        scene.add(_plane(rng, rng.uniform(40, 80)), pos, rng.uniform(0, 2 * math.pi), "plane", (_SITE,))


def _tank_farm(scene: _Scene) -> None:
    """A pad with a grid of equal storage tanks, each box at a random angle."""
    rng = scene.rng
    diameter = rng.uniform(15, 50)
    pitch = diameter + rng.uniform(0.25, 0.6) * diameter + 3
    rows = int(rng.integers(1, 4))
    cols = int(min(rng.integers(2, 7), (0.6 * scene.size) // pitch))
    if cols < 1:
        return
    angle = rng.uniform(0, math.pi)
    corners = scene.add_site(cols * pitch + 0.6 * diameter, rows * pitch + 0.6 * diameter, angle)
    if corners is None:
        return
    pad = _jitter(rng, (165, 175, 180), 10)
    _draw_pad(scene, corners, pad, _scale(pad, 1.2))
    u, v = _axes(corners)
    origin = corners[0] + 0.3 * diameter * (u + v)
    for row in range(rows):
        for col in range(cols):
            if rng.random() < 0.1:
                continue
            theta = rng.uniform(0, 2 * math.pi)
            pos = origin + (col + 0.5) * pitch * u + (row + 0.5) * pitch * v
            tank = _storage_tank(rng, diameter, _rotate(scene.sun, -theta))
            scene.add(tank, pos, theta, "storage-tank", (_SITE,))


def _parking_lot(scene: _Scene) -> None:
    """An asphalt lot with painted stalls, its rows of cars parked side by side."""
    rng = scene.rng
    pitch, stall, aisle = rng.uniform(8, 9.5), rng.uniform(15, 17), rng.uniform(12, 18)
    pairs = int(rng.integers(1, 3))
    cols = int(min(rng.integers(5, 21), (0.5 * scene.size) // pitch))
    angle = rng.uniform(0, math.pi)
    width, height = cols * pitch + 8, pairs * 2 * stall + (pairs + 1) * aisle
    corners = scene.add_site(width, height, angle)
    if corners is None:
        return
    asphalt = _jitter(rng, (92, 94, 96), 8)
    _draw_pad(scene, corners, asphalt, _scale(asphalt, 1.5))
    u, v = _axes(corners)
    paint = _scale(asphalt, 2.0)
    fill = rng.uniform(0.55, 0.95)
    for pair in range(pairs):
        top = aisle + pair * (2 * stall + aisle)
        for row, facing in ((0, -1), (1, 1)):  # each row faces its own aisle
            y0 = top + row * stall
            for col in range(cols + 1):
                p = corners[0] + (4 + col * pitch) * u
                _line(scene.image, p + y0 * v, p + (y0 + stall) * v, paint, 1)
            for col in range(cols):
                if rng.random() > fill:
                    continue
                pos = corners[0] + (4 + (col + 0.5) * pitch) * u + (y0 + stall / 2) * v + rng.normal(0, 0.4, 2)
                heading = angle + facing * math.pi / 2 + (math.pi if rng.random() < 0.25 else 0.0)
                car = _small_vehicle(rng, scene.background_at(pos))
                scene.add(car, pos, heading, "small-vehicle", (_SITE,))


def _road_traffic(scene: _Scene, point: np.ndarray, angle: float, width: float) -> None:
    """Cars and trucks driving in both lanes of one road."""
    rng, size = scene.rng, scene.size
    d = np.array([math.cos(angle), math.sin(angle)])
    n = np.array([-d[1], d[0]])
    for _ in range(int(rng.poisson(24 * size / _REFERENCE_SIZE))):
        pos = point + rng.uniform(-size, size) * d
        lane = 1 if rng.random() < 0.5 else -1
        pos = pos + lane * (width / 4 + rng.normal(0, 0.5)) * n
        heading = angle + (0.0 if lane > 0 else math.pi) + rng.normal(0, 0.02)
        background = scene.background_at(pos)
        if rng.random() < 0.25:
            scene.add(_large_vehicle(rng, background), pos, heading, "large-vehicle", (_ROAD,))
        else:
            scene.add(_small_vehicle(rng, background), pos, heading, "small-vehicle", (_ROAD,))


def _ships(scene: _Scene) -> None:
    """Ships at random positions and headings on the water."""
    rng = scene.rng
    water_fraction = float((scene.terrain[::8, ::8] == _WATER).mean())
    for _ in range(scene.count(40 * water_fraction)):
        for _ in range(20):
            pos = scene.random_point(10)
            x, y = pos.astype(int)
            if scene.terrain[y, x] == _WATER:
                ship = _ship(rng, scene.background_at(pos))
                if scene.add(ship, pos, rng.uniform(0, 2 * math.pi), "ship", (_WATER,)):
                    break


def _scattered(scene: _Scene) -> None:
    """Isolated vehicles and storage tanks anywhere on land."""
    rng = scene.rng
    land = (_LAND, _SITE)
    for _ in range(scene.count(8)):
        pos = scene.random_point(10)
        scene.add(_small_vehicle(rng, scene.background_at(pos)), pos, rng.uniform(0, 2 * math.pi),
                  "small-vehicle", land)
    for _ in range(scene.count(3)):
        pos = scene.random_point(20)
        scene.add(_large_vehicle(rng, scene.background_at(pos)), pos, rng.uniform(0, 2 * math.pi),
                  "large-vehicle", land)
    for _ in range(scene.count(3)):
        theta = rng.uniform(0, 2 * math.pi)
        tank = _storage_tank(rng, rng.uniform(15, 50), _rotate(scene.sun, -theta))
        scene.add(tank, scene.random_point(30), theta, "storage-tank", (_LAND,))


def _clutter(scene: _Scene) -> None:
    """Unlabelled clutter in the free space: villages of buildings and groves of trees."""
    rng = scene.rng
    for _ in range(scene.count(6)):  # a village: buildings around a centre, roughly aligned
        centre, spread, grid = scene.random_point(), rng.uniform(60, 160), rng.uniform(0, math.pi / 2)
        for _ in range(int(rng.integers(4, 25))):
            length, width = rng.uniform(16, 60), rng.uniform(12, 36)
            roof = _jitter(rng, _ROOF_COLOURS[int(rng.integers(len(_ROOF_COLOURS)))], 10)
            x, y = length / 2, width / 2
            if rng.random() < 0.5:  # pitched roof: sunlit and shaded halves
                parts = ((_rect(-x, x, -y, 0), roof), (_rect(-x, x, 0, y), _scale(roof, 0.75)))
            else:  # flat roof with a parapet
                parts = ((_rect(-x, x, -y, y), roof), (_rect(-x + 2, x - 2, -y + 2, y - 2), _scale(roof, 0.93)))
            theta = grid + int(rng.integers(4)) * math.pi / 2 + rng.normal(0, 0.05)
            scene.add(_Shape(parts=parts, height=rng.uniform(3, 12)), centre + rng.normal(0, spread, 2), theta,
                      None, (_LAND,))
    for _ in range(scene.count(20)):  # a grove: trees of a few overlapping crowns, lit on the sun side
        centre, spread = scene.random_point(), rng.uniform(15, 70)
        for _ in range(int(rng.integers(3, 40))):
            r = rng.uniform(3, 8)
            crown = _jitter(rng, (45, 78, 52), 8)
            parts = [(_circle(r * rng.uniform(0.6, 0.9), *rng.normal(0, 0.35 * r, 2)), crown) for _ in range(3)]
            parts.append((_circle(0.45 * r, *(-0.3 * r * scene.sun)), _scale(crown, 1.15)))
            scene.add(_Shape(parts=tuple(parts), height=0.6 * r), centre + rng.normal(0, spread, 2), 0.0, None,
                      (_LAND,))


# --------------------------------------------------------------------------------------------------
# Rendering


def _render_items(scene: _Scene) -> None:
    """Darken shadows, brighten wakes, then draw every placed shape on ``scene.image`` in place."""
    size = scene.size
    shade = np.zeros((size, size), np.uint8)
    for p in scene.shadows:
        cv2.fillPoly(shade, [_fixed(p)], 255, cv2.LINE_8, _SHIFT)
    glow = np.zeros((size, size), np.float32)
    for p, strength in scene.wakes:
        cv2.fillPoly(glow, [_fixed(p)], strength, cv2.LINE_8, _SHIFT)
    gain = 1 - scene.rng.uniform(0.35, 0.55) * cv2.GaussianBlur(shade, (3, 3), 0).astype(np.float32) / 255
    gain += 0.12 * cv2.GaussianBlur(glow, (0, 0), 2.0)
    scene.image[:] = cv2.convertScaleAbs(scene.image.astype(np.float32) * gain[..., None])
    for poly, colour in scene.parts:
        cv2.fillPoly(scene.image, [_fixed(poly)], colour, _AA, _SHIFT)


def _camera(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    """Optical blur, uneven illumination, global brightness and sensor grain; returns uint8 BGR."""
    size = image.shape[0]
    out = cv2.GaussianBlur(image.astype(np.float32), (0, 0), 0.6)
    light = rng.uniform(0.8, 1.15) * (1 + 0.08 * _smooth_noise(rng, size, 700))
    out *= light[..., None]
    out += rng.uniform(2, 5) * rng.standard_normal((size, size, 1), dtype=np.float32)
    out += 1.5 * rng.standard_normal((size, size, 3), dtype=np.float32)
    np.maximum(out, 0, out=out)  # convertScaleAbs would mirror negative values
    return cv2.convertScaleAbs(out)
