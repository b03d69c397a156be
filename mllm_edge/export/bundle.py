"""`mllm-edge export`: a checkpoint -> a verified bundle folder, written atomically.

Order matters for memory and for safety: the PyTorch references are computed first, then the graphs
are exported one by one from the same loaded weights, then the model is released before ONNX Runtime
loads the graphs to verify them. Everything is written into a hidden temporary folder beside the
destination and renamed into place only when complete, so a failed or interrupted export leaves nothing.
"""

from __future__ import annotations

import ctypes
import gc
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch.export import Dim

from .. import __version__
from .. import graphs as mg
from ..atomic import locked, partial_folder, remove_stale, signals_as_interrupts
from ..errors import MllmEdgeError
from ..manifest import FLOAT_SCHEMA_VERSION, MANIFEST_NAME, Manifest, write_manifest
from ..models.checkpoint import resolve_checkpoint
from ..models.config import load_llava_spec
from ..models.llava import Llava, load_llava
from ..pruning import PruningConfig, keep_count
from ..pruning.flops import PrefillFlops, prefill_flops
from .fused_attention import add_fused_graphs
from .graphs import graph_modules
from .lint import lint_model
from .onnx_graph import export_graph, graph_spec, share_duplicate_weights
from .samples import CHAIN_TOKENS, make_samples, save_samples
from .verify import ChainCheck, OutputCheck, failures, require_onnxruntime, verify_chain, verify_graphs

DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
MAX_BATCH = 16


@dataclass
class ExportConfig:
    model: str
    out: Path
    pruning: PruningConfig = field(default_factory=PruningConfig)
    dtype: str = "fp32"
    max_context: int | None = None  # None: LlavaSpec.default_max_context
    verify: bool = True
    force: bool = False


@dataclass
class ExportReport:
    out: Path
    manifest: Manifest
    checks: list[OutputCheck]
    chain: ChainCheck | None
    flops: PrefillFlops
    sample_image_tokens: int  # the sample picture's, unpruned: what `flops` counts
    shared_bytes: int  # weight bytes stored once instead of twice (tied embeddings)
    files: dict[str, int]  # relative path -> size in bytes


def stages(config: ExportConfig, anyres: bool = False) -> list[str]:
    """The steps export_bundle reports, in order, so a caller can size a progress bar (anyres: a
    LLaVA-NeXT checkpoint's, which has a pack graph too)."""
    graphs = mg.bundle_graphs(bool(config.pruning.fastv), bool(config.pruning.fastervlm), anyres)
    names = ["load", "reference", *graphs]
    names += ["lint", "tokenizer"]
    names += ["verify graphs", "verify chain"] if config.verify else []
    return names + ["manifest"]


def check_destination(out: Path, force: bool) -> None:
    """Refuse to overwrite anything but a bundle (or an empty folder), and that only with --force."""
    if not out.parent.is_dir():
        raise MllmEdgeError(f"the folder {out.parent} for the bundle does not exist")
    if not out.exists():
        return
    if not force:
        raise MllmEdgeError(f"{out} already exists; pass --force to replace it")
    if not out.is_dir():
        raise MllmEdgeError(f"{out} exists and is not a folder")
    if any(out.iterdir()) and not (out / MANIFEST_NAME).is_file():
        raise MllmEdgeError(
            f"{out} is not a bundle (it has no {MANIFEST_NAME}); --force replaces only bundles"
        )


def export_bundle(config: ExportConfig, on_stage: Callable[[str], None] = lambda name: None) -> ExportReport:
    """Export, lint, verify and write the bundle; on_stage(name) is called as each stage starts."""
    if config.dtype not in DTYPES:
        raise MllmEdgeError(f"unknown dtype '{config.dtype}' (choose from {', '.join(DTYPES)})")
    out = Path(config.out)
    check_destination(out, config.force)
    if config.verify:
        require_onnxruntime()
    with locked(out), signals_as_interrupts():  # one writer of `out` at a time; SIGTERM cleans up too
        check_destination(out, config.force)  # again: another export may have finished meanwhile
        remove_stale(out)
        tmp = partial_folder(out)  # first, so an unwritable destination fails before minutes of loading
        try:
            return _export_into(config, out, tmp, on_stage)
        except BaseException as e:  # KeyboardInterrupt and Terminated too: nothing half-written stays
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(e, OSError):  # a full disk, a vanished folder
                raise MllmEdgeError(f"writing the bundle failed: {e}") from e
            raise


