# Shared set-up for deploy/run and tests/run (sourced, not executed).
# Creates a virtualenv in $RPCPROXY_VENV (default .venv) and installs the project
# into it, with the given extras. On a fresh Debian machine, as root, it first
# installs python3-venv with apt-get.

rpcproxy_apt_install() {
  # rpcproxy_apt_install PKG...: install the Debian packages that are missing (root only)
  [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null || return 0
  local missing=() p
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  echo "rpcproxy: installing Debian packages: ${missing[*]}" >&2
  apt-get update -q >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >&2
}

rpcproxy_venv() {
  # rpcproxy_venv EXTRAS: ensure the venv exists and holds the project; sets $VENV
  local extras=$1
  VENV=${RPCPROXY_VENV:-.venv}
  local py=${PYTHON:-python3}
  if [ ! -x "$VENV/bin/python" ]; then
    "$py" -m venv "$VENV" 2>/dev/null || {
      rpcproxy_apt_install python3-venv python3-pip
      rm -rf "$VENV"
      "$py" -m venv "$VENV"
    }
  fi
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e ".${extras}" >&2
}
