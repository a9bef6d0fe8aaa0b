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


def test_the_checksum_hashed_on_a_thread_is_tensor_checksum():
    g = torch.Generator().manual_seed(0)
    tensors = {"b": torch.randn(300, 7, generator=g), "a": torch.randn(5, generator=g).to(torch.bfloat16),
               "e": torch.zeros(0)}
    expected = integrity.tensor_checksum(tensors)
    digest = integrity.checksum_started(tensors)
    tensors["b"].zero_()  # its bytes were taken when the hash started
    assert digest() == expected


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


def test_a_remembered_fingerprint_is_reused_only_while_the_weight_is_unchanged(monkeypatch):
    """Each weight is probed once while unchanged; a write (in place, through `.data`, or a new tensor under
    `.data`) makes the next fingerprint probe it again and agree with a fresh computation."""
    probed, real = [], integrity._probe_weights

    def counting(weights):
        probed.extend([sorted(weights)] if weights else [])
        return real(weights)

    monkeypatch.setattr(integrity, "_probe_weights", counting)
    holder = _holding(torch.randn(96, 64, generator=torch.Generator().manual_seed(0)))
    modules = dict(holder.named_modules())
    weight = holder["proj"].weight

    def fingerprint():
        return integrity.base_fingerprint(modules, ["proj"])["proj"]

    def fresh():
        return real({"proj": weight.detach()})["proj"]

    first = fingerprint()
    assert fingerprint() == first and probed == [["proj"]]  # the second call probes nothing
    for change in (lambda: weight.mul_(1.5),  # in place: autograd's version counts it
                   lambda: weight.data.mul_(2.0),  # through .data: the version does not, the spot check does
                   lambda: setattr(weight, "data", torch.randn(96, 64))):  # a new tensor under the same parameter
        with torch.no_grad():
            change()
        probed.clear()
        assert fingerprint() == fresh() != first and probed == [["proj"]]
        first = fingerprint()


def test_a_freed_weight_takes_its_remembered_fingerprint_along():
    before = len(integrity._REMEMBERED)
    holder = _holding(torch.randn(96, 64))
    integrity.base_fingerprint(dict(holder.named_modules()), ["proj"])
    assert len(integrity._REMEMBERED) == before + 1
    del holder
    assert len(integrity._REMEMBERED) == before


def test_non_finite_names_exactly_the_tensors_with_a_nan_or_an_inf():
    """Against torch.isfinite entry by entry, including float64 sums that overflow without any Inf entry."""
    big = torch.full((4,), torch.finfo(torch.float64).max, dtype=torch.float64)  # finite; its sum is not
    tensors = {"ok": torch.randn(3, 5), "nan": torch.tensor([1.0, float("nan")]), "big": big,
               "inf": torch.tensor([float("-inf")], dtype=torch.bfloat16), "ints": torch.arange(4),
               "half": torch.full((8,), 60000.0, dtype=torch.float16), "empty": torch.zeros(0)}
    expected = [k for k, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    assert integrity.non_finite(tensors) == expected == ["nan", "inf"]
    assert integrity.non_finite({"ints": torch.arange(3)}) == []
