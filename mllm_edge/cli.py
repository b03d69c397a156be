"""The `mllm-edge` command line. Commands stay thin: they parse, call the library, and print."""

from __future__ import annotations

import contextlib
import functools
import signal
import sys
from pathlib import Path
from typing import Optional

import typer

from . import __version__
from .errors import MllmEdgeError
from .manifest import DEFAULT_BUNDLE
from .runtime.image import MAX_IMAGE_PIXELS

LOW_MEMORY_HELP = "ONNX Runtime on the CPU: sessions over the mapped weights, no optimised copies (less memory, a little slower)."
MAX_PIXELS_HELP = "Refuse images with more pixels than this (a guard against decompression bombs)."
MERGE_HELP = (
    "LLaVA-NeXT with FasterVLM: spatial (the official code's: every view's kept tokens, no newlines) | "
    "unpad (the unpadded grid's kept tokens and a newline per row)."
)

app = typer.Typer(
    help="Prune the visual tokens of LLaVA-family models (FastV, FasterVLM), export to ONNX, build TensorRT engines, run.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"mllm-edge {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """mllm-edge: fast LLaVA on Jetson and desktop GPUs, without losing answers."""


def user_errors(command):
    """Turn MllmEdgeError into 'error: ...' on stderr and exit code 1, with no traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        from .atomic import Terminated

        try:
            return command(*args, **kwargs)
        except MllmEdgeError as e:
            typer.secho(f"error: {e}", err=True, fg=typer.colors.RED)
            raise typer.Exit(1) from None
        except Terminated as e:  # SIGTERM or SIGHUP during a write: cleaned up, say so
            typer.secho(f"error: {e}; nothing half-written was left behind", err=True, fg=typer.colors.RED)
            raise typer.Exit(128 + e.signum) from None

    return wrapper


def progress_bar(*columns):
    """A transient progress bar on stderr, shown only on a terminal: in logs and pipes it would leave
    blank lines before the result or an error."""
    from rich.console import Console
    from rich.progress import Progress

    console = Console(stderr=True)
    return Progress(*columns, console=console, transient=True, disable=not console.is_terminal)


def require_export_extra(modules: tuple[str, ...] = ("torch", "transformers")) -> None:
    """The PyTorch side needs torch and transformers (exporting also onnx), which a runtime-only install lacks."""
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise MllmEdgeError(f"this command needs {' and '.join(missing)}: pip install 'mllm-edge[export]'")


@app.command()
@user_errors
def reference(
    image: Path = typer.Argument(..., help="Image file (JPEG, PNG, ...)."),
    model: str = typer.Option(
        ..., "--model", "-m", help="LLaVA checkpoint: a local folder or a Hugging Face hub id."
    ),
    prompt: str = typer.Option("Describe the image.", "--prompt", "-p", help="The question about the image."),
    method: str = typer.Option("none", "--method", help="none | fastv | fastervlm | fastv+fastervlm"),
    ratio: float = typer.Option(0.0, "--ratio", help="Fraction of image tokens pruned, 0 <= R < 1."),
    k: int = typer.Option(2, "--k", help="FastV: the layer where pruning happens (1 <= K < layers)."),
    vision_ratio: Optional[float] = typer.Option(
        None, "--vision-ratio", help="FasterVLM's ratio when both methods run."
    ),
    merge: str = typer.Option("spatial", "--merge", help=MERGE_HELP),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens", min=1, help="Stop after this many tokens."),
    max_image_pixels: int = typer.Option(MAX_IMAGE_PIXELS, "--max-image-pixels", min=1, help=MAX_PIXELS_HELP),
) -> None:
    """Answer with the PyTorch reference (greedy, KV cache): the yardstick exported graphs are checked against."""
    import time

    require_export_extra()
    from .models import generate, load_llava
    from .models.checkpoint import resolve_checkpoint
    from .models.config import load_llava_spec
    from .models.inputs import load_image, processor_inputs
    from .pruning import PruningConfig

    pruning = PruningConfig.from_method(method, ratio, k, vision_ratio, merge)
    picture = load_image(image, max_image_pixels)
    folder = resolve_checkpoint(model, check=lambda f: load_llava_spec(f))  # refused before the weights come
    llava = load_llava(folder)
    pruning.validate(llava.spec.text.num_layers, llava.spec.vision.has_cls, llava.spec.max_views)
    batch, _ = processor_inputs(folder, picture, prompt)
    input_ids, pixel_values, image_sizes = batch["input_ids"], batch["pixel_values"], batch.get("image_sizes")
    limit = llava.spec.text.max_context  # as `run` checks its max context
    if input_ids.shape[1] + max_new_tokens > limit:
        holds = (
            f"its sliding window is {limit} tokens"
            if limit < llava.spec.text.max_position_embeddings
            else f"the model holds {limit} positions"
        )
        raise MllmEdgeError(
            f"the prompt takes {input_ids.shape[1]} tokens and --max-new-tokens {max_new_tokens} more; {holds}"
        )
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    start = time.perf_counter()
    result = generate(
        llava,
        input_ids,
        pixel_values,
        pruning,
        max_new_tokens,
        tokenizer.eos_token_id,
        image_sizes=image_sizes,
    )
    seconds = time.perf_counter() - start
    typer.echo(tokenizer.decode(result.token_ids[0], skip_special_tokens=True))
    placeholders = int((input_ids[0] == llava.spec.image_token_id).sum())
    entering = placeholders - (input_ids.shape[1] - result.prefill.prompt_length)  # after FasterVLM
    kept = result.prefill.kept_llm
    typer.echo(
        f"image tokens: {placeholders} -> vision {entering} -> llm {entering if kept is None else kept.shape[1]}; "
        f"{len(result.token_ids[0])} tokens in {seconds:.2f} s",
        err=True,
    )


@app.command()
@user_errors
def export(
    model: Optional[str] = typer.Option(
        None,
        "--model",
        "-m",
        help="LLaVA checkpoint: a local folder or a Hugging Face hub id (default: the built-in model).",
    ),
    out: Path = typer.Option(Path(DEFAULT_BUNDLE), "--out", "-o", help="Bundle folder to write."),
    method: str = typer.Option("none", "--method", help="none | fastv | fastervlm | fastv+fastervlm"),
    ratio: float = typer.Option(0.0, "--ratio", help="Fraction of image tokens pruned, 0 <= R < 1."),
    k: int = typer.Option(2, "--k", help="FastV: the layer where pruning happens (1 <= K < layers)."),
    vision_ratio: Optional[float] = typer.Option(
        None, "--vision-ratio", help="FasterVLM's ratio when both methods run."
    ),
    merge: str = typer.Option("spatial", "--merge", help=MERGE_HELP),
    dtype: str = typer.Option(
        "fp32", "--dtype", help="fp32 | fp16 (fp16 for GPUs and Jetsons; norms and softmax stay fp32 inside)."
    ),
    quantize: Optional[str] = typer.Option(
        None,
        "--quantize",
        help="int8 | int4: weight-only LLM graphs for ONNX Runtime (faster decoding on CPUs; not for TensorRT). "
        "A shortcut for `calibrate --target onnxruntime`.",
    ),
    max_context: Optional[int] = typer.Option(
        None,
        "--max-context",
        help="Tokens the KV cache holds [default: 2048, or LLaVA-NeXT's largest image + 1024; within the model's limit].",
    ),
    no_verify: bool = typer.Option(False, "--no-verify", help="Skip the ONNX Runtime check against PyTorch."),
    force: bool = typer.Option(False, "--force", help="Replace the bundle folder if it exists."),
) -> None:
    """Export a checkpoint as a bundle of ONNX graphs, checked against PyTorch and TensorRT 10's parser rules."""
    require_export_extra(("torch", "transformers", "onnx", "onnxscript"))
    from rich.console import Console
    from rich.markup import escape
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn

    from .export.bundle import ExportConfig, export_bundle, stages
    from .export.report import (
        checks_table,
        files_table,
        geometry_line,
        human_bytes,
        pruning_line,
        weights_line,
    )
    from .pruning import PruningConfig

    if model is None:
        from .default_model import checkpoint

        model = str(checkpoint())
    if quantize is not None:  # the shortcut: a float bundle, then `calibrate --target onnxruntime`
        from .calibration.precisions import precision as find_precision

        find_precision(quantize, "onnxruntime")  # an unknown name is refused before the export
        if dtype != "fp32":
            raise MllmEdgeError(
                f"--quantize {quantize} needs --dtype fp32: ONNX Runtime's kernel takes fp32 activations"
            )
    config = ExportConfig(
        model,
        out,
        PruningConfig.from_method(method, ratio, k, vision_ratio, merge),
        dtype,
        max_context,
        not no_verify,
        force,
    )
    names = stages(config)
    columns = (TextColumn("{task.description:<14}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with contextlib.ExitStack() as stack:
        if quantize is not None:  # the float bundle goes into a hidden folder beside out, removed after
            import tempfile

            from .export.bundle import check_destination

            check_destination(out, force)
            float_dir = Path(
                stack.enter_context(tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent))
            )
            config.out = float_dir / "float"
        with progress_bar(*columns) as progress:
            task = progress.add_task("export", total=len(names))

            def on_stage(name: str) -> None:
                if name not in names:  # a LLaVA-NeXT checkpoint's pack graph: known once it is loaded
                    names[:] = stages(config, anyres=True)
                    progress.update(task, total=len(names))
                progress.update(task, description=name, completed=names.index(name))

            report = export_bundle(config, on_stage)
            progress.update(task, description="done", completed=len(names))
        if quantize is not None:
            from .calibration.calibrate import CalibrateConfig

            calibrated = _calibrate_with_progress(
                CalibrateConfig(
                    config.out,
                    quantize,
                    "onnxruntime",
                    out,
                    verify=not no_verify,
                    force=force,
                )
            )
            report.out, report.manifest = calibrated.out, calibrated.manifest
            report.files = {rel: (out / rel).stat().st_size for rel in calibrated.manifest.files}

    console = Console(soft_wrap=True)  # long lines stay whole, so they can be grepped
    m = report.manifest
    console.print(
        f"[bold]{escape(str(report.out))}[/bold]: {escape(m.source['model'])}, {weights_line(m)}, max context {m.max_context}"
    )
    if geometry_line(m):
        console.print(geometry_line(m))
    console.print(pruning_line(m))
    f = report.flops
    console.print(
        f"LLM prefill FLOPs per layer on the sample prompt, {report.sample_image_tokens} image tokens unpruned "
        f"(FastV paper's Eq. 5): {f.pruned / 1e9:.3g} G vs {f.unpruned / 1e9:.3g} G unpruned ({100 * f.ratio:.0f}%)"
    )
    if report.shared_bytes:
        console.print(
            f"identical weights in two graphs (tied embeddings) stored once: {human_bytes(report.shared_bytes)} saved"
        )
    console.print(files_table(m, report.files))
    if report.checks:
        console.print(checks_table(report.checks, report.chain))
    else:
        console.print("not verified (--no-verify)")
    if quantize is not None:
        _print_calibration(calibrated)


@app.command()
@user_errors
def calibrate(
    bundle: Path = typer.Argument(
        Path(DEFAULT_BUNDLE), help="An fp32 or fp16 bundle made by `mllm-edge export`."
    ),
    precision: str = typer.Option(
        ...,
        "--precision",
        help="int4-awq | int8 | fp8 (--target tensorrt); int8 | int4 (--target onnxruntime).",
    ),
    dataset: Optional[Path] = typer.Option(
        None,
        "--dataset",
        help='JSONL lines {"image": path, "question": ...} like the ones the model will see.',
    ),
    synthetic: Optional[int] = typer.Option(
        None, "--synthetic", help="N scenes of the built-in model's training world (its default: 48)."
    ),
    samples: Optional[int] = typer.Option(
        None,
        "--samples",
        help="Items to calibrate on [default: up to 32; a quarter, at most 16, is held out to verify].",
    ),
    graphs: str = typer.Option("llm", "--graphs", help="llm | vision | all: which graphs to quantize."),
    exclude: Optional[str] = typer.Option(
        None,
        "--exclude",
        help="A regular expression: weights whose names match stay in float (the LM head always does for tensorrt).",
    ),
    block_size: Optional[int] = typer.Option(
        None,
        "--block-size",
        help="int4 weights per scale [default: 128, or the largest of 64, 32, 16 that divides every weight].",
    ),
    target: str = typer.Option(
        "tensorrt", "--target", help="tensorrt (standard Q/DQ) | onnxruntime (MatMulNBits, CPU)."
    ),
    target_sm: Optional[str] = typer.Option(
        None, "--target-sm", help="Compute capability of the GPU it is for, e.g. 8.7 (Orin): fp8 needs 8.9+."
    ),
    out: Optional[Path] = typer.Option(
        None, "--out", "-o", help="Bundle folder to write [default: BUNDLE-<precision>]."
    ),
    force: bool = typer.Option(False, "--force", help="Replace the output folder if it exists."),
    no_verify: bool = typer.Option(
        False,
        "--no-verify",
        help="Skip the held-out checks against the source bundle (and write whatever comes out).",
    ),
    seed: int = typer.Option(
        0, "--seed", help="Which items calibrate and which are held out; synthetic scenes too."
    ),
) -> None:
    """Quantize a bundle's graphs, calibrated on real runs of it, into a new bundle (the source is left as it is)."""
    require_export_extra(("onnx", "onnxruntime"))
    from .calibration.calibrate import CalibrateConfig

    report = _calibrate_with_progress(
        CalibrateConfig(
            bundle,
            precision,
            target,
            out,
            dataset,
            synthetic,
            samples,
            graphs,
            exclude,
            block_size,
            target_sm,
            not no_verify,
            force,
            seed,
        )
    )
    _print_calibration(report)


def _calibrate_with_progress(config):
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn

    from .calibration.calibrate import calibrate_bundle

    columns = (TextColumn("{task.description:<18}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with progress_bar(*columns) as progress:  # one bar: the stage, and its items or graphs
        task = progress.add_task("check", total=1)
        update = lambda stage, done, total: progress.update(
            task, description=stage, completed=done, total=max(total, 1)
        )
        return calibrate_bundle(config, update)


def _print_calibration(report) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from .export.report import human_bytes, weights_line

    console = Console(soft_wrap=True)
    m, q = report.manifest, report.manifest.quantization
    console.print(f"[bold]{escape(str(report.out))}[/bold]: {escape(m.source['model'])}, {weights_line(m)}")
    cal = q["calibration"]
    if cal:
        calls = ", ".join(f"{g} {n}" for g, n in cal["recorded_calls"].items())
        console.print(
            f"calibrated on {cal['samples']} items of {escape(cal['dataset'])} ({calls} recorded calls) with {cal['library']}"
        )
    table = Table(title=f"{report.precision.name} for {report.precision.target}", title_justify="left")
    for column in ("graph", "weights", "method", "bytes before", "after", "", "cosine", "SNR dB"):
        table.add_column(column, justify="left" if column in ("graph", "method") else "right")
    for r in report.graphs:
        entry = q["per_graph"][r.graph]
        method = entry["method"] + (f", block {entry['block_size']}" if entry.get("block_size") else "")
        c = r.check
        table.add_row(
            r.graph,
            str(r.weights),
            method,
            human_bytes(r.bytes_before),
            human_bytes(r.bytes_after),
            f"{100 * r.bytes_after / r.bytes_before:.0f}%",
            f"{c.cosine:.4f}" if c else "-",
            f"{c.snr_db:.1f}" if c else "-",
        )
    console.print(table)
    a = report.answers
    if a:
        console.print(f"held-out answers equal to the source bundle's: {100 * a.agreement:.0f}% of {a.items}")
    elif not report.graphs or report.graphs[0].check is None:
        console.print("not verified (--no-verify)")
    console.print("runs on: " + ", ".join(m.backends))


@app.command()
@user_errors
def inspect(
    bundle: Path = typer.Argument(Path(DEFAULT_BUNDLE), help="Bundle folder made by `mllm-edge export`."),
) -> None:
    """Print a bundle's graphs, inputs and outputs, op counts, sizes, keep counts and TensorRT 10 lint result."""
    from rich.console import Console
    from rich.markup import escape

    from .export.report import (
        bundle_sizes,
        geometry_line,
        graph_sizes,
        human_bytes,
        io_table,
        pruning_line,
        weights_line,
    )
    from .manifest import load_manifest

    m = load_manifest(bundle)
    console = Console(soft_wrap=True)  # long lines stay whole, so they can be grepped
    console.print(
        f"[bold]{escape(str(bundle))}[/bold]: {escape(m.source['model'])}, {weights_line(m)}, max context {m.max_context}, {m.created_by}"
    )
    if geometry_line(m):
        console.print(geometry_line(m))
    console.print(pruning_line(m))
    sizes = graph_sizes(m, bundle_sizes(bundle, m))
    try:
        from .export.lint import lint_model, op_counts
    except ImportError:
        lint_model = op_counts = None
    for name, spec in m.graphs.items():
        console.print(io_table(m, name))
        line = f"  {human_bytes(sizes[name])}"
        if op_counts is not None:
            counts = op_counts(bundle / spec.file)
            top = sorted(counts.items(), key=lambda kv: -kv[1])
            line += f"; {sum(counts.values())} nodes: " + ", ".join(f"{op} {n}" for op, n in top)
            if m.quantized(name) and "tensorrt" not in m.backends:
                line += f"\n  TensorRT 10 lint: not linted, {m.quantization['weights']} weights for ONNX Runtime only"
            else:
                findings = lint_model(bundle / spec.file)
                line += "\n  TensorRT 10 lint: " + ("ok" if not findings else "; ".join(map(str, findings)))
            if spec.onnxruntime_file:
                fused = op_counts(bundle / spec.onnxruntime_file)
                kernels = {
                    op: n
                    for op, n in fused.items()
                    if op in ("GroupQueryAttention", "MultiHeadAttention", "If")
                }
                line += f"\n  ONNX Runtime runs {spec.onnxruntime_file}: " + ", ".join(
                    f"{op} {n}" for op, n in kernels.items()
                )
        console.print(line, highlight=False)
    if op_counts is None:
        console.print("op counts and the TensorRT lint need onnx: pip install 'mllm-edge[export]'")


@app.command()
@user_errors
def verify(
    bundle: Path = typer.Argument(Path(DEFAULT_BUNDLE), help="Bundle folder made by `mllm-edge export`."),
) -> None:
    """Check every file of a bundle, and of each engine folder in it, against its sha256, re-reading all.

    Other commands re-read only files changed since their last check (size, time, inode)."""
    import time

    from .engines import ENGINES_DIR, ENGINES_META, load_engine_set
    from .manifest import load_manifest, verify_bundle_files

    start = time.perf_counter()
    manifest = load_manifest(bundle, verify_files=False)
    verify_bundle_files(bundle, manifest, full=True)
    folders = sorted(p.parent for p in (bundle / ENGINES_DIR).glob(f"*/{ENGINES_META}"))
    engines = sum(len(load_engine_set(folder, bundle, full=True).engines) for folder in folders)
    typer.echo(
        f"{bundle}: {len(manifest.files)} files and {engines} engines in {len(folders)} engine folders match their sha256 "
        f"({time.perf_counter() - start:.1f} s)"
    )


@app.command(name="eval")
@user_errors
def eval_(
    bundle: Path = typer.Option(
        Path(DEFAULT_BUNDLE), "--bundle", "-b", help="Bundle folder made by `mllm-edge export`."
    ),
    dataset: Optional[Path] = typer.Option(
        None,
        "--dataset",
        help='JSONL lines {"image": path, "question": ..., "answer": ...}, paths relative to the file.',
    ),
    synthetic: Optional[int] = typer.Option(
        None,
        "--synthetic",
        help="N held-out synthetic scenes of the built-in model's world (default: 200 when no --dataset).",
    ),
    baseline: Optional[Path] = typer.Option(
        None,
        "--baseline",
        help="An unpruned bundle of the same model: report how often the answers agree with it.",
    ),
    backend: str = typer.Option("auto", "--backend", help="auto | onnxruntime | tensorrt"),
    as_json: bool = typer.Option(
        False, "--json", help="Print one JSON object (with every answer) instead of a summary."
    ),
    max_image_pixels: int = typer.Option(MAX_IMAGE_PIXELS, "--max-image-pixels", min=1, help=MAX_PIXELS_HELP),
    skip_bad: bool = typer.Option(
        False, "--skip-bad", help="Leave out items whose image or question cannot be used, and count them."
    ),
) -> None:
    """Exact-match accuracy of a bundle's answers, agreement with an unpruned baseline, prefill time, image tokens kept."""
    import json

    from rich.console import Console
    from rich.markup import escape
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn

    from .evaluate import evaluate, load_jsonl, synthetic_items

    if dataset is not None and synthetic is not None:
        raise MllmEdgeError("give --dataset or --synthetic, not both")
    items = (
        load_jsonl(dataset)
        if dataset is not None
        else synthetic_items(200 if synthetic is None else synthetic)
    )
    columns = (TextColumn("eval"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with progress_bar(*columns) as progress:
        task = progress.add_task("eval", total=len(items))
        report = evaluate(
            bundle,
            items,
            baseline,
            backend,
            lambda done: progress.update(task, completed=done),
            max_image_pixels,
            skip_bad,
        )
    if as_json:
        print(json.dumps(report.to_dict(), indent=2))
        return
    console = Console(soft_wrap=True)
    agreement = "" if report.agreement is None else f", agreement with the baseline {report.agreement:.1%}"
    console.print(
        f"{report.bundle} ({report.method}): exact match {report.accuracy:.1%} of {report.items}{agreement}; "
        f"mean prefill {report.mean_prefill_ms:.1f} ms; image tokens kept {report.image_tokens_kept} of {report.image_tokens}"
    )
    if report.by_kind:
        console.print("by question kind: " + ", ".join(f"{k} {v:.0%}" for k, v in report.by_kind.items()))
    if report.skipped:
        console.print(f"skipped {len(report.skipped)} items (--skip-bad):", highlight=False)
        for problem in report.skipped:
            console.print(f"  {escape(problem)}", highlight=False)


def _numbers(text: str, what: str, kind=int) -> tuple:
    try:
        return tuple(kind(v) for v in text.split(",") if v.strip())
    except ValueError:
        numbers = "whole numbers" if kind is int else "numbers"
        raise MllmEdgeError(f"{what} must be {numbers} separated by commas, got '{text}'") from None


@app.command()
@user_errors
def bench(
    bundles: Optional[list[Path]] = typer.Argument(
        None, help="Bundles made by `mllm-edge export` (default: the built-in model's)."
    ),
    backend: str = typer.Option("auto", "--backend", help="auto | onnxruntime | tensorrt"),
    device: str = typer.Option("cpu", "--device", help="cpu | cuda"),
    prompt_lengths: str = typer.Option(
        "32", "--prompt-lengths", help="Text tokens of the prefills timed (the image's come on top)."
    ),
    contexts: str = typer.Option(
        "640,1024",
        "--contexts",
        help="Contexts (tokens) of the decode steps timed (shorter than the picture's prompt: a text-only chat).",
    ),
    runs: int = typer.Option(5, "--runs", min=1, help="Timed runs of each figure (its median is shown)."),
    warmup: int = typer.Option(1, "--warmup", min=0, help="Untimed runs before them."),
    decode_tokens: int = typer.Option(16, "--decode-tokens", min=1, help="Decode steps per timed run."),
    low_memory: bool = typer.Option(False, "--low-memory", help=LOW_MEMORY_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of tables."),
    plot_to: Optional[Path] = typer.Option(
        None, "--plot", help="Write a PNG: decode time against context, prefill against image tokens kept."
    ),
) -> None:
    """Time a bundle here: vision, prefill at several prompt lengths, decode at several contexts, memory."""
    import json

    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn

    from . import bench as benchmark

    lengths, ctxs = _numbers(prompt_lengths, "--prompt-lengths"), _numbers(contexts, "--contexts")
    if plot_to is not None:
        if not plot_to.parent.is_dir():
            raise MllmEdgeError(f"--plot {plot_to}: its folder does not exist")
        benchmark.require_matplotlib()  # before minutes of timing, not after
    results = []
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with progress_bar(*columns) as progress:
        task = progress.add_task("bench", total=None)
        for folder in bundles or [Path(DEFAULT_BUNDLE)]:
            show = lambda stage, done, total, name=folder.name: progress.update(
                task, description=f"{name}: {stage}", completed=done, total=total
            )
            results.append(
                benchmark.bench_bundle(
                    folder, backend, device, lengths, ctxs, runs, warmup, decode_tokens, show, low_memory
                )
            )
    if plot_to is not None:
        benchmark.plot(results, plot_to)
    if as_json:
        print(
            json.dumps({"bundles": [r.to_dict() for r in results], "runs": runs, "warmup": warmup}, indent=2)
        )
        return
    _print_bench(results, runs)


def _print_bench(results, runs: int) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(soft_wrap=True)

    def spread(f) -> str:
        return f"{f.median:.2f} ({f.min:.2f}-{f.max:.2f})"

    for r in results:
        console.print(
            f"{r.bundle}: {r.method}, {r.weights}, {r.backend} on {r.device}; image tokens {r.image_tokens['vision']}"
            f" -> {r.image_tokens['llm']} entering the LLM -> {r.image_tokens['after_fastv']} after FastV; "
            f"vision {spread(r.vision_ms)} ms; peak host memory {r.peak_host_mb:.0f} MB"
            + (f", device {r.peak_device_mb:.0f} MB" if r.peak_device_mb is not None else ""),
            highlight=False,
        )
        table = Table("prefill: text tokens", "image tokens", "ms (min-max)", "GFLOP", "TFLOP/s")
        for row in r.prefill:
            table.add_row(
                str(row.text_tokens),
                str(row.image_tokens),
                spread(row.ms),
                f"{row.flops / 1e9:.2f}",
                f"{row.tflops_per_s:.3f}",
            )
        console.print(table)
        table = Table("decode: context", "ms/token (min-max)", "tokens/s", "MB read/step", "GB/s")
        for row in r.decode:
            table.add_row(
                str(row.context),
                spread(row.ms_per_token),
                f"{row.tokens_per_s:.1f}",
                f"{row.bytes_per_step / 1e6:.1f}",
                f"{row.gb_per_s:.2f}",
            )
        console.print(table)
    console.print(f"medians of {runs} runs after warm-up", highlight=False)


@app.command()
@user_errors
def plan(
    source: Path = typer.Argument(
        Path(DEFAULT_BUNDLE), help="A bundle, or a checkpoint folder with config.json (no weights needed)."
    ),
    device_name: Optional[str] = typer.Option(
        None, "--device", help="A device of --list-devices, or cpu (this machine)."
    ),
    precision: Optional[str] = typer.Option(
        None, "--precision", help="fp16,fp8,int8,int4-awq (GPUs) or fp32 (cpu); default: all the device runs."
    ),
    method: Optional[str] = typer.Option(
        None, "--method", help="none | fastv | fastervlm; default: a grid of settings."
    ),
    ratio: Optional[str] = typer.Option(
        None, "--ratio", help="Pruning ratios, e.g. 0.5,0.75 (with --method)."
    ),
    k: int = typer.Option(2, "--k", help="FastV's layer."),
    merge: Optional[str] = typer.Option(
        None,
        "--merge",
        help="LLaVA-NeXT: FasterVLM's merge, spatial | unpad (default: the bundle's, or spatial).",
    ),
    max_context: Optional[int] = typer.Option(
        None, "--max-context", help="Default: the bundle's, or what export would give; at most that limit."
    ),
    prompt_tokens: int = typer.Option(
        64, "--prompt-tokens", help="Text tokens beside the image in the prompt."
    ),
    budget_ms: Optional[float] = typer.Option(
        None, "--budget-ms", help="Time to the first token it must meet."
    ),
    budget_gb: Optional[float] = typer.Option(None, "--budget-gb", help="Memory it may take."),
    bandwidth: Optional[float] = typer.Option(
        None, "--bandwidth", help="Memory bandwidth, GB/s (a device of your own)."
    ),
    tflops: Optional[float] = typer.Option(
        None, "--tflops", help="Dense fp16 TFLOP/s (a device of your own)."
    ),
    memory: Optional[float] = typer.Option(None, "--memory", help="Memory, GB (a device of your own)."),
    list_devices: bool = typer.Option(False, "--list-devices", help="List the devices and their figures."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of a table."),
) -> None:
    """Predict memory, time to first token and decode speed of every setting on a device, before building."""
    import json

    from .planning import devices
    from .planning.plan import PRUNING_GRID, make_plan

    if list_devices:
        _print_devices(devices.DEVICES.values(), as_json)
        return
    if device_name is None and bandwidth is None:
        raise MllmEdgeError("give --device NAME (see --list-devices) or --bandwidth, --tflops and --memory")
    base = devices.device(device_name) if device_name else None
    target = devices.custom(base, bandwidth, tflops, memory)
    pruning = None
    if method is not None or ratio is not None:
        if method is None:
            raise MllmEdgeError("--ratio needs --method")
        ratios = [0.0] if method == "none" else list(_numbers(ratio or "0.5", "--ratio", float))
        pruning = [(method, r) for r in ratios]
        if method not in {m for m, _ in PRUNING_GRID}:
            raise MllmEdgeError(f"unknown --method '{method}' (choose from none, fastv, fastervlm)")
    precisions = [p.strip() for p in precision.split(",") if p.strip()] if precision else None
    result = make_plan(
        source, target, precisions, pruning, k, max_context, prompt_tokens, budget_ms, budget_gb, merge
    )
    if as_json:
        print(json.dumps(result.to_dict(), indent=2))
        return
    _print_plan(result)


def _print_devices(found, as_json: bool) -> None:
    import json
    from dataclasses import asdict

    from rich.console import Console
    from rich.table import Table

    rows = [{k: v for k, v in asdict(d).items() if k != "efficiency"} for d in found]
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    table = Table("--device", "", "memory GB", "GB/s", "fp16 TFLOP/s", "int8 TOP/s", "fp8 TFLOP/s", "SM")
    for r in rows:
        show = lambda v: "-" if v is None else f"{v:g}"
        table.add_row(
            r["name"],
            r["label"],
            show(r["memory_gb"]),
            show(r["bandwidth_gb_s"]),
            show(r["fp16_tflops"]),
            show(r["int8_tops"]),
            show(r["fp8_tflops"]),
            r["sm"] or "",
        )
    console = Console(soft_wrap=True)
    console.print(table)
    console.print(
        "dense rates of the GPU alone; cpu: this machine, measured when planned. Sources: docs/plan.md",
        highlight=False,
    )


def _print_plan(result) -> None:
    from rich.console import Console
    from rich.table import Table

    d = result.device
    console = Console(soft_wrap=True)
    image = "the image"
    if result.image["views"] > 1:  # LLaVA-NeXT: sized for the picture that gives the most tokens
        image = (
            f"the largest image ({result.image['views']} views, {result.image['tokens']} tokens; "
            f"FasterVLM's merge: {result.merge})"
        )
    console.print(
        f"{result.source} on {d.label}: {d.available_gb:.1f} GB available, {d.bandwidth_gb_s:g} GB/s; "
        f"max context {result.max_context}, prompt {result.prompt_tokens} text tokens + {image}",
        highlight=False,
    )
    table = Table(
        "setting", "image tokens", "memory GB", "fits", "vision ms", "prefill ms", "TTFT ms", "decode tok/s"
    )
    for p in result.predictions:
        s = p.setting
        name = (
            "none" if s["method"] == "none" else f"{s['method']} R={s['ratio']:g}"
        ) + f", {s['precision']}"
        mark = " <-" if p is result.chosen else ""
        table.add_row(
            name + mark,
            f"{p.image_tokens['vision']} -> {p.image_tokens['llm']}",
            f"{p.memory_gb['total']:.2f}",
            "yes" if p.fits else "no",
            f"{p.vision_ms:.1f}",
            f"{p.prefill_ms:.1f}",
            f"{p.ttft_ms:.1f}",
            f"{p.decode_tokens_per_s:.1f}",
        )
    console.print(table)
    for line in result.skipped:
        console.print(f"not predicted: {line}", highlight=False)
    if result.chosen is None:
        console.print("no setting fits this device", highlight=False)
    console.print(
        "predicted by a roofline fitted to published Jetson figures; how well it holds: docs/plan.md",
        highlight=False,
    )


@app.command()
@user_errors
def build(
    bundle: Path = typer.Argument(Path(DEFAULT_BUNDLE), help="Bundle folder made by `mllm-edge export`."),
    precision: Optional[str] = typer.Option(
        None, "--precision", help="fp16 | fp32 | bf16 (default: the bundle's dtype)."
    ),
    max_context: Optional[int] = typer.Option(
        None, "--max-context", help="Largest context the engines take (default: the bundle's)."
    ),
    workspace: Optional[int] = typer.Option(
        None, "--workspace", help="TensorRT workspace in MB (default: 4096; 1024 on a Jetson)."
    ),
    timing_cache: Optional[Path] = typer.Option(
        None,
        "--timing-cache",
        help="Timing cache file, reused and updated (default: in the bundle's engines/).",
    ),
    trtexec: bool = typer.Option(
        False,
        "--trtexec",
        help="Also write the equivalent trtexec command lines (trtexec.sh) beside the engines.",
    ),
    verify: bool = typer.Option(
        True,
        "--verify/--no-verify",
        help="Run each engine on export's samples and compare with the reference outputs.",
    ),
    trtexec_only: bool = typer.Option(
        False,
        "--trtexec-only",
        help="Write trtexec.sh into the folder its engines go to, and build nothing (then: --adopt that folder).",
    ),
    adopt: Optional[Path] = typer.Option(
        None,
        "--adopt",
        help="Take in engines built elsewhere (trtexec.sh's OUT folder) instead of building: checked against the bundle.",
    ),
) -> None:
    """Build TensorRT engines for this GPU, one per graph, into BUNDLE/engines/<gpu>-sm<cc>-trt<version>/."""
    from rich.console import Console
    from rich.markup import escape
    from rich.progress import SpinnerColumn, TextColumn, TimeElapsedColumn

    from .build.build import BuildConfig, build_bundle

    config = BuildConfig(
        bundle, precision, max_context, workspace, timing_cache, trtexec, verify, adopt, trtexec_only
    )
    with progress_bar(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn()) as progress:
        task = progress.add_task("build")
        plan, checks = build_bundle(config, lambda text: progress.update(task, description=text))
    if plan.script is not None:
        typer.echo(
            f"wrote {plan.script}: run it, then `mllm-edge build {bundle} --adopt {plan.script.parent}`"
        )
        return
    console = Console(soft_wrap=True)
    console.print(
        f"[bold]{escape(str(plan.folder))}[/bold]: {plan.settings.precision}, max context {plan.max_context}, TensorRT {plan.target.tensorrt}"
    )
    entries = plan.engine_set.engines
    for graph in plan.profiles:
        line = f"  {graph}: " + ", ".join(p.name for p in plan.profiles[graph])
        if entries[graph].activation_bytes:  # one execution context per profile, where memory allows
            per = entries[graph].activation_bytes / 2**20
            line += f"; activations {per:.0f} MB per context, {per * len(plan.profiles[graph]):.0f} MB with one per profile"
        console.print(line)
    if plan.engine_set.adopted_from:
        console.print(f"adopted from {escape(plan.engine_set.adopted_from)}")
    if checks:
        worst = max(c.rel for c in checks)
        console.print(f"verified on export's samples: worst scale-relative error {worst:.2e}")
    elif not verify:
        console.print("not verified (--no-verify)")


@app.command()
@user_errors
def run(
    image: Path = typer.Argument(..., help="Image file (JPEG, PNG, ...)."),
    prompt: str = typer.Option("Describe the image.", "--prompt", "-p", help="The question about the image."),
    bundle: Path = typer.Option(
        Path(DEFAULT_BUNDLE), "--bundle", "-b", help="Bundle folder made by `mllm-edge export`."
    ),
    backend: str = typer.Option("auto", "--backend", help="auto | onnxruntime | tensorrt"),
    device: str = typer.Option("cpu", "--device", help="cpu | cuda"),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", help="Stop after this many tokens."),
    temperature: float = typer.Option(0.0, "--temperature", help="0 is greedy; above 0 samples."),
    top_p: float = typer.Option(
        1.0, "--top-p", help="Nucleus sampling: keep the most likely tokens up to this mass."
    ),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed for sampling, for repeatable answers."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of streaming text."),
    show_pruning: Optional[Path] = typer.Option(
        None, "--show-pruning", help="Write the image with pruned patches dimmed, kept ones outlined (PNG)."
    ),
    max_image_pixels: int = typer.Option(MAX_IMAGE_PIXELS, "--max-image-pixels", min=1, help=MAX_PIXELS_HELP),
    low_memory: bool = typer.Option(False, "--low-memory", help=LOW_MEMORY_HELP),
) -> None:
    """Answer a question about an image with an exported bundle (streams the answer; figures on stderr)."""
    import json
    from dataclasses import asdict

    from .runtime.pipeline import Pipeline

    if show_pruning is not None and not show_pruning.parent.is_dir():
        raise MllmEdgeError(f"cannot write {show_pruning}: the folder {show_pruning.parent} does not exist")
    if show_pruning is not None:
        from PIL import Image

        if show_pruning.suffix.lower() not in Image.registered_extensions():
            raise MllmEdgeError(f"cannot write {show_pruning}: give it an image file extension, such as .png")
    from .runtime.image import load_image

    pipeline = Pipeline.load(bundle, backend, device, low_memory=low_memory)
    picture = load_image(image, max_image_pixels)
    generation = pipeline.stream(
        picture, prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed
    )
    for piece in generation:
        if not as_json:
            sys.stdout.write(piece)
            sys.stdout.flush()
    result = generation.result
    if show_pruning is not None:
        from .runtime.show_pruning import draw_pruning, draw_pruning_views

        vision = pipeline.manifest.architecture["vision"]
        kept = result.kept_image_tokens
        pixels, size = pipeline.image_inputs(picture)
        if size is not None:  # LLaVA-NeXT: every view
            draw_pruning_views(
                pixels,
                pipeline.manifest.preprocessing,
                pipeline.anyres,
                size,
                kept["vision"],
                kept["llm"],
                show_pruning,
                pipeline.manifest.merge,
            )
        else:
            draw_pruning(
                pixels,
                pipeline.manifest.preprocessing,
                vision["image_size"] // vision["patch_size"],
                kept["vision"],
                kept["llm"],
                show_pruning,
            )
    if as_json:
        typer.echo(json.dumps(asdict(result), ensure_ascii=False))
        return
    typer.echo("")
    t, kept = result.timings_ms, result.kept_image_tokens
    unpruned, entering, after = result.image_token_counts(pipeline.manifest.tokenizer["image_token_id"])
    flow = f"image tokens {unpruned} -> {entering}" + (f" -> {after}" if kept["llm"] is not None else "")
    decode = (
        f"decode {result.decode_tokens_per_s:.1f} tokens/s"
        if result.decode_tokens_per_s
        else "no decode step"
    )
    if not result.text.strip():
        typer.echo(
            f"the answer is empty: the model ended it at once (tokens {result.token_ids}); try another prompt",
            err=True,
        )
    typer.echo(
        f"vision {t['vision']:.1f} ms, prefill {t['prefill']:.1f} ms, ttft {t['ttft']:.1f} ms, "
        f"{decode}; {flow}; {result.backend} on {result.device}"
        + (f", {pipeline.manifest.weights} weights" if pipeline.manifest.quantization else ""),
        err=True,
    )


CHAT_HELP = "/image PATH  talk about another picture (a new conversation if this one has one)\n/reset  start again\nCtrl-D  leave"


@app.command()
@user_errors
def chat(
    image: Optional[Path] = typer.Argument(None, help="The picture to talk about (or /image PATH later)."),
    bundle: Path = typer.Option(
        Path(DEFAULT_BUNDLE), "--bundle", "-b", help="Bundle folder made by `mllm-edge export`."
    ),
    backend: str = typer.Option("auto", "--backend", help="auto | onnxruntime | tensorrt"),
    device: str = typer.Option("cpu", "--device", help="cpu | cuda"),
    system: Optional[str] = typer.Option(None, "--system", help="A system message opening the conversation."),
    max_new_tokens: int = typer.Option(
        256, "--max-new-tokens", help="Stop each answer after this many tokens."
    ),
    temperature: float = typer.Option(0.0, "--temperature", help="0 is greedy; above 0 samples."),
    top_p: float = typer.Option(
        1.0, "--top-p", help="Nucleus sampling: keep the most likely tokens up to this mass."
    ),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed for sampling, for repeatable answers."),
    max_image_pixels: int = typer.Option(MAX_IMAGE_PIXELS, "--max-image-pixels", min=1, help=MAX_PIXELS_HELP),
    low_memory: bool = typer.Option(False, "--low-memory", help=LOW_MEMORY_HELP),
) -> None:
    """Talk with a bundle about a picture, turn after turn: each answer streams, its figures follow
    on stderr; a follow-up reuses what the last turn computed."""
    from .runtime.conversation import Conversation
    from .runtime.image import load_image
    from .runtime.pipeline import Pipeline

    picture = load_image(image, max_image_pixels) if image is not None else None  # a bad file: exit now
    with Pipeline.load(bundle, backend, device, low_memory=low_memory) as pipeline:
        conversation = Conversation(pipeline, system)
        options = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
        typer.echo(CHAT_HELP, err=True)
        while True:
            sys.stderr.write("you> ")
            sys.stderr.flush()
            line = sys.stdin.readline()
            if not line:  # Ctrl-D
                typer.echo("", err=True)
                return
            line = line.strip()
            if not line:
                continue
            if line == "/reset":
                conversation.reset()
                picture = None
                typer.echo("(a new conversation)", err=True)
                continue
            if line.startswith("/image"):
                path = line[len("/image") :].strip()
                try:
                    loaded = load_image(path, max_image_pixels) if path else None
                except MllmEdgeError as e:
                    typer.secho(f"error: {e}", err=True, fg=typer.colors.RED)
                    continue
                if loaded is None:
                    typer.echo("give the picture's path: /image PATH", err=True)
                    continue
                if conversation.image is not None:
                    conversation.reset()
                    typer.echo("(a new conversation, about this picture)", err=True)
                picture = loaded
                continue
            if line.startswith("/"):
                typer.echo(f"unknown command {line.split()[0]}\n{CHAT_HELP}", err=True)
                continue
            try:
                generation = conversation.stream(line, picture, **options)
                for piece in generation:
                    sys.stdout.write(piece)
                    sys.stdout.flush()
            except MllmEdgeError as e:  # e.g. the context is full: the conversation goes on
                typer.echo("", err=True)
                typer.secho(f"error: {e} (/reset starts a new conversation)", err=True, fg=typer.colors.RED)
                continue
            except KeyboardInterrupt:  # Ctrl-C stops this answer, not the conversation
                typer.echo("\n(stopped; the turn was dropped)", err=True)
                continue
            picture = None  # in the conversation now
            result = generation.result
            typer.echo("")
            t = result.timings_ms
            reused = (
                f", {result.cached_prompt_tokens} prompt tokens from the cache"
                if result.cached_prompt_tokens
                else ""
            )
            typer.echo(
                f"ttft {t['ttft']:.1f} ms, {result.decode_tokens_per_s:.1f} tokens/s{reused}"
                + (", picture already encoded" if result.vision_reused else ""),
                err=True,
            )


@app.command()
@user_errors
def serve(
    bundle: Path = typer.Option(
        Path(DEFAULT_BUNDLE), "--bundle", "-b", help="Bundle folder made by `mllm-edge export`."
    ),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (0.0.0.0: every interface)."),
    port: int = typer.Option(8000, "--port", min=1, max=65535),
    backend: str = typer.Option("auto", "--backend", help="auto | onnxruntime | tensorrt"),
    device: str = typer.Option("cpu", "--device", help="cpu | cuda"),
    max_queue: int = typer.Option(16, "--max-queue", min=1, help="Requests that may wait; more get 429."),
    queue_timeout: Optional[float] = typer.Option(
        None, "--queue-timeout", min=0.0, help="Seconds a request may wait for the worker; longer gets 503."
    ),
    api_key: Optional[str] = typer.Option(
        None,
        "--api-key",
        envvar="MLLM_EDGE_API_KEY",
        help="Require 'Authorization: Bearer KEY' (all but /health).",
    ),
    allowed_media_path: Optional[Path] = typer.Option(
        None, "--allowed-media-path", help="file:// images are read only under this folder."
    ),
    max_image_bytes: int = typer.Option(20 << 20, "--max-image-bytes", min=1, help="Larger images get 413."),
    max_image_pixels: int = typer.Option(MAX_IMAGE_PIXELS, "--max-image-pixels", min=1, help=MAX_PIXELS_HELP),
    low_memory: bool = typer.Option(False, "--low-memory", help=LOW_MEMORY_HELP),
    metrics: bool = typer.Option(False, "--metrics", help="GET /metrics in Prometheus's format."),
    shutdown_timeout: float = typer.Option(
        30.0,
        "--shutdown-timeout",
        min=0.0,
        help="On SIGTERM, seconds running answers may take to finish; then they are cut.",
    ),
    replicas: int = typer.Option(
        1,
        "--replicas",
        min=1,
        help="More than 1: that many pipelines behind Ray Serve's proxy (the ray extra).",
    ),
    cpus_per_replica: float = typer.Option(
        1.0, "--cpus-per-replica", min=0.1, help="Ray's CPU share of each."
    ),
) -> None:
    """Serve the bundle over HTTP with OpenAI's chat-completions API (POST /v1/chat/completions)."""
    try:
        import uvicorn  # noqa: F401

        from .serve.app import Settings, create_app, run_server
        from .serve.requests import Limits
    except ImportError as e:
        raise MllmEdgeError(f"serve needs the serve extra ({e}): pip install 'mllm-edge[serve]'") from None
    from .runtime.pipeline import Pipeline

    if allowed_media_path is not None and not allowed_media_path.is_dir():
        raise MllmEdgeError(f"--allowed-media-path {allowed_media_path} is not a folder")
    if metrics:
        try:
            import prometheus_client  # noqa: F401
        except ImportError as e:
            raise MllmEdgeError(
                f"--metrics needs prometheus-client ({e}): pip install 'mllm-edge[serve]'"
            ) from None
    from .manifest import load_manifest

    load_manifest(bundle, verify_files=False)  # a missing or broken bundle: exit now, not a 503 forever
    limits = Limits(max_image_bytes, max_image_pixels, allowed_media_path)
    settings = Settings(
        max_queue=max_queue,
        limits=limits,
        api_key=api_key,
        queue_timeout_s=queue_timeout,
        metrics=metrics,
        shutdown_timeout_s=shutdown_timeout,
    )
    if replicas > 1:
        try:
            import ray.serve  # noqa: F401

            from .serve import replicas as ray_replicas
        except ImportError as e:
            raise MllmEdgeError(f"--replicas needs Ray Serve ({e}): pip install 'mllm-edge[ray]'") from None
        on_ray = ray_replicas.application(bundle, settings, replicas, backend, device, cpus_per_replica)
        typer.echo(
            f"serving {bundle} on http://{host}:{port}/v1 with {replicas} replicas (Ray Serve)", err=True
        )

        ray_replicas.run(on_ray, host, port)  # until SIGTERM or Ctrl-C: the replicas stop, exit 0
        return
    application = create_app(
        lambda: Pipeline.load(bundle, backend, device, low_memory=low_memory),
        settings,
        name=bundle.resolve().name,
    )
    typer.echo(f"serving {bundle} on http://{host}:{port}/v1 (/health is 503 until it has loaded)", err=True)
    # after its graceful shutdown uvicorn raises the signal again: ours makes that a clean exit 0
    # (systemd's stop, Ctrl-C), not death by signal
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda signum, frame: sys.exit(0))
    run_server(application, host, port, shutdown_timeout)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
