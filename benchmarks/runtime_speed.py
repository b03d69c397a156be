"""Runtime speed on the CPU: our ONNX Runtime pipeline against PyTorch, pruning speed-ups, overheads.

A random LLaVA-1.5-shaped model (CLIP 336/14 = 576 image tokens, a small vision tower, a ~85M
Llama by default) is written with `make_tiny_llava` and exported (fp32, no verification) as bundles
for method none, FastV (K=2, R=0.5) and FasterVLM (R=0.75); a second model, identical but for a
112/14 image grid (64 image tokens), gets a none bundle with max context 2048. None of that is timed.
Then, in one process, each figure is the median of --repeats runs after one warm-up, and what a
section compares runs side by side: every engine in turn, round after round, so that a slow spell of
the machine (seen here: 20% for minutes) falls on all of them alike:

1. TTFT and decode tokens/s, greedy, --max-new-tokens each: the runtime (its own timings_ms),
   transformers' LlavaForConditionalGeneration.generate (min_new_tokens = max_new_tokens) and our
   PyTorch reference mllm_edge.models.generate. transformers is timed as the runtime times itself,
   by a streamer stamping each token (TTFT: the first; decode: the mean step after it); the
   reference has no such hook, so its TTFT is the wall time of a generate of 1 token and its decode
   s/token is (t(N) - t(1)) / (N - 1), which prefill's run-to-run noise makes the least steady
   figure. Both PyTorch paths start from the processor's tensors, while the runtime's TTFT also
   includes its own preprocessing. Target: runtime decode
   tokens/s >= 2x transformers. Two more rows run the same model exported with `--quantize int8` and
   `--quantize int4` (weight-only LLM graphs, ONNX Runtime's MatMulNBits): other weights than
   transformers', so they are reported beside the target, not as meeting it.
2. Prefill (timings_ms["prefill"]: embed and LLM graphs, after the vision graph) per method; achieved
   speed-up t_none / t_method against the FastV paper's FLOPs model (pruning.flops.prefill_flops, text
   tokens = prompt length - 576). Target: achieved >= 85% of predicted.
3. Time outside the graphs during decode: every engine wrapped in a timing proxy; the decode wall time
   (first token to end) minus the graph calls after prefill. Target: < 5% of a decode step.
4. Decode ms/token at a context of ~100 and ~1500 tokens (the 64-image-token model, prompts padded with
   "red circle"), against the per-token FLOPs model 2P + 4·L·d·ctx (P: LLM parameters less the input
   embeddings, ctx: the mean context over the decode). Target: measured ratio <= predicted ratio.

Run it on an idle machine: with other processes on the cores, torch's thread pool slows down many
times over (the load average at the start and end goes into the JSON, and a warning is printed).

    .venv/bin/python benchmarks/runtime_speed.py                       # default sizes (about 8 minutes on 2 idle cores, measured)
    .venv/bin/python benchmarks/runtime_speed.py --hidden 128 --intermediate 256 --layers 2 --heads 2 \\
        --kv-heads 2 --vision-hidden 64 --vision-intermediate 128 --vision-layers 2 --vision-heads 2 \\
        --fastv-k 1 --max-new-tokens 4 --repeats 1 --json /tmp/smoke.json  # smoke run

Results go to benchmarks/results/runtime_speed.json (--json). Needs the export extra and onnxruntime.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import time
from pathlib import Path

from common import machine, work_dir, write_json  # this folder is sys.path[0] when run as a script

SIZES = {  # option -> (TinyLlavaSpec field, default)
    "image_size": ("image_size", 336),
    "patch_size": ("patch_size", 14),
    "vision_hidden": ("vision_hidden_size", 256),
    "vision_intermediate": ("vision_intermediate_size", 1024),
    "vision_layers": ("vision_layers", 4),
    "vision_heads": ("vision_heads", 4),
    "hidden": ("hidden_size", 768),
    "intermediate": ("intermediate_size", 2048),
    "layers": ("num_layers", 12),
    "heads": ("num_heads", 12),
    "kv_heads": ("num_kv_heads", 12),
}
PROMPT = "Describe the picture in detail."


def add_size_options(parser: argparse.ArgumentParser) -> None:
    """--hidden, --layers, ... : the random model's sizes (SIZES), for this script and decode_floor.py."""
    for opt, (_, default) in SIZES.items():
        parser.add_argument("--" + opt.replace("_", "-"), type=int, default=default)


