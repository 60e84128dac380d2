#!/usr/bin/env bash
# Installs what livemig needs besides Rust: QEMU and qemu-img, binutils (the
# bare-metal test guest is assembled with `as`/`ld`), iproute2
# (network-namespace tests), the Linux test guest's pieces: Debian's
# cloud kernel and a static busybox (guest/src/linux packs them with our
# workload into an initramfs), etcd (the cluster's shared state; the tests
# start their own) and protoc (the etcd client's build compiles etcd's
# protocol).
#
# `--with-libvirt` also installs libvirt (libvirtd with its QEMU driver, and
# virsh): the storage and start benchmarks run `virsh migrate` beside
# livemig on the same guest. The tests do not need it.
set -euo pipefail

with_libvirt=false
for arg in "$@"; do
    case "$arg" in
    --with-libvirt) with_libvirt=true ;;
    *)
        echo "usage: $0 [--with-libvirt]" >&2
        exit 2
        ;;
    esac
done

# What is missing, as the packages that provide it.
missing() {
    local need=()
    command -v qemu-system-x86_64 >/dev/null 2>&1 || need+=(qemu-system-x86)
    command -v as >/dev/null 2>&1 && command -v ld >/dev/null 2>&1 || need+=(binutils)
    command -v ip >/dev/null 2>&1 || need+=(iproute2)
    command -v qemu-img >/dev/null 2>&1 || need+=(qemu-utils)
    command -v etcd >/dev/null 2>&1 || need+=(etcd-server)
    command -v protoc >/dev/null 2>&1 || need+=(protobuf-compiler)
    dpkg-query -W -f='${Status}' busybox-static 2>/dev/null | grep -q "ok installed" ||
        need+=(busybox-static)
    ls /boot/vmlinuz-*-cloud-amd64 >/dev/null 2>&1 || need+=(linux-image-cloud-amd64)
    if $with_libvirt; then
        [ -x /usr/sbin/libvirtd ] || need+=(libvirt-daemon libvirt-daemon-driver-qemu)
        command -v virsh >/dev/null 2>&1 || need+=(libvirt-clients)
    fi
    echo "${need[*]}"
}

sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
updated=false
install() {
    echo "==> installing $*"
    if ! $updated; then
        $sudo apt-get update -qq
        updated=true
    fi
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$@" >/dev/null
}

# Installing one package can remove another: a newer qemu-utils (from
# backports) conflicts with Debian's qemu-system-x86, so apt removes it and
# qemu-img is gone. Check again after each install and put back what went.
for _ in 1 2; do
    need=$(missing)
    [ -z "$need" ] && break
    # shellcheck disable=SC2086
    install $need
done
need=$(missing)
if [ -n "$need" ]; then
    echo "setup: still missing after installing: $need" >&2
    exit 1
fi
qemu-system-x86_64 --version | head -n 1
qemu-img --version | head -n 1
