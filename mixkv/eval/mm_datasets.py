"""Loaders of multimodal benchmarks from local files in their public formats.

Nothing is downloaded: each loader reads the annotation file of a benchmark (as distributed
by its authors) plus a folder of images, and returns a list of :class:`MMExample`. The
expected on-disk layout is documented in every loader. :func:`score_examples` scores model
predictions for a list of examples with the metric each example names.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mixkv.eval import mm_metrics

__all__ = [
    "TEXTCAPS_PROMPT",
    "MMExample",
    "load_chartqa",
    "load_docvqa",
    "load_ocrbench",
    "load_screenspot",
    "load_textcaps",
    "load_textvqa",
    "load_videomme",
    "score_examples",
]

TEXTCAPS_PROMPT = "Provide a one-sentence caption for the provided image."
"""Fixed question used for TextCaps captioning examples."""


@dataclass
class MMExample:
    """One multimodal evaluation example.

    Attributes
    ----------
    id : str
        Identifier, unique within its dataset.
    image_path : Path
        Image file the question is about; for a video example, the folder of its frames.
    question : str
        Text prompt for the model.
    answers : list of str
        Reference answers (empty when the split has no public answers). For ``point_in_box``
        examples it holds the target box as text ``"[x1, y1, x2, y2]"``; the numbers are in
        ``extra["bbox"]``.
    metric : str
        Name of the metric in :data:`mixkv.eval.mm_metrics.METRIC_NAMES`.
    extra : dict
        Dataset-specific fields (category, bbox, image size, ...).
    frames : list of Path
        Frame files, in order, of a video example (empty for an image example).
    answer_prefix : str
        Text the assistant's turn starts with, appended to the prompt after the generation prompt
        (empty for the benchmarks; the tiny VLM's tasks start the answer with the row's key).
    """

    id: str
    image_path: Path
    question: str
    answers: list[str]
    metric: str
    extra: dict[str, Any] = field(default_factory=dict)
    frames: list[Path] = field(default_factory=list)
    answer_prefix: str = ""

    @property
    def is_video(self) -> bool:
        """Whether the example shows a clip of frames rather than one image."""
        return bool(self.frames)

    def __post_init__(self) -> None:
        if self.metric not in mm_metrics.METRIC_NAMES:
            raise ValueError(
                f"MMExample {self.id!r}: unknown metric {self.metric!r}; "
                f"use one of {mm_metrics.METRIC_NAMES}."
            )


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------
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


def _records(data: Any, path: Path, key: str | None, layout: str) -> list[dict[str, Any]]:
    """The list of records of an annotation file: ``data[key]`` or ``data`` itself."""
    records = data
    if key is not None:
        if not isinstance(data, dict) or key not in data:
            raise ValueError(f"{path} has no top-level {key!r} field. Expected layout: {layout}")
        records = data[key]
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        where = f"field {key!r} of {path}" if key is not None else str(path)
        raise ValueError(f"{where} must be a list of JSON objects. Expected layout: {layout}")
    return records


def _field(record: dict[str, Any], name: str, path: Path, index: int, layout: str) -> Any:
    """``record[name]`` or a ``ValueError`` naming the file, the record and the field."""
    if name not in record:
        raise ValueError(f"{path}: record {index} has no {name!r} field. Expected layout: {layout}")
    return record[name]


def _image(path: Path, check: bool, layout: str) -> Path:
    """Return ``path``, raising ``FileNotFoundError`` if ``check`` and it does not exist."""
    if check and not path.is_file():
        raise FileNotFoundError(
            f"Image {path} not found. Expected layout: {layout} "
            "(or pass check_images=False to skip this check)."
        )
    return path


def _str_answers(value: Any, path: Path, index: int) -> list[str]:
    """Answers given as a string or a list of strings, as a list of strings."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, (str, int, float)) for v in value):
        return [str(v) for v in value]
    if isinstance(value, (int, float)):
        return [str(value)]
    raise ValueError(
        f"{path}: record {index} has answers of type {type(value).__name__}; expected str or list."
    )


