"""Exporting an adapter for other servers: whether vLLM or LoRAX can serve it as is, and a copy they can.

vLLM and LoRAX read PEFT's folder layout, but less of it than PEFT does. Their rules, as read in
their source:

- vLLM, vllm/lora/peft_helper.py (PEFTHelper.validate_legal and __post_init__): modules_to_save
  must be empty (recent versions let classification models keep ["classifier", "score"]); use_dora
  is refused; bias must be "none" ("Adapter bias is not supported"; older versions needed
  --enable-lora-bias); r must not exceed the server's --max-lora-rank (vllm/config/lora.py: 16 by
  default). The scale is lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora, one number for the
  whole adapter: most versions read have no rank_pattern or alpha_pattern field (from_dict drops
  fields it does not know), so a module with its own rank or alpha is mis-scaled; only the newest
  reads them (PEFTHelper.get_rank_and_scaling), and LoRAX never does.
- vLLM, vllm/lora/lora_model.py (LoRAModel.from_local_checkpoint) and vllm/lora/utils.py
  (parse_fine_tuned_lora_name): every tensor must be a module's lora_A/lora_B.weight (or
  lora_embedding_A/B) and the module one of the model's LoRA modules: its linear layers, and its
  token embedding only where the model declares it (vllm/lora/layers/: no convolution layers).
- LoRAX, server/lorax_server/adapters/lora.py: reads r, lora_alpha, use_rslora and the lora_A/lora_B
  weights of linear layers only, scales every layer by one get_scaling_factor(lora_alpha, r,
  use_rslora), and stacks the factors of all layers of one type, which needs one rank.

export_adapter writes a copy within these rules where the math allows: each module's own scale s_m
(its rank, its alpha, rslora) is folded into its B (B' = s_m * B), smaller ranks are zero-padded to
the largest (exact: the added rows of A and columns of B are zero), and the config says one r with
lora_alpha = r (scale 1). Modules saved in full, nonzero biases, and embedding or convolution
adapters have no such form: export refuses them and says what to do instead. So are DoRA adapters
(use_dora=true): their update rescales W0's rows, which no B @ A expresses.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..core.config import LoraConfig
from ..core.layers import LoraEmbedding
from ..core.lowrank import padded_to_rank
from ..errors import LoraError, problems_error
from . import peft
from .adapter_files import META_CHECKSUM, META_CONFIG, read_adapter
from .files import check_out_folder, write_folder_atomically
from .integrity import tensor_checksum
from .peft import CONFIG_FILE, PREFIX, WEIGHTS_FILE

SERVERS = ("vllm",)  # LoRAX reads a subset of what vLLM reads: "vllm" checks for both
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vllm/config/lora.py: MaxLoRARanks
MERGE_INSTEAD = "serve a merged model instead (`lorakit merge`)"


@dataclasses.dataclass(frozen=True)
class Reason:
    """Why an adapter cannot be served as is: the config field at fault, a sentence naming it and its
    value, and whether export_adapter fixes it."""

    field: str
    text: str
    fixable: bool

    def __str__(self) -> str:
        return self.text


@dataclasses.dataclass(frozen=True)
class _Adapter:
    """An adapter folder, read: its config JSON, tensors and metadata, its factor pairs (path ->
    (key of A, key of B)) and the LoraConfig that gives each module's rank, alpha and scale."""

    raw: dict
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]
    pairs: dict[str, tuple[str, str]]
    config: LoraConfig

    @classmethod
    def read(cls, directory: Path) -> _Adapter:
        raw, tensors, metadata = read_adapter(directory)
        pairs = peft.factor_pairs(tensors, directory / WEIGHTS_FILE)
        return cls(raw, tensors, metadata, pairs, peft.lorakit_config(raw, list(pairs), []))

    def rank(self, path: str) -> int:
        return self.tensors[self.pairs[path][0]].shape[0]

    def max_rank(self) -> int:
        return max(self.rank(p) for p in self.pairs)

    def other_keys(self) -> tuple[list[str], list[str]]:
        """(bias keys, keys of modules saved in full or unknown): every key that is no LoRA factor."""
        factors = {key for pair in self.pairs.values() for key in pair}
        factors |= {peft.magnitude_key(p) for p in self.pairs if self.raw.get("use_dora")}  # DoRA's: _dora refuses
        rest = [key for key in self.tensors if key not in factors]
        saved = [key for key in rest if _in_saved_module(key, peft.save_names(self.raw))]
        trains_biases = self.raw.get("bias", "none") != "none"
        biases = [key for key in rest if key not in saved and trains_biases and key.endswith(".bias")]
        return biases, [key for key in rest if key not in biases]


def _in_saved_module(key: str, names: list[str]) -> bool:
    parts = key.removeprefix(PREFIX).split(".")
    return any(peft.peft_saves(".".join(parts[:i]), names) for i in range(1, len(parts)))


