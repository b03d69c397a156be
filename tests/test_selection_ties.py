"""Selections (FasterVLM's kept patches, FastV's kept image tokens) judged by the reference's score
gap at the cut: a swap of near-tied scores is not an error, and what follows from the selection is
then checked on the graph's own selection. Engine verification and export verification share it."""

from __future__ import annotations

import numpy as np
import pytest

from mllm_edge.parity import compare_graph, tie_gap

TOL = 2e-2  # fp16's per-graph limit


def test_tie_gap_measures_the_swap_at_the_cut():
    scores = np.array([[0.10, 0.50, 0.30, 0.299, 0.05]])
    ref = np.array([[1, 2]])
    assert tie_gap(scores, ref, ref) == 0.0
    assert tie_gap(scores, ref, np.array([[1, 3]])) == pytest.approx(0.001 / 0.5)  # 0.30 vs 0.299
    assert tie_gap(scores, ref, np.array([[0, 1]])) == pytest.approx(0.20 / 0.5)  # a real difference
    assert tie_gap(scores, ref, np.array([[3, 1]])) is None  # not in ascending order
    assert tie_gap(scores, ref, np.array([[1, 1]])) is None
    assert tie_gap(scores, ref, np.array([[1, 9]])) is None


def vision_case(got_kept, consistent=True):
    rng = np.random.default_rng(0)
    cls_row = np.array([[0.05, 0.40, 0.20, 0.1999, 0.30, 0.01]], np.float32)
    every = rng.standard_normal((1, 6, 4)).astype(np.float32)
    ref_kept = np.array([[1, 2, 4]])
    outputs = {"image_embeds": every[:, ref_kept[0]], "kept_patches": ref_kept}
    got = {
        "kept_patches": np.array([got_kept]),
        "image_embeds": every[:, got_kept if consistent else ref_kept[0]],
    }
    refs = {"cls_row": cls_row, "all_image_embeds": every}
    return compare_graph("vision", got, {}, outputs, refs, TOL)


def test_vision_tie_passes_and_its_embeddings_are_checked_on_its_own_patches():
    assert all(c.ok for c in vision_case([1, 2, 4]))
    tie = vision_case([1, 3, 4])  # 0.20 and 0.1999 swapped
    assert all(c.ok for c in tie)
    assert not all(c.ok for c in vision_case([1, 3, 4], consistent=False))  # embeddings of the wrong patches
    assert not all(c.ok for c in vision_case([0, 1, 4]))  # 0.20 vs 0.05: no tie
    assert not all(
        c.ok
        for c in compare_graph(
            "vision",
            {"kept_patches": np.array([[1, 3, 4]]), "image_embeds": np.zeros((1, 3, 4))},
            {},
            {"kept_patches": np.array([[1, 2, 4]]), "image_embeds": np.zeros((1, 3, 4))},
            {},
            TOL,
        )
    )  # no references: exact, as before


def test_prune_tie_recomputes_the_kept_tokens_as_fastv_defines_them():
    """The kept positions on the graph's own selection are rebuilt in numpy; they must equal what the
    torch definition (pruning.fastv_select) gives for scores that make that selection."""
    import torch

    from mllm_edge.pruning import fastv_select

    rng = np.random.default_rng(1)
    start, n, keep, t = 2, 5, 3, 9
    last_row = np.zeros((1, t), np.float32)
    last_row[0, start : start + n] = [0.30, 0.10, 0.2999, 0.2998, 0.40]  # tokens 2, 3 near-tied at the cut
    hidden = rng.standard_normal((1, t, 4)).astype(np.float32)
    positions = np.arange(t)[None]
    inputs = {
        "hidden_states": hidden,
        "last_row": last_row,
        "position_ids": positions,
        "image_start": np.array(start),
    }

    def run(scores):
        kept_image, kept_positions = fastv_select(torch.from_numpy(scores), start, n, keep)
        idx = kept_positions.numpy()
        return {
            "kept_hidden_states": np.take_along_axis(hidden, idx[..., None], axis=1),
            "kept_position_ids": np.take_along_axis(positions, idx, axis=1),
            "kept_image": kept_image.numpy(),
        }

    reference = run(last_row)
    swapped_scores = last_row.copy()
    swapped_scores[0, start + 3] = 0.29995  # the graph's rounding put token 3 above token 2
    graph = run(swapped_scores)
    assert graph["kept_image"].tolist() != reference["kept_image"].tolist()
    assert all(c.ok for c in compare_graph("prune", graph, inputs, reference, {}, TOL))
    wrong = {**graph, "kept_hidden_states": reference["kept_hidden_states"]}
    assert not all(c.ok for c in compare_graph("prune", wrong, inputs, reference, {}, TOL))
    far = last_row.copy()
    far[0, start + 1] = 0.5  # token 1 (0.10) kept instead of 2: far from a tie
    assert not all(c.ok for c in compare_graph("prune", run(far), inputs, reference, {}, TOL))


