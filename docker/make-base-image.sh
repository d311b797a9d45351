#!/usr/bin/env bash
# Make a Debian base image with no registry at hand: debootstrap a minimal root file system and
# `docker import` it. Needs root (debootstrap) and a running dockerd; does nothing if the image
# exists. Usage: docker/make-base-image.sh [IMAGE] [SUITE]
#   defaults: instar-debian:bookworm bookworm  (bookworm's python3 is 3.11, like the cp311 wheels)
set -euo pipefail
image=${1:-instar-debian:bookworm}
suite=${2:-bookworm}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
if docker image inspect "$image" >/dev/null 2>&1; then
  echo "base image $image exists"
  exit 0
fi
rootfs=$(mktemp -d /var/tmp/instar-rootfs.XXXXXX)
trap 'rm -rf "$rootfs" "$rootfs.log"' EXIT
if ! debootstrap --variant=minbase "$suite" "$rootfs" "$mirror" >"$rootfs.log" 2>&1; then
  tail -n 20 "$rootfs.log" >&2
  echo "debootstrap $suite failed (log above)" >&2
  exit 1
fi
tar -C "$rootfs" -c . | docker import - "$image" >/dev/null
echo "base image $image made from debootstrap $suite ($mirror)"
