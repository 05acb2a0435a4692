#!/usr/bin/env bash
# Builds the Cortex appliance image (`just image`): installs the host tools it needs (Debian 12 +
# bookworm-backports), builds the Cortex wheel and its dependency wheels, runs mkosi twice (the disk
# image and the netboot image) and writes the update payload. Prints the build time and artifact sizes.
#
#   image/build.sh                 # build; the version is <project version>.<UTC yyyymmddHHMM>
#   CORTEX_IMAGE_VERSION=0.1.0.7 image/build.sh
#   CORTEX_IMAGE_CLEAN=1 image/build.sh     # also drop mkosi's incremental cache (after package changes)
#   CORTEX_IMAGE_NETBOOT=0 image/build.sh   # disk image + update payload only
#   CORTEX_IMAGE_UPDATE=0 image/build.sh    # no update payload (saves ~50 s of xz; the VM tests use this)
#   CORTEX_IMAGE_PLAIN=1 image/build.sh     # also cortex-plain_V.raw: the same image minus the agent
#                                           # (mkosi.profiles/plain.conf), the VM tests' boot-time yardstick
#
# Outputs (image/.build/out/, README.md "Artifacts"):
#   cortex_V.raw                       disk image for USB sticks / laptops / VMs (image/flash.sh)
#   cortex_V.efi                       the UKI (systemd-boot entry; also the update payload's kernel)
#   cortex_V.usr-x86-64.UUID.raw, cortex_V.usr-x86-64-verity.UUID.raw   /usr slot + verity partitions
#   cortex_V.vmlinuz, cortex_V.initrd  kernel and initrd, for direct kernel boot of the disk image
#   cortex-netboot_V.vmlinuz + cortex-netboot_V.cpio.zst   netboot: the whole OS in RAM
#   update/                            what an update server publishes for systemd-sysupdate
#   cortex-plain_V.raw                 (CORTEX_IMAGE_PLAIN=1) the same disk image without the agent
#   cortex.raw, cortex-netboot.*, cortex-plain.raw   symlinks to the newest build
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
build="$here/.build"
out="$build/out"
start=$(date +%s)

say() { printf '\033[1mimage:\033[0m %s\n' "$*" >&2; }
die() { printf 'image: error: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root (mkosi needs root here to build disk images): sudo $0"

# --- host tools ---------------------------------------------------------------------------------------
# mkosi 24 and systemd 254 (systemd-repart with Verity=, systemd-boot, systemd-sysupdate) come from
# bookworm-backports; the rest from bookworm. Only what is missing is installed.
need_install=0
mkosi_version=$(mkosi --version 2>/dev/null | awk '{print $2}') || true
case "$mkosi_version" in 2[4-9]*|[3-9][0-9]*) ;; *) need_install=1 ;; esac
repart_version=$(systemd-repart --version 2>/dev/null | awk 'NR==1 {print $2}') || true
[ "${repart_version:-0}" -ge 254 ] 2>/dev/null || need_install=1
for tool in mkfs.erofs mkfs.vfat mcopy bwrap cpio depmod xz zstd qemu-system-x86_64 qemu-img veritysetup sfdisk pv dnsmasq; do
    command -v "$tool" >/dev/null || need_install=1
done
[ -e /usr/lib/systemd/boot/efi/systemd-bootx64.efi ] || need_install=1
[ -e /usr/share/OVMF/OVMF_CODE_4M.fd ] || need_install=1
python3 -c 'import venv, pip, pefile' 2>/dev/null || need_install=1
if [ "$need_install" = 1 ]; then
    if ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
        say "adding bookworm-backports to the host's apt sources"
        cat >/etc/apt/sources.list.d/bookworm-backports.sources <<'EOF'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
    fi
    say "installing host tools with apt-get (mkosi, systemd 254, qemu from bookworm-backports)"
    export DEBIAN_FRONTEND=noninteractive
    timeout 600 apt-get update -qq
    timeout 900 apt-get install -y -qq -t bookworm-backports \
        mkosi systemd systemd-container systemd-boot systemd-boot-efi qemu-system-x86 qemu-utils >/dev/null
    timeout 900 apt-get install -y -qq \
        ovmf erofs-utils squashfs-tools cryptsetup-bin dosfstools mtools e2fsprogs fdisk zstd xz-utils \
        python3-pefile python3-venv python3-pip debian-archive-keyring bubblewrap uidmap pv cpio kmod dnsmasq-base >/dev/null
fi
say "host: $(mkosi --version), $(systemd-repart --version | head -n1 | cut -d' ' -f1-2)"

# --- version ------------------------------------------------------------------------------------------
project_version=$(python3 -c 'import sys, tomllib; print(tomllib.load(open(sys.argv[1], "rb"))["project"]["version"])' \
    "$repo/pyproject.toml")
version=${CORTEX_IMAGE_VERSION:-$project_version.$(date -u +%Y%m%d%H%M)}
[[ "$version" =~ ^[0-9][0-9A-Za-z.~^]*$ ]] || die "image version '$version': use digits, letters and dots only"
say "version $version"

