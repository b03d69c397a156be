"""The graphs of a bundle, each defined once and without torch.

A `GraphDef` says what a graph takes and gives (tensor names, which dims are dynamic), which KV-cache
layer group it reads and writes, how TensorRT profiles size its dynamic dims, and whether its
weights may be quantized. Export (the torch modules' names, the traced dynamic shapes, the stages),
quantization, build profiles and the runtime all read these definitions, so adding or changing a
graph is a change here plus its torch module in export/graphs.py.

  vision    pixel_values -> image_embeds (+ kept_patches: FasterVLM's top-k inside)
  embed     input_ids, image_embeds, image_start -> inputs_embeds
  llm_head  inputs_embeds, position_ids, past of layers [0, K) -> hidden_states, last_row, new K/V
  prune     hidden_states, last_row, position_ids, image_start -> kept hidden, kept position ids, kept_image
  llm_tail  hidden_states, position_ids, past of layers [K, L) -> logits (last token), new K/V

Without FastV, llm_head and prune are absent and llm_tail runs every layer (K = 0).

LLaVA-NeXT (anyres): the vision graph's batch is one picture's views (FasterVLM per view), then

  pack      image_embeds of the views, pack_index -> packed_image_embeds [1, n, C] (holds image_newline)

and prune takes image_positions (the span's positions: any length n) in place of image_start. Its
image span's length varies with the picture, so the profiles that size it run from one token to
the largest picture's (SPAN), where LLaVA-1.5's are fixed (IMAGES).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

VISION, EMBED, LLM_HEAD, PRUNE, LLM_TAIL = "vision", "embed", "llm_head", "prune", "llm_tail"
HEAD, TAIL = "head", "tail"  # the KV cache's layer groups: [0, K) and [K, L)
NO_IMAGE = -1  # the embed graph's image_start when the ids hold no image (decode steps)

# Sizes a TensorRT profile gives a dynamic dim, by name; build/profiles.py turns them into numbers.
ONE = ("one", "one", "one")
PROMPT = ("one", "prompt", "context")  # any prompt length up to the context, tuned for a typical one
IMAGES = ("images", "images", "images")  # the image tokens entering the LLM (after FasterVLM)
SPAN = ("one", "images", "images")  # LLaVA-NeXT's: up to the largest picture's, tuned for it
VIEWS = ("one", "views", "views")  # LLaVA-NeXT's views of one picture: the base view and 1 .. tiles


@dataclass(frozen=True)
class TensorDef:
    name: str
    dtype: str  # "float": the bundle's dtype (float32 or float16); else a numpy name
    dims: tuple  # per axis: the name of a dynamic dim, or None for one fixed at export


@dataclass(frozen=True)
class GraphDef:
    name: str
    inputs: tuple[TensorDef, ...]  # the cache's past inputs follow these
    outputs: tuple[TensorDef, ...]  # the cache's new K/V outputs follow these
    cache: str | None = None  # layer group whose past it reads and whose new rows it writes
    profiles: dict = field(
        default_factory=dict
    )  # TensorRT profile -> dynamic dim -> (min, opt, max) size names
    quantizable: bool = False  # holds the LLM's weight matrices (calibrate's default --graphs llm)

    def input_names(self, layers: range = range(0)) -> list[str]:
        return [t.name for t in self.inputs] + (past_names(layers) if self.cache else [])

    def output_names(self, layers: range = range(0)) -> list[str]:
        return [t.name for t in self.outputs] + (new_names(layers) if self.cache else [])

    @property
    def runs_in_decode(self) -> bool:
        return "decode" in self.profiles


def past_names(layers: range) -> list[str]:
    return [name for i in layers for name in (f"past_key.{i}", f"past_value.{i}")]


def new_names(layers: range) -> list[str]:
    return [name for i in layers for name in (f"new_key.{i}", f"new_value.{i}")]


def layer_group(group: str, split: int, num_layers: int) -> range:
    """The layers of a cache group: with FastV at layer K, head is [0, K) and tail [K, L)."""
    return range(0, split) if group == HEAD else range(split, num_layers)


PAST = TensorDef(
    "past", "float", ("past", "batch", None, None)
)  # the shape of each past_key.i / past_value.i
NEW = TensorDef("new", "float", ("seq", "batch", None, None))  # each new_key.i / new_value.i: [S, B, G, D]

_LLM_PROFILES = {
    "prefill": {"batch": ONE, "seq": PROMPT, "past": ONE},  # a prompt after the null past row
    "decode": {"batch": ONE, "seq": ONE, "past": ("one", "answer", "context")},  # one token after the past
}

VISION_GRAPH = GraphDef(
    VISION,
    (TensorDef("pixel_values", "float", ("batch", None, None, None)),),
    (TensorDef("image_embeds", "float", ("batch", None, None)),),
    profiles={"static": {"batch": ONE}},
)
KEPT_PATCHES = TensorDef("kept_patches", "int64", ("batch", None))  # FasterVLM's kept patches, raster order
EMBED_GRAPH = GraphDef(
    EMBED,
    (
        TensorDef("input_ids", "int64", ("batch", "seq")),
        TensorDef("image_embeds", "float", ("batch", "image_tokens", None)),
        TensorDef("image_start", "int64", ()),
    ),
    (TensorDef("inputs_embeds", "float", ("batch", "seq", None)),),
    profiles={
        "prefill": {"batch": ONE, "seq": PROMPT, "image_tokens": IMAGES},
        "decode": {"batch": ONE, "seq": ONE, "image_tokens": ONE},  # one zero row and NO_IMAGE
    },
)
LLM_HEAD_GRAPH = GraphDef(
    LLM_HEAD,
    (
        TensorDef("inputs_embeds", "float", ("batch", "seq", None)),
        TensorDef("position_ids", "int64", ("batch", "seq")),
    ),
    (
        TensorDef("hidden_states", "float", ("batch", "seq", None)),
        TensorDef("last_row", "float", ("batch", None)),  # the last token's head-mean attention at K-1
    ),
    cache=HEAD,
    profiles=_LLM_PROFILES,
    quantizable=True,
)
PRUNE_GRAPH = GraphDef(
    PRUNE,
    (
        TensorDef("hidden_states", "float", ("batch", "seq", None)),
        TensorDef("last_row", "float", ("batch", "seq")),
        TensorDef("position_ids", "int64", ("batch", "seq")),
        TensorDef("image_start", "int64", ()),
    ),
    (
        TensorDef("kept_hidden_states", "float", ("batch", None, None)),
        TensorDef("kept_position_ids", "int64", ("batch", None)),
        TensorDef("kept_image", "int64", ("batch", None)),
    ),
    # prefill only; its output has seq minus the dropped image tokens rows, so a prompt holds every image token
    profiles={"prefill": {"batch": ONE, "seq": ("images", "prompt", "context")}},
)
# LLaVA-NeXT's: its image span's length varies with the picture, so the graph takes the span's
# positions (their count a dim, every length shape arithmetic) in place of image_start
PRUNE_SPAN_GRAPH = replace(
    PRUNE_GRAPH,
    inputs=PRUNE_GRAPH.inputs[:3] + (TensorDef("image_positions", "int64", ("image_tokens",)),),
    profiles={"prefill": {"batch": ONE, "seq": PROMPT, "image_tokens": SPAN}},
)
# LLaVA-NeXT's: the same graph, for a span of any length up to the largest picture's. Decode is
# listed first: its one-token shapes fit this prefill profile too, and an engine runs on the first
# profile that fits (runtime/backends/tensorrt.py)
EMBED_SPAN_GRAPH = replace(
    EMBED_GRAPH,
    profiles={
        "decode": EMBED_GRAPH.profiles["decode"],
        "prefill": {**EMBED_GRAPH.profiles["prefill"], "image_tokens": SPAN},
    },
)
# LLaVA-NeXT's: the vision graph's batch is one picture's views, up to the most the pinpoints give
VISION_VIEWS_GRAPH = GraphDef(
    VISION,
    (TensorDef("pixel_values", "float", ("views", None, None, None)),),
    (TensorDef("image_embeds", "float", ("views", None, None)),),
    profiles={"static": {"views": VIEWS}},
)
# LLaVA-NeXT's: one picture's views' embeddings as its packed span, in the order pack_index gives
# (runtime/anyres.py), with the image_newline vector it holds at index views x tokens; each view's
# token count (its patches, or FasterVLM's keep) is fixed at export
PACK = "pack"
PACK_GRAPH = GraphDef(
    PACK,
    (
        TensorDef("image_embeds", "float", ("views", None, None)),
        TensorDef("pack_index", "int64", ("image_tokens",)),
    ),
    (TensorDef("packed_image_embeds", "float", (None, "image_tokens", None)),),
    profiles={"static": {"views": VIEWS, "image_tokens": SPAN}},
)
LLM_TAIL_GRAPH = GraphDef(
    LLM_TAIL,
    (
        TensorDef("hidden_states", "float", ("batch", "seq", None)),
        TensorDef("position_ids", "int64", ("batch", "seq")),
    ),
    (TensorDef("logits", "float32", ("batch", None)),),  # the last token's, in fp32
    cache=TAIL,
    profiles=_LLM_PROFILES,
    quantizable=True,
)
# The LLM graphs, whose definitions are the same in every bundle: their cache group and weights.
# Anything that sizes or feeds a bundle's other graphs reads its own definitions (bundle_graphs,
# Manifest.definitions): vision and prune differ between LLaVA-1.5 and LLaVA-NeXT.
LLM_GRAPHS = {g.name: g for g in (EMBED_GRAPH, LLM_HEAD_GRAPH, LLM_TAIL_GRAPH)}


def bundle_graphs(fastv: bool, fastervlm: bool, anyres: bool = False) -> dict[str, GraphDef]:
    """The graphs of a bundle with these methods, in the order they run. anyres (LLaVA-NeXT): the
    vision graph's batch is one picture's views, the pack graph follows it, and the prune graph
    takes a span of any length."""
    vision = VISION_VIEWS_GRAPH if anyres else VISION_GRAPH
    if fastervlm:
        kept = replace(KEPT_PATCHES, dims=(vision.inputs[0].dims[0], None))
        vision = replace(vision, outputs=vision.outputs + (kept,))
    prune, embed = (PRUNE_SPAN_GRAPH, EMBED_SPAN_GRAPH) if anyres else (PRUNE_GRAPH, EMBED_GRAPH)
    chain = [vision] + ([PACK_GRAPH] if anyres else []) + [embed]
    chain += ([LLM_HEAD_GRAPH, prune] if fastv else []) + [LLM_TAIL_GRAPH]
    return {g.name: g for g in chain}
