"""Loaders of multimodal benchmarks from local files in their public formats.

Nothing is downloaded: each loader reads the annotation file of a benchmark (as distributed
by its authors) plus a folder of images, and returns a list of :class:`MMExample`. The
expected on-disk layout is documented in every loader. The loaders share one skeleton
(:func:`_load`): read the JSON file, take its list of records, keep the first ``limit``, check
the image folder, turn each record into an example; a benchmark brings its layout
(:class:`_Benchmark`) and how one record reads (``_<benchmark>_example``).

The module's one job is reading these files; most of its length is the documentation of each
benchmark's layout.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from mixkv.eval.mm_example import MMExample

__all__ = [
    "TEXTCAPS_PROMPT",
    "VIDEOMME_PROMPT",
    "load_chartqa",
    "load_docvqa",
    "load_ocrbench",
    "load_screenspot",
    "load_textcaps",
    "load_textvqa",
    "load_videomme",
]

TEXTCAPS_PROMPT = "Provide a one-sentence caption for the provided image."
"""Fixed question used for TextCaps captioning examples."""

VIDEOMME_PROMPT = "Answer with the option's letter from the given choices directly."
"""Instruction appended to every Video-MME question, after its options."""


# ----------------------------------------------------------------------------------------------
# Reading an annotation file
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Benchmark:
    """How a benchmark's files are laid out, as the loaders' errors describe them.

    Attributes
    ----------
    layout
        The expected layout, quoted by every error.
    folder
        What the image (or frames) folder is, as its error names it.
    records_key
        Top-level field of the annotation file holding the records; None for a bare list.
    """

    layout: str
    folder: str
    records_key: str | None


def _read_json(path: Path, layout: str) -> Any:
    """Read a JSON file, with errors that name the file and the expected layout."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Annotation file {path} not found. Expected layout: {layout}")
    try:
        with path.open(encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc}). Expected layout: {layout}") from exc


