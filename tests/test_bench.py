"""`mllm-edge bench`: its fields and units on the built-in model (no time is asserted), the bytes and
FLOPs it divides by counted independently from the config, what it runs, the plot, bad input."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

pytest.importorskip("onnxruntime", reason="bench runs bundles with the onnxruntime extra")
pytest.importorskip("onnx", reason="the bundles are exported with the export extra")

from mllm_edge.cli import app  # noqa: E402
from mllm_edge.manifest import load_manifest  # noqa: E402

runner = CliRunner()


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    from mllm_edge.default_model import checkpoint
    from mllm_edge.export.bundle import ExportConfig, export_bundle
    from mllm_edge.pruning import PruningConfig

    root = tmp_path_factory.mktemp("bench")
    made = {}
    for method, ratio in (("fastv", 0.5), ("fastervlm", 0.75)):
        made[method] = root / method
        export_bundle(
            ExportConfig(
                str(checkpoint()), made[method], PruningConfig.from_method(method, ratio), verify=False
            )
        )
    return made


def bench_json(*args) -> dict:
    result = runner.invoke(app, ["bench", *map(str, args), "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_bench_reports_every_figure_with_its_units(bundles):
    fastv = bundles["fastv"]
    got = bench_json(
        fastv, "--runs", "2", "--warmup", "1", "--prompt-lengths", "0,40", "--contexts", "64,700"
    )
    assert got["runs"] == 2 and got["warmup"] == 1
    (b,) = got["bundles"]
    assert (b["method"], b["dtype"], b["backend"], b["device"]) == ("fastv", "float32", "onnxruntime", "cpu")
    assert b["image_tokens"] == {"vision": 576, "llm": 576, "after_fastv": 288}

    def figure(f):
        assert 0 < f["min"] <= f["median"] <= f["max"], f

    figure(b["vision_ms"])
    assert [row["image_tokens"] for row in b["prefill"]] == [576, 576]
    own = b["prefill"][0]["text_tokens"]  # the chat prompt's own text: no shorter prompt exists
    assert own > 0 and b["prefill"][1]["text_tokens"] == max(40, own)
    text = load_manifest(fastv).architecture["text"]
    d, m, layers, k = text["hidden_size"], text["intermediate_size"], text["num_layers"], 2
    for row in b["prefill"]:
        figure(row["ms"])
        n_full, n_kept = row["text_tokens"] + 576, row["text_tokens"] + 288
        # 2 FLOPs per multiply-add: q, k, v, o (6 heads of 32 = d), gate, up, down; QK^T and AV over
        # the n x n square; the LM head on the last token
        c = lambda n: 2 * n * (4 * d * d + 3 * d * m) + 2 * 2 * n * n * d
        assert row["flops"] == k * c(n_full) + (layers - k) * c(n_kept) + 2 * text["vocab_size"] * d
        assert row["tflops_per_s"] == pytest.approx(row["flops"] / row["ms"]["median"] / 1e9)

    weights = sum((fastv / f).stat().st_size for f in ("llm_head.onnx.data", "llm_tail.onnx.data"))
    per_position = 2 * text["num_kv_heads"] * text["head_dim"] * 4  # K and V, fp32
    assert [(row["context"], row["image"]) for row in b["decode"]] == [(64, False), (700, True)]
    for row in b["decode"]:
        figure(row["ms_per_token"])
        pruned = 576 - 288 if row["image"] else 0  # FastV prunes the image span in layers >= K
        ctx = row["context"]
        assert row["bytes_per_step"] == weights + per_position * (k * ctx + (layers - k) * (ctx - pruned))
        assert row["tokens_per_s"] == pytest.approx(1000 / row["ms_per_token"]["median"])
        assert row["gb_per_s"] == pytest.approx(row["bytes_per_step"] / row["ms_per_token"]["median"] / 1e6)
    assert b["peak_host_mb"] > 0 and b["peak_device_mb"] is None


def test_bench_runs_the_steps_it_times_at_the_positions_it_names(bundles, monkeypatch):
    """Each timed or warm-up run: one prefill of the prompt, then --decode-tokens decode steps at
    the positions after it."""
    from mllm_edge import bench
    from mllm_edge.runtime.chain import Chain

    prefills, steps = [], []
    real_prefill, real_step = Chain.prefill, Chain.decode_step

    def prefill(self, ids, *args, **kwargs):
        prefills.append(ids.shape[1])
        return real_prefill(self, ids, *args, **kwargs)

    def decode_step(self, tokens, position):
        steps.append(position)
        return real_step(self, tokens, position)

    monkeypatch.setattr(Chain, "prefill", prefill)
    monkeypatch.setattr(Chain, "decode_step", decode_step)
    folder = str(bundles["fastervlm"])  # a folder's name as text, as Pipeline.load takes it
    result = bench.bench_bundle(folder, prompt_lengths=(), contexts=(300,), runs=2, warmup=1, decode_tokens=4)
    assert result.image_tokens["llm"] == 144  # FasterVLM R=0.75 keeps 144 of 576 before the LLM
    first = 300 - 2  # the middle of the 4 steps falls on the context
    assert prefills == [first] * 3
    assert steps == [first, first + 1, first + 2, first + 3] * 3


def test_bench_plots_two_bundles(bundles, tmp_path):
    out = tmp_path / "bench.png"
    got = bench_json(
        bundles["fastv"], bundles["fastervlm"], "--runs", "1", "--contexts", "800", "--plot", out
    )
    assert [b["method"] for b in got["bundles"]] == ["fastv", "fastervlm"]
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_prints_tables(bundles):
    result = runner.invoke(app, ["bench", str(bundles["fastv"]), "--runs", "1", "--contexts", "700"])
    assert result.exit_code == 0, result.output
    assert "decode: context" in result.output and "prefill: text tokens" in result.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["--contexts", "700,x"], "--contexts must be whole numbers"),
        (["--contexts", "5000"], "max context is 2048"),
        (["--prompt-lengths", "3000"], "max context is 2048"),
        (["--contexts", "4"], "shorter than a chat prompt"),
        (["--plot", "/no/such/folder/p.png"], "its folder does not exist"),
    ],
)
def test_bench_bad_input_is_a_clear_error(bundles, args, message):
    result = runner.invoke(app, ["bench", str(bundles["fastv"]), "--runs", "1", *args])
    assert result.exit_code == 1 and message in result.output, result.output
    assert "Traceback" not in result.output


def test_bench_of_a_missing_bundle_says_so(tmp_path):
    result = runner.invoke(app, ["bench", str(tmp_path / "nothing")])
    assert result.exit_code == 1 and "does not exist" in result.output, result.output
