"""A synthetic catalogue whose ground truth about modality reliance is known.

Each class carries its label in one modality, chosen per class:
- "image": the title/description come from one generic pool shared by all image classes, so only
  the picture (shape, texture, colour layout) tells them apart;
- "text": the picture comes from one generic pool shared by all text classes, so only the words do;
- "both": classes come in pairs (A, B) over two word sets w1, w2 and two pictures s1, s2, as an
  exclusive or: A is (w1, s1) or (w2, s2), B is (w1, s2) or (w2, s1). Each modality alone is a
  coin toss between A and B; only the pair identifies the class.
Knobs plant misleading text (another class's words) and drop images or text. The feed records each
class's kind (column `class_modality`) and whether a row's text was planted (`text_misleading`).
"""

from __future__ import annotations

import csv
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from pipeline.errors import UserError

SHAPES = ("circle", "square", "triangle", "diamond", "cross", "ring", "star", "bar")
TEXTURES = ("solid", "stripes", "dots", "checker", "grid")
COLOURS = {
    "red": (200, 40, 40), "green": (40, 160, 60), "blue": (40, 70, 200), "yellow": (230, 200, 40),
    "purple": (130, 50, 170), "orange": (240, 130, 30), "black": (20, 20, 20), "teal": (30, 150, 150),
}
BACKGROUNDS = ((245, 245, 245), (225, 215, 200), (200, 215, 230), (215, 230, 205))
WORDS = (
    "alder", "basalt", "cobalt", "dune", "ember", "fjord", "garnet", "heron", "indigo", "jasper", "kelp",
    "lumen", "marl", "nectar", "onyx", "pumice", "quartz", "rowan", "sable", "tundra", "umber", "vellum",
    "willow", "xylem", "yarrow", "zephyr", "aster", "birch", "cedar", "delta", "egret", "flint", "gale",
    "hazel", "iris", "juniper", "kestrel", "larch", "moss", "nimbus", "oriel", "pine", "quill", "reed",
)
GENERIC = (
    "comfortable", "everyday", "classic", "modern", "soft", "durable", "light", "practical", "timeless",
    "versatile", "quality", "design", "fit", "style", "material", "finish", "casual", "premium", "simple",
)
TITLE_TEMPLATES = ("{a} {b} item", "The {a} {b}", "{b} by {a}", "{a} {b} edition", "New {a} {b}")
DESC_TEMPLATES = (
    "A {g1} {g2} piece with a {a} character and {b} detailing.",
    "Made for {g1} use: {a} look, {b} feel, {g2} finish.",
    "{g1} and {g2}, inspired by {a} and {b}.",
)


@dataclass(frozen=True)
class ImageStyle:
    shape: str
    texture: str
    colour: str
    background: int


def _styles(rng: random.Random) -> list[ImageStyle]:
    styles = [
        ImageStyle(s, t, c, b)
        for s in SHAPES
        for t in TEXTURES
        for c in COLOURS
        for b in range(len(BACKGROUNDS))
    ]
    rng.shuffle(styles)
    # distinct shapes/colours first so that class styles differ in several ways at once
    styles.sort(key=lambda st: 0 if (SHAPES.index(st.shape) + list(COLOURS).index(st.colour)) % 3 == 0 else 1)
    return styles