def test_engine_verification_accepts_a_tie_in_a_real_fastervlm_sample(export_cache, tmp_path):
    """The bundle's vision sample keeps the [CLS] row and every projected patch; with two scores tied
    at the cut, an engine that keeps the other one passes build's verification, and one whose
    embeddings do not follow its own selection fails."""
    import shutil

    from mllm_edge.build.build import BuildConfig, plan_build, verify_engine
    from mllm_edge.engines import Target

    source, _ = export_cache("llama_gqa", "fastervlm")
    folder = tmp_path / "bundle"
    shutil.copytree(source, folder)
    plan = plan_build(BuildConfig(folder, precision="fp16"), Target("RTX 4090", (8, 9), "10.3.0", False))
    path = folder / plan.manifest.samples["vision"]
    with np.load(path) as data:
        arrays = dict(data)
    kept, scores = arrays["out.kept_patches"], arrays["ref.cls_row"].copy()
    order = np.argsort(-scores[0], kind="stable")
    last_in, first_out = order[kept.shape[1] - 1], order[kept.shape[1]]
    scores[0, first_out] = scores[0, last_in]  # tied at the cut
    arrays["ref.cls_row"] = scores
    np.savez(path, **arrays)
    mine = np.sort(np.concatenate((np.setdiff1d(kept[0], [last_in]), [first_out])))[None]
    every = arrays["ref.all_image_embeds"]

    class Engine:
        def __init__(self, embeds_of):
            self.embeds_of = embeds_of

        def run(self, inputs):
            return {"kept_patches": mine, "image_embeds": every[:, self.embeds_of[0]]}

    assert all(c.ok for c in verify_engine(plan, "vision", Engine(mine)))
    assert not all(c.ok for c in verify_engine(plan, "vision", Engine(kept)))


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_export_verification_passes_a_graph_that_broke_a_tie_the_other_way(
    dtype, export_cache, tmp_path, monkeypatch
):
    """As when fp16 rounding in ONNX Runtime orders two near-tied [CLS] scores the other way: the
    vision graph (wrapped here to keep another patch in place of the last one kept) passes per graph by the score gap,
    and the chain is then checked on the reference's selection. Without a tie in the reference's
    scores, the same graph fails."""
    import shutil

    from mllm_edge.export import verify
    from mllm_edge.manifest import load_manifest

    source, _ = export_cache("llama_gqa", "fastervlm", dtype)
    folder = tmp_path / "bundle"
    shutil.copytree(source, folder)
    manifest = load_manifest(folder)
    path = folder / manifest.samples["vision"]
    with np.load(path) as data:
        arrays = dict(data)
    kept, every = arrays["out.kept_patches"], arrays["ref.all_image_embeds"]
    order = np.argsort(-arrays["ref.cls_row"][0], kind="stable")
    last_in, first_out = order[kept.shape[1] - 1], order[-1]  # the lowest-scored patch: far from the cut
    other = np.sort(np.concatenate((np.setdiff1d(kept[0], [last_in]), [first_out])))[None]
    real_session = verify.session

    class Swapping:  # the vision graph as a rounding that flips the tie would run it
        def __init__(self, engine):
            self.engine = engine

        def run(self, inputs, outputs=None):
            return {"kept_patches": other, "image_embeds": every[:, other[0]]}

    monkeypatch.setattr(
        verify, "session", lambda p: Swapping(real_session(p)) if p.name == "vision.onnx" else real_session(p)
    )

    untied = verify.verify_graphs(folder, manifest)
    assert not all(c.ok for c in untied)  # the reference's scores are not tied: a real difference
    tied = arrays["ref.cls_row"].copy()
    tied[0, first_out] = tied[0, last_in]
    np.savez(path, **{**arrays, "ref.cls_row": tied})
    assert all(c.ok for c in verify.verify_graphs(folder, manifest))
    chain = verify.verify_chain(folder, manifest)
    assert chain.ok and chain.on_reference_selection == ["vision"]


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_the_same_for_fastvs_prune_graph(dtype, export_cache, tmp_path, monkeypatch):
    import shutil

    from mllm_edge.export import verify
    from mllm_edge.manifest import load_manifest
    from mllm_edge.parity import fastv_gather

    source, _ = export_cache("llama_gqa", "fastv", dtype)
    folder = tmp_path / "bundle"
    shutil.copytree(source, folder)
    manifest = load_manifest(folder)
    n = manifest.pruning["image_tokens"]["llm"]
    prune_path = folder / manifest.samples["prune"]
    with np.load(prune_path) as data:
        prune = dict(data)
    start, kept = int(prune["in.image_start"]), prune["out.kept_image"]
    scores = prune["in.last_row"][0, start : start + n]
    order = np.argsort(-scores, kind="stable")
    last_in, first_out = order[kept.shape[1] - 1], order[-1]  # the lowest-scored token: far from the cut
    other = np.sort(np.concatenate((np.setdiff1d(kept[0], [last_in]), [first_out])))[None]
    real_session = verify.session

    class Swapping:
        def run(self, inputs, outputs=None):
            return fastv_gather(inputs, other, n)

    monkeypatch.setattr(
        verify, "session", lambda p: Swapping() if p.name == "prune.onnx" else real_session(p)
    )
    assert not all(c.ok for c in verify.verify_graphs(folder, manifest))
    tied = prune["in.last_row"].copy()  # the reference's scores, as the prune graph's sample input
    tied[0, start + first_out] = tied[0, start + last_in]
    np.savez(prune_path, **{**prune, "in.last_row": tied})
    assert all(c.ok for c in verify.verify_graphs(folder, manifest))
    chain = verify.verify_chain(folder, manifest)
    assert chain.ok and chain.on_reference_selection == ["prune"]
