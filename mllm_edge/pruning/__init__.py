"""FastV and FasterVLM, exactly as docs/methods.md defines them: shared by the models, export and tests."""

from .params import (
    METHODS,
    FasterVLMConfig,
    FastVConfig,
    PruningConfig,
    check_fastv_layer,
    check_ratio,
    keep_count,
    keep_table,
)

_SELECT = (
    "fastervlm_select",
    "fastv_select",
    "fastv_select_span",
    "gather_tokens",
    "top_k_in_order",
)  # torch: imported on use


def __getattr__(name: str):
    if name in _SELECT:
        from . import select

        return getattr(select, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "METHODS",
    "FastVConfig",
    "FasterVLMConfig",
    "PruningConfig",
    "check_fastv_layer",
    "check_ratio",
    "keep_count",
    "keep_table",
    "fastv_select",
    "fastv_select_span",
    "fastervlm_select",
    "gather_tokens",
    "top_k_in_order",
]