def _export_into(config: ExportConfig, out: Path, tmp: Path, on_stage) -> ExportReport:
    on_stage("load")
    folder = resolve_checkpoint(config.model, check=load_llava_spec)  # refused before any weight downloads
    spec = load_llava_spec(folder)
    pruning = config.pruning
    pruning.validate(spec.text.num_layers, spec.vision.has_cls, spec.max_views)
    max_context = spec.check_max_context(config.max_context)
    llava = load_llava(folder, DTYPES[config.dtype])
    modules = graph_modules(llava, pruning)

    on_stage("reference")
    samples = make_samples(llava, folder, modules, pruning)
    needed = samples.llm_prompt_tokens + CHAIN_TOKENS
    if needed > max_context:
        raise MllmEdgeError(
            f"max context {max_context} is too small: the sample prompt takes {samples.llm_prompt_tokens} tokens, plus {CHAIN_TOKENS} to decode"
        )

    graph_specs = {}
    for name, module in modules.items():
        on_stage(name)
        args, shapes = trace_inputs(module, llava, samples, max_context)
        graph_specs[name] = export_graph(module, args, shapes, tmp, name)
    release_weights(llava)  # before ONNX Runtime loads the graphs: see release_weights
    del modules, llava
    gc.collect()
    shared = share_duplicate_weights(tmp, list(graph_specs))
    for name in graph_specs:  # inputs, outputs and data files may have changed
        graph_specs[name] = graph_spec(tmp / graph_specs[name].file)

    on_stage("lint")
    problems = [
        f"{name}: {finding}" for name, s in graph_specs.items() for finding in lint_model(tmp / s.file)
    ]
    if problems:
        raise MllmEdgeError("the graphs would not build in TensorRT 10:\n  " + "\n  ".join(problems))
    graph_specs = add_fused_graphs(tmp, graph_specs)  # ONNX Runtime's copies, after the lint

    on_stage("tokenizer")
    sample_files = save_samples(samples, tmp / "samples")
    tokenizer = save_tokenizer(folder, tmp / "tokenizer", spec.image_token_id)
    manifest = Manifest(
        source={
            "model": str(config.model),
            "revision": folder.name if folder.parent.name == "snapshots" else None,
        },
        architecture=spec.architecture(),
        pruning=pruning_entry(pruning, spec),
        dtype=str(DTYPES[config.dtype]).removeprefix("torch."),
        max_context=max_context,
        graphs=graph_specs,
        tokenizer=tokenizer["tokenizer"],
        preprocessing=tokenizer["preprocessing"],
        samples=sample_files,
        schema_version=FLOAT_SCHEMA_VERSION,
        created_by=f"mllm-edge {__version__}",
    )

    checks, chain = [], None
    if config.verify:
        on_stage("verify graphs")
        checks = verify_graphs(tmp, manifest)
        gc.collect()
        return_freed_memory()
        on_stage("verify chain")
        chain = verify_chain(tmp, manifest)
        problem = failures(checks, chain)
        if problem:
            raise MllmEdgeError(problem)

    on_stage("manifest")
    write_manifest(tmp, manifest)
    move_into_place(tmp, out, config.force)
    keep_vision = samples.llm_prompt_tokens - samples.text_tokens  # after FasterVLM (its merge)
    keep_llm = keep_count(keep_vision, pruning.fastv.ratio) if pruning.fastv else keep_vision
    t = spec.text
    flops = prefill_flops(  # for the sample picture's tokens (LLaVA-NeXT's vary with the picture)
        t.num_layers,
        t.hidden_size,
        t.intermediate_size,
        samples.text_tokens,
        samples.image_tokens,
        keep_vision,
        keep_llm,
        pruning.split_layer,
    )
    files = {rel: (out / rel).stat().st_size for rel in manifest.files}
    return ExportReport(out, manifest, checks, chain, flops, samples.image_tokens, shared, files)


