#!/usr/bin/env bash
# The Debian package, built, checked and installed for real: `cargo deb`,
# lintian (no errors; no warnings but those debian/ explains in its
# overrides), then `apt-get install ./target/debian/smtp-after-popd_*.deb`
# on this machine (run as root, as CI does on a fresh Debian 12 machine),
# then the installed daemon started as README.md's "Without systemd" says
# (as root with --user, then as the service user), with the installed
# configuration, until a login reaches the map and `smtp-after-popd list`
# shows it; and last with the installed unit's own ExecStart= command
# line, User=, Group=, UMask= and LimitNOFILE=, no capabilities and
# NoNewPrivileges (setpriv, prlimit), attestation required as the
# installed configuration says.
#
# What it does not exercise: the unit's sandbox (SystemCallFilter=,
# ProtectSystem=, the namespaces), which only systemd as PID 1 applies, and
# there is none where this runs (no systemd-run either); a seccomp filter
# made here would be ours, not the unit's. The unit is checked as text
# instead: `systemd-analyze verify`, and `systemd-analyze security
# --offline=true` must print exactly the exposure SECURITY.md states.
#
# Leaves the machine as it found it: whatever happens, a trap stops the
# daemon, purges the package, and removes its user, group and directories.
# It refuses to start where the package, its user or its directories
# already are, since it would remove them.
set -euo pipefail
cd "$(dirname "$0")/.."

