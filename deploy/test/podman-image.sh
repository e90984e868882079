#!/bin/sh
# Builds deploy/container/Containerfile with Debian 12's podman (vfs storage, its own
# storage root under $WORK) and runs it as deploy/README.md says: 443 published to the
# unprivileged 8443 inside, HEALTHCHECK kept (--format docker), `rpcproxy-entrypoint
# check`, a mounted TOML file setting the port, a mounted key not readable by uid 10001.
#
#   sudo deploy/test/podman-image.sh        (needs podman; PORT=443 by default, loopback only)
#
# Without registry access (BASE unset and no network) the base image is the Debian 12
# root file system of nspawn-unit.sh, imported; the wheels come from the same $WORK.
set -eu
REPO=$(cd "$(dirname "$0")/../.." && pwd)
WORK=${WORK:-/var/tmp/rpcproxy-deploy-test}
PORT=${PORT:-443}
NAME=rpcproxy-imgtest
# A host without CAP_SYS_RESOURCE (a sandbox) cannot give podman's default rlimits: lower ones.
RUNOPTS=${RUNOPTS:---ulimit nofile=4096:4096 --ulimit nproc=4096:4096}
P="podman --root $WORK/podman-root --runroot $WORK/podman-run --storage-driver vfs --runtime ${RUNTIME:-runc} --cgroup-manager cgroupfs --events-backend file"
fail=0
ok() { echo "[ OK ] $*"; }
bad() { echo "[FAIL] $*"; fail=1; }
cleanup() { $P rm -f -t 2 "$NAME" >/dev/null 2>&1 || true; }
trap cleanup EXIT

if [ -z "${BASE:-}" ]; then
    BASE=localhost/debian:bookworm-debootstrap
    if ! $P image exists "$BASE"; then
        tar -C "$WORK/rootfs" -c . | $P import - "$BASE" >/dev/null
    fi
fi
echo "$(podman --version), base $BASE"
echo "\$ podman build --format docker -f deploy/container/Containerfile -t rpcproxy ."
$P build --quiet --format docker --build-arg BASE="$BASE" -v "$WORK/wheels:/wheels:ro" \
    --build-arg PIP_OPTIONS="--no-index --find-links /wheels" \
    -f "$REPO/deploy/container/Containerfile" -t localhost/rpcproxy "$REPO" >/dev/null
hc=$($P image inspect --format '{{.Config.Healthcheck.Test}}' localhost/rpcproxy 2>/dev/null || true)
case "$hc" in *rpcproxy-entrypoint*health*) ok "HEALTHCHECK kept: $hc";; *) bad "no HEALTHCHECK ($hc)";; esac
v=$($P run $RUNOPTS --rm --entrypoint ntlm_auth localhost/rpcproxy --version 2>/dev/null || true)
case "$v" in Version*) ok "ntlm_auth in the image (winbind logins): $v";; *) bad "no ntlm_auth in the image: $v";; esac

echo "\$ podman run -d -p 127.0.0.1:$PORT:8443 -e RPCPROXY_BACKEND=... -e RPCPROXY_SERVER_NAME=mail.example.com rpcproxy"
$P run $RUNOPTS -d --name "$NAME" -p "127.0.0.1:$PORT:8443" -e RPCPROXY_BACKEND=127.0.0.1:1024 \
    -e RPCPROXY_SERVER_NAME=mail.example.com localhost/rpcproxy >/dev/null 2>"$WORK/run.err"
sleep 4
$P logs "$NAME" 2>&1 | grep -E "listening|cannot" | sed 's/^/    /' | cut -c1-150
python3 - "$PORT" <<'PY' && ok "TLS on 127.0.0.1:$PORT (published to 8443, uid 10001)" || bad "TLS on $PORT"
import socket, ssl, sys
ctx = ssl.create_default_context(); ctx.check_hostname = False; ctx.verify_mode = ssl.CERT_NONE
with socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=5) as raw:
    with ctx.wrap_socket(raw, server_hostname="mail.example.com") as tls:
        assert tls.version()
PY
$P healthcheck run "$NAME" >/dev/null 2>&1 && ok "podman healthcheck run: healthy" || bad "healthcheck"
echo "\$ podman exec $NAME rpcproxy-entrypoint check"
$P exec "$NAME" rpcproxy-entrypoint check > "$WORK/check.txt" 2>&1 || true
grep -E "configuration|certificate|backend" "$WORK/check.txt" | cut -c1-150 | sed 's/^/    /'
grep -q "listen 0.0.0.0:8443 (TLS)" "$WORK/check.txt" && ok "check sees the running settings" \
    || bad "check settings"
$P exec "$NAME" rpcproxy check --user 'EX\u' < /dev/null > "$WORK/check2.txt" 2>&1 || true
grep -q "Traceback" "$WORK/check2.txt" && bad "traceback" || ok "no terminal: $(tail -1 "$WORK/check2.txt" | cut -c1-120)"
t0=$(date +%s.%N); $P stop -t 20 "$NAME" >/dev/null 2>&1; t1=$(date +%s.%N)
ok "podman stop (SIGTERM): $(python3 -c "print(f'{$t1-$t0:.1f}')") s, exit $($P inspect --format '{{.State.ExitCode}}' "$NAME")"
$P rm -f "$NAME" >/dev/null 2>&1

echo "\$ mounted rpcproxy.toml with listen = \"0.0.0.0:7443\", no RPCPROXY_LISTEN"
cfgdir=$(mktemp -d); printf 'listen = "0.0.0.0:7443"\nbackend = "127.0.0.1:1024"\n' > "$cfgdir/rpcproxy.toml"
chmod 0755 "$cfgdir"; chmod 0644 "$cfgdir/rpcproxy.toml"
out=$($P run $RUNOPTS --rm -v "$cfgdir/rpcproxy.toml:/etc/rpcproxy/rpcproxy.toml:ro" localhost/rpcproxy plan 2>/dev/null)
echo "    $out" | cut -c1-150
case "$out" in *--listen*) bad "entrypoint overrides the file";; *) ok "the file's listen is kept";; esac

echo "\$ rpcproxy cert ... (key 0600 root) mounted at /run/secrets/tls"
tls=$(mktemp -d)
$P run $RUNOPTS --rm --user 0 -v "$tls:/out" --entrypoint rpcproxy localhost/rpcproxy cert --host mail.example.com --out-dir /out >/dev/null 2>&1
chmod 0755 "$tls"; chown 0:0 "$tls"/*.pem; chmod 0600 "$tls/key.pem"
run_tls() { $P run $RUNOPTS --rm -v "$tls:/run/secrets/tls:ro" -e RPCPROXY_BACKEND=127.0.0.1:1024 \
    -e RPCPROXY_TLS_CERT=/run/secrets/tls/cert.pem -e RPCPROXY_TLS_KEY=/run/secrets/tls/key.pem \
    localhost/rpcproxy plan 2>&1 | grep -v "systemd connection"; }
msg=$(run_tls)
echo "    $msg" | cut -c1-200
case "$msg" in *"permission denied"*chown*) ok "unreadable key: the error says what to do";; *) bad "key message";; esac
chown 10001 "$tls/key.pem"
case "$(run_tls)" in *"rpcproxy serve"*) ok "after chown 10001 key.pem: accepted";; *) bad "chowned key";; esac
rm -rf "$cfgdir" "$tls"
[ $fail = 0 ] && echo "ALL OK" || { echo "SOME FAILED"; exit 1; }
