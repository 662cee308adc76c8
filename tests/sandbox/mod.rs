//! Real mail servers from Debian's packages, each run in a sandbox of its
//! own, for the conformance suite (tests/conformance.rs).
//!
//! - [`unpacked`]: the packages a server needs beyond what this machine has
//!   installed (`apt-get -s install` says which), fetched with `apt-get
//!   download` and unpacked with `dpkg-deb -x` into
//!   `target/conformance/root-NAME-HASH`, once per package set. Nothing is
//!   installed: several of these servers conflict with Dovecot as packages.
//! - [`Sandbox`]: private mount, network, pid and UTS namespaces (`unshare`),
//!   in which the unpacked tree is laid over /usr, /etc and /var with
//!   overlayfs (writes go to the sandbox's scratch directory), /run, /home,
//!   /tmp and /dev are fresh tmpfs (the scratch directory is bound back in),
//!   /dev/log is the sandbox's own rsyslog, the
//!   host name is `mail`, and loopback carries 127.0.0.0/8, 192.0.2.0/24,
//!   198.51.100.0/24, 203.0.113.0/24 and 2001:db8::/64, so that clients can
//!   connect from any of those addresses and servers listen on their
//!   standard ports. The machine's own /usr, /etc, /var, /dev/log and
//!   network are never touched; killing the sandbox's first process ends
//!   everything in it, and the namespaces and mounts go with it.
//! - [`Sandbox::rsyslog`]: rsyslogd inside the sandbox, with imuxsock on its
//!   /dev/log (Annotate and ParseTrusted on, as our attested rule asks of
//!   rsyslog.conf), the shipped `rsyslog/smtp-after-popd-attested.conf`
//!   forwarding to the daemon, and two copies of everything it receives:
//!   `syslog.log` in the traditional file format (the samples) and
//!   `capture.log` with the facility and the attested sender (the facts).
//! - [`Sandbox::daemon`]: smtp-after-popd inside the sandbox (so that it
//!   resolves the accounts the sandbox's /etc/passwd defines).
//! - [`Client`]: POP3 and IMAP conversations from a chosen source address,
//!   in plain TCP (made in the sandbox's network namespace with setns(2))
//!   or TLS (`openssl s_client -bind`, implicit or STARTTLS).

#![allow(dead_code)]

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// The daemon binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_smtp-after-popd");

/// The host directories a sandbox keeps although it lays fresh file
/// systems over /tmp and /home: its scratch directory, the checkout and
/// the directory of the daemon's binary (a clone under /tmp, as a CI run
/// may make, would vanish otherwise), outermost first.
fn kept_dirs(scratch: &Path) -> String {
    let bin_dir = Path::new(BIN).parent().unwrap_or(Path::new("/"));
    let mut dirs = vec![
        PathBuf::from(env!("CARGO_MANIFEST_DIR")),
        bin_dir.to_path_buf(),
        scratch.to_path_buf(),
    ];
    dirs.sort();
    dirs.dedup();
    let under = |d: &Path| d.starts_with("/tmp") || d.starts_with("/home");
    dirs.iter()
        .filter(|d| under(d))
        .map(|d| d.display().to_string())
        .collect::<Vec<_>>()
        .join(" ")
}

/// The password of every test user.
pub const PASSWORD: &str = "secret";

/// The test users every sandbox has: name and uid.
pub const USERS: &[(&str, u32)] = &[
    ("alice", 2001),
    ("bob", 2002),
    ("carol", 2003),
    ("dave", 2004),
    ("erin", 2005),
];

// Whether the tests run as root (namespaces and servers need it), and
// polling with a deadline: the test binaries' shared helpers.
pub use crate::common::{is_root, wait_for};

fn target_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("target/conformance")
}

/// Holds an exclusive flock on `path` until dropped.
struct FileLock(std::fs::File);

impl FileLock {
    fn take(path: &Path) -> FileLock {
        let f = std::fs::File::create(path).expect("lock file");
        // SAFETY: flock on a file we own; released when it is closed.
        unsafe {
            use std::os::fd::AsRawFd;
            libc::flock(f.as_raw_fd(), libc::LOCK_EX);
        }
        FileLock(f)
    }
}

