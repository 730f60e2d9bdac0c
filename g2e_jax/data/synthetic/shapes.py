"""Coloured shapes: the palette, what a scene holds, and the one renderer every synthetic set draws with.

Drawing has no anti-aliasing, so every object pixel has exactly its palette colour (tests read labels
back from pixels), and PNGs are written with fixed options, so the bytes depend on the pixels alone.
"""

from __future__ import annotations

import dataclasses
import io
import math

from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "star", "cross")
COLORS = {
    "red": (220, 30, 30),
    "green": (30, 150, 50),
    "blue": (30, 70, 220),
    "yellow": (235, 195, 0),
    "purple": (130, 50, 180),
    "orange": (245, 125, 0),
    "pink": (240, 100, 180),
    "brown": (125, 75, 30),
}
CROP_SIZE = 56  # grounding crops; Qwen2-VL's minimum image area is 56 x 56


@dataclasses.dataclass(frozen=True)
class Shape:
    """One drawn object: ``r`` is the circumradius, ``angle`` a rotation in degrees."""

    kind: str
    color: str
    cx: int
    cy: int
    r: int
    angle: float

    @property
    def label(self) -> str:
        return f"{self.color} {self.kind}"


@dataclasses.dataclass(frozen=True)
class Scene:
    """What a full image shows: its size, background RGB and objects (never overlapping)."""

    size: int
    background: tuple[int, int, int]
    shapes: tuple[Shape, ...]


@dataclasses.dataclass(frozen=True)
class Crop:
    """What a grounding crop shows: ``scene.shapes[index]``, cut at ``box`` and resized to CROP_SIZE."""

    scene: Scene
    index: int
    box: tuple[int, int, int, int]

    @property
    def label(self) -> str:
        return self.scene.shapes[self.index].label


def _polygon(s: Shape) -> list[tuple[float, float]]:
    if s.kind == "square":
        pts = [(s.r, math.radians(45 + 90 * k)) for k in range(4)]
    elif s.kind == "triangle":
        pts = [(s.r, math.radians(-90 + 120 * k)) for k in range(3)]
    elif s.kind == "star":
        pts = [(s.r if k % 2 == 0 else 0.45 * s.r, math.radians(-90 + 36 * k)) for k in range(10)]
    elif s.kind == "cross":
        a = s.r / math.hypot(1.0, 0.3)
        b = 0.3 * a
        local = [(b, a), (b, b), (a, b), (a, -b), (b, -b), (b, -a)]
        local += [(-x, -y) for x, y in local]
        pts = [(math.hypot(x, y), math.atan2(y, x)) for x, y in local]
    else:
        raise ValueError(f"no polygon for {s.kind!r}")
    t = math.radians(s.angle)
    return [(s.cx + rho * math.cos(phi + t), s.cy + rho * math.sin(phi + t)) for rho, phi in pts]


def render(scene: Scene) -> Image.Image:
    """Draws the scene without anti-aliasing, so every object pixel has exactly its palette colour."""
    img = Image.new("RGB", (scene.size, scene.size), scene.background)
    draw = ImageDraw.Draw(img)
    for s in scene.shapes:
        fill = COLORS[s.color]
        if s.kind == "circle":
            draw.ellipse([s.cx - s.r, s.cy - s.r, s.cx + s.r, s.cy + s.r], fill=fill)
        else:
            draw.polygon(_polygon(s), fill=fill)
    return img


def crop_box(s: Shape, size: int) -> tuple[int, int, int, int]:
    """A square around the object with a margin, shifted (not cut) to stay inside the image."""
    half = round(1.25 * s.r) + 2
    side = min(2 * half, size)
    x0 = min(max(s.cx - half, 0), size - side)
    y0 = min(max(s.cy - half, 0), size - side)
    return (x0, y0, x0 + side, y0 + side)


def render_crop(crop: Crop) -> Image.Image:
    return render(crop.scene).crop(crop.box).resize((CROP_SIZE, CROP_SIZE), Image.Resampling.BILINEAR)


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False, compress_level=9)  # no metadata: bytes depend on pixels only
    return buf.getvalue()