# --- the rules: each returns a Reason or None -------------------------------------------------------
def _dora(adapter: _Adapter) -> Reason | None:
    if not adapter.raw.get("use_dora"):
        return None
    text = ("use_dora=True: vLLM refuses DoRA adapters and LoRAX ignores their magnitude vectors "
            "(lora_magnitude_vector); the update m * (W0 + dW) / ||W0 + dW|| rescales each row of W0, which no "
            f"low-rank B @ A expresses. Export cannot fix this: {MERGE_INSTEAD}, or train without DoRA")
    return Reason("use_dora", text, fixable=False)


def _modules_saved_in_full(adapter: _Adapter) -> Reason | None:
    _, copies = adapter.other_keys()
    names = peft.save_names(adapter.raw)
    if not copies and not names:
        return None
    text = (f"modules_to_save={names!r}: the file holds {len(copies)} tensor(s) of modules saved in full or of no "
            f"LoRA factor (e.g. {copies[:1]!r}); vLLM refuses modules_to_save (but a classifier head, in recent "
            "versions) and any tensor but lora_A/lora_B, and LoRAX ignores them. Export cannot fix this: train "
            f"without modules to save, or {MERGE_INSTEAD}")
    return Reason("modules_to_save", text, fixable=False)


def _biases(adapter: _Adapter) -> Reason | None:
    mode = adapter.raw.get("bias", "none")
    if mode == "none":
        return None
    keys, _ = adapter.other_keys()
    nonzero = [key for key in keys if adapter.tensors[key].any()]
    refused = f"bias={mode!r}: vLLM refuses any bias but 'none' and LoRAX ignores biases"
    if nonzero:
        text = (f"{refused}, and this file holds {len(nonzero)} nonzero bias tensor(s) (e.g. {nonzero[0]!r}), which "
                "replace the base's biases and are no low-rank product B @ A. Export cannot fix this: train with "
                f"bias 'none', or {MERGE_INSTEAD}")
        return Reason("bias", text, fixable=False)
    if keys:
        text = (f"{refused}; this file's {len(keys)} bias tensor(s) are all zero. Export fixes this: it drops them "
                "and writes bias 'none' (the same model where the base's biases are zero too)")
    else:
        text = (f"{refused}; this file holds no bias tensors (no adapted module has one). Export fixes this: it "
                "writes bias 'none'")
    return Reason("bias", text, fixable=True)


def _layer_kinds(adapter: _Adapter) -> Reason | None:
    embeddings = [p for p in adapter.pairs if peft.factor_keys(LoraEmbedding, p)[0] in adapter.tensors]
    convs = [p for p, (key_a, _) in adapter.pairs.items() if adapter.tensors[key_a].dim() > 2]
    if not embeddings and not convs:
        return None
    kinds = [f"{kind} layers {paths[:3]}" for kind, paths in (("embedding", embeddings), ("convolution", convs))
             if paths]
    text = (f"target_modules={adapter.raw['target_modules']!r} adapts {' and '.join(kinds)}; LoRAX adapts linear "
            "layers only, vLLM linear layers and, on some models, the token embedding. Export cannot fix this: "
            f"train without those targets, or {MERGE_INSTEAD}")
    return Reason("target_modules", text, fixable=False)


def _ranks(adapter: _Adapter) -> Reason | None:
    r = adapter.config.rank
    ranks = sorted({adapter.rank(p) for p in adapter.pairs})
    if ranks == [r]:
        return None
    scale = f"lora_alpha/sqrt({r})" if adapter.config.rslora else f"lora_alpha/{r}"
    text = (f"rank_pattern={_shown(adapter.raw.get('rank_pattern'))}: the modules have rank {_listed(ranks)}, but "
            f"vLLM and LoRAX read one r={r} for the whole adapter (every module scaled by {scale}), and LoRAX stacks "
            f"each layer type's factors. Export fixes this: it zero-pads every module to rank {ranks[-1]} and folds "
            "each module's own scale into its B (exact)")
    return Reason("rank_pattern", text, fixable=True)


def _alphas(adapter: _Adapter) -> Reason | None:
    alpha = adapter.config.alpha
    alphas = sorted({adapter.config.alpha_for(p) for p in adapter.pairs})
    if alphas == [alpha]:
        return None
    text = (f"alpha_pattern={_shown(adapter.raw.get('alpha_pattern'))}: the modules have alpha {_listed(alphas)}, "
            f"but vLLM and LoRAX apply one lora_alpha={alpha:g} to the whole adapter. Export fixes this: it folds "
            "each module's own scale into its B (exact)")
    return Reason("alpha_pattern", text, fixable=True)


def _shown(patterns: dict | None) -> str:
    """A pattern dict as Python writes it, its first three entries only where it has more."""
    if not patterns or len(patterns) <= 3:
        return repr(patterns)
    first = ", ".join(f"{k!r}: {v!r}" for k, v in list(patterns.items())[:3])
    return f"{{{first}, ...}} ({len(patterns)} entries)"


def _listed(values: list) -> str:
    return ", ".join(f"{v:g}" for v in values)


RULES = (_dora, _modules_saved_in_full, _biases, _layer_kinds, _ranks, _alphas)


def _reasons(adapter: _Adapter) -> list[Reason]:
    return [reason for rule in RULES if (reason := rule(adapter)) is not None]


