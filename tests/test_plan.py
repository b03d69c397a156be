"""`mllm-edge plan`: bytes and FLOPs against counts made here from known configs, the roofline's
wiring, the fits/doesn't-fit boundary, budgets, the devices' table, and bad input."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from mllm_edge.cli import app
from mllm_edge.planning import costs, devices
from mllm_edge.planning.plan import load_model
from mllm_edge.planning.predict import Setting, efficiency, predict

runner = CliRunner()

# LLaVA-1.5-7B's shapes: Vicuna-7B (Llama-2-7B) with LLaVA's vocabulary of 32064, CLIP ViT-L/14 at 336
# with features from the second-last of its 24 layers
TEXT_7B = dict(hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32, num_kv_heads=32)
VISION_L336 = dict(
    hidden_size=1024, intermediate_size=4096, num_layers=24, num_heads=16, image_size=336, patch_size=14
)


# LLaVA-1.6's (height, width) pinpoints: its largest, 672 x 672, is 2 x 2 tiles of 336
PINPOINTS_16 = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]


def config_7b(folder, next_pinpoints=None):
    """A LLaVA-1.5-7B-shaped config.json (LLaVA-1.6-7B's with pinpoints), no weights: what a user
    has before downloading."""
    transformers = pytest.importorskip(
        "transformers", reason="planning from a config reads it with transformers"
    )
    v, t = VISION_L336, TEXT_7B
    kind, extra = (
        (transformers.LlavaConfig, {})
        if next_pinpoints is None
        else (transformers.LlavaNextConfig, {"image_grid_pinpoints": next_pinpoints})
    )
    config = kind(
        vision_config=transformers.CLIPVisionConfig(
            hidden_size=v["hidden_size"],
            intermediate_size=v["intermediate_size"],
            num_hidden_layers=v["num_layers"],
            num_attention_heads=v["num_heads"],
            image_size=v["image_size"],
            patch_size=v["patch_size"],
        ),
        text_config=transformers.LlamaConfig(
            hidden_size=t["hidden_size"],
            intermediate_size=t["intermediate_size"],
            num_hidden_layers=t["num_layers"],
            num_attention_heads=t["num_heads"],
            num_key_value_heads=t["num_kv_heads"],
            vocab_size=32064,
            max_position_embeddings=4096,
        ),
        image_token_index=32000,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        **extra,
    )
    config.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def llava_7b_config(tmp_path_factory):
    return config_7b(tmp_path_factory.mktemp("llava7b"))


@pytest.fixture(scope="module")
def llava_next_7b_config(tmp_path_factory):
    return config_7b(tmp_path_factory.mktemp("llava-next-7b"), PINPOINTS_16)


def plan_json(*args) -> dict:
    result = runner.invoke(app, ["plan", *map(str, args), "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_the_7b_weights_kv_cache_and_image_tokens_are_the_published_counts(llava_7b_config):
    got = plan_json(llava_7b_config, "--device", "agx-orin-64gb", "--method", "none", "--precision", "fp16")
    (s,) = got["settings"]
    # the language model: 32 x (4 d^2 + 3 d m) + 65 norms of d + embedding and LM head of 32064 x d
    # = 6,738,939,904 parameters (Vicuna-7B's published 6.74 B)
    llm = 32 * (4 * 4096**2 + 3 * 4096 * 11008) + 65 * 4096 + 2 * 32064 * 4096
    assert llm == 6_738_939_904
    # the tower's 23 layers that run (q, k, v, o and the MLP with biases, two norms), the patch
    # convolution, 577 positions, [CLS], the pre-norm, and the projector 1024 -> 4096 -> 4096
    layer = 4 * 1024**2 + 4 * 1024 + 2 * 1024 * 4096 + 4096 + 1024 + 4 * 1024
    vision = (
        23 * layer + 3 * 14**2 * 1024 + 577 * 1024 + 1024 + 2 * 1024 + (1024 * 4096 + 4096 + 4096**2 + 4096)
    )
    assert s["memory_gb"]["weights"] == pytest.approx((llm + vision) * 2 / 1e9, abs=1e-3)
    # keys and values of 32 layers x 32 heads x 128 at 2048 positions in fp16
    assert s["memory_gb"]["kv_cache"] == pytest.approx(32 * 2 * 32 * 128 * 2048 * 2 / 1e9, abs=1e-3)
    assert s["image_tokens"] == {"vision": 576, "llm": 576} and got["max_context"] == 2048


def tower_flops(view_tokens: int) -> int:
    """CLIP-L/336's 23 running layers over one view's patches and [CLS], and its patch convolution."""
    tokens = view_tokens + 1
    layers = 23 * (2 * tokens * (4 * 1024**2 + 2 * 1024 * 4096) + 4 * tokens**2 * 1024)
    return 2 * view_tokens * 3 * 14**2 * 1024 + layers


def test_a_next_plan_is_sized_for_its_largest_picture(llava_7b_config, llava_next_7b_config):
    """LLaVA-1.6-7B from its config: the largest pinpoint (672 x 672) gives the base view and 4
    tiles, 576 + 48 rows x (48 + 1 newline) = 2928 image tokens; the default context holds them and
    1024 of text; the tower runs on every view; FasterVLM keeps round(576 (1 - R)) per view, FastV
    round(n (1 - R)) of the whole span; the weights are LLaVA-1.5's and the newline vector."""
    args = ("--device", "agx-orin-64gb", "--precision", "fp16", "--prompt-tokens", "40")
    one = plan_json(llava_7b_config, *args, "--method", "none")
    got = plan_json(llava_next_7b_config, *args, "--method", "none")
    assert got["image"] == {"views": 5, "tokens": 2928} and one["image"] == {"views": 1, "tokens": 576}
    assert got["max_context"] == 2928 + 1024
    (none,), (none_15,) = got["settings"], one["settings"]
    assert none["image_tokens"] == {"vision": 2928, "llm": 2928}
    assert none["memory_gb"]["weights"] == pytest.approx(none_15["memory_gb"]["weights"], abs=1e-3)
    nxt, llava = load_model(llava_next_7b_config).model, load_model(llava_7b_config).model
    assert costs.vision_params(nxt) == costs.vision_params(llava) + 4096
    assert none["memory_gb"]["kv_cache"] == pytest.approx(32 * 2 * 32 * 128 * 3952 * 2 / 1e9, abs=1e-3)

    device, eff = devices.DEVICES["agx-orin-64gb"], efficiency()
    peak = device.peak_flops("fp16") * eff["vision_compute"]

    def vision_ms(projected: int) -> float:
        flops = 5 * tower_flops(576) + 2 * projected * (1024 * 4096 + 4096**2)
        return 1000 * flops / peak + eff["vision_overhead_ms"]

    assert none["vision_ms"] == pytest.approx(vision_ms(5 * 576), rel=1e-4)  # every view's patches projected
    (fastervlm,) = plan_json(llava_next_7b_config, *args, "--method", "fastervlm", "--ratio", "0.9")[
        "settings"
    ]
    assert fastervlm["image_tokens"] == {"vision": 5 * 58, "llm": 5 * 58}
    assert fastervlm["vision_ms"] == pytest.approx(vision_ms(5 * 58), rel=1e-4)
    (fastv,) = plan_json(llava_next_7b_config, *args, "--method", "fastv", "--ratio", "0.5")["settings"]
    assert fastv["image_tokens"] == {"vision": 2928, "llm": 1464}
    assert fastv["vision_ms"] == none["vision_ms"] and fastv["prefill_ms"] < none["prefill_ms"]
    # a context too small for the unpruned span: the default grid plans what fits, and says what not
    small = plan_json(llava_next_7b_config, "--device", "agx-orin-64gb", "--max-context", "2048")
    assert {s["setting"]["method"] for s in small["settings"]} == {"fastervlm"}
    assert any(s.startswith("none R=0: the prompt (2992 tokens) does not fit") for s in small["skipped"])
    result = runner.invoke(
        app, ["plan", str(llava_next_7b_config), "--device", "thor", "--max-context", "200"]
    )
    assert result.exit_code == 1 and "no setting can be planned" in result.output, result.output


def test_the_unpad_merge_adds_a_newline_per_row_of_the_largest_pictures_grid(
    llava_7b_config, llava_next_7b_config
):
    """--merge unpad: the largest picture (672 x 672, a pinpoint's own shape, so nothing is unpadded)
    puts each view's kept patches and its 48 newline tokens into the LLM; the projector still runs
    on the 5 x 58 kept patches only; the spatial merge (the default) has no newline."""
    args = ("--device", "agx-orin-64gb", "--precision", "fp16", "--method", "fastervlm", "--ratio", "0.9")
    (spatial,) = plan_json(llava_next_7b_config, *args)["settings"]
    (unpad,) = plan_json(llava_next_7b_config, *args, "--merge", "unpad")["settings"]
    assert spatial["setting"]["merge"] == "spatial" and unpad["setting"]["merge"] == "unpad"
    assert spatial["image_tokens"] == {"vision": 5 * 58, "llm": 5 * 58}
    assert unpad["image_tokens"] == {"vision": 5 * 58 + 48, "llm": 5 * 58 + 48}
    assert unpad["vision_ms"] == spatial["vision_ms"] and unpad["prefill_ms"] > spatial["prefill_ms"]
    # at R = 0.99 (6 kept per view) the 1008 x 336 pinpoint puts in more: 4 views x 6 + 72 rows
    # against 672 x 672's 5 x 6 + 48; plan counts the most, as export sizes a bundle for it
    (high,) = plan_json(llava_next_7b_config, *args[:7], "0.99", "--merge", "unpad")["settings"]
    assert high["image_tokens"]["vision"] == 4 * 6 + 72
    (default,) = plan_json(llava_7b_config, *args)["settings"]  # one view: nothing to merge, none named
    assert "merge" not in default["setting"]
    for extra, message in [
        ((llava_next_7b_config, *args, "--merge", "stitch"), "unknown --merge 'stitch'"),
        ((llava_7b_config, *args, "--merge", "unpad"), "applies to LLaVA-NeXT's views"),
        (
            (llava_next_7b_config, "--device", "thor", "--method", "fastv", "--merge", "unpad"),
            "add --method fastervlm",
        ),
    ]:
        result = runner.invoke(app, ["plan", *map(str, extra)])
        assert result.exit_code == 1 and message in result.output, result.output


def test_the_cpus_int8_and_int4_are_matmulnbits_blocks_of_32_with_the_lm_head(llava_7b_config):
    """The onnxruntime target (export --quantize): every LLM matrix, the LM head too, in blocks of 32
    rows (a partial last block padded) with an fp32 scale per block; the embedding table, norms and
    the tower stay fp32. plan --device cpu predicts fp32, int8 and int4 side by side."""
    text = {**TEXT_7B, "head_dim": 128, "vocab_size": 32064, "tie_word_embeddings": False}
    model = costs.Model(text=text, vision={}, image_tokens=0, vision_has_cls=False)
    matrices = 4 * 4096**2 + 3 * 4096 * 11008  # q, k, v, o; gate, up, down: every K a multiple of 32
    for precision, bits in (("int8", 8), ("int4", 4)):
        got = costs.llm_bytes(model, precision, "fp32")
        norms = 32 * 2 * 4096 * 4 + 4096 * 4
        assert got["layers"] == 32 * (matrices * bits // 8 + matrices // 32 * 4) + norms
        assert got["lm_head"] == 32064 * 4096 * bits // 8 + 32064 * (4096 // 32) * 4
        assert got["embed"] == 32064 * 4096 * 4
    assert costs.weight_bytes(10, 33, "int4", "fp32", "onnxruntime") == 10 * 2 * (16 + 4)  # 33 rows: 2 blocks
    tied = costs.Model(
        text={**text, "tie_word_embeddings": True}, vision={}, image_tokens=0, vision_has_cls=False
    )
    assert (
        costs.llm_bytes(tied, "int8", "fp32")["lm_head"] == costs.llm_bytes(model, "int8", "fp32")["lm_head"]
    )
    assert costs.llm_bytes(tied, "fp32", "fp32")["lm_head"] == 0  # fp32: the head reads the table

    got = plan_json(llava_7b_config, "--device", "cpu", "--method", "none", "--max-context", "1024")
    by = {s["setting"]["precision"]: s for s in got["settings"]}
    assert set(by) == {"fp32", "int8", "int4"}
    w = {p: by[p]["memory_gb"]["weights"] for p in by}
    assert w["fp32"] > w["int8"] > w["int4"]
    assert w["fp32"] - w["int8"] == pytest.approx(
        (
            costs.llm_bytes(model, "fp32", "fp32")["layers"]
            - costs.llm_bytes(model, "int8", "fp32")["layers"]
            + 32064 * 4096 * 4
            - costs.llm_bytes(model, "int8", "fp32")["lm_head"]
        )
        / 1e9,
        abs=1e-3,
    )
    assert (
        by["int4"]["decode_tokens_per_s"]
        > by["int8"]["decode_tokens_per_s"]
        > by["fp32"]["decode_tokens_per_s"]
    )
    for args, message in [
        (("--device", "cpu", "--precision", "int4-awq"), "the CPU runs fp32, int8, int4"),
        (("--device", "thor", "--precision", "int4"), "int4 is the CPU's"),
    ]:
        result = runner.invoke(app, ["plan", str(llava_7b_config), *args])
        assert result.exit_code == 1 and message in result.output, result.output


def test_int4_awq_weights_are_half_a_byte_and_a_scale_per_128():
    text = {**TEXT_7B, "head_dim": 128, "vocab_size": 32064, "tie_word_embeddings": False}
    model = costs.Model(text=text, vision={}, image_tokens=0, vision_has_cls=False)
    fp16, int4 = costs.llm_bytes(model, "fp16", "fp16"), costs.llm_bytes(model, "int4-awq", "fp16")
    matrices = 4 * 4096**2 + 3 * 4096 * 11008
    scales = (
        (3 * 4096 // 128) * 4096 + (4096 // 128) * 4096 + 2 * (4096 // 128) * 11008 + (11008 // 128) * 4096
    )
    norms = 2 * 4096 * 2
    assert int4["layers"] == 32 * (matrices // 2 + scales * 2 + norms) + 4096 * 2
    assert fp16["layers"] == 32 * (matrices * 2 + norms) + 4096 * 2
    assert int4["embed"] == fp16["embed"] == int4["lm_head"] == 32064 * 4096 * 2  # left in fp16


def test_the_roofline_divides_the_counts_by_the_device_and_the_fitted_factors(llava_7b_config):
    """decode tokens/s = 1 / (bytes a step reads / (bandwidth x eta) + layers x c), the bytes
    counted here: every layer's weights, the final norm, the LM head, one embedding row, the cache."""
    eff = efficiency()
    got = plan_json(
        llava_7b_config,
        "--device",
        "agx-orin-64gb",
        "--method",
        "fastv",
        "--ratio",
        "0.5",
        "--precision",
        "int4-awq",
        "--prompt-tokens",
        "40",
    )
    (s,) = got["settings"]
    context = 40 + 576 + 64  # the prompt, then 64 generated tokens
    text = {**TEXT_7B, "head_dim": 128, "vocab_size": 32064, "tie_word_embeddings": False}
    model = costs.Model(text=text, vision={}, image_tokens=576, vision_has_cls=True)
    layers = costs.llm_bytes(model, "int4-awq", "fp16")["layers"]
    kv = 2 * 32 * 128 * 2 * (2 * context + 30 * (context - 288))  # layers from K=2 hold 288 fewer
    read = layers + 32064 * 4096 * 2 + 4096 * 2 + kv
    step = read / (204.8e9 * eff["bandwidth"]["int4-awq"]) + 32 * eff["layer_overhead_ms"] / 1000
    assert s["decode_tokens_per_s"] == pytest.approx(1 / step, rel=1e-3)
    assert s["ttft_ms"] == pytest.approx(s["vision_ms"] + s["prefill_ms"], abs=1e-2)


def test_fits_is_the_total_against_what_the_device_gives(llava_7b_config):
    """Far from the edge, whatever the assumed reserves: a 7B in fp16 (13.5 GB of weights alone)
    does not fit an 8 GB Orin Nano, in int4 with half the cache (about 4.5 + 0.5 GB) it does."""
    fp16 = plan_json(llava_7b_config, "--device", "orin-nano-8gb", "--precision", "fp16")
    int4 = plan_json(
        llava_7b_config, "--device", "orin-nano-8gb", "--precision", "int4-awq", "--max-context", "1024"
    )
    for got in (fp16, int4):
        for s in got["settings"]:
            m = s["memory_gb"]
            assert m["available"] == pytest.approx(8 - devices.JETSON_RESERVED_GB)
            assert m["total"] == pytest.approx(
                m["weights"] + m["kv_cache"] + m["activations"] + m["overhead"], abs=2e-3
            )
            assert s["fits"] == (m["total"] <= m["available"])
    assert fp16["settings"][0]["memory_gb"]["weights"] > 8 and not fp16["fits"] and fp16["chosen"] is None
    assert (
        int4["fits"] and int4["chosen"]["method"] == "none"
    )  # it fits unpruned: pruning does not shrink the cache
    result = runner.invoke(
        app,
        [
            "plan",
            str(llava_7b_config),
            "--device",
            "orin-nano-8gb",
            "--precision",
            "fp16",
            "--budget-ms",
            "1000",
        ],
    )
    assert result.exit_code == 1 and "nothing fits in memory" in result.output


def test_a_budget_takes_the_least_pruning_that_meets_it(llava_7b_config):
    everything = plan_json(llava_7b_config, "--device", "orin-nx-16gb", "--precision", "int4-awq")
    ttfts = [s["ttft_ms"] for s in everything["settings"]]
    budget = sorted(ttfts)[len(ttfts) // 2]
    got = plan_json(
        llava_7b_config, "--device", "orin-nx-16gb", "--precision", "int4-awq", "--budget-ms", budget
    )
    order = [s["setting"] for s in got["settings"]]
    chosen = order.index(got["chosen"])
    assert got["ttft_ms"] <= budget
    assert all(
        s["ttft_ms"] > budget or not s["fits"] for s in got["settings"][:chosen]
    )  # none less pruned meets it
    ratios = [s["ratio"] for s in order]
    assert ratios == sorted(ratios)  # least pruning first

    result = runner.invoke(
        app, ["plan", str(llava_7b_config), "--device", "orin-nx-16gb", "--budget-ms", "1"]
    )
    assert (
        result.exit_code == 1
        and "no setting meets the budget" in result.output
        and "fastest" in result.output
    )


def test_plan_works_from_a_bundle_and_on_this_machine(tmp_path):
    pytest.importorskip("onnx", reason="the bundle is exported with the export extra")
    from mllm_edge.default_model import checkpoint
    from mllm_edge.export.bundle import ExportConfig, export_bundle
    from mllm_edge.pruning import PruningConfig

    bundle = tmp_path / "fastv"
    export_bundle(
        ExportConfig(str(checkpoint()), bundle, PruningConfig.from_method("fastv", 0.5), verify=False)
    )
    got = plan_json(bundle, "--device", "thor")
    assert set(got) >= {
        "device",
        "fits",
        "memory_gb",
        "vision_ms",
        "prefill_ms",
        "ttft_ms",
        "decode_tokens_per_s",
        "settings",
    }
    assert set(got["memory_gb"]) >= {"weights", "kv_cache", "activations", "total", "available"}
    assert {s["setting"]["precision"] for s in got["settings"]} == {
        "fp16",
        "fp8",
        "int4-awq",
    }  # Thor: no INT8 figure
    assert got["skipped"] and "int8" in got["skipped"][0]
    here = plan_json(bundle, "--device", "cpu", "--method", "fastv", "--ratio", "0.5")
    assert [s["setting"]["precision"] for s in here["settings"]] == ["fp32", "int8", "int4"]
    assert all(s["decode_tokens_per_s"] > 0 for s in here["settings"])


def test_the_devices_table():
    result = runner.invoke(app, ["plan", "--list-devices", "--json"])
    assert result.exit_code == 0, result.output
    listed = {d["name"]: d for d in json.loads(result.stdout)}
    for name in (
        "orin-nano-4gb",
        "orin-nano-8gb",
        "orin-nx-8gb",
        "orin-nx-16gb",
        "agx-orin-32gb",
        "agx-orin-64gb",
        "thor",
    ):
        assert name in listed
    for d in listed.values():
        assert d["memory_gb"] > 0 and d["bandwidth_gb_s"] > 0 and d["fp16_tflops"] > 0 and d["source"]
        if d["sm"] == "8.7":  # Orin: tensor cores x 512 FLOP/clock; INT8 twice FP16, no FP8
            assert d["int8_tops"] == pytest.approx(2 * d["fp16_tflops"], rel=0.01) and d["fp8_tflops"] is None
    assert listed["agx-orin-64gb"]["int8_tops"] == pytest.approx(
        170 / 2, rel=0.01
    )  # NVIDIA: 170 sparse GPU TOPS
    assert listed["orin-nano-4gb"]["int8_tops"] == pytest.approx(10, rel=0.03)  # its data sheet: 10 dense
    cpu = devices.measure_cpu()
    assert cpu.bandwidth_gb_s > 0 and cpu.fp32_tflops > 0 and cpu.memory_gb > 0


def test_a_device_of_your_own(llava_7b_config):
    got = plan_json(
        llava_7b_config, "--bandwidth", "100", "--tflops", "20", "--memory", "16", "--method", "none"
    )
    assert got["device"] == "custom" and all(s["memory_gb"]["available"] == 15.5 for s in got["settings"])
    faster = plan_json(
        llava_7b_config,
        "--device",
        "orin-nx-16gb",
        "--bandwidth",
        "204.8",
        "--method",
        "none",
        "--precision",
        "int4-awq",
    )
    slower = plan_json(
        llava_7b_config, "--device", "orin-nx-16gb", "--method", "none", "--precision", "int4-awq"
    )
    assert (
        faster["decode_tokens_per_s"] > 1.5 * slower["decode_tokens_per_s"]
    )  # twice the bandwidth, less the overhead


@pytest.mark.parametrize(
    "args, message",
    [
        (["--device", "orin-nano-2gb"], "unknown --device 'orin-nano-2gb'"),
        (["--device", "agx-orin-64gb", "--precision", "fp8"], "has no FP8"),
        (["--device", "agx-orin-64gb", "--precision", "int3"], "unknown precision 'int3'"),
        (["--device", "agx-orin-64gb", "--budget-ms", "-5"], "--budget-ms must be positive"),
        (["--device", "agx-orin-64gb", "--budget-gb", "0"], "--budget-gb must be positive"),
        (["--device", "agx-orin-64gb", "--ratio", "0.5"], "--ratio needs --method"),
        (["--device", "agx-orin-64gb", "--method", "fastv", "--ratio", "1.5"], "ratio"),
        (["--device", "agx-orin-64gb", "--method", "fastv", "--k", "40"], "--k 40"),
        (["--bandwidth", "100"], "needs all of --bandwidth"),
        (["--device", "thor", "--max-context", "4097"], "more than 4096: the model's 4096 positions"),
        ([], "give --device"),
    ],
)
def test_bad_input_is_a_clear_error(llava_7b_config, args, message):
    result = runner.invoke(app, ["plan", str(llava_7b_config), *args])
    assert result.exit_code == 1 and message in result.output, result.output
    assert "Traceback" not in result.output


def test_a_config_plan_cannot_read_is_refused(tmp_path):
    pytest.importorskip("transformers", reason="planning from a config reads it with transformers")
    (tmp_path / "config.json").write_text(
        json.dumps({"model_type": "qwen2_vl", "architectures": ["Qwen2VLForConditionalGeneration"]})
    )
    result = runner.invoke(app, ["plan", str(tmp_path), "--device", "thor"])
    assert result.exit_code == 1 and "qwen2_vl" in result.output, result.output
    result = runner.invoke(app, ["plan", str(tmp_path / "nothing"), "--device", "thor"])
    assert result.exit_code == 1 and "does not exist" in result.output


def test_predict_refuses_a_prompt_beyond_the_context():
    text = {**TEXT_7B, "head_dim": 128, "vocab_size": 32064, "tie_word_embeddings": False}
    vision = {**VISION_L336, "num_layers": 23, "arch": "clip_vision_model"}
    model = costs.Model(text=text, vision=vision, image_tokens=576, vision_has_cls=True)
    with pytest.raises(Exception, match="does not fit the max context"):
        predict(model, devices.DEVICES["thor"], Setting("none", 0.0, "fp16"), max_context=512)
