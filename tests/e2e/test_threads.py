"""Every helper thread a VM or pool starts ends with it (runtime/threads.py): closing leaves
none of them running, whatever was used in between."""

from __future__ import annotations

import os
import threading

from supermachine import VM, Pool
from supermachine.spec import WorkloadSpec


def _threads() -> set[threading.Thread]:
    # The one process-wide thread: QEMU is forked from it when a VM starts off the main
    # thread, because PR_SET_PDEATHSIG fires when the *thread* that forked exits
    # (engine/qemu.py). It belongs to the process, lives as long as it, and owns no VM.
    return {t for t in threading.enumerate() if t.name != "vm-launcher"}


def test_closing_a_vm_leaves_no_thread_of_it(home, busybox):
    before = _threads()
    vm = VM(busybox, home=home, network="none")
    with vm:
        assert vm.exec(["echo", "x"]).stdout == b"x\n"
        with vm.spawn(["cat"], stdin=True) as proc:
            proc.write(b"hi")
            proc.close_stdin()
            assert proc.wait().exit_code == 0
        r, w = os.pipe()  # run_workload with stdin that never reaches EOF: its pump must end
        out_r, out_w = os.pipe()
        try:
            code = vm.run_workload(WorkloadSpec(cmd=("echo", "done")), stdin_fd=r,
                                   stdout_fd=out_w)
            assert code == 0 and os.read(out_r, 100) == b"done\n"
        finally:
            for fd in (r, w, out_r, out_w):
                os.close(fd)
        assert _threads() - before  # the VM's own threads (agent reader/writer, watcher)
    left = [t.name for t in _threads() - before if t.is_alive()]
    assert not left, f"threads left running after close(): {left}"


def test_closing_a_pool_leaves_no_thread_of_it(home, busybox):
    before = _threads()
    with Pool(busybox, size=1, home=home, network="none") as pool:
        vm = pool.acquire(timeout=120)
        assert vm.exec(["true"]).exit_code == 0
        pool.release(vm)
    left = [t.name for t in _threads() - before if t.is_alive()]
    assert not left, f"threads left running after close(): {left}"
