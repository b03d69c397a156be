"""The built-in default model: its synthetic world, `mllm-edge eval`, and the shipped checkpoint itself."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from typer.testing import CliRunner

from mllm_edge.cli import app
from mllm_edge.default_model import CHECKPOINT
from mllm_edge.default_model.scenes import (
    COLOURS,
    MARGIN,
    NUMBERS,
    SHAPES,
    SIZE,
    dataset,
    make_scene,
    questions,
    sample,
    write_jsonl,
)
from mllm_edge.errors import MllmEdgeError
from mllm_edge.evaluate import (
    HELD_OUT_SEED,
    evaluate,
    load_jsonl,
    normalise,
    synthetic_items,
)

SHIPPED = (CHECKPOINT / "config.json").is_file()
runner = CliRunner()


def test_scenes_are_reproducible_and_the_held_out_set_is_new():
    a, b = dataset(0, 30), dataset(0, 30)
    assert [(s.items, q) for s, q in a] == [(s.items, q) for s, q in b]
    assert np.array_equal(np.asarray(a[3][0].render()), np.asarray(b[3][0].render()))
    train = {s.items for s, _ in dataset(0, 2000)}
    held_out = {s.items for s, _ in dataset(HELD_OUT_SEED, 200)}
    assert not train & held_out


def test_every_question_has_the_answer_the_picture_shows():
    rng = random.Random(5)
    for _ in range(60):
        scene = make_scene(rng)
        pixels = np.asarray(scene.render()).astype(int)
        assert (
            len({it.shape for it in scene.items})
            == len({it.colour for it in scene.items})
            == len(scene.items)
        )  # unambiguous
        for it in scene.items:  # the centre pixel is the item's colour: what the picture shows
            assert np.abs(pixels[it.y, it.x] - COLOURS[it.colour]).max() <= 1
        by_shape = {it.shape: it for it in scene.items}
        for q in questions(scene):
            words = q.text.rstrip("?").split()
            if q.kind == "colour":
                assert q.answer == by_shape[words[-1]].colour
            elif q.kind == "shape":
                assert q.answer == next(it.shape for it in scene.items if it.colour == words[-2])
            elif q.kind == "count":
                assert q.answer == NUMBERS[len(scene.items) - 1]
            elif q.kind == "exists":
                assert q.answer == ("yes" if words[-1] in by_shape else "no")
            elif q.kind == "horizontal":
                x = by_shape[words[2]].x
                assert abs(x - SIZE / 2) > 20 and q.answer == ("left" if x < SIZE / 2 else "right")
            else:
                y = by_shape[words[2]].y
                assert abs(y - SIZE / 2) > 20 and q.answer == ("top" if y < SIZE / 2 else "bottom")
    kinds = [sample(rng)[1].kind for _ in range(600)]
    assert {k: kinds.count(k) > 60 for k in set(kinds)} == {
        k: True for k in ("colour", "shape", "count", "exists", "horizontal", "vertical")
    }


def test_patch_labels_follow_the_geometry():
    from mllm_edge.default_model.scenes import OUTLINE
    from mllm_edge.default_model.train import (
        COVER,
        HEIGHTS,
        SIDES,
        patch_items,
        patch_labels,
    )

    scene = make_scene(random.Random(2))
    pixels, owner = np.asarray(scene.render()).astype(int), scene.item_map()
    for i, it in enumerate(scene.items):  # the label map is where the picture shows the item: fill or outline
        drawn = pixels[owner == i + 1]
        is_fill = np.abs(drawn - COLOURS[it.colour]).max(1) == 0
        is_outline = np.abs(drawn - OUTLINE).max(1) == 0
        assert (owner == i + 1).sum() > 500 and (is_fill | is_outline).all() and is_fill.mean() > 0.6
    items = patch_items(scene, 24)
    labels = patch_labels(scene, 24)
    colours, shapes = labels["colours"], labels["shapes"]
    for i, it in enumerate(scene.items):
        patch = (it.y // 14) * 24 + it.x // 14  # the patch under the item's centre
        assert items[patch] == i + 1
        assert colours[patch] == 1 + list(COLOURS).index(it.colour) and shapes[patch] == 1 + SHAPES.index(
            it.shape
        )
        side = "middle" if abs(it.x - SIZE / 2) <= MARGIN else "left" if it.x < SIZE / 2 else "right"
        height = "middle" if abs(it.y - SIZE / 2) <= MARGIN else "top" if it.y < SIZE / 2 else "bottom"
        assert SIDES[labels["sides"][patch] - 1] == side and HEIGHTS[labels["heights"][patch] - 1] == height
    for p in range(24 * 24):  # a patch is an item's exactly when that item covers at least COVER of it
        block = owner[(p // 24) * 14 : (p // 24 + 1) * 14, (p % 24) * 14 : (p % 24 + 1) * 14]
        share = max((block == i + 1).mean() for i in range(len(scene.items)))
        assert (items[p] > 0) == (share >= COVER)
        assert all((labels[name][p] > 0) == (items[p] > 0) for name in labels)


def test_the_scene_table_answers_every_question():
    """The seeing stage's table (train.scene_table) and the questions (scenes.questions) are computed
    separately; every question's answer must be readable from the table."""
    from mllm_edge.default_model.train import HEIGHTS, SIDES, TABLE_FIELDS, scene_table

    names = [name for name, _ in TABLE_FIELDS]
    rng = random.Random(11)
    for _ in range(50):
        scene = make_scene(rng)
        table = dict(zip(names, scene_table(scene)))
        for q in questions(scene):
            words = q.text.rstrip("?").split()
            if q.kind == "colour":
                read = list(COLOURS)[table[f"colour of the {words[-1]}"] - 1]
            elif q.kind == "shape":
                read = SHAPES[table[f"shape of the {words[-2]} thing"] - 1]
            elif q.kind == "count":
                read = NUMBERS[table["number of items"] - 1]
            elif q.kind == "exists":
                read = "yes" if table[f"colour of the {words[-1]}"] else "no"
            elif q.kind == "horizontal":
                read = SIDES[table[f"side of the {words[2]}"] - 1]
            else:
                read = HEIGHTS[table[f"height of the {words[2]}"] - 1]
            assert read == q.answer, (q, table)
        absent = set(SHAPES) - {it.shape for it in scene.items}
        assert all(table[f"colour of the {s}"] == 0 for s in absent)


