"""``adp.greedy_argmax`` (runtime/kernels/argmax.py) gives ``torch.argmax(dim=-1)``'s index:
the first largest value, NaN above everything, across the pieces the first kernel cuts a row into.
On CPU the kernels run under the Triton interpreter."""


import pytest
import torch

from adp_pass.runtime.kernels import argmax as A

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
VOCAB = 2 * A.CHUNK + 37  # three pieces, the last one partial


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_matches_torch_argmax_with_ties_across_pieces(dtype):
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(5, VOCAB, generator=generator).to(dtype)
    # Row 1: the maximum twice, in two different pieces: the first one wins.
    logits[1, A.CHUNK + 3] = logits[1, 2 * A.CHUNK + 1] = 50.0
    # Row 2: the maximum in the partial last piece.
    logits[2, VOCAB - 1] = 60.0
    # Row 3: ties inside one piece.
    logits[3, 7] = logits[3, 9] = 70.0
    logits = logits.to(DEVICE)
    got = torch.ops.adp.greedy_argmax(logits)
    assert got.dtype == torch.int64 and got.shape == (5,)
    assert torch.equal(got.cpu(), logits.argmax(dim=-1).cpu())
    assert got[1].item() == A.CHUNK + 3 and got[2].item() == VOCAB - 1 and got[3].item() == 7


def test_nan_and_infinities_as_torch():
    logits = torch.randn(4, VOCAB)
    logits[0, A.CHUNK + 5] = float("nan")  # NaN beats a larger finite value and +inf before it
    logits[0, 3] = float("inf")
    logits[0, 2 * A.CHUNK] = float("nan")
    logits[1] = float("-inf")  # all -inf: index 0
    logits[2, 11] = float("inf")  # +inf, no NaN
    logits[3, 2 * A.CHUNK + 20] = float("nan")  # NaN only in the last piece
    logits = logits.to(DEVICE)
    got = torch.ops.adp.greedy_argmax(logits).cpu()
    assert got.tolist() == [A.CHUNK + 5, 0, 11, 2 * A.CHUNK + 20]
    assert torch.equal(got, logits.argmax(dim=-1).cpu())


def test_strided_rows_and_bad_inputs():
    wide = torch.randn(3, VOCAB + 8).to(DEVICE)
    view = wide[:, 4: 4 + VOCAB]  # rows strided wider than the vocabulary
    assert torch.equal(torch.ops.adp.greedy_argmax(view).cpu(), view.argmax(dim=-1).cpu())
    assert torch.ops.adp.greedy_argmax(wide[:0]).shape == (0,)
    with pytest.raises(ValueError, match="rows, vocab"):
        torch.ops.adp.greedy_argmax(wide[0])
    torch.library.opcheck(torch.ops.adp.greedy_argmax.default, (wide[:, :100].contiguous(),))
