"""Tiny random LLaVA checkpoints in the layout of `llava-hf/*` on the Hub, built offline for tests.

`make_tiny_llava` writes a folder that `LlavaForConditionalGeneration.from_pretrained` and
`AutoProcessor.from_pretrained` load like a `llava-hf/*` checkpoint: config, safetensors weights,
a `tokenizers` BPE tokenizer trained in-process on a small built-in corpus, a CLIP image processor,
the `LlavaProcessor` settings and a chat template. Nothing is downloaded. Only torch and
transformers are imported lazily, so the specs and `sample_image` need just numpy and Pillow.

The weights are random but not degenerate: every parameter (biases and norm scales included) is
random, and the init scale is large enough that the top-1 logit clearly beats the runner-up, so
greedy decoding is decided by the model and not by float rounding. That keeps parity tests
(PyTorch vs ONNX vs TensorRT, pruned vs reference) meaningful.
"""

from __future__ import annotations

import functools
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from ..export.sample_image import sample_image  # noqa: F401  (re-exported: the tests' pictures)

# OpenAI CLIP normalisation, as in every llava-hf preprocessor_config.json.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

IMAGE_TOKEN = "<image>"
LLAMA_SPECIALS = {"unk": "<unk>", "bos": "<s>", "eos": "</s>", "pad": "<pad>"}
CHATML_SPECIALS = {"endoftext": "<|endoftext|>", "im_start": "<|im_start|>", "im_end": "<|im_end|>"}
CHATML_SYSTEM_PROMPT = "You are a helpful assistant."


@dataclass(frozen=True)
class TinyLlavaSpec:
    """Architecture of one tiny checkpoint. Same spec -> same files, byte for byte in the tensors."""

    name: str
    text_arch: str = "llama"  # "llama" (LlamaConfig), "qwen2" (Qwen2Config) or "mistral" (MistralConfig)
    sliding_window: int | None = None  # mistral only: its attention window
    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 4
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # e.g. {"rope_type": "linear", "factor": 2.0}; None = default rope
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 2048
    image_size: int = 336  # CLIP vision tower geometry
    patch_size: int = 14
    vision_hidden_size: int = 32
    vision_intermediate_size: int = 64
    vision_layers: int = 3
    vision_heads: int = 2
    vision_feature_layer: int = -2
    vision_arch: str = "clip"  # "clip" (LLaVA-1.5) or "siglip" (llava-interleave: no CLS, all patches)
    chat_style: str = "llava"  # "llava" (USER: ... ASSISTANT:) or "chatml" (<|im_start|>...)
    # "bpe": trained with `tokenizers`; "sentencepiece" (llava style only): Llama-2's own kind, a
    # SentencePiece BPE model with byte fallback saved as tokenizer.model beside tokenizer.json, as in
    # llava-hf/llava-1.5-* (what llama.cpp's converter reads). Needs the sentencepiece package.
    tokenizer: str = "bpe"
    vocab_size: int | None = None  # rows of the embedding tables; None: the tokenizer's size
    # LLaVA-NeXT: its anyres resolutions, (height, width) multiples of image_size; None: LLaVA-1.5
    image_grid_pinpoints: tuple | None = None
    # 10x the usual 0.02. With hidden size 64 the logits then have a spread of ~1.6, so the top-1 /
    # top-2 gap is typically 0.1-1 instead of ~0.01, while hidden states stay below ~40 (fp16-safe).
    initializer_range: float = 0.2
    seed: int = 0

    @property
    def num_image_tokens(self) -> int:
        """Placeholder tokens one image expands to (patches; the CLS token is dropped)."""
        return (self.image_size // self.patch_size) ** 2


# The seeds were picked among the first eight for clear greedy margins (top-1 minus top-2 logit
# >= 0.12 at the first answer token, >= 0.006 over 16 greedy steps) and varied answers, on
# "What colour is the circle?" / "Describe the picture." with sample_image(seed=0 and 1).
FIXTURE_SPECS: dict[str, TinyLlavaSpec] = {
    spec.name: spec
    for spec in (
        # LLaVA-1.5 layout: Llama with full multi-head attention, 336 px / 14 px patches = 576 tokens.
        TinyLlavaSpec(name="llama_mha", seed=7),
        # Grouped-query attention and a different grid: 64 px / 8 px patches = 64 tokens.
        TinyLlavaSpec(name="llama_gqa", num_kv_heads=2, image_size=64, patch_size=8, seed=6),
        # Qwen2 language model: q/k/v biases, rope_theta 1e6, tied embeddings, ChatML prompts,
        # and a third grid: 112 px / 16 px patches = 49 tokens (odd on purpose).
        TinyLlavaSpec(
            name="qwen2",
            text_arch="qwen2",
            num_kv_heads=2,
            rope_theta=1_000_000.0,
            tie_word_embeddings=True,
            image_size=112,
            patch_size=16,
            chat_style="chatml",
            seed=0,
        ),
        # llava-interleave-qwen layout: a SigLIP tower (no CLS token, every patch is an image
        # token, features from the last layer) in front of Qwen2; 84 px / 14 px patches = 36 tokens.
        TinyLlavaSpec(
            name="qwen2_siglip",
            text_arch="qwen2",
            num_kv_heads=2,
            rope_theta=1_000_000.0,
            tie_word_embeddings=True,
            image_size=84,
            patch_size=14,
            vision_arch="siglip",
            vision_feature_layer=-1,
            chat_style="chatml",
            seed=3,
        ),
        # Mistral language model (LLaVA-NeXT's llava-v1.6-mistral): no biases, GQA, a sliding window
        # shorter than its positions (bundles keep within it); 96 px / 16 px patches = 36 tokens.
        TinyLlavaSpec(
            name="mistral",
            text_arch="mistral",
            num_kv_heads=2,
            sliding_window=1024,
            image_size=96,
            patch_size=16,
            seed=1,
        ),
    )
}


# ---------------------------------------------------------------------------------------------
# Chat templates (Jinja, rendered by transformers). Message content may be a string or a list of
# {"type": "image"} / {"type": "text", "text": ...} parts; images are placed before the text.

# LLaVA-1.5 (Vicuna v1): "USER: <image>\nWhat is this? ASSISTANT:"; assistant turns end with </s>.
LLAVA_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}"
    "{%- set images = [] -%}{%- set texts = [message['content']] -%}"
    "{%- else -%}"
    "{%- set images = message['content'] | selectattr('type', 'equalto', 'image') | list -%}"
    "{%- set texts = message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | list -%}"
    "{%- endif -%}"
    "{%- if message['role'] == 'system' -%}"
    "{{ texts | join(' ') + ' ' }}"
    "{%- elif message['role'] == 'user' -%}"
    "{{ 'USER: ' }}{%- for _ in images -%}{{ '<image>\n' }}{%- endfor -%}{{ texts | join(' ') + ' ' }}"
    "{%- else -%}"
    "{{ 'ASSISTANT: ' + texts | join(' ') + eos_token }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}"
)

