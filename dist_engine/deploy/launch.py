"""``dist-engine launch`` (one workstation) and ``dist-engine join`` (add a machine).

``launch`` runs the preflight, starts a local Ray head (or joins ``--ray-address``), then runs
``dist-engine serve`` on that cluster with the given layout. The NCCL switches workstation cards
often need are environment variables for every rank:

- ``--nccl-p2p-off`` (NCCL_P2P_DISABLE=1): consumer / workstation GPUs without working
  peer-to-peer (no NVLink, PCIe ACS or IOMMU in the way) hang or crash in the first all-reduce.
- ``--nccl-socket-ifname IF`` (NCCL_SOCKET_IFNAME): NCCL picks a docker or VPN interface and
  ranks cannot reach each other ("unhandled system error", timeouts at start-up).
- ``--nccl-no-shm`` (NCCL_SHM_DISABLE=1): containers with a tiny /dev/shm fail with "Bus error".
- ``--nccl-debug`` (NCCL_DEBUG=INFO): print NCCL's own choice of transports.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time

from dist_engine.deploy.preflight import run_preflight

NCCL_FLAGS = (("nccl_p2p_off", "NCCL_P2P_DISABLE", "1"), ("nccl_no_shm", "NCCL_SHM_DISABLE", "1"),
              ("nccl_debug", "NCCL_DEBUG", "INFO"))


def nccl_env(a) -> dict[str, str]:
    env = {var: value for flag, var, value in NCCL_FLAGS if getattr(a, flag)}
    if a.nccl_socket_ifname:
        env["NCCL_SOCKET_IFNAME"] = a.nccl_socket_ifname
    if a.gpus:
        env["CUDA_VISIBLE_DEVICES"] = a.gpus
    return env


def _ray() -> str:
    exe = shutil.which("ray")
    if exe is None:
        raise ValueError("the `ray` command is not on PATH; install ray (it comes with dist-engine)")
    return exe


def cmd_launch(a, serve_args: list[str]) -> int:
    from dist_engine.weights.registry import resolve_model

    env = {**os.environ, **nccl_env(a)}
    os.environ.update(nccl_env(a))  # the preflight's all-reduce runs with the same settings
    path = resolve_model(a.model)
    report = run_preflight(path, a.tp, a.device, a.kv_cache_memory, a.memory_fraction, a.cp)
    print(f"preflight for {a.model} at TP={a.tp} x CP={a.cp} on {a.device}:")
    print("\n".join(report.lines), flush=True)
    if report.problems and not a.force:
        print(f"{len(report.problems)} problem(s); fix them or pass --force", file=sys.stderr)
        return 2
    if a.preflight_only:
        return 0
    address, head = a.ray_address, None
    if address is None:
        # `ray start --block` stays in the foreground and stops its own processes on SIGTERM
        # (`ray stop` would stop every Ray on the machine)
        gpus = ["--num-gpus", str(a.tp * a.cp)] if a.device == "cuda" else []
        head = subprocess.Popen([_ray(), "start", "--head", "--block", "--port", str(a.ray_port),
                                 "--disable-usage-stats", "--include-dashboard", "false",
                                 "--num-cpus", str(max(a.tp * a.cp, os.cpu_count() or 1)), *gpus], env=env)
        address = f"127.0.0.1:{a.ray_port}"
        _wait_for_gcs("127.0.0.1", a.ray_port, head)
    cmd = [sys.executable, "-m", "dist_engine.cli", "serve", "--model", a.model, "--tp", str(a.tp),
           "--cp", str(a.cp), "--device", a.device, "--ray-address", address, *serve_args]
    server = subprocess.Popen(cmd, env=env)
    # SIGTERM/SIGINT go to the server, which drains; Ray stops after it
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda s, _f: server.send_signal(s))
    try:
        return server.wait()
    finally:
        if head is not None:
            head.terminate()
            try:
                head.wait(timeout=30)
            except subprocess.TimeoutExpired:
                head.kill()


def _wait_for_gcs(host: str, port: int, head: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if head.poll() is not None:
            raise RuntimeError(f"`ray start --head` exited ({head.returncode}); is port {port} in use?")
        with socket.socket() as s:
            if s.connect_ex((host, port)) == 0:
                time.sleep(1.0)  # the GCS listens a moment before it serves
                return
        time.sleep(0.3)
    raise RuntimeError(f"the Ray head did not come up on {host}:{port} within {timeout:.0f}s")


def cmd_join(a) -> int:
    env = {**os.environ, **nccl_env(a)}
    extra = ["--num-gpus", str(a.num_gpus)] if a.num_gpus is not None else []
    return subprocess.call([_ray(), "start", "--address", a.address, "--disable-usage-stats", *extra,
                            *(["--block"] if a.block else [])], env=env)
