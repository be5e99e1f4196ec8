#!/usr/bin/env bash
# Fetch Debian's cloud kernel (a bzImage) for booting hopvm guests.
#
# Usage: resources/fetch-kernel.sh
#
# Resolves the meta package linux-image-cloud-amd64 to the real
# linux-image-<version>-cloud-amd64 package, downloads it with
# `apt-get download`, unpacks it with `dpkg-deb -x` and leaves in
# resources/kernels/ (gitignored):
#
#   vmlinuz     the bzImage (what hopvm boots)
#   vmlinux     the decompressed ELF kernel, when a decompressor for the
#               payload is installed (optional: hopvm decompresses the
#               bzImage payload itself)
#   config      the kernel's .config
#   System.map  the kernel's symbol map
#   VERSION     the package name and version that was fetched
#
# Idempotent: does nothing when vmlinuz is already there. Prints the path of
# vmlinuz on stdout; progress and errors go to stderr.
#
# Environment:
#   KERNEL_PACKAGE  package to resolve (default linux-image-cloud-amd64);
#                   may also name a real linux-image-<version>-<flavour> package
#   KERNELS_DIR     output directory (default: kernels/ beside this script)
set -euo pipefail

die() {
    echo "fetch-kernel: error: $*" >&2
    exit 1
}

note() {
    echo "fetch-kernel: $*" >&2
}

script_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
kernels_dir="${KERNELS_DIR:-$script_dir/kernels}"
meta_pkg="${KERNEL_PACKAGE:-linux-image-cloud-amd64}"
vmlinuz="$kernels_dir/vmlinuz"
vmlinux="$kernels_dir/vmlinux"

# Reads a little-endian unsigned integer of $3 bytes at offset $2 of file $1.
read_le() {
    local file="$1" off="$2" len="$3" value=0 shift=0 byte
    for byte in $(od -An -v -tu1 -j "$off" -N "$len" "$file"); do
        value=$((value + (byte << shift)))
        shift=$((shift + 8))
    done
    echo "$value"
}

# Writes the decompressed payload of bzImage $1 to $2, if the tool for its
# compression format is installed. Returns non-zero (with a note) otherwise.
extract_vmlinux() {
    local img="$1" out="$2"
    local magic setup_sects pm_start payload_offset payload_length start magic_hex
    magic="$(dd if="$img" bs=1 skip=514 count=4 status=none)"
    [[ "$magic" == "HdrS" ]] || { note "$img has no bzImage setup header"; return 1; }
    setup_sects="$(read_le "$img" $((0x1f1)) 1)"
    [[ "$setup_sects" -ne 0 ]] || setup_sects=4
    pm_start=$(((setup_sects + 1) * 512))
    payload_offset="$(read_le "$img" $((0x248)) 4)"
    payload_length="$(read_le "$img" $((0x24c)) 4)"
    start=$((pm_start + payload_offset))
    [[ "$payload_length" -gt 4 ]] || { note "$img has no compressed payload"; return 1; }
    magic_hex="$(od -An -v -tx1 -j "$start" -N 6 "$img" | tr -d ' \n')"

    # Every format except gzip carries a 4-byte size trailer that the
    # decompression tools would reject as trailing garbage: cut it off.
    local tool len="$payload_length" format
    case "$magic_hex" in
        1f8b*) format=gzip tool=(gzip -dc) ;;
        fd377a585a00) format=xz tool=(xz -dc --single-stream) len=$((len - 4)) ;;
        28b52ffd*) format=zstd tool=(zstd -dcq) len=$((len - 4)) ;;
        5d0000*) format=lzma tool=(xz -dc --format=lzma) len=$((len - 4)) ;;
        425a68*) format=bzip2 tool=(bzip2 -dc) len=$((len - 4)) ;;
        02214c18*) format=lz4 tool=(lz4 -dc) len=$((len - 4)) ;;
        894c5a4f*) format=lzo tool=(lzop -dc) len=$((len - 4)) ;;
        *) note "unknown payload compression (magic $magic_hex)"; return 1 ;;
    esac
    note "payload: $format, $payload_length bytes at offset $start"
    if ! command -v "${tool[0]}" >/dev/null 2>&1; then
        note "'${tool[0]}' is not installed: not writing vmlinux (hopvm does not need it)"
        return 1
    fi
    dd if="$img" iflag=skip_bytes,count_bytes skip="$start" count="$len" bs=1M status=none |
        "${tool[@]}" >"$out.tmp" || {
        rm -f "$out.tmp"
        note "decompressing the $format payload failed"
        return 1
    }
    if [[ "$(od -An -tx1 -N4 "$out.tmp" | tr -d ' \n')" != "7f454c46" ]]; then
        rm -f "$out.tmp"
        note "decompressed payload is not an ELF file"
        return 1
    fi
    mv "$out.tmp" "$out"
}

