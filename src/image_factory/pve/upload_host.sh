# The host's side of one SSH upload attempt (image_factory.pve.upload_engines), sent as one command:
#     sh -c "<this file>" factory-upload PARTIAL FINAL SIZE SHA256 LOCK_WAIT
# One command because each exec costs a round trip and a session. Only POSIX sh, flock, stat, head, cat, mv and
# openssl or sha256sum are needed (perl, on every Debian host as perl-base, makes it faster).
#
# Lock the partial (a writer left from a dropped connection finishes first, and appends never interleave), empty
# it if it is longer than the artifact (it cannot be a prefix of it), report its size, append stdin, and rename
# only when size and sha256 match. The hash is computed while the bytes arrive (after the partial's earlier part,
# read back from disk, on a resume), so verifying costs no pass over the file after the transfer.
#
# Output: the partial's size on its own line, then "OK <size> <sha256>" (renamed) or "BAD <size> <sha256>".
# Exit status: 1 the partial is still locked by an earlier writer; 2 the partial cannot be opened or read (or a
# wrong call); 4 a write failed (the partial is short, stderr says why); 5 the rename failed.

[ $# -eq 5 ] || { echo "usage: factory-upload PARTIAL FINAL SIZE SHA256 LOCK_WAIT" >&2; exit 2; }
part=$1 final=$2 size=$3 sha=$4 lock_wait=$5

# The tee between sshd, the partial and the hasher. Where both ends are pipes (sshd's session stdin is one on
# Linux) the kernel does it: tee(2) hands the hasher the bytes without consuming them and splice(2) moves them
# into the partial, so nothing is copied through this process (the copying loop cost the host about 0.2 of a
# core at 200 MB/s). splice refuses a file opened for appending, so it writes through a second descriptor
# positioned at the end; the lock on fd 8 still excludes every other writer. Where tee fails at once (stdin
# not a pipe), perl has no syscall.ph, or the first splice fails (a filesystem without splice support), a
# copying loop with large reads and 1 MiB pipes does it (bytes already teed to the hasher are only written
# to the partial); coreutils tee reads 8 KiB at a time through 64 KiB pipes, which made the verified upload
# slower than hashing after it (bench/upload). A failed write stops it with the reason on stderr.
# 1031 is F_SETPIPE_SZ.
tee_through_partial='
fcntl(STDIN, 1031, 1 << 20); fcntl(STDOUT, 1031, 1 << 20);
open(my $f, ">>&=", 8) or die "partial: $!\n"; binmode STDIN; binmode STDOUT; my $b;
sub put { my ($fh, $n) = @_; my $o = 0; while ($o < $n) { my $w = syswrite($fh, $b, $n - $o, $o);
  die "write: $!\n" unless defined $w; $o += $w } }
my ($tee, $splice) = eval { require "syscall.ph"; (&SYS_tee, &SYS_splice) };
my ($w, $moved) = (undef, 0);
if (defined $tee && open($w, "+<", "/proc/self/fd/8") && defined sysseek($w, 0, 2)) { while (1) {
  my $n = syscall($tee, 0, 1, 1 << 20, 0);
  if ($n < 0) { die "tee: $!\n" if $moved; last } exit 0 if $n == 0;
  while ($n > 0) { my $m = syscall($splice, 0, 0, fileno($w), 0, $n, 0);
    if ($m > 0) { $n -= $m; $moved += $m; next } die "write: $!\n" if $moved;
    while ($n > 0) { my $r = sysread(STDIN, $b, $n); die "read: $!\n" unless $r; put($f, $r); $n -= $r } }
  last unless $moved } }
while (1) { my $n = sysread(STDIN, $b, 4 << 20); die "read: $!\n" unless defined $n; last unless $n;
  put($f, $n); put(\*STDOUT, $n) }
'

exec 8>>"$part" || exit 2
flock -w "$lock_wait" 8 || exit 1
off=$(stat -c %s -- "$part") || exit 2
if [ "$off" -gt "$size" ]; then : > "$part" || exit 2; off=0; fi  # not this artifact's: start over
echo "$off"
if command -v openssl >/dev/null 2>&1; then hasher='openssl dgst -sha256 -r'; else hasher=sha256sum; fi
if command -v perl >/dev/null 2>&1; then
    h=$({ head -c "$off" < "$part" && perl -e "$tee_through_partial"; } | $hasher)
else  # no perl: hash after the transfer
    cat >&8 || exit 4
    h=$($hasher < "$part")
fi
h=${h%% *}
sz=$(stat -c %s -- "$part")
[ "$sz" -ge "$size" ] || exit 4
if [ "$sz" = "$size" ] && [ "$h" = "$sha" ]; then
    mv -f -- "$part" "$final" || exit 5
    echo "OK $sz $h"
else
    echo "BAD $sz $h"
fi
