#!/usr/bin/env bash
# Collect every wheel the CPU image needs into docker/wheels/ (or $1), pinned by constraints.txt,
# so that `docker build -f docker/Dockerfile.cpu` installs with `pip --no-index` and downloads
# nothing itself -- as on an air-gapped cluster, or where only the host trusts the HTTPS proxy.
# Run it with a Python of the same version as the image's python3 (bookworm: 3.11); PIP picks it.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
dest=${1:-$root/docker/wheels}
pip=${PIP:-$root/.venv/bin/pip}
[ -x "$pip" ] || pip=pip
mkdir -p "$dest"
# DeepSpeed ships as source only: `pip wheel` builds it (without ops) here on the host.
DS_BUILD_OPS=0 "$pip" wheel -q --disable-pip-version-check -c "$root/constraints.txt" -w "$dest" "$root"
# The image installs instar from its source; a stale wheel of it here would be picked instead.
rm -f "$dest"/instar-*.whl
echo "wheelhouse: $(find "$dest" -name '*.whl' | wc -l) wheels, $(du -sh "$dest" | cut -f1) in $dest"
