"""A process caught inside send() on a TCP connection when its kernel dies.

blocked_send.py PORT LOG
Connects to itself on 127.0.0.1:PORT and sends on the connection until send() blocks
(the other end reads nothing), after writing "ready" to LOG. Recovery cannot know how
much of that send went through, so it cuts the connection: the send fails, and the
program writes "cut <error>" to LOG. Then "alive N" every 0.2 s, to show it carries on,
and "peer reset" once the other end was told (a reset ended it). (Python ignores
SIGPIPE, as servers do.)
"""

import socket
import sys
import time

port, log = int(sys.argv[1]), sys.argv[2]
listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.bind(("127.0.0.1", port))
listener.listen(1)
client = socket.create_connection(("127.0.0.1", port))
server, _ = listener.accept()
with open(log, "a", buffering=1) as out:
    out.write("ready\n")
    try:
        client.sendall(b"x" * (64 << 20))
        out.write("sent\n")
    except OSError as exc:
        out.write(f"cut {type(exc).__name__}\n")
    told = False
    for n in range(1, 1 << 30):
        out.write(f"alive {n}\n")
        if not told and server.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0] == 7:
            out.write("peer reset\n")  # TCP_CLOSE: the other end was told
            told = True
        time.sleep(0.2)
