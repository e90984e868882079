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

step "a throwaway Samba AD DC on loopback: samba-tool domain provision; systemctl start samba-ad-dc"
# As on a DC host: smbd/nmbd/winbind (enabled by their packages) give way to samba-ad-dc,
# whose samba starts winbindd. Provisioning writes /etc/samba/smb.conf afresh.
systemctl disable --now smbd nmbd winbind >/dev/null 2>&1
rm -f /etc/samba/smb.conf
if samba-tool domain provision --realm=EXAMPLE.COM --domain=EXAMPLE --adminpass='Admin-Pass-1234' \
        --server-role=dc --dns-backend=SAMBA_INTERNAL --use-rfc2307 --host-ip=127.0.0.1 \
        --option='interfaces=lo' --option='bind interfaces only=yes' > /tmp/provision.log 2>&1; then
    ok "provisioned EXAMPLE.COM ($(grep -c . /tmp/provision.log) lines of samba-tool output)"
else bad "samba-tool domain provision"; tail -5 /tmp/provision.log | sed 's/^/    /'; fi
cp /var/lib/samba/private/krb5.conf /etc/krb5.conf 2>/dev/null
grep -E '^\s*(interfaces|bind interfaces only|server role)' /etc/samba/smb.conf | sed 's/^\s*/    /'
systemctl unmask samba-ad-dc >/dev/null 2>&1
systemctl start samba-ad-dc
i=0
until wbinfo -p >/dev/null 2>&1 || [ $i -ge 60 ]; do sleep 1; i=$((i + 1)); done
wbinfo -p >/dev/null 2>&1 && ok "samba-ad-dc $(systemctl is-active samba-ad-dc); wbinfo -p: $(wbinfo -p) (after ${i}s)" \
    || bad "winbindd not answering (samba-ad-dc $(systemctl is-active samba-ad-dc))"
echo 'Jdoe-Passw0rd' > /root/jdoe.pw && chmod 0600 /root/jdoe.pw
samba-tool user create jdoe 'Jdoe-Passw0rd' >/dev/null && samba-tool user setexpiry jdoe --noexpiry >/dev/null \
    && ok "user jdoe created" || bad "samba-tool user create jdoe"

step "rpcproxy provision winbind --user rpcproxy"
rpcproxy provision winbind --user rpcproxy > /tmp/winbind.txt 2>&1
sed 's/^/    /' /tmp/winbind.txt | cut -c1-150
grep -q '^\[ OK \] NTLM helper: /usr/bin/ntlm_auth' /tmp/winbind.txt \
    && grep -q '^\[ OK \] winbind gives verdicts' /tmp/winbind.txt && ! grep -q '^\[FAIL\]' /tmp/winbind.txt \
    && ok "ntlm_auth found, winbind gives verdicts, nothing failed" || bad "provision winbind"
# rpcproxy is in winbindd_priv only through the unit's SupplementaryGroups=, as shipped:
grep -q "rpcproxy is not in winbindd_priv.*SupplementaryGroups=winbindd_priv" /tmp/winbind.txt \
    && ok "provision winbind points at the unit's SupplementaryGroups=winbindd_priv" \
    || bad "provision winbind group line"

step "rpcproxy check --user 'EXAMPLE\\jdoe' --password-file /root/jdoe.pw"
rpcproxy check --user 'EXAMPLE\jdoe' --password-file /root/jdoe.pw > /tmp/check-login.txt 2>&1
sed 's/^/    /' /tmp/check-login.txt | cut -c1-150
grep -q '^\[ OK \] NTLM (winbind)' /tmp/check-login.txt && ok "check: NTLM (winbind)" || bad "check: NTLM (winbind)"
grep -q '^\[ OK \] test login: .*logged in as EXAMPLE\\jdoe' /tmp/check-login.txt \
    && ok "check: test login as EXAMPLE\\jdoe" || bad "check: test login"
printf 'wrong\n' > /tmp/wrong.pw
rpcproxy check --user 'EXAMPLE\jdoe' --password-file /tmp/wrong.pw 2>&1 \
    | grep -q '^\[FAIL\] test login: .*NT_STATUS_LOGON_FAILURE' \
    && ok "check: a wrong password is refused (NT_STATUS_LOGON_FAILURE)" || bad "check: wrong password"

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
# Debug while the logins run: the journal then carries what ntlm_auth writes to stderr.
sed -i 's/^log_level = .*/log_level = "debug"/' /etc/rpcproxy/rpcproxy.toml
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
cat > /root/ntlm-login.py <<'PY'
"""NTLM over TLS against the running unit: NEGOTIATE, 401 + CHALLENGE, AUTHENTICATE on the
same connection; prints the final status (an echo request: Content-Length 0)."""
import base64, socket, ssl, sys
import spnego

def exchange(tls, token):
    tls.sendall(b"RPC_IN_DATA /rpc/rpcproxy.dll HTTP/1.1\r\nHost: mail.example.com\r\n"
                b"User-Agent: MSRPC\r\nContent-Length: 0\r\n"
                b"Authorization: NTLM " + base64.b64encode(token) + b"\r\n\r\n")
    f = tls.makefile("rb")
    status = int(f.readline().split()[1])
    headers = {}
    while (line := f.readline().strip()):
        name, _, value = line.decode().partition(":")
        headers.setdefault(name.strip().lower(), []).append(value.strip())
    f.read(int(headers.get("content-length", ["0"])[0]))
    return status, headers

