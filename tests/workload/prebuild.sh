#!/bin/sh
# Builds tracer_workload.ko into build/workload/<release>/ for a guest's kernel.
# Run through tests/vm/in-image, which sets GUEST_RELEASE and puts the
# checkout at /src: on the host that takes seconds; in the guest, minutes.
set -eu
release=${GUEST_RELEASE:?run me through tests/vm/in-image}
out=/src/build/workload/$release
mkdir -p "$out"
cp /src/tests/workload/tracer_workload.c /src/tests/workload/Kbuild "$out/"
make -s -C "/lib/modules/$release/build" M="$out" modules