def test_eval_reports_the_accuracy_of_its_answers(export_cache, tmp_path):
    folder, _ = export_cache("llama_mha", "fastv")  # 336 px / 14: the scenes' geometry
    jsonl = write_jsonl(dataset(HELD_OUT_SEED, 6), tmp_path / "data")
    result = runner.invoke(app, ["eval", "--bundle", str(folder), "--dataset", str(jsonl), "--json"])
    assert result.exit_code == 0, result.output + result.stderr
    report = json.loads(result.stdout)
    truth = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert [a["answer"] for a in report["answers"]] == [t["answer"] for t in truth] and report["items"] == 6
    recomputed = (
        sum(normalise(a["predicted"]) == normalise(t["answer"]) for a, t in zip(report["answers"], truth)) / 6
    )
    assert report["accuracy"] == recomputed
    assert (
        report["image_tokens_kept"] == 288 and report["image_tokens"] == 576 and report["mean_prefill_ms"] > 0
    )
    same = evaluate(folder, load_jsonl(jsonl), baseline=folder)
    assert same.agreement == 1.0 and same.accuracy == report["accuracy"]  # a bundle agrees with itself


def test_eval_bad_input_is_named(export_cache, tmp_path):
    folder, _ = export_cache("llama_mha", "none")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"image": "a.png", "question": "q?"}\n')
    cases = [
        (["--dataset", str(tmp_path / "missing.jsonl")], "missing.jsonl does not exist"),
        (["--dataset", str(bad)], "bad.jsonl:1: not a JSON object with image, question and answer"),
        (["--synthetic", "0"], "--synthetic must be >= 1"),
        (["--synthetic", "2", "--dataset", str(bad)], "not both"),
    ]
    for args, message in cases:
        result = runner.invoke(app, ["eval", "--bundle", str(folder), *args])
        assert result.exit_code == 1 and "Traceback" not in result.output + result.stderr
        assert message in result.stderr, (args, result.stderr)
    with pytest.raises(MllmEdgeError, match="holds no questions"):
        (tmp_path / "empty.jsonl").write_text("\n")
        load_jsonl(tmp_path / "empty.jsonl")


def test_synthetic_items_are_the_held_out_scenes():
    items = synthetic_items(5)
    expected = dataset(HELD_OUT_SEED, 5)
    assert [(i.question, i.answer) for i in items] == [(q.text, q.answer) for _, q in expected]


def blind_accuracy(items) -> float:
    """Exact match of the best answerer that never looks at the picture: for each question text, the
    answer most often right in the training stream (seed 0)."""
    from collections import Counter

    seen: dict[str, Counter] = {}
    for _, q in dataset(0, 4000):
        seen.setdefault(q.text, Counter())[q.answer] += 1
    return sum(seen.get(i.question, Counter({"": 1})).most_common(1)[0][0] == i.answer for i in items) / len(
        items
    )


