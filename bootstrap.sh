#!/usr/bin/env bash
# Installs what Cortex needs on a fresh Debian 12 machine: python3-venv from apt when missing, then a
# project virtualenv (.venv) holding Cortex, its dependencies and the dev tools (pytest, ruff, just).
# Safe to run again: it only installs what is missing. etcd (Debian's etcd-server) is the benchmark's peer,
# and the test suite checks the benchmark end to end, so it comes along; so do mtools and dosfstools, which
# the image's flash tool uses and its test exercises.
set -euo pipefail
cd "$(dirname "$0")"

packages=()
python3 -c 'import ensurepip, venv' 2>/dev/null || packages+=(python3-venv)
command -v etcd >/dev/null || [ -x /usr/bin/etcd ] || packages+=(etcd-server)
# the flash tool writes the ESP's credentials with mtools; its test builds a FAT image with mkfs.vfat
command -v mcopy >/dev/null || packages+=(mtools)
command -v mkfs.vfat >/dev/null || [ -x /usr/sbin/mkfs.vfat ] || packages+=(dosfstools)
# the task engine: shell tasks run in bubblewrap with prlimit limits, container tasks in Podman (with runc)
command -v bwrap >/dev/null || packages+=(bubblewrap)
command -v prlimit >/dev/null || packages+=(util-linux)
command -v podman >/dev/null || packages+=(podman)
command -v runc >/dev/null || packages+=(runc)
# the Ansible role's test boots a Debian 12 rootfs (made by debootstrap) with systemd-nspawn and reaches it
# over ssh, as Ansible reaches a real host
command -v systemd-nspawn >/dev/null || packages+=(systemd-container)
command -v debootstrap >/dev/null || [ -x /usr/sbin/debootstrap ] || packages+=(debootstrap)
command -v ssh >/dev/null || packages+=(openssh-client)
# netboot: the iPXE binaries handed to PXE clients (undionly.kpxe, ipxe.efi) and dnsmasq for DHCP/TFTP
[ -e /usr/lib/ipxe/undionly.kpxe ] || packages+=(ipxe)
command -v dnsmasq >/dev/null || [ -x /usr/sbin/dnsmasq ] || packages+=(dnsmasq-base)
# the VM tests (tests/qemu) reach the VMs over SSH; image/build.sh installs QEMU and the rest itself
command -v ssh >/dev/null || packages+=(openssh-client)
# the web console: its front end is bundled with npm (console/); its tests drive headless Chromium
command -v npm >/dev/null || packages+=(nodejs npm)
command -v chromium >/dev/null || packages+=(chromium)
command -v chromedriver >/dev/null || packages+=(chromium-driver)
if [ "${#packages[@]}" -gt 0 ]; then
  sudo=""; [ "$(id -u)" = 0 ] || sudo=sudo
  echo "bootstrap: installing ${packages[*]} with apt-get" >&2
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${packages[@]}" >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
  echo "bootstrap: creating .venv" >&2
  python3 -m venv .venv
fi
stamp=.venv/.cortex-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ -n "$(find proto -newer "$stamp" -name '*.proto')" ]; then
  echo "bootstrap: installing Cortex and its tools into .venv" >&2
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e '.[dev]'
  touch "$stamp"
fi

# the web console's bundle (src/cortex/console/static), from the pinned packages in console/package-lock.json
if [ ! -f src/cortex/console/static/app.js ] || [ -n "$(find console/src console/package-lock.json -newer src/cortex/console/static/app.js 2>/dev/null)" ]; then
  echo "bootstrap: building the web console (npm ci, esbuild)" >&2
  (cd console && npm ci --no-audit --no-fund --loglevel=error && npm run --silent build)
fi

# the MCP conformance test drives the server with the official TypeScript SDK client, pinned in
# tests/conformance/package-lock.json; without node it is skipped
if command -v npm >/dev/null; then
  if [ ! -d tests/conformance/node_modules ] || [ tests/conformance/package-lock.json -nt tests/conformance/node_modules ]; then
    echo "bootstrap: npm ci in tests/conformance (the MCP TypeScript SDK client)" >&2
    (cd tests/conformance && npm ci --no-audit --no-fund --silent)
  fi
fi
