"""The `supermachine` command: parsing and printing only; the work is the library's.

    app.py        the parser and main(): errors become one line and an exit status
    run.py        run (attached, -t, -d): options -> VMSpec + WorkloadSpec
    vms.py        exec, cp, ps, logs, stop, rm, inspect: detached VMs
    images.py     pull, images, rmi, prune, login, logout
    snapshots.py  snapshot, snapshots
    common.py     the state home, notices, tables, registry options
    terminal.py   raw mode and the terminal pump; interrupts.py: signals as events
"""

from .app import main

__all__ = ["main"]
