"""Multi-turn conversations: rendered as transformers renders them, answered as a fresh run of the
whole conversation answers, reusing the previous turn's vision output and cache.

What is checked: conversations (an image in the first or a later turn, text only, a system turn,
string or part content) render and tokenize as the checkpoint's HF processor does; on the built-in
model, without pruning, with FastV and with FasterVLM, each follow-up gives the greedy tokens and
kept sets of a fresh run of the whole conversation, never runs the vision graph again for the same
picture, and takes from the cache everything before the new turn (FastV: layers < K always, layers
>= K all of it when the kept image tokens are unchanged, else the text before the image); a call
that fails half-way never leaves the cache out of step; a new picture is encoded again and the
prefix before it reused; bad conversations are clear errors.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("onnxruntime", reason="the runtime needs the onnxruntime extra")

from mllm_edge.errors import MllmEdgeError  # noqa: E402
from mllm_edge.evaluate import synthetic_items  # noqa: E402
from mllm_edge.runtime.conversation import Conversation  # noqa: E402
from mllm_edge.runtime.pipeline import Pipeline  # noqa: E402
from mllm_edge.runtime.prompt import normalize_messages  # noqa: E402
from mllm_edge.testing.checkpoints import sample_image  # noqa: E402

TOKENS = 8


def _parts(text, image=False):
    return ([{"type": "image"}] if image else []) + [{"type": "text", "text": text}]


CONVERSATIONS = {
    "image first": [
        {"role": "user", "content": _parts("What colour is the circle?", image=True)},
        {"role": "assistant", "content": _parts("It is red.")},
        {"role": "user", "content": _parts("And the square?")},
    ],
    "image later, string content": [
        {"role": "user", "content": "Hello there."},
        {"role": "assistant", "content": "Hello! Show me a picture."},
        {"role": "user", "content": _parts("Here: where is the star?", image=True)},
    ],
    "text only, with a system turn": [
        {"role": "system", "content": "You answer in one word."},
        {"role": "user", "content": "Count to three."},
        {"role": "assistant", "content": _parts("one two three")},
        {"role": "user", "content": "Again?"},
    ],
}


@pytest.mark.parametrize("conversation", list(CONVERSATIONS))
def test_conversations_render_and_tokenize_as_the_hf_processor(tiny_checkpoint, conversation):
    from test_runtime_inputs import builder, hf_processor

    name, folder = tiny_checkpoint
    messages = CONVERSATIONS[conversation]
    processor = hf_processor(folder)
    ours = builder(name, folder)
    rendered = ours.render_messages(normalize_messages(messages, processor.image_token))
    assert rendered == processor.apply_chat_template(messages, add_generation_prompt=True)
    images = sum(isinstance(m["content"], list) and {"type": "image"} in m["content"] for m in messages)
    kwargs = {"images": [sample_image(64, 48, seed=1)]} if images else {}
    expected = processor(text=rendered, return_tensors="np", **kwargs)["input_ids"][0].tolist()
    assert ours.encode(rendered, images) == expected


@pytest.fixture(scope="module")
def built_in(tmp_path_factory):
    """The built-in model's bundles: unpruned, FastV K=2 R=0.5, FasterVLM R=0.75."""
    from mllm_edge.default_model import checkpoint
    from mllm_edge.export.bundle import ExportConfig, export_bundle
    from mllm_edge.pruning import PruningConfig

    root = tmp_path_factory.mktemp("conversation")
    bundles = {}
    for method, ratio in (("none", 0.0), ("fastv", 0.5), ("fastervlm", 0.75)):
        bundles[method] = root / method
        export_bundle(
            ExportConfig(
                str(checkpoint()), bundles[method], PruningConfig.from_method(method, ratio), verify=False
            )
        )
    return bundles


def item_image_run(pipeline, result) -> list[int]:
    """The image placeholders of a result's prompt ids that the LLM does not see (FasterVLM's pruned)."""
    token = pipeline.manifest.tokenizer["image_token_id"]
    placed = pipeline.manifest.pruning["image_tokens"]["llm"]
    return [t for t in result.prompt_token_ids if t == token][placed:]