def return_freed_memory() -> None:
    """Give freed heap back to the OS (glibc keeps it otherwise), so the chain check that follows
    does not stack its peak on the per-graph check's. A no-op where there is no glibc."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def release_weights(llava: Llava) -> None:
    """Drop the storage of every weight now, rather than when the last reference goes.

    The exporter's IR references the torch tensors, and onnxscript's rewrite rules keep the last
    graph they matched alive after the export returns, so `del` alone would keep a full copy of the
    weights resident while verification loads the graphs.
    """
    with torch.no_grad():
        for tensor in [*llava.parameters(), *llava.buffers()]:
            tensor.data = torch.empty(0, dtype=tensor.dtype)


def trace_inputs(module, llava: Llava, samples, max_context: int):
    """Example inputs to trace a graph module with, and which of their dims are dynamic (the graph's
    definition names them). Traced with batch 2 and lengths >= 2: torch.export fixes any dim it sees
    as 0 or 1 (a LLaVA-NeXT sample picture has 2 views or more: the base view and its tiles)."""
    spec = llava.spec
    dims = {
        "batch": Dim("batch", min=1, max=MAX_BATCH),
        "seq": Dim("seq", min=1, max=max_context),
        "past": Dim("past", min=1, max=max_context + 1),  # the null row and up to max_context tokens
        "image_tokens": Dim("image_tokens", min=1, max=spec.num_image_tokens),
        "views": Dim("views", min=1, max=max(spec.max_views, 2)),
    }

    def dynamic(t: mg.TensorDef):
        return {axis: dims[name] for axis, name in enumerate(t.dims) if name} or None

    graph = module.graph
    shapes = tuple(dynamic(t) for t in graph.inputs)
    if graph.cache is None:  # the sample's inputs, the batch-first ones twice
        inputs, _ = samples.graphs[graph.name]

        def traced(t: mg.TensorDef) -> torch.Tensor:
            v = torch.from_numpy(inputs[t.name])
            return v.expand(2, *v.shape[1:]).contiguous() if t.dims[:1] == ("batch",) else v

        return tuple(traced(t) for t in graph.inputs), shapes
    # the LLM graphs: a short chunk after a short past, so both prefill and decode shapes trace alike
    t = llava.spec.text
    dtype = next(llava.parameters()).dtype
    s, p = 5, 3
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, s, t.hidden_size, generator=generator).to(dtype)
    positions = torch.arange(p, p + s).expand(2, s).contiguous()
    num_past = len(module.input_names) - len(graph.inputs)
    pasts = [
        torch.randn(p, 2, t.num_kv_heads, t.head_dim, generator=generator).to(dtype) for _ in range(num_past)
    ]  # sequence-first
    return (hidden, positions, *pasts), (*shapes, tuple(dynamic(mg.PAST) for _ in range(num_past)))


def pruning_entry(pruning: PruningConfig, spec) -> dict:
    """What the bundle keeps of the largest span. LLaVA-NeXT: FasterVLM's keep is per view and its
    merge recorded, FastV's keep is of the largest span that enters the LLM."""
    vision_keep = spec.most_entering_tokens(pruning.fastervlm)
    llm_keep = keep_count(vision_keep, pruning.fastv.ratio) if pruning.fastv else vision_keep
    methods = [m for m, on in (("fastv", pruning.fastv), ("fastervlm", pruning.fastervlm)) if on]
    fastervlm = None
    if pruning.fastervlm:
        fastervlm = {**asdict(pruning.fastervlm), "keep": vision_keep}
        if spec.max_views > 1:
            fastervlm["keep"] = keep_count(spec.vision.grid**2, pruning.fastervlm.ratio)
        else:
            del fastervlm["merge"]  # one view: nothing to merge
    return {
        "method": "+".join(methods) or "none",
        "fastv": {**asdict(pruning.fastv), "keep": llm_keep} if pruning.fastv else None,
        "fastervlm": fastervlm,
        "split_layer": pruning.split_layer,
        # image tokens: out of the vision tower / entering the LLM / after FastV at layer K
        "image_tokens": {"vision": spec.num_image_tokens, "llm": vision_keep, "after_fastv": llm_keep},
    }


def save_tokenizer(model_dir: Path, dest: Path, image_token_id: int) -> dict:
    """The processor's files (tokenizer, chat template, image processor) and what the runtime needs of them."""
    from transformers import AutoProcessor, GenerationConfig

    processor = AutoProcessor.from_pretrained(str(model_dir))
    processor.save_pretrained(str(dest))
    tok = processor.tokenizer
    try:
        eos = GenerationConfig.from_pretrained(str(model_dir)).eos_token_id
    except OSError:
        eos = None
    eos = eos if eos is not None else tok.eos_token_id
    eos_ids = sorted({eos} if isinstance(eos, int) else set(eos or ()))
    return {
        "tokenizer": {
            "folder": dest.name,
            "chat_template": processor.chat_template,
            "image_token": processor.image_token,
            "image_token_id": image_token_id,
            "bos_token_id": tok.bos_token_id,
            "eos_token_ids": eos_ids,
            "pad_token_id": tok.pad_token_id,
        },
        "preprocessing": processor.image_processor.to_dict(),
    }


def move_into_place(tmp: Path, out: Path, force: bool) -> None:
    os.chmod(tmp, 0o755)  # mkdtemp makes it private
    if not out.exists():
        os.replace(tmp, out)
        return
    check_destination(out, force)  # again: the folder may have appeared during the export
    old = partial_folder(out, "old")
    os.replace(out, old)  # onto the empty placeholder
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(old, out)  # put the previous bundle back
        raise
    shutil.rmtree(old, ignore_errors=True)
