"""Record, don't invent: the source bundle runs through the runtime on each sample, and every call
of the graphs to quantize is saved as it happened (the pipeline's engine hook): prefill and decode
calls, the KV cache as it really was, pruned and unpruned shapes as they occurred.

Each call is one .npz file (inputs, and with outputs=True the source's outputs too), so a long
recording stays on disk rather than in memory; a reader gives them back one at a time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import onnx

from ..errors import MllmEdgeError
from ..evaluate import MAX_NEW_TOKENS, EvalItem

GENERATED_TOKENS = MAX_NEW_TOKENS  # per sample: a prefill and up to this many decode steps


@dataclass
class Recording:
    folder: Path
    calls: dict[str, list[Path]] = field(default_factory=dict)  # graph -> one file per call, in order
    answers: list[str] = field(default_factory=list)  # the source bundle's answer to each item

    def counts(self) -> dict[str, int]:
        return {graph: len(files) for graph, files in self.calls.items()}


def load_call(path: Path) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """One recorded call: (inputs, outputs) by tensor name; outputs empty when not recorded."""
    with np.load(path) as data:
        inputs = {k[3:]: data[k] for k in data.files if k.startswith("in.")}
        outputs = {k[4:]: data[k] for k in data.files if k.startswith("out.")}
    return inputs, outputs


def record(
    bundle: Path,
    items: list[EvalItem],
    graphs: list[str],
    folder: Path,
    outputs: bool = False,
    progress: Callable[[int], None] = lambda done: None,
    low_memory: bool = True,
) -> Recording:
    """Run `bundle` (ONNX Runtime, CPU) on each item and save every call of `graphs` under folder.
    low_memory: unoptimised sessions over the mapped weights, as the export's verification runs
    (optimised, ONNX Runtime's CPU provider keeps an fp32 copy of every fp16 weight: on the ~1B
    model's fp16 bundle, 4.9x its largest graph at the recording's peak)."""
    from ..runtime.pipeline import Pipeline

    recording = Recording(folder, {g: [] for g in graphs})
    for g in graphs:
        (folder / g).mkdir(parents=True, exist_ok=True)

    def save(graph: str, given: dict, returned: dict) -> None:
        if graph not in recording.calls:
            return
        path = folder / graph / f"{len(recording.calls[graph]):05d}.npz"
        arrays = {f"in.{k}": np.asarray(v) for k, v in given.items()}  # copied now: the cache moves on
        if outputs:
            arrays.update({f"out.{k}": np.asarray(v) for k, v in returned.items()})
        np.savez(path, **arrays)
        recording.calls[graph].append(path)

    with Pipeline.load(bundle, backend="onnxruntime", low_memory=low_memory) as pipeline:
        pipeline.observe(save)
        for i, item in enumerate(items):
            try:
                result = pipeline.generate(item.picture(), item.question, max_new_tokens=GENERATED_TOKENS)
            except MllmEdgeError as e:
                raise MllmEdgeError(f"{item.where or f'sample {i + 1}'}: {e}") from None
            recording.answers.append(result.text)
            progress(i + 1)
    return recording


def replay(
    model: onnx.ModelProto, path: Path, tensors: dict[str, int], calls: list[Path]
) -> Iterator[dict[str, np.ndarray]]:
    """Each recorded call run again through the graph at path (model: its proto, weights left in the
    data files), with the intermediate `tensors` (name -> ONNX element type) as extra outputs: one
    unoptimised session over the mapped weights; yields each call's outputs by name, in order."""
    from onnx import helper

    from ..export.verify import session

    augmented = onnx.ModelProto()
    augmented.CopyFrom(model)  # the graph alone: the weights stay in the source's data files
    known = {o.name for o in augmented.graph.output}
    for name, elem in tensors.items():
        if name not in known:
            augmented.graph.output.append(helper.make_tensor_value_info(name, elem, None))
    engine = session(path, augmented.SerializeToString())  # its data files read beside path
    del augmented
    try:
        for call in calls:
            inputs = load_call(call)[0]
            got = engine.run(inputs)
            # an output that is also an input may alias the input's freed buffer (onnxruntime#21922)
            yield {name: inputs.get(name, value) for name, value in got.items()}
    finally:
        engine.close()
