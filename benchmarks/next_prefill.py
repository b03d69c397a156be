"""LLaVA-NeXT prefill on the CPU at 5 views: what FasterVLM per view and FastV over the span save,
measured side by side against the FLOPs model.

A random LLaVA-NeXT with LLaVA-1.6's geometry (CLIP 336/14 tiles, its five pinpoints: 5 views and
2928 image tokens for a 672x672 picture) and the small LLM and tower of runtime_speed.py is written
with `make_tiny_llava` and exported (fp32, no verification; not timed) for none, FasterVLM (R=0.95:
29 patches per view, 145 in all, the paper's count) and FastV (K=2, R=0.75: 732 of the 2928 from
layer 2). Then one process loads the three bundles and, round after round, answers one question
about a 672x672 picture with each (one token: its prefill), after one warm-up each. Prefill is the
runtime's timings_ms["prefill"] (embed and the LLM graphs, after vision and pack); each figure is a
median of --repeats. Achieved speed-up t_none / t_method against the FastV paper's per-layer FLOPs
(pruning.flops.prefill_flops, text tokens = the prompt's). Target (issue 18, as for LLaVA-1.5):
achieved >= 85% of predicted. A fourth row runs the none bundle without ONNX Runtime's fused
attention (MLLM_EDGE_UNFUSED_ATTENTION=1: the graphs as TensorRT builds them), in the same rounds.

    .venv/bin/python benchmarks/next_prefill.py                  # ~10 minutes on 2 idle cores
    .venv/bin/python benchmarks/next_prefill.py --hidden 128 --intermediate 256 --layers 3 --heads 2 \\
        --kv-heads 2 --vision-hidden 64 --vision-intermediate 128 --vision-layers 2 --vision-heads 2 \\
        --repeats 1 --json /tmp/smoke.json                       # smoke run

Results go to benchmarks/results/next_prefill.json (--json). Needs the export extra and onnxruntime.
"""

from __future__ import annotations

import argparse
import os
import statistics
from pathlib import Path

from common import machine, work_dir, write_json  # this folder is sys.path[0] when run as a script
from runtime_speed import add_size_options, spec_sizes

PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))  # LLaVA-1.6's
PICTURE = (672, 672)  # (height, width): the largest span, 5 views
PROMPT = "Describe the picture in detail."
# the none bundle run through its graphs as TensorRT builds them, without ONNX Runtime's fused
# attention (docs/design.md): what the fusion gives at a long prompt, side by side
UNFUSED = "none, unfused attention"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--work", type=Path, help="checkpoint and bundles [default: a temp dir, deleted unless --keep]"
    )
    p.add_argument("--keep", action="store_true")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--fastervlm-ratio", type=float, default=0.95)
    p.add_argument("--fastv-k", type=int, default=2)
    p.add_argument("--fastv-ratio", type=float, default=0.75)
    p.add_argument("--init-range", type=float, default=0.02, help="initializer_range of the random weights")
    p.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "next_prefill.json")
    add_size_options(p)
    args = p.parse_args()

    from PIL import Image

    from mllm_edge.export.bundle import ExportConfig, export_bundle
    from mllm_edge.pruning import PruningConfig
    from mllm_edge.pruning.flops import prefill_flops
    from mllm_edge.runtime.pipeline import Pipeline
    from mllm_edge.testing.checkpoints import TinyLlavaSpec, make_tiny_llava

    settings = {
        "none": PruningConfig(),
        "fastervlm": PruningConfig.from_method("fastervlm", args.fastervlm_ratio),
        "fastv": PruningConfig.from_method("fastv", args.fastv_ratio, args.fastv_k),
    }
    load_start = os.getloadavg()
    with work_dir(args.work, args.keep, "next_prefill") as work:
        sizes = spec_sizes(args)
        spec = TinyLlavaSpec(
            name="next_bench",
            image_grid_pinpoints=PINPOINTS,
            max_position_embeddings=4096,
            initializer_range=args.init_range,
            **sizes,
        )
        checkpoint = work / "checkpoint"
        if not (checkpoint / "config.json").is_file():
            make_tiny_llava(checkpoint, spec)
        for name, pruning in settings.items():
            if not (work / name / "manifest.json").is_file():
                print(f"exporting {name}")
                export_bundle(ExportConfig(str(checkpoint), work / name, pruning, "fp32", verify=False))
        pipelines = {name: Pipeline.load(work / name) for name in settings}
        os.environ["MLLM_EDGE_UNFUSED_ATTENTION"] = "1"  # read when the sessions open
        pipelines[UNFUSED] = Pipeline.load(work / "none")
        del os.environ["MLLM_EDGE_UNFUSED_ATTENTION"]
        height, width = PICTURE
        image = Image.new("RGB", (width, height), (120, 160, 200))
        runs = {name: [] for name in pipelines}
        for round_ in range(1 + args.repeats):  # round 0: the warm-up
            for name, pipeline in pipelines.items():
                result = pipeline.generate(image, PROMPT, max_new_tokens=1)
                if round_:
                    runs[name].append(result)
            print(
                f"round {round_}: "
                + ", ".join(f"{n} {r[-1].timings_ms['prefill']:.0f} ms" for n, r in runs.items() if r)
            )

        manifest = pipelines["none"].manifest
        text = manifest.architecture["text"]
        image_tokens = manifest.pruning["image_tokens"]["vision"]
        prompt_tokens = len(runs["none"][0].prompt_token_ids)
        text_tokens = prompt_tokens - image_tokens
        rows, base = {}, None
        for name, results in runs.items():
            pruning = pipelines[name].manifest.pruning  # UNFUSED: none's, so predicted 1.0
            vision_keep = pruning["image_tokens"]["llm"]
            llm_keep = pruning["image_tokens"]["after_fastv"]
            flops = prefill_flops(
                text["num_layers"],
                text["hidden_size"],
                text["intermediate_size"],
                text_tokens,
                image_tokens,
                vision_keep,
                llm_keep,
                pruning["split_layer"],
            )
            prefill = statistics.median(r.timings_ms["prefill"] for r in results)
            base = base or prefill
            predicted = 1.0 / flops.ratio
            rows[name] = {
                "prefill_ms": round(prefill, 3),
                "prefill_ms_min_max": [
                    min(r.timings_ms["prefill"] for r in results),
                    max(r.timings_ms["prefill"] for r in results),
                ],
                "vision_ms": round(statistics.median(r.timings_ms["vision"] for r in results), 3),
                "image_tokens_entering": vision_keep,
                "image_tokens_after_fastv": llm_keep,
                "flops_per_layer": flops.pruned,
                "achieved": round(base / prefill, 3),
                "predicted": round(predicted, 3),
                "achieved_over_predicted": round(base / prefill / predicted, 3),
            }
        for pipeline in pipelines.values():
            pipeline.close()

    print(f"\n{image_tokens} image tokens (5 views), {text_tokens} text tokens, median of {args.repeats}")
    print(
        f"{'method':<24} {'prefill ms':>11} {'vision ms':>10} {'tokens in':>10} {'achieved':>9} {'predicted':>10} {'ratio':>6}"
    )
    for name, r in rows.items():
        print(
            f"{name:<24} {r['prefill_ms']:>11.1f} {r['vision_ms']:>10.1f} {r['image_tokens_after_fastv']:>10} "
            f"{r['achieved']:>8.2f}x {r['predicted']:>9.2f}x {r['achieved_over_predicted']:>6.2f}"
        )
    met = all(r["achieved_over_predicted"] >= 0.85 for name, r in rows.items() if name != UNFUSED)
    record = {
        "machine": {**machine(), "loadavg_1_5_15_start": load_start, "loadavg_1_5_15_end": os.getloadavg()},
        "settings": {**vars(args), "json": str(args.json), "work": str(args.work), "pinpoints": PINPOINTS},
        "picture": {"height": height, "width": width, "views": 5, "image_tokens": image_tokens},
        "prompt": PROMPT,
        "text_tokens": text_tokens,
        "prefill": rows,
        "targets_met": {"prefill achieved >= 85% predicted": met},
    }
    write_json(args.json, record)


if __name__ == "__main__":
    main()
