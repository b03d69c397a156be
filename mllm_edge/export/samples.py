"""A real sample (a picture and a prompt) run through our PyTorch graph modules: the reference every
exported graph is checked against, at export and later on a device that has no torch.

Per graph the sample holds its inputs and outputs, except the new K/V rows of the LLM graphs (for a
7B model they are hundreds of MB); the chain sample (greedy tokens and their logits, from
`models.generate`) checks the cache path instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..models.generate import generate
from ..models.inputs import prepare_inputs
from ..models.llava import Llava
from ..pruning import PruningConfig
from .sample_image import sample_image

SAMPLE_PROMPT = "What is in this picture? Answer in one sentence."
CHAIN_TOKENS = 8


@dataclass
class Samples:
    graphs: dict[str, tuple[dict[str, np.ndarray], dict[str, np.ndarray]]]  # name -> (inputs, outputs)
    chain: dict[
        str, np.ndarray
    ]  # input_ids (processor's, unpruned run), pixel_values, token_ids, step_logits
    prompt: str  # the rendered chat prompt
    text_tokens: int  # prompt tokens that are not image tokens
    llm_prompt_tokens: int  # prompt tokens entering the LLM (image run after FasterVLM)


def numpy(x: torch.Tensor) -> np.ndarray:
    return x.detach().cpu().numpy()


def llm_prompt_ids(
    input_ids: torch.Tensor, start: int, num_full: int, num_kept: int, image_token_id: int
) -> torch.Tensor:
    """The processor's ids with the image run shortened to the tokens the vision graph outputs."""
    run = torch.full((input_ids.shape[0], num_kept), image_token_id, dtype=input_ids.dtype)
    return torch.cat((input_ids[:, :start], run, input_ids[:, start + num_full :]), dim=1)


def empty_past(llava: Llava, count: int, dtype: torch.dtype) -> list[torch.Tensor]:
    """The past of a fresh prompt: the null row alone, [1, batch, G, D] (Decoder.run_layers)."""
    t = llava.spec.text
    return [torch.zeros(1, 1, t.num_kv_heads, t.head_dim, dtype=dtype) for _ in range(2 * count)]


@torch.no_grad()
def make_samples(llava: Llava, model_dir: Path, modules: dict, pruning: PruningConfig) -> Samples:
    """Run each graph module on the sample, feeding each the previous one's outputs."""
    dtype = next(llava.parameters()).dtype
    input_ids, pixel_values, rendered = prepare_inputs(model_dir, sample_image(480, 360), SAMPLE_PROMPT)
    start, num_full = llava.image_span(input_ids)
    graphs = {}

    vision_out = modules["vision"](pixel_values)
    vision_out = vision_out if isinstance(vision_out, tuple) else (vision_out,)
    graphs["vision"] = ({"pixel_values": pixel_values}, dict(zip(modules["vision"].output_names, vision_out)))
    image_embeds = vision_out[0]

    ids = llm_prompt_ids(input_ids, start, num_full, image_embeds.shape[1], llava.spec.image_token_id)
    image_start = torch.tensor(start, dtype=torch.int64)
    embeds = modules["embed"](ids, image_embeds, image_start)
    graphs["embed"] = (
        {"input_ids": ids, "image_embeds": image_embeds, "image_start": image_start},
        {"inputs_embeds": embeds},
    )

    positions = torch.arange(ids.shape[1])[None]
    hidden = embeds
    if "llm_head" in modules:
        head = modules["llm_head"]
        past = empty_past(llava, head.k, dtype)
        hidden, last_row = head(embeds, positions, *past)[:2]
        graphs["llm_head"] = (
            dict(zip(head.input_names, (embeds, positions, *past))),
            {"hidden_states": hidden, "last_row": last_row},
        )
        prune = modules["prune"]
        prune_in = (hidden, last_row, positions, image_start)
        prune_out = prune(*prune_in)
        graphs["prune"] = (dict(zip(prune.input_names, prune_in)), dict(zip(prune.output_names, prune_out)))
        hidden, positions = prune_out[0], prune_out[1]
    tail = modules["llm_tail"]
    past = empty_past(llava, llava.spec.text.num_layers - tail.start, dtype)
    logits = tail(hidden, positions, *past)[0]
    graphs["llm_tail"] = (dict(zip(tail.input_names, (hidden, positions, *past))), {"logits": logits})

    result = generate(
        llava, input_ids, pixel_values, pruning, max_new_tokens=CHAIN_TOKENS
    )  # no EOS stop: 8 tokens
    chain = {
        "input_ids": numpy(input_ids),
        "pixel_values": numpy(pixel_values),
        "token_ids": np.asarray(result.token_ids, dtype=np.int64),
        "step_logits": np.stack([numpy(x) for x in result.steps_logits], axis=1),  # [B, steps, V]
    }
    as_numpy = {
        name: ({k: numpy(v) for k, v in i.items()}, {k: numpy(v) for k, v in o.items()})
        for name, (i, o) in graphs.items()
    }
    return Samples(as_numpy, chain, rendered, input_ids.shape[1] - num_full, ids.shape[1])


def save_samples(samples: Samples, folder: Path) -> dict[str, str]:
    """samples/<graph>.npz (inputs as 'in.<name>', outputs as 'out.<name>') and samples/chain.npz."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for name, (inputs, outputs) in samples.graphs.items():
        arrays = {f"in.{k}": v for k, v in inputs.items()} | {f"out.{k}": v for k, v in outputs.items()}
        np.savez(folder / f"{name}.npz", **arrays)
        files[name] = f"{folder.name}/{name}.npz"
    np.savez(folder / "chain.npz", **samples.chain)
    files["chain"] = f"{folder.name}/chain.npz"
    return files
