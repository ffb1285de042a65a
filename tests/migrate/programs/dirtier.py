"""A process that dirties memory faster than pre-copy can follow, for post-copy tests.

It fills a 16 MiB region with a fixed pattern once and never touches it again,
then writes at random into a 32 MiB region for ever (more than post-copy's 16 MiB
threshold stays dirty between two pre-dumps). On SIGUSR1 it writes the
SHA-256 of the fixed region to /data/dirtier/fixed.sha, so a test can check that
memory fetched lazily on the new kernel is what it was on the old one.
"""

import hashlib
import os
import random
import signal

FIXED = bytearray(os.urandom(16 << 20))
DIRTY = bytearray(32 << 20)


def report(signum: int, frame: object) -> None:
    with open("/data/dirtier/fixed.sha.part", "w") as out:
        out.write(hashlib.sha256(FIXED).hexdigest())
    os.rename("/data/dirtier/fixed.sha.part", "/data/dirtier/fixed.sha")


signal.signal(signal.SIGUSR1, report)
with open("/data/dirtier/pid", "w") as out:
    out.write(str(os.getpid()))
pages = len(DIRTY) // 4096
while True:
    DIRTY[random.randrange(pages) * 4096] = random.getrandbits(8)
