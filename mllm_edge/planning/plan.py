"""`mllm-edge plan`: every setting of a model on a device, side by side, and the one to take.

The model comes from a bundle (its manifest) or a checkpoint folder's config.json (nothing else of
it is read: plan before downloading the weights). Settings: the pruning methods at the ratios a
user picks from (or the one given), times the precisions the device runs (or those given). The
one to take: the least pruning, then the most bits, that fits the device and meets the budgets.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..errors import MllmEdgeError
from ..pruning.params import MERGES
from . import costs
from .devices import Device
from .predict import Prediction, Setting, has_factors, predict

PRUNING_GRID = (
    [("none", 0.0)]
    + [("fastv", r) for r in (0.5, 0.75, 0.9)]
    + [("fastervlm", r) for r in (0.5, 0.75, 0.9, 0.95)]
)
PRECISION_ORDER = ("fp32", "fp16", "fp8", "int8", "int4-awq", "int4")  # most bits first
METHOD_ORDER = ("none", "fastv", "fastervlm")  # at one ratio, FastV keeps every token in its first layers


@dataclass
class Plan:
    source: str
    device: Device
    max_context: int
    prompt_tokens: int
    predictions: list[Prediction] = field(default_factory=list)
    chosen: Prediction | None = None
    skipped: list[str] = field(default_factory=list)  # precisions the device cannot be predicted in
    image: dict = field(default_factory=dict)  # views (tower runs) and unpruned tokens of the largest picture
    merge: str = "spatial"  # the FasterVLM settings' merge of LLaVA-NeXT's views

    def to_dict(self) -> dict:
        top = self.chosen.to_dict() if self.chosen else {}
        return {
            "device": self.device.name,
            "device_label": self.device.label,
            "source": self.source,
            "fits": bool(self.chosen and self.chosen.fits),
            "memory_gb": top.get("memory_gb"),
            "vision_ms": top.get("vision_ms"),
            "prefill_ms": top.get("prefill_ms"),
            "ttft_ms": top.get("ttft_ms"),
            "decode_tokens_per_s": top.get("decode_tokens_per_s"),
            "chosen": top.get("setting"),
            "max_context": self.max_context,
            "prompt_tokens": self.prompt_tokens,
            "image": self.image,
            "settings": [p.to_dict() for p in self.predictions],
            "skipped": self.skipped,
        }


@dataclass(frozen=True)
class Source:
    model: costs.Model
    max_context: int  # the bundle's, or what export would give the checkpoint
    limit: int  # the most a plan may take: the bundle's max context, or the model's (LlavaSpec.max_context)
    limit_why: str
    what: str
    merge: str = "spatial"  # a LLaVA-NeXT bundle's FasterVLM merge (export's --merge)


def load_model(source: Path) -> Source:
    """The model and its contexts, from a bundle's manifest or a checkpoint's config.json."""
    source = Path(source)
    if (source / "manifest.json").is_file():
        from ..manifest import load_manifest

        manifest = load_manifest(source, verify_files=False)
        return Source(
            costs.Model.from_architecture(manifest.architecture),
            manifest.max_context,
            manifest.max_context,
            "the bundle's max context (export again with a larger --max-context)",
            f"bundle {source}",
            manifest.merge,
        )
    if (source / "config.json").is_file():
        try:
            from ..models.config import load_llava_spec
        except ImportError as e:
            raise MllmEdgeError(
                f"planning from a config.json reads it with transformers ({e}): pip install 'mllm-edge[export]'"
            ) from None
        spec = load_llava_spec(source)
        t = spec.text
        return Source(
            costs.Model.from_architecture(spec.architecture()),
            spec.default_max_context,
            t.max_context,
            t.max_context_reason,
            f"checkpoint {source}",
        )
    if not source.exists():
        raise MllmEdgeError(
            f"{source} does not exist: give a bundle folder or a checkpoint folder with config.json"
        )
    raise MllmEdgeError(f"{source} holds neither a bundle's manifest.json nor a checkpoint's config.json")


def make_plan(
    source: Path,
    device: Device,
    precisions: list[str] | None = None,
    pruning: list[tuple[str, float]] | None = None,
    k: int = 2,
    max_context: int | None = None,
    prompt_tokens: int = 64,
    budget_ms: float | None = None,
    budget_gb: float | None = None,
    merge: str | None = None,
) -> Plan:
    """merge: LLaVA-NeXT's FasterVLM merge (pruning.MERGES) of the FasterVLM settings; default: the
    bundle's, or spatial (export's default)."""
    for value, what in ((budget_ms, "--budget-ms"), (budget_gb, "--budget-gb")):
        if value is not None and value <= 0:
            raise MllmEdgeError(f"{what} must be positive, got {value}")
    if prompt_tokens < 0:
        raise MllmEdgeError(f"--prompt-tokens must be >= 0, got {prompt_tokens}")
    loaded = load_model(source)
    model, context, what = loaded.model, loaded.max_context, loaded.what
    if merge is not None:  # given: checked; otherwise the bundle's own, for its FasterVLM settings
        if merge not in MERGES:
            raise MllmEdgeError(f"unknown --merge '{merge}' (choose from {', '.join(MERGES)})")
        if merge != "spatial" and model.views == 1:
            raise MllmEdgeError(f"--merge {merge} applies to LLaVA-NeXT's views; this model sees one view")
        if merge != "spatial" and pruning and not any(m == "fastervlm" for m, _ in pruning):
            raise MllmEdgeError("--merge sets how FasterVLM's kept tokens are merged: add --method fastervlm")
    merge = merge or loaded.merge
    if max_context is not None:
        if max_context < 1:
            raise MllmEdgeError(f"--max-context must be >= 1, got {max_context}")
        if max_context > loaded.limit:
            raise MllmEdgeError(
                f"--max-context {max_context} is more than {loaded.limit}: {loaded.limit_why}"
            )
        context = max_context
    if k < 1 or k >= model.text["num_layers"]:
        raise MllmEdgeError(f"--k {k} must be between 1 and {model.text['num_layers'] - 1}")
    chosen_precisions = list(precisions or [p for p in PRECISION_ORDER if device.min_sm_for(p) is None])
    skipped = []
    for p in chosen_precisions:
        if p not in PRECISION_ORDER:
            raise MllmEdgeError(f"unknown precision '{p}' (choose from {', '.join(device.precisions)})")
        why = device.min_sm_for(p)
        if why:
            raise MllmEdgeError(why)
    for p in list(chosen_precisions):
        if not device.can_predict(p):
            skipped.append(f"{p}: {device.label} has no published {p} throughput")
            chosen_precisions.remove(p)
        elif not has_factors(device, p):
            skipped.append(f"{p}: no efficiency factors fitted for {p} on a {device.kind} (efficiency.json)")
            chosen_precisions.remove(p)
    if not chosen_precisions:
        raise MllmEdgeError("; ".join(skipped))
    image = {"views": model.views, "tokens": model.image_tokens}
    plan = Plan(what, device, context, prompt_tokens, skipped=skipped, image=image, merge=merge)
    for method, ratio in pruning or PRUNING_GRID:
        try:
            for precision in chosen_precisions:
                plan.predictions.append(
                    predict(
                        model, device, Setting(method, ratio, precision, k, merge), context, prompt_tokens
                    )
                )
        except MllmEdgeError as e:  # of the default grid: a setting this model or context cannot take
            if pruning or not any(
                why in str(e) for why in ("keeps no image token", "does not fit the max context")
            ):
                raise
            plan.skipped.append(f"{method} R={ratio:g}: {e}")
    if not plan.predictions:
        raise MllmEdgeError("no setting can be planned: " + "; ".join(plan.skipped))
    plan.predictions.sort(key=_order)

    def meets(p: Prediction) -> bool:
        return (
            p.fits
            and (budget_ms is None or p.ttft_ms <= budget_ms)
            and (budget_gb is None or p.memory_gb["total"] <= budget_gb)
        )

    plan.chosen = next((p for p in plan.predictions if meets(p)), None)
    budgets = budget_ms is not None or budget_gb is not None
    if plan.chosen is None and budgets and not any(p.fits for p in plan.predictions):
        smallest = min(plan.predictions, key=lambda p: p.memory_gb["total"])
        raise MllmEdgeError(
            f"nothing fits in memory on {device.label}: the smallest is {_name(smallest)} "
            f"({smallest.memory_gb['total']:.2f} GB of {device.available_gb:.2f} GB; a smaller --max-context "
            "needs less cache)"
        )
    if plan.chosen is None and budgets:
        fastest = min(plan.predictions, key=lambda p: p.ttft_ms)
        smallest = min(plan.predictions, key=lambda p: p.memory_gb["total"])
        raise MllmEdgeError(
            f"no setting meets the budget on {device.label}: the fastest is {_name(fastest)} "
            f"({fastest.ttft_ms:.0f} ms to the first token), the smallest {_name(smallest)} "
            f"({smallest.memory_gb['total']:.2f} GB of {device.available_gb:.2f} GB)"
        )
    return plan


def _order(p: Prediction) -> tuple:
    s = p.setting
    return (s["ratio"], METHOD_ORDER.index(s["method"]), PRECISION_ORDER.index(s["precision"]))


def _name(p: Prediction) -> str:
    s = p.setting
    pruning = "no pruning" if s["method"] == "none" else f"{s['method']} R={s['ratio']:g}"
    return f"{pruning}, {s['precision']}"