fail() { echo "package test: FAILED: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || { echo "package test: needs root (it installs the package); skipped"; exit 0; }
command -v cargo-deb >/dev/null || fail "cargo-deb is missing: cargo install cargo-deb --locked"
command -v lintian >/dev/null || fail "lintian is missing: apt-get install lintian"

DIRS="/var/lib/smtp-after-popd /run/smtp-after-popd /etc/smtp-after-popd"
if dpkg-query -W -f='${Status}' smtp-after-popd 2>/dev/null | grep -q "installed"; then
    fail "smtp-after-popd is installed on this machine, and this test would purge it: apt-get purge smtp-after-popd first"
fi
getent passwd smtp-after-popd >/dev/null && fail "the user smtp-after-popd exists, and this test would remove it"
getent group smtp-after-popd >/dev/null && fail "the group smtp-after-popd exists, and this test would remove it"
for d in $DIRS; do
    [ -e "$d" ] && fail "$d exists, and this test would remove it"
done

pid=""
work=$(mktemp -d /tmp/sap-package-$$-XXXXXX)
cleanup() {
    rc=$?
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
        kill "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    fi
    DEBIAN_FRONTEND=noninteractive apt-get purge -y -qq smtp-after-popd >/dev/null 2>&1 || true
    # Debian's policy keeps a package's system user on purge; a test may
    # not, so it goes too.
    if getent passwd smtp-after-popd >/dev/null; then userdel smtp-after-popd || true; fi
    if getent group smtp-after-popd >/dev/null; then groupdel smtp-after-popd || true; fi
    rm -rf $DIRS "$work"
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

cargo deb --quiet
debs=$(ls -t target/debian/smtp-after-popd_*.deb)
deb=${debs%%$'\n'*}
echo "package test: built $deb"
# (Output captured first: with pipefail, grep -q closing the pipe early
# would fail the pipeline.)
info=$(dpkg-deb --info "$deb")
grep -q "Depends:.*postfix" <<<"$info" || fail "no dependency on postfix"

# lintian: errors fail, and so do warnings that debian/ does not explain.
lintian --fail-on error,warning "$deb" \
    >"$work/lintian" 2>&1 || { cat "$work/lintian"; fail "lintian $deb"; }
echo "package test: lintian: no errors or warnings (overrides, each explained: debian/smtp-after-popd.lintian-overrides)"

DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "./$deb" >"$work/install.raw" 2>&1 \
    || { cat "$work/install.raw"; fail "apt-get install ./$deb"; }
# (apt runs dpkg on a terminal of its own: lines end in CR LF.)
tr -d '\r' <"$work/install.raw" >"$work/install"
# postinst prints the main.cf line Postfix still needs, and says when it
# could not start the service.
grep -q "^    check_client_access hash:/var/lib/smtp-after-popd/authenticated_ips$" "$work/install" \
    || { cat "$work/install"; fail "postinst did not print the main.cf line"; }
# ... and the whole smtpd_relay_restrictions line as postfix-config prints
# it for the installed configuration (the map path the same in both).
/usr/sbin/smtp-after-popd postfix-config --config /etc/smtp-after-popd/smtp-after-popd.toml \
    | sed -n '/^smtpd_relay_restrictions/,/reject_unauth_destination$/p' | sed 's/^/    /' >"$work/relay"
grep -q "check_client_access hash:/var/lib/smtp-after-popd/authenticated_ips,$" "$work/relay" \
    || { cat "$work/relay"; fail "postfix-config does not name the packaged map"; }
grep -qxFf "$work/relay" "$work/install" && [ "$(grep -cxFf "$work/relay" "$work/install")" -ge "$(wc -l <"$work/relay")" ] \
    || { cat "$work/install" "$work/relay"; fail "postinst's main.cf line is not postfix-config's"; }
if [ ! -d /run/systemd/system ]; then
    grep -q "systemd is not running here, so the service was not started" "$work/install" \
        || { cat "$work/install"; fail "postinst did not say the service was not started"; }
else
    # A machine that runs systemd: the units are up; make room for the
    # runs by hand below.
    systemctl is-active --quiet smtp-after-popd.service || fail "the service did not start"
    systemctl stop smtp-after-popd.service smtp-after-popd.socket
    rm -rf /run/smtp-after-popd /var/lib/smtp-after-popd
fi

# Files where the issue says they go.
for f in /usr/sbin/smtp-after-popd \
         /usr/share/man/man8/smtp-after-popd.8.gz \
         /etc/smtp-after-popd/smtp-after-popd.toml \
         /usr/share/doc/smtp-after-popd/rsyslog/smtp-after-popd-attested.conf \
         /usr/share/doc/smtp-after-popd/rsyslog/smtp-after-popd-local.conf \
         /usr/share/doc/smtp-after-popd/systemd/postfix-policy.conf \
         /usr/share/doc/smtp-after-popd/README.md \
         /usr/share/doc/smtp-after-popd/copyright \
         /usr/share/doc/smtp-after-popd/changelog.Debian.gz; do
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
# Exactly the figure SECURITY.md states ("rates it 1.2 (OK)"): a change of
# the unit that moves it must change the claim too.
documented=$(sed -n 's/.*`systemd-analyze security` rates it \([0-9.]*\) .*/\1/p' SECURITY.md)
[ -n "$documented" ] || fail "SECURITY.md states no systemd-analyze security figure"
[ -n "$score" ] && [ "$score" = "$documented" ] \
    || fail "systemd-analyze security rates the unit ${score:-(nothing)}, SECURITY.md says $documented"

# The daemon as a host without systemd runs it (README.md, "Without
# systemd"): as root with --user, it makes its own directories for that
# user, with the installed configuration. Its socket is declared
# ?attested=yes, so this test sends each login in the attested rule's form,
# as rsyslog would (tests/e2e.rs covers rsyslog itself); attestation is
# not required on the command line, since this sender is not really
# Dovecot's log process.
start() {
    log=$1; shift
    "$@" --require-attestation=no 2>"$log" &
    pid=$!
    wait_started "$@"
}
wait_started() {
    for _ in $(seq 100); do grep -q "started:" "$log" && return 0; kill -0 $pid 2>/dev/null || break; sleep 0.1; done
    cat "$log"; fail "the installed daemon did not start: $*"
}
stop() {
    # As README.md says: the pid file names the daemon (under runuser, $pid
    # is runuser's, which passes the daemon's exit status on).
    kill -TERM "$(cat /run/smtp-after-popd/smtp-after-popd.pid)"
    st=0; wait "$pid" || st=$?
    [ $st = 0 ] || { cat "$log"; fail "the daemon did not exit cleanly (status $st)"; }
    pid=""
}
login() {
    python3 - "$1" <<'PY'
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.sendto(('<22>1 2026-11-26T10:00:01+00:00 mail dovecot - - [attest@32473 exe="/usr/lib/dovecot/log" uid="0" pid="1"]  imap-login: Login: user=<pkg>, method=PLAIN, rip=%s, lip=192.0.2.1, mpid=1, session=<AAAAAAAAAAAAAAAA>' % sys.argv[1]).encode(),
         "/run/smtp-after-popd/syslog.sock")
PY
}
# The README's lookup, which works with and without /etc/postfix/main.cf.
lookup() {
    MAIL_CONFIG=/var/lib/smtp-after-popd/.smtp-after-popd-postfix \
        postmap -q "$1" hash:/var/lib/smtp-after-popd/authenticated_ips
}
granted() {
    for _ in $(seq 100); do lookup "$1" >/dev/null 2>&1 && return 0; sleep 0.1; done
    cat "$log"; fail "login $1 not in the map"
}

start "$work/root.log" /usr/sbin/smtp-after-popd --config /etc/smtp-after-popd/smtp-after-popd.toml \
    --user smtp-after-popd --pid-file /run/smtp-after-popd/smtp-after-popd.pid
[ "$(stat -c '%U:%G %a' /run/smtp-after-popd)" = "smtp-after-popd:smtp-after-popd 750" ] \
    || fail "/run/smtp-after-popd: $(stat -c '%U:%G %a' /run/smtp-after-popd)"
[ "$(stat -c '%U:%G %a' /var/lib/smtp-after-popd)" = "smtp-after-popd:smtp-after-popd 755" ] \
    || fail "/var/lib/smtp-after-popd: $(stat -c '%U:%G %a' /var/lib/smtp-after-popd)"
[ "$(cat /run/smtp-after-popd/smtp-after-popd.pid)" = "$pid" ] || fail "pid file"
login 192.0.2.99
granted 192.0.2.99
smtp-after-popd list | grep "^192.0.2.99 .*pkg" >/dev/null || fail "smtp-after-popd list does not show the grant"
smtp-after-popd stats | grep "^granted 1$" >/dev/null || fail "smtp-after-popd stats"
stop
[ -e /run/smtp-after-popd/smtp-after-popd.pid ] && fail "the pid file stayed"
grep -q "^grant 192.0.2.99 " /var/lib/smtp-after-popd/state || fail "state file not written"

# As the service user itself, in the directories root made.
start "$work/user.log" runuser -u smtp-after-popd -- /usr/sbin/smtp-after-popd \
    --config /etc/smtp-after-popd/smtp-after-popd.toml --pid-file /run/smtp-after-popd/smtp-after-popd.pid
grep -q "restored 1 grant " "$work/user.log" || { cat "$work/user.log"; fail "the grant was not restored"; }
login 192.0.2.98
granted 192.0.2.98
lookup 192.0.2.99 >/dev/null || fail "the restored grant is not in the map"
stop

# As the installed unit runs it: its ExecStart= as it stands (so with the
# installed configuration's require-attestation), as its User= and Group=
# with their supplementary groups, its UMask= and LimitNOFILE=, no
# capabilities (CapabilityBoundingSet=, AmbientCapabilities= empty) and no
# new privileges. setpriv and prlimit exec the daemon: $pid is its own.
unit_value() { sed -n "s/^$1=//p" "$unit" | tail -1; }
execstart=$(unit_value ExecStart)
unit_user=$(unit_value User)
unit_group=$(unit_value Group)
unit_umask=$(unit_value UMask)
unit_nofile=$(unit_value LimitNOFILE)
[ -n "$execstart" ] && [ -n "$unit_user" ] && [ -n "$unit_group" ] && [ -n "$unit_umask" ] && [ -n "$unit_nofile" ] \
    || fail "the unit lacks ExecStart=, User=, Group=, UMask= or LimitNOFILE="
case "$execstart" in *--require-attestation*) fail "the unit's ExecStart= changes attestation: $execstart";; esac
log="$work/unit.log"
# shellcheck disable=SC2086 # ExecStart= is split into words, as systemd does.
(umask "$unit_umask" && exec prlimit --nofile="$unit_nofile:$unit_nofile" \
    setpriv --reuid="$unit_user" --regid="$unit_group" --init-groups \
    --bounding-set=-all --inh-caps=-all --no-new-privs -- $execstart) 2>"$log" &
pid=$!
wait_started $execstart
grep -q "restored 2 grants " "$log" || { cat "$log"; fail "the grants were not restored"; }
want_ids="$(id -u "$unit_user") $(getent group "$unit_group" | cut -d: -f3)"
got_ids="$(awk '/^Uid:/ { u = $3 } /^Gid:/ { g = $3 } END { print u, g }' "/proc/$pid/status")"
[ "$got_ids" = "$want_ids" ] || fail "the daemon runs as uid/gid $got_ids, not $want_ids ($unit_user:$unit_group)"
grep -q '^CapEff:[[:space:]]*0*$' "/proc/$pid/status" || fail "the daemon has capabilities: $(grep ^Cap "/proc/$pid/status")"
grep -q '^NoNewPrivs:[[:space:]]*1$' "/proc/$pid/status" || fail "NoNewPrivs is not set"
# An attested login (the configuration requires attestation) is granted.
login 192.0.2.97
granted 192.0.2.97
smtp-after-popd list | grep "^192.0.2.97 .*pkg" >/dev/null || fail "smtp-after-popd list does not show the grant (unit run)"
kill -TERM "$pid"
st=0; wait "$pid" || st=$?
[ $st = 0 ] || { cat "$log"; fail "the daemon run as the unit does did not exit cleanly (status $st)"; }
pid=""
echo "package test: ok ($deb installed, working, and purged again)"
