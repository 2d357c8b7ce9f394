"""Launch a harness as two processes on the CPU, as its users do on GPUs (``accelerate launch``)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path


def launch_two_processes(module_args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """``accelerate launch --multi_gpu --num_processes 2 -m MODULE ARGS...`` on the CPU (gloo, which
    accelerate uses there with ``ACCELERATE_USE_CPU=true``), on a free port, one thread each."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    command += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    command += ["--main_process_port", str(port), "-m", *module_args]
    environment = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, capture_output=True, text=True, timeout=600, env=environment, cwd=cwd)