def _watch(pipeline):
    """Graph calls and the Prefilled of each prefill (what the cache gave)."""
    seen = {"graphs": [], "prefilled": []}
    pipeline.observe(lambda graph, inputs, outputs: seen["graphs"].append(graph))
    prefill = pipeline.chain.prefill

    def watched(*args, **kwargs):
        seen["prefilled"].append(prefill(*args, **kwargs))
        return seen["prefilled"][-1]

    pipeline.chain.prefill = watched
    return seen


@pytest.mark.parametrize("method", ["none", "fastv", "fastervlm"])
def test_a_follow_up_equals_a_fresh_run_of_the_whole_conversation(built_in, method):
    items = synthetic_items(5, seed=3)
    follow_ups = [items[3].question, items[4].question]
    tail_reused = set()
    with (
        Pipeline.load(built_in[method], backend="onnxruntime") as pipeline,
        Pipeline.load(built_in[method], backend="onnxruntime") as fresh,
    ):
        seen, fresh_seen = _watch(pipeline), _watch(fresh)
        for item in items[:3]:
            chat = Conversation(pipeline)
            first = chat.ask(item.question, image=item.image, max_new_tokens=TOKENS)
            assert not first.vision_reused
            held = len(pipeline.chain.history.ids)  # the prompt and the answer as far as it was fed
            previous_kept = first.kept_image_tokens["llm"]
            for question in follow_ups:
                seen["graphs"].clear()
                got = chat.ask(question, max_new_tokens=TOKENS)
                want = fresh.chat(chat.messages[:-1], item.image, max_new_tokens=TOKENS, reuse=False)
                assert got.token_ids == want.token_ids and got.text == want.text
                assert got.kept_image_tokens == want.kept_image_tokens
                assert got.vision_reused and "vision" not in seen["graphs"]
                prefilled = seen["prefilled"][-1]
                # the logits too: the greedy tokens of this small model would hide an off-by-one
                np.testing.assert_allclose(prefilled.logits, fresh_seen["prefilled"][-1].logits, atol=1e-4)
                # everything before the new turn that tokenizes as it was fed
                assert prefilled.reused == got.cached_prompt_tokens >= held - 2 > 0
                if method == "fastv":  # the layers >= K reuse all when the kept tokens stayed, else
                    # only the text before the image
                    same = got.kept_image_tokens["llm"] == previous_kept
                    image_start = want.prompt_token_ids.index(pipeline.manifest.tokenizer["image_token_id"])
                    assert (
                        prefilled.reused_tail > image_start if same else prefilled.reused_tail == image_start
                    )
                    tail_reused.add(same)
                else:
                    assert prefilled.reused_tail == prefilled.reused
                previous_kept = got.kept_image_tokens["llm"]
                held = len(pipeline.chain.history.ids)
            # the same conversation again (a regenerated answer): the same last prompt token, so
            # FastV keeps the same image tokens and every layer reuses all but that token
            again = pipeline.chat(chat.messages[:-1], item.image, max_new_tokens=TOKENS)
            assert again.token_ids == want.token_ids and again.kept_image_tokens == want.kept_image_tokens
            prefilled = seen["prefilled"][-1]
            assert prefilled.reused == len(want.prompt_token_ids) - len(item_image_run(pipeline, want)) - 1
            image_start = want.prompt_token_ids.index(pipeline.manifest.tokenizer["image_token_id"])
            assert prefilled.reused_tail > image_start
            tail_reused.add(True)
    assert True in tail_reused


class FailOnce:
    """An engine that raises on its `at`-th call (1: the first), and otherwise runs as the one it wraps."""

    def __init__(self, engine, at: int):
        self.engine, self.at, self.calls = engine, at, 0

    def run(self, inputs, outputs=None):
        self.calls += 1
        if self.calls == self.at:
            raise MllmEdgeError("injected failure")
        return self.engine.run(inputs, outputs)

    def close(self):
        self.engine.close()


