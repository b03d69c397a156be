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
    b, t = last_row.shape
    image_start = torch.as_tensor(image_start, device=last_row.device)
    image_pos = image_start + torch.arange(num_image, device=last_row.device)
    kept_image = top_k_in_order(last_row[:, image_pos], keep)  # [B, keep]
    # Output slot j holds: text before the image (j < start), then the kept image tokens, then the
    # text after the image shifted by the number pruned. Written with where(), not concat of ranges
    # of data-dependent length.
    j = torch.arange(t - num_image + keep, device=last_row.device).expand(b, -1)
    in_image = (j >= image_start) & (j < image_start + keep)
    image_slot = (j - image_start).clamp(0, keep - 1)
    from_image = image_start + torch.gather(kept_image, 1, image_slot)
    kept_positions = torch.where(
        j < image_start, j, torch.where(in_image, from_image, j + (num_image - keep))
    )
    return kept_image, kept_positions


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x: [B, T, ...] and index [B, M] -> x at those token positions, [B, M, ...]."""
    shape = index.shape + (1,) * (x.dim() - 2)
    return torch.gather(x, 1, index.reshape(shape).expand(*index.shape, *x.shape[2:]))
