"""Layer cases shared by the layer and merge tests: every supported layer type, built from a
seed, with an input and the reference output for any weight and adapter (see reference.py)."""
from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import torch
from hypothesis import strategies as st
from torch import nn
from transformers.pytorch_utils import Conv1D

import lorakit as lk
import reference

KINDS = ("linear", "gpt2_conv1d", "embedding", "conv1d", "conv2d", "conv3d")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
EPS = {dtype: torch.finfo(dtype).eps for dtype in (*DTYPES, torch.float64)}


class Holder(nn.Module):
    """A one-layer model, so the layer has a path ('layer') that a target can name."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)


@dataclass
class Case:
    kind: str
    dims: dict
    rank: int
    seed: int
    dtype: torch.dtype = torch.float32
    conv: dict = field(default_factory=dict)  # stride, padding, dilation, groups

    def base(self) -> nn.Module:
        """The frozen layer, built from the seed."""
        torch.manual_seed(self.seed)
        d = self.dims
        if self.kind == "linear":
            layer = nn.Linear(d["d_in"], d["d_out"], bias=d["bias"])
        elif self.kind == "gpt2_conv1d":
            layer = Conv1D(d["d_out"], d["d_in"])
            nn.init.normal_(layer.bias)  # transformers initialises it to zero
        elif self.kind == "embedding":
            layer = nn.Embedding(d["num"], d["dim"])
        else:
            conv_nd = {"conv1d": nn.Conv1d, "conv2d": nn.Conv2d, "conv3d": nn.Conv3d}[self.kind]
            layer = conv_nd(d["c_in"], d["c_out"], d["kernel"], bias=d["bias"], **self.conv)
        return layer.to(self.dtype)

    def input(self, seed_offset: int = 1) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed + seed_offset)
        d = self.dims
        if self.kind == "embedding":
            return torch.randint(0, d["num"], d["batch"], generator=g)
        if self.kind in ("linear", "gpt2_conv1d"):
            return torch.randn(*d["batch"], d["d_in"], generator=g).to(self.dtype)
        return torch.randn(d["batch"][0], d["c_in"], *d["spatial"], generator=g).to(self.dtype)

    def config(self, **overrides) -> lk.LoraConfig:
        return lk.LoraConfig(**{"rank": self.rank, "alpha": 2.0 * self.rank, "targets": ("layer",), **overrides})

    def inject(self, **overrides) -> tuple[Holder, lk.LoraLayer]:
        model = Holder(self.base())
        lk.inject_(model, self.config(**overrides))
        return model, model.layer

    def reference(self, x, W, b, A, B, s):
        """The adapted layer's output by reference.py (W in the base layer's own layout)."""
        if self.kind == "linear":
            return reference.linear(x, W, b, A, B, s)
        if self.kind == "gpt2_conv1d":
            return reference.conv1d_gpt2(x, W, b, A, B, s)
        if self.kind == "embedding":
            return reference.embedding(x, W, A, B, s)
        return reference.conv(x, W, b, A, B, s, **self.conv)

    def magnitude(self, x, W, b, A, B, s):
        """The reference run on absolute values: what each output's rounding error scales with."""
        absolute = lambda t: None if t is None else t.abs()  # noqa: E731
        x = x if self.kind == "embedding" else x.abs()
        return self.reference(x, W.abs(), absolute(b), A.abs(), B.abs(), abs(s))

    def update_layout(self, dW: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
        """reference.update's (out, fan_in*k) -> the base weight's layout."""
        if self.kind in ("gpt2_conv1d", "embedding"):
            return dW.T
        return dW.reshape(W.shape)


def randomize_(layer: lk.LoraLayer, name: str, seed: int, dyadic: bool = False) -> None:
    """Give an adapter a non-zero B (and, with dyadic, A and B in k/16: products sum exactly)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (layer.adapters[name].A, layer.adapters[name].B):
            if dyadic:
                p.copy_(torch.randint(-15, 16, p.shape, generator=g) / 16)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def f64(t):
    return None if t is None else t.detach().double()


@st.composite
def cases(draw, kinds=KINDS, dtypes=DTYPES) -> Case:
    """Shapes, ranks, groups, strides, dtypes and seeds for every layer type."""
    kind = draw(st.sampled_from(kinds))
    dtype = draw(st.sampled_from(dtypes))
    seed = draw(st.integers(0, 2**31 - 1))
    small = st.integers(1, 12)
    batch = tuple(draw(st.lists(st.integers(1, 3), min_size=1, max_size=2)))
    if kind in ("linear", "gpt2_conv1d"):
        dims = {"d_in": draw(small), "d_out": draw(small), "bias": draw(st.booleans()), "batch": batch}
        return Case(kind, dims, draw(st.integers(1, 8)), seed, dtype)
    if kind == "embedding":
        dims = {"num": draw(st.integers(2, 20)), "dim": draw(small), "batch": batch}
        return Case(kind, dims, draw(st.integers(1, 8)), seed, dtype)
    nd = int(kind[4])
    groups = draw(st.integers(1, 3))
    kernel = tuple(draw(st.integers(1, 3 if nd < 3 else 2)) for _ in range(nd))
    conv = {"stride": draw(st.integers(1, 2)), "padding": draw(st.integers(0, 1)),
            "dilation": draw(st.integers(1, 2)), "groups": groups}
    spatial = tuple(conv["dilation"] * (k - 1) + 1 + draw(st.integers(0, 3 if nd < 3 else 1)) for k in kernel)
    dims = {"c_in": groups * draw(st.integers(1, 3)), "c_out": groups * draw(st.integers(1, 3)),
            "kernel": kernel, "bias": draw(st.booleans()), "spatial": spatial, "batch": batch[:1]}
    return Case(kind, dims, groups * draw(st.integers(1, 3)), seed, dtype, conv)


def _conv(kind, c_in, c_out, kernel, spatial, rank, seed, **conv):
    conv = {"stride": 1, "padding": 0, "dilation": 1, "groups": 1, **conv}
    dims = {"c_in": c_in, "c_out": c_out, "kernel": kernel, "bias": True, "spatial": spatial, "batch": (2,)}
    return Case(kind, dims, rank, seed, conv=conv)


# One fixed example of every layer type (and the conv variants), for the non-property tests.
EXAMPLES = {
    "linear": Case("linear", {"d_in": 7, "d_out": 5, "bias": True, "batch": (2, 3)}, 3, 0),
    "linear_nobias": Case("linear", {"d_in": 4, "d_out": 6, "bias": False, "batch": (5,)}, 2, 1),
    "gpt2_conv1d": Case("gpt2_conv1d", {"d_in": 6, "d_out": 9, "bias": True, "batch": (2, 3)}, 4, 2),
    "embedding": Case("embedding", {"num": 11, "dim": 6, "batch": (2, 4)}, 3, 3),
    "conv1d": _conv("conv1d", 3, 5, (3,), (9,), 2, 4, stride=2, padding=1),
    "conv2d_groups": _conv("conv2d", 4, 6, (3, 2), (7, 6), 4, 5, groups=2, dilation=2),
    "conv2d_depthwise": _conv("conv2d", 4, 8, (3, 3), (5, 5), 4, 6, groups=4, padding=1),
    "conv3d": _conv("conv3d", 2, 3, (2, 2, 2), (4, 3, 3), 2, 7, stride=(1, 2, 1)),
}


class Toy(nn.Module):
    """A small model with every plain-PyTorch layer type: embedding, linears, a grouped conv, a head."""

    def __init__(self, vocab: int = 13, dim: int = 8, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(vocab, dim)
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.o_proj = nn.Linear(dim, dim, bias=False)
        self.conv = nn.Conv1d(dim, dim, 3, padding=1, groups=2)
        self.lm_head = nn.Linear(dim, vocab)

    def forward(self, idx):  # idx: (B, T) -> logits (B, T, vocab)
        h = self.embed(idx)
        h = h + self.o_proj(torch.tanh(self.q_proj(h)) * self.v_proj(h) + self.k_proj(h))
        h = h + self.conv(h.transpose(1, 2)).transpose(1, 2)
        return self.lm_head(h)


def toy_reference(base: Toy, idx, factors: dict) -> torch.Tensor:
    """Toy.forward by reference.py in float64; `factors` maps a path to (A, B, scale)."""
    def weights(path):
        module = base.get_submodule(path)
        return f64(module.weight), f64(getattr(module, "bias", None))

    def lin(path, x):
        W, b = weights(path)
        A, B, s = factors.get(path, (torch.zeros(1, W.shape[1]), torch.zeros(W.shape[0], 1), 0.0))
        return reference.linear(x, W, b, f64(A), f64(B), s)

    W, _ = weights("embed")
    A, B, s = factors.get("embed", (torch.zeros(1, W.shape[0]), torch.zeros(W.shape[1], 1), 0.0))
    h = reference.embedding(idx, W, f64(A), f64(B), s)
    h = h + lin("o_proj", torch.tanh(lin("q_proj", h)) * lin("v_proj", h) + lin("k_proj", h))
    W, b = weights("conv")
    A, B, s = factors.get("conv", (torch.zeros(2, 4, 3), torch.zeros(8, 1, 1), 0.0))
    h = h + reference.conv(h.transpose(1, 2), W, b, f64(A), f64(B), s, padding=1, groups=2).transpose(1, 2)
    return lin("lm_head", h)


def factors_of(model: nn.Module, adapter: str, scale) -> dict:
    """path -> (A, B, scale(path)) of one adapter, for toy_reference."""
    return {path: (layer.adapters[adapter].A, layer.adapters[adapter].B, scale(path))
            for path, layer in lk.lora_layers(model) if layer.holds(adapter)}


def randomize_model_(model: nn.Module, seed: int) -> None:
    for i, (_, layer) in enumerate(lk.lora_layers(model)):
        for name in layer.adapters:
            randomize_(layer, name, seed + 1000 * i + zlib.crc32(name.encode()) % 997)


def snapshot(model: nn.Module) -> dict:
    """Every parameter and buffer (cloned), its requires_grad, and the module structure."""
    state = {k: (v.detach().clone(), getattr(v, "requires_grad", None)) for k, v in model.state_dict(keep_vars=True).items()}
    return {"state": state, "modules": [(p, type(m)) for p, m in model.named_modules()]}


def same(before: dict, after: dict) -> bool:
    if before["modules"] != after["modules"] or before["state"].keys() != after["state"].keys():
        return False
    return all(torch.equal(v, after["state"][k][0]) and g == after["state"][k][1]
               for k, (v, g) in before["state"].items())
