"""Fit `mllm-edge plan`'s efficiency factors to NVIDIA's published Jetson measurements, and say how
well they predict devices and models left out of the fit.

Data: benchmarks/data/edge_llm_v0.9.0.csv, the batch-1, non-speculative rows of TensorRT Edge-LLM's
"Performance Benchmarks" page (docs 0.10.0, "v0.9.0 Results", JetPack 7.2; numbers as published),
and benchmarks/data/published_models.json, the architecture of each model in it (from the models'
config.json). Used: the dense Qwen3 and Qwen3-VL rows in INT4 AWQ (the only one of our precisions
the page measures on Orin); left out: mixture-of-experts and hybrid-attention models (Qwen3.5,
Nemotron), whose costs our counts do not describe, NVFP4 and GPTQ, and DGX Spark (no published
dense throughput).

Model (mllm_edge/planning/predict.py), each time in ms:
  decode   bytes a step reads / (bandwidth x eta_bw) + layers x c_decode
  prefill  max(FLOPs / (fp16 peak x eta_c), weight bytes / (bandwidth x eta_bw)) + layers x c_prefill
  vision   ViT FLOPs / (fp16 peak x eta_v) + c_vision
fitted by least squares on relative errors (decode and vision are linear in their unknowns; prefill
by a grid over eta_c). Validation: leave one device out (fit on the others, predict it) and leave
one model out. The decode context is not published: the prompt plus 64 tokens is assumed.

    .venv/bin/python benchmarks/plan_fit.py            # writes mllm_edge/planning/efficiency.json
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
from pathlib import Path

import numpy as np
from common import write_json  # this folder is sys.path[0] when run as a script

from mllm_edge.planning import costs
from mllm_edge.planning.devices import DEVICES

HERE = Path(__file__).parent
PLATFORMS = {  # the page's names -> ours; the Orin Nano and NX rows: see --super
    "Jetson AGX Thor": "thor",
    "Jetson AGX Orin 64GB": "agx-orin-64gb",
    "Jetson Orin NX 16GB": "orin-nx-16gb",
    "Jetson Orin Nano 8GB": "orin-nano-8gb",
}
DECODE_AFTER = 64  # generated tokens assumed before the measured decode's middle


def rows(models: dict) -> list[dict]:
    found = []
    with open(HERE / "data" / "edge_llm_v0.9.0.csv") as f:
        for r in csv.DictReader(f):
            name = r["model"].removesuffix("-Instruct").removesuffix("-Instruct-2507")
            if r["platform"] not in PLATFORMS or name not in models:
                continue
            if r["precision"].split(" / ")[0] != "INT4 AWQ" or not r["source_version"].endswith("runtime"):
                continue
            found.append({**r, "model_key": name, "device": PLATFORMS[r["platform"]]})
    return found


def quantities(row: dict, models: dict, super_mode: bool) -> dict:
    """The counts and the device figures each measured time is divided by."""
    spec = models[row["model_key"]]
    model = costs.Model(text=spec["text"], vision={}, image_tokens=0, vision_has_cls=False)
    name = row["device"] + (
        "-super" if super_mode and row["device"].startswith(("orin-nano", "orin-nx")) else ""
    )
    device = DEVICES[name]
    n = int(row["input_tokens"])
    llm = costs.llm_bytes(model, "int4-awq", "fp16")
    q = {
        "layers": spec["text"]["num_layers"],
        "bandwidth": device.bandwidth_gb_s * 1e9,
        "peak": device.fp16_tflops * 1e12,
        "decode_bytes": costs.decode_bytes(model, "int4-awq", "fp16", n + DECODE_AFTER, 0, 0),
        "prefill_flops": costs.prefill_flops(model, n, 0, 0, 0),
        "weight_bytes": llm["layers"] + (llm["lm_head"] or llm["embed"]),
    }
    if row["vit_ms"]:
        v = spec["vision"]
        patches = int(row["image_tokens"]) * v["spatial_merge_size"] ** 2
        merged = int(row["image_tokens"])
        h4 = v["hidden_size"] * v["spatial_merge_size"] ** 2
        q["vision_flops"] = (
            2 * patches * v["temporal_patch_size"] * 3 * v["patch_size"] ** 2 * v["hidden_size"]
            + v["depth"] * costs.encoder_layer_flops(patches, v["hidden_size"], v["intermediate_size"])
            + 2 * merged * (h4 * h4 + h4 * v["out_hidden_size"])
        )
    return q


def fit(data: list[tuple[dict, dict]]) -> dict:
    """data: (row, quantities) pairs -> the factors."""
    t = np.array([1000 / float(r["decode_tok_s"]) for r, _ in data])
    a = np.array([[q["decode_bytes"] / q["bandwidth"] * 1000, q["layers"]] for _, q in data])
    x, *_ = np.linalg.lstsq(a / t[:, None], np.ones(len(t)), rcond=None)
    eta_bw, c_decode = 1 / x[0], max(x[1], 0.0)

    tp = np.array([float(r["prefill_ms"]) for r, _ in data])
    best = None
    for eta_c in np.arange(0.02, 1.0001, 0.005):
        base = np.array(
            [
                max(q["prefill_flops"] / (q["peak"] * eta_c), q["weight_bytes"] / (q["bandwidth"] * eta_bw))
                * 1000
                for _, q in data
            ]
        )
        layers = np.array([q["layers"] for _, q in data])
        c = max(float(np.sum(layers * (tp - base) / tp**2) / np.sum((layers / tp) ** 2)), 0.0)
        error = float(np.sum(((base + layers * c - tp) / tp) ** 2))
        if best is None or error < best[0]:
            best = (error, float(eta_c), c)
    _, eta_c, c_prefill = best

    vit = [(r, q) for r, q in data if "vision_flops" in q]
    tv = np.array([float(r["vit_ms"]) for r, _ in vit])
    av = np.array([[q["vision_flops"] / q["peak"] * 1000, 1.0] for _, q in vit])
    xv, *_ = np.linalg.lstsq(av / tv[:, None], np.ones(len(tv)), rcond=None)
    return {
        "eta_bw": float(eta_bw),
        "c_decode_ms": float(c_decode),
        "eta_c": eta_c,
        "c_prefill_ms": c_prefill,
        "eta_v": float(1 / xv[0]),
        "c_vision_ms": float(max(xv[1], 0.0)),
    }


def predict(f: dict, q: dict) -> dict:
    out = {
        "decode_ms": q["decode_bytes"] / (q["bandwidth"] * f["eta_bw"]) * 1000
        + q["layers"] * f["c_decode_ms"],
        "prefill_ms": max(
            q["prefill_flops"] / (q["peak"] * f["eta_c"]), q["weight_bytes"] / (q["bandwidth"] * f["eta_bw"])
        )
        * 1000
        + q["layers"] * f["c_prefill_ms"],
    }
    if "vision_flops" in q:
        out["vit_ms"] = q["vision_flops"] / (q["peak"] * f["eta_v"]) * 1000 + f["c_vision_ms"]
    return out


def measured(row: dict) -> dict:
    got = {"decode_ms": 1000 / float(row["decode_tok_s"]), "prefill_ms": float(row["prefill_ms"])}
    if row["vit_ms"]:
        got["vit_ms"] = float(row["vit_ms"])
    return got


def errors(f: dict, data) -> list[dict]:
    out = []
    for r, q in data:
        p, m = predict(f, q), measured(r)
        out.append(
            {
                "device": r["device"],
                "model": r["model"],
                **{f"{k}_measured": round(m[k], 3) for k in m},
                **{f"{k}_predicted": round(p[k], 3) for k in m},
                **{f"{k}_error": round(p[k] / m[k] - 1, 4) for k in m},
            }
        )
    return out


def summary(errs: list[dict]) -> dict:
    out = {}
    for k in ("decode_ms", "prefill_ms", "vit_ms"):
        e = [abs(x[f"{k}_error"]) for x in errs if f"{k}_error" in x]
        if e:
            out[k] = {
                "median_abs": round(statistics.median(e), 4),
                "max_abs": round(max(e), 4),
                "rows": len(e),
            }
    return out


def held_out(data, key: str) -> list[dict]:
    """Each group (device or model) predicted by factors fitted on the others."""
    out = []
    for group in sorted({r[key] for r, _ in data}):
        train = [(r, q) for r, q in data if r[key] != group]
        test = [(r, q) for r, q in data if r[key] == group]
        if not any("vision_flops" in q for _, q in train):
            continue
        out += errors(fit(train), test)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", type=Path, default=HERE / "results" / "plan_fit.json")
    p.add_argument("--factors", type=Path, default=HERE.parent / "mllm_edge" / "planning" / "efficiency.json")
    args = p.parse_args()
    models = json.loads((HERE / "data" / "published_models.json").read_text())
    found = rows(models)
    results = {}
    for super_mode in (False, True):
        data = [(r, quantities(r, models, super_mode)) for r in found]
        factors = fit(data)
        results["super" if super_mode else "base"] = {
            "factors": factors,
            "in_fit": summary(errors(factors, data)),
            "device_left_out": summary(held_out(data, "device")),
            "model_left_out": summary(held_out(data, "model_key")),
            "rows": errors(factors, data),
        }
    # the clock the published Orin Nano and NX runs had is not stated: take the one that predicts
    # the left-out devices better
    score = lambda k: sum(v["median_abs"] for v in results[k]["device_left_out"].values())
    chosen = min(results, key=score)
    for name, r in results.items():
        print(
            f"Orin Nano/NX at {'Super' if name == 'super' else 'base'} clocks: factors {json.dumps({k: round(v, 4) for k, v in r['factors'].items()})}"
        )
        for part in ("in_fit", "device_left_out", "model_left_out"):
            print(
                f"  {part:16s} "
                + "; ".join(
                    f"{k} median {v['median_abs']:.1%} max {v['max_abs']:.1%} ({v['rows']})"
                    for k, v in r[part].items()
                )
            )
    print(f"chosen: {chosen} clocks")
    f = results[chosen]["factors"]
    factors = {
        "bandwidth": dict.fromkeys(("fp16", "int8", "fp8", "int4-awq"), round(f["eta_bw"], 4)),
        "compute": dict.fromkeys(("fp16", "int8", "fp8"), round(f["eta_c"], 4)),
        "vision_compute": round(f["eta_v"], 4),
        "layer_overhead_ms": round(f["c_decode_ms"], 5),
        "prefill_layer_overhead_ms": round(f["c_prefill_ms"], 5),
        "vision_overhead_ms": round(f["c_vision_ms"], 4),
        "fitted_on": f"TensorRT Edge-LLM v0.9.0 results, {len(found)} rows (INT4 AWQ, dense Qwen3 / Qwen3-VL), "
        f"Orin Nano/NX at {chosen} clocks; fp16/int8/fp8 take int4-awq's factors (no published rows): benchmarks/plan_fit.py",
        "errors": {k: results[chosen][k] for k in ("in_fit", "device_left_out", "model_left_out")},
    }
    kept = json.loads(args.factors.read_text()) if args.factors.exists() else {}
    args.factors.write_text(json.dumps({**kept, "gpu": factors}, indent=2) + "\n")  # the cpu's kept
    write_json(args.json, {"chosen": chosen, **results})
    print(f"wrote {args.factors} and {args.json}")


if __name__ == "__main__":
    main()
