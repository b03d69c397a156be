"""`mllm-edge eval`: exact-match accuracy of a bundle's answers, and what pruning costs.

Runs the runtime (no torch) on a JSONL of {"image": path, "question": ..., "answer": ...} lines
(paths relative to the file) or on N held-out synthetic scenes of the built-in model's world.
Reports exact-match accuracy (case, surrounding space and a final full stop ignored), agreement with
a baseline bundle's answers (the unpruned model, when given), mean prefill time and image tokens kept.
"""

from __future__ import annotations

import contextlib
import json
import random
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from .default_model.scenes import HELD_OUT_SEED, normalise, sample
from .errors import MllmEdgeError

MAX_NEW_TOKENS = 8  # answers are a word or two


@dataclass
class EvalItem:
    image: object  # a path or a PIL image
    question: str
    answer: str
    kind: str = ""
    where: str = ""  # "dataset.jsonl:LINE" for an item of a file, for messages

    def picture(self, max_image_pixels: int | None = None):
        """The image as a PIL image: read from its file (within the pixel limit) when it is a path."""
        from .runtime.image import MAX_IMAGE_PIXELS, load_image

        if isinstance(self.image, (str, Path)):
            return load_image(self.image, max_image_pixels or MAX_IMAGE_PIXELS)
        return self.image


@dataclass
class EvalReport:
    bundle: str
    method: str
    items: int
    accuracy: float
    agreement: float | None  # share of answers equal to the baseline's, None without a baseline
    mean_prefill_ms: float
    image_tokens_kept: int  # image tokens that reach the LLM's last layers (a mean over the items)
    image_tokens: int  # the pictures' unpruned (a mean: LLaVA-NeXT's vary with the picture)
    by_kind: dict = field(default_factory=dict)  # accuracy per question kind, where the data has kinds
    answers: list[dict] = field(
        default_factory=list
    )  # per item: question, answer, predicted, correct[, baseline]
    skipped: list[str] = field(default_factory=list)  # with skip_bad: "file:line: why" of each item left out

    def to_dict(self) -> dict:
        return asdict(self)


def load_jsonl(path: Path, require_answer: bool = True) -> list[EvalItem]:
    """require_answer False (calibration): a line needs only image and question; answer may be absent."""
    if not path.is_file():
        raise MllmEdgeError(f"dataset {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise MllmEdgeError(f"dataset {path} cannot be read: {e}") from None
    fields = "image, question and answer" if require_answer else "image and question"
    items = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            image, question = row["image"], row["question"]
            answer = row["answer"] if require_answer else row.get("answer", "")
        except (ValueError, KeyError, TypeError) as e:
            raise MllmEdgeError(f"{path}:{number}: not a JSON object with {fields} ({e})") from None
        needed = (image, question, answer) if require_answer else (image, question)
        if not all(isinstance(v, str) and v for v in needed) or not isinstance(answer, str):
            raise MllmEdgeError(f"{path}:{number}: {fields} must be non-empty strings")
        items.append(
            EvalItem(path.parent / image, question, answer, str(row.get("kind", "")), f"{path}:{number}")
        )
    if not items:
        raise MllmEdgeError(f"dataset {path} holds no questions")
    return items


def synthetic_items(count: int, seed: int = HELD_OUT_SEED) -> list[EvalItem]:
    if count < 1:
        raise MllmEdgeError(f"--synthetic must be >= 1, got {count}")
    rng = random.Random(seed)
    items = []
    for _ in range(count):
        scene, q = sample(rng)
        items.append(EvalItem(scene.render(), q.text, q.answer, q.kind))
    return items


def evaluate(
    bundle: Path,
    items: list[EvalItem],
    baseline: Path | None = None,
    backend: str = "auto",
    progress: Callable[[int], None] = lambda _: None,
    max_image_pixels: int | None = None,
    skip_bad: bool = False,
) -> EvalReport:
    """skip_bad: an item whose image or question cannot be used is counted in `skipped` and left out,
    instead of stopping the evaluation (the message names its line either way)."""
    from .runtime.pipeline import Pipeline

    with contextlib.ExitStack() as stack:  # both pipelines closed, whatever happens
        pipe = stack.enter_context(Pipeline.load(bundle, backend=backend))
        base = stack.enter_context(Pipeline.load(baseline, backend=backend)) if baseline is not None else None
        if base is not None:
            check_same_model(pipe.manifest, base.manifest, bundle, baseline)
        answers, prefill, skipped, tokens = [], [], [], []
        for i, item in enumerate(items):
            try:
                picture = item.picture(max_image_pixels)  # loaded once, for the bundle and its baseline
                result = pipe.generate(picture, item.question, max_new_tokens=MAX_NEW_TOKENS)
                row = {
                    "question": item.question,
                    "answer": item.answer,
                    "kind": item.kind,
                    "predicted": result.text,
                    "correct": normalise(result.text) == normalise(item.answer),
                }
                unpruned, _, kept = result.image_token_counts(pipe.manifest.tokenizer["image_token_id"])
                if isinstance(item.image, (str, Path)):
                    row["image"] = str(item.image)
                if base is not None:
                    row["baseline"] = base.generate(
                        picture, item.question, max_new_tokens=MAX_NEW_TOKENS
                    ).text
            except MllmEdgeError as e:
                problem = f"{item.where or f'item {i + 1}'}: {e}"
                if not skip_bad:
                    raise MllmEdgeError(
                        problem + " (--skip-bad leaves such items out and counts them)"
                    ) from None
                skipped.append(problem)
                progress(i + 1)
                continue
            answers.append(row)
            prefill.append(result.timings_ms["prefill"])
            tokens.append((unpruned, kept))
            progress(i + 1)
        manifest = pipe.manifest
    if not answers:
        raise MllmEdgeError(f"no item could be evaluated: {len(skipped)} skipped, the first {skipped[0]}")
    kinds = sorted({a["kind"] for a in answers if a["kind"]})
    return EvalReport(
        bundle=str(bundle),
        method=manifest.pruning["method"],
        items=len(answers),
        accuracy=sum(a["correct"] for a in answers) / len(answers),
        agreement=(sum(normalise(a["predicted"]) == normalise(a["baseline"]) for a in answers) / len(answers))
        if baseline is not None
        else None,
        mean_prefill_ms=round(statistics.mean(prefill), 3),
        image_tokens_kept=round(statistics.mean(kept for _, kept in tokens)),
        image_tokens=round(statistics.mean(unpruned for unpruned, _ in tokens)),
        by_kind={
            k: sum(a["correct"] for a in answers if a["kind"] == k) / sum(a["kind"] == k for a in answers)
            for k in kinds
        },
        answers=answers,
        skipped=skipped,
    )


def check_same_model(ours, theirs, bundle: Path, baseline: Path) -> None:
    """A baseline must be the same model (its architecture numbers and tokenizer), pruned or not, or
    agreement means nothing. Keys only one of the two manifests has (a newer release's) are not
    compared. Another fine-tune of the same architecture and tokenizer is not told apart."""

    def same(a, b) -> bool:
        if isinstance(a, dict) and isinstance(b, dict):
            return all(same(a[k], b[k]) for k in a.keys() & b.keys())
        return a == b

    def tokenizer(m) -> dict:
        return {rel: m.files[rel] for rel in m.tokenizer_files()}

    if not same(ours.architecture, theirs.architecture) or tokenizer(ours) != tokenizer(theirs):
        raise MllmEdgeError(
            f"--baseline {baseline} is another model than {bundle} (architecture or tokenizer differ): "
            "export the same checkpoint without pruning as the baseline"
        )