/// The packages (name=version) that installing `packages` would add to
/// this machine, as `apt-get -s install --no-install-recommends` resolves
/// them (upgrades included: a server may need a newer library).
fn resolve(packages: &[&str]) -> Vec<String> {
    let out = Command::new("apt-get")
        .args([
            "-s",
            "-o",
            "Debug::NoLocking=1",
            "install",
            "--no-install-recommends",
        ])
        .args(packages)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .output()
        .expect("run apt-get");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "apt-get -s install {packages:?} failed (are the package lists there? apt-get update):\n{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // "Inst NAME [OLD] (NEW SUITE [ARCH])"
    let mut found: Vec<String> = text
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("Inst ")?;
            let name = rest.split_whitespace().next()?;
            let version = rest.split('(').nth(1)?.split_whitespace().next()?;
            Some(format!("{name}={version}"))
        })
        .collect();
    found.sort();
    found
}

/// Unpacks these Debian packages, and whatever they need that this machine
/// lacks, into a tree of their own (once per package set; later calls in
/// this run or later runs find it by its name, which hashes the resolved
/// name=version list). `/lib`, `/bin` and `/sbin` of the packages are
/// merged into `usr/`, as Debian 12's merged /usr has them.
pub fn unpacked(name: &str, packages: &[&str]) -> PathBuf {
    use std::hash::{Hash, Hasher};
    std::fs::create_dir_all(target_dir()).expect("mkdir target/conformance");
    let _lock = FileLock::take(&target_dir().join(format!("{name}.lock")));
    let set = resolve(packages);
    let mut h = std::collections::hash_map::DefaultHasher::new();
    set.hash(&mut h);
    let root = target_dir().join(format!("root-{name}-{:016x}", h.finish()));
    if root.join(".complete").exists() {
        return root;
    }
    let staging = root.with_extension("tmp");
    let _ = std::fs::remove_dir_all(&staging);
    let debs = staging.join(".debs");
    std::fs::create_dir_all(&debs).expect("mkdir");
    if !set.is_empty() {
        let st = Command::new("apt-get")
            .arg("download")
            .args(&set)
            .current_dir(&debs)
            .stdout(Stdio::null())
            .status()
            .expect("apt-get download");
        assert!(st.success(), "apt-get download {set:?} failed");
    }
    for e in std::fs::read_dir(&debs).expect("readdir") {
        let deb = e.expect("entry").path();
        let st = Command::new("dpkg-deb")
            .arg("-x")
            .arg(&deb)
            .arg(&staging)
            .status()
            .expect("dpkg-deb");
        assert!(st.success(), "dpkg-deb -x {} failed", deb.display());
    }
    std::fs::remove_dir_all(&debs).expect("rm debs");
    for d in ["lib", "lib64", "bin", "sbin"] {
        let from = staging.join(d);
        if from.is_dir() && !from.is_symlink() {
            let to = staging.join("usr").join(d);
            std::fs::create_dir_all(&to).expect("mkdir");
            let st = Command::new("cp")
                .arg("-a")
                .arg(format!("{}/.", from.display()))
                .arg(&to)
                .status()
                .expect("cp");
            assert!(st.success());
            std::fs::remove_dir_all(&from).expect("rm");
        }
    }
    for d in ["usr", "etc", "var"] {
        std::fs::create_dir_all(staging.join(d)).expect("mkdir");
    }
    std::fs::write(staging.join(".packages"), set.join("\n") + "\n").expect("write");
    std::fs::write(staging.join(".complete"), "").expect("write");
    let _ = std::fs::remove_dir_all(&root);
    std::fs::rename(&staging, &root).expect("rename");
    root
}

/// A child process killed when dropped.
pub struct Proc {
    pub name: String,
    pub child: Child,
}

