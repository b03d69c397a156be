"""Train the built-in default model: a small LLaVA-1.5-shaped checkpoint that answers questions about
synthetic scenes (scenes.py). Reproducible from its seed (fixed step counts, 2 threads).

    python -m mllm_edge.default_model.train --out mllm_edge/default_model/checkpoint

The checkpoint starts as `testing.make_tiny_llava`'s (CLIP 336/14 vision tower, LLaVA projector,
Llama decoder, BPE tokenizer, chat template, CLIP image processor, all in the llava-hf layout) with
this file's sizes, then learns in two stages:

1. Seeing (the vision tower alone). Linear probes on the select layer's output learn, for every
   patch, its own column and row and the colour, shape, side and height of the item covering it; on
   the patches of items, the scene's whole table (each shape's colour, side and height, each colour's
   shape, the number of items); and on [CLS] the same table, a summary of the picture as CLIP's
   contrastive training makes [CLS] one (so its attention goes to the items, which FasterVLM ranks
   by). Dense labels from the scene's geometry give hundreds of targets per picture instead of one
   answer word, which is what lets a tower this small learn shapes on two CPU cores; the position
   labels keep CLIP's position embeddings alive in the features, the only way the language model
   learns where a patch is beyond RoPE's relative offsets.
2. Answering (projector and language model; the tower frozen): cross-entropy on the answer tokens
   (then </s>) after the rendered chat prompt, through transformers' own LLaVA modules, every colour
   and shape question and one of each other kind per picture sharing the picture's prompt prefix
   (answer_loss); plus a focus loss that pulls the last layer's attention from the answer position
   onto the item the question names, and a word loss that makes the output at each item patch name
   the item (its colour, shape, side, height), so that answering becomes finding and copying, and a
   key loss that makes the answer position know, before the last layer, the word that names the
   item (answer_loss). Half the steps show the pictures shortened to a random 288, 144 or 58
   patches (the items' first) with the text renumbered right after them, so that the model does
   not depend on every image token being there at its place (SHORTENED_SHARE).

`--only seeing` stops after stage 1 and `--only answering` continues from that checkpoint, to
iterate on stage 2 alone.

The probes are training aids and are not saved: the checkpoint is a plain LlavaForConditionalGeneration.
Images and prompts are prepared with the runtime's own preprocessing and tokenization
(runtime.image, runtime.prompt), which equal the Hugging Face processor's.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..testing.checkpoints import TinyLlavaSpec, make_tiny_llava
from .scenes import (
    COLOURS,
    HELD_OUT_SEED,
    MARGIN,
    QUESTION_KINDS,
    SHAPES,
    SIZE,
    Question,
    Scene,
    make_scene,
    normalise,
    questions,
    sample,
)

SPEC = TinyLlavaSpec(
    name="scenes",
    hidden_size=192,
    intermediate_size=512,
    num_layers=4,
    num_heads=6,
    num_kv_heads=6,
    image_size=336,
    patch_size=14,
    vision_hidden_size=96,
    vision_intermediate_size=384,
    vision_layers=4,
    vision_heads=6,
    initializer_range=0.02,
    seed=0,
)
GRID = SPEC.image_size // SPEC.patch_size
COVER = 0.2  # share of a patch an item must cover for the patch to count as that item's

# A share of the answering steps shows the language model shortened pictures, as pruning before the
# LLM (FasterVLM) does: fewer image tokens, the text renumbered right after them. Trained only on whole
# 576-token pictures, the model leaned on where in the sequence an image token sits and lost half its
# answers to FasterVLM at R = 0.5 although every item patch was kept. Counts: R = 0.5, 0.75, 0.9.
SHORTENED_SHARE = 0.5
SHORTENED_KEEP = (288, 144, 58)

# The scene's table, one classification per field; class 0 is "no such item" everywhere.
SIDES = ("left", "right", "middle")  # middle: within MARGIN of the centre line (never asked)
HEIGHTS = ("top", "bottom", "middle")
TABLE_FIELDS = (
    [(f"colour of the {s}", 1 + len(COLOURS)) for s in SHAPES]
    + [(f"side of the {s}", 1 + len(SIDES)) for s in SHAPES]
    + [(f"height of the {s}", 1 + len(HEIGHTS)) for s in SHAPES]
    + [(f"shape of the {c} thing", 1 + len(SHAPES)) for c in COLOURS]
    + [("number of items", 5)]
)


def patch_items(scene: Scene, grid: int = GRID) -> np.ndarray:
    """Per patch (raster order): 1 + the index of the item covering most of it, if that item covers at
    least COVER of the patch; else 0 (background). Edge patches count: they show the outline."""
    step = SIZE // grid
    owner = scene.item_map()[: grid * step, : grid * step]
    blocks = owner.reshape(grid, step, grid, step).transpose(0, 2, 1, 3).reshape(grid * grid, step * step)
    cover = np.stack([(blocks == i + 1).sum(1) for i in range(len(scene.items))], 1)  # [patches, items]
    return np.where(cover.max(1) >= COVER * step * step, cover.argmax(1) + 1, 0)


def patch_labels(scene: Scene, grid: int = GRID) -> dict[str, np.ndarray]:
    """Per patch, classes of the item covering it (patch_items), 0 on the background: "colours" and
    "shapes" (1 + index in COLOURS, SHAPES), "sides" and "heights" (1 + index in SIDES, HEIGHTS)."""
    items = patch_items(scene, grid)
    per_item = {
        "colours": [1 + list(COLOURS).index(it.colour) for it in scene.items],
        "shapes": [1 + SHAPES.index(it.shape) for it in scene.items],
        "sides": [_side(it.x - SIZE / 2) for it in scene.items],
        "heights": [_side(it.y - SIZE / 2) for it in scene.items],
    }
    return {name: np.array([0] + classes)[items] for name, classes in per_item.items()}


def _side(offset: float) -> int:
    """Class of an offset from the centre line: 1 left/top, 2 right/bottom, 3 middle (SIDES, HEIGHTS)."""
    return 1 + (0 if offset < -MARGIN else 1 if offset > MARGIN else 2)


def scene_table(scene: Scene) -> np.ndarray:
    """The TABLE_FIELDS classes of a scene."""
    table = np.zeros(len(TABLE_FIELDS), np.int64)
    n = len(SHAPES)
    for it in scene.items:
        s, c = SHAPES.index(it.shape), list(COLOURS).index(it.colour)
        table[s] = 1 + c
        table[n + s] = _side(it.x - SIZE / 2)
        table[2 * n + s] = _side(it.y - SIZE / 2)
        table[3 * n + c] = 1 + s
    table[-1] = len(scene.items)
    return table


class Probes(torch.nn.Module):
    """Linear read-outs of the vision features, for training only."""

    def __init__(self, width: int, grid: int = GRID):
        super().__init__()
        self.grid = grid
        self.per_patch = torch.nn.ModuleDict(
            {
                "colours": torch.nn.Linear(width, 1 + len(COLOURS)),
                "shapes": torch.nn.Linear(width, 1 + len(SHAPES)),
                "sides": torch.nn.Linear(width, 1 + len(SIDES)),
                "heights": torch.nn.Linear(width, 1 + len(HEIGHTS)),
            }
        )
        self.column = torch.nn.Linear(width, grid)
        self.row = torch.nn.Linear(width, grid)
        self.table = torch.nn.ModuleList(torch.nn.Linear(width, classes) for _, classes in TABLE_FIELDS)
        self.summary = torch.nn.ModuleList(torch.nn.Linear(width, classes) for _, classes in TABLE_FIELDS)

    def forward(self, hidden: torch.Tensor, labels: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        """(loss, accuracies) of the select layer's output [B, 1 + P, C] against Examples.pictures'
        labels: for every patch its labels [B, P] (patch_labels), its own column and row; on item
        patches and on [CLS], the scene table [B, F]."""
        summary, features = hidden[:, 0], hidden[:, 1:]
        on_item = labels["shapes"] > 0
        loss = sum(
            F.cross_entropy(probe(features).flatten(0, 1), labels[name].flatten())
            for name, probe in self.per_patch.items()
        )
        # The patch's own place: CLIP's position embeddings otherwise fade out of the features, and
        # where an item is (left/right/top/bottom questions) can only come from there.
        place = torch.arange(features.shape[1])
        loss = loss + F.cross_entropy(
            self.column(features).flatten(0, 1), (place % self.grid).repeat(features.shape[0])
        )
        loss = loss + F.cross_entropy(
            self.row(features).flatten(0, 1), (place // self.grid).repeat(features.shape[0])
        )
        item_features = features[on_item]  # [N, C]
        rows = labels["table"][:, None, :].expand(-1, features.shape[1], -1)[on_item]  # [N, F]
        table_loss, table_right = 0.0, 0.0
        for f, probe in enumerate(self.table):
            logits = probe(item_features)
            table_loss = table_loss + F.cross_entropy(logits, rows[:, f])
            table_right = table_right + (logits.argmax(-1) == rows[:, f]).float().mean()
        # [CLS] sums the picture up, as CLIP's contrastive training makes it do; its attention then
        # goes to the items, which is what FasterVLM's ranking relies on.
        summary_loss, summary_right = 0.0, 0.0
        for f, probe in enumerate(self.summary):
            logits = probe(summary)
            summary_loss = summary_loss + F.cross_entropy(logits, labels["table"][:, f])
            summary_right = summary_right + (logits.argmax(-1) == labels["table"][:, f]).float().mean()
        with torch.no_grad():
            accuracy = {
                f"{name[:-1]} on items": (probe(item_features).argmax(-1) == labels[name][on_item])
                .float()
                .mean()
                .item()
                for name, probe in self.per_patch.items()
            }
            accuracy["column"] = (self.column(features).argmax(-1) == place % self.grid).float().mean().item()
            accuracy["table on items"] = (table_right / len(self.table)).item()
            accuracy["table on [CLS]"] = (summary_right / len(self.summary)).item()
        return loss + (table_loss + summary_loss) / len(self.table), accuracy


def select_layer_output(model, pixels: torch.Tensor) -> torch.Tensor:
    """The vision tower's select layer output, [CLS] first: LLaVA's image features are its patch
    tokens ([:, 1:]). The layers after the select layer feed nothing and get no gradient: they stay
    as initialised."""
    hidden = model.model.vision_tower(pixels, output_hidden_states=True).hidden_states
    return hidden[model.config.vision_feature_layer]


class Examples:
    """Scenes and questions turned into model inputs, with the runtime's preprocessing."""

    def __init__(self, folder: Path):
        from ..runtime.image import ImagePreprocessor
        from ..runtime.prompt import PromptBuilder

        config = json.loads((folder / "config.json").read_text())
        self.image_token_id = config.get("image_token_id", config.get("image_token_index"))
        self.preprocess = ImagePreprocessor.from_config(
            json.loads((folder / "preprocessor_config.json").read_text())
        )
        template = (folder / "chat_template.jinja").read_text()
        self.prompts = PromptBuilder.from_folder(
            folder, template, "<image>", self.image_token_id, SPEC.num_image_tokens
        )
        self.eos = self.prompts.tokenizer.token_to_id("</s>")
        self._cache: dict[str, tuple[list[int], list[int]]] = {}
        # patch_labels' classes -> the first token of the word naming them; -100 for none and "middle"
        first = lambda word: self.ids("", word)[1][0]
        self._word_ids = {
            "colours": [-100] + [first(c) for c in COLOURS],
            "shapes": [-100] + [first(s) for s in SHAPES],
            "sides": [-100, first("left"), first("right"), -100],
            "heights": [-100, first("top"), first("bottom"), -100],
        }

    def ids(self, question: str, answer: str) -> tuple[list[int], list[int]]:
        """(prompt ids, answer ids + </s>)."""
        key = question + "\0" + answer
        if key not in self._cache:
            rendered = self.prompts.render(question)
            prompt = self.prompts.encode(rendered)
            full = self.prompts.encode(rendered + " " + answer)
            if full[: len(prompt)] != prompt:
                raise AssertionError(f"the answer changes the prompt's tokens: {question!r} {answer!r}")
            self._cache[key] = (prompt, full[len(prompt) :] + [self.eos])
        return self._cache[key]

    def pictures(self, scenes: list[Scene]) -> dict[str, torch.Tensor]:
        """Pixels and the dense labels of the seeing stage."""
        labels = [patch_labels(s) for s in scenes]
        return {
            "pixel_values": torch.from_numpy(np.stack([self.preprocess(s.render())[0] for s in scenes])),
            **{name: torch.from_numpy(np.stack([lb[name] for lb in labels])).long() for name in labels[0]},
            "table": torch.from_numpy(np.stack([scene_table(s) for s in scenes])),
        }

    def patch_words(self, scene: Scene) -> np.ndarray:
        """[patches, 4]: the first token of the words naming each patch's item, its colour, shape, side
        and height (-100 on the background and for an item in the middle)."""
        labels = patch_labels(scene)
        return np.stack([np.array(ids)[labels[name]] for name, ids in self._word_ids.items()], 1)

    def questions(
        self, items: list[tuple[Scene, list[Question]]], kept: list[np.ndarray] | None = None
    ) -> dict[str, torch.Tensor]:
        """Several questions per picture, for shared-prefix training (answer_loss): the prompt up to the
        last image token is the same for every question, so it is split off; the rest of each prompt,
        then the answer, is one right-padded row, labelled on the answer tokens only.

        kept: per picture, the same number of sorted patch indices (kept_patches) when the pictures
        are to reach the language model shortened to those patches; None keeps all."""
        if kept is None:
            kept = [np.arange(GRID * GRID)] * len(items)
        prefix, rows, labels, picture, targets, answer_at, named = None, [], [], [], [], [], []
        for index, (scene, asked) in enumerate(items):
            owner = patch_items(scene)[kept[index]]
            for q in asked:
                prompt, answer = self.ids(q.text, q.answer)
                split = len(prompt) - prompt[::-1].index(
                    self.image_token_id
                )  # just after the last image token
                if prefix is None:
                    prefix = prompt[:split]
                if prompt[:split] != prefix:
                    raise AssertionError(
                        f"the chat template puts text before the image that depends on the question: {q.text!r}"
                    )
                rows.append(prompt[split:] + answer)
                labels.append([-100] * (len(prompt) - split) + answer)
                picture.append(index)
                answer_at.append(len(prompt) - split - 1)  # the row that predicts the answer's first token
                about = asked_item(scene, q)
                targets.append(owner == 1 + about if about is not None else np.zeros_like(owner, bool))
                named.append(named_word(q))
        width = max(map(len, rows))
        pad = self.prompts.tokenizer.token_to_id("<pad>")
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        lab = torch.full((len(rows), width), -100, dtype=torch.long)
        for i, (r, target) in enumerate(zip(rows, labels)):
            ids[i, : len(r)], lab[i, : len(target)] = torch.tensor(r), torch.tensor(target)
        pixels = torch.from_numpy(np.stack([self.preprocess(scene.render())[0] for scene, _ in items]))
        # The image tokens end the prefix: drop the pruned ones' placeholders; the text after them
        # follows at once (contiguous positions, as after FasterVLM).
        prefix = prefix[: len(prefix) - GRID * GRID + len(kept[0])]
        return {
            "prefix_ids": torch.tensor([prefix] * len(items)),
            "suffix_ids": ids,
            "labels": lab,
            "picture": torch.tensor(picture),
            "pixel_values": pixels,
            "kept": torch.from_numpy(np.stack(kept)),
            "target_patches": torch.from_numpy(np.stack(targets)),
            "answer_at": torch.tensor(answer_at),
            "named": torch.tensor(named),
            "patch_words": torch.from_numpy(
                np.stack([self.patch_words(scene)[k] for (scene, _), k in zip(items, kept)])
            ).long(),
        }


