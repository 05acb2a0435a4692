#!/usr/bin/env bash
# Writes the Cortex disk image to a USB stick / disk (`just flash DEVICE`) and verifies it.
#
#   image/flash.sh [--yes] [--check] [--image FILE] [--credentials FILE] DEVICE
#
#   DEVICE             a whole disk (/dev/sdb, /dev/nvme1n1, /dev/loop3), never a partition
#   --image FILE       default: image/.build/out/cortex.raw (the newest build)
#   --credentials FILE copy a name=value credentials file to the ESP (cortex/credentials.conf) after
#                      writing: per-node settings and the join token for this stick (README.md)
#   --yes              do not ask (scripts); without it the device name must be typed to confirm
#   --check            run every check, then stop before writing anything
#
# Refuses: anything that is not a block device, partitions, devices that are (or have partitions that
# are) mounted, used as swap or held by device-mapper/RAID, the disk(s) holding /, /boot, /efi, /usr or
# /boot/efi, and devices smaller than the image or than the partition layout it grows into on first boot
# (computed from image/tree/usr/lib/repart.d by src/cortex/appliance/layout.py). Writes with dd (progress
# shown), then reads the image's length back from the device with O_DIRECT and compares SHA-256 sums.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
image="$here/.build/out/cortex.raw"
yes=0
check=0
creds=""
device=""

die() { echo "flash: refusing: $*" >&2; exit 1; }
fail() { echo "flash: error: $*" >&2; exit 1; }
say() { echo "flash: $*" >&2; }

while [ $# -gt 0 ]; do
    case "$1" in
        --yes|-y) yes=1 ;;
        --check) check=1 ;;
        --image) image=${2:?--image needs a file}; shift ;;
        --image=*) image=${1#--image=} ;;
        --credentials) creds=${2:?--credentials needs a file}; shift ;;
        --credentials=*) creds=${1#--credentials=} ;;
        -h|--help) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        -*) fail "unknown option $1 (see --help)" ;;
        *) [ -z "$device" ] || fail "one device only"; device=$1 ;;
    esac
    shift
done
[ -n "$device" ] || fail "usage: flash.sh [--yes] [--check] [--image FILE] [--credentials FILE] DEVICE"
[ -f "$image" ] || fail "no image at $image (run: just image)"
[ -z "$creds" ] || [ -f "$creds" ] || fail "no credentials file at $creds"

# --- what is this device? -----------------------------------------------------------------------------
[ -e "$device" ] || die "$device does not exist"
[ -b "$device" ] || die "$device is not a block device"
dev=$(readlink -f "$device")
name=$(basename "$dev")
[ -d "/sys/class/block/$name" ] || die "$dev is not known to the kernel (/sys/class/block/$name)"
[ -e "/sys/class/block/$name/partition" ] && die "$dev is a partition; give the whole disk"
[ "$(cat "/sys/class/block/$name/ro" 2>/dev/null || echo 0)" = 0 ] || die "$dev is read-only"

# The device and its partitions (and anything stacked on them: dm, md, loop-on-partition).
mapfile -t family < <(lsblk -n -l -p -o NAME "$dev" 2>/dev/null)
[ "${#family[@]}" -gt 0 ] || family=("$dev")

