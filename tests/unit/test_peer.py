"""The owner of a local client's socket, from /proc/net/tcp and tcp6."""

import os
import socket

from tracer_exporter.web.peer import find_uid, normalise, parse_sockets, peer_uid

# A listener on 0.0.0.0:9867 (root), a client 127.0.0.1:45678 of uid 65534 and the
# exporter's accepted end of it (root), as the kernel prints them on x86-64.
TCP = """\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000:268B 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 549 1 0000000035a9370b 100 0 0 10 0
   1: 0100007F:B26E 0100007F:268B 01 00000000:00000000 00:00000000 00000000 65534        0 7781 1 00000000aa 20 4 30 10 -1
   2: 0100007F:268B 0100007F:B26E 01 00000000:00000000 00:00000000 00000000     0        0 7782 1 00000000bb 20 4 30 10 -1
"""
# A client [::1]:40000 of uid 1000 to [::1]:9867, and one from 127.0.0.1:40001 of uid 33
# to a dual-stack listener, which sees it as ::ffff:127.0.0.1.
TCP6 = """\
  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000001000000:9C40 00000000000000000000000001000000:268B 01 00000000:00000000 00:00000000 00000000  1000        0 9001 1 00000000cc 20 4 30 10 -1
   1: 0000000000000000FFFF00000100007F:9C41 0000000000000000FFFF00000100007F:268B 01 00000000:00000000 00:00000000 00000000    33        0 9002 1 00000000dd 20 4 30 10 -1
"""


def ep(ip, port):
    return normalise(ip), port


def test_parse_sockets_reads_addresses_ports_and_uids():
    rows = list(parse_sockets(TCP))
    assert rows == [
        (ep("0.0.0.0", 9867), ep("0.0.0.0", 0), 0),
        (ep("127.0.0.1", 45678), ep("127.0.0.1", 9867), 65534),
        (ep("127.0.0.1", 9867), ep("127.0.0.1", 45678), 0),
    ]


def test_the_client_end_is_found_not_ours():
    assert find_uid(TCP, ep("127.0.0.1", 45678), ep("127.0.0.1", 9867)) == 65534
    assert find_uid(TCP6, ep("::1", 40000), ep("::1", 9867)) == 1000
    # An IPv4-mapped client is the same endpoint as the IPv4 one.
    assert find_uid(TCP6, ep("::ffff:127.0.0.1", 40001), ep("127.0.0.1", 9867)) == 33
    # A client on another host has no socket here.
    assert find_uid(TCP, ep("10.0.2.2", 45678), ep("10.0.2.15", 9867)) is None
    assert find_uid("", ep("127.0.0.1", 1), ep("127.0.0.1", 2)) is None


def test_peer_uid_reads_both_files_of_a_directory(tmp_path):
    (tmp_path / "tcp").write_text(TCP)
    (tmp_path / "tcp6").write_text(TCP6)
    assert peer_uid(("127.0.0.1", 45678), ("127.0.0.1", 9867), str(tmp_path)) == 65534
    assert peer_uid(("::1", 40000, 0, 0), ("::1", 9867, 0, 0), str(tmp_path)) == 1000
    assert peer_uid(("::ffff:127.0.0.1", 40001), ("::ffff:127.0.0.1", 9867), str(tmp_path)) == 33
    assert peer_uid(("10.0.2.2", 1), ("10.0.2.15", 9867), str(tmp_path)) is None
    assert peer_uid(("127.0.0.1", 45678), ("127.0.0.1", 9867), str(tmp_path / "none")) is None


def test_peer_uid_of_a_real_loopback_connection():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        with socket.create_connection(listener.getsockname()) as client:
            conn, peer = listener.accept()
            with conn:
                assert peer_uid(peer, conn.getsockname()) == os.getuid()
                assert client.getsockname() == peer