def _limit(records: list[dict[str, Any]], limit: int | None) -> list[dict[str, Any]]:
    """The first ``limit`` records (all when ``limit`` is None)."""
    if limit is None:
        return records
    if limit < 0:
        raise ValueError(f"limit must be >= 0 or None, got {limit}.")
    return records[:limit]


# ----------------------------------------------------------------------------------------------
# Loaders
# ----------------------------------------------------------------------------------------------
_DOCVQA_LAYOUT = (
    'DocVQA task 1 annotations such as val_v1.0.json: {"dataset_name": ..., "data": '
    '[{"questionId": int, "question": str, "image": "documents/<name>.png", "docId": int, '
    '"answers": [str, ...]}]}, with "image" relative to the dataset root folder.'
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
    records = _limit(_records(_read_json(path, _DOCVQA_LAYOUT), path, "data", _DOCVQA_LAYOUT), limit)
    base = _check_dir(Path(root) if root is not None else path.parent, "DocVQA root", _DOCVQA_LAYOUT)
    out: list[MMExample] = []
    for i, r in enumerate(records):
        qid = _field(r, "questionId", path, i, _DOCVQA_LAYOUT)
        image = base / str(_field(r, "image", path, i, _DOCVQA_LAYOUT))
        extra: dict[str, Any] = {k: r[k] for k in ("docId", "question_types") if k in r}
        out.append(
            MMExample(
                id=str(qid),
                image_path=_image(image, check_images, _DOCVQA_LAYOUT),
                question=str(_field(r, "question", path, i, _DOCVQA_LAYOUT)),
                answers=_str_answers(r.get("answers", []), path, i),
                metric="anls",
                extra=extra,
            )
        )
    return out


_TEXTVQA_LAYOUT = (
    'TextVQA annotations such as TextVQA_0.5.1_val.json: {"dataset_name": "textvqa", "data": '
    '[{"question_id": int, "question": str, "image_id": str, "answers": [10 str]}]}, and an image '
    "folder (train_images/ for train and val) holding <image_id>.jpg."
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
    path = Path(annotation_file)
    records = _limit(_records(_read_json(path, _TEXTVQA_LAYOUT), path, "data", _TEXTVQA_LAYOUT), limit)
    images = _check_dir(Path(image_dir), "TextVQA image", _TEXTVQA_LAYOUT)
    out: list[MMExample] = []
    for i, r in enumerate(records):
        image_id = str(_field(r, "image_id", path, i, _TEXTVQA_LAYOUT))
        out.append(
            MMExample(
                id=str(_field(r, "question_id", path, i, _TEXTVQA_LAYOUT)),
                image_path=_image(images / f"{image_id}.jpg", check_images, _TEXTVQA_LAYOUT),
                question=str(_field(r, "question", path, i, _TEXTVQA_LAYOUT)),
                answers=_str_answers(r.get("answers", []), path, i),
                metric="vqa_accuracy",
                extra={"image_id": image_id},
            )
        )
    return out


_CHARTQA_LAYOUT = (
    "ChartQA annotations such as test/test_human.json or test/test_augmented.json: a JSON list "
    '[{"imgname": "<name>.png", "query": str, "label": str}], and the chart images in test/png/.'
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
    path = Path(annotation_file)
    records = _limit(_records(_read_json(path, _CHARTQA_LAYOUT), path, None, _CHARTQA_LAYOUT), limit)
    images = _check_dir(Path(image_dir), "ChartQA image", _CHARTQA_LAYOUT)
    out: list[MMExample] = []
    for i, r in enumerate(records):
        imgname = str(_field(r, "imgname", path, i, _CHARTQA_LAYOUT))
        out.append(
            MMExample(
                id=f"{path.stem}_{i}",
                image_path=_image(images / imgname, check_images, _CHARTQA_LAYOUT),
                question=str(_field(r, "query", path, i, _CHARTQA_LAYOUT)),
                answers=_str_answers(_field(r, "label", path, i, _CHARTQA_LAYOUT), path, i),
                metric="relaxed_accuracy",
                extra={"imgname": imgname, "split": path.stem},
            )
        )
    return out


_OCRBENCH_LAYOUT = (
    'OCRBench.json: a JSON list [{"dataset_name": str, "id": int, "image_path": str, '
    '"question": str, "answers": str or [str], "type": str}], with "image_path" relative to the '
    "image folder (OCRBench_Images/)."
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
    path = Path(annotation_file)
    records = _limit(_records(_read_json(path, _OCRBENCH_LAYOUT), path, None, _OCRBENCH_LAYOUT), limit)
    images = _check_dir(Path(image_dir), "OCRBench image", _OCRBENCH_LAYOUT)
    out: list[MMExample] = []
    for i, r in enumerate(records):
        rel = str(_field(r, "image_path", path, i, _OCRBENCH_LAYOUT))
        out.append(
            MMExample(
                id=str(r.get("id", i)),
                image_path=_image(images / rel, check_images, _OCRBENCH_LAYOUT),
                question=str(_field(r, "question", path, i, _OCRBENCH_LAYOUT)),
                answers=_str_answers(_field(r, "answers", path, i, _OCRBENCH_LAYOUT), path, i),
                metric="ocrbench",
                extra={"dataset_name": str(r.get("dataset_name", "")), "type": str(r.get("type", ""))},
            )
        )
    return out


_TEXTCAPS_LAYOUT = (
    'TextCaps annotations such as TextCaps_0.1_val.json: {"dataset_name": "textcaps", "data": '
    '[{"image_id": str, "caption_str": str, "reference_strs": [str, ...]}]} (one record per '
    "caption), and an image folder (train_images/ for train and val) holding <image_id>.jpg."
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
    path = Path(annotation_file)
    records = _records(_read_json(path, _TEXTCAPS_LAYOUT), path, "data", _TEXTCAPS_LAYOUT)
    images = _check_dir(Path(image_dir), "TextCaps image", _TEXTCAPS_LAYOUT)
    refs: dict[str, list[str]] = {}
    captions: dict[str, list[str]] = {}
    for i, r in enumerate(records):
        image_id = str(_field(r, "image_id", path, i, _TEXTCAPS_LAYOUT))
        captions.setdefault(image_id, [])
        if "reference_strs" in r and image_id not in refs:
            refs[image_id] = _str_answers(r["reference_strs"], path, i)
        if "caption_str" in r:
            captions[image_id].append(str(r["caption_str"]))
    image_ids = list(captions)
    if limit is not None:
        if limit < 0:
            raise ValueError(f"limit must be >= 0 or None, got {limit}.")
        image_ids = image_ids[:limit]
    return [
        MMExample(
            id=image_id,
            image_path=_image(images / f"{image_id}.jpg", check_images, _TEXTCAPS_LAYOUT),
            question=prompt,
            answers=refs.get(image_id, captions[image_id]),
            metric="cider_d",
            extra={"image_id": image_id},
        )
        for image_id in image_ids
    ]


_SCREENSPOT_LAYOUT = (
    'ScreenSpot annotations such as screenspot_web.json: a JSON list [{"img_filename": str, '
    '"bbox": [x, y, width, height], "instruction": str, "data_type": "text"|"icon", '
    '"data_source": str}], and the screenshots in screenspot_imgs/.'
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
    path = Path(annotation_file)
    records = _limit(_records(_read_json(path, _SCREENSPOT_LAYOUT), path, None, _SCREENSPOT_LAYOUT), limit)
    images = _check_dir(Path(image_dir), "ScreenSpot image", _SCREENSPOT_LAYOUT)
    out: list[MMExample] = []
    for i, r in enumerate(records):
        raw = _field(r, "bbox", path, i, _SCREENSPOT_LAYOUT)
        if not (isinstance(raw, list) and len(raw) == 4 and all(isinstance(v, (int, float)) for v in raw)):
            raise ValueError(f"{path}: record {i} bbox must be [x, y, width, height], got {raw!r}.")
        x, y, w, h = (float(v) for v in raw)
        if w < 0 or h < 0:
            raise ValueError(f"{path}: record {i} bbox {raw!r} has a negative width or height.")
        bbox = [x, y, x + w, y + h]
        filename = str(_field(r, "img_filename", path, i, _SCREENSPOT_LAYOUT))
        instruction = str(_field(r, "instruction", path, i, _SCREENSPOT_LAYOUT))
        out.append(
            MMExample(
                id=f"{path.stem}_{i}",
                image_path=_image(images / filename, check_images, _SCREENSPOT_LAYOUT),
                question=instruction_template.format(instruction=instruction),
                answers=[f"[{bbox[0]:g}, {bbox[1]:g}, {bbox[2]:g}, {bbox[3]:g}]"],
                metric="point_in_box",
                extra={
                    "bbox": bbox,
                    "data_type": str(r.get("data_type", "")),
                    "data_source": str(r.get("data_source", "")),
                    "platform": path.stem,
                },
            )
        )
    return out


# ----------------------------------------------------------------------------------------------
# Video-MME (multiple-choice video QA, frames extracted beforehand)
# ----------------------------------------------------------------------------------------------

_VIDEOMME_LAYOUT = (
    "a JSON list of Video-MME records {'videoID': ..., 'question_id': ..., 'question': ..., "
    "'options': ['A. ...', 'B. ...', ...], 'answer': 'A', optional 'duration', 'domain', 'task_type'} "
    "(the columns of the official test split), and a frames folder holding <frames>/<videoID>/ with "
    "each video's frames as .jpg/.png files whose names sort in time order "
    "(e.g. ffmpeg -i <videoID>.mp4 -vf fps=1 <frames>/<videoID>/%05d.jpg)"
)
_FRAME_SUFFIXES = (".jpg", ".jpeg", ".png")
VIDEOMME_PROMPT = "Answer with the option's letter from the given choices directly."
"""Instruction appended to every Video-MME question, after its options."""


def load_videomme(
    annotation_file: str | Path, frames_dir: str | Path, limit: int | None = None, num_frames: int = 8
) -> list[MMExample]:
    """Video-MME multiple-choice questions over pre-extracted frames.

    Layout: see ``_VIDEOMME_LAYOUT``. ``num_frames`` frames are taken evenly spread over each
    video's frame files (all of them when it has fewer). The question is the record's question,
    its options one per line and :data:`VIDEOMME_PROMPT`; the answer is the option letter;
    metric ``multiple_choice``.
    """
    if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1:
        raise ValueError(f"num_frames must be a positive int, got {num_frames!r}.")
    path = Path(annotation_file)
    root = _check_dir(Path(frames_dir), "Frames", _VIDEOMME_LAYOUT)
    records = _limit(_records(_read_json(path, _VIDEOMME_LAYOUT), path, None, _VIDEOMME_LAYOUT), limit)
    examples = []
    for index, record in enumerate(records):
        video_id = str(_field(record, "videoID", path, index, _VIDEOMME_LAYOUT))
        options = _field(record, "options", path, index, _VIDEOMME_LAYOUT)
        if not isinstance(options, list) or not options or not all(isinstance(o, str) for o in options):
            raise ValueError(f"{path}: record {index} 'options' must be a non-empty list of strings.")
        answer = str(_field(record, "answer", path, index, _VIDEOMME_LAYOUT)).strip().upper()
        video_dir = _check_dir(root / video_id, f"Frames of video {video_id!r}:", _VIDEOMME_LAYOUT)
        files = sorted(f for f in video_dir.iterdir() if f.suffix.lower() in _FRAME_SUFFIXES)
        if not files:
            raise FileNotFoundError(
                f"{video_dir} holds no .jpg/.png frames. Expected layout: {_VIDEOMME_LAYOUT}"
            )
        picks = sorted({round(i * (len(files) - 1) / max(1, num_frames - 1)) for i in range(num_frames)})
        question = str(_field(record, "question", path, index, _VIDEOMME_LAYOUT))
        examples.append(
            MMExample(
                id=str(record.get("question_id", f"{video_id}-{index}")),
                image_path=video_dir,
                question="\n".join([question, *options, VIDEOMME_PROMPT]),
                answers=[answer],
                metric="multiple_choice",
                extra={k: record[k] for k in ("videoID", "duration", "domain", "task_type") if k in record},
                frames=[files[i] for i in picks],
            )
        )
    return examples


# ----------------------------------------------------------------------------------------------
# Scoring
# ----------------------------------------------------------------------------------------------
def _image_size(example: MMExample) -> tuple[int, int] | None:
    """``extra["image_size"]`` or, failing that, the size read from the image file."""
    size = example.extra.get("image_size")
    if size is not None:
        return int(size[0]), int(size[1])
    if not example.image_path.is_file():
        return None
    from PIL import Image

    with Image.open(example.image_path) as im:
        return im.size


def score_examples(
    examples: Sequence[MMExample], predictions: Sequence[str], coordinate_scale: str = "pixel"
) -> dict[str, float]:
    """Score predictions with the metric of each example, aggregated per metric.

    Parameters
    ----------
    examples : sequence of MMExample
        Examples, possibly mixing metrics.
    predictions : sequence of str
        One model output per example.
    coordinate_scale : {"pixel", "normalized_1", "normalized_1000"}, default "pixel"
        Coordinate convention of the outputs of ``point_in_box`` examples; normalised scales
        need the image size (``extra["image_size"]`` or read from the image file).

    Returns
    -------
    dict of str to float
        Aggregate per metric name present: the mean score, in ``[0, 1]`` except ``cider_d``
        (toolkit scale). ``ocrbench`` is the accuracy; ``ocrbench_correct`` the count.

    Raises
    ------
    ValueError
        If lengths differ or an example has no reference answers.
    """
    if len(examples) != len(predictions):
        raise ValueError(
            f"score_examples: got {len(predictions)} predictions for {len(examples)} examples; "
            "pass one prediction per example."
        )
    groups: dict[str, list[tuple[MMExample, str]]] = {}
    for ex, pred in zip(examples, predictions, strict=True):
        if not ex.answers and ex.metric != "point_in_box":
            raise ValueError(f"score_examples: example {ex.id!r} has no reference answers (a test split?).")
        groups.setdefault(ex.metric, []).append((ex, pred))
    result: dict[str, float] = {}
    for metric, items in groups.items():
        exs = [e for e, _ in items]
        preds = [p for _, p in items]
        answers = [e.answers for e in exs]
        if metric == "anls":
            result[metric] = mm_metrics.mean_anls(preds, answers)
        elif metric == "vqa_accuracy":
            result[metric] = mm_metrics.mean_vqa_accuracy(preds, answers)
        elif metric == "relaxed_accuracy":
            result[metric] = mm_metrics.mean_relaxed_accuracy(preds, answers)
        elif metric == "ocrbench":
            cats = [str(e.extra.get("dataset_name") or e.extra.get("type", "")) for e in exs]
            ocr = mm_metrics.ocrbench_score(preds, answers, cats)
            result["ocrbench"] = ocr.accuracy
            result["ocrbench_correct"] = float(ocr.correct)
        elif metric == "cider_d":
            result[metric] = mm_metrics.cider_d(preds, answers)
        elif metric == "multiple_choice":
            result[metric] = mm_metrics.mean_multiple_choice_accuracy(preds, answers)
        elif metric == "exact_match":
            result[metric] = sum(
                mm_metrics.exact_match(p, a) for p, a in zip(preds, answers, strict=True)
            ) / len(preds)
        elif metric == "mark_in_box":
            result[metric] = sum(
                mm_metrics.mark_in_box(p, e.extra["marks"], e.extra["bbox"])
                for e, p in zip(exs, preds, strict=True)
            ) / len(preds)
        else:  # point_in_box
            bboxes = []
            for e in exs:
                if "bbox" not in e.extra:
                    raise ValueError(f"score_examples: point_in_box example {e.id!r} has no extra['bbox'].")
                bboxes.append(e.extra["bbox"])
            sizes = None
            if coordinate_scale != "pixel":
                sizes = []
                for e in exs:
                    size = _image_size(e)
                    if size is None:
                        raise ValueError(
                            f"score_examples: example {e.id!r} needs extra['image_size'] or an existing "
                            f"image file for coordinate_scale={coordinate_scale!r}."
                        )
                    sizes.append(size)
            result[metric] = mm_metrics.screenspot_accuracy(preds, bboxes, sizes, coordinate_scale)
    return result