def _texture(draw: ImageDraw.ImageDraw, box, texture: str, colour, rng: random.Random) -> None:
    x0, y0, x1, y1 = box
    step = max(3, (x1 - x0) // 6)
    if texture == "stripes":
        for x in range(x0, x1, step):
            draw.line([(x, y0), (x, y1)], fill=colour, width=max(1, step // 3))
    elif texture == "dots":
        for x in range(x0 + step // 2, x1, step):
            for y in range(y0 + step // 2, y1, step):
                r = max(1, step // 4)
                draw.ellipse([x - r, y - r, x + r, y + r], fill=colour)
    elif texture == "checker":
        for i, x in enumerate(range(x0, x1, step)):
            for j, y in enumerate(range(y0, y1, step)):
                if (i + j) % 2 == 0:
                    draw.rectangle([x, y, x + step - 1, y + step - 1], fill=colour)
    elif texture == "grid":
        for x in range(x0, x1, step):
            draw.line([(x, y0), (x, y1)], fill=colour, width=1)
        for y in range(y0, y1, step):
            draw.line([(x0, y), (x1, y)], fill=colour, width=1)


def render(style: ImageStyle, size: int, rng: random.Random) -> Image.Image:
    """Draw the style's shape, filled with its texture, with per-product jitter."""
    bg = tuple(min(255, max(0, c + rng.randint(-12, 12))) for c in BACKGROUNDS[style.background])
    im = Image.new("RGB", (size, size), bg)
    colour = tuple(min(255, max(0, c + rng.randint(-20, 20))) for c in COLOURS[style.colour])
    half = int(size * rng.uniform(0.28, 0.4))
    cx = size // 2 + rng.randint(-size // 10, size // 10)
    cy = size // 2 + rng.randint(-size // 10, size // 10)
    box = (cx - half, cy - half, cx + half, cy + half)
    mask = Image.new("L", (size, size), 0)
    md = ImageDraw.Draw(mask)
    x0, y0, x1, y1 = box
    if style.shape == "circle":
        md.ellipse(box, fill=255)
    elif style.shape == "square":
        md.rectangle(box, fill=255)
    elif style.shape == "triangle":
        md.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=255)
    elif style.shape == "diamond":
        md.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=255)
    elif style.shape == "cross":
        w = half // 3
        md.rectangle([cx - w, y0, cx + w, y1], fill=255)
        md.rectangle([x0, cy - w, x1, cy + w], fill=255)
    elif style.shape == "ring":
        md.ellipse(box, fill=255)
        md.ellipse([x0 + half // 2, y0 + half // 2, x1 - half // 2, y1 - half // 2], fill=0)
    elif style.shape == "star":
        pts = []
        for k in range(10):
            r = half if k % 2 == 0 else half * 0.45
            a = math.pi / 5 * k - math.pi / 2
            pts.append((cx + r * math.cos(a), cy + r * math.sin(a)))
        md.polygon(pts, fill=255)
    else:  # bar
        md.rectangle([x0, cy - half // 3, x1, cy + half // 3], fill=255)
    fill = Image.new("RGB", (size, size), colour)
    if style.texture != "solid":
        lighter = tuple(min(255, c + 90) for c in colour)
        fill = Image.new("RGB", (size, size), lighter)
        _texture(ImageDraw.Draw(fill), box, style.texture, colour, rng)
    im.paste(fill, (0, 0), mask)
    return im


def _text(words: tuple[str, str], rng: random.Random) -> tuple[str, str]:
    a, b = words
    if rng.random() < 0.5:
        a, b = b, a
    title = rng.choice(TITLE_TEMPLATES).format(a=a.capitalize(), b=b)
    g1, g2 = rng.sample(GENERIC, 2)
    description = rng.choice(DESC_TEMPLATES).format(a=a, b=b, g1=g1, g2=g2)
    return title, description


def class_kinds(n_classes: int) -> list[str]:
    """Cycle image, text, both, both; "both" classes come in pairs, so an odd one out is text."""
    kinds = [("image", "text", "both", "both")[i % 4] for i in range(n_classes)]
    if kinds.count("both") % 2:
        kinds[-1] = "text"
    return kinds


def make_catalogue(
    out: str | Path,
    n_products: int = 600,
    n_classes: int = 6,
    *,
    seed: int = 0,
    misleading_text: float = 0.0,
    drop_image: float = 0.0,
    drop_text: float = 0.0,
    image_size: int = 96,
    group_size: int = 2,
    feed_name: str = "catalogue.csv",
    kinds: list[str] | None = None,
    class_seed: int | None = None,
) -> Path:
    """Write OUT/catalogue.csv, OUT/images/*.jpg and OUT/classes.json; return the feed path.

    kinds overrides the per-class modality (default: class_kinds). The classes (words, pictures)
    come from class_seed (default: seed) and the products from seed, so a second call with the
    same class_seed and another seed makes fresh products of the same classes.
    """
    if n_classes < 2:
        raise UserError("need at least 2 classes")
    kinds = list(kinds) if kinds is not None else class_kinds(n_classes)
    if len(kinds) != n_classes or set(kinds) - {"image", "text", "both"} or kinds.count("both") % 2:
        raise UserError("kinds: one of image/text/both per class, with an even number of both")
    if any(k == "both" and kinds[:i].count("both") % 2 == 0 and kinds[i + 1] != "both" for i, k in enumerate(kinds)):
        raise UserError("kinds: both classes come in adjacent pairs")
    if not 0 <= misleading_text <= 1 or not 0 <= drop_image <= 1 or not 0 <= drop_text <= 1:
        raise UserError("fractions must lie in [0, 1]")
    rng = random.Random(seed if class_seed is None else class_seed)
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)

    names = [f"{kind}_{i:02d}" for i, kind in enumerate(kinds)]
    styles = _styles(rng)
    own_styles = iter(styles[: len(styles) // 2])  # one picture per image class, two per both pair
    generic_styles = styles[len(styles) // 2 :]  # pictures shared by all text classes
    words = [tuple(rng.sample(WORDS, 2)) for _ in range(n_classes)]
    generic_words = [tuple(rng.sample(GENERIC, 2)) for _ in range(8)]

    # per class: the (word sets, pictures) combinations a product group is drawn from
    combos: list[list[tuple[list, list]]] = []
    for i, kind in enumerate(kinds):
        if kind == "image":
            combos.append([(generic_words, [next(own_styles)])])
        elif kind == "text":
            combos.append([([words[i]], generic_styles)])
        elif kinds[:i].count("both") % 2 == 0:  # first of a pair: (w1, s1) or (w2, s2)
            s1, s2 = next(own_styles), next(own_styles)
            combos.append([([words[i]], [s1]), ([words[i + 1]], [s2])])
        else:  # second of the pair: (w1, s2) or (w2, s1)
            (w1, (s1,)), (w2, (s2,)) = combos[i - 1]
            combos.append([(w1, [s2]), (w2, [s1])])

    rng = random.Random(seed) if class_seed is not None else rng
    feed = out / feed_name
    with open(feed, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["product_id", "group_id", "title", "description", "image", "category", "class_modality", "text_misleading"])
        pid = 0
        group = 0
        while pid < n_products:
            c = rng.randrange(n_classes)
            word_sets, pictures = rng.choice(combos[c])
            title, description = _text(rng.choice(word_sets), rng)
            misleading = rng.random() < misleading_text
            if misleading:
                other = rng.choice([k for k in range(n_classes) if k != c])
                title, description = _text(rng.choice(rng.choice(combos[other])[0]), rng)
            for _ in range(min(rng.randint(1, group_size), n_products - pid)):
                image = f"images/p{pid:06d}.jpg"
                render(rng.choice(pictures), image_size, rng).save(out / image, quality=90)
                t, d = title, description
                if rng.random() < drop_image:
                    image = ""
                elif rng.random() < drop_text:
                    t, d = "", ""
                w.writerow([f"P{pid:06d}", f"G{group:05d}", t, d, image, names[c], kinds[c], int(misleading)])
                pid += 1
            group += 1
    (out / "classes.json").write_text(json.dumps(dict(zip(names, kinds)), indent=2))
    return feed