NAMED_WORDS = SHAPES + tuple(COLOURS)


def named_word(q: Question) -> int:
    """Index in NAMED_WORDS of the word by which a question names the item it asks about (the shape,
    or the colour for "what shape is the red thing?"); -100 for the count question."""
    words = q.text.rstrip("?").split()
    if q.kind == "shape":
        return NAMED_WORDS.index(words[-2])
    return next((NAMED_WORDS.index(w) for w in words if w in SHAPES), -100)


def kept_patches(rng: random.Random, scene: Scene, keep: int) -> np.ndarray:
    """`keep` sorted patch indices: the items' patches (a random subset when they do not all fit),
    then random background ones: a picture as a pruner that finds the items would shorten it."""
    owner = patch_items(scene)
    items, background = np.flatnonzero(owner > 0).tolist(), np.flatnonzero(owner == 0).tolist()
    chosen = (
        rng.sample(items, keep) if len(items) >= keep else items + rng.sample(background, keep - len(items))
    )
    return np.array(sorted(chosen))


def asked_item(scene: Scene, q: Question) -> int | None:
    """Index of the one item a question is about (by its named_word); None for questions about the
    whole scene (count, exists)."""
    if q.kind not in ("colour", "shape", "horizontal", "vertical"):
        return None
    word = NAMED_WORDS[named_word(q)]
    return next(i for i, it in enumerate(scene.items) if word in (it.shape, it.colour))


