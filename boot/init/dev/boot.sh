#!/bin/bash
# Boot the init by hand under QEMU (TCG) with a throw-away root: for developing the init,
# not used by fuse itself.
#
#   boot.sh APP [KEY VALUE]...
#
# APP is copied to /app in the root; KEY VALUE pairs form /etc/fuse/spec after the implied
# `fuse-spec 1` (e.g. `exe /app arg app arg hello env PATH=/`). Environment knobs:
#   KERNEL      bzImage (default: the kernel tree in /tmp/kb)
#   EXTRA_ROOT  a directory copied over the root (libraries for dynamic apps, ...)
#   OVERLAY     KEY VALUE pairs (space separated) for the fw_cfg run overlay
#   APPEND      extra kernel command line words (e.g. fuse.debug=1)
#   QEMU_EXTRA  extra QEMU arguments; NONET=1 boots without a network device
#   MACHINE     pc (default, virtio-*-pci) or microvm (virtio-*-device)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
work=${WORK:-/tmp/fuse-init-dev}
kernel=${KERNEL:-/tmp/kb/linux-source-6.12/arch/x86/boot/bzImage}
gen=${GEN_INIT_CPIO:-/tmp/kb/linux-source-6.12/usr/gen_init_cpio}
app=$1
shift

rm -rf "$work"
mkdir -p "$work/root"
gcc -Wall -Wextra -Werror -Os -static -s -ffunction-sections -fdata-sections \
	-Wl,--gc-sections "$here"/../*.c -o "$work/init"

cat >"$work/cpio.list" <<LIST
dir /dev 0755 0 0
nod /dev/console 0600 0 0 c 5 1
dir /proc 0755 0 0
dir /sys 0755 0 0
dir /newroot 0755 0 0
file /init $work/init 0755 0 0
LIST
"$gen" "$work/cpio.list" >"$work/initramfs.cpio"

r=$work/root
mkdir -p "$r"/{dev,proc,sys,tmp,run,etc/fuse}
ln -s /run/resolv.conf "$r/etc/resolv.conf"
ln -s /run/hosts "$r/etc/hosts"
cp "$app" "$r/app"
if [ -n "${EXTRA_ROOT:-}" ]; then cp -a "$EXTRA_ROOT"/. "$r"/; fi
{
	printf 'fuse-spec\0001\0'
	for word in "$@"; do printf '%s\0' "$word"; done
} >"$r/etc/fuse/spec"
mksquashfs "$r" "$work/root.squashfs" -comp zstd -all-root -noappend -quiet >/dev/null

fwcfg=()
if [ -n "${OVERLAY:-}" ]; then
	{
		printf 'fuse-spec\0001\0'
		for word in $OVERLAY; do printf '%s\0' "$word"; done
	} >"$work/overlay.bin"
	fwcfg=(-fw_cfg "name=opt/fuse/run,file=$work/overlay.bin")
fi
machine=${MACHINE:-pc}
if [ "$machine" = microvm ]; then
	machine=microvm,acpi=on
	bus=device
else
	bus=pci
fi
net=(-netdev user,id=n0 -device "virtio-net-$bus,netdev=n0")
if [ -n "${NONET:-}" ]; then net=(); fi

# shellcheck disable=SC2086
exec timeout 60 qemu-system-x86_64 -accel tcg -M "$machine" -m 256 -nodefaults \
	-no-user-config -display none -serial stdio -no-reboot \
	-kernel "$kernel" -initrd "$work/initramfs.cpio" \
	-append "console=ttyS0 quiet loglevel=1 panic=-1 rdinit=/init fuse.root=/dev/vda fuse.rootfstype=squashfs ${APPEND:-}" \
	-drive "file=$work/root.squashfs,format=raw,if=none,id=root,readonly=on" \
	-device "virtio-blk-$bus,drive=root" "${net[@]}" -device "virtio-rng-$bus" \
	"${fwcfg[@]}" ${QEMU_EXTRA:-}
