"""lorakit's main paths on a CUDA device, each compared with the same computation on the CPU or with
its own reference: `python bench/gpu_check.py [--out results.json]` (needs a GPU; CI has none).

Tiny random models (tests/tiny.py), so it runs in a minute on any GPU. Prints one line per check and
exits 1 if any fails.
"""
from __future__ import annotations

import argparse
import copy
import json
import shutil
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

import torch
import transformers

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # lorakit from this checkout (installed or not), the tiny models
import lorakit as lk  # noqa: E402
import tiny  # noqa: E402
from lorakit.training.loss import _plain_loss, summed_causal_lm_loss  # noqa: E402

CUDA = torch.device("cuda")  # --device cpu runs the same checks on the CPU (to try the script out)
CHECKS = []


def check(fn):
    CHECKS.append(fn)
    return fn


def llama(root: Path) -> torch.nn.Module:
    return transformers.AutoModelForCausalLM.from_pretrained(tiny.causal_lm_dir(root / "lm")).eval()


def adapted(model, targets="all-linear", rank=4, seed=1):
    lk.inject_(model, lk.LoraConfig(rank=rank, alpha=2.0 * rank, targets=targets))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lk.lora_layers(model):
            layer.adapters["default"].B.copy_(torch.randn(layer.adapters["default"].B.shape, generator=g) * 0.1)
    return model


def ids(model, batch=3, seq=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, model.config.vocab_size, (batch, seq), generator=g)


@check
def forward_backward_match_the_cpu(root):
    cpu = adapted(llama(root))
    gpu = copy.deepcopy(cpu).to(CUDA)
    x = ids(cpu)
    out_cpu, out_gpu = cpu(x).logits, gpu(x.to(CUDA)).logits
    out_cpu.square().mean().backward()
    out_gpu.square().mean().backward()
    grads = max((a.grad - b.grad.cpu()).abs().max().item() for a, b in
                zip((p for p in cpu.parameters() if p.requires_grad), (p for p in gpu.parameters() if p.requires_grad)))
    diff = (out_cpu - out_gpu.cpu()).abs().max().item()
    return diff < 1e-4 and grads < 1e-4, {"logits_max_diff": diff, "grad_max_diff": grads}


@check
def bf16_merge_unmerge_is_bit_exact_after_100_cycles(root):
    model = adapted(llama(root)).to(CUDA, torch.bfloat16)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    with torch.no_grad():
        for _ in range(100):
            lk.merge_(model)
            lk.unmerge_(model)
    changed = sum((p.detach() != before[n]).sum().item() for n, p in model.named_parameters() if n in before)
    return changed == 0, {"weights_changed": changed}


@check
def merged_equals_unmerged(root):
    model = adapted(llama(root)).to(CUDA)
    x = ids(model).to(CUDA)
    with torch.no_grad():
        unmerged = model(x).logits
        lk.merge_(model)
        merged = model(x).logits
    diff = (merged - unmerged).abs().max().item()
    return diff < 1e-4, {"max_diff": diff}


