"""A change to the bake's or the flattener's code makes the next VM bake a new snapshot (and
build a new root filesystem) instead of restoring one made by the old code; a change to
unrelated code reuses both. Real VMs; the code change is an edited copy of the sources (see
tests/unit/test_cache_keys.py)."""

from __future__ import annotations

from supermachine import VM
from tests.fixtures import images as fx
from tests.unit.runtime.test_cache_keys import sources  # noqa: F401  (the fixture)


def _start(home, image) -> tuple[str, str]:
    """(snapshot restored from, root filesystem) of a fresh VM of ``image``."""
    with VM(image, home=home, network="none", memory="256M") as vm:
        assert vm.exec(["echo", "ok"]).stdout == b"ok\n"
        assert vm.restored_from is not None
        return vm.restored_from, vm.recipe.config.rootfs.name


def test_bake_or_flattener_changes_rebake(home, sources):  # noqa: F811
    image = fx.variant(fx.busybox(), "cache-keys", labels={"test": "cache-keys"})
    snap, root = _start(home, image)  # bakes (or restores what this session baked)
    assert _start(home, image) == (snap, root)

    sources("cli/app.py")  # not part of any build
    assert _start(home, image) == (snap, root)

    sources("runtime/prefetch.py")  # the bake's pre-read
    rebaked, same_root = _start(home, image)
    assert rebaked != snap and same_root == root
    assert _start(home, image) == (rebaked, root)  # and that new one is used from now on

    sources("images/flatten.py")  # the rootfs builder: new rootfs, so a new snapshot too
    again, new_root = _start(home, image)
    assert new_root != root and again not in (snap, rebaked)
