"""lorakit: Low-Rank Adaptation for any PyTorch model, with lossless merge and PEFT-compatible files."""
from .core.adapters import delete_adapter, disabled
from .core.combine import CombineConfig
from .core.combined import combine_adapters
from .core.identity import active_adapter, adapter_config, adapter_paths, adapters, merged_adapter, set_active, use
from .analysis.measures import (Update, adapter_updates, amplification, analyze, effective_rank, energy_rank, model_updates,
                       spectrum, subspace_similarity, weight_updates)
from .serving.cache import AdapterCache
from .core.config import LoraConfig
from .errors import LoraError
from .core.inject import inject_, resolve_modules_to_save, resolve_targets
from .io.adapter_files import adapter_info, load_adapter, save_adapter
from .io.export import export_adapter, servability
from .core.layers import DoraAdapter, LoraAdapter, LoraLayer, ResidualAdapter, lora_layers
from .core.lowrank import delta_weight, lora_scale
from .core.merge import merge_, merge_dense_, unload_, unmerge_
from .core.mixed import mixed_batch
from .core.modules_to_save import ModuleToSave, saved_modules
from .core.params import parameter_counts
from .core.precision import BASE_DTYPES, BasePrecision, precision_of
from .training.lora_plus import lora_plus_groups
from .zoo import BUNDLED, load_base, load_bundled, load_model

__version__ = "0.1.0"

__all__ = [
    "AdapterCache",
    "BASE_DTYPES",
    "BUNDLED",
    "BasePrecision",
    "CombineConfig",
    "DoraAdapter",
    "LoraAdapter",
    "LoraConfig",
    "LoraError",
    "LoraLayer",
    "ModuleToSave",
    "ResidualAdapter",
    "Update",
    "active_adapter",
    "adapter_config",
    "adapter_info",
    "adapter_paths",
    "adapter_updates",
    "adapters",
    "amplification",
    "combine_adapters",
    "analyze",
    "delete_adapter",
    "delta_weight",
    "disabled",
    "effective_rank",
    "energy_rank",
    "export_adapter",
    "inject_",
    "load_adapter",
    "load_base",
    "load_bundled",
    "load_model",
    "lora_layers",
    "lora_plus_groups",
    "lora_scale",
    "merge_",
    "merge_dense_",
    "merged_adapter",
    "mixed_batch",
    "model_updates",
    "parameter_counts",
    "precision_of",
    "resolve_modules_to_save",
    "resolve_targets",
    "save_adapter",
    "saved_modules",
    "servability",
    "set_active",
    "spectrum",
    "subspace_similarity",
    "unload_",
    "unmerge_",
    "use",
    "weight_updates",
]