@pytest.mark.parametrize("method", ["none", "fastv"])
@pytest.mark.parametrize("failing", ["llm_tail", "embed"])
def test_a_failed_call_never_leaves_the_cache_out_of_step(built_in, method, failing):
    """A prefill (first call) or decode step (second call) that fails half-way, as an engine error
    or Ctrl-C would, or a cache swapped underneath: the next follow-up still equals a fresh run of
    its conversation, logits included."""
    from mllm_edge.runtime.cache import KVCache

    a, b = synthetic_items(2, seed=12)
    with (
        Pipeline.load(built_in[method], backend="onnxruntime") as pipeline,
        Pipeline.load(built_in[method], backend="onnxruntime") as fresh,
    ):
        seen, fresh_seen = _watch(pipeline), _watch(fresh)
        chat = Conversation(pipeline)
        chat.ask(a.question, image=a.image, max_new_tokens=TOKENS)
        for at in (1, 2):  # the other conversation's prefill, then its first decode step
            engine = pipeline.chain.engines[failing]
            pipeline.chain.engines[failing] = FailOnce(engine, at)
            other = [{"role": "user", "content": _parts(b.question, image=True)}]
            with pytest.raises(MllmEdgeError, match="injected"):
                pipeline.chat(other, b.image, max_new_tokens=TOKENS)
            pipeline.chain.engines[failing] = engine
            got = chat.ask(f"How many shapes, {at}?", max_new_tokens=TOKENS)
            want = fresh.chat(chat.messages[:-1], a.image, max_new_tokens=TOKENS, reuse=False)
            assert got.token_ids == want.token_ids
            np.testing.assert_allclose(
                seen["prefilled"][-1].logits, fresh_seen["prefilled"][-1].logits, atol=1e-4
            )
        pipeline.cache = KVCache(*pipeline.cache_shape)  # holds nothing: nothing is reused from it
        got = chat.ask("Where is it?", max_new_tokens=TOKENS)
        assert got.cached_prompt_tokens == 0
        assert (
            got.token_ids
            == fresh.chat(chat.messages[:-1], a.image, max_new_tokens=TOKENS, reuse=False).token_ids
        )


def test_text_turns_and_a_new_picture(built_in):
    """A text-only conversation never runs the vision graph (FastV prunes nothing); a conversation
    about another picture encodes it and reuses only the tokens before it; both as fresh runs."""
    a, b = synthetic_items(2, seed=9)
    for method in ("none", "fastv"):
        with (
            Pipeline.load(built_in[method], backend="onnxruntime") as pipeline,
            Pipeline.load(built_in[method], backend="onnxruntime") as fresh,
        ):
            seen = _watch(pipeline)
            text = [{"role": "user", "content": "Count the shapes."}]
            got = pipeline.chat(text, max_new_tokens=TOKENS)
            assert got.token_ids == fresh.chat(text, max_new_tokens=TOKENS, reuse=False).token_ids
            assert {"vision", "prune"}.isdisjoint(seen["graphs"])
            assert got.kept_image_tokens == {"vision": None, "llm": None}

            for item in (a, b):  # the second picture differs from the first
                turn = [{"role": "user", "content": _parts(item.question, image=True)}]
                seen["graphs"].clear()
                got = pipeline.chat(turn, item.image, max_new_tokens=TOKENS)
                want = fresh.chat(turn, item.image, max_new_tokens=TOKENS, reuse=False)
                assert got.token_ids == want.token_ids and not got.vision_reused
                assert "vision" in seen["graphs"]
                image_start = want.prompt_token_ids.index(pipeline.manifest.tokenizer["image_token_id"])
                assert 0 < got.cached_prompt_tokens <= image_start  # "USER: " before the picture


def test_single_questions_never_reuse(built_in):
    """generate/stream (run, eval, the benchmarks) answer from scratch each time."""
    item = synthetic_items(1, seed=4)[0]
    with Pipeline.load(built_in["none"], backend="onnxruntime") as pipeline:
        seen = _watch(pipeline)
        for _ in range(2):
            result = pipeline.generate(item.image, item.question, max_new_tokens=TOKENS)
            assert result.cached_prompt_tokens == 0 and not result.vision_reused
        assert seen["graphs"].count("vision") == 2


