"""A Spark Connect server from the PySpark distribution, on loopback: for the tests and the benchmarks.

The population job runs the same on it as in local mode (``fhir-plugin population
--remote sc://…``); its Python workers are forked from the plugin's daemon, with the
check loaded, as local mode's are.  Production code never imports this.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import pyspark

from .testing import free_port

__all__ = ["start_spark_connect", "stop"]


def start_spark_connect(
    master: str, log_path: Path, *, prefix: Sequence[str] = (), timeout: float = 180
) -> tuple[subprocess.Popen[bytes], str]:
    """Start a Connect server (``master`` inside, e.g. ``local[2]``) and wait for it; its process and URL.

    ``prefix`` goes before the command (``taskset -c 0`` pins it to CPUs).  Its output
    goes to ``log_path``; a server that dies or does not start in ``timeout`` seconds
    is a RuntimeError carrying the end of that log.
    """
    spark_home = Path(pyspark.__file__).parent
    port = free_port()
    env = dict(os.environ, SPARK_HOME=str(spark_home), PYSPARK_PYTHON=sys.executable, SPARK_LOCAL_IP="127.0.0.1")
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [
                *prefix,
                str(spark_home / "bin" / "spark-submit"),
                "--class",
                "org.apache.spark.sql.connect.service.SparkConnectServer",
                "--master",
                master,
                "--conf",
                f"spark.connect.grpc.binding.port={port}",
                "--conf",
                "spark.connect.grpc.binding.address=127.0.0.1",
                "--conf",
                "spark.ui.enabled=false",
                # the server's Python workers run the check: forked with it loaded, as in local mode
                "--conf",
                "spark.python.daemon.module=fhir_plugin._population._daemon",
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    deadline = time.monotonic() + timeout
    while "Spark Connect server started" not in log_path.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            stop(proc)
            raise RuntimeError(f"the Spark Connect server did not start: {log_path.read_text()[-3000:]}")
        time.sleep(0.5)
    return proc, f"sc://127.0.0.1:{port}"


def stop(proc: subprocess.Popen[bytes]) -> None:
    """Terminate, and kill after 30 s."""
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
