# The host's side of a delta publish (image_factory.pve.upload_delta), sent as one command after the delta has
# arrived through the verified upload (upload_host.sh):
#     sh -c "<this file>" factory-delta IMPORT_DIR BASE DELTA FINAL GUEST_SHA256
# Only POSIX sh, qemu-img (pve-qemu-kvm), stat, rm, mv and openssl or sha256sum are needed.
#
# Rebuild the full image FINAL from the base BASE (an import file already in IMPORT_DIR, never written) and the
# delta DELTA (a qcow2 of the clusters that differ from it): point the delta at the base (an unsafe rebase only
# rewrites the delta's header), convert the chain into a new, independent qcow2 under a temporary name, check
# that the guest reads it as GUEST_SHA256 (the sha256 of the raw disk, recorded in the build's manifest: the
# rebuilt file's own bytes depend on this qemu-img), and only then rename it to FINAL. The delta and every
# temporary file are removed whatever happens; on failure FINAL is not touched.
#
# Output: "OK <size of FINAL>" (renamed), or "BAD <guest sha256>" (exit 6).
# Exit status: 2 a wrong call or IMPORT_DIR missing; 3 the base is missing; 4 qemu-img failed (stderr says why,
# e.g. no space); 5 the rename failed; 6 the rebuilt image's guest view is not GUEST_SHA256 (the base is not
# the image the delta was made against).

[ $# -eq 5 ] || { echo "usage: factory-delta IMPORT_DIR BASE DELTA FINAL GUEST_SHA256" >&2; exit 2; }
dir=$1 base=$2 delta=$3 final=$4 guest=$5
cd -- "$dir" || exit 2
work=".$final.rebuild" raw=".$final.guestview"
trap 'rm -f -- "$delta" "$work" "$raw"' EXIT
trap 'exit 4' HUP INT TERM
[ -f "$base" ] || { echo "the base $base is not in $dir" >&2; exit 3; }
[ -f "$delta" ] || { echo "the delta $delta is not in $dir" >&2; exit 2; }
# The backing file is named relative to the delta (both are in IMPORT_DIR).
qemu-img rebase -q -u -f qcow2 -b "$base" -F qcow2 "$delta" || exit 4
qemu-img convert -q -f qcow2 -O qcow2 "$delta" "$work" || exit 4
# qemu-img cannot write raw to a pipe (it resizes its target): a sparse file, holding only the data, is hashed.
qemu-img convert -q -f qcow2 -O raw "$work" "$raw" || exit 4
if command -v openssl >/dev/null 2>&1; then h=$(openssl dgst -sha256 -r < "$raw"); else h=$(sha256sum < "$raw"); fi
h=${h%% *}
rm -f -- "$raw"
[ "$h" = "$guest" ] || { echo "BAD $h"; exit 6; }
mv -f -- "$work" "$final" || exit 5
echo "OK $(stat -c %s -- "$final")"
