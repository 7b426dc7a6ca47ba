#!/bin/sh
# Inside the guest: the exporter on 0.0.0.0:9867 (forwarded to the host),
# tracking a small demo workload. $1 is the host port, for the URLs shown.
set -eu
port=${1:-9867}

# A process that keeps the kernel busy: reading /proc allocates, frees and locks.
python3 -c '
import time
while True:
    for _ in range(200):
        open("/proc/self/status").read()
    time.sleep(1)
' &
demo=$!

# 10.0.2.2 is the host as QEMU's forward shows it: let it use the control API.
cat >/tmp/demo.yaml <<EOC
pids: [$demo]
control:
  allowed_networks: [127.0.0.0/8, "::1/128", 10.0.2.2/32]
EOC

tracer-exporter --web.listen-address 0.0.0.0:9867 --config.file /tmp/demo.yaml --state.file /tmp/demo-state.json &
exporter=$!
trap 'kill -TERM $exporter $demo 2>/dev/null; wait $exporter' INT TERM

python3 - <<EOP
import sys, time, urllib.request
deadline = time.monotonic() + 300
while time.monotonic() < deadline:
    try:
        if urllib.request.urlopen("http://127.0.0.1:9867/-/ready", timeout=5).status == 200:
            break
    except OSError:
        pass
    time.sleep(1)
else:
    sys.exit("the exporter did not become ready in 300 s")
EOP

cat <<EOM

tracer-exporter is running in the guest (kernel $(uname -r)), tracking pid $demo.
  http://127.0.0.1:$port/tracer    the table
  http://127.0.0.1:$port/metrics   Prometheus metrics
  curl -X POST http://127.0.0.1:$port/pids/PID   track another guest process
Press Ctrl-C to stop.
EOM
wait $exporter