impl Proc {
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Private namespaces with a server's unpacked packages laid over the
/// system (see the module doc).
pub struct Sandbox {
    /// Scratch directory: overlay upper layers, logs, sockets.
    pub dir: tempfile::TempDir,
    /// The unpacked tree, if any.
    pub root: Option<PathBuf>,
    /// Its name: what rsyslog received is kept under it when it ends.
    pub name: String,
    /// The messages [`Sandbox::forge`] sent.
    pub forged: std::sync::Mutex<Vec<String>>,
    /// `unshare`, whose child is the sandbox's first process.
    unshare: Child,
    /// The first process (pid 1 inside), as the machine sees it.
    holder: u32,
}

impl Sandbox {
    /// A sandbox over `root` (from [`unpacked`]), or over the system alone.
    /// What its rsyslog receives is kept as `NAME.log` in
    /// target/conformance/captured/ when it ends, pass or fail.
    pub fn start(name: &str, root: Option<&Path>) -> Sandbox {
        let dir = tempfile::Builder::new()
            .prefix(&format!("sap-conf-{}-", std::process::id()))
            .tempdir()
            .expect("temp dir");
        let s = dir.path();
        let layer = |d: &str| match root {
            Some(r) => format!("{}:/{d}", r.join(d).display()),
            None => format!("/{d}"),
        };
        // The first process lays out the file system and network, then
        // stays as pid 1, reaping the orphans of daemonising servers.
        let script = format!(
            "set -e\n\
             S={s}\n\
             mkdir -p $S/up/etc $S/up/var $S/up/usr $S/work/etc $S/work/var $S/work/usr $S/devsave\n\
             mount -t overlay overlay -o lowerdir={usr},upperdir=$S/up/usr,workdir=$S/work/usr /usr\n\
             mount -t overlay overlay -o lowerdir={etc},upperdir=$S/up/etc,workdir=$S/work/etc /etc\n\
             mount -t overlay overlay -o lowerdir={var},upperdir=$S/up/var,workdir=$S/work/var /var\n\
             mount -t tmpfs -o mode=755 tmpfs /run\n\
             mkdir -m 1777 /run/lock\n\
             i=0; for d in {keep}; do mkdir /run/keep$i; mount --bind $d /run/keep$i; i=$((i+1)); done\n\
             mount -t tmpfs -o mode=755 tmpfs /home\n\
             mount -t tmpfs -o mode=1777 tmpfs /tmp\n\
             i=0; for d in {keep}; do mkdir -p $d; mount --bind /run/keep$i $d; umount /run/keep$i; rmdir /run/keep$i; i=$((i+1)); done\n\
             mount --rbind /dev $S/devsave\n\
             mount -t tmpfs -o mode=755 tmpfs /dev\n\
             for n in null zero full random urandom tty; do touch /dev/$n; mount --bind $S/devsave/$n /dev/$n; done\n\
             mkdir /dev/pts /dev/shm\n\
             mount --bind $S/devsave/pts /dev/pts\n\
             ln -s pts/ptmx /dev/ptmx\n\
             mount -t tmpfs -o mode=1777 tmpfs /dev/shm\n\
             umount -l $S/devsave\n\
             ln -s $S/devlog.sock /dev/log\n\
             hostname mail\n\
             ip link set lo up\n\
             for n in 192.0.2.0/24 198.51.100.0/24 203.0.113.0/24; do ip route add local $n dev lo; done\n\
             ip -6 addr add 2001:db8::1/64 dev lo\n\
             ip -6 route add local 2001:db8::/64 dev lo\n\
             touch $S/ready\n\
             exec perl -e '$SIG{{TERM}} = sub {{ exit 0 }}; while (1) {{ sleep 1 if wait() < 0 }}'\n",
            s = s.display(),
            keep = kept_dirs(s),
            usr = layer("usr"),
            etc = layer("etc"),
            var = layer("var"),
        );
        std::fs::write(s.join("init.sh"), script).expect("init.sh");
        let out = std::fs::File::create(s.join("init.out")).expect("init.out");
        let mut cmd = Command::new("unshare");
        cmd.args([
            "--mount",
            "--net",
            "--pid",
            "--uts",
            "--fork",
            "--mount-proc",
            "--kill-child",
            "sh",
        ])
        .arg(s.join("init.sh"))
        .stdin(Stdio::null())
        .stdout(out.try_clone().expect("dup"))
        .stderr(out);
        // If this test process dies, unshare dies, and --kill-child ends
        // the sandbox.
        unsafe {
            use std::os::unix::process::CommandExt;
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let mut unshare = cmd.spawn().expect("spawn unshare");
        let up = wait_for(Duration::from_secs(60), || {
            s.join("ready").exists() || matches!(unshare.try_wait(), Ok(Some(_)))
        });
        assert!(
            up && s.join("ready").exists(),
            "the sandbox did not start: {}",
            std::fs::read_to_string(s.join("init.out")).unwrap_or_default()
        );
        let pid = unshare.id();
        let children =
            std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
        let holder: u32 = children
            .split_whitespace()
            .next()
            .and_then(|p| p.parse().ok())
            .expect("the sandbox's first process");
        let sb = Sandbox {
            dir,
            root: root.map(Path::to_path_buf),
            name: name.to_string(),
            forged: Default::default(),
            unshare,
            holder,
        };
        sb.add_users();
        sb
    }

    /// A path in the scratch directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A command that runs `program` inside the sandbox.
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("nsenter");
        c.arg("-t")
            .arg(self.holder.to_string())
            .args(["--mount", "--net", "--pid", "--uts", "--"])
            .arg(program);
        c
    }

