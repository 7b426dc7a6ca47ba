#!/bin/sh
# Unpacks the benchmark's Debian packages (bpftrace, rt-tests for hackbench)
# into build/bench/<release>/root, for the guest to run from /src. The image
# itself stays as the test suite has it. Run through tests/vm/in-image: apt
# works there on a scratch copy of its lists, at native speed.
set -eu
release=${GUEST_RELEASE:?run me through tests/vm/in-image}
out=/src/build/bench/$release/root
[ -x "$out/usr/bin/bpftrace" ] && [ -x "$out/usr/bin/hackbench" ] && exit 0
mount -t tmpfs tmpfs /var/lib/apt/lists
mount -t tmpfs tmpfs /var/cache/apt
mkdir -p /var/lib/apt/lists/partial /var/cache/apt/archives/partial
apt-get update -qq
# What the image lacks of the two packages and their dependencies.
pkgs=$(apt-get install -s --no-install-recommends bpftrace rt-tests | awk '/^Inst /{print $2}')
cd /tmp
apt-get download -qq $pkgs
rm -rf "$out"
mkdir -p "$out"
for deb in /tmp/*.deb; do
	dpkg-deb -x "$deb" "$out"
done
echo "bench extras for $release: $pkgs"
