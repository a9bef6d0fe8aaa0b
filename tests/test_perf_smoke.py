"""bench/perf.py still runs: every section on a tiny GPT-2 in a few seconds, records and report included."""
import json
import time
import subprocess
import sys
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("transformers")

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))  # the harness's modules import each other by name, as when run as scripts

import perf  # noqa: E402
import perf_report  # noqa: E402
import perf_step  # noqa: E402

TINY = perf.Case("gpt2-tiny", batch=2, seq=8, train_batch=2, train_seq=8, train_warmup=1, train_steps=2)


def tiny_settings(tmp_path: Path, **changes) -> perf.Settings:
    fields = dict(cases=(TINY,), infer_repeats=2, merge_repeats=2, io_repeats=2, switch_repeats=3, threads=1,
                  isolate=False, quiet_budget_s=0, profile=False, out=tmp_path / "perf.jsonl", plot=tmp_path / "perf.png",
                  profile_out=tmp_path / "profile.txt", results_md=tmp_path / "RESULTS.md")
    return perf.Settings(**{**fields, **changes})


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One whole run of the harness on the tiny model (training in this process)."""
    tmp_path = tmp_path_factory.mktemp("perf")
    settings = tiny_settings(tmp_path)
    threads = torch.get_num_threads()
    result = perf.run(settings)
    assert torch.get_num_threads() == threads  # the run's thread count is not left behind
    result["meta"]["command"] = "pytest"
    return settings, result


def test_every_measurement_is_recorded(tiny_run):
    settings, result = tiny_run
    records = [json.loads(line) for line in settings.out.read_text().splitlines()]
    assert len({r["run"] for r in records}) == 1
    kinds = Counter(r["kind"] for r in records)
    rounds = TINY.train_warmup + TINY.train_steps
    assert kinds == {"meta": 1, "check": 1, "time": 5 + 4 + 8, "precision": 2, "train_step": len(perf_step.VARIANTS) * rounds, "train": len(perf_step.VARIANTS),
                     "summary": 1, "end": 1}
    assert next(r for r in records if r["kind"] == "check")["passed"]
    times = {(r["section"], r["op"]): r["ms"] for r in records if r["kind"] == "time"}
    assert set(times) >= {("inference", v) for v in perf.INFER_VARIANTS}
    assert all(len(ms) == settings.io_repeats for (section, op), ms in times.items() if section == "io" and "switch" not in op)
    steps = [r for r in records if r["kind"] == "train_step"]
    for round_ in range(rounds):  # every round steps each variant once, the order rotating
        order = [r["variant"] for r in steps if r["round"] == round_]
        assert sorted(order) == sorted(perf_step.VARIANTS) and order[0] == perf_step.VARIANTS[round_ % len(perf_step.VARIANTS)]
    train = {r["variant"]: r for r in records if r["kind"] == "train"}
    assert set(train) == set(perf_step.VARIANTS)
    assert all(r["peak_rss_mb"] >= r["rss_before_mb"] > 0 for r in train.values())
    # Every float32 gradient is alive at once when backward ends; full fine-tuning's are the whole model's.
    assert all(r["live_peak_mb"] * 2**20 >= 4 * r["trainable"] and r["live_after_forward_mb"] > 0 for r in train.values())
    assert train["full"]["live_peak_mb"] > train["lorakit"]["live_peak_mb"] > 0
    assert train["lorakit"]["trainable"] == train["peft"]["trainable"] < train["full"]["trainable"]
    assert train["lorakit-dora"]["trainable"] == train["peft-dora"]["trainable"] > train["lorakit"]["trainable"]  # + m
    assert train["floor"]["trainable"] == train["floor-chunked"]["trainable"] == 0
    summary = result["models"]["gpt2-tiny"]["training"]
    assert summary["rounds"] == TINY.train_steps and not summary["isolated"]


def test_lorakit_merge_drift_is_exactly_zero_and_peft_is_measured_the_same_way(tiny_run):
    _, result = tiny_run
    precision = result["models"]["gpt2-tiny"]["precision"]
    lorakit, peft = precision["lorakit"], precision["peft"]
    assert lorakit["cycles"] == peft["cycles"] == 100
    assert lorakit["weight_dtype"] == peft["weight_dtype"] == "torch.bfloat16"
    assert lorakit["drift_after_1"] == lorakit["drift_after_cycles"] == 0.0
    assert lorakit["changed_elements"] == 0
    assert lorakit["weight_elements"] == peft["weight_elements"] > 0
    # bfloat16 add-then-subtract rounds: PEFT's weights move (the number is what the report shows)
    assert peft["drift_after_cycles"] > 0


def test_report_section_replaces_only_its_own(tiny_run, tmp_path):
    settings, result = tiny_run
    md = tmp_path / "RESULTS.md"
    md.write_text("# Benchmarks\n\n## Mixed-adapter batches\n\nkeep me\n")
    perf_report.write_outputs(result, perf.Settings(**{**asdict(settings), "results_md": md, "plot": tmp_path / "p.png"}))
    text = md.read_text()
    assert "## Mixed-adapter batches\n\nkeep me" in text and text.count(perf_report.HEADING) == 1
    assert (tmp_path / "p.png").stat().st_size > 0
    # A second write keeps hand-written notes and the other section, and still holds one copy of each.
    md.write_text(text.replace("(hand-written notes on this run go here; `bench/perf.py` keeps them)", "my notes")
                  + "\n## Later section\n\nalso kept\n")
    perf_report.write_outputs(result, perf.Settings(**{**asdict(settings), "results_md": md, "plot": None}))
    text = md.read_text()
    assert "my notes" in text and "also kept" in text and "keep me" in text and text.count(perf_report.HEADING) == 1
    rows = perf_report.verdicts(result["models"]["gpt2-tiny"])
    assert len(rows) == len(perf_report.TARGETS) + 1
    assert next(r for r in rows if "W0" in r[0])[2] == perf_report.MET  # the drift target


def test_training_steps_run_in_a_process_of_their_own():
    spec = perf_step.StepSpec(model="gpt2-tiny", variant="lorakit", batch=2, seq=8, threads=1)
    result = perf_step.lockstep({"lorakit": spec}, rounds=2, isolate=True)
    assert result["isolated"] and [s["round"] for s in result["steps"]] == [0, 1]
    assert all(s["step_ms"] > 0 and s["loss"] > 0 for s in result["steps"])
    stats = result["stats"]["lorakit"]
    assert stats["variant"] == "lorakit" and stats["peak_rss_mb"] >= stats["rss_before_mb"] > 0


def test_a_verdict_needs_both_estimates_to_agree():
    target = perf_report.Target("step", 0.9, "x", ("r",))
    summary = lambda median, best: {"r": {"ratio": median, "best": best}}  # noqa: E731
    assert target.verdict(summary(0.8, 0.85))[1] == perf_report.MET
    assert target.verdict(summary(0.95, 1.0))[1] == perf_report.NOT_MET
    measured, state, why = target.verdict(summary(0.8, 1.0))
    assert state == perf_report.INCONCLUSIVE and measured == "0.800x median; 1.000x best"
    assert why == "median 0.100x under; best 0.100x (11%) over"


def test_rounds_with_other_work_are_left_out_of_the_medians():
    assert perf.clean_rounds([0.1, 2.0, 0.2, 0.0]) == [0, 2, 3]
    assert perf.clean_rounds([0.1, 2.0, 1.5, 0.0]) == [0, 1, 2, 3]  # fewer than 3 clean: all rounds
    stats = perf.ratio_stats([2.0, 9.0, 2.0, 2.2], [2.0, 3.0, 2.0, 2.0], [0.0, 1.8, 0.1, 0.2])
    assert stats["ratio"] == 1.0 and stats["ratio_max"] == 1.1 and stats["rounds_used"] == 3
    assert stats["best"] == 1.0  # best times come from every round


# A helper process for the load meter: it spins or runs a meter of its own when told, one command a line.
HELPER = r"""
import sys, time
sys.path.insert(0, sys.argv[1])
import perf_load
print("ready", flush=True)
for line in sys.stdin:
    command, *args = line.split()
    if command == "spin":  # busy for args[0] seconds; answers the CPU seconds it used, by its own clock
        cpu, end = time.process_time(), time.perf_counter() + float(args[0])
        while time.perf_counter() < end:
            pass
        print(time.process_time() - cpu, flush=True)
    elif command == "meter":
        meter = perf_load.Meter()
        print("started", flush=True)
    elif command == "others":
        print(meter.others(), flush=True)
