"""Token selection for FastV and FasterVLM as small traceable torch functions.

Every shape here follows from the input shapes and the constant keep count alone, never from data,
so the same code exports to graphs TensorRT can build (no NonZero, no data-dependent Range).
"""

from __future__ import annotations

import torch


def top_k_in_order(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices of the `keep` highest scores per row, returned in ascending (original) order.

    scores: [B, N] -> [B, keep]. Ties go to the lower index. In eager PyTorch a stable descending
    sort guarantees it (torch.topk does not promise a tie order); in an exported graph ONNX TopK
    defines that same tie-break, and the ONNX exporters have no stable sort.
    """
    if torch.onnx.is_in_onnx_export():
        ranked = torch.topk(scores, keep, dim=-1).indices
    else:
        ranked = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :keep]
    # Back into ascending order; topk with the constant k (not sort) so the graph's k stays a
    # constant too: the exporter turns sort into a TopK whose k it reads from a Shape op.
    return torch.topk(ranked, keep, dim=-1, largest=False, sorted=True).values


def fastervlm_select(cls_row: torch.Tensor, keep: int) -> torch.Tensor:
    """FasterVLM: cls_row [B, N] ([CLS] attention over patches, head mean) -> kept patch indices [B, keep]."""
    return top_k_in_order(cls_row, keep)


def fastv_select(last_row: torch.Tensor, image_start: torch.Tensor | int, num_image: int, keep: int):
    """FastV at layer K: which prompt positions go on to layers >= K.

    last_row: [B, T] post-softmax attention of the last prompt token at layer K-1, head mean.
    The image occupies positions [image_start, image_start + num_image). Returns
    (kept_image [B, keep] indices into the image span, kept_positions [B, T - num_image + keep]
    indices into the prompt, ascending: all text tokens plus the kept image tokens).
    """
    image_start = torch.as_tensor(image_start, device=last_row.device)
    image_pos = image_start + torch.arange(num_image, device=last_row.device)
    kept_image = top_k_in_order(last_row[:, image_pos], keep)  # [B, keep]
    return kept_image, _kept_positions(kept_image, image_start, last_row.shape[1], num_image, keep)


def fastv_select_span(
    last_row: torch.Tensor, image_positions: torch.Tensor, keep_table: torch.Tensor, keep_max: int
):
    """FastV at layer K over an image span whose length n varies with the picture (LLaVA-NeXT):
    fastv_select(last_row, image_positions[0], n, keep_table[n]), with every TopK's k a constant.

    image_positions [n]: the span's prompt positions (consecutive), so n is a dim of an input and
    every length below is shape arithmetic. keep_table [max_span + 1]: keep_count(n, R) at index n
    (pruning.keep_table); keep_max its last entry, as a number (the TopKs' k). The scores are padded to the longest span with -inf and ranked with k =
    the most any span keeps; the first keep_table[n] are this span's top-k (ties to the lower
    index, as top_k_in_order), put back in order by a second constant-k TopK that ranks the unused
    slots last, then cut to keep_table[n] by a Slice.
    """
    n = image_positions.shape[0]
    max_span = keep_table.shape[0] - 1
    keep = keep_table[n].item()  # exported: a Gather of the table at a dim, shape arithmetic
    torch._check(keep >= 1)
    torch._check(keep <= keep_max)
    scores = torch.nn.functional.pad(last_row[:, image_positions], (0, max_span - n), value=float("-inf"))
    if torch.onnx.is_in_onnx_export():
        ranked = torch.topk(scores, keep_max, dim=-1).indices
    else:
        ranked = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :keep_max]
    slot = torch.arange(keep_max, device=ranked.device)
    marked = torch.where(slot < keep, ranked, max_span + slot)  # the unused slots sort after every index
    kept_image = torch.topk(marked, keep_max, dim=-1, largest=False, sorted=True).values[:, :keep]
    start = image_positions[0]
    return kept_image, _kept_positions(kept_image, start, last_row.shape[1], n, keep)


def _kept_positions(kept_image: torch.Tensor, image_start, t: int, num_image: int, keep: int) -> torch.Tensor:
    """Output slot j holds: text before the image (j < start), then the kept image tokens, then the
    text after the image shifted by the number pruned. Written with where(), not concat of ranges
    of data-dependent length."""
    j = torch.arange(t - num_image + keep, device=kept_image.device).expand(kept_image.shape[0], -1)
    in_image = (j >= image_start) & (j < image_start + keep)
    image_slot = (j - image_start).clamp(0, keep - 1)
    from_image = image_start + torch.gather(kept_image, 1, image_slot)
    return torch.where(j < image_start, j, torch.where(in_image, from_image, j + (num_image - keep)))


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x: [B, T, ...] and index [B, M] -> x at those token positions, [B, M, ...]."""
    shape = index.shape + (1,) * (x.dim() - 2)
    return torch.gather(x, 1, index.reshape(shape).expand(*index.shape, *x.shape[2:]))
