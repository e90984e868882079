#!/bin/sh
# Boots a Debian 12 root file system with a real systemd (systemd-nspawn -b, private
# network), installs rpcproxy offline from wheels as deploy/README.md says, and runs
# the unit: start, TLS on 443, journal priorities, a SIGSTOPped worker killed and
# respawned, a bad key ending in "failed" with status 78 instead of a restart loop.
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

if [ ! -d "$ROOT" ]; then
    debootstrap --variant=minbase \
        --include=systemd,systemd-sysv,dbus,python3-venv,iproute2,procps \
        bookworm "$ROOT.tmp" http://deb.debian.org/debian
    mv "$ROOT.tmp" "$ROOT"
fi
if [ ! -f "$WHEELS/.complete" ]; then
    # The offline path of deploy/README.md: every wheel once, setuptools included.
    "$PIP" wheel --quiet --wheel-dir "$WHEELS" "$REPO[metrics]" setuptools
    touch "$WHEELS/.complete"
fi

rm -rf "$MACHINE"
cp -a "$ROOT" "$MACHINE"
mkdir -p "$MACHINE/src"
for f in pyproject.toml README.md rpcproxy ntlm bench deploy; do
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