    /// Runs a shell script inside the sandbox; panics when it fails.
    /// Returns its output (through a file, not a pipe: a server the script
    /// starts in the background keeps its standard output open).
    pub fn sh(&self, script: &str) -> String {
        let out_path = self.path("sh.out");
        let out = std::fs::File::create(&out_path).expect("sh.out");
        let st = self
            .command("sh")
            .arg("-c")
            .arg(script)
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("dup"))
            .stderr(out)
            .status()
            .expect("nsenter");
        let text = std::fs::read_to_string(&out_path).unwrap_or_default();
        assert!(st.success(), "in the sandbox, {script}\nfailed: {text}");
        text
    }

    /// Writes a record to the sandbox's /dev/log as an unprivileged local
    /// user would (`logger` as nobody), with this tag, priority and
    /// message: what a forger can send.
    pub fn forge(&self, tag: &str, priority: &str, message: &str) {
        let st = self
            .command("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "logger"])
            .args(["-t", tag, "-p", priority, "--", message])
            .status()
            .expect("logger");
        assert!(st.success(), "logger as nobody failed");
        if let Ok(mut f) = self.forged.lock() {
            f.push(message.to_string());
        }
    }

    /// Whether a message is one [`Sandbox::forge`] sent.
    pub fn is_forged(&self, message: &str) -> bool {
        self.forged
            .lock()
            .map(|f| f.iter().any(|m| m == message))
            .unwrap_or(false)
    }

    /// Writes a file inside the sandbox (in its own /etc, /var, ...).
    pub fn write(&self, path: &str, text: &str) {
        let mut child = self
            .command("sh")
            .arg("-c")
            .arg(format!("mkdir -p \"$(dirname {path})\" && cat > {path}"))
            .stdin(Stdio::piped())
            .spawn()
            .expect("nsenter");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(text.as_bytes())
            .expect("write");
        assert!(child.wait().expect("wait").success(), "cannot write {path}");
    }

    /// Starts a long-running program inside the sandbox; its output goes
    /// to `NAME.out` in the scratch directory.
    pub fn spawn(&self, name: &str, mut cmd: Command) -> Proc {
        let out = std::fs::File::create(self.path(&format!("{name}.out"))).expect("out");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("dup"))
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Proc {
            name: name.to_string(),
            child,
        }
    }

    /// What a program started with [`Sandbox::spawn`] printed.
    pub fn output_of(&self, name: &str) -> String {
        std::fs::read_to_string(self.path(&format!("{name}.out"))).unwrap_or_default()
    }

    /// The test users: /etc/passwd, /etc/shadow (password [`PASSWORD`]),
    /// /etc/group, a home with an empty Maildir and a one-message mbox in
    /// /var/mail; PAM without its delay after a failure.
    fn add_users(&self) {
        let hash = Command::new("openssl")
            .args(["passwd", "-6", PASSWORD])
            .output()
            .expect("openssl passwd");
        let hash = String::from_utf8_lossy(&hash.stdout).trim().to_string();
        // PAM's two-second delay after a failed password, off: the suite
        // drives many failures.
        let mut script = String::from(
            "set -e\nsed -i 's/pam_unix.so nullok$/pam_unix.so nullok nodelay/' /etc/pam.d/common-auth\n",
        );
        for (u, id) in USERS {
            script.push_str(&format!(
                "echo '{u}:x:{id}:{id}::/home/{u}:/bin/sh' >> /etc/passwd\n\
                 echo '{u}:x:{id}:' >> /etc/group\n\
                 echo '{u}:{hash}:19000:0:99999:7:::' >> /etc/shadow\n\
                 mkdir -p /home/{u}/Maildir/cur /home/{u}/Maildir/new /home/{u}/Maildir/tmp\n\
                 chown -R {u}:{u} /home/{u}\n\
                 printf 'From a@example.org Thu Jan  1 00:00:00 2024\\nSubject: t\\n\\nhi\\n\\n' > /var/mail/{u}\n\
                 chown {u}:mail /var/mail/{u}\n\
                 chmod 660 /var/mail/{u}\n"
            ));
        }
        self.sh(&script);
    }

