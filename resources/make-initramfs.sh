#!/usr/bin/env bash
# Make a tiny initramfs for booting hopvm guests.
#
# Usage: resources/make-initramfs.sh OUT
#
# Writes OUT, an uncompressed "newc" cpio archive (which the kernel accepts
# as an initramfs as it is) holding:
#
#   /dev          directory
#   /dev/console  character device 5:1, so /init has a console for fds 0-2
#   /proc, /sys   empty directories
#   /init         a 64-bit static x86-64 ELF program, written byte by byte
#                 below: it writes "hopvm-initramfs: /init running" to
#                 stdout, then powers the machine off with reboot(2)
#                 (LINUX_REBOOT_CMD_POWER_OFF); if that fails it pause(2)s
#                 forever.
#
# Needs only bash and coreutils: no cpio, compiler, python or root (the
# device node is described in the archive, not created with mknod). The
# output is reproducible (all timestamps are 0). Prints the path of OUT.
set -euo pipefail

die() {
    echo "make-initramfs: error: $*" >&2
    exit 1
}

[[ $# -eq 1 && -n "$1" && "$1" != -* ]] || die "usage: $0 OUT"
out="$1"
out_dir="$(dirname -- "$out")"
[[ -d "$out_dir" ]] || die "directory $out_dir does not exist"

# Hex helpers: little-endian fields, and hex text to raw bytes.
le16() { printf '%02x%02x' $(($1 & 0xff)) $((($1 >> 8) & 0xff)); }
le32() { printf '%s%s' "$(le16 $(($1 & 0xffff)))" "$(le16 $((($1 >> 16) & 0xffff)))"; }
le64() { printf '%s%s' "$(le32 $(($1 & 0xffffffff)))" "$(le32 $((($1 >> 32) & 0xffffffff)))"; }
hex_to_bin() {
    local hex="$1" escaped="" i
    for ((i = 0; i < ${#hex}; i += 2)); do
        escaped+="\\x${hex:i:2}"
    done
    printf '%b' "$escaped"
}
text_hex() { printf '%s' "$1" | od -An -v -tx1 | tr -d ' \n'; }

# /init: ELF header, one PT_LOAD program header, code, message.
make_init() {
    local message=$'hopvm-initramfs: /init running\n'
    local base=$((0x400000)) headers=$((64 + 56))
    local code_len=55 msg_len=${#message}
    local size=$((headers + code_len + msg_len))
    local code
    # Offsets in the code: 0 write(1, msg, len); 24 reboot(magic1, magic2,
    # POWER_OFF); 46 loop: pause(); jmp loop. lea's rip-relative offset is
    # from the end of the lea (17) to the message (55): 38.
    code="b801000000"                   # mov eax, 1 (write)
    code+="bf01000000"                  # mov edi, 1 (stdout)
    code+="488d35$(le32 38)"            # lea rsi, [rip + 38] (message)
    code+="ba$(le32 "$msg_len")"        # mov edx, len
    code+="0f05"                        # syscall
    code+="b8a9000000"                  # mov eax, 169 (reboot)
    code+="bfaddee1fe"                  # mov edi, 0xfee1dead
    code+="be69191228"                  # mov esi, 0x28121969
    code+="badcfe2143"                  # mov edx, 0x4321fedc (POWER_OFF)
    code+="0f05"                        # syscall
    code+="b822000000"                  # mov eax, 34 (pause)
    code+="0f05"                        # syscall
    code+="ebf7"                        # jmp back to the pause
    [[ ${#code} -eq $((code_len * 2)) ]] || die "internal error: code is $((${#code} / 2)) bytes"

    local elf
    elf="7f454c46020101000000000000000000" # ELF64, little-endian, SysV
    elf+="$(le16 2)$(le16 0x3e)$(le32 1)"  # ET_EXEC, x86-64, version 1
    elf+="$(le64 $((base + headers)))"     # e_entry: the code
    elf+="$(le64 64)$(le64 0)$(le32 0)"    # e_phoff, e_shoff, e_flags
    elf+="$(le16 64)$(le16 56)$(le16 1)"   # e_ehsize, e_phentsize, e_phnum
    elf+="$(le16 64)$(le16 0)$(le16 0)"    # e_shentsize, e_shnum, e_shstrndx
    elf+="$(le32 1)$(le32 5)$(le64 0)"     # PT_LOAD, R+X, from file offset 0
    elf+="$(le64 "$base")$(le64 "$base")"  # p_vaddr, p_paddr
    elf+="$(le64 "$size")$(le64 "$size")"  # p_filesz, p_memsz
    elf+="$(le64 0x1000)"                  # p_align
    hex_to_bin "$elf$code$(text_hex "$message")"
}

# newc cpio: per entry a 110-byte ASCII header of "070701" and 13 8-digit
# hex fields, the NUL-terminated name padded to 4 bytes, the data padded to
# 4 bytes; then a TRAILER!!! entry.
ino=0
cpio_entry() {
    local name="$1" mode="$2" data_file="$3" rdev_major="${4:-0}" rdev_minor="${5:-0}"
    local size=0 nlink=1 namesize=$((${#1} + 1))
    [[ -z "$data_file" ]] || size="$(stat -c %s "$data_file")"
    [[ $((mode & 0170000)) -ne $((0040000)) ]] || nlink=2
    ino=$((ino + 1))
    printf '070701%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x' \
        "$ino" "$mode" 0 0 "$nlink" 0 "$size" 0 0 "$rdev_major" "$rdev_minor" "$namesize" 0
    printf '%s\0' "$name"
    head -c $(((4 - (110 + namesize) % 4) % 4)) /dev/zero
    if [[ -n "$data_file" ]]; then
        cat "$data_file"
        head -c $(((4 - size % 4) % 4)) /dev/zero
    fi
}

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
make_init >"$tmp/init"
[[ "$(stat -c %s "$tmp/init")" -eq $((64 + 56 + 55 + 31)) ]] || die "internal error: bad /init size"

{
    cpio_entry dev $((0040755)) ""
    cpio_entry dev/console $((0020600)) "" 5 1
    cpio_entry proc $((0040755)) ""
    cpio_entry sys $((0040755)) ""
    cpio_entry init $((0100755)) "$tmp/init"
    cpio_entry TRAILER!!! 0 ""
} >"$tmp/initramfs.cpio"

mv "$tmp/initramfs.cpio" "$out"
echo "make-initramfs: wrote $(stat -c %s "$out") bytes" >&2
echo "$out"
