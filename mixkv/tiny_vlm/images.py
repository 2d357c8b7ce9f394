"""Character-cell images for the tiny VLM: note boards, bar charts and GUI screens.

Every image is a ``GRID x GRID`` grid of ``CELL``-pixel square cells (320 x 320 pixels, 400 cells),
one cell per image token of the tiny VLM's vision encoder (patch size = cell size). Each cell shows
at most one character; bars, button frames, title bars, rules and tinted panels are drawn across
cells as real documents and screens have them. The renderer knows what every cell holds, so each
image comes with its *cell labels*: the character a reader would write for that cell, in reading
order (``" "`` for background and for anything drawn without text - bars, frames, bands -, and
``"\\n"`` for the right-margin column that ends every row). The vision encoder is trained to emit,
for each cell, the language model's embedding of that label, so the frozen language model reads the
image as text, one character per token.

Three task families (:data:`FAMILIES`):

* ``"board"`` -- a note board of 8 to 14 ``"Name Surname: 482913"`` lines under a title;
  "What is the code next to Ada Moss?"; the assistant's answer starts with ``"Ada Moss:"``.
* ``"chart"`` -- a horizontal bar chart of 4 to 8 labelled bars with their values at the bar ends
  (ChartQA-like); "What is the value of Plums?"; the answer starts with ``"Plums:"``.
* ``"gui"`` -- an application window with 3 to 6 buttons, each tagged with a numbered mark
  (set-of-marks prompting, as GUI agents use on ScreenSpot: each button reads ``"Save:"`` and its
  mark's digit follows in a dark tag); "Which mark does the Save button have?"; the answer starts
  with ``"Save:"`` and the model answers the mark, which stands for that button's box: the answer's
  point is the centre of the marked button, correct when it lies inside the target button.

Each example is drawn from its own generator seeded with ``(split, family, seed, index)``, so the
same arguments always give the same image and labels, and the training, validation and test
splits never share an image.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from PIL import Image, ImageDraw, ImageFont

__all__ = [
    "CELL",
    "CHARSET",
    "FAMILIES",
    "GRID",
    "IMAGE_SIZE",
    "SPLITS",
    "CellImage",
    "distinct_names",
    "render",
    "render_board",
    "render_gui_ids",
]

CELL = 16
"""Side of one cell in pixels (= the vision encoder's patch size)."""
GRID = 20
"""Cells per row and per column."""
IMAGE_SIZE = CELL * GRID
"""Side of every image in pixels (320)."""
FAMILIES: tuple[str, ...] = ("board", "chart", "gui")
"""Task families :func:`render` draws."""

# Characters a cell may be labelled with. No capital I, capital O or "|": in Pillow's built-in font
# they look like "l", "0" and "l", and nothing here needs them. "#" (once the bars' label, now unused)
# stays so that the recorded training runs (docs/tiny-vlm.md) reproduce with this charset.
_LETTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ"
CHARSET: str = " \n#" + _LETTERS + "0123456789:.()[]-+/%"
"""Every cell label, in a fixed order (index = class id)."""

_FIRST = (
    "Ada", "Ben", "Cara", "Dan", "Eva", "Finn", "Gus", "Hana", "Jack", "Kim", "Leo", "Mia",
    "Nora", "Pia", "Quinn", "Rosa", "Sam", "Tara", "Uma", "Vic", "Wes", "Yara", "Zoe", "Max",
)  # fmt: skip
_LAST = (
    "Moss", "Reed", "Hart", "Lane", "Cole", "Park", "Shaw", "Wood", "Ford", "Hale", "Kent",
    "Lowe", "Nash", "Pope", "Rich", "Snow", "Vale", "West", "Young", "Gray", "Bell", "Dunn",
)  # fmt: skip
_BOARD_TITLES = ("Locker codes", "Staff codes", "Door codes", "Guest list", "Access codes", "Team pins")
_CATEGORIES = (
    "Apples", "Pears", "Plums", "Figs", "Kiwis", "Limes", "Dates", "Grapes", "Melons", "Rye",
    "Rice", "Corn", "Wheat", "Beans", "Peas", "Nuts", "Tea", "Cocoa",
)  # fmt: skip
_CHART_TITLES = ("Sales (units)", "Harvest (tons)", "Stock (boxes)", "Units per day", "Yield (kg)")
_BUTTONS = (
    "Save", "Find", "Cancel", "Delete", "Print", "Search", "Export", "Share", "Help", "Undo",
    "Redo", "Copy", "Paste", "Close", "Send", "Reply", "Upload", "Login", "Submit", "Next",
    "Back", "Edit", "Zoom", "Rename",
)  # fmt: skip
_WINDOW_TITLES = ("Settings", "Editor", "File manager", "Mail", "Photos", "Dashboard", "Terminal")
_STATIC = ("Status: ready", "Version 2.4", "Untitled", "3 items", "Page 1 of 4", "Draft")

Color = tuple[int, int, int]


@dataclass
class CellImage:
    """One rendered image with what each of its cells holds, and one question about it.

    Attributes
    ----------
    image : PIL.Image.Image
        RGB image, ``IMAGE_SIZE`` x ``IMAGE_SIZE``.
    labels : list of str
        ``GRID * GRID`` cell labels in reading order (row by row), each a character of
        :data:`CHARSET`.
    question : str
        The question asked about the image.
    answer_prefix : str
        Text the assistant's answer starts with (the row's key, as the image writes it).
    answer : str
        The reference answer that follows the prefix (a code, a value or a mark number).
    extra : dict
        Family-specific fields: ``board`` has ``names`` and ``codes`` (row by row), ``chart``
        ``categories`` and ``values``, ``gui`` ``buttons``, ``marks`` (mark number -> button box in
        pixels), ``mark_of`` (button label -> its mark number) and ``bbox`` (the target button's
        box).
    """

    image: Image.Image
    labels: list[str]
    question: str
    answer_prefix: str
    answer: str
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def text(self) -> str:
        """The cell labels joined: what the image says, as the language model should read it."""
        return "".join(self.labels)


class _Canvas:
    """An image and its cell labels, written together so they cannot disagree."""

    def __init__(self, rng: random.Random, background: Color) -> None:
        self.rng = rng
        self.image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), background)
        self.draw = ImageDraw.Draw(self.image)
        self.grid = [[" "] * GRID for _ in range(GRID)]
        for row in self.grid:
            row[-1] = "\n"  # the right-margin column ends every row
        self.font = ImageFont.load_default(size=rng.randint(11, 14))

    def fill_cells(self, row: int, col: int, width: int, color: Color, *, inset: int = 0) -> None:
        """Paint a band of ``width`` cells (decoration: the labels do not change)."""
        x1, y1 = col * CELL + inset, row * CELL + inset
        self.draw.rectangle(
            (x1, y1, (col + width) * CELL - 1 - inset, (row + 1) * CELL - 1 - inset), fill=color
        )

    def write(self, row: int, col: int, text: str, color: Color) -> None:
        """Draw ``text`` one character per cell from ``(row, col)`` and record the labels."""
        if col < 0 or col + len(text) > GRID - 1 or not 0 <= row < GRID:
            raise ValueError(
                f"text {text!r} at ({row}, {col}) does not fit in the {GRID - 1} usable columns."
            )
        jitter_x, jitter_y = self.rng.randint(-1, 1), self.rng.randint(-1, 1)
        for i, char in enumerate(text):
            if char not in CHARSET:
                raise ValueError(f"character {char!r} of {text!r} is not in CHARSET.")
            self.grid[row][col + i] = char
            if char != " ":
                center = ((col + i) * CELL + CELL // 2 + jitter_x, row * CELL + CELL // 2 + jitter_y)
                self.draw.text(center, char, font=self.font, fill=color, anchor="mm")

    def result(self, question: str, prefix: str, answer: str, extra: dict[str, Any]) -> CellImage:
        labels = [char for row in self.grid for char in row]
        return CellImage(self.image, labels, question, prefix, answer, extra)


def _light(rng: random.Random) -> Color:
    return (rng.randint(222, 255), rng.randint(222, 255), rng.randint(222, 255))


def _dark(rng: random.Random) -> Color:
    return (rng.randint(0, 70), rng.randint(0, 70), rng.randint(0, 90))


def _render_board(rng: random.Random, given_names: list[str] | None = None) -> CellImage:
    canvas = _Canvas(rng, _light(rng))
    ink = _dark(rng)
    title = rng.choice(_BOARD_TITLES)
    canvas.fill_cells(0, 0, GRID, (rng.randint(150, 210),) * 3)  # header band
    canvas.write(0, rng.randint(0, GRID - 1 - len(title)), title, (255, 255, 255))
    names: list[str] = list(given_names or [])
    k = len(names) or rng.randint(8, 14)
    while len(names) < k:
        name = f"{rng.choice(_FIRST)} {rng.choice(_LAST)}"
        if name not in names:
            names.append(name)
    codes = [f"{rng.randint(100000, 999999)}" for _ in names]
    free_rows = list(range(2, GRID))
    rows = sorted(rng.sample(free_rows, k))
    for name, code, row in zip(names, codes, rows, strict=True):
        line = f"{name}: {code}"
        canvas.write(row, rng.randint(0, GRID - 1 - len(line)), line, ink)
    for row in rng.sample([r for r in free_rows if r not in rows], rng.randint(0, 2)):
        y = row * CELL + CELL // 2
        canvas.draw.line((0, y, IMAGE_SIZE - CELL, y), fill=(rng.randint(170, 215),) * 3, width=1)  # rule
    target = rng.randrange(k)
    extra = {"names": names, "codes": codes, "target": names[target]}
    question = f"What is the code next to {names[target]}?"
    return canvas.result(question, f"{names[target]}:", codes[target], extra)


def _render_chart(rng: random.Random) -> CellImage:
    canvas = _Canvas(rng, (255, 255, 255) if rng.random() < 0.5 else _light(rng))
    ink = _dark(rng)
    title = rng.choice(_CHART_TITLES)
    canvas.write(0, rng.randint(0, GRID - 1 - len(title)), title, ink)
    k = rng.randint(4, 8)
    categories = rng.sample(_CATEGORIES, k)
    values = [rng.randint(1, 99) for _ in categories]
    label_width = max(len(c) for c in categories) + 1
    bar_room = GRID - 1 - label_width - 3  # a space and two digits after the longest bar
    step = 2 if 2 * k + 2 <= GRID else 1  # a blank row between bars when they fit
    top = rng.randint(2, GRID - step * k)
    colors = [rng.choice(((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189)))] * k
    if rng.random() < 0.5:
        colors = [(rng.randint(20, 220), rng.randint(20, 220), rng.randint(20, 220)) for _ in categories]
    axis_x = label_width * CELL - 2
    canvas.draw.line((axis_x, top * CELL, axis_x, (top + step * k) * CELL), fill=(60, 60, 60), width=1)
    for i, (category, value) in enumerate(zip(categories, values, strict=True)):
        row = top + step * i
        canvas.write(row, 0, category, ink)
        length = max(1, round(bar_room * value / 99))
        canvas.fill_cells(row, label_width, length, colors[i], inset=2)
        canvas.write(row, label_width + length + 1, str(value), ink)
    target = rng.randrange(k)
    extra = {"categories": categories, "values": values, "target": categories[target]}
    question = f"What is the value of {categories[target]}?"
    return canvas.result(question, f"{categories[target]}:", str(values[target]), extra)


def _render_gui(rng: random.Random, id_digits: int | None = None) -> CellImage:
    """A window of buttons tagged with one-digit marks (set-of-marks) or, with ``id_digits``, with
    numeric ids of that many digits written after each label."""
    canvas = _Canvas(rng, (rng.randint(232, 250),) * 3)
    title_color: Color = (rng.randint(30, 70), rng.randint(60, 110), rng.randint(120, 180))
    canvas.fill_cells(0, 0, GRID, title_color)
    title = rng.choice(_WINDOW_TITLES)
    canvas.write(0, 1, title, (255, 255, 255))
    k = rng.randint(3, 6)
    labels = rng.sample(_BUTTONS, k)
    rows = sorted(rng.sample(range(2, GRID - 1, 2), k))  # one button per row pair, rows 2..18
    button_fill: Color = (rng.randint(190, 215), rng.randint(205, 225), rng.randint(230, 250))
    digits = 1 if id_digits is None else id_digits
    marks = rng.sample(range(1, 10) if id_digits is None else range(10 ** (digits - 1), 10**digits), k)
    boxes: dict[str, list[int]] = {}
    mark_boxes: dict[str, list[int]] = {}
    for label, row, mark in zip(labels, rows, marks, strict=True):
        width = len(label) + 2  # a padding cell, the label, its colon (inside the button)
        col = rng.randint(0, GRID - 1 - digits - width)
        box = [col * CELL, row * CELL - 3, (col + width) * CELL - 1, (row + 1) * CELL + 2]
        canvas.draw.rounded_rectangle(box, radius=4, fill=button_fill, outline=(80, 80, 80), width=1)
        canvas.write(row, col + 1, label + ":", (15, 15, 15))
        if id_digits is None:
            # The set-of-marks tag: a dark square with the mark's digit, just right of the button.
            canvas.fill_cells(row, col + width, 1, (20, 20, 20), inset=1)
            canvas.write(row, col + width, str(mark), (255, 255, 255))
        else:
            # Plain dark digits: the frozen model reads a white-on-dark tag as one digit only.
            canvas.write(row, col + width, str(mark), (15, 15, 15))
        boxes[label] = box
        mark_boxes[str(mark)] = box
    free = [r for r in range(2, GRID) if r not in rows]
    for text, row in zip(rng.sample(_STATIC, rng.randint(1, 2)), rng.sample(free, 2), strict=False):
        canvas.write(row, rng.randint(0, GRID - 1 - len(text)), text, (70, 70, 70))
    target = rng.randrange(k)
    extra = {
        "buttons": labels,
        "marks": mark_boxes,
        "mark_of": {label: str(mark) for label, mark in zip(labels, marks, strict=True)},
        "bbox": boxes[labels[target]],
        "target": labels[target],
    }
    if id_digits is None:
        question = f"Which mark does the {labels[target]} button have?"
    else:
        question = f"What is the number next to the {labels[target]} button?"
    return canvas.result(question, f"{labels[target]}:", str(marks[target]), extra)


_RENDERERS = {"board": _render_board, "chart": _render_chart, "gui": _render_gui}


def distinct_names(rng: random.Random, count: int) -> list[str]:
    """``count`` names ``"First Last"`` no two of which share a first name or a surname.

    Raises
    ------
    ValueError
        If ``count`` exceeds the smaller of the two name lists (22).
    """
    if not 0 <= count <= min(len(_FIRST), len(_LAST)):
        raise ValueError(f"count must be between 0 and {min(len(_FIRST), len(_LAST))}, got {count}.")
    return [
        f"{first} {last}"
        for first, last in zip(rng.sample(_FIRST, count), rng.sample(_LAST, count), strict=True)
    ]


def render_board(key: str, names: list[str]) -> CellImage:
    """A note board listing exactly ``names`` (in rows drawn at random), its look, codes and layout
    drawn from a generator seeded with ``key``.

    The several-image tasks use it to give names that no other board of the prompt repeats; ``key``
    should start with a split (``"test/..."``) so that it never draws a training image.

    Raises
    ------
    ValueError
        If ``names`` is empty, repeats a name or has more than 18 names (the board's free rows).
    """
    if not names or len(set(names)) != len(names) or len(names) > GRID - 2:
        raise ValueError(f"names must be 1 to {GRID - 2} distinct names, got {names!r}.")
    return _render_board(random.Random(key), names)


def render_gui_ids(key: str, digits: int = 3) -> CellImage:
    """An application window whose 3-6 buttons each carry a ``digits``-digit id after their label
    (``"Save: 472"``), drawn from a generator seeded with ``key``; "What is the number next to
    the Save button?", answered after the prefix ``"Save:"``.

    The ``gui`` family's layout with longer marks: a press keeps a one-digit mark even at budget 32
    (the question's tokens in the observation window attended to the whole image before
    compression and carry it), while a 3-digit id needs the image entries that hold it. ``key``
    should start with a split (``"test/..."``) so that it never draws a training image.

    Raises
    ------
    ValueError
        If ``digits`` is not 2 to 4.
    """
    if not 2 <= digits <= 4:
        raise ValueError(f"digits must be 2 to 4, got {digits}.")
    return _render_gui(random.Random(key), id_digits=digits)


SPLITS: tuple[str, ...] = ("train", "validation", "test")
"""Disjoint streams of images: training, validation during training, and held-out test sets."""


def render(family: str, seed: int, index: int, split: str = "test") -> CellImage:
    """Render example ``index`` of ``family`` for ``seed`` in ``split`` (:data:`SPLITS`).

    Each ``(split, family, seed, index)`` seeds its own generator, so test images are never
    training images.

    Raises
    ------
    ValueError
        If ``family`` is not one of :data:`FAMILIES` or ``split`` not one of :data:`SPLITS`.
    """
    if family not in _RENDERERS:
        raise ValueError(f"unknown family {family!r}; use one of {', '.join(FAMILIES)}.")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}.")
    return _RENDERERS[family](random.Random(f"{split}/{family}/{seed}/{index}"))
