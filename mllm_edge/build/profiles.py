"""Optimization profiles for each graph of a bundle, derived from its manifest.

Engines are built for batch 1, the runtime's batch. Each graph's definition (mllm_edge.graphs) names
its profiles and the sizes of their dynamic dims; here they become numbers. The LLM graphs get two,
prefill (a prompt of 1 .. max_context tokens after the null past row) and decode (one token after a
past of up to max_context rows); the embed graph the same two; prune only prefill; vision one static
shape (LLaVA-NeXT's: one to the most views, and its pack graph the image span from one token to the
largest picture's). A past input holds the null row and then the tokens (Decoder.run_layers), so its length is >= 1.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import MllmEdgeError
from ..manifest import Manifest

Shape = tuple[int, ...]
OPT_TEXT_TOKENS = 64  # the prompt text around the image that profiles are tuned for
OPT_ANSWER_TOKENS = 256  # the decode context profiles are tuned for, past the prompt


@dataclass(frozen=True)
class Profile:
    name: str  # "prefill", "decode" or "static"
    shapes: dict[str, tuple[Shape, Shape, Shape]]  # dynamic input -> (min, opt, max)


def _shape(dims: list, sizes: dict[str, tuple[int, int, int]], which: int, graph: str, tensor: str) -> Shape:
    out = []
    for d in dims:
        if isinstance(d, int):
            out.append(d)
        elif d in sizes:
            out.append(sizes[d][which])
        else:
            raise MllmEdgeError(
                f"{graph}: input {tensor} has a dimension '{d}' this version cannot size; re-export the bundle"
            )
    return tuple(out)


def graph_profiles(manifest: Manifest, graph: str, max_context: int | None = None) -> list[Profile]:
    """The profiles one graph's engine is built with (its definition's plan, sized for this bundle).
    max_context may lower the bundle's."""
    ctx = manifest.max_context if max_context is None else max_context
    llm_images = manifest.pruning["image_tokens"][
        "llm"
    ]  # image tokens the vision graph outputs (after FasterVLM)
    if ctx <= llm_images or ctx > manifest.max_context:  # a prompt holds every image token and some text
        raise MllmEdgeError(
            f"--max-context must be above the {llm_images} image tokens and at most the bundle's {manifest.max_context}, got {ctx}"
        )
    definitions = manifest.definitions
    if graph not in definitions:
        raise MllmEdgeError(f"the bundle has a graph '{graph}' this version cannot build; re-export it")
    spec = manifest.graphs[graph]
    prompt_opt = min(llm_images + OPT_TEXT_TOKENS, ctx)
    sizes = {
        "one": 1,
        "images": llm_images,
        "prompt": prompt_opt,
        "answer": min(prompt_opt + OPT_ANSWER_TOKENS, ctx),
        "context": ctx,
        "views": manifest.architecture.get("max_views", 1),  # LLaVA-NeXT's views of one picture
    }
    profiles = []
    for name, plan in definitions[graph].profiles.items():
        dims = {dim: tuple(sizes[s] for s in named) for dim, named in plan.items()}
        shapes = {}
        for t in spec.inputs:
            if all(isinstance(d, int) for d in t.shape):
                continue  # static: TensorRT needs no profile entry
            shapes[t.name] = tuple(_shape(t.shape, dims, i, graph, t.name) for i in range(3))
        profiles.append(Profile(name, shapes))
    return profiles


def profile_index(profiles: list[Profile], name: str) -> int:
    return next(i for i, p in enumerate(profiles) if p.name == name)