def picture_questions(rng: random.Random) -> tuple[Scene, list[Question]]:
    """A scene and the questions asked about it in training: every colour and shape question (the
    answers with the most choices, which need the most examples) and one question of each other kind."""
    scene = make_scene(rng)
    asked = questions(scene)
    chosen = [q for q in asked if q.kind in ("colour", "shape")]
    for kind in sorted({q.kind for q in asked} - {"colour", "shape"}):
        chosen.append(rng.choice([q for q in asked if q.kind == kind]))
    return scene, chosen


def answer_loss(
    model, batch: dict[str, torch.Tensor], key_probe: torch.nn.Module | None = None
) -> tuple[torch.Tensor, ...]:
    """(Mean cross-entropy of the answer tokens, focus loss, word loss, key loss), the vision tower frozen.

    The key loss (with key_probe, a linear read-out dropped after training) asks the answer position,
    on its way into the last layer, for the word the question names the item by. The last layer can
    only look the item up by what the answer position knows by then: without it the colour of
    "what shape is the red thing?" was readable there 40% of the time, the shape of "what colour is
    the circle?" 100%, and shape answers stayed at 60% while every other kind reached 100%.

    The word loss asks the language model's output at every image token of an item for the words
    that name the item (its colour, shape, side, height: Examples.patch_words), all equally. An image
    token then carries its item's answer words in the directions the output layer reads, so answering
    "what colour is the circle?" becomes finding the circle and copying: the copying is what the model
    could not learn from the answers alone (colour 24% after 3000 steps without it).

    The focus loss pulls the last layer's attention from the answer position (mean over heads) onto
    the patches of the item a question is about (-log of the attention mass there): it teaches the
    language model to look up an item by what the question names. The last layer only: FastV ranks
    tokens by layer K-1's attention, which this leaves to learn on its own.

    Causal attention means the prompt up to the image's end does not depend on the question, so each
    picture's prefix runs once and every question about it continues from its KV cache: the same
    loss as one single-turn sequence per question (tests check), at a fraction of the cost."""
    llava, cfg = model.model, model.config
    lm = llava.language_model
    embed = lm.get_input_embeddings()
    with torch.no_grad():
        features = select_layer_output(model, batch["pixel_values"])[:, 1:]
        features = features.gather(1, batch["kept"][..., None].expand(-1, -1, features.shape[-1]))
    prefix_ids = batch["prefix_ids"]
    embeds = embed(prefix_ids.clamp(max=cfg.text_config.vocab_size - 1))
    image = llava.multi_modal_projector(features).to(embeds.dtype)  # [B, 576, C]
    embeds = embeds.masked_scatter((prefix_ids == cfg.image_token_id)[..., None], image)
    prefix = lm(inputs_embeds=embeds, use_cache=True)
    image_columns = (prefix_ids[0] == cfg.image_token_id).nonzero().squeeze(1)
    words = batch["patch_words"]  # [B, 576, 4]
    on_item = (words != -100).any(-1)
    word_logp = model.lm_head(prefix.last_hidden_state[:, image_columns][on_item]).log_softmax(-1)  # [N, V]
    named = words[on_item]
    word = -word_logp.gather(1, named.clamp(min=0))[named != -100].mean()
    cache = prefix.past_key_values
    cache.batch_select_indices(
        batch["picture"]
    )  # one row per question, its picture's prefix (differentiable)
    ids = batch["suffix_ids"]
    start = prefix_ids.shape[1]
    positions = torch.arange(start, start + ids.shape[1])[None].expand(ids.shape[0], -1)
    model.set_attn_implementation(
        "eager"
    )  # returns attention weights; the suffix is short, so eager costs little
    try:
        out = lm(
            inputs_embeds=embed(ids),
            past_key_values=cache,
            position_ids=positions,
            output_attentions=True,
            output_hidden_states=key_probe is not None,
        )
    finally:
        model.set_attn_implementation("sdpa")
    targets = batch["labels"][
        :, 1:
    ]  # the suffix starts with question text: its first token is never an answer
    where = targets != -100
    answer = F.cross_entropy(model.lm_head(out.last_hidden_state[:, :-1][where]), targets[where])
    rows = out.attentions[-1][torch.arange(ids.shape[0]), :, batch["answer_at"]]  # [N, H, prefix + suffix]
    mass = (rows[:, :, image_columns] * batch["target_patches"][:, None, :]).sum(-1).mean(1)  # [N]
    about = batch["target_patches"].any(-1)
    focus = -torch.log(mass[about] + 1e-6).mean() if about.any() else mass.sum() * 0
    key = answer.new_zeros(())
    if key_probe is not None:
        before_last = out.hidden_states[-2][
            torch.arange(ids.shape[0]), batch["answer_at"]
        ]  # the last layer's input
        key = F.cross_entropy(key_probe(before_last), batch["named"], ignore_index=-100)
    return answer, focus, word, key


