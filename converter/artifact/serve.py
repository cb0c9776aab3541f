"""Run a real Triton Inference Server on a model repository: `convert.py serve` and the tests use this.

The server is the `tritonserver` 2.51 that PyPI's `nvidia-pytriton` bundles (python backend only),
installed by setup.sh in its own environment, `.venv-serve` (it needs numpy<2; the converter's own
environment is left alone). Started as pytriton starts it: from a copy of its `tritonserver/`
folder whose python backend holds the stub built for the environment's Python, with the bundled
libraries on `LD_LIBRARY_PATH` and the environment's `bin/` first on `PATH` (the stub imports the
model's packages from the `python3` found there). The server runs in its own process group, so
stopping it stops every stub process it started.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from converter.errors import UserError

ROOT = Path(__file__).resolve().parents[2]  # the checkout: converter/artifact/serve.py
VENV_ENV = "CONVERTER_SERVE_VENV"  # another serving environment than <checkout>/.venv-serve
RUNTIME = "triton-runtime"  # the prepared copy of tritonserver/, inside the serving environment
_QUERY = """import json, sys, sysconfig, pathlib, pytriton
site = pathlib.Path(pytriton.__file__).parent.parent
print(json.dumps({"server": str(site / "pytriton" / "tritonserver"), "libs": str(site / "nvidia_pytriton.libs"),
                  "python": f"{sys.version_info[0]}.{sys.version_info[1]}",
                  "libdir": sysconfig.get_config_var("LIBDIR") or ""}))"""


def serving_venv() -> Path:
    """The serving environment's folder (`$CONVERTER_SERVE_VENV`, else `.venv-serve` in the checkout).

    Raises:
        UserError: it has no Python with nvidia-pytriton.
    """
    venv = Path(os.environ.get(VENV_ENV) or ROOT / ".venv-serve")
    if not (venv / "bin" / "python").is_file():
        raise UserError(f"no serving environment at {venv}: run ./setup.sh (it creates .venv-serve with "
                        "nvidia-pytriton's tritonserver)")
    return venv


def _runtime(venv: Path) -> tuple[Path, dict[str, str]]:
    """(tritonserver folder with the stub in place, the environment variables it needs)."""
    proc = subprocess.run([str(venv / "bin" / "python"), "-c", _QUERY], capture_output=True, text=True)
    if proc.returncode != 0:
        raise UserError(f"the serving environment {venv} has no working nvidia-pytriton: run ./setup.sh "
                        f"({(proc.stderr.strip().splitlines() or ['?'])[-1]})")
    info = json.loads(proc.stdout)
    folder = venv / RUNTIME
    if not (folder / "backends" / "python" / "triton_python_backend_stub").is_file():
        staging = venv / f".{RUNTIME}-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(info["server"], staging, ignore=shutil.ignore_patterns("python_backend_stubs"))
        stub = Path(info["server"]) / "python_backend_stubs" / info["python"] / "triton_python_backend_stub"
        shutil.copy2(stub, staging / "backends" / "python" / "triton_python_backend_stub")
        if folder.exists() and not (folder / "backends" / "python" / "triton_python_backend_stub").exists():
            shutil.rmtree(folder)  # not one a rename published: a copy made by hand, or damaged
        try:
            staging.rename(folder)  # atomic: another process starting a server at once may publish first
        except OSError:
            shutil.rmtree(staging)
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (info["libs"], info["libdir"], env.get("LD_LIBRARY_PATH")) if p)
    env["PATH"] = os.pathsep.join((str(venv / "bin"), env.get("PATH", "")))
    env.pop("PYTHONPATH", None)  # the stub must import the serving environment's packages, not ours
    return folder, env


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on now (the OS's pick)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


@dataclass
class Server:
    """A running tritonserver: its process (own process group), addresses and log file."""

    process: subprocess.Popen
    host: str
    http_port: int
    grpc_port: int
    metrics_port: int
    log: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.metrics_port}/metrics"

    def log_tail(self, lines: int = 15) -> str:
        text = self.log.read_text(errors="replace") if self.log.is_file() else ""
        return "\n".join(text.splitlines()[-lines:])

    def wait_ready(self, models: list[str], timeout: float = 180.0) -> None:
        """Block until the server and `models` are ready.

        Raises:
            UserError: the server exited, or was not ready within `timeout` seconds (with its log's end).
        """
        deadline = time.monotonic() + timeout
        paths = ["/v2/health/ready", *(f"/v2/models/{m}/ready" for m in models)]
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise UserError(f"tritonserver exited with code {self.process.returncode} "
                                f"(log {self.log}):\n{self.log_tail()}")
            if all(_status(self.url + path) == 200 for path in paths):
                return
            time.sleep(0.25)
        raise UserError(f"tritonserver was not ready after {timeout:.0f} s (log {self.log}):\n{self.log_tail()}")

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM the server's process group, SIGKILL it after `timeout` s; returns the exit code."""
        if self.process.poll() is None:
            _signal_group(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                _signal_group(self.process.pid, signal.SIGKILL)
                self.process.wait()
        return self.process.returncode

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass


def _status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


def start(repository: Path, models: list[str], log: Path, host: str = "127.0.0.1", http_port: int = 0,
          grpc_port: int = 0, metrics_port: int = 0, ready_timeout: float = 180.0) -> Server:
    """Start tritonserver on `repository`, loading only `models` (explicit model control: the
    repository's ONNX Runtime and TensorRT models need backends this server lacks), and wait until
    they are ready. A port of 0 takes a free one.

    Raises:
        UserError: no serving environment, or the server failed to start (its log's end is shown).
    """
    folder, env = _runtime(serving_venv())
    ports = [p or free_port(host) for p in (http_port, grpc_port, metrics_port)]
    command = [str(folder / "bin" / "tritonserver"), f"--model-repository={Path(repository).resolve()}",
               f"--backend-directory={folder / 'backends'}", f"--cache-directory={folder / 'caches'}",
               "--model-control-mode=explicit", *(f"--load-model={m}" for m in models),
               f"--http-address={host}", f"--http-port={ports[0]}", f"--grpc-address={host}",
               f"--grpc-port={ports[1]}", f"--metrics-address={host}", f"--metrics-port={ports[2]}",
               "--allow-metrics=true", "--allow-gpu-metrics=false", "--log-verbose=0"]
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   env=env, start_new_session=True)
    server = Server(process, host, *ports, log)
    try:
        server.wait_ready(models, ready_timeout)
    except BaseException:
        server.stop()
        raise
    return server


def artifact_repository(artifact: Path, scratch_dir: Path) -> tuple[Path, str]:
    """(model repository, generate model name) to serve `artifact` from: the artifact's own `triton/`
    when it holds the generate model, else a repository assembled into `scratch_dir` (an artifact
    written before the generate model existed; assembling re-hashes it first).

    Raises:
        UserError: not an artifact, not a KV-cache decoder, or files that do not match its manifest.
    """
    from converter.artifact import triton
    from converter.artifact import triton_generate
    from converter.artifact.package import read_manifest

    manifest = read_manifest(artifact)
    why = triton_generate.unservable(manifest)
    if why is not None:
        raise UserError(f"{artifact}: nothing to serve: {why}")
    prefix = manifest["recipe"].get("triton", {}).get("model_name") or manifest["name"]
    name = f"{prefix}-{triton_generate.SUFFIX}"
    own = artifact / manifest.get("triton", {}).get("repository", triton.REPOSITORY)
    if (own / name / triton.CONFIG).is_file():
        return own, name
    triton.assemble([artifact], scratch_dir)
    return scratch_dir, name


def usage(server: Server, model: str) -> str:
    """How to call the generate model: curl over HTTP, tritonclient's gRPC stream."""
    body = json.dumps({"text_input": "The license grants", "max_tokens": 16})
    return "\n".join([
        f"HTTP {server.url}   gRPC {server.grpc_url}   metrics {server.metrics_url}",
        f"  curl -s -X POST {server.url}/v2/models/{model}/generate -d '{body}'",
        f"  curl -s -N -X POST {server.url}/v2/models/{model}/generate_stream "
        f"-d '{body[:-1]}, \"stream\": true}}'",
        "  python: import numpy as np, tritonclient.grpc as g",
        f"    c = g.InferenceServerClient('{server.grpc_url}'); c.start_stream(lambda r, e: print(e or "
        "r.as_numpy('text_output')[0].decode(), end='', flush=True))",
        "    t = g.InferInput('text_input', [1], 'BYTES'); t.set_data_from_numpy(np.array([b'The license'], object))",
        f"    c.async_stream_infer('{model}', [t]); c.stop_stream()",
    ])