"""


class Helper:
    def __init__(self) -> None:
        self.process = subprocess.Popen([sys.executable, "-c", HELPER, str(BENCH)], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True)
        self.pid = self.process.pid
        assert self.ask() == "ready"

    def ask(self, command: str | None = None) -> str:
        if command is not None:
            self.process.stdin.write(command + "\n")
            self.process.stdin.flush()
        return self.process.stdout.readline().strip()

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=10)


@pytest.fixture
def helper():
    helper = Helper()
    yield helper
    helper.close()


SPIN_S = 0.5
# /proc counts CPU time in ticks (10 ms): a few ticks of rounding over SPIN_S, and the moments of the
# window spent outside the spin, stay well inside this; a meter that missed the spin would be 0.5-1 CPU out.
CPUS_TOLERANCE = 0.15


def test_the_load_meter_counts_another_process_unless_it_is_one_of_ours(helper):
    """The same half second seen by two meters: one told the helper is the benchmark's, one not. Whatever
    else the machine runs adds to both alike, so their difference is the helper's CPU use alone."""
    import perf_load

    theirs, ours = perf_load.Meter(), perf_load.Meter(pids=[helper.pid])
    started = time.perf_counter()
    cpu_s = float(helper.ask(f"spin {SPIN_S}"))
    seen_theirs, seen_ours = theirs.others(), ours.others()
    used = cpu_s / (time.perf_counter() - started)  # CPUs the helper used, by its own clock (not /proc)
    assert used > 0.3, "the helper hardly ran; the machine is too busy for this check"
    assert seen_theirs - seen_ours == pytest.approx(used, abs=CPUS_TOLERANCE)


def test_the_load_meter_does_not_count_the_benchmark_itself(helper):
    """This process spins while its own meter and the helper's watch: the helper's counts the spin as other
    work, this process's own does not."""
    import perf_load

    assert helper.ask("meter") == "started"
    mine = perf_load.Meter()
    started, cpu_s = time.perf_counter(), time.process_time()
    while time.perf_counter() < started + SPIN_S:
        pass
    cpu_s = time.process_time() - cpu_s
    seen_mine = mine.others()
    used = cpu_s / (time.perf_counter() - started)
    seen_helpers = float(helper.ask("others"))
    assert used > 0.3, "this process hardly ran; the machine is too busy for this check"
    assert seen_helpers - seen_mine == pytest.approx(used, abs=CPUS_TOLERANCE)


def test_the_quiet_gate_waits_one_window_when_any_load_will_do():
    import perf_load

    gate = perf_load.QuietGate(threshold=float("inf"), window_s=0.01)
    gate.wait()
    assert 0.01 <= gate.waited_s < 1.0
