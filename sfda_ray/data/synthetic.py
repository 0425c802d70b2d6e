"""The built-in synthetic benchmark: procedural street scenes with a real domain shift.

Source ("game") scenes use clean flat shading and a saturated palette. Target ("real")
scenes keep the shapes and colour relations but change appearance (darker, desaturated
palette, white balance, per-class textures, a lighting gradient, haze, blur, sensor
noise, JPEG artefacts) *and* the label distribution (a lower camera, few buildings,
more vegetation, many more and much larger cars and people). ``shift`` in [0, 1]
scales every target-side change, so the benchmark can be made easier or harder.

Everything is deterministic from the seed: each image has its own generator seeded by
(seed, domain, split, index), so the same seed gives byte-identical files.
Files are written in the Cityscapes layout with Cityscapes label ids, one manifest per
domain, plus ``benchmark.json`` and a ``preview.png`` contact sheet.
"""

from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

# Train ids (Cityscapes 19-class order) of the classes the scenes contain.
ROAD, SIDEWALK, BUILDING, POLE, SIGN, VEGETATION, SKY, PERSON, CAR = 0, 1, 2, 5, 7, 8, 10, 11, 13
CLASSES = (ROAD, SIDEWALK, BUILDING, POLE, SIGN, VEGETATION, SKY, PERSON, CAR)

DOMAINS = ("source", "target")
SPLITS = ("train", "val")
CITY = {"source": "game", "target": "real"}
OWN_ENTRIES = {*DOMAINS, "benchmark.json", "preview.png"}
FORMAT = "sfda_ray.synthetic/v2"  # v2: the stronger target layout shift

# Flat "game" colours (RGB). Several entries: one is drawn per object instance.
PALETTE = {
    ROAD: [(72, 72, 84)],
    SIDEWALK: [(196, 176, 144)],
    BUILDING: [(176, 84, 62), (204, 170, 112), (142, 142, 166)],
    POLE: [(128, 128, 128)],
    SIGN: [(232, 200, 30), (40, 92, 220)],
    VEGETATION: [(52, 160, 52)],
    SKY: [(112, 172, 250)],
    PERSON: [(200, 40, 40), (40, 40, 200), (230, 230, 230), (32, 32, 32)],
    CAR: [(200, 32, 32), (32, 64, 200), (222, 222, 222), (44, 44, 44), (230, 200, 40)],
}
SKIN = (222, 182, 150)


@dataclass(frozen=True)
class Layout:
    """Scene statistics of one domain (what the prior and selection must cope with)."""

    horizon: tuple[float, float]  # fraction of the height
    building_prob: float  # chance that a slot along the skyline holds a building
    tree_count: tuple[int, int]
    car_count: tuple[int, int]
    car_scale: float
    person_count: tuple[int, int]
    person_scale: float
    pole_count: tuple[int, int]
    road_width: tuple[float, float]  # half width at the bottom, fraction of the width


SOURCE_LAYOUT = Layout((0.36, 0.46), 0.85, (0, 2), (1, 3), 1.0, (0, 2), 1.0, (1, 3), (0.30, 0.42))
# A strong layout shift (lower camera, few buildings, many and much larger cars and
# people, narrower roads): the part of the gap that re-estimating BatchNorm statistics
# cannot close. With the milder v1 layout AdaBN closed up to 51% of the gap.
TARGET_LAYOUT = Layout((0.50, 0.60), 0.30, (3, 6), (3, 6), 1.6, (2, 5), 1.6, (2, 5), (0.16, 0.28))


def _lerp_layout(a: Layout, b: Layout, t: float) -> Layout:
    def mix(x, y):
        if isinstance(x, tuple):
            out = tuple(mix(u, v) for u, v in zip(x, y, strict=True))
            return out
        value = x + (y - x) * t
        return int(round(value)) if isinstance(x, int) else value

    return Layout(*(mix(getattr(a, f), getattr(b, f)) for f in a.__dataclass_fields__))


