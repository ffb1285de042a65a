"""Appends 64 KiB records, each starting with its number, to FILE (opened O_APPEND), as
fast as it can; every 256 records it empties the file, so it stays small.

appender.py FILE
"""

import os
import sys

RECORD = 64 << 10
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
n = 0
while True:
    n += 1
    head = f"{n}\n".encode()
    os.write(fd, head + b"r" * (RECORD - len(head)))
    if n % 256 == 0:
        os.ftruncate(fd, 0)
