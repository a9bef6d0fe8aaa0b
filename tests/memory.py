"""Measuring memory for the planner's tests: the bytes a real model holds (bitsandbytes' quantization
state included) and the peak bytes real training steps create, counted with LiveBytes."""
import torch
from torch import nn

from lorakit.training.plan_trace import LiveBytes
from lorakit.training.train import summed_loss


def held_bytes(obj) -> int:
    """Bytes of the distinct storages a model or layer holds: its parameters and buffers, and what
    bitsandbytes hangs on its weights and layers (quant_state and its nested state, Int8Params' CB and
    SCB, Linear8bitLt's MatmulLtState)."""
    storages, seen = {}, set()

    def visit(item, depth=0):
        if id(item) in seen or depth > 4:
            return
        seen.add(id(item))
        if isinstance(item, torch.Tensor):
            storages[item.untyped_storage().data_ptr()] = item.untyped_storage().nbytes()
        if isinstance(item, (list, tuple)):
            for part in item:
                visit(part, depth + 1)
        elif isinstance(item, torch.Tensor) or type(item).__module__.startswith("bitsandbytes"):
            for value in vars(item).values():
                visit(value, depth + 1)

    modules = obj.modules() if isinstance(obj, nn.Module) else [obj]
    for module in modules:
        for tensor in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
            visit(tensor)
        visit(getattr(module, "state", None))
    return sum(storages.values())


def training_peak(model: nn.Module, batch: int, seq: int, vocab: int, steps: int = 2) -> int:
    """Peak bytes of a training run as lorakit train takes its steps (AdamW, summed loss, clipping): what
    the model holds plus the peak of what `steps` steps create (activations, gradients, AdamW states)."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    held = held_bytes(model)
    with LiveBytes() as counter:
        for _ in range(steps):
            optimizer.zero_grad(set_to_none=True)
            (summed_loss(model, inputs, "causal-lm", torch.device("cpu"))[0] / ids.numel()).backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
    return held + counter.peak