# --- public -----------------------------------------------------------------------------------------
def servability(adapter_dir: str | os.PathLike, server: str = "vllm") -> list[Reason]:
    """Why `server` (vLLM, and LoRAX with it) cannot serve the adapter folder as is; empty: it can.

    Each Reason names the config field and value, and says whether export_adapter fixes it.
    Reads JSON and safetensors only (no pickle), without the base model; raises LoraError for a
    folder lorakit cannot read.
    """
    _check_server(server)
    return _reasons(_Adapter.read(Path(adapter_dir)))


def export_adapter(adapter_dir: str | os.PathLike, out_dir: str | os.PathLike, server: str = "vllm",
                   force: bool = False) -> Path:
    """Write a copy of an adapter folder that `server` (vLLM, and LoRAX with it) serves as the
    adapter it is: a plain PEFT adapter with one rank r and lora_alpha = r, each module's scale
    folded into its B and smaller ranks zero-padded. lorakit metadata that still holds (base model,
    task, fingerprint, ...) is kept; the checksum is recomputed.

    Raises LoraError, writing nothing, for what has no such form (modules saved in full, nonzero
    biases, embedding or convolution adapters). `out_dir` appears whole or not at all; one that
    already holds files is replaced only with force=True.
    """
    _check_server(server)
    source, out = Path(adapter_dir), check_out_folder(out_dir, force)
    if out.resolve() == source.resolve():
        raise LoraError(f"out={str(out)!r} is the adapter being exported; choose another folder")
    adapter = _Adapter.read(source)
    refused = [str(reason) for reason in _reasons(adapter) if not reason.fixable]
    if refused:
        raise problems_error(f"{source}: cannot be exported for {server}", refused)
    tensors = _servable_tensors(adapter)
    header = {"format": "pt", **_kept_metadata(adapter.metadata), META_CHECKSUM: tensor_checksum(tensors)}
    text = json.dumps(_servable_config(adapter), indent=2, sort_keys=True) + "\n"

    def write(folder: Path) -> None:
        save_file(tensors, folder / WEIGHTS_FILE, metadata=header)
        (folder / CONFIG_FILE).write_text(text)

    return write_folder_atomically(out, write, force)


def vllm_max_lora_rank(rank: int) -> int | None:
    """The smallest --max-lora-rank vLLM accepts that serves `rank`; None above vLLM's largest."""
    return next((r for r in VLLM_MAX_LORA_RANKS if r >= rank), None)


# --- the servable copy ------------------------------------------------------------------------------
def _servable_tensors(adapter: _Adapter) -> dict[str, torch.Tensor]:
    """Each module's (A, s_m * B), zero-padded to the largest rank; biases left out."""
    rank = adapter.max_rank()
    tensors = {}
    for path, (key_a, key_b) in adapter.pairs.items():
        A, B = adapter.tensors[key_a], adapter.tensors[key_b]
        scaled = (B.double() * adapter.config.scale_for(path)).to(B.dtype)  # one rounding of s_m * B
        A, B = padded_to_rank(A, scaled, rank)
        tensors[key_a], tensors[key_b] = A.contiguous(), B.contiguous()
    return tensors


def _servable_config(adapter: _Adapter) -> dict:
    """A plain PEFT config: one r, lora_alpha = r, no patterns, bias and modules to save off."""
    raw, paths = adapter.raw, list(adapter.pairs)
    rank = adapter.max_rank()
    # alpha = r: scale 1 for vLLM and LoRAX alike (use_rslora off); every module's own scale is in its B
    config = LoraConfig(rank=rank, alpha=rank, dropout=adapter.config.dropout, targets=tuple(paths))
    return peft.config_json(config, paths, _plain_targets(raw, paths), raw.get("task_type"),
                            raw.get("base_model_name_or_path"), bool(raw.get("fan_in_fan_out")), [])


def _plain_targets(raw: dict, paths: list[str]) -> list[str]:
    """Module names that select exactly `paths` by PEFT's rules: the last names of the paths where the
    adapter chose its modules by last name alone (then it adapted every module so named), else the
    full paths (a regex, all-linear, full paths or excluded modules chose them)."""
    targets = raw["target_modules"]
    by_last_name = isinstance(targets, list) and all("." not in t for t in targets) and not raw.get("exclude_modules")
    return sorted({p.rsplit(".", 1)[-1] for p in paths}) if by_last_name else sorted(paths)


def _kept_metadata(metadata: dict[str, str]) -> dict[str, str]:
    """lorakit's entries that still hold for the copy: all but the LoraConfig as trained (its ranks and
    alphas are now in the B's) and the checksum (recomputed)."""
    return {k: v for k, v in metadata.items() if k.startswith("lorakit_") and k not in (META_CONFIG, META_CHECKSUM)}


def _check_server(server: str) -> None:
    if server not in SERVERS:
        raise LoraError(f"server={server!r}: lorakit knows the rules of {', '.join(map(repr, SERVERS))} "
                        "(LoRAX reads the same subset of PEFT's format); choose one of those")