def _check_dir(path: Path, what: str, layout: str) -> Path:
    """Return ``path`` if it is a folder, else raise ``FileNotFoundError``."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{what} folder {path} not found. Expected layout: {layout}")
    return path


def _annotation_records(benchmark: _Benchmark, path: Path) -> list[dict[str, Any]]:
    """The list of records of an annotation file: ``data[records_key]`` or ``data`` itself."""
    data = _read_json(path, benchmark.layout)
    key, layout = benchmark.records_key, benchmark.layout
    records = data
    if key is not None:
        if not isinstance(data, dict) or key not in data:
            raise ValueError(f"{path} has no top-level {key!r} field. Expected layout: {layout}")
        records = data[key]
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        where = f"field {key!r} of {path}" if key is not None else str(path)
        raise ValueError(f"{where} must be a list of JSON objects. Expected layout: {layout}")
    return records


_Item = TypeVar("_Item")


def _limit(items: list[_Item], limit: int | None) -> list[_Item]:
    """The first ``limit`` items (all when ``limit`` is None)."""
    if limit is None:
        return items
    if limit < 0:
        raise ValueError(f"limit must be >= 0 or None, got {limit}.")
    return items[:limit]


def _image(path: Path, check: bool, layout: str) -> Path:
    """Return ``path``, raising ``FileNotFoundError`` if ``check`` and it does not exist."""
    if check and not path.is_file():
        raise FileNotFoundError(
            f"Image {path} not found. Expected layout: {layout} "
            "(or pass check_images=False to skip this check)."
        )
    return path


@dataclass(frozen=True)
class _Record:
    """One record of an annotation file; its errors name the file, the record and the layout."""

    fields: dict[str, Any]
    index: int
    path: Path
    layout: str
    check_images: bool

    def field(self, name: str) -> Any:
        """``fields[name]`` or a ``ValueError`` naming the file, the record and the field."""
        if name not in self.fields:
            raise ValueError(
                f"{self.path}: record {self.index} has no {name!r} field. Expected layout: {self.layout}"
            )
        return self.fields[name]

    def answers(self, value: Any) -> list[str]:
        """Answers given as a string, a number or a list of them, as a list of strings."""
        if isinstance(value, str):
            return [value]
        if isinstance(value, list) and all(isinstance(v, (str, int, float)) for v in value):
            return [str(v) for v in value]
        if isinstance(value, (int, float)):
            return [str(value)]
        raise ValueError(
            f"{self.path}: record {self.index} has answers of type {type(value).__name__}; expected str or list."
        )

    def image(self, path: Path) -> Path:
        """``path``, checked to exist when the loader checks images."""
        return _image(path, self.check_images, self.layout)


def _load(
    benchmark: _Benchmark,
    annotation_file: str | Path,
    folder: str | Path,
    limit: int | None,
    check_images: bool,
    to_example: Callable[[_Record, Path], MMExample],
) -> list[MMExample]:
    """The examples of the first ``limit`` records of an annotation file, one per record;
    ``to_example(record, folder)`` reads one record, ``folder`` holding its image."""
    path = Path(annotation_file)
    records = _limit(_annotation_records(benchmark, path), limit)
    base = _check_dir(Path(folder), benchmark.folder, benchmark.layout)
    return [
        to_example(_Record(fields, index, path, benchmark.layout, check_images), base)
        for index, fields in enumerate(records)
    ]


# ----------------------------------------------------------------------------------------------
# Loaders
# ----------------------------------------------------------------------------------------------
_DOCVQA = _Benchmark(
    layout=(
        'DocVQA task 1 annotations such as val_v1.0.json: {"dataset_name": ..., "data": '
        '[{"questionId": int, "question": str, "image": "documents/<name>.png", "docId": int, '
        '"answers": [str, ...]}]}, with "image" relative to the dataset root folder.'
    ),
    folder="DocVQA root",
    records_key="data",
)


def load_docvqa(
    annotation_file: str | Path,
    root: str | Path | None = None,
    limit: int | None = None,
    check_images: bool = True,
) -> list[MMExample]:
    """Load DocVQA (single-page document VQA), scored with ANLS.

    Expected layout::

        <root>/val_v1.0.json            {"dataset_name": "docvqa", "dataset_split": "val",
                                         "data": [{"questionId": 49153,
                                                   "question": "What is ...?",
                                                   "image": "documents/pybv0228_81.png",
                                                   "docId": 14465,
                                                   "answers": ["0.28"], ...}, ...]}
        <root>/documents/pybv0228_81.png

    ``image`` is relative to ``root``. The test split has no ``answers``; its examples get an
    empty answer list.

    Parameters
    ----------
    annotation_file : str or Path
        The DocVQA JSON file.
    root : str or Path, optional
        Folder the ``image`` paths are relative to; defaults to the annotation file's folder.
    limit : int, optional
        Keep only the first ``limit`` questions.
    check_images : bool, default True
        Raise ``FileNotFoundError`` if an image is missing.

    Returns
    -------
    list of MMExample
        Examples with ``metric="anls"``; ``extra`` holds ``docId`` and ``question_types`` if present.
    """
    path = Path(annotation_file)
    return _load(
        _DOCVQA, path, root if root is not None else path.parent, limit, check_images, _docvqa_example
    )


def _docvqa_example(record: _Record, root: Path) -> MMExample:
    """One DocVQA question as an example."""
    qid = record.field("questionId")
    image = root / str(record.field("image"))
    return MMExample(
        id=str(qid),
        image_path=record.image(image),
        question=str(record.field("question")),
        answers=record.answers(record.fields.get("answers", [])),
        metric="anls",
        extra={k: record.fields[k] for k in ("docId", "question_types") if k in record.fields},
    )


_TEXTVQA = _Benchmark(
    layout=(
        'TextVQA annotations such as TextVQA_0.5.1_val.json: {"dataset_name": "textvqa", "data": '
        '[{"question_id": int, "question": str, "image_id": str, "answers": [10 str]}]}, and an image '
        "folder (train_images/ for train and val) holding <image_id>.jpg."
    ),
    folder="TextVQA image",
    records_key="data",
)


def load_textvqa(
    annotation_file: str | Path,
    image_dir: str | Path,
    limit: int | None = None,
    check_images: bool = True,
) -> list[MMExample]:
    """Load TextVQA, scored with VQA accuracy.

    Expected layout::

        TextVQA_0.5.1_val.json          {"dataset_type": "val", "dataset_name": "textvqa",
                                         "data": [{"question_id": 34602,
                                                   "question": "what is ...?",
                                                   "image_id": "003a8ae2ef43b901",
                                                   "answers": ["nokia", ... 10 answers],
                                                   ...}, ...]}
        <image_dir>/003a8ae2ef43b901.jpg

    The official release stores train and val images together in ``train_images/``. The
    test split has no ``answers``; its examples get an empty answer list.

    Parameters
    ----------
    annotation_file : str or Path
        The TextVQA JSON file.
    image_dir : str or Path
        Folder with ``<image_id>.jpg`` files.
    limit : int, optional
        Keep only the first ``limit`` questions.
    check_images : bool, default True
        Raise ``FileNotFoundError`` if an image is missing.

    Returns
    -------
    list of MMExample
        Examples with ``metric="vqa_accuracy"``; ``extra`` holds ``image_id``.
    """
    return _load(_TEXTVQA, annotation_file, image_dir, limit, check_images, _textvqa_example)


def _textvqa_example(record: _Record, images: Path) -> MMExample:
    """One TextVQA question as an example."""
    image_id = str(record.field("image_id"))
    return MMExample(
        id=str(record.field("question_id")),
        image_path=record.image(images / f"{image_id}.jpg"),
        question=str(record.field("question")),
        answers=record.answers(record.fields.get("answers", [])),
        metric="vqa_accuracy",
        extra={"image_id": image_id},
    )


_CHARTQA = _Benchmark(
    layout=(
        "ChartQA annotations such as test/test_human.json or test/test_augmented.json: a JSON list "
        '[{"imgname": "<name>.png", "query": str, "label": str}], and the chart images in test/png/.'
    ),
    folder="ChartQA image",
    records_key=None,
)


def load_chartqa(
    annotation_file: str | Path,
    image_dir: str | Path,
    limit: int | None = None,
    check_images: bool = True,
) -> list[MMExample]:
    """Load ChartQA, scored with relaxed accuracy.

    Expected layout (as in the official ``ChartQA Dataset`` folder)::

        test/test_human.json            [{"imgname": "41699051005347.png",
                                          "query": "How many ...?",
                                          "label": "19"}, ...]
        test/png/41699051005347.png

    Example ids are ``"<annotation file stem>_<index>"`` because records have no id.

    Parameters
    ----------
    annotation_file : str or Path
        ``test_human.json`` or ``test_augmented.json`` (or another split's file).
    image_dir : str or Path
        Folder holding the ``imgname`` files (``test/png``).
    limit : int, optional
        Keep only the first ``limit`` questions.
    check_images : bool, default True
        Raise ``FileNotFoundError`` if an image is missing.

    Returns
    -------
    list of MMExample
        Examples with ``metric="relaxed_accuracy"``; ``extra`` holds ``imgname`` and ``split``
        (the annotation file stem).
    """
    return _load(_CHARTQA, annotation_file, image_dir, limit, check_images, _chartqa_example)


def _chartqa_example(record: _Record, images: Path) -> MMExample:
    """One ChartQA question as an example."""
    imgname = str(record.field("imgname"))
    return MMExample(
        id=f"{record.path.stem}_{record.index}",
        image_path=record.image(images / imgname),
        question=str(record.field("query")),
        answers=record.answers(record.field("label")),
        metric="relaxed_accuracy",
        extra={"imgname": imgname, "split": record.path.stem},
    )


_OCRBENCH = _Benchmark(
    layout=(
        'OCRBench.json: a JSON list [{"dataset_name": str, "id": int, "image_path": str, '
        '"question": str, "answers": str or [str], "type": str}], with "image_path" relative to the '
        "image folder (OCRBench_Images/)."
    ),
    folder="OCRBench image",
    records_key=None,
)


def load_ocrbench(
    annotation_file: str | Path,
    image_dir: str | Path,
    limit: int | None = None,
    check_images: bool = True,
) -> list[MMExample]:
    """Load OCRBench (1000 questions over 10 categories), scored with OCRBench matching.

    Expected layout::

        OCRBench/OCRBench.json          [{"dataset_name": "IIIT5K", "id": 0,
                                          "image_path": "IIIT5K/5_1.png",
                                          "question": "what is written in the image?",
                                          "answers": ["PRIVATE"],   # or a plain string
                                          "type": "Regular Text Recognition"}, ...]
        OCRBench_Images/IIIT5K/5_1.png

    Parameters
    ----------
    annotation_file : str or Path
        ``OCRBench.json``.
    image_dir : str or Path
        Folder the ``image_path`` entries are relative to (``OCRBench_Images``).
    limit : int, optional
        Keep only the first ``limit`` questions.
    check_images : bool, default True
        Raise ``FileNotFoundError`` if an image is missing.

    Returns
    -------
    list of MMExample
        Examples with ``metric="ocrbench"``; ``extra`` holds ``dataset_name`` and ``type``
        (the category; the handwritten-math rule of the scorer uses them).
    """
    return _load(_OCRBENCH, annotation_file, image_dir, limit, check_images, _ocrbench_example)


def _ocrbench_example(record: _Record, images: Path) -> MMExample:
    """One OCRBench question as an example."""
    rel = str(record.field("image_path"))
    fields = record.fields
    return MMExample(
        id=str(fields.get("id", record.index)),
        image_path=record.image(images / rel),
        question=str(record.field("question")),
        answers=record.answers(record.field("answers")),
        metric="ocrbench",
        extra={"dataset_name": str(fields.get("dataset_name", "")), "type": str(fields.get("type", ""))},
    )


_TEXTCAPS = _Benchmark(
    layout=(
        'TextCaps annotations such as TextCaps_0.1_val.json: {"dataset_name": "textcaps", "data": '
        '[{"image_id": str, "caption_str": str, "reference_strs": [str, ...]}]} (one record per '
        "caption), and an image folder (train_images/ for train and val) holding <image_id>.jpg."
    ),
    folder="TextCaps image",
    records_key="data",
)


def load_textcaps(
    annotation_file: str | Path,
    image_dir: str | Path,
    limit: int | None = None,
    check_images: bool = True,
    prompt: str = TEXTCAPS_PROMPT,
) -> list[MMExample]:
    """Load TextCaps captioning, scored with CIDEr-D; one example per image.

    Expected layout::

        TextCaps_0.1_val.json           {"dataset_type": "val", "dataset_name": "textcaps",
                                         "data": [{"image_id": "0a0bc91825468c45",
                                                   "caption_str": "A bottle of ...",
                                                   "reference_strs": ["A bottle ...", ...],
                                                   ...}, ...]}
        <image_dir>/0a0bc91825468c45.jpg

    The official files hold one record per caption (an image appears ~5 times). Records are
    grouped by ``image_id`` in order of first appearance; the references of an image are its
    ``reference_strs`` when present, otherwise the ``caption_str`` of its records. The test
    split has neither, so its examples get an empty answer list.

    Parameters
    ----------
    annotation_file : str or Path
        The TextCaps JSON file.
    image_dir : str or Path
        Folder with ``<image_id>.jpg`` files (``train_images`` for train and val).
    limit : int, optional
        Keep only the first ``limit`` images.
    check_images : bool, default True
        Raise ``FileNotFoundError`` if an image is missing.
    prompt : str, default TEXTCAPS_PROMPT
        Question asked for every image.

    Returns
    -------
    list of MMExample
        Examples with ``metric="cider_d"``; ``id`` is the ``image_id``.
    """
    # One example per image, not per record: the skeleton of _load with the records grouped by
    # image before the limit.
    path = Path(annotation_file)
    records = _annotation_records(_TEXTCAPS, path)
    images = _check_dir(Path(image_dir), _TEXTCAPS.folder, _TEXTCAPS.layout)
    refs: dict[str, list[str]] = {}
    captions: dict[str, list[str]] = {}
    for i, fields in enumerate(records):
        record = _Record(fields, i, path, _TEXTCAPS.layout, check_images)
        image_id = str(record.field("image_id"))
        captions.setdefault(image_id, [])
        if "reference_strs" in fields and image_id not in refs:
            refs[image_id] = record.answers(fields["reference_strs"])
        if "caption_str" in fields:
            captions[image_id].append(str(fields["caption_str"]))
    return [
        MMExample(
            id=image_id,
            image_path=_image(images / f"{image_id}.jpg", check_images, _TEXTCAPS.layout),
            question=prompt,
            answers=refs.get(image_id, captions[image_id]),
            metric="cider_d",
            extra={"image_id": image_id},
        )
        for image_id in _limit(list(captions), limit)
    ]


_SCREENSPOT = _Benchmark(
    layout=(
        'ScreenSpot annotations such as screenspot_web.json: a JSON list [{"img_filename": str, '
        '"bbox": [x, y, width, height], "instruction": str, "data_type": "text"|"icon", '
        '"data_source": str}], and the screenshots in screenspot_imgs/.'
    ),
    folder="ScreenSpot image",
    records_key=None,
)


def load_screenspot(
    annotation_file: str | Path,
    image_dir: str | Path,
    limit: int | None = None,
    check_images: bool = True,
    instruction_template: str = "{instruction}",
) -> list[MMExample]:
    """Load ScreenSpot (v1 or v2) GUI grounding, scored with point-in-box.

    Expected layout::

        screenspot_mobile.json          [{"img_filename": "mobile_0a1b.png",
                                          "bbox": [x, y, width, height],
                                          "instruction": "turn on wifi",
                                          "data_type": "icon",
                                          "data_source": "android"}, ...]
        screenspot_imgs/mobile_0a1b.png

    The bbox ``[x, y, width, height]`` (pixels) is converted to corners
    ``(x, y, x + width, y + height)``.

    Parameters
    ----------
    annotation_file : str or Path
        ``screenspot_desktop.json``, ``screenspot_mobile.json`` or ``screenspot_web.json``.
    image_dir : str or Path
        Folder with the screenshots (``screenspot_imgs``).
    limit : int, optional
        Keep only the first ``limit`` instructions.
    check_images : bool, default True
        Raise ``FileNotFoundError`` if an image is missing.
    instruction_template : str, default "{instruction}"
        Format string turning the instruction into the question.

    Returns
    -------
    list of MMExample
        Examples with ``metric="point_in_box"``; ``extra`` holds ``bbox`` (x1, y1, x2, y2),
        ``data_type``, ``data_source`` and ``platform`` (the annotation file stem).
    """
    if "{instruction}" not in instruction_template:
        raise ValueError(
            f"instruction_template {instruction_template!r} must contain the '{{instruction}}' placeholder."
        )
    to_example = functools.partial(_screenspot_example, instruction_template=instruction_template)
    return _load(_SCREENSPOT, annotation_file, image_dir, limit, check_images, to_example)


def _screenspot_example(record: _Record, images: Path, *, instruction_template: str) -> MMExample:
    """One ScreenSpot instruction as an example."""
    path, i = record.path, record.index
    raw = record.field("bbox")
    if not (isinstance(raw, list) and len(raw) == 4 and all(isinstance(v, (int, float)) for v in raw)):
        raise ValueError(f"{path}: record {i} bbox must be [x, y, width, height], got {raw!r}.")
    x, y, w, h = (float(v) for v in raw)
    if w < 0 or h < 0:
        raise ValueError(f"{path}: record {i} bbox {raw!r} has a negative width or height.")
    bbox = [x, y, x + w, y + h]
    filename = str(record.field("img_filename"))
    instruction = str(record.field("instruction"))
    return MMExample(
        id=f"{path.stem}_{i}",
        image_path=record.image(images / filename),
        question=instruction_template.format(instruction=instruction),
        answers=[f"[{bbox[0]:g}, {bbox[1]:g}, {bbox[2]:g}, {bbox[3]:g}]"],
        metric="point_in_box",
        extra={
            "bbox": bbox,
            "data_type": str(record.fields.get("data_type", "")),
            "data_source": str(record.fields.get("data_source", "")),
            "platform": path.stem,
        },
    )


# Video-MME: multiple-choice video QA, frames extracted beforehand.
_VIDEOMME = _Benchmark(
    layout=(
        "a JSON list of Video-MME records {'videoID': ..., 'question_id': ..., 'question': ..., "
        "'options': ['A. ...', 'B. ...', ...], 'answer': 'A', optional 'duration', 'domain', 'task_type'} "
        "(the columns of the official test split), and a frames folder holding <frames>/<videoID>/ with "
        "each video's frames as .jpg/.png files whose names sort in time order "
        "(e.g. ffmpeg -i <videoID>.mp4 -vf fps=1 <frames>/<videoID>/%05d.jpg)"
    ),
    folder="Frames",
    records_key=None,
)
_FRAME_SUFFIXES = (".jpg", ".jpeg", ".png")


def load_videomme(
    annotation_file: str | Path, frames_dir: str | Path, limit: int | None = None, num_frames: int = 8
) -> list[MMExample]:
    """Video-MME multiple-choice questions over pre-extracted frames.

    Layout: see ``_VIDEOMME``. ``num_frames`` frames are taken evenly spread over each
    video's frame files (all of them when it has fewer). The question is the record's question,
    its options one per line and :data:`VIDEOMME_PROMPT`; the answer is the option letter;
    metric ``multiple_choice``.
    """
    if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1:
        raise ValueError(f"num_frames must be a positive int, got {num_frames!r}.")
    # The skeleton of _load, with the frames folder checked before the annotation file is read.
    path = Path(annotation_file)
    root = _check_dir(Path(frames_dir), _VIDEOMME.folder, _VIDEOMME.layout)
    records = _limit(_annotation_records(_VIDEOMME, path), limit)
    return [
        _videomme_example(_Record(fields, index, path, _VIDEOMME.layout, False), root, num_frames)
        for index, fields in enumerate(records)
    ]


def _videomme_example(record: _Record, root: Path, num_frames: int) -> MMExample:
    """One Video-MME question as an example."""
    path, index, layout = record.path, record.index, record.layout
    video_id = str(record.field("videoID"))
    options = record.field("options")
    if not isinstance(options, list) or not options or not all(isinstance(o, str) for o in options):
        raise ValueError(f"{path}: record {index} 'options' must be a non-empty list of strings.")
    answer = str(record.field("answer")).strip().upper()
    video_dir = _check_dir(root / video_id, f"Frames of video {video_id!r}:", layout)
    files = sorted(f for f in video_dir.iterdir() if f.suffix.lower() in _FRAME_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"{video_dir} holds no .jpg/.png frames. Expected layout: {layout}")
    picks = sorted({round(i * (len(files) - 1) / max(1, num_frames - 1)) for i in range(num_frames)})
    question = str(record.field("question"))
    fields = record.fields
    return MMExample(
        id=str(fields.get("question_id", f"{video_id}-{index}")),
        image_path=video_dir,
        question="\n".join([question, *options, VIDEOMME_PROMPT]),
        answers=[answer],
        metric="multiple_choice",
        extra={k: fields[k] for k in ("videoID", "duration", "domain", "task_type") if k in fields},
        frames=[files[i] for i in picks],
    )
