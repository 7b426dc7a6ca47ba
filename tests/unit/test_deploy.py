"""deploy/: the systemd unit passes systemd-analyze verify; the DaemonSet has what BCC needs."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "deploy" / "systemd" / "tracer-exporter.service"
DAEMONSET = REPO / "deploy" / "kubernetes" / "daemonset.yaml"
BCC_CAPS = {"CAP_BPF", "CAP_PERFMON", "CAP_SYS_ADMIN"}


def unit_settings():
    settings = {}
    for line in UNIT.read_text().splitlines():
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            settings[key] = value
    return settings


def test_systemd_analyze_verify(tmp_path):
    if not shutil.which("systemd-analyze"):
        if os.environ.get("TRACER_REQUIRE_TOOLS"):
            pytest.fail("systemd-analyze is missing (Debian: systemd); `make setup` installs it")
        pytest.skip("systemd-analyze (Debian: systemd) not installed")
    # verify insists that ExecStart's binary exists: point it at a stub, nothing else changes.
    stub = tmp_path / "tracer-exporter"
    stub.write_text("#!/bin/sh\n")
    stub.chmod(0o755)
    unit = tmp_path / UNIT.name
    unit.write_text(UNIT.read_text().replace("/usr/local/bin/tracer-exporter", str(stub)))
    done = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(unit)], capture_output=True, text=True, timeout=60
    )
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")


def test_unit_hardening():
    s = unit_settings()
    assert s["ExecStart"].split()[:3] == [
        "/usr/local/bin/tracer-exporter",
        "--config.file",
        "/etc/tracer-exporter/config.yaml",
    ]
    # More flags come from /etc/default/tracer-exporter (the Debian package ships it).
    assert s["EnvironmentFile"] == "-/etc/default/tracer-exporter"
    assert s["ExecStart"].split()[-1] == "$ARGS"
    assert set(s["CapabilityBoundingSet"].split()) >= BCC_CAPS
    assert "CAP_NET_ADMIN" not in s["CapabilityBoundingSet"]
    # Map reads and writes run briefly as SCHED_FIFO (tracer_exporter/kernel/preempt.py).
    assert "CAP_SYS_NICE" in s["CapabilityBoundingSet"].split() and "CAP_SYS_NICE" in s["AmbientCapabilities"].split()
    assert "RestrictRealtime" not in s
    assert s["NoNewPrivileges"] == "yes"
    assert s["ProtectSystem"] == "strict"
    assert s["ProtectHome"] == "yes"
    # /sys read-only but for tracefs and debugfs; bpf and perf_event_open beside @system-service.
    assert s["ProtectKernelTunables"] == "yes"
    assert s["ReadWritePaths"].split() == ["-/sys/kernel/tracing", "-/sys/kernel/debug"]
    assert s["SystemCallFilter"].split() == ["@system-service", "bpf", "perf_event_open"]
    assert (s["LimitNOFILE"], s["TasksMax"]) == ("65536", "4608")
    # This one would break BCC (no headers to compile against): keep it out.
    assert "ProtectKernelModules" not in s
    assert s["ExecReload"] == "/bin/kill -HUP $MAINPID"


def test_daemonset():
    docs = {d["kind"]: d for d in yaml.safe_load_all(DAEMONSET.read_text())}
    assert set(docs) == {"Namespace", "ConfigMap", "DaemonSet", "NetworkPolicy"}
    spec = docs["DaemonSet"]["spec"]["template"]["spec"]
    assert spec["hostPID"] is True
    assert spec["automountServiceAccountToken"] is False
    (container,) = spec["containers"]
    sc = container["securityContext"]
    assert sc.get("privileged") or {"BPF", "PERFMON", "SYS_ADMIN", "SYS_NICE"} <= set(sc["capabilities"]["add"])
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    host_paths = {v["name"]: v["hostPath"]["path"] for v in spec["volumes"] if "hostPath" in v}
    # Of /sys only tracefs and debugfs read-write, and BTF read-only: not uevent_helper or release_agent.
    sys_mounts = {path: (host_paths[m["name"]], m.get("readOnly", False)) for path, m in mounts.items()
                  if path.startswith("/sys")}  # fmt: skip
    assert sys_mounts == {
        "/sys/kernel/tracing": ("/sys/kernel/tracing", False),
        "/sys/kernel/debug": ("/sys/kernel/debug", False),
        "/sys/kernel/btf": ("/sys/kernel/btf", True),
    }
    assert host_paths[mounts["/lib/modules"]["name"]] == "/lib/modules"
    assert [p["containerPort"] for p in container["ports"]] == [9867]
    assert container["readinessProbe"]["httpGet"]["path"] == "/-/ready"
    # Only the scraper reaches the port; nothing goes out.
    policy = docs["NetworkPolicy"]["spec"]
    assert policy["podSelector"]["matchLabels"] == docs["DaemonSet"]["spec"]["selector"]["matchLabels"]
    assert policy["policyTypes"] == ["Ingress", "Egress"]
    (rule,) = policy["ingress"]
    assert rule["ports"] == [{"port": 9867, "protocol": "TCP"}]
    assert policy["egress"] == []
    config = yaml.safe_load(docs["ConfigMap"]["data"]["config.yaml"])
    assert config["pids"] == []
    assert "--config.file=/etc/tracer-exporter/config.yaml" in container["args"]