def _optimiser(params, lr: float, steps: int):
    params = [p for p in params if p.requires_grad]
    optim = torch.optim.AdamW(
        [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.01},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ],
        lr=lr,
        betas=(0.9, 0.98),
    )
    warmup = max(steps // 20, 1)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optim, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s / steps, 1.0)))
    )
    return optim, schedule


def _step(loss: torch.Tensor, params, optim, schedule) -> None:
    optim.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optim.step()
    schedule.step()


def train_seeing(
    model, examples: Examples, rng: random.Random, steps: int, batch: int, lr: float, log
) -> dict:
    """Stage 1: the vision tower and the probes on dense patch labels. Returns held-out probe accuracies."""
    tower = model.model.vision_tower
    probes = Probes(model.config.vision_config.hidden_size)
    params = list(tower.parameters()) + list(probes.parameters())
    optim, schedule = _optimiser(params, lr, steps)
    tower.train()
    for step in range(steps):
        b = examples.pictures([make_scene(rng) for _ in range(batch)])
        loss, accuracy = probes(select_layer_output(model, b["pixel_values"]), b)
        _step(loss, params, optim, schedule)
        if step % 100 == 0 or step == steps - 1:
            log(
                f"seeing   {step:5d}  loss {loss.item():.3f}  "
                + "  ".join(f"{k} {v:.2f}" for k, v in accuracy.items())
            )
    tower.eval()
    with torch.no_grad():
        held_out = random.Random(HELD_OUT_SEED)
        b = examples.pictures([make_scene(held_out) for _ in range(64)])
        _, accuracy = probes(select_layer_output(model, b["pixel_values"]), b)
    return accuracy


