"""dens-infer --engine ray on a cluster of two Ray nodes started as separate `ray start` processes on the
loopback address (a module of its own: `ray stop` ends every Ray on the machine, the other module's too)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ray_cases import same

pytest.importorskip("ray", reason="the Ray engine's tests need the ray extra: pip install 'dens[ray]'")


def test_two_ray_nodes_started_as_processes(mixed_studies, small_model, local_preds, tmp_path):
    bin_dir = Path(sys.executable).parent
    # Loopback only: no token between the nodes (a real cluster keeps Ray's token authentication on).
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    port = 6390 + os.getpid() % 200
    node = ["--node-ip-address=127.0.0.1", "--num-cpus=1"]
    try:
        subprocess.run(
            [bin_dir / "ray", "start", "--head", f"--port={port}", "--include-dashboard=false", *node],
            check=True,
            capture_output=True,
            timeout=180,
            env=env,
        )
        subprocess.run(
            [bin_dir / "ray", "start", f"--address=127.0.0.1:{port}", *node],
            check=True,
            capture_output=True,
            timeout=180,
            env=env,
        )
        out = tmp_path / "preds.csv"
        command = [bin_dir / "dens-infer", mixed_studies, "--out", out, "--model", small_model, "--engine", "ray"]
        done = subprocess.run(
            [*map(str, command), "--ray-address", f"127.0.0.1:{port}", "--no-progress"],
            capture_output=True,
            text=True,
            timeout=400,
            env=env,
        )
        assert done.returncode == 3, done.stderr[-3000:]  # the hostile files' error rows, as locally
        same(local_preds, out)
    finally:
        subprocess.run([bin_dir / "ray", "stop", "--force"], capture_output=True, timeout=120, env=env)
