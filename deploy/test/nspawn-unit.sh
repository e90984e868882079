#!/bin/sh
# Boots a Debian 12 root file system with a real systemd (systemd-nspawn -b, private
# network), installs rpcproxy offline from wheels as deploy/README.md says, and runs
# the unit: start, TLS on 443, journal priorities, a SIGSTOPped worker killed and
# respawned, a bad key ending in "failed" with status 78 instead of a restart loop.
# Logins as on a Samba AD DC host: the machine provisions a throwaway DC on loopback
# (samba starts winbindd) and an NTLM login goes through the hardened unit's ntlm_auth.
#
#   sudo deploy/test/nspawn-unit.sh          (needs debootstrap, systemd-container)
#
# The first run downloads Debian (debootstrap, a few minutes) and the wheels (pip);
# later runs reuse them from $WORK. The machine has no network (--private-network).
set -eu
REPO=$(cd "$(dirname "$0")/../.." && pwd)
WORK=${WORK:-/var/tmp/rpcproxy-deploy-test}
ROOT=$WORK/rootfs
MACHINE=$WORK/machine
WHEELS=$WORK/wheels
PIP=${PIP:-pip3}
mkdir -p "$WORK"

# Samba as on an AD DC (samba starts winbindd; ntlm_auth is in winbind), without Recommends
# in both paths below (debootstrap installs none).
SAMBA="samba samba-ad-dc samba-ad-provision samba-dsdb-modules samba-vfs-modules winbind"
SAMBA="$SAMBA python3-samba krb5-user"
# strace: the self-test traces the unit's ntlm_auth helpers for calls its hardening refused.
SAMBA="$SAMBA strace"
if [ ! -d "$ROOT" ]; then
    debootstrap --variant=minbase \
        --include="systemd,systemd-sysv,dbus,python3-venv,iproute2,procps,$(echo $SAMBA | tr ' ' ,)" \
        bookworm "$ROOT.tmp" http://deb.debian.org/debian
    mv "$ROOT.tmp" "$ROOT"
fi
# shellcheck disable=SC2086
if ! chroot "$ROOT" dpkg-query -W $SAMBA >/dev/null 2>&1; then
    # A rootfs cached by an older version of this script: add Samba from Debian's mirror
    # (the host has network; the booted machine has none). No service starts in the chroot.
    cp /etc/resolv.conf "$ROOT/etc/resolv.conf"
    printf '#!/bin/sh\nexit 101\n' > "$ROOT/usr/sbin/policy-rc.d"
    chmod 0755 "$ROOT/usr/sbin/policy-rc.d"
    chroot "$ROOT" env DEBIAN_FRONTEND=noninteractive apt-get update -q
    chroot "$ROOT" env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -q --no-install-recommends $SAMBA
    chroot "$ROOT" apt-get clean
    rm -f "$ROOT/usr/sbin/policy-rc.d"
fi
# Wheels are fetched again when pyproject.toml (the dependencies) changed since.
deps=$(sha256sum < "$REPO/pyproject.toml" | cut -d' ' -f1)
if [ "$(cat "$WHEELS/.complete" 2>/dev/null)" != "$deps" ]; then
    # The offline path of deploy/README.md: every wheel once, setuptools included.
    "$PIP" wheel --quiet --wheel-dir "$WHEELS" "$REPO[metrics]" setuptools
    echo "$deps" > "$WHEELS/.complete"
fi

rm -rf "$MACHINE"
cp -a "$ROOT" "$MACHINE"
mkdir -p "$MACHINE/src"
for f in pyproject.toml README.md dcerpc rpcproxy ntlm bench deploy; do
    cp -a "$REPO/$f" "$MACHINE/src/"
done
cp -a "$WHEELS" "$MACHINE/wheels"
cp "$REPO/deploy/test/nspawn-selftest.sh" "$MACHINE/root/selftest.sh"
chmod 0755 "$MACHINE/root/selftest.sh"
cat > "$MACHINE/etc/systemd/system/rpcproxy-selftest.service" <<'UNIT'
[Unit]
Description=rpcproxy deployment self-test
After=multi-user.target
[Service]
Type=oneshot
ExecStart=/root/selftest.sh
StandardOutput=file:/root/result.txt
StandardError=inherit
SuccessAction=poweroff-force
FailureAction=poweroff-force
TimeoutStartSec=600
[Install]
WantedBy=multi-user.target
UNIT
ln -sf /etc/systemd/system/rpcproxy-selftest.service \
    "$MACHINE/etc/systemd/system/multi-user.target.wants/rpcproxy-selftest.service"
echo rpcproxy-test > "$MACHINE/etc/hostname"

systemd-nspawn --quiet --register=no --keep-unit -D "$MACHINE" -M rpcproxy-test \
    --private-network -b > "$WORK/console.log" 2>&1 &
nspawn=$!
# The self-test powers the machine off when done; stop it ourselves if that does not happen.
i=0
while [ $i -lt 600 ] && kill -0 $nspawn 2>/dev/null \
        && ! grep -qE '^(ALL OK|SOME FAILED)$' "$MACHINE/root/result.txt" 2>/dev/null; do
    sleep 1; i=$((i + 1))
done
sleep 2
kill $nspawn 2>/dev/null && { sleep 5; kill -9 $nspawn 2>/dev/null || true; }
wait $nspawn 2>/dev/null || true
cat "$MACHINE/root/result.txt"
grep -q '^ALL OK$' "$MACHINE/root/result.txt"