def train_answering(
    model,
    examples: Examples,
    rng: random.Random,
    steps: int,
    batch: int,
    lr: float,
    focus_weight: float,
    word_weight: float,
    key_weight: float,
    log,
) -> None:
    """Stage 2: projector and language model on the answers to picture_questions about each of
    batch pictures per step; the vision tower stays as stage 1 left it."""
    model.model.vision_tower.requires_grad_(False)
    key_probe = torch.nn.Linear(model.config.text_config.hidden_size, len(NAMED_WORDS))
    params = [p for p in model.parameters() if p.requires_grad] + list(key_probe.parameters())
    optim, schedule = _optimiser(params, lr, steps)
    model.train()
    for step in range(steps):
        items = [picture_questions(rng) for _ in range(batch)]
        keep = rng.choice(SHORTENED_KEEP) if rng.random() < SHORTENED_SHARE else None
        kept = [kept_patches(rng, scene, keep) for scene, _ in items] if keep else None
        answer, focus, word, key = answer_loss(model, examples.questions(items, kept), key_probe)
        _step(answer + focus_weight * focus + word_weight * word + key_weight * key, params, optim, schedule)
        if step % 100 == 0 or step == steps - 1:
            log(
                f"answering {step:5d}  loss {answer.item():.3f}  focus {focus.item():.3f}  words {word.item():.3f}"
                f"  key {key.item():.3f}  lr {schedule.get_last_lr()[0]:.2e}"
            )
    model.eval()
    model.requires_grad_(True)


