"""Worker processes: each config is compiled, gated and timed in a child process that the tuner can kill.

A CUDA fault poisons the context of the process it happens in, and a hung kernel never returns, so the study
process never launches a kernel itself. It talks to long-lived children over pipes, one JSON object per line:

    parent ─► {"op": "gate", "shape": ..., "gate_shape": ..., "params": ...}   ─► child
    parent ◄─ Outcome as JSON: {"status": "ok" | "wrong_answer" | "compile_error" | ..., "reason": ..., ...} ◄─ child

Both sides speak :class:`tuner.outcome.Outcome`: the child sends one, :meth:`WorkerProcess.call` returns one.
A child that faults answers once and exits; one that does not answer within the timeout is killed. Either way
:class:`WorkerProcess` restarts it for the next request and the request is reported as an outcome (FAULT,
TIMEOUT, CRASH), never raised. Children stay alive between requests so that torch, the CUDA context, the
inputs of the current shape and the float64 reference are paid for once per study, not once per trial.

Run as ``python -m gdn2_tune.tuner.worker``; ``--interpret`` children are started with TRITON_INTERPRET=1 by the parent.
"""

from __future__ import annotations

import importlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, TextIO

from gdn2_tune.kernels.spec import DEFAULT_OP
from gdn2_tune.tuner.outcome import FATAL, Outcome, Status, failed, ok

STDERR_TAIL_CHARS = 2000
REFERENCE_THREADS = 2
# A module a worker imports as it starts, before its first request (the tuned op's kernels: tuner.run.worker_env).
PRELOAD_ENV = "GDN2_TUNE_WORKER_PRELOAD"


# ---------------------------------------------------------------------------------------------------------------
# The child side


class _Child:
    """State of one worker process: the device, and the inputs/reference of the shape it last served."""

    def __init__(self) -> None:
        import torch

        self.device = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
        self.interpret = self.device == "cpu"
        if not self.interpret:
            # Many gate workers share the host's cores with Triton's compiles; the float64 reference must not
            # start 16 threads in each of them.
            torch.set_num_threads(REFERENCE_THREADS)
        self._benches: dict[tuple[str, Any, bool], Any] = {}
        self._references: dict[Any, Any] = {}

    def bench(self, shape_d: Mapping[str, Any], strong_decay: bool = False, kernel: str = DEFAULT_OP) -> Any:
        from gdn2_tune.kernels.config import Shape
        from gdn2_tune.tuner.measure import Bench

        shape = Shape(**shape_d)
        key = (kernel, shape, strong_decay)
        if key not in self._benches:
            # One tuned shape at a time (plus its gate shape): the inputs of a suite shape are ~1 GB on the GPU.
            if len(self._benches) >= 2:
                self._benches.clear()
                self._references.clear()
                if not self.interpret:
                    import torch

                    torch.cuda.empty_cache()
            self._benches[key] = Bench(shape, self.device, op=kernel, strong_decay=strong_decay)
        return self._benches[key]

    def reference(self, bench: Any) -> Any:
        """The op's float64 results at the bench's inputs (KernelSpec.prepare's ``reference``), once per bench."""
        key = (bench.spec.name, bench.shape)
        if key not in self._references:
            self._references[key] = bench.run.reference()
        return self._references[key]

    def handle(self, req: dict[str, Any]) -> Outcome:
        from gdn2_tune.kernels.spec import get_spec
        from gdn2_tune.tuner import measure

        # The kernel op (a KernelSpec name) and the module whose import registers it: an op registered outside
        # this package (a test's toy op) is known to this process only once its module is imported.
        kernel = req.get("kernel", DEFAULT_OP)
        if req.get("kernel_module"):
            importlib.import_module(req["kernel_module"])
        op = req.get("op")
        if op == "ping":
            return ok(pid=os.getpid(), device=self.device)
        if op == "telemetry":
            from gdn2_tune.tuner.device import telemetry

            return ok(telemetry=telemetry(interpret=self.interpret).to_dict())
        if op == "roofs":
            from gdn2_tune.profiles.table import DeviceInfo
            from gdn2_tune.tuner.roofs import measure_roofs

            return ok(roofs=measure_roofs(DeviceInfo.from_dict(req["device"])).to_dict())

        if op == "served":
            # The dispatcher of this process sees the tuned GPU (or the interpreter) and the user's environment.
            from gdn2_tune.tuner.known import served_now

            return ok(served=served_now(req["shapes"], kernel))

        spec = get_spec(kernel)
        t0 = time.perf_counter()
        if op == "gate":
            cfg = spec.from_flat(req["params"])
            gb = self.bench(req["gate_shape"], strong_decay=True, kernel=kernel)
            out = measure.gate(gb, self.reference(gb), cfg)
            if out.ok and req["gate_shape"] != req["shape"]:
                warmed = measure.warm(self.bench(req["shape"], kernel=kernel), cfg)
                out = Outcome(warmed.status, warmed.reason, {**out.data, **warmed.data})
        elif op == "time":
            out = measure.time_config(self.bench(req["shape"], kernel=kernel), spec.from_flat(req["params"]))
        elif op == "retime":
            cfgs = [spec.from_flat(p) for p in req["configs"]]
            out = measure.retime(self.bench(req["shape"], kernel=kernel), cfgs, int(req.get("rounds", 5)))
        elif op == "stages":
            cfgs = [spec.from_flat(p) for p in req["configs"]]
            out = measure.stage_times(self.bench(req["shape"], kernel=kernel), cfgs)
        else:
            return failed(Status.ERROR, f"unknown op {op!r}")
        out = out.with_data(elapsed_s=time.perf_counter() - t0)
        if op in ("time", "retime"):
            from gdn2_tune.tuner.device import telemetry

            out = out.with_data(telemetry=telemetry(interpret=self.interpret).to_dict())
        return out


