#!/usr/bin/env bash
# Installs what livemig needs besides Rust: QEMU, binutils (the test guest is
# assembled with `as`/`ld`) and iproute2 (network-namespace tests).
set -euo pipefail

need=()
command -v qemu-system-x86_64 >/dev/null 2>&1 || need+=(qemu-system-x86)
command -v as >/dev/null 2>&1 && command -v ld >/dev/null 2>&1 || need+=(binutils)
command -v ip >/dev/null 2>&1 || need+=(iproute2)

if [ ${#need[@]} -gt 0 ]; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    echo "==> installing ${need[*]}"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null
fi
qemu-system-x86_64 --version | head -n 1