def spec_sizes(args: argparse.Namespace) -> dict:
    """The size options as TinyLlavaSpec fields."""
    return {field: getattr(args, opt) for opt, (field, _) in SIZES.items()}


def med(values) -> float:
    return statistics.median(values)


class TimedEngine:
    """Same .run as the engine it wraps; appends (graph, seconds inside run) to a shared log."""

    def __init__(self, graph: str, engine, log: list):
        self.graph, self.engine, self.log = graph, engine, log

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def run(self, inputs, outputs=None):
        start = time.perf_counter()
        try:
            return self.engine.run(inputs, outputs)
        finally:
            self.log.append((self.graph, time.perf_counter() - start))


class RuntimeRun:
    """One bundle in our runtime: once() generates and returns that run's figures."""

    def __init__(self, bundle: Path, image, prompt: str, n: int, proxies: bool = False):
        from mllm_edge.runtime.pipeline import Pipeline

        self.pipeline, self.log = Pipeline.load(bundle), []
        self.image, self.prompt, self.n, self.proxies = image, prompt, n, proxies
        if proxies:
            self.pipeline.engines.update(
                {g: TimedEngine(g, e, self.log) for g, e in self.pipeline.engines.items()}
            )

    def once(self) -> dict:
        self.log.clear()
        r = self.pipeline.generate(self.image, self.prompt, max_new_tokens=self.n, temperature=0.0)
        steps = len(r.token_ids) - 1
        row = {
            **r.timings_ms,
            "tokens": len(r.token_ids),
            "prompt_tokens": len(r.prompt_token_ids),
            "token_ids": r.token_ids,
        }
        if self.proxies:  # decode = every graph call after prefill's (first) llm_tail
            first_tail = next(j for j, (g, _) in enumerate(self.log) if g == "llm_tail")
            in_graphs = sum(s for _, s in self.log[first_tail + 1 :]) * 1000
            row["decode_wall_ms"] = r.timings_ms["decode_per_token"] * steps
            row["outside_ms_per_step"] = (row["decode_wall_ms"] - in_graphs) / max(steps, 1)
        return row

    @staticmethod
    def summary(runs: list[dict]) -> dict:
        out = {k: round(med([r[k] for r in runs]), 3) for k in runs[0] if k != "token_ids"}
        out["decode_tokens_per_s"] = (
            round(1000 / out["decode_per_token"], 2) if out["decode_per_token"] else 0.0
        )
        out["token_ids"] = runs[-1]["token_ids"]
        return out


def side_by_side(runs: dict, repeats: int) -> dict[str, dict]:
    """Each run once as a warm-up, then `repeats` rounds taking every run in turn, so that a slow
    spell of the machine falls on all of them rather than on whichever ran then; the order rotates
    from round to round, so none always follows the same neighbour; medians."""
    for run in runs.values():
        run.once()
    rows, names = {name: [] for name in runs}, list(runs)
    for i in range(repeats):
        for name in names[i % len(names) :] + names[: i % len(names)]:
            rows[name].append(runs[name].once())
    return {name: run.summary(rows[name]) for name, run in runs.items()}


def bench_runtime(bundle: Path, image, prompt: str, n: int, repeats: int, proxies: bool = False) -> dict:
    result = side_by_side({"run": RuntimeRun(bundle, image, prompt, n, proxies)}, repeats)["run"]
    gc.collect()
    return result