def child_main(stdin: TextIO, reply: TextIO) -> int:
    child: _Child | None = None
    # Pay for torch and the op's kernels (Triton) before the first request, while the parent is still setting up
    # (WorkerPool.start): 30 workers importing them in the first study cost seconds of its search. A failure here
    # is left for the first request to raise and answer.
    try:
        child = _Child()
        if os.environ.get(PRELOAD_ENV):
            importlib.import_module(os.environ[PRELOAD_ENV])
    except Exception:  # noqa: BLE001 - answered by the first request
        child = None
    for line in stdin:
        if not line.strip():
            continue
        fatal = False
        try:
            req = json.loads(line)
            if child is None:
                child = _Child()
            out = child.handle(req)
        except Exception as err:  # noqa: BLE001 - every failure becomes an answer; see the module docstring
            from gdn2_tune.tuner.measure import classify

            status, reason = classify(err)
            traceback.print_exc(file=sys.stderr)
            out = failed(status, reason)
            fatal = status in FATAL
        reply.write(json.dumps(out.to_json(), default=float) + "\n")
        reply.flush()
        if fatal:
            return 3
    return 0


def main() -> int:
    # Replies go to the original stdout; anything else that prints (Triton, torch, C libraries writing to fd 1)
    # goes to stderr, so that it can never corrupt the reply stream.
    reply = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return child_main(sys.stdin, reply)


# ---------------------------------------------------------------------------------------------------------------
# The parent side


def worker_argv() -> list[str]:
    return [sys.executable, "-m", "gdn2_tune.tuner.worker"]