# ChatML (Qwen2): a default system turn, "<image>\n" before the text of a user turn.
CHATML_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] != 'system' -%}"
    "{{ '<|im_start|>system\n" + CHATML_SYSTEM_PROMPT + "<|im_end|>\n' }}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{%- if message['content'] is string -%}"
    "{{ message['content'] }}"
    "{%- else -%}"
    "{%- for part in message['content'] | selectattr('type', 'equalto', 'image') -%}{{ '<image>\n' }}{%- endfor -%}"
    "{{ message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join(' ') }}"
    "{%- endif -%}"
    "{{ '<|im_end|>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}"
)

CHAT_TEMPLATES = {"llava": LLAVA_CHAT_TEMPLATE, "chatml": CHATML_CHAT_TEMPLATE}


# ---------------------------------------------------------------------------------------------
# Tokenizer

_COLOURS = ("red", "green", "blue", "yellow", "orange", "purple", "black", "white", "pink", "brown", "grey")
_SHAPES = ("circle", "square", "triangle", "star", "rectangle", "hexagon", "diamond", "line")
_PLACES = ("left", "right", "top", "bottom", "middle", "centre", "corner", "edge")
_NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")


def _corpus() -> list[str]:
    """A small deterministic English corpus about shapes, colours, positions and counting."""
    lines = [
        "USER: What is shown in the image? ASSISTANT: The image shows some shapes on a plain background.",
        "Describe the picture in detail. There are several coloured shapes, each of a different size.",
        "Is there a dog in the photo? No, there is no animal, only simple geometric figures.",
        "Which shape is the largest? The largest shape is the one near the bottom edge.",
        "Are the shapes touching each other? No, they are apart, with a small gap between them.",
        "Answer the question using a single word or phrase. Yes. No. Maybe. I don't know.",
        "Thank you! You are welcome. Can you count again, please? Sure, let me look more carefully.",
        "Numbers and marks: 0 1 2 3 4 5 6 7 8 9 10 12 25 100, (a) [b] {c} a/b a-b a_b a+b=c 50% #1 @ $ & * ; ' \"",
    ]
    for i, colour in enumerate(_COLOURS):
        shape = _SHAPES[i % len(_SHAPES)]
        place = _PLACES[i % len(_PLACES)]
        number = _NUMBERS[i % len(_NUMBERS)]
        lines += [
            f"USER: What colour is the {shape}? ASSISTANT: It is {colour}. The {shape} is {colour}.",
            f"USER: Where is the {colour} {shape}? ASSISTANT: The {colour} {shape} is at the {place} of the image.",
            f"USER: How many {shape}s are there? ASSISTANT: There are {number} {shape}s. {number.capitalize()}.",
            f"USER: Is the {shape} {colour}? ASSISTANT: Yes, the {shape} is {colour}, and it is to the {place}.",
            # The same in ChatML form, so that its role names become whole tokens as in Qwen2's vocabulary.
            f"system\n{CHATML_SYSTEM_PROMPT}\nuser\nWhat colour is the {shape}?\nassistant\nIt is {colour}.",
        ]
    for shape in _SHAPES:
        lines.append(
            f"A {shape} is above a {shape}, below a {shape}, next to a {shape} and inside a {shape}."
        )
    return lines