class HfRun:
    """transformers' generate, timed by a streamer that stamps each new token: TTFT and decode per
    token by the runtime's own definitions (the first token; the mean step after it), so no
    difference of two noisy runs is needed."""

    def __init__(self, folder: Path, image, prompt: str, n: int, attn: str):
        import torch
        from transformers import LlavaForConditionalGeneration

        from mllm_edge.models.inputs import prepare_inputs

        self.ids, self.pixels, _ = prepare_inputs(folder, image, prompt)
        self.model = LlavaForConditionalGeneration.from_pretrained(
            folder, dtype=torch.float32, attn_implementation=attn
        ).eval()
        self.n, self.torch = n, torch

    def once(self) -> dict:
        stamps = []

        class Clock:  # transformers' streamer interface: put() gets the prompt once, then each new token
            def put(self, value):
                stamps.append(time.perf_counter())

            def end(self):
                pass

        start = time.perf_counter()
        with self.torch.inference_mode():
            out = self.model.generate(
                input_ids=self.ids,
                pixel_values=self.pixels,
                attention_mask=self.torch.ones_like(self.ids),
                max_new_tokens=self.n,
                min_new_tokens=self.n,
                do_sample=False,
                streamer=Clock(),
            )
        tokens = stamps[1:]
        return {
            "ttft": (tokens[0] - start) * 1000,
            "decode_per_token": (tokens[-1] - tokens[0]) * 1000 / (len(tokens) - 1),
            "token_ids": out[0, self.ids.shape[1] :].tolist(),
        }

    @staticmethod
    def summary(runs: list[dict]) -> dict:
        ttft, per_token = med([r["ttft"] for r in runs]), med([r["decode_per_token"] for r in runs])
        return {
            "ttft": round(ttft, 3),
            "decode_per_token": round(per_token, 3),
            "decode_tokens_per_s": round(1000 / per_token, 2),
            "tokens": len(runs[-1]["token_ids"]),
            "token_ids": runs[-1]["token_ids"],
        }


class ReferenceRun:
    """Our PyTorch reference (mllm_edge.models.generate.generate_steps, which yields each token as it
    is chosen), stamped per token like HfRun: TTFT the first token, decode the mean step after it."""

    def __init__(self, folder: Path, image, prompt: str, n: int):
        import torch

        from mllm_edge.models.inputs import prepare_inputs
        from mllm_edge.models.llava import load_llava

        self.ids, self.pixels, _ = prepare_inputs(folder, image, prompt)
        self.llava, self.n, self.torch = load_llava(folder).eval(), n, torch

    def once(self) -> dict:
        from mllm_edge.models.generate import generate_steps
        from mllm_edge.pruning import PruningConfig

        stamps, ids = [], []
        start = time.perf_counter()
        with self.torch.inference_mode():
            for token, _, _ in generate_steps(
                self.llava, self.ids, self.pixels, PruningConfig(), max_new_tokens=self.n
            ):
                ids.append(int(token[0]))
                stamps.append(time.perf_counter())
        return {
            "ttft": (stamps[0] - start) * 1000,
            "decode_per_token": (stamps[-1] - stamps[0]) * 1000 / (len(stamps) - 1),
            "token_ids": ids,
        }

    summary = staticmethod(HfRun.summary)


def llm_matmul_params(folder: Path) -> int:
    """Parameters a decode step multiplies by: the language model and LM head, less the input embeddings."""
    from math import prod

    from safetensors import safe_open

    total = 0
    for file in folder.glob("*.safetensors"):
        with safe_open(str(file), "pt") as f:
            total += sum(
                prod(f.get_slice(k).get_shape())
                for k in f.keys()
                if ("language_model" in k or "lm_head" in k) and "embed_tokens" not in k
            )
    return total


