"""lorakit.training.plan_models: the published Llama 3.1 8B and 70B, built from their config alone, have the
published parameter counts; the planner's weights are those of the same config built by transformers on the
meta device; they plan in seconds without real memory; a config.json file plans as its name does."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

import lorakit as lk
from lorakit.cli import main
from lorakit.training.plan import plan
from lorakit.training.plan_models import published_config

ROOT = Path(__file__).resolve().parent.parent
# Meta's model cards and the safetensors index of meta-llama/Llama-3.1-8B and -70B: total parameters.
PUBLISHED_PARAMETERS = {"llama-3.1-8b": 8_030_261_248, "llama-3.1-70b": 70_553_706_496}
LORA = lk.LoraConfig(rank=16, targets=("q_proj", "k_proj", "v_proj", "o_proj"))


def meta_model_bytes(name: str, dtype: torch.dtype) -> tuple[int, int]:
    """(parameters, bytes of parameters and buffers) of the architecture, built by transformers on the meta device."""
    with torch.device("meta"):
        model = LlamaForCausalLM._from_config(published_config(name), dtype=dtype)
    params = {id(p): p for p in model.parameters()}.values()
    tensors = [*params, *model.buffers()]
    return sum(p.numel() for p in params), sum(t.numel() * t.element_size() for t in tensors)


@pytest.mark.parametrize("name", PUBLISHED_PARAMETERS)
def test_published_llamas_have_their_published_size_and_weights(name):
    parameters, weights = meta_model_bytes(name, torch.bfloat16)
    assert parameters == PUBLISHED_PARAMETERS[name]
    predicted = plan(name, LORA, batch=1, seq=16, base="bfloat16", full=False)
    assert predicted["total_parameters"] == PUBLISHED_PARAMETERS[name]
    lora = predicted["lora"]  # the bfloat16 base and the float32 adapters
    assert lora["weights_bytes"] == weights + 4 * lora["trainable_parameters"]


# Plans the published 8B and 70B in a fresh process: CPU seconds (this machine's cores are shared: not wall
# time), and the most memory the process ever held.
PLAN_BIG = """
import json, resource, sys, time
from lorakit.training.plan import plan
start = time.process_time()
for name in ("llama-3.1-8b", "llama-3.1-70b"):
    plan(name, rank=16, targets=("q_proj", "k_proj", "v_proj", "o_proj"), batch=8, seq=8192, base="bfloat16",
         world_size=8, strategy="fsdp", full=False)
max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
print(json.dumps({"seconds": time.process_time() - start, "max_rss": max_rss}))
"""


def test_8b_and_70b_plan_in_seconds_without_their_memory():
    done = subprocess.run([sys.executable, "-c", PLAN_BIG], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    assert measured["seconds"] < 20  # 6-7 s: two and three layers traced, the rest scaled
    _, weights_70b = meta_model_bytes("llama-3.1-70b", torch.bfloat16)
    assert measured["max_rss"] < weights_70b / 50  # under 3 GB for 141 GB of weights: nothing real allocated


def test_a_config_json_file_plans_as_its_published_name(tmp_path, capsys):
    published_config("llama-3.1-8b").save_pretrained(tmp_path)
    by_file = plan(str(tmp_path / "config.json"), LORA, batch=8, seq=512, base="bfloat16", world_size=8,
                   strategy="fsdp", full=False)
    by_name = plan("llama-3.1-8b", LORA, batch=8, seq=512, base="bfloat16", world_size=8, strategy="fsdp", full=False)
    assert {**by_file, "model": "llama-3.1-8b"} == by_name
    assert main(["plan", "--model", "no-such-model"]) == 2
    assert "--model='no-such-model': give a published architecture (llama-3.2-1b" in capsys.readouterr().err
