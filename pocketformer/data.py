"""Calibration and evaluation data: plain text, STS-style sentence pairs, and image arrays.

A data spec is a path with an optional slice of its records, `PATH@START:END`, where START and
END are fractions in [0, 1] (e.g. `valid.txt@0:0.5` for the first half of the lines). Records are
lines for text, rows for sentence pairs and samples for images. Slicing one file into disjoint
calibration and evaluation parts keeps quality figures off the text a method was calibrated on.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pocketformer.errors import BadInputError

_SLICE = re.compile(r"^(?P<path>.+)@(?P<start>\d*\.?\d*):(?P<end>\d*\.?\d*)$")


@dataclass(frozen=True)
class DataSpec:
    path: Path
    start: float = 0.0
    end: float = 1.0

    @classmethod
    def parse(cls, spec: str | Path, *, base_dir: Path | None = None, field: str | None = None,
              file: str | None = None) -> "DataSpec":
        text = str(spec)
        m = _SLICE.match(text)
        start, end = 0.0, 1.0
        if m:
            text = m.group("path")
            start = float(m.group("start") or 0.0)
            end = float(m.group("end") or 1.0)
            if not (0.0 <= start < end <= 1.0):
                raise BadInputError(f"slice {start}:{end} must satisfy 0 <= start < end <= 1",
                                    file=file, field=field)
        path = Path(text).expanduser()
        if base_dir is not None and not path.is_absolute():
            path = (base_dir / path).resolve()
        return cls(path=path, start=start, end=end)

    def __str__(self) -> str:
        if (self.start, self.end) == (0.0, 1.0):
            return str(self.path)
        return f"{self.path}@{self.start:g}:{self.end:g}"

    def check_exists(self, field: str | None = None, file: str | None = None) -> None:
        if not self.path.is_file():
            raise BadInputError(f"data file not found: {self.path}", file=file, field=field)

    def take(self, items: list) -> list:
        n = len(items)
        return items[int(round(self.start * n)):int(round(self.end * n))]


@dataclass
class TextData:
    text: str
    source: str


@dataclass
class PairData:
    first: list[str]
    second: list[str]
    scores: np.ndarray
    source: str

    def sentences(self) -> list[str]:
        return self.first + self.second


@dataclass
class SentenceData:
    """Unscored sentences (plain text for an encoder): enough to calibrate, not to score STS."""
    lines: list[str]
    source: str

    def sentences(self) -> list[str]:
        return self.lines


@dataclass
class ImageData:
    images: np.ndarray   # N x C x H x W float (preprocessed) or N x H x W [x C] uint8/float raw
    labels: np.ndarray
    source: str
    preprocessed: bool


_WIKITEXT_MARKERS = (" @-@ ", " @,@ ", " @.@ ")


def detokenize_wikitext(text: str) -> str:
    """Undo WikiText's word-level tokenisation so a BPE tokenizer sees ordinary prose."""
    text = text.replace(" @-@ ", "-").replace(" @,@ ", ",").replace(" @.@ ", ".")
    text = re.sub(r" ([.,;:!?%)\]}])", r"\1", text)
    text = re.sub(r"([(\[{$]) ", r"\1", text)
    text = re.sub(r" (n't|'s|'re|'ve|'m|'ll|'d)\b", r"\1", text)
    text = re.sub(r'" (.*?) "', r'"\1"', text)
    text = re.sub(r"^ = = = (.*?) = = = $", r"### \1", text, flags=re.M)
    text = re.sub(r"^ = = (.*?) = = $", r"## \1", text, flags=re.M)
    text = re.sub(r"^ = (.*?) = $", r"# \1", text, flags=re.M)
    text = re.sub(r"^ | +$", "", text, flags=re.M)
    return text


def load_text(spec: DataSpec, *, detokenize: str = "auto") -> TextData:
    spec.check_exists()
    raw = spec.path.read_text(encoding="utf-8", errors="replace")
    lines = spec.take(raw.splitlines(keepends=True))
    text = "".join(lines)
    if detokenize == "wikitext" or (detokenize == "auto" and any(m in text for m in _WIKITEXT_MARKERS)):
        text = detokenize_wikitext(text)
    if not text.strip():
        raise BadInputError("no text in this slice of the file", file=str(spec))
    return TextData(text=text, source=str(spec))


def load_pairs(spec: DataSpec) -> PairData:
    """STS Benchmark layout: tab separated genre, file, year, id, score, sentence1, sentence2."""
    spec.check_exists()
    first, second, scores = [], [], []
    for lineno, line in enumerate(spec.path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        cols = line.split("\t")
        if len(cols) < 7:
            raise BadInputError(
                f"line {lineno}: expected 7 tab-separated columns (genre, file, year, id, score, "
                f"sentence1, sentence2), got {len(cols)}", file=str(spec.path))
        try:
            score = float(cols[4])
        except ValueError:
            raise BadInputError(f"line {lineno}: score column is not a number: {cols[4]!r}",
                                file=str(spec.path)) from None
        first.append(cols[5])
        second.append(cols[6])
        scores.append(score)
    idx = spec.take(list(range(len(scores))))
    if len(idx) < 2:
        raise BadInputError("fewer than 2 sentence pairs in this slice", file=str(spec))
    return PairData([first[i] for i in idx], [second[i] for i in idx],
                    np.asarray([scores[i] for i in idx], dtype=np.float64), str(spec))


def looks_like_pairs(path: Path) -> bool:
    with open(path, encoding="utf-8", errors="replace") as f:
        head = [f.readline() for _ in range(5)]
    rows = [line.split("\t") for line in head if line.strip()]
    if not rows or any(len(r) < 7 for r in rows):
        return False
    try:
        [float(r[4]) for r in rows]
    except ValueError:
        return False
    return True


def load_images(spec: DataSpec) -> ImageData:
    """An .npz with `labels` and either `pixel_values` (N,C,H,W preprocessed) or `images` (raw)."""
    spec.check_exists()
    if spec.path.suffix != ".npz":
        raise BadInputError("image data must be an .npz file with 'images' or 'pixel_values' "
                            "and 'labels' arrays", file=str(spec.path))
    with np.load(spec.path) as z:
        if "labels" not in z:
            raise BadInputError("missing array 'labels'", file=str(spec.path))
        if "pixel_values" in z:
            images, pre = z["pixel_values"], True
        elif "images" in z:
            images, pre = z["images"], False
        else:
            raise BadInputError("needs an 'images' or 'pixel_values' array", file=str(spec.path))
        labels = z["labels"]
    if len(images) != len(labels):
        raise BadInputError(f"{len(images)} images but {len(labels)} labels", file=str(spec.path))
    idx = spec.take(list(range(len(labels))))
    if not idx:
        raise BadInputError("no samples in this slice", file=str(spec))
    return ImageData(images[idx], labels[idx].astype(np.int64), str(spec), pre)


def load_for(kind: str, spec: DataSpec):
    """Load a data spec as the adapter's data kind expects (text, pairs or images)."""
    if kind == "text":
        return load_text(spec)
    if kind == "pairs":
        spec.check_exists()
        if looks_like_pairs(spec.path):
            return load_pairs(spec)
        text = load_text(spec).text
        return SentenceData([line.strip() for line in text.splitlines() if line.strip()], str(spec))
    if kind == "images":
        return load_images(spec)
    raise ValueError(f"unknown data kind {kind}")