    /// Adds a system account (and its group) inside the sandbox.
    pub fn add_account(&self, name: &str, uid: u32, gid: u32, home: &str) {
        self.sh(&format!(
            "grep -q '^{name}:' /etc/group || echo '{name}:x:{gid}:' >> /etc/group\n\
             echo '{name}:x:{uid}:{gid}::{home}:/usr/sbin/nologin' >> /etc/passwd\n\
             echo '{name}:*:19000:0:99999:7:::' >> /etc/shadow\n"
        ));
    }

    /// Starts rsyslogd inside the sandbox (see the module doc) with the
    /// shipped attested rule forwarding to `daemon_socket`.
    pub fn rsyslog(&self, daemon_socket: &Path) -> Proc {
        let dir = self.path("rsyslog");
        std::fs::create_dir_all(&dir).expect("mkdir");
        let rule = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("rsyslog/smtp-after-popd-attested.conf"),
        )
        .expect("rsyslog/smtp-after-popd-attested.conf");
        assert!(rule.contains("/run/smtp-after-popd/syslog.sock"));
        let rule = rule.replace(
            "/run/smtp-after-popd/syslog.sock",
            &daemon_socket.display().to_string(),
        );
        std::fs::write(dir.join("rule.conf"), rule).expect("rule.conf");
        std::fs::write(
            dir.join("rsyslog.conf"),
            format!(
                "global(workDirectory=\"{dir}\")\n\
                 module(load=\"imuxsock\" SysSock.Use=\"off\")\n\
                 input(type=\"imuxsock\" Socket=\"{sock}\" Annotate=\"on\" ParseTrusted=\"on\")\n\
                 template(name=\"ConformanceCapture\" type=\"string\" string=\"%syslogfacility-text%\\t%syslogseverity-text%\\t%syslogtag%\\t%$!exe%\\t%$!uid%\\t%$!pid%\\t%msg:::sp-if-no-1st-sp%%msg:::drop-last-lf%\\n\")\n\
                 template(name=\"ConformanceFile\" type=\"string\" string=\"%timereported% %hostname% %syslogtag%%msg:::sp-if-no-1st-sp%%msg:::drop-last-lf%\\n\")\n\
                 *.* action(type=\"omfile\" file=\"{capture}\" template=\"ConformanceCapture\")\n\
                 *.* action(type=\"omfile\" file=\"{file}\" template=\"ConformanceFile\")\n\
                 $IncludeConfig {dir}/rule.conf\n",
                dir = dir.display(),
                sock = self.path("devlog.sock").display(),
                capture = self.path("capture.log").display(),
                file = self.path("syslog.log").display(),
            ),
        )
        .expect("rsyslog.conf");
        let mut cmd = self.command("rsyslogd");
        cmd.arg("-n")
            .arg("-f")
            .arg(dir.join("rsyslog.conf"))
            .arg("-i")
            .arg(dir.join("rsyslogd.pid"));
        let mut p = self.spawn("rsyslogd", cmd);
        let up = wait_for(Duration::from_secs(60), || {
            self.path("devlog.sock").exists() || !p.running()
        });
        assert!(
            up && p.running(),
            "rsyslogd did not start: {}",
            self.output_of("rsyslogd")
        );
        p
    }

    /// Starts the daemon inside the sandbox: a unix socket listener in the
    /// scratch directory, declared attested (`?attested=yes`: the sandbox's
    /// rsyslog runs the attested rule into it), the map there,
    /// `--require-attestation`, and `extra` options.
    pub fn daemon(&self, extra: &[&str]) -> SandboxDaemon {
        let mail_config = self.path("postfix");
        std::fs::create_dir_all(&mail_config).expect("mkdir");
        std::fs::write(mail_config.join("main.cf"), "").expect("main.cf");
        std::fs::File::options()
            .write(true)
            .open(mail_config.join("main.cf"))
            .and_then(|f| f.set_modified(std::time::SystemTime::now() - Duration::from_secs(60)))
            .expect("main.cf mtime");
        let socket = self.path("daemon.sock");
        let map = self.path("authenticated_ips");
        let mut cmd = self.command("env");
        cmd.arg(format!("MAIL_CONFIG={}", mail_config.display()))
            .arg(BIN)
            .arg("--listen")
            .arg(format!("unix://{}?attested=yes", socket.display()))
            .arg("--map")
            .arg(&map)
            .args([
                "--control",
                "none",
                "--require-attestation",
                "--log-level",
                "debug",
                // A run takes minutes on a loaded machine: no grant may
                // expire before the map is compared with the logins.
                "--window",
                "30m",
            ])
            .args(extra);
        let proc = self.spawn("daemon", cmd);
        let mut d = SandboxDaemon {
            proc,
            log: self.path("daemon.out"),
            socket,
            map,
        };
        let ok = wait_for(Duration::from_secs(60), || {
            d.log_text().contains("started: ") || !d.proc.running()
        });
        assert!(
            ok && d.proc.running(),
            "daemon did not start:\n{}",
            d.log_text()
        );
        d
    }

    /// Runs `f` on a thread that has joined the sandbox's network
    /// namespace (sockets made there stay there).
    pub fn in_net<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/proc/{}/ns/net", self.holder);
        std::thread::spawn(move || {
            let ns = std::fs::File::open(&path).expect("open netns");
            // SAFETY: setns on this thread only, with a namespace fd.
            let rc = unsafe {
                use std::os::fd::AsRawFd;
                libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET)
            };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .expect("thread in the sandbox's network")
    }

    /// A TCP connection from `src` to `dst`:`port` in the sandbox's network.
    pub fn connect(&self, src: &str, dst: &str, port: u16) -> TcpStream {
        let src: IpAddr = src.parse().expect("source address");
        let dst: IpAddr = dst.parse().expect("destination address");
        self.in_net(move || {
            use socket2::{Domain, Socket, Type};
            let domain = if dst.is_ipv4() {
                Domain::IPV4
            } else {
                Domain::IPV6
            };
            let s = Socket::new(domain, Type::STREAM, None).expect("socket");
            // IPv6 binds only an address assigned to an interface, not one
            // of a local route as IPv4 does: ask for it anyway.
            if src.is_ipv6() {
                use std::os::fd::AsRawFd;
                let one: libc::c_int = 1;
                // SAFETY: setsockopt with a valid fd and an int option.
                let rc = unsafe {
                    libc::setsockopt(
                        s.as_raw_fd(),
                        libc::IPPROTO_IPV6,
                        libc::IPV6_FREEBIND,
                        (&one as *const libc::c_int).cast(),
                        std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                    )
                };
                assert_eq!(rc, 0, "IPV6_FREEBIND");
            }
            s.bind(&SocketAddr::new(src, 0).into())
                .unwrap_or_else(|e| panic!("bind {src}: {e}"));
            s.connect_timeout(&SocketAddr::new(dst, port).into(), Duration::from_secs(30))
                .unwrap_or_else(|e| panic!("connect {dst}:{port} from {src}: {e}"));
            let s: TcpStream = s.into();
            s.set_read_timeout(Some(Duration::from_secs(60)))
                .expect("timeout");
            s
        })
    }

    /// Waits until something listens on `port` (any address) in the
    /// sandbox, or panics with `what`'s output.
    pub fn wait_listening(&self, port: u16, what: &str) {
        self.wait_listening_on("", port, what)
    }

    /// Waits until something listens on `addr`:`port` in the sandbox
    /// (`addr` as `ss` prints it; "" for any), or panics with `what`'s
    /// output.
    pub fn wait_listening_on(&self, addr: &str, port: u16, what: &str) {
        let ok = wait_for(Duration::from_secs(60), || {
            let out = self.command("ss").args(["-Hltn"]).output().expect("ss");
            String::from_utf8_lossy(&out.stdout).lines().any(|l| {
                l.split_whitespace()
                    .nth(3)
                    .is_some_and(|a| a.ends_with(&format!(":{port}")) && a.starts_with(addr))
            })
        });
        assert!(
            ok,
            "{what} does not listen on port {port}:\n{}\n{}",
            self.output_of(what),
            self.syslog()
        );
    }

    /// Everything the sandbox's rsyslog received, in the file format.
    pub fn syslog(&self) -> String {
        std::fs::read_to_string(self.path("syslog.log")).unwrap_or_default()
    }

    /// Everything the sandbox's rsyslog received, with facility and the
    /// attested sender.
    pub fn captured(&self) -> Vec<Captured> {
        std::fs::read_to_string(self.path("capture.log"))
            .unwrap_or_default()
            .lines()
            .filter_map(Captured::parse)
            .collect()
    }

    /// A client conversation over plain TCP.
    pub fn plain(&self, src: &str, dst: &str, port: u16) -> Client {
        Client::tcp(self.connect(src, dst, port))
    }

    /// A client conversation over TLS: implicit, or after STARTTLS (`pop3`
    /// or `imap`), through `openssl s_client` in the sandbox's network.
    pub fn tls(&self, src: &str, dst: &str, port: u16, starttls: Option<&str>) -> Client {
        let mut cmd = Command::new("nsenter");
        cmd.arg("-t")
            .arg(self.holder.to_string())
            .args([
                "--net",
                "--",
                "openssl",
                "s_client",
                "-quiet",
                "-crlf",
                "-no_ign_eof",
            ])
            .arg("-connect")
            .arg(join_host_port(dst, port))
            .arg("-bind")
            .arg(join_host_port(src, 0));
        if let Some(proto) = starttls {
            cmd.args(["-starttls", proto]);
        }
        Client::child(cmd)
    }

    /// Copies what rsyslog received to `target/conformance/captured/NAME.log`
    /// (the material of tests/samples/) and `NAME.attested` (with the
    /// facility and the attested sender).
    fn keep_capture(&self) {
        let dir = target_dir().join("captured");
        let _ = std::fs::create_dir_all(&dir);
        let _ = std::fs::copy(
            self.path("syslog.log"),
            dir.join(format!("{}.log", self.name)),
        );
        let _ = std::fs::copy(
            self.path("capture.log"),
            dir.join(format!("{}.attested", self.name)),
        );
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        self.keep_capture();
        // SIGKILL to the namespace's first process ends every process in
        // it; its mounts and network go with it.
        // SAFETY: plain kill(2) of the sandbox's first process.
        unsafe { libc::kill(self.holder as i32, libc::SIGKILL) };
        let _ = self.unshare.kill();
        let _ = self.unshare.wait();
        let gone = wait_for(Duration::from_secs(30), || {
            !Path::new(&format!("/proc/{}", self.holder)).exists()
        });
        assert!(
            gone || std::thread::panicking(),
            "the sandbox's processes are still there"
        );
    }
}

