"""The `mllm-edge` command line. Commands stay thin: they parse, call the library, and print."""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Optional

import typer

from . import __version__
from .errors import MllmEdgeError

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
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    """mllm-edge: fast LLaVA on Jetson and desktop GPUs, without losing answers."""


def user_errors(command):
    """Turn MllmEdgeError into 'error: ...' on stderr and exit code 1, with no traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except MllmEdgeError as e:
            typer.secho(f"error: {e}", err=True, fg=typer.colors.RED)
            raise typer.Exit(1) from None

    return wrapper


def require_export_extra() -> None:
    """The PyTorch side needs torch and transformers, which a runtime-only install lacks."""
    import importlib.util

    missing = [m for m in ("torch", "transformers") if importlib.util.find_spec(m) is None]
    if missing:
        raise MllmEdgeError(f"this command needs {' and '.join(missing)}: pip install 'mllm-edge[export]'")


@app.command()
@user_errors
def reference(
    image: Path = typer.Argument(..., help="Image file (JPEG, PNG, ...)."),
    model: str = typer.Option(..., "--model", "-m", help="LLaVA checkpoint: a local folder or a Hugging Face hub id."),
    prompt: str = typer.Option("Describe the image.", "--prompt", "-p", help="The question about the image."),
    method: str = typer.Option("none", "--method", help="none | fastv | fastervlm | fastv+fastervlm"),
    ratio: float = typer.Option(0.0, "--ratio", help="Fraction of image tokens pruned, 0 <= R < 1."),
    k: int = typer.Option(2, "--k", help="FastV: the layer where pruning happens (1 <= K < layers)."),
    vision_ratio: Optional[float] = typer.Option(None, "--vision-ratio", help="FasterVLM's ratio when both methods run."),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens", min=1, help="Stop after this many tokens."),
) -> None:
    """Answer with the PyTorch reference (greedy, KV cache): the yardstick exported graphs are checked against."""
    import time

    require_export_extra()
    from .models import generate, load_llava
    from .models.checkpoint import resolve_checkpoint
    from .models.inputs import load_image, prepare_inputs
    from .pruning import PruningConfig

    pruning = PruningConfig.from_method(method, ratio, k, vision_ratio)
    picture = load_image(image)
    folder = resolve_checkpoint(model)
    llava = load_llava(folder)
    pruning.validate(llava.spec.text.num_layers, llava.spec.vision.has_cls)
    input_ids, pixel_values, _ = prepare_inputs(folder, picture, prompt)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    start = time.perf_counter()
    result = generate(llava, input_ids, pixel_values, pruning, max_new_tokens, tokenizer.eos_token_id)
    seconds = time.perf_counter() - start
    typer.echo(tokenizer.decode(result.token_ids[0], skip_special_tokens=True))
    vision_keep, llm_keep = pruning.keep_counts(llava.spec.num_image_tokens)
    typer.echo(
        f"image tokens: {llava.spec.num_image_tokens} -> vision {vision_keep} -> llm {llm_keep}; "
        f"{len(result.token_ids[0])} tokens in {seconds:.2f} s",
        err=True,
    )


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
