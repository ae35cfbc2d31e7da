"""Running VMs: the build recipe (builder.py) resolves a `VMSpec` into a machine; the VM
handle (vm.py) boots or restores it and runs commands in it; snapshot.py stores snapshots
under their typed key; bake.py and prefetch.py make automatic snapshots; pool.py keeps VMs
ready; threads.py is how each of them owns its helper threads."""