# --- wheels -------------------------------------------------------------------------------------------
# The image's Python is bookworm's 3.11, like the host's, so the host builds/downloads the wheels and the
# image installs them offline (scripts/install-cortex.postinst).
mkdir -p "$build/wheels/pip" "$out"
rm -f "$build"/wheels/cortex-*.whl
t=$(date +%s)
say "building the Cortex wheel and its dependency wheels"
(cd "$repo" && timeout 900 /usr/bin/python3 -m pip wheel --quiet --disable-pip-version-check \
    --wheel-dir "$build/wheels" .)
if ! ls "$build"/wheels/pip/pip-*.whl >/dev/null 2>&1; then
    timeout 300 /usr/bin/python3 -m pip download --quiet --disable-pip-version-check --no-deps --only-binary :all: \
        -d "$build/wheels/pip" pip
fi
say "wheels: $(ls "$build"/wheels/*.whl | wc -l) in $(( $(date +%s) - t )) s"

# --- mkosi --------------------------------------------------------------------------------------------
# From the repository root, mkosi's convention: its mkosi.conf includes the definitions in this directory.
cd "$repo"
# A rebuild of the same version must not leave partition files of the previous build behind (their
# names carry the partition UUID, which changes with the content).
rm -f "$out/cortex_$version".* "$out/cortex-netboot_$version".* "$out/cortex_$version" "$out/cortex-netboot_$version" \
    "$out/cortex-plain_$version".* "$out/cortex-plain_$version"
force=(-f)
[ "${CORTEX_IMAGE_CLEAN:-0}" = 1 ] && force=(-ff)
t=$(date +%s)
say "mkosi: disk image"
timeout 2400 mkosi "${force[@]}" --image-version="$version" build
disk_s=$(( $(date +%s) - t ))
netboot_s=0
if [ "${CORTEX_IMAGE_NETBOOT:-1}" = 1 ]; then
    t=$(date +%s)
    say "mkosi: netboot image (profile netboot)"
    timeout 2400 mkosi -f --profile=netboot --image-version="$version" build
    netboot_s=$(( $(date +%s) - t ))
fi
plain_s=0
if [ "${CORTEX_IMAGE_PLAIN:-0}" = 1 ]; then
    t=$(date +%s)
    say "mkosi: plain image (profile plain: the same image minus the agent)"
    timeout 2400 mkosi -f --profile=plain --image-version="$version" build
    plain_s=$(( $(date +%s) - t ))
fi

# --- update payload -----------------------------------------------------------------------------------
# systemd-pull 254 decompresses xz and gzip but not zstd: the partition images are published as .xz.
t=$(date +%s)
update="$out/update"
rm -rf "$update"
shopt -s nullglob
parts=("$out/cortex_$version".usr-x86-64.*.raw "$out/cortex_$version".usr-x86-64-verity.*.raw)
[ "${#parts[@]}" = 2 ] || die "expected the /usr and /usr-verity partition files in $out, found: ${parts[*]:-none}"
if [ "${CORTEX_IMAGE_UPDATE:-1}" = 1 ]; then
    mkdir -p "$update"
    for part in "${parts[@]}"; do
        xz -T0 -3 -c "$part" >"$update/$(basename "$part").xz"
    done
    cp "$out/cortex_$version.efi" "$update/"
    (cd "$update" && sha256sum -- * >SHA256SUMS)
fi
update_s=$(( $(date +%s) - t ))

ln -sfn "cortex_$version.raw" "$out/cortex.raw"
if [ "${CORTEX_IMAGE_NETBOOT:-1}" = 1 ]; then
    ln -sfn "cortex-netboot_$version.vmlinuz" "$out/cortex-netboot.vmlinuz"
    ln -sfn "cortex-netboot_$version.cpio.zst" "$out/cortex-netboot.cpio.zst"
fi
[ "${CORTEX_IMAGE_PLAIN:-0}" = 1 ] && ln -sfn "cortex-plain_$version.raw" "$out/cortex-plain.raw"

# --- report -------------------------------------------------------------------------------------------
total=$(( $(date +%s) - start ))
human() { numfmt --to=iec-i --suffix=B --format='%.1f' "$1"; }
echo
echo "Cortex image $version built in ${total} s (disk ${disk_s} s, netboot ${netboot_s} s, plain ${plain_s} s, update payload ${update_s} s)"
printf '%-58s %10s %12s\n' ARTIFACT SIZE "ON DISK"
for f in "$out/cortex_$version".raw "$out/cortex_$version".efi "$out/cortex_$version".vmlinuz \
         "$out/cortex_$version".initrd "${parts[@]}" \
         "$out/cortex-netboot_$version".vmlinuz "$out/cortex-netboot_$version".cpio.zst \
         "$out/cortex-plain_$version".raw "$update"/*; do
    [ -e "$f" ] || continue
    printf '%-58s %10s %12s\n' "${f#"$out"/}" "$(human "$(stat -c %s "$f")")" "$(du -h "$f" | cut -f1)"
done
if [ "${CORTEX_IMAGE_UPDATE:-1}" = 1 ]; then
    payload=$(du -cb "$update"/*.xz "$update"/*.efi | tail -n1 | cut -f1)
    echo "compressed update payload (xz partitions + UKI): $(human "$payload")"
fi
echo "smallest disk for the layout the first boot completes: $(python3 "$repo/src/cortex/appliance/layout.py" --human "$here/tree/usr/lib/repart.d")"
echo "flash:  image/flash.sh /dev/sdX            (defaults to $out/cortex.raw)"
