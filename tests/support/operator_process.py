"""An operator replica as its own process, against kmock's emulator: one a test can SIGKILL.

``python -m support.operator_process`` runs the operator as ``qtrader-operator`` does
(``qtrader_operator.main.run`` with ``config_from_environment``: namespace, NATS, image, and
peering from ``QTRADER_PEERING_*`` and ``POD_NAME``). Outside a pod both kopf and the
operator's own client log in with the kubeconfig the test writes (``KUBECONFIG``); the one
difference is a short watch timeout, so that a stop is quick.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from qtrader.local.nats_server import free_port
from qtrader.local.stopping import stop_processes

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class OperatorProcess:
    identity: str
    process: subprocess.Popen[bytes]
    log_path: Path
    metrics_url: str  # its Prometheus endpoint (``QTRADER_METRICS_PORT``)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        """A crash: no chance to remove its peering entry or say goodbye."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()

    def stop(self) -> None:
        stop_processes([self.process], grace_s=30)


def write_kubeconfig(path: Path, server: str, namespace: str) -> Path:
    path.write_text(
        "apiVersion: v1\nkind: Config\n"
        f"clusters: [{{name: emu, cluster: {{server: '{server}'}}}}]\n"
        "users: [{name: emu, user: {token: test}}]\n"
        f"contexts: [{{name: emu, context: {{cluster: emu, user: emu, namespace: {namespace}}}}}]\n"
        "current-context: emu\n"
    )
    return path


def start_operator(
    *,
    identity: str,
    priority: int,
    kube_url: str,
    nats_url: str,
    namespace: str,
    log_dir: Path,
    peering: str = "qtrader",
) -> OperatorProcess:
    """Start a replica; it is up once its entry shows in the peering object (the caller waits)."""
    kubeconfig = write_kubeconfig(log_dir / "kubeconfig", kube_url, namespace)
    metrics_port = free_port()
    paths = [str(ROOT / "workloads"), str(ROOT / "operator"), str(ROOT / "tests")]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([*paths, os.environ.get("PYTHONPATH", "")]),
        "KUBECONFIG": str(kubeconfig),
        "QTRADER_NAMESPACE": namespace,
        "QTRADER_NATS_URL": nats_url,
        "QTRADER_WORKLOAD_IMAGE": "qtrader:test",
        "QTRADER_LIVENESS_URL": f"http://127.0.0.1:{free_port()}/healthz",
        "QTRADER_PEERING_NAME": peering,
        "QTRADER_PEERING_PRIORITY": str(priority),
        "POD_NAME": identity,
        "QTRADER_METRICS_PORT": str(metrics_port),
    }
    log_path = log_dir / f"operator-{identity}.log"
    command = [sys.executable, "-m", "support.operator_process"]
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=env)
    metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
    return OperatorProcess(
        identity=identity, process=process, log_path=log_path, metrics_url=metrics_url
    )


def main() -> None:
    from qtrader_operator.main import config_from_environment, run

    # A short watch timeout only makes stopping quicker; everything else as in a pod.
    run(replace(config_from_environment(), watch_timeout_s=5.0))


if __name__ == "__main__":
    main()
