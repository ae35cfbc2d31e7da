"""Guest assets: the kernel (kernel.py), the initramfs (initramfs.py), the init's C sources
(init/) and the one entry point that puts them together (assets.ensure_guest_assets).

Nothing is re-exported here so that importing the package stays free; import submodules.
"""
