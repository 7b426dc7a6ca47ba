"""A real program for the exact tests: Debian's python3 doing files, sockets, threads,
sqlite, compression and a child process, one command at a time, asleep in read() between."""

from __future__ import annotations

import os
import textwrap
import time
from pathlib import Path

SETTLE_TIMEOUT = 60.0


# A real program (Debian's python3) that does each command read from stdin,
# then prints the thread ids that did it and sleeps in read() until the next.
DRIVER = textwrap.dedent(
    r"""
    import os, socket, sqlite3, subprocess, sys, threading, zlib

    tids = {threading.get_native_id()}
    tmp = sys.argv[1]

    def files():
        data = os.urandom(1 << 18)
        for i in range(8):
            path = os.path.join(tmp, f"f{i}")
            with open(path, "wb") as f:
                f.write(data)
                os.fsync(f.fileno())
            with open(path, "rb") as f:
                f.read()
            os.stat(path)
            os.unlink(path)
        for _ in range(3):
            os.listdir("/usr/lib")
            open("/proc/self/status").read()
            open("/proc/meminfo").read()

    def sockets():
        srv = socket.socket()
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        cli = socket.create_connection(srv.getsockname())
        conn, _ = srv.accept()
        for _ in range(200):
            cli.sendall(b"x" * 1000)
            conn.recv(4096)
        a, b = socket.socketpair()
        for _ in range(200):
            a.sendall(b"y" * 300)
            b.recv(4096)
        for s in (cli, conn, srv, a, b):
            s.close()

    def threads():
        def work():
            tids.add(threading.get_native_id())
            lock = threading.Lock()
            for _ in range(200):
                with lock:
                    os.getpid()
                os.read(os.open("/proc/self/stat", os.O_RDONLY), 512)
        ts = [threading.Thread(target=work) for _ in range(4)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()

    def sqlite():
        db = sqlite3.connect(os.path.join(tmp, "db.sqlite"))
        db.execute("create table if not exists t (k integer, v text)")
        for i in range(40):
            db.execute("insert into t values (?, ?)", (i, "v" * 200))
            db.commit()
        db.close()

    def compress():
        zlib.compress(os.urandom(1 << 20), 6)

    def child():
        subprocess.run(["true"], check=True)

    commands = {f.__name__: f for f in (files, sockets, threads, sqlite, compress, child)}
    print("ready", flush=True)
    for line in sys.stdin:
        commands[line.strip()]()
        print(" ".join(map(str, sorted(tids))), flush=True)
    """
)
COMMANDS = ("files", "sockets", "threads", "sqlite", "compress", "child")


def settled(pid: int) -> bool:
    """Asleep in read() with no other thread left: its work is all done."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        syscall = Path(f"/proc/{pid}/syscall").read_text().split()[0]
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return False
    return state == "S" and syscall == "0" and len(tasks) == 1


def wait_settled(pid: int) -> None:
    deadline = time.monotonic() + SETTLE_TIMEOUT
    while not settled(pid):
        assert time.monotonic() < deadline, f"pid {pid} did not go back to sleep in read()"
        time.sleep(0.05)
    # An exited thread's last schedule() comes just after it left the task list.
    time.sleep(0.3)
