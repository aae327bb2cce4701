"""Run `advcl ARGS` and kill it with SIGKILL at its K-th write into FOLDER (test_runfolder's
kill -9 loop): an ``os.write`` there writes half its bytes first (a torn write), an
``os.replace`` there is killed before the rename (a full temporary left behind). K 0: no kill.

    python killer.py K FOLDER ARGS...
"""

import os
import signal
import sys
from pathlib import Path


def main() -> int:
    k, folder, args = int(sys.argv[1]), Path(sys.argv[2]).resolve(), sys.argv[3:]
    real_write, real_replace = os.write, os.replace
    count = [0]

    def hit(path) -> bool:
        try:
            inside = Path(os.path.abspath(os.fsdecode(path))).is_relative_to(folder)
        except TypeError:
            return False
        if inside:
            count[0] += 1
        return inside and count[0] == k

    def write(fd, data):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            target = ""
        if target and hit(target):
            real_write(fd, bytes(data)[: len(data) // 2])
            os.kill(os.getpid(), signal.SIGKILL)
        return real_write(fd, data)

    def replace(src, dst, **kwargs):
        if hit(dst):
            os.kill(os.getpid(), signal.SIGKILL)
        return real_replace(src, dst, **kwargs)

    os.write, os.replace = write, replace
    from advcl_cli.cli.app import main as advcl

    return advcl(args)


if __name__ == "__main__":
    sys.exit(main())
