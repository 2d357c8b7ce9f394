"""Seeded synthetic multimodal evaluation suites rendered with Pillow.

Three tasks need no downloaded data and only Pillow's built-in font:

* ``"text_reading"`` -- an alphanumeric code in a frame among distractor words;
  "What is the code written in the image?"; metric ``anls``.
* ``"bar_chart"`` -- a labelled bar chart; "What is the value of <category>?";
  metric ``relaxed_accuracy``.
* ``"gui_grounding"`` -- a fake application window with buttons and static labels;
  "Click on the <label> button."; the answer is the button's box; metric ``point_in_box``.

and one video task:

* ``"video_needle"`` -- a short clip of rendered frames (distractor words on a light
  background) where a framed code appears in one frame only; "One frame of this video shows a
  code in a box. What is the code?"; metric ``anls`` (:func:`make_synthetic_video_suite`).

Each example is drawn from its own random generator seeded with ``(task, seed, index)``, so
the same seed always yields byte-identical PNG files, and a suite of ``n`` examples is a
prefix of a suite of ``n + k`` examples with the same seed.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from mixkv.eval.mm_example import MMExample, save_png

__all__ = [
    "SYNTHETIC_TASKS",
    "TEXT_READING_QUESTION",
    "VIDEO_NEEDLE_QUESTION",
    "make_synthetic_suite",
    "make_synthetic_video_suite",
]

SYNTHETIC_TASKS: tuple[str, ...] = ("text_reading", "bar_chart", "gui_grounding")
"""Names accepted by :func:`make_synthetic_suite`."""

TEXT_READING_QUESTION = "What is the code written in the image?"
"""Question of every ``text_reading`` example."""

VIDEO_NEEDLE_QUESTION = "One frame of this video shows a code in a box. What is the code?"
"""Question of every ``video_needle`` example."""

_MIN_SIDE = 128
_MAX_SIDE = 4096
# No 0/O, 1/I/L so that the code is unambiguous to read.
_CODE_ALPHABET = "ABCDEFGHJKMNPQRSTUVWXYZ23456789"
_DISTRACTOR_WORDS = (
    "apple",
    "river",
    "stone",
    "paper",
    "cloud",
    "lamp",
    "forest",
    "window",
    "garden",
    "silver",
    "yellow",
    "ticket",
    "market",
    "orange",
    "pencil",
    "bridge",
    "winter",
    "planet",
    "coffee",
    "mirror",
)
_CATEGORIES = (
    "Apples",
    "Pears",
    "Plums",
    "Figs",
    "Kiwis",
    "Limes",
    "Dates",
    "Grapes",
    "Melons",
    "Berry",
    "Oats",
    "Rice",
    "Corn",
    "Wheat",
    "Beans",
)
_BAR_COLORS = (
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (23, 190, 207),
)
_BUTTON_LABELS = (
    "Save",
    "Open",
    "Cancel",
    "Delete",
    "Print",
    "Search",
    "Export",
    "Import",
    "Share",
    "Settings",
    "Help",
    "Refresh",
    "Upload",
    "Login",
    "Submit",
    "Undo",
    "Redo",
    "Copy",
    "Paste",
    "Close",
)
_STATIC_LABELS = ("Status: ready", "Version 2.4", "Untitled", "3 items", "Offline", "Page 1 of 4", "Draft")
_WINDOW_TITLES = ("Settings", "Document Editor", "File Manager", "Mail", "Photo Viewer", "Dashboard")

Color = tuple[int, int, int]
Box = tuple[int, int, int, int]
FontT = ImageFont.FreeTypeFont | ImageFont.ImageFont


def _font(size: int) -> FontT:
    """Pillow's default font at ``size`` pixels (the fixed bitmap font on old Pillow)."""
    try:
        return ImageFont.load_default(size=max(6, int(size)))
    except (TypeError, AttributeError, OSError):  # Pillow < 10.1 or no FreeType support
        return ImageFont.load_default()


def _text_box(draw: ImageDraw.ImageDraw, xy: tuple[int, int], text: str, font: FontT) -> Box:
    """Pixel box ``(x1, y1, x2, y2)`` that ``text`` drawn at ``xy`` would cover."""
    x1, y1, x2, y2 = draw.textbbox(xy, text, font=font)
    return int(x1), int(y1), int(x2), int(y2)


