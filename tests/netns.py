"""Two network namespaces joined by a veth pair, so a two-"node" job's traffic crosses a real interface
(needs root and iproute2; removed afterwards)."""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid


class VethPair:
    def __init__(self, subnet: str = "10.231.7"):
        tag = uuid.uuid4().hex[:6]
        self.ns = [f"s2n0{tag}", f"s2n1{tag}"]
        self.ifname = [f"s2v0{tag}", f"s2v1{tag}"]
        self.addr = [f"{subnet}.1", f"{subnet}.2"]

    @staticmethod
    def unavailable() -> str:
        if not shutil.which("ip"):
            return "iproute2 (ip) not installed"
        if os.geteuid() != 0:
            return "network namespaces need root"
        probe = f"s2probe{uuid.uuid4().hex[:6]}"
        p = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
        if p.returncode:
            return f"cannot create network namespaces here: {p.stderr.strip()}"
        subprocess.run(["ip", "netns", "del", probe], capture_output=True)
        return ""

    def _ip(self, *args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True, text=True)

    def __enter__(self) -> VethPair:
        for ns in self.ns:
            self._ip("netns", "add", ns)
        self._ip("link", "add", self.ifname[0], "type", "veth", "peer", "name", self.ifname[1])
        for ns, ifname, addr in zip(self.ns, self.ifname, self.addr):
            self._ip("link", "set", ifname, "netns", ns)
            self._ip("-n", ns, "addr", "add", f"{addr}/24", "dev", ifname)
            self._ip("-n", ns, "link", "set", ifname, "up")
            self._ip("-n", ns, "link", "set", "lo", "up")
        return self

    def __exit__(self, *exc) -> None:
        for ns in self.ns:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)

    def prefix(self, node: int) -> list[str]:
        """Command prefix that runs a program inside node ``node``'s namespace."""
        return ["ip", "netns", "exec", self.ns[node]]
