#!/usr/bin/env bash
# Boots the built image in QEMU for a manual look (`just qemu NAME`): TCG only (the machines' KVM is PVM,
# see shared/research/feasibility-image-qemu.md), serial console on stdout (and in a log file), user-mode
# networking with restrict=on (the guest reaches nothing outside QEMU), credentials via SMBIOS type 11.
#
#   image/qemu.sh NAME [options] [-- extra qemu args]
#     --cred name=value     a systemd credential (repeatable), e.g. --cred cortex.init=yes
#     --netboot             boot the netboot kernel + cpio (whole OS in RAM) instead of the disk image
#     --direct              boot the disk image's kernel+initrd directly (no firmware/systemd-boot; faster,
#                           but no boot counting)
#     --timeout SECONDS     stop QEMU after this long (default 240)
#     --log FILE            serial log (default image/.build/vm/NAME/serial.log)
#     --fresh               drop NAME's disk overlay and firmware variables first (a factory-new node)
#     --append ARGS         extra kernel command line (--direct, --netboot), e.g. systemd.factory_reset=yes
#     --dry-run             print the QEMU command line (one argument per line) and exit: nothing created
#
# A credential value may contain spaces (`--cred "ssh.authorized_keys.root=ssh-ed25519 AAAA... me@laptop"`):
# it stays one SMBIOS string (commas doubled, QEMU's escape) and, on a kernel command line, one quoted
# argument. Values with a double quote or a new line are refused (no quoting can carry them there).
#
# Each NAME keeps its own copy-on-write disk (8 GiB, over cortex.raw) and UEFI variables in
# image/.build/vm/NAME/, so it boots again with its state, like a real machine.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out="$here/.build/out"
name=${1:?usage: qemu.sh NAME [--cred name=value]... [--netboot|--direct] [--timeout S] [--fresh]}
shift
[[ "$name" =~ ^[a-z0-9][a-z0-9-]*$ ]] || { echo "qemu: NAME: lowercase letters, digits, '-'" >&2; exit 1; }
dir="$here/.build/vm/$name"
timeout=240
mode=disk
log=""
fresh=0
smbios=()
append=""
cmdline_creds=()
dry_run=0
while [ $# -gt 0 ]; do
    case "$1" in
        --cred)
            cred=${2:?--cred needs name=value}
            [[ "$cred" == *=* ]] || { echo "qemu: --cred $cred: expected name=value" >&2; exit 1; }
            [[ "$cred" != *'"'* && "$cred" != *$'\n'* ]] || {
                echo "qemu: --cred ${cred%%=*}: a value with a double quote or a new line cannot be passed" >&2; exit 1; }
            smbios+=(-smbios "type=11,value=io.systemd.credential:${cred//,/,,}")
            if [[ "$cred" == *[[:space:]]* ]]; then
                cmdline_creds+=("\"systemd.set-credential=${cred/=/:}\"")
            else
                cmdline_creds+=("systemd.set-credential=${cred/=/:}")
            fi
            shift ;;
        --dry-run) dry_run=1 ;;
        --netboot) mode=netboot ;;
        --direct) mode=direct ;;
        --timeout) timeout=${2:?}; shift ;;
        --log) log=${2:?}; shift ;;
        --fresh) fresh=1 ;;
        --append) append=${2:?}; shift ;;
        --) shift; break ;;
        *) echo "qemu: unknown option $1" >&2; exit 1 ;;
    esac
    shift
done
if [ "$dry_run" = 0 ]; then
    [ "$fresh" = 1 ] && rm -rf "$dir"
    mkdir -p "$dir"
fi
log=${log:-$dir/serial.log}

common=(-accel tcg -machine q35 -cpu max -smp 2 -m 2048 -nodefaults -display none
        -serial "file:$log" -monitor none
        -netdev user,id=n0,restrict=on,hostname="$name" -device virtio-net-pci,netdev=n0
        -device virtio-rng-pci "${smbios[@]}")

case "$mode" in
    netboot)
        kernel=$(readlink -m "$out/cortex-netboot.vmlinuz"); initrd=$(readlink -m "$out/cortex-netboot.cpio.zst")
        [ "$dry_run" = 1 ] || { [ -f "$kernel" ] && [ -f "$initrd" ]; } || \
            { echo "qemu: no netboot build in $out (run: just image)" >&2; exit 1; }
        args=(-kernel "$kernel" -initrd "$initrd"
              -append "console=ttyS0 panic=-1 systemd.hostname=$name ${cmdline_creds[*]} $append") ;;
    disk|direct)
        raw=$(readlink -m "$out/cortex.raw")
        [ "$dry_run" = 1 ] || [ -f "$raw" ] || { echo "qemu: no image at $out/cortex.raw (run: just image)" >&2; exit 1; }
        [ "$dry_run" = 1 ] || [ -f "$dir/disk.qcow2" ] || \
            qemu-img create -q -f qcow2 -F raw -b "$raw" "$dir/disk.qcow2" 8G
        args=(-drive "file=$dir/disk.qcow2,if=virtio,format=qcow2")
        if [ "$mode" = direct ]; then
            base=${raw%.raw}
            cmdline=$(/usr/bin/python3 -c '
import sys, pefile
pe = pefile.PE(sys.argv[1])
print(next(s.get_data().rstrip(b"\0").decode() for s in pe.sections if s.Name.startswith(b".cmdline")))' "$base.efi")
            args+=(-kernel "$base.vmlinuz" -initrd "$base.initrd" -append "$cmdline $append")
        else
            [ "$dry_run" = 1 ] || [ -f "$dir/vars.fd" ] || cp /usr/share/OVMF/OVMF_VARS_4M.fd "$dir/vars.fd"
            args+=(-drive if=pflash,format=raw,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd
                   -drive "if=pflash,format=raw,file=$dir/vars.fd")
        fi ;;
esac

if [ "$dry_run" = 1 ]; then
    printf '%s\n' qemu-system-x86_64 "${common[@]}" "${args[@]}" "$@"
    exit 0
fi
echo "qemu: $name ($mode), serial log $log, stops after ${timeout}s" >&2
: >"$log"
tail -n +1 -F "$log" 2>/dev/null &
tailer=$!
trap 'kill $tailer 2>/dev/null || true' EXIT
rc=0
timeout --foreground "$timeout" qemu-system-x86_64 "${common[@]}" "${args[@]}" "$@" || rc=$?
sleep 0.5
[ "$rc" = 124 ] && echo "qemu: stopped after ${timeout}s" >&2 && rc=0
exit "$rc"
