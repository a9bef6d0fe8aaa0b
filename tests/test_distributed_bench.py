"""bench/distributed.py's bookkeeping: the bytes a collective is counted at, FSDP's padded sizes, the table.
(The benchmark itself runs torchrun several times: `make bench-distributed BENCH_ARGS=--quick` smoke-runs it.)"""
import importlib.util
import sys
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"


def bench_module():
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location("distributed_bench", BENCH / "distributed.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


bench = bench_module()


def test_collectives_are_counted_at_their_whole_tensor():
    counted = {kind: 0 for kind in bench.KINDS}
    calls = []
    gather = bench._counting(lambda *a, **k: calls.append(a), "all_gather", counted)
    scatter = bench._counting(lambda *a, **k: calls.append(k), "reduce_scatter", counted)
    gather(torch.empty(8, 4), torch.empty(4, 4), group=None)  # output first: the gathered whole
    scatter(output=torch.empty(2, dtype=torch.bfloat16), input=torch.empty(6, dtype=torch.bfloat16), op=None)
    assert counted == {"all_reduce": 0, "all_gather": 8 * 4 * 4, "reduce_scatter": 6 * 2} and len(calls) == 2


def test_fsdp_sizes_pad_the_first_dimension_to_the_processes():
    assert bench._bytes(torch.empty(5, 3), 2) == 6 * 3 * 4
    assert bench._bytes(torch.empty(5, 3, dtype=torch.bfloat16), 1) == 5 * 3 * 2


def test_the_table_compares_counts_with_predictions():
    run = {"strategy": "fsdp", "processes": 2, "step_seconds": 1.5, "tokens_per_second": 170.0, "held_bytes": 2**29,
           "peak_rss_mb": 900.0, "steady_rss_mb": 800.0, "trimmed_rss_mb": 600.0, "trainable_bytes": 2**20,
           "bytes_per_step": {"all_reduce": 8, "all_gather": 3 * 2**30, "reduce_scatter": 2**20},
           "predicted_bytes": {"all_reduce": 8, "all_gather": 3 * 2**30, "reduce_scatter": 2**21}}
    row = bench.table([run]).splitlines()[-1]
    assert row == ("| fsdp | 2 | 1.500 | 170 | 512.0 MB | 900 MB | 800 MB | 600 MB | 8 B (=) | 3.00 GB (=) | "
                   "1.00 MB (predicted 2.00 MB) | 3073.0x |")
