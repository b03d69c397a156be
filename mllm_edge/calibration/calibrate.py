"""`mllm-edge calibrate`: read a float bundle, write a new one whose chosen graphs are quantized.

Order: check everything that can be checked before minutes of work (the bundle, the precision, the
data, the exclusions, the block size); record the source bundle's graph calls on the calibration
items (tensorrt target) and on the held-out items (verification); quantize each chosen graph; lint
the Q/DQ graphs against TensorRT's parser rules; verify on the held-out calls and answers; only then
move the new bundle into place. The source bundle is read, never written.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import onnx

from .. import __version__
from ..atomic import locked, partial_folder, remove_stale, signals_as_interrupts
from ..default_model import checkpoint as default_checkpoint
from ..engines import detect_jetson
from ..errors import MllmEdgeError
from ..integrity import sha256_file
from ..manifest import MANIFEST_NAME, SCHEMA_VERSION, Manifest, load_manifest, write_manifest
from . import data, precisions
from .precisions import GRAPH_CHOICES, Precision, sm_at_least
from .record import Recording, record
from .rewrite import weight_gemms
from .verify import AnswerCheck, GraphCheck, check_answers, check_graph

LM_HEAD = r"lm_head"  # excluded by default on the tensorrt target: logits decide every token
BLOCK_SIZES = (128, 64, 32, 16)  # int4 blocks tried, largest first, when --block-size is not given
ORIN_SM = "8.7"

Progress = Callable[[str, int, int], None]  # (stage, done, total)


@dataclass
class CalibrateConfig:
    bundle: Path
    precision: str
    target: str = "tensorrt"
    out: Path | None = None  # None: BUNDLE-<precision> beside the bundle
    dataset: Path | None = None
    synthetic: int | None = None  # None with no dataset: the built-in model's scenes, else an error
    samples: int | None = None
    graphs: str = "llm"
    exclude: str | None = None  # a regular expression over weight names, added to the default's
    block_size: int | None = None
    target_sm: str | None = None  # the GPU's compute capability the bundle is for, e.g. 8.7
    verify: bool = True
    force: bool = False
    seed: int = 0


@dataclass
class GraphResult:
    graph: str
    bytes_before: int
    bytes_after: int
    weights: int  # weight matrices quantized
    check: GraphCheck | None = None


@dataclass
class CalibrateReport:
    out: Path
    manifest: Manifest
    precision: Precision
    graphs: list[GraphResult] = field(default_factory=list)
    answers: AnswerCheck | None = None
    recorded: dict = field(default_factory=dict)  # graph -> calls recorded to calibrate on


def default_out(bundle: Path, precision: str) -> Path:
    return bundle.parent / f"{bundle.name}-{precision}"


def calibrate_bundle(
    config: CalibrateConfig, progress: Progress = lambda stage, done, total: None
) -> CalibrateReport:
    from ..export.bundle import check_destination

    plan = _plan(config)
    out = config.out or default_out(config.bundle, plan.precision.name)
    if out.resolve() == config.bundle.resolve():
        raise MllmEdgeError(f"--out {out} is the source bundle: calibrate writes a new bundle beside it")
    check_destination(out, config.force)
    with locked(out), signals_as_interrupts():
        check_destination(out, config.force)
        remove_stale(out)
        tmp = partial_folder(out)
        try:
            return _calibrate_into(config, plan, out, tmp, progress)
        except BaseException as e:  # KeyboardInterrupt and Terminated too: nothing half-written stays
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(e, OSError):
                raise MllmEdgeError(f"writing the bundle failed: {e}") from e
            raise


@dataclass
class _Plan:
    manifest: Manifest
    precision: Precision
    graphs: list[str]
    select: dict  # graph -> predicate over weight names
    block_size: int | None
    samples: data.Samples


def _plan(config: CalibrateConfig) -> _Plan:
    """Every check that needs no recording: a mistake is reported in seconds, with nothing written."""
    bundle = config.bundle
    manifest = load_manifest(bundle)
    if manifest.quantization:
        q = manifest.quantization
        raise MllmEdgeError(
            f"{bundle} is already quantized ({q['weights']} in {', '.join(q['graphs'])}): calibrate its float source bundle"
        )
    if manifest.dtype not in ("float32", "float16"):
        raise MllmEdgeError(f"{bundle} has dtype {manifest.dtype}: calibrate reads fp32 or fp16 bundles")
    precision = precisions.precision(config.precision, config.target)
    if precision.target == "onnxruntime":
        from .matmulnbits import check_dtype

        check_dtype(precision, manifest.dtype)
    elif precision.name == "int4-awq":  # int8 and fp8 need ONNX Runtime alone
        from .modelopt import require_modelopt

        require_modelopt()
    _check_sm(precision, config.target_sm)
    if config.graphs not in GRAPH_CHOICES:
        raise MllmEdgeError(f"unknown --graphs '{config.graphs}' (choose from {', '.join(GRAPH_CHOICES)})")
    graphs = [g for g in GRAPH_CHOICES[config.graphs] if g in manifest.graphs]
    try:
        user = re.compile(config.exclude) if config.exclude else None
    except re.error as e:
        raise MllmEdgeError(f"--exclude '{config.exclude}' is not a regular expression: {e}") from None
    default = re.compile(LM_HEAD) if precision.target == "tensorrt" else None
    select, dims = {}, {}
    for g in graphs:
        model = onnx.load(str(bundle / manifest.graphs[g].file), load_external_data=False)
        shapes = {t.name: list(t.dims) for t in model.graph.initializer}
        weights = set(weight_gemms(model).values())
        chosen = {w for w in weights if not any(r and r.search(w) for r in (default, user))}
        if not chosen:
            raise MllmEdgeError(f"every weight of the {g} graph is excluded: nothing to quantize")
        select[g] = chosen.__contains__
        dims[g] = {w: shapes[w][1] for w in chosen}  # [N, K]: K, the input dimension
    block = _block_size(precision, config.block_size, dims)
    if config.dataset is not None and config.synthetic is not None:
        raise MllmEdgeError("give --dataset or --synthetic, not both")
    if config.dataset is not None:
        samples = data.from_dataset(config.dataset, config.samples, config.verify, config.seed)
    elif config.synthetic is not None:
        samples = data.from_synthetic(config.synthetic, config.samples, config.verify, config.seed)
    elif _is_built_in(manifest):
        samples = data.from_synthetic(data.DEFAULT_SYNTHETIC, config.samples, config.verify, config.seed)
    elif not precision.needs_calibration:  # rounding needs no data; verified on export's samples alone
        samples = data.Samples([], [], {"samples": 0, "held_out": 0, "seed": config.seed})
    else:
        raise MllmEdgeError(
            "no calibration data: give --dataset FILE.jsonl (eval's format: image and question per line, "
            "images like the ones the model will see) or --synthetic N for the built-in model's scenes"
        )
    return _Plan(manifest, precision, graphs, select, block, samples)


def _check_sm(precision: Precision, target_sm: str | None) -> None:
    if target_sm is not None and not re.fullmatch(r"\d+\.\d+", target_sm):
        raise MllmEdgeError(f"--target-sm must be a compute capability like 8.7, got '{target_sm}'")
    jetson = detect_jetson()
    sm = target_sm or (ORIN_SM if jetson and "thor" not in jetson.lower() else None)
    if precision.min_sm and sm and not sm_at_least(sm, precision.min_sm):
        where = f"SM {sm}" + (" (Jetson Orin)" if sm == ORIN_SM else "")
        raise MllmEdgeError(
            f"{precision.name} needs a GPU of SM {precision.min_sm} or newer; {where} has no FP8 tensor cores: "
            "use --precision int4-awq (Orin's format) or int8"
        )


def _block_size(precision: Precision, given: int | None, dims: dict) -> int | None:
    """TensorRT's parser infers a block as dimension / scale count: each K must be a whole number of blocks."""
    ks = sorted({k for per in dims.values() for k in per.values()})
    if precision.target == "onnxruntime":
        if given is not None and (given < 16 or given & (given - 1)):
            raise MllmEdgeError(f"--block-size for ONNX Runtime must be a power of two >= 16, got {given}")
        return given or precision.block_size
    if precision.block_size is None:
        if given is not None:
            raise MllmEdgeError(
                f"--block-size applies to int4-awq; {precision.name} scales weights per channel"
            )
        return None
    if given is not None:
        if given < 1:
            raise MllmEdgeError(f"--block-size must be >= 1, got {given}")
        bad = [k for k in ks if k % given]
        if bad:
            fits = [b for b in BLOCK_SIZES if all(k % b == 0 for k in ks)]
            raise MllmEdgeError(
                f"--block-size {given} does not divide the input dimension {bad[0]} of a weight: TensorRT needs whole blocks"
                + (f" (try {fits[0]})" if fits else "")
            )
        return given
    for b in BLOCK_SIZES:
        if all(k % b == 0 for k in ks):
            return b
    raise MllmEdgeError(
        f"no int4 block size of {', '.join(map(str, BLOCK_SIZES))} divides every weight's input dimension "
        f"({', '.join(map(str, ks))}): give --block-size"
    )


