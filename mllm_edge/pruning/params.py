"""Pruning settings and the rules every caller shares: keep counts and parameter checks (docs/methods.md)."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import MllmEdgeError

METHODS = ("none", "fastv", "fastervlm", "fastv+fastervlm")
# LLaVA-NeXT: how FasterVLM's kept tokens of the views go into the span (docs/methods.md): "spatial"
# (the official code's default: stitched raster order, no newlines), "unpad" (its spatial_unpad
# branch: the unpadded grid's kept tokens, a newline token after each row)
MERGES = ("spatial", "unpad")


def check_ratio(ratio: float, what: str = "ratio") -> float:
    """R is the fraction of visual tokens pruned: 0 <= R < 1."""
    if not isinstance(ratio, (int, float)) or not 0.0 <= ratio < 1.0:
        raise MllmEdgeError(f"{what} must be in [0, 1) (the fraction of image tokens pruned), got {ratio!r}")
    return float(ratio)


def keep_count(num_tokens: int, ratio: float) -> int:
    """Tokens kept out of `num_tokens`: Python's round of the exact product (576 at R=0.9 -> 58)."""
    check_ratio(ratio)
    keep = _rounded_keep(num_tokens, ratio)
    if keep < 1:
        raise MllmEdgeError(f"ratio {ratio} keeps no image token out of {num_tokens}; use a smaller ratio")
    return keep


def keep_table(max_span: int, ratio: float) -> list[int]:
    """keep_count(n, ratio) at index n for every span n <= max_span: what FastV keeps of an image
    span whose length varies (LLaVA-NeXT's prune graph looks its count up here). Spans too short to
    keep a token (no picture gives one) read 1."""
    check_ratio(ratio)
    return [0] + [max(1, _rounded_keep(n, ratio)) for n in range(1, max_span + 1)]


def _rounded_keep(num_tokens: int, ratio: float) -> int:
    return round(num_tokens * (1.0 - ratio))


def check_fastv_layer(k: int, num_layers: int) -> int:
    """FastV's K: layers [0, K) see every token, so 1 <= K < L (K = 0 would be random selection)."""
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k < num_layers:
        raise MllmEdgeError(
            f"FastV layer K must satisfy 1 <= K < {num_layers} (the model's layer count), got {k!r}"
        )
    return k


@dataclass(frozen=True)
class FastVConfig:
    ratio: float
    k: int = 2


@dataclass(frozen=True)
class FasterVLMConfig:
    ratio: float
    merge: str = "spatial"  # LLaVA-NeXT's (MERGES); a one-view model has nothing to merge


@dataclass(frozen=True)
class PruningConfig:
    """Which methods run and with what settings; both may run at once (FastV then ranks FasterVLM's survivors)."""

    fastv: FastVConfig | None = None
    fastervlm: FasterVLMConfig | None = None

    @classmethod
    def from_method(
        cls,
        method: str,
        ratio: float = 0.0,
        k: int = 2,
        vision_ratio: float | None = None,
        merge: str = "spatial",
    ) -> PruningConfig:
        """`--method`/`--ratio`/`--k` as the CLI takes them; `vision_ratio` sets FasterVLM's ratio when
        both run; `merge` how FasterVLM's tokens of LLaVA-NeXT's views go into the span."""
        if method not in METHODS:
            raise MllmEdgeError(f"unknown pruning method '{method}' (choose from {', '.join(METHODS)})")
        check_ratio(ratio)
        if method == "none" and ratio:
            raise MllmEdgeError(
                f"ratio {ratio} given without a pruning method: add --method fastv or fastervlm"
            )
        if vision_ratio is not None and method != "fastv+fastervlm":
            raise MllmEdgeError(
                "a vision ratio applies only when both methods run (--method fastv+fastervlm)"
            )
        if merge not in MERGES:
            raise MllmEdgeError(f"unknown merge '{merge}' (choose from {', '.join(MERGES)})")
        if merge != "spatial" and "fastervlm" not in method:
            raise MllmEdgeError("--merge sets how FasterVLM's kept tokens are merged: add --method fastervlm")
        fastv = FastVConfig(ratio, k) if "fastv" in method.split("+") else None
        fastervlm = None
        if "fastervlm" in method:
            fastervlm = FasterVLMConfig(
                check_ratio(ratio if vision_ratio is None else vision_ratio, "vision ratio"), merge
            )
        return cls(fastv, fastervlm)

    def validate(self, num_layers: int, vision_has_cls: bool = True, views: int = 1) -> None:
        """views: the most views a picture gives (LLaVA-NeXT's), where FasterVLM's merge applies."""
        if self.fastervlm is not None and self.fastervlm.merge not in MERGES:
            raise MllmEdgeError(f"unknown merge '{self.fastervlm.merge}' (choose from {', '.join(MERGES)})")
        if self.fastervlm is not None and self.fastervlm.merge != "spatial" and views == 1:
            raise MllmEdgeError(
                f"merge '{self.fastervlm.merge}' applies to LLaVA-NeXT's views; this model sees one view"
            )
        if self.fastv is not None:
            check_ratio(self.fastv.ratio)
            check_fastv_layer(self.fastv.k, num_layers)
        if self.fastervlm is not None:
            check_ratio(self.fastervlm.ratio)
            if not vision_has_cls:
                raise MllmEdgeError(
                    "FasterVLM ranks patches by [CLS] attention, and this vision tower has no [CLS] token"
                )

    @property
    def split_layer(self) -> int:
        """First layer of the group that sees only the kept tokens: FastV's K, or 0 without FastV."""
        return self.fastv.k if self.fastv else 0

    def keep_counts(
        self, num_image_tokens: int, views: tuple[int, int] | None = None, newlines: int = 0
    ) -> tuple[int, int]:
        """(tokens entering the LLM from the vision side, tokens FastV keeps inside the LLM) for a
        picture of `num_image_tokens`; views: (count, patches of each) where FasterVLM ranks each
        view on its own (LLaVA-NeXT: keep_count of each view's patches, per view), and newlines: the
        picture's newline tokens, which the unpad merge keeps (for a picture of a pinpoint's exact
        shape, whose kept patches all survive unpadding; the spatial merge has none)."""
        if not self.fastervlm:
            vision = num_image_tokens
        elif views is None:
            vision = keep_count(num_image_tokens, self.fastervlm.ratio)
        else:
            vision = views[0] * keep_count(views[1], self.fastervlm.ratio)
            vision += newlines if self.fastervlm.merge == "unpad" else 0
        llm = keep_count(vision, self.fastv.ratio) if self.fastv else vision
        return vision, llm