def padded_prompt(bundle: Path, target: int) -> str:
    """A prompt of "red circle" repeats whose rendered prompt takes about `target` tokens (image included)."""
    from mllm_edge.manifest import load_manifest
    from mllm_edge.runtime.prompt import PromptBuilder

    manifest = load_manifest(bundle)
    tok, images = manifest.tokenizer, manifest.pruning["image_tokens"]["vision"]
    prompts = PromptBuilder.from_folder(
        bundle / tok["folder"], tok["chat_template"], tok["image_token"], tok["image_token_id"], images
    )
    count = lambda text: len(prompts.encode(prompts.render(text)))  # noqa: E731
    base, per = count(""), (count("red circle " * 50) - count("")) / 50
    k = max(round((target - base) / per), 0)
    while k > 0 and count("red circle " * k) > target:
        k -= 1
    while count("red circle " * (k + 1)) <= target:
        k += 1
    return ("red circle " * k).strip() or "red"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--work",
        type=Path,
        help="checkpoints and bundles go here [default: a temp dir, deleted unless --keep]",
    )
    p.add_argument("--keep", action="store_true", help="keep --work (or the temp dir) afterwards")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=128,
        help="tokens per run: 32 proved too few for a steady per-token figure",
    )
    p.add_argument(
        "--attn", choices=["sdpa", "eager"], default="sdpa", help="transformers' attention implementation"
    )
    p.add_argument("--init-range", type=float, default=0.02, help="initializer_range of the random weights")
    p.add_argument("--fastv-k", type=int, default=2)
    p.add_argument("--fastv-ratio", type=float, default=0.5)
    p.add_argument("--fastervlm-ratio", type=float, default=0.75)
    p.add_argument("--ctx-image-size", type=int, default=112, help="image size of the context model (4.)")
    p.add_argument("--contexts", type=int, nargs=2, default=[100, 1500], metavar=("SHORT", "LONG"))
    p.add_argument("--max-context", type=int, default=2048, help="max context of the context model's bundle")
    p.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "runtime_speed.json")
    add_size_options(p)
    args = p.parse_args()
    if args.max_new_tokens < 2 or args.repeats < 1:
        p.error("--max-new-tokens must be >= 2 and --repeats >= 1")

    import torch

    from mllm_edge.export.bundle import ExportConfig, export_bundle
    from mllm_edge.pruning import PruningConfig
    from mllm_edge.pruning.flops import prefill_flops
    from mllm_edge.testing.checkpoints import TinyLlavaSpec, make_tiny_llava, sample_image

    sizes = spec_sizes(args)
    n, repeats = args.max_new_tokens, args.repeats
    with work_dir(args.work, args.keep, "runtime_speed") as work:
        print(f"building checkpoints and bundles in {work} (not timed) ...", flush=True)
        spec = TinyLlavaSpec(name="bench_speed", initializer_range=args.init_range, seed=0, **sizes)
        ctx_spec = TinyLlavaSpec(
            name="bench_ctx",
            initializer_range=args.init_range,
            seed=0,
            **{**sizes, "image_size": args.ctx_image_size},
        )
        folder, ctx_folder = (
            make_tiny_llava(work / "checkpoint", spec),
            make_tiny_llava(work / "checkpoint-ctx", ctx_spec),
        )
        methods = {
            "none": PruningConfig(),
            "fastv": PruningConfig.from_method("fastv", args.fastv_ratio, k=args.fastv_k),
            "fastervlm": PruningConfig.from_method("fastervlm", args.fastervlm_ratio),
        }
        bundles = {}
        for name, pruning in methods.items():
            bundles[name] = work / f"bundle-{name}"
            export_bundle(
                ExportConfig(str(folder), bundles[name], pruning, dtype="fp32", verify=False, force=True)
            )
        for weights in ("int8", "int4"):
            bundles[weights] = work / f"bundle-none-{weights}"
            from mllm_edge.calibration.calibrate import CalibrateConfig, calibrate_bundle

            calibrate_bundle(  # what `export --quantize` does: the float bundle, then MatMulNBits
                CalibrateConfig(
                    bundles["none"], weights, "onnxruntime", bundles[weights], verify=False, force=True
                )
            )
        ctx_bundle = work / "bundle-ctx"
        export_bundle(
            ExportConfig(
                str(ctx_folder),
                ctx_bundle,
                PruningConfig(),
                dtype="fp32",
                max_context=args.max_context,
                verify=False,
                force=True,
            )
        )
        gc.collect()
        load_start = os.getloadavg()
        if load_start[0] > 0.5:
            print(
                f"warning: load average {load_start[0]:.2f}: other processes compete for the CPU (torch suffers most)"
            )
        image = sample_image(640, 480, seed=0)
        P = llm_matmul_params(folder)
        print(
            f"LLM: {P / 1e6:.1f} M matmul parameters; {spec.num_image_tokens} image tokens; torch threads {torch.get_num_threads()}",
            flush=True,
        )

        # 1. runtime vs transformers vs our PyTorch reference
        print("1. runtime / transformers / reference ...", flush=True)
        speed = side_by_side(
            {
                "runtime (onnxruntime)": RuntimeRun(bundles["none"], image, PROMPT, n),
                f"transformers ({args.attn})": HfRun(folder, image, PROMPT, n, args.attn),
                "reference (mllm_edge.models)": ReferenceRun(folder, image, PROMPT, n),
                "runtime, int8 weights": RuntimeRun(bundles["int8"], image, PROMPT, n),
                "runtime, int4 weights": RuntimeRun(bundles["int4"], image, PROMPT, n),
            },
            repeats,
        )
        gc.collect()
        rt, hf = speed["runtime (onnxruntime)"], speed[f"transformers ({args.attn})"]
        decode_speedup = rt["decode_tokens_per_s"] / hf["decode_tokens_per_s"]
        quantized_speedup = {
            w: round(speed[f"runtime, {w} weights"]["decode_tokens_per_s"] / hf["decode_tokens_per_s"], 3)
            for w in ("int8", "int4")
        }

        # 2. prefill speed-ups against the FLOPs model
        print("2. prefill per method ...", flush=True)
        text_tokens = rt["prompt_tokens"] - spec.num_image_tokens
        # the three bundles side by side, in a run of their own (section 1's none figures are not reused)
        by_method = side_by_side(
            {name: RuntimeRun(bundles[name], image, PROMPT, n) for name in methods}, repeats
        )
        gc.collect()
        prefill = {}
        for name, pruning in methods.items():
            r = by_method[name]
            vision_keep, llm_keep = pruning.keep_counts(spec.num_image_tokens)
            flops = prefill_flops(
                args.layers,
                args.hidden,
                args.intermediate,
                text_tokens,
                spec.num_image_tokens,
                vision_keep,
                llm_keep,
                pruning.split_layer,
            )
            prefill[name] = {
                "prefill_ms": r["prefill"],
                "vision_ms": r["vision"],
                "ttft_ms": r["ttft"],
                "vision_keep": vision_keep,
                "llm_keep": llm_keep,
                "flops_per_layer": flops.pruned,
            }
        for row in prefill.values():
            row["achieved"] = round(prefill["none"]["prefill_ms"] / row["prefill_ms"], 3)
            row["predicted"] = round(prefill["none"]["flops_per_layer"] / row["flops_per_layer"], 3)
            row["achieved_over_predicted"] = round(row["achieved"] / row["predicted"], 3)

        # 3. time outside the graphs per decode step
        print("3. decode overhead outside the graphs ...", flush=True)
        overhead = bench_runtime(bundles["none"], image, PROMPT, n, repeats, proxies=True)
        overhead["outside_share"] = round(overhead["outside_ms_per_step"] / overhead["decode_per_token"], 4)

        # 4. decode step time at a short and a long context
        print("4. decode at two contexts ...", flush=True)
        context = {}
        at = side_by_side(
            {
                target: RuntimeRun(ctx_bundle, image, padded_prompt(ctx_bundle, target), n)
                for target in args.contexts
            },
            repeats,
        )
        for target in args.contexts:
            r = at[target]
            ctx = r["prompt_tokens"] + n / 2  # mean context over the decode steps
            context[target] = {
                "prompt_tokens": r["prompt_tokens"],
                "mean_context": ctx,
                "decode_ms_per_token": r["decode_per_token"],
                "tokens": r["tokens"],
                "flops_per_token": 2 * P + 4 * args.layers * args.hidden * ctx,
            }
        short, long_ = (context[t] for t in args.contexts)
        measured_ratio = long_["decode_ms_per_token"] / short["decode_ms_per_token"]
        predicted_ratio = long_["flops_per_token"] / short["flops_per_token"]

        # tables
        print(f"\n1. time to first token and decode speed ({n} new tokens, median of {repeats})")
        print(
            f"{'engine':<40} {'TTFT ms':>9} {'decode ms/tok':>14} {'tok/s':>8} {'tokens':>7}  same tokens as transformers"
        )
        for name, r in speed.items():
            print(
                f"{name:<40} {r['ttft']:>9.1f} {r['decode_per_token']:>14.2f} {r['decode_tokens_per_s']:>8.1f} {r['tokens']:>7}  {r['token_ids'] == hf['token_ids']}"
            )
        print(
            f"target: runtime decode tok/s >= 2x transformers: {decode_speedup:.2f}x, {'met' if decode_speedup >= 2 else 'NOT met'}"
        )
        print(
            f"with quantized weights (not the same weights): int8 {quantized_speedup['int8']:.2f}x, int4 {quantized_speedup['int4']:.2f}x transformers"
        )

        print(f"\n2. prefill speed-up (prompt {rt['prompt_tokens']} tokens, {text_tokens} text)")
        print(
            f"{'method':<10} {'kept vision/llm':>16} {'prefill ms':>11} {'achieved':>9} {'predicted':>10} {'ach/pred':>9}"
        )
        for name, r in prefill.items():
            print(
                f"{name:<10} {str(r['vision_keep']) + '/' + str(r['llm_keep']):>16} {r['prefill_ms']:>11.1f} {r['achieved']:>8.2f}x {r['predicted']:>9.2f}x {r['achieved_over_predicted']:>8.0%}"
            )
        prefill_ok = all(r["achieved_over_predicted"] >= 0.85 for r in prefill.values())
        print(f"target: achieved >= 85% of predicted: {'met' if prefill_ok else 'NOT met'}")

        print("\n3. decode step: inside and outside the graphs")
        o = overhead
        print(f"{'ms/step':>9} {'in graphs':>10} {'outside':>9} {'share':>7}")
        print(
            f"{o['decode_per_token']:>9.3f} {o['decode_per_token'] - o['outside_ms_per_step']:>10.3f} {o['outside_ms_per_step']:>9.3f} {o['outside_share']:>7.1%}"
        )
        print(f"target: outside < 5% of a step: {'met' if o['outside_share'] < 0.05 else 'NOT met'}")

        print(f"\n4. decode ms/token against context ({ctx_spec.num_image_tokens} image tokens)")
        print(f"{'target ctx':>10} {'prompt tokens':>14} {'decode ms/tok':>14} {'GFLOP/tok':>10}")
        for target, r in context.items():
            print(
                f"{target:>10} {r['prompt_tokens']:>14} {r['decode_ms_per_token']:>14.3f} {r['flops_per_token'] / 1e9:>10.3f}"
            )
        print(
            f"ratio long/short: measured {measured_ratio:.3f}, predicted {predicted_ratio:.3f}; "
            f"target measured <= predicted: {'met' if measured_ratio <= predicted_ratio else 'NOT met'}"
        )

        for r in [*speed.values(), overhead]:
            r.pop("token_ids", None)
        load = {
            "loadavg_1_5_15_start": [round(x, 2) for x in load_start],
            "loadavg_1_5_15_end": [round(x, 2) for x in os.getloadavg()],
        }
        record = {
            "machine": {**machine(), "torch_threads": torch.get_num_threads(), **load},
            "settings": {
                k: str(v) if isinstance(v, Path) else v
                for k, v in vars(args).items()
                if k not in ("work", "keep", "json")
            },
            "model": {
                **sizes,
                "vision_feature_layer": -2,
                "llm_matmul_params": P,
                "image_tokens": spec.num_image_tokens,
                "ctx_image_tokens": ctx_spec.num_image_tokens,
            },
            "prompt": PROMPT,
            "speed": speed,
            "decode_speedup_vs_transformers": round(decode_speedup, 3),
            "quantized_decode_speedup_vs_transformers": quantized_speedup,
            "prefill": prefill,
            "decode_overhead": overhead,
            "context": {
                "runs": context,
                "measured_ratio": round(measured_ratio, 3),
                "predicted_ratio": round(predicted_ratio, 3),
            },
            "targets_met": {
                "decode >= 2x transformers": decode_speedup >= 2,
                "prefill achieved >= 85% predicted": prefill_ok,
                "outside graphs < 5% of a step": o["outside_share"] < 0.05,
                "context ratio <= predicted": measured_ratio <= predicted_ratio,
            },
        }
        write_json(args.json, record)


if __name__ == "__main__":
    main()
