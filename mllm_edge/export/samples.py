"""A real sample (a picture and a prompt) run through our PyTorch graph modules: the reference every
exported graph is checked against, at export and later on a device that has no torch.

The graph modules run through the runtime's chain (runtime.chain) behind a torch engine. Per graph the
sample holds the inputs and outputs of its first call, except the new K/V rows of the LLM graphs (for
a 7B model they are hundreds of MB); the chain sample (greedy tokens and their logits, from
`models.generate`) checks the cache path instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..models.generate import generate
from ..models.inputs import processor_inputs
from ..models.llava import Llava
from ..pruning import PruningConfig
from ..runtime.chain import Chain, place_image_tokens
from .sample_image import sample_image
from .verify import ConcatCache

SAMPLE_PROMPT = "What is in this picture? Answer in one sentence."
CHAIN_TOKENS = 8


@dataclass
class Samples:
    graphs: dict[str, tuple[dict[str, np.ndarray], dict[str, np.ndarray]]]  # name -> (inputs, outputs)
    # input_ids (processor's, unpruned run), pixel_values, token_ids, step_logits; LLaVA-NeXT's
    # pixel_values are the picture's views [V, 3, S, S] (never the processor's padding ones), with
    # image_size [2], its (height, width)
    chain: dict[str, np.ndarray]
    prompt: str  # the rendered chat prompt
    text_tokens: int  # prompt tokens that are not image tokens
    llm_prompt_tokens: int  # prompt tokens entering the LLM (image run after FasterVLM)
    image_tokens: int  # the sample picture's image tokens, unpruned
    # graph -> what judges its selection at a tie (parity.compare_graph): FasterVLM's [CLS] row and
    # every patch projected; FastV's scores are the prune graph's own input
    references: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)


def numpy(x: torch.Tensor) -> np.ndarray:
    return x.detach().cpu().numpy()


class TorchEngine:
    """A graph's torch module behind the runtime's engine interface, so the reference samples come
    from the same chain (runtime.chain) that runs the exported graphs."""

    def __init__(self, module: torch.nn.Module):
        self.module, self.name = module, module.graph.name
        self.input_names, self.output_names = module.input_names, module.output_names

    def run(self, inputs: dict[str, np.ndarray], outputs: dict | None = None) -> dict[str, np.ndarray]:
        arrays = (np.asarray(inputs[n]) for n in self.input_names)
        out = self.module(*(torch.from_numpy(a if a.flags.writeable else a.copy()) for a in arrays))
        out = out if isinstance(out, tuple) else (out,)
        return {name: numpy(t) for name, t in zip(self.output_names, out) if name not in (outputs or {})}


@torch.no_grad()
def make_samples(llava: Llava, model_dir: Path, modules: dict, pruning: PruningConfig) -> Samples:
    """Run the graph modules through the chain on the sample prompt and keep each graph's first call
    (its prefill) as its sample, less the new K/V rows."""
    dtype = next(llava.parameters()).dtype
    batch, rendered = processor_inputs(model_dir, sample_image(480, 360), SAMPLE_PROMPT)
    input_ids, pixel_values = batch["input_ids"], batch["pixel_values"]
    image_sizes = batch.get("image_sizes")
    anyres = getattr(llava, "anyres", None)
    views, image_size = numpy(pixel_values), None
    if anyres is not None:  # the picture's own views: the newline index must not point into padding
        image_size = tuple(int(v) for v in image_sizes[0])
        views = views[0, : anyres.view_count(*image_size)]
    t = llava.spec.text
    null_row = np.zeros((1, 1, t.num_kv_heads, t.head_dim), numpy(torch.zeros((), dtype=dtype)).dtype)
    chain = Chain(
        {name: TorchEngine(m) for name, m in modules.items()},
        ConcatCache(t.num_layers, pruning.split_layer, null_row),
        pruning.split_layer,
        anyres=anyres,
        merge=pruning.fastervlm.merge if pruning.fastervlm else "spatial",
    )
    graphs = {}

    def keep_first(graph: str, inputs: dict, outputs: dict) -> None:
        if graph not in graphs:
            kept = {k: v for k, v in outputs.items() if not k.startswith("new_")}
            graphs[graph] = ({k: np.array(v) for k, v in inputs.items()}, kept)  # copies: cache views change

    chain.observers.append(keep_first)
    vision = chain.encode_image(views, image_size)
    ids, start = place_image_tokens(
        numpy(input_ids), llava.spec.image_token_id, vision["image_embeds"].shape[1]
    )
    chain.prefill(ids, vision["image_embeds"], start)

    result = generate(
        llava, input_ids, pixel_values, pruning, max_new_tokens=CHAIN_TOKENS, image_sizes=image_sizes
    )  # no EOS stop: 8 tokens
    samples = {
        "input_ids": numpy(input_ids),
        "pixel_values": views,
        "token_ids": np.asarray(result.token_ids, dtype=np.int64),
        "step_logits": np.stack([numpy(x) for x in result.steps_logits], axis=1),  # [B, steps, V]
    }
    if image_size is not None:
        samples["image_size"] = np.asarray(image_size, np.int64)
    references = {}
    if pruning.fastervlm:  # per view for LLaVA-NeXT: the views are the vision graph's batch
        features, cls_row = llava.image_features(torch.from_numpy(views), want_cls_row=True)
        references["vision"] = {
            "cls_row": numpy(cls_row),
            "all_image_embeds": numpy(llava.projector(features)),
        }
    num_full = int((input_ids == llava.spec.image_token_id).sum(dim=1)[0])
    return Samples(
        graphs, samples, rendered, input_ids.shape[1] - num_full, ids.shape[1], num_full, references
    )


def save_samples(samples: Samples, folder: Path) -> dict[str, str]:
    """samples/<graph>.npz (inputs as 'in.<name>', outputs as 'out.<name>') and samples/chain.npz."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for name, (inputs, outputs) in samples.graphs.items():
        arrays = {f"in.{k}": v for k, v in inputs.items()} | {f"out.{k}": v for k, v in outputs.items()}
        arrays |= {f"ref.{k}": v for k, v in samples.references.get(name, {}).items()}
        np.savez(folder / f"{name}.npz", **arrays)
        files[name] = f"{folder.name}/{name}.npz"
    np.savez(folder / "chain.npz", **samples.chain)
    files["chain"] = f"{folder.name}/chain.npz"
    return files