user, password = sys.argv[1], sys.argv[2]
ctx = ssl.create_default_context()
ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
client = spnego.client(user, password, hostname="mail.example.com", service="http",
                       protocol="ntlm")
with socket.create_connection(("127.0.0.1", 443), timeout=10) as raw:
    with ctx.wrap_socket(raw, server_hostname="mail.example.com") as tls:
        status, headers = exchange(tls, client.step())
        challenge = [v for v in headers.get("www-authenticate", []) if v.startswith("NTLM ")]
        if status != 401 or not challenge:
            sys.exit(f"NEGOTIATE answered {status} {headers.get('www-authenticate')}")
        status, _ = exchange(tls, client.step(base64.b64decode(challenge[0][5:])))
        print(status)
PY
step "an NTLM login through the unit (TLS, 127.0.0.1:443): EXAMPLE\\jdoe"
# Helpers start on demand: strace follows the service's processes from here, so it sees each
# ntlm_auth from its exec (calls the unit's seccomp filter, address families or read-only
# file system refuse come back as EPERM, EAFNOSUPPORT, EROFS).
main=$(systemctl show -p MainPID --value rpcproxy)
traced=""
for p in $main $(cat "/proc/$main/task/$main/children" 2>/dev/null); do traced="$traced -p $p"; done
# shellcheck disable=SC2086
strace -f -qq -s 64 -o /tmp/service.strace $traced & tracer=$!
sleep 1
got=$(/opt/rpcproxy/bin/python /root/ntlm-login.py 'EXAMPLE\jdoe' 'Jdoe-Passw0rd' 2>&1)
echo "    NEGOTIATE -> 401 CHALLENGE, AUTHENTICATE -> $got"
case "$got" in 2??) ok "NTLM login through the service: $got" ;; *) bad "NTLM login: $got" ;; esac
got=$(/opt/rpcproxy/bin/python /root/ntlm-login.py 'EXAMPLE\jdoe' 'wrong-password' 2>&1)
echo "    wrong password: AUTHENTICATE -> $got"
[ "$got" = 401 ] && ok "a wrong password gets 401" || bad "wrong password: $got"
kill "$tracer"; wait "$tracer" 2>/dev/null
helpers=$(grep -E '^[0-9]+ +execve\("/usr/bin/ntlm_auth"' /tmp/service.strace | cut -d' ' -f1 | sort -u)
for h in $helpers; do grep -E "^$h " /tmp/service.strace; done > /tmp/helpers.strace
echo "    strace: $(echo $helpers | wc -w) ntlm_auth helper(s), $(wc -l < /tmp/helpers.strace) calls;" \
    "failed: $(sed -nE 's/^[0-9]+ +(<\.\.\. )?([a-z0-9_]+)[ (].*= -1 (E[A-Z]+).*/\2 \3/p' \
        /tmp/helpers.strace | sort | uniq -c | sed 's/^ *\([0-9]*\) \(.*\)/\2 x\1,/' | tr '\n' ' ')"
grep -E '= -1 E(PERM|AFNOSUPPORT|ROFS|ACCES)' /tmp/helpers.strace | sed 's/^[0-9]* *//' | sort \
    | uniq -c | head -8 | cut -c1-160 | sed 's/^ */    /'
[ -n "$helpers" ] && ! grep -qE '= -1 E(PERM|AFNOSUPPORT|ROFS)' /tmp/helpers.strace \
    && ok "no call of ntlm_auth refused by the unit's hardening (EPERM, EAFNOSUPPORT, EROFS)" \
    || bad "ntlm_auth under the unit's hardening (helpers: ${helpers:-none traced})"
ps -o pid=,user=,group=,supgrp=,args= -C ntlm_auth | sed 's/^ */    /'
ps -o supgrp= -C ntlm_auth | grep -q winbindd_priv \
    && ok "the unit's ntlm_auth helpers run as rpcproxy with group winbindd_priv" \
    || bad "ntlm_auth helpers: $(ps -o user=,supgrp= -C ntlm_auth | head -1)"
journalctl -u rpcproxy -o cat --no-pager | grep -iE "ntlm_auth:|winbind|helper" | grep -v "judged by" \
    | tail -6 | cut -c1-200 | sed 's/^/    /'
# ntlm_auth's stderr (logged as "ntlm_auth: ...") and any unavailable verdict; the refusal of
# the wrong password above is the only winbind line expected.
journalctl -u rpcproxy -o cat --no-pager | grep -E "ntlm_auth: |unavailable|no verdict|could not judge" \
    | grep -q . && bad "ntlm_auth errors in the journal" || ok "no ntlm_auth errors in the journal"
journalctl -u rpcproxy -o cat -n 3 --no-pager | sed 's/^/    /'
journalctl -u rpcproxy -o cat --no-pager | grep -qE '^[0-9]{4}-' && bad "own timestamps in the journal" \
    || ok "journal lines carry no second timestamp"

step "workers = 2, SIGSTOP one worker"
sed -i -e 's/^workers = 1/workers = 2/' -e 's/^log_level = .*/log_level = "info"/' \
    /etc/rpcproxy/rpcproxy.toml
systemctl restart rpcproxy; sleep 3
main=$(systemctl show -p MainPID --value rpcproxy)
victim=$(cut -d' ' -f1 "/proc/$main/task/$main/children" 2>/dev/null)
# Never "kill -STOP 0" (this script's own process group) when the unit is not running.
[ "${victim:-0}" -gt 1 ] 2>/dev/null && kill -STOP "$victim"
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
[ "${main:-0}" -gt 1 ] && kill -STOP "$main"
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