@pytest.mark.skipif(not SHIPPED, reason="the built-in checkpoint is not in this checkout")
def test_the_shipped_model_exports_with_no_model_option_and_answers_held_out_scenes(tmp_path, monkeypatch):
    """The README's main job, offline: export with no --model (FastV K=2 R=0.5, as the README runs it),
    then answer held-out scenes: at least the 90% the built-in model is trained to reach, far above
    anything blind to the picture."""
    import os

    monkeypatch.chdir(tmp_path)
    assert os.environ.get("HF_HUB_OFFLINE") == "1"  # conftest: nothing may touch the network
    result = runner.invoke(app, ["export", "--method", "fastv", "--ratio", "0.5"])
    assert result.exit_code == 0, result.output + result.stderr
    assert (tmp_path / "bundle" / "manifest.json").is_file()
    items = synthetic_items(60)
    report = evaluate(tmp_path / "bundle", items)
    blind = blind_accuracy(items)
    assert blind < 0.5 and report.accuracy >= 0.9, (report.accuracy, blind, report.by_kind)
    assert report.by_kind["count"] >= 0.9, report.by_kind  # the number of items: read off the picture alone
    scene = tmp_path / "scene.png"
    make_scene(random.Random(HELD_OUT_SEED)).render().save(scene)
    run = runner.invoke(app, ["run", str(scene), "--prompt", "How many shapes are there?", "--json"])
    answer = NUMBERS[len(make_scene(random.Random(HELD_OUT_SEED)).items) - 1]
    assert run.exit_code == 0 and json.loads(run.stdout)["text"].strip() == answer


@pytest.mark.skipif(SHIPPED, reason="checks the message shown while the built-in checkpoint is absent")
def test_export_without_a_model_says_the_built_in_one_is_missing(tmp_path):
    result = runner.invoke(
        app, ["export", "--out", str(tmp_path / "b"), "--method", "fastv", "--ratio", "0.5"]
    )
    assert result.exit_code == 1 and "Traceback" not in result.output + result.stderr
    assert "the built-in model is missing" in result.stderr and not (tmp_path / "b").exists()


def test_shared_prefix_training_is_single_turn_training(tmp_path):
    """train.answer_loss runs each picture's prompt prefix once and continues every question about it
    from the KV cache; its loss must equal transformers' own loss over one plain sequence per question."""
    import torch
    from transformers import LlavaForConditionalGeneration

    from mllm_edge.default_model.train import Examples, answer_loss, picture_questions
    from mllm_edge.testing import FIXTURE_SPECS, make_tiny_llava

    folder = make_tiny_llava(tmp_path / "m", FIXTURE_SPECS["llama_mha"])  # 336 px / 14: the scenes' geometry
    model = LlavaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    examples = Examples(folder)
    rng = random.Random(3)
    items = [picture_questions(rng) for _ in range(2)]
    for scene, asked in items:  # every colour and shape question, one of each other kind
        kinds = [q.kind for q in asked]
        assert kinds.count("colour") == kinds.count("shape") == len(scene.items) and kinds.count("count") == 1
        assert {k: kinds.count(k) for k in set(kinds) - {"colour", "shape"}} == {
            k: 1 for k in set(kinds) - {"colour", "shape"}
        }
    with torch.no_grad():
        shared, _, word_loss, _ = answer_loss(model, examples.questions(items))
        rows, labels, pixels = [], [], []
        for scene, asked in items:
            for q in asked:
                prompt, answer = examples.ids(q.text, q.answer)
                rows.append(prompt + answer)
                labels.append([-100] * len(prompt) + answer)
                pixels.append(examples.preprocess(scene.render())[0])
        width = max(map(len, rows))
        ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
        lab = torch.tensor([lb + [-100] * (width - len(lb)) for lb in labels])
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
        out = model(
            input_ids=ids, attention_mask=mask, pixel_values=torch.from_numpy(np.stack(pixels)), labels=lab
        )
    assert shared.item() > 0.1 and abs(shared.item() - out.loss.item()) < 1e-4 * out.loss.item()
    # The word loss, from transformers' logits at each picture's image tokens (its first question's row).
    first_rows = [sum(len(asked) for _, asked in items[:i]) for i in range(len(items))]
    logp = out.logits[first_rows][:, ids[0] == examples.image_token_id].log_softmax(-1)  # [pictures, 576, V]
    named = [
        (logp[i, patch, word].item())
        for i, (scene, _) in enumerate(items)
        for patch, words in enumerate(examples.patch_words(scene))
        for word in words
        if word != -100
    ]
    assert len(named) > 100 and abs(word_loss.item() + np.mean(named)) < 1e-4 * word_loss.item()