if [[ -s "$vmlinuz" ]]; then
    note "already fetched ($(cat "$kernels_dir/VERSION" 2>/dev/null || echo "unknown version"))"
    echo "$vmlinuz"
    exit 0
fi

command -v apt-get >/dev/null 2>&1 || die "apt-get not found (this script needs a Debian-based host)"
command -v apt-cache >/dev/null 2>&1 || die "apt-cache not found"
command -v dpkg-deb >/dev/null 2>&1 || die "dpkg-deb not found"

# The real package is the meta package's linux-image-<version>-... dependency.
resolve_package() {
    if [[ "$meta_pkg" =~ ^linux-image-[0-9] ]]; then
        apt-cache show --no-all-versions "$meta_pkg" >/dev/null 2>&1 && echo "$meta_pkg"
        return 0
    fi
    apt-cache depends --no-recommends --no-suggests "$meta_pkg" 2>/dev/null |
        awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9]/ { print $2; exit }'
}

pkg="$(resolve_package || true)"
if [[ -z "$pkg" ]]; then
    note "'$meta_pkg' not in the package lists; running apt-get update"
    apt-get update >&2 || die "apt-get update failed (run as root?)"
    pkg="$(resolve_package || true)"
fi
[[ -n "$pkg" ]] || die "cannot resolve '$meta_pkg' to a linux-image-<version> package"
version="$(apt-cache show --no-all-versions "$pkg" | awk '$1 == "Version:" { print $2; exit }')"
note "fetching $pkg ${version:-}"

mkdir -p "$kernels_dir"
work="$(mktemp -d "$kernels_dir/.fetch.XXXXXX")"
trap 'rm -rf "$work"' EXIT

# apt-get download writes into the current directory. As root it warns that
# the download is unsandboxed: let the _apt user own the directory if present.
if id _apt >/dev/null 2>&1; then
    chown _apt "$work" 2>/dev/null || true
fi
(cd "$work" && apt-get download "$pkg" >&2) || die "apt-get download $pkg failed"
deb="$(find "$work" -maxdepth 1 -name '*.deb' -print -quit)"
[[ -n "$deb" ]] || die "apt-get download did not produce a .deb"

dpkg-deb -x "$deb" "$work/root" || die "dpkg-deb -x $deb failed"
src="$(find "$work/root/boot" -maxdepth 1 -name 'vmlinuz-*' -print -quit 2>/dev/null || true)"
[[ -n "$src" ]] || die "$pkg contains no /boot/vmlinuz-*"
kver="${src##*/vmlinuz-}"
[[ "$(dd if="$src" bs=1 skip=514 count=4 status=none)" == "HdrS" ]] ||
    die "$src is not a bzImage (no HdrS magic)"

for f in config System.map; do
    if [[ -f "$work/root/boot/$f-$kver" ]]; then
        cp "$work/root/boot/$f-$kver" "$kernels_dir/$f"
    fi
done
echo "$pkg $version ($kver)" >"$kernels_dir/VERSION"

if [[ ! -s "$vmlinux" ]]; then
    extract_vmlinux "$src" "$vmlinux" || true
fi

# vmlinuz last, so that an interrupted run is redone next time.
cp "$src" "$vmlinuz.tmp"
mv "$vmlinuz.tmp" "$vmlinuz"
note "kernel $kver in $kernels_dir"
echo "$vmlinuz"
