"""Architecture numbers of a LLaVA checkpoint, as flat frozen dataclasses.

`transformers` parses `config.json` (it knows each model type's defaults, and the old `rope_scaling` /
new `rope_parameters` spellings); we keep only the numbers our modules need, checked once here, so
that everything downstream (modules, export, manifest) works from one small, explicit spec.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import MllmEdgeError, UnsupportedModelError
from .families import model_family, text_family, vision_family

# RoPE kinds whose frequencies do not depend on the sequence length, so one table serves every shape.
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


@dataclass(frozen=True)
class VisionSpec:
    arch: str
    image_size: int
    patch_size: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_layers: int  # encoder layers that run: those up to and including the feature layer
    layer_norm_eps: float
    hidden_act: str

    @property
    def has_cls(self) -> bool:
        """CLIP prepends a [CLS] token (which FasterVLM ranks by); SigLIP has none."""
        return vision_family(self.arch).has_cls

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid


@dataclass(frozen=True)
class TextSpec:
    arch: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    hidden_act: str
    attention_bias: bool  # q/k/v projections (Qwen2: yes)
    mlp_bias: bool
    tie_word_embeddings: bool
    max_position_embeddings: int
    rope_parameters: dict = field(default_factory=dict)
    o_proj_bias: bool = False  # the attention output projection (Llama: as attention_bias; Qwen2: never)
    sliding_window: int | None = None  # Mistral: how far back a token attends (contexts stay within it)

    @property
    def max_context(self) -> int:
        """The most positions a bundle may hold: the model's, and within a sliding window, where full
        causal attention is what the model computes."""
        if self.sliding_window is None:
            return self.max_position_embeddings
        return min(self.max_position_embeddings, self.sliding_window)

    @property
    def max_context_reason(self) -> str:
        """What sets max_context, for messages."""
        if self.max_context < self.max_position_embeddings:
            return f"its sliding window of {self.max_context} tokens"
        return f"the model's {self.max_context} positions"


@dataclass(frozen=True)
class LlavaSpec:
    vision: VisionSpec
    text: TextSpec
    image_token_id: int
    projector_hidden_act: str
    projector_bias: bool
    model_type: str = "llava"  # the family (models/families) that reads and runs it
    # LLaVA-NeXT: the (height, width) resolutions its anyres views tile; () for one view (LLaVA-1.5)
    image_grid_pinpoints: tuple = ()

    @property
    def num_image_tokens(self) -> int:
        """Image tokens the unpruned model puts into the LLM for one image (LLaVA-1.5: the patches)."""
        return model_family(self.model_type).image_tokens(self)

    @property
    def max_views(self) -> int:
        """Views of one picture the tower runs on at most: 1, or LLaVA-NeXT's base view and the
        tiles of its largest pinpoint."""
        if not self.image_grid_pinpoints:
            return 1
        from ..runtime.anyres import AnyRes

        return AnyRes.from_config(
            self.image_grid_pinpoints, self.vision.image_size, self.vision.patch_size
        ).max_views

    def most_entering_tokens(self, fastervlm) -> int:
        """The most image tokens a picture puts into the LLM: every one, or FasterVLM's keep
        (fastervlm: a pruning.FasterVLMConfig or None). LLaVA-NeXT keeps per view: its spatial merge
        puts views x keep, its unpad merge at most that and a newline per row of the grid, the most
        for a picture of a pinpoint's exact shape (nothing unpadded)."""
        from ..pruning import keep_count

        if fastervlm is None:
            return self.num_image_tokens
        if self.max_views == 1:
            return keep_count(self.num_image_tokens, fastervlm.ratio)
        side, tile = self.vision.grid, self.vision.image_size
        keep = keep_count(side * side, fastervlm.ratio)
        if fastervlm.merge == "spatial":
            return self.max_views * keep
        return max(
            (1 + (h // tile) * (w // tile)) * keep + (h // tile) * side for h, w in self.image_grid_pinpoints
        )

    @property
    def default_max_context(self) -> int:
        """The context a bundle gets unless told: 2048, or the largest image and 1024 tokens of text
        where that is more (LLaVA-NeXT), within the model's limit."""
        return min(
            max(DEFAULT_MAX_CONTEXT, self.num_image_tokens + DEFAULT_TEXT_TOKENS), self.text.max_context
        )

    def check_max_context(self, value: int | None) -> int:
        """A max context for a bundle of this model (None: the default): it holds the largest image
        and some text, and stays within what the model computes with full attention."""
        limit = self.text.max_context
        value = self.default_max_context if value is None else value
        if (
            isinstance(value, bool)
            or not isinstance(value, int)
            or not self.num_image_tokens < value <= limit
        ):
            within = self.text.max_context_reason
            if limit < self.text.max_position_embeddings:
                within += " (beyond it the model attends to fewer tokens than a full cache holds)"
            raise MllmEdgeError(
                f"max context must hold the {self.num_image_tokens} image tokens and the text, and stay within "
                f"{within}: {self.num_image_tokens} < N <= {limit}, got {value!r}"
            )
        return value

    def architecture(self) -> dict:
        """The spec as a bundle's manifest records it (and plan reads it), with the derived counts."""
        return {**asdict(self), "num_image_tokens": self.num_image_tokens, "max_views": self.max_views}

    def to_dict(self) -> dict:
        return asdict(self)


DEFAULT_MAX_CONTEXT = 2048
DEFAULT_TEXT_TOKENS = 1024  # beside LLaVA-NeXT's largest image, in its default context


def vision_spec(cfg, feature_layer: int, select_strategy: str) -> VisionSpec:
    """The numbers of a vision tower's HF config that every family reads alike."""
    family = vision_family(cfg.model_type)
    if not isinstance(feature_layer, int):
        raise UnsupportedModelError(
            f"vision_feature_layer={feature_layer!r}: only a single feature layer is supported"
        )
    if select_strategy != family.select_strategy:
        raise UnsupportedModelError(
            f"vision_feature_select_strategy='{select_strategy}' with {cfg.model_type}: only "
            f"'{family.select_strategy}' is supported (image tokens = patches, no CLS)"
        )
    # hidden_states has num_hidden_layers + 1 entries (index 0 is the embedding output); the features of
    # index i are the output of encoder layer i-1, so layers [0, i) are all that need to run.
    n_states = cfg.num_hidden_layers + 1
    if not -n_states <= feature_layer < n_states:
        raise MllmEdgeError(
            f"vision_feature_layer={feature_layer} is outside the tower's {cfg.num_hidden_layers} layers"
        )
    layers_used = feature_layer % n_states
    if layers_used == 0:
        raise UnsupportedModelError(
            "vision_feature_layer selects the embeddings: no encoder layer to take features from"
        )
    if cfg.image_size % cfg.patch_size:
        raise UnsupportedModelError(
            f"image size {cfg.image_size} is not a multiple of patch size {cfg.patch_size}"
        )
    return VisionSpec(
        arch=cfg.model_type,
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_heads=cfg.num_attention_heads,
        num_layers=layers_used,
        layer_norm_eps=cfg.layer_norm_eps,
        hidden_act=cfg.hidden_act,
    )


def _rope_parameters(cfg) -> dict:
    params = dict(getattr(cfg, "rope_parameters", None) or {})
    if not params:  # transformers < 5 spelling
        params = dict(getattr(cfg, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(cfg, "rope_theta", 10000.0))
    params.setdefault("rope_type", params.pop("type", "default"))
    if params["rope_type"] not in STATIC_ROPE_TYPES:
        raise UnsupportedModelError(
            f"RoPE type '{params['rope_type']}' depends on the sequence length at run time; "
            f"supported: {', '.join(STATIC_ROPE_TYPES)}"
        )
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise UnsupportedModelError("partial rotary embeddings are not supported")
    return params


def read_text_spec(cfg, **family) -> TextSpec:
    """The numbers of a language model's HF config that every family reads alike; the family gives
    its own rules (attention_bias, mlp_bias, o_proj_bias, sliding_window)."""
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return TextSpec(
        arch=cfg.model_type,
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_layers=cfg.num_hidden_layers,
        num_heads=cfg.num_attention_heads,
        num_kv_heads=cfg.num_key_value_heads or cfg.num_attention_heads,
        head_dim=head_dim,
        rms_norm_eps=cfg.rms_norm_eps,
        hidden_act=cfg.hidden_act,
        tie_word_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
        max_position_embeddings=cfg.max_position_embeddings,
        rope_parameters=_rope_parameters(cfg),
        **family,
    )


def text_spec(cfg) -> TextSpec:
    """A language model's spec, by its family (models/families)."""
    return text_family(cfg.model_type).spec(cfg)


def spec_from_hf_config(cfg) -> LlavaSpec:
    """Our spec from a transformers config (`LlavaConfig`, or any with the same fields), by its family."""
    return model_family(getattr(cfg, "model_type", None)).spec(cfg)


def load_llava_spec(model_dir: str | Path) -> LlavaSpec:
    """Read `config.json` of a local checkpoint folder into its family's spec."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise MllmEdgeError(f"no config.json in {model_dir}: not a Hugging Face checkpoint folder")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise MllmEdgeError(f"{path} is not valid JSON: {e}") from None
    try:
        family = model_family(raw.get("model_type"))
    except UnsupportedModelError as e:
        raise UnsupportedModelError(f"{path}: {e}, e.g. llava-hf/llava-1.5-7b-hf") from None
    import transformers
    from huggingface_hub.errors import StrictDataclassError  # transformers 5 checks fields' types with it

    try:
        cfg = getattr(transformers, family.config_class).from_pretrained(str(model_dir))
    except (ValueError, KeyError, TypeError, StrictDataclassError) as e:
        raise UnsupportedModelError(f"{path}: transformers cannot read this config: {e}") from None
    return family.spec(cfg)
