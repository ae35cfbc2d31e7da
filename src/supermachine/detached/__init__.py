"""Detached VMs (`run -d`): a supervisor process owns each VM; other CLI processes find it by
name and talk to it over its control socket.

    state.py       the VM's directory and record (state.json), names, liveness (its lock)
    protocol.py    the control protocol's frames and requests (pure)
    client.py      the CLI side: connect, exec, copy files, stop, snapshot
    supervisor.py  the process that owns the VM: boots it, runs the workload, serves requests
"""
