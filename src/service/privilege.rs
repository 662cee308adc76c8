//! Least privilege: the daemon needs root only to bind what it is told to
//! bind (a port below 1024, a socket in a root-owned directory). With
//! `--user` (and `--group`) it binds its listeners, gives its unix socket
//! files their owner, group and mode, and then gives up root for good
//! before it reads a single record or writes the map.
//!
//! Consumes: user and group names (or numbers) from the configuration.
//! Produces: resolved ids, and the process switched to them.
//! Trusts: the system's user and group databases (NSS).

use std::ffi::CString;
use std::path::Path;

/// A resolved user: name, uid and primary gid.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct User {
    /// The name as configured.
    pub name: String,
    /// Its uid.
    pub uid: u32,
    /// Its primary group.
    pub gid: u32,
}

/// A resolved group: name and gid.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Group {
    /// The name as configured.
    pub name: String,
    /// Its gid.
    pub gid: u32,
}

/// Looks up a user by name, or takes a number as a uid (primary gid the
/// same number unless the user exists).
pub fn user(name: &str) -> Result<User, String> {
    let c = CString::new(name).map_err(|_| "a user name cannot hold a NUL byte".to_string())?;
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    // SAFETY: passwd is plain old data; getpwnam_r writes into it and buf.
    let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
    let mut result: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the sizes given.
    let rc = unsafe {
        libc::getpwnam_r(
            c.as_ptr(),
            &mut pw,
            buf.as_mut_ptr(),
            buf.len(),
            &mut result,
        )
    };
    if rc == 0 && !result.is_null() {
        return Ok(User {
            name: name.to_string(),
            uid: pw.pw_uid,
            gid: pw.pw_gid,
        });
    }
    if let Ok(uid) = name.parse::<u32>() {
        // A number: the user of that uid, if there is one, by its name.
        if let Some((name, gid)) = passwd_of(uid) {
            return Ok(User { name, uid, gid });
        }
        return Ok(User {
            name: name.to_string(),
            uid,
            gid: uid,
        });
    }
    Err(
        "no such user: create it (e.g. adduser --system --group smtp-after-popd) or name another"
            .into(),
    )
}

/// Looks up a group by name, or takes a number as a gid.
pub fn group(name: &str) -> Result<Group, String> {
    let c = CString::new(name).map_err(|_| "a group name cannot hold a NUL byte".to_string())?;
    let mut buf = vec![0 as libc::c_char; 64 * 1024];
    // SAFETY: group is plain old data; getgrnam_r writes into it and buf.
    let mut gr: libc::group = unsafe { std::mem::zeroed() };
    let mut result: *mut libc::group = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the sizes given.
    let rc = unsafe {
        libc::getgrnam_r(
            c.as_ptr(),
            &mut gr,
            buf.as_mut_ptr(),
            buf.len(),
            &mut result,
        )
    };
    if rc == 0 && !result.is_null() {
        return Ok(Group {
            name: name.to_string(),
            gid: gr.gr_gid,
        });
    }
    if let Ok(gid) = name.parse::<u32>() {
        return Ok(Group {
            name: group_name(gid).unwrap_or_else(|| name.to_string()),
            gid,
        });
    }
    Err("no such group: create it or name another".into())
}

/// The name of group `gid`, if the group database has one.
pub fn group_name(gid: u32) -> Option<String> {
    let mut buf = vec![0 as libc::c_char; 64 * 1024];
    // SAFETY: group is plain old data; getgrgid_r writes into it and buf.
    let mut gr: libc::group = unsafe { std::mem::zeroed() };
    let mut result: *mut libc::group = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the sizes given.
    let rc = unsafe { libc::getgrgid_r(gid, &mut gr, buf.as_mut_ptr(), buf.len(), &mut result) };
    if rc != 0 || result.is_null() || gr.gr_name.is_null() {
        return None;
    }
    // SAFETY: gr_name points at a NUL-terminated string inside buf.
    let name = unsafe { std::ffi::CStr::from_ptr(gr.gr_name) };
    Some(name.to_string_lossy().into_owned())
}