@functools.cache
def train_sentencepiece() -> bytes:
    """A SentencePiece BPE model of the corpus with Llama-2's settings (byte fallback, split digits,
    no normalisation; <unk>=0 <s>=1 </s>=2) but no dummy prefix: llama.cpp tokenizes the text after
    an image as a new fragment and would prefix it with "▁" where transformers does not, so without
    one both see the same ids. Deterministic (one thread)."""
    import io

    import sentencepiece

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus()),
        model_writer=model,
        model_type="bpe",
        vocab_size=640,
        hard_vocab_limit=False,
        byte_fallback=True,
        split_digits=True,
        add_dummy_prefix=False,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    return model.getvalue()


def _build_sentencepiece_tokenizer(model_max_length: int):
    """transformers' Llama tokenizer converted from `train_sentencepiece`'s model, the llava-hf specials added."""
    import tempfile

    from tokenizers import AddedToken
    from transformers import LlamaTokenizer

    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "tokenizer.model").write_bytes(train_sentencepiece())
        tokenizer = LlamaTokenizer.from_pretrained(
            folder,
            legacy=False,
            add_prefix_space=False,
            add_bos_token=True,
            add_eos_token=False,
            padding_side="left",
            model_max_length=model_max_length,
            chat_template=CHAT_TEMPLATES["llava"],
            pad_token=LLAMA_SPECIALS["pad"],
        )
    tokenizer.add_special_tokens(
        {"additional_special_tokens": [AddedToken(IMAGE_TOKEN, special=True, normalized=False)]}
    )
    return tokenizer