def _is_built_in(manifest: Manifest) -> bool:
    return Path(manifest.source["model"]).resolve() == default_checkpoint().resolve()


def _calibrate_into(
    config: CalibrateConfig, plan: _Plan, out: Path, tmp: Path, progress: Progress
) -> CalibrateReport:
    from ..export.bundle import move_into_place
    from ..export.fused_attention import add_fused_graphs
    from ..export.onnx_graph import graph_spec, share_duplicate_weights
    from ..export.report import bundle_sizes, graph_sizes

    source, manifest, precision = config.bundle, plan.manifest, plan.precision
    work = tmp / ".calibration"  # recordings and the quantizer's files: removed before the move
    samples = plan.samples

    def recorded(stage: str, items: list, folder: str, outputs: bool) -> Recording:
        if not items:
            return Recording(work / folder)
        progress(stage, 0, len(items))
        done = lambda n: progress(stage, n, len(items))
        return record(source, items, plan.graphs, work / folder, outputs, done)

    calibration = recorded(
        "record", samples.calibration if precision.needs_calibration else [], "calibration", False
    )
    held = recorded("record held-out", samples.held_out if config.verify else [], "held_out", True)

    replaced = {f for g in plan.graphs for f in (manifest.graphs[g].file, f"{g}.onnx.data")}
    # the fused copies are made again from the final graphs (export/fused_attention.py)
    replaced |= {spec.onnxruntime_file for spec in manifest.graphs.values() if spec.onnxruntime_file}
    for name, spec in manifest.graphs.items():
        if name not in plan.graphs and set(spec.data_files) & replaced:
            raise MllmEdgeError(
                f"the {name} graph reads weights stored with a graph to quantize; re-export the bundle"
            )
    for rel in manifest.files:  # the rest as it is: other graphs, tokenizer, reference samples
        if rel not in replaced:
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source / rel, tmp / rel)

    entries = {}
    for i, g in enumerate(plan.graphs):
        progress(f"quantize {g}", i, len(plan.graphs))
        if precision.name == "int4-awq":  # one weight at a time: memory and time for a 7B
            from .awq import quantize_graph

            entry = quantize_graph(
                source, tmp, g, plan.block_size, plan.select[g], calibration.calls[g], progress
            )
        elif precision.target == "tensorrt":  # int8, fp8: ranges from the calls, weights one at a time
            from .qdq import quantize_graph

            entry = quantize_graph(source, tmp, g, precision, plan.select[g], calibration.calls[g], progress)
        else:
            from .matmulnbits import quantize_graph

            entry = quantize_graph(source, tmp, g, precision, plan.select[g])
        entries[g] = {
            "precision": precision.name,
            "method": precision.method,
            "block_size": plan.block_size,
            "activations": manifest.dtype if precision.activations == "float" else precision.activations,
            **entry,
        }
    progress("quantize", len(plan.graphs), len(plan.graphs))
    share_duplicate_weights(
        tmp, list(manifest.graphs)
    )  # an excluded tied LM head reads the embedding table again
    graph_specs = {name: graph_spec(tmp / spec.file) for name, spec in manifest.graphs.items()}

    if precision.target == "tensorrt":
        progress("lint", 0, 1)
        from ..export.lint import lint_model

        problems = [
            f"{g}: {finding}" for g in plan.graphs for finding in lint_model(tmp / graph_specs[g].file)
        ]
        if problems:
            raise MllmEdgeError(
                "the quantized graphs would not build in TensorRT 10:\n  " + "\n  ".join(problems)
            )
    graph_specs = add_fused_graphs(tmp, graph_specs)  # ONNX Runtime's copies, of the final graphs

    quantization = {
        "weights": precision.name,
        "target": precision.target,
        "format": "onnx Q/DQ" if precision.target == "tensorrt" else "onnxruntime MatMulNBits",
        "graphs": plan.graphs,
        "backends": precision.backends,
        "requires": {
            "tensorrt": "10.3" if precision.target == "tensorrt" else None,
            "min_sm": precision.min_sm,
            "opset": precision.opset,
        },
        "per_graph": entries,
        "calibration": {
            **samples.provenance,
            "recorded_calls": calibration.counts(),
            "library": next(iter(entries.values()))["library"],
        }
        if precision.needs_calibration
        else None,
        "source_bundle": {"path": str(source), "manifest_sha256": sha256_file(source / MANIFEST_NAME)},
    }
    new = replace(
        manifest,
        graphs=graph_specs,
        quantization=quantization,
        schema_version=SCHEMA_VERSION,
        created_by=f"mllm-edge {__version__} calibrate",
    )

    before = graph_sizes(manifest, bundle_sizes(source, manifest))
    shutil.rmtree(work / "calibration", ignore_errors=True)  # no longer needed: disk back before verifying
    results, answers = [], None
    for i, g in enumerate(plan.graphs if config.verify else []):
        progress(f"verify {g}", i, len(plan.graphs))
        calls = held.calls.get(g, []) + [source / manifest.samples[g]]  # and export's own sample
        # what will run: TensorRT builds the graph itself, ONNX Runtime's CPU provider runs the fused
        # copy (of a tensorrt target's Q/DQ graph too, then checked by the answers below only)
        spec = graph_specs[g]
        file = spec.file if precision.target == "tensorrt" else spec.onnxruntime_file or spec.file
        results.append(check_graph(tmp / file, g, calls, precision.min_cosine))
    shutil.rmtree(work, ignore_errors=True)
    write_manifest(tmp, new)  # the files are final: hashed once (the answers check loads the bundle)
    if config.verify:
        if samples.held_out:
            progress("verify answers", 0, len(samples.held_out))
            answers = check_answers(
                tmp,
                samples.held_out,
                held.answers,
                precision.min_agreement,
                progress=lambda done: progress("verify answers", done, len(samples.held_out)),
            )
        bad = [c for c in results if not c.ok]
        if bad or (answers and not answers.ok):
            lines = [
                f"{c.graph}: {c.output} cosine {c.cosine:.4f} < {c.limit} (SNR {c.snr_db:.1f} dB, {c.calls} held-out calls)"
                for c in bad
            ]
            if answers and not answers.ok:
                lines.append(
                    f"answers: {100 * answers.agreement:.0f}% of {answers.items} held-out answers equal the source bundle's, "
                    f"below {100 * answers.limit:.0f}%"
                )
            raise MllmEdgeError(
                f"{precision.name} loses too much against {source}; the bundle was not written:\n  "
                + "\n  ".join(lines)
                + "\n(exclude sensitive weights with --exclude, try another precision, or --no-verify to write it anyway)"
            )
        for c, entry in zip(results, entries.values()):
            entry["held_out_cosine"], entry["held_out_snr_db"] = round(c.cosine, 6), round(c.snr_db, 2)
        if answers:
            new.quantization["held_out_agreement"] = answers.agreement
    (tmp / MANIFEST_NAME).write_text(new.to_json(), encoding="utf-8")  # with the verification figures
    after = graph_sizes(new, bundle_sizes(tmp, new))
    move_into_place(tmp, out, config.force)
    report = CalibrateReport(out, new, precision, answers=answers, recorded=calibration.counts())
    checks = {c.graph: c for c in results}
    for g in plan.graphs:
        count = len(entries[g]["weights"])
        report.graphs.append(GraphResult(g, before[g], after[g], count, checks.get(g)))
    return report