# Whole disks below a path's file system (follows dm/md/loop back to the disk).
disks_below() {
    local source
    source=$(findmnt -n -o SOURCE --target "$1" 2>/dev/null | head -n1) || return 0
    case "$source" in /dev/*) ;; *) return 0 ;; esac
    source=${source%%\[*}  # btrfs subvolume suffix
    [ -b "$source" ] || return 0
    lsblk -n -l -p -s -o NAME,TYPE "$source" 2>/dev/null | while read -r n t; do
        [ "$t" = disk ] || [ "$t" = loop ] && echo "$n"
    done
    return 0
}

system_paths=(/ /boot /boot/efi /efi /usr ${CORTEX_FLASH_SYSTEM_MOUNTS:-})
for path in "${system_paths[@]}"; do
    [ -e "$path" ] || continue
    while read -r disk; do
        [ -n "$disk" ] || continue
        if [ "$(readlink -f "$disk")" = "$dev" ]; then
            die "$dev holds $path of this system"
        fi
    done < <(disks_below "$path")
done

for member in "${family[@]}"; do
    real=$(readlink -f "$member")
    if findmnt -n -S "$real" >/dev/null 2>&1 || grep -q "^$real " /proc/mounts; then
        die "$member is mounted ($(findmnt -n -o TARGET -S "$real" | head -n1)); unmount it first"
    fi
    if grep -q "^$real " /proc/swaps 2>/dev/null; then
        die "$member is in use as swap"
    fi
    holders=$(ls "/sys/class/block/$(basename "$real")/holders" 2>/dev/null || true)
    if [ -n "$holders" ]; then
        die "$member is in use by $(echo "$holders" | tr '\n' ' ')(device-mapper, RAID or LVM)"
    fi
done

image_size=$(stat -L -c %s "$image")
device_size=$(blockdev --getsize64 "$dev")
[ "$image_size" -le "$device_size" ] || \
    die "$dev is too small: $(numfmt --to=iec-i --suffix=B "$device_size") < image $(numfmt --to=iec-i --suffix=B "$image_size")"
# The image is only the build-time part of the layout: on first boot systemd-repart adds slot B, its
# verity and the state partition, and fails on a device that holds the image but not the whole layout.
layout_dir=$here/tree/usr/lib/repart.d
layout_py="$here/../src/cortex/appliance/layout.py"
min_size=$(python3 "$layout_py" "$layout_dir") || fail "cannot compute the layout's minimum size from $layout_dir"
[ "$min_size" -le "$device_size" ] || \
    die "$dev is too small for the appliance's partition layout: $(python3 "$layout_py" --human "$layout_dir") needed" \
        "(ESP, two /usr slots with verity, state; $layout_dir), the device has" \
        "$(numfmt --to=iec-i --suffix=B "$device_size") ($device_size bytes); use a larger stick or disk"

model=$(lsblk -d -n -o MODEL,SIZE,TRAN "$dev" 2>/dev/null | tr -s ' ' || true)
say "image   $image ($(numfmt --to=iec-i --suffix=B "$image_size"); layout needs $(python3 "$layout_py" --human "$layout_dir"))"
say "device  $dev ${model:+($model)}"
if [ "$check" = 1 ]; then
    say "checks passed; --check: nothing written"
    exit 0
fi

# --- confirmation -------------------------------------------------------------------------------------
if [ "$yes" != 1 ]; then
    if ! { exec 3<>/dev/tty; } 2>/dev/null; then
        die "no terminal to confirm on; pass --yes to overwrite $dev without asking"
    fi
    printf 'flash: ALL DATA ON %s WILL BE LOST. Type the device name (%s) to continue: ' "$dev" "$name" >&3
    read -r answer <&3 || answer=""
    exec 3>&-
    if [ "$answer" != "$name" ] && [ "$answer" != "$dev" ]; then
        die "confirmation did not match ($name); nothing written"
    fi
fi

# --- write --------------------------------------------------------------------------------------------
start=$(date +%s)
say "writing..."
dd if="$image" of="$dev" bs=4M conv=fsync oflag=direct status=progress
sync
blockdev --flushbufs "$dev" 2>/dev/null || true
written=$(date +%s)

# --- verify -------------------------------------------------------------------------------------------
say "verifying (reading $(numfmt --to=iec-i --suffix=B "$image_size") back)..."
want=$(sha256sum "$image" | cut -d' ' -f1)
got=$(dd if="$dev" bs=4M iflag=direct,count_bytes count="$image_size" status=none | sha256sum | cut -d' ' -f1)
if [ "$want" != "$got" ]; then
    fail "verification FAILED: image sha256 $want, device sha256 $got (bad medium?)"
fi
say "verified: sha256 $want"

# --- per-node credentials on the ESP ------------------------------------------------------------------
if [ -n "$creds" ]; then
    command -v mcopy >/dev/null || fail "mtools (mcopy) is needed for --credentials: apt-get install mtools"
    # The ESP is the partition labelled cortex-esp; write into it without mounting (mtools at an offset).
    offset=$(sfdisk -J "$dev" 2>/dev/null | python3 -c '
import json, sys
table = json.load(sys.stdin)["partitiontable"]
sector = table.get("sectorsize", 512)
for p in table["partitions"]:
    if p.get("name") == "cortex-esp":
        print(p["start"] * sector)
        break
')
    [ -n "$offset" ] || fail "no partition labelled cortex-esp on $dev"
    export MTOOLS_SKIP_CHECK=1  # a USB stick has no floppy geometry to check
    mmd -D s -i "$dev@@$offset" ::/cortex 2>/dev/null || true
    if ! out=$(mcopy -o -i "$dev@@$offset" "$creds" ::/cortex/credentials.conf 2>&1); then
        fail "could not write the credentials to the ESP: $out"
    fi
    sync
    say "credentials written to the ESP as cortex/credentials.conf (readable by anyone holding the stick)"
fi
blockdev --rereadpt "$dev" 2>/dev/null || true
say "done in $(( $(date +%s) - start )) s (write $(( written - start )) s); $dev is ready to boot"