fn join_host_port(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// One record as the sandbox's rsyslog received it.
#[derive(Clone, Debug)]
pub struct Captured {
    pub facility: String,
    pub severity: String,
    /// The syslog tag, e.g. `popa3d[123]:`.
    pub tag: String,
    /// The attested executable ("" when the sender had exited).
    pub exe: String,
    /// The attested uid.
    pub uid: Option<u32>,
    pub pid: Option<u32>,
    pub msg: String,
}

impl Captured {
    fn parse(line: &str) -> Option<Captured> {
        let mut f = line.splitn(7, '\t');
        Some(Captured {
            facility: f.next()?.to_string(),
            severity: f.next()?.to_string(),
            tag: f.next()?.to_string(),
            exe: f.next()?.to_string(),
            uid: f.next()?.parse().ok(),
            pid: f.next()?.parse().ok(),
            msg: f.next()?.trim_start().to_string(),
        })
    }

    /// The tag without `[PID]:` or `:`.
    pub fn program(&self) -> &str {
        self.tag.split(['[', ':']).next().unwrap_or(&self.tag)
    }
}

/// The daemon running inside a sandbox.
pub struct SandboxDaemon {
    pub proc: Proc,
    pub log: PathBuf,
    pub socket: PathBuf,
    pub map: PathBuf,
}

impl SandboxDaemon {
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The addresses the map grants now.
    pub fn granted(&self) -> BTreeSet<String> {
        std::fs::read_to_string(&self.map)
            .unwrap_or_default()
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .filter_map(|l| l.split_whitespace().next().map(str::to_string))
            .collect()
    }

    /// Waits until the map grants `ip`.
    pub fn wait_granted(&self, ip: &str, within: Duration) -> bool {
        wait_for(within, || self.granted().contains(ip))
    }

    /// Waits until the daemon's log holds `text`.
    pub fn wait_log(&self, text: &str, within: Duration) -> bool {
        wait_for(within, || self.log_text().contains(text))
    }

    /// Whether the daemon has refused a line naming `ip` as ambiguous.
    pub fn refused_ambiguous(&self, ip: &str) -> bool {
        ambiguity_logged(&self.log_text(), ip)
    }
}

/// Whether `log` (the daemon's) holds a refusal of a line naming `ip` as
/// ambiguous ("... but is ambiguous: ... (message \"...\")"), `ip` standing
/// as an address of its own there (192.0.2.12 is not in 192.0.2.124; an
/// IPv4 client, as the tests' are, may be written IPv4-mapped).
pub fn ambiguity_logged(log: &str, ip: &str) -> bool {
    let part = |c: char| c.is_ascii_digit() || c == '.';
    log.lines()
        .filter(|l| l.contains("but is ambiguous: "))
        .any(|l| {
            l.match_indices(ip)
                .any(|(i, _)| !l[..i].ends_with(part) && !l[i + ip.len()..].starts_with(part))
        })
}

/// Reads lines from a child's stdout on a thread, so that reads can time
/// out.
struct LineReader {
    rx: mpsc::Receiver<String>,
}

impl LineReader {
    fn new(r: impl Read + Send + 'static) -> LineReader {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut r = BufReader::new(r);
            loop {
                let mut l = String::new();
                match r.read_line(&mut l) {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {
                        if tx.send(l).is_err() {
                            return;
                        }
                    }
                }
            }
        });
        LineReader { rx }
    }
}

