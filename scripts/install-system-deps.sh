#!/usr/bin/env bash
# Installs the Debian packages the tests and benchmarks run for real
# (DESIGN.md, "Real components in tests"). A no-op when all are present.
# Packaged services are never started: the tests run their own instances.
set -euo pipefail

# command to check -> Debian package that provides it
declare -A wanted=(
  [prometheus]=prometheus
  [promtool]=prometheus
  [prometheus-alertmanager]=prometheus-alertmanager
  [amtool]=prometheus-alertmanager
  [dovecot]=dovecot-imapd
  [/usr/lib/dovecot/pop3]=dovecot-pop3d
  [/usr/lib/dovecot/lmtp]=dovecot-lmtpd
  [postfix]=postfix
  [redis-server]=redis-server
  [fail2ban-regex]=fail2ban
  [prometheus-node-exporter]=prometheus-node-exporter
  [xmlsec1]=xmlsec1
  [wrk]=wrk
  [hyperfine]=hyperfine
  [valgrind]=valgrind
  [nsd]=nsd
  [openssl]=openssl
)

missing=()
if [[ "${1:-}" == "--python-only" ]]; then
  wanted=()
fi
# venv and pip for the project's virtual environment
python3 -c 'import ensurepip, venv' 2>/dev/null || missing+=(python3-venv python3-pip)
for cmd in "${!wanted[@]}"; do
  if [[ "$cmd" == /* ]]; then
    [[ -e "$cmd" ]] || missing+=("${wanted[$cmd]}")
  else
    PATH="$PATH:/usr/sbin:/sbin" command -v "$cmd" >/dev/null 2>&1 || missing+=("${wanted[$cmd]}")
  fi
done
[[ ${#missing[@]} -eq 0 ]] && exit 0

mapfile -t packages < <(printf '%s\n' "${missing[@]}" | sort -u)
echo "install-system-deps: installing ${packages[*]}" >&2

sudo=""
[[ $(id -u) -eq 0 ]] || sudo="sudo"

# Keep maintainer scripts from starting the packaged daemons.
policy=/usr/sbin/policy-rc.d
created_policy=0
if [[ ! -e $policy ]]; then
  printf '#!/bin/sh\nexit 101\n' | $sudo tee $policy >/dev/null
  $sudo chmod +x $policy
  created_policy=1
fi
cleanup() { [[ $created_policy -eq 1 ]] && $sudo rm -f $policy; true; }
trap cleanup EXIT

export DEBIAN_FRONTEND=noninteractive
echo "postfix postfix/main_mailer_type select No configuration" | $sudo debconf-set-selections
echo "postfix postfix/mailname string localhost" | $sudo debconf-set-selections
$sudo apt-get update -q
$sudo apt-get install -y -q --no-install-recommends "${packages[@]}"