class WorkerProcess:
    """One child, restarted on demand. :meth:`call` blocks and always returns an :class:`Outcome`."""

    def __init__(self, name: str, env: Mapping[str, str], log_dir: Path, argv: Sequence[str] | None = None) -> None:
        self.name = name
        self.env = dict(env)
        self.argv = list(argv) if argv is not None else worker_argv()
        self.log_path = Path(log_dir) / f"worker-{name}.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._proc: subprocess.Popen[str] | None = None
        self._lines: queue.Queue[str | None] = queue.Queue()
        self.restarts = 0

    def _start(self) -> None:
        log = open(self.log_path, "a")  # noqa: SIM115 - owned by the child for its lifetime
        log.write(f"--- start {time.strftime('%H:%M:%S')} ---\n")
        log.flush()
        self._proc = subprocess.Popen(
            self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True, bufsize=1,
            env=self.env, cwd=os.getcwd(), start_new_session=True,  # own process group: kill takes its children
        )
        log.close()
        self._lines = queue.Queue()
        proc, lines = self._proc, self._lines

        def pump() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                lines.put(line)
            lines.put(None)

        threading.Thread(target=pump, daemon=True, name=f"pump-{self.name}").start()

    def _stderr_tail(self) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        text = text[text.rfind("--- start") :]
        return " | ".join(line.strip() for line in text.splitlines()[-6:] if line.strip())[-STDERR_TAIL_CHARS:]

    def kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                proc.kill()
        proc.wait()
        for stream in (proc.stdin, proc.stdout):
            try:
                if stream is not None:
                    stream.close()
            except OSError:
                pass

    def start(self) -> None:
        """Start the child now (it imports torch and the preloaded module at once) rather than at the first
        request. Does not wait; call it only before the worker serves requests."""
        if self._proc is None:
            self._start()

    def call(self, request: Mapping[str, Any], timeout: float) -> Outcome:
        if self._proc is None or self._proc.poll() is not None:
            if self._proc is not None:
                self.kill()
                self.restarts += 1
            self._start()
        assert self._proc is not None and self._proc.stdin is not None
        t0 = time.monotonic()
        try:
            self._proc.stdin.write(json.dumps(request) + "\n")
            self._proc.stdin.flush()
        except (BrokenPipeError, OSError):
            self.kill()
            return failed(Status.CRASH, f"worker {self.name} exited before the request: {self._stderr_tail()}")
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            self.kill()
            return failed(Status.TIMEOUT, f"no answer within {timeout:.0f} s (hang or very slow compile)")
        if line is None:
            code = self._proc.wait() if self._proc is not None else None
            tail = self._stderr_tail()
            self.kill()
            return failed(Status.CRASH, f"worker {self.name} died (exit code {code}): {tail}")
        try:
            answer = json.loads(line)
            if not isinstance(answer, dict):
                raise TypeError(f"expected a JSON object, received {type(answer).__name__}")
        except (json.JSONDecodeError, TypeError):
            self.kill()
            return failed(Status.CRASH, f"worker {self.name} sent an unreadable answer: {line[:200]!r}")
        out = Outcome.from_json(answer)
        if "wall_s" not in out.data:
            out = out.with_data(wall_s=time.monotonic() - t0)
        if out.status in FATAL:
            self.kill()  # it exits by itself; make sure, and start a fresh one next time
        return out


class WorkerPool:
    """``size`` workers behind a thread pool: :meth:`submit` runs a request on the next free one."""

    def __init__(self, size: int, make: Callable[[int], WorkerProcess]) -> None:
        self.workers = [make(i) for i in range(size)]
        self._free: queue.Queue[WorkerProcess] = queue.Queue()
        for w in self.workers:
            self._free.put(w)
        self._executor = ThreadPoolExecutor(max_workers=size, thread_name_prefix="worker")

    @property
    def size(self) -> int:
        return len(self.workers)

    def call(self, request: Mapping[str, Any], timeout: float) -> Outcome:
        worker = self._free.get()
        try:
            return worker.call(request, timeout)
        finally:
            self._free.put(worker)

    def start(self) -> None:
        """Start every worker process now, without waiting (before the pool serves requests)."""
        for w in self.workers:
            w.start()

    def submit(self, request: Mapping[str, Any], timeout: float) -> Future[Outcome]:
        return self._executor.submit(self.call, request, timeout)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        for w in self.workers:
            w.kill()


if __name__ == "__main__":
    sys.exit(main())