def _overlaps(a: Box, b: Box, margin: int = 0) -> bool:
    """Whether two boxes intersect once ``a`` is grown by ``margin`` pixels."""
    return not (
        a[2] + margin <= b[0] or b[2] <= a[0] - margin or a[3] + margin <= b[1] or b[3] <= a[1] - margin
    )


def _light(rng: random.Random) -> Color:
    """A random light background colour."""
    return (rng.randint(225, 255), rng.randint(225, 255), rng.randint(225, 255))


def _fit_font(draw: ImageDraw.ImageDraw, texts: list[str], size: int, max_width: int) -> FontT:
    """The largest default font, at most ``size`` px, whose rendering of every text fits ``max_width``."""
    while True:
        font = _font(size)
        widest = max(_text_box(draw, (0, 0), t, font)[2] for t in texts)
        if widest <= max_width or size <= 6:
            return font
        size -= 1


# ----------------------------------------------------------------------------------------------
# Renderers: each returns (image, question, answers, metric, extra)
# ----------------------------------------------------------------------------------------------
_Rendered = tuple[Image.Image, str, list[str], str, dict[str, object]]


def _render_text_reading(rng: random.Random, width: int, height: int) -> _Rendered:
    """A framed random code among scattered lowercase distractor words."""
    background = _light(rng)
    image = Image.new("RGB", (width, height), background)
    draw = ImageDraw.Draw(image)
    side = min(width, height)
    code = "".join(rng.choice(_CODE_ALPHABET) for _ in range(rng.randint(5, 7)))
    code_font = _fit_font(draw, [code], max(12, side // 9), width - 40)
    pad = max(4, side // 50)
    cx1, cy1, cx2, cy2 = _text_box(draw, (0, 0), code, code_font)
    code_w, code_h = cx2 - cx1, cy2 - cy1
    x = rng.randint(pad + 2, max(pad + 2, width - code_w - pad - 2)) - cx1
    y = rng.randint(pad + 2, max(pad + 2, height - code_h - pad - 2)) - cy1
    text_color: Color = (rng.randint(0, 60), rng.randint(0, 60), rng.randint(0, 60))
    code_box = _text_box(draw, (x, y), code, code_font)
    frame = (code_box[0] - pad, code_box[1] - pad, code_box[2] + pad, code_box[3] + pad)
    draw.rectangle(frame, outline=text_color, width=max(1, side // 200))
    draw.text((x, y), code, fill=text_color, font=code_font)

    words = _draw_distractor_words(rng, draw, width, height, [frame])
    extra: dict[str, object] = {
        "code_bbox": list(code_box),
        "distractors": words,
        "background_color": list(background),
    }
    return image, TEXT_READING_QUESTION, [code], "anls", extra


def _draw_distractor_words(
    rng: random.Random, draw: ImageDraw.ImageDraw, width: int, height: int, placed: list[Box]
) -> list[str]:
    """Scatter 4-8 gray lowercase words where they overlap nothing in ``placed``; return them."""
    side = min(width, height)
    word_font = _font(max(8, side // 24))
    words: list[str] = []
    for word in rng.sample(_DISTRACTOR_WORDS, rng.randint(4, 8)):
        for _ in range(40):
            wx = rng.randint(2, max(2, width - side // 4))
            wy = rng.randint(2, max(2, height - side // 20))
            box = _text_box(draw, (wx, wy), word, word_font)
            inside = box[2] < width - 2 and box[3] < height - 2
            if inside and not any(_overlaps(box, p, margin=4) for p in placed):
                gray = rng.randint(70, 140)
                draw.text((wx, wy), word, fill=(gray, gray, gray), font=word_font)
                placed.append(box)
                words.append(word)
                break
    return words


def _render_bar_chart(rng: random.Random, width: int, height: int) -> _Rendered:
    """A vertical bar chart with category labels under and value labels above the bars."""
    background: Color = (255, 255, 255)
    image = Image.new("RGB", (width, height), background)
    draw = ImageDraw.Draw(image)
    side = min(width, height)
    k = rng.randint(3, 6)
    categories = rng.sample(_CATEGORIES, k)
    values = [rng.randint(1, 99) for _ in range(k)]
    y_max = 20 * ((max(values) + 5) // 20 + 1)  # room above the tallest bar for its value label

    title_font = _font(max(8, side // 22))
    tick_font = _font(max(7, side // 34))
    left = max(24, width // 9)
    right = width - max(8, width // 30)
    top = max(20, height // 8)
    bottom = height - max(20, height // 9)
    draw.text((left, max(2, top // 4)), "Production (tons)", fill=(20, 20, 20), font=title_font)

    for tick in range(0, y_max + 1, 20):
        ty = bottom - round((bottom - top) * tick / y_max)
        draw.line((left, ty, right, ty), fill=(225, 225, 225), width=1)
        tb = _text_box(draw, (0, 0), str(tick), tick_font)
        draw.text(
            (left - 4 - (tb[2] - tb[0]), ty - (tb[3] - tb[1]) // 2 - tb[1]),
            str(tick),
            fill=(90, 90, 90),
            font=tick_font,
        )
    draw.line((left, top, left, bottom), fill=(40, 40, 40), width=1)
    draw.line((left, bottom, right, bottom), fill=(40, 40, 40), width=1)

    slot = (right - left) / k
    bar_w = max(4, int(slot * 0.6))
    label_font = _fit_font(draw, categories, max(7, side // 28), int(slot) - 4)
    value_font = _fit_font(draw, [str(v) for v in values], max(7, side // 28), int(slot) - 2)
    colors = rng.sample(_BAR_COLORS, k) if rng.random() < 0.5 else [rng.choice(_BAR_COLORS)] * k
    bar_boxes: list[list[int]] = []
    for i, (cat, value) in enumerate(zip(categories, values, strict=True)):
        center = left + slot * (i + 0.5)
        x1 = round(center - bar_w / 2)
        x2 = x1 + bar_w
        y1 = bottom - round((bottom - top) * value / y_max)
        draw.rectangle((x1, y1, x2, bottom - 1), fill=colors[i])
        bar_boxes.append([x1, y1, x2, bottom - 1])
        vb = _text_box(draw, (0, 0), str(value), value_font)
        draw.text(
            (round(center - (vb[2] - vb[0]) / 2) - vb[0], y1 - 3 - vb[3]),
            str(value),
            fill=(20, 20, 20),
            font=value_font,
        )
        lb = _text_box(draw, (0, 0), cat, label_font)
        draw.text(
            (round(center - (lb[2] - lb[0]) / 2) - lb[0], bottom + 4 - lb[1]),
            cat,
            fill=(20, 20, 20),
            font=label_font,
        )

    target = rng.randrange(k)
    extra: dict[str, object] = {
        "categories": categories,
        "values": values,
        "target_category": categories[target],
        "bar_bbox": bar_boxes[target],
        "bar_color": list(colors[target]),
        "background_color": list(background),
    }
    question = f"What is the value of {categories[target]}?"
    return image, question, [str(values[target])], "relaxed_accuracy", extra


def _render_gui(rng: random.Random, width: int, height: int) -> _Rendered:
    """A fake window with a title bar, a grid of buttons and a few static labels."""
    background: Color = (rng.randint(236, 250),) * 3
    image = Image.new("RGB", (width, height), background)
    draw = ImageDraw.Draw(image)
    side = min(width, height)
    title_h = max(18, height // 11)
    title_color: Color = (rng.randint(30, 70), rng.randint(60, 110), rng.randint(120, 180))
    draw.rectangle((0, 0, width - 1, title_h), fill=title_color)
    title_font = _font(max(8, title_h * 5 // 10))
    tb = _text_box(draw, (0, 0), "X", title_font)
    draw.text(
        (10, (title_h - (tb[3] - tb[1])) // 2 - tb[1]),
        rng.choice(_WINDOW_TITLES),
        fill=(255, 255, 255),
        font=title_font,
    )

    cols = rng.randint(2, 3)
    rows = rng.randint(3, 4)
    cell_w = width / cols
    cell_h = (height - title_h) / rows
    cells = [(r, c) for r in range(rows) for c in range(cols)]
    rng.shuffle(cells)
    n_buttons = rng.randint(4, min(8, len(cells) - 1))
    labels = rng.sample(_BUTTON_LABELS, n_buttons)
    pad_x = max(6, side // 40)
    pad_y = max(4, side // 60)
    button_font = _fit_font(draw, labels, max(8, side // 26), int(cell_w) - 2 * pad_x - 8)
    fill: Color = (rng.randint(190, 215), rng.randint(205, 225), rng.randint(230, 250))
    outline: Color = (rng.randint(60, 100),) * 3

    boxes: dict[str, list[int]] = {}
    for label, (r, c) in zip(labels, cells[:n_buttons], strict=True):
        lb = _text_box(draw, (0, 0), label, button_font)
        bw = lb[2] - lb[0] + 2 * pad_x
        bh = lb[3] - lb[1] + 2 * pad_y
        cx0 = int(c * cell_w)
        cy0 = int(title_h + r * cell_h)
        x1 = cx0 + rng.randint(4, max(4, int(cell_w) - bw - 4))
        y1 = cy0 + rng.randint(4, max(4, int(cell_h) - bh - 4))
        box = [x1, y1, x1 + bw, y1 + bh]
        draw.rounded_rectangle(box, radius=max(2, bh // 5), fill=fill, outline=outline, width=1)
        draw.text((x1 + pad_x - lb[0], y1 + pad_y - lb[1]), label, fill=(15, 15, 15), font=button_font)
        boxes[label] = box

    static_font = _fit_font(draw, list(_STATIC_LABELS), max(7, side // 30), int(cell_w) - 8)
    statics = rng.sample(_STATIC_LABELS, min(len(cells) - n_buttons, rng.randint(1, 3)))
    for text, (r, c) in zip(statics, cells[n_buttons:], strict=False):
        sb = _text_box(draw, (0, 0), text, static_font)
        x = int(c * cell_w) + rng.randint(4, max(4, int(cell_w) - (sb[2] - sb[0]) - 4)) - sb[0]
        y = int(title_h + r * cell_h) + rng.randint(4, max(4, int(cell_h) - (sb[3] - sb[1]) - 4)) - sb[1]
        draw.text((x, y), text, fill=(70, 70, 70), font=static_font)

    target = rng.choice(labels)
    bbox = boxes[target]
    extra: dict[str, object] = {
        "bbox": [float(v) for v in bbox],
        "image_size": [width, height],
        "buttons": labels,
        "static_labels": statics,
        "background_color": list(background),
    }
    answer = f"[{bbox[0]}, {bbox[1]}, {bbox[2]}, {bbox[3]}]"
    return image, f"Click on the {target} button.", [answer], "point_in_box", extra


_RENDERERS: dict[str, Callable[[random.Random, int, int], _Rendered]] = {
    "text_reading": _render_text_reading,
    "bar_chart": _render_bar_chart,
    "gui_grounding": _render_gui,
}


def make_synthetic_suite(
    task: str, n: int, seed: int, out_dir: str | Path, image_size: tuple[int, int] = (448, 448)
) -> list[MMExample]:
    """Render ``n`` synthetic examples of ``task`` as PNG files and return them.

    Parameters
    ----------
    task : {"text_reading", "bar_chart", "gui_grounding"}
        Which suite to generate (see the module docstring).
    n : int
        Number of examples, at least 1.
    seed : int
        Seed; the same ``(task, seed, image_size)`` gives byte-identical files.
    out_dir : str or Path
        Folder for the images (created if needed); files are named ``<task>_<seed>_<index>.png``.
    image_size : (int, int), default (448, 448)
        ``(width, height)`` in pixels, each between 128 and 4096.

    Returns
    -------
    list of MMExample
        One example per image. ``extra`` always holds ``task``, ``seed``, ``index`` and
        ``background_color``; ``text_reading`` adds ``code_bbox``; ``bar_chart`` adds
        ``categories``, ``values``, ``bar_bbox``; ``gui_grounding`` adds ``bbox``
        (x1, y1, x2, y2 in pixels) and ``image_size``.

    Raises
    ------
    ValueError
        If ``task`` is unknown, ``n < 1`` or ``image_size`` is out of range.
    """
    if task not in _RENDERERS:
        raise ValueError(f"Unknown synthetic task {task!r}; choose one of {', '.join(SYNTHETIC_TASKS)}.")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}.")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}.")
    if (
        len(image_size) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in image_size)
        or not all(_MIN_SIDE <= v <= _MAX_SIDE for v in image_size)
    ):
        raise ValueError(
            f"image_size must be (width, height) ints between {_MIN_SIDE} and {_MAX_SIDE}, "
            f"got {image_size!r}."
        )
    width, height = image_size
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    renderer = _RENDERERS[task]
    examples: list[MMExample] = []
    for index in range(n):
        rng = random.Random(f"mixkv-synthetic/{task}/{seed}/{width}x{height}/{index}")
        image, question, answers, metric, extra = renderer(rng, width, height)
        path = out / f"{task}_{seed}_{index:05d}.png"
        save_png(image, path)
        extra = {"task": task, "seed": seed, "index": index, **extra}
        examples.append(
            MMExample(
                id=f"{task}_{seed}_{index:05d}",
                image_path=path,
                question=question,
                answers=answers,
                metric=metric,
                extra=extra,
            )
        )
    return examples


def make_synthetic_video_suite(
    n: int, seed: int, out_dir: str | Path, num_frames: int = 8, frame_size: tuple[int, int] = (224, 224)
) -> list[MMExample]:
    """Render ``n`` ``video_needle`` clips as PNG frames and return them as video examples.

    Every frame shows distractor words on its own light background; one frame, drawn at random,
    is a ``text_reading`` image (a framed code among distractors), so the answer is visible in
    that frame only.

    Parameters
    ----------
    n : int
        Number of clips, at least 1.
    seed : int
        Seed; the same ``(seed, num_frames, frame_size)`` gives byte-identical files.
    out_dir : str or Path
        Frames go to ``<out_dir>/video_needle_<seed>_<index>/frame_<k>.png``.
    num_frames : int, default 8
        Frames per clip, at least 2.
    frame_size : (int, int), default (224, 224)
        ``(width, height)`` of every frame, each between 128 and 4096.

    Returns
    -------
    list of MMExample
        Video examples (``frames`` set, ``image_path`` the clip's folder); ``extra`` holds
        ``task``, ``seed``, ``index``, ``needle_frame`` and ``code_bbox``.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}.")
    if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 2:
        raise ValueError(f"num_frames must be an int >= 2, got {num_frames!r}.")
    width, height = frame_size
    if not all(_MIN_SIDE <= v <= _MAX_SIDE for v in frame_size):
        raise ValueError(
            f"frame_size must be (width, height) between {_MIN_SIDE} and {_MAX_SIDE}, got {frame_size!r}."
        )
    examples = []
    for index in range(n):
        rng = random.Random(f"mixkv-synthetic/video_needle/{seed}/{num_frames}/{width}x{height}/{index}")
        needle = rng.randrange(num_frames)
        clip_id = f"video_needle_{seed}_{index:05d}"
        clip_dir = Path(out_dir) / clip_id
        clip_dir.mkdir(parents=True, exist_ok=True)
        frames = []
        for k in range(num_frames):
            if k == needle:
                image, _, answers, _, extra = _render_text_reading(rng, width, height)
            else:
                image = Image.new("RGB", (width, height), _light(rng))
                _draw_distractor_words(rng, ImageDraw.Draw(image), width, height, [])
            path = clip_dir / f"frame_{k:03d}.png"
            save_png(image, path)
            frames.append(path)
        examples.append(
            MMExample(
                id=clip_id,
                image_path=clip_dir,
                question=VIDEO_NEEDLE_QUESTION,
                answers=answers,
                metric="anls",
                extra={
                    "task": "video_needle",
                    "seed": seed,
                    "index": index,
                    "needle_frame": needle,
                    "code_bbox": extra["code_bbox"],
                },
                frames=frames,
            )
        )
    return examples