def _build_tokenizer(chat_style: str, model_max_length: int, kind: str = "bpe"):
    """A small BPE tokenizer shaped like Llama's ("llava") or Qwen2's ("chatml")."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if kind == "sentencepiece":
        if chat_style != "llava":
            raise ValueError("a sentencepiece tokenizer is Llama's: it needs chat_style 'llava'")
        return _build_sentencepiece_tokenizer(model_max_length)
    if kind != "bpe":
        raise ValueError(f"unknown tokenizer {kind!r} (expected 'bpe' or 'sentencepiece')")
    if chat_style == "llava":
        # SentencePiece-like: "▁" marks word starts, <unk>=0 <s>=1 </s>=2, BOS added by the post-processor.
        specials = [LLAMA_SPECIALS["unk"], LLAMA_SPECIALS["bos"], LLAMA_SPECIALS["eos"]]
        tok = Tokenizer(models.BPE(unk_token=LLAMA_SPECIALS["unk"], fuse_unk=True))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
        # Every printable ASCII character (and newline/tab) is in the base vocabulary, so prompts
        # never hit <unk>; Llama gets the same effect from its byte-fallback tokens.
        alphabet = [chr(c) for c in range(32, 127)] + ["\n", "\t", "▁"]
        vocab_size = 384
    elif chat_style == "chatml":
        # GPT-2/Qwen2-like byte-level BPE: every byte is a token, no BOS, no <unk>.
        specials = [CHATML_SPECIALS["endoftext"], CHATML_SPECIALS["im_start"], CHATML_SPECIALS["im_end"]]
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
        vocab_size = 448
    else:
        raise ValueError(f"unknown chat_style {chat_style!r} (expected 'llava' or 'chatml')")

    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=alphabet, show_progress=False
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)

    if chat_style == "llava":
        bos = LLAMA_SPECIALS["bos"]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
        )
        # As in llava-hf/llava-1.5-*: <image> and <pad> come right after the trained vocabulary.
        tok.add_special_tokens(
            [AddedToken(IMAGE_TOKEN, special=True, normalized=False), LLAMA_SPECIALS["pad"]]
        )
        names = dict(
            bos_token=bos,
            eos_token=LLAMA_SPECIALS["eos"],
            unk_token=LLAMA_SPECIALS["unk"],
            pad_token=LLAMA_SPECIALS["pad"],
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
        tok.add_special_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)])
        # Qwen2 pads with <|endoftext|> and ends an assistant turn with <|im_end|>.
        names = dict(eos_token=CHATML_SPECIALS["im_end"], pad_token=CHATML_SPECIALS["endoftext"])

    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        padding_side="left",  # batched generation pads on the left, as llava-hf tokenizers do
        model_max_length=model_max_length,
        chat_template=CHAT_TEMPLATES[chat_style],
        **names,
    )


# ---------------------------------------------------------------------------------------------
# Model


def _build_config(spec: TinyLlavaSpec, tokenizer):
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        MistralConfig,
        Qwen2Config,
        SiglipVisionConfig,
    )

    rope_parameters = {"rope_type": "default", **(spec.rope_scaling or {}), "rope_theta": spec.rope_theta}
    text_kwargs = dict(
        vocab_size=_vocab_size(spec, tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=spec.max_position_embeddings,
        rope_parameters=rope_parameters,
        tie_word_embeddings=spec.tie_word_embeddings,
        initializer_range=spec.initializer_range,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if spec.sliding_window is not None and spec.text_arch != "mistral":
        raise ValueError(f"sliding_window is Mistral's setting, not {spec.text_arch}'s")
    if spec.text_arch == "llama":
        text_config = LlamaConfig(**text_kwargs)
    elif spec.text_arch == "qwen2":
        # Qwen2 always has q/k/v biases; sliding windows are off in every released Qwen2 LLaVA.
        text_config = Qwen2Config(**text_kwargs, use_sliding_window=False)
    elif spec.text_arch == "mistral":
        text_config = MistralConfig(**text_kwargs, sliding_window=spec.sliding_window)
    else:
        raise ValueError(f"unknown text_arch {spec.text_arch!r} (expected 'llama', 'qwen2' or 'mistral')")

    vision_kwargs = dict(
        hidden_size=spec.vision_hidden_size,
        intermediate_size=spec.vision_intermediate_size,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=spec.vision_heads,
        image_size=spec.image_size,
        patch_size=spec.patch_size,
        initializer_range=spec.initializer_range,
    )
    if spec.vision_arch == "clip":
        # as in openai/clip-vit-large-patch14-336
        vision_config = CLIPVisionConfig(
            **vision_kwargs, projection_dim=spec.vision_hidden_size, hidden_act="quick_gelu"
        )
    elif spec.vision_arch == "siglip":
        # as in llava-interleave-qwen: SigLIP's own activation, no pooling head
        vision_config = SiglipVisionConfig(
            **vision_kwargs, hidden_act="gelu_pytorch_tanh", vision_use_head=False
        )
    else:
        raise ValueError(f"unknown vision_arch {spec.vision_arch!r} (expected 'clip' or 'siglip')")
    if spec.image_grid_pinpoints is not None:
        from transformers import LlavaNextConfig

        return LlavaNextConfig(
            vision_config=vision_config,
            text_config=text_config,
            image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
            image_grid_pinpoints=[list(p) for p in spec.image_grid_pinpoints],
            vision_feature_layer=spec.vision_feature_layer,
            vision_feature_select_strategy=_select_strategy(spec),
            projector_hidden_act="gelu",
            tie_word_embeddings=spec.tie_word_embeddings,
            pad_token_id=tokenizer.pad_token_id,
        )
    return LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=spec.num_image_tokens,
        vision_feature_layer=spec.vision_feature_layer,
        vision_feature_select_strategy=_select_strategy(spec),
        projector_hidden_act="gelu",
        tie_word_embeddings=spec.tie_word_embeddings,
        pad_token_id=tokenizer.pad_token_id,
    )


def _vocab_size(spec: TinyLlavaSpec, tokenizer) -> int:
    if spec.vocab_size is None:
        return len(tokenizer)
    if spec.vocab_size < len(tokenizer):
        raise ValueError(f"vocab_size {spec.vocab_size} is below the tokenizer's {len(tokenizer)} tokens")
    return spec.vocab_size


def _randomize_constant_parameters(model, generator) -> None:
    """Make the parameters that transformers initialises to constants random too.

    Biases start at 0 and norm scales at 1, so an exporter that dropped a bias or a norm weight
    would still match the reference; random values make such mistakes show up in parity tests.
    """
    import torch

    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.copy_(0.05 * torch.randn(param.shape, generator=generator))
            elif name.endswith(".weight") and "norm" in name:  # RMSNorm, LayerNorm, CLIP's pre_layrnorm
                param.copy_(1.0 + 0.1 * torch.randn(param.shape, generator=generator))


def _quiet_special_tokens(model, token_ids: list[int]) -> None:
    """Shrink the output-embedding rows of special tokens so that greedy decoding never picks them.

    A trained LLaVA does not answer with <image>, <pad> or BOS, nor with EOS right away. A random
    one would, now and then: generation would stop after a token or two (making "same tokens
    over N steps" tests vacuous) or feed an <image> placeholder back in. With these rows at a tenth
    of their size the special logits stay near 0 while the best ordinary one is several units up.
    With tied embeddings this also shrinks their input embeddings, which the next RMSNorm undoes.
    """
    import torch

    with torch.no_grad():
        model.get_output_embeddings().weight[token_ids] *= 0.1


def _build_model(spec: TinyLlavaSpec, config, tokenizer, dtype: str = "float32"):
    import torch
    from transformers import LlavaForConditionalGeneration, LlavaNextForConditionalGeneration

    kind = (
        LlavaForConditionalGeneration
        if spec.image_grid_pinpoints is None
        else LlavaNextForConditionalGeneration
    )
    # Seed a forked RNG so that building a checkpoint leaves the caller's random state alone.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        default = torch.get_default_dtype()
        torch.set_default_dtype(getattr(torch, dtype))  # initialised in dtype: a 7B fp32 copy is 28 GB
        try:
            model = kind(config).to(getattr(torch, dtype)).eval()
        finally:
            torch.set_default_dtype(default)
    _randomize_constant_parameters(model, torch.Generator().manual_seed(spec.seed))
    special_ids = sorted(i for i, token in tokenizer.added_tokens_decoder.items() if token.special)
    # Rows past the tokenizer (a vocab_size above it, as llava-hf's 32064) decode to nothing: quiet too.
    padding_ids = list(range(len(tokenizer), config.text_config.vocab_size))
    _quiet_special_tokens(model, special_ids + padding_ids)
    return model


def _write_hub_weight_names(weights_file: Path) -> None:
    """Rename the vision tower's tensors to the names llava-hf checkpoints use on the Hub.

    transformers 5 flattened `CLIPVisionModel` and its save_pretrained writes
    `vision_tower.encoder...`, while llava-hf checkpoints on the Hub have
    `vision_tower.vision_model.encoder...`; transformers loads both.
    """
    from safetensors.torch import load_file, save_file

    prefix, hub_prefix = "vision_tower.", "vision_tower.vision_model."
    tensors = load_file(weights_file)
    renamed = {
        hub_prefix + key[len(prefix) :]
        if key.startswith(prefix) and not key.startswith(hub_prefix)
        else key: value
        for key, value in tensors.items()
    }
    save_file(renamed, weights_file, metadata={"format": "pt"})


# ---------------------------------------------------------------------------------------------
# Processor and the checkpoint folder


def _build_processor(spec: TinyLlavaSpec, tokenizer):
    import transformers

    # transformers >= 5.x picks the torchvision-backed CLIPImageProcessor by default and falls back
    # (with a warning) to the PIL one when torchvision is missing; ask for PIL directly. The saved
    # config says "CLIPImageProcessor" either way.
    if spec.vision_arch == "siglip":
        # SigLIP resizes straight to a square and normalises to [-1, 1]; every patch is a token.
        image_processor_cls = (
            getattr(transformers, "SiglipImageProcessorPil", None) or transformers.SiglipImageProcessor
        )
        image_processor = image_processor_cls(
            size={"height": spec.image_size, "width": spec.image_size},
            resample=3,
            image_mean=[0.5, 0.5, 0.5],
            image_std=[0.5, 0.5, 0.5],
        )
        additional_tokens = 0
    else:
        image_processor_cls = (
            getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
        )
        image_processor = image_processor_cls(
            size={"shortest_edge": spec.image_size},
            crop_size={"height": spec.image_size, "width": spec.image_size},
            do_center_crop=True,
            resample=3,  # bicubic
            image_mean=list(CLIP_MEAN),
            image_std=list(CLIP_STD),
        )
        # The CLIP tower outputs a CLS token on top of the patches; "default" drops it again, so
        # one <image> expands to exactly (image_size // patch_size) ** 2 placeholders.
        additional_tokens = 1
    processor_cls = transformers.LlavaProcessor
    if spec.image_grid_pinpoints is not None:  # LLaVA-NeXT: the same CLIP steps on each anyres view
        from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

        image_processor = LlavaNextImageProcessorPil(
            **{
                k: v
                for k, v in image_processor.to_dict().items()
                if k in ("size", "crop_size", "resample", "image_mean", "image_std")
            },
            image_grid_pinpoints=[list(p) for p in spec.image_grid_pinpoints],
        )
        processor_cls = transformers.LlavaNextProcessor
    return processor_cls(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=spec.patch_size,
        vision_feature_select_strategy=_select_strategy(spec),
        num_additional_image_tokens=additional_tokens,
        chat_template=CHAT_TEMPLATES[spec.chat_style],
    )


def _select_strategy(spec: TinyLlavaSpec) -> str:
    """CLIP: drop the CLS token ("default"); SigLIP has none, so every token is a patch ("full")."""
    return "full" if spec.vision_arch == "siglip" else "default"


def _save_processor(processor, out: Path) -> None:
    """Save the processor in the llava-hf Hub layout (which transformers 5 still loads).

    transformers 5 nests the image processor settings inside processor_config.json; Hub
    checkpoints keep them in preprocessor_config.json, and also carry the chat template in
    tokenizer_config.json. Code that reads these files without transformers sees the Hub layout.
    """
    processor.save_pretrained(
        out
    )  # tokenizer.json, tokenizer_config.json, chat_template.jinja, processor_config.json
    processor.tokenizer.save_pretrained(
        out, save_jinja_files=False
    )  # chat template into tokenizer_config.json

    processor_file = out / "processor_config.json"
    settings = json.loads(processor_file.read_text())
    image_settings = settings.pop("image_processor")
    image_settings["processor_class"] = settings["processor_class"]
    _write_json(out / "preprocessor_config.json", image_settings)
    _write_json(processor_file, settings)


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def make_tiny_llava(
    out_dir: str | Path,
    spec: TinyLlavaSpec,
    *,
    hub_weight_names: bool = False,
    dtype: str = "float32",
    max_shard_size: str | None = None,
) -> Path:
    """Write a tiny random LLaVA checkpoint for `spec` into `out_dir` (created if needed); return it.

    Files: config.json, generation_config.json, model.safetensors, tokenizer.json,
    tokenizer_config.json, chat_template.jinja, preprocessor_config.json, processor_config.json,
    and tiny_llava_spec.json (the spec itself, for debugging).

    Tensor names are those of transformers 5's save_pretrained (`language_model.model.*`,
    `language_model.lm_head.weight`, `multi_modal_projector.*`, `vision_tower.*`); with
    `hub_weight_names=True` the vision tower's are `vision_tower.vision_model.*` as on the Hub.
    dtype ("float32" or "float16") is that of the weights from the start, and max_shard_size (e.g.
    "2GB") splits them as save_pretrained does: for benchmarks' 7B-sized checkpoints, which neither an
    fp32 copy nor one whole-file write would fit in memory.
    """
    from transformers import GenerationConfig

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    tokenizer = _build_tokenizer(spec.chat_style, spec.max_position_embeddings, spec.tokenizer)
    config = _build_config(spec, tokenizer)
    model = _build_model(spec, config, tokenizer, dtype)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(out, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    del model
    if hub_weight_names:
        _write_hub_weight_names(out / "model.safetensors")
    _save_processor(_build_processor(spec, tokenizer), out)
    if spec.tokenizer == "sentencepiece":
        (out / "tokenizer.model").write_bytes(train_sentencepiece())
    _write_json(out / "tiny_llava_spec.json", asdict(spec))
    return out
