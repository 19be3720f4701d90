"""The orphan watchdog process, kept small: `python -S -m actors.watchdog PARENT HOST PORT PGID`.

run.py starts it (actors/system.py `start_watchdog`) in a session of its own. It waits for
run.py to end, then stops the actor system if anything of it is left (actors/system.py
`watch`, which does the work). It idles for the gateway's whole life, so it idles cheaply:
started without `site` (-S) and importing nothing but what Python starts with while it
waits (about 3 MiB PSS instead of 7 for an interpreter with site and actors/system.py:
docs/benchmarks.md "Idle memory"). Only when run.py is gone does it load `site` (Thespian
lives in site-packages) and actors/system.py.
"""

import sys
import time

WATCH_EVERY_S = 0.5


def alive(pid: int) -> bool:
    """actors/system.py `alive`, without importing it: one /proc entry, a zombie is dead."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] not in ("Z", "X")
    except (FileNotFoundError, ProcessLookupError):
        return False
    except OSError:
        return True  # cannot tell (EMFILE): taken for dead, a live run.py would lose its actors


def main(argv: list[str]) -> int:
    if len(argv) != 4:
        print("usage: python -S -m actors.watchdog PARENT HOST PORT PGID", file=sys.stderr)
        return 2
    parent = int(argv[0])
    while alive(parent):
        time.sleep(WATCH_EVERY_S)  # a poll of one /proc entry: nothing to wait on instead
    import site

    site.main()  # started with -S: site-packages (Thespian) only now that it is needed
    from actors import system

    return system.watch(parent, argv[1], int(argv[2]), int(argv[3]))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
