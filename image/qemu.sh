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
#     --console             interactive serial console: keyboard input reaches the guest (log in with a
#                           root password set by --cred passwd.hashed-password.root=HASH, image/README.md),
#                           Ctrl-a x quits QEMU, Ctrl-a c toggles QEMU's monitor; no --timeout unless given
#     --timeout SECONDS     stop QEMU after this long (default 240; 0: never)
#     --log FILE            serial log (default image/.build/vm/NAME/serial.log)
#     --fresh               drop NAME's disk overlay and firmware variables first (a factory-new node)
#     --append ARGS         extra kernel command line, e.g. systemd.factory_reset=yes or
#                           systemd.unit=emergency.target (disk: passed to the UKI's systemd-stub via SMBIOS)
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
name=${1:?usage: qemu.sh NAME [--cred name=value]... [--netboot|--direct] [--console] [--timeout S] [--fresh]}
shift
[[ "$name" =~ ^[a-z0-9][a-z0-9-]*$ ]] || { echo "qemu: NAME: lowercase letters, digits, '-'" >&2; exit 1; }
dir="$here/.build/vm/$name"
timeout=""
mode=disk
console=0
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
        --console) console=1 ;;
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
# A console someone types into runs until they quit it; a watched boot stops by itself.
if [ -z "$timeout" ]; then
    if [ "$console" = 1 ]; then timeout=0; else timeout=240; fi
fi
[[ "$timeout" =~ ^[0-9]+$ ]] || { echo "qemu: --timeout $timeout: expected whole seconds" >&2; exit 1; }

if [ "$console" = 1 ]; then
    # The terminal is the serial line (input and output, QEMU's monitor multiplexed on Ctrl-a c); the log
    # file still gets everything the guest prints.
    serial=(-chardev "stdio,id=con0,mux=on,signal=off,logfile=${log//,/,,}" -serial chardev:con0 -mon chardev=con0)
else
    serial=(-serial "file:$log" -monitor none)
fi
common=(-accel tcg -machine q35 -cpu max -smp 2 -m 2048 -nodefaults -display none
        "${serial[@]}"
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
            # The UKI's command line is fixed; systemd-stub appends this SMBIOS string to it.
            [ -z "$append" ] || args+=(-smbios "type=11,value=io.systemd.stub.kernel-cmdline-extra=${append//,/,,}")
        fi ;;
esac

if [ "$dry_run" = 1 ]; then
    printf '%s\n' qemu-system-x86_64 "${common[@]}" "${args[@]}" "$@"
    exit 0
fi
stops="stops after ${timeout}s"
[ "$timeout" = 0 ] && stops="runs until you quit it"
if [ "$console" = 1 ]; then stops="$stops; Ctrl-a x quits, Ctrl-a c is QEMU's monitor"; fi
echo "qemu: $name ($mode), serial log $log, $stops" >&2
: >"$log"
if [ "$console" = 0 ]; then
    tail -n +1 -F "$log" 2>/dev/null &
    tailer=$!
    trap 'kill $tailer 2>/dev/null || true' EXIT
fi
rc=0
timeout --foreground "$timeout" qemu-system-x86_64 "${common[@]}" "${args[@]}" "$@" || rc=$?
sleep 0.5
[ "$rc" = 124 ] && echo "qemu: stopped after ${timeout}s" >&2 && rc=0
exit "$rc"