enum Transport {
    Tcp {
        reader: BufReader<TcpStream>,
        writer: TcpStream,
    },
    Child {
        child: Child,
        stdin: ChildStdin,
        lines: LineReader,
    },
}

/// A line-based POP3 or IMAP conversation.
pub struct Client {
    t: Transport,
    /// Everything read, for failure messages.
    pub transcript: String,
}

impl Client {
    fn tcp(s: TcpStream) -> Client {
        let writer = s.try_clone().expect("clone");
        Client {
            t: Transport::Tcp {
                reader: BufReader::new(s),
                writer,
            },
            transcript: String::new(),
        }
    }

    fn child(mut cmd: Command) -> Client {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("openssl s_client");
        let stdin = child.stdin.take().expect("stdin");
        let lines = LineReader::new(child.stdout.take().expect("stdout"));
        Client {
            t: Transport::Child {
                child,
                stdin,
                lines,
            },
            transcript: String::new(),
        }
    }

    /// One line from the server ("" at the end or after 10 s of silence).
    pub fn line(&mut self) -> String {
        let l = match &mut self.t {
            Transport::Tcp { reader, .. } => {
                let mut l = String::new();
                let _ = reader.read_line(&mut l);
                l
            }
            Transport::Child { lines, .. } => lines
                .rx
                .recv_timeout(Duration::from_secs(60))
                .unwrap_or_default(),
        };
        self.transcript.push_str(&format!("S: {l}"));
        l.trim_end_matches(['\r', '\n']).to_string()
    }

