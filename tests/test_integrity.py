"""lorakit.io.integrity: the tensor checksum and the base fingerprint."""
import torch
from torch import nn

from lorakit.io import integrity


def test_the_checksum_sees_every_bit_name_dtype_and_shape():
    g = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(3, 4, generator=g), "b": torch.randn(5, generator=g).to(torch.bfloat16)}
    digest = integrity.tensor_checksum(tensors)
    assert len(digest) == 64 and digest == integrity.tensor_checksum({k: v.clone() for k, v in tensors.items()})
    assert digest == integrity.tensor_checksum(dict(reversed(tensors.items())))  # order of the dict: irrelevant
    flipped = tensors["a"].clone()
    flipped.view(-1).view(torch.int32)[5] ^= 1  # the lowest mantissa bit of one entry
    assert integrity.tensor_checksum({**tensors, "a": flipped}) != digest
    assert integrity.tensor_checksum({**tensors, "a": tensors["a"].reshape(4, 3)}) != digest
    assert integrity.tensor_checksum({**tensors, "b": tensors["b"].float()}) != digest
    assert integrity.tensor_checksum({"a2": tensors["a"], "b": tensors["b"]}) != digest
    assert integrity.tensor_checksum({**tensors, "e": torch.zeros(0)}) != digest  # empty tensors count too


def test_fingerprint_of_a_large_weight_samples_it_and_still_tells_bases_apart():
    """Past FINGERPRINT_ENTRIES entries the probe samples fixed positions: a re-seeded base differs,
    a scaled copy differs, a bfloat16 copy agrees."""
    def fingerprint(weight):
        return integrity.base_fingerprint(dict(_holding(weight).named_modules()), ["proj"])

    n = 4 * integrity.FINGERPRINT_ENTRIES
    w = torch.randn(n // 64, 64, generator=torch.Generator().manual_seed(0))
    same = fingerprint(w)
    assert integrity.fingerprint_problems(same, fingerprint(w.clone())) == []
    assert integrity.fingerprint_problems(same, fingerprint(w.to(torch.bfloat16))) == []
    assert integrity.fingerprint_problems(same, fingerprint(torch.randn(w.shape))) == ["proj"]
    assert integrity.fingerprint_problems(same, fingerprint(w * 1.1)) == ["proj"]


def _holding(weight: torch.Tensor) -> nn.Module:
    holder = nn.ModuleDict({"proj": nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=weight.dtype)})
    holder["proj"].weight.data = weight
    return holder
