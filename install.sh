#!/usr/bin/env bash
# Set up supermachine on a Debian 12 machine and run a demo VM.
#   - Debian packages: QEMU, squashfs-tools-ng, a C toolchain for the guest init (musl), and
#     what the test suite uses (skopeo, docker-registry, mmdebstrap, busybox-static, ...);
#   - a virtualenv in .venv with supermachine installed (this compiles the guest init);
#   - the supermachine guest kernel, built from Debian's linux-source package (~6 min on two
#     cores, once: later runs find it built; if the build fails, VMs boot Debian's kernel);
#   - a demo: builds a tiny busybox image from Debian packages and boots it.
# Re-running is cheap: every step is skipped when already done.
set -euo pipefail
cd "$(dirname "$0")"

APT_PACKAGES=(
  qemu-system-x86 squashfs-tools-ng musl-tools gcc make libc6-dev
  python3 python3-venv python3-dev
  busybox-static skopeo umoci mmdebstrap docker-registry erofs-utils cpio zstd
  apache2-utils openssl kmod passt util-linux procps lz4 binutils
  # size-capped volumes (volume create --size: mke2fs, debugfs)
  e2fsprogs
  # the VMM's jail (engine/jail.py)
  bubblewrap
  # fuzzing the guest agent's parser with libFuzzer under sanitizers (fuzz/guest.sh)
  clang libclang-rt-14-dev
  # the docker-behaviour oracle in the tests (podman with runc) and the peers in bench/
  podman runc runsc
  # the OCI runtime: containerd, an engine it is tested under (podman is above), and tc/ip
  # to join a container's network namespace
  containerd iproute2
  # building the guest kernel from source (supermachine kernel build)
  flex bison bc libelf-dev xz-utils
)

need=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need+=("$p")
done
if ((${#need[@]})); then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  echo "==> installing Debian packages: ${need[*]}"
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${need[@]}"
fi
# The distribution registry starts as a system service on install; the tests run their own.
if systemctl is-active --quiet docker-registry 2>/dev/null; then
  systemctl stop docker-registry 2>/dev/null || true
fi
# containerd likewise: the tests start their own daemon, with its own socket and state.
if systemctl is-active --quiet containerd 2>/dev/null; then
  systemctl stop containerd 2>/dev/null || true
fi

# Debian's own Python: world-readable (so VMs can be tested as an unprivileged user) and,
# in a venv, quick to start.
PY=${PYTHON:-$( [ -x /usr/bin/python3 ] && echo /usr/bin/python3 || echo python3 )}
if [ ! -x .venv/bin/python ]; then
  echo "==> creating .venv"
  "$PY" -m venv .venv
fi
echo "==> installing supermachine into .venv (builds the guest init)"
.venv/bin/pip install -q --disable-pip-version-check -e '.[test]'

echo "==> building the supermachine guest kernel (minutes the first time; skipped when built)"
.venv/bin/supermachine kernel build || echo "==> the kernel build failed (see above): VMs boot Debian's cloud kernel"

echo "==> building the demo image (busybox, from Debian's busybox-static)"
IMAGE=$(.venv/bin/python -c "from tests.fixtures import images; print(images.busybox())")
echo "==> demo: .venv/bin/supermachine run $IMAGE sh -c 'echo hello from \$(uname -sr) in a microVM'"
.venv/bin/supermachine run "$IMAGE" sh -c 'echo hello from $(uname -sr) in a microVM; cat /etc/os-release 2>/dev/null | head -1 || true'
