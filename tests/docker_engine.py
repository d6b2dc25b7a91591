"""A private Docker engine for tests: installed if missing (Debian's docker.io, as root), started with its
own data root, exec root, socket and pid file so it never touches another daemon, and stopped by its pid.
No registry is needed: the base image ``debian:bookworm-slim`` is made from Debian's archive with
debootstrap when the engine does not have it (the official image is built the same way)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

BASE_IMAGE = "debian:bookworm-slim"
DEBIAN_MIRROR = os.environ.get("S2MOE_DEBIAN_MIRROR", "http://deb.debian.org/debian")


def _run(cmd: list[str], timeout: int = 600, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)


class DockerEngine:
    """``with DockerEngine(root) as d: d.docker("run", ...)``; ``root`` holds everything the daemon writes."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.sock = self.root / "docker.sock"
        self.pidfile = self.root / "docker.pid"
        self.proc: subprocess.Popen | None = None

    @staticmethod
    def unavailable() -> str:
        """Why no engine can run here ('' when one can, installing it first if needed)."""
        if os.geteuid() != 0:
            return "starting a Docker engine needs root"
        if not (shutil.which("dockerd") and shutil.which("debootstrap")):
            if not shutil.which("apt-get"):
                return "dockerd/debootstrap missing and no apt-get to install them"
            p = _run(
                ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "docker.io", "debootstrap"],
                env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
            )
            if p.returncode != 0:
                return f"apt-get install docker.io debootstrap failed: {p.stderr[-500:]}"
        if not shutil.which("docker"):
            return "the docker client is missing (apt-get install docker.io)"
        return ""

    @property
    def env(self) -> dict:
        return {**os.environ, "DOCKER_HOST": f"unix://{self.sock}"}

    def docker(self, *args: str, timeout: int = 600, check: bool = True, **kw) -> subprocess.CompletedProcess:
        p = _run(["docker", *args], timeout=timeout, env=self.env, **kw)
        if check and p.returncode != 0:
            raise RuntimeError(
                f"docker {' '.join(args[:3])} ... failed (rc {p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
            )
        return p

    def __enter__(self) -> DockerEngine:
        self.root.mkdir(parents=True, exist_ok=True)
        log = open(self.root / "dockerd.log", "ab")
        self.proc = subprocess.Popen(
            [
                "dockerd",
                "--data-root",
                str(self.root / "data"),
                "--exec-root",
                str(self.root / "exec"),
                "-H",
                f"unix://{self.sock}",
                "--pidfile",
                str(self.pidfile),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.time() + 60
        while _run(["docker", "info"], timeout=30, env=self.env).returncode != 0:
            if self.proc.poll() is not None or time.time() > deadline:
                self.stop()
                tail = (self.root / "dockerd.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"dockerd did not come up (log {self.root / 'dockerd.log'}):\n{tail}")
            time.sleep(0.5)
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        self.proc = None

    def has_image(self, tag: str) -> bool:
        return self.docker("image", "inspect", tag, check=False, timeout=60).returncode == 0

    def ensure_base_image(self) -> None:
        """``debian:bookworm-slim`` from Debian's own archive (debootstrap minbase, then docker import)."""
        if self.has_image(BASE_IMAGE):
            return
        with tempfile.TemporaryDirectory(dir=self.root) as tmp:
            rootfs = Path(tmp) / "rootfs"
            p = _run(["debootstrap", "--variant=minbase", "bookworm", str(rootfs), DEBIAN_MIRROR], timeout=900)
            if p.returncode != 0:
                raise RuntimeError(f"debootstrap failed:\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
            tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
            imp = subprocess.run(
                ["docker", "import", "-", BASE_IMAGE],
                stdin=tar.stdout,
                capture_output=True,
                text=True,
                env=self.env,
                timeout=600,
            )
            tar.stdout.close()
            if tar.wait() != 0 or imp.returncode != 0:
                raise RuntimeError(f"docker import of the debootstrap rootfs failed: {imp.stderr[-2000:]}")
