"""The samples calibration runs on: a JSONL dataset (eval's format; answers optional) or synthetic
scenes of the built-in model's training world, split once into calibration and held-out items.

The split is deterministic given the seed; the two parts never share an item. Synthetic scenes are
drawn from the seed's generator (training used small seeds), never from eval's held-out seed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from ..default_model.scenes import HELD_OUT_SEED
from ..errors import MllmEdgeError
from ..evaluate import EvalItem, load_jsonl, synthetic_items
from ..integrity import sha256_file

DEFAULT_SAMPLES = 32  # calibration items when --samples is not given (fewer if the data is smaller)
MAX_HELD_OUT = 16  # items kept back to verify on
DEFAULT_SYNTHETIC = 48  # the built-in model's bundles, when no data is given


@dataclass
class Samples:
    calibration: list[EvalItem]
    held_out: list[EvalItem]  # empty without verification
    provenance: dict  # for the manifest: where the items came from, how many, how they were split


def held_out_count(pool: int, verify: bool) -> int:
    return min(MAX_HELD_OUT, max(1, pool // 4)) if verify else 0


def split(items: list[EvalItem], samples: int | None, verify: bool, seed: int, source: str) -> Samples:
    if samples is not None and samples < 1:
        raise MllmEdgeError(f"--samples must be >= 1, got {samples}")
    held = held_out_count(len(items), verify)
    room = len(items) - held
    if room < 1:
        raise MllmEdgeError(
            f"{source} has {len(items)} item(s): calibration needs one and verification one more held out "
            "(give more data, or --no-verify)"
        )
    count = min(DEFAULT_SAMPLES, room) if samples is None else samples
    if count > room:
        raise MllmEdgeError(
            f"--samples {count} is more than {source} can give: {len(items)} items, {held} of them held out to verify"
        )
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    calibration = [items[i] for i in order[:count]]
    held_out = [items[i] for i in order[len(items) - held :]]
    return Samples(calibration, held_out, {"samples": count, "held_out": held, "seed": seed})


def from_dataset(path: Path, samples: int | None, verify: bool, seed: int) -> Samples:
    items = load_jsonl(path, require_answer=False)
    missing = [item for item in items if not Path(item.image).is_file()]
    if missing:
        raise MllmEdgeError(
            f"{len(missing)} image(s) named in {path} do not exist; the first: {missing[0].image} ({missing[0].where})"
        )
    chosen = split(items, samples, verify, seed, f"dataset {path}")
    chosen.provenance.update(dataset=path.name, dataset_sha256=sha256_file(path), items=len(items))
    return chosen


def from_synthetic(count: int, samples: int | None, verify: bool, seed: int) -> Samples:
    if count < 1:
        raise MllmEdgeError(f"--synthetic must be >= 1, got {count}")
    if seed == HELD_OUT_SEED:
        raise MllmEdgeError(f"--seed {seed} is eval's held-out seed: calibrate on other scenes")
    chosen = split(synthetic_items(count, seed), samples, verify, seed, f"--synthetic {count}")
    chosen.provenance.update(dataset=f"synthetic scenes, seed {seed}", dataset_sha256=None, items=count)
    return chosen
