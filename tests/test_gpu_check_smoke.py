"""bench/gpu_check.py imports and selects its checks here too (it runs them only where there is a GPU; the
torchrun check also passes with `--device cpu`, on gloo, in about two minutes: too long for every test run)."""
import importlib.util
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.py"


def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_the_torchrun_check_is_registered_and_checks_are_selected_by_name(capsys):
    module = gpu_check()
    assert "torchrun_ddp_and_fsdp_on_nccl" in [fn.__name__ for fn in module.CHECKS]
    assert module.main(["--device", "cpu", "--only", "no-such-check"]) == 0
    assert "0 of 0 checks passed on cpu" in capsys.readouterr().out