@dataclass
class _Scene:
    label: np.ndarray  # HxW train ids
    colour: np.ndarray  # HxWx3 float flat colours before the domain's rendering


def _draw_scene(rng: np.random.Generator, h: int, w: int, layout: Layout) -> _Scene:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    label = np.full((h, w), SKY, np.uint8)
    colour = np.zeros((h, w, 3), np.float32)

    def paint(mask: np.ndarray, cls: int, rgb=None) -> None:
        if rgb is None:
            choices = PALETTE[cls]
            rgb = np.array(choices[rng.integers(len(choices))], np.float32)
            rgb = rgb + rng.uniform(-14, 14, 3)  # per-instance jitter
        label[mask] = cls
        colour[mask] = rgb

    paint(np.ones((h, w), bool), SKY)
    hz = rng.uniform(*layout.horizon) * h

    # Skyline: buildings in slots along the horizon, windows as a darker grid.
    x = 0.0
    while x < w:
        bw = rng.uniform(0.10, 0.28) * w
        if rng.random() < layout.building_prob:
            top = hz - rng.uniform(0.15, 0.85) * hz
            m = (xx >= x) & (xx < x + bw) & (yy >= top) & (yy < hz + 2)
            base = np.array(PALETTE[BUILDING][rng.integers(3)], np.float32) + rng.uniform(-14, 14)
            paint(m, BUILDING, base)
            px, py = rng.uniform(0.035, 0.06) * w, rng.uniform(0.05, 0.09) * h
            win = m & ((xx - x) % px > px * 0.5) & ((yy - top) % py > py * 0.45)
            colour[win] = base * 0.55
        x += bw

    # Ground: sidewalk everywhere below the horizon, road as a perspective trapezoid.
    ground = yy >= hz
    paint(ground, SIDEWALK)
    vx = w * rng.uniform(0.35, 0.65)
    half = rng.uniform(*layout.road_width) * w
    depth = np.clip((yy - hz) / max(h - hz, 1), 0, 1)  # 0 at the horizon, 1 at the bottom
    road = ground & (np.abs(xx - vx) < depth * half + 1)
    paint(road, ROAD)
    # Lane markings keep the road's label (as in Cityscapes).
    lane = road & (np.abs(xx - vx) < depth * 0.02 * w + 0.5) & ((yy * 0.4) % 4 < 2)
    colour[lane] = (235, 235, 235)

    def sidewalk_x(y: float) -> float:
        d = (y - hz) / max(h - hz, 1)
        left = rng.random() < 0.5
        lo, hi = (0, vx - d * half) if left else (vx + d * half, w)
        return rng.uniform(lo, max(lo + 1, hi))

    # Objects, drawn far to near so nearer ones occlude.
    objects = []
    for _ in range(rng.integers(layout.tree_count[0], layout.tree_count[1] + 1)):
        y = rng.uniform(hz + 1, h)
        objects.append(("tree", y, sidewalk_x(y)))
    for _ in range(rng.integers(layout.pole_count[0], layout.pole_count[1] + 1)):
        y = rng.uniform(hz + 2, h)
        objects.append(("pole", y, sidewalk_x(y)))
    for _ in range(rng.integers(layout.person_count[0], layout.person_count[1] + 1)):
        y = rng.uniform(hz + 3, h)
        objects.append(("person", y, sidewalk_x(y)))
    for _ in range(rng.integers(layout.car_count[0], layout.car_count[1] + 1)):
        y = rng.uniform(hz + 0.1 * (h - hz), h + 0.1 * h)
        d = (y - hz) / max(h - hz, 1)
        objects.append(("car", y, vx + rng.uniform(-0.8, 0.8) * d * half))

    for kind, y, cx in sorted(objects, key=lambda o: o[1]):
        s = max((y - hz) / max(h - hz, 1), 0.05) * h  # pixel scale at this depth
        if kind == "tree":
            trunk = (np.abs(xx - cx) < max(0.02 * s, 0.6)) & (yy <= y) & (yy > y - 0.5 * s)
            cy, r = y - 0.75 * s, 0.3 * s * rng.uniform(0.8, 1.3)
            crown = ((xx - cx) / (r * 1.1)) ** 2 + ((yy - cy) / r) ** 2 < 1
            paint(trunk | crown, VEGETATION)
        elif kind == "pole":
            pw = max(0.03 * s, 1.0)
            top = y - 0.9 * s * rng.uniform(0.8, 1.2)
            paint((np.abs(xx - cx) < pw) & (yy <= y) & (yy >= top), POLE)
            if rng.random() < 0.7:
                sz = 0.12 * s + 1.5
                if rng.random() < 0.5:
                    m = (np.abs(xx - cx) < sz) & (np.abs(yy - top - sz) < sz)
                else:
                    m = (xx - cx) ** 2 + (yy - top - sz) ** 2 < sz**2
                paint(m, SIGN)
        elif kind == "person":
            ph = 0.6 * s * layout.person_scale * rng.uniform(0.85, 1.15)
            body = ((xx - cx) / (0.2 * ph + 0.5)) ** 2 + ((yy - (y - 0.42 * ph)) / (0.42 * ph)) ** 2
            head = (xx - cx) ** 2 + (yy - (y - 0.9 * ph)) ** 2 < (0.1 * ph + 0.5) ** 2
            paint(body < 1, PERSON)
            paint(head, PERSON, np.array(SKIN, np.float32))
        else:
            cw = 0.55 * s * layout.car_scale * rng.uniform(0.85, 1.15)
            ch = 0.45 * cw
            body = (np.abs(xx - cx) < cw / 2) & (yy <= y - 0.12 * ch) & (yy > y - 0.6 * ch)
            cabin = (np.abs(xx - cx) < cw * 0.3) & (yy <= y - 0.6 * ch) & (yy > y - ch)
            paint(body | cabin, CAR)
            glass = (np.abs(xx - cx) < cw * 0.25) & (yy <= y - 0.65 * ch) & (yy > y - 0.92 * ch)
            colour[glass] = (60, 80, 100)
            for wx in (cx - cw * 0.3, cx + cw * 0.3):
                wheel = (xx - wx) ** 2 + (yy - (y - 0.15 * ch)) ** 2 < (0.15 * ch + 0.4) ** 2
                paint(wheel, CAR, np.array((20, 20, 20), np.float32))
    return _Scene(label, colour)


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cell: int) -> np.ndarray:
    """Value noise in [-1, 1]: a coarse random grid upsampled bilinearly."""
    small = rng.uniform(-1, 1, (h // cell + 2, w // cell + 2)).astype(np.float32)
    img = Image.fromarray(small, mode="F").resize((w + 2 * cell, h + 2 * cell), Image.BILINEAR)
    return np.asarray(img)[cell : cell + h, cell : cell + w]


def _render_source(rng: np.random.Generator, scene: _Scene) -> np.ndarray:
    gain = rng.uniform(0.92, 1.08)  # a little exposure variation; no textures, sharp edges
    return np.clip(scene.colour * gain, 0, 255).astype(np.uint8)


def _render_target(rng: np.random.Generator, scene: _Scene, shift: float) -> np.ndarray:
    h, w = scene.label.shape
    img = scene.colour.copy()
    # Darker, desaturated palette with a white-balance cast: colour relations are kept.
    lum = img @ np.array([0.299, 0.587, 0.114], np.float32)
    img = img + (lum[..., None] - img) * (0.5 * shift)
    img = img * (1 - 0.35 * shift) * np.array([1 + 0.08 * shift, 1.0, 1 - 0.14 * shift])
    # Per-class textures: fine grain for asphalt and foliage, blotches on walls and sky.
    fine = rng.normal(0, 1, (h, w)).astype(np.float32)
    coarse = _smooth_noise(rng, h, w, 6)
    tex = np.zeros((h, w), np.float32)
    for cls, amp_fine, amp_coarse in (
        (ROAD, 14, 8),
        (SIDEWALK, 10, 10),
        (BUILDING, 6, 18),
        (VEGETATION, 26, 16),
        (SKY, 0, 14),
        (CAR, 4, 6),
        (PERSON, 6, 6),
    ):
        m = scene.label == cls
        tex[m] = amp_fine * fine[m] + amp_coarse * coarse[m]
    img = img + shift * tex[..., None]
    # Lighting gradient across the frame and haze that thickens towards the horizon.
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(angle) * (xx / w - 0.5) + np.sin(angle) * (yy / h - 0.5)) * 2
    img = img * (1 + 0.25 * shift * ramp[..., None])
    hz = (scene.label == SKY).sum(axis=0).mean()
    haze = np.exp(-np.abs(yy - hz) / (0.25 * h)) * 0.45 * shift * rng.uniform(0.6, 1.0)
    img = img * (1 - haze[..., None]) + haze[..., None] * np.array([180, 182, 178], np.float32)
    img = np.clip(img, 0, 255).astype(np.uint8)
    pil = Image.fromarray(img).filter(ImageFilter.GaussianBlur(0.9 * shift))
    img = np.asarray(pil).astype(np.float32) + rng.normal(0, 7 * shift, (h, w, 3))
    pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    buf = io.BytesIO()
    pil.save(buf, format="JPEG", quality=int(round(95 - 55 * shift)))
    return np.asarray(Image.open(buf).convert("RGB"))


def render_sample(
    seed: int, domain: str, split: str, index: int, height: int, width: int, shift: float
) -> tuple[np.ndarray, np.ndarray]:
    """One (RGB image, train-id label) pair; pure function of its arguments."""
    rng = np.random.default_rng([seed, DOMAINS.index(domain), SPLITS.index(split), index])
    layout = (
        SOURCE_LAYOUT if domain == "source" else _lerp_layout(SOURCE_LAYOUT, TARGET_LAYOUT, shift)
    )
    scene = _draw_scene(rng, height, width, layout)
    image = _render_source(rng, scene) if domain == "source" else _render_target(rng, scene, shift)
    return image, scene.label


@dataclass(frozen=True)
class BenchmarkSpec:
    seed: int = 0
    height: int = 96
    width: int = 192
    shift: float = 1.0
    source_train: int = 600
    source_val: int = 100
    target_train: int = 600
    target_val: int = 150

    def count(self, domain: str, split: str) -> int:
        return getattr(self, f"{domain}_{split}")


def _paths(root: Path, domain: str, split: str, index: int) -> tuple[Path, Path]:
    city = CITY[domain]
    stem = f"{city}_{index:06d}_000019"
    image = root / domain / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png"
    label = root / domain / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png"
    return image, label


def generate(root: str | Path, spec: BenchmarkSpec) -> dict:
    """Write the benchmark under ``root``; returns the contents of ``benchmark.json``."""
    from cityscapesscripts.helpers.labels import trainId2label

    from sfda_ray import storage
    from sfda_ray.data.manifest import write_manifest
    from sfda_ray.data.readers import scan_cityscapes

    if not 0.0 <= spec.shift <= 1.0:
        raise ValueError(f"shift: {spec.shift} is out of range; allowed: 0 <= shift <= 1")
    if spec.height < 32 or spec.width < 32:
        raise ValueError(f"size {spec.height}x{spec.width} too small; need at least 32x32")
    for domain in DOMAINS:  # an empty domain would be told later as a missing dataset
        if not any(spec.count(domain, split) for split in SPLITS):
            counts = " and ".join(f"{domain}_{split}" for split in SPLITS)
            raise ValueError(f"{counts} are both 0: the {domain} domain needs at least one image")
    root = Path(root)
    # A benchmark's own entries, or those of one whose writing was cut short: anything
    # else means the directory is someone's data, whose images would go as stale.
    foreign = sorted(
        e.name for e in (root.iterdir() if root.is_dir() else ()) if e.name not in OWN_ENTRIES
    )
    if foreign and not (root / "benchmark.json").is_file():
        raise ValueError(
            f"{root} holds {', '.join(foreign[:3])}{' ...' if len(foreign) > 3 else ''} and "
            "no benchmark.json: it is not a benchmark, and writing one there would delete "
            "images under it; use a new or empty directory"
        )
    # Labels are stored as official Cityscapes label ids, like a real Cityscapes tree.
    to_label_id = np.full(256, 0, np.uint8)
    for t in CLASSES:
        to_label_id[t] = trainId2label[t].id
    summary = {}
    for domain in DOMAINS:
        written = set()
        for split in SPLITS:
            for i in range(spec.count(domain, split)):
                image, label = render_sample(
                    spec.seed, domain, split, i, spec.height, spec.width, spec.shift
                )
                image_path, label_path = _paths(root, domain, split, i)
                image_path.parent.mkdir(parents=True, exist_ok=True)
                label_path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(image).save(image_path)
                Image.fromarray(to_label_id[label]).save(label_path)
                written |= {image_path, label_path}
        # Images of an earlier benchmark written here (more of them, say) would join the
        # manifest: only this spec's images stay in the benchmark's folders.
        for folder in ("leftImg8bit", "gtFine"):
            for stale in set((root / domain / folder).rglob("*.png")) - written:
                stale.unlink()
        table = scan_cityscapes(root / domain, splits=SPLITS)
        table = table.set_column(
            table.schema.get_field_index("dataset"),
            "dataset",
            [["synthetic"] * table.num_rows],
        )
        write_manifest(table, root / domain / "manifest.parquet")
        summary[domain] = table.num_rows
    info = {
        "format": FORMAT,
        **asdict(spec),
        "label_format": "cityscapes_ids",
        "class_ids": list(CLASSES),
        "manifests": {d: f"{d}/manifest.parquet" for d in DOMAINS},
        "images": summary,
    }
    # Last, and whole or not at all: it is what makes the directory a benchmark.
    storage.atomic_write_bytes(
        root / "benchmark.json", (json.dumps(info, indent=2) + "\n").encode()
    )
    write_preview(root / "preview.png", spec)
    return info


def ensure_benchmark(root: str | Path, spec: BenchmarkSpec) -> dict:
    """The benchmark of ``spec`` under ``root``: generated once, then reused; one written
    there with other settings is refused, not passed off as this one."""
    if not (Path(root) / "benchmark.json").is_file():
        return generate(root, spec)
    info = load_benchmark_info(root)
    asked = asdict(spec)
    differ = [f"{k} {info.get(k)!r} (asked: {v!r})" for k, v in asked.items() if info.get(k) != v]
    if differ:
        raise ValueError(
            f"{root} holds a synthetic benchmark with other settings: {', '.join(differ)}; "
            "use another output directory"
        )
    return info


def write_preview(path: Path, spec: BenchmarkSpec, rows: int = 4) -> None:
    """Contact sheet: per row, source image | source labels | target image | target labels."""
    from sfda_ray.data.labels import colorize

    tiles = []
    for i in range(rows):
        row = []
        for domain in DOMAINS:
            image, label = render_sample(
                spec.seed, domain, "train", i, spec.height, spec.width, spec.shift
            )
            overlay = (0.4 * image + 0.6 * colorize(label)).astype(np.uint8)
            row += [image, overlay]
        tiles.append(np.concatenate(row, axis=1))
    Image.fromarray(np.concatenate(tiles, axis=0)).save(path)


def load_benchmark_info(root: str | Path) -> dict:
    """Read ``benchmark.json``; a clear error if ``root`` is not a benchmark directory."""
    path = Path(root) / "benchmark.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: {root} is not a synthetic benchmark directory "
            "(create one with `sfda-ray synth --out DIR`)"
        )
    try:
        info = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e}); delete {root} to regenerate it") from None
    if info.get("format") != FORMAT:
        raise ValueError(
            f"{path}: format {info.get('format')!r}, expected {FORMAT!r}: written by another "
            f"version of the generator; delete {root} (and what was computed from it) to "
            "regenerate it"
        )
    return info
