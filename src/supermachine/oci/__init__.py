"""An OCI runtime (runc-compatible) whose containers are microVMs: `supermachine-runtime`."""
