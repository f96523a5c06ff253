"""Sparse and nested tensors are refused where a tensor enters (``_validation.check_tensor``), naming the fix: before,
each function failed deep inside torch with a raw error (``reshape is not implemented for sparse tensors``, ``Could not
run 'aten::aminmax' with arguments from the 'SparseCPU' backend``)."""

from __future__ import annotations

import pytest
import torch

from entrotrain._validation import check_tensor
from entrotrain.errors import EntrotrainError
from entrotrain.functional import (
    attention_entropy,
    effective_rank,
    entropy_from_logits,
    ksg_mutual_information,
    matrix_entropy,
    rankme,
    vendi_score,
)

pytestmark = pytest.mark.filterwarnings("ignore:.*(Sparse CSR|nested tensors).*:UserWarning")

_DENSE = torch.randn(2, 2, 8, 4, generator=torch.Generator().manual_seed(0))
_CALLS = {
    "entropy_from_logits": lambda x: entropy_from_logits(x),
    "matrix_entropy": lambda x: matrix_entropy(x),
    "rankme": lambda x: rankme(x),
    "vendi_score": lambda x: vendi_score(x),
    "effective_rank": lambda x: effective_rank(x),
    "ksg_mutual_information": lambda x: ksg_mutual_information(x, torch.randn(x.shape[0], 3)),
}
_LAYOUTS = {
    "sparse_coo": lambda x: x.to_sparse(),
    "sparse_csr": lambda x: x.to_sparse_csr(),
}


@pytest.mark.parametrize("layout", sorted(_LAYOUTS))
@pytest.mark.parametrize("name", sorted(_CALLS))
def test_a_sparse_input_is_refused_naming_to_dense(name, layout):
    x = _LAYOUTS[layout](torch.randn(16, 5, generator=torch.Generator().manual_seed(1)))
    with pytest.raises(EntrotrainError, match=r"dense \(strided\) tensor, got layout torch\.sparse.*to_dense\(\)"):
        _CALLS[name](x)


def test_attention_entropy_refuses_a_sparse_query():
    with pytest.raises(EntrotrainError, match=r"q must be a dense .*q\.to_dense\(\)"):
        attention_entropy(_DENSE.to_sparse(), _DENSE)


def test_a_nested_tensor_is_refused_naming_padding():
    nested = torch.nested.nested_tensor([torch.randn(3, 4), torch.randn(5, 4)])
    with pytest.raises(EntrotrainError, match="nested tensor.*to_padded_tensor"):
        check_tensor(nested, "x", floating=True)


def test_a_dense_view_still_passes():
    x = torch.randn(4, 6)[:, ::2]  # strided, not contiguous
    assert check_tensor(x, "x", floating=True, ndim=2) is x
