#!/usr/bin/env bash
# The Debian package, built and installed for real: `cargo deb`, then
# `apt-get install ./target/debian/smtp-after-popd_*.deb` on this machine
# (run as root, as CI does on a fresh Debian 12 machine), then the installed
# daemon run as the unit runs it, with the installed configuration, until a
# login reaches the map and `smtp-after-popd list` shows it. Leaves the
# package installed.
set -euo pipefail
cd "$(dirname "$0")/.."

fail() { echo "package test: FAILED: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || { echo "package test: needs root (it installs the package); skipped"; exit 0; }
command -v cargo-deb >/dev/null || fail "cargo-deb is missing: cargo install cargo-deb --locked"

cargo deb --quiet
debs=$(ls -t target/debian/smtp-after-popd_*.deb)
deb=${debs%%$'\n'*}
echo "package test: built $deb"
# (Output captured first: with pipefail, grep -q closing the pipe early
# would fail the pipeline.)
info=$(dpkg-deb --info "$deb")
grep -q "Depends:.*postfix" <<<"$info" || fail "no dependency on postfix"
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --reinstall "./$deb" >/dev/null

# Files where the issue says they go.
for f in /usr/sbin/smtp-after-popd \
         /usr/share/man/man8/smtp-after-popd.8.gz \
         /etc/smtp-after-popd/smtp-after-popd.toml \
         /usr/share/doc/smtp-after-popd/rsyslog/smtp-after-popd-attested.conf \
         /usr/share/doc/smtp-after-popd/rsyslog/smtp-after-popd-local.conf \
         /usr/share/doc/smtp-after-popd/systemd/postfix-policy.conf \
         /usr/share/doc/smtp-after-popd/README.md; do
    [ -e "$f" ] || fail "$f not installed"
done
unit=$(dpkg -L smtp-after-popd | grep '/systemd/system/smtp-after-popd.service$') || fail "no unit"
dpkg -L smtp-after-popd | grep '/systemd/system/smtp-after-popd.socket$' >/dev/null || fail "no socket unit"
dpkg-query -W -f='${Conffiles}' smtp-after-popd | grep /etc/smtp-after-popd/smtp-after-popd.toml >/dev/null \
    || fail "the configuration is not a conffile"
getent passwd smtp-after-popd >/dev/null || fail "postinst did not create the user"
/usr/sbin/smtp-after-popd --version | grep "smtp-after-popd $(grep -m1 "^version" Cargo.toml | cut -d\" -f2)" >/dev/null \
    || fail "--version"
MANWIDTH=80 man -P cat smtp-after-popd 2>/dev/null | grep "^SECURITY" >/dev/null || fail "man smtp-after-popd does not render"
# With the man page installed, verify checks Documentation= too.
systemd-analyze verify "$unit" || fail "systemd-analyze verify $unit"
score=$(systemd-analyze security --offline=true "$unit" 2>/dev/null | sed -n 's/.*Overall exposure level for .*: \([0-9.]*\) .*/\1/p')
echo "package test: systemd-analyze security exposure: $score"
awk -v s="$score" 'BEGIN { exit !(s != "" && s <= 2.0) }' || fail "exposure $score above 2.0"

# A working setup: what systemd would do (the unit's directories and user),
# then the installed daemon with the installed configuration. Attestation
# is switched off on the command line, since this test sends the login
# itself rather than through rsyslog (tests/e2e.rs covers that path).
install -d -o smtp-after-popd -g smtp-after-popd -m 0750 /run/smtp-after-popd
install -d -o smtp-after-popd -g smtp-after-popd -m 0755 /var/lib/smtp-after-popd
rm -f /var/lib/smtp-after-popd/state
log=$(mktemp)
setpriv --reuid=smtp-after-popd --regid=smtp-after-popd --init-groups \
    /usr/sbin/smtp-after-popd --config /etc/smtp-after-popd/smtp-after-popd.toml \
    --require-attestation=no 2>"$log" &
pid=$!
trap 'kill $pid 2>/dev/null || true' EXIT
for _ in $(seq 100); do grep -q "started:" "$log" && break; sleep 0.1; done
grep -q "started:" "$log" || { cat "$log"; fail "the installed daemon did not start"; }
python3 - <<'PY'
import socket
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.sendto(b"<22>Nov 26 10:00:01 mail dovecot: imap-login: Login: user=<pkg>, method=PLAIN, rip=192.0.2.99, lip=192.0.2.1, mpid=1, session=<AAAAAAAAAAAAAAAA>",
         "/run/smtp-after-popd/syslog.sock")
PY
# postfix installed with "No configuration" has no main.cf: the daemon then
# runs postmap with its private empty one, and so must this lookup.
[ -e /etc/postfix/main.cf ] || export MAIL_CONFIG=/var/lib/smtp-after-popd/.smtp-after-popd-postfix
for _ in $(seq 100); do
    postmap -q 192.0.2.99 hash:/var/lib/smtp-after-popd/authenticated_ips >/dev/null 2>&1 && break
    sleep 0.1
done
postmap -q 192.0.2.99 hash:/var/lib/smtp-after-popd/authenticated_ips >/dev/null || { cat "$log"; fail "login not in the map"; }
smtp-after-popd list | grep "^192.0.2.99 .*pkg" >/dev/null || fail "smtp-after-popd list does not show the grant"
smtp-after-popd stats | grep "^granted 1$" >/dev/null || fail "smtp-after-popd stats"
kill -TERM $pid; wait $pid || fail "the daemon did not exit cleanly"
grep -q "^grant 192.0.2.99 " /var/lib/smtp-after-popd/state || fail "state file not written"
echo "package test: ok ($deb installed and working)"
