"""LoraConfig: what to adapt and how, frozen and validated once at construction."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping

from ..errors import problems_error
from .lowrank import lora_scale
from .targets import ALL_LINEAR, path_matches

BIAS_MODES = ("none", "all", "lora_only")
INIT_MODES = ("default", "gaussian", "pissa", "olora")
RESIDUAL_INITS = ("pissa", "olora")  # inits that take the adapter's start out of the base weight (core.init)
ADAPTER_DTYPES = ("float32", "bfloat16", "float16")


def option(default, help: str, **kw):
    """A field of a config dataclass that is also a command-line option: its help (and choices) are
    what `lorakit --help` shows (cli.options.add_dataclass_options)."""
    return field(default=default, metadata={"help": help, **kw})

@dataclass(frozen=True)
class LoraConfig:
    """A LoRA adapter's hyper-parameters: dW = (alpha / rank) * B @ A on every targeted module
    (with dora=True, W0 + dW is renormalised per output feature to a trained magnitude: core.layers.DoraAdapter).

    targets=None adapts the architecture's attention projections (core.targets.DEFAULT_TARGETS).
    rank_pattern / alpha_pattern map a target-style pattern to a per-module rank / alpha;
    the first matching pattern wins. modules_to_save (target-style patterns) names modules that
    are trained in full, one copy per adapter, and saved with it (e.g. a new classifier head).
    """

    rank: int = option(8, "LoRA rank r: A is r x d_in, B is d_out x r")
    alpha: float = option(16.0, "LoRA alpha: dW = (alpha / rank) * B @ A")
    dropout: float = option(0.0, "dropout on the adapter's input (not on the base path)")
    targets: tuple[str, ...] | str | None = option(
        None, "modules to adapt: comma-separated names or globs, or all-linear (default: the architecture's "
              "attention projections, e.g. q_proj,v_proj for Llama, query,value for BERT)")
    exclude: tuple[str, ...] = option((), "modules to leave out of the targets' matches: comma-separated names "
                                          "or globs")
    bias: str = option("none", "biases that train: none, all, or lora_only (those of adapted modules)",
                       choices=BIAS_MODES)
    init: str = option("default", "how A and B start: default (A Kaiming-uniform, like nn.Linear) or gaussian "
                                  "(A ~ N(0, 1/rank)), B zero; or pissa (W0's principal singular vectors) or olora "
                                  "(QR of W0), whose start is taken out of the base weight (it holds the residual "
                                  "while the adapter is on; saved files are a plain LoRA of rank 2r for the original "
                                  "base): Linear and Conv1D layers, unquantized bases", choices=INIT_MODES)
    init_niter: int = option(0, "init=pissa only: 0 computes the exact SVD; N > 0 a randomized SVD with N subspace "
                                "iterations (torch.svd_lowrank; PEFT's pissa_niter_N), much faster on large weights")
    rslora: bool = option(False, "rank-stabilised scale alpha / sqrt(rank) instead of alpha / rank")
    rank_pattern: Mapping[str, int] = field(default_factory=dict, metadata={
        "help": "per-module ranks, PATTERN=RANK,... (patterns like targets; the first match wins), e.g. q_proj=16"})
    alpha_pattern: Mapping[str, float] = field(default_factory=dict, metadata={
        "help": "per-module alphas, PATTERN=ALPHA,... (patterns like targets; the first match wins), e.g. "
                "'*.layers.0.*=32'"})
    modules_to_save: tuple[str, ...] = option((), "modules trained in full, one copy per adapter, and saved with it "
                                                  "(e.g. a new classifier head): comma-separated names or globs")
    adapter_dtype: str = option("float32", "storage dtype of A and B and of their gradients and optimizer state; "
                                "bfloat16 halves them (the low-rank path then computes in bfloat16)",
                                choices=ADAPTER_DTYPES)
    dora: bool = option(False, "DoRA (Liu et al., 2024): W' = m * (W0 + dW) / ||W0 + dW|| per output feature, with a "
                               "trained magnitude m; Linear and Conv1D layers only")

    def __post_init__(self) -> None:
        # Normalise containers to tuples and read-only mappings, so a frozen config cannot be mutated.
        if isinstance(self.targets, str):
            object.__setattr__(self, "targets", (self.targets,))
        for name in ("exclude", "modules_to_save"):
            if isinstance(getattr(self, name), str):
                object.__setattr__(self, name, (getattr(self, name),))
        for name in ("targets", "exclude", "modules_to_save"):
            value = getattr(self, name)
            if isinstance(value, (list, tuple)):
                object.__setattr__(self, name, tuple(value))
        for name in ("rank_pattern", "alpha_pattern"):
            value = getattr(self, name)
            if isinstance(value, Mapping):
                object.__setattr__(self, name, MappingProxyType(dict(value)))
        problems = self._problems()
        if problems:
            raise problems_error("invalid LoraConfig", problems)

    def _problems(self) -> list[str]:
        p: list[str] = []
        if not _is_int(self.rank) or self.rank < 1:
            p.append(f"rank={self.rank!r}: must be a positive integer, e.g. rank=8")
        if not _is_number(self.alpha) or self.alpha <= 0:
            p.append(f"alpha={self.alpha!r}: must be a positive number, e.g. alpha=16 (scale = alpha/rank)")
        if not _is_number(self.dropout) or not 0.0 <= self.dropout < 1.0:
            p.append(f"dropout={self.dropout!r}: must be a number in [0, 1), e.g. dropout=0.05")
        if self.targets is not None and not _names(self.targets, nonempty=True):
            p.append(
                f"targets={self.targets!r}: must be a non-empty sequence of module names or globs, "
                f"e.g. targets=('q_proj', 'v_proj') or targets='{ALL_LINEAR}', or None for the architecture's default"
            )
        if not _names(self.exclude):
            p.append(f"exclude={self.exclude!r}: must be a sequence of module names or globs")
        if not _names(self.modules_to_save) or ALL_LINEAR in self.modules_to_save:
            p.append(f"modules_to_save={self.modules_to_save!r}: must be a sequence of module names or globs "
                     "(not 'all-linear'), e.g. modules_to_save=('classifier',)")
        if self.bias not in BIAS_MODES:
            p.append(f"bias={self.bias!r}: must be one of {', '.join(map(repr, BIAS_MODES))}")
        if self.adapter_dtype not in ADAPTER_DTYPES:
            p.append(f"adapter_dtype={self.adapter_dtype!r}: must be one of {', '.join(map(repr, ADAPTER_DTYPES))}")
        if self.init not in INIT_MODES:
            p.append(f"init={self.init!r}: must be one of {', '.join(map(repr, INIT_MODES))}")
        if not _is_int(self.init_niter) or self.init_niter < 0:
            p.append(f"init_niter={self.init_niter!r}: must be an integer >= 0 (0: exact SVD), e.g. init_niter=4")
        elif self.init_niter and self.init != "pissa":
            p.append(f"init_niter={self.init_niter!r} with init={self.init!r}: only init='pissa' uses a randomized "
                     "SVD; set init='pissa' or init_niter=0")
        if not isinstance(self.rslora, bool):
            p.append(f"rslora={self.rslora!r}: must be True or False")
        if not isinstance(self.dora, bool):
            p.append(f"dora={self.dora!r}: must be True or False")
        elif self.dora and self.init in RESIDUAL_INITS:
            p.append(f"dora=True with init={self.init!r}: lorakit does not start a DoRA adapter from W0's "
                     "decomposition; use init='default' or 'gaussian' with dora, or dora=False with init="
                     f"{self.init!r}")
        p += _pattern_problems("rank_pattern", self.rank_pattern, lambda v: _is_int(v) and v >= 1, "a positive integer")
        p += _pattern_problems("alpha_pattern", self.alpha_pattern, lambda v: _is_number(v) and v > 0, "a positive number")
        return p

    def rank_for(self, path: str) -> int:
        """The rank used for the module at `path` (rank_pattern first, then rank)."""
        return _first_match(self.rank_pattern, path, self.rank)

    def alpha_for(self, path: str) -> float:
        """The alpha used for the module at `path` (alpha_pattern first, then alpha)."""
        return _first_match(self.alpha_pattern, path, self.alpha)

    def scale_for(self, path: str) -> float:
        """The factor in dW = scale * B @ A for the module at `path`."""
        return lora_scale(self.rank_for(path), self.alpha_for(path), self.rslora)

    def replace(self, **changes) -> "LoraConfig":
        """A new validated config with some fields changed (configs are never mutated)."""
        return dataclasses.replace(self, **changes)

    def __reduce__(self):
        # MappingProxyType cannot be pickled or deep-copied (nor, then, a model holding a config).
        return (_from_fields, (self.to_dict(),))

    def to_dict(self) -> dict:
        """Plain JSON-ready fields."""
        return {
            "rank": self.rank,
            "alpha": self.alpha,
            "dropout": self.dropout,
            "targets": None if self.targets is None else list(self.targets),
            "exclude": list(self.exclude),
            "bias": self.bias,
            "init": self.init,
            "init_niter": self.init_niter,
            "rslora": self.rslora,
            "rank_pattern": dict(self.rank_pattern),
            "alpha_pattern": dict(self.alpha_pattern),
            "modules_to_save": list(self.modules_to_save),
            "adapter_dtype": self.adapter_dtype,
            "dora": self.dora,
        }


def _from_fields(fields: dict) -> LoraConfig:
    return LoraConfig(**fields)


def _names(value, nonempty: bool = False) -> bool:
    """A tuple of non-empty strings (non-empty itself if asked)."""
    return isinstance(value, tuple) and (bool(value) or not nonempty) and all(isinstance(t, str) and t for t in value)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _pattern_problems(name: str, patterns, valid, expected: str) -> list[str]:
    if not isinstance(patterns, Mapping):
        return [f"{name}={patterns!r}: must be a mapping from module pattern to value"]
    return [
        f"{name}[{key!r}]={value!r}: must be {expected}"
        for key, value in patterns.items()
        if not isinstance(key, str) or not valid(value)
    ]


def _first_match(patterns: Mapping, path: str, default):
    for pattern, value in patterns.items():
        if path_matches(path, pattern):
            return value
    return default