def test_bad_conversations_are_clear_errors(built_in):
    item = synthetic_items(1, seed=4)[0]
    two_images = [
        {"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "?"}]}
    ]
    cases = [
        ([], None, "non-empty list"),
        ([{"role": "robot", "content": "hi"}], None, "role"),
        ([{"role": "user", "content": 3}], None, "content must be text"),
        ([{"role": "user", "content": [{"type": "video"}]}], None, "type text or image"),
        ([{"role": "user", "content": [{"type": "text"}]}], None, "needs its text"),
        ([{"role": "user", "content": "look: <image>"}], None, "image token"),
        ([{"role": "assistant", "content": [{"type": "image"}]}], item.image, "only user messages"),
        (two_images, item.image, "2 images"),
        ([{"role": "user", "content": _parts("?", image=True)}], None, "no picture was given"),
        ([{"role": "user", "content": "?"}], item.image, "no message has an image part"),
    ]
    with Pipeline.load(built_in["none"], backend="onnxruntime") as pipeline:
        for messages, image, message in cases:
            with pytest.raises(MllmEdgeError, match=message):
                pipeline.chat(messages, image)
        chat = Conversation(pipeline)
        chat.ask(item.question, image=item.image, max_new_tokens=2)
        with pytest.raises(MllmEdgeError, match="already has its picture"):
            chat.ask("and this one?", image=item.image)
        chat.reset()
        assert chat.messages == [] and chat.image is None


def test_the_chat_command_talks_turn_after_turn(built_in, tmp_path):
    from typer.testing import CliRunner

    from mllm_edge.cli import app

    a, b = synthetic_items(2, seed=6)
    first, second = tmp_path / "a.png", tmp_path / "b.png"
    a.image.save(first)
    b.image.save(second)
    typed = [
        a.question,
        "How many shapes?",
        "/bogus",
        f"/image {tmp_path / 'missing.png'}",
        f"/image {second}",
    ]
    typed += [b.question, "/reset", "Count the shapes."]
    bundle = built_in["none"]
    result = CliRunner().invoke(
        app,
        ["chat", str(first), "--bundle", str(bundle), "--max-new-tokens", str(TOKENS)],
        input="\n".join(typed) + "\n",
    )
    assert result.exit_code == 0, result.output + result.stderr
    with Pipeline.load(bundle, backend="onnxruntime") as pipeline:
        expected, chat = [], Conversation(pipeline)
        expected.append(chat.ask(a.question, image=first, max_new_tokens=TOKENS).text)
        expected.append(chat.ask("How many shapes?", max_new_tokens=TOKENS).text)
        chat.reset()  # /image in a conversation that has its picture starts a new one
        expected.append(chat.ask(b.question, image=second, max_new_tokens=TOKENS).text)
        chat.reset()
        expected.append(chat.ask("Count the shapes.", max_new_tokens=TOKENS).text)
    assert result.stdout.splitlines() == expected
    err = result.stderr
    assert "prompt tokens from the cache, picture already encoded" in err  # the follow-up
    assert "unknown command /bogus" in err and "missing.png" in err and "Traceback" not in err
    assert "(a new conversation, about this picture)" in err and "(a new conversation)" in err


def test_stop_strings_cut_the_text_wherever_the_pieces_split():
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from mllm_edge.runtime.prompt import StopFilter

    @settings(max_examples=300, deadline=None)
    @given(
        st.text("abc ", max_size=30),
        st.lists(st.integers(0, 30), max_size=6),
        st.lists(st.text("abc", min_size=1, max_size=3), max_size=3),
    )
    def check(text, cuts, stops):
        bounds = sorted({0, len(text), *(c for c in cuts if c <= len(text))})
        pieces = [text[a:b] for a, b in zip(bounds, bounds[1:])]
        f, streamed = StopFilter(stops), ""
        for piece in pieces:
            out, stopped = f.push(piece)
            streamed += out
            if stopped:
                break
        else:
            streamed += f.flush()
        found = [text.find(s) for s in stops if s in text]
        assert streamed == f.text == (text[: min(found)] if found else text)
        assert f.stopped == bool(found)

    check()