def test_patch_words_name_the_covering_item(tmp_path):
    from mllm_edge.default_model.train import Examples, patch_items
    from mllm_edge.testing import FIXTURE_SPECS, make_tiny_llava

    examples = Examples(make_tiny_llava(tmp_path / "m", FIXTURE_SPECS["llama_mha"]))
    rng = random.Random(4)
    for _ in range(5):
        scene = make_scene(rng)
        words, owner = examples.patch_words(scene), patch_items(scene, 24)
        assert (words[owner == 0] == -100).all()
        for i, it in enumerate(scene.items):
            side = "" if abs(it.x - SIZE / 2) <= MARGIN else "left" if it.x < SIZE / 2 else "right"
            height = "" if abs(it.y - SIZE / 2) <= MARGIN else "top" if it.y < SIZE / 2 else "bottom"
            for row in words[owner == i + 1]:  # each word's first token starts the word (blue: "blu" "e")
                said = ["" if t == -100 else examples.prompts.decode([int(t)]).strip() for t in row]
                expected = [it.colour, it.shape, side, height]
                assert all(e.startswith(w) and (w != "") == (e != "") for w, e in zip(said, expected)), (
                    said,
                    expected,
                )


def test_shortened_pictures_keep_the_items_and_train_as_transformers_would(tmp_path):
    """Training on pictures shortened to some patches (train.kept_patches) equals transformers' loss on
    one sequence per question holding only those patches' image tokens, the text right after them."""
    import torch
    from transformers import LlavaForConditionalGeneration

    from mllm_edge.default_model.train import (
        Examples,
        answer_loss,
        kept_patches,
        patch_items,
        picture_questions,
    )
    from mllm_edge.testing import FIXTURE_SPECS, make_tiny_llava

    rng = random.Random(5)
    for keep in (288, 58, 20):
        scene = make_scene(rng)
        kept, owner = kept_patches(rng, scene, keep), patch_items(scene, 24)
        assert len(kept) == keep and (np.diff(kept) > 0).all() and kept.max() < 576
        items = np.flatnonzero(owner > 0)
        assert set(items) <= set(kept) if len(items) <= keep else (owner[kept] > 0).all()

    folder = make_tiny_llava(tmp_path / "m", FIXTURE_SPECS["llama_mha"])
    model = LlavaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    examples = Examples(folder)
    items = [picture_questions(rng) for _ in range(2)]
    kept = [kept_patches(rng, scene, 100) for scene, _ in items]
    with torch.no_grad():
        shortened, _, _, _ = answer_loss(model, examples.questions(items, kept))
        total, count = 0.0, 0
        for (scene, asked), k in zip(items, kept):
            pixels = torch.from_numpy(examples.preprocess(scene.render()))
            features = model.model.vision_tower(pixels, output_hidden_states=True).hidden_states[
                model.config.vision_feature_layer
            ][:, 1:]
            image = model.model.multi_modal_projector(features[:, torch.from_numpy(k)])  # [1, 100, C]
            for q in asked:
                prompt, answer = examples.ids(q.text, q.answer)
                first = prompt.index(examples.image_token_id)
                ids = torch.tensor(
                    [prompt[:first] + prompt[first + 576 - 100 :] + answer]
                )  # 100 image tokens
                embeds = model.get_input_embeddings()(ids.clamp(max=model.config.text_config.vocab_size - 1))
                embeds = embeds.masked_scatter((ids == examples.image_token_id)[..., None], image)
                labels = torch.tensor([[-100] * (ids.shape[1] - len(answer)) + answer])
                total += model(inputs_embeds=embeds, labels=labels).loss.item() * len(answer)
                count += len(answer)
    assert abs(shortened.item() - total / count) < 1e-4 * shortened.item()


def test_the_key_probe_reads_the_word_that_names_the_item():
    from mllm_edge.default_model.train import NAMED_WORDS, asked_item, named_word

    rng = random.Random(6)
    for _ in range(30):
        scene = make_scene(rng)
        for q in questions(scene):
            n = named_word(q)
            if q.kind == "count":
                assert n == -100
                continue
            word = NAMED_WORDS[n]
            assert word in q.text.rstrip("?").split()
            about = asked_item(scene, q)
            if about is not None:  # the item the focus loss looks for is the one so named
                item = scene.items[about]
                assert word == (item.colour if q.kind == "shape" else item.shape)
