"""The A1111 install that scripts/a1111_check.py drives: which Lora extension sits in `extensions-builtin/Lora`,
optional extensions in `extensions/`, and one A1111 server (API on loopback) with a small client for it."""
from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

HERE = os.path.dirname(os.path.abspath(__file__))
PROBE_NAME = "lora-check-probe"
OUR_MARKER = "lora_discovery.py"  # a file only our extension has


def is_ours(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, OUR_MARKER))


@dataclass
class Bed:
    webui: str  # the A1111 folder (launch.py, extensions-builtin/, models/)
    python: str  # the python of A1111's venv
    project_lora: str  # our extensions-builtin/Lora
    builtin_backup: str  # where A1111's own Lora folder is kept while ours is installed
    port: int = 7893
    hf_home: str | None = None

    @property
    def lora_slot(self) -> str:
        return os.path.join(self.webui, "extensions-builtin", "Lora")

    @property
    def lora_dir(self) -> str:
        return os.path.join(self.webui, "models", "Lora")

    # --- which extension is installed ---------------------------------------------------------------------------
    def installed(self) -> str:
        if not os.path.isdir(self.lora_slot):
            return "none"
        return "project" if is_ours(self.lora_slot) else "builtin"

    def keep_builtin(self) -> None:
        """Copies A1111's own Lora folder aside once (before ours first replaces it)."""
        if os.path.isdir(self.builtin_backup):
            if is_ours(self.builtin_backup):
                raise SystemExit(f"{self.builtin_backup} holds our extension, not A1111's built-in Lora")
            return
        if self.installed() != "builtin":
            raise SystemExit(f"A1111's built-in Lora is neither in {self.lora_slot} nor in {self.builtin_backup}")
        os.makedirs(os.path.dirname(self.builtin_backup), exist_ok=True)
        shutil.copytree(self.lora_slot, self.builtin_backup, symlinks=True)

    def use(self, which: str) -> None:
        """Puts A1111's built-in ("builtin") or our extension ("project") into extensions-builtin/Lora."""
        self.keep_builtin()
        source = self.builtin_backup if which == "builtin" else self.project_lora
        if os.path.isdir(self.lora_slot):
            shutil.rmtree(self.lora_slot)
        shutil.copytree(source, self.lora_slot, symlinks=True,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))

    def add_extension(self, name: str, source: str) -> str:
        target = os.path.join(self.webui, "extensions", name)
        if os.path.isdir(target):
            shutil.rmtree(target)
        shutil.copytree(source, target, ignore=shutil.ignore_patterns(".git", "__pycache__"))
        return target

    def add_probe(self) -> None:
        folder = os.path.join(self.webui, "extensions", PROBE_NAME, "scripts")
        os.makedirs(folder, exist_ok=True)
        shutil.copy(os.path.join(HERE, "a1111_check_probe.py"), os.path.join(folder, "lora_check_probe.py"))

    def remove_extension(self, name: str) -> None:
        shutil.rmtree(os.path.join(self.webui, "extensions", name), ignore_errors=True)

    # --- the server ---------------------------------------------------------------------------------------------
    def start(self, checkpoint: str, log_path: str, extra_args: list[str] | None = None) -> Server:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        if self.hf_home:
            env["HF_HOME"] = self.hf_home
        args = [self.python, "launch.py", "--skip-prepare-environment", "--skip-install", "--skip-torch-cuda-test",
                "--skip-python-version-check", "--skip-version-check", "--use-cpu", "all", "--no-half",
                "--precision", "full", "--api", "--port", str(self.port), "--disable-nan-check",
                "--no-download-sd-model", "--ckpt", checkpoint, *(extra_args or [])]
        log = open(log_path, "w", encoding="utf8")
        proc = subprocess.Popen(args, cwd=self.webui, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        server = Server(proc, f"http://127.0.0.1:{self.port}", log_path, log)
        try:
            server.wait_ready()
        except BaseException:
            server.stop()
            raise
        return server


class ApiError(RuntimeError):
    pass


class StartError(RuntimeError):
    """A1111 did not come up (the log names why)."""


class Server:
    def __init__(self, proc: subprocess.Popen, url: str, log_path: str, log):
        self.proc, self.url, self.log_path, self._log = proc, url, log_path, log

    def _started(self) -> bool:
        with open(self.log_path, encoding="utf8", errors="replace") as f:
            return "Startup time:" in f.read()

    def wait_ready(self, timeout: float = 600) -> None:
        """No request before A1111 logs its start-up time: a request that reaches the app between gradio's launch
        and A1111's `create_api` builds starlette's middleware stack early, and A1111 then dies with "Cannot add
        middleware after an application has started"."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise StartError(f"A1111 exited with {self.proc.returncode} while starting; see {self.log_path}")
            if not self._started():
                time.sleep(2)
                continue
            try:
                self.get("/sdapi/v1/sd-models", timeout=5)
                self.get("/lora-check/info", timeout=5)
                return
            except (OSError, ApiError):
                time.sleep(2)
        self.stop()
        raise StartError(f"A1111 did not answer within {timeout:.0f}s; see {self.log_path}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()

    def _request(self, method: str, path: str, body=None, timeout: float = 900):
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method,
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                text = response.read().decode("utf8")
        except urllib.error.HTTPError as e:
            raise ApiError(f"{method} {path}: {e.code} {e.read().decode('utf8', 'replace')[:500]}") from e
        return json.loads(text) if text else None

    def get(self, path: str, timeout: float = 900):
        return self._request("GET", path, timeout=timeout)

    def post(self, path: str, body=None, timeout: float = 900):
        return self._request("POST", path, {} if body is None else body, timeout=timeout)

    def txt2img(self, prompt: str, **extra) -> tuple[float, dict, bytes]:
        """(seconds, info, first image PNG) of a small one-step job."""
        body = {"prompt": prompt, "negative_prompt": "", "steps": 1, "width": 64, "height": 64, "seed": 1,
                "sampler_name": "Euler", "cfg_scale": 7, "batch_size": 1, "n_iter": 1, "save_images": False,
                "send_images": True, **extra}
        started = time.perf_counter()
        res = self.post("/sdapi/v1/txt2img", body)
        seconds = time.perf_counter() - started
        return seconds, json.loads(res["info"]), base64.b64decode(res["images"][0])

    def options(self, **values) -> None:
        self.post("/sdapi/v1/options", values)

    def info(self) -> dict:
        return self.get("/lora-check/info")

    def snapshot(self, file: str | None = None, names: list[str] | None = None) -> dict:
        return self.post("/lora-check/snapshot", {"file": file, "names": names})