/// The name of user `uid`, if the user database has one.
pub fn user_name(uid: u32) -> Option<String> {
    passwd_of(uid).map(|(name, _)| name)
}

/// The name and primary group of user `uid`, if the user database has it.
fn passwd_of(uid: u32) -> Option<(String, u32)> {
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    // SAFETY: passwd is plain old data; getpwuid_r writes into it and buf.
    let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
    let mut result: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the sizes given.
    let rc = unsafe { libc::getpwuid_r(uid, &mut pw, buf.as_mut_ptr(), buf.len(), &mut result) };
    if rc != 0 || result.is_null() || pw.pw_name.is_null() {
        return None;
    }
    // SAFETY: pw_name points at a NUL-terminated string inside buf.
    let name = unsafe { std::ffi::CStr::from_ptr(pw.pw_name) };
    Some((name.to_string_lossy().into_owned(), pw.pw_gid))
}

/// Switches the whole process to `uid` and `gid` (no supplementary
/// groups) for good, and checks that root cannot be regained.
pub fn drop_to(uid: u32, gid: u32) -> Result<(), String> {
    // SAFETY: plain system calls; glibc applies set*id to every thread.
    unsafe {
        if libc::setgroups(1, &gid) != 0 {
            return Err(format!(
                "setgroups([{gid}]): {}",
                std::io::Error::last_os_error()
            ));
        }
        if libc::setgid(gid) != 0 {
            return Err(format!(
                "setgid({gid}): {}",
                std::io::Error::last_os_error()
            ));
        }
        if libc::setuid(uid) != 0 {
            return Err(format!(
                "setuid({uid}): {}",
                std::io::Error::last_os_error()
            ));
        }
        if uid != 0 && (libc::setuid(0) == 0 || libc::geteuid() == 0) {
            return Err("root could be regained after setuid; refusing to run".into());
        }
        if libc::getuid() != uid || libc::getgid() != gid {
            return Err("the process ids did not change".into());
        }
    }
    Ok(())
}

/// Whether the current process may create files in `dir`.
pub fn can_write(dir: &Path) -> bool {
    let Ok(c) = CString::new(dir.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: access(2) on a valid C string.
    unsafe { libc::access(c.as_ptr(), libc::W_OK | libc::X_OK) == 0 }
}

/// The effective uid of the process.
pub fn effective_uid() -> u32 {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() }
}

/// `user NAME (uid N)`, or `uid N` when the user database has no name.
pub fn describe_uid(uid: u32) -> String {
    match user_name(uid) {
        Some(name) => format!("user {name} (uid {uid})"),
        None => format!("uid {uid}"),
    }
}

/// `group NAME (gid N)`, or `gid N` when the group database has no name.
pub fn describe_gid(gid: u32) -> String {
    match group_name(gid) {
        Some(name) => format!("group {name} (gid {gid})"),
        None => format!("gid {gid}"),
    }
}

/// Whether the current process may enter (search) `dir`.
pub fn can_search(dir: &Path) -> bool {
    let Ok(c) = CString::new(dir.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: faccessat(2) on a valid C string, for the effective ids.
    unsafe { libc::faccessat(libc::AT_FDCWD, c.as_ptr(), libc::X_OK, libc::AT_EACCESS) == 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_and_numbers_resolve() {
        assert_eq!(user("root").unwrap().uid, 0);
        assert_eq!(group("root").unwrap().gid, 0);
        assert_eq!(user("4242").unwrap().uid, 4242);
        assert!(user("no-such-user-smtp-after-popd").is_err());
        assert!(group("no-such-group-smtp-after-popd").is_err());
        assert_eq!(describe_uid(0), "user root (uid 0)");
        assert_eq!(describe_gid(0), "group root (gid 0)");
        assert_eq!(describe_uid(4_000_000_000), "uid 4000000000");
        assert_eq!(describe_gid(4_000_000_000), "gid 4000000000");
        assert_eq!(group_name(0).as_deref(), Some("root"));
        // Numbers are named when the databases know them.
        assert_eq!(group("0").unwrap().name, "root");
        assert_eq!(user("0").unwrap().name, "root");
    }
}
