"""`lorakit` under torchrun, watched: what each rank writes, and (optionally) a rank killed mid-checkpoint.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/rank_watch.py train --out ...

Environment: LORAKIT_TEST_RECORDS=DIR makes every rank write DIR/rank{r}.json at exit: the paths it
opened for writing, created, renamed or removed (Python's audit events; safetensors' Rust writer raises
none, hence also the calls to save_adapter) and whether it ever called save_adapter.
LORAKIT_TEST_KILL=RANK:N makes rank RANK SIGKILL itself as it starts the N-th checkpoint's tensor write.
"""
import atexit
import json
import os
import signal
import sys
from pathlib import Path

import lorakit.io.adapter_files as adapter_files
import lorakit.training.checkpoint as checkpoint
import lorakit.training.train as training
from lorakit.cli import main

RANK = int(os.environ["RANK"])
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
record = {"written": [], "save_adapter_calls": 0}


def audit(event: str, args: tuple) -> None:
    if event == "open" and isinstance(args[0], (str, os.PathLike)):
        mode, flags = args[1], args[2]
        writing = any(c in mode for c in "wax+") if isinstance(mode, str) else bool(flags & WRITE_FLAGS)
        if writing:
            record["written"].append(os.fspath(args[0]))
    elif event == "os.mkdir" and os.path.isdir(args[0]):
        return  # makedirs(exist_ok=True) of a folder rank 0 made: nothing is created
    elif event in ("os.rename", "os.mkdir", "os.remove", "os.rmdir", "shutil.rmtree"):
        record["written"].append(os.fspath(args[0]))


def counted(real):
    def save_adapter(*args, **kwargs):
        record["save_adapter_calls"] += 1
        return real(*args, **kwargs)
    return save_adapter


def dying(real, call: int):
    calls = {"n": 0}

    def save_tensors(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == call:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kwargs)
    return save_tensors


if os.environ.get("LORAKIT_TEST_RECORDS"):
    records = Path(os.environ["LORAKIT_TEST_RECORDS"])
    atexit.register(lambda: (records / f"rank{RANK}.json").write_text(json.dumps(record)))
    training.save_adapter = adapter_files.save_adapter = counted(adapter_files.save_adapter)
    sys.addaudithook(audit)
if os.environ.get("LORAKIT_TEST_KILL"):
    rank, call = map(int, os.environ["LORAKIT_TEST_KILL"].split(":"))
    if rank == RANK:
        checkpoint._save_tensors = dying(checkpoint._save_tensors, call)

sys.exit(main(sys.argv[1:]))
