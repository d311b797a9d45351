#!/usr/bin/env bash
# The Docker check behind `make docker-test`: build docker/Dockerfile.cpu on a Debian image made
# here (no registry needed) and run the tiny pipeline inside the container to completion.
# Usage (as root): docker/test-cpu.sh OUT_DIR [instar run overrides...]
# Installs docker.io and debootstrap with apt-get if missing; starts dockerd if none answers and
# stops it again at the end. The run folder lands in OUT_DIR/runs/<run name> on the host; the
# script prints the time of each phase and exits non-zero if the build or any stage fails.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out=${1:?usage: docker/test-cpu.sh OUT_DIR [overrides...]}
shift
image=${INSTAR_CPU_IMAGE:-instar-cpu:test}
base=${INSTAR_BASE_IMAGE:-instar-debian:bookworm}
recipe=recipes/tiny/pipeline.yaml
[ "$(id -u)" = 0 ] || { echo "docker/test-cpu.sh needs root (apt-get, dockerd, debootstrap)" >&2; exit 2; }

phase_name="" phase_start=$SECONDS
phase() {  # close the current phase with its time, then open the next (none: "")
  [ -z "$phase_name" ] || echo "-- $phase_name: $((SECONDS - phase_start)) s"
  phase_name=$1 phase_start=$SECONDS
  [ -z "$phase_name" ] || echo "== $phase_name"
}

phase "system packages"
missing=()
command -v dockerd >/dev/null || missing+=(docker.io)
command -v debootstrap >/dev/null || missing+=(debootstrap)
if [ ${#missing[@]} -gt 0 ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

dockerd_pid=""
container=instar-cpu-test-$$
cleanup() {
  docker rm -f "$container" >/dev/null 2>&1 || true
  if [ -n "$dockerd_pid" ]; then
    kill "$dockerd_pid" 2>/dev/null || true
    wait "$dockerd_pid" 2>/dev/null || true
  fi
}
trap cleanup EXIT
if ! docker info >/dev/null 2>&1; then
  phase "starting dockerd (log: $out/dockerd.log)"
  mkdir -p "$out"
  dockerd >"$out/dockerd.log" 2>&1 &
  dockerd_pid=$!
  for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
  docker info >/dev/null 2>&1 || { tail -n 20 "$out/dockerd.log" >&2; echo "dockerd did not start" >&2; exit 1; }
fi

phase "base image $base"
"$root/docker/make-base-image.sh" "$base"

phase "wheelhouse"
"$root/docker/wheelhouse.sh"

phase "docker build -f docker/Dockerfile.cpu -t $image"
docker build -f "$root/docker/Dockerfile.cpu" --build-arg "BASE=$base" -t "$image" "$root"
docker image ls "$image"

phase "instar run $recipe $* (in the container)"
mkdir -p "$out/runs"
chown 1000:1000 "$out/runs"   # the image runs as uid 1000, not root
mounts=(-v "$root/recipes:/work/recipes:ro" -v "$out/runs:/work/runs")
# --init: a small init as PID 1 forwards signals (docker stop -> SIGTERM) to instar and reaps
# the processes torchrun leaves; Python as PID 1 would ignore SIGTERM.
docker run --init --name "$container" "${mounts[@]}" "$image" run "$recipe" "$@"
docker rm "$container" >/dev/null

phase "instar status (in the container)"
run_name=$(docker run --rm --entrypoint python "${mounts[@]}" "$image" \
  -c "import yaml; print(yaml.safe_load(open('$recipe'))['run']['name'])")
docker run --rm -e COLUMNS=160 "${mounts[@]}" "$image" status "runs/$run_name"
phase ""