@check
def chunked_loss_matches_the_plain_loss(root):
    result = {}
    ok = True
    for bf16 in (False, True):
        model = adapted(llama(root), targets=("q_proj", "v_proj")).to(CUDA)
        x = ids(model, batch=4, seq=32).to(CUDA)
        batch = {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x}
        chunked = summed_causal_lm_loss(model, batch, bf16=bf16)
        chunked.backward()
        g1 = [p.grad.clone() for p in model.parameters() if p.requires_grad]
        model.zero_grad()
        with torch.autocast(CUDA.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(input_ids=x, attention_mask=batch["attention_mask"]).logits
        plain = _plain_loss(logits, x)
        plain.backward()
        g2 = [p.grad for p in model.parameters() if p.requires_grad]
        rel = abs(chunked.item() - plain.item()) / plain.item()
        grad = max(((a - b).norm() / b.norm()).item() for a, b in zip(g1, g2))
        tol = 2e-2 if bf16 else 1e-5
        ok &= rel < tol and grad < (5e-2 if bf16 else 1e-4)
        result["bf16" if bf16 else "fp32"] = {"loss_rel_diff": rel, "grad_rel_diff": grad}
    return ok, result


@check
def mixed_batch_rows_equal_each_adapter_alone(root):
    model = adapted(llama(root), targets=("q_proj", "v_proj"), seed=1)
    lk.inject_(model, lk.LoraConfig(rank=2, alpha=4, targets=("q_proj", "v_proj")), adapter="other")
    with torch.no_grad():
        for _, layer in lk.lora_layers(model):
            layer.adapters["other"].B.normal_(std=0.1)
    model.to(CUDA)
    x = ids(model, batch=4).to(CUDA)
    names = ["default", "other", None, "default"]
    with torch.no_grad():
        with lk.mixed_batch(model, names):
            mixed = model(x).logits
        alone = []
        for i, name in enumerate(names):
            with lk.use(model, name) if name else lk.disabled(model):
                alone.append(model(x[i:i + 1]).logits)
    diff = (mixed - torch.cat(alone)).abs().max().item()
    return diff < 1e-4, {"max_diff": diff}


@check
def files_move_between_cuda_and_cpu(root):
    gpu = adapted(llama(root)).to(CUDA)
    lk.save_adapter(gpu, root / "from-gpu")
    cpu = llama(root)
    lk.load_adapter(cpu, root / "from-gpu")
    x = ids(cpu)
    with torch.no_grad():
        diff = (cpu(x).logits - gpu(x.to(CUDA)).logits.cpu()).abs().max().item()
    back = llama(root).to(CUDA)
    lk.load_adapter(back, root / "from-gpu")
    with torch.no_grad():
        diff_back = (back(x.to(CUDA)).logits - gpu(x.to(CUDA)).logits).abs().max().item()
    return diff < 1e-4 and diff_back == 0, {"gpu_to_cpu_max_diff": diff, "gpu_to_gpu_max_diff": diff_back}


@check
def analysis_of_a_model_on_cuda(root):
    model = adapted(llama(root), targets=("q_proj", "v_proj")).to(CUDA)
    other = adapted(llama(root), targets=("q_proj", "v_proj"), rank=8, seed=2).to(CUDA)
    result = lk.analyze(lk.model_updates(model), lk.model_updates(other))
    ok = all("amplification" in m and "similarity" in m for m in result["modules"])
    return ok, {"modules": len(result["modules"])}


@check
def lorakit_train_eval_and_resume_on_cuda(root):
    """`lorakit train` on the device (the CLI picks CUDA when there is one), `lorakit eval`, and a run
    resumed from its step-4 checkpoint ending with the uninterrupted run's adapter."""
    from safetensors.torch import load_file

    model_dir = tiny.causal_lm_dir(root / "cli-lm")
    data = root / "text.txt"
    data.write_text("the lord said unto the man and the man said unto the lord\n\n" * 40)
    common = ["--model", str(model_dir), "--data", str(data), "--batch-size", "4", "--max-length", "32",
              "--no-progress", "--lr", "1e-2", "--steps", "8", "--save-every", "4"]

    def lorakit(*args):
        proc = subprocess.run([sys.executable, "-m", "lorakit", *args], capture_output=True, text=True, cwd=ROOT,
                              timeout=300)
        if proc.returncode:
            raise RuntimeError(proc.stderr[-2000:])
        return proc.stdout

    lorakit("train", *common, "--out", str(root / "whole"))
    resumed = root / "resumed" / "checkpoints"
    resumed.mkdir(parents=True)
    shutil.copytree(root / "whole" / "checkpoints" / "step-4", resumed / "step-4")
    (resumed / "latest").write_text("step-4\n")
    shutil.copy(root / "whole" / "log.jsonl", root / "resumed" / "log.jsonl")
    lorakit("train", *common, "--out", str(root / "resumed"), "--resume", str(root / "resumed"))
    whole, again = (load_file(root / run / "adapter" / "adapter_model.safetensors") for run in ("whole", "resumed"))
    resume_diff = max((whole[k] - again[k]).abs().max().item() for k in whole)
    evaluated = json.loads(lorakit("eval", "--model", str(model_dir), "--adapter", str(root / "whole" / "adapter"),
                                   "--data", str(data), "--json"))
    summary = json.loads((root / "whole" / "summary.json").read_text())
    ok = (summary["last_eval"]["eval_loss"] < summary["first_eval"]["eval_loss"] and resume_diff < 1e-5
          and abs(evaluated["loss"] - summary["last_eval"]["eval_loss"]) < 0.5)
    return ok, {"eval_loss": [summary["first_eval"]["eval_loss"], summary["last_eval"]["eval_loss"]],
                "resume_max_diff": resume_diff, "eval_all_examples": evaluated["loss"],
                "peak_memory_bytes": summary["peak_memory_bytes"]}


@check
def torchrun_ddp_and_fsdp_on_nccl(root):
    """`lorakit train --strategy ddp` and `--strategy fsdp` under a one-process torchrun: on a GPU the process
    group is NCCL, which takes CUDA tensors only, so a CPU tensor in any collective (loss sums, token counts,
    evaluation, RNG states, checkpoints) fails here. Each adapter must equal a plain one-process run's; the
    FSDP run resumed from its step-2 checkpoint must end where it did; and an nf4 base must shard."""
    from safetensors.torch import load_file

    model_dir = tiny.causal_lm_dir(root / "lm")
    data = root / "text.txt"
    data.write_text("the lord said unto the man and the man said unto the lord\n\n" * 40)
    common = ["train", "--model", str(model_dir), "--data", str(data), "--batch-size", "4", "--grad-accum", "2",
              "--max-length", "32", "--no-progress", "--lr", "1e-2", "--steps", "4", "--save-every", "2",
              "--dropout", "0.1"]

    def lorakit(out, *args, processes=0):
        launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
        command = [sys.executable, *(launcher if processes else []), "-m", "lorakit", *common, "--out", str(out), *args]
        proc = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=600)
        if proc.returncode:
            raise RuntimeError(f"{' '.join(args)}: {proc.stderr[-3000:]}")
        return load_file(out / "adapter" / "adapter_model.safetensors")

    def differs(a, b):
        return max((a[k] - b[k]).abs().max().item() for k in a)

    single = lorakit(root / "single")
    ddp = lorakit(root / "ddp", "--strategy", "ddp", processes=1)
    fsdp = lorakit(root / "fsdp", "--strategy", "fsdp", processes=1)
    resumed = root / "resumed" / "checkpoints"
    resumed.mkdir(parents=True)
    shutil.copytree(root / "fsdp" / "checkpoints" / "step-2", resumed / "step-2")
    (resumed / "latest").write_text("step-2\n")
    again = lorakit(root / "resumed", "--strategy", "fsdp", "--resume", str(root / "resumed"), processes=1)
    nf4 = {name: lorakit(root / name, "--base-dtype", "nf4", *extra, processes=1)
           for name, extra in (("nf4-ddp", ["--strategy", "ddp"]), ("nf4-fsdp", ["--strategy", "fsdp"]))}
    result = {"ddp_vs_single": differs(single, ddp), "fsdp_vs_single": differs(single, fsdp),
              "fsdp_resumed_vs_whole": differs(fsdp, again), "nf4_fsdp_vs_ddp": differs(nf4["nf4-ddp"], nf4["nf4-fsdp"])}
    # One process: the same sums in the same order as a plain run, up to the collectives' copies.
    ok = all(value < 1e-5 for value in result.values())
    return ok, result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="write every check's result here as JSON")
    parser.add_argument("--device", default="cuda", help="cuda (default), or cpu to try the script out")
    parser.add_argument("--only", help="run only the checks whose name contains this")
    args = parser.parse_args(argv)
    global CUDA
    CUDA = torch.device(args.device)
    if CUDA.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False  # compare float32 with float32
    torch.backends.cudnn.allow_tf32 = False
    name = torch.cuda.get_device_name() if CUDA.type == "cuda" else "cpu"
    results, failed = {"device": name, "torch": torch.__version__,
                       "transformers": transformers.__version__}, 0
    checks = [fn for fn in CHECKS if args.only is None or args.only in fn.__name__]
    for fn in checks:
        with tempfile.TemporaryDirectory() as tmp:
            torch.manual_seed(0)
            try:
                ok, detail = fn(Path(tmp))
            except Exception:
                ok, detail = False, {"error": traceback.format_exc()[-3000:]}
        failed += not ok
        results[fn.__name__] = {"passed": bool(ok), **detail}
        print(f"{'PASS' if ok else 'FAIL'} {fn.__name__}: {json.dumps(detail, default=str)[:600]}", flush=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(f"{len(checks) - failed} of {len(checks)} checks passed on {results['device']}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