@torch.inference_mode()
def evaluate(
    model, examples: Examples, items: list[tuple[Scene, Question]], max_new_tokens: int = 4
) -> dict[str, float]:
    """Exact-match accuracy of greedy answers (transformers' generate), overall and per question kind."""
    right: dict[str, list[bool]] = {kind: [] for kind in QUESTION_KINDS}
    for scene, q in items:
        prompt = torch.tensor([examples.ids(q.text, q.answer)[0]])
        pixels = torch.from_numpy(examples.preprocess(scene.render()))
        out = model.generate(
            input_ids=prompt,
            pixel_values=pixels,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=max_new_tokens,
            do_sample=False,
        )
        text = examples.prompts.decode([t for t in out[0, prompt.shape[1] :].tolist() if t != examples.eos])
        right[q.kind].append(normalise(text) == normalise(q.answer))
    every = [r for rs in right.values() for r in rs]
    return {"all": sum(every) / len(every), **{k: sum(rs) / len(rs) for k, rs in right.items() if rs}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "checkpoint")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seeing-steps", type=int, default=1500)
    p.add_argument("--seeing-batch", type=int, default=16)
    p.add_argument("--seeing-lr", type=float, default=2e-3)
    p.add_argument("--answering-steps", type=int, default=3500)
    p.add_argument("--answering-batch", type=int, default=4, help="pictures per step")
    p.add_argument("--answering-lr", type=float, default=1e-3)
    p.add_argument("--focus-weight", type=float, default=0.5)
    p.add_argument("--word-weight", type=float, default=1.0)
    p.add_argument("--key-weight", type=float, default=1.0)
    p.add_argument(
        "--only",
        choices=("seeing", "answering"),
        help="run one stage: 'seeing' writes the checkpoint after stage 1, 'answering' continues from --out's",
    )
    p.add_argument("--eval", type=int, default=300, help="held-out questions scored at the end")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()

    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    start = time.time()

    def log(line: str) -> None:
        print(f"{time.time() - start:6.0f}s  {line}", flush=True)

    work = args.out.with_name(args.out.name + ".partial")
    shutil.rmtree(work, ignore_errors=True)
    record = {}
    if args.only == "answering":  # continue from stage 1's checkpoint
        shutil.copytree(args.out, work)
        record = json.loads((work / "training.json").read_text())
    else:
        make_tiny_llava(work, SPEC)
    model = LlavaForConditionalGeneration.from_pretrained(work, dtype=torch.float32)
    examples = Examples(work)
    if args.only != "answering":
        seeing = {
            "seed": args.seed,
            "steps": args.seeing_steps,
            "batch": args.seeing_batch,
            "lr": args.seeing_lr,
        }
        probes = train_seeing(
            model,
            examples,
            random.Random(args.seed),
            args.seeing_steps,
            args.seeing_batch,
            args.seeing_lr,
            log,
        )
        log("held-out probes: " + "  ".join(f"{k} {v:.3f}" for k, v in probes.items()))
        record["seeing"] = {
            **seeing,
            "held_out_probe_accuracy": probes,
            "seconds": round(time.time() - start),
        }
    if args.only != "seeing":
        answering = {
            "seed": args.seed + 1,
            "steps": args.answering_steps,
            "batch": args.answering_batch,
            "lr": args.answering_lr,
            "focus_weight": args.focus_weight,
            "word_weight": args.word_weight,
            "key_weight": args.key_weight,
            "shortened_share": SHORTENED_SHARE,
            "shortened_keep": list(SHORTENED_KEEP),
        }
        began = time.time()
        train_answering(
            model,
            examples,
            random.Random(args.seed + 1),
            args.answering_steps,
            args.answering_batch,
            args.answering_lr,
            args.focus_weight,
            args.word_weight,
            args.key_weight,
            log,
        )
        held_out = random.Random(HELD_OUT_SEED)
        accuracy = evaluate(model, examples, [sample(held_out) for _ in range(args.eval)])
        log(
            f"held-out exact match {accuracy['all']:.1%} on {args.eval} questions: "
            + "  ".join(f"{k} {v:.0%}" for k, v in accuracy.items() if k != "all")
        )
        record["answering"] = {**answering, "seconds": round(time.time() - began)}
        record["held_out"] = {"seed": HELD_OUT_SEED, "questions": args.eval, "exact_match": accuracy}
    model.save_pretrained(work)  # the probes are not part of the model: a plain LLaVA checkpoint
    (work / "tiny_llava_spec.json").unlink(missing_ok=True)
    (work / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    shutil.rmtree(args.out, ignore_errors=True)
    work.rename(args.out)
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
