#!/usr/bin/env bash
# System libraries the project needs that pip cannot provide: EGL (Mesa) for off-screen MuJoCo rendering.
set -euo pipefail
need=()
for pkg in libegl1 libegl-mesa0 libgl1-mesa-dri; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && apt-get install -y -qq "${need[@]}"
  else
    echo "missing system packages: ${need[*]} (install them for Meta-World rendering)" >&2
  fi
fi