    /// Sends one command line.
    pub fn send(&mut self, cmd: &str) {
        self.transcript.push_str(&format!("C: {cmd}\n"));
        let _ = match &mut self.t {
            Transport::Tcp { writer, .. } => writer.write_all(format!("{cmd}\r\n").as_bytes()),
            // s_client -crlf turns the newline into CRLF.
            Transport::Child { stdin, .. } => stdin
                .write_all(format!("{cmd}\n").as_bytes())
                .and_then(|_| stdin.flush()),
        };
    }

    /// Reads IMAP lines until the tagged reply to `tag` (or a
    /// continuation request); returns the last line.
    pub fn imap_reply(&mut self, tag: &str) -> String {
        loop {
            let l = self.line();
            if l.is_empty() || l.starts_with(&format!("{tag} ")) || l.starts_with('+') {
                return l;
            }
        }
    }

    /// Reads IMAP lines until the greeting (the first untagged OK).
    pub fn greeting(&mut self) -> String {
        self.line()
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        if let Transport::Child { child, .. } = &mut self.t {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The MD5 of `data` in hex, from `openssl`.
pub fn md5_hex(data: &str) -> String {
    openssl_digest(&["dgst", "-md5", "-r"], data)
}

/// HMAC-MD5 of `data` with `key`, in hex (CRAM-MD5).
pub fn hmac_md5_hex(key: &str, data: &[u8]) -> String {
    let mut child = Command::new("openssl")
        .args(["dgst", "-md5", "-r", "-hmac", key])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("openssl");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(data)
        .expect("write");
    let out = child.wait_with_output().expect("openssl");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or("")
        .to_string()
}

fn openssl_digest(args: &[&str], data: &str) -> String {
    let mut child = Command::new("openssl")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("openssl");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(data.as_bytes())
        .expect("write");
    let out = child.wait_with_output().expect("openssl");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or("")
        .to_string()
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Base64 (RFC 4648, padded).
pub fn base64(data: &[u8]) -> String {
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(B64[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Decodes base64, ignoring anything outside the alphabet.
pub fn unbase64(text: &str) -> Vec<u8> {
    let mut out = Vec::new();
    let mut acc = 0u32;
    let mut bits = 0;
    for c in text.bytes() {
        let Some(v) = B64.iter().position(|&b| b == c) else {
            continue;
        };
        acc = (acc << 6) | v as u32;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    out
}
