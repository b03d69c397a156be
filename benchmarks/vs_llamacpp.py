"""Our CPU path against llama.cpp's (llama-mtmd-cli), side by side on a LLaVA-1.5-shaped model.

The model: random weights in LLaVA-1.5's shape, a CLIP-L/336 tower (24 layers, 1024 wide, 576 image
tokens, features from layer -2) and a ~0.47B Llama (24 layers, 1024 wide, 16 heads, MLP 4096, vocab
32064 as llava-hf's), written by `make_tiny_llava` with a SentencePiece tokenizer (tokenizer.model, as
llava-hf ships, which llama.cpp's converter reads). Two choices make the two programs see the same
thing: the tokenizer has no dummy prefix (llama.cpp tokenizes the text after the image as a new
fragment and would put a "▁" before it where transformers does not) and the output embedding is
scaled x4 (a logit spread of ~2.6, so that fp32 rounding does not decide greedy ties). The picture is
336x336, so neither program resizes it.

llama.cpp gets the model through its own converters: convert_hf_to_gguf.py for the language model
(--outtype f32, f16, q8_0) and tools/mtmd/legacy-models/convert_image_encoder_to_gguf.py for the CLIP
tower and projector (its documented LLaVA-1.5 path; it always stores the patch convolution and the
projector's matrices in f16, even with --use-f32). Then, for each pair of rows, alternating run by run:

    mllm-edge run IMAGE -p Q -b BUNDLE --max-new-tokens N            (ONNX Runtime, its default threads)
    llama-mtmd-cli -m TEXT.gguf --mmproj MMPROJ.gguf --image IMAGE -p "<__media__>\\nQ" -n N --temp 0
                   -t THREADS -c CONTEXT --jinja --perf -lv 4       (its defaults otherwise: f16 KV cache)

each a fresh process, its files read into the page cache first: its own figures (vision, prefill,
TTFT, decode tokens/s; llama.cpp's from its perf lines: the image's encode, and its prompt eval as
the first token's, which spans the encode too), the wall time to the first answer byte on stdout
(start-up included) and to exit, and the peak RSS (os.wait4). Medians of --runs.

Same answers first: transformers' greedy tokens (fp32, in the build) are the reference; ours are read
from an untimed `run --json`, llama.cpp's answer bytes are matched against the reference tokens'
bytes, token by token.

Needs llama.cpp's source (--llama-cpp) with llama-mtmd-cli built (--mtmd-cli; see docs/performance.md, against llama.cpp),
and a Python with llama.cpp's converter requirements, transformers 4 (--converter-python: its legacy
CLIP converter does not run on transformers 5). Not run in CI.

    .venv/bin/python benchmarks/vs_llamacpp.py --llama-cpp ~/llama.cpp --converter-python ~/llama-venv/bin/python
    # about 35 minutes on 2 cores with --runs 5; --work DIR --keep, then --reuse, to time again only
    .venv/bin/python benchmarks/vs_llamacpp.py ... --layers 2 --vision-layers 2 --runs 1 --tokens 8 --json /tmp/smoke.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from common import machine, work_dir, write_json  # this folder is sys.path[0] when run as a script

SIZES = {  # option -> (TinyLlavaSpec field, default)
    "vision_layers": ("vision_layers", 24),
    "layers": ("num_layers", 24),
    "hidden": ("hidden_size", 1024),
    "intermediate": ("intermediate_size", 4096),
    "heads": ("num_heads", 16),
}
QUESTION = "What colour is the circle?"
LM_HEAD_SCALE = 4.0
# (row, our export options, llama.cpp's text outtype, its mmproj type); pruned rows run against llama.cpp's unpruned fp32
ROWS = [
    ("fp32", ["--dtype", "fp32"], "f32", "f32"),
    ("fp16", ["--dtype", "fp16"], "f16", "f16"),
    ("int8 / q8_0", ["--dtype", "fp32", "--quantize", "int8"], "q8_0", "f32"),
    (
        "fp32 FastV K=2 R=0.5",
        ["--dtype", "fp32", "--method", "fastv", "--k", "2", "--ratio", "0.5"],
        "f32",
        "f32",
    ),
    ("fp32 FasterVLM R=0.75", ["--dtype", "fp32", "--method", "fastervlm", "--ratio", "0.75"], "f32", "f32"),
    # the fp32 bundle with ONNX Runtime's fused attention turned off (its graphs, as TensorRT builds them)
    ("fp32 unfused attention", ["--dtype", "fp32"], "f32", "f32"),
]
ENV = {"fp32 unfused attention": {"MLLM_EDGE_UNFUSED_ATTENTION": "1"}}  # our process's, per row


def build(folder: Path, sizes: dict, tokens: int) -> dict:
    """The build child (--_build): the checkpoint, its CLIP tower and projector split out for llama.cpp's
    legacy converter (CLIPVisionModel's Hub layout), a 336x336 picture and transformers' greedy answer."""
    import torch
    from PIL import Image
    from safetensors.torch import load_file, save_file
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from mllm_edge.testing.checkpoints import TinyLlavaSpec, make_tiny_llava, sample_image

    checkpoint = folder / "checkpoint"
    spec = TinyLlavaSpec(
        name="vs_llamacpp",
        tokenizer="sentencepiece",
        vocab_size=32064,
        num_kv_heads=sizes["num_heads"],
        vision_hidden_size=1024,
        vision_intermediate_size=4096,
        vision_heads=16,
        image_size=336,
        patch_size=14,
        initializer_range=0.02,
        seed=0,
        **sizes,
    )
    make_tiny_llava(checkpoint, spec)
    weights = checkpoint / "model.safetensors"
    tensors = load_file(weights)
    head = [k for k in tensors if k.endswith("lm_head.weight")]
    assert len(head) == 1, head
    tensors[head[0]] = tensors[head[0]] * LM_HEAD_SCALE
    save_file(tensors, weights, metadata={"format": "pt"})
    params = sum(t.numel() for t in tensors.values())
    del tensors

    model = LlavaForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32).eval()
    clip = folder / "clip"
    model.model.vision_tower.config.save_pretrained(clip)
    # The feature layer as transformers' LLaVA config names it, which the converter reads from the
    # tower's config (its Granite / LLaVA-NeXT path). Without it the converter drops the last layer
    # and llama.cpp's graph drops one more: features one layer short (llama.cpp issue #25817).
    config = json.loads((clip / "config.json").read_text())
    config["vision_feature_layer"] = model.config.vision_feature_layer
    (clip / "config.json").write_text(json.dumps(config, indent=2))
    tower = {"vision_model." + k: v.contiguous() for k, v in model.model.vision_tower.state_dict().items()}
    save_file(tower, clip / "model.safetensors", metadata={"format": "pt"})
    projector = {
        f"multi_modal_projector.{k}": v for k, v in model.model.multi_modal_projector.state_dict().items()
    }
    torch.save(projector, folder / "llava.projector")

    picture = sample_image(seed=0).resize((336, 336))
    picture.save(folder / "picture.png")
    processor = AutoProcessor.from_pretrained(checkpoint)
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}],
        add_generation_prompt=True,
    )
    inputs = processor(
        images=Image.open(folder / "picture.png").convert("RGB"), text=prompt, return_tensors="pt"
    )
    with torch.no_grad():
        out = model.generate(
            **inputs,
            max_new_tokens=tokens,
            do_sample=False,
            output_scores=True,
            return_dict_in_generate=True,
        )
    answer = out.sequences[0, inputs.input_ids.shape[1] :].tolist()
    margins = [float(v[0] - v[1]) for v in (torch.topk(s[0], 2).values for s in out.scores)]
    return {"params": params, "prompt": prompt, "reference_tokens": answer, "reference_margins": margins}


def token_bytes(checkpoint: Path) -> dict[int, bytes]:
    """What llama.cpp prints for each token: the piece's bytes, '▁' as a space, <0xNN> as that byte."""
    vocab = json.loads((checkpoint / "tokenizer.json").read_text())["model"]["vocab"]
    out = {}
    for piece, i in vocab.items():
        m = re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", piece)
        out[i] = bytes([int(m.group(1), 16)]) if m else piece.replace("▁", " ").encode()
    return out


def matching_prefix(answer: bytes, reference: list[int], pieces: dict[int, bytes]) -> int:
    """How many of the reference tokens llama.cpp's answer starts with."""
    n, at = 0, 0
    for token in reference:
        piece = pieces[token]
        if answer[at : at + len(piece)] != piece:
            break
        n, at = n + 1, at + len(piece)
    return n


def warm(files: list[Path]) -> None:
    """Read files into the page cache: every run starts warm (this work folder is ~20 GB, so a
    bundle used once a round would otherwise be read from disk, one used often would not)."""
    for file in files:
        with open(file, "rb") as f:
            while f.read(1 << 24):
                pass


def timed(cmd: list[str], env: dict | None = None) -> dict:
    """Run cmd: wall time to its first non-blank stdout byte and to exit, peak RSS, stdout, stderr."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    out, err, first = [], [], []

    def read_stdout():
        for chunk in iter(lambda: os.read(proc.stdout.fileno(), 65536), b""):
            if not first and chunk.strip():
                first.append(time.perf_counter() - start)
            out.append(chunk)

    threads = [
        threading.Thread(target=read_stdout, daemon=True),
        threading.Thread(target=lambda: err.append(proc.stderr.read()), daemon=True),
    ]
    for t in threads:
        t.start()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    for t in threads:
        t.join(timeout=10)
    code = os.waitstatus_to_exitcode(status)
    stderr = b"".join(err).decode(errors="replace")
    if code != 0:
        sys.exit(f"{' '.join(cmd[:3])} ... failed with exit code {code}:\n{stderr[-3000:]}")
    return {
        "wall_s": wall,
        "first_byte_s": first[0] if first else None,
        "peak_rss_mb": usage.ru_maxrss / 1024,
        "stdout": b"".join(out),
        "stderr": stderr,
    }


OURS_LINE = re.compile(r"vision ([\d.]+) ms, prefill ([\d.]+) ms, ttft ([\d.]+) ms, decode ([\d.]+) tokens/s")


def run_ours(bundle: Path, picture: Path, tokens: int, env: dict) -> dict:
    warm([f for f in bundle.iterdir() if f.is_file()])
    got = timed(
        [sys.executable, "-m", "mllm_edge.cli", "run", str(picture), "-p", QUESTION, "-b", str(bundle)]
        + ["--max-new-tokens", str(tokens)],
        env={**os.environ, **env},
    )
    m = OURS_LINE.search(got["stderr"])
    if not m:
        sys.exit(f"no figures in mllm-edge run's output:\n{got['stderr'][-2000:]}")
    vision, prefill, ttft, tps = map(float, m.groups())
    return {
        "vision_ms": vision,
        "prefill_ms": prefill,
        "ttft_ms": ttft,
        "decode_tokens_per_s": tps,
        **{k: got[k] for k in ("wall_s", "first_byte_s", "peak_rss_mb")},
    }


def ours_tokens(bundle: Path, picture: Path, tokens: int, env: dict) -> list[int]:
    out = subprocess.run(
        [sys.executable, "-m", "mllm_edge.cli", "run", str(picture), "-p", QUESTION, "-b", str(bundle)]
        + ["--max-new-tokens", str(tokens), "--json"],
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, **env},
    )
    return json.loads(out.stdout)["token_ids"]


LLAMA_FIGURES = {
    "vision_ms": re.compile(r"mtmd batch encoding done in ([\d.]+) ms"),
    "prefill_ms": re.compile(r"prompt eval time =\s+([\d.]+) ms /\s+(\d+) tokens"),
    "decode": re.compile(r"\beval time =\s+([\d.]+) ms /\s+(\d+) runs"),
}


def run_llama(
    cli: Path,
    text: Path,
    mmproj: Path,
    picture: Path,
    tokens: int,
    threads: int,
    context: int,
    extra: list[str],
):
    cmd = [str(cli), "-m", str(text), "--mmproj", str(mmproj), "--image", str(picture)]
    cmd += ["-p", f"<__media__>\n{QUESTION}", "-n", str(tokens), "--temp", "0", "-t", str(threads)]
    cmd += [
        "-c",
        str(context),
        "--jinja",
        "--perf",
        "-lv",
        "4",
    ] + extra  # its perf lines print at verbosity 4
    warm([text, mmproj])
    got = timed(cmd)
    found = {k: p.search(got["stderr"]) for k, p in LLAMA_FIGURES.items()}
    if not all(found.values()):
        sys.exit(f"llama-mtmd-cli printed no perf figures:\n{got['stderr'][-3000:]}")
    vision = float(found["vision_ms"].group(1))
    # llama.cpp's prompt eval spans the image's encoding too: the first text chunk's decode is
    # queued, the encoder runs, and the clock stops at the sync after the image's embeddings and the
    # rest of the text went through the LLM (llama_context's perf counters; its log's timestamps agree).
    prompt_eval = float(found["prefill_ms"].group(1))
    decode_ms, runs = float(found["decode"].group(1)), int(found["decode"].group(2))
    return {
        "vision_ms": vision,
        "prefill_ms": prompt_eval - vision,
        "ttft_ms": prompt_eval,
        "decode_tokens_per_s": runs / decode_ms * 1000 if runs else None,
        "prompt_tokens": int(found["prefill_ms"].group(2)),
        "answer": got["stdout"].strip(b"\n"),
        **{k: got[k] for k in ("wall_s", "first_byte_s", "peak_rss_mb")},
    }


FIGURES = (
    "vision_ms",
    "prefill_ms",
    "ttft_ms",
    "decode_tokens_per_s",
    "first_byte_s",
    "wall_s",
    "peak_rss_mb",
)
TARGETS = {  # figure: (ours / llama.cpp, at most or at least)
    "ttft_ms": (0.8, "at most"),
    "decode_tokens_per_s": (1.0, "at least"),
    "peak_rss_mb": (1.3, "at most"),
    "first_byte_s": (1.5, "at most"),
}


def medians(runs: list[dict]) -> dict:
    return {k: round(statistics.median(r[k] for r in runs), 3) for k in FIGURES if runs[0].get(k) is not None}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--llama-cpp", type=Path, required=True, help="llama.cpp's source tree (its converters)")
    p.add_argument(
        "--mtmd-cli", type=Path, help="llama-mtmd-cli [default: LLAMA_CPP/build/bin/llama-mtmd-cli]"
    )
    p.add_argument(
        "--converter-python",
        type=Path,
        required=True,
        help="a Python with llama.cpp's converter requirements",
    )
    p.add_argument("--work", type=Path)
    p.add_argument("--keep", action="store_true")
    p.add_argument(
        "--reuse",
        action="store_true",
        help="keep what an earlier run left in --work (checkpoint, GGUFs, bundles)",
    )
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--tokens", type=int, default=32, help="answer tokens (greedy)")
    p.add_argument(
        "--threads", type=int, default=os.cpu_count(), help="llama.cpp's -t (ONNX Runtime uses every core)"
    )
    p.add_argument("--context", type=int, default=2048, help="both KV caches' size")
    p.add_argument(
        "--llama-args", default="", help="more llama-mtmd-cli options, e.g. '-nr' (no weight repacking)"
    )
    p.add_argument(
        "--rows", default=",".join(r[0] for r in ROWS), help="which rows, by name, comma-separated"
    )
    p.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "vs_llamacpp.json")
    for opt, (_, default) in SIZES.items():
        p.add_argument("--" + opt.replace("_", "-"), type=int, default=default)
    p.add_argument("--_build", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    sizes = {field: getattr(args, opt) for opt, (field, _) in SIZES.items()}
    if args._build:
        print(json.dumps(build(args._build, sizes, args.tokens)))
        return
    cli = args.mtmd_cli or args.llama_cpp / "build" / "bin" / "llama-mtmd-cli"
    if not cli.is_file():
        sys.exit(f"no llama-mtmd-cli at {cli}: build it (docs/performance.md) or give --mtmd-cli")
    rows = [r for r in ROWS if r[0] in args.rows.split(",")]
    convert_env = {**os.environ, "PYTHONPATH": str(args.llama_cpp / "gguf-py")}

    with work_dir(args.work, args.keep, "vs_llamacpp") as work:
        record = work / "built.json"
        if not (args.reuse and record.is_file()):
            print(f"building the checkpoint in {work} (not timed) ...", flush=True)
            built = subprocess.run(
                [sys.executable, __file__, "--llama-cpp", str(args.llama_cpp), "--converter-python", "-"]
                + ["--_build", str(work), "--tokens", str(args.tokens)]
                + [f"--{o.replace('_', '-')}={getattr(args, o)}" for o in SIZES],
                check=True,
                stdout=subprocess.PIPE,
                text=True,
            )
            record.write_text(built.stdout.strip().splitlines()[-1])
        reference = json.loads(record.read_text())
        checkpoint, picture = work / "checkpoint", work / "picture.png"
        pieces = token_bytes(checkpoint)

        ggufs = {}
        for outtype in sorted({r[2] for r in rows}):
            ggufs[outtype] = work / f"text-{outtype}.gguf"
            if args.reuse and ggufs[outtype].is_file():
                continue
            print(f"llama.cpp: converting the language model to {outtype} ...", flush=True)
            subprocess.run(
                [str(args.converter_python), str(args.llama_cpp / "convert_hf_to_gguf.py"), str(checkpoint)]
                + ["--outtype", outtype, "--outfile", str(ggufs[outtype])],
                check=True,
                env=convert_env,
                capture_output=True,
            )
        mmprojs = {}
        for kind in sorted({r[3] for r in rows}):
            out = work / f"mmproj-{kind}"
            if args.reuse and list(out.glob("mmproj-model-*.gguf")):
                (mmprojs[kind],) = out.glob("mmproj-model-*.gguf")
                continue
            print(f"llama.cpp: converting the CLIP tower and projector ({kind}) ...", flush=True)
            converted = subprocess.run(
                [
                    str(args.converter_python),
                    str(args.llama_cpp / "tools/mtmd/legacy-models/convert_image_encoder_to_gguf.py"),
                ]
                + ["-m", str(work / "clip"), "--llava-projector", str(work / "llava.projector")]
                + ["--output-dir", str(out), "--clip-model-is-vision"]
                + (["--use-f32"] if kind == "f32" else []),
                check=True,
                env=convert_env,
                capture_output=True,
                text=True,
            )
            if "newly initialized" in converted.stdout + converted.stderr:  # names it did not recognise
                sys.exit("llama.cpp's CLIP converter left weights at random:\n" + converted.stderr[-2000:])
            (mmprojs[kind],) = out.glob("mmproj-model-*.gguf")

        bundles = {}
        exported = {}  # export options -> bundle: rows that differ only in ENV share one
        for name, options, _, _ in rows:
            folder = work / ("bundle-" + re.sub(r"[^a-z0-9]+", "-", name.lower()))
            bundles[name] = exported.setdefault(tuple(options), folder)
            if bundles[name] != folder:
                continue  # an earlier row's
            if args.reuse and (folder / "manifest.json").is_file():
                continue
            print(f"exporting {name} ...", flush=True)
            subprocess.run(
                [sys.executable, "-m", "mllm_edge.cli", "export", "--model", str(checkpoint)]
                + ["--out", str(bundles[name]), "--max-context", str(args.context), "--no-verify", "--force"]
                + options,
                check=True,
                stdout=subprocess.DEVNULL,
            )

        answers = {
            name: ours_tokens(bundles[name], picture, args.tokens, ENV.get(name, {})) for name, *_ in rows
        }
        runs = {name: {"ours": [], "llama.cpp": []} for name, *_ in rows}
        llama_answers = {}
        for i in range(args.runs):
            for name, _, outtype, kind in rows:
                print(f"run {i + 1}/{args.runs}: {name} ...", flush=True)
                runs[name]["ours"].append(run_ours(bundles[name], picture, args.tokens, ENV.get(name, {})))
                theirs = run_llama(
                    cli,
                    ggufs[outtype],
                    mmprojs[kind],
                    picture,
                    args.tokens,
                    args.threads,
                    args.context,
                    args.llama_args.split(),
                )
                llama_answers[name] = theirs.pop("answer")
                runs[name]["llama.cpp"].append(theirs)

    table = []
    for name, _, outtype, kind in rows:
        ours, theirs = medians(runs[name]["ours"]), medians(runs[name]["llama.cpp"])
        ref = reference["reference_tokens"]
        mine = answers[name]
        row = {
            "row": name,
            "llama_cpp": f"text {outtype}, mmproj {kind}",
            "ours": ours,
            "llama.cpp": theirs,
            "ratio": {k: round(ours[k] / theirs[k], 3) for k in ours if k in theirs and theirs[k]},
            "answer_tokens_equal_to_transformers": {
                "ours": next(
                    (j for j, (a, b) in enumerate(zip(mine, ref)) if a != b), min(len(mine), len(ref))
                ),
                "llama.cpp": matching_prefix(llama_answers[name], ref, pieces),
                "of": len(ref),
            },
            "llama_cpp_prompt_tokens": runs[name]["llama.cpp"][0]["prompt_tokens"],
            "runs": runs[name],
        }
        row["targets"] = {
            k: {
                "ratio": row["ratio"].get(k),
                "target": f"{how} {bound}",
                "met": _met(row["ratio"].get(k), bound, how),
            }
            for k, (bound, how) in TARGETS.items()
        }
        table.append(row)

    print(
        f"\n{'row':24} {'':10} {'vision ms':>10} {'prefill ms':>10} {'TTFT ms':>9} {'tok/s':>7} {'1st byte s':>10} {'total s':>8} {'RSS MB':>8}"
    )
    for row in table:
        for who in ("ours", "llama.cpp", "ratio"):
            f = row[who]
            cells = [f.get(k) for k in FIGURES]
            print(
                f"{row['row'] if who == 'ours' else '':24} {who:10} "
                + " ".join(
                    f"{c:>{w}.{2 if who == 'ratio' else 1}f}" if c is not None else f"{'-':>{w}}"
                    for c, w in zip(cells, (10, 10, 9, 7, 10, 8, 8))
                )
            )
        eq = row["answer_tokens_equal_to_transformers"]
        print(
            f"{'':24} answers: ours {eq['ours']}/{eq['of']}, llama.cpp {eq['llama.cpp']}/{eq['of']} tokens equal to transformers'"
        )
    write_json(
        args.json,
        {
            "benchmark": "vs_llamacpp",
            "machine": machine(),
            "model": {
                "params": reference["params"],
                **sizes,
                "vision": f"CLIP-L/336 shape ({args.vision_layers} layers, 1024 wide)",
                "vocab": 32064,
            },
            "tokens": args.tokens,
            "llama_cpp": {"mtmd_cli": str(cli), "extra_args": args.llama_args.split()},
            "threads": {
                "llama.cpp": args.threads,
                "onnxruntime": "default (one per core)",
                "cores": os.cpu_count(),
            },
            "context": args.context,
            "runs": args.runs,
            "reference": reference,
            "rows": table,
        },
    )


def _met(ratio: float | None, bound: float, how: str) -> bool | None:
    if ratio is None:
        return None
    return ratio <= bound if how == "at most" else ratio >= bound


if __name__ == "__main__":
    main()
