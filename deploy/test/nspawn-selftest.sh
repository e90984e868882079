#!/bin/sh
# Runs inside the booted Debian 12 machine (see nspawn-unit.sh): deploy/README.md's steps.
set -u
fail=0
ok() { echo "[ OK ] $*"; }
bad() { echo "[FAIL] $*"; fail=1; }
step() { echo "\$ $*"; }
cd /src
echo "systemd $(systemctl --version | head -1 | cut -d' ' -f2), $(. /etc/os-release; echo "$PRETTY_NAME")"

step "python3 -m venv /opt/rpcproxy && pip install --no-index --find-links /wheels '.[metrics]'"
python3 -m venv /opt/rpcproxy
cp -a /src /tmp/checkout
if /opt/rpcproxy/bin/pip install --quiet --no-index --find-links /wheels '/tmp/checkout[metrics]'; then
    ok "offline install from the checkout (no network in this machine)"
else bad "offline install"; fi
ln -sf /opt/rpcproxy/bin/rpcproxy /usr/local/bin/rpcproxy
install -D -m 0644 deploy/README.md /usr/local/share/doc/rpcproxy/README.md
install -m 0644 deploy/systemd/rpcproxy.sysusers /usr/lib/sysusers.d/rpcproxy.conf
systemd-sysusers
install -d -m 0755 /etc/rpcproxy
install -m 0644 deploy/systemd/rpcproxy.toml /etc/rpcproxy/rpcproxy.toml
sed -i 's/^server_names = .*/server_names = ["mail.example.com"]/' /etc/rpcproxy/rpcproxy.toml
rpcproxy cert --host mail.example.com --out-dir /etc/rpcproxy --owner rpcproxy >/dev/null
echo "$(stat -c '%a %U %n' /etc/rpcproxy/cert.pem /etc/rpcproxy/key.pem | tr '\n' ';')"

step "rpcproxy check   (no --config: the unit's file)"
rpcproxy check > /tmp/check.txt 2>&1
sed 's/^/    /' /tmp/check.txt | cut -c1-150
grep -q "configuration: /etc/rpcproxy/rpcproxy.toml is valid: listen 0.0.0.0:443 (TLS)" /tmp/check.txt \
    && ok "check reads the service's configuration" || bad "check config source"

step "rpcproxy check --backend samba.example.com:1024   (no DNS in this machine)"
rpcproxy check --backend samba.example.com:1024 2>&1 | grep -E "backend|NTLM" | cut -c1-150 | sed 's/^/    /'
rpcproxy check --backend samba.example.com:1024 2>&1 | grep -q "Unknown error" \
    && bad "DNS failure not explained" || ok "DNS failure explained in words"

install -m 0644 deploy/systemd/rpcproxy.service /etc/systemd/system/
systemctl daemon-reload
step "systemctl enable --now rpcproxy"
systemctl enable --now rpcproxy 2>/dev/null
sleep 2
[ "$(systemctl is-active rpcproxy)" = active ] && ok "unit active: $(systemctl show -p StatusText --value rpcproxy)" \
    || bad "unit not active"
python3 - <<'PY' && ok "TLS handshake on 127.0.0.1:443" || bad "TLS on 443"
import socket, ssl
ctx = ssl.create_default_context(cafile="/etc/rpcproxy/cert.pem")
with socket.create_connection(("127.0.0.1", 443), timeout=5) as raw:
    with ctx.wrap_socket(raw, server_hostname="mail.example.com") as tls:
        assert tls.version()
PY
journalctl -u rpcproxy -o cat -n 3 --no-pager | sed 's/^/    /'
journalctl -u rpcproxy -o cat --no-pager | grep -qE '^[0-9]{4}-' && bad "own timestamps in the journal" \
    || ok "journal lines carry no second timestamp"

step "workers = 2, SIGSTOP one worker"
sed -i 's/^workers = 1/workers = 2/' /etc/rpcproxy/rpcproxy.toml
systemctl restart rpcproxy; sleep 3
main=$(systemctl show -p MainPID --value rpcproxy)
victim=$(cut -d' ' -f1 "/proc/$main/task/$main/children")
kill -STOP "$victim"
sleep 14
journalctl -u rpcproxy -o cat --no-pager | grep -E "event loop silent|exited with -9" | sed 's/^/    /'
if journalctl -u rpcproxy -p err -o cat --no-pager | grep -q "pid $victim): event loop silent"; then
    ok "stopped worker $victim killed (seen by journalctl -p err)"
else bad "stopped worker not killed"; fi
n=$(wc -w < "/proc/$main/task/$main/children")
[ "$n" = 2 ] && ! grep -qw "$victim" "/proc/$main/task/$main/children" \
    && ok "respawned: 2 workers, supervisor $main unchanged, unit $(systemctl is-active rpcproxy)" \
    || bad "no respawn ($n workers)"

step "SIGSTOP the supervisor itself (WatchdogSec=30s)"
kill -STOP "$main"
sleep 40
journalctl -u rpcproxy -o cat --no-pager | grep -iE "watchdog timeout" | tail -1 | sed 's/^/    /'
new_main=$(systemctl show -p MainPID --value rpcproxy)
[ "$new_main" != "$main" ] && [ "$(systemctl is-active rpcproxy)" = active ] \
    && ok "systemd's watchdog restarted the wedged service (main pid $main -> $new_main)" \
    || bad "wedged supervisor not restarted"

step "a key that does not match the certificate; systemctl restart rpcproxy"
cp /etc/rpcproxy/key.pem /etc/rpcproxy/key.pem.good
rpcproxy cert --host other.example.com --out-dir /tmp/other >/dev/null
install -m 0600 -o rpcproxy /tmp/other/key.pem /etc/rpcproxy/key.pem
systemctl restart rpcproxy 2>/dev/null; sleep 8
echo "    $(systemctl show -p ActiveState -p Result -p ExecMainStatus -p NRestarts rpcproxy | tr '\n' ' ')"
systemctl status rpcproxy --no-pager 2>/dev/null | grep -E "Active:|Process:|Main PID:" | sed 's/^ */    /'
journalctl -u rpcproxy -p err -o cat -n 3 --no-pager | cut -c1-200 | sed 's/^/    /'
[ "$(systemctl is-active rpcproxy)" = failed ] && [ "$(systemctl show -p ExecMainStatus --value rpcproxy)" = 78 ] \
    && [ "$(systemctl show -p NRestarts --value rpcproxy)" = 0 ] \
    && ok "failed with status 78, no restart loop" || bad "bad key: $(systemctl is-active rpcproxy)"

[ $fail = 0 ] && echo "ALL OK" || echo "SOME FAILED"
